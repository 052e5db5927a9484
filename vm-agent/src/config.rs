//! The agent's configuration: what `join` writes to `/etc/mesh/vm-agent.json`
//! (0600) and `run` reads, and the files it keeps under `/var/lib/mesh`.
//!
//! The file is JSON written with serde. It is read back with unknown fields
//! refused and every value checked, so a hand edit that breaks it fails at
//! start with the field named, not later.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_core::identity::{SpiffeId, TrustDomain, files};
use mesh_proxy::{
    Config, TrustAnchors,
    env::{AppPort, Bootstrap, DestinationLimits, GatewayRoute},
};
use serde::{Deserialize, Serialize};

use crate::{capture::CaptureConfig, health::HealthConfig, join_string};

/// Where `join` writes the config unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/mesh/vm-agent.json";
/// Where keys and certificates live unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mesh";
/// The Workload API socket unless told otherwise.
pub const DEFAULT_WORKLOAD_SOCKET: &str = "/run/mesh/workload.sock";

/// Files in the state directory, all 0600.
pub const LEAF_CRT: &str = "leaf.crt";
pub const LEAF_KEY: &str = "leaf.key";
pub const BUNDLE: &str = "bundle.pem";
pub const ENROLL_KEY: &str = "enroll.key";

/// A config file larger than this is refused.
const MAX_CONFIG_LEN: u64 = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The cluster joined and its trust domain.
    pub cluster: String,
    pub trust_domain: String,
    /// The control plane's identity (Certify) and API `host:port`; unused
    /// with `gateway`.
    pub identity_addr: String,
    pub api_addr: String,
    /// The cluster's gateway (`host:port`) when it is the VM's only route
    /// to the cluster: the control plane, services and callers are all
    /// reached through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Who the VM is: `spiffe://<td>/ns/<namespace>/sa/<service_account>`,
    /// registered as `<namespace>/<workload>`.
    pub namespace: String,
    pub service_account: String,
    pub workload: String,
    /// Labels and ports, exactly as the token granted them.
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u16>,
    /// The address registered for discovery (other proxies connect here).
    pub address: IpAddr,
    /// Where the app listens (the inbound proxy forwards here).
    pub app_ip: IpAddr,
    /// The proxy's listeners.
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/live`; loopback only.
    pub admin_addr: SocketAddr,
    /// Keys, certificates, the bundle.
    pub state_dir: PathBuf,
    /// Health checks of the app; none: healthy while the agent runs.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    pub workload_api: WorkloadApiConfig,
    /// DNS for mesh names; none: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Transparent capture of the app's traffic; none: explicit
    /// (`HTTP_PROXY`) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureConfig>,
}

/// Where the agent serves DNS, and which names are the mesh's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// A loopback address (UDP).
    pub listen: SocketAddr,
    /// Names under `svc.<cluster_domain>` are mesh names.
    pub cluster_domain: String,
}

/// The SPIFFE Workload API the agent serves to the VM's apps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// The Unix socket (`SPIFFE_ENDPOINT_SOCKET=unix://<path>`).
    pub socket: PathBuf,
    /// Unix user ids allowed to fetch the SVID; empty: nobody (root too).
    pub allowed_uids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    File(#[from] files::FileError),
    #[error("{path}: {problem}; fix the file or join again with `mesh-vm-agent join --force`")]
    Invalid { path: String, problem: String },
}

