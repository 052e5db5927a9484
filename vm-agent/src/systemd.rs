//! The systemd unit that runs the agent, and the `systemctl` calls `join`
//! and `leave` make.
//!
//! The unit is rendered from (section, key, value) entries; a value with a
//! newline or a control character is refused, so nothing in it can add a
//! directive. Hardening: no new privileges, a read-only system, private
//! /tmp, no home directories, and only the capabilities traffic capture and
//! a DNS listener need.

use std::{fmt::Write as _, path::Path, process::Command};

/// The unit's name.
pub const UNIT: &str = "mesh-vm-agent.service";
/// Where `join` writes the unit when the package did not install one.
pub const UNIT_PATH: &str = "/etc/systemd/system/mesh-vm-agent.service";
/// The systemd-resolved drop-in `join` writes for mesh names.
pub const RESOLVED_DROPIN: &str = "/etc/systemd/resolved.conf.d/mesh.conf";
/// Where the `.deb` installs it.
pub const PACKAGED_UNIT_PATH: &str = "/lib/systemd/system/mesh-vm-agent.service";

/// A unit file as ordered sections of key/value entries.
#[derive(Debug, Default)]
pub struct Unit {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl Unit {
    pub fn section(mut self, name: &str) -> Self {
        self.sections.push((name.to_owned(), Vec::new()));
        self
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        if let Some((_, entries)) = self.sections.last_mut() {
            entries.push((key.to_owned(), value.to_owned()));
        }
        self
    }

    /// The file's text; refuses values that could break out of their line.
    pub fn render(&self) -> Result<String, String> {
        let mut out = String::new();
        for (i, (name, entries)) in self.sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(out, "[{name}]");
            for (k, v) in entries {
                if v.chars().any(char::is_control) || k.chars().any(|c| !c.is_ascii_alphanumeric())
                {
                    return Err(format!("unit entry {k}={v:?} contains a control character"));
                }
                let _ = writeln!(out, "{k}={v}");
            }
        }
        Ok(out)
    }
}

/// The agent's unit, running `exe run --config <config>`.
pub fn agent_unit(exe: &Path, config: &Path) -> Result<String, String> {
    let quote = |p: &Path| -> Result<String, String> {
        let s = p.to_str().ok_or("paths must be UTF-8")?;
        if s.contains(['"', '\\', ' ', '%']) {
            return Err(format!(
                "{s:?}: paths with spaces, quotes, '%' or '\\' are not supported"
            ));
        }
        Ok(s.to_owned())
    };
    Unit::default()
        .section("Unit")
        .set(
            "Description",
            "Mesh VM agent (identity, proxy, health checks, Workload API)",
        )
        .set("Documentation", "https://github.com/mesh-rs/mesh#vms")
        .set("After", "network-online.target")
        .set("Wants", "network-online.target")
        .section("Service")
        .set(
            "ExecStart",
            &format!("{} run --config {}", quote(exe)?, quote(config)?),
        )
        // After every stop, crashes included: the capture rules go with the
        // agent, so the app's ports never point at a dead proxy.
        .set(
            "ExecStopPost",
            &format!("{} capture remove --config {}", quote(exe)?, quote(config)?),
        )
        .set("Restart", "always")
        .set("RestartSec", "2")
        .set("TimeoutStopSec", "45")
        .set("StateDirectory", "mesh")
        .set("StateDirectoryMode", "0700")
        .set("RuntimeDirectory", "mesh")
        .set("RuntimeDirectoryMode", "0755")
        .set("ConfigurationDirectory", "mesh")
        .set("UMask", "0077")
        .set("NoNewPrivileges", "yes")
        .set("ProtectSystem", "strict")
        // iptables-legacy's lock (iptables-nft takes none).
        .set("ReadWritePaths", "-/run/xtables.lock")
        .set("ProtectHome", "yes")
        .set("PrivateTmp", "yes")
        .set("PrivateDevices", "yes")
        .set("PrivateMounts", "yes")
        .set("ProtectKernelTunables", "yes")
        .set("ProtectProc", "invisible")
        .set("ProtectKernelModules", "yes")
        .set("ProtectKernelLogs", "yes")
        .set("ProtectControlGroups", "yes")
        .set("ProtectClock", "yes")
        .set("ProtectHostname", "yes")
        .set("RestrictNamespaces", "yes")
        .set("RestrictRealtime", "yes")
        .set("RestrictSUIDSGID", "yes")
        .set("LockPersonality", "yes")
        .set("MemoryDenyWriteExecute", "yes")
        .set("SystemCallArchitectures", "native")
        .set("SystemCallFilter", "@system-service")
        .set("SystemCallErrorNumber", "EPERM")
        .set(
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        )
        .set(
            "CapabilityBoundingSet",
            "CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        )
        .section("Install")
        .set("WantedBy", "multi-user.target")
        .render()
}

/// Whether systemd runs this machine (PID 1), as `sd_booted` tells.
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemctl <args>`, its failure named with its output.
pub fn systemctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_is_hardened_and_cannot_be_injected_into() {
        let unit = agent_unit(
            Path::new("/usr/bin/mesh-vm-agent"),
            Path::new("/etc/mesh/vm-agent.json"),
        )
        .unwrap();
        assert!(
            unit.contains(
                "ExecStart=/usr/bin/mesh-vm-agent run --config /etc/mesh/vm-agent.json\n"
            )
        );
        assert!(unit.contains(
            "ExecStopPost=/usr/bin/mesh-vm-agent capture remove --config /etc/mesh/vm-agent.json\n"
        ));
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=mesh",
        ] {
            assert!(unit.contains(line), "{line}");
        }
        assert!(
            agent_unit(
                Path::new("/usr/bin/x\nExecStartPre=/bin/evil"),
                Path::new("/c")
            )
            .is_err()
        );
        assert!(agent_unit(Path::new("/usr/bin/a b"), Path::new("/c")).is_err());
    }
}
