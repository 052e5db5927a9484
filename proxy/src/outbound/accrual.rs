//! Failure accrual: an endpoint that fails [`THRESHOLD`] times in a row
//! (5xx responses or broken connections), or once when it cannot be reached
//! at all (refused, timed out: nothing was sent), leaves the balancer: its
//! `poll_ready` waits on a timer, so p2c stops choosing it. When the timer
//! fires, one probe request goes through; a success restores the endpoint,
//! a failure ejects it again for twice as long (1 s up to 60 s).
//!
//! [`Health`] is what the rest of the proxy sees: which endpoints are
//! ejected, and which sit behind a tunnel that is down; a failover tier's
//! healthy share is read from it.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::Response;
use tokio::time::{Instant, Sleep};

use super::{errors::OutboundError, tunnel::Liveness};
use crate::wire::Body;

/// Consecutive failures before an endpoint is ejected.
pub const THRESHOLD: u32 = 5;
const MIN_EJECTION: Duration = Duration::from_secs(1);
/// How often an endpoint whose probe is in flight checks whether it ended.
const PROBE_WAIT: Duration = Duration::from_millis(10);
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Which endpoints of one destination are ejected, shared with the request
/// path so that a destination with every endpoint ejected fails fast.
#[derive(Debug)]
pub struct Health<K> {
    endpoints: Mutex<HashMap<K, Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    ejected_until: Option<Instant>,
    /// The tunnel it is reached through.
    tunnel: Option<Arc<Liveness>>,
}

impl Slot {
    fn tunnel_up(&self) -> bool {
        self.tunnel.as_ref().is_none_or(|t| t.is_up())
    }

    /// Not ejected (an ejected endpoint is healthy again only once a probe
    /// succeeded), its tunnel (if any) up.
    fn healthy(&self) -> bool {
        self.ejected_until.is_none() && self.tunnel_up()
    }

    /// May take a request now: healthy, or ejected with its probe due.
    fn eligible(&self, now: Instant) -> bool {
        self.ejected_until.is_none_or(|u| u <= now) && self.tunnel_up()
    }

    fn probe_due(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| u <= now) && self.tunnel_up()
    }
}

/// One destination's (or tier's) endpoints at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub healthy: usize,
    /// Endpoints unhealthy because their tunnel is down.
    pub tunnel_down: usize,
    /// Ejected endpoints whose probe is due (one request may go).
    pub probe_due: usize,
}

