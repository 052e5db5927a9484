//! failover: one destination's endpoints in tiers, one balancer per tier,
//! and per request the tier, by the tiers' health as this proxy sees it.
//!
//! Discovery gives each endpoint its tier (`priority`) and, when a
//! FailoverPolicy steers the service, the policy's threshold and failback
//! delay. Each tier has its own balancer (p2c over peak-EWMA, failure
//! accrual), fed by its part of the discovery stream. The tiers' loads:
//!
//! - tier `i`'s healthy share `h_i` is its healthy endpoints over those
//!   discovery lists for it (ejected by accrual, or behind a tunnel that
//!   is down, is unhealthy; none listed is 0);
//! - down the tiers, with what is left to place (all of it at first), tier
//!   `i` takes `min(1, h_i / threshold)` of it and the rest spills to tier
//!   `i + 1` (Envoy's priority spill-over, with `1 / threshold` as its
//!   overprovisioning factor): at threshold 0.7 a tier at 70 % healthy or
//!   better takes everything, at 35 % half of what reaches it;
//! - what no tier takes is given to the tiers in proportion to what they
//!   took (the last healthy endpoints get everything rather than nothing);
//! - hysteresis: a tier's share falls at once, but rises only once it has
//!   been at least that high for the failback delay, so a recovering tier
//!   gets traffic back once, not in flaps.
//!
//! A request that could not reach its endpoint (nothing sent) goes on to
//! the next tier with a healthy endpoint at once. Tiers are picked with a
//! low-discrepancy sequence, so the split matches the loads closely even
//! over a few requests.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_core::api::v1::{DiscoveryUpdate, EndpointSet, Failover, discovery_update::Kind};
use tokio::{sync::watch, time::Instant};

use super::{
    accrual::Counts,
    balance::{Balancer, DestinationHealth, balancer},
    endpoint::Dialer,
};
use crate::metrics::Metrics;

/// Tiers one destination may have; discovery's later tiers join the last.
pub const MAX_TIERS: usize = 8;
/// The longest ejection of a steered destination's endpoints: each is
/// probed at least this often, so a recovered tier is seen within it.
pub const TIER_MAX_EJECTION: Duration = Duration::from_secs(2);
/// The loads are recomputed at most this often (on the request path).
const REFRESH: Duration = Duration::from_millis(20);
/// The golden ratio's fractional part: `frac(n * PHI)` spreads evenly.
const PHI: f64 = 0.618_033_988_749_894_9;

/// One tier: its balancer and its endpoints' health.
#[derive(Clone)]
pub struct Tier {
    pub balancer: Balancer,
    pub health: Arc<DestinationHealth>,
    updates: Arc<watch::Sender<Option<Arc<DiscoveryUpdate>>>>,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("health", &self.health.counts())
            .finish_non_exhaustive()
    }
}

/// How the tiers share the traffic right now.
#[derive(Debug, Default)]
struct State {
    settings: Option<Failover>,
    computed_at: Option<Instant>,
    loads: Vec<f64>,
    /// Each tier's healthy share after hysteresis, and since when its raw
    /// share has been above it; `None` until the tier first had endpoints
    /// (its first share counts at once: there is nothing to fail back from).
    effective: Vec<Option<(f64, Option<Instant>)>>,
    /// The best tier taking traffic.
    primary: Option<usize>,
    /// Each tier's counts at the last recompute.
    counts: Vec<Counts>,
    /// When a probe was last sent to each tier taking no traffic.
    probed: Vec<Option<Instant>>,
}

