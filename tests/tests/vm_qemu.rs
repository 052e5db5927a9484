//! A real Debian VM, under systemd, in qemu (software emulation): it
//! installs the `.deb`, runs the one join line, and becomes a member of a
//! `mesh up` topology with the gateway as its only route to it. Checked from
//! the host: the unit is active; a workload of the cluster calls the VM's
//! app and the app sees its SPIFFE ID; the VM's app calls a service of the
//! cluster and that service sees the VM's identity; after `systemctl
//! restart` and after a reboot the VM serves again without rejoining.
//!
//! Needs root, qemu-system-x86_64, mmdebstrap, mkfs.ext4 and dpkg-deb
//! (`.ci/run` installs them). The image is built once (about a minute,
//! from Debian's packages) and cached under `target/vm-image/`.
#![allow(clippy::print_stdout)] // timings and the guest's reports go to the test log

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{mesh_exe, replica, repo, start, workspace_exe};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOPOLOGY: &str = r#"
name: vm
clusters:
  - name: west
    trustDomain: west.mesh.local
    workloads:
      - name: web
        namespace: shop
        ports: [{name: http, port: 8080}]
        command: [mesh, demo, serve, --http-port, "8080"]
  - name: east
    trustDomain: east.mesh.local
    workloads:
      - name: api
        namespace: shop
        ports: [{name: http, port: 8080}]
        command: [mesh, demo, serve, --http-port, "8080"]
    resources: |
      apiVersion: v1
      kind: Service
      metadata: {name: api, namespace: shop}
      spec:
        selector: {app: api}
        ports: [{name: http, port: 8080, appProtocol: http}]
      ---
      apiVersion: v1
      kind: Service
      metadata: {name: billing, namespace: shop}
      spec:
        selector: {app: billing}
        ports: [{name: http, port: 18080, appProtocol: http}]
links:
  - {from: west, to: east, transport: tcp}
"#;

/// The longest the whole guest run may take (boot, install, join, restart,
/// reboot, power off); measured at 1-2 minutes on 2 cores.
const GUEST_DEADLINE: Duration = Duration::from_secs(480);

fn need(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is required by this test (.ci/run installs qemu-system-x86, mmdebstrap, e2fsprogs, dpkg)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The VM image, built once per version of the build script.
fn image() -> PathBuf {
    let script = repo().join("tests/vm/build-image.sh");
    let text = std::fs::read(&script).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &text);
    let key: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = repo().join("target/vm-image").join(key);
    if !dir.join("root.img").exists() {
        let started = Instant::now();
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new(&script).arg(&tmp));
        std::fs::rename(&tmp, &dir).unwrap();
        println!("built the VM image in {:?}", started.elapsed());
    }
    dir
}

