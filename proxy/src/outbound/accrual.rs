//! Failure accrual: an endpoint that fails [`THRESHOLD`] times in a row
//! (5xx responses or connection errors) leaves the balancer: its
//! `poll_ready` waits on a timer, so p2c stops choosing it. When the timer
//! fires, one probe request goes through; a success restores the endpoint,
//! a failure ejects it again for twice as long (1 s up to 60 s).

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
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::errors::OutboundError;

/// Consecutive failures before an endpoint is ejected.
pub const THRESHOLD: u32 = 5;
const MIN_EJECTION: Duration = Duration::from_secs(1);
/// How often an endpoint whose probe is in flight checks whether it ended.
const PROBE_WAIT: Duration = Duration::from_millis(10);
const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Which endpoints of one destination are ejected, shared with the request
/// path so that a destination with every endpoint ejected fails fast.
#[derive(Debug)]
pub struct Health<K> {
    endpoints: Mutex<HashMap<K, Option<Instant>>>,
}

impl<K> Default for Health<K> {
    fn default() -> Self {
        Self {
            endpoints: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Health<K> {
    pub fn insert(&self, key: K) {
        self.lock().insert(key, None);
    }

    pub fn remove(&self, key: &K) {
        self.lock().remove(key);
    }

    fn set(&self, key: &K, until: Option<Instant>) {
        if let Some(slot) = self.lock().get_mut(key) {
            *slot = until;
        }
    }

    /// Whether there are endpoints and every one is ejected right now.
    pub fn all_ejected(&self) -> bool {
        let now = Instant::now();
        let endpoints = self.lock();
        !endpoints.is_empty() && endpoints.values().all(|u| u.is_some_and(|u| u > now))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Option<Instant>>> {
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
    key: K,
    inner: S,
    health: Arc<Health<K>>,
    state: Arc<Mutex<State>>,
    sleep: Option<Pin<Box<Sleep>>>,
    on_eject: OnEject<K>,
}

impl<K: std::fmt::Debug, S> std::fmt::Debug for Accrual<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accrual")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, S> Accrual<K, S> {
    pub fn new(key: K, inner: S, health: Arc<Health<K>>, on_eject: OnEject<K>) -> Self {
        health.insert(key.clone());
        Self {
            key,
            inner,
            health,
            state: Arc::default(),
            sleep: None,
            on_eject,
        }
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

/// Records one outcome and says what it changed.
fn record(state: &Mutex<State>, failed: bool) -> Change {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if !failed {
        let was_ejected = s.ejections > 0;
        *s = State::default();
        return if was_ejected {
            Change::Restored
        } else {
            Change::None
        };
    }
    s.consecutive += 1;
    if !s.probing && s.consecutive < THRESHOLD {
        return Change::None;
    }
    let backoff = MIN_EJECTION
        .saturating_mul(1 << s.ejections.min(6))
        .min(MAX_EJECTION);
    s.ejections += 1;
    s.consecutive = 0;
    s.probing = false;
    s.probe_in_flight = false;
    let until = Instant::now() + backoff;
    s.ejected_until = Some(until);
    Change::Ejected(until, backoff)
}

impl<K, S> tower::Service<http::Request<crate::wire::Body>> for Accrual<K, S>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    S: tower::Service<
            http::Request<crate::wire::Body>,
            Response = Response<Incoming>,
            Error = OutboundError,
        >,
    S::Future: Send + 'static,
{
    type Response = Response<Incoming>;
    type Error = OutboundError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, OutboundError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OutboundError>> {
        let (until, probe_in_flight) = {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
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
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.ejected_until = None;
            s.probing = true;
            self.sleep = None;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<crate::wire::Body>) -> Self::Future {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.probing {
                s.probe_in_flight = true;
            }
        }
        let fut = self.inner.call(req);
        let (state, health, key, on_eject) = (
            self.state.clone(),
            self.health.clone(),
            self.key.clone(),
            self.on_eject.clone(),
        );
        Box::pin(async move {
            let result = fut.await;
            let failed = match &result {
                Ok(resp) => resp.status().is_server_error(),
                Err(_) => true,
            };
            // The shared health is touched only when something changed.
            match record(&state, failed) {
                Change::Ejected(until, backoff) => {
                    health.set(&key, Some(until));
                    on_eject(&key, backoff);
                }
                Change::Restored => health.set(&key, None),
                Change::None => {}
            }
            result
        })
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

        let fail = tower::service_fn(|_req: http::Request<crate::wire::Body>| async {
            Err::<Response<Incoming>, _>(OutboundError::Connect("refused".into()))
        });
        let health = Arc::new(Health::default());
        let mut svc = Accrual::new("a".to_owned(), fail, health, Arc::new(|_: &String, _| {}));
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

    #[test]
    fn ejects_after_the_threshold_and_backs_off_on_failed_probes() {
        let state = Mutex::new(State::default());
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(record(&state, true), Change::None);
        }
        let Change::Ejected(_, first) = record(&state, true) else {
            panic!("ejected at the threshold")
        };
        assert_eq!(first, Duration::from_secs(1));
        // A failed probe ejects again at once, for twice as long.
        state.lock().unwrap().probing = true;
        let Change::Ejected(_, second) = record(&state, true) else {
            panic!("a failed probe ejects again")
        };
        assert_eq!(second, Duration::from_secs(2));
        // A success restores it and resets everything.
        assert_eq!(record(&state, false), Change::Restored);
        assert_eq!(state.lock().unwrap().ejections, 0);
        assert_eq!(record(&state, false), Change::None, "healthy stays quiet");
        assert_eq!(record(&state, true), Change::None, "counting starts over");
    }
}
