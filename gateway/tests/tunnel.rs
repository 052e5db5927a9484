//! The gateway end to end, in one process: a real control plane (west), an
//! exported `api` with its app and proxy, the gateway, and a caller from a
//! linked cluster (north, with a CA of its own). The caller opens a tunnel,
//! asks for `api` with CONNECT, and runs its own mTLS session with api's
//! proxy inside the stream: the app sees north's identity. Unexported
//! targets, this cluster's own callers, and unlinked trust domains are
//! refused and counted.

use std::{sync::Arc, time::Duration};

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::{ControlPlane, test_util};
use mesh_core::identity::{
    BundleStore, CertificateAuthority, CredentialStore, Credentials, ExpectedIdentity, RootCa,
    SpiffeId,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    csr::new_key_and_csr,
    tls::client_config,
};
use mesh_gateway::{Gateway, tunnel::ALPN_TUNNEL};
use mesh_proxy::Proxy;
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncRead, AsyncWrite};

const TD: &str = test_util::TD;

fn id(path: &str) -> SpiffeId {
    format!("spiffe://{TD}{path}").parse().unwrap()
}

/// Another cluster's CA and one identity it issues.
fn foreign(td: &str, path: &str) -> (RootCa, Credentials) {
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
    let ca = CertificateAuthority::generate(td.parse().unwrap(), &root, DEFAULT_ISSUER_TTL, now())
        .unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let id: SpiffeId = format!("spiffe://{td}{path}").parse().unwrap();
    let issued = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
    (root, Credentials::new(issued.chain, key).unwrap())
}

/// TLS to `addr` as `creds`, expecting `server`, offering `alpn`.
async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    creds: &Credentials,
    bundles: &BundleStore,
    server: SpiffeId,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let mut cfg = client_config(
        CredentialStore::new(creds.clone()),
        bundles.clone(),
        ExpectedIdentity::Exact(server),
    )
    .unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("gateway").unwrap(), io)
        .await
}

struct Cluster {
    _dir: tempfile::TempDir,
    plane: ControlPlane,
    _api: Proxy,
    gateway: Gateway,
    bundles: BundleStore,
    app_port: u16,
    ca_dir: std::path::PathBuf,
}

async fn cluster(north_root: &RootCa) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_util::config(dir.path());
    let app = app("127.0.0.1").await;
    let port = app.port();
    let north = bundle_json("north.mesh.local", north_root.cert());
    std::fs::write(
        cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}, appProtocol: http}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {port}}}]\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: stuck\n  namespace: shop\n  labels: {{multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {{app: stuck}}\n  ports: [{{port: {port}}}]\n---\n{}",
            link("north", "north.mesh.local", "127.0.0.1:4143", &north)
        ),
    )
    .unwrap();
    let bundles = test_util::bundles_of(&cfg.ca_dir);
    let ca_dir = cfg.ca_dir.clone();
    let plane = ControlPlane::start(cfg).await.unwrap();
    let api = proxy(&plane, dir.path(), "west", "api", app.ip(), Some(port)).await;
    let gateway = gateway(&plane, dir.path(), "west").await;
    Cluster {
        _dir: dir,
        plane,
        _api: api,
        gateway,
        bundles,
        app_port: port,
        ca_dir,
    }
}

/// The tunnel connection's sender (kept so the connection stays open)
/// and one stream of it.
type Opened = (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    hyper::upgrade::Upgraded,
);

/// Opens a tunnel as `creds` and sends CONNECT for `target`; the status
/// and, on 200, the stream.
async fn connect(
    c: &Cluster,
    creds: &Credentials,
    target: &str,
) -> Result<(StatusCode, Option<Opened>), String> {
    let tcp = tokio::net::TcpStream::connect(c.gateway.tunnel_addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tls(
        tcp,
        creds,
        &c.bundles,
        id("/ns/mesh-system/sa/gateway"),
        ALPN_TUNNEL,
    )
    .await
    .map_err(|e| e.to_string())?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(ALPN_TUNNEL));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if status != StatusCode::OK {
        return Ok((status, None));
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, Some((send, upgraded))))
}

