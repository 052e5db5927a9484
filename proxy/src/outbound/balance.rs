//! balance: one load balancer per destination, power of two choices over
//! peak-EWMA latency (tower's `PeakEwma`), fed by the destination's
//! discovery stream.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use http::Request;
use mesh_core::{
    api::v1::{DiscoveryUpdate, discovery_update::Kind},
    identity::SpiffeId,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tower::{
    Service,
    discover::Change,
    load::{CompleteOnResponse, Load, PeakEwma},
    util::rng::{HasherRng, Rng},
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

/// One endpoint as the balancer holds it: its latency estimate around its
/// failure accrual around the endpoint itself.
pub type Endpoint = PeakEwma<Accrual<Key, EndpointService>, CompleteOnResponse>;

/// The endpoint set's changes, as `follow_endpoints` sends them.
type Changes<S> = mpsc::Receiver<Result<Change<Key, S>, Infallible>>;

/// One tier's balancer, shared by every request to it. A request picks its
/// endpoint in its own task, under a lock held only while picking: no
/// worker task and no channel between them.
///
/// The endpoints are two lists: ready and not ready. A request takes two
/// ready ones at random, keeps the one with less load, and asks it once
/// more whether it is ready (an endpoint can be ejected meanwhile); one
/// that is not goes to the other list. tower's `p2c::Balance` did the same
/// through its ready cache, which takes the chosen endpoint out on every
/// request and puts it back through a boxed future, a oneshot and a
/// `FuturesUnordered` node: an eighth of the client proxy's user time.
///
/// While no endpoint is ready, waiting requests register their wakers; the
/// discovery stream and the endpoints not ready are polled with one waker
/// of the balancer's own that marks the set changed and wakes them all, so
/// a discovery change or an endpoint becoming ready reaches every one of
/// them, not only the last to look. The set is looked at again only after
/// that waker fired: a request to a set that did not change does not poll
/// the discovery stream.
pub struct Balancer<S = Endpoint> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balancer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Balancer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").finish_non_exhaustive()
    }
}

struct Shared<S> {
    set: Mutex<Set<S>>,
    waiters: Arc<Waiters>,
    wake_all: Waker,
}

struct Set<S> {
    /// `None` once discovery has ended: the endpoints it gave stay.
    changes: Option<Changes<S>>,
    ready: Vec<(Key, S)>,
    not_ready: Vec<(Key, S)>,
    rng: HasherRng,
}

struct Waiters {
    wakers: Mutex<Vec<Waker>>,
    /// Something the set was polled for (discovery, an endpoint not
    /// ready) has woken it since it was last looked at.
    changed: AtomicBool,
}

impl Waiters {
    fn new() -> Self {
        Self {
            wakers: Mutex::default(),
            // Nothing looked at yet.
            changed: AtomicBool::new(true),
        }
    }

    fn add(&self, waker: &Waker) {
        let mut list = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
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
        self.changed.store(true, Ordering::Release);
        let woken = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        woken.into_iter().for_each(Waker::wake);
    }
}

// The endpoint's future and answer are named (`F`, `R`, `E`), not
// projections: rustc cannot prove a projection through the body's boxed
// error type `Send` for every lifetime.
impl<S, F, R, E> Balancer<S>
where
    S: Service<Request<Body>, Future = F, Response = R, Error = E> + Load,
    S::Metric: PartialOrd,
    F: std::future::Future<Output = Result<R, E>>,
{
    fn new(changes: Changes<S>) -> Self {
        let waiters = Arc::new(Waiters::new());
        Self {
            shared: Arc::new(Shared {
                set: Mutex::new(Set {
                    changes: Some(changes),
                    ready: Vec::new(),
                    not_ready: Vec::new(),
                    rng: HasherRng::new(),
                }),
                wake_all: Waker::from(waiters.clone()),
                waiters,
            }),
        }
    }

    /// Sends `req` to the endpoint the balancer picks, waiting for one to
    /// be ready. The endpoint's future is not boxed: it is this one's.
    /// (Not an `async fn`, which would hold `req` twice: its argument, and
    /// the local it is moved into.)
    #[allow(clippy::manual_async_fn)]
    pub fn call(&self, req: Request<Body>) -> impl Future<Output = Result<R, E>> + '_ {
        async move {
            let call = {
                // The lock is held from the pick to the call.
                let (mut set, chosen) = std::future::poll_fn(|cx| self.poll_pick(cx)).await;
                set.ready[chosen].1.call(req)
            };
            call.await
        }
    }

    /// The set, locked, and the index of the ready endpoint picked.
    fn poll_pick(&self, cx: &mut Context<'_>) -> Poll<(MutexGuard<'_, Set<S>>, usize)> {
        let shared = &*self.shared;
        let mut set = shared.set.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chosen) = set.pick(&shared.wake_all, &shared.waiters.changed) {
            return Poll::Ready((set, chosen));
        }
        // Registered, then looked at again: a wake between the first look
        // and the registration is not lost.
        shared.waiters.add(cx.waker());
        match set.pick(&shared.wake_all, &shared.waiters.changed) {
            Some(chosen) => Poll::Ready((set, chosen)),
            None => Poll::Pending,
        }
    }
}

