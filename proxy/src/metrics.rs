//! The proxy's Prometheus metrics. Every refusal is counted with a
//! `reason` label.

use std::sync::{Arc, atomic::AtomicU64};

use mesh_core::admin::registered;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// `true` when the allocator returned any pages.
    pub released: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    /// The app port.
    pub port: u16,
    pub status_code: u16,
    /// `success` unless the status is 5xx.
    pub classification: &'static str,
    /// The verified caller's SPIFFE ID (capped in cardinality).
    pub client_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub authority: String,
    /// The cluster discovery placed the destination in; empty when unknown.
    pub dst_cluster: String,
    pub status_code: u16,
    /// `success` unless the status is 5xx.
    pub classification: &'static str,
    /// `mtls` when the request went to a meshed endpoint, else `none`.
    pub tls: &'static str,
    /// The HTTPRoute rule that matched (`<namespace>/<name>#<rule>`),
    /// `default` without one, empty when no route applied (opaque,
    /// unmeshed, or failed before routing). Capped.
    pub route: String,
    /// The SPIFFE ID of the endpoint that answered; empty when unmeshed
    /// or unknown. Capped.
    pub dst_identity: String,
}

/// Who answered an outbound request: its cluster, its identity and the
/// route that sent it there. Empty fields are unknown.
#[derive(Clone, Copy, Debug, Default)]
pub struct Answered<'a> {
    pub cluster: &'a str,
    pub identity: &'a str,
    pub route: &'a str,
}

/// The proxy's own identity, one series whose value is 1: what Prometheus
/// joins outbound requests with to name the caller of an edge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub cluster: String,
    pub namespace: String,
    pub workload: String,
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabels {
    pub authority: String,
}

/// One failover tier of a destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub authority: String,
    /// 0 is the best tier.
    pub tier: u32,
    /// Its clusters as the policy names them, `+`-joined (`local` is the
    /// proxy's own).
    pub clusters: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverEventLabels {
    pub authority: String,
    /// `failover` (to a worse tier) or `failback`.
    pub direction: &'static str,
    /// `no_endpoints`, `unhealthy`, `tunnel_down` (failover); `recovered`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The destination authority (outbound) or the app port (inbound).
    pub target: String,
    /// The HTTPRoute rule (outbound; as on `outbound_requests_total`).
    pub route: String,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The verified caller (inbound) or the destination (outbound), capped.
    pub peer: String,
    /// `mtls` or `none`.
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    /// `sent` toward the destination or `received` from it.
    pub flow: &'static str,
}

/// `success` unless the status is a server error.
pub fn classify(status: http::StatusCode) -> &'static str {
    if status.is_server_error() {
        "failure"
    } else {
        "success"
    }
}

/// Response latency buckets, in seconds: 0.5 ms to 10 s.
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
    }
}

/// The counters the last outbound response on one connection was counted
/// on, with its labels. Most responses on a connection have the labels of
/// the one before (one destination, one status): they are counted on these
/// directly, without capping and hashing their labels into the families
/// again (a lock, several hashes and allocations per response).
#[derive(Debug, Default)]
pub struct OutboundMemo(std::sync::Mutex<Option<OutboundLast>>);

#[derive(Debug)]
struct OutboundLast {
    authority: String,
    cluster: String,
    identity: String,
    route: String,
    status: http::StatusCode,
    tls: &'static str,
    requests: Counter,
    latency: Histogram,
}

/// [`OutboundMemo`] for an inbound connection.
#[derive(Debug, Default)]
pub struct InboundMemo(std::sync::Mutex<Option<InboundLast>>);

#[derive(Debug)]
struct InboundLast {
    port: u16,
    status: http::StatusCode,
    client_id: String,
    requests: Counter,
    latency: Histogram,
}

/// Caps how many distinct values a label may take; values past the cap are
/// reported as `other`, so a flood of names cannot grow memory or the
/// scrape without bound.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    seen: std::sync::RwLock<std::collections::HashSet<String>>,
}

/// Distinct values kept per capped label (DESIGN.md section 6).
pub const LABEL_CAP: usize = 500;

