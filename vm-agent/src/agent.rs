//! `mesh-vm-agent run`: the one process systemd keeps running on a joined VM.
//!
//! `config -> identity on disk (re-enroll if it expired) -> health checks ->
//! proxy (in process: the sidecar's own code) -> Workload API -> signal ->
//! deregister and drain`.
//!
//! Identity: the SVID and key are kept on disk (0600) and rewritten at each
//! renewal, so a restart while the control plane is away keeps serving
//! with them until they expire. Past expiry the VM fails closed (peers
//! refuse an expired certificate; there is no fallback, no self-signed
//! identity, no plaintext) and re-enrolls with its enrollment key as soon
//! as the control plane answers again.

use std::{path::Path, sync::Arc, time::Duration};

use mesh_core::{
    api::v1::{CertifyRequest, identity_client::IdentityClient},
    identity::{
        BundleStore, CredentialStore, Credentials, SpiffeId, TrustBundleSet, TrustDomain,
        cert::{self, certs_from_pem, key_from_pem},
        csr::new_key_and_csr,
        enroll::EnrollmentKey,
        files,
    },
};
use mesh_proxy::{Extras, Proxy, identity::backoff};
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::{
    config::{AgentConfig, BUNDLE, ENROLL_KEY, LEAF_CRT, LEAF_KEY},
    health::{self, HealthMetrics},
    join::write_credentials,
    workload_api::{self, WorkloadApiMetrics},
};

/// The agent's own metrics, served with the proxy's on its admin port.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub health: HealthMetrics,
    pub dns: crate::dns::DnsMetrics,
    pub workload_api: WorkloadApiMetrics,
    pub capture: crate::capture::CaptureMetrics,
    pub reenrollments: Counter,
}

impl AgentMetrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        self.health.register(r);
        self.dns.register(r);
        self.workload_api.register(r);
        self.capture.register(r);
        r.register(
            "mesh_vm_agent_reenrollments",
            "New SVIDs obtained with the enrollment key after the old one expired",
            self.reenrollments.clone(),
        );
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    pub proxy: Proxy,
    pub config: AgentConfig,
    /// Where it serves DNS, when it does.
    pub dns_addr: Option<std::net::SocketAddr>,
    /// The capture rules in place, when capture is on.
    capture: Option<mesh_proxy::init::HostRules>,
    tasks: tokio::task::JoinSet<()>,
}