impl<S> Set<S>
where
    S: Service<Request<Body>> + Load,
    S::Metric: PartialOrd,
{
    /// Picks a ready endpoint, if any is.
    fn pick(&mut self, wake_all: &Waker, changed: &AtomicBool) -> Option<usize> {
        let mut cx = Context::from_waker(wake_all);
        if changed.swap(false, Ordering::AcqRel) {
            self.discover(&mut cx);
            self.promote(&mut cx);
        }
        loop {
            let chosen = match self.ready.len() {
                0 => return None,
                1 => 0,
                n => {
                    let a = self.rng.next_range(0..n as u64) as usize;
                    let mut b = self.rng.next_range(0..n as u64 - 1) as usize;
                    if b >= a {
                        b += 1;
                    }
                    if self.ready[a].1.load() <= self.ready[b].1.load() {
                        a
                    } else {
                        b
                    }
                }
            };
            match self.ready[chosen].1.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => return Some(chosen),
                Poll::Pending => {
                    let endpoint = self.ready.swap_remove(chosen);
                    self.not_ready.push(endpoint);
                }
                Poll::Ready(Err(_)) => {
                    let (key, _) = self.ready.swap_remove(chosen);
                    tracing::debug!(endpoint = %key.addr, "endpoint failed; dropped");
                }
            }
        }
    }

    /// Takes in what discovery changed since it was last asked.
    fn discover(&mut self, cx: &mut Context<'_>) {
        while let Some(changes) = &mut self.changes {
            match changes.poll_recv(cx) {
                Poll::Pending => return,
                Poll::Ready(None) => self.changes = None,
                Poll::Ready(Some(Ok(Change::Remove(key)))) => self.remove(&key),
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => {
                    self.remove(&key);
                    self.not_ready.push((key, svc));
                }
            }
        }
    }

    fn remove(&mut self, key: &Key) {
        self.ready.retain(|(k, _)| k != key);
        self.not_ready.retain(|(k, _)| k != key);
    }

    /// Moves the endpoints that are ready now to the ready list.
    fn promote(&mut self, cx: &mut Context<'_>) {
        let mut i = 0;
        while i < self.not_ready.len() {
            match self.not_ready[i].1.poll_ready(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(Ok(())) => {
                    let endpoint = self.not_ready.swap_remove(i);
                    self.ready.push(endpoint);
                }
                Poll::Ready(Err(_)) => {
                    let (key, _) = self.not_ready.swap_remove(i);
                    tracing::debug!(endpoint = %key.addr, "endpoint failed; dropped");
                }
            }
        }
    }
}

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