type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// Opens a QUIC tunnel as `creds` and asks for `target`: the status, on 200
/// the stream, and the connection (kept open by the caller).
async fn quic(
    c: &Cluster,
    creds: &Credentials,
    target: &str,
) -> (
    u16,
    Option<QuicStream>,
    (quinn::Endpoint, quinn::Connection),
) {
    use mesh_gateway::quic::{ALPN_QUIC, encode_header};
    let mut cfg = client_config(
        CredentialStore::new(creds.clone()),
        c.bundles.clone(),
        ExpectedIdentity::Exact(id("/ns/mesh-system/sa/gateway")),
    )
    .unwrap();
    cfg.alpn_protocols = vec![ALPN_QUIC.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(c.gateway.quic_addr, "gateway")
        .unwrap()
        .await
        .expect("QUIC handshake with the gateway");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_header(target).unwrap())
        .await
        .unwrap();
    let mut status = [0u8; 2];
    recv.read_exact(&mut status).await.unwrap();
    let status = u16::from_be_bytes(status);
    let stream = (status == 200).then(|| tokio::io::join(recv, send));
    (status, stream, (endpoint, conn))
}

/// Credentials for `path` in this cluster's trust domain, from its CA.
fn local_creds(c: &Cluster, path: &str) -> Credentials {
    let ca = mesh_core::identity::files::load_ca(&c.ca_dir).unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let issued = ca
        .sign_csr(&csr, &id(path), Duration::from_secs(3600))
        .unwrap();
    Credentials::new(issued.chain, key).unwrap()
}

