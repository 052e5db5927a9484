//! Assembles a running control plane: load -> bind -> serve, plus the
//! background loops (config watch, liveness sweep, issuer reload and own
//! SVID renewal, token pruning).

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use mesh_core::{
    admin::{self, Readiness},
    api::v1::{
        discovery_server::DiscoveryServer, federation_server::FederationServer,
        identity_server::IdentityServer, policy_server::PolicyServer,
        registry_server::RegistryServer,
    },
    grpc::{self, OnRefused},
    identity::{
        BundleStore, CertificateAuthority, CredentialStore, Credentials, ExpectedIdentity,
        SpiffeId, TrustBundle, TrustBundleSet, TrustDomain,
        cert::{human_duration, now},
        csr::new_key_and_csr,
        files::{self, FileError},
        tls,
    },
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tonic::transport::Server;

use crate::{
    admin_socket,
    certify::{CaSlot, IdentityService, current_ca},
    config::{CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT, Config, ISSUER_WARN_BEFORE},
    index::Index,
    metrics::{ListenerLabels, Metrics, ReasonLabels, StateLabels},
    ratelimit::RateLimiter,
    resources::ConfigDir,
    services::{ApiServices, Shared},
    store::{LocalStore, Store, StoreError},
};

/// How long the `kube` store waits for its first full lists.
const KUBE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Where configuration and cluster workloads come from.
enum Source {
    Dir(ConfigDir),
    Kube(crate::k8s::watch::Cluster),
}

/// Largest gRPC request accepted (CSRs and registrations are small).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest gRPC response sent (an endpoint set of a big service).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("CA: {0}")]
    Ca(#[from] FileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot issue the control plane's own SVID: {0}")]
    OwnIdentity(String),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Socket(#[from] admin_socket::SocketError),
    #[error("config directory {}: {reason}", dir.display())]
    ConfigDir { dir: PathBuf, reason: String },
    #[error("kube store: {0}")]
    Kube(String),
}

/// A running control plane. Dropping it does not stop it; call
/// [`ControlPlane::shutdown`].
#[derive(Debug)]
pub struct ControlPlane {
    pub identity_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub trust_domain: TrustDomain,
    metrics: Metrics,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// The gRPC servers: they drain on shutdown.
    servers: JoinSet<()>,
    /// Loops that run until aborted.
    tasks: JoinSet<()>,
    /// The writer Lease candidacy (`kube` store), released on shutdown.
    candidate: Option<crate::k8s::lease::Candidate>,
}

impl ControlPlane {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        tracing::info!(?config, "starting control plane");
        if config.kube.is_none() && !config.config_dir.is_dir() {
            return Err(StartError::ConfigDir {
                dir: config.config_dir.clone(),
                reason: "is not a directory; create it (it may be empty)".into(),
            });
        }
        let metrics = Metrics::new();
        let readiness = Readiness::new("starting");

        let mut tasks = JoinSet::new();
        let client = match &config.kube {
            None => None,
            Some(kube) => Some(
                crate::k8s::client(kube.kubeconfig.as_deref())
                    .await
                    .map_err(StartError::Kube)?,
            ),
        };
        if let (Some(client), Some(kube)) = (&client, &config.kube)
            && let Some(secret) = &kube.ca_secret
        {
            crate::k8s::issuer::fetch(client, secret, &config.ca_dir)
                .await
                .map_err(StartError::Kube)?;
            tasks.spawn(crate::k8s::issuer::follow(
                client.clone(),
                secret.clone(),
                config.ca_dir.clone(),
            ));
        }

        let mut kube_store_slot = None;
        // Load: CA, trust bundle, state, configuration.
        let ca = files::load_ca(&config.ca_dir)?;
        let td = ca.trust_domain().clone();
        note_issuer(&ca, &metrics);
        let local_bundle = files::load_bundle(&config.ca_dir.join(files::BUNDLE), td.clone())?;
        let bundles = BundleStore::new(
            [local_bundle.clone()]
                .into_iter()
                .collect::<TrustBundleSet>(),
        );
        let store: Arc<dyn Store> = match &client {
            None => Arc::new(LocalStore::open(&config.data_dir)?),
            Some(client) => {
                let kube_store = crate::k8s::store::KubeStore::new(
                    client.clone(),
                    CONTROL_NAMESPACE,
                    config.liveness.grace,
                );
                kube_store_slot = Some(kube_store.clone());
                Arc::new(kube_store)
            }
        };
        let mut index = Index::new(&config.cluster, &config.cluster_domain, config.liveness);
        index.set_max_per_namespace(config.max_workloads_per_namespace);
        if !config.gateway_addresses.is_empty() {
            let identity = SpiffeId::workload(&td, crate::config::CONTROL_NAMESPACE, "gateway")
                .map_err(|e| StartError::OwnIdentity(e.to_string()))?;
            index.set_gateway(Some(crate::index::LocalGateway {
                addresses: config.gateway_addresses.clone(),
                identity: identity.to_string(),
            }));
        }
        let restored = store.registrations()?;
        tracing::info!(count = restored.len(), "restored workload registrations");
        index.restore(restored, Instant::now());
        let mut reviewer = None;
        let mut candidate_slot = None;
        let mut leader_slot = None;
        let source = match &client {
            None => {
                let mut config_dir = ConfigDir::new(&config.config_dir);
                let mut scan = config_dir.scan();
                report_config_errors(&scan.errors, &metrics);
                // Start with every file that is there, once none is mid-write
                // (a file that keeps changing is left to the poller after 2 s).
                for _ in 0..10 {
                    if !scan.unsettled {
                        break;
                    }
                    tokio::time::sleep(crate::resources::dir::SETTLE).await;
                    scan = config_dir.scan();
                    report_config_errors(&scan.errors, &metrics);
                }
                index.set_resources(config_dir.resources());
                trust_links(&index, &local_bundle, &bundles);
                report_failover_problems(&index, &metrics);
                // One replica: it is the writer.
                metrics.leader.set(1);
                Source::Dir(config_dir)
            }
            Some(client) => {
                reviewer = Some(crate::k8s::review::TokenReviewer::new(client.clone()));
                let cluster = crate::k8s::watch::Cluster::start(
                    client.clone(),
                    KUBE_SYNC_TIMEOUT,
                    &mut tasks,
                )
                .await
                .map_err(StartError::Kube)?;
                let replica = config
                    .kube
                    .as_ref()
                    .map(|k| k.replica.clone())
                    .unwrap_or_default();
                let candidate = crate::k8s::lease::Candidate::new(
                    client.clone(),
                    CONTROL_NAMESPACE,
                    crate::k8s::install::LEASE,
                    &replica,
                );
                let (leader_tx, leader_rx) = watch::channel(false);
                leader_slot = Some(leader_rx.clone());
                tasks.spawn(candidate.clone().run(leader_tx));
                tasks.spawn(show_leader(leader_rx.clone(), metrics.clone()));
                tasks.spawn(
                    cluster
                        .clone()
                        .write_statuses(client.clone(), leader_rx.clone()),
                );
                if let Some(store) = kube_store_slot.clone() {
                    tasks.spawn(collect_dead(store, leader_rx, config.liveness.grace));
                }
                candidate_slot = Some(candidate);
                Source::Kube(cluster)
            }
        };
        let shared = Shared::new(index);
        if let Source::Kube(cluster) = &source {
            let (local, bundles, m) = (local_bundle.clone(), bundles.clone(), metrics.clone());
            cluster.apply(&shared, &td, &metrics, &move |index: &mut Index| {
                trust_links(index, &local, &bundles);
                report_failover_problems(index, &m);
            });
        }
        let ca_slot: CaSlot = Arc::new(RwLock::new(Arc::new(ca)));

        // Our own identity, for both gRPC listeners.
        let own_id = SpiffeId::workload(&td, CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT)
            .map_err(|e| StartError::OwnIdentity(e.to_string()))?;
        let creds = CredentialStore::new(
            issue_own(&current_ca(&ca_slot), &own_id, config.leaf_ttl)
                .map_err(StartError::OwnIdentity)?,
        );
        let clients = ExpectedIdentity::trust_domain(td.clone());

        // Bind everything before serving anything, so a port conflict fails fast.
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let identity_listener = bind("identity", config.identity_addr).await?;
        let api_listener = bind("API", config.api_addr).await?;
        let admin_listener = admin::bind(config.admin_addr).await?;
        let webhook_listener = match config.kube.as_ref().and_then(|k| k.webhook_addr) {
            Some(addr) => Some(bind("webhook", addr).await?),
            None => None,
        };
        let socket_listener = admin_socket::bind(&config.admin_socket)?;
        let identity_addr = local(&identity_listener, "identity", config.identity_addr)?;
        let api_addr = local(&api_listener, "API", config.api_addr)?;
        let admin_addr = local(&admin_listener, "admin", config.admin_addr)?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut servers = JoinSet::new();
        let stopped = move || {
            let mut rx = shutdown_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };

        let identity_svc = IdentityService {
            ca: ca_slot.clone(),
            trust_domain: td.clone(),
            bundles: bundles.clone(),
            store: store.clone(),
            limiter: Arc::new(RateLimiter::new(config.certify_burst, config.certify_rate)),
            metrics: metrics.clone(),
            leaf_ttl: config.leaf_ttl,
            reviewer,
        };
        let identity_tls =
            tls::server_config_optional_client(creds.clone(), bundles.clone(), clients.clone())
                .map_err(|e| StartError::OwnIdentity(e.to_string()))?;
        let incoming = grpc::tls_incoming(
            identity_listener,
            grpc::grpc_server_config(identity_tls),
            on_refused("identity", &metrics),
        );
        let server = grpc_server().add_service(
            IdentityServer::new(identity_svc)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        );
        let stop = stopped();
        servers.spawn(async move {
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "identity server failed");
            }
        });

        let api = ApiServices {
            shared: shared.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            liveness: config.liveness,
            trust_domain: td.clone(),
            own_bundle: local_bundle
                .to_spiffe_json()
                .map_err(|e| StartError::OwnIdentity(e.to_string()))?,
        };
        // Linked clusters reach Federation here; each RPC checks the caller's
        // trust domain (see services.rs).
        let api_tls =
            tls::server_config(creds.clone(), bundles.clone(), ExpectedIdentity::AnyTrusted)
                .map_err(|e| StartError::OwnIdentity(e.to_string()))?;
        let incoming = grpc::tls_incoming(
            api_listener,
            grpc::grpc_server_config(api_tls),
            on_refused("api", &metrics),
        );
        let server = grpc_server()
            .add_service(
                DiscoveryServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                PolicyServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                RegistryServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                FederationServer::new(api)
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            );
        let stop = stopped();
        servers.spawn(async move {
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "API server failed");
            }
        });

        tasks.spawn(admin::serve(
            admin_listener,
            metrics.registry.clone(),
            readiness.clone(),
        ));
        if let Some(addr) = config.metrics_addr {
            let listener = admin::bind_metrics(addr).await?;
            tasks.spawn(admin::serve_metrics_only(
                listener,
                metrics.registry.clone(),
            ));
        }
        tasks.spawn(admin_socket::serve(
            socket_listener,
            config.admin_socket.clone(),
            store.clone(),
            metrics.clone(),
            admin_socket::Facts {
                cluster: config.cluster.clone(),
                trust_domain: td.clone(),
                bundles: bundles.clone(),
            },
        ));
        match source {
            Source::Dir(config_dir) => {
                tasks.spawn(watch_config(
                    config_dir,
                    shared.clone(),
                    metrics.clone(),
                    config.poll_interval,
                    (local_bundle, bundles.clone()),
                ));
            }
            Source::Kube(cluster) => {
                let (bundles, m) = (bundles.clone(), metrics.clone());
                tasks.spawn(cluster.follow(
                    shared.clone(),
                    td.clone(),
                    metrics.clone(),
                    move |index: &mut Index| {
                        trust_links(index, &local_bundle, &bundles);
                        report_failover_problems(index, &m);
                    },
                ));
            }
        }
        if let (Some(client), Some(kube)) = (&client, &config.kube) {
            if let Some(listener) = webhook_listener {
                crate::inject::webhook::serve(
                    listener,
                    client.clone(),
                    ca_slot.clone(),
                    kube.webhook_cert_ttl,
                    metrics.clone(),
                    &mut tasks,
                )
                .map_err(StartError::Kube)?;
            }
            if let Some(leader) = leader_slot {
                tasks.spawn(crate::inject::sync::keep_in_step(
                    client.clone(),
                    config.ca_dir.clone(),
                    leader,
                ));
            }
        }
        tasks.spawn(sweep(shared.clone(), store.clone(), metrics.clone()));
        tasks.spawn(maintain_issuer(
            config.ca_dir.clone(),
            ca_slot,
            creds,
            own_id,
            config.leaf_ttl,
            metrics.clone(),
            config.poll_interval,
        ));
        tasks.spawn(prune_tokens(store.clone()));

        readiness.set_ready();
        tracing::info!(%identity_addr, %api_addr, %admin_addr, trust_domain = %td, "control plane ready");
        Ok(Self {
            identity_addr,
            api_addr,
            admin_addr,
            admin_socket: config.admin_socket,
            trust_domain: td,
            metrics,
            store,
            shared,
            shutdown,
            servers,
            tasks,
            candidate: candidate_slot,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops serving: gRPC servers drain for up to `grace`, then everything
    /// is stopped and the state database is closed.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        // Watch streams end, so servers can drain and clients reconnect.
        self.shared.close();
        let drained = tokio::time::timeout(grace, async {
            while self.servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace of {grace:?} ran out; closing open streams");
        }
        self.servers.shutdown().await;
        self.tasks.shutdown().await;
        // Another replica takes over at once rather than after expiry.
        if let Some(candidate) = &self.candidate {
            candidate.release().await;
        }
        // Connections a client keeps open may outlive the servers; the
        // store's file lock must not.
        self.store.close();
        let _ = std::fs::remove_file(&self.admin_socket);
    }
}

fn grpc_server() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(200))
}

