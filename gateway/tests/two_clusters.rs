//! Two clusters in one process, each with its own control plane and trust
//! domain: west's `web` calls `api-east` through its own proxy (explicit
//! mode), which finds a via-gateway endpoint in discovery, opens a tunnel to
//! east's gateway and runs its mTLS session with east's `api` proxy inside
//! it. The app in east sees west's SPIFFE ID; east's policy decides on it.

mod support;

use std::time::Duration;

use mesh_control::ControlPlane;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_in_west_calls_api_in_east_through_the_gateway_as_itself() {
    cross_cluster_call("tcp", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_a_quic_tunnel() {
    cross_cluster_call("quic", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_falls_back_to_tcp_when_udp_is_blocked() {
    cross_cluster_call("quic", true).await;
}

/// A TCP-only way to `to` on a port where nothing answers UDP: what a
/// network that blocks UDP leaves of a gateway.
async fn tcp_only(to: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut from, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut from, &mut up).await;
                }
            });
        }
    });
    addr
}

/// web in west calls api in east; the Link asks for `transport`, and with
/// `udp_blocked` the gateway is reachable over TCP only.
async fn cross_cluster_call(transport: &str, udp_blocked: bool) {
    let west_setup = west_setup();
    // East: api exported; only west's web may call it; west is linked.
    let east = east(
        &west_setup.bundle,
        &format!(
            "---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: {{port}}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: west-web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  identities: [\"spiffe://{WEST}/ns/shop/sa/web\"]\n"
        ),
    )
    .await;
    let port = east.port;
    let gateway_addr = if udp_blocked {
        tcp_only(east.gateway.tunnel_addr).await
    } else {
        east.gateway.tunnel_addr
    };
    // The transport the gateway will see.
    let carried = if udp_blocked { "tcp" } else { transport };

    // West: linked to east through its gateway, with api mirrored as
    // api-east (what the service mirror writes).
    std::fs::write(
        west_setup.config.config_dir.join("east.yaml"),
        format!(
            "{}---\napiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata: {{name: api-east, namespace: shop}}\nspec:\n  link: east\n  remoteName: api\n  ports: [{{port: {port}, appProtocol: http}}]\n  identities: [\"spiffe://{EAST}/ns/shop/sa/api\"]\n  ready: true\n",
            link_over(
                "east",
                EAST,
                &gateway_addr.to_string(),
                &east.bundle,
                transport
            )
        ),
    )
    .unwrap();
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
        let mut s = tokio::net::TcpStream::connect(east.gateway.admin_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        m.contains(&format!(
            "mesh_gateway_streams_total{{peer_trust_domain=\"{WEST}\",transport=\"{carried}\"}}"
        )),
        "{m}"
    );
}
