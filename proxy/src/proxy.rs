//! Assembles a running proxy: trust bundle -> admin (not ready) -> identity
//! -> inbound listener -> registration -> ready.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_core::{
    admin::{self, Readiness},
    api::v1::{policy_client::PolicyClient, registry_client::RegistryClient},
    grpc,
    identity::{
        BundleStore, CredentialStore, ExpectedIdentity, TrustBundleSet, files::FileError, tls,
    },
    memory::Connections,
};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::transport::Channel;

use crate::{
    env::Config,
    identity::{self, IdentityError},
    inbound::{self, Inbound, policy::PolicyCache},
    metrics::Metrics,
    outbound::{self, Outbound},
    register,
};

/// How long an outbound request waits for discovery or a ready endpoint
/// (DESIGN.md section 6).
const OUTBOUND_FAIL_FAST: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("trust anchors: {0}")]
    Anchors(#[from] FileError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("control plane API address: {0}")]
    ControlAddress(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a host of the proxy adds to it.
pub struct Extras {
    /// The app's health, reported with the registration.
    pub health: register::Health,
    /// Registers the host's metrics next to the proxy's (served on the
    /// same admin `/metrics`).
    pub metrics: Box<dyn FnOnce(&mut prometheus_client::registry::Registry) + Send>,
}

impl Default for Extras {
    fn default() -> Self {
        Self {
            health: register::always_healthy(),
            metrics: Box::new(|_| {}),
        }
    }
}

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extras").finish_non_exhaustive()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub credentials: CredentialStore,
    /// Our trust bundle and each linked cluster's.
    pub bundles: BundleStore,
    /// `/ready` of the admin endpoint.
    pub readiness: Readiness,
    api: Channel,
    config: Config,
    tasks: JoinSet<()>,
    draining: tokio::sync::watch::Sender<bool>,
    /// Inbound connections open now.
    open_connections: Connections,
}

/// What a component that joins the mesh like a proxy (the proxy, the
/// gateway) holds once it has an identity.
#[derive(Debug)]
pub struct Joined {
    /// Our trust bundle plus each linked cluster's, kept current.
    pub bundles: BundleStore,
    pub creds: CredentialStore,
    /// mTLS to the control plane's API, expecting its identity.
    pub api: Channel,
    /// Not ready yet; the caller says when it is.
    pub readiness: Readiness,
    pub admin_addr: SocketAddr,
}

/// trust anchors -> admin (serving, not ready) -> identity -> control
/// plane channel -> linked trust followed. Tasks go into `tasks`.
pub async fn join(
    config: &Config,
    registry: Arc<prometheus_client::registry::Registry>,
    tap: Option<admin::Tap>,
    tasks: &mut JoinSet<()>,
) -> Result<Joined, StartError> {
    let bundle = config.trust_anchors.load(config.trust_domain.clone())?;
    let bundles = BundleStore::new([bundle.clone()].into_iter().collect::<TrustBundleSet>());
    let readiness = Readiness::new("waiting for an identity from the control plane");
    let admin_listener = admin::bind(config.admin_addr).await?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_addr,
            source,
        })?;
    if let Some(addr) = config.metrics_addr {
        let listener = admin::bind_metrics(addr).await?;
        tasks.spawn(admin::serve_metrics_only(listener, registry.clone()));
    }
    tasks.spawn(admin::serve_with_tap(
        admin_listener,
        registry,
        readiness.clone(),
        tap,
    ));
    let creds = CredentialStore::new(identity::bootstrap(config, &bundles).await?);
    let control = ExpectedIdentity::Exact(config.control_identity.clone());
    let api = match &config.via_gateway {
        // Behind the gateway: mTLS to the control plane inside the tunnel.
        Some(route) => through_gateway(
            route,
            crate::outbound::tunnel::FEDERATION_TARGET,
            control,
            &creds,
            &bundles,
        )
        .map_err(StartError::ControlAddress)?,
        None => {
            let api_tls = tls::client_config(creds.clone(), bundles.clone(), control)?;
            grpc::channel(&config.control_api_addr, api_tls)
                .map_err(|e| StartError::ControlAddress(e.to_string()))?
        }
    };
    tasks.spawn(crate::trust::follow_linked_bundles(
        api.clone(),
        bundle,
        bundles.clone(),
    ));
    Ok(Joined {
        bundles,
        creds,
        api,
        readiness,
        admin_addr,
    })
}

