//! balance: one load balancer per destination, tower's power-of-two-choices
//! over peak-EWMA latency, fed by the destination's discovery stream.

use std::{collections::HashSet, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::{
    api::v1::{DiscoveryUpdate, discovery_update::Kind},
    identity::SpiffeId,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tower::{
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{CompleteOnResponse, PeakEwmaDiscover},
    util::BoxService,
};

use super::{
    accrual::{Accrual, Health},
    endpoint::{Dialer, EndpointService},
    tunnel::TunnelConnector,
};
use crate::{metrics::Metrics, wire::Body};

/// Latency assumed for an endpoint before it has answered.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the latency estimate forgets.
const DECAY: Duration = Duration::from_secs(10);
/// Requests queued in front of one destination's balancer.
const QUEUE: usize = 10_000;

pub type Balancer = Buffer<
    Request<Body>,
    std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Incoming>, tower::BoxError>> + Send>,
    >,
>;

/// An endpoint's identity for the balancer: where, and who it must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    addr: SocketAddr,
    spiffe_id: String,
    proxy_port: u16,
    via: Option<Via>,
    /// The cluster it runs in (what the metrics name).
    cluster: String,
}

/// How an endpoint in a linked cluster is reached: its gateway, and what
/// to ask it for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Via {
    /// The first gateway address (`host:port`).
    pub gateway: String,
    /// Prefer the QUIC tunnel (TCP when it does not open).
    pub quic: bool,
    pub gateway_identity: String,
    pub target: String,
    pub identities: Vec<String>,
}

impl Via {
    /// The tunnel connector (sharing the dialer's tunnel to this gateway),
    /// or why there is none.
    pub fn connector(&self, dialer: &Dialer) -> Result<TunnelConnector, String> {
        let gateway = SpiffeId::parse(&self.gateway_identity)
            .map_err(|e| format!("gateway identity {:?}: {e}", self.gateway_identity))?;
        let identities: std::collections::BTreeSet<SpiffeId> = self
            .identities
            .iter()
            .filter_map(|i| SpiffeId::parse(i).ok())
            .collect();
        if identities.is_empty() {
            return Err(format!("{} lists no destination identity", self.target));
        }
        dialer.gateways.connector(
            &self.gateway,
            gateway,
            &self.target,
            mesh_core::identity::ExpectedIdentity::AnyOf(identities),
            self.quic,
            &dialer.creds,
            &dialer.bundles,
        )
    }
}

fn keys(update: Option<&DiscoveryUpdate>) -> Vec<Key> {
    let Some(Kind::Endpoints(set)) = update.and_then(|u| u.kind.as_ref()) else {
        return Vec::new();
    };
    // A whole set with failover tiers (opaque TCP balances it as one): the
    // best tier discovery lists endpoints for. Requests get per-tier
    // balancers and health-based spill instead (`failover.rs`).
    let best = set
        .failover
        .as_ref()
        .and_then(|_| set.endpoints.iter().map(|e| e.priority).min());
    set.endpoints
        .iter()
        .filter(|e| best.is_none_or(|b| e.priority == b))
        .filter_map(|e| match &e.via_gateway {
            None => Some(Key {
                addr: e.address.parse().ok()?,
                spiffe_id: e.spiffe_id.clone(),
                proxy_port: u16::try_from(e.proxy_port).ok()?,
                via: None,
                cluster: e.cluster.clone(),
            }),
            Some(via) => Some(Key {
                // Only the destination's app port matters (mesh-dst-port).
                addr: SocketAddr::from(([0, 0, 0, 0], u16::try_from(via.target_port).ok()?)),
                spiffe_id: e.spiffe_id.clone(),
                proxy_port: 0,
                via: Some(Via {
                    gateway: via.gateway_addresses.first()?.clone(),
                    quic: via.quic,
                    gateway_identity: via.gateway_identity.clone(),
                    target: via.target_authority.clone(),
                    identities: via.destination_identities.clone(),
                }),
                cluster: e.cluster.clone(),
            }),
        })
        .collect()
}

/// Whether the current discovery state has any endpoint to send to. On
/// the request path, so it only looks, never parses.
pub fn has_endpoints(update: Option<&DiscoveryUpdate>) -> bool {
    match update.and_then(|u| u.kind.as_ref()) {
        Some(Kind::Endpoints(set)) => !set.endpoints.is_empty(),
        _ => false,
    }
}

