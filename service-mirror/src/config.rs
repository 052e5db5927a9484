//! The service mirror's settings: flags, each also read from
//! `MESH_SERVICE_MIRROR_*`. It runs as `spiffe://<td>/ns/mesh-system/sa/service-mirror`
//! next to its control plane, whose config directory it writes mirrors into.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use mesh_core::identity::TrustDomain;
use mesh_proxy::{
    Config,
    env::{Bootstrap, SystemComponent},
};

pub const NAMESPACE: &str = "mesh-system";
pub const SERVICE_ACCOUNT: &str = "service-mirror";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    Local,
    Kube,
}

#[derive(Clone, Debug, Args)]
pub struct MirrorArgs {
    /// This cluster's name.
    #[arg(long, env = "MESH_SERVICE_MIRROR_CLUSTER")]
    pub cluster: String,
    /// This cluster's trust domain.
    #[arg(long, env = "MESH_SERVICE_MIRROR_TRUST_DOMAIN")]
    pub trust_domain: TrustDomain,
    /// The local control plane's identity port (Certify), host:port.
    #[arg(long, env = "MESH_SERVICE_MIRROR_CONTROL_IDENTITY_ADDR")]
    pub control_identity_addr: String,
    /// The local control plane's API port, host:port.
    #[arg(long, env = "MESH_SERVICE_MIRROR_CONTROL_API_ADDR")]
    pub control_api_addr: String,
    /// This cluster's trust bundle (bundle.json or PEM).
    #[arg(long, env = "MESH_SERVICE_MIRROR_TRUST_ANCHORS")]
    pub trust_anchors: PathBuf,
    /// A join token for the first SVID.
    #[arg(
        long,
        env = "MESH_SERVICE_MIRROR_JOIN_TOKEN_FILE",
        conflicts_with = "credentials_dir"
    )]
    pub join_token_file: Option<PathBuf>,
    /// Or an existing SVID: a directory with leaf.crt and leaf.key.
    #[arg(long, env = "MESH_SERVICE_MIRROR_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Where mirrors go: `local` (files in the control plane's config
    /// directory) or `kube` (MirroredService objects in the API server).
    #[arg(
        long,
        env = "MESH_SERVICE_MIRROR_STORE",
        value_enum,
        default_value = "local"
    )]
    pub store: Store,
    /// With `--store kube`: the kubeconfig [default: KUBECONFIG,
    /// ~/.kube/config, or in-cluster].
    #[arg(long, env = "MESH_SERVICE_MIRROR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--store local`: the control plane's config directory; mirrors
    /// of cluster C are written to `mirror-C.yaml` there.
    #[arg(long, env = "MESH_SERVICE_MIRROR_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// `/ready`, `/live`, `/metrics`; loopback only.
    #[arg(
        long,
        env = "MESH_SERVICE_MIRROR_ADMIN_ADDR",
        default_value = "127.0.0.1:9991"
    )]
    pub admin_addr: SocketAddr,
    /// A metrics-only listener (`GET /metrics`, nothing else) Prometheus
    /// can scrape from outside the pod; none by default.
    #[arg(long, env = "MESH_SERVICE_MIRROR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl MirrorArgs {
    /// The settings the proxy's join code needs.
    pub fn identity_config(&self) -> Result<Config, String> {
        SystemComponent {
            cluster: self.cluster.clone(),
            trust_domain: self.trust_domain.clone(),
            service_account: SERVICE_ACCOUNT,
            control_identity_addr: self.control_identity_addr.clone(),
            control_api_addr: self.control_api_addr.clone(),
            control_identity: None,
            trust_anchors: self.trust_anchors.clone(),
            bootstrap: Bootstrap::from_flags(
                self.join_token_file.as_ref(),
                self.credentials_dir.as_ref(),
            )?,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: self.admin_addr,
            metrics_addr: self.metrics_addr,
        }
        .config()
    }
}
