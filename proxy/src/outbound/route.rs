//! route: which HTTPRoute rule a request matches, and what that rule says:
//! weighted backends (traffic split), timeouts and retries.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderMap, Method};
use mesh_core::api::v1::{OutboundPolicy, RetryPolicy, RouteMatch, path_match};
use tower::retry::budget::{Budget, TpsBudget};

/// Bodies larger than this are sent once, never buffered for a retry.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;

/// What to do with one request; it borrows the policy and the authority,
/// so the common case (no route, one backend) copies no string.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan<'a> {
    /// `<ns>/<name>#<rule>` of the matched rule, or `default`.
    pub route: Cow<'static, str>,
    /// Backend authorities with weights. Empty when the matched rule's
    /// backends all weigh 0: Gateway API answers 500 then.
    pub backends: Vec<(&'a str, u32)>,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// Each attempt.
    pub attempt_timeout: Option<Duration>,
    pub retry: Option<&'a RetryPolicy>,
}

fn matches(m: &RouteMatch, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    let path_ok = m
        .path
        .as_ref()
        .is_none_or(|p| match path_match::Kind::try_from(p.kind) {
            Ok(path_match::Kind::Exact) => path == p.value,
            _ => {
                // A prefix matches whole segments: /v2 matches /v2 and /v2/x, not /v20.
                let prefix = p.value.trim_end_matches('/');
                path == prefix || path.starts_with(&format!("{prefix}/")) || prefix.is_empty()
            }
        });
    let method_ok = m.method.is_empty() || m.method.eq_ignore_ascii_case(method.as_str());
    let headers_ok = m
        .headers
        .iter()
        .all(|h| headers.get(&h.name).and_then(|v| v.to_str().ok()) == Some(h.value.as_str()));
    path_ok && method_ok && headers_ok
}

/// The plan for a request to `authority` under `policy` (absent: default).
pub fn plan<'a>(
    policy: Option<&'a OutboundPolicy>,
    authority: &'a str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Plan<'a> {
    let default = Plan {
        route: Cow::Borrowed("default"),
        backends: vec![(authority, 1)],
        request_timeout: None,
        attempt_timeout: None,
        retry: None,
    };
    let Some(policy) = policy else { return default };
    for route in &policy.routes {
        for (i, rule) in route.rules.iter().enumerate() {
            let hit = rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .any(|m| matches(m, method, path, headers));
            if !hit {
                continue;
            }
            let backends: Vec<(&str, u32)> = rule
                .backends
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| (b.authority.as_str(), b.weight))
                .collect();
            let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
            return Plan {
                route: Cow::Owned(format!("{}#{i}", route.name)),
                // A rule that names no backend goes to the parent service;
                // one whose backends all weigh 0 goes nowhere.
                backends: if rule.backends.is_empty() {
                    default.backends
                } else {
                    backends
                },
                request_timeout: ms(rule.request_timeout_ms),
                attempt_timeout: ms(rule.backend_request_timeout_ms),
                retry: rule.retry.as_ref().filter(|r| r.attempts > 0),
            };
        }
    }
    default
}

/// Picks backends in proportion to their weights (smooth weighted round
/// robin: exact shares, evenly spread, no randomness), and holds the retry
/// budget.
#[derive(Debug)]
pub struct Splitter {
    current: Mutex<HashMap<String, Vec<i64>>>,
    budget: Arc<TpsBudget>,
}

impl Default for Splitter {
    fn default() -> Self {
        Self {
            current: Mutex::default(),
            // DESIGN.md section 6: 20 % of requests plus 10 per second, over 10 s.
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        }
    }
}

