//! Inbound: meshed traffic from other proxies to this workload's app.
//!
//! `accept -> tls -> authorize -> route -> forward`:
//! - **accept**: TCP on the inbound port; only taken once the proxy holds an
//!   identity (the listener is bound after bootstrap).
//! - **tls**: TLS 1.3, client certificate required and verified against the
//!   trust bundles; plaintext never gets further. ALPN `h2` for requests,
//!   `mesh-tcp/1` for opaque TCP, `http/1.1` for one HTTP/1.1 upgrade
//!   (WebSocket; `upgrade.rs`).
//! - **authorize**: the port's policy from the control plane against the
//!   verified SPIFFE ID; 403 when it does not admit the caller.
//! - **route**: the app port comes from the `mesh-dst-port` header the
//!   client proxy sets; `mesh-orig-proto: HTTP/1.1` marks a request the
//!   client proxy carried over HTTP/2 and that goes to the app as HTTP/1.1.
//! - **forward**: `mesh-client-id` is set to the verified caller (any value
//!   the caller sent is replaced), and the request goes to the app.

pub mod app;
pub mod policy;
pub mod rewrite;

use std::{collections::BTreeMap, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::{
    identity::{SpiffeId, TrustDomain, tls::peer_leaf},
    memory::Connections,
};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use self::{
    app::{AppDial, Http1Pool},
    policy::{Denied, PolicyCache, Ports, authorize},
};
use crate::{
    h2_client::H2Endpoint,
    hold::HoldFirstFlush,
    metrics::{InboundMemo, Metrics, ReasonLabels},
    wire::{ALPN_H2, ALPN_TCP, Body, MAX_HEADER_LIST, MESH_MAX_CONCURRENT_STREAMS},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the inbound side needs to serve.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub policies: PolicyCache,
    /// Requests being served; none past the limit (shed with 503).
    in_flight: Arc<tokio::sync::Semaphore>,
    pub app_ip: std::net::IpAddr,
    /// The ports callers may name.
    pub ports: Ports,
    /// Callers of other trust domains reach exported ports only.
    pub trust_domain: TrustDomain,
    pub fail_fast: Duration,
    /// How long connections have to finish after GOAWAY at shutdown before
    /// they are closed regardless (`MESH_PROXY_SHUTDOWN_GRACE`).
    pub drain_grace: Duration,
    pub metrics: Metrics,
    /// HTTP/1.1 to each app port: made once, as the ports are fixed.
    http1: Arc<BTreeMap<u16, Http1Pool<Incoming>>>,
    /// HTTP/2 to each app port.
    http2: Arc<BTreeMap<u16, H2Endpoint<AppDial>>>,
}

impl Inbound {
    pub fn new(
        policies: PolicyCache,
        (app_ip, ports): (std::net::IpAddr, Ports),
        trust_domain: TrustDomain,
        fail_fast: Duration,
        max_in_flight: usize,
        metrics: Metrics,
    ) -> Self {
        let app = |port| SocketAddr::new(app_ip, port);
        let http1 = ports
            .app
            .iter()
            .map(|&port| (port, Http1Pool::new(app(port))))
            .collect();
        let http2 = ports
            .app
            .iter()
            .map(|&port| (port, app::http2(app(port))))
            .collect();
        Self {
            policies,
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            app_ip,
            ports,
            trust_domain,
            fail_fast,
            drain_grace: Duration::from_secs(120),
            metrics,
            http1: Arc::new(http1),
            http2: Arc::new(http2),
        }
    }
}

/// accept: serves the inbound listener until the task is dropped.
/// The longest any connection lives (DESIGN.md section 6).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long past the peer certificate's expiry a connection may stay.
const PAST_PEER_EXPIRY: Duration = Duration::from_secs(60);
/// How long an HTTP/2 connection that reached its maximum age has, after
/// GOAWAY, to finish its streams before it is closed regardless.
pub const AGE_GRACE: Duration = Duration::from_secs(10);

/// How long a connection from a peer whose leaf expires at `not_after` may
/// live from `now`: min(not_after + 60 s, 24 h). A connection never
/// outlives its peer's identity by more than a minute.
pub fn max_connection_age(not_after: time::OffsetDateTime, now: time::OffsetDateTime) -> Duration {
    let left: time::Duration = not_after - now;
    let left = left.max(time::Duration::ZERO).unsigned_abs() + PAST_PEER_EXPIRY;
    left.min(MAX_CONNECTION_AGE)
}

/// accept: serves the inbound listener until `draining` turns true; then
/// stops accepting and sends GOAWAY on every open connection. Each open
/// connection is held in `open`, so the caller can wait for them.
pub async fn accept(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    inbound: Arc<Inbound>,
    draining: watch::Receiver<bool>,
    open: Connections,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut stop = draining.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|d| *d).await; } => return,
        };
        // Nagle is off: inherited from the listener (`proxy::listen`).
        let (acceptor, inbound, draining) = (acceptor.clone(), inbound.clone(), draining.clone());
        let held = open.hold();
        tokio::spawn(async move {
            let _held = held;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refused_handshake(&inbound.metrics, peer, &e),
                Err(_) => {
                    return refused_handshake(
                        &inbound.metrics,
                        peer,
                        &std::io::Error::from(std::io::ErrorKind::TimedOut),
                    );
                }
            };
            // The TLS config requires and verifies a client certificate.
            let Some((client_id, not_after)) = peer_leaf(tls.get_ref().1) else {
                return;
            };
            // No connection of any kind outlives its peer's identity by
            // more than a minute (and none lives over 24 h).
            let age = max_connection_age(not_after, mesh_core::identity::cert::now());
            let deadline = tokio::time::Instant::now() + age;
            if tls.get_ref().1.alpn_protocol() == Some(ALPN_TCP) {
                return opaque(&inbound, tls, &client_id, peer, deadline).await;
            }
            let drain_grace = inbound.drain_grace;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            // This connection's last metric labels and counters.
            let memo = Arc::new(InboundMemo::default());
            // Shared by the connection's requests: a count, not a copy, each.
            let caller = Arc::new(rewrite::Caller::new(client_id));
            // The request is boxed and passed down as a pointer: a future
            // keeps a slot for each value it was given beside the inner
            // future that holds it too (`h2_client::H2Endpoint::send`).
            let serve = move |req| {
                let shared = (inbound.clone(), caller.clone(), memo.clone());
                answer(shared, deadline, Box::new(req))
            };
            let ends = Ends {
                peer,
                draining,
                deadline,
                drain_grace,
            };
            if h2 {
                // ALPN h2 settles the protocol: no sniffing of the preface,
                // and the server's SETTINGS leave with their acknowledgement
                // in one write (`hold`).
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .max_concurrent_streams(MESH_MAX_CONCURRENT_STREAMS)
                    .max_header_list_size(MAX_HEADER_LIST);
                let io = TokioIo::new(HoldFirstFlush::new(tls));
                // Boxed: hyper runs each stream in a task of its own, whose
                // future is moved whole several times (into the task, at
                // each change of its stage and of hyper's stream state);
                // boxed, each move is a pointer's, for one allocation.
                let conn =
                    builder.serve_connection(io, service_fn(move |req| Box::pin(serve(req))));
                serve_until_drained(conn, |c| c.graceful_shutdown(), ends).await;
            } else {
                // HTTP/1.1 (ALPN http/1.1): a connection carrying one
                // upgrade, or a plain HTTP/1.1 caller.
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .max_buf_size(MAX_HEADER_LIST as usize);
                builder
                    .http2()
                    .max_concurrent_streams(MESH_MAX_CONCURRENT_STREAMS)
                    .max_header_list_size(MAX_HEADER_LIST);
                // Boxed, so an idle connection does not hold room for the
                // request's future.
                let svc = service_fn(move |req| Box::pin(serve(req)));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                serve_until_drained(conn, |c| c.graceful_shutdown(), ends).await;
            }
        });
    }
}

