//! The tunnel client: how an endpoint in a linked cluster is reached.
//!
//! Discovery gives such an endpoint as "via gateway": the remote gateway's
//! addresses and SPIFFE ID, the target authority, and the SPIFFE IDs the
//! destination may present. The proxy opens mTLS to the gateway (ALPN
//! `mesh-tunnel/h2`; SNI names only the gateway) and keeps that connection
//! for every stream to that gateway, whatever the destination behind it
//! ([`Gateways`]: one tunnel per gateway for the proxy's identity). Each new
//! connection to a destination is one HTTP/2 `CONNECT <target>` stream on
//! it (or one QUIC stream), inside which the proxy runs its own mTLS session
//! with the destination proxy, expecting one of the destination's
//! identities. The gateway sees the target, never the requests. A tunnel
//! connection carries at most [`MAX_STREAMS`] streams; past that the proxy
//! opens another one to the same gateway rather than wait.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{net::TcpStream, sync::Mutex};
use tokio_rustls::TlsConnector;

use mesh_core::identity::{
    BundleStore, CredentialStore, ExpectedIdentity, SpiffeId, tls::client_config,
};

use super::endpoint::{Guarded, MeshIo, Stream, within};

/// ALPN of a tunnel connection to a gateway.
pub const ALPN_TUNNEL: &[u8] = b"mesh-tunnel/h2";
/// ALPN of the connection a workload behind its own cluster's gateway (a
/// VM with no other route) keeps open so the gateway can reach it.
pub const ALPN_REVERSE: &[u8] = b"mesh-reverse/h2";
/// ALPN of a QUIC tunnel connection to a gateway.
pub const ALPN_QUIC: &[u8] = b"mesh-tunnel/quic";
/// Streams one tunnel connection carries at most: what the gateway allows
/// (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`, QUIC bidirectional streams;
/// DESIGN.md section 6, external).
pub const MAX_STREAMS: u32 = 100;
/// The longest target a QUIC stream header may name.
pub const MAX_TARGET: usize = 512;
/// How long a QUIC tunnel may take to open before TCP is used instead
/// (UDP may be blocked on the way).
pub const QUIC_FALLBACK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a QUIC stream header is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the target is empty")]
    Empty,
    #[error("the target is {0} bytes; at most {MAX_TARGET}")]
    TooLong(usize),
    #[error("the target is not UTF-8")]
    NotUtf8,
}

/// A QUIC stream's header: the target's length (2 bytes big endian, 1 to
/// [`MAX_TARGET`]) then the target. Returns the target and the header's
/// length, `None` while `buf` is a prefix of a header. Pure; fuzzed
/// (`gateway/fuzz`, target `tunnel_header`).
pub fn parse_header(buf: &[u8]) -> Result<Option<(&str, usize)>, HeaderError> {
    let Some(len) = buf.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len == 0 {
        return Err(HeaderError::Empty);
    }
    if len > MAX_TARGET {
        return Err(HeaderError::TooLong(len));
    }
    let Some(target) = buf.get(2..2 + len) else {
        return Ok(None);
    };
    let target = std::str::from_utf8(target).map_err(|_| HeaderError::NotUtf8)?;
    Ok(Some((target, 2 + len)))
}

/// The header a QUIC stream to `target` starts with.
pub fn encode_header(target: &str) -> Result<Vec<u8>, HeaderError> {
    let len = target.len();
    if len == 0 {
        return Err(HeaderError::Empty);
    }
    let n = u16::try_from(len)
        .ok()
        .filter(|n| usize::from(*n) <= MAX_TARGET)
        .ok_or(HeaderError::TooLong(len))?;
    let mut out = n.to_be_bytes().to_vec();
    out.extend_from_slice(target.as_bytes());
    Ok(out)
}

/// What the inner mTLS session carries, by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    /// `h2`: pooled HTTP/2.
    H2 = 0,
    /// `mesh-tcp/1`: opaque TCP (CONNECT and transparent TCP).
    Tcp = 1,
    /// `http/1.1`: one HTTP/1.1 upgrade (WebSocket).
    Http1 = 2,
}

