//! Two clusters in one process, each with its own control plane and trust
//! domain: west's `web` calls `api-east` through its own proxy (explicit
//! mode), which finds a via-gateway endpoint in discovery, opens a tunnel to
//! east's gateway and runs its mTLS session with east's `api` proxy inside
//! it. The app in east sees west's SPIFFE ID; east's policy decides on it.

mod support;

use std::time::Duration;

use mesh_control::{ControlPlane, test_util};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEST: &str = "west.mesh.local";
const EAST: &str = "east.mesh.local";

/// `GET url` through an explicit-mode proxy; status and whole response.
async fn via_proxy(proxy: std::net::SocketAddr, url: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    tcp.write_all(
        format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_in_west_calls_api_in_east_through_the_gateway_as_itself() {
    let (west_dir, east_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let west_cfg = test_util::config_for(west_dir.path(), "west", WEST);
    let east_cfg = test_util::config_for(east_dir.path(), "east", EAST);
    let (west_bundle, east_bundle) = (
        ca_bundle_json(west_dir.path(), WEST),
        ca_bundle_json(east_dir.path(), EAST),
    );

    // East: api exported; only west's web may call it; west is linked.
    let app = app("127.0.0.2").await;
    let port = app.port();
    std::fs::write(
        east_cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}, appProtocol: http}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: {port}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: west-web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  identities: [\"spiffe://{WEST}/ns/shop/sa/web\"]\n---\n{}",
            link("west", WEST, "127.0.0.1:1", &west_bundle)
        ),
    )
    .unwrap();
    let east = ControlPlane::start(east_cfg).await.unwrap();
    let _api = proxy(&east, east_dir.path(), "east", "api", app.ip(), Some(port)).await;
    let east_gateway = gateway(&east, east_dir.path(), "east").await;

    // West: linked to east through its gateway, with api mirrored as
    // api-east (what the service mirror writes).
    std::fs::write(
        west_cfg.config_dir.join("east.yaml"),
        format!(
            "{}---\napiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata: {{name: api-east, namespace: shop}}\nspec:\n  link: east\n  remoteName: api\n  ports: [{{port: {port}, appProtocol: http}}]\n  identities: [\"spiffe://{EAST}/ns/shop/sa/api\"]\n  ready: true\n",
            link("east", EAST, &east_gateway.tunnel_addr.to_string(), &east_bundle)
        ),
    )
    .unwrap();
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
    let other = proxy(
        &west,
        west_dir.path(),
        "west",
        "other",
        "127.0.0.4".parse().unwrap(),
        None,
    )
    .await;

    let url = format!("http://api-east.shop.svc.cluster.local:{port}/hello");
    // Links reach every side by polling: retry briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let raw = loop {
        let (status, raw) = via_proxy(web.outbound_addr, &url).await;
        if status == 200 {
            break raw;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "web never reached api in east: {raw}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        raw.contains(&format!("client=spiffe://{WEST}/ns/shop/sa/web")),
        "east's app sees west's web as itself: {raw}"
    );

    // East's policy admits only west's web: west's other gets 403 from
    // east's proxy, through the gateway.
    let (status, raw) = via_proxy(other.outbound_addr, &url).await;
    assert_eq!(status, 403, "{raw}");
    assert!(
        raw.contains(&format!("spiffe://{WEST}/ns/shop/sa/other")),
        "{raw}"
    );

    // The gateway carried both, and saw only west's trust domain.
    let m = {
        let mut s = tokio::net::TcpStream::connect(east_gateway.admin_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        m.contains(&format!(
            "mesh_gateway_streams_total{{peer_trust_domain=\"{WEST}\"}}"
        )),
        "{m}"
    );
}
