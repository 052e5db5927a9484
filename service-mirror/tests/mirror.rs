//! The service mirror between two clusters in one process: west links east,
//! and west's mirror watches east's exports through east's gateway, so
//! `api-east` appears in west and west's web calls it as itself. The
//! gateway is killed (mirrors go not ready, never away) and restarted
//! (ready again), and unlinking removes every mirror.

#[path = "../../gateway/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use mesh_control::{ControlPlane, test_util};
use mesh_service_mirror::{MirrorArgs, ServiceMirror, mirror::mirrors_file};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEST: &str = "west.mesh.local";
const EAST: &str = "east.mesh.local";

async fn get(proxy: std::net::SocketAddr, url: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    tcp.write_all(
        format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut raw)).await;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

/// Waits until `check` holds, up to `within`; returns how long it took.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_exports_probes_and_links() {
    let (west_dir, east_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let west_cfg = test_util::config_for(west_dir.path(), "west", WEST);
    let east_cfg = test_util::config_for(east_dir.path(), "east", EAST);
    let (west_bundle, east_bundle) = (
        ca_bundle_json(west_dir.path(), WEST),
        ca_bundle_json(east_dir.path(), EAST),
    );

    // East exports api and allows west (the reverse link).
    let app = app("127.0.0.2").await;
    let port = app.port();
    std::fs::write(
        east_cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}, appProtocol: http}}]\n---\n{}",
            link("west", WEST, "127.0.0.1:1", &west_bundle)
        ),
    )
    .unwrap();
    let east = ControlPlane::start(east_cfg).await.unwrap();
    let _api = proxy(&east, east_dir.path(), "east", "api", app.ip(), Some(port)).await;
    let east_gateway = gateway(&east, east_dir.path(), "east").await;
    let gateway_addr = east_gateway.tunnel_addr;

    // West links east and runs its service mirror.
    let west_link = west_cfg.config_dir.join("link-east.yaml");
    std::fs::write(
        &west_link,
        link("east", EAST, &gateway_addr.to_string(), &east_bundle),
    )
    .unwrap();
    let config_dir = west_cfg.config_dir.clone();
    let west = ControlPlane::start(west_cfg).await.unwrap();
    let web = proxy(
        &west,
        west_dir.path(),
        "west",
        "web",
        "127.0.0.3".parse().unwrap(),
        None,
    )
    .await;
    let mirror = ServiceMirror::start(MirrorArgs {
        cluster: "west".into(),
        trust_domain: WEST.parse().unwrap(),
        control_identity_addr: west.identity_addr.to_string(),
        control_api_addr: west.api_addr.to_string(),
        trust_anchors: west_dir.path().join("ca/bundle.json"),
        join_token_file: Some(token(
            &west,
            west_dir.path(),
            "mesh-system",
            "service-mirror",
        )),
        credentials_dir: None,
        config_dir: config_dir.clone(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();

    // api-east appears and works, with west's web identity end to end.
    let mirrors = mirrors_file(&config_dir, "east");
    let read = || std::fs::read_to_string(&mirrors).unwrap_or_default();
    until(
        Duration::from_secs(10),
        "api-east mirrored and ready",
        || read().contains("name: api-east") && read().contains("ready: true"),
    )
    .await;
    let url = format!("http://api-east.shop.svc.cluster.local:{port}/hello");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, raw) = get(web.outbound_addr, &url).await;
        if status == 200 {
            assert!(
                raw.contains(&format!("client=spiffe://{WEST}/ns/shop/sa/web")),
                "{raw}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "api-east never answered: {raw}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Gateway killed: the mirror stays but goes not ready within 4 s.
    east_gateway.shutdown().await;
    let took = until(
        Duration::from_secs(4),
        "mirrors not ready after the gateway died",
        || read().contains("name: api-east") && read().contains("ready: false"),
    )
    .await;
    eprintln!("not ready {took:?} after the gateway stopped");

    // Gateway back on its address: ready again soon after its first good probe.
    let _east_gateway = gateway_at(&east, east_dir.path(), "east", gateway_addr).await;
    let took = until(
        Duration::from_secs(3),
        "mirrors ready after the gateway returned",
        || read().contains("ready: true"),
    )
    .await;
    eprintln!("ready {took:?} after the gateway returned");

    // Unlink: every mirror of east goes.
    std::fs::remove_file(&west_link).unwrap();
    until(
        Duration::from_secs(5),
        "mirrors removed after unlink",
        || !mirrors.exists(),
    )
    .await;
    mirror.shutdown().await;
}
