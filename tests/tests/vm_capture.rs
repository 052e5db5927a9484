//! Transparent capture on a VM, as root, with two network namespaces as two
//! hosts: "cluster" (the control plane and `api` with its sidecar) and
//! "vm" (the agent, its app run as `nobody`, an SSH stand-in on 22), joined
//! by a veth pair. The agent is joined with `--capture-user nobody` and run
//! as a process, as the unit would. Needs root, `ip`, `iptables`,
//! `ip6tables`, `curl`, `setpriv` and `python3`; fails loudly without them.
#![allow(clippy::print_stdout)] // what the commands printed goes to the test log

use std::{
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh_exe,
    netns::{Host, http_app, require_root_and_tools, run, text},
    workspace_exe,
};

const CLUSTER_IP: &str = "10.201.0.1";
const VM_IP: &str = "10.201.0.2";
/// A host on the cluster's side that is not in the mesh.
const OUTSIDE_IP: &str = "10.201.0.3";
const VM_ID: &str = "spiffe://west.mesh.local/ns/shop/sa/billing";

/// Waits until the agent's rules are in place (it applies them once
/// its listeners are bound, after it turns ready).
fn wait_captured(host: &Host, agent: &str, config: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = text(&host.exec(&[agent, "capture", "show", "--config", config]));
        if shown.ends_with("# in place\n") {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "the capture rules are not in place: {shown}\n{}",
                host.logs_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP server that answers each connection's first line with `word`.
fn banner(port: u16, word: &str) -> String {
    format!(
        r#"
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"{word}\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", {port}), H).serve_forever()
"#
    )
}

/// Connects to host:port, says hello and prints the answer (or the error).
const READ_LINE: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"hello\n")
    print(s.makefile().readline().strip())
except Exception as e:
    print("error", e)
"#;

fn api_proxy_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("MESH_PROXY_CLUSTER", "west".into()),
        ("MESH_PROXY_TRUST_DOMAIN", "west.mesh.local".into()),
        ("MESH_PROXY_NAMESPACE", "shop".into()),
        ("MESH_PROXY_SERVICE_ACCOUNT", "api".into()),
        ("MESH_PROXY_WORKLOAD", "api-0".into()),
        (
            "MESH_PROXY_CONTROL_IDENTITY_ADDR",
            format!("{CLUSTER_IP}:8080"),
        ),
        ("MESH_PROXY_CONTROL_API_ADDR", format!("{CLUSTER_IP}:8086")),
        (
            "MESH_PROXY_TRUST_ANCHORS",
            dir.join("ca/bundle.json").display().to_string(),
        ),
        (
            "MESH_PROXY_JOIN_TOKEN_FILE",
            dir.join("api.token").display().to_string(),
        ),
        ("MESH_PROXY_INBOUND_ADDR", format!("{CLUSTER_IP}:4143")),
        ("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:4140".into()),
        ("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:14191".into()),
        ("MESH_PROXY_APP_IP", CLUSTER_IP.into()),
        ("MESH_PROXY_APP_PORTS", "http=9000".into()),
        ("MESH_PROXY_LABELS", "app=api".into()),
    ]
}

