//! `mesh up`, `mesh status` and `mesh down` as a user runs them: the run's
//! summary, no process left behind, and a component that fails to start
//! reported by name.

use std::process::Command;

use mesh_tests::*;
use mesh_topologies::runner::RunRecord;

fn mesh(args: &[&str]) -> std::process::Output {
    Command::new(mesh_exe())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("mesh runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Every process the run started has exited.
#[track_caller]
fn none_left(record: &RunRecord) {
    let left: Vec<String> = record
        .components
        .iter()
        .filter(|c| c.alive())
        .map(|c| format!("{} (pid {})", c.name, c.pid.unwrap()))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn up_for_a_duration_shows_cross_cluster_mtls_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let out = mesh(&[
        "up",
        "topologies/demo.yaml",
        "--duration",
        "20s",
        "--state-dir",
        state,
        "--loopback-base",
        "70",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(stderr.contains("everything is ready"), "{stderr}");
    // The live view refreshed while it ran.
    assert!(
        stdout.matches("as the callers' proxies saw it").count() >= 5,
        "{stdout}"
    );
    let cross = stdout
        .lines()
        .find(|l| l.starts_with("cross-cluster:"))
        .unwrap_or_else(|| panic!("no cross-cluster line:\n{stdout}"));
    assert!(
        cross.contains("100.0% succeeded, 100.0% over mTLS"),
        "{cross}"
    );
    let requests: f64 = cross
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(requests >= 100.0, "{cross}");
    let record = RunRecord::load(std::path::Path::new(state)).unwrap();
    assert!(record.stopped);
    none_left(&record);
}

#[test]
fn a_component_that_fails_to_start_is_named_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "name: broken\nclusters:\n  - name: west\n    trustDomain: west.mesh.local\n    workloads:\n      - name: db\n        ports: [{name: sql, port: 5432}]\n        command: [sh, -c, \"echo cannot open /var/lib/db >&2; exit 3\"]\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = mesh(&[
        "up",
        file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--loopback-base",
        "80",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("west/db-0/app failed to start: exited (exit status: 3) before it was ready"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot open /var/lib/db"),
        "the log's end is shown: {stderr}"
    );
    none_left(&RunRecord::load(&state).unwrap());

    // A topology with a mistake names the file, the line and the field.
    std::fs::write(
        &file,
        "name: broken\nclusters:\n  - name: west\n    trustDomain: west.mesh.local\n    workloads:\n      - name: db\n        replicas: 0\n        command: [sleep, \"1\"]\n",
    )
    .unwrap();
    let out = mesh(&[
        "up",
        file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(
            "broken.yaml:6: clusters[0].workloads[0].replicas: 0 is not between 1 and 50"
        ),
        "{stderr}"
    );
}

#[test]
fn detached_run_shows_in_status_and_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_s = state.to_str().unwrap();
    let out = mesh(&[
        "up",
        "topologies/demo.yaml",
        "--detach",
        "--state-dir",
        state_s,
        "--loopback-base",
        "90",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record = RunRecord::load(&state).unwrap();
    assert!(alive(record.supervisor));

    let out = mesh(&["status", "--state-dir", state_s]);
    let status = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(status.starts_with("demo: up"), "{status}");
    for name in [
        "west/control",
        "east/gateway",
        "west/service-mirror",
        "west/web-0/proxy",
    ] {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}:\n{status}"));
        assert!(line.contains(" ready "), "{line}");
    }

    let out = mesh(&["down", "--state-dir", state_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("demo is down"));
    let record = RunRecord::load(&state).unwrap();
    assert!(!alive(record.supervisor));
    none_left(&record);
    let out = mesh(&["status", "--state-dir", state_s]);
    assert!(text(&out.stdout).starts_with("demo: not running"));
}