/// A tunnel connection is checked after this long without a frame from the
/// gateway: an HTTP/2 PING (QUIC: a keep-alive), so a gateway that went
/// silent (packets dropped) is known dead in [`PING_EVERY`] +
/// [`PING_TIMEOUT`], well under a second, not after a probe timeout.
pub const PING_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// A PING not answered within this closes the connection.
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(400);
/// While a tunnel is down, how often it is tried again (a probe stream).
pub const REDIAL_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a tunnel is up, as its connections last showed: shared with the
/// endpoints behind it, whose tier counts them unhealthy while it is down.
#[derive(Debug)]
pub struct Liveness {
    up: std::sync::atomic::AtomicBool,
    /// Why it went down, for the error streams get meanwhile.
    why: std::sync::Mutex<String>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            up: std::sync::atomic::AtomicBool::new(true),
            why: std::sync::Mutex::default(),
        }
    }
}

impl Liveness {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Marks it down; true when it was up.
    fn down(&self, why: String) -> bool {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.up.swap(false, Ordering::AcqRel)
    }

    /// Marks it up; true when it was down.
    fn up(&self) -> bool {
        !self.up.swap(true, Ordering::AcqRel)
    }

    fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[cfg(test)]
    pub(crate) fn force_down_for_test(&self) {
        self.down("test".into());
    }
}

/// How long TCP is used after QUIC did not open.
pub const QUIC_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// The gateway answered a stream with a status other than 200 (not
/// exported, not linked, ...): an answer, not a broken transport.
#[derive(Debug, thiserror::Error)]
#[error("gateway {gateway} refused {target}: {status}")]
pub struct Refused {
    pub gateway: String,
    pub target: String,
    pub status: u16,
}

impl Refused {
    /// Whether `e` is a gateway's refusal.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Self>())
    }
}
/// The reserved target that leads to the gateway's own control plane API.
pub const FEDERATION_TARGET: &str = "federation.mesh-system.mesh:8086";
/// The reserved target the gateway answers itself: 200 while ready.
pub const PROBE_TARGET: &str = "probe.mesh-system.mesh:4191";

/// One stream's place on its tunnel connection, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open tunnel connections of one transport to one gateway, each with
/// the number of streams it carries, and how the last attempt at a new one
/// failed.
#[derive(Debug)]
struct Pool<C> {
    conns: Vec<(C, Arc<AtomicUsize>)>,
    failed: Option<(tokio::time::Instant, io::ErrorKind, String)>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            conns: Vec::new(),
            failed: None,
        }
    }
}

impl<C: Clone> Pool<C> {
    /// A connection with room for one more stream, that stream's slot
    /// taken. Forgets connections that `open` says are closed.
    fn take(&mut self, open: impl Fn(&C) -> bool) -> Option<(C, Slot)> {
        self.conns.retain(|(conn, _)| open(conn));
        let (conn, streams) = self
            .conns
            .iter()
            .find(|(_, streams)| streams.load(Ordering::Acquire) < MAX_STREAMS as usize)?;
        streams.fetch_add(1, Ordering::AcqRel);
        Some((conn.clone(), Slot(streams.clone())))
    }

    /// Adds a new connection; with `first`, its first stream's slot.
    fn add(&mut self, conn: C, first: bool) -> Option<Slot> {
        let streams = Arc::new(AtomicUsize::new(usize::from(first)));
        self.conns.push((conn, streams.clone()));
        // Lazily: a slot made and dropped would give back a stream never taken.
        first.then(|| Slot(streams))
    }

    fn any_open(&self, open: impl Fn(&C) -> bool) -> bool {
        self.conns.iter().any(|(conn, _)| open(conn))
    }

    /// The failure of an attempt at a new connection that ended after
    /// `asked`: a stream that waited for that attempt takes its answer
    /// rather than making one more, so streams queued behind a dead
    /// gateway fail together, not one connect timeout each in turn.
    fn failed_since(&self, asked: tokio::time::Instant) -> Option<io::Error> {
        self.failed
            .as_ref()
            .filter(|(at, _, _)| *at >= asked)
            .map(|(_, kind, why)| io::Error::new(*kind, why.clone()))
    }

    fn fail(&mut self, e: &io::Error) {
        self.failed = Some((tokio::time::Instant::now(), e.kind(), e.to_string()));
    }
}

type QuicConn = (quinn::Endpoint, quinn::Connection);

fn quic_open((_, conn): &QuicConn) -> bool {
    conn.close_reason().is_none()
}

fn tcp_open(send: &SendRequest<Empty<Bytes>>) -> bool {
    !send.is_closed()
}

