//! The service mirror: one controller per linked cluster.
//!
//! `local WatchTrust -> per link: (WatchExports through the remote gateway)
//! + (probe the gateway) -> mirror-<cluster>.yaml in the config directory`.
//!
//! - The links come from the local control plane (`Federation.WatchTrust`):
//!   a controller starts for each, and stops when its Link is deleted; its
//!   mirrors file is then removed.
//! - Exports are watched through the remote gateway (reserved target
//!   `federation.mesh-system.mesh:8086`), over mTLS with the remote control
//!   plane inside the tunnel: no credentials are exchanged between clusters.
//!   When the stream breaks, the last exports stay; it reconnects with
//!   backoff and re-syncs from the full state the remote sends first.
//! - The gateway is probed through the same tunnel connection: first at
//!   start, then every second, 2 s timeout; three failures in a row mark
//!   every mirror of that link not ready, and the first success ready again.
//! - Mirrors are `MirroredService` resources named `<svc>-<cluster>` in the
//!   service's namespace, rendered deterministically and written only when
//!   they change (to a temporary file, then renamed), so reconciling is
//!   idempotent and a restart rewrites the same file.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use mesh_core::{
    api::v1::{
        Exports, LinkedBundle, LinkedTrust, WatchExportsRequest,
        federation_client::FederationClient,
    },
    identity::{BundleStore, CredentialStore, ExpectedIdentity, SpiffeId, TrustDomain},
};
use mesh_proxy::{
    identity::backoff,
    outbound::tunnel::{FEDERATION_TARGET, Gateways, TunnelConnector},
};
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

use crate::{
    metrics::{LinkLabels, Metrics, RefusedLabels},
    sink::Sink,
    validate,
};

/// Probe cadence (DESIGN.md section 6).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub const PROBE_FAILURES: u32 = 3;
/// The longest wait between attempts to watch a link's exports.
pub const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// What one link's controller knows.
#[derive(Clone, Debug, Default, PartialEq)]
struct LinkState {
    exports: Option<Exports>,
    alive: bool,
}

/// Runs one controller per linked cluster until the task is dropped.
pub async fn run(
    api: Channel,
    cluster: String,
    sink: Sink,
    creds: CredentialStore,
    bundles: BundleStore,
    metrics: Metrics,
) {
    if let Err(e) = sink.remove_orphans().await {
        tracing::warn!("cannot look for mirrors of deleted Links: {e}");
    }
    let mut links = mesh_proxy::trust::linked_trust(api);
    let mut running: HashMap<String, (LinkedBundle, JoinHandle<()>)> = HashMap::new();
    loop {
        let mut current: LinkedTrust = links
            .borrow_and_update()
            .as_deref()
            .cloned()
            .unwrap_or_default();
        // A Link without a gateway only admits its trust domain: there is
        // nothing to mirror through it.
        current.bundles.retain(|l| !l.gateway_addresses.is_empty());
        // Stop controllers whose Link is gone (or changed), and remove
        // every mirror they wrote.
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, (link, _))| {
                !current
                    .bundles
                    .iter()
                    .any(|l| l.cluster == **name && l == link)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some((_, task)) = running.remove(&name) {
                task.abort();
            }
            if !current.bundles.iter().any(|l| l.cluster == name) {
                remove_mirrors(&sink, &name, &metrics).await;
            }
        }
        for link in current.bundles {
            if running.contains_key(&link.cluster) {
                continue;
            }
            let task = tokio::spawn(controller(
                link.clone(),
                cluster.clone(),
                sink.clone(),
                creds.clone(),
                bundles.clone(),
                metrics.clone(),
            ));
            running.insert(link.cluster.clone(), (link, task));
        }
        if links.changed().await.is_err() {
            return;
        }
    }
}

