//! `mesh proxy init`: the iptables rules that make interception transparent.
//!
//! Inbound TCP arriving at the workload is redirected to the proxy's inbound
//! port; TCP the workload opens is redirected to the outbound port. The
//! proxy's own traffic (by user id) and chosen ports are left alone, so the
//! proxy never loops into itself. The rules live in two chains of the `nat`
//! table, `MESH_INBOUND` and `MESH_OUTBOUND`, for IPv4 (`iptables`) and,
//! where IPv6 is enabled, for IPv6 too (`ip6tables`): otherwise IPv6 TCP
//! would leave the workload without the proxy. Applying refuses when IPv6
//! is enabled and `ip6tables` cannot be used.

use std::process::{Command, Output};

pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
pub const OUTBOUND_CHAIN: &str = "MESH_OUTBOUND";
/// The tools the rules are applied with: IPv4, then IPv6.
pub const TOOLS: [&str; 2] = ["iptables", "ip6tables"];

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
    #[error("cannot run {tool} ({source}); install it (`apt-get install -y iptables`)")]
    Missing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "IPv6 is enabled here but `ip6tables` cannot be run ({0}): IPv6 traffic would bypass the proxy; install iptables (it brings ip6tables) or disable IPv6 (sysctl net.ipv6.conf.all.disable_ipv6=1)"
    )]
    Ipv6Unhandled(std::io::Error),
    #[error("`{tool} {command}` failed: {stderr}; applying rules needs root (CAP_NET_ADMIN)")]
    Failed {
        tool: &'static str,
        command: String,
        stderr: String,
    },
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

    /// The rules as a shell script, for IPv4 and IPv6 (skip the
    /// `ip6tables` lines where IPv6 is disabled).
    pub fn script(&self) -> String {
        script_of(&self.commands())
    }

    /// Applies the rules with `iptables`, and with `ip6tables` when IPv6 is
    /// enabled. Refuses to apply twice; stops at the first failing command.
    pub fn apply(&self) -> Result<(), InitError> {
        self.apply_with(&here, ipv6_enabled())
    }

    /// [`Self::apply`] through `run` (e.g. inside a pod's network
    /// namespace), for IPv6 too when `ipv6`.
    pub fn apply_with(&self, run: Run<'_>, ipv6: bool) -> Result<(), InitError> {
        apply_commands(&self.commands(), run, ipv6)
    }

    /// Checks that the rules are there as [`Self::commands`] says, and
    /// nothing else in their chains: `Err` describes the drift.
    pub fn check_with(&self, run: Run<'_>, ipv6: bool) -> Result<(), String> {
        check_commands(&self.commands(), run, ipv6)
    }
}

/// Capture on a host the app shares with other software (a VM): only the
/// app's users' outbound TCP goes to the proxy, and only the listed inbound
/// ports; SSH, the agent (it runs as another user), other users and every
/// other port are left alone. Outbound traffic to the host's own addresses
/// is never captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRules {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// The users whose outbound TCP is captured.
    pub app_uids: Vec<u32>,
    /// And the groups (the app may run as any user with one of them).
    pub app_gids: Vec<u32>,
    /// Inbound destination ports redirected to the proxy (the app's).
    pub inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured.
    pub skip_outbound_ports: Vec<u16>,
}

/// SSH: never captured, in either direction.
pub const SSH_PORT: u16 = 22;

impl HostRules {
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
        add(&["-N", INBOUND_CHAIN]);
        for port in self.inbound_ports.iter().filter(|p| **p != SSH_PORT) {
            let port = port.to_string();
            add(&[
                "-A",
                INBOUND_CHAIN,
                "-p",
                "tcp",
                "--dport",
                &port,
                "-j",
                "REDIRECT",
                "--to-ports",
                &inbound,
            ]);
        }
        add(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);

        add(&["-N", OUTBOUND_CHAIN]);
        add(&[
            "-A",
            OUTBOUND_CHAIN,
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            "RETURN",
        ]);
        let mut skip: Vec<u16> = std::iter::once(SSH_PORT)
            .chain(self.skip_outbound_ports.iter().copied())
            .collect();
        skip.sort_unstable();
        skip.dedup();
        for port in skip {
            let port = port.to_string();
            add(&[
                "-A",
                OUTBOUND_CHAIN,
                "-p",
                "tcp",
                "--dport",
                &port,
                "-j",
                "RETURN",
            ]);
        }
        let owners = (self.app_uids.iter().map(|u| ("--uid-owner", u)))
            .chain(self.app_gids.iter().map(|g| ("--gid-owner", g)));
        for (flag, id) in owners {
            let id = id.to_string();
            add(&[
                "-A",
                OUTBOUND_CHAIN,
                "-p",
                "tcp",
                "-m",
                "owner",
                flag,
                &id,
                "-j",
                "REDIRECT",
                "--to-ports",
                &outbound,
            ]);
        }
        add(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN]);
        out
    }

    /// The rules as a shell script, for IPv4 and IPv6.
    pub fn script(&self) -> String {
        script_of(&self.commands())
    }

    /// Applies the rules, for IPv6 too when `ipv6`; refuses to apply twice.
    pub fn apply_with(&self, run: Run<'_>, ipv6: bool) -> Result<(), InitError> {
        apply_commands(&self.commands(), run, ipv6)
    }

    /// Checks that the rules are there and nothing else in their chains.
    pub fn check_with(&self, run: Run<'_>, ipv6: bool) -> Result<(), String> {
        check_commands(&self.commands(), run, ipv6)
    }
}