/// A destination's tiers.
pub struct Tiers {
    authority: String,
    tiers: Mutex<Vec<Tier>>,
    state: Mutex<State>,
    picks: AtomicU64,
    dialer: Dialer,
    metrics: Metrics,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiers")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// The loads of tiers with healthy shares `shares` (see the module doc).
pub fn loads(shares: &[f64], threshold: f64) -> Vec<f64> {
    let mut left = 1.0;
    let mut loads: Vec<f64> = shares
        .iter()
        .map(|&h| {
            let take = if h <= 0.0 {
                0.0
            } else if threshold <= 0.0 || h >= threshold {
                1.0
            } else {
                h / threshold
            };
            let load = left * take;
            left -= load;
            load
        })
        .collect();
    let placed: f64 = loads.iter().sum();
    if placed > 0.0 && left > 0.0 {
        for load in &mut loads {
            *load /= placed;
        }
    }
    loads
}

/// A tier's share after hysteresis, `effective` updated: the first share
/// it has counts at once; later it falls at once and rises only after the
/// raw share has been higher for `delay` without a dip.
fn hysteresis(
    effective: &mut Option<(f64, Option<Instant>)>,
    c: &Counts,
    now: Instant,
    delay: Duration,
) -> f64 {
    let raw = if c.total == 0 {
        0.0
    } else {
        c.healthy as f64 / c.total as f64
    };
    let Some((share, rising)) = effective else {
        if c.total > 0 {
            *effective = Some((raw, None));
        }
        return raw;
    };
    if raw < *share {
        *share = raw;
        *rising = None;
    } else if raw > *share {
        match rising {
            Some(since) if now.duration_since(*since) >= delay => {
                *share = raw;
                *rising = None;
            }
            Some(_) => {}
            None => *rising = Some(now),
        }
    } else {
        *rising = None;
    }
    *share
}

impl Tiers {
    /// Tiers following `updates` (one destination's discovery stream).
    pub fn new(
        updates: watch::Receiver<Option<Arc<DiscoveryUpdate>>>,
        dialer: Dialer,
        metrics: Metrics,
        authority: &str,
    ) -> Arc<Self> {
        let tiers = Arc::new(Self {
            authority: authority.to_owned(),
            tiers: Mutex::new(Vec::new()),
            state: Mutex::default(),
            picks: AtomicU64::new(0),
            dialer,
            metrics,
        });
        tiers.split(updates.borrow().clone());
        tokio::spawn(follow(updates, Arc::downgrade(&tiers)));
        tiers
    }

    /// Hands each tier its endpoints from `update`.
    fn split(&self, update: Option<Arc<DiscoveryUpdate>>) {
        let (endpoints, settings) = match update.as_deref().and_then(|u| u.kind.as_ref()) {
            Some(Kind::Endpoints(set)) => (set.endpoints.as_slice(), set.failover.clone()),
            _ => (&[][..], None),
        };
        let tier_of = |priority: u32| (priority as usize).min(MAX_TIERS - 1);
        let count = endpoints
            .iter()
            .map(|e| tier_of(e.priority) + 1)
            .chain(settings.as_ref().map(|s| s.tiers.len().min(MAX_TIERS)))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..count.max(tiers.len()) {
            let mine = match update.as_deref().and_then(|u| u.kind.as_ref()) {
                Some(Kind::Endpoints(set)) => Some(Arc::new(DiscoveryUpdate {
                    kind: Some(Kind::Endpoints(EndpointSet {
                        authority: set.authority.clone(),
                        endpoints: set
                            .endpoints
                            .iter()
                            .filter(|e| tier_of(e.priority) == i)
                            .cloned()
                            .collect(),
                        failover: None,
                    })),
                })),
                _ => update.clone(),
            };
            match tiers.get(i) {
                Some(tier) => {
                    tier.updates.send_replace(mine);
                }
                None => {
                    let (tx, rx) = watch::channel(mine);
                    let max_ejection = if settings.is_some() {
                        TIER_MAX_EJECTION
                    } else {
                        super::accrual::MAX_EJECTION
                    };
                    let (balancer, health) =
                        balancer(rx, self.dialer.clone(), self.metrics.clone(), max_ejection);
                    tiers.push(Tier {
                        balancer,
                        health,
                        updates: Arc::new(tx),
                    });
                }
            }
        }
        drop(tiers);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.settings = settings;
        state.computed_at = None;
    }

    /// Tier `i` (clamped to the last).
    pub fn tier(&self, i: usize) -> Tier {
        let tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
        tiers[i.min(tiers.len() - 1)].clone()
    }

    /// Whether a policy steers this destination over several tiers.
    pub fn is_tiered(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settings
            .is_some()
    }

