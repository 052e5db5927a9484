//! The join string: everything a VM needs to join, on one line.
//!
//! `mesh vm token create` makes it on the cluster side; `mesh-vm-agent join`
//! reads it on the VM. It is `mesh-vm1.` followed by the URL-safe base64 of
//! a JSON object (serialized with serde, never assembled by hand). It holds
//! a secret (the single-use token), so it is shown once and never logged.
//!
//! What arrives in it is checked before use: its size, every name, every
//! address, the token's shape and the pin's.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use mesh_core::identity::TrustDomain;
use serde::{Deserialize, Serialize};

/// Every join string starts with this (and the format's version).
pub const PREFIX: &str = "mesh-vm1.";
/// A join string longer than this is refused before decoding.
pub const MAX_LEN: usize = 8 * 1024;
/// Labels and ports a join string may carry at most.
pub const MAX_LABELS: usize = 64;
pub const MAX_PORTS: usize = 64;

/// What `mesh vm token create` tells a VM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinString {
    /// The cluster's name.
    pub cluster: String,
    /// The cluster's trust domain.
    pub trust_domain: String,
    /// `host:port` of the control plane's identity service (Certify).
    pub identity_addr: String,
    /// `host:port` of the control plane's API (Discovery, Policy, Registry).
    pub api_addr: String,
    /// `host:port` of the cluster's gateway, for a VM whose only route to
    /// the cluster is to its gateway: everything goes through it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The single-use join token.
    pub token: String,
    /// `sha256:<hex>` of the trust bundle's roots (`TrustBundle::pin`).
    pub pin: String,
    pub namespace: String,
    pub service_account: String,
    /// The workload name the VM registers as.
    pub workload: String,
    /// The labels it registers (the control plane accepts no others).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The application ports it serves (the control plane accepts no others).
    #[serde(default)]
    pub ports: Vec<u16>,
}

impl std::fmt::Debug for JoinString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never in a log line.
        f.debug_struct("JoinString")
            .field("cluster", &self.cluster)
            .field("trust_domain", &self.trust_domain)
            .field("identity_addr", &self.identity_addr)
            .field("api_addr", &self.api_addr)
            .field("gateway", &self.gateway)
            .field("pin", &self.pin)
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("workload", &self.workload)
            .field("labels", &self.labels)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

/// Why a join string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinStringError {
    #[error(
        "this is not a join string (it starts with {PREFIX}); copy the whole line `mesh vm token create` printed"
    )]
    Prefix,
    #[error("the join string is {0} bytes, over the limit of {MAX_LEN}")]
    TooLong(usize),
    #[error("the join string is damaged ({0}); copy it again, whole")]
    Damaged(String),
    #[error("the join string's {field} is invalid: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> JoinStringError {
    JoinStringError::Field {
        field,
        problem: problem.into(),
    }
}

impl JoinString {
    /// The one-line text form.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a join string serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads and checks a join string.
    pub fn decode(text: &str) -> Result<Self, JoinStringError> {
        let text = text.trim();
        if text.len() > MAX_LEN {
            return Err(JoinStringError::TooLong(text.len()));
        }
        let body = text.strip_prefix(PREFIX).ok_or(JoinStringError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| JoinStringError::Damaged(e.to_string()))?;
        let parsed: Self =
            serde_json::from_slice(&json).map_err(|e| JoinStringError::Damaged(e.to_string()))?;
        parsed.check()?;
        Ok(parsed)
    }

