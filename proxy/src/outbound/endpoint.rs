//! connect: one endpoint as a tower service. A meshed endpoint is reached
//! with mTLS on its proxy port, expecting exactly the SPIFFE ID discovery
//! gave (a mismatch fails the handshake before any request byte is sent),
//! over HTTP/2 with pooled connections. An endpoint discovery says is not
//! meshed is reached in plaintext on its app address. A meshed endpoint is
//! never reached in plaintext.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use mesh_core::identity::{
    BundleStore, CredentialStore, ExpectedIdentity, SpiffeId, tls::client_config,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    balance::Via,
    errors::OutboundError,
    tunnel::{Gateways, TunnelConnector},
};
use crate::{
    h2_client::{Dial, H2Endpoint},
    wire::{Body, DST_PORT},
};

pub use crate::wire::Stream;

/// What the outbound side needs to reach a meshed peer: this proxy's
/// credentials, the trust bundles, its tunnels to gateways, and how long
/// reaching a peer may take.
#[derive(Clone, Debug)]
pub struct Dialer {
    pub creds: CredentialStore,
    pub bundles: BundleStore,
    pub gateways: Gateways,
    pub connect_timeout: Duration,
    /// Set for a workload whose only route is to its cluster's gateway:
    /// every meshed endpoint is reached through it.
    pub route: Option<crate::env::GatewayRoute>,
}

impl Dialer {
    pub fn new(creds: CredentialStore, bundles: BundleStore, connect_timeout: Duration) -> Self {
        Self {
            creds,
            bundles,
            gateways: Gateways::new(connect_timeout),
            connect_timeout,
            route: None,
        }
    }

    /// Reaches every meshed endpoint through `route` when it is set.
    pub fn with_route(mut self, route: Option<crate::env::GatewayRoute>) -> Self {
        self.route = route;
        self
    }

    /// How an endpoint is reached: `via` as discovery said, or, for a
    /// workload behind its gateway, through the gateway to the endpoint's
    /// proxy address (`ip:proxy_port`, which the gateway checks is a
    /// meshed workload's).
    pub fn via_for(
        &self,
        app_addr: SocketAddr,
        identity: Option<&SpiffeId>,
        proxy_port: u16,
        via: Option<&Via>,
    ) -> Option<Via> {
        if let Some(via) = via {
            return Some(via.clone());
        }
        let route = self.route.as_ref()?;
        let id = identity?;
        (proxy_port != 0).then(|| Via {
            gateway: route.address.clone(),
            quic: false,
            gateway_identity: route.identity.to_string(),
            target: SocketAddr::new(app_addr.ip(), proxy_port).to_string(),
            identities: vec![id.to_string()],
        })
    }
}

/// `work`, or a `TimedOut` error naming `what` once `after` has passed.
pub async fn within<T>(
    after: Duration,
    what: impl FnOnce() -> String,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(after, work).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{} timed out after {after:?}", what()),
        ))
    })
}

/// A stream and what must live exactly as long as it: a balancer's load
/// handle, a stream's slot on its tunnel connection.
pub struct Guarded<S, G> {
    pub stream: S,
    pub guard: G,
}

impl<S, G> std::fmt::Debug for Guarded<S, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guarded")
    }
}

impl<S: tokio::io::AsyncRead + Unpin, G: Unpin> tokio::io::AsyncRead for Guarded<S, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin, G: Unpin> tokio::io::AsyncWrite for Guarded<S, G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An mTLS stream for hyper's clients (a tonic channel through a gateway's
/// tunnel).
pub struct MeshIo(TokioIo<Box<dyn Stream>>);

impl MeshIo {
    pub fn new(stream: Box<dyn Stream>) -> Self {
        Self(TokioIo::new(stream))
    }
}

impl std::fmt::Debug for MeshIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshIo")
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Dials one endpoint's proxy with mTLS, whatever URI it is asked for:
/// directly, or through a linked cluster's gateway.
#[derive(Clone, Debug)]
pub enum MeshConnector {
    Direct {
        addr: SocketAddr,
        tls: Arc<ClientConfig>,
        /// For the TCP connect and the TLS handshake together.
        timeout: Duration,
    },
    Tunnel(TunnelConnector),
}

