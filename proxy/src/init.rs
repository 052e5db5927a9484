//! `mesh proxy init`: the iptables rules that make interception transparent.
//!
//! Inbound TCP arriving at the workload is redirected to the proxy's inbound
//! port; TCP the workload opens is redirected to the outbound port. The
//! proxy's own traffic (by user id) and chosen ports are left alone, so the
//! proxy never loops into itself. The rules live in two chains of the `nat`
//! table, `MESH_INBOUND` and `MESH_OUTBOUND`.

use std::process::Command;

pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
pub const OUTBOUND_CHAIN: &str = "MESH_OUTBOUND";

/// What to redirect where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Who the proxy runs as; its traffic is never redirected.
    pub proxy: ProxyOwner,
    /// Inbound ports that reach the workload directly (e.g. the admin port).
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    pub skip_outbound_ports: Vec<u16>,
}

/// How the proxy's own connections are told apart from the workload's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyOwner {
    /// The proxy runs as this user id; the workload as any other.
    Uid(u32),
    /// The proxy runs with this group id; the workload with another (it may
    /// share the user, e.g. both root).
    Gid(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run iptables ({0}); install it (`apt-get install -y iptables`)")]
    Missing(std::io::Error),
    #[error("`iptables {command}` failed: {stderr}; applying rules needs root (CAP_NET_ADMIN)")]
    Failed { command: String, stderr: String },
    #[error(
        "the {0} chain already exists: the rules are already applied; remove them with `iptables -t nat -F {0}` and `-X {0}` after unlinking it"
    )]
    AlreadyApplied(&'static str),
}

impl Rules {
    /// The iptables argument lists, in order.
    pub fn commands(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut add = |args: &[&str]| {
            let mut cmd = vec!["-t".to_owned(), "nat".to_owned()];
            cmd.extend(args.iter().map(|a| (*a).to_owned()));
            out.push(cmd);
        };
        let inbound = self.inbound_port.to_string();
        let outbound = self.outbound_port.to_string();
        let (owner_flag, owner) = match self.proxy {
            ProxyOwner::Uid(uid) => ("--uid-owner", uid.to_string()),
            ProxyOwner::Gid(gid) => ("--gid-owner", gid.to_string()),
        };

        let skip = |chain: &str, port: &u16| {
            [
                "-A",
                chain,
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "RETURN",
            ]
            .map(str::to_owned)
        };
        add(&["-N", INBOUND_CHAIN]);
        for port in &self.skip_inbound_ports {
            add(&skip(INBOUND_CHAIN, port).each_ref().map(String::as_str));
        }
        add(&[
            "-A",
            INBOUND_CHAIN,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound,
        ]);
        add(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);

        add(&["-N", OUTBOUND_CHAIN]);
        add(&[
            "-A",
            OUTBOUND_CHAIN,
            "-m",
            "owner",
            owner_flag,
            &owner,
            "-j",
            "RETURN",
        ]);
        for port in &self.skip_outbound_ports {
            add(&skip(OUTBOUND_CHAIN, port).each_ref().map(String::as_str));
        }
        add(&[
            "-A",
            OUTBOUND_CHAIN,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &outbound,
        ]);
        add(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN]);
        out
    }

    /// The rules as a shell script.
    pub fn script(&self) -> String {
        self.commands()
            .iter()
            .map(|c| format!("iptables {}\n", c.join(" ")))
            .collect()
    }

    /// Applies the rules with the `iptables` command. Refuses to apply
    /// twice; stops at the first failing command.
    pub fn apply(&self) -> Result<(), InitError> {
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let exists = Command::new("iptables")
                .args(["-t", "nat", "-L", chain, "-n"])
                .output()
                .map_err(InitError::Missing)?;
            if exists.status.success() {
                return Err(InitError::AlreadyApplied(chain));
            }
        }
        for args in self.commands() {
            let out = Command::new("iptables")
                .args(&args)
                .output()
                .map_err(InitError::Missing)?;
            if !out.status.success() {
                return Err(InitError::Failed {
                    command: args.join(" "),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_the_proxy_and_chosen_ports() {
        let rules = Rules {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy: ProxyOwner::Uid(2102),
            skip_inbound_ports: vec![4191],
            skip_outbound_ports: vec![443],
        };
        assert_eq!(
            rules.script(),
            "iptables -t nat -N MESH_INBOUND\n\
             iptables -t nat -A MESH_INBOUND -p tcp --dport 4191 -j RETURN\n\
             iptables -t nat -A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143\n\
             iptables -t nat -A PREROUTING -p tcp -j MESH_INBOUND\n\
             iptables -t nat -N MESH_OUTBOUND\n\
             iptables -t nat -A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp --dport 443 -j RETURN\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140\n\
             iptables -t nat -A OUTPUT -p tcp -j MESH_OUTBOUND\n"
        );
    }

    #[test]
    fn the_proxy_may_be_told_apart_by_group() {
        let rules = Rules {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy: ProxyOwner::Gid(0),
            skip_inbound_ports: vec![],
            skip_outbound_ports: vec![],
        };
        assert!(
            rules
                .script()
                .contains("iptables -t nat -A MESH_OUTBOUND -m owner --gid-owner 0 -j RETURN\n")
        );
    }
}
