//! The proxy's Prometheus metrics. Every refusal is counted with a
//! `reason` label.

use std::sync::Arc;

use mesh_core::admin::registered;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    /// The app port.
    pub port: u16,
    pub status_code: u16,
    /// The verified caller's SPIFFE ID (capped in cardinality later).
    pub client_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub authority: String,
    pub status_code: u16,
    /// `mtls` when the request went to a meshed endpoint, else `none`.
    pub tls: String,
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
    pub outbound_requests: Family<OutboundLabels, Counter>,
    pub outbound_failures: Family<ReasonLabels, Counter>,
    pub outbound_retries: Counter,
    pub endpoint_ejections: Counter,
    /// Caps the `authority` label.
    pub authorities: Arc<LabelCap>,
    /// Caps the `client_id` label.
    pub client_ids: Arc<LabelCap>,
    /// Live request events for `/tap`.
    pub tap: mesh_core::admin::Tap,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mesh_proxy");
        let r = &mut r;
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
            authorities: Arc::new(LabelCap::new(LABEL_CAP)),
            client_ids: Arc::new(LabelCap::new(LABEL_CAP)),
            tap: tokio::sync::broadcast::channel(1024).0,
            registry: Arc::default(),
        };
        Self {
            registry: Arc::new(std::mem::take(r)),
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
}
