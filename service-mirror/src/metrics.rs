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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub cluster: String,
    pub reason: &'static str,
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
    /// Exported services a linked cluster sent that were not mirrored.
    pub exports_refused: Family<RefusedLabels, Counter>,
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
            exports_refused: registered(
                r,
                "exports_refused",
                "Exported services from a linked cluster refused (bad name, identity, ports, or over a cap)",
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

/// One link as its metrics tell it, for readers of `/metrics` (the CLI and
/// the topology runner).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStatus {
    pub alive: bool,
    pub services: u64,
    pub probe_latency: mesh_core::metrics_text::Histogram,
}

impl LinkStatus {
    /// Every link in the samples of a mirror's `/metrics`, by cluster.
    pub fn read(
        samples: &[mesh_core::metrics_text::Sample],
    ) -> std::collections::BTreeMap<String, LinkStatus> {
        let mut links: std::collections::BTreeMap<String, LinkStatus> = Default::default();
        for s in samples {
            let cluster = s.label("cluster");
            if cluster.is_empty() {
                continue;
            }
            match s.name.as_str() {
                "mesh_service_mirror_link_alive" => {
                    links.entry(cluster.to_owned()).or_default().alive = s.value >= 1.0
                }
                "mesh_service_mirror_services_mirrored" => {
                    links.entry(cluster.to_owned()).or_default().services = s.value as u64
                }
                _ => {}
            }
        }
        for (cluster, link) in links.iter_mut() {
            link.probe_latency = mesh_core::metrics_text::Histogram::collect(
                samples,
                "mesh_service_mirror_probe_latency_seconds",
                |s| s.label("cluster") == cluster,
            );
        }
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_status_and_probe_quantiles_from_metrics_text() {
        let text = "mesh_service_mirror_link_alive{cluster=\"east\"} 1\n\
mesh_service_mirror_services_mirrored{cluster=\"east\"} 3\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.001\"} 50\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.005\"} 96\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.01\"} 100\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"+Inf\"} 100\n\
mesh_service_mirror_probe_latency_seconds_count{cluster=\"east\"} 100\n\
mesh_service_mirror_link_alive{cluster=\"north\"} 0\n";
        let links = LinkStatus::read(&mesh_core::metrics_text::parse(text));
        let east = &links["east"];
        assert!(east.alive);
        assert_eq!(east.services, 3);
        assert_eq!(east.probe_latency.quantile(0.5), Some(0.001));
        assert_eq!(east.probe_latency.quantile(0.95), Some(0.005));
        assert_eq!(east.probe_latency.quantile(0.99), Some(0.01));
        assert!(!links["north"].alive);
        assert_eq!(
            links["north"].probe_latency.quantile(0.5),
            None,
            "no probe yet"
        );
    }
}