impl Splitter {
    /// `plan.backends` must not be empty.
    pub fn pick<'a>(&self, plan: &Plan<'a>) -> &'a str {
        if plan.backends.len() == 1 {
            return plan.backends[0].0;
        }
        let mut all = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let current = all.entry(plan.route.to_string()).or_default();
        current.resize(plan.backends.len(), 0);
        let total: i64 = plan.backends.iter().map(|(_, w)| i64::from(*w)).sum();
        for (c, (_, w)) in current.iter_mut().zip(&plan.backends) {
            *c += i64::from(*w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("backends are not empty");
        current[best] -= total;
        plan.backends[best].0
    }

    /// Every request pays into the retry budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Whether a retry may be spent now.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::api::v1::{HeaderMatch, PathMatch, Route, RouteRule, WeightedBackend};

    use super::*;

    fn policy() -> OutboundPolicy {
        OutboundPolicy {
            authority: "api.shop.svc.cluster.local:80".into(),
            routes: vec![Route {
                name: "shop/api".into(),
                rules: vec![
                    RouteRule {
                        matches: vec![RouteMatch {
                            path: Some(PathMatch {
                                kind: path_match::Kind::Prefix as i32,
                                value: "/v2".into(),
                            }),
                            headers: vec![HeaderMatch {
                                name: "x-canary".into(),
                                value: "1".into(),
                            }],
                            method: "GET".into(),
                        }],
                        request_timeout_ms: 2000,
                        backend_request_timeout_ms: 500,
                        retry: Some(RetryPolicy {
                            attempts: 2,
                            codes: vec![503],
                            backoff_ms: 25,
                        }),
                        backends: vec![WeightedBackend {
                            authority: "api-v2.shop.svc.cluster.local:80".into(),
                            weight: 1,
                        }],
                    },
                    RouteRule {
                        backends: vec![
                            WeightedBackend {
                                authority: "a:80".into(),
                                weight: 3,
                            },
                            WeightedBackend {
                                authority: "b:80".into(),
                                weight: 1,
                            },
                        ],
                        ..Default::default()
                    },
                ],
            }],
            ..Default::default()
        }
    }

    /// The retry budget is 20 % of requests plus 10 per second over 10 s:
    /// with no requests, 100 retries, then none; each 5 requests buy one.
    #[test]
    fn the_retry_budget_runs_out() {
        let splitter = Splitter::default();
        let granted = (0..150).filter(|_| splitter.withdraw()).count();
        assert_eq!(granted, 100, "the 10/s floor over the 10 s window");
        assert!(!splitter.withdraw(), "exhausted");
        for _ in 0..50 {
            splitter.deposit();
        }
        let granted = (0..50).filter(|_| splitter.withdraw()).count();
        assert_eq!(granted, 10, "20 % of 50 requests");
    }

    #[test]
    fn backends_that_all_weigh_zero_get_nothing() {
        let mut p = policy();
        for b in &mut p.routes[0].rules[1].backends {
            b.weight = 0;
        }
        let zero = plan(Some(&p), "api:80", &Method::GET, "/", &HeaderMap::new());
        assert_eq!(zero.route, "shop/api#1");
        assert!(zero.backends.is_empty(), "not the parent service: {zero:?}");
        p.routes[0].rules[1].backends.clear();
        let none = plan(Some(&p), "api:80", &Method::GET, "/", &HeaderMap::new());
        assert_eq!(
            none.backends,
            vec![("api:80", 1)],
            "no backendRefs: the parent"
        );
    }

    #[test]
    fn first_matching_rule_wins() {
        let p = policy();
        let mut h = HeaderMap::new();
        h.insert("x-canary", "1".parse().unwrap());
        let canary = plan(Some(&p), "api:80", &Method::GET, "/v2/items", &h);
        assert_eq!(canary.route, "shop/api#0");
        assert_eq!(canary.request_timeout, Some(Duration::from_millis(2000)));
        assert_eq!(canary.attempt_timeout, Some(Duration::from_millis(500)));
        assert_eq!(
            canary.backends,
            vec![("api-v2.shop.svc.cluster.local:80", 1)]
        );
        // Not /v20, not POST, not without the header: the catch-all rule.
        for (method, path, headers) in [
            (Method::GET, "/v20", h.clone()),
            (Method::POST, "/v2", h.clone()),
            (Method::GET, "/v2", HeaderMap::new()),
        ] {
            assert_eq!(
                plan(Some(&p), "api:80", &method, path, &headers).route,
                "shop/api#1",
                "{method} {path}"
            );
        }
        assert_eq!(
            plan(None, "api:80", &Method::GET, "/", &h).backends,
            vec![("api:80", 1)]
        );
    }

    #[test]
    fn weights_split_exactly_and_evenly() {
        let policy = policy();
        let p = plan(
            Some(&policy),
            "api:80",
            &Method::GET,
            "/",
            &HeaderMap::new(),
        );
        let s = Splitter::default();
        let picks: Vec<&str> = (0..8).map(|_| s.pick(&p)).collect();
        assert_eq!(picks.iter().filter(|b| **b == "a:80").count(), 6);
        assert_eq!(
            picks[..4].iter().filter(|b| **b == "b:80").count(),
            1,
            "spread, not bunched: {picks:?}"
        );
    }
}