impl LabelCap {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: std::sync::RwLock::default(),
        }
    }

    /// `value`, or `other` once `max` other values were seen.
    pub fn get(&self, value: &str) -> String {
        // Known values (the common case) only need a shared lock.
        if self
            .seen
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(value)
        {
            return value.to_owned();
        }
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub inbound_requests: Family<InboundLabels, Counter>,
    pub inbound_refused: Family<ReasonLabels, Counter>,
    pub tls_refused: Family<ReasonLabels, Counter>,
    pub identity_expiry: Gauge,
    pub identity_renewals: Counter,
    /// Releases of free memory to the kernel after a burst of connections
    /// closed, by whether the allocator gave anything back.
    pub memory_releases: Family<ReleaseLabels, Counter>,
    /// Bytes of code mappings whose resident pages were dropped once
    /// start-up settled; 0 before then, or when it could not be done.
    pub startup_code_released: Gauge,
    pub outbound_requests: Family<OutboundLabels, Counter>,
    pub outbound_failures: Family<ReasonLabels, Counter>,
    pub outbound_retries: Counter,
    pub endpoint_ejections: Counter,
    pub response_latency: Family<LatencyLabels, Histogram, LatencyBuckets>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_open: Family<DirectionLabels, Gauge>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    /// The best failover tier taking traffic (-1: none), per destination a
    /// FailoverPolicy steers.
    pub failover_tier: Family<AuthorityLabels, Gauge>,
    pub failover_healthy_share: Family<TierLabels, Gauge<f64, AtomicU64>>,
    pub failover_load: Family<TierLabels, Gauge<f64, AtomicU64>>,
    pub failover_events: Family<FailoverEventLabels, Counter>,
    /// Requests that could not reach their endpoint and went on to the
    /// next tier.
    pub failover_next_tier: Counter,
    /// This proxy's identity (`mesh_proxy_identity_info`), set once known.
    pub identity: Family<IdentityLabels, Gauge>,
    /// Caps the `route` label.
    pub routes: Arc<LabelCap>,
    /// Caps the `dst_identity` label.
    pub dst_identities: Arc<LabelCap>,
    /// Caps the `authority` label.
    pub authorities: Arc<LabelCap>,
    /// Caps the `client_id` label.
    pub client_ids: Arc<LabelCap>,
    /// Live request events for `/tap`.
    pub tap: mesh_core::admin::Tap,
}

