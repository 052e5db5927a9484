//! `mesh viz` end to end: the demo with Prometheus and viz in each cluster
//! (as `mesh up` runs it where Prometheus is installed), asked with the
//! `mesh` binary as a user would, and the dashboard in headless Chromium.
//! West's viz answers for east through the mesh (east's viz is an exported
//! service that admits only west's viz identity).

#![allow(clippy::print_stdout)] // what the commands printed goes to the test log

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{mesh_exe, repo, start_with_viz, topology_text};
use mesh_viz::{federate::Answer, views::StatRow};
use serde_json::{Value, json};

/// `mesh viz <args> --viz <viz>`: stdout and how long it took.
fn mesh_viz(viz: SocketAddr, args: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let out = std::process::Command::new(mesh_exe())
        .arg("viz")
        .args(args)
        .args(["--viz", &viz.to_string()])
        .output()
        .expect("mesh runs");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "mesh viz {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), took)
}

/// Requests the load generator has made (ok and failed) and when.
fn load_count(stats: &Path) -> (f64, f64) {
    let s: Value = serde_json::from_str(&std::fs::read_to_string(stats).unwrap_or_default())
        .unwrap_or_default();
    let n = s["http"]["ok"].as_f64().unwrap_or(0.0) + s["http"]["failed"].as_f64().unwrap_or(0.0);
    (n, s["elapsed_s"].as_f64().unwrap_or(0.0))
}

fn stat(viz: SocketAddr) -> Answer<Vec<StatRow>> {
    let (out, _) = mesh_viz(
        viz,
        &[
            "stat", "deploy", "-n", "shop", "-o", "json", "--window", "30s",
        ],
    );
    serde_json::from_str(&out).expect("viz answers JSON")
}

fn rps(answer: &Answer<Vec<StatRow>>, cluster: &str, deployment: &str) -> Option<f64> {
    answer
        .rows
        .iter()
        .find(|r| r.cluster == cluster && r.name == deployment)
        .map(|r| r.rps)
}

/// Polls `check` every 500 ms until it holds or `limit` passes.
async fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viz_in_west_sees_west_and_east_through_the_mesh() {
    let started = start_with_viz(&topology_text("demo.yaml"), 70).await;
    let run = &started.run;
    let west = run.cluster("west").expect("west");
    let viz = west.viz.expect("west runs viz");
    let load = west
        .replicas
        .iter()
        .find(|r| r.name == "load-0")
        .expect("the load generator")
        .stats
        .clone();

    // Both clusters' workloads, east's through the mesh.
    within(
        Duration::from_secs(30),
        "rates of web (west) and api (east)",
        || {
            let a = stat(viz);
            rps(&a, "west", "web").is_some_and(|r| r > 0.0)
                && rps(&a, "east", "api").is_some_and(|r| r > 0.0)
        },
    )
    .await;
    // Rates against the load generator's own count over the same 30 s.
    let before = load_count(&load);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = load_count(&load);
    let answer = stat(viz);
    let (table, _) = mesh_viz(viz, &["stat", "deploy", "-n", "shop"]);
    println!("$ mesh viz stat deploy -n shop\n{table}");
    let generated = (after.0 - before.0) / (after.1 - before.1);
    for (cluster, deployment) in [("west", "web"), ("east", "api")] {
        let seen = rps(&answer, cluster, deployment).expect("a row");
        println!("{deployment} ({cluster}): {seen:.2} rps; the load generator made {generated:.2}");
        assert!(
            (seen - generated).abs() <= generated * 0.1,
            "{deployment} ({cluster}) {seen:.2} rps is not within 10 % of the load generator's {generated:.2}"
        );
    }
    assert!(answer.unreachable.is_empty(), "{:?}", answer.unreachable);

    // Who calls whom, with both identities.
    let (edges, _) = mesh_viz(viz, &["edges", "-n", "shop"]);
    println!("$ mesh viz edges -n shop\n{edges}");
    let cross = edges
        .lines()
        .find(|l| l.contains("web (west) -> api (east)"))
        .unwrap_or_else(|| panic!("no web (west) -> api (east) edge:\n{edges}"));
    assert!(
        cross.contains("spiffe://west.mesh.local/ns/shop/sa/web")
            && cross.contains("spiffe://east.mesh.local/ns/shop/sa/api"),
        "{cross}"
    );

    // The dashboard, in Chromium, before anything breaks.
    dashboard(viz);

    // A route added to an HTTPRoute shows within 30 s.
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "name": "api-east-all", "namespace": "shop" },
        "spec": {
            "parentRefs": [{ "name": "api-east", "kind": "Service", "port": 8080 }],
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": "/" } }],
                "backendRefs": [{ "name": "api-east", "port": 8080 }],
            }],
        },
    });
    std::fs::write(
        west.config_dir().join("route-api-east.yaml"),
        serde_saphyr::to_string(&route).expect("YAML"),
    )
    .expect("write the route");
    let took = within(
        Duration::from_secs(30),
        "the new route in `mesh viz routes`",
        || mesh_viz(viz, &["routes"]).0.contains("shop/api-east-all#0"),
    )
    .await;
    let (routes, _) = mesh_viz(viz, &["routes"]);
    println!("$ mesh viz routes   ({took:?} after the route was written)\n{routes}");

    // What an attacker might send viz is refused and counted.
    let (status, body) = mesh_core::metrics_text::fetch(
        viz,
        "/api/v1/stat?namespace=shop%22%7D%20or%20vector(1)",
        Duration::from_secs(5),
    )
    .expect("viz answers");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("namespace"), "{body}");
    let metrics = mesh_tests::metrics(SocketAddr::new(viz.ip(), 9994));
    assert!(
        metrics.iter().any(|s| s.name == "mesh_viz_refused_total"
            && s.label("reason") == "bad_parameter"
            && s.value >= 1.0),
        "the refusal is counted"
    );

    // East's gateway down: west still answers, names east, within 2 s.
    run.hold("east/gateway").expect("stop east's gateway");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        let (out, took) = mesh_viz(viz, &["stat", "deploy", "-n", "shop"]);
        println!("$ mesh viz stat deploy -n shop   (east's gateway down; {took:?})\n{out}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(out.contains("west     shop        web"), "{out}");
        assert!(!out.contains("\neast "), "{out}");
        assert!(out.contains("UNREACHABLE east:"), "{out}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    run.release("east/gateway")
        .await
        .expect("start east's gateway");
    within(Duration::from_secs(20), "east answering again", || {
        let a = stat(viz);
        a.unreachable.is_empty() && rps(&a, "east", "api").is_some()
    })
    .await;
}

/// Drives the dashboard in Debian's Chromium with playwright-core
/// (`tests/browser`); screenshots go to `target/test-artifacts/viz/`.
fn dashboard(viz: SocketAddr) {
    let dir = repo().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "this test needs playwright-core: run `npm ci` in tests/browser (.ci/run does)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "this test needs Chromium: apt-get install chromium"
    );
    let artifacts = repo().join("target/test-artifacts/viz");
    let out = std::process::Command::new("node")
        .current_dir(&dir)
        .arg("dashboard.mjs")
        .arg(format!("http://{viz}/"))
        .arg(&artifacts)
        .args(["web@west", "api@east"])
        .output()
        .expect("this test needs Node.js (`node` on PATH)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "dashboard in Chromium:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the dashboard checks failed:\n{text}");
    assert!(artifacts.join("dashboard.png").exists());
}
