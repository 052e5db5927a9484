//! The service mirror's metrics, prefixed `mesh_service_mirror_`, per link.

use std::sync::Arc;

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
pub struct LinkLabels {
    /// The linked cluster's name.
    pub cluster: String,
}

/// Probe latency buckets, in seconds: 0.5 ms to 2 s (the probe timeout).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeBuckets;

impl MetricConstructor<Histogram> for ProbeBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
        ])
    }
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    /// 1 while the link's gateway answers its probes.
    pub alive: Family<LinkLabels, Gauge>,
    pub services: Family<LinkLabels, Gauge>,
    pub last_sync: Family<LinkLabels, Gauge>,
    pub probe_latency: Family<LinkLabels, Histogram, ProbeBuckets>,
    pub probe_failures: Family<LinkLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_service_mirror");
        let r = &mut registry;
        Self {
            alive: registered(
                r,
                "link_alive",
                "1 while the linked cluster's gateway answers probes",
                Family::default(),
            ),
            services: registered(
                r,
                "services_mirrored",
                "Services mirrored from the linked cluster",
                Family::default(),
            ),
            last_sync: registered(
                r,
                "last_sync_timestamp_seconds",
                "When the linked cluster's exports last arrived (Unix time)",
                Family::default(),
            ),
            probe_latency: registered(
                r,
                "probe_latency_seconds",
                "Gateway probe round trips",
                Family::new_with_constructor(ProbeBuckets),
            ),
            probe_failures: registered(
                r,
                "probe_failures",
                "Gateway probes that failed or timed out",
                Family::default(),
            ),
            registry: Arc::default(),
        }
        .with(registry)
    }

    fn with(mut self, registry: Registry) -> Self {
        self.registry = Arc::new(registry);
        self
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