/// The QUIC side of a tunnel: its config, and the open connections.
struct QuicTunnel {
    config: quinn::ClientConfig,
    conns: Arc<Mutex<Pool<QuicConn>>>,
    /// After QUIC failed, TCP is used until then (no second wait per
    /// connection while UDP is blocked).
    skip_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// The tunnel connections to one gateway: every stream this proxy sends
/// there, to any destination behind it, rides them.
pub struct Tunnel {
    /// `host:port` of the gateway (a name is resolved for each new tunnel
    /// connection, its answer cached for its TTL).
    gateway: String,
    /// mTLS to the gateway, expecting its identity, ALPN `mesh-tunnel/h2`.
    gateway_tls: Arc<ClientConfig>,
    /// The open TCP tunnel connections.
    tcp: Mutex<Pool<SendRequest<Empty<Bytes>>>>,
    /// Tunnel over QUIC first, when the Link prefers it.
    quic: Option<QuicTunnel>,
    /// Resolves the gateway's name (cached for each answer's TTL).
    dns: crate::dns::Dns,
    /// For a new tunnel connection (TCP, TLS, HTTP/2), and for a stream's
    /// setup and its inner handshake.
    connect_timeout: std::time::Duration,
    /// Up or down, as the connections' PINGs and probes say.
    liveness: Arc<Liveness>,
    /// A task is trying the tunnel again.
    redialing: std::sync::atomic::AtomicBool,
    /// Itself, for the tasks watching its connections.
    me: Weak<Tunnel>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("gateway", &self.gateway)
            .field("quic", &self.quic.is_some())
            .finish_non_exhaustive()
    }
}

