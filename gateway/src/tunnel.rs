//! The tunnel: `accept -> tls -> check caller -> per stream: check target
//! -> resolve -> splice`.
//!
//! - **tls**: TLS 1.3, the caller's certificate verified against its own
//!   trust domain's bundle (this cluster's and each linked one's; anything
//!   else fails the handshake). ALPN `mesh-tunnel/h2`.
//! - **check caller**: only linked trust domains may tunnel; this cluster's
//!   own workloads have no business here.
//! - **per stream**: an HTTP/2 `CONNECT <svc>.<ns>.svc.<domain>:<port>`.
//!   The target must be exported (the local control plane says so), then
//!   local discovery gives a ready endpoint, and the stream is spliced to
//!   that endpoint's proxy port. The gateway never decrypts what flows:
//!   the caller's proxy runs its own mTLS session with the destination
//!   proxy inside the stream, so the destination authorizes the real caller.
//! - The reserved target [`FEDERATION_TARGET`] leads to the local control
//!   plane's API (where the caller's service mirror watches exports).
//! - This cluster's own callers may use it for two things only: workloads
//!   behind the gateway (`behind.rs`: VMs) reach the control plane (the
//!   identity target, even before they have a certificate, and the API)
//!   and the cluster's meshed endpoints; and any of them reaches those
//!   workloads. Everything else of theirs is refused (`same_trust_domain`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::{
    api::v1::{DiscoveryUpdate, Exports, GatewayWorkloads, discovery_update::Kind},
    identity::{
        SpiffeId, TrustDomain,
        tls::{peer_identity, refusal_reason},
    },
    targets::{IDENTITY as IDENTITY_TARGET, parse_vm},
};
use mesh_proxy::follow::Follower;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::metrics::{BytesLabels, Metrics, PeerLabels, ReasonLabels};

/// ALPN of a tunnel connection: HTTP/2 with one `CONNECT` per stream (the
/// proxy's tunnel client names it).
pub use mesh_proxy::outbound::tunnel::ALPN_TUNNEL;
/// The reserved target that leads to the local control plane's API.
pub const FEDERATION_TARGET: &str = mesh_proxy::outbound::tunnel::FEDERATION_TARGET;
/// The reserved target a linked cluster's service mirror probes: answered
/// by the gateway itself, 200 while it is ready, nothing spliced.
pub const PROBE_TARGET: &str = mesh_proxy::outbound::tunnel::PROBE_TARGET;
/// How long connecting to a local destination proxy may take.
pub use mesh_proxy::env::CONNECT_TIMEOUT;
/// Streams per tunnel connection (DESIGN.md section 6, external).
pub const MAX_STREAMS: u32 = mesh_proxy::outbound::tunnel::MAX_STREAMS;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream waits for exports or endpoints the gateway has not
/// heard of yet.
const FAIL_FAST: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// What the tunnel needs to decide and to reach.
#[derive(Clone)]
pub struct Tunnel {
    pub readiness: mesh_core::admin::Readiness,
    pub trust_domain: TrustDomain,
    pub cluster_domain: String,
    pub control_api: String,
    /// The control plane's identity service (for workloads behind the gateway).
    pub control_identity: String,
    pub exports: Follower<(), Exports>,
    pub discovery: Follower<String, DiscoveryUpdate>,
    /// The workloads registered as behind this gateway.
    pub behind: Follower<(), GatewayWorkloads>,
    /// Their open reverse connections.
    pub reverse: crate::behind::Reverse,
    pub metrics: Metrics,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Why a stream was refused: its status and metric reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("only CONNECT is carried")]
    NotConnect,
    #[error("{0} is not <svc>.<ns>.svc.<cluster-domain>:<port>")]
    BadTarget(String),
    #[error("{0} is not exported by this cluster")]
    NotExported(String),
    #[error("{0} has no ready endpoint")]
    NoEndpoint(String),
    #[error("{0} resolves to another gateway (a loop)")]
    Loop(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("{0} is not a meshed workload's proxy")]
    NotMeshed(String),
    #[error("{0}: a caller without a certificate may only reach the identity service")]
    NoIdentity(String),
    #[error("{0}: callers of this cluster reach its services directly")]
    SameTrustDomain(String),
}