fn local(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Counts and logs a refused TLS handshake, naming the peer.
fn on_refused(listener: &'static str, metrics: &Metrics) -> OnRefused {
    let metrics = metrics.clone();
    Arc::new(move |peer: SocketAddr, e: &io::Error| {
        let reason = tls::refusal_reason(e);
        metrics
            .tls_refused
            .get_or_create(&ListenerLabels {
                listener: listener.into(),
                reason: reason.into(),
            })
            .inc();
        tracing::warn!(%peer, listener, reason, "TLS handshake refused: {e}");
    })
}

fn issue_own(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    ttl: Duration,
) -> Result<Credentials, String> {
    let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
    let svid = ca.sign_csr(&csr, id, ttl).map_err(|e| e.to_string())?;
    Credentials::new(svid.chain, key).map_err(|e| e.to_string())
}

fn note_issuer(ca: &CertificateAuthority, metrics: &Metrics) {
    let info = ca.issuer_info();
    metrics.issuer_expiry.set(info.not_after.unix_timestamp());
    match info.remaining(now()) {
        Ok(left) if left < ISSUER_WARN_BEFORE => tracing::warn!(
            not_after = %info.not_after,
            "the issuer expires in {}; rotate it before then (`mesh identity ca create --shared-root`)",
            human_duration(left)
        ),
        Ok(_) => {}
        Err(ago) => tracing::error!(
            "the issuer expired {} ago; Certify will fail",
            human_duration(ago)
        ),
    }
}

fn report_config_errors(errors: &[crate::resources::ConfigError], metrics: &Metrics) {
    for e in errors {
        metrics
            .config_errors
            .get_or_create(&ReasonLabels {
                reason: e.kind.into(),
            })
            .inc();
        tracing::error!("config rejected, the previous version keeps serving: {e}");
    }
}

/// Logs and counts what the FailoverPolicies name that no Link does
/// (`config_errors_total{reason="unknown_cluster"}`); the rest of each
/// policy serves.
pub fn report_failover_problems(index: &Index, metrics: &Metrics) {
    for problem in index.failover_problems() {
        metrics
            .config_errors
            .get_or_create(&ReasonLabels {
                reason: "unknown_cluster".into(),
            })
            .inc();
        tracing::error!("{problem}");
    }
}

/// Trusts this cluster's bundle and each linked cluster's, for its own trust
/// domain only (bundles are never merged). A Link naming this cluster's
/// trust domain is ignored, loudly.
fn trust_links(index: &Index, local: &TrustBundle, bundles: &BundleStore) {
    let mut set: TrustBundleSet = [local.clone()].into_iter().collect();
    for link in index.linked_clusters() {
        if &link.trust_domain == local.trust_domain() {
            tracing::error!(cluster = %link.cluster, "a Link names this cluster's own trust domain {}; ignored", link.trust_domain);
            continue;
        }
        tracing::info!(cluster = %link.cluster, trust_domain = %link.trust_domain, "trusting a linked cluster");
        set.insert(link.bundle);
    }
    bundles.replace(set);
}

async fn watch_config(
    mut dir: ConfigDir,
    shared: Arc<Shared>,
    metrics: Metrics,
    every: Duration,
    (local, bundles): (TrustBundle, BundleStore),
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (back, scan) = match tokio::task::spawn_blocking(move || {
            let scan = dir.scan();
            (dir, scan)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "config scan panicked; config watching stopped");
                return;
            }
        };
        dir = back;
        report_config_errors(&scan.errors, &metrics);
        if scan.changed {
            let resources = dir.resources();
            let changed = shared.update(|index| {
                let changed = index.set_resources(resources);
                if changed {
                    trust_links(index, &local, &bundles);
                    report_failover_problems(index, &metrics);
                }
                (changed, changed)
            });
            if changed {
                metrics.config_reloads.inc();
                tracing::info!("configuration changed and applied");
            }
        }
    }
}

