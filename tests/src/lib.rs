//! Support of the end-to-end tests: the `mesh` binary every component runs
//! as, topologies from `topologies/` started with the runner, and reading
//! the components' metrics.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub mod kube;
pub mod netns;

use mesh_core::metrics_text::{self, Sample};
use mesh_topologies::{Options, Run, Topology};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_owned()
}

/// The `mesh` binary, built (or brought up to date) once per test binary
/// with the profile these tests were built with.
pub fn mesh_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let me = std::env::current_exe().expect("the test binary's path");
        // target/<profile>/deps/<test> -> target/<profile>/mesh
        let profile_dir = me
            .parent()
            .and_then(Path::parent)
            .expect("tests run from target/<profile>/deps");
        // `--workspace --tests` resolves features as `cargo test
        // --workspace` does, so the binary reuses the test build's
        // dependencies instead of compiling a second copy of them.
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--workspace", "--tests", "--bins"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let out = cargo.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building mesh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exe = profile_dir.join("mesh");
        assert!(exe.exists(), "{} was not built", exe.display());
        exe
    })
    .clone()
}

/// Another binary of the workspace (`mesh-cni`, `mesh-proxy`), built with
/// `mesh` by [`mesh_exe`].
pub fn workspace_exe(name: &str) -> PathBuf {
    let exe = mesh_exe().with_file_name(name);
    assert!(exe.exists(), "{} was not built", exe.display());
    exe
}

/// A topology file of `topologies/`, as text.
pub fn topology_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("topologies").join(name)).expect("a topology file")
}

/// A started topology and the directory it keeps its state in.
#[derive(Debug)]
pub struct Started {
    pub run: Run,
    pub state: tempfile::TempDir,
}

/// Starts `text` (a topology) on 127.<base>.0.0/16 and up; panics with the
/// runner's report when it does not start.
pub async fn start(text: &str, base: u8) -> Started {
    start_with(text, base, None).await
}

/// [`start`] with Prometheus and viz in every cluster, as `mesh up` runs
/// them where Prometheus is installed; fails loudly where it is not.
pub async fn start_with_viz(text: &str, base: u8) -> Started {
    let prometheus = mesh_topologies::cli::find_prometheus().unwrap_or_else(|| {
        panic!("this test needs Prometheus (`prometheus` on PATH): apt-get install prometheus")
    });
    start_with(text, base, Some(prometheus)).await
}

async fn start_with(text: &str, base: u8, prometheus: Option<PathBuf>) -> Started {
    let state = tempfile::tempdir().expect("a temporary directory");
    let file = state.path().join("topology.yaml");
    std::fs::write(&file, text).expect("write the topology");
    let topology = Topology::parse(&file, text).unwrap_or_else(|e| panic!("{e}"));
    let opts = Options {
        state_dir: state.path().join("state"),
        mesh_exe: mesh_exe(),
        loopback_base: base,
        ready_timeout: Duration::from_secs(60),
        progress: false,
        prometheus,
    };
    let run = Run::start(&topology, &file, opts)
        .await
        .unwrap_or_else(|e| panic!("the topology did not start: {e:#}"));
    Started { run, state }
}

/// Scrapes `/metrics` at `addr`; empty when it does not answer.
pub fn metrics(addr: std::net::SocketAddr) -> Vec<Sample> {
    mesh_topologies::runner::scrape(addr).unwrap_or_default()
}

/// The sum of the samples named `name` that `keep` accepts.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && keep(s))
        .map(|s| s.value)
        .sum()
}

/// Polls `check` every 100 ms until it is true; false after `timeout`.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET url` straight to an app (not through a proxy): status and body.
pub fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    metrics_text::fetch(addr, path, Duration::from_secs(10)).unwrap_or((0, String::new()))
}

/// Whether `pid` still runs (a zombie does not count).
pub fn alive(pid: u32) -> bool {
    mesh_topologies::runner::process_alive(pid, None)
}

/// West's `web` identity in the demo topologies.
pub const WEB: &str = "spiffe://west.mesh.local/ns/shop/sa/web";

/// The load generator's numbers (from its stats file).
pub fn load_stats(
    record: &mesh_topologies::RunRecord,
    cluster: &str,
    replica: &str,
) -> mesh_topologies::demo::LoadStats {
    let c = record.clusters.iter().find(|c| c.name == cluster).unwrap();
    let r = c.replicas.iter().find(|r| r.name == replica).unwrap();
    std::fs::read(&r.stats)
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

/// Waits (up to 30 s) until the load generator has `n` answers.
pub async fn wait_for_answers(
    record: &mesh_topologies::RunRecord,
    cluster: &str,
    replica: &str,
    n: u64,
) {
    assert!(
        eventually(Duration::from_secs(30), || load_stats(
            record, cluster, replica
        )
        .ok()
            >= n)
        .await,
        "{cluster}/{replica} never got {n} answers: {:?}",
        load_stats(record, cluster, replica)
    );
}

pub fn replica(
    record: &mesh_topologies::RunRecord,
    cluster: &str,
    name: &str,
) -> mesh_topologies::runner::ReplicaInfo {
    record
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.replicas.iter().find(|r| r.name == name))
        .cloned()
        .unwrap()
}