impl Metrics {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// The proxy's metrics plus those `extra` registers on the same
    /// registry, unprefixed (the VM agent's own).
    pub fn with(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("mesh_proxy");
        let metrics = Self {
            inbound_requests: registered(
                r,
                "inbound_requests",
                "Inbound requests answered, by app port, status and verified caller",
                Family::default(),
            ),
            inbound_refused: registered(
                r,
                "inbound_refused",
                "Inbound requests refused by the proxy, by reason",
                Family::default(),
            ),
            tls_refused: registered(
                r,
                "inbound_tls_refused",
                "Inbound TLS handshakes refused, by reason",
                Family::default(),
            ),
            identity_expiry: registered(
                r,
                "identity_expiry_timestamp_seconds",
                "When the proxy's SVID expires (Unix time)",
                Gauge::default(),
            ),
            identity_renewals: registered(
                r,
                "identity_renewals",
                "Successful SVID renewals",
                Counter::default(),
            ),
            memory_releases: registered(
                r,
                "memory_releases",
                "Times the proxy asked the allocator to return free memory after a burst of connections closed, by whether any came back",
                Family::default(),
            ),
            startup_code_released: registered(
                r,
                "startup_code_released_bytes",
                "Bytes of the proxy's own code whose resident pages it dropped once start-up settled (code that runs again comes back from the page cache); 0 until then, or if it could not",
                Gauge::default(),
            ),
            outbound_requests: registered(
                r,
                "outbound_requests",
                "Outbound requests answered, by destination, status and TLS",
                Family::default(),
            ),
            outbound_failures: registered(
                r,
                "outbound_failures",
                "Outbound requests the proxy failed, by reason",
                Family::default(),
            ),
            outbound_retries: registered(
                r,
                "outbound_retries",
                "Outbound attempts retried within the retry budget",
                Counter::default(),
            ),
            endpoint_ejections: registered(
                r,
                "endpoint_ejections",
                "Endpoints taken out of balancing after consecutive failures",
                Counter::default(),
            ),
            response_latency: registered(
                r,
                "response_latency_seconds",
                "Time to response headers, by direction, target and classification",
                Family::new_with_constructor(LatencyBuckets),
            ),
            tcp_connections: registered(
                r,
                "tcp_connections",
                "Opaque TCP connections carried, by direction, peer and TLS",
                Family::default(),
            ),
            tcp_open: registered(
                r,
                "tcp_open_connections",
                "Opaque TCP connections open now, by direction",
                Family::default(),
            ),
            tcp_bytes: registered(
                r,
                "tcp_bytes",
                "Bytes carried on opaque TCP connections",
                Family::default(),
            ),
            failover_tier: registered(
                r,
                "failover_tier",
                "The best failover tier taking traffic for a destination a FailoverPolicy steers (0 is the first; -1 none)",
                Family::default(),
            ),
            failover_healthy_share: registered(
                r,
                "failover_healthy_share",
                "Each failover tier's healthy share as this proxy sees it (after failback hysteresis)",
                Family::default(),
            ),
            failover_load: registered(
                r,
                "failover_load",
                "The share of a destination's requests each failover tier takes",
                Family::default(),
            ),
            failover_events: registered(
                r,
                "failover_events",
                "Changes of the best failover tier taking traffic, by direction and reason",
                Family::default(),
            ),
            failover_next_tier: registered(
                r,
                "failover_next_tier_retries",
                "Requests that could not reach their endpoint (nothing sent) and went on to the next tier",
                Counter::default(),
            ),
            identity: registered(
                r,
                "identity_info",
                "This proxy's cluster, workload and SPIFFE ID (always 1): joined with request metrics to name an edge's caller",
                Family::default(),
            ),
            routes: Arc::new(LabelCap::new(LABEL_CAP)),
            dst_identities: Arc::new(LabelCap::new(LABEL_CAP)),
            authorities: Arc::new(LabelCap::new(LABEL_CAP)),
            client_ids: Arc::new(LabelCap::new(LABEL_CAP)),
            tap: tokio::sync::broadcast::channel(1024).0,
            registry: Arc::default(),
        };
        extra(&mut root);
        Self {
            registry: Arc::new(root),
            ..metrics
        }
    }

