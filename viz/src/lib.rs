//! `mesh viz`: one view of every linked cluster.
//!
//! A viz runs in each cluster beside its Prometheus (which scrapes every
//! proxy, gateway, mirror and control plane there). It answers for its own
//! cluster from that Prometheus, and for linked clusters by asking their
//! viz **through the mesh**: its own sidecar, the mirror
//! `viz-<cluster>.mesh-system`, the gateway tunnel, mTLS end to end, and
//! the peer's policy admitting this viz's identity. No Prometheus
//! federation, remote write or extra credentials. A peer that does not
//! answer within the peer timeout is named in the answer, not waited for.
//!
//! It serves a JSON API (`/api/v1/stat|routes|edges|links|tap|top`) and a
//! dashboard bundled into the binary (no CDN, no Node at run time). It
//! does not store metrics itself, change anything, or reach proxies'
//! admin endpoints except `/tap` where Prometheus scrapes them.

/// `println!` for the CLI's output (the workspace denies `println!` so
/// libraries do not print by accident).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

pub mod cli;
pub mod federate;
pub mod http;
pub mod install;
pub mod prom;
pub mod server;
pub mod tap;
pub mod views;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::task::JoinSet;

/// How a viz runs; every flag is also read from `MESH_VIZ_*`.
#[derive(Clone, Debug, clap::Args)]
pub struct VizArgs {
    /// This cluster's name.
    #[arg(long, env = "MESH_VIZ_CLUSTER")]
    pub cluster: String,
    /// This cluster's trust domain (names callers seen only by identity).
    #[arg(long, env = "MESH_VIZ_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// This cluster's Prometheus, host:port.
    #[arg(long, env = "MESH_VIZ_PROMETHEUS", default_value = "127.0.0.1:9090")]
    pub prometheus: SocketAddr,
    /// Where the API and dashboard listen (behind the sidecar in a pod).
    #[arg(long, env = "MESH_VIZ_ADDR", default_value = "0.0.0.0:8084")]
    pub addr: SocketAddr,
    /// viz's own `/metrics`, `/ready`, `/live`; loopback only.
    #[arg(long, env = "MESH_VIZ_ADMIN_ADDR", default_value = "127.0.0.1:9994")]
    pub admin_addr: SocketAddr,
    /// The sidecar's outbound address that linked clusters are reached
    /// through [default: from HTTP_PROXY].
    #[arg(long, env = "MESH_VIZ_PROXY")]
    pub proxy: Option<SocketAddr>,
    /// How long a linked cluster's viz may take before it is named
    /// unreachable.
    #[arg(long, env = "MESH_VIZ_PEER_TIMEOUT", default_value = "1200ms", value_parser = humantime::parse_duration)]
    pub peer_timeout: Duration,
    /// The rate window when a query does not give one.
    #[arg(long, env = "MESH_VIZ_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

/// Why viz could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin: {0}")]
    Admin(#[from] mesh_core::admin::AdminError),
    #[error(
        "HTTP_PROXY {0:?} is not http://host:port; set --proxy to the sidecar's outbound address"
    )]
    Proxy(String),
}

/// A running viz.
#[derive(Debug)]
pub struct Viz {
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

/// `http://host:port[/]` as an address.
pub fn proxy_from_env(value: &str) -> Option<SocketAddr> {
    let rest = value.strip_prefix("http://")?;
    rest.trim_end_matches('/').parse().ok()
}

impl Viz {
    pub async fn start(args: VizArgs) -> Result<Self, StartError> {
        tracing::info!(?args, "starting viz");
        let proxy = match args.proxy {
            Some(p) => Some(p),
            None => match std::env::var("HTTP_PROXY").or_else(|_| std::env::var("http_proxy")) {
                Ok(v) => Some(proxy_from_env(&v).ok_or(StartError::Proxy(v))?),
                Err(_) => None,
            },
        };
        let metrics = server::VizMetrics::new();
        let admin = mesh_core::admin::bind(args.admin_addr).await?;
        let readiness = mesh_core::admin::Readiness::new("starting");
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: args.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: args.addr,
            source,
        })?;
        let state = Arc::new(server::State {
            me: federate::ClusterMeta {
                name: args.cluster,
                trust_domain: args.trust_domain,
            },
            prometheus: prom::Prometheus {
                addr: args.prometheus,
            },
            peers: federate::Peers {
                proxy,
                timeout: args.peer_timeout,
            },
            window: args.window,
            metrics: metrics.clone(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(mesh_core::admin::serve(
            admin,
            metrics.registry.clone(),
            readiness.clone(),
        ));
        tasks.spawn(server::serve(listener, state));
        readiness.set_ready();
        tracing::info!(%addr, "viz ready: dashboard at http://{addr}/");
        Ok(Self { addr, tasks })
    }

    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}