    /// The tier for the next request.
    pub fn pick(&self) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.settings.is_none() {
            return 0;
        }
        let now = Instant::now();
        if state
            .computed_at
            .is_none_or(|at| now.duration_since(at) >= REFRESH)
        {
            self.recompute(&mut state, now);
        }
        let n = self.picks.fetch_add(1, Ordering::Relaxed);
        let x = (n as f64 * PHI).fract();
        let mut sum = 0.0;
        let mut chosen = None;
        for (i, load) in state.loads.iter().enumerate() {
            sum += load;
            if x < sum {
                chosen = Some(i);
                break;
            }
        }
        // Nothing healthy anywhere: the best tier, whose balancer probes.
        let chosen = chosen.unwrap_or(state.primary.unwrap_or(0));
        // A better tier with an ejected endpoint due for its probe gets this
        // request, one every TIER_MAX_EJECTION: a tier that takes no traffic
        // learns it recovered only from a probe (an unreachable one sends
        // the request on to the next tier).
        let due = (0..chosen).find(|&j| {
            state.counts.get(j).is_some_and(|c| c.probe_due > 0)
                && state
                    .probed
                    .get(j)
                    .copied()
                    .flatten()
                    .is_none_or(|at| now.duration_since(at) >= TIER_MAX_EJECTION)
        });
        if let Some(j) = due {
            if state.probed.len() <= j {
                state.probed.resize(j + 1, None);
            }
            state.probed[j] = Some(now);
            state.computed_at = None;
            return j;
        }
        chosen
    }

    /// The next tier after `tier` with a healthy endpoint now.
    pub fn next_after(&self, tier: usize) -> Option<usize> {
        let tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
        (tier + 1..tiers.len()).find(|&i| tiers[i].health.counts().healthy > 0)
    }

    fn recompute(&self, state: &mut State, now: Instant) {
        let Some(settings) = state.settings.clone() else {
            return;
        };
        let counts: Vec<Counts> = self
            .tiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| t.health.counts())
            .collect();
        let delay = Duration::from_millis(u64::from(settings.failback_delay_ms));
        state.effective.resize(counts.len(), None);
        let mut shares = Vec::with_capacity(counts.len());
        for (c, effective) in counts.iter().zip(state.effective.iter_mut()) {
            shares.push(hysteresis(effective, c, now, delay));
        }
        state.loads = loads(&shares, settings.threshold);
        state.computed_at = Some(now);
        let primary = state.loads.iter().position(|l| *l > 0.0);
        state.counts = counts.clone();
        let names: Vec<String> = (0..shares.len())
            .map(|i| {
                settings
                    .tiers
                    .get(i)
                    .map_or_else(|| format!("tier{i}"), |t| t.clusters.join("+"))
            })
            .collect();
        self.report(
            state.primary,
            primary,
            &counts,
            (&shares, &state.loads, &names),
        );
        state.primary = primary;
    }

    /// Metrics, and a log line and an event when the best tier in use
    /// changes.
    fn report(
        &self,
        before: Option<usize>,
        now: Option<usize>,
        counts: &[Counts],
        (shares, loads, names): (&[f64], &[f64], &[String]),
    ) {
        let m = &self.metrics;
        let authority = m.authorities.get(&self.authority);
        for (i, ((share, load), name)) in shares.iter().zip(loads).zip(names).enumerate() {
            let labels = crate::metrics::TierLabels {
                authority: authority.clone(),
                tier: i as u32,
                clusters: name.clone(),
            };
            m.failover_healthy_share.get_or_create(&labels).set(*share);
            m.failover_load.get_or_create(&labels).set(*load);
        }
        m.failover_tier
            .get_or_create(&crate::metrics::AuthorityLabels {
                authority: authority.clone(),
            })
            .set(now.map_or(-1, |t| t as i64));
        let (Some(before), Some(now)) = (before, now) else {
            return;
        };
        if before == now {
            return;
        }
        let (direction, reason) = if now > before {
            let c = counts.get(before).copied().unwrap_or_default();
            let reason = if c.total == 0 {
                "no_endpoints"
            } else if c.tunnel_down > 0 {
                "tunnel_down"
            } else {
                "unhealthy"
            };
            ("failover", reason)
        } else {
            ("failback", "recovered")
        };
        m.failover_events
            .get_or_create(&crate::metrics::FailoverEventLabels {
                authority,
                direction,
                reason,
            })
            .inc();
        tracing::warn!(
            authority = %self.authority,
            from = %names.get(before).map_or("?", String::as_str),
            to = %names.get(now).map_or("?", String::as_str),
            reason,
            ?loads,
            "{direction}: traffic now starts at tier {now}"
        );
    }
}