impl<K> Default for Health<K> {
    fn default() -> Self {
        Self {
            endpoints: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Health<K> {
    pub fn insert(&self, key: K, tunnel: Option<Arc<Liveness>>) {
        self.lock().insert(
            key,
            Slot {
                ejected_until: None,
                tunnel,
            },
        );
    }

    pub fn remove(&self, key: &K) {
        self.lock().remove(key);
    }

    fn set(&self, key: &K, until: Option<Instant>) {
        if let Some(slot) = self.lock().get_mut(key) {
            slot.ejected_until = until;
        }
    }

    /// Whether there are endpoints and none is healthy right now.
    pub fn all_ejected(&self) -> bool {
        let now = Instant::now();
        let endpoints = self.lock();
        !endpoints.is_empty() && endpoints.values().all(|s| !s.eligible(now))
    }

    /// How many endpoints there are and how many are healthy now.
    pub fn counts(&self) -> Counts {
        let now = Instant::now();
        let endpoints = self.lock();
        let mut counts = Counts {
            total: endpoints.len(),
            ..Counts::default()
        };
        for s in endpoints.values() {
            if s.healthy() {
                counts.healthy += 1;
            } else if !s.tunnel_up() {
                counts.tunnel_down += 1;
            } else if s.probe_due(now) {
                counts.probe_due += 1;
            }
        }
        counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Slot>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Default)]
struct State {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    probing: bool,
    /// The one probe request has been sent and has not ended yet: until
    /// it does, the endpoint is not ready for any other request.
    probe_in_flight: bool,
}

/// Called when an endpoint is ejected, with the ejection time.
pub type OnEject<K> = Arc<dyn Fn(&K, Duration) + Send + Sync>;

/// Wraps one endpoint service with failure accrual.
pub struct Accrual<K, S> {
    ledger: Arc<Ledger<K>>,
    inner: S,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// What each request to the endpoint reports its outcome to: one `Arc`
/// cloned per request, not the key and its strings.
struct Ledger<K> {
    key: K,
    state: Mutex<State>,
    health: Arc<Health<K>>,
    on_eject: OnEject<K>,
    /// The longest ejection.
    max_ejection: Duration,
}

impl<K: std::fmt::Debug, S> std::fmt::Debug for Accrual<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accrual")
            .field("key", &self.ledger.key)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, S> Accrual<K, S> {
    /// Ejects for at most `max_ejection` (a failover tier's endpoints are
    /// probed often, so traffic comes back soon after they do).
    pub fn new(
        key: K,
        inner: S,
        (health, tunnel): (Arc<Health<K>>, Option<Arc<Liveness>>),
        on_eject: OnEject<K>,
        max_ejection: Duration,
    ) -> Self {
        health.insert(key.clone(), tunnel);
        Self {
            ledger: Arc::new(Ledger {
                key,
                state: Mutex::default(),
                health,
                on_eject,
                max_ejection,
            }),
            inner,
            sleep: None,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.ledger.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an outcome changed.
#[derive(Debug, PartialEq)]
enum Change {
    None,
    /// Ejected until then, for that long.
    Ejected(Instant, Duration),
    /// A previously ejected endpoint answered well again.
    Restored,
}

/// How one request to an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    /// A 5xx, or a connection that broke with the request on it.
    Failure,
    /// It could not be reached at all: ejected at once.
    Unreachable,
}

/// Records one outcome and says what it changed.
fn record(state: &Mutex<State>, outcome: Outcome, max_ejection: Duration) -> Change {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if outcome == Outcome::Success {
        let was_ejected = s.ejections > 0;
        *s = State::default();
        return if was_ejected {
            Change::Restored
        } else {
            Change::None
        };
    }
    s.consecutive += 1;
    if !s.probing && s.consecutive < THRESHOLD && outcome != Outcome::Unreachable {
        return Change::None;
    }
    let backoff = MIN_EJECTION
        .saturating_mul(1 << s.ejections.min(6))
        .min(max_ejection);
    s.ejections += 1;
    s.consecutive = 0;
    s.probing = false;
    s.probe_in_flight = false;
    let until = Instant::now() + backoff;
    s.ejected_until = Some(until);
    Change::Ejected(until, backoff)
}

// The inner future is named `F`, not `S::Future`: rustc cannot prove a
// projection through the body's boxed error type `Send` for every lifetime.
impl<K, S, F> tower::Service<http::Request<crate::wire::Body>> for Accrual<K, S>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    S: tower::Service<
            http::Request<crate::wire::Body>,
            Response = Response<Body>,
            Error = OutboundError,
            Future = F,
        >,
    F: Future<Output = Result<Response<Body>, OutboundError>> + Unpin,
{
    type Response = Response<Body>;
    type Error = OutboundError;
    type Future = Accounted<K, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OutboundError>> {
        let (until, probe_in_flight) = {
            let s = self.state();
            (s.ejected_until, s.probe_in_flight)
        };
        if probe_in_flight {
            // One probe at a time: others go to other endpoints meanwhile.
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(PROBE_WAIT)));
            if sleep.as_mut().poll(cx).is_ready() {
                self.sleep = None;
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        if let Some(until) = until {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Time's up: let one probe through.
            let mut s = self.state();
            s.ejected_until = None;
            s.probing = true;
            drop(s);
            self.sleep = None;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<crate::wire::Body>) -> Self::Future {
        {
            let mut s = self.state();
            if s.probing {
                s.probe_in_flight = true;
            }
        }
        Accounted {
            fut: self.inner.call(req),
            ledger: self.ledger.clone(),
        }
    }
}

/// One request to an accruing endpoint: its outcome is recorded when it
/// answers. Not boxed: it sits in the request's own future.
pub struct Accounted<K, F> {
    fut: F,
    ledger: Arc<Ledger<K>>,
}

impl<K: std::fmt::Debug, F> std::fmt::Debug for Accounted<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounted")
            .field("key", &self.ledger.key)
            .finish_non_exhaustive()
    }
}

impl<K, F> Future for Accounted<K, F>
where
    K: Eq + Hash + Clone,
    F: Future<Output = Result<Response<Body>, OutboundError>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Poll::Ready(result) = Pin::new(&mut this.fut).poll(cx) else {
            return Poll::Pending;
        };
        let outcome = match &result {
            Ok(resp) if resp.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            // Nothing sent, or a connection gone silent: not a bad
            // answer but an endpoint that is not there.
            Err(OutboundError::Unreachable(_) | OutboundError::Unresponsive(_)) => {
                Outcome::Unreachable
            }
            Err(_) => Outcome::Failure,
        };
        let ledger = &this.ledger;
        // The shared health is touched only when something changed.
        match record(&ledger.state, outcome, ledger.max_ejection) {
            Change::Ejected(until, backoff) => {
                ledger.health.set(&ledger.key, Some(until));
                (ledger.on_eject)(&ledger.key, backoff);
            }
            Change::Restored => ledger.health.set(&ledger.key, None),
            Change::None => {}
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After an ejection, when the timer fires, exactly one request (the
    /// probe) goes through; the endpoint is not ready for others until
    /// the probe has answered.
    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time() {
        use std::future::poll_fn;
        use tower::Service;

        let fail = tower::service_fn(|_req: http::Request<crate::wire::Body>| {
            std::future::ready(Err::<Response<Body>, _>(OutboundError::Connect(
                "reset".into(),
            )))
        });
        let health = Arc::new(Health::default());
        let mut svc = Accrual::new(
            "a".to_owned(),
            fail,
            (health, None),
            Arc::new(|_: &String, _| {}),
            MAX_EJECTION,
        );
        let req = || {
            http::Request::new(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
        };
        use http_body_util::BodyExt;
        for _ in 0..THRESHOLD {
            poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
            let _ = svc.call(req()).await;
        }
        let ready = |svc: &mut Accrual<String, _>| {
            let waker = std::task::Waker::noop();
            svc.poll_ready(&mut Context::from_waker(waker)).is_ready()
        };
        assert!(!ready(&mut svc), "ejected");
        tokio::time::advance(MIN_EJECTION + Duration::from_millis(1)).await;
        assert!(ready(&mut svc), "the timer fired: one probe may go");
        let probe = svc.call(req());
        assert!(!ready(&mut svc), "not ready while the probe is in flight");
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(
            !ready(&mut svc),
            "still not ready: the probe has not answered"
        );
        let _ = probe.await;
        assert!(!ready(&mut svc), "the probe failed: ejected again");
    }

    fn record_(state: &Mutex<State>, outcome: Outcome) -> Change {
        record(state, outcome, MAX_EJECTION)
    }

    #[test]
    fn ejects_after_the_threshold_and_backs_off_on_failed_probes() {
        let state = Mutex::new(State::default());
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(record_(&state, Outcome::Failure), Change::None);
        }
        let Change::Ejected(_, first) = record_(&state, Outcome::Failure) else {
            panic!("ejected at the threshold")
        };
        assert_eq!(first, Duration::from_secs(1));
        // A failed probe ejects again at once, for twice as long.
        state.lock().unwrap().probing = true;
        let Change::Ejected(_, second) = record_(&state, Outcome::Failure) else {
            panic!("a failed probe ejects again")
        };
        assert_eq!(second, Duration::from_secs(2));
        // A success restores it and resets everything.
        assert_eq!(record_(&state, Outcome::Success), Change::Restored);
        assert_eq!(state.lock().unwrap().ejections, 0);
        assert_eq!(
            record_(&state, Outcome::Success),
            Change::None,
            "healthy stays quiet"
        );
        assert_eq!(
            record_(&state, Outcome::Failure),
            Change::None,
            "counting starts over"
        );
        // Unreachable (nothing sent: refused, timed out) ejects at once.
        assert!(matches!(
            record_(&state, Outcome::Unreachable),
            Change::Ejected(..)
        ));
    }

    #[test]
    fn a_tier_counts_ejected_endpoints_and_those_behind_a_dead_tunnel() {
        let health = Health::default();
        let tunnel = Arc::new(Liveness::default());
        health.insert("a", None);
        health.insert("b", None);
        health.insert("c", Some(tunnel.clone()));
        assert_eq!(
            health.counts(),
            Counts {
                total: 3,
                healthy: 3,
                ..Counts::default()
            }
        );
        health.set(&"a", Some(Instant::now() + Duration::from_secs(5)));
        tunnel.force_down_for_test();
        assert_eq!(
            health.counts(),
            Counts {
                total: 3,
                healthy: 1,
                tunnel_down: 1,
                probe_due: 0,
            }
        );
        assert!(!health.all_ejected());
        health.set(&"b", Some(Instant::now() + Duration::from_secs(5)));
        assert!(health.all_ejected(), "none healthy");
        // An ejection that ran out is a probe due, not health: only a
        // successful probe restores it.
        health.set(&"b", Some(Instant::now()));
        let c = health.counts();
        assert_eq!((c.healthy, c.probe_due), (0, 1));
        assert!(!health.all_ejected(), "the probe may go");
    }
}
