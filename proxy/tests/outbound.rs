//! The outbound side end to end: an app sends plain HTTP/1.1 through its
//! proxy (explicit mode, absolute-form requests as `HTTP_PROXY` makes
//! them); the proxy discovers, balances and reaches the destination's proxy
//! with mTLS.

mod support;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use mesh_core::api::v1::{RegisterRequest, WorkloadPort, registry_client::RegistryClient};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What an unmodified HTTP client does with `HTTP_PROXY` set.
async fn via_proxy(proxy: SocketAddr, url: &str, host: &str) -> (u16, String) {
    let request = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    send_raw(proxy, request.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_crosses_two_proxies_with_mtls_and_identity() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);

    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/via-mesh"),
        &authority,
    )
    .await;
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains(&format!("client={}", id("web"))),
        "the app sees the caller's verified identity: {raw}"
    );
    assert!(
        raw.contains("path=/via-mesh version=HTTP/1.1"),
        "it arrives as the HTTP/1.1 it left as: {raw}"
    );
    assert!(raw.contains(&format!("host={authority}")), "{raw}");
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);

    // A second request reuses the pooled mTLS connection and succeeds too.
    let (status, _) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/again"),
        &authority,
    )
    .await;
    assert_eq!(status, 200);
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains(&format!("mesh_proxy_outbound_requests_total{{authority=\"{authority}\",dst_cluster=\"west\",status_code=\"200\",classification=\"success\",tls=\"mtls\",route=\"default\",dst_identity=\"{}\"}} 2", id("api"))),
        "{m}"
    );
    assert!(
        m.contains(&format!("mesh_proxy_response_latency_seconds_count{{direction=\"outbound\",target=\"{authority}\",route=\"default\",classification=\"success\"}} 2")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destinations_go_straight_through() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    // An app on an address no meshed workload registered.
    let (plain_app, _) = app_at("127.0.0.9:0".parse().unwrap(), Duration::ZERO).await;
    let direct = plain_app.to_string();
    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{direct}/direct"),
        &direct,
    )
    .await;
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains("client=-"),
        "no mesh identity on a plain request: {raw}"
    );
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains(&format!(
            "authority=\"{direct}\",dst_cluster=\"\",status_code=\"200\",classification=\"success\",tls=\"none\""
        )),
        "{m}"
    );

    // A meshed workload's own address is meshed too: never plaintext.
    let meshed = format!("127.0.0.1:{}", w.app_port);
    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{meshed}/by-ip"),
        &meshed,
    )
    .await;
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains(&format!("client={}", id("web"))), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_with_the_wrong_identity_gets_no_bytes() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    // `other` registers a `fake` endpoint that points at api's proxy: the
    // caller expects `other`, api's proxy presents `api`.
    register_as_other(&w, "fake", w.proxy.inbound_addr.port()).await;
    let authority = format!("fake.shop.svc.cluster.local:{}", w.app_port);
    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/x"),
        &authority,
    )
    .await;
    assert_eq!(status, 502, "{raw}");
    assert_eq!(
        w.app_hits.load(Ordering::SeqCst),
        0,
        "nothing reached the app"
    );
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains("mesh_proxy_outbound_failures_total{reason=\"unreachable\"} 1"),
        "{m}"
    );
    // The failure is counted against the destination chosen, with its
    // cluster and mTLS, as a success would be.
    assert!(
        m.contains(&format!("mesh_proxy_outbound_requests_total{{authority=\"{authority}\",dst_cluster=\"west\",status_code=\"502\",classification=\"failure\",tls=\"mtls\",route=\"default\",dst_identity=\"\"}} 1")),
        "{m}"
    );
}