/// Splits every discovery change over the tiers while they are in use.
async fn follow(mut updates: watch::Receiver<Option<Arc<DiscoveryUpdate>>>, tiers: Weak<Tiers>) {
    while updates.changed().await.is_ok() {
        let Some(tiers) = tiers.upgrade() else { return };
        tiers.split(updates.borrow_and_update().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn a_tier_spills_in_proportion_below_the_threshold() {
        // Healthy enough: everything stays in the first tier.
        assert!(close(&loads(&[1.0, 1.0, 1.0], 0.7), &[1.0, 0.0, 0.0]));
        assert!(close(&loads(&[0.7, 1.0], 0.7), &[1.0, 0.0]));
        // Half healthy at 0.7: 0.5/0.7 stays, the rest spills.
        let l = loads(&[0.5, 1.0], 0.7);
        assert!(close(&l, &[0.5 / 0.7, 1.0 - 0.5 / 0.7]), "{l:?}");
        // Spilling twice.
        let l = loads(&[0.35, 0.35, 1.0], 0.7);
        assert!(close(&l, &[0.5, 0.25, 0.25]), "{l:?}");
        // A dead tier passes everything on.
        assert!(close(&loads(&[0.0, 1.0, 1.0], 0.7), &[0.0, 1.0, 0.0]));
        // Nowhere healthy enough: what is left goes where there is health.
        let l = loads(&[0.35, 0.0], 0.7);
        assert!(close(&l, &[1.0, 0.0]), "{l:?}");
        // Nothing healthy at all: nothing placed.
        assert!(close(&loads(&[0.0, 0.0], 0.7), &[0.0, 0.0]));
        // Threshold 0: any health takes all; 1: only a whole tier does.
        assert!(close(&loads(&[0.1, 1.0], 0.0), &[1.0, 0.0]));
        assert!(close(&loads(&[0.9, 1.0], 1.0), &[0.9, 0.1]));
    }

    #[test]
    fn the_golden_ratio_sequence_splits_as_the_loads_say() {
        let loads = [0.5 / 0.7, 1.0 - 0.5 / 0.7];
        let n = 1000;
        let mut second = 0;
        for i in 0..n {
            let x = (i as f64 * PHI).fract();
            if x >= loads[0] {
                second += 1;
            }
        }
        let got = f64::from(second) / f64::from(n);
        assert!((got - loads[1]).abs() < 0.01, "{got}");
    }

    #[test]
    fn shares_fall_at_once_and_rise_after_the_delay_without_a_dip() {
        let t0 = Instant::now();
        let delay = Duration::from_secs(3);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let c = |healthy, total| Counts {
            total,
            healthy,
            ..Counts::default()
        };
        let mut e = None;
        // No endpoints yet: nothing established.
        assert_eq!(hysteresis(&mut e, &c(0, 0), at(0), delay), 0.0);
        assert!(e.is_none());
        // The first share counts at once.
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(1), delay), 1.0);
        // Down at once.
        assert_eq!(hysteresis(&mut e, &c(0, 2), at(2), delay), 0.0);
        // Up only after the delay...
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(3), delay), 0.0);
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(5), delay), 0.0);
        // ... and a dip starts the wait over.
        assert_eq!(hysteresis(&mut e, &c(0, 2), at(5), delay), 0.0);
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(6), delay), 0.0);
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(8), delay), 0.0);
        assert_eq!(hysteresis(&mut e, &c(2, 2), at(9), delay), 1.0);
    }
}
