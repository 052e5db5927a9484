//! Shared by the gateway tests: apps, proxies, gateways and Links for
//! clusters made in-process, each with a control plane of its own.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, path::Path, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::{ControlPlane, admin_socket::create_token};
use mesh_core::identity::{SpiffeId, TrustBundle, cert::now, files};
use mesh_gateway::{Gateway, GatewayArgs};
use mesh_proxy::{
    Config, Proxy,
    env::{AppPort, Bootstrap},
};

/// An app that answers with the caller identity it was given. A request
/// asking to upgrade (`Upgrade: echo`) gets 101 with that identity in
/// `x-client`, then every byte it sends back.
pub async fn app(ip: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    let seen = req
                        .headers()
                        .get("mesh-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    if req.headers().get("upgrade").is_some_and(|u| u == "echo") {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = upgrade.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        let h = resp.headers_mut();
                        h.insert("upgrade", http::HeaderValue::from_static("echo"));
                        h.insert("connection", http::HeaderValue::from_static("Upgrade"));
                        h.insert("x-client", http::HeaderValue::from_str(&seen).unwrap());
                        return Ok::<_, std::convert::Infallible>(resp);
                    }
                    Ok(http::Response::new(Full::new(Bytes::from(format!(
                        "client={seen}"
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A join token for `ns/sa` (for workload `claims`, if any), written to a
/// file under `dir`.
pub fn token(
    plane: &ControlPlane,
    dir: &Path,
    (ns, sa): (&str, &str),
    claims: Option<mesh_control::store::WorkloadClaims>,
) -> std::path::PathBuf {
    let (token, _) = create_token(
        plane.store().as_ref(),
        ns,
        sa,
        Duration::from_secs(600),
        now().unix_timestamp(),
        claims,
    )
    .unwrap();
    let path = dir.join(format!("{ns}-{sa}.token"));
    std::fs::write(&path, token).unwrap();
    path
}

/// A proxy for workload `shop/<sa>` (label app=<sa>) of `plane`'s cluster,
/// on `ip`, in front of `app` (if any).
pub async fn proxy(
    plane: &ControlPlane,
    dir: &Path,
    cluster: &str,
    sa: &str,
    ip: std::net::IpAddr,
    app: Option<u16>,
) -> Proxy {
    let td = plane.trust_domain.clone();
    Proxy::start(Config {
        cluster: cluster.into(),
        identity: SpiffeId::workload(&td, "shop", sa).unwrap(),
        trust_domain: td.clone(),
        namespace: "shop".into(),
        service_account: sa.into(),
        workload: format!("{sa}-0"),
        control_identity_addr: plane.identity_addr.to_string(),
        control_api_addr: plane.api_addr.to_string(),
        control_identity: SpiffeId::workload(&td, "mesh-system", "control").unwrap(),
        trust_anchors: mesh_proxy::TrustAnchors::File(dir.join("ca/bundle.json")),
        bootstrap: Bootstrap::TokenFile(token(
            plane,
            dir,
            ("shop", sa),
            Some(mesh_control::store::WorkloadClaims {
                workload: format!("{sa}-0"),
                labels: [("app".to_owned(), sa.to_owned())].into(),
                addresses: vec![ip],
                ports: Vec::new(),
            }),
        )),
        inbound_addr: SocketAddr::new(ip, 0),
        outbound_addr: SocketAddr::new(ip, 0),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        app_ip: ip,
        app_ports: app
            .map(|port| AppPort {
                name: "http".into(),
                port,
            })
            .into_iter()
            .collect(),
        workload_addresses: vec![ip],
        labels: [("app".to_owned(), sa.to_owned())].into(),
        inbound_fail_fast: Duration::from_secs(2),
        detect_timeout: Duration::from_secs(1),
        opaque_ports: Vec::new(),
        connect_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(10),
        max_in_flight: 1000,
        shutdown_grace: Duration::from_secs(1),
        worker_threads: 1,
        destinations: Default::default(),
        via_gateway: None,
        metrics_addr: None,
    })
    .await
    .unwrap()
}

/// The gateway of `plane`'s cluster.
pub async fn gateway(plane: &ControlPlane, dir: &Path, cluster: &str) -> Gateway {
    gateway_at(plane, dir, cluster, "127.0.0.1:0".parse().unwrap()).await
}

/// The gateway of `plane`'s cluster, its tunnel on `tunnel_addr`.
pub async fn gateway_at(
    plane: &ControlPlane,
    dir: &Path,
    cluster: &str,
    tunnel_addr: SocketAddr,
) -> Gateway {
    Gateway::start(GatewayArgs {
        cluster: cluster.into(),
        trust_domain: plane.trust_domain.clone(),
        cluster_domain: "cluster.local".into(),
        control_identity_addr: plane.identity_addr.to_string(),
        control_api_addr: plane.api_addr.to_string(),
        control_identity: None,
        trust_anchors: dir.join("ca/bundle.json"),
        join_token_file: Some(token(plane, dir, ("mesh-system", "gateway"), None)),
        credentials_dir: None,
        tunnel_addr,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: None,
    })
    .await
    .unwrap()
}

/// A bundle of `td` holding `root`, as one line of SPIFFE JSON.
pub fn bundle_json(td: &str, root: &rustls::pki_types::CertificateDer<'static>) -> String {
    let mut bundle = TrustBundle::new(td.parse().unwrap());
    bundle.add_root(root.clone()).unwrap();
    bundle.to_spiffe_json().unwrap().replace('\n', "")
}

/// The bundle of a CA directory, as one line of SPIFFE JSON.
pub fn ca_bundle_json(dir: &Path, td: &str) -> String {
    files::load_bundle(&dir.join("ca/bundle.json"), td.parse().unwrap())
        .unwrap()
        .to_spiffe_json()
        .unwrap()
        .replace('\n', "")
}

/// A Link to cluster `name` (trust domain `td`) through `gateway`, over TCP.
pub fn link(name: &str, td: &str, gateway: &str, bundle_json: &str) -> String {
    link_over(name, td, gateway, bundle_json, "tcp")
}

/// [`link`] with the tunnel `transport` (`tcp` or `quic`).
pub fn link_over(
    name: &str,
    td: &str,
    gateway: &str,
    bundle_json: &str,
    transport: &str,
) -> String {
    format!(
        "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata: {{name: {name}, namespace: mesh-system}}\nspec:\n  clusterName: {name}\n  trustDomain: {td}\n  gatewayAddresses: [\"{gateway}\"]\n  gatewayIdentity: spiffe://{td}/ns/mesh-system/sa/gateway\n  transport: {transport}\n  trustBundle: '{bundle_json}'\n"
    )
}

pub const WEST: &str = "west.mesh.local";
pub const EAST: &str = "east.mesh.local";

/// `GET url` through an explicit-mode proxy; status and whole response.
pub async fn via_proxy(proxy: SocketAddr, url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// West's directories and config, before its control plane starts.
pub struct WestSetup {
    pub dir: tempfile::TempDir,
    pub config: mesh_control::Config,
    /// West's bundle, one line of SPIFFE JSON (for east's Link back).
    pub bundle: String,
}

pub fn west_setup() -> WestSetup {
    let dir = tempfile::tempdir().unwrap();
    let config = mesh_control::test_util::config_for(dir.path(), "west", WEST);
    let bundle = ca_bundle_json(dir.path(), WEST);
    WestSetup {
        dir,
        config,
        bundle,
    }
}

/// East, running: its control plane, `api` (exported, app on 127.0.0.2)
/// with its proxy, its gateway, and a Link back to west. `extra` YAML
/// (policies) is added to its config.
pub struct East {
    pub dir: tempfile::TempDir,
    pub plane: ControlPlane,
    pub api: Proxy,
    pub gateway: Gateway,
    pub port: u16,
    /// East's bundle, one line of SPIFFE JSON (for west's Link).
    pub bundle: String,
}

pub async fn east(west_bundle: &str, extra: &str) -> East {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mesh_control::test_util::config_for(dir.path(), "east", EAST);
    let bundle = ca_bundle_json(dir.path(), EAST);
    let app = app("127.0.0.2").await;
    let port = app.port();
    std::fs::write(
        cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}, appProtocol: http}}]\n---\n{}{}",
            link("west", WEST, "127.0.0.1:1", west_bundle),
            extra.replace("{port}", &port.to_string()),
        ),
    )
    .unwrap();
    let plane = ControlPlane::start(cfg).await.unwrap();
    let api = proxy(&plane, dir.path(), "east", "api", app.ip(), Some(port)).await;
    let gateway = gateway(&plane, dir.path(), "east").await;
    East {
        dir,
        plane,
        api,
        gateway,
        port,
        bundle,
    }
}

/// A gateway's metrics text, from its admin address.
pub async fn gateway_metrics(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