impl Refusal {
    pub fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotConnect => (StatusCode::METHOD_NOT_ALLOWED, "not_connect"),
            Self::BadTarget(_) => (StatusCode::BAD_REQUEST, "bad_target"),
            Self::NotExported(_) => (StatusCode::FORBIDDEN, "not_exported"),
            Self::NoEndpoint(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_ready_endpoint"),
            Self::Loop(_) => (StatusCode::LOOP_DETECTED, "loop_detected"),
            Self::Unreachable(_) => (StatusCode::BAD_GATEWAY, "unreachable"),
            Self::NotMeshed(_) => (StatusCode::FORBIDDEN, "not_meshed"),
            Self::NoIdentity(_) => (StatusCode::FORBIDDEN, "no_identity"),
            Self::SameTrustDomain(_) => (StatusCode::FORBIDDEN, "same_trust_domain"),
        }
    }
}

impl Tunnel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        readiness: mesh_core::admin::Readiness,
        trust_domain: TrustDomain,
        cluster_domain: String,
        (control_api, control_identity): (String, String),
        exports: Follower<(), Exports>,
        discovery: Follower<String, DiscoveryUpdate>,
        behind: Follower<(), GatewayWorkloads>,
        metrics: Metrics,
    ) -> Self {
        Self {
            readiness,
            trust_domain,
            cluster_domain,
            control_api,
            control_identity,
            exports,
            discovery,
            behind,
            reverse: crate::behind::Reverse::default(),
            metrics,
            next: Arc::default(),
        }
    }

    /// Where `caller`'s stream for `target` goes, by who the caller is:
    /// no certificate, this cluster's, or a linked cluster's.
    pub async fn open_for(
        &self,
        caller: Option<&SpiffeId>,
        target: &str,
    ) -> Result<Box<dyn Upstream>, Refusal> {
        let Some(caller) = caller else {
            return if target == IDENTITY_TARGET {
                self.connect(target, &self.control_identity).await
            } else {
                Err(Refusal::NoIdentity(target.to_owned()))
            };
        };
        if !caller.is_member_of(&self.trust_domain) {
            // Linked clusters: exported services and the federation API.
            if target == IDENTITY_TARGET || parse_vm(target).is_some() {
                return Err(Refusal::NotExported(target.to_owned()));
            }
            return self
                .open(target)
                .await
                .map(|t| Box::new(t) as Box<dyn Upstream>);
        }
        if target == IDENTITY_TARGET {
            return self.connect(target, &self.control_identity).await;
        }
        if target == FEDERATION_TARGET {
            return self.connect(target, &self.control_api).await;
        }
        if let Some((namespace, name, _)) = parse_vm(target) {
            return crate::behind::open_to_workload(self, namespace, name, target)
                .await
                .map(|io| Box::new(io) as Box<dyn Upstream>);
        }
        if target.parse::<SocketAddr>().is_ok() && crate::behind::is_behind(self, caller).await {
            let to = crate::behind::meshed_endpoint(self, target).await?;
            return self.connect(target, &to.to_string()).await;
        }
        Err(Refusal::SameTrustDomain(target.to_owned()))
    }

    /// A bounded TCP connect to `to` for the stream asking for `target`.
    async fn connect(&self, target: &str, to: &str) -> Result<Box<dyn Upstream>, Refusal> {
        match mesh_proxy::outbound::endpoint::within(
            CONNECT_TIMEOUT,
            || format!("connecting to {to}"),
            TcpStream::connect(to),
        )
        .await
        {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
            Err(e) => {
                tracing::warn!(%target, %to, error = %e, "tunnel destination unreachable");
                Err(Refusal::Unreachable(target.to_owned()))
            }
        }
    }

    /// Where a stream for `target` goes, or why it does not.
    pub async fn resolve(&self, target: &str) -> Result<String, Refusal> {
        if target == FEDERATION_TARGET {
            return Ok(self.control_api.clone());
        }
        let (svc, ns, port) = parse_target(target, &self.cluster_domain)
            .ok_or_else(|| Refusal::BadTarget(target.to_owned()))?;
        let exports = self.exports.get(&(), FAIL_FAST).await;
        let exported = exports.as_deref().is_some_and(|e| {
            e.services.iter().any(|s| {
                s.name == svc
                    && s.namespace == ns
                    && s.ports.iter().any(|p| p.port == u32::from(port))
            })
        });
        if !exported {
            return Err(Refusal::NotExported(target.to_owned()));
        }
        let update = self.discovery.get(&target.to_owned(), FAIL_FAST).await;
        let endpoints = match update.as_deref().and_then(|u| u.kind.as_ref()) {
            Some(Kind::Endpoints(set)) => set.endpoints.clone(),
            _ => Vec::new(),
        };
        if !endpoints.is_empty() && endpoints.iter().all(|e| e.via_gateway.is_some()) {
            return Err(Refusal::Loop(target.to_owned()));
        }
        let local: Vec<_> = endpoints
            .into_iter()
            .filter(|e| e.via_gateway.is_none() && e.proxy_port != 0)
            .filter_map(|e| {
                let addr: SocketAddr = e.address.parse().ok()?;
                Some(SocketAddr::new(
                    addr.ip(),
                    u16::try_from(e.proxy_port).ok()?,
                ))
            })
            .collect();
        if local.is_empty() {
            return Err(Refusal::NoEndpoint(target.to_owned()));
        }
        let pick = self.next.fetch_add(1, Ordering::Relaxed) % local.len();
        Ok(local[pick].to_string())
    }
}

