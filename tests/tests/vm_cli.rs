//! The VM commands as a user runs them, as real processes: `mesh control`,
//! `mesh vm token create`, `mesh-vm-agent join --no-systemd`, `run`,
//! `status`, `leave`.
#![allow(clippy::print_stdout)] // what the commands printed goes to the test log

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_tests::{eventually, get, mesh_exe, workspace_exe};

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits until its admin endpoint at `admin` is ready.
async fn start_ready(cmd: &mut Command, admin: &str) -> Kill {
    let child = Kill(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the command starts"),
    );
    let addr = admin.parse().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || get(addr, "/ready").0 == 200).await,
        "{cmd:?} is ready at {admin}"
    );
    child
}

#[tokio::test]
async fn a_vm_joins_runs_and_leaves_with_the_commands_the_readme_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let mesh = mesh_exe();
    let agent = workspace_exe("mesh-vm-agent");
    let (ok, _, err) = output(
        Command::new(&mesh)
            .args([
                "identity",
                "ca",
                "create",
                "--trust-domain",
                "west.mesh.local",
                "--out",
            ])
            .arg(d("ca")),
    );
    assert!(ok, "{err}");
    std::fs::create_dir_all(d("config")).unwrap();
    let _control = start_ready(
        Command::new(&mesh)
            .args(["control", "--cluster", "west"])
            .arg("--ca")
            .arg(d("ca"))
            .arg("--config-dir")
            .arg(d("config"))
            .arg("--data-dir")
            .arg(d("data"))
            .args([
                "--identity-addr",
                "127.0.0.81:8080",
                "--api-addr",
                "127.0.0.81:8086",
                "--admin-addr",
                "127.0.0.81:9990",
            ]),
        "127.0.0.81:9990",
    )
    .await;

    let token = |workload: &str| {
        output(
            Command::new(&mesh)
                .args(["vm", "token", "create", "--namespace", "shop"])
                .args(["--service-account", "billing", "--workload", workload])
                .args(["--labels", "app=billing", "--ports", "5432", "--ttl", "10m"])
                .args(["--control-addr", "127.0.0.81"])
                .arg("--data-dir")
                .arg(d("data")),
        )
    };
    let (ok, line, err) = token("billing-1");
    assert!(ok, "{err}");
    println!("{err}{line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 3, "one line to run: {line}");
    assert_eq!(&words[..2], ["mesh-vm-agent", "join"]);
    let join_string = words[2].to_owned();

    let join = |js: &str, extra: &[&str]| {
        output(
            Command::new(&agent)
                .args(["join", js, "--no-systemd"])
                .arg("--config")
                .arg(d("etc/vm-agent.json"))
                .arg("--state-dir")
                .arg(d("state"))
                .arg("--workload-api-socket")
                .arg(d("run/workload.sock"))
                .args(["--address", "127.0.0.82", "--app-ip", "127.0.0.82"])
                .args(["--inbound-addr", "127.0.0.82:4143"])
                .args(["--outbound-addr", "127.0.0.82:4140"])
                .args(["--admin-addr", "127.0.0.82:4191"])
                .args(extra),
        )
    };
    let (ok, out, err) = join(&join_string, &[]);
    assert!(ok, "{err}");
    println!("{out}");
    assert!(
        out.contains("trust bundle of west.mesh.local verified against the pin"),
        "{out}"
    );
    assert!(
        out.contains("identity spiffe://west.mesh.local/ns/shop/sa/billing issued"),
        "{out}"
    );
    assert!(out.contains("systemd left alone (--no-systemd)"), "{out}");

    // Rejoining says so and changes nothing.
    let (ok, _, err) = join(&join_string, &[]);
    assert!(!ok);
    assert!(err.contains("already joined as shop/billing-1"), "{err}");
    // A reused token with --force still fails, at the control plane.
    let (ok, _, err) = join(&join_string, &["--force"]);
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");
    // A tampered string is refused before anything happens.
    let (ok, _, err) = join(
        &join_string.replacen("mesh-vm1.", "mesh-vm1.x", 1),
        &["--force"],
    );
    assert!(!ok);
    assert!(err.contains("join string"), "{err}");

    let _run = start_ready(
        Command::new(&agent)
            .arg("run")
            .arg("--config")
            .arg(d("etc/vm-agent.json")),
        "127.0.0.82:4191",
    )
    .await;
    let (ok, out, err) = output(
        Command::new(&agent)
            .arg("status")
            .arg("--config")
            .arg(d("etc/vm-agent.json")),
    );
    assert!(ok, "{err}");
    println!("{out}");
    assert!(
        out.contains("joined cluster west as shop/billing-1"),
        "{out}"
    );
    assert!(out.contains("agent ready"), "{out}");
    assert!(
        eventually(Duration::from_secs(10), || get(
            "127.0.0.81:9990".parse().unwrap(),
            "/metrics"
        )
        .1
        .contains("mesh_control_workloads{state=\"ready\"} 1"))
        .await,
        "the VM is registered and ready (no health check: healthy while it runs)"
    );

    drop(_run);
    let (ok, out, err) = output(
        Command::new(&agent)
            .args(["leave", "--no-systemd"])
            .arg("--config")
            .arg(d("etc/vm-agent.json")),
    );
    assert!(ok, "{err}");
    println!("{out}");
    assert!(!d("etc/vm-agent.json").exists());
    assert!(!d("state/leaf.key").exists());
    assert!(!d("state/enroll.key").exists());
}
