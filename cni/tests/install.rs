//! `mesh-cni install` on a node's CNI directories (temporary ones here).

use std::{os::unix::fs::PermissionsExt, process::Command};

use serde_json::Value;

fn install(
    bin: &std::path::Path,
    conf: &std::path::Path,
    kubeconfig: &std::path::Path,
    extra: &[&str],
) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(["install", "--once", "--bin-dir"])
        .arg(bin)
        .arg("--conf-dir")
        .arg(conf)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// A lone `.conf` becomes a `.conflist` with mesh-cni chained last; the
/// binary and a 0600 kubeconfig are in place; a second run changes
/// nothing; `--remove` takes the entry out and leaves the cluster's plugin.
#[test]
fn install_chains_mesh_cni_after_the_cluster_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();

    // Nothing to chain into yet: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(["install", "--once", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CNI configuration"));

    std::fs::write(
        conf.join("10-bridge.conf"),
        r#"{"cniVersion":"1.0.0","name":"k8s","type":"bridge","bridge":"cni0"}"#,
    )
    .unwrap();
    std::fs::write(conf.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
    let said = install(&bin, &conf, &kubeconfig, &[]);
    assert!(said.contains("10-bridge.conflist"), "{said}");
    assert!(!conf.join("10-bridge.conf").exists());
    let list: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-bridge.conflist")).unwrap()).unwrap();
    assert_eq!(list["name"], "k8s");
    assert_eq!(list["plugins"][0]["type"], "bridge");
    assert_eq!(list["plugins"][0]["bridge"], "cni0");
    assert_eq!(list["plugins"][1]["type"], "mesh-cni");
    assert_eq!(
        list["plugins"][1]["kubeconfig"],
        "/etc/cni/net.d/mesh-cni.kubeconfig"
    );
    assert_eq!(
        std::fs::read(bin.join("mesh-cni")).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_mesh-cni")).unwrap()
    );
    let mode = std::fs::metadata(conf.join("mesh-cni.kubeconfig"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let other = std::fs::read_to_string(conf.join("99-other.conflist")).unwrap();
    assert_eq!(
        other, r#"{"plugins":[]}"#,
        "only the first configuration is touched"
    );

    let before = std::fs::read(conf.join("10-bridge.conflist")).unwrap();
    install(&bin, &conf, &kubeconfig, &[]);
    assert_eq!(
        std::fs::read(conf.join("10-bridge.conflist")).unwrap(),
        before,
        "idempotent"
    );

    install(&bin, &conf, &kubeconfig, &["--remove"]);
    let list: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-bridge.conflist")).unwrap()).unwrap();
    assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
    assert_eq!(list["plugins"][0]["type"], "bridge");
}