impl Tunnel {
    /// The answer to the probe target: 200 while this gateway is ready.
    pub fn probe_status(&self) -> StatusCode {
        match self.readiness.state() {
            Ok(()) => StatusCode::OK,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A connection to where a stream for `target` goes, or why not. The
    /// connect is bounded like a proxy's ([`CONNECT_TIMEOUT`]), so a
    /// destination that never answers is refused rather than held.
    pub async fn open(&self, target: &str) -> Result<TcpStream, Refusal> {
        let to = self.resolve(target).await?;
        let connected = mesh_proxy::outbound::endpoint::within(
            CONNECT_TIMEOUT,
            || format!("connecting to {to}"),
            TcpStream::connect(&to),
        )
        .await;
        match connected {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Err(e) => {
                tracing::warn!(%target, %to, error = %e, "tunnel destination unreachable");
                Err(Refusal::Unreachable(target.to_owned()))
            }
        }
    }

    /// Counts a refused stream and logs it; the status to answer with.
    pub fn refused(
        &self,
        caller: Option<&SpiffeId>,
        refusal: &Refusal,
        transport: &str,
    ) -> StatusCode {
        let (status, reason) = refusal.classify();
        self.metrics.refuse(reason, &trust_domain_label(caller));
        tracing::info!(caller = ?caller.map(SpiffeId::as_str), reason, transport, "tunnel stream refused: {refusal}");
        status
    }

    /// Splices the caller's stream to `upstream`, counting the stream and
    /// its bytes under the caller's trust domain.
    pub async fn splice<A, B>(
        &self,
        caller: Option<&SpiffeId>,
        transport: &'static str,
        mut caller_side: A,
        mut upstream: B,
    ) where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let td = trust_domain_label(caller);
        self.metrics
            .streams
            .get_or_create(&PeerLabels {
                peer_trust_domain: td.clone(),
                transport,
            })
            .inc();
        if let Ok((inward, outward)) =
            tokio::io::copy_bidirectional(&mut caller_side, &mut upstream).await
        {
            for (flow, n) in [("in", inward), ("out", outward)] {
                self.metrics
                    .bytes
                    .get_or_create(&BytesLabels {
                        peer_trust_domain: td.clone(),
                        flow,
                    })
                    .inc_by(n);
            }
        }
    }
}

/// The `peer_trust_domain` label: `none` for a caller without a certificate.
fn trust_domain_label(caller: Option<&SpiffeId>) -> String {
    caller.map_or_else(|| "none".to_owned(), |c| c.trust_domain().to_string())
}

/// Where a stream goes: a TCP connection, or a stream on a workload's
/// reverse connection.
pub trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

/// `<svc>.<ns>.svc.<domain>:<port>` into its parts.
pub fn parse_target<'a>(target: &'a str, cluster_domain: &str) -> Option<(&'a str, &'a str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let name = host.strip_suffix(&format!(".svc.{cluster_domain}"))?;
    let (svc, ns) = name.split_once('.')?;
    (!svc.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((svc, ns, port))
}

/// accept: serves tunnel connections until the task is dropped, which
/// also drops every open tunnel (as a stopped gateway process would).
pub async fn accept(listener: TcpListener, tls: Arc<ServerConfig>, tunnel: Arc<Tunnel>) {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tunnel) = (acceptor.clone(), tunnel.clone());
        connections.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let reason = refusal_reason(&e);
                    tunnel
                        .metrics
                        .tls_refused
                        .get_or_create(&ReasonLabels { reason })
                        .inc();
                    tracing::info!(%peer, reason, "tunnel handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tunnel
                        .metrics
                        .tls_refused
                        .get_or_create(&ReasonLabels { reason: "timeout" })
                        .inc();
                    return;
                }
            };
            let caller = peer_identity(tls.get_ref().1);
            if tls.get_ref().1.alpn_protocol() == Some(crate::behind::ALPN_REVERSE) {
                match caller {
                    Some(caller) => crate::behind::serve(tunnel, caller, tls).await,
                    None => tunnel.metrics.refuse("no_identity", "none"),
                }
                return;
            }
            let labels = PeerLabels {
                peer_trust_domain: trust_domain_label(caller.as_ref()),
                transport: "tcp",
            };
            tunnel.metrics.tunnels.get_or_create(&labels).inc();
            let open = tunnel.metrics.tunnels_open.get_or_create(&labels).clone();
            open.inc();
            let svc = {
                let tunnel = tunnel.clone();
                service_fn(move |req| {
                    let (tunnel, caller) = (tunnel.clone(), caller.clone());
                    Box::pin(async move {
                        Ok::<_, std::convert::Infallible>(stream(&tunnel, &caller, req).await)
                    })
                })
            };
            // The server's SETTINGS and its ACK of the client's leave in
            // one write, as on a proxy's inbound side.
            let io = TokioIo::new(mesh_proxy::hold::HoldFirstFlush::new(tls));
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(16 * 1024)
                .serve_connection(io, svc)
                .await;
            open.dec();
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "tunnel connection ended");
            }
        });
    }
}

