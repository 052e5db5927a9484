//! `mesh bench --peer haproxy` as a user runs it: both pairs measured in
//! one run, each figure with its ratio, processes pinned, nothing left
//! running; and without haproxy, the way to install it. `mesh bench
//! --cross-cluster`: its proxies and gateways pinned, every path measured.

use std::process::Command;

const MESH: &str = env!("CARGO_BIN_EXE_mesh");

/// Processes whose command line names a bench directory.
fn bench_processes() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("mesh-bench-") && cmdline.contains("haproxy") {
            out.push(cmdline);
        }
    }
    out
}

/// `mesh <args>` (a bench run), which must succeed; its standard output.
fn mesh_bench(args: &[&str]) -> String {
    let out = Command::new(MESH).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

#[test]
fn the_haproxy_pair_runs_beside_mesh_and_every_figure_has_its_ratio() {
    which_haproxy();
    let stdout = mesh_bench(&[
        "bench",
        "--peer",
        "haproxy",
        "--requests",
        "50",
        "--rounds",
        "1",
        "--duration",
        "300ms",
        "--idle-connections",
        "20",
        "--burst",
        "50",
    ]);
    assert!(stdout.contains("peer: HAProxy version"), "{stdout}");
    if std::thread::available_parallelism().unwrap().get() >= 2 {
        assert!(stdout.contains("pinned: proxies on CPU"), "{stdout}");
    }
    for row in [
        "added p50",
        "CPU per request, client proxy",
        "CPU per request, server proxy",
        "idle, client proxy",
        "per idle connection (20 held)",
        "per busy connection (20 sending)",
        "kept after the burst, over before it",
        "server CPU per connection",
    ] {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(row)).collect();
        assert!(!lines.is_empty(), "no {row:?} row:\n{stdout}");
        for line in lines {
            // mesh's figure, haproxy's figure, and the ratio of the two
            // ("-" when haproxy's is zero, as a tiny run can measure).
            let ratio = line.split_whitespace().any(|w| {
                w == "-"
                    || w.strip_suffix('x')
                        .is_some_and(|r| r.parse::<f64>().is_ok())
            });
            assert!(ratio, "no ratio in {line:?}:\n{stdout}");
        }
    }
    // Both HTTP versions went through both pairs.
    assert_eq!(stdout.matches("mesh/haproxy").count(), 6, "{stdout}");
    let left = bench_processes();
    assert!(left.is_empty(), "still running after the bench: {left:?}");
}

#[test]
fn without_haproxy_it_says_how_to_install_it() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(MESH)
        .args(["bench", "--peer", "haproxy"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("apt-get install haproxy"), "{stderr}");
}

#[test]
fn the_cross_cluster_bench_pins_its_proxies_and_gateways() {
    let stdout = mesh_bench(&[
        "bench",
        "--cross-cluster",
        "--requests",
        "50",
        "--rounds",
        "1",
    ]);
    for row in ["in-cluster", "via gateway, TCP", "via gateway, QUIC"] {
        assert!(
            stdout.matches(row).count() >= 2,
            "no {row:?} rows:\n{stdout}"
        );
    }
    if std::thread::available_parallelism().unwrap().get() < 2 {
        return;
    }
    // "pinned: proxies and gateways on CPU <n> (the kernel says <n> for all <k>), ..."
    let pinned = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pinned: proxies and gateways on CPU "))
        .unwrap_or_else(|| panic!("no pinned line:\n{stdout}"));
    let (cpu, rest) = pinned.split_once(' ').unwrap();
    let says = rest
        .strip_prefix("(the kernel says ")
        .and_then(|r| r.split_once(" for all "))
        .map(|(says, _)| says)
        .unwrap_or_else(|| panic!("{pinned}"));
    assert_eq!(says, cpu, "not every proxy and gateway moved: {pinned}");
}

fn which_haproxy() {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("haproxy").is_file());
    assert!(
        found,
        "this test needs haproxy on PATH: apt-get install haproxy (.ci/run installs it)"
    );
}
