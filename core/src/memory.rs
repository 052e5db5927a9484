//! Giving memory back to the kernel once a burst of connections has closed.
//!
//! A proxy that held a thousand connections for a moment should not stay at
//! that size for the rest of its life. glibc keeps what it cannot return
//! from the top of an arena (issue 18 measured 20-25 MiB kept by a client
//! proxy after a burst of 1 000 connections closed, against 10 MiB idle).
//! Trimming on every close would cost in the steady state, and trimming on a
//! timer would walk the arenas for nothing; so [`AfterBursts`] watches the
//! number of open connections and asks for one release when it has fallen to
//! half its peak or less, after at least [`AfterBursts::MIN_DROP`] closed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// How many connections are open (each holds a [`Held`] while it is), and
/// the most that were open at once since the last look: a burst can open
/// and close between two looks.
#[derive(Clone, Debug, Default)]
pub struct Connections(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// The most open at once since the last call (or the start); starts
    /// again from those open now.
    pub fn take_peak(&self) -> usize {
        self.0.peak.swap(self.open(), Ordering::Relaxed)
    }

    /// Counts one connection until the guard drops.
    pub fn hold(&self) -> Held {
        let now = self.0.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.peak.fetch_max(now, Ordering::Relaxed);
        Held(self.0.clone())
    }
}

/// One open connection of a [`Connections`].
#[derive(Debug)]
pub struct Held(Arc<Counts>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When to release: after the open connections fell well below their peak.
#[derive(Debug, Default)]
pub struct AfterBursts {
    peak: usize,
}

impl AfterBursts {
    /// Fewer closed connections than this are not a burst: what they
    /// freed is not worth a walk over the heap.
    pub const MIN_DROP: usize = 64;

    /// Takes the number of connections open now and the most open at once
    /// since the last call; true when memory should be released now. The
    /// peak then starts again from `open`.
    pub fn observe(&mut self, open: usize, peak: usize) -> bool {
        self.peak = self.peak.max(peak).max(open);
        let burst_closed = self.peak - open >= Self::MIN_DROP && open <= self.peak / 2;
        if burst_closed {
            self.peak = open;
        }
        burst_closed
    }
}

/// Every `every`, reads `connections` (open now, and the peak since the
/// last look; added up when there are several) and, once a burst has
/// closed, asks the allocator to return its free pages. `released` is told
/// whether anything came back (for a metric and a log line).
pub async fn release_after_bursts(
    connections: Vec<Connections>,
    every: Duration,
    released: impl Fn(bool),
) {
    let mut when = AfterBursts::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let peak = connections.iter().map(Connections::take_peak).sum();
        let now = connections.iter().map(Connections::open).sum();
        if !when.observe(now, peak) {
            continue;
        }
        // The walk over the arenas can take milliseconds: not on a worker.
        let gave = tokio::task::spawn_blocking(crate::sys::release_free_memory)
            .await
            .unwrap_or(false);
        tracing::debug!(
            open = now,
            gave,
            "a burst of connections closed: memory released"
        );
        released(gave);
    }
}

#[cfg(test)]
mod tests {
    use super::AfterBursts;

    #[test]
    fn a_connection_counts_while_it_is_held_and_the_peak_between_looks() {
        let open = super::Connections::default();
        let (a, b) = (open.hold(), open.clone().hold());
        assert_eq!(open.open(), 2);
        drop(a);
        assert_eq!(open.open(), 1);
        drop(b);
        assert_eq!(open.open(), 0);
        // Both closed before anyone looked: the peak still says 2.
        assert_eq!(open.take_peak(), 2);
        assert_eq!(open.take_peak(), 0);
    }

    #[test]
    fn releases_once_when_a_burst_has_closed() {
        let mut when = AfterBursts::default();
        // Rising and steady: nothing.
        for open in [0, 10, 500, 1000, 990, 700, 501] {
            assert!(!when.observe(open, open), "released at {open} open");
        }
        // Half the peak or less: once.
        assert!(when.observe(500, 500));
        assert!(!when.observe(480, 480));
        assert!(!when.observe(250 + 1, 250 + 1));
        // The peak started again from 500.
        assert!(when.observe(250, 250));
    }

    #[test]
    fn a_burst_between_two_looks_counts() {
        let mut when = AfterBursts::default();
        assert!(!when.observe(0, 0));
        // 1 000 opened and closed within one interval.
        assert!(when.observe(0, 1000));
        assert!(!when.observe(0, 0));
    }

    #[test]
    fn a_few_closed_connections_are_not_a_burst() {
        let mut when = AfterBursts::default();
        for (open, peak) in [(40, 40), (0, 40), (63, 63), (0, 63), (0, 63)] {
            assert!(!when.observe(open, peak), "released at {open} open");
        }
        assert!(!when.observe(100, 100));
        assert!(when.observe(0, 100));
    }
}
