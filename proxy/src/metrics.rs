//! The proxy's Prometheus metrics. Every refusal is counted with a
//! `reason` label.

use std::sync::Arc;

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
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mesh_proxy");
        let inbound_requests = Family::<InboundLabels, Counter>::default();
        r.register(
            "inbound_requests",
            "Inbound requests answered, by app port, status and verified caller",
            inbound_requests.clone(),
        );
        let inbound_refused = Family::<ReasonLabels, Counter>::default();
        r.register(
            "inbound_refused",
            "Inbound requests refused by the proxy, by reason",
            inbound_refused.clone(),
        );
        let tls_refused = Family::<ReasonLabels, Counter>::default();
        r.register(
            "inbound_tls_refused",
            "Inbound TLS handshakes refused, by reason",
            tls_refused.clone(),
        );
        let identity_expiry = Gauge::default();
        r.register(
            "identity_expiry_timestamp_seconds",
            "When the proxy's SVID expires (Unix time)",
            identity_expiry.clone(),
        );
        let identity_renewals = Counter::default();
        r.register(
            "identity_renewals",
            "Successful SVID renewals",
            identity_renewals.clone(),
        );
        let outbound_requests = Family::<OutboundLabels, Counter>::default();
        r.register(
            "outbound_requests",
            "Outbound requests answered, by destination, status and TLS",
            outbound_requests.clone(),
        );
        let outbound_failures = Family::<ReasonLabels, Counter>::default();
        r.register(
            "outbound_failures",
            "Outbound requests the proxy failed, by reason",
            outbound_failures.clone(),
        );
        Self {
            registry: Arc::new(r),
            inbound_requests,
            inbound_refused,
            tls_refused,
            identity_expiry,
            identity_renewals,
            outbound_requests,
            outbound_failures,
        }
    }

    pub fn refuse_outbound(&self, reason: &str) {
        self.outbound_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
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
