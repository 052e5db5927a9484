//! The proxy's inbound side end to end: a real control plane, a real app,
//! the proxy started with a join token, and callers that speak to it as a
//! client proxy does (mTLS, HTTP/2, `mesh-dst-port`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::{ControlPlane, admin_socket::create_token, test_util};
use mesh_core::{
    api::v1::{
        CertifyRequest, WatchRequest, discovery_client::DiscoveryClient, discovery_update::Kind,
        identity_client::IdentityClient,
    },
    grpc,
    identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId,
        cert::now,
        csr::new_key_and_csr,
        tls::{client_config, client_config_without_cert},
    },
};
use mesh_proxy::{
    Config, Proxy,
    env::{AppPort, Bootstrap},
    inbound::{CLIENT_ID, DST_PORT, ORIG_PROTO},
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const TD: &str = test_util::TD;

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/shop/sa/{sa}").parse().unwrap()
}

fn control_id() -> SpiffeId {
    format!("spiffe://{TD}/ns/mesh-system/sa/control")
        .parse()
        .unwrap()
}

/// An HTTP/1.1 app that answers with what it saw, and counts requests.
async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let h = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let body = format!(
                        "client={} host={} path={} version={:?} dst-port={}",
                        h(CLIENT_ID),
                        h("host"),
                        req.uri().path(),
                        req.version(),
                        h(DST_PORT)
                    );
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct World {
    _dir: tempfile::TempDir,
    plane: ControlPlane,
    bundles: BundleStore,
    proxy: Proxy,
    app_port: u16,
    app_hits: Arc<AtomicUsize>,
}

async fn world(leaf_ttl: Duration) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_util::config(dir.path());
    cfg.leaf_ttl = leaf_ttl;
    let (app_addr, app_hits) = app().await;
    let app_port = app_addr.port();
    // api's HTTP port admits only web.
    std::fs::write(
        cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {app_port}, appProtocol: http}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: {app_port}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web-only, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  identities: [\"{}\"]\n",
            id("web")
        ),
    )
    .unwrap();
    let bundles = test_util::bundles_of(&cfg.ca_dir);
    let anchors = cfg.ca_dir.join("bundle.json");
    let plane = ControlPlane::start(cfg).await.unwrap();
    let token_file = dir.path().join("api.token");
    let (token, _) = create_token(
        plane.store().as_ref(),
        "shop",
        "api",
        Duration::from_secs(600),
        now().unix_timestamp(),
    )
    .unwrap();
    std::fs::write(&token_file, token).unwrap();
    let config = Config {
        cluster: "west".into(),
        trust_domain: TD.parse().unwrap(),
        identity: id("api"),
        namespace: "shop".into(),
        service_account: "api".into(),
        workload: "api-0".into(),
        control_identity_addr: plane.identity_addr.to_string(),
        control_api_addr: plane.api_addr.to_string(),
        control_identity: control_id(),
        trust_anchors: anchors,
        bootstrap: Bootstrap::TokenFile(token_file),
        inbound_addr: "127.0.0.1:0".parse().unwrap(),
        outbound_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        app_ip: "127.0.0.1".parse().unwrap(),
        app_ports: vec![AppPort {
            name: "http".into(),
            port: app_port,
        }],
        workload_addresses: vec!["127.0.0.1".parse().unwrap()],
        labels: [("app".to_owned(), "api".to_owned())].into(),
        inbound_fail_fast: Duration::from_secs(2),
    };
    let proxy = Proxy::start(config).await.unwrap();
    World {
        _dir: dir,
        plane,
        bundles,
        proxy,
        app_port,
        app_hits,
    }
}