/// The ejection state of one destination's endpoints.
pub type DestinationHealth = Health<Key>;

/// The changes to a destination's endpoint set, as discovery streams them:
/// each new endpoint is built once with `make`, each one gone is removed
/// (and `gone` is told). Ends when the balancer reading it is dropped.
pub fn follow_endpoints<S: Send + 'static>(
    mut updates: watch::Receiver<Option<Arc<DiscoveryUpdate>>>,
    mut make: impl FnMut(&Key) -> S + Send + 'static,
    mut gone: impl FnMut(&Key) + Send + 'static,
) -> ReceiverStream<Result<Change<Key, S>, Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut current: HashSet<Key> = HashSet::new();
        loop {
            let wanted: Vec<Key> = keys(updates.borrow_and_update().as_deref());
            let removed: Vec<Key> = current
                .iter()
                .filter(|k| !wanted.contains(k))
                .cloned()
                .collect();
            for key in removed {
                current.remove(&key);
                gone(&key);
                if tx.send(Ok(Change::Remove(key))).await.is_err() {
                    return;
                }
            }
            for key in wanted {
                if current.insert(key.clone()) {
                    let svc = make(&key);
                    if tx.send(Ok(Change::Insert(key, svc))).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Key {
    /// The SPIFFE ID the endpoint must present: `Ok(None)` when discovery
    /// says it is not meshed (no ID at all), an error when the ID does not
    /// parse. An unparsable ID is never taken to mean plaintext.
    pub fn identity(&self) -> Result<Option<SpiffeId>, String> {
        if self.spiffe_id.is_empty() {
            return Ok(None);
        }
        SpiffeId::parse(&self.spiffe_id)
            .map(Some)
            .map_err(|e| format!("endpoint identity {:?}: {e}", self.spiffe_id))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn proxy_port(&self) -> u16 {
        self.proxy_port
    }

    /// How it is reached when it is in a linked cluster.
    pub fn via(&self) -> Option<&Via> {
        self.via.as_ref()
    }
}

/// A balancer following `updates`, with failure accrual on every endpoint.
pub fn balancer(
    updates: watch::Receiver<Option<Arc<DiscoveryUpdate>>>,
    dialer: Dialer,
    metrics: Metrics,
    max_ejection: std::time::Duration,
) -> (Balancer, Arc<DestinationHealth>) {
    let health = Arc::new(DestinationHealth::default());
    let on_eject: super::accrual::OnEject<Key> = Arc::new(move |key: &Key, backoff| {
        metrics.endpoint_ejections.inc();
        tracing::warn!(endpoint = %key.addr, identity = %key.spiffe_id, "endpoint failing; ejected for {backoff:?}");
    });
    let (make_health, gone_health) = (health.clone(), health.clone());
    let changes = follow_endpoints(
        updates,
        move |key| {
            let svc = EndpointService::reach(
                key.addr,
                key.identity(),
                key.proxy_port,
                key.via.as_ref(),
                &dialer,
            );
            let svc = svc.serving_cluster(&key.cluster);
            let tunnel = svc.liveness();
            Accrual::new(
                key.clone(),
                svc,
                (make_health.clone(), tunnel),
                on_eject.clone(),
            )
            .with_max_ejection(max_ejection)
        },
        move |key| gone_health.remove(key),
    );
    let discover = PeakEwmaDiscover::new::<Request<Body>>(
        changes,
        DEFAULT_RTT,
        DECAY,
        CompleteOnResponse::default(),
    );
    let balance = Balance::new(discover);
    (Buffer::new(BoxService::new(balance), QUEUE), health)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No ID means "not meshed" (discovery said so); an ID that does not
    /// parse is an error, never taken to mean plaintext.
    #[test]
    fn an_unparsable_identity_is_an_error_not_plaintext() {
        let key = |id: &str| Key {
            addr: "127.0.0.1:8080".parse().unwrap(),
            spiffe_id: id.to_owned(),
            proxy_port: 4143,
            via: None,
            cluster: "west".into(),
        };
        assert_eq!(key("").identity(), Ok(None));
        assert!(
            key("spiffe://west.mesh.local/ns/shop/sa/api")
                .identity()
                .is_ok_and(|id| id.is_some())
        );
        let bad = key("spiffe://West.mesh.local/ns/shop/sa/api").identity();
        assert!(
            bad.as_ref().is_err_and(|e| e.contains("endpoint identity")),
            "{bad:?}"
        );
    }
}
