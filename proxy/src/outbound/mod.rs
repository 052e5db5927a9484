//! Outbound: the app's traffic to other services.
//!
//! `accept -> detect -> discover -> route -> balance -> connect`:
//! - **accept**: the outbound port (loopback by default), explicit (the app
//!   sets `HTTP_PROXY`) or redirected by iptables.
//! - **detect**: HTTP/1.1, HTTP/2 prior knowledge, or opaque (`detect.rs`).
//! - **discover**: the request's authority is looked up in discovery. A
//!   service discovery does not know goes straight through (plaintext, as
//!   the app asked); a known one is never sent in plaintext to a meshed
//!   endpoint.
//! - **route**: the first matching HTTPRoute rule picks the backend (weighted
//!   split), the timeouts, and the retries (within a budget of 20 % + 10/s;
//!   bodies of unknown size or over 64 KiB are never replayed).
//! - **balance**: p2c over peak-EWMA among the ready endpoints (`balance.rs`).
//! - **connect**: mTLS to the endpoint's proxy, expecting the SPIFFE ID
//!   discovery gave; the HTTP/1 request rides HTTP/2 and is marked
//!   `mesh-orig-proto: HTTP/1.1` so the other side restores it.
//!
//!   An endpoint failing 5 times in a row is ejected and probed back with
//!   backoff (`accrual.rs`).
//!
//! Transparent mode reaches the same path: redirected connections are
//! detected (`detect.rs`); HTTP is routed by its Host; for opaque TCP
//! discovery is asked about the original `ip:port`, and a meshed workload
//! there is reached over mTLS (ALPN `mesh-tcp/1`, `tcp.rs`). `CONNECT`
//! carries opaque TCP the same way.
//!
//! An HTTP/1.1 upgrade (WebSocket) takes a connection of its own on each
//! hop (`upgrade.rs`).

pub mod accrual;
pub mod balance;
pub mod endpoint;
pub mod errors;
pub mod failover;
pub mod route;
pub mod tcp;
pub mod tunnel;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Body as _, Incoming},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use mesh_core::{
    api::v1::{
        DiscoveryUpdate, OutboundPolicy, OutboundRequest, WatchRequest,
        discovery_client::DiscoveryClient, discovery_update::Kind, policy_client::PolicyClient,
    },
    memory::Connections,
};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::detect::{Protocol, detect};

use self::{
    balance::has_endpoints,
    endpoint::Dialer,
    errors::OutboundError,
    failover::Tiers,
    route::{MAX_RETRY_BODY, Plan, Splitter, plan},
    tcp::{Carry, MeshTcp, TcpBalancer, tcp_balancer},
};
use crate::{
    follow::Follower,
    metrics::{Answered, Metrics, OutboundMemo},
    upgrade,
    wire::{Body, DST_PORT, ORIG_PROTO},
};

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// One destination: its tiers, each a balancer and its endpoints' health
/// (one tier unless a FailoverPolicy steers it).
type Destination = Arc<Tiers>;

