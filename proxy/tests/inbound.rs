//! The proxy's inbound side end to end: a real control plane, a real app,
//! the proxy started with a join token, and callers that speak to it as a
//! client proxy does (mTLS, HTTP/2, `mesh-dst-port`).

mod support;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use mesh_core::{
    api::v1::{WatchRequest, discovery_client::DiscoveryClient, discovery_update::Kind},
    grpc,
    identity::{CredentialStore, ExpectedIdentity, tls::client_config},
};
use mesh_proxy::wire::{DST_PORT, ORIG_PROTO};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    assert!(m.contains(&format!("mesh_proxy_inbound_requests_total{{port=\"{}\",status_code=\"200\",classification=\"success\",client_id=\"{}\"}} 1", w.app_port, id("web"))), "{m}");
    assert!(m.contains(&format!("mesh_proxy_response_latency_seconds_count{{direction=\"inbound\",target=\"{}\",route=\"\",classification=\"success\"}} 2", w.app_port)), "the 200 and the 403: {m}");
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
        DiscoveryClient::new(grpc::channel(&w.plane().api_addr.to_string(), tls).unwrap());
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

/// A caller that is not a Mesh proxy (haproxy, say) sends plain HTTP/1.1
/// over mTLS (ALPN `http/1.1`) without `mesh-orig-proto`: the app gets it
/// as HTTP/1.1, with the verified caller, not a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http1_over_mtls_reaches_the_app_as_http1() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let caller = w.join("web").await;
    let mut stream = mtls(&w, &caller, w.proxy.inbound_addr, "api", b"http/1.1").await;
    let port = w.app_port;
    stream
        .write_all(
            format!(
                "GET /plain HTTP/1.1\r\nHost: api.shop.svc.cluster.local:{port}\r\n{DST_PORT}: {port}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("path=/plain version=HTTP/1.1"), "{raw}");
    assert!(raw.contains(&format!("client={}", id("web"))), "{raw}");
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);
}

