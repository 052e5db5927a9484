//! The control plane's Prometheus metrics. Every refusal is counted with a
//! `reason` label.

use std::sync::Arc;

use mesh_core::admin::registered;
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
    /// 1 while this replica holds the writer Lease (`kube` store); 1 on the
    /// `local` store, where there is one replica.
    pub leader: Gauge,
    /// Admission requests of the injection webhook, by result
    /// (`injected`, `skipped`, `refused`) and reason.
    pub injections: Family<InjectionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectionLabels {
    pub result: String,
    pub reason: String,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mesh_control");
        let r = &mut r;
        let metrics = Self {
            certify_issued: registered(
                r,
                "certify_issued",
                "SVIDs issued by Certify",
                Family::default(),
            ),
            certify_refused: registered(
                r,
                "certify_refused",
                "Certify requests refused, by reason",
                Family::default(),
            ),
            certify_duration: registered(
                r,
                "certify_duration_seconds",
                "Time to answer Certify, refusals included",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            config_errors: registered(
                r,
                "config_errors",
                "Config files rejected (the previous good version keeps serving), by reason",
                Family::default(),
            ),
            config_reloads: registered(
                r,
                "config_reloads",
                "Times the configuration changed and was applied",
                Counter::default(),
            ),
            tls_refused: registered(
                r,
                "tls_refused",
                "TLS handshakes refused, by listener and reason",
                Family::default(),
            ),
            issuer_expiry: registered(
                r,
                "issuer_expiry_timestamp_seconds",
                "When the issuer certificate expires (Unix time)",
                Gauge::default(),
            ),
            issuer_reload_failures: registered(
                r,
                "issuer_reload_failures",
                "Issuer files that changed on disk but could not be loaded (the old issuer keeps signing)",
                Counter::default(),
            ),
            issuer_reloads: registered(
                r,
                "issuer_reloads",
                "Issuer reloaded from disk",
                Counter::default(),
            ),
            injections: registered(
                r,
                "injections",
                "Pods seen by the injection webhook, by result and reason",
                Family::default(),
            ),
            leader: registered(
                r,
                "leader",
                "1 while this replica is the one that writes (holds the Lease)",
                Gauge::default(),
            ),
            workloads: registered(
                r,
                "workloads",
                "Registered workloads, by readiness",
                Family::default(),
            ),
            registry_refused: registered(
                r,
                "registry_refused",
                "Registry calls refused, by reason",
                Family::default(),
            ),
            watch_streams: registered(
                r,
                "watch_streams",
                "Open watch streams, by API",
                Family::default(),
            ),
            tokens_created: registered(
                r,
                "join_tokens_created",
                "Join tokens created",
                Counter::default(),
            ),
            registry: Arc::default(),
        };
        Self {
            registry: Arc::new(std::mem::take(r)),
            ..metrics
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