    pub fn refuse_outbound(&self, reason: &str) {
        self.outbound_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Publishes a `/tap` event; builds it only while someone is tapping.
    pub fn tap(&self, event: impl FnOnce() -> serde_json::Value) {
        if self.tap.receiver_count() > 0 {
            let mut line = event().to_string().into_bytes();
            line.push(b'\n');
            let _ = self.tap.send(bytes::Bytes::from(line));
        }
    }

    /// Counts one outbound response (and its latency, when it got one).
    pub fn outbound_response(
        &self,
        authority: &str,
        answered: Answered<'_>,
        status: http::StatusCode,
        tls: &'static str,
        latency: Option<std::time::Duration>,
    ) {
        let (requests, histogram) = self.outbound_handles(authority, answered, status, tls);
        requests.inc();
        if let Some(latency) = latency {
            histogram.observe(latency.as_secs_f64());
        }
    }

    /// [`Self::outbound_response`] for a response on the connection that
    /// `memo` belongs to: when its labels are the last response's there,
    /// it is counted without looking them up again.
    pub fn outbound_response_on(
        &self,
        memo: &OutboundMemo,
        (authority, answered): (&str, Answered<'_>),
        status: http::StatusCode,
        tls: &'static str,
        latency: std::time::Duration,
    ) {
        let mut last = memo.0.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, histogram) = match &*last {
            Some(l)
                if l.status == status
                    && l.tls == tls
                    && l.authority == authority
                    && l.cluster == answered.cluster
                    && l.identity == answered.identity
                    && l.route == answered.route =>
            {
                (&l.requests, &l.latency)
            }
            _ => {
                let (requests, latency) = self.outbound_handles(authority, answered, status, tls);
                let l = last.insert(OutboundLast {
                    authority: authority.to_owned(),
                    cluster: answered.cluster.to_owned(),
                    identity: answered.identity.to_owned(),
                    route: answered.route.to_owned(),
                    status,
                    tls,
                    requests,
                    latency,
                });
                (&l.requests, &l.latency)
            }
        };
        requests.inc();
        histogram.observe(latency.as_secs_f64());
    }

    /// The counter and the latency histogram of an outbound response.
    fn outbound_handles(
        &self,
        authority: &str,
        answered: Answered<'_>,
        status: http::StatusCode,
        tls: &'static str,
    ) -> (Counter, Histogram) {
        let authority = self.authorities.get(authority);
        let classification = classify(status);
        let route = match answered.route {
            "" => String::new(),
            route => self.routes.get(route),
        };
        let histogram = self
            .response_latency
            .get_or_create(&LatencyLabels {
                direction: "outbound",
                target: authority.clone(),
                route: route.clone(),
                classification,
            })
            .clone();
        let requests = self
            .outbound_requests
            .get_or_create(&OutboundLabels {
                authority,
                dst_cluster: answered.cluster.to_owned(),
                status_code: status.as_u16(),
                classification,
                tls,
                route,
                dst_identity: match answered.identity {
                    "" => String::new(),
                    id => self.dst_identities.get(id),
                },
            })
            .clone();
        (requests, histogram)
    }

    /// Records this proxy's identity (`mesh_proxy_identity_info`).
    pub fn set_identity(&self, labels: IdentityLabels) {
        self.identity.get_or_create(&labels).set(1);
    }

    /// Counts one inbound response and its latency, on the connection
    /// `memo` belongs to (one caller): when its port and status are the
    /// last response's there, it is counted without looking its labels up
    /// again.
    pub fn inbound_response(
        &self,
        memo: &InboundMemo,
        (port, client_id): (u16, &str),
        status: http::StatusCode,
        latency: std::time::Duration,
    ) {
        let mut last = memo.0.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, histogram) = match &*last {
            Some(l) if l.port == port && l.status == status && l.client_id == client_id => {
                (&l.requests, &l.latency)
            }
            _ => {
                let classification = classify(status);
                let histogram = self
                    .response_latency
                    .get_or_create(&LatencyLabels {
                        direction: "inbound",
                        target: port.to_string(),
                        route: String::new(),
                        classification,
                    })
                    .clone();
                let requests = self
                    .inbound_requests
                    .get_or_create(&InboundLabels {
                        port,
                        status_code: status.as_u16(),
                        classification,
                        client_id: self.client_ids.get(client_id),
                    })
                    .clone();
                let l = last.insert(InboundLast {
                    port,
                    status,
                    client_id: client_id.to_owned(),
                    requests,
                    latency: histogram,
                });
                (&l.requests, &l.latency)
            }
        };
        requests.inc();
        histogram.observe(latency.as_secs_f64());
    }