impl Agent {
    /// Starts everything; returns once the proxy serves.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        tracing::info!(?config, "starting the VM agent");
        let identity = config.identity().map_err(anyhow::Error::msg)?;
        let td: TrustDomain = config.trust_domain.parse()?;
        let bundle = files::load_bundle(&config.state_file(BUNDLE), td.clone())?;
        let bundles = BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>());
        let enroll = Arc::new(
            EnrollmentKey::from_pkcs8(&files::read(&config.state_file(ENROLL_KEY))?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.state_file(ENROLL_KEY).display()))?,
        );
        let metrics = AgentMetrics::default();

        // A valid SVID on disk before the proxy starts: the proxy loads it.
        match load_credentials(&config, &identity, &bundles) {
            Ok(creds) => tracing::info!(
                not_after = %creds.info().not_after,
                "identity loaded from {}",
                config.state_dir.display()
            ),
            Err(why) => {
                tracing::warn!(%why, "no usable identity on disk; re-enrolling with the enrollment key");
                let creds = reenroll_until_done(&config, &identity, &bundles, &enroll).await;
                metrics.reenrollments.inc();
                write_credentials(&config.state_dir, &creds)?;
            }
        }

        let mut tasks = tokio::task::JoinSet::new();
        let (health_tx, health_rx) = watch::channel(config.health.is_none());
        if let Some(h) = config.health.clone() {
            tasks.spawn(health::run(h, health_tx, metrics.health.clone()));
        } else {
            metrics.health.healthy.set(1);
        }
        let extras = Extras {
            health: health_rx,
            metrics: Box::new({
                let metrics = metrics.clone();
                move |r| metrics.register(r)
            }),
        };
        let proxy =
            Proxy::start_with(config.proxy_config().map_err(anyhow::Error::msg)?, extras).await?;

        tasks.spawn(persist_renewals(
            proxy.credentials.clone(),
            config.state_dir.clone(),
        ));
        tasks.spawn(reenroll_on_expiry(
            config.clone(),
            identity.clone(),
            proxy.bundles.clone(),
            proxy.credentials.clone(),
            enroll,
            proxy.readiness.clone(),
            metrics.reenrollments.clone(),
        ));
        if let Some(gateway) = &config.gateway {
            // Callers reach this VM through the gateway.
            let inbound = match proxy.inbound_addr {
                a if a.ip().is_unspecified() => {
                    std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                }
                a => a,
            };
            tasks.spawn(crate::via_gateway::keep_reverse(
                gateway.clone(),
                config.gateway_identity().map_err(anyhow::Error::msg)?,
                proxy.credentials.clone(),
                proxy.bundles.clone(),
                format!("{}/{}", config.namespace, config.workload),
                inbound,
            ));
        }
        let dns_addr = match &config.dns {
            Some(dns) => {
                let socket = tokio::net::UdpSocket::bind(dns.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot serve DNS on {}: {e}", dns.listen))?;
                let bound = socket.local_addr()?;
                let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let upstreams = crate::dns::upstreams_from_resolv_conf(&resolv, bound);
                tracing::info!(%bound, ?upstreams, "serving DNS for mesh names");
                tasks.spawn(crate::dns::serve(
                    socket,
                    crate::dns::Dns {
                        cluster_domain: dns.cluster_domain.clone(),
                        upstreams,
                        metrics: metrics.dns.clone(),
                    },
                ));
                Some(bound)
            }
            None => None,
        };
        let listener = workload_api::bind(&config.workload_api.socket)?;
        tasks.spawn(workload_api::serve(
            listener,
            workload_api::WorkloadApi::new(
                proxy.credentials.clone(),
                proxy.bundles.clone(),
                td,
                config.workload_api.allowed_uids.clone(),
                metrics.workload_api.clone(),
            ),
        ));
        // Last: the listeners the rules redirect to are bound.
        let capture = match &config.capture {
            Some(c) => {
                let rules = c.rules(&config);
                let applying = rules.clone();
                tokio::task::spawn_blocking(move || crate::capture::apply(&applying))
                    .await?
                    .map_err(|e| {
                        anyhow::anyhow!("cannot apply the transparent capture rules: {e}")
                    })?;
                metrics.capture.applied.set(1);
                tracing::info!(
                    app_uids = ?c.app_uids,
                    inbound_ports = ?rules.inbound_ports,
                    "transparent capture on"
                );
                tasks.spawn(crate::capture::keep(rules.clone(), metrics.capture.clone()));
                Some(rules)
            }
            None => None,
        };
        tracing::info!(
            id = %identity,
            inbound = %proxy.inbound_addr,
            outbound = %proxy.outbound_addr,
            admin = %proxy.admin_addr,
            workload_api = %config.workload_api.socket.display(),
            "VM agent ready"
        );
        Ok(Self {
            proxy,
            config,
            dns_addr,
            capture,
            tasks,
        })
    }

    /// Removes the capture rules (the app's traffic goes direct again),
    /// deregisters, drains the proxy within `grace`, removes the socket.
    pub async fn stop(mut self, grace: Duration) {
        self.tasks.shutdown().await;
        if self.capture.is_some() {
            match tokio::task::spawn_blocking(crate::capture::remove).await {
                Ok(Ok(())) => tracing::info!("transparent capture rules removed"),
                Ok(Err(e)) => tracing::error!("cannot remove the capture rules: {e}"),
                Err(e) => tracing::error!("cannot remove the capture rules: {e}"),
            }
        }
        self.proxy.shutdown(grace).await;
        let _ = std::fs::remove_file(&self.config.workload_api.socket);
    }
}

