//! Following control-plane watch streams: one stream per key (an app port,
//! an authority), started on first use, reconnected with backoff. The
//! latest value is cached; while the control plane is away the last value
//! keeps applying.

use std::{
    collections::HashMap,
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
    keys: Arc<Mutex<HashMap<K, Latest<T>>>>,
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
    pub fn watch(&self, key: &K) -> Latest<T> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = keys.get(key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        keys.insert(key.clone(), rx.clone());
        tokio::spawn(follow(self.what, self.open.clone(), key.clone(), tx));
        rx
    }

    /// The current value of `key`, waiting up to `wait` for a first one.
    pub async fn get(&self, key: &K, wait: Duration) -> Option<Arc<T>> {
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

async fn follow<K: fmt::Debug + Clone, T>(
    what: &'static str,
    open: Open<K, T>,
    key: K,
    tx: watch::Sender<Option<Arc<T>>>,
) {
    let mut failures = 0;
    loop {
        match open(key.clone()).await {
            Ok(mut stream) => loop {
                match stream.message().await {
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
        tokio::time::sleep(backoff(failures)).await;
        failures += 1;
    }
}