/// Marks silent workloads not ready and removes forgotten ones.
async fn sweep(shared: Arc<Shared>, store: Arc<dyn Store>, metrics: Metrics) {
    let mut tick = tokio::time::interval(crate::index::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (removed, counts) = shared.update(|index| {
            let (removed, changed) = index.sweep(before, now);
            ((removed, index.workload_counts(now)), changed)
        });
        before = now;
        for (state, n) in [("ready", counts.0), ("not_ready", counts.1)] {
            metrics
                .workloads
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(n as i64);
        }
        for (ns, name) in removed {
            tracing::info!(workload = %format!("{ns}/{name}"), "registration removed after missing heartbeats");
            if !store.sweep_deletes() {
                continue;
            }
            let store = store.clone();
            let result =
                tokio::task::spawn_blocking(move || store.delete_registration(&ns, &name)).await;
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "could not delete a stale registration");
            }
        }
    }
}

fn issuer_stamp(dir: &Path) -> Option<(SystemTime, u64, SystemTime, u64)> {
    let crt = std::fs::metadata(dir.join(files::ISSUER_CERT)).ok()?;
    let key = std::fs::metadata(dir.join(files::ISSUER_KEY)).ok()?;
    Some((
        crt.modified().ok()?,
        crt.len(),
        key.modified().ok()?,
        key.len(),
    ))
}