/// An SVID for `shop/<sa>` through Certify, with a token for workload
/// `workload` (label app=<sa>, address 127.0.0.1), as a proxy joins.
async fn joined(c: &Cluster, sa: &str, workload: &str) -> Credentials {
    use mesh_core::{
        api::v1::{CertifyRequest, identity_client::IdentityClient},
        identity::tls::client_config_without_cert,
    };
    let (token, _) = mesh_control::admin_socket::create_token(
        c.plane.store().as_ref(),
        "shop",
        sa,
        Duration::from_secs(600),
        now().unix_timestamp(),
        Some(mesh_control::store::WorkloadClaims {
            workload: workload.into(),
            labels: [("app".to_owned(), sa.to_owned())].into(),
            addresses: vec!["127.0.0.1".parse().unwrap()],
            ports: Vec::new(),
        }),
    )
    .unwrap();
    let tls = client_config_without_cert(
        c.bundles.clone(),
        ExpectedIdentity::Exact(id("/ns/mesh-system/sa/control")),
    )
    .unwrap();
    let mut identity = IdentityClient::new(
        mesh_core::grpc::channel(&c.plane.identity_addr.to_string(), tls).unwrap(),
    );
    let (key, csr) = new_key_and_csr().unwrap();
    let resp = identity
        .certify(CertifyRequest {
            identity: id(&format!("/ns/shop/sa/{sa}")).to_string(),
            csr,
            token,
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Credentials::new(
        resp.chain
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect(),
        key,
    )
    .unwrap()
}

/// An exported service whose only endpoint's proxy port never completes a
/// TCP handshake (a listener with a full accept queue drops SYNs, as a
/// black hole does): the gateway refuses the stream with 502 after its
/// connect timeout instead of holding it until the kernel gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_never_answers_is_refused_after_the_connect_timeout() {
    let (north_root, web) = foreign("north.mesh.local", "/ns/shop/sa/web");
    let c = cluster(&north_root).await;
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
    // The one queued connection fills the accept queue; nothing accepts.
    let _queued = std::net::TcpStream::connect(stuck_addr).unwrap();

    let tls = client_config(
        CredentialStore::new(joined(&c, "stuck", "stuck-0").await),
        c.bundles.clone(),
        ExpectedIdentity::Exact(id("/ns/mesh-system/sa/control")),
    )
    .unwrap();
    let mut registry = mesh_core::api::v1::registry_client::RegistryClient::new(
        mesh_core::grpc::channel(&c.plane.api_addr.to_string(), tls).unwrap(),
    );
    registry
        .register(mesh_core::api::v1::RegisterRequest {
            namespace: "shop".into(),
            name: "stuck-0".into(),
            addresses: vec!["127.0.0.1".into()],
            ports: vec![mesh_core::api::v1::WorkloadPort {
                name: "http".into(),
                port: u32::from(c.app_port),
                protocol: 0,
            }],
            labels: [("app".to_owned(), "stuck".to_owned())].into(),
            healthy: true,
            proxy_port: u32::from(stuck_addr.port()),
            via_gateway: false,
        })
        .await
        .unwrap();

    let target = format!("stuck.shop.svc.cluster.local:{}", c.app_port);
    // Links, exports and the registration arrive by polling: until then
    // the answer is another refusal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), connect(&c, &web, &target))
            .await
            .expect("the gateway answers within 10 s, connect timeout or not");
        if let Ok((StatusCode::BAD_GATEWAY, _)) = answer {
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_secs(5),
                "refused after {took:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics(&c).await;
    assert!(
        m.contains("mesh_gateway_refused_total{reason=\"unreachable\",peer_trust_domain=\"north.mesh.local\"} 1"),
        "{m}"
    );
}

async fn metrics(c: &Cluster) -> String {
    gateway_metrics(c.gateway.admin_addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_caller_reaches_an_exported_service_with_its_own_identity() {
    let (north_root, web) = foreign("north.mesh.local", "/ns/shop/sa/web");
    let c = cluster(&north_root).await;
    let target = format!("api.shop.svc.cluster.local:{}", c.app_port);

    // Links and exports arrive by polling: retry briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (_tunnel, stream) = loop {
        match connect(&c, &web, &target).await {
            Ok((StatusCode::OK, Some(opened))) => break opened,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the tunnel never opened: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Inside the stream: north's caller speaks mTLS with api's proxy itself,
    // as a client proxy does; the gateway only carries the bytes.
    let inner = tls(
        TokioIo::new(stream),
        &web,
        &c.bundles,
        id("/ns/shop/sa/api"),
        b"h2",
    )
    .await
    .expect("end-to-end mTLS with the destination proxy");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(inner))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{target}/hello"))
        .header("mesh-dst-port", c.app_port.to_string())
        .header("mesh-orig-proto", "HTTP/1.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "client=spiffe://north.mesh.local/ns/shop/sa/web",
        "the destination sees the caller's own identity across the gateway"
    );

    // The same over QUIC: a stream header names the target, a status
    // answers, then north's own mTLS session with api's proxy.
    let (status, quic_stream, _quic) = quic(&c, &web, &target).await;
    assert_eq!(status, 200);
    let inner = tls(
        quic_stream.unwrap(),
        &web,
        &c.bundles,
        id("/ns/shop/sa/api"),
        b"h2",
    )
    .await
    .expect("end-to-end mTLS inside a QUIC stream");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(inner))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{target}/over-quic"))
        .header("mesh-dst-port", c.app_port.to_string())
        .header("mesh-orig-proto", "HTTP/1.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "client=spiffe://north.mesh.local/ns/shop/sa/web"
    );
    let db_target = format!("db.shop.svc.cluster.local:{}", c.app_port);
    let (status, _, _) = quic(&c, &web, &db_target).await;
    assert_eq!(status, 403, "not exported, over QUIC too");

    // A service that is not exported is refused.
    let db = format!("db.shop.svc.cluster.local:{}", c.app_port);
    let (status, _) = connect(&c, &web, &db).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);

    // This cluster's own workloads do not tunnel through their gateway.
    let local = local_creds(&c, "/ns/shop/sa/web");
    let refused = connect(&c, &local, &target).await;
    assert!(
        !matches!(refused, Ok((StatusCode::OK, _))),
        "a local caller must not tunnel: {refused:?}"
    );

    // A trust domain nobody linked fails the handshake. (Earlier attempts,
    // before the Link reached the gateway, were refused the same way.)
    let unknown = |m: &str| {
        m.lines()
            .find_map(|l| {
                l.strip_prefix("mesh_gateway_tls_refused_total{reason=\"unknown_trust_domain\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = unknown(&metrics(&c).await);
    let (_, stranger) = foreign("south.mesh.local", "/ns/shop/sa/web");
    let refused = connect(&c, &stranger, &target).await;
    assert!(refused.is_err(), "{refused:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let m = metrics(&c).await;
        let ok = m.contains("mesh_gateway_refused_total{reason=\"not_exported\",peer_trust_domain=\"north.mesh.local\"} 2")
            && m.contains("mesh_gateway_streams_total{peer_trust_domain=\"north.mesh.local\",transport=\"tcp\"}")
            && m.contains("mesh_gateway_streams_total{peer_trust_domain=\"north.mesh.local\",transport=\"quic\"}")
            && unknown(&m) == before + 1.0
            && m.contains(&format!(
                "mesh_gateway_refused_total{{reason=\"same_trust_domain\",peer_trust_domain=\"{TD}\"}} 1"
            ));
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
