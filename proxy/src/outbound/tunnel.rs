//! The tunnel client: how an endpoint in a linked cluster is reached.
//!
//! Discovery gives such an endpoint as "via gateway": the remote gateway's
//! addresses and SPIFFE ID, the target authority, and the SPIFFE IDs the
//! destination may present. The proxy opens mTLS to the gateway (ALPN
//! `mesh-tunnel/h2`; SNI names only the gateway) and keeps that connection
//! for every stream to that gateway. Each new connection to the destination
//! is one HTTP/2 `CONNECT <target>` stream on it, inside which the proxy
//! runs its own mTLS session with the destination proxy, expecting one of
//! the destination's identities. The gateway sees the target, never the
//! requests.

use std::{io, sync::Arc};

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

use super::endpoint::{MeshIo, Stream};

/// ALPN of a tunnel connection to a gateway.
pub const ALPN_TUNNEL: &[u8] = b"mesh-tunnel/h2";
/// ALPN of a QUIC tunnel connection to a gateway.
pub const ALPN_QUIC: &[u8] = b"mesh-tunnel/quic";
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

/// The QUIC side of a tunnel: its config, and the open connection.
#[derive(Clone, Debug)]
pub struct QuicTunnel {
    pub config: quinn::ClientConfig,
    pub conn: Arc<Mutex<Option<(quinn::Endpoint, quinn::Connection)>>>,
    /// After QUIC failed, TCP is used until then (no second wait per
    /// connection while UDP is blocked).
    pub skip_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// How long TCP is used after QUIC did not open.
pub const QUIC_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// The reserved target that leads to the gateway's own control plane API.
pub const FEDERATION_TARGET: &str = "federation.mesh-system.mesh:8086";
/// The reserved target the gateway answers itself: 200 while ready.
pub const PROBE_TARGET: &str = "probe.mesh-system.mesh:4191";

/// One destination behind one gateway.
#[derive(Clone)]
pub struct TunnelConnector {
    /// `host:port` of the gateway (a name is resolved for each new tunnel
    /// connection, its answer cached for its TTL).
    pub gateway: String,
    /// mTLS to the gateway, expecting its identity, ALPN `mesh-tunnel/h2`.
    pub gateway_tls: Arc<ClientConfig>,
    /// What to ask the gateway for.
    pub target: String,
    /// mTLS to the destination proxy, expecting one of its identities: one
    /// config per ALPN ([`Inner`]).
    pub inner_tls: [Arc<ClientConfig>; 3],
    /// The open tunnel connection, shared by every stream to this gateway.
    pub session: Arc<Mutex<Option<SendRequest<Empty<Bytes>>>>>,
    /// Tunnel over QUIC first, when the Link prefers it.
    pub quic: Option<QuicTunnel>,
    /// Resolves the gateway's name (cached for each answer's TTL).
    pub dns: crate::dns::Dns,
}

impl std::fmt::Debug for TunnelConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConnector")
            .field("gateway", &self.gateway)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TunnelConnector {
    /// A connector to `target` behind the gateway at `gateway` (which must
    /// present `gateway_id`); the inner session expects `destination`.
    /// With `quic`, QUIC is tried first.
    pub fn new(
        gateway: &str,
        gateway_id: SpiffeId,
        target: &str,
        destination: ExpectedIdentity,
        quic: bool,
        creds: &CredentialStore,
        bundles: &BundleStore,
    ) -> Result<Self, String> {
        let config = |expected, alpn: &[u8]| {
            let mut tls = client_config(creds.clone(), bundles.clone(), expected)
                .map_err(|e| format!("TLS configuration: {e}"))?;
            tls.alpn_protocols = vec![alpn.to_vec()];
            Ok::<_, String>(tls)
        };
        let quic = if quic {
            let tls = config(ExpectedIdentity::Exact(gateway_id.clone()), ALPN_QUIC)?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                .map_err(|e| format!("QUIC TLS: {e}"))?;
            Some(QuicTunnel {
                config: quinn::ClientConfig::new(Arc::new(crypto)),
                conn: Arc::default(),
                skip_until: Arc::default(),
            })
        } else {
            None
        };
        Ok(Self {
            gateway: gateway.to_owned(),
            gateway_tls: Arc::new(config(ExpectedIdentity::Exact(gateway_id), ALPN_TUNNEL)?),
            target: target.to_owned(),
            inner_tls: [
                Arc::new(config(destination.clone(), b"h2")?),
                Arc::new(config(destination.clone(), crate::inbound::ALPN_TCP)?),
                Arc::new(config(destination, crate::upgrade::ALPN_HTTP1)?),
            ],
            session: Arc::default(),
            quic,
            dns: crate::dns::Dns::system(),
        })
    }

    /// A stream to the destination proxy for pooled HTTP/2, mTLS done: over
    /// QUIC when the Link prefers it and it opens in time, else over TCP.
    pub async fn connect(&self) -> io::Result<MeshIo> {
        self.connect_carrying(Inner::H2).await.map(MeshIo::new)
    }

    /// A stream to the destination proxy whose inner mTLS session carries
    /// `inner` (its ALPN, checked).
    pub async fn connect_carrying(&self, inner: Inner) -> io::Result<Box<dyn Stream>> {
        if let Some(quic) = &self.quic {
            let skip = *quic.skip_until.lock().unwrap_or_else(|p| p.into_inner());
            // A handshake that finished late leaves an open connection.
            let open = quic
                .conn
                .try_lock()
                .is_ok_and(|o| o.as_ref().is_some_and(|(_, c)| c.close_reason().is_none()));
            if open || skip.is_none_or(|until| tokio::time::Instant::now() >= until) {
                match self.quic_stream(quic).await {
                    Ok(stream) => return self.inner(stream, inner).await,
                    Err(e) => {
                        *quic.skip_until.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(tokio::time::Instant::now() + QUIC_RETRY_AFTER);
                        tracing::info!(gateway = %self.gateway, error = %e, "QUIC tunnel unavailable; using TCP for {QUIC_RETRY_AFTER:?}");
                    }
                }
            }
        }
        let stream = self.tcp_connect().await?;
        self.inner(stream, inner).await
    }

    /// One QUIC stream to the target, its header answered with 200.
    async fn quic_stream(
        &self,
        quic: &QuicTunnel,
    ) -> io::Result<tokio::io::Join<quinn::RecvStream, quinn::SendStream>> {
        let conn = {
            let mut open = quic.conn.lock().await;
            match open.as_ref() {
                Some((_, conn)) if conn.close_reason().is_none() => conn.clone(),
                _ => {
                    let addr = self.dns.resolve(&self.gateway).await?[0];
                    let bind: std::net::SocketAddr = if addr.is_ipv4() {
                        "0.0.0.0:0".parse().expect("an address")
                    } else {
                        "[::]:0".parse().expect("an address")
                    };
                    let mut endpoint = quinn::Endpoint::client(bind)?;
                    endpoint.set_default_client_config(quic.config.clone());
                    let host = self.gateway.rsplit_once(':').map_or("gateway", |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let connecting = endpoint.connect(addr, host).map_err(io::Error::other)?;
                    let mut handshake = tokio::spawn(connecting);
                    match tokio::time::timeout(QUIC_FALLBACK_AFTER, &mut handshake).await {
                        Ok(done) => {
                            let conn = done.map_err(io::Error::other)?.map_err(io::Error::other)?;
                            *open = Some((endpoint, conn.clone()));
                            conn
                        }
                        Err(_) => {
                            // Slow is not blocked: this stream takes TCP, but the
                            // handshake goes on, and if it opens, later streams
                            // use QUIC again without waiting out the retry time.
                            let (slot, skip) = (quic.conn.clone(), quic.skip_until.clone());
                            tokio::spawn(async move {
                                if let Ok(Ok(conn)) = handshake.await {
                                    *slot.lock().await = Some((endpoint, conn));
                                    *skip.lock().unwrap_or_else(|p| p.into_inner()) = None;
                                }
                            });
                            return Err(io::Error::from(io::ErrorKind::TimedOut));
                        }
                    }
                }
            }
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(io::Error::other)?;
        let header = encode_header(&self.target).map_err(io::Error::other)?;
        send.write_all(&header).await.map_err(io::Error::other)?;
        let mut status = [0u8; 2];
        recv.read_exact(&mut status)
            .await
            .map_err(io::Error::other)?;
        let status = u16::from_be_bytes(status);
        if status != 200 {
            return Err(io::Error::other(format!(
                "gateway {} refused {}: {status}",
                self.gateway, self.target
            )));
        }
        Ok(tokio::io::join(recv, send))
    }

    /// Our own mTLS session with the destination proxy, inside `stream`.
    async fn inner<S>(&self, stream: S, inner: Inner) -> io::Result<Box<dyn Stream>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let host = self.target.rsplit_once(':').map_or("mesh", |(h, _)| h);
        let name = ServerName::try_from(host.to_owned()).map_err(io::Error::other)?;
        let tls = TlsConnector::from(self.inner_tls[inner as usize].clone())
            .connect(name, stream)
            .await?;
        let want = match inner {
            Inner::H2 => None,
            Inner::Tcp => Some(crate::inbound::ALPN_TCP),
            Inner::Http1 => Some(crate::upgrade::ALPN_HTTP1),
        };
        if let Some(want) = want
            && tls.get_ref().1.alpn_protocol() != Some(want)
        {
            return Err(io::Error::other(format!(
                "the destination's proxy behind {} does not carry {inner:?} connections",
                self.gateway
            )));
        }
        Ok(Box::new(tls))
    }

    /// Over the TCP tunnel: a CONNECT stream on the shared connection.
    async fn tcp_connect(&self) -> io::Result<TokioIo<hyper::upgrade::Upgraded>> {
        let mut send = self.session().await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.target.as_str())
            .body(Empty::new())
            .map_err(io::Error::other)?;
        let mut resp = send.send_request(req).await.map_err(io::Error::other)?;
        if resp.status() != StatusCode::OK {
            return Err(io::Error::other(format!(
                "gateway {} refused {}: {}",
                self.gateway,
                self.target,
                resp.status()
            )));
        }
        let stream = hyper::upgrade::on(&mut resp)
            .await
            .map_err(io::Error::other)?;
        Ok(TokioIo::new(stream))
    }

    /// Asks the gateway whether it is ready (`CONNECT` to the probe
    /// target, over the shared tunnel connection).
    pub async fn probe(&self) -> io::Result<StatusCode> {
        let mut send = self.session().await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(PROBE_TARGET)
            .body(Empty::new())
            .map_err(io::Error::other)?;
        let resp = send.send_request(req).await.map_err(io::Error::other)?;
        Ok(resp.status())
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

    /// The tunnel connection to the gateway: the open one, or a new one.
    async fn session(&self) -> io::Result<SendRequest<Empty<Bytes>>> {
        let mut session = self.session.lock().await;
        if let Some(send) = session.as_mut()
            && !send.is_closed()
            && send.ready().await.is_ok()
        {
            return Ok(send.clone());
        }
        let tcp = self.connect_tcp().await?;
        tcp.set_nodelay(true)?;
        let host = self.gateway.rsplit_once(':').map_or("", |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(io::Error::other)?;
        let tls = TlsConnector::from(self.gateway_tls.clone())
            .connect(name, tcp)
            .await?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_TUNNEL) {
            return Err(io::Error::other(format!(
                "{} is not a Mesh gateway (no tunnel ALPN)",
                self.gateway
            )));
        }
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(io::Error::other)?;
        let gateway = self.gateway.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%gateway, error = %e, "tunnel connection ended");
            }
        });
        *session = Some(send.clone());
        Ok(send)
    }
}