/// A gRPC channel to `target` behind this cluster's gateway: a tunnel
/// with our SVID, and inside it mTLS to a server that must be `server`.
/// Connects lazily, and again after failures, as any channel.
pub fn through_gateway(
    route: &crate::env::GatewayRoute,
    target: &str,
    server: ExpectedIdentity,
    creds: &CredentialStore,
    bundles: &BundleStore,
) -> Result<Channel, String> {
    let tunnel = crate::outbound::tunnel::Gateways::default().connector(
        &route.address,
        route.identity.clone(),
        target,
        server,
        false,
        creds,
        bundles,
    )?;
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{host}"))
            .map_err(|e| e.to_string())?
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let tunnel = tunnel.clone();
                async move { tunnel.connect().await }
            })),
    )
}

/// Binds `addr` and returns the listener with the address it got (the
/// port is chosen by the OS when `addr` asks for 0).
///
/// Nagle is off on the listener: Linux copies TCP_NODELAY to every
/// connection it accepts, which saves a `setsockopt` per connection.
async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    socket2::SockRef::from(&listener)
        .set_tcp_nodelay(true)
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

impl Proxy {
    /// Starts the proxy. Returns once it holds an identity and serves
    /// inbound traffic; until then `/ready` says why it is not ready.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, Extras::default()).await
    }

    /// [`Self::start`] for a host that runs the proxy in its own process
    /// (the VM agent): the app's health from its checks, its own metrics.
    pub async fn start_with(config: Config, extras: Extras) -> Result<Self, StartError> {
        tracing::info!(?config, "starting proxy");
        let Extras { health, metrics } = extras;
        let metrics = Metrics::with(metrics);
        metrics.set_identity(crate::metrics::IdentityLabels {
            cluster: config.cluster.clone(),
            namespace: config.namespace.clone(),
            workload: config.workload.clone(),
            identity: config.identity.to_string(),
        });
        let mut tasks = JoinSet::new();
        let Joined {
            bundles,
            creds,
            api,
            readiness,
            admin_addr,
        } = join(
            &config,
            metrics.registry.clone(),
            Some(metrics.tap.clone()),
            &mut tasks,
        )
        .await?;
        metrics
            .identity_expiry
            .set(creds.current().info().not_after.unix_timestamp());

        // Meshed traffic is accepted only from here on: we hold an identity.
        // Callers of linked clusters are verified against their own bundle;
        // the port's policy decides who is admitted.
        let inbound_tls =
            tls::server_config(creds.clone(), bundles.clone(), ExpectedIdentity::AnyTrusted)?;
        let (listener, inbound_addr) = listen(config.inbound_addr).await?;
        let (outbound_listener, outbound_addr) = listen(config.outbound_addr).await?;
        let policies = PolicyCache::new(
            PolicyClient::new(api.clone()),
            &config.namespace,
            &config.workload,
        );
        // Callers name app ports; the proxy's own listeners are never one.
        let ports = inbound::policy::Ports {
            app: config.app_ports.iter().map(|p| p.port).collect(),
            own: [inbound_addr, outbound_addr, admin_addr]
                .iter()
                .map(SocketAddr::port)
                .collect(),
        };
        let mut inbound = Inbound::new(
            policies,
            (config.app_ip, ports),
            config.trust_domain.clone(),
            config.inbound_fail_fast,
            config.max_in_flight,
            metrics.clone(),
        );
        inbound.drain_grace = config.shutdown_grace;
        let inbound = Arc::new(inbound);
        let (draining_tx, draining) = tokio::sync::watch::channel(false);
        let open_connections = Connections::default();
        tasks.spawn(inbound::accept(
            listener,
            {
                let mut tls = inbound_tls;
                tls.alpn_protocols = vec![
                    crate::wire::ALPN_H2.to_vec(),
                    crate::wire::ALPN_TCP.to_vec(),
                    crate::upgrade::ALPN_HTTP1.to_vec(),
                ];
                Arc::new(tls)
            },
            inbound,
            draining,
            open_connections.clone(),
        ));

        let outbound = Outbound::new(
            api.clone(),
            outbound::endpoint::Dialer::new(creds.clone(), bundles.clone(), config.connect_timeout)
                .with_route(config.via_gateway.clone()),
            metrics.clone(),
            OUTBOUND_FAIL_FAST,
            (config.max_in_flight, config.header_read_timeout),
        );
        let outbound = Arc::new(outbound.with_limits(config.destinations));
        tasks.spawn(outbound::evict_idle_forever(outbound.clone()));
        let outbound_open = Connections::default();
        tasks.spawn(outbound::accept(
            outbound_listener,
            outbound,
            config.detect_timeout,
            config.opaque_ports.clone().into(),
            outbound_open.clone(),
        ));
        tasks.spawn(release_memory_after_bursts(
            vec![open_connections.clone(), outbound_open],
            metrics.clone(),
        ));

        tasks.spawn(register::keep_registered(
            RegistryClient::new(api.clone()),
            config.clone(),
            inbound_addr.port(),
            health,
        ));
        let (renew_metrics, renew_ready) = (metrics.clone(), readiness.clone());
        tasks.spawn(identity::renew_forever(
            config.clone(),
            bundles.clone(),
            creds.clone(),
            move |state| match state {
                Ok(not_after) => {
                    renew_metrics
                        .identity_expiry
                        .set(not_after.unix_timestamp());
                    renew_metrics.identity_renewals.inc();
                    renew_ready.set_ready();
                }
                Err(why) => renew_ready.set_not_ready(why),
            },
        ));

        tasks.spawn(release_startup_code_once_settled(metrics.clone()));
        readiness.set_ready();
        tracing::info!(%inbound_addr, %outbound_addr, %admin_addr, id = %config.identity, "proxy ready");
        Ok(Self {
            inbound_addr,
            outbound_addr,
            admin_addr,
            credentials: creds,
            bundles,
            readiness,
            api,
            config,
            tasks,
            draining: draining_tx,
            open_connections,
        })
    }

    /// Drains: deregisters (so callers stop choosing this workload), stops
    /// accepting, sends GOAWAY on every inbound connection, and waits up to
    /// `grace` for them to finish before stopping.
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let deregister = register::deregister(RegistryClient::new(self.api.clone()), &self.config);
        let _ = tokio::time::timeout(grace, deregister).await;
        let _ = self.draining.send(true);
        while self.open_connections.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.tasks.shutdown().await;
    }
}