/// Client TLS for this proxy's credentials, expecting `expected`, with `alpn`.
fn tls_config(
    creds: &CredentialStore,
    bundles: &BundleStore,
    expected: ExpectedIdentity,
    alpn: &[u8],
) -> Result<ClientConfig, String> {
    let mut tls = client_config(creds.clone(), bundles.clone(), expected)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

impl Tunnel {
    /// Tunnels to the gateway at `gateway`, which must present
    /// `gateway_id`; with `quic`, QUIC is tried first.
    fn new(
        gateway: &str,
        gateway_id: SpiffeId,
        quic: bool,
        (creds, bundles): (&CredentialStore, &BundleStore),
        connect_timeout: std::time::Duration,
    ) -> Result<Arc<Self>, String> {
        let quic = if quic {
            let tls = tls_config(
                creds,
                bundles,
                ExpectedIdentity::Exact(gateway_id.clone()),
                ALPN_QUIC,
            )?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                .map_err(|e| format!("QUIC TLS: {e}"))?;
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            // Keep-alives as HTTP/2 PINGs are: silence closes it quickly.
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(PING_EVERY));
            transport.max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(PING_EVERY + PING_TIMEOUT)
                    .map_err(|e| format!("QUIC idle timeout: {e}"))?,
            ));
            config.transport_config(Arc::new(transport));
            Some(QuicTunnel {
                config,
                conns: Arc::default(),
                skip_until: Arc::default(),
            })
        } else {
            None
        };
        let gateway_tls = Arc::new(tls_config(
            creds,
            bundles,
            ExpectedIdentity::Exact(gateway_id),
            ALPN_TUNNEL,
        )?);
        Ok(Arc::new_cyclic(|me| Self {
            gateway: gateway.to_owned(),
            gateway_tls,
            tcp: Mutex::default(),
            quic,
            dns: crate::dns::Dns::system(),
            connect_timeout,
            liveness: Arc::default(),
            redialing: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
        }))
    }

    /// A connection of this tunnel ended. With an error (a PING not
    /// answered, a reset) the gateway is taken as down at once; a clean
    /// end (the gateway going away, or this side letting go) is checked
    /// with a probe first. Either way it is tried again until it answers.
    fn lost(&self, error: Option<String>) {
        match error {
            Some(why) => self.mark_down(why),
            None => self.redial(),
        }
    }

    fn mark_down(&self, why: String) {
        if self.liveness.down(why.clone()) {
            tracing::warn!(gateway = %self.gateway, %why, "tunnel down; endpoints behind it count as unhealthy until it answers again");
        }
        self.redial();
    }

    /// Tries the tunnel (a probe stream) until it answers, every
    /// [`REDIAL_EVERY`], in one task at a time.
    fn redial(&self) {
        if self.redialing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                if !first {
                    tokio::time::sleep(REDIAL_EVERY).await;
                }
                first = false;
                let Some(tunnel) = me.upgrade() else { return };
                match tunnel.open_any(PROBE_TARGET).await {
                    Ok(_) => {
                        tunnel.redialing.store(false, Ordering::Release);
                        if tunnel.liveness.up() {
                            tracing::info!(gateway = %tunnel.gateway, "tunnel up again");
                        }
                        return;
                    }
                    Err(e) => {
                        if tunnel.liveness.down(e.to_string()) {
                            tracing::warn!(gateway = %tunnel.gateway, error = %e, "tunnel down; endpoints behind it count as unhealthy until it answers again");
                        }
                    }
                }
            }
        });
    }

    /// The gateway's host, for SNI.
    fn host(&self) -> &str {
        let host = self.gateway.rsplit_once(':').map_or("", |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// A stream to `target`: over QUIC when the Link prefers it and it
    /// opens in time, else over TCP. Holds its slot while it lives.
    async fn open(&self, target: &str) -> io::Result<Box<dyn Stream>> {
        if !self.liveness.is_up() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "the tunnel to {} is down ({}); retried every {REDIAL_EVERY:?}",
                    self.gateway,
                    self.liveness.why()
                ),
            ));
        }
        self.open_any(target).await
    }

    /// [`Tunnel::open`] whether or not the tunnel is taken as up.
    async fn open_any(&self, target: &str) -> io::Result<Box<dyn Stream>> {
        if let Some(quic) = &self.quic {
            let skip = *quic.skip_until.lock().unwrap_or_else(|p| p.into_inner());
            // A handshake that finished late leaves an open connection.
            let open = quic
                .conns
                .try_lock()
                .is_ok_and(|pool| pool.any_open(quic_open));
            if open || skip.is_none_or(|until| tokio::time::Instant::now() >= until) {
                match self.quic_stream(quic, target).await {
                    Ok(stream) => return Ok(Box::new(stream)),
                    // The gateway answered over QUIC: QUIC works, and TCP
                    // would get the same answer.
                    Err(e) if Refused::is(&e) => return Err(e),
                    Err(e) => {
                        *quic.skip_until.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(tokio::time::Instant::now() + QUIC_RETRY_AFTER);
                        tracing::info!(gateway = %self.gateway, error = %e, "QUIC tunnel unavailable; using TCP for {QUIC_RETRY_AFTER:?}");
                    }
                }
            }
        }
        Ok(Box::new(self.tcp_stream(target).await?))
    }

    /// One QUIC stream to `target`, its header answered with 200. A
    /// gateway's refusal (any other status) comes back as [`Refused`].
    async fn quic_stream(
        &self,
        quic: &QuicTunnel,
        target: &str,
    ) -> io::Result<Guarded<tokio::io::Join<quinn::RecvStream, quinn::SendStream>, Slot>> {
        let asked = tokio::time::Instant::now();
        let (conn, slot) = {
            let mut pool = quic.conns.lock().await;
            match pool.take(quic_open) {
                Some(((_, conn), slot)) => (conn, slot),
                None => {
                    if let Some(e) = pool.failed_since(asked) {
                        return Err(e);
                    }
                    match self.quic_connect(quic).await {
                        Ok((endpoint, conn)) => {
                            self.watch_quic(&conn);
                            let slot = pool
                                .add((endpoint, conn.clone()), true)
                                .expect("the first stream's slot");
                            (conn, slot)
                        }
                        Err(e) => {
                            pool.fail(&e);
                            return Err(e);
                        }
                    }
                }
            }
        };
        let (send, recv, status) = within(
            self.connect_timeout,
            || format!("a QUIC stream to {target} through {}", self.gateway),
            async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(io::Error::other)?;
                let header = encode_header(target).map_err(io::Error::other)?;
                send.write_all(&header).await.map_err(io::Error::other)?;
                let mut status = [0u8; 2];
                recv.read_exact(&mut status)
                    .await
                    .map_err(io::Error::other)?;
                Ok((send, recv, u16::from_be_bytes(status)))
            },
        )
        .await?;
        if status != 200 {
            return Err(io::Error::other(Refused {
                gateway: self.gateway.clone(),
                target: target.to_owned(),
                status,
            }));
        }
        Ok(Guarded {
            stream: tokio::io::join(recv, send),
            guard: slot,
        })
    }

    /// Tells the tunnel when `conn` ends: an idle timeout (keep-alives not
    /// answered) or a reset takes the gateway as down.
    fn watch_quic(&self, conn: &quinn::Connection) {
        let (conn, me) = (conn.clone(), self.me.clone());
        tokio::spawn(async move {
            let reason = conn.closed().await;
            let Some(tunnel) = me.upgrade() else { return };
            match reason {
                quinn::ConnectionError::LocallyClosed => tunnel.lost(None),
                e => tunnel.lost(Some(format!("QUIC tunnel connection lost: {e}"))),
            }
        });
    }

    /// A new QUIC tunnel connection, if it opens within the fallback time.
    async fn quic_connect(&self, quic: &QuicTunnel) -> io::Result<QuicConn> {
        let addr = self.dns.resolve(&self.gateway).await?[0];
        let bind: std::net::SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("an address")
        } else {
            "[::]:0".parse().expect("an address")
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(quic.config.clone());
        let host = match self.host() {
            "" => "gateway",
            host => host,
        };
        let connecting = endpoint.connect(addr, host).map_err(io::Error::other)?;
        let mut handshake = tokio::spawn(connecting);
        match tokio::time::timeout(QUIC_FALLBACK_AFTER, &mut handshake).await {
            Ok(done) => {
                let conn = done.map_err(io::Error::other)?.map_err(io::Error::other)?;
                Ok((endpoint, conn))
            }
            Err(_) => {
                // Slow is not blocked: this stream takes TCP, but the
                // handshake goes on, and if it opens, later streams use
                // QUIC again without waiting out the retry time.
                let (conns, skip) = (quic.conns.clone(), quic.skip_until.clone());
                let me = self.me.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(conn)) = handshake.await {
                        if let Some(tunnel) = me.upgrade() {
                            tunnel.watch_quic(&conn);
                        }
                        conns.lock().await.add((endpoint, conn), false);
                        *skip.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                });
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the QUIC handshake with {} took over {QUIC_FALLBACK_AFTER:?}",
                        self.gateway
                    ),
                ))
            }
        }
    }

    /// Over TCP: a CONNECT stream to `target` on a tunnel connection.
    async fn tcp_stream(
        &self,
        target: &str,
    ) -> io::Result<Guarded<TokioIo<hyper::upgrade::Upgraded>, Slot>> {
        let (mut send, slot) = self.session().await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .body(Empty::new())
            .map_err(io::Error::other)?;
        let mut resp = within(
            self.connect_timeout,
            || format!("CONNECT {target} through {}", self.gateway),
            async { send.send_request(req).await.map_err(io::Error::other) },
        )
        .await?;
        if resp.status() != StatusCode::OK {
            return Err(io::Error::other(Refused {
                gateway: self.gateway.clone(),
                target: target.to_owned(),
                status: resp.status().as_u16(),
            }));
        }
        let stream = hyper::upgrade::on(&mut resp)
            .await
            .map_err(io::Error::other)?;
        Ok(Guarded {
            stream: TokioIo::new(stream),
            guard: slot,
        })
    }

    /// A TCP connection to the gateway: each of its addresses in turn.
    async fn connect_tcp(&self) -> io::Result<TcpStream> {
        let mut last = None;
        for addr in self.dns.resolve(&self.gateway).await? {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the gateway resolves to nothing")))
    }

    /// A TCP tunnel connection with room for one more stream (its slot
    /// taken): an open one, or a new one.
    async fn session(&self) -> io::Result<(SendRequest<Empty<Bytes>>, Slot)> {
        let asked = tokio::time::Instant::now();
        let mut pool = self.tcp.lock().await;
        if let Some(open) = pool.take(tcp_open) {
            return Ok(open);
        }
        if let Some(e) = pool.failed_since(asked) {
            return Err(e);
        }
        let opened = within(
            self.connect_timeout,
            || format!("a tunnel connection to {}", self.gateway),
            async {
                let tcp = self.connect_tcp().await?;
                tcp.set_nodelay(true)?;
                let name =
                    ServerName::try_from(self.host().to_owned()).map_err(io::Error::other)?;
                let tls = TlsConnector::from(self.gateway_tls.clone())
                    .connect(name, tcp)
                    .await?;
                if tls.get_ref().1.alpn_protocol() != Some(ALPN_TUNNEL) {
                    return Err(io::Error::other(format!(
                        "{} is not a Mesh gateway (no tunnel ALPN)",
                        self.gateway
                    )));
                }
                hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(PING_EVERY)
                    .keep_alive_timeout(PING_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(io::Error::other)
            },
        )
        .await;
        let (send, conn) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                pool.fail(&e);
                return Err(e);
            }
        };
        let (gateway, me) = (self.gateway.clone(), self.me.clone());
        tokio::spawn(async move {
            let ended = conn.await;
            tracing::debug!(%gateway, ?ended, "tunnel connection ended");
            let Some(tunnel) = me.upgrade() else { return };
            tunnel.lost(
                ended
                    .err()
                    .map(|e| format!("tunnel connection lost: {}", super::errors::with_causes(&e))),
            );
        });
        let slot = pool
            .add(send.clone(), true)
            .expect("the first stream's slot");
        Ok((send, slot))
    }
}

