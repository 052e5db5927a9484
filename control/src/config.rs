//! The control plane's typed configuration. Parsed at the binary edge
//! (`cli.rs`, flags and `MESH_CONTROL_*`), never read from the environment
//! here.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::index::Liveness;

#[derive(Clone, Debug)]
pub struct Config {
    /// This cluster's name; every endpoint carries it.
    pub cluster: String,
    /// The DNS suffix of service authorities (`<svc>.<ns>.svc.<domain>`).
    pub cluster_domain: String,
    /// CA directory from `mesh identity ca create` (issuer.crt/.key, root.crt, bundle.json).
    pub ca_dir: PathBuf,
    /// Directory of resource YAML files, watched for changes.
    pub config_dir: PathBuf,
    /// Where the state database and the admin socket live.
    pub data_dir: PathBuf,
    /// Identity service (Certify): TLS, client certificate optional.
    pub identity_addr: SocketAddr,
    /// Discovery, Policy and Registry: mTLS required.
    pub api_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/live`; loopback only.
    pub admin_addr: SocketAddr,
    /// `GET /metrics` only, on any address (for Prometheus).
    pub metrics_addr: Option<SocketAddr>,
    /// The admin socket (`mesh control token create`).
    pub admin_socket: PathBuf,
    /// Heartbeat interval, misses before not-ready, removal grace.
    pub liveness: Liveness,
    /// How often the config directory and issuer files are checked.
    pub poll_interval: Duration,
    /// Default (and maximum) lifetime of issued SVIDs.
    pub leaf_ttl: Duration,
    /// Certify requests one identity may make at once...
    pub certify_burst: u32,
    /// ...and per second after that.
    pub certify_rate: f64,
    /// Registered workloads one namespace may hold.
    pub max_workloads_per_namespace: usize,
    /// This cluster's gateway as its own workloads reach it (`host:port`):
    /// where they find workloads registered as reached through it (VMs
    /// with no route from them). Empty: no such workload is served.
    pub gateway_addresses: Vec<String>,
    /// The `kube` store: resources and Pods from this API server instead
    /// of `config_dir`.
    pub kube: Option<KubeSettings>,
}

/// How the `kube` store reaches the API server.
#[derive(Clone, Debug, Default)]
pub struct KubeSettings {
    /// A kubeconfig file; without it, `KUBECONFIG`, `~/.kube/config`, or
    /// the in-cluster service account, in that order.
    pub kubeconfig: Option<PathBuf>,
    /// The Secret (`namespace`, `name`) holding the issuer; then `ca_dir`
    /// is where its files are written.
    pub ca_secret: Option<(String, String)>,
    /// This replica's name in the writer Lease (the Pod name).
    pub replica: String,
    /// Where the injection webhook listens (HTTPS), if it runs.
    pub webhook_addr: Option<std::net::SocketAddr>,
    /// The webhook serving certificate's lifetime (renewed at half).
    pub webhook_cert_ttl: Duration,
}

/// The identity the control plane serves as.
pub const CONTROL_NAMESPACE: &str = "mesh-system";
pub const CONTROL_SERVICE_ACCOUNT: &str = "control";
/// Warn when the issuer expires within this.
pub const ISSUER_WARN_BEFORE: Duration = Duration::from_secs(60 * 24 * 3600);