fn script_of(commands: &[Vec<String>]) -> String {
    TOOLS
        .iter()
        .flat_map(|tool| {
            commands
                .iter()
                .map(move |c| format!("{tool} {}\n", c.join(" ")))
        })
        .collect()
}

fn apply_commands(commands: &[Vec<String>], run: Run<'_>, ipv6: bool) -> Result<(), InitError> {
    let tools: &[&'static str] = if ipv6 { &TOOLS } else { &TOOLS[..1] };
    for &tool in tools {
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let args = ["-t", "nat", "-L", chain, "-n"].map(str::to_owned);
            let exists = run(tool, &args).map_err(|source| match tool {
                "ip6tables" => InitError::Ipv6Unhandled(source),
                _ => InitError::Missing { tool, source },
            })?;
            if exists.status.success() {
                return Err(InitError::AlreadyApplied(chain));
            }
        }
    }
    for &tool in tools {
        for args in commands {
            must(run, tool, args)?;
        }
    }
    Ok(())
}

fn check_commands(commands: &[Vec<String>], run: Run<'_>, ipv6: bool) -> Result<(), String> {
    let tools: &[&'static str] = if ipv6 { &TOOLS } else { &TOOLS[..1] };
    for &tool in tools {
        let mut expected = std::collections::HashMap::<String, usize>::new();
        for args in commands {
            // `-t nat -A CHAIN spec...` -> `-t nat -C CHAIN spec...`
            if args.get(2).is_none_or(|a| a != "-A") {
                continue;
            }
            let mut args = args.clone();
            args[2] = "-C".to_owned();
            *expected.entry(args[3].clone()).or_default() += 1;
            let out = run(tool, &args).map_err(|e| format!("cannot run {tool}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{tool}: rule missing: {}", args[3..].join(" ")));
            }
        }
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let args = ["-t", "nat", "-S", chain].map(str::to_owned);
            let out = run(tool, &args).map_err(|e| format!("cannot run {tool}: {e}"))?;
            let rules = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count();
            let want = expected.get(chain).copied().unwrap_or(0);
            if rules != want {
                return Err(format!(
                    "{tool}: chain {chain} holds {rules} rules; expected {want}"
                ));
            }
        }
    }
    Ok(())
}

/// Runs `tool` with `args` and returns its output.
pub type Run<'a> = &'a dyn Fn(&'static str, &[String]) -> std::io::Result<Output>;

/// Runs the tool in this process's network namespace.
pub fn here(tool: &'static str, args: &[String]) -> std::io::Result<Output> {
    Command::new(tool).args(args).output()
}

fn must(run: Run<'_>, tool: &'static str, args: &[String]) -> Result<(), InitError> {
    let out = run(tool, args).map_err(|source| InitError::Missing { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            tool,
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes the rules (the jumps, then the chains); what is already gone is
/// fine, so this may run any number of times.
pub fn remove_with(run: Run<'_>, ipv6: bool) -> Result<(), InitError> {
    let tools: &[&'static str] = if ipv6 { &TOOLS } else { &TOOLS[..1] };
    for &tool in tools {
        for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
            let jump = ["-t", "nat", "-D", hook, "-p", "tcp", "-j", chain].map(str::to_owned);
            // Deleted until none is left.
            while run(tool, &jump)
                .map_err(|source| InitError::Missing { tool, source })?
                .status
                .success()
            {}
            let exists = ["-t", "nat", "-L", chain, "-n"].map(str::to_owned);
            if run(tool, &exists)
                .map_err(|source| InitError::Missing { tool, source })?
                .status
                .success()
            {
                must(run, tool, &["-t", "nat", "-F", chain].map(str::to_owned))?;
                must(run, tool, &["-t", "nat", "-X", chain].map(str::to_owned))?;
            }
        }
    }
    Ok(())
}

/// Whether this network namespace has IPv6 (the kernel's own switch).
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
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
        let script = rules.script();
        let (v4, v6) = script.split_at(script.find("ip6tables").unwrap());
        assert_eq!(
            v6,
            v4.replace("iptables", "ip6tables"),
            "the same rules for IPv6"
        );
        assert_eq!(
            v4,
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

    #[test]
    fn host_rules_capture_only_the_app_users_and_ports_never_ssh() {
        let rules = HostRules {
            inbound_port: 4143,
            outbound_port: 4140,
            app_uids: vec![1001, 1002],
            app_gids: vec![1337],
            inbound_ports: vec![5432, 22],
            skip_outbound_ports: vec![25, 22],
        };
        let script = rules.script();
        let (v4, v6) = script.split_at(script.find("ip6tables").unwrap());
        assert_eq!(v6, v4.replace("iptables", "ip6tables"));
        assert_eq!(
            v4,
            "iptables -t nat -N MESH_INBOUND\n\
             iptables -t nat -A MESH_INBOUND -p tcp --dport 5432 -j REDIRECT --to-ports 4143\n\
             iptables -t nat -A PREROUTING -p tcp -j MESH_INBOUND\n\
             iptables -t nat -N MESH_OUTBOUND\n\
             iptables -t nat -A MESH_OUTBOUND -m addrtype --dst-type LOCAL -j RETURN\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp --dport 22 -j RETURN\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp --dport 25 -j RETURN\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp -m owner --uid-owner 1001 -j REDIRECT --to-ports 4140\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp -m owner --uid-owner 1002 -j REDIRECT --to-ports 4140\n\
             iptables -t nat -A MESH_OUTBOUND -p tcp -m owner --gid-owner 1337 -j REDIRECT --to-ports 4140\n\
             iptables -t nat -A OUTPUT -p tcp -j MESH_OUTBOUND\n",
            "22 is never redirected inbound, always skipped outbound; nothing but the app's users"
        );
    }
}
