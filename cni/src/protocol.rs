//! The CNI protocol (spec 1.0/1.1): the `CNI_*` environment, the network
//! configuration on stdin, and results and errors on stdout. Everything
//! from the runtime is bounded and checked before use.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// The versions this plugin speaks.
pub const SUPPORTED: [&str; 5] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.3.0"];
/// Largest configuration accepted on stdin.
pub const MAX_CONFIG: usize = 1 << 20;
const MAX_ARGS: usize = 4096;

/// CNI's well-known error codes (and ours from 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// Our rules are not as they should be (CHECK).
    Drift = 100,
    /// The rules could not be applied.
    Apply = 101,
}

/// A CNI error result.
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the runtime reads on stdout.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// What the runtime asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` environment of one call.
#[derive(Clone, Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    pub args: HashMap<String, String>,
}

impl Env {
    /// Reads and checks the variables the command needs.
    pub fn parse(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |name: &str| vars.get(name).cloned().unwrap_or_default();
        let command = match get("CNI_COMMAND").as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "unknown CNI_COMMAND",
                    format!("{other:?}; expected ADD, DEL, CHECK, VERSION, STATUS or GC"),
                ));
            }
        };
        let env = Self {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS"))?,
        };
        if matches!(command, Command::Add | Command::Check) {
            if env.container_id.is_empty() || env.ifname.is_empty() {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "CNI_CONTAINERID and CNI_IFNAME are required",
                    format!("for {command:?}"),
                ));
            }
            if !env.netns.starts_with('/') || env.netns.len() > 4096 {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "CNI_NETNS must be an absolute path",
                    format!("{:?}", env.netns),
                ));
            }
        }
        Ok(env)
    }
}

fn parse_args(text: &str) -> Result<HashMap<String, String>, CniError> {
    if text.len() > MAX_ARGS {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            "CNI_ARGS is too long",
            format!("{} bytes; at most {MAX_ARGS}", text.len()),
        ));
    }
    text.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    CniError::new(
                        Code::InvalidEnvironment,
                        "CNI_ARGS is not KEY=VALUE;...",
                        kv,
                    )
                })
        })
        .collect()
}

/// Our entry in the chained configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The kubeconfig the plugin reads pods with (written by `mesh-cni
    /// install`).
    pub kubeconfig: Option<String>,
    #[serde(default = "inbound")]
    pub inbound_port: u16,
    #[serde(default = "outbound")]
    pub outbound_port: u16,
    #[serde(default = "admin")]
    pub admin_port: u16,
    /// The result of the plugins before us, passed on.
    pub prev_result: Option<Value>,
}

fn inbound() -> u16 {
    4143
}
fn outbound() -> u16 {
    4140
}
fn admin() -> u16 {
    4191
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        if bytes.len() > MAX_CONFIG {
            return Err(CniError::new(
                Code::InvalidConfig,
                "network configuration too large",
                format!("{} bytes; at most {MAX_CONFIG}", bytes.len()),
            ));
        }
        let config: Self = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                Code::Decode,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED.contains(&config.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "unsupported cniVersion",
                format!(
                    "{:?}; supported: {}",
                    config.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if [config.inbound_port, config.outbound_port, config.admin_port].contains(&0) {
            return Err(CniError::new(
                Code::InvalidConfig,
                "ports must be 1-65535",
                "inboundPort, outboundPort, adminPort",
            ));
        }
        Ok(config)
    }
}

/// The answer to VERSION.
pub fn version_result() -> Value {
    json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_config_are_checked() {
        let vars = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>()
        };
        let e = Env::parse(&vars(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        let env = Env::parse(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
            ),
        ]))
        .unwrap();
        assert_eq!(env.args["K8S_POD_NAME"], "web-1");
        assert_eq!(
            Env::parse(&vars(&[("CNI_COMMAND", "EXPLODE")]))
                .unwrap_err()
                .code,
            Code::InvalidEnvironment
        );

        let c = Config::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni"}"#).unwrap();
        assert_eq!(c.inbound_port, 4143);
        assert_eq!(Config::parse(b"{nope").unwrap_err().code, Code::Decode);
        let old = Config::parse(br#"{"cniVersion":"0.1.0","type":"mesh-cni"}"#).unwrap_err();
        assert_eq!(old.code, Code::IncompatibleVersion);
        assert_eq!(old.to_json("1.0.0")["code"], 1);
    }
}