/// Reloads the issuer when its files change (a failed reload is loud and
/// keeps the old issuer), renews our own SVID at half its life, and warns
/// daily while the issuer is close to expiry.
async fn maintain_issuer(
    dir: PathBuf,
    slot: CaSlot,
    creds: CredentialStore,
    own_id: SpiffeId,
    ttl: Duration,
    metrics: Metrics,
    every: Duration,
) {
    let mut stamp = issuer_stamp(&dir);
    let mut renew_at = Instant::now() + ttl / 2;
    let mut warn_at = Instant::now() + Duration::from_secs(24 * 3600);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut renew = Instant::now() >= renew_at;
        let current = issuer_stamp(&dir);
        if current != stamp {
            stamp = current;
            let loaded = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || files::load_ca(&dir)).await
            };
            match loaded {
                Ok(Ok(ca)) if ca.trust_domain() == current_ca(&slot).trust_domain() => {
                    note_issuer(&ca, &metrics);
                    *slot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ca);
                    metrics.issuer_reloads.inc();
                    tracing::info!("issuer reloaded from {}", dir.display());
                    renew = true;
                }
                Ok(Ok(ca)) => {
                    metrics.issuer_reload_failures.inc();
                    tracing::error!(
                        "issuer reload refused: the new issuer is for trust domain {}, this control plane serves {}; still signing with the previous issuer",
                        ca.trust_domain(),
                        current_ca(&slot).trust_domain()
                    );
                }
                Ok(Err(e)) => {
                    metrics.issuer_reload_failures.inc();
                    tracing::error!(
                        "issuer reload failed: {e}; still signing with the previous issuer"
                    );
                }
                Err(e) => tracing::error!(error = %e, "issuer reload task failed"),
            }
        }
        if renew {
            match issue_own(&current_ca(&slot), &own_id, ttl).map(|c| creds.rotate(c)) {
                Ok(Ok(())) => renew_at = Instant::now() + ttl / 2,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "could not rotate the control plane's SVID")
                }
                Err(e) => tracing::error!("could not renew the control plane's SVID: {e}"),
            }
        }
        if Instant::now() >= warn_at {
            note_issuer(&current_ca(&slot), &metrics);
            warn_at = Instant::now() + Duration::from_secs(24 * 3600);
        }
    }
}

