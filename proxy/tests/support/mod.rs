//! A world for proxy tests: a real control plane, a real HTTP/1.1 app
//! behind the `api` proxy, and callers that join with tokens.
#![allow(dead_code, unreachable_pub, unused_imports)]

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
    wire::{CLIENT_ID, DST_PORT, ORIG_PROTO},
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

pub const TD: &str = test_util::TD;

pub fn id(sa: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/shop/sa/{sa}").parse().unwrap()
}

pub fn control_id() -> SpiffeId {
    format!("spiffe://{TD}/ns/mesh-system/sa/control")
        .parse()
        .unwrap()
}

/// The RFC 6455 sample handshake key and the answer it calls for.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket handshake (with the sample key) is answered with 101, what
/// the app saw in `x-seen`, and then one echoed text frame: the client's
/// masked frame comes back unmasked, prefixed `echo `.
fn websocket(
    req: &mut Request<hyper::body::Incoming>,
    seen: &str,
) -> Option<http::Response<Full<Bytes>>> {
    let asked = req.headers().get("upgrade")?.as_bytes() == b"websocket";
    let key = req.headers().get("sec-websocket-key")?.as_bytes() == WS_KEY.as_bytes();
    if !(asked && key) {
        return None;
    }
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut io = TokioIo::new(upgrade.await.unwrap());
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[1] & 0x7f);
        let mut mask = [0u8; 4];
        io.read_exact(&mut mask).await.unwrap();
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let mut echo = b"echo ".to_vec();
        echo.extend_from_slice(&payload);
        let mut frame = vec![0x81, u8::try_from(echo.len()).unwrap()];
        frame.extend_from_slice(&echo);
        io.write_all(&frame).await.unwrap();
    });
    let mut resp = http::Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    h.insert("connection", http::HeaderValue::from_static("Upgrade"));
    h.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_static(WS_ACCEPT),
    );
    h.insert("x-seen", http::HeaderValue::from_str(seen).unwrap());
    Some(resp)
}

/// Sends `request` (a whole HTTP/1.1 request) to `proxy` and reads the
/// answer until the connection closes: its status and the whole text.
pub async fn send_raw(proxy: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut raw))
        .await
        .expect("the proxy answered in time")
        .unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

/// An HTTP/1.1 app that answers with what it saw, and counts requests.
pub async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    app_at("127.0.0.1:0".parse().unwrap(), Duration::ZERO).await
}

/// The same app on `addr`, taking `delay` to answer each request.
pub async fn app_at(addr: SocketAddr, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    app_with(addr, delay, 0).await
}