    /// Every field, as the agent will use it.
    pub fn check(&self) -> Result<(), JoinStringError> {
        check_name("cluster", &self.cluster)?;
        self.trust_domain
            .parse::<TrustDomain>()
            .map_err(|e| field("trust_domain", e.to_string()))?;
        check_host_port("identity_addr", &self.identity_addr)?;
        check_host_port("api_addr", &self.api_addr)?;
        if let Some(gw) = &self.gateway {
            check_host_port("gateway", gw)?;
        }
        let token_ok = self.token.starts_with("mesh-join-")
            && self.token.len() < 128
            && self.token[10..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok {
            return Err(field("token", "not a join token (mesh-join-...)"));
        }
        let pin_ok = self.pin.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !pin_ok {
            return Err(field(
                "pin",
                "expected sha256: and 64 lower-case hex digits",
            ));
        }
        check_name("namespace", &self.namespace)?;
        check_name("service_account", &self.service_account)?;
        check_name("workload", &self.workload)?;
        if self.labels.len() > MAX_LABELS {
            return Err(field("labels", format!("more than {MAX_LABELS}")));
        }
        for (k, v) in &self.labels {
            check_label(k, v)?;
        }
        if self.ports.len() > MAX_PORTS {
            return Err(field("ports", format!("more than {MAX_PORTS}")));
        }
        if self.ports.contains(&0) {
            return Err(field("ports", "0 is not a port"));
        }
        Ok(())
    }
}

/// A Kubernetes DNS label: lower-case letters, digits and '-', at most 63,
/// starting and ending with a letter or digit.
pub fn check_name(what: &'static str, name: &str) -> Result<(), JoinStringError> {
    if mesh_core::names::is_dns_label(name) {
        Ok(())
    } else {
        Err(field(
            what,
            format!("{name:?} is not a DNS label (a-z, 0-9, '-', at most 63)"),
        ))
    }
}

fn check_label(key: &str, value: &str) -> Result<(), JoinStringError> {
    let chars = |s: &str, extra: &[u8]| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
    };
    if key.is_empty() || key.len() > 253 || !chars(key, b"-_./") {
        return Err(field("labels", format!("{key:?} is not a label key")));
    }
    if value.len() > 63 || !chars(value, b"-_.") {
        return Err(field(
            "labels",
            format!("{key}={value:?} is not a label value"),
        ));
    }
    Ok(())
}

/// `host:port`, where host is an IP address or a DNS name.
pub fn check_host_port(what: &'static str, addr: &str) -> Result<(), JoinStringError> {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || field(what, format!("{addr:?} is not host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if host_ok { Ok(()) } else { Err(bad()) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> JoinString {
        JoinString {
            cluster: "west".into(),
            trust_domain: "west.mesh.local".into(),
            identity_addr: "10.0.2.100:8080".into(),
            api_addr: "control.west.example:8086".into(),
            gateway: None,
            token: "mesh-join-abcdefABCDEF0123456789_-abcdefABCDEF0123456".into(),
            pin: format!("sha256:{}", "ab".repeat(32)),
            namespace: "shop".into(),
            service_account: "billing".into(),
            workload: "billing-1".into(),
            labels: [("app".to_owned(), "billing".to_owned())].into(),
            ports: vec![5432],
        }
    }

    #[test]
    fn round_trips_and_hides_the_token_from_logs() {
        let j = sample();
        let text = j.encode();
        assert!(text.starts_with(PREFIX));
        assert!(!text.contains(' '), "one shell word");
        assert_eq!(JoinString::decode(&format!("  {text}\n")).unwrap(), j);
        assert!(!format!("{j:?}").contains("mesh-join-"));
    }

    #[test]
    fn refuses_what_was_damaged_or_forged() {
        let text = sample().encode();
        assert_eq!(
            JoinString::decode(&text[1..]).unwrap_err(),
            JoinStringError::Prefix
        );
        assert!(matches!(
            JoinString::decode(&text[..text.len() - 3]),
            Err(JoinStringError::Damaged(_))
        ));
        assert!(matches!(
            JoinString::decode(&format!("{PREFIX}{}", "A".repeat(MAX_LEN))),
            Err(JoinStringError::TooLong(_))
        ));
        let with = |f: fn(&mut JoinString)| {
            let mut j = sample();
            f(&mut j);
            JoinString::decode(&j.encode()).unwrap_err().to_string()
        };
        assert!(with(|j| j.pin = "md5:00".into()).contains("pin"));
        assert!(with(|j| j.token = "secret".into()).contains("token"));
        assert!(with(|j| j.namespace = "Shop".into()).contains("namespace"));
        assert!(with(|j| j.workload = "a/../b".into()).contains("workload"));
        assert!(with(|j| j.identity_addr = "10.0.0.1".into()).contains("identity_addr"));
        assert!(with(|j| j.api_addr = "a b:80".into()).contains("api_addr"));
        assert!(with(|j| j.ports = vec![0]).contains("ports"));
        assert!(
            with(|j| {
                j.labels.insert("app".into(), "x\ny".into());
            })
            .contains("labels")
        );
        assert!(with(|j| j.trust_domain = "Bad Domain!".into()).contains("trust_domain"));
        // Unknown fields are refused, not ignored.
        let json = r#"{"cluster":"west","extra":1}"#;
        assert!(matches!(
            JoinString::decode(&format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))),
            Err(JoinStringError::Damaged(_))
        ));
    }
}