impl Dial for MeshConnector {
    /// A new mTLS stream to the endpoint's proxy, ALPN `h2`.
    async fn dial(&self) -> io::Result<Box<dyn Stream>> {
        match self {
            Self::Direct { addr, tls, timeout } => {
                let addr = *addr;
                let stream: TlsStream<TcpStream> =
                    within(*timeout, || format!("mTLS to {addr}"), async {
                        let tcp = TcpStream::connect(addr).await?;
                        tcp.set_nodelay(true)?;
                        // SNI carries nothing secret: the identity is checked by SPIFFE ID.
                        let name = ServerName::from(addr.ip());
                        TlsConnector::from(tls.clone()).connect(name, tcp).await
                    })
                    .await?;
                Ok(Box::new(stream))
            }
            Self::Tunnel(tunnel) => tunnel.connect_carrying(super::tunnel::Inner::H2).await,
        }
    }
}

/// Plain TCP to a destination that is not meshed, with Nagle off as on the
/// proxy's mTLS connections: a request body that follows its head (an
/// upload, a streamed body) must not wait for the destination's delayed ACK
/// of the head, 40 ms on Linux.
pub(crate) fn plain_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http
}

/// How to reach one endpoint.
#[derive(Clone, Debug)]
enum Transport {
    Meshed(H2Endpoint<MeshConnector>),
    Plain(Client<HttpConnector, Body>),
    /// Meshed but without a proxy port: refused rather than sent in plaintext.
    Refused(SpiffeId),
    /// In a linked cluster, but the tunnel cannot be set up, or an
    /// identity that does not parse (why): refused, never plaintext.
    Untunnelable(String),
}

/// The endpoint that answered, set on its responses (one extension, so
/// one allocation per response): what carried the response on the wire
/// (`mtls` or `none`; metrics read this, not what discovery said), its
/// cluster (a failover tier may be another cluster than the destination's
/// first endpoint) and the SPIFFE ID it had to present, when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedBy {
    pub tls: &'static str,
    pub cluster: Option<Arc<str>>,
    pub identity: Option<Arc<str>>,
}

/// One endpoint of a destination, as the balancer sees it.
#[derive(Clone, Debug)]
pub struct EndpointService {
    /// The app port the request is for.
    app_addr: SocketAddr,
    /// Its port as `mesh-dst-port` carries it, made once.
    dst_port: HeaderValue,
    transport: Transport,
    /// The tunnel's liveness, when reached through one.
    tunnel: Option<Arc<super::tunnel::Liveness>>,
    /// Its cluster and identity, put on its responses.
    served: ServedBy,
}

