//! A VM whose only route to its cluster is to the cluster's gateway.
//!
//! - **Joining and re-enrolling** happen before the VM holds a valid
//!   certificate, so the tunnel to the gateway is opened without one; the
//!   gateway lets such a caller reach the control plane's identity service
//!   only (`mesh_core::targets::IDENTITY`). Inside the stream the agent
//!   runs its own TLS session with the control plane, verified against the
//!   pinned bundle, so the gateway sees nothing of the token.
//! - **Being called**: the agent keeps a reverse connection open to the
//!   gateway (TLS with its SVID, ALPN `mesh-reverse/h2`, a claim naming its
//!   workload); the gateway sends a `CONNECT` per caller's stream, which the
//!   agent splices into its own proxy's inbound listener, where the caller's
//!   mTLS session ends.
//!
//! Everything else (the control plane API, calls to the cluster's
//! services) is the proxy's own tunnel client with the VM's SVID.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::identity::{
    BundleStore, CredentialStore, ExpectedIdentity, SpiffeId, tls::client_config,
};
use mesh_proxy::outbound::tunnel::{ALPN_REVERSE, ALPN_TUNNEL};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::TlsConnector;

/// How long reaching the gateway, and then the control plane inside, may take.
const STEP: Duration = Duration::from_secs(10);

/// A gRPC channel to the control plane's identity service through the
/// gateway at `gateway`, with no client certificate on the tunnel.
/// `outer` checks the gateway, `inner` the control plane.
pub fn identity_channel(
    gateway: &str,
    outer: ClientConfig,
    inner: ClientConfig,
) -> Result<tonic::transport::Channel, String> {
    let (outer, inner) = (
        Arc::new(with_alpn(outer, ALPN_TUNNEL)),
        Arc::new(with_alpn(inner, b"h2")),
    );
    let gateway = gateway.to_owned();
    Ok(
        tonic::transport::Endpoint::from_static("http://identity.mesh-system.mesh")
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let (gateway, outer, inner) = (gateway.clone(), outer.clone(), inner.clone());
                async move { identity_stream(&gateway, outer, inner).await }
            })),
    )
}

fn with_alpn(mut config: ClientConfig, alpn: &[u8]) -> ClientConfig {
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// TCP and TLS to the gateway, `CONNECT` the identity target, then TLS to
/// the control plane inside the stream.
async fn identity_stream(
    gateway: &str,
    outer: Arc<ClientConfig>,
    inner: Arc<ClientConfig>,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TokioIo<hyper::upgrade::Upgraded>>>> {
    let work = async {
        let tcp = TcpStream::connect(gateway).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(outer)
            .connect(server_name("gateway.mesh-system.mesh")?, tcp)
            .await?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(io::Error::other)?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(mesh_core::targets::IDENTITY)
            .body(Empty::<Bytes>::new())
            .map_err(io::Error::other)?;
        let sent = send.send_request(req);
        // The connection lives as long as the stream on it.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sent.await.map_err(io::Error::other)?;
        if resp.status() != StatusCode::OK {
            return Err(io::Error::other(format!(
                "the gateway at {gateway} refused the way to the identity service: {}",
                resp.status()
            )));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(io::Error::other)?;
        drop(send);
        let tls = TlsConnector::from(inner)
            .connect(
                server_name("identity.mesh-system.mesh")?,
                TokioIo::new(upgraded),
            )
            .await?;
        Ok(TokioIo::new(tls))
    };
    tokio::time::timeout(STEP, work).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{gateway}: no answer in {STEP:?}"),
        )
    })?
}

fn server_name(name: &'static str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(name).map_err(io::Error::other)
}

/// Keeps the reverse connection open for as long as the agent runs,
/// reconnecting with backoff (1 s, doubling, at most 30 s).
pub async fn keep_reverse(
    gateway: String,
    gateway_id: SpiffeId,
    creds: CredentialStore,
    bundles: BundleStore,
    claim: String,
    inbound: SocketAddr,
) {
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        match reverse_once(&gateway, &gateway_id, &creds, &bundles, &claim, inbound).await {
            Ok(()) => {
                tracing::info!(%gateway, "the reverse connection to the gateway closed; reopening")
            }
            Err(e) => {
                tracing::warn!(%gateway, error = %e, "reverse connection to the gateway failed")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        let wait = mesh_proxy::identity::backoff(failures).min(Duration::from_secs(30));
        failures += 1;
        tokio::time::sleep(wait).await;
    }
}

async fn reverse_once(
    gateway: &str,
    gateway_id: &SpiffeId,
    creds: &CredentialStore,
    bundles: &BundleStore,
    claim: &str,
    inbound: SocketAddr,
) -> io::Result<()> {
    let tls = client_config(
        creds.clone(),
        bundles.clone(),
        ExpectedIdentity::Exact(gateway_id.clone()),
    )
    .map_err(io::Error::other)?;
    let tls = Arc::new(with_alpn(tls, ALPN_REVERSE));
    let mut stream = tokio::time::timeout(STEP, async {
        let tcp = TcpStream::connect(gateway).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(tls)
            .connect(server_name("gateway.mesh-system.mesh")?, tcp)
            .await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
    let len = u16::try_from(claim.len()).map_err(io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(claim.as_bytes()).await?;
    tracing::info!(%gateway, workload = %claim, "reverse connection to the gateway open");
    let svc = service_fn(move |req: Request<Incoming>| async move {
        Ok::<_, std::convert::Infallible>(carry(req, inbound))
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(mesh_proxy::outbound::tunnel::MAX_STREAMS)
        .serve_connection(TokioIo::new(stream), svc)
        .await
        .map_err(io::Error::other)
}

/// One caller's stream: splice it into our proxy's inbound listener, where
/// the caller's own mTLS session is terminated and authorized.
fn carry(req: Request<Incoming>, inbound: SocketAddr) -> Response<Full<Bytes>> {
    if req.method() != Method::CONNECT {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"CONNECT only\n")));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return resp;
    }
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let Ok(mut local) = TcpStream::connect(inbound).await else {
            tracing::warn!(%inbound, "cannot reach our own inbound listener");
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut local).await;
    });
    Response::new(Full::new(Bytes::new()))
}