impl World {
    /// An SVID for `shop/<sa>`, joined with a token like any workload.
    async fn join(&self, sa: &str) -> Credentials {
        let (token, _) = create_token(
            self.plane.store().as_ref(),
            "shop",
            sa,
            Duration::from_secs(600),
            now().unix_timestamp(),
        )
        .unwrap();
        let tls =
            client_config_without_cert(self.bundles.clone(), ExpectedIdentity::Exact(control_id()))
                .unwrap();
        let mut client =
            IdentityClient::new(grpc::channel(&self.plane.identity_addr.to_string(), tls).unwrap());
        let (key, csr) = new_key_and_csr().unwrap();
        let resp = client
            .certify(CertifyRequest {
                identity: id(sa).to_string(),
                csr,
                token,
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        Credentials::new(
            resp.chain.into_iter().map(CertificateDer::from).collect(),
            key,
        )
        .unwrap()
    }

    /// Opens mTLS + HTTP/2 to the proxy, expecting it to be `server`.
    async fn connect(
        &self,
        creds: &Credentials,
        server: SpiffeId,
    ) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, std::io::Error> {
        let mut tls = client_config(
            CredentialStore::new(creds.clone()),
            self.bundles.clone(),
            ExpectedIdentity::Exact(server),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.proxy.inbound_addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("api.shop").unwrap(), tcp)
            .await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(send)
    }

    async fn get(&self, creds: &Credentials, forged: Option<&str>) -> (StatusCode, String) {
        let mut send = self.connect(creds, id("api")).await.unwrap();
        let mut req = Request::get(format!(
            "http://api.shop.svc.cluster.local:{}/hello",
            self.app_port
        ))
        .header(DST_PORT, self.app_port.to_string())
        .header(ORIG_PROTO, "HTTP/1.1");
        if let Some(forged) = forged {
            req = req.header(CLIENT_ID, forged);
        }
        let resp = send
            .send_request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn metrics(&self) -> String {
        let mut s = tokio::net::TcpStream::connect(self.proxy.admin_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_authorizes_and_sets_the_verified_client_id() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.join("web").await;

    // The verified caller reaches the app as HTTP/1.1; a forged client id
    // never does.
    let (status, body) = w
        .get(&web, Some("spiffe://evil.example/ns/x/sa/admin"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("client={}", id("web"))), "{body}");
    assert!(!body.contains("evil"), "{body}");
    assert!(
        body.contains(&format!("host=api.shop.svc.cluster.local:{}", w.app_port)),
        "{body}"
    );
    assert!(
        body.contains("path=/hello version=HTTP/1.1 dst-port=-"),
        "mesh headers are stripped: {body}"
    );
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);

    // Another identity of the same trust domain: 403, the app never sees it.
    let other = w.join("other").await;
    let (status, body) = w.get(&other, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains(&format!(
            "{} is not authorized for port {}",
            id("other"),
            w.app_port
        )),
        "{body}"
    );
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);

    // A caller expecting a different server identity sends nothing.
    let err = w.connect(&web, id("db")).await;
    assert!(
        err.is_err(),
        "the handshake must fail on the wrong server identity"
    );

    // Plaintext is refused: no TLS, no app.
    let mut plain = tokio::net::TcpStream::connect(w.proxy.inbound_addr)
        .await
        .unwrap();
    plain
        .write_all(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("client="),
        "plaintext must not reach the app"
    );
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);

    let m = w.metrics().await;
    assert!(
        m.contains("mesh_proxy_inbound_refused_total{reason=\"unauthorized\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("mesh_proxy_inbound_tls_refused_total{reason=\"handshake\"}"),
        "{m}"
    );
    assert!(m.contains(&format!("mesh_proxy_inbound_requests_total{{port=\"{}\",status_code=\"200\",client_id=\"{}\"}} 1", w.app_port, id("web"))), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_registers_its_workload_with_its_inbound_port() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.join("web").await;
    let tls = client_config(
        CredentialStore::new(web),
        w.bundles.clone(),
        ExpectedIdentity::Exact(control_id()),
    )
    .unwrap();
    let mut discovery =
        DiscoveryClient::new(grpc::channel(&w.plane.api_addr.to_string(), tls).unwrap());
    let mut watch = discovery
        .watch(WatchRequest {
            authority: format!("api.shop.svc.cluster.local:{}", w.app_port),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kind = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .kind
            .unwrap();
        if let Kind::Endpoints(set) = kind
            && let Some(ep) = set.endpoints.first()
        {
            assert_eq!(ep.address, format!("127.0.0.1:{}", w.app_port));
            assert_eq!(ep.spiffe_id, id("api").to_string());
            assert_eq!(ep.proxy_port, u32::from(w.proxy.inbound_addr.port()));
            assert_eq!(ep.workload, "shop/api-0");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy's workload never appeared in discovery"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_renews_at_half_life_and_keeps_serving() {
    // 20 s certificates: renewal at 10 s (the floor).
    let w = world(Duration::from_secs(20)).await;
    let first = w.proxy.credentials.current().info().serial.clone();
    let web = w.join("web").await;
    let mut conn = w.connect(&web, id("api")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.proxy.credentials.current().info().serial == first {
        assert!(Instant::now() < deadline, "no renewal within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        w.proxy.credentials.current().id(),
        &id("api"),
        "same identity after renewal"
    );
    // The connection opened before the renewal still serves.
    let req = Request::get("http://api/after-renewal")
        .header(DST_PORT, w.app_port.to_string())
        .header(ORIG_PROTO, "HTTP/1.1")
        .body(Empty::new())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        w.metrics()
            .await
            .contains("mesh_proxy_identity_renewals_total 1")
    );
}