    /// Splices `a` (the side that connected) to `b` (the destination),
    /// counting the connection and its bytes.
    pub async fn splice<A, B>(
        &self,
        a: &mut A,
        b: &mut B,
        direction: &'static str,
        peer: &str,
        tls: &'static str,
    ) where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        self.splice_until(a, b, (direction, peer, tls), None).await;
    }

    /// [`Metrics::splice`], cut off at `until` when one is given (an
    /// inbound connection's maximum age). Bytes of a connection that was
    /// cut are not counted: `copy_bidirectional` reports them only at the end.
    pub async fn splice_until<A, B>(
        &self,
        a: &mut A,
        b: &mut B,
        (direction, peer, tls): (&'static str, &str, &'static str),
        until: Option<tokio::time::Instant>,
    ) where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        let peer = match direction {
            "inbound" => self.client_ids.get(peer),
            _ => self.authorities.get(peer),
        };
        self.tcp_connections
            .get_or_create(&TcpLabels {
                direction,
                peer,
                tls,
            })
            .inc();
        let open = self
            .tcp_open
            .get_or_create(&DirectionLabels { direction })
            .clone();
        open.inc();
        let copy = tokio::io::copy_bidirectional(a, b);
        let (sent, received) = match until {
            None => copy.await.unwrap_or((0, 0)),
            Some(until) => match tokio::time::timeout_at(until, copy).await {
                Ok(done) => done.unwrap_or((0, 0)),
                Err(_) => {
                    tracing::debug!(direction, "connection reached its maximum age; closed");
                    (0, 0)
                }
            },
        };
        open.dec();
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.tcp_bytes
                .get_or_create(&TcpBytesLabels {
                    direction,
                    tls,
                    flow,
                })
                .inc_by(n);
        }
    }

    pub fn refuse_inbound(&self, reason: &str) {
        self.inbound_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_overflow_into_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.get("a"), "a");
        assert_eq!(cap.get("b"), "b");
        assert_eq!(cap.get("c"), "other");
        assert_eq!(cap.get("a"), "a", "known values keep their series");
    }

    fn exposed(m: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        text
    }

    /// The value of the series of `family` whose labels include all of
    /// `labels`.
    fn series(text: &str, family: &str, labels: &[&str]) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    /// Responses on one connection whose labels change between them are
    /// each counted in their own series, not the last one's.
    #[test]
    fn a_connection_s_memo_counts_each_response_in_its_own_series() {
        let m = Metrics::new();
        let memo = InboundMemo::default();
        let ms = std::time::Duration::from_millis(1);
        let web = "spiffe://west.mesh.local/ns/shop/sa/web";
        for (port, status) in [
            (8080, 200),
            (8080, 200),
            (8080, 503),
            (9090, 200),
            (8080, 200),
        ] {
            let status = http::StatusCode::from_u16(status).unwrap();
            m.inbound_response(&memo, (port, web), status, ms);
        }
        let text = exposed(&m);
        let requests = "mesh_proxy_inbound_requests_total";
        assert_eq!(
            series(&text, requests, &["port=\"8080\"", "status_code=\"200\""]),
            3.0
        );
        assert_eq!(
            series(&text, requests, &["port=\"8080\"", "status_code=\"503\""]),
            1.0
        );
        assert_eq!(series(&text, requests, &["port=\"9090\""]), 1.0);
        let latency = "mesh_proxy_response_latency_seconds_count";
        assert_eq!(
            series(
                &text,
                latency,
                &[
                    "direction=\"inbound\"",
                    "target=\"8080\"",
                    "classification=\"success\""
                ]
            ),
            3.0
        );

        let memo = OutboundMemo::default();
        let to = |cluster, identity| Answered {
            cluster,
            identity,
            route: "default",
        };
        let api = "spiffe://west.mesh.local/ns/shop/sa/api";
        let answers = [
            ("api:80", to("west", api), 200),
            ("api:80", to("west", api), 200),
            ("api:80", to("east", api), 200),
            ("db:5432", to("west", api), 200),
            ("api:80", to("west", api), 500),
        ];
        for (authority, answered, status) in answers {
            let status = http::StatusCode::from_u16(status).unwrap();
            m.outbound_response_on(&memo, (authority, answered), status, "mtls", ms);
        }
        let text = exposed(&m);
        let requests = "mesh_proxy_outbound_requests_total";
        let api80 = "authority=\"api:80\"";
        assert_eq!(
            series(
                &text,
                requests,
                &[api80, "dst_cluster=\"west\"", "status_code=\"200\""]
            ),
            2.0
        );
        assert_eq!(
            series(&text, requests, &[api80, "dst_cluster=\"east\""]),
            1.0
        );
        assert_eq!(series(&text, requests, &["authority=\"db:5432\""]), 1.0);
        assert_eq!(
            series(&text, requests, &[api80, "status_code=\"500\""]),
            1.0
        );
    }
}