impl AgentConfig {
    /// Reads and checks the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            path: path.display().to_string(),
            problem,
        };
        let len = std::fs::metadata(path)
            .map_err(|source| files::FileError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        if len > MAX_CONFIG_LEN {
            return Err(invalid(format!("over {MAX_CONFIG_LEN} bytes")));
        }
        let bytes = files::read(path)?;
        let config: Self = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Writes the config, 0600, replacing any file atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let mut json = serde_json::to_vec_pretty(self).expect("the config serializes");
        json.push(b'\n');
        files::write_private(path, &json)?;
        Ok(())
    }

    pub fn check(&self) -> Result<(), String> {
        join_string::check_name("cluster", &self.cluster).map_err(|e| e.to_string())?;
        self.trust_domain
            .parse::<TrustDomain>()
            .map_err(|e| format!("trust_domain: {e}"))?;
        for (what, v) in [
            ("namespace", &self.namespace),
            ("service_account", &self.service_account),
            ("workload", &self.workload),
        ] {
            join_string::check_name(what, v).map_err(|e| e.to_string())?;
        }
        join_string::check_host_port("identity_addr", &self.identity_addr)
            .map_err(|e| e.to_string())?;
        join_string::check_host_port("api_addr", &self.api_addr).map_err(|e| e.to_string())?;
        if let Some(gw) = &self.gateway {
            join_string::check_host_port("gateway", gw).map_err(|e| e.to_string())?;
        }
        if !self.admin_addr.ip().is_loopback() {
            return Err(format!(
                "admin_addr {} is not a loopback address; admin endpoints stay on loopback",
                self.admin_addr
            ));
        }
        if let Some(h) = &self.health {
            h.check()?;
        }
        if let Some(dns) = &self.dns
            && !dns.listen.ip().is_loopback()
        {
            return Err(format!(
                "dns.listen {} is not a loopback address; the agent serves DNS to this VM only",
                dns.listen
            ));
        }
        if let Some(capture) = &self.capture {
            capture.check(self)?;
        }
        Ok(())
    }

    pub fn identity(&self) -> Result<SpiffeId, String> {
        let td: TrustDomain = self.trust_domain.parse().map_err(|e| format!("{e}"))?;
        SpiffeId::workload(&td, &self.namespace, &self.service_account).map_err(|e| e.to_string())
    }

    /// What the cluster's gateway presents.
    pub fn gateway_identity(&self) -> Result<SpiffeId, String> {
        let td: TrustDomain = self.trust_domain.parse().map_err(|e| format!("{e}"))?;
        SpiffeId::workload(&td, "mesh-system", "gateway").map_err(|e| e.to_string())
    }

    pub fn state_file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// The in-process proxy's settings: the sidecar's own, from this file.
    pub fn proxy_config(&self) -> Result<Config, String> {
        let trust_domain: TrustDomain = self.trust_domain.parse().map_err(|e| format!("{e}"))?;
        let control_identity = SpiffeId::workload(&trust_domain, "mesh-system", "control")
            .map_err(|e| e.to_string())?;
        Ok(Config {
            identity: self.identity()?,
            cluster: self.cluster.clone(),
            trust_domain,
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            workload: self.workload.clone(),
            control_identity_addr: self.identity_addr.clone(),
            control_api_addr: self.api_addr.clone(),
            control_identity,
            trust_anchors: TrustAnchors::File(self.state_file(BUNDLE)),
            bootstrap: Bootstrap::Credentials(self.state_dir.clone()),
            inbound_addr: self.inbound_addr,
            outbound_addr: self.outbound_addr,
            admin_addr: self.admin_addr,
            app_ip: self.app_ip,
            app_ports: self
                .ports
                .iter()
                .map(|&port| AppPort {
                    name: format!("port-{port}"),
                    port,
                })
                .collect(),
            workload_addresses: vec![self.address],
            labels: self.labels.clone(),
            inbound_fail_fast: Duration::from_secs(1),
            detect_timeout: Duration::from_secs(10),
            opaque_ports: Vec::new(),
            connect_timeout: mesh_proxy::env::CONNECT_TIMEOUT,
            header_read_timeout: Duration::from_secs(10),
            max_in_flight: 100_000,
            shutdown_grace: Duration::from_secs(30),
            worker_threads: 1,
            destinations: DestinationLimits::default(),
            via_gateway: match &self.gateway {
                Some(address) => Some(GatewayRoute {
                    address: address.clone(),
                    identity: self.gateway_identity()?,
                }),
                None => None,
            },
            metrics_addr: None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config as `join` writes it.
    pub(crate) fn sample() -> AgentConfig {
        AgentConfig {
            cluster: "west".into(),
            trust_domain: "west.mesh.local".into(),
            identity_addr: "10.0.0.1:8080".into(),
            api_addr: "10.0.0.1:8086".into(),
            gateway: None,
            namespace: "shop".into(),
            service_account: "billing".into(),
            workload: "billing-1".into(),
            labels: BTreeMap::new(),
            ports: vec![5432],
            address: "10.0.0.9".parse().unwrap(),
            app_ip: "127.0.0.1".parse().unwrap(),
            inbound_addr: "0.0.0.0:4143".parse().unwrap(),
            outbound_addr: "127.0.0.1:4140".parse().unwrap(),
            admin_addr: "127.0.0.1:4191".parse().unwrap(),
            state_dir: "/var/lib/mesh".into(),
            health: None,
            workload_api: WorkloadApiConfig {
                socket: DEFAULT_WORKLOAD_SOCKET.into(),
                allowed_uids: vec![],
            },
            dns: None,
            capture: None,
        }
    }

    #[test]
    fn the_sample_is_valid_and_round_trips() {
        let c = sample();
        c.check().unwrap();
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<AgentConfig>(&json).unwrap(), c);
    }
}