/// `GET http://<authority>/` through a proxy's outbound listener.
async fn get_via(proxy: std::net::SocketAddr, authority: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(proxy).await.ok()?;
        let req = format!(
            "GET http://{authority}/ HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.ok()?;
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.ok()?;
        let status = raw.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            status,
            raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

/// East's api calls the VM's app (through east's gateway) until it answers.
async fn api_calls_the_vm(api_proxy: std::net::SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get_via(api_proxy, "billing.shop.svc.cluster.local:18080").await;
        if status == 200 || Instant::now() > deadline {
            assert_eq!(status, 200, "api reaches the VM's app: {body}");
            return body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Guest {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    ctl: tokio::net::unix::OwnedWriteHalf,
    started: Instant,
    console: PathBuf,
}

impl Guest {
    /// The end of the guest's console, for a failure's message.
    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }
}

impl Guest {
    /// The next `MESH <event> ...` report; fails the test on `FAILED`.
    async fn expect(&mut self, event: &str) -> String {
        let left = GUEST_DEADLINE.saturating_sub(self.started.elapsed());
        loop {
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the guest did not report {event} in time; its console:\n{}",
                        self.console_tail()
                    )
                })
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "the guest's control port closed before {event}; its console:\n{}",
                        self.console_tail()
                    )
                });
            let line = line.trim().to_owned();
            let Some(rest) = line.strip_prefix("MESH ") else {
                continue;
            };
            println!(
                "[{:>5.1}s] guest: {rest}",
                self.started.elapsed().as_secs_f64()
            );
            assert!(
                !rest.starts_with("FAILED"),
                "the guest failed: {rest}; its console:\n{}",
                self.console_tail()
            );
            if let Some(data) = rest.strip_prefix(event) {
                return data.trim().to_owned();
            }
        }
    }

    async fn go(&mut self, step: &str) {
        self.ctl
            .write_all(format!("GO {step}\n").as_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_vm_joins_through_the_gateway_and_serves_after_restart_and_reboot() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("0")),
        "this test needs root (qemu's image and the topology's addresses)"
    );
    for tool in [
        "qemu-system-x86_64",
        "mmdebstrap",
        "mkfs.ext4",
        "dpkg-deb",
        "python3",
    ] {
        need(tool);
    }
    let image = image();
    let work = tempfile::tempdir().unwrap();
    let w = |p: &str| work.path().join(p);

    // The cluster: west -> east, east runs a gateway on 127.63.0.2:4143.
    let mut started = start(TOPOLOGY, 62).await;
    let east = started.run.cluster("east").unwrap();
    let gateway = east.gateway.expect("east runs a gateway");
    let api = replica(&started.run.snapshot(), "east", "api-0");
    let api_proxy = std::net::SocketAddr::new(api.ip, 4140);

    // The payload disk: the .deb, the join line, the guest's scripts.
    let payload = w("payload");
    std::fs::create_dir_all(&payload).unwrap();
    for f in [
        "run.sh",
        "billing-app.py",
        "call.py",
        "ready.py",
        "isolated.py",
    ] {
        std::fs::copy(repo().join("tests/vm/guest").join(f), payload.join(f)).unwrap();
    }
    let deb = run(Command::new(repo().join("vm-agent/package/build-deb.sh"))
        .arg(workspace_exe("mesh-vm-agent"))
        .arg(w("deb")));
    std::fs::copy(deb.trim(), payload.join("mesh-vm-agent.deb")).unwrap();
    // What the operator runs on the cluster side; the VM sees the gateway
    // at 10.0.2.100:4143 (qemu forwards it).
    let line = run(Command::new(mesh_exe())
        .args(["vm", "token", "create", "--namespace", "shop"])
        .args(["--service-account", "billing", "--workload", "billing-1"])
        .args(["--labels", "app=billing", "--ports", "18080"])
        .args(["--gateway", "10.0.2.100:4143"])
        .arg("--data-dir")
        .arg(east.data_dir()));
    assert!(line.starts_with("mesh-vm-agent join mesh-vm1."), "{line}");
    std::fs::write(payload.join("join-line"), line.trim()).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "payload", "-d"])
        .arg(&payload)
        .arg(w("payload.img"))
        .arg("256M"));
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(image.join("root.img"))
        .arg(w("root.img")));

    // qemu: software emulation; the guest's only network path is the
    // forward to east's gateway (restrict=on cuts everything else); the
    // second serial port is the test's control channel.
    let relay = repo().join("tests/vm/relay.py");
    let ctl_path = w("ctl.sock");
    let console = std::fs::File::create(w("console.log")).unwrap();
    let started_at = Instant::now();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut qemu = KillOnDrop(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-smp",
                "2",
                "-m",
                "1024",
                "-nographic",
                "-nodefaults",
            ])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args(["-append", "root=/dev/vda rw console=ttyS0 quiet"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw",
                w("root.img").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                w("payload.img").display()
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:4143-cmd:python3 {} {} {}",
                relay.display(),
                gateway.ip(),
                gateway.port()
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-serial", "stdio"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", ctl_path.display()))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu starts"),
    );
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = tokio::net::UnixStream::connect(&ctl_path).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (read, ctl) = stream.expect("qemu's control port").into_split();
    let mut guest = Guest {
        lines: BufReader::new(read).lines(),
        ctl,
        started: started_at,
        console: w("console.log"),
    };

    guest.expect("BOOTED").await;
    let isolated = guest.expect("ISOLATED").await;
    assert!(isolated.contains("10.0.2.100:4143=open"), "{isolated}");
    for closed in [
        "10.0.2.2:8080",
        "10.0.2.2:4143",
        "10.0.2.2:22",
        "1.1.1.1:443",
    ] {
        assert!(
            isolated.contains(&format!("{closed}=closed")),
            "the gateway must be the guest's only path: {isolated}"
        );
    }
    guest.expect("INSTALLED").await;
    guest.expect("VERIFIED").await;
    guest.expect("JOINED").await;
    assert_eq!(guest.expect("UNIT").await, "active enabled");
    guest.expect("READY").await;
    let called = guest.expect("CALLED").await;
    assert!(
        called.contains("spiffe://east.mesh.local/ns/shop/sa/billing"),
        "api sees the VM's identity: {called}"
    );
    // The app's user, no proxy settings: the agent's DNS and the capture
    // rules take its call through the proxy, under the VM's identity.
    let direct = guest.expect("DIRECT").await;
    assert!(
        direct.contains("spiffe://east.mesh.local/ns/shop/sa/billing"),
        "transparent capture under the hardened unit: {direct}"
    );
    let rules: u32 = guest.expect("RULES").await.trim().parse().unwrap();
    assert!(rules > 0, "the capture rules are in place");
    let answer = api_calls_the_vm(api_proxy).await;
    assert!(
        answer.contains("\"client_id\": \"spiffe://east.mesh.local/ns/shop/sa/api\""),
        "the VM's app sees api's identity: {answer}"
    );
    println!(
        "[{:>5.1}s] host: api -> VM: {answer}",
        started_at.elapsed().as_secs_f64()
    );

    guest.go("restart").await;
    let called = guest.expect("RESTARTED").await;
    assert!(called.contains("sa/billing"), "{called}");
    assert_eq!(
        guest.expect("STOPPED").await.trim(),
        "0",
        "stopping the unit removes the capture rules"
    );
    let direct = guest.expect("STARTED").await;
    assert!(direct.contains("sa/billing"), "captured again: {direct}");
    api_calls_the_vm(api_proxy).await;

    guest.go("reboot").await;
    guest.expect("BOOTED").await;
    assert_eq!(guest.expect("UNIT").await, "active enabled");
    let called = guest.expect("REBOOTED").await;
    assert!(
        called.contains("sa/billing"),
        "after a reboot, no rejoin: {called}"
    );
    let direct = guest.expect("REBOOTED_DIRECT").await;
    assert!(
        direct.contains("sa/billing"),
        "captured after a reboot: {direct}"
    );
    let answer = api_calls_the_vm(api_proxy).await;
    assert!(answer.contains("sa/api"), "{answer}");
    println!(
        "[{:>5.1}s] host: the VM serves after a reboot",
        started_at.elapsed().as_secs_f64()
    );

    guest.go("poweroff").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("guest run took {:?}", started_at.elapsed());
    started.run.stop().await;
}