/// The tunnels one proxy holds: one [`Tunnel`] per gateway (address,
/// identity, transport), shared by every destination behind it. DESIGN.md
/// section 4 keys tunnel connections by gateway and client identity; a
/// `Gateways` belongs to one proxy, so to one identity. A tunnel closes when
/// the last destination using it is gone. A component that wants a tunnel
/// of its own (the service mirror, the benchmark) uses a `Gateways` of its
/// own.
#[derive(Clone)]
pub struct Gateways {
    tunnels: Arc<std::sync::Mutex<HashMap<GatewayKey, Weak<Tunnel>>>>,
    connect_timeout: std::time::Duration,
}

impl Default for Gateways {
    fn default() -> Self {
        Self::new(crate::env::CONNECT_TIMEOUT)
    }
}

/// A gateway's address, its identity, and whether QUIC is tried first.
type GatewayKey = (String, SpiffeId, bool);

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Gateways {
    /// Tunnels whose connections and streams must be set up within
    /// `connect_timeout`.
    pub fn new(connect_timeout: std::time::Duration) -> Self {
        Self {
            tunnels: Arc::default(),
            connect_timeout,
        }
    }

    /// A connector to `target` behind the gateway at `gateway` (which must
    /// present `gateway_id`), sharing the tunnel to that gateway; the inner
    /// session expects `destination`. With `quic`, QUIC is tried first.
    #[allow(clippy::too_many_arguments)]
    pub fn connector(
        &self,
        gateway: &str,
        gateway_id: SpiffeId,
        target: &str,
        destination: ExpectedIdentity,
        quic: bool,
        creds: &CredentialStore,
        bundles: &BundleStore,
    ) -> Result<TunnelConnector, String> {
        let tunnel = {
            let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
            tunnels.retain(|_, tunnel| tunnel.strong_count() > 0);
            let key = (gateway.to_owned(), gateway_id, quic);
            match tunnels.get(&key).and_then(Weak::upgrade) {
                Some(tunnel) => tunnel,
                None => {
                    let tunnel = Tunnel::new(
                        gateway,
                        key.1.clone(),
                        quic,
                        (creds, bundles),
                        self.connect_timeout,
                    )?;
                    tunnels.insert(key, Arc::downgrade(&tunnel));
                    tunnel
                }
            }
        };
        TunnelConnector::through(tunnel, target, destination, creds, bundles)
    }
}