/// What ends a served connection other than its peer: the proxy draining,
/// or the connection's maximum age.
struct Ends {
    peer: SocketAddr,
    draining: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
    drain_grace: Duration,
}

/// Serves `conn` until it ends, or until draining or its maximum age: then
/// GOAWAY first (`graceful_shutdown`), and streams still open after the
/// grace are cut.
async fn serve_until_drained<C, E>(conn: C, graceful_shutdown: fn(Pin<&mut C>), ends: Ends)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Ends {
        peer,
        mut draining,
        deadline,
        drain_grace,
    } = ends;
    tokio::pin!(conn);
    let (why, grace) = tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "inbound connection ended");
            }
            return;
        }
        () = async { let _ = draining.wait_for(|d| *d).await; } => ("shutting down", drain_grace),
        () = tokio::time::sleep_until(deadline) => ("the connection reached its maximum age", AGE_GRACE),
    };
    tracing::debug!(%peer, "{why}; draining");
    graceful_shutdown(conn.as_mut());
    match tokio::time::timeout(grace, conn.as_mut()).await {
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "inbound connection ended"),
        Ok(Ok(())) => {}
        Err(_) => {
            tracing::debug!(%peer, "{why}; streams still open after {grace:?} are closed")
        }
    }
}

/// Opaque TCP from another proxy: read the app port, authorize the
/// verified caller for it (refused: the connection is closed, nothing
/// reaches the app), then splice bytes to the app.
async fn opaque(
    inbound: &Inbound,
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    client_id: &SpiffeId,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) {
    use tokio::io::AsyncReadExt;
    let mut port = [0u8; 2];
    let Ok(Ok(_)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.read_exact(&mut port)).await else {
        inbound.metrics.refuse_inbound("no_dst_port");
        return;
    };
    let port = u16::from_be_bytes(port);
    let checked = match inbound.ports.check(port) {
        Ok(()) => authorize_request(inbound, client_id, port).await,
        Err(denied) => Err(denied),
    };
    if let Err(denied) = checked {
        inbound.metrics.refuse_inbound(denied.reason());
        tracing::info!(client = %client_id, %peer, port, reason = denied.reason(), "inbound TCP connection refused");
        return;
    }
    match tokio::net::TcpStream::connect(SocketAddr::new(inbound.app_ip, port)).await {
        Ok(mut app) => {
            inbound
                .metrics
                .splice_until(
                    &mut tls,
                    &mut app,
                    ("inbound", client_id.as_str(), "mtls"),
                    Some(deadline),
                )
                .await;
        }
        Err(e) => {
            inbound.metrics.refuse_inbound("app_unreachable");
            tracing::warn!(port, error = %e, "the app did not accept the TCP connection");
        }
    }
}

