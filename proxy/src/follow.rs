//! Following control-plane watch streams: one stream per key (an app port,
//! an authority), started on first use, reconnected with backoff. The
//! latest value is cached; while the control plane is away the last value
//! keeps applying. Keys not used for a while can be evicted
//! ([`Follower::evict_idle`]): the stream stops once nothing else holds
//! its value either.

use std::{
    fmt,
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tonic::{Status, Streaming};

use crate::identity::backoff;

/// The latest value of one key, shared (None until the first answer).
pub type Latest<T> = watch::Receiver<Option<Arc<T>>>;

type Open<K, T> = Arc<
    dyn Fn(K) -> Pin<Box<dyn Future<Output = Result<Streaming<T>, Status>> + Send>> + Send + Sync,
>;

/// Cached, self-refreshing values from one kind of watch stream.
pub struct Follower<K, T> {
    what: &'static str,
    open: Open<K, T>,
    keys: Arc<Mutex<crate::FastMap<K, Followed<T>>>>,
}

/// One followed key: its value, and when it was last asked for.
struct Followed<T> {
    latest: Latest<T>,
    used: tokio::time::Instant,
}

impl<K, T> Clone for Follower<K, T> {
    fn clone(&self) -> Self {
        Self {
            what: self.what,
            open: self.open.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<K, T> fmt::Debug for Follower<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl<K, T> Follower<K, T>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// `open(key)` starts the stream for one key; `what` names it in logs.
    pub fn new<F, Fut>(what: &'static str, open: F) -> Self
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Streaming<T>, Status>> + Send + 'static,
    {
        Self {
            what,
            open: Arc::new(move |k| Box::pin(open(k))),
            keys: Arc::default(),
        }
    }

    /// The updates of `key` (starting its stream on first use). Values are
    /// shared, so reading one on the request path copies nothing.
    /// The key is copied only when its stream starts.
    pub fn watch<Q>(&self, key: &Q) -> Latest<T>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = tokio::time::Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(followed) = keys.get_mut(key) {
            followed.used = now;
            return followed.latest.clone();
        }
        let key = key.to_owned();
        let (tx, rx) = watch::channel(None);
        keys.insert(
            key.clone(),
            Followed {
                latest: rx.clone(),
                used: now,
            },
        );
        tokio::spawn(follow(self.what, self.open.clone(), key.clone(), tx));
        rx
    }

    /// Whether `key` may be followed: it already is, or fewer than `max`
    /// keys are.
    pub fn has_room_for<Q>(&self, key: &Q, max: usize) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.contains_key(key) || keys.len() < max
    }

    /// Stops following keys not asked for since `before`; returns them.
    /// Their streams end once no one else holds their values.
    pub fn evict_idle(&self, before: tokio::time::Instant) -> Vec<K> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let idle: Vec<K> = keys
            .iter()
            .filter(|(_, f)| f.used < before)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &idle {
            keys.remove(key);
        }
        idle
    }

    /// Stops following `key` (it was evicted elsewhere).
    pub fn remove(&self, key: &K) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The current value of `key`, waiting up to `wait` for a first one.
    pub async fn get<Q>(&self, key: &Q, wait: Duration) -> Option<Arc<T>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut rx = self.watch(key);
        // On the request path the value is almost always there already:
        // take it without arming a timer.
        if let Some(value) = rx.borrow().clone() {
            return Some(value);
        }
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone(),
            _ => None,
        }
    }
}

/// How long opening a watch stream may take before it is retried.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

async fn follow<K: fmt::Debug + Clone, T>(
    what: &'static str,
    open: Open<K, T>,
    key: K,
    tx: watch::Sender<Option<Arc<T>>>,
) {
    let mut failures = 0;
    // Ends when the last holder of the value is gone (the key was evicted).
    while !tx.is_closed() {
        // A watch that does not open in time is retried, so a stalled
        // connection never leaves the key unfollowed.
        let opened = tokio::select! {
            opened = tokio::time::timeout(OPEN_TIMEOUT, open(key.clone())) => opened
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("the watch did not open within {OPEN_TIMEOUT:?}")))),
            () = tx.closed() => return,
        };
        match opened {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = tx.closed() => return,
                };
                match message {
                    Ok(Some(value)) => {
                        failures = 0;
                        tx.send_replace(Some(Arc::new(value)));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(?key, error = %e.message(), "{what} stream broke; keeping the last state");
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!(?key, error = %e.message(), "cannot watch {what}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(failures)) => {}
            () = tx.closed() => return,
        }
        failures += 1;
    }
}