/// One destination behind one gateway.
#[derive(Clone)]
pub struct TunnelConnector {
    /// The tunnel to the gateway, shared with other destinations behind it.
    tunnel: Arc<Tunnel>,
    /// What to ask the gateway for.
    target: String,
    /// mTLS to the destination proxy, expecting one of its identities: one
    /// config per ALPN ([`Inner`]).
    inner_tls: [Arc<ClientConfig>; 3],
}

impl std::fmt::Debug for TunnelConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConnector")
            .field("gateway", &self.tunnel.gateway)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TunnelConnector {
    fn through(
        tunnel: Arc<Tunnel>,
        target: &str,
        destination: ExpectedIdentity,
        creds: &CredentialStore,
        bundles: &BundleStore,
    ) -> Result<Self, String> {
        let config =
            |alpn: &[u8]| tls_config(creds, bundles, destination.clone(), alpn).map(Arc::new);
        Ok(Self {
            tunnel,
            target: target.to_owned(),
            inner_tls: [
                config(b"h2")?,
                config(crate::wire::ALPN_TCP)?,
                config(crate::upgrade::ALPN_HTTP1)?,
            ],
        })
    }

    /// `host:port` of the gateway.
    pub fn gateway(&self) -> &str {
        &self.tunnel.gateway
    }

    /// Whether the tunnel to the gateway is up.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.tunnel.liveness.clone()
    }

    /// A stream to the destination proxy for pooled HTTP/2, mTLS done: over
    /// QUIC when the Link prefers it and it opens in time, else over TCP.
    pub async fn connect(&self) -> io::Result<MeshIo> {
        self.connect_carrying(Inner::H2).await.map(MeshIo::new)
    }

    /// A stream to the destination proxy whose inner mTLS session carries
    /// `inner` (its ALPN, checked).
    pub async fn connect_carrying(&self, inner: Inner) -> io::Result<Box<dyn Stream>> {
        let stream = self.tunnel.open(&self.target).await?;
        self.inner(stream, inner).await
    }

    /// Our own mTLS session with the destination proxy, inside `stream`.
    async fn inner(&self, stream: Box<dyn Stream>, inner: Inner) -> io::Result<Box<dyn Stream>> {
        let host = self.target.rsplit_once(':').map_or("mesh", |(h, _)| h);
        let name = ServerName::try_from(host.to_owned()).map_err(io::Error::other)?;
        let tls = within(
            self.tunnel.connect_timeout,
            || format!("mTLS to {} through {}", self.target, self.tunnel.gateway),
            TlsConnector::from(self.inner_tls[inner as usize].clone()).connect(name, stream),
        )
        .await?;
        let want = match inner {
            Inner::H2 => None,
            Inner::Tcp => Some(crate::wire::ALPN_TCP),
            Inner::Http1 => Some(crate::upgrade::ALPN_HTTP1),
        };
        if let Some(want) = want
            && tls.get_ref().1.alpn_protocol() != Some(want)
        {
            return Err(io::Error::other(format!(
                "the destination's proxy behind {} does not carry {inner:?} connections",
                self.tunnel.gateway
            )));
        }
        Ok(Box::new(tls))
    }

    /// Asks the gateway whether it is ready (`CONNECT` to the probe
    /// target, over a TCP tunnel connection).
    pub async fn probe(&self) -> io::Result<StatusCode> {
        let (mut send, _slot) = self.tunnel.session().await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(PROBE_TARGET)
            .body(Empty::new())
            .map_err(io::Error::other)?;
        let resp = send.send_request(req).await.map_err(io::Error::other)?;
        Ok(resp.status())
    }

    /// Forgets the open TCP tunnel connections (the next stream opens a new
    /// one); streams on them carry on.
    pub async fn reset(&self) {
        self.tunnel.tcp.lock().await.conns.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_STREAMS, Pool};

    #[test]
    fn a_connection_carries_at_most_max_streams_and_gets_them_back() {
        let mut pool = Pool::default();
        let first = pool.add("a", true).expect("the first stream's slot");
        let mut slots = vec![first];
        for _ in 1..MAX_STREAMS {
            slots.push(pool.take(|_| true).expect("room on a").1);
        }
        assert!(pool.take(|_| true).is_none(), "a is full");
        // A connection added without a stream has room for all of them.
        assert!(pool.add("b", false).is_none());
        assert_eq!(pool.take(|_| true).map(|(c, _)| c), Some("b"));
        // A stream that ends gives its place back on its own connection.
        slots.pop();
        let (conn, _slot) = pool.take(|c| *c == "a").expect("room on a again");
        assert_eq!(conn, "a");
        // Closed connections are forgotten.
        assert!(pool.take(|_| false).is_none());
        assert!(!pool.any_open(|_| true));
    }

    #[tokio::test]
    async fn streams_that_waited_for_a_failed_attempt_take_its_answer() {
        let mut pool = Pool::<&str>::default();
        let asked = tokio::time::Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        pool.fail(&std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "a tunnel connection to g:4143 timed out after 1s",
        ));
        let e = pool.failed_since(asked).expect("the attempt it waited for");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("timed out"), "{e}");
        // A stream that asks after the failure makes an attempt of its own.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        assert!(pool.failed_since(tokio::time::Instant::now()).is_none());
    }
}