fn refused_handshake(metrics: &Metrics, peer: SocketAddr, e: &std::io::Error) {
    let reason = mesh_core::identity::tls::refusal_reason(e);
    metrics
        .tls_refused
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .inc();
    tracing::info!(%peer, reason, "inbound TLS refused: {e}");
}

/// [`handle`], as hyper's service answers.
async fn answer(
    (inbound, caller, memo): (Arc<Inbound>, Arc<rewrite::Caller>, Arc<InboundMemo>),
    deadline: tokio::time::Instant,
    req: Box<Request<Incoming>>,
) -> Result<Response<Body>, std::convert::Infallible> {
    Ok(handle(&inbound, (&caller, &memo), deadline, req).await)
}

/// One request: authorize -> route -> forward.
async fn handle(
    inbound: &Inbound,
    (caller, memo): (&rewrite::Caller, &InboundMemo),
    deadline: tokio::time::Instant,
    mut req: Box<Request<Incoming>>,
) -> Response<Body> {
    let client_id = &caller.id;
    let started = std::time::Instant::now();
    // Only what `/tap` needs, and only while someone taps.
    let tapped = (inbound.metrics.tap.receiver_count() > 0)
        .then(|| (req.method().to_string(), req.uri().path().to_owned()));
    let Ok(_permit) = inbound.in_flight.clone().try_acquire_owned() else {
        inbound.metrics.refuse_inbound("overloaded");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh: too many requests in flight; retry later\n",
        );
    };
    let Ok(port) = rewrite::dst_port(req.headers_mut()) else {
        inbound.metrics.refuse_inbound("no_dst_port");
        return text(
            StatusCode::BAD_REQUEST,
            "mesh: the request has no valid mesh-dst-port header\n",
        );
    };
    // A port the workload does not declare gets neither a policy watch
    // nor a metric label: refused before either exists.
    if let Err(denied) = inbound.ports.check(port) {
        inbound.metrics.refuse_inbound(denied.reason());
        tracing::info!(client = %client_id, port, reason = denied.reason(), "inbound request refused");
        return refusal(&denied, client_id, port);
    }
    let response = match authorize_request(inbound, client_id, port).await {
        Err(denied) => {
            inbound.metrics.refuse_inbound(denied.reason());
            tracing::info!(client = %client_id, port, reason = denied.reason(), "inbound request refused");
            refusal(&denied, client_id, port)
        }
        Ok(()) => forward(inbound, caller, (port, deadline), req).await,
    };
    inbound.metrics.inbound_response(
        memo,
        (port, client_id.as_str()),
        response.status(),
        started.elapsed(),
    );
    if let Some((method, path)) = tapped {
        inbound.metrics.tap(|| {
            serde_json::json!({
                "direction": "inbound",
                "port": port,
                "client_id": client_id.as_str(),
                "method": method,
                "path": path,
                "status": response.status().as_u16(),
                "latency_us": started.elapsed().as_micros() as u64,
            })
        });
    }
    response
}