/// One link: follow its exports and probe its gateway; keep the mirrors
/// file current.
async fn controller(
    link: LinkedBundle,
    cluster: String,
    sink: Sink,
    creds: CredentialStore,
    bundles: BundleStore,
    metrics: Metrics,
) {
    let labels = LinkLabels {
        cluster: link.cluster.clone(),
    };
    let trust_domain = match TrustDomain::parse(&link.trust_domain) {
        Ok(td) => td,
        Err(e) => {
            tracing::error!(link = %link.cluster, "cannot mirror: trust domain {:?}: {e}", link.trust_domain);
            return;
        }
    };
    let tunnel = match connector(&link, &creds, &bundles) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            tracing::error!(link = %link.cluster, "cannot mirror: {e}");
            return;
        }
    };
    tracing::info!(link = %link.cluster, gateway = %tunnel.gateway(), "mirroring a linked cluster");
    let (state_tx, mut state_rx) = watch::channel(LinkState::default());
    let state_tx = Arc::new(state_tx);
    let exports = tokio::spawn(watch_exports(
        tunnel.clone(),
        cluster,
        state_tx.clone(),
        metrics.clone(),
        labels.clone(),
    ));
    let probe = tokio::spawn(probe(tunnel, state_tx, metrics.clone(), labels.clone()));
    let _guard = AbortOnDrop(vec![exports, probe]);
    let mut refused_before = Vec::new();
    loop {
        let state = state_rx.borrow_and_update().clone();
        // Before the first exports arrive, an existing file (from before a
        // restart or an outage) is left as it is.
        if let Some(exports) = &state.exports {
            let (mirrors, refused) =
                validate::mirrors(&link.cluster, &trust_domain, exports, state.alive);
            // Counted and logged once per new exports message, not per
            // probe state change.
            if refused != refused_before {
                for r in &refused {
                    metrics
                        .exports_refused
                        .get_or_create(&RefusedLabels {
                            cluster: link.cluster.clone(),
                            reason: r.reason,
                        })
                        .inc();
                    tracing::warn!(link = %link.cluster, service = %r.service, reason = r.reason, "not mirrored: {}", r.detail);
                }
                refused_before = refused;
            }
            metrics
                .services
                .get_or_create(&labels)
                .set(i64::try_from(mirrors.len()).unwrap_or(i64::MAX));
            if let Err(e) = sink.write(&link.cluster, &mirrors, &metrics).await {
                tracing::error!(link = %link.cluster, "cannot write mirrors; the last ones stay: {e}");
            }
            sink.link_status(&link.cluster, state.alive, mirrors.len())
                .await;
        }
        if state_rx.changed().await.is_err() {
            return;
        }
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The tunnel to `link`'s gateway, whose inner session goes to its
/// control plane.
fn connector(
    link: &LinkedBundle,
    creds: &CredentialStore,
    bundles: &BundleStore,
) -> Result<TunnelConnector, String> {
    let gateway = link
        .gateway_addresses
        .first()
        .ok_or("the Link names no gateway address")?;
    let gateway_id = SpiffeId::parse(&link.gateway_identity).map_err(|e| e.to_string())?;
    let control = SpiffeId::workload(&gateway_id.trust_domain(), "mesh-system", "control")
        .map_err(|e| e.to_string())?;
    // The probe and the exports take the Link's transport (QUIC falls
    // back to TCP when UDP is blocked), as proxies do.
    Gateways::default().connector(
        gateway,
        gateway_id,
        FEDERATION_TARGET,
        ExpectedIdentity::Exact(control),
        link.transport == "quic",
        creds,
        bundles,
    )
}

/// Follows the remote exports through the tunnel; keeps the last ones
/// while the stream is broken.
async fn watch_exports(
    tunnel: TunnelConnector,
    cluster: String,
    state: Arc<watch::Sender<LinkState>>,
    metrics: Metrics,
    labels: LinkLabels,
) {
    let mut failures = 0;
    loop {
        let tunnel_for_channel = tunnel.clone();
        let channel = Endpoint::from_static("http://federation.mesh-system.mesh")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let tunnel = tunnel_for_channel.clone();
                async move { tunnel.connect().await }
            }))
            .await;
        let result: Result<(), String> = match channel {
            Ok(channel) => {
                let mut client = FederationClient::new(channel);
                match client
                    .watch_exports(WatchExportsRequest {
                        cluster: cluster.clone(),
                    })
                    .await
                {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(exports)) => {
                                    failures = 0;
                                    metrics.last_sync.get_or_create(&labels).set(unix_now());
                                    state.send_modify(|s| s.exports = Some(exports));
                                }
                                Ok(None) => break Err("the remote ended the stream".to_owned()),
                                Err(e) => break Err(e.message().to_owned()),
                            }
                        }
                    }
                    Err(e) => Err(e.message().to_owned()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(link = %labels.cluster, error = %e, "exports stream broke; keeping the mirrors");
        }
        // One connection per link: retrying every second is cheap, and a
        // returning control plane is picked up within about a second.
        tokio::time::sleep(backoff(failures).min(RESYNC_EVERY)).await;
        failures += 1;
    }
}

