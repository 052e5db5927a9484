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

use super::endpoint::{MeshIo, Stream};

/// ALPN of a tunnel connection to a gateway.
pub const ALPN_TUNNEL: &[u8] = b"mesh-tunnel/h2";
/// The reserved target that leads to the gateway's own control plane API.
pub const FEDERATION_TARGET: &str = "federation.mesh-system.mesh:8086";
/// The reserved target the gateway answers itself: 200 while ready.
pub const PROBE_TARGET: &str = "probe.mesh-system.mesh:4191";

/// One destination behind one gateway.
#[derive(Clone)]
pub struct TunnelConnector {
    /// `host:port` of the gateway (names are resolved on each new tunnel).
    pub gateway: String,
    /// mTLS to the gateway, expecting its identity, ALPN `mesh-tunnel/h2`.
    pub gateway_tls: Arc<ClientConfig>,
    /// What to ask the gateway for.
    pub target: String,
    /// mTLS to the destination proxy, expecting one of its identities.
    pub inner_tls: Arc<ClientConfig>,
    /// The open tunnel connection, shared by every stream to this gateway.
    pub session: Arc<Mutex<Option<SendRequest<Empty<Bytes>>>>>,
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
    /// A stream to the destination proxy, mTLS done.
    pub async fn connect(&self) -> io::Result<MeshIo> {
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
        let host = self.target.rsplit_once(':').map_or("mesh", |(h, _)| h);
        let name = ServerName::try_from(host.to_owned()).map_err(io::Error::other)?;
        let inner = TlsConnector::from(self.inner_tls.clone())
            .connect(name, TokioIo::new(stream))
            .await?;
        Ok(MeshIo::new(Box::new(inner) as Box<dyn Stream>))
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

    /// The tunnel connection to the gateway: the open one, or a new one.
    async fn session(&self) -> io::Result<SendRequest<Empty<Bytes>>> {
        let mut session = self.session.lock().await;
        if let Some(send) = session.as_mut()
            && !send.is_closed()
            && send.ready().await.is_ok()
        {
            return Ok(send.clone());
        }
        let tcp = TcpStream::connect(&self.gateway).await?;
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