/// An mTLS connection as `caller` to `addr`, which must be `server`,
/// offering ALPN `alpn`.
async fn mtls(
    w: &World,
    caller: &mesh_core::identity::Credentials,
    addr: std::net::SocketAddr,
    server: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = client_config(
        CredentialStore::new(caller.clone()),
        w.bundles.clone(),
        ExpectedIdentity::Exact(id(server)),
    )
    .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("mesh").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// mTLS + the HTTP/2 client preface to `addr` (expecting `server`); returns
/// the stream and the server's SETTINGS, read off the wire.
async fn raw_h2(
    w: &World,
    addr: std::net::SocketAddr,
    server: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    std::collections::HashMap<u16, u32>,
) {
    let caller = w.join("web").await;
    let mut stream = mtls(w, &caller, addr, server, b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let (kind, payload) = read_frame(&mut stream).await;
    assert_eq!(kind, 4, "first frame is SETTINGS");
    let settings = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    (stream, settings)
}

/// One HTTP/2 frame: (type, payload).
async fn read_frame(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u8, Vec<u8>) {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.unwrap();
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (header[3], payload)
}

/// The HTTP/2 limits the inbound side announces, read off the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_http2_settings_on_the_wire() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (_stream, settings) = raw_h2(&w, w.proxy.inbound_addr, "api").await;
    assert_eq!(
        settings.get(&0x3),
        Some(&200),
        "MAX_CONCURRENT_STREAMS (mesh-internal): {settings:?}"
    );
    assert_eq!(
        settings.get(&0x6),
        Some(&16_384),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}

/// Shutdown drains: every open inbound connection gets GOAWAY, and new
/// connections are no longer accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_on_open_connections() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let other = w
        .proxy_with("other", "other-0", &[("app", "other")], |_| {})
        .await;
    let addr = other.inbound_addr;
    let (mut stream, _) = raw_h2(&w, addr, "other").await;
    let drain = tokio::spawn(other.shutdown(Duration::from_secs(2)));
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (kind, _) = read_frame(&mut stream).await;
            if kind == 7 {
                return;
            }
        }
    })
    .await;
    assert!(goaway.is_ok(), "no GOAWAY within 5 s of shutdown");
    drain.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_clusters_caller_is_verified_with_its_own_bundle() {
    use mesh_core::identity::{
        CertificateAuthority, Credentials, RootCa, SpiffeId, TrustBundle,
        ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
        cert::now,
        csr::new_key_and_csr,
    };
    let w = world(Duration::from_secs(24 * 3600)).await;
    // East's own CA, and a workload identity it issues.
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
    let east_ca = CertificateAuthority::generate(
        "east.mesh.local".parse().unwrap(),
        &root,
        DEFAULT_ISSUER_TTL,
        now(),
    )
    .unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let east_id: SpiffeId = "spiffe://east.mesh.local/ns/shop/sa/web".parse().unwrap();
    let issued = east_ca
        .sign_csr(&csr, &east_id, Duration::from_secs(3600))
        .unwrap();
    let east = Credentials::new(issued.chain, key).unwrap();

    // Not linked: refused in the handshake.
    let refused = match w.connect(&east, id("api")).await {
        Err(_) => true,
        Ok(mut send) => send
            .send_request(Request::get("http://api/").body(Empty::new()).unwrap())
            .await
            .is_err(),
    };
    assert!(refused, "an unlinked trust domain must not get through");

    // Link east: the control plane streams its bundle to the proxy.
    let mut bundle = TrustBundle::new("east.mesh.local".parse().unwrap());
    bundle.add_root(root.cert().clone()).unwrap();
    let json = bundle.to_spiffe_json().unwrap().replace('\n', "");
    std::fs::write(
        w.dir.path().join("config/link-east.yaml"),
        format!(
            "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata: {{name: east, namespace: mesh-system}}\nspec:\n  clusterName: east\n  trustDomain: east.mesh.local\n  gatewayAddresses: [\"127.0.0.1:4143\"]\n  gatewayIdentity: spiffe://east.mesh.local/ns/mesh-system/sa/gateway\n  trustBundle: '{json}'\n"
        ),
    )
    .unwrap();
    // Verified now, and authorized by the port's policy (which admits only
    // west's web): 403 naming east's verified identity.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut send) = w.connect(&east, id("api")).await {
            let req = Request::get(format!("http://api/{}", "hello"))
                .header(DST_PORT, w.app_port.to_string())
                .body(Empty::new())
                .unwrap();
            if let Ok(resp) = send.send_request(req).await {
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                let m = w.metrics().await;
                assert!(
                    m.contains(&format!("client_id=\"{east_id}\"")),
                    "east's identity was verified and counted: {m}"
                );
                // No exported Service targets the port: a linked cluster's
                // caller is refused for that before any authorization.
                assert!(
                    m.contains("mesh_proxy_inbound_refused_total{reason=\"not_exported\"} 1"),
                    "{m}"
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the link never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An authorized caller names ports it was never given: the proxy's own
/// outbound (requests would leave with api's identity), admin (`/tap`) and
/// inbound ports, and an app-side port the workload does not declare.
/// Each is refused with its reason, and nothing connects to that port,
/// over HTTP/2 and over opaque TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_reach_declared_app_ports_only_never_the_proxys_own() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.join("web").await;
    // Something listening on an undeclared port of the app's address: it
    // must never be connected to.
    let undeclared = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let undeclared_port = undeclared.local_addr().unwrap().port();
    let own = [
        (w.proxy.outbound_addr.port(), "proxy_port"),
        (w.proxy.admin_addr.port(), "proxy_port"),
        (w.proxy.inbound_addr.port(), "proxy_port"),
        (undeclared_port, "undeclared_port"),
    ];
    for (port, reason) in own {
        let mut send = w.connect(&web, id("api")).await.unwrap();
        let req = Request::get("http://api.shop.svc.cluster.local/metrics")
            .header(DST_PORT, port.to_string())
            .header(ORIG_PROTO, "HTTP/1.1")
            .body(Empty::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::FORBIDDEN,
            "port {port} ({reason})"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            !String::from_utf8_lossy(&body).contains("mesh_proxy_"),
            "the admin port's answer leaked"
        );
    }
    // Opaque TCP: the 2-byte port preface names an undeclared port.
    let mut tls = client_config(
        CredentialStore::new(web.clone()),
        w.bundles.clone(),
        ExpectedIdentity::Exact(id("api")),
    )
    .unwrap();
    tls.alpn_protocols = vec![mesh_proxy::wire::ALPN_TCP.to_vec()];
    for port in [undeclared_port, w.proxy.admin_addr.port()] {
        let tcp = tokio::net::TcpStream::connect(w.proxy.inbound_addr)
            .await
            .unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls.clone()))
            .connect(
                rustls::pki_types::ServerName::try_from("api.shop").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        stream.write_all(&port.to_be_bytes()).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "port {port} answered through opaque TCP");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), undeclared.accept()).await;
    assert!(accepted.is_err(), "the undeclared port was connected to");

    let m = w.metrics().await;
    assert!(
        m.contains("mesh_proxy_inbound_refused_total{reason=\"proxy_port\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("mesh_proxy_inbound_refused_total{reason=\"undeclared_port\"} 2"),
        "{m}"
    );
    assert!(
        !m.contains(&format!("port=\"{undeclared_port}\"")),
        "a refused port makes no metric label: {m}"
    );
}