impl EndpointService {
    /// An endpoint at `app_addr` whose proxy (if meshed) listens on
    /// `proxy_port` and must present `identity`; through `via` (on the
    /// dialer's tunnel to its gateway) when it is in a linked cluster, and
    /// `app_addr` then carries only the destination's app port.
    pub fn reach(
        app_addr: SocketAddr,
        identity: Result<Option<SpiffeId>, String>,
        proxy_port: u16,
        via: Option<&Via>,
        dialer: &Dialer,
    ) -> Self {
        let served = ServedBy {
            // Set per response, by the transport that carried it.
            tls: "",
            cluster: None,
            identity: identity
                .as_ref()
                .ok()
                .and_then(Option::as_ref)
                .map(|id| Arc::from(id.to_string())),
        };
        let routed = dialer.via_for(
            app_addr,
            identity.as_ref().ok().and_then(Option::as_ref),
            proxy_port,
            via,
        );
        if let Some(via) = &routed {
            let (transport, tunnel) = match via.connector(dialer) {
                Ok(tunnel) => {
                    let liveness = tunnel.liveness();
                    (
                        Transport::Meshed(H2Endpoint::new(MeshConnector::Tunnel(tunnel), None)),
                        Some(liveness),
                    )
                }
                Err(why) => (Transport::Untunnelable(why), None),
            };
            return Self {
                app_addr,
                dst_port: HeaderValue::from(app_addr.port()),
                transport,
                tunnel,
                served,
            };
        }
        let transport = match identity {
            // Discovery sent an ID we cannot verify: fail closed.
            Err(why) => Transport::Untunnelable(why),
            Ok(None) => {
                let mut http = plain_connector();
                http.set_connect_timeout(Some(dialer.connect_timeout));
                Transport::Plain(Client::builder(TokioExecutor::new()).build(http))
            }
            Ok(Some(id)) if proxy_port == 0 => Transport::Refused(id),
            Ok(Some(id)) => match client_config(
                dialer.creds.clone(),
                dialer.bundles.clone(),
                ExpectedIdentity::Exact(id.clone()),
            ) {
                Ok(mut tls) => {
                    tls.alpn_protocols = vec![b"h2".to_vec()];
                    let connector = MeshConnector::Direct {
                        addr: SocketAddr::new(app_addr.ip(), proxy_port),
                        tls: Arc::new(tls),
                        timeout: dialer.connect_timeout,
                    };
                    // While requests are on it, a connection that goes
                    // silent (a frozen or unplugged endpoint) is closed
                    // after an unanswered PING, as a tunnel's is.
                    Transport::Meshed(H2Endpoint::new(
                        connector,
                        Some((super::tunnel::PING_EVERY, super::tunnel::PING_TIMEOUT)),
                    ))
                }
                Err(_) => Transport::Refused(id),
            },
        };
        Self {
            app_addr,
            dst_port: HeaderValue::from(app_addr.port()),
            transport,
            tunnel: None,
            served,
        }
    }

    /// Marks its responses as served by `cluster`.
    pub fn serving_cluster(mut self, cluster: &str) -> Self {
        self.served.cluster = (!cluster.is_empty()).then(|| Arc::from(cluster));
        self
    }
}

impl EndpointService {
    /// Whether the tunnel it is reached through is up (`None`: not
    /// reached through a tunnel).
    pub fn liveness(&self) -> Option<Arc<super::tunnel::Liveness>> {
        match &self.transport {
            Transport::Meshed(_) => self.tunnel.clone(),
            _ => None,
        }
    }
}

impl tower::Service<Request<Body>> for EndpointService {
    type Response = Response<Body>;
    type Error = OutboundError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, OutboundError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), OutboundError>> {
        Poll::Ready(Ok(()))
    }

    /// Each transport's future is its own box, as small as its path: the
    /// box lives as long as the request does.
    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let app_addr = self.app_addr;
        let mut served = self.served.clone();
        match &self.transport {
            Transport::Refused(id) => {
                let e = OutboundError::MeshedWithoutProxy(id.clone());
                Box::pin(std::future::ready(Err(e)))
            }
            Transport::Untunnelable(why) => {
                let e = OutboundError::Unreachable(why.clone());
                Box::pin(std::future::ready(Err(e)))
            }
            Transport::Plain(client) => {
                let client = client.clone();
                Box::pin(async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    *req.uri_mut() = format!("http://{app_addr}{path}")
                        .parse()
                        .map_err(|_| OutboundError::BadRequest)?;
                    *req.version_mut() = http::Version::HTTP_11;
                    let mut resp = client
                        .request(req)
                        .await
                        .map_err(OutboundError::from_client)?
                        .map(crate::wire::boxed);
                    served.tls = "none";
                    resp.extensions_mut().insert(served);
                    Ok(resp)
                })
            }
            Transport::Meshed(endpoint) => {
                req.headers_mut().insert(DST_PORT, self.dst_port.clone());
                *req.version_mut() = http::Version::HTTP_2;
                // The connector only makes mTLS connections (direct or
                // inside a gateway tunnel). A combinator rather than an
                // async block: it holds the send's future once
                // (`H2Endpoint::send`).
                use futures_util::FutureExt;
                served.tls = "mtls";
                Box::pin(endpoint.clone().send(req).map(move |sent| {
                    sent.map(|mut resp| {
                        resp.extensions_mut().insert(served);
                        resp
                    })
                }))
            }
        }
    }
}
