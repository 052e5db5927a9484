//! The gateway's settings: flags, each also read from `MESH_GATEWAY_*`.
//! The gateway is `spiffe://<td>/ns/mesh-system/sa/gateway`; it joins like
//! a proxy (token or existing credentials) and renews the same way.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use mesh_core::identity::{SpiffeId, TrustDomain};
use mesh_proxy::{
    Config,
    env::{Bootstrap, SystemComponent},
};

/// The namespace and service account of every gateway.
pub const NAMESPACE: &str = "mesh-system";
pub const SERVICE_ACCOUNT: &str = "gateway";

#[derive(Clone, Debug, Args)]
pub struct GatewayArgs {
    /// This cluster's name.
    #[arg(long, env = "MESH_GATEWAY_CLUSTER")]
    pub cluster: String,
    /// This cluster's trust domain.
    #[arg(long, env = "MESH_GATEWAY_TRUST_DOMAIN")]
    pub trust_domain: TrustDomain,
    /// The cluster domain in service authorities.
    #[arg(
        long,
        env = "MESH_GATEWAY_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// The control plane's identity port (Certify), host:port.
    #[arg(long, env = "MESH_GATEWAY_CONTROL_IDENTITY_ADDR")]
    pub control_identity_addr: String,
    /// The control plane's API port, host:port; also where the reserved
    /// federation target leads.
    #[arg(long, env = "MESH_GATEWAY_CONTROL_API_ADDR")]
    pub control_api_addr: String,
    /// The SPIFFE ID the control plane presents [default: spiffe://<td>/ns/mesh-system/sa/control].
    #[arg(long, env = "MESH_GATEWAY_CONTROL_IDENTITY")]
    pub control_identity: Option<SpiffeId>,
    /// This cluster's trust bundle (bundle.json or PEM).
    #[arg(long, env = "MESH_GATEWAY_TRUST_ANCHORS")]
    pub trust_anchors: PathBuf,
    /// A join token for the first SVID.
    #[arg(
        long,
        env = "MESH_GATEWAY_JOIN_TOKEN_FILE",
        conflicts_with = "credentials_dir"
    )]
    pub join_token_file: Option<PathBuf>,
    /// Or an existing SVID: a directory with leaf.crt and leaf.key.
    #[arg(long, env = "MESH_GATEWAY_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Where linked clusters' tunnels arrive (mTLS, TCP).
    #[arg(long, env = "MESH_GATEWAY_TUNNEL_ADDR", default_value = "0.0.0.0:4143")]
    pub tunnel_addr: SocketAddr,
    /// `/ready`, `/live`, `/metrics`; loopback only.
    #[arg(
        long,
        env = "MESH_GATEWAY_ADMIN_ADDR",
        default_value = "127.0.0.1:4191"
    )]
    pub admin_addr: SocketAddr,
    /// A metrics-only listener (`GET /metrics`, nothing else) Prometheus
    /// can scrape from outside the pod; none by default.
    #[arg(long, env = "MESH_GATEWAY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl GatewayArgs {
    /// The gateway's SPIFFE ID.
    pub fn identity(&self) -> Result<SpiffeId, String> {
        SpiffeId::workload(&self.trust_domain, NAMESPACE, SERVICE_ACCOUNT)
            .map_err(|e| e.to_string())
    }

    /// The settings the proxy's join, identity and renewal code need.
    pub fn identity_config(&self) -> Result<Config, String> {
        SystemComponent {
            cluster: self.cluster.clone(),
            trust_domain: self.trust_domain.clone(),
            service_account: SERVICE_ACCOUNT,
            control_identity_addr: self.control_identity_addr.clone(),
            control_api_addr: self.control_api_addr.clone(),
            control_identity: self.control_identity.clone(),
            trust_anchors: self.trust_anchors.clone(),
            bootstrap: Bootstrap::from_flags(
                self.join_token_file.as_ref(),
                self.credentials_dir.as_ref(),
            )?,
            listen: self.tunnel_addr,
            admin_addr: self.admin_addr,
            metrics_addr: self.metrics_addr,
        }
        .config()
    }
}
