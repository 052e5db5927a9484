//! The gateway's Prometheus metrics, prefixed `mesh_gateway_`. Every
//! refusal is counted with a `reason` label and the caller's trust domain.

use std::sync::Arc;

use mesh_core::admin::registered;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The caller's trust domain (one per linked cluster).
    pub peer_trust_domain: String,
    /// `tcp` or `quic`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
    pub peer_trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer_trust_domain: String,
    /// `in` from the caller, `out` to it.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub tunnels: Family<PeerLabels, Counter>,
    pub tunnels_open: Family<PeerLabels, Gauge>,
    pub streams: Family<PeerLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub tls_refused: Family<ReasonLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    /// Workloads behind the gateway with a reverse connection open.
    pub reverse_open: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_gateway");
        let r = &mut registry;
        let tunnels = registered(
            r,
            "tunnels",
            "Tunnel connections accepted, by caller trust domain",
            Family::default(),
        );
        let tunnels_open = registered(
            r,
            "tunnels_open",
            "Tunnel connections open now",
            Family::default(),
        );
        let streams = registered(
            r,
            "streams",
            "Streams spliced to a local destination",
            Family::default(),
        );
        let refused = registered(
            r,
            "refused",
            "Streams or tunnels refused, by reason",
            Family::default(),
        );
        let tls_refused = registered(
            r,
            "tls_refused",
            "Tunnel handshakes refused, by reason",
            Family::default(),
        );
        let bytes = registered(
            r,
            "bytes",
            "Bytes carried on spliced streams",
            Family::default(),
        );
        let reverse_open = registered(
            r,
            "reverse_connections",
            "Workloads behind this gateway (VMs) with their reverse connection open",
            Gauge::default(),
        );
        Self {
            registry: Arc::new(registry),
            reverse_open,
            tunnels,
            tunnels_open,
            streams,
            refused,
            tls_refused,
            bytes,
        }
    }

    pub fn refuse(&self, reason: &'static str, peer_trust_domain: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                reason,
                peer_trust_domain: peer_trust_domain.to_owned(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