/// One stream: check and resolve its target, answer, then splice.
async fn stream(
    tunnel: &Arc<Tunnel>,
    caller: &Option<SpiffeId>,
    req: Request<Incoming>,
) -> Response<Body> {
    let target = req.uri().authority().map(|a| a.as_str().to_owned());
    let opened = match (req.method(), target.as_deref()) {
        (&Method::CONNECT, Some(PROBE_TARGET)) if caller.is_some() => {
            return status(tunnel.probe_status(), "");
        }
        (&Method::CONNECT, Some(target)) => tunnel.open_for(caller.as_ref(), target).await,
        (&Method::CONNECT, None) => Err(Refusal::BadTarget(String::new())),
        _ => Err(Refusal::NotConnect),
    };
    let upstream = match opened {
        Ok(upstream) => upstream,
        Err(refusal) => {
            let code = tunnel.refused(caller.as_ref(), &refusal, "tcp");
            return status(code, &format!("mesh gateway: {refusal}\n"));
        }
    };
    let (tunnel, caller) = (tunnel.clone(), caller.clone());
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            tunnel
                .splice(caller.as_ref(), "tcp", TokioIo::new(upgraded), upstream)
                .await;
        }
    });
    status(StatusCode::OK, "")
}

fn status(code: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_a_service_namespace_and_port() {
        let d = "cluster.local";
        assert_eq!(
            parse_target("api.shop.svc.cluster.local:8080", d),
            Some(("api", "shop", 8080))
        );
        for bad in [
            "api.shop.svc.cluster.local",
            "api.shop.svc.cluster.local:0",
            "api.svc.cluster.local:80",
            "api.shop.svc.other.domain:80",
            "a.b.c.svc.cluster.local:80",
        ] {
            assert_eq!(parse_target(bad, d), None, "{bad}");
        }
    }
}
