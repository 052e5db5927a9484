//! What injection needs to know about the cluster, written by `mesh
//! install` into the `mesh-config` ConfigMap (key `inject.json`) and read
//! by the webhook and by `mesh inject --manual`, so both render the same
//! pod for the same input.

use serde::{Deserialize, Serialize};

/// The ConfigMap key holding [`InjectConfig`] as JSON.
pub const CONFIG_KEY: &str = "inject.json";
/// The ConfigMap key holding the trust bundle the proxies start with.
pub const BUNDLE_KEY: &str = "bundle.json";

/// Proxy settings an operator changes at install (`--set proxy.*`); most
/// have a per-workload `config.mesh.rs/` annotation too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyValues {
    /// Empty: the control plane's image (the same `mesh` binary).
    #[serde(default)]
    pub image: String,
    pub log_level: String,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// The user (and group) the proxy runs as; iptables lets its own
    /// traffic through by this id.
    pub uid: u32,
    /// Start the app only once the proxy is ready.
    #[serde(rename = "await")]
    pub await_ready: bool,
    /// The proxy as a native sidecar (Kubernetes 1.29+); `false` for a
    /// classic sidecar container.
    pub native_sidecar: bool,
    /// How long the proxy drains on SIGTERM.
    pub shutdown_grace: String,
}

impl Default for ProxyValues {
    fn default() -> Self {
        Self {
            image: String::new(),
            log_level: "info".into(),
            cpu_request: "10m".into(),
            cpu_limit: String::new(),
            memory_request: "20Mi".into(),
            memory_limit: "250Mi".into(),
            uid: 2102,
            await_ready: true,
            native_sidecar: true,
            shutdown_grace: "10s".into(),
        }
    }
}

/// Everything the injected spec is rendered from, besides the pod itself
/// and the trust bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectConfig {
    /// The control plane's version; the proxy image defaults to it.
    pub version: String,
    pub cluster: String,
    pub trust_domain: String,
    /// The control plane's image (`proxy.image` overrides it).
    pub image: String,
    pub image_pull_policy: String,
    /// `host:port` of the identity service, as pods reach it.
    pub control_identity_addr: String,
    /// `host:port` of the control API.
    pub control_api_addr: String,
    /// The CNI plugin applies the interception rules: no `mesh-init`.
    pub cni_enabled: bool,
    pub proxy: ProxyValues,
}

impl InjectConfig {
    /// The proxy image when no annotation names one.
    pub fn proxy_image(&self) -> &str {
        if self.proxy.image.is_empty() {
            &self.image
        } else {
            &self.proxy.image
        }
    }

    /// Parses the ConfigMap value, naming the key when it does not parse.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            format!(
                "ConfigMap mesh-system/mesh-config key {CONFIG_KEY}: {e}; re-apply `mesh install`"
            )
        })
    }
}
