//! The control plane's Prometheus metrics. Every refusal is counted with a
//! `reason` label.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertifyLabels {
    /// `token` or `renewal`.
    pub via: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: String,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub certify_issued: Family<CertifyLabels, Counter>,
    pub certify_refused: Family<ReasonLabels, Counter>,
    pub certify_duration: Histogram,
    pub config_errors: Family<ReasonLabels, Counter>,
    pub config_reloads: Counter,
    pub tls_refused: Family<ListenerLabels, Counter>,
    pub issuer_expiry: Gauge,
    pub issuer_reload_failures: Counter,
    pub issuer_reloads: Counter,
    pub workloads: Family<StateLabels, Gauge>,
    pub registry_refused: Family<ReasonLabels, Counter>,
    pub watch_streams: Family<ApiLabels, Gauge>,
    pub tokens_created: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mesh_control");
        let certify_issued = Family::<CertifyLabels, Counter>::default();
        r.register(
            "certify_issued",
            "SVIDs issued by Certify",
            certify_issued.clone(),
        );
        let certify_refused = Family::<ReasonLabels, Counter>::default();
        r.register(
            "certify_refused",
            "Certify requests refused, by reason",
            certify_refused.clone(),
        );
        let certify_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        r.register(
            "certify_duration_seconds",
            "Time to answer Certify, refusals included",
            certify_duration.clone(),
        );
        let config_errors = Family::<ReasonLabels, Counter>::default();
        r.register(
            "config_errors",
            "Config files rejected (the previous good version keeps serving), by reason",
            config_errors.clone(),
        );
        let config_reloads = Counter::default();
        r.register(
            "config_reloads",
            "Times the configuration changed and was applied",
            config_reloads.clone(),
        );
        let tls_refused = Family::<ListenerLabels, Counter>::default();
        r.register(
            "tls_refused",
            "TLS handshakes refused, by listener and reason",
            tls_refused.clone(),
        );
        let issuer_expiry = Gauge::default();
        r.register(
            "issuer_expiry_timestamp_seconds",
            "When the issuer certificate expires (Unix time)",
            issuer_expiry.clone(),
        );
        let issuer_reload_failures = Counter::default();
        r.register(
            "issuer_reload_failures",
            "Issuer files that changed on disk but could not be loaded (the old issuer keeps signing)",
            issuer_reload_failures.clone(),
        );
        let issuer_reloads = Counter::default();
        r.register(
            "issuer_reloads",
            "Issuer reloaded from disk",
            issuer_reloads.clone(),
        );
        let workloads = Family::<StateLabels, Gauge>::default();
        r.register(
            "workloads",
            "Registered workloads, by readiness",
            workloads.clone(),
        );
        let registry_refused = Family::<ReasonLabels, Counter>::default();
        r.register(
            "registry_refused",
            "Registry calls refused, by reason",
            registry_refused.clone(),
        );
        let watch_streams = Family::<ApiLabels, Gauge>::default();
        r.register(
            "watch_streams",
            "Open watch streams, by API",
            watch_streams.clone(),
        );
        let tokens_created = Counter::default();
        r.register(
            "join_tokens_created",
            "Join tokens created",
            tokens_created.clone(),
        );
        Self {
            registry: Arc::new(r),
            certify_issued,
            certify_refused,
            certify_duration,
            config_errors,
            config_reloads,
            tls_refused,
            issuer_expiry,
            issuer_reload_failures,
            issuer_reloads,
            workloads,
            registry_refused,
            watch_streams,
            tokens_created,
        }
    }

    pub fn refuse_certify(&self, reason: &str) {
        self.certify_refused
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