impl Key {
    fn new(
        addr: SocketAddr,
        spiffe_id: String,
        proxy_port: u16,
        via: Option<Via>,
        cluster: String,
    ) -> Self {
        Self {
            addr,
            spiffe_id,
            proxy_port,
            via,
            cluster,
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
            let accrual = Accrual::new(
                key.clone(),
                svc,
                (make_health.clone(), tunnel),
                on_eject.clone(),
                max_ejection,
            );
            PeakEwma::new(
                accrual,
                DEFAULT_RTT,
                DECAY.as_nanos() as f64,
                CompleteOnResponse::default(),
            )
        },
        move |key| gone_health.remove(key),
    );
    (Balancer::new(changes.into_inner()), health)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicUsize};

    use super::*;

    /// An endpoint with a load set by the test, that is not ready until
    /// told and (like tower's services) keeps only the last waker it was
    /// polled with. It counts the requests it is sent.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
        load: Arc<AtomicU32>,
        calls: Arc<AtomicUsize>,
    }

    impl Gate {
        fn opened(load: u32) -> Self {
            let gate = Self::default();
            gate.load.store(load, Ordering::SeqCst);
            gate.open.store(true, Ordering::SeqCst);
            gate
        }

        fn set_open(&self, open: bool) {
            self.open.store(open, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Service<Request<Body>> for Gate {
        type Response = ();
        type Error = Infallible;
        type Future = std::future::Ready<Result<(), Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(()))
        }
    }

    impl Load for Gate {
        type Metric = u32;

        fn load(&self) -> u32 {
            self.load.load(Ordering::SeqCst)
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

    fn key(port: u16) -> Key {
        Key::new(
            SocketAddr::from(([10, 0, 0, 1], port)),
            String::new(),
            4143,
            None,
            "west".into(),
        )
    }

    type Sender = mpsc::Sender<Result<Change<Key, Gate>, Infallible>>;

    fn with_endpoints(gates: &[(u16, &Gate)]) -> (Balancer<Gate>, Sender) {
        let (tx, rx) = mpsc::channel(16);
        for (port, gate) in gates {
            tx.try_send(Ok(Change::Insert(key(*port), (*gate).clone())))
                .unwrap();
        }
        (Balancer::new(rx), tx)
    }

    /// Requests that wait for a ready endpoint are all woken when one is,
    /// although the endpoint itself remembers only one waker: none is left
    /// waiting forever.
    #[tokio::test]
    async fn every_waiting_request_is_woken_when_an_endpoint_is_ready() {
        let gate = Gate::default();
        let (balancer, _tx) = with_endpoints(&[(1, &gate)]);
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
        gate.set_open(true);
        for w in waiting {
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("a waiting request was never woken")
                .unwrap()
                .unwrap();
        }
        assert_eq!(gate.calls(), 5);
    }

    /// Of two ready endpoints, every request goes to the less loaded (with
    /// two, p2c compares the same pair every time); of five, the most
    /// loaded never gets one and the least loaded gets the most.
    #[tokio::test]
    async fn the_less_loaded_endpoint_is_picked() {
        let (light, heavy) = (Gate::opened(1), Gate::opened(10));
        let (balancer, _tx) = with_endpoints(&[(1, &heavy), (2, &light)]);
        for _ in 0..200 {
            balancer.call(empty()).await.unwrap();
        }
        assert_eq!((light.calls(), heavy.calls()), (200, 0));

        let gates: Vec<Gate> = (1..=5).map(Gate::opened).collect();
        let listed: Vec<(u16, &Gate)> = (1..).zip(gates.iter()).collect();
        let (balancer, _tx) = with_endpoints(&listed);
        for _ in 0..1000 {
            balancer.call(empty()).await.unwrap();
        }
        let calls: Vec<usize> = gates.iter().map(Gate::calls).collect();
        assert_eq!(calls.iter().sum::<usize>(), 1000);
        assert_eq!(calls[4], 0, "the most loaded is never the lesser of two");
        assert!(
            calls.windows(2).all(|w| w[0] >= w[1]),
            "less load, more requests: {calls:?}"
        );
    }

    /// An endpoint that stops being ready (ejected) gets no request until
    /// it wakes the balancer, and then takes requests again.
    #[tokio::test]
    async fn an_endpoint_not_ready_is_skipped_until_it_is() {
        let (a, b) = (Gate::opened(1), Gate::opened(5));
        let (balancer, _tx) = with_endpoints(&[(1, &a), (2, &b)]);
        balancer.call(empty()).await.unwrap();
        assert_eq!(a.calls(), 1);
        a.set_open(false);
        for _ in 0..20 {
            balancer.call(empty()).await.unwrap();
        }
        assert_eq!((a.calls(), b.calls()), (1, 20), "a is not ready");
        a.set_open(true);
        for _ in 0..20 {
            balancer.call(empty()).await.unwrap();
        }
        assert_eq!((a.calls(), b.calls()), (21, 20), "a is back");
    }

    /// Discovery's changes reach the next request: a removed endpoint gets
    /// nothing more, a new one takes requests.
    #[tokio::test]
    async fn discovery_changes_reach_the_next_request() {
        let (a, b) = (Gate::opened(1), Gate::opened(1));
        let (balancer, tx) = with_endpoints(&[(1, &a)]);
        balancer.call(empty()).await.unwrap();
        tx.send(Ok(Change::Insert(key(2), b.clone())))
            .await
            .unwrap();
        tx.send(Ok(Change::Remove(key(1)))).await.unwrap();
        for _ in 0..10 {
            balancer.call(empty()).await.unwrap();
        }
        assert_eq!((a.calls(), b.calls()), (1, 10));
        // Discovery ended: the endpoints it gave stay.
        drop(tx);
        balancer.call(empty()).await.unwrap();
        assert_eq!(b.calls(), 11);
    }

    /// Wakers of requests that gave up are not kept without bound.
    #[test]
    fn the_waiter_list_is_bounded() {
        let waiters = Waiters::new();
        let wakers: Vec<Waker> = (0..MAX_WAITERS + 10)
            .map(|_| Waker::from(Arc::new(Waiters::new())))
            .collect();
        for w in &wakers {
            waiters.add(w);
        }
        let kept = waiters.wakers.lock().unwrap().len();
        assert!(kept <= MAX_WAITERS, "{kept} wakers kept");
        // The same waker twice is kept once.
        let again = waiters.wakers.lock().unwrap().len();
        waiters.add(&wakers[wakers.len() - 1]);
        assert_eq!(waiters.wakers.lock().unwrap().len(), again);
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
