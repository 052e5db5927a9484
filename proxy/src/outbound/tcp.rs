//! Connections of their own to a meshed destination: mTLS to an endpoint's
//! proxy expecting the SPIFFE ID discovery gave. For opaque TCP, ALPN
//! `mesh-tcp/1`, then the app port (2 bytes, big endian), then raw bytes
//! both ways; for an HTTP/1.1 upgrade (WebSocket), ALPN `http/1.1` and one
//! request (`upgrade.rs`).
//!
//! Endpoints are balanced with tower's power-of-two-choices over the number
//! of connections each has open: a connection counts until it closes, so
//! long-lived streams spread evenly. A meshed endpoint without a proxy port
//! is refused, never reached in plaintext.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use mesh_core::{
    api::v1::DiscoveryUpdate,
    identity::{ExpectedIdentity, SpiffeId, tls::client_config},
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;
use tower::{
    balance::p2c::Balance,
    buffer::Buffer,
    load::{PendingRequestsDiscover, completion::TrackCompletion, pending_requests::Handle},
    util::BoxService,
};

use super::{
    balance::{Via, follow_endpoints},
    endpoint::{Dialer, Guarded, Stream, within},
    errors::OutboundError,
    tunnel::{Inner, TunnelConnector},
};
use crate::{upgrade::ALPN_HTTP1, wire::ALPN_TCP};

/// What a connection will carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// Raw bytes to the app port.
    Opaque,
    /// One HTTP/1.1 upgrade request, then raw bytes.
    Http1Upgrade,
}

/// Connections waiting in front of one destination's balancer.
const QUEUE: usize = 1_000;

/// An open mTLS connection to an endpoint's proxy (directly or inside a
/// gateway tunnel), carrying opaque bytes. It counts toward its endpoint's
/// load until dropped.
pub type MeshTcp = Guarded<Box<dyn Stream>, TcpGuard>;

/// What an opaque connection carries along.
#[derive(Debug)]
pub struct TcpGuard {
    /// The app port on the endpoint this connection is for.
    pub app_port: u16,
    load: Option<Handle>,
}

/// An opaque connection for `app_port`, not yet counted as load.
fn mesh_tcp(stream: Box<dyn Stream>, app_port: u16) -> MeshTcp {
    Guarded {
        stream,
        guard: TcpGuard {
            app_port,
            load: None,
        },
    }
}

/// Keeps the load handle with the connection, so an endpoint's load is
/// the number of connections open to it.
#[derive(Clone, Copy, Debug, Default)]
pub struct WhileOpen;

impl TrackCompletion<Handle, MeshTcp> for WhileOpen {
    type Output = MeshTcp;

    fn track_completion(&self, handle: Handle, mut conn: MeshTcp) -> MeshTcp {
        conn.guard.load = Some(handle);
        conn
    }
}

/// One endpoint: opens a connection per call.
#[derive(Clone, Debug)]
pub struct TcpEndpoint {
    app: SocketAddr,
    identity: Option<SpiffeId>,
    proxy_port: u16,
    /// For opaque TCP and for upgrades (they differ in ALPN).
    tls: Option<(Arc<ClientConfig>, Arc<ClientConfig>)>,
    /// In a linked cluster: its gateway's tunnel (or why there is none).
    /// `app` then carries only the destination's app port.
    tunnel: Option<Result<TunnelConnector, String>>,
    /// For the TCP connect and the TLS handshake together.
    connect_timeout: Duration,
}