/// A destination discovery said was meshed, then stops knowing (its
/// Service dropped from the configuration, or a control plane answering
/// before it has read it): refused with 503, never sent in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lost_from_discovery_fails_closed() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    let url = format!("http://{authority}/x");
    let (status, raw) = via_proxy(web.outbound_addr, &url, &authority).await;
    assert_eq!(status, 200, "{raw}");
    // The Service disappears from the configuration.
    std::fs::write(
        w.dir.path().join("config/shop.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: fake, namespace: shop}\nspec:\n  selector: {app: fake}\n  ports: [{port: 1}]\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let raw = loop {
        let (status, raw) = via_proxy(web.outbound_addr, &url, &authority).await;
        if status != 200 {
            assert_eq!(status, 503, "{raw}");
            break raw;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Service never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(raw.contains("no longer knows it"), "{raw}");
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains("mesh_proxy_outbound_failures_total{reason=\"no_longer_known\"}"),
        "{m}"
    );
}

/// `other` registers a workload `<app>-0` (label `app=<app>`) on 127.0.0.1
/// whose proxy would listen on `proxy_port`.
async fn register_as_other(w: &World, app: &str, proxy_port: u16) {
    let claims = mesh_control::store::WorkloadClaims {
        workload: format!("{app}-0"),
        labels: [("app".to_owned(), app.to_owned())].into(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        ports: Vec::new(),
    };
    let other = w.join_with("other", Duration::ZERO, Some(claims)).await;
    let tls = mesh_core::identity::tls::client_config(
        mesh_core::identity::CredentialStore::new(other),
        w.bundles.clone(),
        mesh_core::identity::ExpectedIdentity::Exact(control_id()),
    )
    .unwrap();
    let mut registry = RegistryClient::new(
        mesh_core::grpc::channel(&w.plane().api_addr.to_string(), tls).unwrap(),
    );
    registry
        .register(RegisterRequest {
            namespace: "shop".into(),
            name: format!("{app}-0"),
            addresses: vec!["127.0.0.1".into()],
            ports: vec![WorkloadPort {
                name: "http".into(),
                port: u32::from(w.app_port),
                protocol: 0,
            }],
            labels: [("app".to_owned(), app.to_owned())].into(),
            healthy: true,
            proxy_port: u32::from(proxy_port),
            via_gateway: false,
        })
        .await
        .unwrap();
}

/// An endpoint whose proxy port accepts TCP and then says nothing (a hung
/// peer): the request fails with 502 after the connect timeout (1 s in
/// these tests) instead of hanging, and so does an opaque connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_fails_after_the_connect_timeout() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    register_as_other(&w, "silent", silent_port).await;
    let authority = format!("silent.shop.svc.cluster.local:{}", w.app_port);

    let started = std::time::Instant::now();
    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/x"),
        &authority,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 502, "{raw}");
    assert!(raw.contains("timed out after 1s"), "{raw}");
    // One attempt and its retries, each cut off at 1 s, within the
    // outbound fail-fast budget; without the timeout it hangs for minutes.
    assert!(took < Duration::from_secs(8), "took {took:?}");

    let started = std::time::Instant::now();
    let (head, _) = connect_then_get(web.outbound_addr, &authority).await;
    assert!(
        head.starts_with("HTTP/1.1 502"),
        "an opaque connection to a silent endpoint is refused: {head}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_fails_fast_with_503() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("fake.shop.svc.cluster.local:{}", w.app_port);
    let started = std::time::Instant::now();
    let (status, raw) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/x"),
        &authority,
    )
    .await;
    assert_eq!(status, 503, "{raw}");
    assert!(raw.contains("no ready endpoint"), "{raw}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "fail-fast is 3 s"
    );
}