/// Forgets tokens a day after they expired.
/// The writer's garbage collection of dead ExternalWorkloads, every third
/// of the removal grace (at most every 30 s).
async fn collect_dead(
    store: crate::k8s::store::KubeStore,
    mut leader: watch::Receiver<bool>,
    grace: Duration,
) {
    let every = (grace / 3).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        if *leader.borrow_and_update() {
            if let Err(e) = store.collect_dead().await {
                tracing::warn!("garbage collection of ExternalWorkloads failed: {e}");
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = leader.changed() => {}
            }
        } else if leader.changed().await.is_err() {
            return;
        }
    }
}

/// `mesh_control_leader` follows the Lease.
async fn show_leader(mut leader: watch::Receiver<bool>, metrics: Metrics) {
    loop {
        metrics.leader.set(i64::from(*leader.borrow_and_update()));
        if leader.changed().await.is_err() {
            return;
        }
    }
}

async fn prune_tokens(store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let store = store.clone();
        let now_s = now().unix_timestamp();
        match tokio::task::spawn_blocking(move || {
            store.prune_tokens(now_s, Duration::from_secs(24 * 3600))
        })
        .await
        {
            Ok(Ok(n)) if n > 0 => tracing::info!(count = n, "expired join tokens pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not prune join tokens"),
            _ => {}
        }
    }
}
