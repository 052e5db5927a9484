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

/// Waits until `check` holds, up to `within`; returns how long it took.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// West (with web's proxy and the service mirror) linked to a running east.
struct Federated {
    east: East,
    west: ControlPlane,
    _west_dir: tempfile::TempDir,
    web: mesh_proxy::Proxy,
    mirror: ServiceMirror,
    west_link: std::path::PathBuf,
    mirrors: std::path::PathBuf,
}

async fn federated() -> Federated {
    let west_setup = west_setup();
    // East exports api and links west back.
    let east = east(&west_setup.bundle, "").await;
    // West links east and runs its service mirror.
    let west_link = west_setup.config.config_dir.join("link-east.yaml");
    std::fs::write(
        &west_link,
        link(
            "east",
            EAST,
            &east.gateway.tunnel_addr.to_string(),
            &east.bundle,
        ),
    )
    .unwrap();
    let config_dir = west_setup.config.config_dir.clone();
    let west_dir = west_setup.dir;
    let west = ControlPlane::start(west_setup.config).await.unwrap();
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
            ("mesh-system", "service-mirror"),
            None,
        )),
        credentials_dir: None,
        config_dir: Some(config_dir.clone()),
        store: mesh_service_mirror::config::Store::Local,
        kubeconfig: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: None,
    })
    .await
    .unwrap();
    let mirrors = mirrors_file(&config_dir, "east");
    Federated {
        east,
        west,
        _west_dir: west_dir,
        web,
        mirror,
        west_link,
        mirrors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_exports_probes_and_links() {
    let Federated {
        east,
        west: _west,
        _west_dir,
        web,
        mirror,
        west_link,
        mirrors,
    } = federated().await;
    let (east_gateway, port) = (east.gateway, east.port);
    let gateway_addr = east_gateway.tunnel_addr;

    // api-east appears and works, with west's web identity end to end.
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
        let (status, raw) = via_proxy(web.outbound_addr, &url).await;
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
    let _east_gateway = gateway_at(&east.plane, east.dir.path(), "east", gateway_addr).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_outlive_a_remote_control_plane_outage_and_resync() {
    let f = federated().await;
    let read = || std::fs::read_to_string(&f.mirrors).unwrap_or_default();
    until(Duration::from_secs(10), "api-east mirrored", || {
        read().contains("name: api-east") && read().contains("ready: true")
    })
    .await;

    // East's control plane goes away for 60 s; meanwhile east exports a
    // second service.
    let East {
        dir: east_dir,
        plane,
        api: _api,
        gateway: _gateway,
        port,
        ..
    } = f.east;
    let (identity_addr, api_addr) = (plane.identity_addr, plane.api_addr);
    plane.shutdown(Duration::ZERO).await;
    let mut config = test_util::config_for(east_dir.path(), "east", EAST);
    std::fs::write(
        config.config_dir.join("more.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api2\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}, appProtocol: http}}]\n"
        ),
    )
    .unwrap();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read();
        assert!(
            now.contains("name: api-east") && !now.contains("api2-east"),
            "mirrors stay, unchanged, while east's control plane is away:\n{now}"
        );
    }

    // Back on the same addresses: the change shows up within 5 s.
    config.identity_addr = identity_addr;
    config.api_addr = api_addr;
    let _east = ControlPlane::start(config).await.unwrap();
    let took = until(
        Duration::from_secs(5),
        "east's new export mirrored after its return",
        || read().contains("name: api2-east"),
    )
    .await;
    eprintln!("re-synced {took:?} after east's control plane returned");
    assert!(read().contains("name: api-east"), "{}", read());
    f.mirror.shutdown().await;
    drop(f.web);
}