async fn metrics(admin: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_endpoint_gets_a_minority_of_requests() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    // api-0 (127.0.0.1) answers at once; api-1 too; api-2 takes 25 ms.
    let (_fast, fast_hits) = w.api_replica("127.0.0.2", "api-1", Duration::ZERO).await;
    let (_slow, slow_hits) = w
        .api_replica("127.0.0.3", "api-2", Duration::from_millis(25))
        .await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    // Wait until discovery lists all three replicas.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = 150;
    for i in 0..total {
        let (status, raw) = via_proxy(
            web.outbound_addr,
            &format!("http://{authority}/r{i}"),
            &authority,
        )
        .await;
        assert_eq!(status, 200, "{raw}");
    }
    let (a, b, slow) = (
        w.app_hits.load(Ordering::SeqCst),
        fast_hits.load(Ordering::SeqCst),
        slow_hits.load(Ordering::SeqCst),
    );
    eprintln!("requests per endpoint: fast {a}, fast {b}, slow {slow}");
    assert_eq!(a + b + slow, total);
    assert!(slow > 0, "the slow endpoint is still tried");
    assert!(
        slow * 5 < total,
        "the slow endpoint must get a minority: fast {a}/{b}, slow {slow}"
    );
    assert!(slow < a && slow < b, "fast {a}/{b}, slow {slow}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_destinations_keep_working_for_60s_without_the_control_plane() {
    let mut w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    let (status, _) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/before"),
        &authority,
    )
    .await;
    assert_eq!(status, 200);

    w.kill_control_plane().await;
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let (status, raw) = via_proxy(
            web.outbound_addr,
            &format!("http://{authority}/without-cp-{n}"),
            &authority,
        )
        .await;
        assert_eq!(
            status,
            200,
            "after {:?} without the control plane: {raw}",
            started.elapsed()
        );
        assert!(raw.contains(&format!("client={}", id("web"))), "{raw}");
        n += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(n >= 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_success_recovers() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (_ok, _) = w.api_replica("127.0.0.2", "api-1", Duration::ZERO).await;
    // api-2 answers every request with 503. It also answers fastest, so
    // peak-EWMA alone would favour it.
    let (_bad, bad_hits) = w
        .replica(
            "127.0.0.3",
            "api",
            "api-2",
            "api",
            Duration::ZERO,
            usize::MAX,
        )
        .await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Until api-2 has failed five times. Peak-EWMA may hold back an
    // endpoint whose first answer was slow (a cold TLS handshake on a
    // busy machine) for many seconds, so requests go in bursts of eight:
    // queued requests raise the healthy endpoints' cost until api-2 is
    // picked. Every 503 here is api-2's own answer.
    let started = std::time::Instant::now();
    let mut sent = 0;
    while bad_hits.load(Ordering::SeqCst) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "api-2 was picked {} times in {sent} requests over 60 s",
            bad_hits.load(Ordering::SeqCst)
        );
        let burst: Vec<_> = (0..8)
            .map(|i| {
                let url = format!("http://{authority}/warm{sent}-{i}");
                let authority = authority.clone();
                let outbound = web.outbound_addr;
                tokio::spawn(async move { via_proxy(outbound, &url, &authority).await.0 })
            })
            .collect();
        for request in burst {
            let status = request.await.unwrap();
            assert!(status == 200 || status == 503, "{status}");
        }
        sent += 8;
    }
    // Ejected: the next 100 requests succeed, with at most a probe or
    // two reaching api-2.
    let bad_before = bad_hits.load(Ordering::SeqCst);
    let mut late_ok = 0;
    for i in 0..100 {
        let (status, _) = via_proxy(
            web.outbound_addr,
            &format!("http://{authority}/r{i}"),
            &authority,
        )
        .await;
        late_ok += usize::from(status == 200);
    }
    let probes = bad_hits.load(Ordering::SeqCst) - bad_before;
    eprintln!(
        "api-2 failed {bad_before} times in {sent} requests; then {late_ok}/100 ok, {probes} probes"
    );
    assert!(
        late_ok >= 99,
        "success must recover above 99% once the endpoint is ejected ({late_ok}/100)"
    );
    assert!(
        bad_before <= 12,
        "the failing endpoint is ejected after 5 failures: {bad_before} reached it"
    );
    assert!(
        probes <= 2,
        "an ejected endpoint gets probes only: {probes}"
    );
    let m = metrics(web.admin_addr).await;
    assert!(m.contains("mesh_proxy_endpoint_ejections_total"), "{m}");
    assert!(!m.contains("mesh_proxy_endpoint_ejections_total 0"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_whose_every_endpoint_fails_is_answered_503_all_ejected() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    // fake's only endpoint answers every request with 503.
    let (_bad, bad_hits) = w
        .replica(
            "127.0.0.3",
            "api",
            "fake-0",
            "fake",
            Duration::ZERO,
            usize::MAX,
        )
        .await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("fake.shop.svc.cluster.local:{}", w.app_port);
    let url = format!("http://{authority}/x");
    // Five failures eject it; each probe that fails ejects it for twice as
    // long (1 s, 2 s, 4 s), so within a few requests a request waits out
    // the fail-fast time (3 s) with nothing to send to, and is told so.
    let started = std::time::Instant::now();
    let (took, raw) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no all-ejected answer in 60 s; the endpoint got {} requests",
            bad_hits.load(Ordering::SeqCst)
        );
        let sent = std::time::Instant::now();
        let (status, raw) = via_proxy(web.outbound_addr, &url, &authority).await;
        assert_eq!(status, 503, "{raw}");
        if raw.contains("is failing and ejected") {
            break (sent.elapsed(), raw);
        }
    };
    eprintln!(
        "all ejected after {:?}; the endpoint got {} requests; that answer took {took:?}",
        started.elapsed(),
        bad_hits.load(Ordering::SeqCst)
    );
    assert!(
        raw.contains(&authority),
        "the answer names the destination: {raw}"
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "it waits out the fail-fast time (3 s), then answers: {took:?}"
    );
    // Only the five failures and a probe per ejection reached it.
    let hits = bad_hits.load(Ordering::SeqCst);
    assert!(
        (5..=5 + 3).contains(&hits),
        "an ejected endpoint gets probes only: {hits} requests"
    );
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains("mesh_proxy_outbound_failures_total{reason=\"all_ejected\"} 1"),
        "{m}"
    );
    // The rest keeps serving.
    let api = format!("api.shop.svc.cluster.local:{}", w.app_port);
    let (status, raw) = via_proxy(web.outbound_addr, &format!("http://{api}/ok"), &api).await;
    assert_eq!(status, 200, "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_crosses_the_mesh_as_http2() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    // A gRPC-style client: HTTP/2 with prior knowledge, no TLS, to the proxy.
    let tcp = tokio::net::TcpStream::connect(web.outbound_addr)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{authority}/pkg.Service/Method"))
        .header("content-type", "application/grpc")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        body.contains("version=HTTP/2.0"),
        "HTTP/2 end to end: {body}"
    );
    assert!(body.contains(&format!("client={}", id("web"))), "{body}");
    assert!(body.contains("path=/pkg.Service/Method"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_limit_are_shed_with_503() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    // The only `slow` endpoint takes a second per request.
    let (_slow, _) = w
        .replica(
            "127.0.0.2",
            "slow",
            "slow-0",
            "slow",
            Duration::from_secs(1),
            0,
        )
        .await;
    std::fs::write(
        w.dir.path().join("config").join("slow.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: slow, namespace: shop}}\nspec:\n  selector: {{app: slow}}\n  ports: [{{port: {}}}]\n",
            w.app_port
        ),
    )
    .unwrap();
    let web = w
        .proxy_with("web", "web-0", &[("app", "web")], |c| c.max_in_flight = 1)
        .await;
    let authority = format!("slow.shop.svc.cluster.local:{}", w.app_port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, b) = (authority.clone(), authority.clone());
    let first = tokio::spawn(async move {
        via_proxy(web.outbound_addr, &format!("http://{a}/1"), &a)
            .await
            .0
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second, raw) = via_proxy(web.outbound_addr, &format!("http://{b}/2"), &b).await;
    assert_eq!(second, 503, "{raw}");
    assert!(raw.contains("too many requests in flight"), "{raw}");
    assert_eq!(first.await.unwrap(), 200, "the request in flight completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w
        .proxy_with("web", "web-0", &[("app", "web")], |c| {
            c.header_read_timeout = Duration::from_millis(500)
        })
        .await;
    let mut tcp = tokio::net::TcpStream::connect(web.outbound_addr)
        .await
        .unwrap();
    // Headers that never end.
    tcp.write_all(b"GET http://api.shop.svc.cluster.local/ HTTP/1.1\r\nHost: api\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the proxy must close the connection, not wait forever"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

/// Subscribes to `/tap` on an admin port; returns the open stream.
async fn tap(admin: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /tap HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    s
}

/// Reads from a tap until a line contains every one of `want`.
async fn tapped(stream: &mut tokio::net::TcpStream, want: &[&str]) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "tap closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(line) = seen.lines().find(|l| want.iter().all(|w| l.contains(w))) {
                return line.to_owned();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no tap event with {want:?} in: {seen}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_live_request_metadata_on_both_sides() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    let mut out_tap = tap(web.admin_addr).await;
    let mut in_tap = tap(w.proxy.admin_addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = via_proxy(
        web.outbound_addr,
        &format!("http://{authority}/tapped"),
        &authority,
    )
    .await;
    assert_eq!(status, 200);
    let line = tapped(
        &mut out_tap,
        &["\"direction\":\"outbound\"", "\"path\":\"/tapped\""],
    )
    .await;
    assert!(
        line.contains("\"status\":200") && line.contains("\"tls\":\"mtls\""),
        "{line}"
    );
    let line = tapped(
        &mut in_tap,
        &["\"direction\":\"inbound\"", "\"path\":\"/tapped\""],
    )
    .await;
    assert!(
        line.contains(&format!("\"client_id\":\"{}\"", id("web"))),
        "{line}"
    );
}

/// CONNECT through a proxy; returns the tunnel and the proxy's answer.
async fn open_tunnel(proxy: SocketAddr, authority: &str) -> (tokio::net::TcpStream, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (tcp, String::from_utf8_lossy(&head).into_owned())
}

/// CONNECT through a proxy, then one raw HTTP/1.1 request over the tunnel.
async fn connect_then_get(proxy: SocketAddr, authority: &str) -> (String, String) {
    let (mut tcp, head) = open_tunnel(proxy, authority).await;
    tcp.write_all(b"GET /raw HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut rest)).await;
    (head, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_carries_opaque_tcp_to_a_meshed_service_under_its_policy() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);

    let (head, body) = connect_then_get(web.outbound_addr, &authority).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains("client=- host=api path=/raw"),
        "opaque bytes reach the app untouched: {body}"
    );
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);

    // api's port admits only web: `other` gets its connection closed.
    let other = w.proxy("other", "other-0", &[("app", "other")]).await;
    let (_, body) = connect_then_get(other.outbound_addr, &authority).await;
    assert!(
        !body.contains("client="),
        "a refused caller reaches nothing: {body}"
    );
    assert_eq!(w.app_hits.load(Ordering::SeqCst), 1);
    let m = metrics(w.proxy.admin_addr).await;
    assert!(
        m.contains("mesh_proxy_inbound_refused_total{reason=\"unauthorized\"} 1"),
        "{m}"
    );
    let tcp_in = format!(
        "mesh_proxy_tcp_connections_total{{direction=\"inbound\",peer=\"{}\",tls=\"mtls\"}} 1",
        id("web")
    );
    assert!(m.contains(&tcp_in), "{m}");
    let m = metrics(web.admin_addr).await;
    let tcp_out = format!(
        "mesh_proxy_tcp_connections_total{{direction=\"outbound\",peer=\"{authority}\",tls=\"mtls\"}} 1"
    );
    assert!(m.contains(&tcp_out), "{m}");
    assert!(
        m.contains("mesh_proxy_tcp_bytes_total{direction=\"outbound\",tls=\"mtls\",flow=\"sent\"}"),
        "{m}"
    );
}

/// Sends one keep-alive request on an open tunnel and waits for its answer.
async fn ask(tcp: &mut tokio::net::TcpStream) {
    tcp.write_all(b"GET /held HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("path=/held") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer on the tunnel")
            .unwrap();
        assert!(n > 0, "the tunnel closed early");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_goes_to_the_endpoint_with_fewer_open_connections() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (_b, b_hits) = w.api_replica("127.0.0.2", "api-1", Duration::ZERO).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Four held connections; note which replica each reached.
    let mut on_b = Vec::new();
    let mut on_a = Vec::new();
    for _ in 0..4 {
        let before = b_hits.load(Ordering::SeqCst);
        let (mut tcp, head) = open_tunnel(web.outbound_addr, &authority).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        ask(&mut tcp).await;
        if b_hits.load(Ordering::SeqCst) > before {
            on_b.push(tcp);
        } else {
            on_a.push(tcp);
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (2, 2), "spread evenly");
    // Close b's connections: the next two both go to b, which now has
    // none open (taking endpoints in turn would split them).
    drop(on_b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b_hits.load(Ordering::SeqCst);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut tcp, _) = open_tunnel(web.outbound_addr, &authority).await;
        ask(&mut tcp).await;
        held.push(tcp);
    }
    assert_eq!(b_hits.load(Ordering::SeqCst) - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_crosses_two_proxies_with_mtls_and_identity() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("api.shop.svc.cluster.local:{}", w.app_port);
    let mut tcp = tokio::net::TcpStream::connect(web.outbound_addr)
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET http://{authority}/ws HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
             mesh-client-id: spiffe://west.mesh.local/ns/shop/sa/admin\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .expect("an answer to the handshake")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            WS_ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(
        head.contains(&format!("client={}", id("web")).to_ascii_lowercase()),
        "the app saw the verified caller, not the forged one: {head}"
    );
    // One masked text frame out, its echo back: raw bytes both ways.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 5];
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tcp.write_all(&frame).await.unwrap();
    let mut echo = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&echo[..2], &[0x81, 10]);
    assert_eq!(&echo[2..], b"echo hello");

    let m = metrics(web.admin_addr).await;
    let upgraded = format!(
        "mesh_proxy_tcp_connections_total{{direction=\"outbound\",peer=\"{authority}\",tls=\"mtls\"}} 1"
    );
    assert!(m.contains(&upgraded), "{m}");
}

/// The number in `metric{labels} N` of a Prometheus text page, or 0.
fn gauge(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// An app that calls a new address each time would grow a watch, a task
/// and a balancer per address forever. Past the cap a new destination is
/// refused with 503 (known ones keep working); destinations idle for the
/// idle time are forgotten, and their discovery streams on the control
/// plane end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_capped_and_forgotten_when_idle() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w
        .proxy_with("web", "web-0", &[("app", "web")], |c| {
            c.destinations.max = 3;
            c.destinations.idle = Duration::from_secs(1);
        })
        .await;
    let (plain, _) = app_at("127.0.0.9:0".parse().unwrap(), Duration::ZERO).await;
    let streams = || async {
        gauge(
            &metrics(w.plane().admin_addr).await,
            "mesh_control_watch_streams{api=\"discovery\"}",
        )
    };
    let before = streams().await;
    let port = plain.port();
    let call = |authority: String| async move {
        via_proxy(
            web.outbound_addr,
            &format!("http://{authority}/x"),
            &authority,
        )
        .await
    };
    // Three destinations: the app, and two addresses where nothing listens.
    let (status, raw) = call(format!("127.0.0.9:{port}")).await;
    assert_eq!(status, 200, "{raw}");
    for other in ["127.0.0.21", "127.0.0.22"] {
        let (status, raw) = call(format!("{other}:{port}")).await;
        assert_eq!(status, 502, "{raw}");
    }
    let (status, raw) = call(format!("127.0.0.23:{port}")).await;
    assert_eq!(status, 503, "a fourth destination is past the cap: {raw}");
    assert!(raw.contains("MESH_PROXY_MAX_DESTINATIONS"), "{raw}");
    let (status, raw) = call(format!("127.0.0.9:{port}")).await;
    assert_eq!(status, 200, "a known destination keeps working: {raw}");
    assert_eq!(
        streams().await,
        before + 3,
        "one discovery stream per destination"
    );
    let m = metrics(web.admin_addr).await;
    assert!(
        m.contains("mesh_proxy_outbound_failures_total{reason=\"too_many_destinations\"} 1"),
        "{m}"
    );

    // Idle for longer than the idle time: forgotten, streams closed, and a
    // new destination is admitted again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while streams().await > before {
        assert!(
            std::time::Instant::now() < deadline,
            "idle destinations were never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, raw) = call(format!("127.0.0.23:{port}")).await;
    assert_ne!(status, 503, "{raw}");
}

/// An app that answers only once it has read the whole request body, so it
/// sends nothing (and, in delayed-ACK mode, no ACK) while the body is late.
async fn body_reading_app(addr: SocketAddr) -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(format!("got {}", body.len())),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Reads one HTTP/1.1 response with a `content-length` off `tcp`.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

/// A request whose body follows its head a moment later (an upload, a
/// streamed body) reaches a plain destination at once: the proxy's plain
/// connections disable Nagle, as its mTLS ones do, so the body is not held
/// until the destination's delayed ACK (40 ms on Linux) for the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_body_to_a_plain_destination_is_not_held_for_an_ack() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let app = body_reading_app("127.0.0.9:0".parse().unwrap()).await;
    let mut tcp = tokio::net::TcpStream::connect(web.outbound_addr)
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let gap = Duration::from_millis(5);
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = std::time::Instant::now();
        tcp.write_all(
            format!("POST http://{app}/upload HTTP/1.1\r\nHost: {app}\r\nTransfer-Encoding: chunked\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        tokio::time::sleep(gap).await;
        tcp.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
        let response = read_response(&mut tcp).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("got 5"), "{response}");
        // The first exchanges are ACKed at once (quick-ACK mode) either way.
        if i >= 3 {
            slowest = slowest.max(started.elapsed());
        }
    }
    assert!(
        slowest < gap + Duration::from_millis(25),
        "a request took {slowest:?}: its body waited for an ACK"
    );
}
