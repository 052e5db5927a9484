//! Transparent capture on the VM: iptables rules that send the app's
//! traffic through the agent's proxy without `HTTP_PROXY`.
//!
//! `mesh_proxy::init::HostRules`, not the sidecar's rules: a VM is shared
//! with other software, so only the app's users' (or groups') outbound TCP
//! is captured
//! (never the agent's, which runs as root, nor anyone else's, nor traffic
//! to the VM itself), and inbound only on the ports the token granted
//! (never SSH: 22 is never captured, and no other port is touched). The
//! rules are not saved anywhere, so a reboot starts without them. The agent
//! applies them once its listeners are bound, puts them back if something
//! flushes them, and removes them when it stops; after a crash the unit's
//! `ExecStopPost=mesh-vm-agent capture remove` removes them, and the next
//! start replaces whatever is left. So a dead agent never leaves the app's
//! ports pointing at nothing.

use std::time::Duration;

use mesh_proxy::init::{self, HostRules, SSH_PORT};

use crate::dns::MESH_ADDRESS;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

/// How often the rules are checked for drift (a firewall reload flushes
/// them) and put back.
pub const CHECK_PERIOD: Duration = Duration::from_secs(10);

/// Transparent capture, as `join --capture-user`/`--capture-group` set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// The users the app runs as: their outbound TCP goes to the proxy.
    #[serde(default)]
    pub app_uids: Vec<u32>,
    /// Or its groups: the outbound TCP of any process with one of them as
    /// its group.
    #[serde(default)]
    pub app_gids: Vec<u32>,
    /// Granted ports whose inbound traffic reaches the app directly.
    #[serde(default)]
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly (22 always).
    #[serde(default)]
    pub skip_outbound_ports: Vec<u16>,
}

/// More app users than this is refused: one rule each.
const MAX_APP_UIDS: usize = 64;
const MAX_SKIP_PORTS: usize = 256;

impl CaptureConfig {
    /// Refuses what would capture the agent itself or miss the proxy.
    pub fn check(&self, config: &AgentConfig) -> Result<(), String> {
        if self.app_uids.is_empty() && self.app_gids.is_empty() {
            return Err(
                "capture.app_uids and app_gids are empty: name the app's users with --capture-user (or groups with --capture-group)"
                    .into(),
            );
        }
        if self.app_uids.len() + self.app_gids.len() > MAX_APP_UIDS {
            return Err(format!(
                "capture: more than {MAX_APP_UIDS} users and groups"
            ));
        }
        if self.app_uids.contains(&0) || self.app_gids.contains(&0) {
            return Err(
                "capture: uid or gid 0 (root): the agent runs as root and its own traffic is never captured; run the app as another user or group"
                    .into(),
            );
        }
        if self.skip_inbound_ports.len() + self.skip_outbound_ports.len() > MAX_SKIP_PORTS {
            return Err(format!("capture: more than {MAX_SKIP_PORTS} skipped ports"));
        }
        // iptables REDIRECT sends locally made connections to 127.0.0.1 and
        // arriving ones to the receiving interface's address.
        let out = config.outbound_addr.ip();
        if !(out.is_unspecified() || out == std::net::Ipv4Addr::LOCALHOST) {
            return Err(format!(
                "outbound_addr {}: with transparent capture the outbound listener must be on 127.0.0.1 (where iptables redirects); join with --outbound-addr 127.0.0.1:{}",
                config.outbound_addr,
                config.outbound_addr.port()
            ));
        }
        let inbound = config.inbound_addr.ip();
        if !(inbound.is_unspecified() || inbound == config.address) {
            return Err(format!(
                "inbound_addr {}: with transparent capture the inbound listener must be on 0.0.0.0 or {} (where iptables redirects)",
                config.inbound_addr, config.address
            ));
        }
        let proxy_ports = [
            config.inbound_addr.port(),
            config.outbound_addr.port(),
            config.admin_addr.port(),
        ];
        if let Some(p) = config.ports.iter().find(|p| proxy_ports.contains(p)) {
            return Err(format!(
                "port {p} is both an app port and one of the proxy's; capture would loop"
            ));
        }
        Ok(())
    }

