//! balance: one load balancer per destination, tower's power-of-two-choices
//! over peak-EWMA latency, fed by the destination's discovery stream.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::{
    api::v1::{DiscoveryUpdate, discovery_update::Kind},
    identity::{BundleStore, CredentialStore, SpiffeId},
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
    endpoint::EndpointService,
};
use crate::{inbound::Body, metrics::Metrics};

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
}

fn keys(update: Option<&DiscoveryUpdate>) -> Vec<Key> {
    let Some(Kind::Endpoints(set)) = update.and_then(|u| u.kind.as_ref()) else {
        return Vec::new();
    };
    set.endpoints
        .iter()
        .filter(|e| e.via_gateway.is_none())
        .filter_map(|e| {
            Some(Key {
                addr: e.address.parse().ok()?,
                spiffe_id: e.spiffe_id.clone(),
                proxy_port: u16::try_from(e.proxy_port).ok()?,
            })
        })
        .collect()
}

/// Whether the current discovery state has any endpoint to send to. On
/// the request path, so it only looks, never parses.
pub fn has_endpoints(update: Option<&DiscoveryUpdate>) -> bool {
    match update.and_then(|u| u.kind.as_ref()) {
        Some(Kind::Endpoints(set)) => set.endpoints.iter().any(|e| e.via_gateway.is_none()),
        _ => false,
    }
}

/// The ejection state of one destination's endpoints.
pub type DestinationHealth = Health<Key>;

/// A balancer following `updates`, with failure accrual on every endpoint.
pub fn balancer(
    mut updates: watch::Receiver<Option<std::sync::Arc<DiscoveryUpdate>>>,
    creds: CredentialStore,
    bundles: BundleStore,
    metrics: Metrics,
) -> (Balancer, std::sync::Arc<DestinationHealth>) {
    type Endpoint = Accrual<Key, EndpointService>;
    let (tx, rx) = mpsc::channel::<Result<Change<Key, Endpoint>, Infallible>>(64);
    let health = std::sync::Arc::new(DestinationHealth::default());
    let task_health = health.clone();
    let on_eject: super::accrual::OnEject<Key> = std::sync::Arc::new(move |key: &Key, backoff| {
        metrics.endpoint_ejections.inc();
        tracing::warn!(endpoint = %key.addr, identity = %key.spiffe_id, "endpoint failing; ejected for {backoff:?}");
    });
    tokio::spawn(async move {
        let health = task_health;
        let mut current: HashMap<Key, ()> = HashMap::new();
        loop {
            let wanted: Vec<Key> = keys(updates.borrow_and_update().as_deref());
            let gone: Vec<Key> = current
                .keys()
                .filter(|k| !wanted.contains(k))
                .cloned()
                .collect();
            for key in gone {
                current.remove(&key);
                health.remove(&key);
                if tx.send(Ok(Change::Remove(key))).await.is_err() {
                    return;
                }
            }
            for key in wanted {
                if current.contains_key(&key) {
                    continue;
                }
                let identity = (!key.spiffe_id.is_empty())
                    .then(|| SpiffeId::parse(&key.spiffe_id).ok())
                    .flatten();
                let svc =
                    EndpointService::new(key.addr, identity, key.proxy_port, &creds, &bundles);
                let svc = Accrual::new(key.clone(), svc, health.clone(), on_eject.clone());
                current.insert(key.clone(), ());
                if tx.send(Ok(Change::Insert(key, svc))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    let discover = PeakEwmaDiscover::new::<Request<Body>>(
        ReceiverStream::new(rx),
        DEFAULT_RTT,
        DECAY,
        CompleteOnResponse::default(),
    );
    let balance = Balance::new(discover);
    (Buffer::new(BoxService::new(balance), QUEUE), health)
}
