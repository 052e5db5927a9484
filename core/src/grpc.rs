//! gRPC over Mesh's TLS.
//!
//! Server side: [`tls_incoming`] accepts TCP, runs each TLS handshake in its
//! own task (a slow client never blocks the accept loop), and hands tonic
//! connections tagged with the verified peer ([`PeerInfo`]). A handler reads
//! it with [`peer`].
//!
//! Client side: [`channel`] dials through our rustls client config, so the
//! server is checked against the SPIFFE ID the caller expects.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, server::Connected};

use crate::identity::{SpiffeId, tls::peer_identity};

/// The ALPN protocol gRPC rides on.
pub const ALPN_H2: &[u8] = b"h2";
/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a gRPC connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified SPIFFE ID, when the client presented a certificate.
    pub identity: Option<SpiffeId>,
}

/// The verified peer of a request, as tagged by [`tls_incoming`].
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// A server TLS connection that tells tonic who the peer is.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Called for every refused handshake, with the peer address and the error
/// (use `identity::tls::verify_error` to get the reason).
pub type OnRefused = Arc<dyn Fn(SocketAddr, &io::Error) + Send + Sync>;

/// Accepts TLS connections on `listener` for a tonic server
/// (`serve_with_incoming`). The stream ends when the listener fails.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    on_refused: OnRefused,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, on_refused) = (acceptor.clone(), tx.clone(), on_refused.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return on_refused(remote, &e),
                    Err(_) => {
                        let e = io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out");
                        return on_refused(remote, &e);
                    }
                };
                let identity = peer_identity(tls.get_ref().1);
                let info = PeerInfo { remote, identity };
                let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Sets the ALPN protocol gRPC needs on a server config.
pub fn grpc_server_config(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("invalid gRPC target {target:?}: {reason}")]
pub struct ChannelError {
    target: String,
    reason: String,
}

/// A lazily connecting gRPC channel to `target` (`host:port`) through TLS
/// with `config` (which decides the server identity accepted). Reconnects
/// on its own after failures.
/// How long a client channel's TCP connect and TLS handshake may take.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

pub fn channel(target: &str, mut config: ClientConfig) -> Result<Channel, ChannelError> {
    let err = |reason: String| ChannelError {
        target: target.to_owned(),
        reason,
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let config = Arc::new(config);
    let endpoint = Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        // TCP and TLS together: a peer (or a middlebox) that accepts the
        // connection and then says nothing must not stall the channel.
        let connect = async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        };
        async move {
            tokio::time::timeout(CONNECT_DEADLINE, connect)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no TLS session within {CONNECT_DEADLINE:?}"),
                    )
                })?
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}