/// An app that echoes raw bytes; a connection that opens with an HTTP/1.1
/// request is answered `101` first, then echoed (an upgraded protocol that
/// never ends by itself).
async fn echo_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 3];
                if tcp.peek(&mut first).await.is_ok() && &first == b"GET" {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if tcp.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n";
                    if tcp.write_all(switched).await.is_err() {
                        return;
                    }
                }
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// An HTTP/1.1 app whose responses never end (a long stream).
async fn endless_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let never = tokio_stream::pending::<
                        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                    >();
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::StreamBody::new(never),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    port
}

/// Writes `ping` and expects it back within 5 s.
async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

/// A caller whose certificate expires in 5 s holds three long-lived
/// connections: an HTTP/2 request that never ends, opaque TCP and an
/// upgraded connection. None carries traffic past the peer's expiry plus
/// 60 s (plus the 10 s GOAWAY grace for HTTP/2), and each still works just
/// before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_outlives_the_peer_certificate() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let echo = echo_app().await;
    let endless = endless_app().await;
    let db = start_proxy(
        w.plane(),
        w.dir.path(),
        &w.anchors,
        Spec {
            sa: "db",
            name: "db-0",
            labels: &[("app", "db")],
            app_ports: vec![
                mesh_proxy::env::AppPort {
                    name: "tcp".into(),
                    port: echo,
                },
                mesh_proxy::env::AppPort {
                    name: "http".into(),
                    port: endless,
                },
            ],
            ip: "127.0.0.1".parse().unwrap(),
        },
    )
    .await;
    let web = w.join_for("web", Duration::from_secs(5)).await;
    let started = Instant::now();
    let dial = |alpn: &'static [u8]| mtls(&w, &web, db.inbound_addr, "db", alpn);

    // Opaque TCP.
    let mut opaque = dial(mesh_proxy::wire::ALPN_TCP).await;
    opaque.write_all(&echo.to_be_bytes()).await.unwrap();
    assert!(echoes(&mut opaque).await);
    // An upgraded connection.
    let mut upgraded = dial(mesh_proxy::upgrade::ALPN_HTTP1).await;
    upgraded
        .write_all(
            format!(
                "GET http://db.shop.svc.cluster.local:{echo}/ HTTP/1.1\r\nHost: db.shop.svc.cluster.local:{echo}\r\n{DST_PORT}: {echo}\r\n{ORIG_PROTO}: HTTP/1.1\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        upgraded.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert!(echoes(&mut upgraded).await);
    // HTTP/2: a request whose body never ends keeps its stream open.
    let h2 = dial(mesh_proxy::wire::ALPN_H2).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    let h2_conn = tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(format!("http://db.shop.svc.cluster.local:{endless}/"))
                .header(DST_PORT, endless.to_string())
                .header(ORIG_PROTO, "HTTP/1.1")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Its body never ends: the stream stays open until the proxy cuts it.
    let held = tokio::spawn(resp.into_body().collect());

    // Just before the deadline (5 s + 60 s), the raw connections still work.
    tokio::time::sleep_until((started + Duration::from_secs(58)).into()).await;
    assert!(echoes(&mut opaque).await, "opaque TCP closed too early");
    assert!(echoes(&mut upgraded).await, "the upgrade closed too early");
    assert!(!held.is_finished() && !h2_conn.is_finished());

    // Past it, they are closed.
    tokio::time::sleep_until((started + Duration::from_secs(68)).into()).await;
    assert!(
        !echoes(&mut opaque).await,
        "opaque TCP outlived the peer certificate"
    );
    assert!(
        !echoes(&mut upgraded).await,
        "the upgrade outlived the peer certificate"
    );
    // HTTP/2 got GOAWAY at the deadline; the held stream is cut after the grace.
    let closed = tokio::time::timeout(Duration::from_secs(15), h2_conn).await;
    assert!(
        closed.is_ok(),
        "HTTP/2 outlived the peer certificate and the grace"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5 + 60 + 10 + 5),
        "{:?}",
        started.elapsed()
    );
}