impl TcpEndpoint {
    fn new(
        app: SocketAddr,
        identity: Option<SpiffeId>,
        proxy_port: u16,
        via: Option<&Via>,
        dialer: &Dialer,
    ) -> Self {
        let routed = dialer.via_for(app, identity.as_ref(), proxy_port, via);
        if let Some(via) = &routed {
            return Self {
                app,
                identity,
                proxy_port,
                tls: None,
                tunnel: Some(via.connector(dialer)),
                connect_timeout: dialer.connect_timeout,
            };
        }
        let tls = identity.as_ref().and_then(|id| {
            let config = |alpn: &[u8]| {
                let mut tls = client_config(
                    dialer.creds.clone(),
                    dialer.bundles.clone(),
                    ExpectedIdentity::Exact(id.clone()),
                )
                .ok()?;
                tls.alpn_protocols = vec![alpn.to_vec()];
                Some(Arc::new(tls))
            };
            Some((config(ALPN_TCP)?, config(ALPN_HTTP1)?))
        });
        Self {
            app,
            identity,
            proxy_port,
            tls,
            tunnel: None,
            connect_timeout: dialer.connect_timeout,
        }
    }

    async fn open(self, carry: Carry) -> Result<MeshTcp, OutboundError> {
        if let Some(tunnel) = self.tunnel {
            // Through the linked cluster's gateway: our own mTLS session
            // with the destination proxy inside the tunnel stream.
            let tunnel = tunnel.map_err(OutboundError::Connect)?;
            let inner = match carry {
                Carry::Opaque => Inner::Tcp,
                Carry::Http1Upgrade => Inner::Http1,
            };
            let mut stream = tunnel
                .connect_carrying(inner)
                .await
                .map_err(OutboundError::connect)?;
            if carry == Carry::Opaque {
                stream
                    .write_all(&self.app.port().to_be_bytes())
                    .await
                    .map_err(OutboundError::connect)?;
            }
            return Ok(mesh_tcp(stream, self.app.port()));
        }
        let Some(id) = self.identity else {
            // Discovery lists only meshed workloads; an endpoint without an
            // identity has nothing to verify, so it is not dialled at all.
            return Err(OutboundError::Connect(format!(
                "endpoint {} has no identity to verify",
                self.app
            )));
        };
        let (Some((opaque, upgrade)), true) = (self.tls, self.proxy_port != 0) else {
            return Err(OutboundError::MeshedWithoutProxy(id));
        };
        let (tls, alpn) = match carry {
            Carry::Opaque => (opaque, ALPN_TCP),
            Carry::Http1Upgrade => (upgrade, ALPN_HTTP1),
        };
        let addr = SocketAddr::new(self.app.ip(), self.proxy_port);
        let mut stream = within(self.connect_timeout, || format!("mTLS to {addr}"), async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            TlsConnector::from(tls)
                .connect(ServerName::from(addr.ip()), tcp)
                .await
        })
        .await
        .map_err(OutboundError::connect)?;
        if stream.get_ref().1.alpn_protocol() != Some(alpn) {
            return Err(OutboundError::Connect(format!(
                "the endpoint's proxy does not carry {carry:?} connections"
            )));
        }
        if carry == Carry::Opaque {
            stream
                .write_all(&self.app.port().to_be_bytes())
                .await
                .map_err(OutboundError::connect)?;
        }
        Ok(mesh_tcp(Box::new(stream), self.app.port()))
    }
}

impl tower::Service<Carry> for TcpEndpoint {
    type Response = MeshTcp;
    type Error = OutboundError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshTcp, OutboundError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), OutboundError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, carry: Carry) -> Self::Future {
        Box::pin(self.clone().open(carry))
    }
}

pub type TcpBalancer =
    Buffer<Carry, Pin<Box<dyn Future<Output = Result<MeshTcp, tower::BoxError>> + Send>>>;

/// A connection balancer following one destination's `updates`.
pub fn tcp_balancer(
    updates: watch::Receiver<Option<Arc<DiscoveryUpdate>>>,
    dialer: Dialer,
) -> TcpBalancer {
    let changes = follow_endpoints(
        updates,
        move |key| {
            TcpEndpoint::new(
                key.addr(),
                // No ID (or one that does not parse) is refused when dialled.
                key.identity().ok().flatten(),
                key.proxy_port(),
                key.via(),
                &dialer,
            )
        },
        |_| {},
    );
    let discover = PendingRequestsDiscover::new(changes, WhileOpen);
    Buffer::new(BoxService::new(Balance::new(discover)), QUEUE)
}