/// Probes the gateway every second; three failures in a row -> not alive.
async fn probe(
    tunnel: TunnelConnector,
    state: Arc<watch::Sender<LinkState>>,
    metrics: Metrics,
    labels: LinkLabels,
) {
    let mut failures = 0;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let ok = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, tunnel.probe()).await,
            Ok(Ok(status)) if status.is_success()
        );
        if ok {
            failures = 0;
            metrics
                .probe_latency
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
        } else {
            failures += 1;
            metrics.probe_failures.get_or_create(&labels).inc();
            // The tunnel connection may be dead: the next probe opens a new one.
            tunnel.reset().await;
        }
        let alive = ok || (failures < PROBE_FAILURES && state.borrow().alive);
        metrics.alive.get_or_create(&labels).set(i64::from(alive));
        state.send_if_modified(|s| {
            let changed = s.alive != alive;
            s.alive = alive;
            if changed {
                tracing::info!(link = %labels.cluster, alive, "gateway probe state changed");
            }
            changed
        });
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub use crate::sink::mirrors_file;

async fn remove_mirrors(sink: &Sink, cluster: &str, metrics: &Metrics) {
    match sink.remove(cluster).await {
        Ok(()) => tracing::info!(link = %cluster, "Link deleted; its mirrors are removed"),
        Err(e) => tracing::error!(link = %cluster, "cannot remove mirrors: {e}"),
    }
    let labels = LinkLabels {
        cluster: cluster.to_owned(),
    };
    metrics.services.get_or_create(&labels).set(0);
    metrics.alive.get_or_create(&labels).set(0);
}

#[cfg(test)]
mod tests {
    use mesh_core::api::v1::{ExportedPort, ExportedService, ProtocolHint};

    use super::*;

    #[test]
    fn mirrors_render_stably_and_readiness_needs_the_gateway_and_endpoints() {
        let exports = Exports {
            cluster: "east".into(),
            trust_domain: "east.mesh.local".into(),
            trust_bundle: String::new(),
            services: vec![
                ExportedService {
                    namespace: "shop".into(),
                    name: "db".into(),
                    ports: vec![ExportedPort {
                        port: 5432,
                        protocol: ProtocolHint::Opaque as i32,
                        target_port: 5432,
                    }],
                    identities: vec![],
                    ready_endpoints: 0,
                },
                ExportedService {
                    namespace: "shop".into(),
                    name: "api".into(),
                    ports: vec![ExportedPort {
                        port: 80,
                        protocol: ProtocolHint::Http1 as i32,
                        target_port: 8080,
                    }],
                    identities: vec!["spiffe://east.mesh.local/ns/shop/sa/api".into()],
                    ready_endpoints: 2,
                },
            ],
        };
        let td: TrustDomain = "east.mesh.local".parse().unwrap();
        let render = |alive| {
            let (mirrors, refused) = validate::mirrors("east", &td, &exports, alive);
            assert!(refused.is_empty(), "{refused:?}");
            validate::render("east", &mirrors).unwrap()
        };
        let text = render(true);
        let api = text.find("name: api-east").unwrap();
        let db = text.find("name: db-east").unwrap();
        assert!(api < db, "sorted by namespace and name");
        let readies: Vec<&str> = text.lines().filter(|l| l.contains("ready:")).collect();
        assert_eq!(
            readies,
            ["  ready: true", "  ready: false"],
            "db has no endpoint"
        );
        assert!(!render(false).contains("ready: true"), "gateway down");
        // The control plane reads it back, field for field.
        let parsed = mesh_control::resources::parse::parse_file(
            std::path::Path::new("mirror-east.yaml"),
            &text,
        );
        let parsed = parsed.unwrap();
        let (_, mesh_control::resources::Resource::MirroredService(api)) = &parsed[0] else {
            panic!("{parsed:?}");
        };
        assert_eq!(api.spec.ports[0].port, 80);
        assert_eq!(api.spec.ports[0].target_port, Some(8080));
        assert_eq!(api.spec.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(
            api.spec.identities,
            ["spiffe://east.mesh.local/ns/shop/sa/api"]
        );
        assert_eq!(parsed.len(), 2);
    }
}
