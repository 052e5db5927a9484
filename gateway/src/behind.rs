//! Workloads behind this gateway: VMs of this cluster whose only route to
//! it is to the gateway.
//!
//! - A VM keeps a *reverse* connection open: TLS with its own SVID, ALPN
//!   [`ALPN_REVERSE`], then a claim naming its workload (2-byte length,
//!   `namespace/name`), after which the roles turn: the gateway is the
//!   HTTP/2 client and sends one `CONNECT` per stream, which the VM splices
//!   into its own proxy's inbound listener. The claim is accepted only for
//!   a workload the control plane lists as behind the gateway and owned by
//!   the caller's SPIFFE ID (`Registry.WatchGatewayWorkloads`).
//! - Callers of this cluster reach such a workload with the target
//!   `<name>.<namespace>.vm.mesh:<port>`; their own mTLS session with the
//!   VM's proxy runs inside, end to end, as for any tunnel stream.
//! - The VM reaches the cluster's endpoints with `ip:port` targets, which
//!   must be a meshed workload's proxy port as discovery knows it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::{
    api::v1::{GatewayWorkloads, discovery_update::Kind},
    identity::SpiffeId,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::tunnel::{Refusal, Tunnel};

/// ALPN of a reverse connection from a workload behind the gateway.
pub use mesh_proxy::outbound::tunnel::ALPN_REVERSE;
/// The longest workload claim (`namespace/name`).
const MAX_CLAIM: usize = 128;
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream waits for the list of workloads behind the gateway.
const FAIL_FAST: Duration = Duration::from_secs(1);

/// `(namespace, name)` of a workload behind the gateway.
type WorkloadKey = (String, String);

/// The open reverse connection of each workload behind the gateway.
#[derive(Clone, Default)]
pub struct Reverse {
    connections: Arc<Mutex<HashMap<WorkloadKey, SendRequest<Empty<Bytes>>>>>,
}

impl std::fmt::Debug for Reverse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reverse").finish_non_exhaustive()
    }
}

impl Reverse {
    fn get(&self, key: &WorkloadKey) -> Option<SendRequest<Empty<Bytes>>> {
        let mut map = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(send) if send.is_closed() => {
                map.remove(key);
                None
            }
            other => other.cloned(),
        }
    }

    /// How many workloads have a reverse connection open.
    pub fn len(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| !s.is_closed())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `caller` registered a workload behind this gateway.
pub async fn is_behind(tunnel: &Tunnel, caller: &SpiffeId) -> bool {
    listed(tunnel.behind.get(&(), FAIL_FAST).await.as_deref(), |w| {
        w.spiffe_id == caller.as_str()
    })
}

fn listed(
    workloads: Option<&GatewayWorkloads>,
    pick: impl Fn(&mesh_core::api::v1::GatewayWorkload) -> bool,
) -> bool {
    workloads.is_some_and(|w| w.workloads.iter().any(pick))
}

/// A stream to workload `namespace/name` over its reverse connection.
pub async fn open_to_workload(
    tunnel: &Tunnel,
    namespace: &str,
    name: &str,
    target: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, Refusal> {
    let key = (namespace.to_owned(), name.to_owned());
    let mut send = tunnel
        .reverse
        .get(&key)
        .ok_or_else(|| Refusal::NoEndpoint(target.to_owned()))?;
    let unreachable = || Refusal::Unreachable(target.to_owned());
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .body(Empty::new())
        .map_err(|_| Refusal::BadTarget(target.to_owned()))?;
    let resp = tokio::time::timeout(mesh_proxy::env::CONNECT_TIMEOUT, async {
        send.ready().await.map_err(|_| unreachable())?;
        send.send_request(req).await.map_err(|_| unreachable())
    })
    .await
    .map_err(|_| unreachable())??;
    if resp.status() != StatusCode::OK {
        return Err(unreachable());
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(|_| unreachable())?;
    Ok(TokioIo::new(upgraded))
}

/// Where an `ip:port` target of a workload behind the gateway goes: to
/// that address, if it is a meshed workload's proxy port.
pub async fn meshed_endpoint(tunnel: &Tunnel, target: &str) -> Result<SocketAddr, Refusal> {
    let addr: SocketAddr = target
        .parse()
        .map_err(|_| Refusal::BadTarget(target.to_owned()))?;
    let update = tunnel.discovery.get(&target.to_owned(), FAIL_FAST).await;
    let meshed = match update.as_deref().and_then(|u| u.kind.as_ref()) {
        Some(Kind::Endpoints(set)) => set.endpoints.iter().any(|e| {
            e.via_gateway.is_none()
                && e.proxy_port == u32::from(addr.port())
                && e.address
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip() == addr.ip())
        }),
        _ => false,
    };
    if meshed {
        Ok(addr)
    } else {
        Err(Refusal::NotMeshed(target.to_owned()))
    }
}

/// Serves one reverse connection: reads the claim, checks it, then keeps
/// the connection as the way to that workload until it closes.
pub async fn serve<S>(tunnel: Arc<Tunnel>, caller: SpiffeId, mut tls: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let td = caller.trust_domain().to_string();
    let claim = match tokio::time::timeout(CLAIM_TIMEOUT, read_claim(&mut tls)).await {
        Ok(Ok(claim)) => claim,
        _ => {
            tunnel.metrics.refuse("bad_claim", &td);
            return;
        }
    };
    let Some((namespace, name)) = claim.split_once('/') else {
        tunnel.metrics.refuse("bad_claim", &td);
        return;
    };
    let owned = listed(tunnel.behind.get(&(), FAIL_FAST).await.as_deref(), |w| {
        w.namespace == namespace && w.name == name && w.spiffe_id == caller.as_str()
    });
    if !owned || !caller.is_member_of(&tunnel.trust_domain) {
        tunnel.metrics.refuse("not_behind", &td);
        tracing::info!(%caller, %claim, "reverse connection refused: not a workload of this caller registered behind the gateway");
        return;
    }
    let (send, conn) = match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            tracing::info!(%caller, %claim, error = %e, "reverse connection failed");
            return;
        }
    };
    let key = (namespace.to_owned(), name.to_owned());
    tunnel
        .reverse
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), send);
    tunnel.metrics.reverse_open.set(tunnel.reverse.len() as i64);
    tracing::info!(%caller, workload = %claim, "workload behind the gateway connected");
    let _ = conn.await;
    {
        let mut map = tunnel
            .reverse
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(SendRequest::is_closed) {
            map.remove(&key);
        }
    }
    tunnel.metrics.reverse_open.set(tunnel.reverse.len() as i64);
    tracing::info!(workload = %claim, "workload behind the gateway disconnected");
}

async fn read_claim<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<String> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MAX_CLAIM {
        return Err(std::io::Error::other("claim length"));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    String::from_utf8(buf).map_err(std::io::Error::other)
}