/// The answer to a refused request: 503 while the policy is not known,
/// 403 otherwise, saying what was refused.
fn refusal(denied: &Denied, client_id: &SpiffeId, port: u16) -> Response<Body> {
    let (status, why) = match denied {
        Denied::NoPolicy => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no policy for port {port} from the control plane yet"),
        ),
        Denied::Unauthorized => (
            StatusCode::FORBIDDEN,
            format!("{client_id} is not authorized for port {port}"),
        ),
        Denied::NotExported => (
            StatusCode::FORBIDDEN,
            format!(
                "port {port} is not exported to trust domain {}",
                client_id.trust_domain_str()
            ),
        ),
        Denied::UndeclaredPort => (
            StatusCode::FORBIDDEN,
            format!("port {port} is not an app port of this workload"),
        ),
        Denied::ProxyPort => (
            StatusCode::FORBIDDEN,
            format!("port {port} is the proxy's own"),
        ),
    };
    text(status, &format!("mesh: {why}\n"))
}

/// authorize: the port's policy must admit the verified caller.
async fn authorize_request(
    inbound: &Inbound,
    client_id: &SpiffeId,
    port: u16,
) -> Result<(), Denied> {
    let policy = inbound
        .policies
        .get(port, inbound.fail_fast)
        .await
        .ok_or(Denied::NoPolicy)?;
    authorize(&policy, client_id, &inbound.trust_domain)
}

/// route + forward: to the app, as the protocol the caller's app spoke.
async fn forward(
    inbound: &Inbound,
    caller: &rewrite::Caller,
    (port, deadline): (u16, tokio::time::Instant),
    req: Box<Request<Incoming>>,
) -> Response<Body> {
    let (mut parts, body) = (*req).into_parts();
    let Ok(was_http1) = rewrite::for_app(&mut parts, caller, SocketAddr::new(inbound.app_ip, port))
    else {
        return text(StatusCode::BAD_REQUEST, "mesh: invalid request path\n");
    };
    let req = Request::from_parts(parts, body);
    if was_http1 && crate::upgrade::is_upgrade(&req) {
        // Boxed: rare, and 2.3 KiB of future every request would carry.
        return Box::pin(forward_upgrade(inbound, &caller.id, (port, deadline), req)).await;
    }
    let answered = if was_http1 {
        match inbound.http1.get(&port) {
            Some(app) => app.send(req).await.map_err(|e| e.to_string()),
            // `handle` checked the port is declared, and each declared
            // port has its pool.
            None => Err(format!("port {port} is not an app port")),
        }
    } else {
        match inbound.http2.get(&port) {
            Some(app) => app
                .clone()
                .send(req.map(crate::wire::boxed))
                .await
                .map_err(|e| e.to_string()),
            None => Err(format!("port {port} is not an app port")),
        }
    };
    match answered {
        Ok(resp) => resp,
        Err(e) => {
            inbound.metrics.refuse_inbound("app_unreachable");
            tracing::warn!(port, error = %e, "the app did not answer");
            text(
                StatusCode::BAD_GATEWAY,
                &format!("mesh: the app on port {port} did not answer\n"),
            )
        }
    }
}

/// forward, for an HTTP/1.1 upgrade: a new connection to the app; on 101
/// it is spliced to the caller's.
async fn forward_upgrade(
    inbound: &Inbound,
    client_id: &SpiffeId,
    (port, deadline): (u16, tokio::time::Instant),
    mut req: Request<Incoming>,
) -> Response<Body> {
    // The rewrite gave it the origin form and its Host.
    let asked = hyper::upgrade::on(&mut req);
    let splice = crate::upgrade::Splice {
        metrics: inbound.metrics.clone(),
        direction: "inbound",
        peer: client_id.as_str().to_owned(),
        tls: "mtls",
        // The upgraded connection is cut at the same maximum age.
        until: Some(deadline),
    };
    let sent = match tokio::net::TcpStream::connect(SocketAddr::new(inbound.app_ip, port)).await {
        Ok(app) => crate::upgrade::send(app, req, asked, splice)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match sent {
        Ok(resp) => resp.map(crate::wire::boxed),
        Err(e) => {
            inbound.metrics.refuse_inbound("app_unreachable");
            tracing::warn!(port, error = %e, "the app did not answer the upgrade");
            text(
                StatusCode::BAD_GATEWAY,
                &format!("mesh: the app on port {port} did not answer\n"),
            )
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn connections_never_outlive_the_peer_identity() {
        let now = time::OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            max_connection_age(now + hour, now),
            hour + Duration::from_secs(60)
        );
        assert_eq!(max_connection_age(now + 48 * hour, now), MAX_CONNECTION_AGE);
        assert_eq!(
            max_connection_age(now - hour, now),
            Duration::from_secs(60),
            "already expired"
        );
    }
}