/// The same app, answering its first `fail_first` requests with 503.
pub async fn app_with(
    addr: SocketAddr,
    delay: Duration,
    fail_first: usize,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    let seen = counter.fetch_add(1, Ordering::SeqCst);
                    let h = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let body = format!(
                        "client={} host={} path={} version={:?} dst-port={}",
                        h(CLIENT_ID.as_str()),
                        h("host"),
                        req.uri().path(),
                        req.version(),
                        h(DST_PORT.as_str())
                    );
                    let ws = websocket(&mut req, &body);
                    async move {
                        if let Some(resp) = ws {
                            return Ok(resp);
                        }
                        // Read the whole request before answering, as a real
                        // app does: answering early and closing makes the
                        // kernel reset the connection under the unread body,
                        // which can discard the response before the proxy
                        // reads it.
                        let _ = req.into_body().collect().await;
                        tokio::time::sleep(delay).await;
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        if seen < fail_first {
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                // HTTP/1.1 or HTTP/2 prior knowledge, as the client speaks.
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

pub struct World {
    pub dir: tempfile::TempDir,
    /// `None` once the control plane was killed.
    pub plane: Option<ControlPlane>,
    pub bundles: BundleStore,
    /// The `api` workload's proxy (shop/api, workload api-0, app=api).
    pub proxy: Proxy,
    pub app_port: u16,
    pub app_hits: Arc<AtomicUsize>,
    pub anchors: std::path::PathBuf,
}

pub async fn world(leaf_ttl: Duration) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_util::config(dir.path());
    cfg.leaf_ttl = leaf_ttl;
    let (app_addr, app_hits) = app().await;
    let app_port = app_addr.port();
    // api's HTTP port admits only web.
    std::fs::write(
        cfg.config_dir.join("shop.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\nspec:\n  selector: {{app: api}}\n  ports: [{{port: {app_port}, appProtocol: http}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: {app_port}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web-only, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  identities: [\"{}\"]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: fake, namespace: shop}}\nspec:\n  selector: {{app: fake}}\n  ports: [{{port: {app_port}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: silent, namespace: shop}}\nspec:\n  selector: {{app: silent}}\n  ports: [{{port: {app_port}}}]\n",
            id("web")
        ),
    )
    .unwrap();
    let bundles = test_util::bundles_of(&cfg.ca_dir);
    let anchors = cfg.ca_dir.join("bundle.json");
    let plane = ControlPlane::start(cfg).await.unwrap();
    let spec = Spec {
        sa: "api",
        name: "api-0",
        labels: &[("app", "api")],
        app_ports: vec![AppPort {
            name: "http".into(),
            port: app_port,
        }],
        ip: "127.0.0.1".parse().unwrap(),
    };
    let proxy = start_proxy(&plane, dir.path(), &anchors, spec).await;
    World {
        dir,
        plane: Some(plane),
        bundles,
        proxy,
        app_port,
        app_hits,
        anchors,
    }
}

/// What a test proxy is: `shop/<sa>`, workload `name`, on loopback `ip`.
pub struct Spec<'a> {
    pub sa: &'a str,
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub app_ports: Vec<AppPort>,
    pub ip: std::net::IpAddr,
}

/// Starts a proxy for `spec`, joined with a token, trusting `anchors`.
pub async fn start_proxy(
    plane: &ControlPlane,
    dir: &std::path::Path,
    anchors: &std::path::Path,
    spec: Spec<'_>,
) -> Proxy {
    Proxy::start(proxy_config(plane, dir, anchors, spec))
        .await
        .unwrap()
}

/// The config of a proxy for `spec`, with a fresh join token.
pub fn proxy_config(
    plane: &ControlPlane,
    dir: &std::path::Path,
    anchors: &std::path::Path,
    spec: Spec<'_>,
) -> Config {
    let Spec {
        sa,
        name,
        labels,
        app_ports,
        ip,
    } = spec;
    let token_file = dir.join(format!("{name}.token"));
    // The token grants exactly the workload this proxy registers.
    let claims = mesh_control::store::WorkloadClaims {
        workload: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        addresses: vec![ip],
        ports: Vec::new(),
    };
    let (token, _) = create_token(
        plane.store().as_ref(),
        "shop",
        sa,
        Duration::from_secs(600),
        now().unix_timestamp(),
        Some(claims),
    )
    .unwrap();
    std::fs::write(&token_file, token).unwrap();
    Config {
        cluster: "west".into(),
        trust_domain: TD.parse().unwrap(),
        identity: id(sa),
        namespace: "shop".into(),
        service_account: sa.into(),
        workload: name.into(),
        control_identity_addr: plane.identity_addr.to_string(),
        control_api_addr: plane.api_addr.to_string(),
        control_identity: control_id(),
        trust_anchors: mesh_proxy::TrustAnchors::File(anchors.to_owned()),
        bootstrap: Bootstrap::TokenFile(token_file),
        inbound_addr: SocketAddr::new(ip, 0),
        outbound_addr: SocketAddr::new(ip, 0),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        app_ip: ip,
        app_ports,
        workload_addresses: vec![ip],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        inbound_fail_fast: Duration::from_secs(2),
        detect_timeout: Duration::from_secs(1),
        opaque_ports: Vec::new(),
        connect_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(10),
        max_in_flight: 100_000,
        shutdown_grace: Duration::from_secs(5),
        worker_threads: 1,
        destinations: Default::default(),
        via_gateway: None,
        metrics_addr: None,
    }
}

impl World {
    /// Another proxy in this world (e.g. a caller's).
    pub async fn proxy(&self, sa: &str, name: &str, labels: &[(&str, &str)]) -> Proxy {
        let spec = Spec {
            sa,
            name,
            labels,
            app_ports: Vec::new(),
            ip: "127.0.0.1".parse().unwrap(),
        };
        start_proxy(self.plane(), self.dir.path(), &self.anchors, spec).await
    }

    /// Like [`World::proxy`], with `tune` applied to its config first.
    pub async fn proxy_with(
        &self,
        sa: &str,
        name: &str,
        labels: &[(&str, &str)],
        tune: impl FnOnce(&mut Config),
    ) -> Proxy {
        let spec = Spec {
            sa,
            name,
            labels,
            app_ports: Vec::new(),
            ip: "127.0.0.1".parse().unwrap(),
        };
        let mut config = proxy_config(self.plane(), self.dir.path(), &self.anchors, spec);
        tune(&mut config);
        Proxy::start(config).await.unwrap()
    }

    pub fn plane(&self) -> &ControlPlane {
        self.plane.as_ref().expect("the control plane was killed")
    }

    /// Stops the control plane (as if it crashed).
    pub async fn kill_control_plane(&mut self) {
        if let Some(plane) = self.plane.take() {
            plane.shutdown(Duration::ZERO).await;
        }
    }

    /// Another replica of `api` on loopback address `ip`, with its own app
    /// that takes `delay` per request. Returns the proxy and the app's hits.
    pub async fn api_replica(
        &self,
        ip: &str,
        name: &str,
        delay: Duration,
    ) -> (Proxy, Arc<AtomicUsize>) {
        self.replica(ip, "api", name, "api", delay, 0).await
    }

    /// A workload `shop/<sa>` named `name` with label `app=<app>` on
    /// loopback `ip`, its app on this world's app port answering after
    /// `delay` and failing its first `fail_first` requests with 503.
    pub async fn replica(
        &self,
        ip: &str,
        sa: &str,
        name: &str,
        app: &str,
        delay: Duration,
        fail_first: usize,
    ) -> (Proxy, Arc<AtomicUsize>) {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let (_, hits) = app_with(SocketAddr::new(ip, self.app_port), delay, fail_first).await;
        let ports = vec![AppPort {
            name: "http".into(),
            port: self.app_port,
        }];
        let spec = Spec {
            sa,
            name,
            labels: &[("app", app)],
            app_ports: ports,
            ip,
        };
        let proxy = start_proxy(self.plane(), self.dir.path(), &self.anchors, spec).await;
        (proxy, hits)
    }
    /// An SVID for `shop/<sa>`, joined with a token like any workload.
    pub async fn join(&self, sa: &str) -> Credentials {
        self.join_for(sa, Duration::ZERO).await
    }

    /// [`World::join`], asking for a leaf of `ttl` (zero: the default).
    pub async fn join_for(&self, sa: &str, ttl: Duration) -> Credentials {
        self.join_with(sa, ttl, None).await
    }

    /// [`World::join`] with a token granting `claims` (what the identity
    /// may register), asking for a leaf of `ttl` (zero: the default).
    pub async fn join_with(
        &self,
        sa: &str,
        ttl: Duration,
        claims: Option<mesh_control::store::WorkloadClaims>,
    ) -> Credentials {
        let (token, _) = create_token(
            self.plane().store().as_ref(),
            "shop",
            sa,
            Duration::from_secs(600),
            now().unix_timestamp(),
            claims,
        )
        .unwrap();
        let tls =
            client_config_without_cert(self.bundles.clone(), ExpectedIdentity::Exact(control_id()))
                .unwrap();
        let mut client = IdentityClient::new(
            grpc::channel(&self.plane().identity_addr.to_string(), tls).unwrap(),
        );
        let (key, csr) = new_key_and_csr().unwrap();
        let resp = client
            .certify(CertifyRequest {
                identity: id(sa).to_string(),
                csr,
                token,
                ttl_seconds: ttl.as_secs(),
                ..Default::default()
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
    pub async fn connect(
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

    pub async fn get(&self, creds: &Credentials, forged: Option<&str>) -> (StatusCode, String) {
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

    pub async fn metrics(&self) -> String {
        let mut s = tokio::net::TcpStream::connect(self.proxy.admin_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
