//! `mesh viz` commands that need no running mesh: the scrape configuration
//! `install` prints is one Prometheus' own checker accepts, and a query
//! with nowhere to go says what to do.

use std::process::Command;

mod support;

use support::mesh;

#[test]
fn install_prints_a_scrape_configuration_promtool_accepts() {
    let (ok, config, err) = mesh(&["viz", "install", "--cluster", "west"]);
    assert!(ok, "{err}");
    assert!(config.contains("mesh-metrics"), "{config}");
    // Debian's Prometheus is built without Kubernetes discovery, so its
    // promtool refuses `kubernetes_sd_configs`; everything else (the
    // relabelling viz's labels come from) is checked with a static target
    // in its place.
    let pod_discovery = "  kubernetes_sd_configs:\n  - role: pod\n";
    assert!(config.contains(pod_discovery), "{config}");
    let checkable = config.replace(
        pod_discovery,
        "  static_configs:\n  - targets: ['10.0.0.1:4192']\n",
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prometheus.yml");
    std::fs::write(&file, &checkable).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("this test needs promtool ({e}): apt-get install prometheus"));
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A cluster name that is not a name is refused, naming the flag.
    let (ok, _, err) = mesh(&["viz", "install", "--cluster", "West\"x"]);
    assert!(!ok);
    assert!(err.contains("--cluster"), "{err}");
}

#[test]
fn a_query_with_no_viz_to_ask_says_how_to_name_one() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("none");
    let (ok, _, err) = mesh(&[
        "viz",
        "stat",
        "deploy",
        "--state-dir",
        &state.display().to_string(),
    ]);
    assert!(!ok);
    assert!(err.contains("--viz host:port"), "{err}");
    // A viz that is not listening is named.
    let (ok, _, err) = mesh(&["viz", "edges", "--viz", "127.0.0.1:9"]);
    assert!(!ok);
    assert!(err.contains("viz at 127.0.0.1:9"), "{err}");
}