/// The SVID on disk, if it is ours, chains to our roots and is still valid.
fn load_credentials(
    config: &AgentConfig,
    identity: &SpiffeId,
    bundles: &BundleStore,
) -> Result<Credentials, String> {
    let (crt, key) = (config.state_file(LEAF_CRT), config.state_file(LEAF_KEY));
    let chain = certs_from_pem(&files::read(&crt).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", crt.display()))?;
    let key = key_from_pem(&files::read(&key).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let creds = Credentials::new(chain, key).map_err(|e| e.to_string())?;
    creds
        .check(identity, &bundles.current())
        .map_err(|e| format!("{}: {e}", crt.display()))?;
    Ok(creds)
}

/// One re-enrollment: a new key and CSR, signed with the enrollment key.
pub async fn reenroll(
    config: &AgentConfig,
    identity: &SpiffeId,
    bundles: &BundleStore,
    enroll: &EnrollmentKey,
) -> Result<Credentials, String> {
    let td: TrustDomain = config.trust_domain.parse().map_err(|e| format!("{e}"))?;
    let channel = crate::join::identity_channel(
        &td,
        &config.identity_addr,
        config.gateway.as_deref(),
        bundles,
    )?;
    let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
    let signature = enroll
        .sign(identity.as_str(), &config.workload, &csr)
        .map_err(|e| e.to_string())?;
    let answer = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: identity.to_string(),
            csr,
            workload: config.workload.clone(),
            enrollment_signature: signature,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> =
        answer.chain.into_iter().map(CertificateDer::from).collect();
    let creds = Credentials::new(chain, key).map_err(|e| e.to_string())?;
    creds
        .check(identity, &bundles.current())
        .map_err(|e| e.to_string())?;
    Ok(creds)
}

async fn reenroll_until_done(
    config: &AgentConfig,
    identity: &SpiffeId,
    bundles: &BundleStore,
    enroll: &EnrollmentKey,
) -> Credentials {
    let mut failures = 0;
    loop {
        match reenroll(config, identity, bundles, enroll).await {
            Ok(creds) => {
                tracing::info!(not_after = %creds.info().not_after, "re-enrolled: a new identity was issued");
                return creds;
            }
            Err(e) => {
                let wait = backoff(failures).min(Duration::from_secs(30));
                failures += 1;
                tracing::warn!(error = %e, "re-enrollment failed; retrying in {wait:?} (traffic stays refused until then)");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Writes every renewed SVID to disk, so a restart keeps it.
async fn persist_renewals(creds: CredentialStore, state_dir: std::path::PathBuf) {
    let mut changed = creds.subscribe();
    while changed.changed().await.is_ok() {
        let current = creds.current();
        match write_credentials(&state_dir, &current) {
            Ok(()) => {
                tracing::debug!(not_after = %current.info().not_after, "renewed identity written")
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the renewed identity; a restart would use the old one")
            }
        }
    }
}

/// When the SVID expired without a renewal (the control plane was away
/// past its lifetime), re-enrolls as soon as the control plane answers.
async fn reenroll_on_expiry(
    config: AgentConfig,
    identity: SpiffeId,
    bundles: BundleStore,
    creds: CredentialStore,
    enroll: Arc<EnrollmentKey>,
    readiness: mesh_core::admin::Readiness,
    reenrollments: Counter,
) {
    loop {
        let left = creds
            .current()
            .info()
            .remaining(cert::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(left + Duration::from_millis(100)).await;
        if creds.current().info().remaining(cert::now()).is_ok() {
            continue;
        }
        readiness.set_not_ready(format!(
            "identity {identity} expired while the control plane was unreachable; re-enrolling"
        ));
        let fresh = reenroll_until_done(&config, &identity, &bundles, &enroll).await;
        match creds.rotate(fresh) {
            Ok(()) => {
                reenrollments.inc();
                readiness.set_ready();
            }
            Err(e) => tracing::error!(error = %e, "cannot use the re-enrolled identity"),
        }
    }
}

/// Loads the config and runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let agent = Agent::start(config).await?;
    mesh_core::shutdown::signal().await;
    tracing::info!("stopping: deregistering and draining");
    agent.stop(Duration::from_secs(30)).await;
    Ok(())
}
