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

/// An app that answers with the caller identity it was given.
pub async fn app(ip: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let seen = req
                        .headers()
                        .get("mesh-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        format!("client={seen}"),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A join token for `ns/sa`, written to a file under `dir`.
pub fn token(plane: &ControlPlane, dir: &Path, ns: &str, sa: &str) -> std::path::PathBuf {
    let (token, _) = create_token(
        plane.store().as_ref(),
        ns,
        sa,
        Duration::from_secs(600),
        now().unix_timestamp(),
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
        trust_anchors: dir.join("ca/bundle.json"),
        bootstrap: Bootstrap::TokenFile(token(plane, dir, "shop", sa)),
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
        header_read_timeout: Duration::from_secs(10),
        max_in_flight: 1000,
        shutdown_grace: Duration::from_secs(1),
        worker_threads: 1,
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
        join_token_file: Some(token(plane, dir, "mesh-system", "gateway")),
        credentials_dir: None,
        tunnel_addr,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
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

/// A Link to cluster `name` (trust domain `td`) through `gateway`.
pub fn link(name: &str, td: &str, gateway: &str, bundle_json: &str) -> String {
    format!(
        "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata: {{name: {name}, namespace: mesh-system}}\nspec:\n  clusterName: {name}\n  trustDomain: {td}\n  gatewayAddresses: [\"{gateway}\"]\n  gatewayIdentity: spiffe://{td}/ns/mesh-system/sa/gateway\n  transport: tcp\n  trustBundle: '{bundle_json}'\n"
    )
}
