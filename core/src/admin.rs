//! The admin HTTP server every Mesh component runs: `/metrics` (Prometheus
//! text), `/ready`, `/live`. It binds to loopback only, and has no endpoint
//! that changes state.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{net::TcpListener, sync::broadcast};
use tokio_stream::{StreamExt, wrappers::BroadcastStream};

type Body = BoxBody<Bytes, Infallible>;

/// Where `/tap` subscribers get live events (one JSON line each).
pub type Tap = broadcast::Sender<Bytes>;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "admin address {0} is not a loopback address; admin endpoints bind to loopback only (use 127.0.0.1)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Readiness: not ready until [`Readiness::set_ready`], with a reason shown
/// by `/ready` meanwhile.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<Mutex<Result<(), String>>>);

impl Readiness {
    pub fn new(initial_reason: &str) -> Self {
        Self(Arc::new(Mutex::new(Err(initial_reason.to_owned()))))
    }

    pub fn set_ready(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Err(reason.into());
    }

    pub fn state(&self) -> Result<(), String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Binds the admin listener, refusing anything but loopback.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, readiness: Readiness) {
    serve_with_tap(listener, registry, readiness, None).await;
}

/// [`serve`], plus `/tap` streaming the events sent on `tap`.
pub async fn serve_with_tap(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    tap: Option<Tap>,
) {
    serve_http(listener, move |req| {
        let response = match (req.uri().path(), &tap) {
            ("/tap", Some(tap)) if req.method() == Method::GET => tap_stream(tap),
            _ => route(&req, &registry, &readiness).map(|b| b.boxed()),
        };
        async move { response }
    })
    .await;
}

/// Serves HTTP/1.1 on `listener` until the task is dropped, answering each
/// request with `handle`: the loop every admin-style listener shares.
pub async fn serve_http<F, Fut, B>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds a metrics-only listener, which may be on any address: it serves
/// `GET /metrics` and nothing else (no `/tap`, no readiness), so Prometheus
/// can scrape a pod from outside its loopback without reaching the admin
/// endpoints.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves `GET /metrics` only on `listener` until the task is dropped.
pub async fn serve_metrics_only(listener: TcpListener, registry: Arc<Registry>) {
    serve_http(listener, move |req: Request<Incoming>| {
        let response = match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => metrics(&registry),
            _ => text(
                StatusCode::NOT_FOUND,
                "this listener serves GET /metrics only\n".into(),
            ),
        };
        async move { response }
    })
    .await;
}

fn route(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => metrics(registry),
        "/ready" => match readiness.state() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/live" => text(StatusCode::OK, "live\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready or /live\n".into(),
        ),
    }
}

/// `/tap`: every event from now on, one JSON line each. A subscriber that
/// falls behind skips events rather than slowing the proxy.
fn tap_stream(tap: &Tap) -> Response<Body> {
    let lines = BroadcastStream::new(tap.subscribe())
        .filter_map(|event| event.ok())
        .map(|line| Ok::<_, Infallible>(hyper::body::Frame::data(line)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(lines)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Registers `metric` under `name` with `help`, and returns it for use.
pub fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// Renders `registry` in the Prometheus text format (version 0.0.4), which
/// every scraper and `promtool check metrics` read.
///
/// prometheus-client writes OpenMetrics, which differs in three ways: an
/// `# EOF` marker, `# UNIT` lines, and counter families named without the
/// `_total` their samples carry. Those are converted here.
pub fn render_metrics(registry: &Registry) -> String {
    let mut open_metrics = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut open_metrics, registry);
    let lines: Vec<&str> = open_metrics
        .lines()
        .filter(|l| *l != "# EOF" && !l.starts_with("# UNIT "))
        .collect();
    let counters: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in lines {
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, render_metrics(registry));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