/// Gives free memory back to the kernel once a burst of connections, in
/// either direction, has closed (ARCHITECTURE.md, "Memory after a burst").
async fn release_memory_after_bursts(counts: Vec<Connections>, metrics: Metrics) {
    mesh_core::memory::release_after_bursts(counts, Duration::from_secs(1), move |released| {
        metrics
            .memory_releases
            .get_or_create(&crate::metrics::ReleaseLabels { released })
            .inc();
    })
    .await;
}

/// How long after ready the proxy's start-up work (the first registration,
/// the control plane's first answers) is given to finish.
const STARTUP_SETTLES: Duration = Duration::from_secs(2);

/// Drops the resident pages of code that ran only to start, once start-up
/// has settled (ARCHITECTURE.md, "Code that ran only to start is not kept
/// resident"). Failing only costs memory, so it is logged, not fatal.
async fn release_startup_code_once_settled(metrics: Metrics) {
    tokio::time::sleep(STARTUP_SETTLES).await;
    match mesh_core::code_pages::release_startup_code() {
        Ok(bytes) => {
            tracing::debug!(bytes, "pages of start-up code released");
            metrics
                .startup_code_released
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        Err(why) => tracing::warn!("start-up code stays resident: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_accepted_from_the_listeners_have_nagle_off() {
        let (listener, addr) = listen(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "TCP_NODELAY inherited from the listener"
        );
    }
}
