//! Admin endpoints bind to loopback only: every component, started through
//! the `mesh` binary as a user would with an admin address on all
//! interfaces, refuses to start and says why, before it serves anything.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

const MESH: &str = env!("CARGO_BIN_EXE_mesh");

/// Runs `mesh args` with `env`; it must exit non-zero within 20 s with
/// `expected` in its stderr.
fn refuses(args: &[&str], env: &[(&str, String)], expected: &str) {
    let mut child = Command::new(MESH)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "`mesh {}` kept running with a non-loopback admin address",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(
        !status.success(),
        "`mesh {}` started: {stderr}",
        args.join(" ")
    );
    assert!(
        stderr.contains(expected),
        "`mesh {}`: {stderr}",
        args.join(" ")
    );
}

#[test]
fn every_admin_endpoint_refuses_a_non_loopback_address() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = Command::new(MESH)
        .args([
            "identity",
            "ca",
            "create",
            "--trust-domain",
            "west.mesh.local",
            "--out",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = |p: &str| tmp.path().join(p).display().to_string();
    std::fs::create_dir_all(tmp.path().join("config")).unwrap();
    std::fs::write(tmp.path().join("token"), "not-used").unwrap();
    let ca = ca.display().to_string();
    let bundle = format!("{ca}/bundle.json");
    let loopback = "loopback only";

    refuses(
        &[
            "control",
            "--cluster",
            "west",
            "--ca",
            &ca,
            "--config-dir",
            &path("config"),
            "--data-dir",
            &path("data"),
            "--identity-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "0.0.0.0:0",
        ],
        &[],
        loopback,
    );
    let component = |what: &str| {
        vec![
            what.to_owned(),
            "--cluster".into(),
            "west".into(),
            "--trust-domain".into(),
            "west.mesh.local".into(),
            "--control-identity-addr".into(),
            "127.0.0.1:1".into(),
            "--control-api-addr".into(),
            "127.0.0.1:1".into(),
            "--trust-anchors".into(),
            bundle.clone(),
            "--join-token-file".into(),
            path("token"),
            "--admin-addr".into(),
            "0.0.0.0:0".into(),
        ]
    };
    let gateway = component("gateway");
    refuses(
        &gateway.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        loopback,
    );
    let mut mirror = component("service-mirror");
    mirror.extend(["--config-dir".to_owned(), path("config")]);
    refuses(
        &mirror.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        loopback,
    );
    let proxy_env = [
        ("CLUSTER", "west".to_owned()),
        ("TRUST_DOMAIN", "west.mesh.local".to_owned()),
        ("NAMESPACE", "shop".to_owned()),
        ("SERVICE_ACCOUNT", "web".to_owned()),
        ("WORKLOAD", "web-0".to_owned()),
        ("CONTROL_IDENTITY_ADDR", "127.0.0.1:1".to_owned()),
        ("CONTROL_API_ADDR", "127.0.0.1:1".to_owned()),
        ("TRUST_ANCHORS", bundle.clone()),
        ("JOIN_TOKEN_FILE", path("token")),
        ("INBOUND_ADDR", "127.0.0.1:0".to_owned()),
        ("ADMIN_ADDR", "0.0.0.0:4191".to_owned()),
    ]
    .map(|(k, v)| (format!("MESH_PROXY_{k}"), v));
    let proxy_env: Vec<(&str, String)> = proxy_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    refuses(&["proxy"], &proxy_env, loopback);
}
