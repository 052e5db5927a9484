//! balance: one load balancer per destination, tower's power-of-two-choices
//! over peak-EWMA latency, fed by the destination's discovery stream.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use http::{Request, Response};
use mesh_core::{
    api::v1::{DiscoveryUpdate, discovery_update::Kind},
    identity::SpiffeId,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tower::{
    Service,
    balance::p2c::Balance,
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
/// Requests waiting for an endpoint that are remembered one by one; past
/// it they are all woken to look again (a request that gave up leaves its
/// waker behind until then).
const MAX_WAITERS: usize = 4096;

type Inner = BoxService<Request<Body>, Response<Body>, tower::BoxError>;
type Call = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Body>, tower::BoxError>> + Send>,
>;

/// One tier's balancer, shared by every request to it. A request picks its
/// endpoint in its own task, under a lock held only while picking: no
/// worker task and no channel between them (tower's `Buffer` cost each
/// request a hand-off to its worker and a oneshot back).
///
/// While no endpoint is ready, waiting requests register their wakers; the
/// balancer is polled with one waker of its own that wakes them all, so a
/// discovery change or an endpoint becoming ready reaches every one of
/// them, not only the last to look.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").finish_non_exhaustive()
    }
}

struct Shared {
    inner: Mutex<Inner>,
    waiters: Arc<Waiters>,
    wake_all: Waker,
}

#[derive(Default)]
struct Waiters(Mutex<Vec<Waker>>);

impl Waiters {
    fn add(&self, waker: &Waker) {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|w| w.will_wake(waker)) {
            return;
        }
        if list.len() >= MAX_WAITERS {
            list.drain(..).for_each(Waker::wake);
        }
        list.push(waker.clone());
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let woken = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        woken.into_iter().for_each(Waker::wake);
    }
}

impl Balancer {
    fn new(inner: Inner) -> Self {
        let waiters = Arc::new(Waiters::default());
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                wake_all: Waker::from(waiters.clone()),
                waiters,
            }),
        }
    }

    /// Sends `req` to the endpoint the balancer picks, waiting for one to
    /// be ready.
    pub async fn call(&self, req: Request<Body>) -> Result<Response<Body>, tower::BoxError> {
        let mut req = Some(req);
        let call = std::future::poll_fn(|cx| self.poll_call(cx, &mut req)).await?;
        call.await
    }

    fn poll_call(
        &self,
        cx: &mut Context<'_>,
        req: &mut Option<Request<Body>>,
    ) -> Poll<Result<Call, tower::BoxError>> {
        let mut inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut own = Context::from_waker(&self.shared.wake_all);
        let mut ready = inner.poll_ready(&mut own);
        if ready.is_pending() {
            // Registered, then looked at again: a wake between the first
            // look and the registration is not lost.
            self.shared.waiters.add(cx.waker());
            ready = inner.poll_ready(&mut own);
        }
        match ready {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => match req.take() {
                Some(req) => Poll::Ready(Ok(inner.call(req))),
                None => Poll::Ready(Err("the balancer was polled after it answered".into())),
            },
        }
    }
}

/// An endpoint's identity for the balancer: where, and who it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    addr: SocketAddr,
    spiffe_id: String,
    proxy_port: u16,
    via: Option<Via>,
    /// The cluster it runs in (what the metrics name).
    cluster: String,
    /// The hash of all the above, made once: tower's balancer hashes the
    /// key of the endpoint it picks on every request.
    hash: u64,
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Key {
    fn new(
        addr: SocketAddr,
        spiffe_id: String,
        proxy_port: u16,
        via: Option<Via>,
        cluster: String,
    ) -> Self {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the hash only spreads a balancer's own endpoints.
        let mut h = std::hash::DefaultHasher::new();
        (addr, &spiffe_id, proxy_port, &via, &cluster).hash(&mut h);
        Self {
            addr,
            spiffe_id,
            proxy_port,
            via,
            cluster,
            hash: h.finish(),
        }
    }
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
            None => Some(Key::new(
                e.address.parse().ok()?,
                e.spiffe_id.clone(),
                u16::try_from(e.proxy_port).ok()?,
                None,
                e.cluster.clone(),
            )),
            Some(via) => Some(Key::new(
                // Only the destination's app port matters (mesh-dst-port).
                SocketAddr::from(([0, 0, 0, 0], u16::try_from(via.target_port).ok()?)),
                e.spiffe_id.clone(),
                0,
                Some(Via {
                    gateway: via.gateway_addresses.first()?.clone(),
                    quic: via.quic,
                    gateway_identity: via.gateway_identity.clone(),
                    target: via.target_authority.clone(),
                    identities: via.destination_identities.clone(),
                }),
                e.cluster.clone(),
            )),
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
    (Balancer::new(BoxService::new(balance)), health)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that is not ready until told, and (like tower's balancer
    /// and its channels) keeps only the last waker it was polled with.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Gate {
        fn open(&self) {
            self.open.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    impl Service<Request<Body>> for Gate {
        type Response = Response<Body>;
        type Error = tower::BoxError;
        type Future = Call;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tower::BoxError>> {
            if self.open.load(std::sync::atomic::Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, _: Request<Body>) -> Call {
            // Not a response: the test only needs to see each call made.
            Box::pin(std::future::ready(Err("called".into())))
        }
    }

    fn empty() -> Request<Body> {
        use http_body_util::BodyExt;
        Request::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// Requests that wait for a ready endpoint are all woken when one is,
    /// although the balancer itself remembers only one waker: none is left
    /// waiting forever.
    #[tokio::test]
    async fn every_waiting_request_is_woken_when_an_endpoint_is_ready() {
        let gate = Gate::default();
        let balancer = Balancer::new(BoxService::new(gate.clone()));
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let balancer = balancer.clone();
                tokio::spawn(async move { balancer.call(empty()).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "no request may pass a balancer with no ready endpoint"
        );
        gate.open();
        for w in waiting {
            let answered = tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("a waiting request was never woken")
                .unwrap();
            assert!(answered.is_err_and(|e| e.to_string() == "called"));
        }
    }

    /// Wakers of requests that gave up are not kept without bound.
    #[test]
    fn the_waiter_list_is_bounded() {
        let waiters = Waiters::default();
        let wakers: Vec<Waker> = (0..MAX_WAITERS + 10)
            .map(|_| Waker::from(Arc::new(Waiters::default())))
            .collect();
        for w in &wakers {
            waiters.add(w);
        }
        let kept = waiters.0.lock().unwrap().len();
        assert!(kept <= MAX_WAITERS, "{kept} wakers kept");
        // The same waker twice is kept once.
        let again = waiters.0.lock().unwrap().len();
        waiters.add(&wakers[wakers.len() - 1]);
        assert_eq!(waiters.0.lock().unwrap().len(), again);
    }

    /// No ID means "not meshed" (discovery said so); an ID that does not
    /// parse is an error, never taken to mean plaintext.
    #[test]
    fn an_unparsable_identity_is_an_error_not_plaintext() {
        let key = |id: &str| {
            Key::new(
                "127.0.0.1:8080".parse().unwrap(),
                id.to_owned(),
                4143,
                None,
                "west".into(),
            )
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
