//! End to end: the topologies of `topologies/` run as real processes (every
//! control plane, gateway, service mirror, proxy and app is the `mesh`
//! binary), each test on loopback ranges of its own.

use std::time::{Duration, Instant};

use mesh_tests::*;
use mesh_topologies::runner::RunRecord;

/// The demo with one more west workload, `other`, whose app calls api-east
/// (which admits only west's web).
fn demo_with_other() -> String {
    topology_text("demo.yaml").replacen(
        "      - name: load\n",
        "      - name: other\n        namespace: shop\n        ports: [{name: http, port: 8080}]\n        command: [mesh, demo, serve, --http-port, \"8080\", --call, \"http://api-east.shop.svc.cluster.local:8080/\"]\n      - name: load\n",
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_crosses_clusters_with_identity_mtls_on_every_hop_and_policy() {
    crosses_with_identity_and_policy("tcp", 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_a_quic_link() {
    crosses_with_identity_and_policy("quic", 45).await;
}

async fn crosses_with_identity_and_policy(transport: &str, base: u8) {
    // Linked both ways, so each cluster runs a gateway and a mirror.
    let text = demo_with_other().replace(
        "{from: west, to: east, transport: tcp}",
        &format!(
            "{{from: west, to: east, transport: {transport}}}\n  - {{from: east, to: west, transport: {transport}}}"
        ),
    );
    let s = start(&text, base).await;
    let record = s.run.snapshot();
    wait_for_answers(&record, "west", "load-0", 40).await;
    let load = load_stats(&record, "west", "load-0");
    assert_eq!(load.failed(), 0, "{load:?}");
    assert!(load.grpc.as_ref().is_some_and(|g| g.ok > 0), "{load:?}");
    // web answered after calling catalog (west) and api (east); api saw
    // web's own west identity, through the gateway.
    let answer = load.last_answer.expect("an answer");
    assert_eq!(answer["cluster"], "west");
    assert_eq!(
        answer["client_id"],
        "spiffe://west.mesh.local/ns/shop/sa/load"
    );
    assert_eq!(answer["calls"][0]["cluster"], "west");
    assert_eq!(answer["calls"][1]["cluster"], "east");
    assert_eq!(answer["calls"][1]["client_id"], WEB);
    // billing runs on a VM (its agent joined with `mesh vm token create`
    // and `mesh vm join`); its app sees web's identity too.
    assert_eq!(answer["calls"][2]["workload"], "billing");
    assert_eq!(answer["calls"][2]["client_id"], WEB);

    // Every hop is mTLS: no west proxy sent a request in the clear, ...
    let west = record.clusters.iter().find(|c| c.name == "west").unwrap();
    for r in &west.replicas {
        let m = metrics(r.proxy_admin);
        let plain = sum(&m, "mesh_proxy_outbound_requests_total", |s| {
            s.label("tls") != "mtls"
        });
        assert_eq!(plain, 0.0, "{} sent requests without mTLS", r.name);
    }
    let web = metrics(replica(&record, "west", "web-0").proxy_admin);
    let to_east = sum(&web, "mesh_proxy_outbound_requests_total", |s| {
        s.label("dst_cluster") == "east" && s.label("tls") == "mtls"
    });
    assert!(
        to_east >= 40.0,
        "web's proxy sent {to_east} requests to east"
    );
    // ... the tunnel carried west's streams, and east's api proxies (mTLS
    // only) verified web's west identity.
    assert!(
        s.run.cluster("west").unwrap().gateway.is_some(),
        "two gateways"
    );
    let gateway = s.run.cluster("east").unwrap().gateway_admin.unwrap();
    let streams = sum(&metrics(gateway), "mesh_gateway_streams_total", |s| {
        s.label("peer_trust_domain") == "west.mesh.local" && s.label("transport") == transport
    });
    assert!(
        streams >= 1.0,
        "east's gateway saw no {transport} stream from west"
    );
    let from_web: f64 = ["api-0", "api-1"]
        .iter()
        .map(|r| {
            sum(
                &metrics(replica(&record, "east", r).proxy_admin),
                "mesh_proxy_inbound_requests_total",
                |s| s.label("client_id") == WEB && s.label("classification") == "success",
            )
        })
        .sum();
    assert!(
        from_web >= 40.0,
        "east's api saw {from_web} requests from web"
    );

    // Policy across the gateway: west's `other` is refused by east's api
    // with 403, asked through other's proxy (as its app would) ...
    let other = replica(&record, "west", "other-0");
    // (An absolute-form request to its outbound port, as HTTP_PROXY users send.)
    let (status, body) = get(
        std::net::SocketAddr::new(other.ip, 4140),
        "http://api-east.shop.svc.cluster.local:8080/",
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("spiffe://west.mesh.local/ns/shop/sa/other"),
        "{body}"
    );
    // ... and other's app, calling api-east itself, reports the refusal.
    let (status, body) = get(std::net::SocketAddr::new(other.ip, 8080), "/");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("403"),
        "api-east refused other with 403: {body}"
    );
    let refused: f64 = ["api-0", "api-1"]
        .iter()
        .map(|r| {
            sum(
                &metrics(replica(&record, "east", r).proxy_admin),
                "mesh_proxy_inbound_refused_total",
                |s| s.label("reason") == "unauthorized",
            )
        })
        .sum();
    assert!(refused >= 1.0, "the refusal was not counted");
}

/// Whether west's mirror says the link to east is alive.
fn east_alive(record: &RunRecord) -> Option<bool> {
    let admin = record
        .clusters
        .iter()
        .find(|c| c.name == "west")?
        .mirror_admin?;
    let links = mesh_service_mirror_links(admin);
    links.get("east").map(|l| l.0)
}

/// (alive, services) per link of the mirror at `admin`.
fn mesh_service_mirror_links(
    admin: std::net::SocketAddr,
) -> std::collections::BTreeMap<String, (bool, f64)> {
    let m = metrics(admin);
    let mut links = std::collections::BTreeMap::new();
    for s in &m {
        if s.name == "mesh_service_mirror_link_alive" {
            links
                .entry(s.label("cluster").to_owned())
                .or_insert((false, 0.0))
                .0 = s.value >= 1.0;
        }
        if s.name == "mesh_service_mirror_services_mirrored" {
            links
                .entry(s.label("cluster").to_owned())
                .or_insert((false, 0.0))
                .1 = s.value;
        }
    }
    links
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mirrors_go_unready_then_recover_and_crashed_apps_restart() {
    let s = start(&topology_text("demo.yaml"), 50).await;
    let record = s.run.snapshot();
    assert!(
        eventually(Duration::from_secs(30), || load_stats(
            &record, "west", "load-0"
        )
        .ok()
            >= 20)
        .await
    );
    assert_eq!(east_alive(&record), Some(true));
    // The operator's view of the live link: `gateways` and `check` pass.
    let west = record.clusters.iter().find(|c| c.name == "west").unwrap();
    let mirror_admin = west.mirror_admin.unwrap().to_string();
    let config_dir = s.run.cluster("west").unwrap().config_dir();
    let multicluster = |args: &[&str]| {
        let out = std::process::Command::new(mesh_exe())
            .arg("multicluster")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, table) = multicluster(&["gateways", "--mirror-admin", &mirror_admin]);
    assert!(ok, "{table}");
    let east_row = table
        .lines()
        .find(|l| l.starts_with("east"))
        .unwrap_or_default();
    assert!(east_row.contains("yes"), "east is alive: {table}");
    let check = |config_dir: &std::path::Path| {
        multicluster(&[
            "check",
            "--config-dir",
            &config_dir.display().to_string(),
            "--mirror-admin",
            &mirror_admin,
        ])
    };
    let (ok, report) = check(&config_dir);
    assert!(ok, "check fails on a healthy link: {report}");
    assert!(report.contains("ok   gateway"), "{report}");

    let mirror_file = s
        .run
        .cluster("west")
        .unwrap()
        .config_dir()
        .join("mirror-east.yaml");
    let killed = Instant::now();
    s.run.hold("east/gateway").unwrap();
    assert!(
        eventually(Duration::from_secs(4), || east_alive(&record)
            == Some(false))
        .await,
        "the link stayed alive 4s after the gateway died"
    );
    let down_after = killed.elapsed();
    // With east's gateway down, `check` fails and says which gateway.
    let (ok, report) = check(&config_dir);
    assert!(!ok, "check passes with the gateway down: {report}");
    assert!(report.contains("FAIL"), "{report}");
    assert!(
        eventually(Duration::from_secs(2), || std::fs::read_to_string(
            &mirror_file
        )
        .is_ok_and(|t| t.contains("ready: false")))
        .await,
        "the mirror was not marked not ready"
    );
    let failed_before = load_stats(&record, "west", "load-0").failed();
    assert!(
        eventually(Duration::from_secs(10), || load_stats(
            &record, "west", "load-0"
        )
        .failed()
            > failed_before)
        .await
            || load_stats(&record, "west", "load-0").failed() > 0,
        "calls through a dead gateway kept succeeding"
    );

    let back = Instant::now();
    s.run.release("east/gateway").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || east_alive(&record) == Some(true)).await,
        "the link did not come back within 5s of the gateway's restart"
    );
    let up_after = back.elapsed();
    let ok = load_stats(&record, "west", "load-0").ok();
    // web answered 502 while api-east was down, so the load generator's
    // proxy may have ejected web (failure accrual); it probes web back
    // with a backoff of at most 60 s, so recovery is bounded by that.
    assert!(
        eventually(Duration::from_secs(65), || load_stats(
            &record, "west", "load-0"
        )
        .ok()
            >= ok + 20)
        .await,
        "traffic did not recover: {:?}; web's proxy log ends:\n{}",
        load_stats(&record, "west", "load-0"),
        mesh_topologies::runner::tail(&s.run.component("west/web-0/proxy").unwrap().log, 20)
    );
    eprintln!(
        "link not alive {:.1}s after the gateway died; alive again {:.1}s after it was restarted",
        down_after.as_secs_f64(),
        up_after.as_secs_f64()
    );

    // A crashed app is restarted by the runner.
    s.run.kill("east/api-0/app").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || s
            .run
            .component("east/api-0/app")
            .is_some_and(|c| c.restarts == 1 && c.pid.is_some_and(alive)))
        .await,
        "the crashed app was not restarted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlink_removes_every_mirror() {
    let s = start(&topology_text("demo.yaml"), 60).await;
    let west = s.run.cluster("west").unwrap();
    let mirror_file = west.config_dir().join("mirror-east.yaml");
    assert!(mirror_file.exists());
    std::fs::remove_file(west.config_dir().join("link-east.yaml")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !mirror_file.exists()).await,
        "mirror-east.yaml is still there 5s after the Link was deleted"
    );
    let admin = west.mirror_admin.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !mesh_service_mirror_links(admin)
            .get("east")
            .is_some_and(|l| l.1 > 0.0))
        .await,
        "the mirror still reports services of east"
    );
}