    /// The rules for this VM.
    pub fn rules(&self, config: &AgentConfig) -> HostRules {
        HostRules {
            inbound_port: config.inbound_addr.port(),
            outbound_port: config.outbound_addr.port(),
            app_uids: self.app_uids.clone(),
            app_gids: self.app_gids.clone(),
            inbound_ports: config
                .ports
                .iter()
                .copied()
                .filter(|p| *p != SSH_PORT && !self.skip_inbound_ports.contains(p))
                .collect(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
        }
    }
}

/// Removes the rules (and any left by an earlier run), then applies them,
/// with a route for the address mesh names resolve to where there is none.
pub fn apply(rules: &HostRules) -> Result<(), String> {
    let ipv6 = init::ipv6_enabled();
    init::remove_with(&init::here, ipv6).map_err(|e| e.to_string())?;
    ensure_route()?;
    rules
        .apply_with(&init::here, ipv6)
        .map_err(|e| e.to_string())
}

/// Removes the rules and the route `apply` added; what is gone already is
/// fine.
pub fn remove() -> Result<(), String> {
    init::remove_with(&init::here, init::ipv6_enabled()).map_err(|e| e.to_string())?;
    remove_route()
}

/// `ip -4 route <args>`.
fn ip_route(args: &[&str]) -> Result<std::process::Output, String> {
    std::process::Command::new("ip")
        .args(["-4", "route"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` ({e}); install iproute2"))
}

/// iptables sees a connection only once it is routed: on a VM whose only
/// route is to the gateway, the address mesh names resolve to has none and
/// `connect` fails at once. Then it is routed to `lo`, where the capture
/// rules redirect the app's connections; anyone else's go nowhere, as
/// before.
fn ensure_route() -> Result<(), String> {
    let addr = MESH_ADDRESS.to_string();
    if ip_route(&["get", &addr])?.status.success() {
        return Ok(());
    }
    let out = ip_route(&["add", &format!("{addr}/32"), "dev", "lo"])?;
    if !out.status.success() {
        return Err(format!(
            "`ip route add {addr}/32 dev lo` failed: {}; mesh names would not reach the proxy",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    tracing::info!(%addr, "no route to the mesh names' address; routed it to lo");
    Ok(())
}

/// Removes the route [`ensure_route`] adds (only that one: to `lo`).
fn remove_route() -> Result<(), String> {
    let addr = format!("{MESH_ADDRESS}/32");
    let shown = ip_route(&["show", &addr])?;
    if String::from_utf8_lossy(&shown.stdout).contains("dev lo") {
        let out = ip_route(&["del", &addr, "dev", "lo"])?;
        if !out.status.success() {
            return Err(format!(
                "`ip route del {addr} dev lo` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Whether the rules are in place as `rules` says.
pub fn check(rules: &HostRules) -> Result<(), String> {
    rules.check_with(&init::here, init::ipv6_enabled())
}

#[derive(Clone, Debug, Default)]
pub struct CaptureMetrics {
    /// 1 while the rules are in place.
    pub applied: Gauge,
    /// Rules found missing or changed and put back.
    pub repaired: Counter,
}

impl CaptureMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_vm_agent_capture_applied",
            "1 while the transparent capture rules are in place",
            self.applied.clone(),
        );
        r.register(
            "mesh_vm_agent_capture_repairs",
            "Times the capture rules were found changed (a firewall reload) and put back",
            self.repaired.clone(),
        );
    }
}

/// Puts the rules back whenever they drift, until cancelled.
pub async fn keep(rules: HostRules, metrics: CaptureMetrics) {
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.tick().await;
    loop {
        tick.tick().await;
        let rules = rules.clone();
        let checked = tokio::task::spawn_blocking(move || {
            check(&rules).map_err(|drift| (drift, apply(&rules)))
        })
        .await;
        match checked {
            Ok(Ok(())) => {
                metrics.applied.set(1);
            }
            Ok(Err((drift, Ok(())))) => {
                metrics.repaired.inc();
                let _ = metrics.applied.set(1);
                tracing::warn!(%drift, "capture rules had changed; put back");
            }
            Ok(Err((drift, Err(e)))) => {
                let _ = metrics.applied.set(0);
                tracing::error!(%drift, "capture rules changed and could not be put back: {e}");
            }
            Err(e) => tracing::error!("capture check failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        crate::config::tests::sample()
    }

    #[test]
    fn the_agent_ssh_and_proxy_ports_are_never_captured() {
        let mut c = config();
        c.ports = vec![22, 5432, 8080];
        let capture = CaptureConfig {
            app_uids: vec![1001],
            app_gids: vec![],
            skip_inbound_ports: vec![8080],
            skip_outbound_ports: vec![],
        };
        capture.check(&c).unwrap();
        let rules = capture.rules(&c);
        assert_eq!(rules.inbound_ports, vec![5432], "not SSH, not the skipped");
        assert_eq!(rules.app_uids, vec![1001]);

        let root = CaptureConfig {
            app_uids: vec![1001, 0],
            ..capture.clone()
        };
        assert!(root.check(&c).unwrap_err().contains("root"));
        let root_group = CaptureConfig {
            app_gids: vec![0],
            ..capture.clone()
        };
        assert!(root_group.check(&c).unwrap_err().contains("root"));
        let nobody = CaptureConfig {
            app_uids: vec![],
            ..capture.clone()
        };
        assert!(nobody.check(&c).unwrap_err().contains("--capture-user"));

        let mut looped = c.clone();
        looped.ports = vec![4143];
        assert!(capture.check(&looped).unwrap_err().contains("loop"));
        let mut elsewhere = c.clone();
        elsewhere.outbound_addr = "127.0.0.2:4140".parse().unwrap();
        assert!(
            capture
                .check(&elsewhere)
                .unwrap_err()
                .contains("--outbound-addr 127.0.0.1:4140")
        );
    }
}
