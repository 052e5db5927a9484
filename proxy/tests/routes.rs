//! HTTPRoutes applied by the client proxy: weighted backends (traffic
//! split), a request timeout (504), and retries of listed status codes.

mod support;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn via_proxy(proxy: SocketAddr, authority: &str, path: &str) -> (u16, String) {
    let request = format!(
        "GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    send_raw(proxy, request.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_timeout_and_retries_follow_the_route() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let p = w.app_port;
    let (_v2, v2_hits) = w
        .replica("127.0.0.2", "api", "api-v2-0", "api-v2", Duration::ZERO, 0)
        .await;
    let (_slow, _) = w
        .replica(
            "127.0.0.3",
            "slow",
            "slow-0",
            "slow",
            Duration::from_secs(2),
            0,
        )
        .await;
    let (_flaky, flaky_hits) = w
        .replica("127.0.0.4", "flaky", "flaky-0", "flaky", Duration::ZERO, 2)
        .await;
    let service = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{port: {p}}}]\n---\n"
        )
    };
    let routes = format!(
        "{}{}{}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api-routes, namespace: shop}}\nspec:\n  parentRefs: [{{name: api, kind: Service, port: {p}}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]\n    timeouts: {{request: 300ms}}\n    backendRefs: [{{name: slow, port: {p}}}]\n  - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]\n    retry: {{attempts: 3, codes: [503], backoff: 10ms}}\n    backendRefs: [{{name: flaky, port: {p}}}]\n  - backendRefs: [{{name: api, port: {p}, weight: 75}}, {{name: api-v2, port: {p}, weight: 25}}]\n",
        service("api-v2"),
        service("slow"),
        service("flaky")
    );
    std::fs::write(w.dir.path().join("config").join("routes.yaml"), routes).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The metrics-only listener Prometheus scrapes from outside the pod.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let web = w
        .proxy_with("web", "web-0", &[("app", "web")], |c| {
            c.metrics_addr = Some(metrics_addr);
        })
        .await;
    let authority = format!("api.shop.svc.cluster.local:{p}");

    // Traffic split: exactly 75/25 over 100 requests.
    for i in 0..100 {
        let (status, raw) = via_proxy(web.outbound_addr, &authority, &format!("/split/{i}")).await;
        assert_eq!(status, 200, "{raw}");
        assert!(
            raw.contains(&format!("host={authority}")),
            "the backend sees the original authority: {raw}"
        );
    }
    assert_eq!(
        (
            w.app_hits.load(Ordering::SeqCst),
            v2_hits.load(Ordering::SeqCst)
        ),
        (75, 25)
    );

    // Request timeout: the 2 s backend is cut at 300 ms with a 504.
    let started = std::time::Instant::now();
    let (status, raw) = via_proxy(web.outbound_addr, &authority, "/slow").await;
    assert_eq!(status, 504, "{raw}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );

    // Retries: two 503s, then success, within the budget.
    let (status, raw) = via_proxy(web.outbound_addr, &authority, "/flaky").await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(flaky_hits.load(Ordering::SeqCst), 3);

    let mut s = tokio::net::TcpStream::connect(web.admin_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).await.unwrap();
    assert!(m.contains("mesh_proxy_outbound_retries_total 2"), "{m}");
    assert!(
        m.contains("mesh_proxy_outbound_failures_total{reason=\"timeout\"} 1"),
        "{m}"
    );
    // Per route and per edge: the rule that matched and who answered (api
    // and api-v2 both run as service account api).
    let api = id("api");
    assert!(
        m.contains(&format!(
            "status_code=\"200\",classification=\"success\",tls=\"mtls\",route=\"shop/api-routes#2\",dst_identity=\"{api}\"}} 100"
        )),
        "{m}"
    );
    assert!(
        m.contains("status_code=\"504\",classification=\"failure\",tls=\"mtls\",route=\"shop/api-routes#0\",dst_identity=\"\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("route=\"shop/api-routes#1\",classification=\"success\"}"),
        "per-route latency: {m}"
    );
    assert!(
        m.contains(&format!(
            "mesh_proxy_identity_info{{cluster=\"west\",namespace=\"shop\",workload=\"web-0\",identity=\"{}\"}} 1",
            id("web")
        )),
        "{m}"
    );
    promtool_accepts(m.split_once("\r\n\r\n").map_or("", |(_, body)| body));

    // The metrics-only listener serves /metrics and nothing else.
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        raw
    };
    let scraped = get("/metrics").await;
    assert!(
        scraped.starts_with("HTTP/1.0 200") || scraped.starts_with("HTTP/1.1 200"),
        "{scraped}"
    );
    assert!(
        scraped.contains("mesh_proxy_outbound_requests_total"),
        "{scraped}"
    );
    for path in ["/tap", "/ready", "/live", "/metrics/../tap"] {
        let raw = get(path).await;
        assert!(raw.contains(" 404 "), "{path}: {raw}");
    }
}

/// `promtool check metrics` (Prometheus' own linter) accepts `text`.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("this test needs promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Retries replay only what was buffered: a body over 64 KiB, or one of
/// unknown length (chunked), is sent once even when the route retries;
/// a small body is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_unknown_length_bodies_are_never_replayed() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let p = w.app_port;
    // Fails its first four requests with 503.
    let (_flaky, hits) = w
        .replica("127.0.0.4", "flaky", "flaky-0", "flaky", Duration::ZERO, 4)
        .await;
    let config = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: flaky, namespace: shop}}\nspec:\n  selector: {{app: flaky}}\n  ports: [{{port: {p}}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: flaky, namespace: shop}}\nspec:\n  parentRefs: [{{name: flaky, kind: Service, port: {p}}}]\n  rules:\n  - retry: {{attempts: 3, codes: [503], backoff: 10ms}}\n    backendRefs: [{{name: flaky, port: {p}}}]\n"
    );
    std::fs::write(w.dir.path().join("config").join("flaky.yaml"), config).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;
    let authority = format!("flaky.shop.svc.cluster.local:{p}");
    let head = |extra: &str| {
        format!(
            "POST http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{extra}\r\n"
        )
    };

    let big = vec![b'x'; 70 * 1024];
    let mut request = head(&format!("Content-Length: {}\r\n", big.len())).into_bytes();
    request.extend_from_slice(&big);
    let (status, raw) = send_raw(web.outbound_addr, &request).await;
    assert_eq!(status, 503, "over 64 KiB: sent once, not retried: {raw}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let mut request = head("Transfer-Encoding: chunked\r\n").into_bytes();
    request.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
    let (status, raw) = send_raw(web.outbound_addr, &request).await;
    assert_eq!(status, 503, "unknown length: sent once: {raw}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    let mut request = head("Content-Length: 5\r\n").into_bytes();
    request.extend_from_slice(b"hello");
    let (status, raw) = send_raw(web.outbound_addr, &request).await;
    assert_eq!(status, 200, "a small body is replayed: {raw}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        5,
        "two more 503s, then success"
    );
}