#[test]
fn transparent_capture_takes_the_apps_traffic_only_and_never_outlives_the_agent() {
    require_root_and_tools();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = |p: &str| dir.join(p).display().to_string();
    let mesh = mesh_exe();
    let agent = workspace_exe("mesh-vm-agent");
    let (mesh_s, agent_s) = (mesh.display().to_string(), agent.display().to_string());

    let mut cluster = Host::new("cl", dir);
    let mut vm = Host::new("vm", dir);
    cluster.ok(&[
        "ip", "link", "add", "c0", "type", "veth", "peer", "name", "v0", "netns", &vm.name,
    ]);
    cluster.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{CLUSTER_IP}/24"),
        "dev",
        "c0",
    ]);
    cluster.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{OUTSIDE_IP}/24"),
        "dev",
        "c0",
    ]);
    cluster.ok(&["ip", "link", "set", "c0", "up"]);
    vm.ok(&["ip", "addr", "add", &format!("{VM_IP}/24"), "dev", "v0"]);
    vm.ok(&["ip", "link", "set", "v0", "up"]);
    // No default route: like a VM whose only route is its network's, the
    // address mesh names resolve to is routed nowhere until the agent
    // routes it (to lo, where the capture rules see it).
    // The VM's resolver is the agent (`ip netns exec` mounts this file
    // over /etc/resolv.conf), as join says to do without systemd-resolved.
    std::fs::create_dir_all(format!("/etc/netns/{}", vm.name)).unwrap();
    std::fs::write(
        format!("/etc/netns/{}/resolv.conf", vm.name),
        "nameserver 127.0.0.153\n",
    )
    .unwrap();

    // The cluster: a control plane and `api` behind its sidecar.
    run(
        &mesh,
        &[
            "identity",
            "ca",
            "create",
            "--trust-domain",
            "west.mesh.local",
            "--out",
            &d("ca"),
        ],
    );
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(
        dir.join("config/shop.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 9000, appProtocol: http}]\n",
    )
    .unwrap();
    cluster.spawn(
        "control",
        &[
            &mesh_s,
            "control",
            "--cluster",
            "west",
            "--ca",
            &d("ca"),
            "--config-dir",
            &d("config"),
            "--data-dir",
            &d("data"),
            "--identity-addr",
            &format!("{CLUSTER_IP}:8080"),
            "--api-addr",
            &format!("{CLUSTER_IP}:8086"),
            "--admin-addr",
            "127.0.0.1:9990",
        ],
        &[],
    );
    cluster.wait_ok("http://127.0.0.1:9990/ready", "the control plane");
    let token = run(
        &mesh,
        &[
            "control",
            "token",
            "create",
            "--ns",
            "shop",
            "--sa",
            "api",
            "--workload",
            "api-0",
            "--labels",
            "app=api",
            "--addresses",
            CLUSTER_IP,
            "--data-dir",
            &d("data"),
        ],
    );
    std::fs::write(dir.join("api.token"), token.stdout).unwrap();
    cluster.spawn("api", &["python3", "-c", &http_app(CLUSTER_IP, 9000)], &[]);
    cluster.spawn("api-proxy", &[&mesh_s, "proxy"], &api_proxy_env(dir));
    cluster.wait_ok("http://127.0.0.1:14191/ready", "the api proxy");
    println!("{:?}: the cluster runs", t0.elapsed());
    // Two plain TCP servers the VM's app may reach: 2525 is skipped by
    // the capture, 2626 is not.
    cluster.spawn("smtp", &["python3", "-c", &banner(2525, "smtp")], &[]);
    cluster.spawn("plain", &["python3", "-c", &banner(2626, "plain")], &[]);

    // The VM: its app as `nobody` on the granted port, an SSH stand-in on 22.
    vm.spawn(
        "billing",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &http_app("0.0.0.0", 18080),
        ],
        &[],
    );
    vm.spawn(
        "ssh",
        &["python3", "-c", &banner(22, "SSH-2.0-stand-in")],
        &[],
    );
    let line = run(
        &mesh,
        &[
            "vm",
            "token",
            "create",
            "--namespace",
            "shop",
            "--service-account",
            "billing",
            "--workload",
            "billing-1",
            "--labels",
            "app=billing",
            "--ports",
            "18080",
            "--control-addr",
            CLUSTER_IP,
            "--data-dir",
            &d("data"),
        ],
    );
    let line = String::from_utf8_lossy(&line.stdout).into_owned();
    let join_string = line
        .split_whitespace()
        .nth(2)
        .expect("a join line")
        .to_owned();
    let config = d("vm/etc/vm-agent.json");
    let join = vm.exec(&[
        &agent_s,
        "join",
        &join_string,
        "--no-systemd",
        "--config",
        &config,
        "--state-dir",
        &d("vm/state"),
        "--workload-api-socket",
        &d("vm/run/workload.sock"),
        "--capture-user",
        "nobody",
        "--capture-skip-outbound-ports",
        "2525",
    ]);
    println!("{:?}: {}", t0.elapsed(), text(&join));
    assert!(join.status.success(), "{}", text(&join));

    // Before the agent runs, nothing is captured: plaintext reaches the app.
    let read_line = |host: &Host, nobody: bool, ip: &str, port: &str| {
        let args = ["/usr/bin/python3", "-c", READ_LINE, ip, port];
        let out = if nobody {
            host.as_nobody(&args)
        } else {
            host.exec(&args)
        };
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // (Once the app listens: it was started just now.)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let direct = cluster.curl(&format!("http://{VM_IP}:18080/direct"));
        if direct.contains("client=- path=/direct") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM's app never answered directly: {direct}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    vm.spawn("agent", &[&agent_s, "run", "--config", &config], &[]);
    vm.wait_ok("http://127.0.0.1:4191/ready", "the VM agent");
    wait_captured(&vm, &agent_s, &config);
    println!("{:?}: the agent runs with its rules in place", t0.elapsed());
    let rules = vm.ok(&["iptables", "-t", "nat", "-S"]);
    println!("{rules}");
    assert!(
        rules.contains("--uid-owner 65534 -j REDIRECT --to-ports 4140"),
        "{rules}"
    );
    assert!(
        rules.contains("--dport 18080 -j REDIRECT --to-ports 4143"),
        "{rules}"
    );
    let shown = vm.ok(&[&agent_s, "capture", "show", "--config", &config]);
    assert!(shown.ends_with("# in place\n"), "{shown}");
    let route = vm.ok(&["ip", "-4", "route", "show", "240.240.240.240/32"]);
    assert!(
        route.contains("dev lo"),
        "the agent routes the mesh names' address: {route}"
    );
    let status = vm.ok(&[&agent_s, "status", "--config", &config]);
    println!("{status}");
    assert!(
        status.contains("capture: transparent for uids [65534] gids [], rules in place"),
        "{status}"
    );

    // The app, knowing nothing of the mesh: a mesh name (the agent's DNS)
    // goes through the proxy over mTLS and api sees the VM's identity.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = text(&vm.as_nobody(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://api.shop.svc.cluster.local:9000/by-name",
        ]));
        if out.contains(&format!("client={VM_ID} path=/by-name")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app's call was not meshed: {out}\n{}",
            vm.logs_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // By address too: a meshed destination is never reached in plaintext.
    let by_ip = text(&vm.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{CLUSTER_IP}:9000/by-ip"),
    ]));
    assert!(
        by_ip.contains(&format!("client={VM_ID} path=/by-ip")),
        "{by_ip}"
    );
    // Root (the agent's user) is not captured: the mesh name's reserved
    // address leads nowhere for it.
    let as_root = vm.curl("http://api.shop.svc.cluster.local:9000/as-root");
    assert!(
        !as_root.contains("client="),
        "root's traffic was captured: {as_root}"
    );
    // A port the operator skipped goes straight; another one is captured
    // (and, unknown to discovery, passed through as the app asked).
    assert_eq!(read_line(&vm, true, OUTSIDE_IP, "2525"), "smtp");
    assert_eq!(read_line(&vm, true, OUTSIDE_IP, "2626"), "plain");
    let metrics = vm.ok(&["curl", "-s", "http://127.0.0.1:4191/metrics"]);
    assert!(
        metrics.contains(&format!("\"{OUTSIDE_IP}:2626\"")),
        "2626 went through the proxy: {metrics}"
    );
    assert!(
        !metrics.contains(&format!("\"{OUTSIDE_IP}:2525\"")),
        "2525 did not: {metrics}"
    );
    assert!(
        metrics.contains("mesh_vm_agent_capture_applied 1"),
        "{metrics}"
    );

    // Inbound: plaintext to the app's port now meets the inbound proxy,
    // which takes mTLS only; SSH is never captured.
    let plain = cluster.curl(&format!("http://{VM_IP}:18080/plaintext"));
    assert!(
        !plain.contains("client="),
        "plaintext reached the app around the proxy: {plain}"
    );
    assert_eq!(read_line(&cluster, false, VM_IP, "22"), "SSH-2.0-stand-in");

    // A firewall reload flushes the rules: the agent puts them back.
    vm.ok(&["iptables", "-t", "nat", "-F", "MESH_OUTBOUND"]);
    let deadline = Instant::now() + Duration::from_secs(25);
    while !vm
        .ok(&["curl", "-s", "http://127.0.0.1:4191/metrics"])
        .contains("mesh_vm_agent_capture_repairs_total 1")
    {
        assert!(
            Instant::now() < deadline,
            "the rules were not put back\n{}",
            vm.logs_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        vm.ok(&["iptables", "-t", "nat", "-S", "MESH_OUTBOUND"])
            .contains("--uid-owner 65534")
    );

    // SIGTERM: the rules go with the agent; plaintext reaches the app again.
    let mut child = vm.take("agent");
    run(Path::new("kill"), &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the agent stops cleanly: {status:?}\n{}",
        vm.logs_text()
    );
    assert!(!vm.chain_exists("MESH_INBOUND") && !vm.chain_exists("MESH_OUTBOUND"));
    assert_eq!(
        vm.ok(&["ip", "-4", "route", "show", "240.240.240.240/32"]),
        "",
        "the route goes with the rules"
    );
    assert!(
        cluster
            .curl(&format!("http://{VM_IP}:18080/after-stop"))
            .contains("client=- path=/after-stop")
    );

    // A crash (SIGKILL) leaves the rules, pointing the app's port at a dead
    // proxy, until the unit's ExecStopPost removes them.
    vm.spawn("agent", &[&agent_s, "run", "--config", &config], &[]);
    vm.wait_ok("http://127.0.0.1:4191/ready", "the VM agent, again");
    wait_captured(&vm, &agent_s, &config);
    let mut child = vm.take("agent");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(vm.chain_exists("MESH_INBOUND"));
    let dead = cluster.curl(&format!("http://{VM_IP}:18080/dead"));
    assert!(!dead.contains("client="), "{dead}");
    let removed = vm.ok(&[&agent_s, "capture", "remove", "--config", &config]);
    println!("{removed}");
    assert!(!vm.chain_exists("MESH_INBOUND") && !vm.chain_exists("MESH_OUTBOUND"));
    assert!(
        cluster
            .curl(&format!("http://{VM_IP}:18080/removed"))
            .contains("client=- path=/removed")
    );

    // And a start after a crash replaces what was left, rather than
    // refusing because the chains exist.
    vm.spawn("agent", &[&agent_s, "run", "--config", &config], &[]);
    vm.wait_ok("http://127.0.0.1:4191/ready", "the VM agent, a third time");
    wait_captured(&vm, &agent_s, &config);
    let mut child = vm.take("agent");
    child.kill().unwrap();
    child.wait().unwrap();
    vm.spawn("agent", &[&agent_s, "run", "--config", &config], &[]);
    vm.wait_ok("http://127.0.0.1:4191/ready", "the VM agent after a crash");
    wait_captured(&vm, &agent_s, &config);
    let shown = vm.ok(&[&agent_s, "capture", "show", "--config", &config]);
    assert!(shown.ends_with("# in place\n"), "{shown}");
}