/// Once start-up has settled, the proxy drops the resident pages of its code
/// (this test binary's, here), and says how much it covered in a metric
/// (ARCHITECTURE.md, "Code that ran only to start is not kept resident").
#[tokio::test]
async fn the_code_that_ran_only_to_start_is_released_once_settled() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let released = || async {
        w.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("mesh_proxy_startup_code_released_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("the startup_code_released_bytes gauge")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while released().await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "nothing released 10 s after ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let code = mesh_core::code_pages::Code::of_this_process().unwrap();
    assert_eq!(released().await, code.len() as f64);
    // And the proxy still serves, from code paged back in.
    let caller = w.join("web").await;
    let _conn = mtls(&w, &caller, w.proxy.inbound_addr, "api", b"h2").await;
}

/// The allocator's releases the proxy asked for, from its metrics.
async fn memory_releases(w: &World) -> f64 {
    w.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("mesh_proxy_memory_releases_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Once a burst of connections has closed, the proxy asks the allocator to
/// give the freed memory back, once. Connections opening, staying open, or
/// a few closing are not a burst (ARCHITECTURE.md, "Memory after a burst").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_given_back_once_a_burst_of_connections_closed() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let caller = w.join("web").await;
    let open = |n: usize| {
        let (w, caller) = (&w, &caller);
        async move {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(mtls(w, caller, w.proxy.inbound_addr, "api", b"h2").await);
            }
            conns
        }
    };
    // The release check runs once a second: wait past two of them.
    let checks = Duration::from_millis(2500);

    let few = open(10).await;
    drop(few);
    tokio::time::sleep(checks).await;
    assert_eq!(memory_releases(&w).await, 0.0, "10 closed: not a burst");

    let burst = open(150).await;
    tokio::time::sleep(checks).await;
    assert_eq!(
        memory_releases(&w).await,
        0.0,
        "150 open: nothing to give back"
    );

    drop(burst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while memory_releases(&w).await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "no release 10 s after 150 closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(checks).await;
    assert_eq!(memory_releases(&w).await, 1.0, "one release per burst");
}