/// Transparent mode: each replica in a network namespace of its own, its
/// TCP redirected to its proxy; apps have no `HTTP_PROXY` and call service
/// names as if there were no mesh. Needs root (CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_in_network_namespaces_without_http_proxy() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, bridges, iptables); CI runs it as root"
    );
    // The demo's VM (billing) is a namespace of its own whose only route is
    // to west's gateway (a link back from east gives west one), and its app
    // calls catalog knowing nothing of the mesh either.
    let text = topology_text("demo.yaml")
        .replacen("name: demo\n", "name: demo\nnetwork: namespaces\n", 1)
        .replacen(
            "      - name: billing\n",
            "      - name: billing\n        behindGateway: true\n",
            1,
        )
        .replacen(
            "command: [mesh, demo, serve, --http-port, \"8080\"]\n    resources:",
            "command: [mesh, demo, serve, --http-port, \"8080\", --call, \"http://catalog.shop.svc.cluster.local:8080/\"]\n    resources:",
            1,
        )
        .replacen(
            "  - {from: west, to: east, transport: tcp}\n",
            "  - {from: west, to: east, transport: tcp}\n  - {from: east, to: west, transport: tcp}\n",
            1,
        );
    assert!(text.contains("behindGateway: true") && text.contains("from: east"));
    assert!(
        text.contains("\"8080\", --call, \"http://catalog"),
        "{text}"
    );
    let mut s = start(&text, 110).await;
    let record = s.run.snapshot();
    wait_for_answers(&record, "west", "load-0", 40).await;
    let load = load_stats(&record, "west", "load-0");
    assert_eq!(load.failed(), 0, "{load:?}");
    let answer = load.last_answer.unwrap();
    assert_eq!(answer["calls"][1]["cluster"], "east");
    assert_eq!(answer["calls"][1]["client_id"], WEB);
    // web -> billing (the VM, through west's gateway), and billing -> catalog
    // (captured by the VM agent's rules, through the gateway too).
    assert_eq!(answer["calls"][2]["workload"], "billing", "{answer}");
    assert_eq!(answer["calls"][2]["client_id"], WEB);
    assert_eq!(
        answer["calls"][2]["calls"][0]["workload"], "catalog-0",
        "{answer}"
    );
    assert_eq!(
        answer["calls"][2]["calls"][0]["client_id"],
        "spiffe://west.mesh.local/ns/shop/sa/billing"
    );
    let vm = replica(&record, "west", "billing");
    let vm_ns = vm.netns.clone().expect("the VM has a namespace");
    let west = record.clusters.iter().find(|c| c.name == "west").unwrap();
    assert!(
        mesh_topologies::netns::connects(&vm_ns, west.gateway.unwrap()),
        "the VM reaches west's gateway"
    );
    assert!(
        !mesh_topologies::netns::connects(&vm_ns, west.control_identity),
        "and nothing else: not the control plane"
    );
    let billing_app = s.run.component("west/billing/app").unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", billing_app.pid.unwrap())).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("HTTP_PROXY"));
    // The apps were never told about a proxy.
    let web_app = s.run.component("west/web-0/app").unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", web_app.pid.unwrap())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("MESH_WORKLOAD=web-0"), "{environ}");
    assert!(!environ.contains("HTTP_PROXY"), "{environ}");
    // Its proxy carried the redirected calls over mTLS (its admin listens
    // on the namespace's loopback).
    let web = replica(&record, "west", "web-0");
    let ns = web.netns.clone().unwrap();
    let (_, text) =
        mesh_topologies::runner::fetch_admin(Some(&ns), web.proxy_admin, "/metrics").unwrap();
    let m = mesh_core::metrics_text::parse(&text);
    let to_east = sum(&m, "mesh_proxy_outbound_requests_total", |s| {
        s.label("dst_cluster") == "east" && s.label("tls") == "mtls"
    });
    assert!(to_east >= 40.0, "{to_east}");

    // Processes started through `ip netns exec` and `setpriv` are still
    // recognised by their pid (what `mesh status` and `mesh down` rely on).
    assert!(web_app.alive(), "{web_app:?}");
    assert!(s.run.component("west/web-0/proxy").unwrap().alive());

    s.run.stop().await;
    assert!(!web_app.alive(), "the app outlived the run");
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("mesh110-"), "namespaces left behind: {left}");
    let links = std::process::Command::new("ip")
        .args(["-br", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("mb110"),
        "bridge left behind"
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}