#[derive(Clone)]
pub struct Outbound {
    /// One connection balancer per destination of opaque TCP.
    tcp_balancers: Arc<Mutex<crate::FastMap<String, TcpBalancer>>>,
    /// Requests being served; none past the limit (shed with 503).
    in_flight: Arc<tokio::sync::Semaphore>,
    header_read_timeout: Duration,
    discovery: Follower<String, DiscoveryUpdate>,
    policies: Follower<String, OutboundPolicy>,
    splitter: Arc<Splitter>,
    balancers: Arc<Mutex<crate::FastMap<String, Destination>>>,
    /// Authorities discovery once said were meshed: plaintext to them is
    /// refused even when discovery later stops knowing them (a control
    /// plane restarting before it has read its configuration, a dropped
    /// file), since an answer that is missing is not "not meshed".
    once_meshed: Arc<Mutex<crate::FastSet<String>>>,
    /// How endpoints are reached (credentials, bundles, tunnels to
    /// gateways, connect timeout).
    dialer: Dialer,
    metrics: Metrics,
    fail_fast: Duration,
    limits: crate::env::DestinationLimits,
    plain: Client<HttpConnector, Body>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("discovery", &self.discovery)
            .field("fail_fast", &self.fail_fast)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// Follows discovery and outbound policy through the control plane `api`
    /// channel. `limits` are (max requests in flight, HTTP/1 header-read timeout).
    pub fn new(
        api: Channel,
        dialer: Dialer,
        metrics: Metrics,
        fail_fast: Duration,
        limits: (usize, Duration),
    ) -> Self {
        let client = DiscoveryClient::new(api.clone());
        let discovery = Follower::new("discovery", move |authority: String| {
            let mut client = client.clone();
            async move {
                client
                    .watch(WatchRequest { authority })
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        let client = PolicyClient::new(api);
        let policies = Follower::new("outbound policy", move |authority: String| {
            let mut client = client.clone();
            async move {
                client
                    .watch_outbound(OutboundRequest { authority })
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        Self {
            tcp_balancers: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.0)),
            header_read_timeout: limits.1,
            discovery,
            policies,
            splitter: Arc::default(),
            balancers: Arc::default(),
            once_meshed: Arc::default(),
            dialer,
            metrics,
            fail_fast,
            limits: crate::env::DestinationLimits::default(),
            plain: Client::builder(TokioExecutor::new()).build(endpoint::plain_connector()),
        }
    }

    /// Sets the idle time and the cap on destinations followed.
    pub fn with_limits(mut self, limits: crate::env::DestinationLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether a request for `authority` may be followed: a known one
    /// always, a new one only below the cap.
    fn admit(&self, authority: &str) -> Result<(), OutboundError> {
        if self.discovery.has_room_for(authority, self.limits.max) {
            return Ok(());
        }
        Err(OutboundError::TooManyDestinations {
            authority: authority.to_owned(),
            max: self.limits.max,
        })
    }

    /// Forgets destinations not called for `limits.idle`: their discovery
    /// and policy watches, balancers (and pooled connections), and whether
    /// they were once meshed. Returns how many were forgotten.
    pub fn evict_idle(&self) -> usize {
        let Some(before) = tokio::time::Instant::now().checked_sub(self.limits.idle) else {
            return 0;
        };
        let gone = self.discovery.evict_idle(before);
        self.policies.evict_idle(before);
        if gone.is_empty() {
            return 0;
        }
        let mut balancers = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        let mut tcp = self.tcp_balancers.lock().unwrap_or_else(|p| p.into_inner());
        let mut once = self.once_meshed.lock().unwrap_or_else(|p| p.into_inner());
        for key in &gone {
            balancers.remove(key);
            tcp.remove(key);
            once.remove(key);
        }
        tracing::debug!(count = gone.len(), "idle destinations forgotten");
        gone.len()
    }

    fn balancer(&self, authority: &str) -> Destination {
        shared(&self.balancers, authority, || {
            Tiers::new(
                self.discovery.watch(authority),
                self.dialer.clone(),
                self.metrics.clone(),
                authority,
            )
        })
    }

    fn tcp_balancer(&self, authority: &str) -> TcpBalancer {
        shared(&self.tcp_balancers, authority, || {
            tcp_balancer(self.discovery.watch(authority), self.dialer.clone())
        })
    }
}

/// The value kept for `authority` in `map`, made by `make` the first time.
/// The common case, a known authority, copies no key to look it up.
fn shared<V: Clone>(
    map: &Mutex<crate::FastMap<String, V>>,
    authority: &str,
    make: impl FnOnce() -> V,
) -> V {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = map.get(authority) {
        return known.clone();
    }
    map.entry(authority.to_owned()).or_insert_with(make).clone()
}

/// Forgets idle destinations for as long as the proxy runs, checking a
/// few times per idle period.
pub async fn evict_idle_forever(outbound: Arc<Outbound>) {
    let every = (outbound.limits.idle / 4).max(Duration::from_millis(250));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        outbound.evict_idle();
    }
}

/// accept: serves the outbound listener, explicit or redirected.
pub async fn accept(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    detect_timeout: Duration,
    opaque_ports: Arc<[u16]>,
    open: Connections,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Nagle is off: inherited from the listener (`proxy::listen`).
        let redirected = original_dst(&tcp);
        let outbound = outbound.clone();
        let skip_detect = redirected.is_some_and(|to| opaque_ports.contains(&to.port()));
        let held = open.hold();
        tokio::spawn(async move {
            let _held = held;
            let protocol = if skip_detect {
                Protocol::Opaque
            } else {
                detect_protocol(&tcp, detect_timeout).await
            };
            let serve = {
                let outbound = outbound.clone();
                // This connection's last metric labels and counters.
                let memo = Arc::new(OutboundMemo::default());
                move |req| {
                    // The head is copied out of hyper's read buffer now,
                    // before hyper reads on: a buffer still shared costs a
                    // new 8 KiB one per request (`crate::head`). The request
                    // is boxed and passed down as a pointer: a future keeps
                    // a slot for each value it was given beside the inner
                    // future that holds it too, and this one lives as long
                    // as the request (`H2Endpoint::send`).
                    let req = Box::new(crate::head::detach(req));
                    answer(outbound.clone(), memo.clone(), req, redirected)
                }
            };
            // Each arm boxed: the task then holds only the protocol in use.
            match protocol {
                Protocol::Http1 => {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(outbound.header_read_timeout)
                        // Boxed: hyper keeps room for the service's future
                        // in every HTTP/1.1 connection, so an inline one
                        // would cost each idle connection its full size.
                        .serve_connection(
                            TokioIo::new(tcp),
                            service_fn(move |req| Box::pin(serve(req))),
                        )
                        .with_upgrades();
                    let _ = Box::pin(conn).await;
                }
                Protocol::Http2 => {
                    // Boxed too: hyper runs each stream in a task of its
                    // own, and a task's future is moved whole several
                    // times (into the task, at each change of its stage
                    // and of hyper's stream state); boxed, each move is a
                    // pointer's, for one allocation.
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(
                            TokioIo::new(tcp),
                            service_fn(move |req| Box::pin(serve(req))),
                        );
                    let _ = Box::pin(conn).await;
                }
                Protocol::Tls | Protocol::Opaque => {
                    Box::pin(opaque(&outbound, tcp, redirected, protocol)).await;
                }
            }
        });
    }
}

/// detect: peeks (never reads) until the first bytes tell the protocol;
/// nothing within `timeout` (a server-speaks-first protocol) is opaque.
async fn detect_protocol(tcp: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; crate::detect::PEEK];
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await;
        match peeked {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Protocol::Opaque,
            Ok(Ok(n)) => {
                if let Some(protocol) = detect(&buf[..n]) {
                    return protocol;
                }
                // A prefix of a signature: wait briefly for more bytes.
                if tokio::time::Instant::now() >= deadline {
                    return Protocol::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// Opaque TCP (or the app's own TLS) in transparent mode: discovery is
/// asked about the original destination. A meshed workload is reached over
/// mTLS through its proxy (never in plaintext); an address discovery does
/// not know is reached directly, as the app asked.
async fn opaque(
    outbound: &Outbound,
    mut tcp: TcpStream,
    redirected: Option<std::net::SocketAddr>,
    protocol: Protocol,
) {
    let Some(to) = redirected else {
        outbound
            .metrics
            .refuse_outbound("opaque_without_destination");
        tracing::info!(
            ?protocol,
            "non-HTTP traffic on the explicit outbound port has no destination; closing"
        );
        return;
    };
    let authority = to.to_string();
    if let Err(e) = outbound.admit(&authority) {
        outbound.metrics.refuse_outbound(e.classify().1);
        tracing::info!("opaque connection refused: {e}");
        return;
    }
    let Some(update) = outbound.discovery.get(&authority, outbound.fail_fast).await else {
        // Whether the destination is meshed is unknown: fail closed.
        let e = OutboundError::DiscoveryUnavailable { authority };
        outbound.metrics.refuse_outbound(e.classify().1);
        tracing::info!("opaque connection refused: {e}");
        return;
    };
    if !matches!(update.kind, Some(Kind::NoSuchService(_))) {
        match connect_mesh_tcp(outbound, &authority, Carry::Opaque).await {
            Ok(mut upstream) => {
                outbound
                    .metrics
                    .splice(&mut tcp, &mut upstream, "outbound", &authority, "mtls")
                    .await;
            }
            Err(e) => {
                outbound.metrics.refuse_outbound(e.classify().1);
                tracing::info!(%authority, "opaque connection refused: {e}");
            }
        }
        return;
    }
    match TcpStream::connect(to).await {
        Ok(mut upstream) => {
            outbound
                .metrics
                .splice(&mut tcp, &mut upstream, "outbound", &authority, "none")
                .await;
        }
        Err(e) => {
            outbound.metrics.refuse_outbound("connect");
            tracing::info!(%to, error = %e, "opaque destination unreachable");
        }
    }
}

/// Where a connection was going before iptables redirected it to us
/// (`SO_ORIGINAL_DST`); `None` when it was not redirected (explicit mode).
fn original_dst(tcp: &TcpStream) -> Option<std::net::SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let local = tcp.local_addr().ok()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    orig.ok()?.as_socket().filter(|orig| *orig != local)
}

/// `host:port` the request is for (absolute form, CONNECT, or Host).
fn authority_of(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)?
                .to_str()
                .ok()
                .map(str::to_owned)
        })?;
    Some(if raw.contains(':') {
        raw
    } else {
        format!("{raw}:80")
    })
}

/// [`handle`], as hyper's service answers.
async fn answer(
    outbound: Arc<Outbound>,
    memo: Arc<OutboundMemo>,
    req: Box<Request<Incoming>>,
    redirected: Option<std::net::SocketAddr>,
) -> Result<Response<Body>, std::convert::Infallible> {
    Ok(handle(&outbound, &memo, req, redirected).await)
}

async fn handle(
    outbound: &Outbound,
    memo: &OutboundMemo,
    req: Box<Request<Incoming>>,
    redirected: Option<std::net::SocketAddr>,
) -> Response<Body> {
    let Ok(_permit) = outbound.in_flight.clone().try_acquire_owned() else {
        return fail(outbound, "-", OutboundError::Overloaded);
    };
    let Some(authority) = authority_of(&req) else {
        return OutboundError::BadRequest.response();
    };
    let started = std::time::Instant::now();
    // Only what `/tap` needs, and only while someone taps.
    let tapped = (outbound.metrics.tap.receiver_count() > 0)
        .then(|| (req.method().to_string(), req.uri().path().to_owned()));
    let tap = |status: StatusCode, tls: &str| {
        let Some((method, path)) = &tapped else {
            return;
        };
        outbound.metrics.tap(|| {
            serde_json::json!({
                "direction": "outbound",
                "authority": authority,
                "method": method,
                "path": path,
                "status": status.as_u16(),
                "tls": tls,
                "latency_us": started.elapsed().as_micros() as u64,
            })
        });
    };
    if let Err(e) = outbound.admit(&authority) {
        return fail(outbound, &authority, e);
    }
    // discover
    let Some(update) = outbound.discovery.get(&authority, outbound.fail_fast).await else {
        return fail(
            outbound,
            &authority,
            OutboundError::DiscoveryUnavailable {
                authority: authority.clone(),
            },
        );
    };
    let mut meshed = !matches!(update.kind, Some(Kind::NoSuchService(_)));
    // Where the request goes: the Host, or (below) the original `ip:port`.
    let mut by_orig_dst: Option<String> = None;
    let mut update = update;
    // Transparent mode, a Host discovery does not know: the connection was
    // going to an `ip:port`, which may be a meshed workload. Ask about that
    // before choosing plaintext, as the opaque path does.
    if let Some(to) = redirected.filter(|to| !meshed && to.to_string() != authority) {
        let orig = to.to_string();
        if let Err(e) = outbound.admit(&orig) {
            return fail(outbound, &authority, e);
        }
        let Some(by_address) = outbound.discovery.get(&orig, outbound.fail_fast).await else {
            return fail(
                outbound,
                &authority,
                OutboundError::DiscoveryUnavailable { authority: orig },
            );
        };
        if !matches!(by_address.kind, Some(Kind::NoSuchService(_))) {
            (by_orig_dst, update, meshed) = (Some(orig), by_address, true);
        }
    }
    let dest = by_orig_dst.as_deref().unwrap_or(&authority);
    {
        let mut once = outbound
            .once_meshed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if meshed {
            if !once.contains(authority.as_str()) {
                once.insert(authority.clone());
            }
        } else if once.contains(authority.as_str()) {
            drop(once);
            return fail(
                outbound,
                &authority,
                OutboundError::NoLongerKnown {
                    authority: authority.clone(),
                },
            );
        }
    }
    if req.method() == Method::CONNECT {
        if meshed {
            // The rare paths are boxed: their futures would make every
            // request's as large.
            return match Box::pin(connect_mesh_tcp(outbound, dest, Carry::Opaque)).await {
                Ok(conn) => tunnel(outbound, *req, conn, dest, "mtls"),
                Err(e) => fail_to(
                    outbound,
                    &authority,
                    Answered {
                        cluster: cluster_of(&update),
                        ..Answered::default()
                    },
                    "mtls",
                    e,
                ),
            };
        }
        return Box::pin(connect_plain(outbound, *req, &authority)).await;
    }
    // The HTTPRoute rule that sent it, for the metrics.
    let mut route = std::borrow::Cow::Borrowed("");
    let result = if upgrade::is_upgrade(&req) {
        Box::pin(upgrade(outbound, dest, meshed, redirected, *req)).await
    } else if meshed {
        to_mesh(outbound, dest, req, &mut route).await
    } else {
        // Transparent mode: go where the app was really connecting.
        let target = redirected.map_or_else(|| authority.clone(), |to| to.to_string());
        Box::pin(passthrough(outbound, &target, *req)).await
    };
    let tls = if meshed { "mtls" } else { "none" };
    match result {
        Ok(resp) => {
            // What the endpoint actually used on the wire; upgrades and
            // passthrough answer for themselves (mTLS splice, plaintext).
            // The cluster that answered; a tier may be another one.
            let served = resp.extensions().get::<endpoint::ServedBy>();
            let tls = served.map_or(tls, |s| s.tls);
            let answered = Answered {
                cluster: served
                    .and_then(|s| s.cluster.as_deref())
                    .unwrap_or(cluster_of(&update)),
                identity: served.and_then(|s| s.identity.as_deref()).unwrap_or(""),
                route: &route,
            };
            outbound.metrics.outbound_response_on(
                memo,
                (&authority, answered),
                resp.status(),
                tls,
                started.elapsed(),
            );
            tap(resp.status(), tls);
            resp
        }
        Err(e) => {
            tap(e.classify().0, tls);
            let answered = Answered {
                cluster: cluster_of(&update),
                identity: "",
                route: &route,
            };
            fail_to(outbound, &authority, answered, tls, e)
        }
    }
}

/// A request that failed before a destination was chosen.
fn fail(outbound: &Outbound, authority: &str, e: OutboundError) -> Response<Body> {
    fail_to(outbound, authority, Answered::default(), "none", e)
}

/// A request that failed on its way to the destination discovery chose:
/// counted with that destination's cluster and TLS, as a success would be,
/// so failed cross-cluster or mTLS requests are not counted as local or
/// plaintext.
fn fail_to(
    outbound: &Outbound,
    authority: &str,
    answered: Answered<'_>,
    tls: &'static str,
    e: OutboundError,
) -> Response<Body> {
    let (status, reason) = e.classify();
    outbound.metrics.refuse_outbound(reason);
    tracing::info!(%authority, reason, "outbound request failed: {e}");
    outbound
        .metrics
        .outbound_response(authority, answered, status, tls, None);
    e.response()
}

/// The cluster a discovery answer places the destination in.
fn cluster_of(update: &DiscoveryUpdate) -> &str {
    match &update.kind {
        Some(Kind::Endpoints(set)) => set.endpoints.first().map_or("", |e| e.cluster.as_str()),
        _ => "",
    }
}

/// An HTTP/1.1 upgrade (WebSocket): a connection of its own, over mTLS
/// with ALPN `http/1.1` to a meshed endpoint (picked like opaque TCP), or
/// straight through to a destination discovery does not know.
async fn upgrade(
    outbound: &Outbound,
    authority: &str,
    meshed: bool,
    redirected: Option<std::net::SocketAddr>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, OutboundError> {
    let asked = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    upgrade::keep_upgrade_headers(&mut parts.headers, strip_hop_by_hop);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let splice = |tls| upgrade::Splice {
        metrics: outbound.metrics.clone(),
        direction: "outbound",
        peer: authority.to_owned(),
        tls,
        until: None,
    };
    if meshed {
        let conn = connect_mesh_tcp(outbound, authority, Carry::Http1Upgrade).await?;
        // Absolute form: the other proxy restores Host from it.
        parts.uri = format!("http://{authority}{path}")
            .parse()
            .map_err(|_| OutboundError::BadRequest)?;
        parts
            .headers
            .insert(DST_PORT, HeaderValue::from(conn.guard.app_port));
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        let req = Request::from_parts(parts, body);
        return upgrade::send(conn, req, asked, splice("mtls"))
            .await
            .map(|resp| resp.map(crate::wire::boxed))
            .map_err(OutboundError::connect);
    }
    let target = redirected.map_or_else(|| authority.to_owned(), |to| to.to_string());
    let tcp = TcpStream::connect(&target)
        .await
        .map_err(OutboundError::connect)?;
    parts.uri = path.parse().map_err(|_| OutboundError::BadRequest)?;
    let host = HeaderValue::from_str(authority).map_err(|_| OutboundError::BadRequest)?;
    parts.headers.insert(header::HOST, host);
    upgrade::send(tcp, Request::from_parts(parts, body), asked, splice("none"))
        .await
        .map(|resp| resp.map(crate::wire::boxed))
        .map_err(OutboundError::connect)
}

/// route + balance + connect to a meshed destination.
async fn to_mesh(
    outbound: &Outbound,
    authority: &str,
    req: Box<Request<Incoming>>,
    route: &mut std::borrow::Cow<'static, str>,
) -> Result<Response<Body>, OutboundError> {
    let policy = outbound.policies.get(authority, outbound.fail_fast).await;
    let (parts, body) = (*req).into_parts();
    // Taken apart, so that nothing of the head is held twice while the
    // request is in flight (the extensions go now).
    let http::request::Parts {
        method,
        uri: uri_read,
        version,
        mut headers,
        ..
    } = parts;
    let plan = plan(
        policy.as_deref(),
        authority,
        &method,
        uri_read.path(),
        &headers,
    );
    route.clone_from(&plan.route);
    if plan.backends.is_empty() {
        return Err(OutboundError::NoBackend {
            route: plan.route.into_owned(),
        });
    }
    let was_http1 = version <= Version::HTTP_11;
    // Host goes too: HTTP/2 carries the authority in the URI, and the
    // other side restores Host.
    strip_hop_by_hop(&mut headers);
    if was_http1 {
        headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    // The request keeps the authority it was sent to, whichever backend
    // serves it. Made from its parts, not formatted and parsed whole.
    let uri = {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority.parse().map_err(|_| OutboundError::BadRequest)?);
        // Moved: detached from hyper's read buffer on arrival.
        uri.path_and_query = Some(match uri_read.into_parts().path_and_query {
            None => http::uri::PathAndQuery::from_static("/"),
            Some(path) if path.as_str().starts_with('/') => path,
            // `*` (OPTIONS): no path of the destination's.
            Some(_) => return Err(OutboundError::BadRequest),
        });
        Uri::from_parts(uri).map_err(|_| OutboundError::BadRequest)?
    };
    // The head was detached from hyper's read buffer on arrival
    // (`accept`), so it is moved, not copied, into the request sent; that
    // is boxed too, passed down through the attempt, the tier and the
    // balancer.
    let build = |body: crate::wire::Body, headers: http::HeaderMap| {
        let mut req = Box::new(Request::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers;
        req
    };
    outbound.splitter.deposit();
    let replayable = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_RETRY_BODY);
    // Kept to send again: for the route's retries, and for a tier that
    // could not be reached (a failover policy's next tier takes it).
    // (Looked up only when it decides: a retry policy buffers anyway.)
    let keep = replayable
        && (plan.retry.is_some()
            || plan
                .backends
                .iter()
                .any(|(backend, _)| outbound.balancer(backend).is_tiered()));
    if !keep && plan.request_timeout.is_none() {
        // Sent once, the head moved into the request: the common case,
        // inline.
        let mut once = Some(build(crate::wire::boxed(body), headers));
        return attempt(outbound, &plan, &mut || once.take()).await;
    }
    let work = async {
        if !keep {
            let mut once = Some(build(crate::wire::boxed(body), headers));
            return attempt(outbound, &plan, &mut || once.take()).await;
        }
        let bytes = body
            .collect()
            .await
            .map_err(OutboundError::connect)?
            .to_bytes();
        let mut again = || {
            Some(build(
                Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
                headers.clone(),
            ))
        };
        let Some(retry) = plan.retry.as_ref() else {
            return attempt(outbound, &plan, &mut again).await;
        };
        let mut retries = 0;
        loop {
            let result = attempt(outbound, &plan, &mut again).await;
            let again = match &result {
                Ok(resp) => retry.codes.contains(&u32::from(resp.status().as_u16())),
                Err(e) => e.retryable(),
            };
            if !again || retries >= retry.attempts || !outbound.splitter.withdraw() {
                return result;
            }
            retries += 1;
            outbound.metrics.outbound_retries.inc();
            tokio::time::sleep(Duration::from_millis(retry.backoff_ms)).await;
        }
    };
    // Boxed: a request kept to send again, or timed, carries the body's
    // collection, the retries and a timer; the common case above does not.
    Box::pin(async {
        match plan.request_timeout {
            None => work.await,
            Some(after) => {
                tokio::time::timeout(after, work)
                    .await
                    .map_err(|_| OutboundError::Timeout {
                        what: "request",
                        after,
                    })?
            }
        }
    })
    .await
}

/// balance + connect: one attempt, to one backend of the plan; with a
/// failover policy, to the tier its loads pick, and on to the next tier
/// when the endpoint could not be reached (nothing was sent). `request`
/// gives the request, again as long as it can be sent again.
async fn attempt(
    outbound: &Outbound,
    plan: &Plan<'_>,
    request: &mut (dyn FnMut() -> Option<Box<Request<crate::wire::Body>>> + Send),
) -> Result<Response<Body>, OutboundError> {
    let backend = outbound.splitter.pick(plan);
    wait_for_endpoints(outbound, backend).await?;
    let tiers = outbound.balancer(backend);
    let mut tier = tiers.pick();
    let mut req = request().ok_or(OutboundError::BadRequest)?;
    loop {
        let result = attempt_tier(outbound, plan, backend, &tiers, tier, req).await;
        if let Err(OutboundError::Unreachable(why)) = &result
            && let Some(next) = tiers.next_after(tier)
            && let Some(again) = request()
        {
            tracing::debug!(%backend, from = tier, to = next, %why, "unreachable; trying the next tier");
            outbound.metrics.failover_next_tier.inc();
            tier = next;
            req = again;
            continue;
        }
        return result;
    }
}

/// One request to tier `tier` of `backend`.
async fn attempt_tier(
    outbound: &Outbound,
    plan: &Plan<'_>,
    backend: &str,
    tiers: &Tiers,
    tier: usize,
    req: Box<Request<crate::wire::Body>>,
) -> Result<Response<Body>, OutboundError> {
    let failover::Tier {
        balancer, health, ..
    } = tiers.tier(tier);
    // With every endpoint ejected the balancer would hold the request until
    // a probe; wait out the fail-fast time at most, then say so. (The
    // clock is read only then.)
    let mut deadline = None;
    while health.all_ejected() {
        let deadline =
            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + outbound.fail_fast);
        if tokio::time::Instant::now() >= deadline {
            return Err(OutboundError::AllEjected {
                authority: backend.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let call = balancer.call(*req);
    match plan.attempt_timeout {
        None => call.await,
        Some(after) => {
            tokio::time::timeout(after, call)
                .await
                .map_err(|_| OutboundError::Timeout {
                    what: "backend request",
                    after,
                })?
        }
    }
}

/// A destination discovery does not know: straight through, as asked.
async fn passthrough(
    outbound: &Outbound,
    authority: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, OutboundError> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|_| OutboundError::BadRequest)?;
    outbound
        .plain
        .request(Request::from_parts(parts, crate::wire::boxed(body)))
        .await
        .map(|resp| resp.map(crate::wire::boxed))
        .map_err(OutboundError::connect)
}

/// Opaque TCP to a meshed destination: a connection to one of its
/// endpoints, picked by p2c over open connections (`tcp.rs`).
async fn connect_mesh_tcp(
    outbound: &Outbound,
    authority: &str,
    carry: Carry,
) -> Result<MeshTcp, OutboundError> {
    wait_for_endpoints(outbound, authority).await?;
    let mut balancer = outbound.tcp_balancer(authority);
    let svc = tokio::time::timeout(outbound.fail_fast, balancer.ready())
        .await
        .map_err(|_| OutboundError::NoEndpoints {
            authority: authority.to_owned(),
        })?
        .map_err(|e| OutboundError::Balancer(e.to_string()))?;
    svc.call(carry).await.map_err(downcast)
}

/// The balancer's error as the proxy's own, when it is one.
fn downcast(e: tower::BoxError) -> OutboundError {
    match e.downcast::<OutboundError>() {
        Ok(e) => *e,
        Err(e) => OutboundError::Balancer(e.to_string()),
    }
}

/// Returns once `authority` has an endpoint to send to; usually at once,
/// otherwise (with a timer) within the fail-fast time or never.
async fn wait_for_endpoints(outbound: &Outbound, authority: &str) -> Result<(), OutboundError> {
    let mut updates = outbound.discovery.watch(authority);
    if has_endpoints(updates.borrow().as_deref()) {
        return Ok(());
    }
    let waited = tokio::time::timeout(
        outbound.fail_fast,
        updates.wait_for(|u| has_endpoints(u.as_deref())),
    );
    match waited.await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(OutboundError::NoEndpoints {
            authority: authority.to_owned(),
        }),
    }
}

/// Answers CONNECT with 200 and splices the client to `upstream`.
fn tunnel<S>(
    outbound: &Outbound,
    req: Request<Incoming>,
    mut upstream: S,
    authority: &str,
    tls: &'static str,
) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (metrics, authority) = (outbound.metrics.clone(), authority.to_owned());
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                metrics
                    .splice(&mut client, &mut upstream, "outbound", &authority, tls)
                    .await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// CONNECT to a destination discovery does not know: plain TCP, as asked.
async fn connect_plain(
    outbound: &Outbound,
    req: Request<Incoming>,
    authority: &str,
) -> Response<Body> {
    match TcpStream::connect(authority).await {
        Ok(tcp) => tunnel(outbound, req, tcp, authority, "none"),
        Err(e) => fail(outbound, authority, OutboundError::connect(e)),
    }
}

/// Removes the hop-by-hop headers (those `Connection` names too) and Host.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Most requests carry none but Host: one look at the names spares
    // ten removals, each of which parses and hashes its name.
    let others = headers.keys().any(|name| {
        name != header::HOST
            && (name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(&name.as_str()))
    });
    if !others {
        headers.remove(header::HOST);
        return;
    }
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::TRANSFER_ENCODING);
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, header};

    use super::strip_hop_by_hop;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn a_request_with_only_end_to_end_headers_loses_only_its_host() {
        let mut h = headers(&[("host", "api:80"), ("accept", "*/*"), ("x-b3", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, headers(&[("accept", "*/*"), ("x-b3", "1")]));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = headers(&[
            ("host", "api:80"),
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "for the next hop only"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, headers(&[("accept", "*/*")]));
        assert!(!h.contains_key(header::HOST));
    }
}
