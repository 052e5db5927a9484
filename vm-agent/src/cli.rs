//! `mesh-vm-agent join | run | leave | status` (also `mesh vm ...`).

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Subcommand};

use crate::{
    config::{
        AgentConfig, DEFAULT_CONFIG, DEFAULT_STATE_DIR, DEFAULT_WORKLOAD_SOCKET, WorkloadApiConfig,
    },
    health::{Check, HealthConfig},
    join::{JoinOptions, join},
    join_string::JoinString,
    systemd,
};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Join this VM to a cluster with the line `mesh vm token create` printed:
    /// checks the cluster's pinned trust bundle, gets the VM's SPIFFE
    /// identity, writes its config and keys, and starts the systemd unit.
    Join(Box<JoinArgs>),
    /// Run the agent (what the systemd unit runs).
    Run(ConfigArg),
    /// Leave the mesh: stop and remove the unit, deregister, delete the
    /// config and keys.
    Leave(LeaveArgs),
    /// Show what this VM joined as and whether its agent is ready.
    Status(ConfigArg),
    /// Print the systemd unit that runs the agent (what `join` installs and
    /// the .deb ships).
    Unit(UnitArgs),
    /// Transparent capture: show the rules and whether they are in place,
    /// or remove them (the unit does after the agent stops, crashes
    /// included).
    #[command(subcommand)]
    Capture(CaptureCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Print the iptables rules this VM's config gives and whether they are
    /// in place.
    Show(ConfigArg),
    /// Remove the rules (nothing to do is fine).
    Remove(ConfigArg),
}

#[derive(Debug, Args)]
pub struct UnitArgs {
    /// The agent's binary as the unit runs it.
    #[arg(long, default_value = "/usr/bin/mesh-vm-agent")]
    pub exe: PathBuf,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The agent's config, written by `join`.
    #[arg(long, env = "MESH_VM_AGENT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join string (`mesh-vm1.…`) from `mesh vm token create`.
    pub join_string: String,
    /// Write the config and keys only; do not install or start the unit.
    #[arg(long)]
    pub no_systemd: bool,
    /// Join again although this VM already joined (replaces its identity).
    #[arg(long)]
    pub force: bool,
    /// Where the config goes.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where keys and certificates go (0700; files 0600).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The address other workloads reach this VM at [default: this VM's
    /// address on the route to the control plane].
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Where the app listens.
    #[arg(long, default_value = "127.0.0.1")]
    pub app_ip: IpAddr,
    /// The proxy's inbound listener (mTLS from other proxies).
    #[arg(long, default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// The proxy's outbound listener (`HTTP_PROXY=http://127.0.0.1:4140`).
    #[arg(long, default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/live` (loopback only).
    #[arg(long, default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Health check: GET this URL, 200-399 is healthy (e.g.
    /// http://127.0.0.1:8080/healthz).
    #[arg(long, group = "check")]
    pub health_http: Option<String>,
    /// Health check: a TCP connection to this address is accepted.
    #[arg(long, group = "check")]
    pub health_tcp: Option<SocketAddr>,
    /// Health check: this program exits 0 (split on spaces; no shell).
    #[arg(long, group = "check")]
    pub health_command: Option<String>,
    /// How often the check runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub health_period: Duration,
    /// How long one check may take.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,
    /// Failures in a row that make the app unhealthy.
    #[arg(long, default_value_t = 3)]
    pub health_failure_threshold: u32,
    /// Successes in a row that make it healthy again.
    #[arg(long, default_value_t = 1)]
    pub health_success_threshold: u32,
    /// The Workload API socket.
    #[arg(long, default_value = DEFAULT_WORKLOAD_SOCKET)]
    pub workload_api_socket: PathBuf,
    /// Serve DNS for mesh names here (UDP, loopback), forwarding other names
    /// to the VM's resolvers.
    #[arg(long, default_value = crate::dns::DEFAULT_ADDR)]
    pub dns_addr: SocketAddr,
    /// Do not serve DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Names under `svc.<this>` are the mesh's.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Unix uids allowed to fetch the identity from the Workload API
    /// (repeat or comma separate); without: nobody.
    #[arg(long, value_delimiter = ',')]
    pub workload_api_uid: Vec<u32>,
    /// Capture this user's traffic transparently (a name or uid; repeat or
    /// comma separate): its outbound TCP goes through the proxy and inbound
    /// TCP to the granted ports through the inbound proxy, with iptables.
    /// Without: explicit mode (`HTTP_PROXY`) only.
    #[arg(long, value_delimiter = ',')]
    pub capture_user: Vec<String>,
    /// Capture the traffic of processes running with this group (a name or
    /// gid; repeat or comma separate), whatever their user.
    #[arg(long, value_delimiter = ',')]
    pub capture_group: Vec<String>,
    /// With capture: granted ports whose inbound traffic is not captured.
    #[arg(long, value_delimiter = ',')]
    pub capture_skip_inbound_ports: Vec<u16>,
    /// With capture: destination ports the app reaches directly (22, SSH,
    /// always).
    #[arg(long, value_delimiter = ',')]
    pub capture_skip_outbound_ports: Vec<u16>,
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Do not touch systemd (the agent was joined with --no-systemd).
    #[arg(long)]
    pub no_systemd: bool,
}

impl JoinArgs {
    fn health(&self) -> Option<HealthConfig> {
        let check = if let Some(url) = &self.health_http {
            Check::Http(url.clone())
        } else if let Some(addr) = self.health_tcp {
            Check::Tcp(addr)
        } else if let Some(cmd) = &self.health_command {
            Check::Command(cmd.split_whitespace().map(str::to_owned).collect())
        } else {
            return None;
        };
        Some(HealthConfig {
            check,
            period: self.health_period,
            timeout: self.health_timeout,
            success_threshold: self.health_success_threshold,
            failure_threshold: self.health_failure_threshold,
        })
    }
}

/// Runs one agent command.
pub fn main(command: AgentCommand) -> ExitCode {
    let result = match command {
        AgentCommand::Run(args) => run(&args.config),
        AgentCommand::Join(args) => runtime().and_then(|rt| rt.block_on(join_cmd(*args))),
        AgentCommand::Leave(args) => leave(&args),
        AgentCommand::Status(args) => status(&args.config),
        AgentCommand::Unit(args) => systemd::agent_unit(&args.exe, &args.config.config)
            .map_err(anyhow::Error::msg)
            .and_then(|unit| Ok(std::io::stdout().lock().write_all(unit.as_bytes())?)),
        AgentCommand::Capture(CaptureCommand::Show(args)) => capture_show(&args.config),
        AgentCommand::Capture(CaptureCommand::Remove(args)) => capture_remove(&args.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(mesh_core::shutdown::runtime_with(1)?)
}

fn run(config: &Path) -> anyhow::Result<()> {
    runtime()?.block_on(crate::agent::run(config))
}

async fn join_cmd(args: JoinArgs) -> anyhow::Result<()> {
    let js = JoinString::decode(&args.join_string)?;
    let health = args.health();
    if let Some(h) = &health {
        h.check().map_err(anyhow::Error::msg)?;
    }
    let capture = if args.capture_user.is_empty() && args.capture_group.is_empty() {
        if !(args.capture_skip_inbound_ports.is_empty()
            && args.capture_skip_outbound_ports.is_empty())
        {
            anyhow::bail!(
                "--capture-skip-*-ports need capture: add --capture-user (or --capture-group)"
            );
        }
        None
    } else {
        Some(crate::capture::CaptureConfig {
            app_uids: args
                .capture_user
                .iter()
                .map(|u| uid_of(u))
                .collect::<anyhow::Result<_>>()?,
            app_gids: args
                .capture_group
                .iter()
                .map(|g| gid_of(g))
                .collect::<anyhow::Result<_>>()?,
            skip_inbound_ports: args.capture_skip_inbound_ports.clone(),
            skip_outbound_ports: args.capture_skip_outbound_ports.clone(),
        })
    };
    let opts = JoinOptions {
        config_path: args.config.clone(),
        state_dir: args.state_dir.clone(),
        address: args.address,
        app_ip: args.app_ip,
        inbound_addr: args.inbound_addr,
        outbound_addr: args.outbound_addr,
        admin_addr: args.admin_addr,
        health,
        workload_api: WorkloadApiConfig {
            socket: args.workload_api_socket.clone(),
            allowed_uids: args.workload_api_uid.clone(),
        },
        dns: (!args.no_dns).then(|| crate::config::DnsConfig {
            listen: args.dns_addr,
            cluster_domain: args.cluster_domain.clone(),
        }),
        capture,
        force: args.force,
    };
    if !args.no_systemd && !systemd::booted() {
        anyhow::bail!(
            "systemd is not running on this machine; join with --no-systemd and start `mesh-vm-agent run --config {}` yourself",
            args.config.display()
        );
    }
    eprintln!(
        "joining cluster {} as {}/{} (spiffe://{}/ns/{}/sa/{}) through {}",
        js.cluster,
        js.namespace,
        js.workload,
        js.trust_domain,
        js.namespace,
        js.service_account,
        js.identity_addr
    );
    let joined = join(&js, &opts).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "trust bundle of {} verified against the pin",
        js.trust_domain
    )?;
    writeln!(
        out,
        "identity {} issued, valid until {}",
        joined.identity,
        rfc3339(joined.not_after)
    )?;
    for f in &joined.files {
        writeln!(out, "wrote {} (0600)", f.display())?;
    }
    writeln!(
        out,
        "registers as {}/{} at {} with ports {:?} and labels {:?}",
        joined.config.namespace,
        joined.config.workload,
        joined.config.address,
        joined.config.ports,
        joined.config.labels
    )?;
    if let (true, Some(dns)) = (args.no_systemd, &joined.config.dns) {
        writeln!(
            out,
            "DNS for mesh names will be served on {} (not wired into the resolver: --no-systemd)",
            dns.listen
        )?;
    }
    if args.no_systemd {
        writeln!(
            out,
            "systemd left alone (--no-systemd): start the agent with `mesh-vm-agent run --config {}`",
            args.config.display()
        )?;
        return Ok(());
    }
    let unit_path = Path::new(systemd::PACKAGED_UNIT_PATH);
    if unit_path.exists() && args.config == Path::new(DEFAULT_CONFIG) {
        writeln!(out, "using the packaged unit {}", unit_path.display())?;
    } else {
        let exe = std::env::current_exe()?;
        let unit = systemd::agent_unit(&exe, &args.config).map_err(anyhow::Error::msg)?;
        mesh_core::identity::files::write_public(Path::new(systemd::UNIT_PATH), unit.as_bytes())?;
        writeln!(out, "wrote {}", systemd::UNIT_PATH)?;
    }
    if let Some(dns) = &joined.config.dns {
        wire_dns(&mut out, dns)?;
    }
    systemd::systemctl(&["daemon-reload"]).map_err(anyhow::Error::msg)?;
    systemd::systemctl(&["enable", systemd::UNIT]).map_err(anyhow::Error::msg)?;
    // A rejoin replaces the identity the running agent holds.
    systemd::systemctl(&["restart", systemd::UNIT]).map_err(anyhow::Error::msg)?;
    writeln!(out, "started and enabled {}", systemd::UNIT)?;
    match &joined.config.capture {
        Some(c) => writeln!(
            out,
            "apps: traffic of uids {:?} and gids {:?} is captured while the agent runs (`mesh-vm-agent capture show`); SPIFFE_ENDPOINT_SOCKET=unix://{} for the identity",
            c.app_uids,
            c.app_gids,
            joined.config.workload_api.socket.display()
        )?,
        None => writeln!(
            out,
            "apps: HTTP_PROXY=http://{} for mesh calls; SPIFFE_ENDPOINT_SOCKET=unix://{} for the identity",
            joined.config.outbound_addr,
            joined.config.workload_api.socket.display()
        )?,
    }
    Ok(())
}

/// A user name or uid as the system knows it (`id -u`, so NSS users
/// resolve too).
fn uid_of(user: &str) -> anyhow::Result<u32> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    if user.is_empty() || user.len() > 256 || user.starts_with('-') {
        anyhow::bail!("--capture-user {user:?} is not a user name or uid");
    }
    let out = std::process::Command::new("id")
        .args(["-u", "--", user])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `id` to look up user {user:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "--capture-user {user:?}: no such user on this machine ({}); create it or give a uid",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("`id -u {user}` did not print a uid: {e}"))
}

/// A group name or gid as the system knows it (`getent group`).
fn gid_of(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    if group.is_empty() || group.len() > 256 || group.starts_with('-') {
        anyhow::bail!("--capture-group {group:?} is not a group name or gid");
    }
    let out = std::process::Command::new("getent")
        .args(["group", "--", group])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `getent` to look up group {group:?}: {e}"))?;
    // `name:password:gid:members`
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    match line.trim().split(':').nth(2).map(str::parse::<u32>) {
        Some(Ok(gid)) if out.status.success() => Ok(gid),
        _ => anyhow::bail!(
            "--capture-group {group:?}: no such group on this machine; create it or give a gid"
        ),
    }
}

fn capture_show(path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(path)?;
    let mut out = std::io::stdout().lock();
    let Some(capture) = &config.capture else {
        writeln!(
            out,
            "transparent capture is not configured (explicit mode: HTTP_PROXY=http://{}); join with --capture-user to turn it on",
            config.outbound_addr
        )?;
        return Ok(());
    };
    let rules = capture.rules(&config);
    write!(out, "{}", rules.script())?;
    match crate::capture::check(&rules) {
        Ok(()) => writeln!(out, "# in place")?,
        Err(why) => writeln!(out, "# not in place: {why}")?,
    }
    Ok(())
}

fn capture_remove(path: &Path) -> anyhow::Result<()> {
    match AgentConfig::load(path) {
        Ok(config) if config.capture.is_none() => {
            writeln!(
                std::io::stdout().lock(),
                "transparent capture is not configured; nothing to remove"
            )?;
            return Ok(());
        }
        Ok(_) => {}
        // The removal needs nothing from the file.
        Err(e) => eprintln!("warning: {e}; removing the rules anyway"),
    }
    crate::capture::remove().map_err(anyhow::Error::msg)?;
    writeln!(
        std::io::stdout().lock(),
        "capture rules removed (iptables chains MESH_INBOUND, MESH_OUTBOUND, and the route to {} the agent added, if any)",
        crate::dns::MESH_ADDRESS
    )?;
    Ok(())
}

/// Sends the mesh's names to the agent: a systemd-resolved drop-in where
/// resolved runs, otherwise what to add.
fn wire_dns(out: &mut impl Write, dns: &crate::config::DnsConfig) -> anyhow::Result<()> {
    let domain = format!("svc.{}", dns.cluster_domain);
    if Path::new("/run/systemd/resolve").is_dir() && dns.listen.port() == 53 {
        let dropin = systemd::Unit::default()
            .section("Resolve")
            .set("DNS", &dns.listen.ip().to_string())
            .set("Domains", &format!("~{domain}"))
            .render()
            .map_err(anyhow::Error::msg)?;
        let dir = Path::new(systemd::RESOLVED_DROPIN)
            .parent()
            .unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        mesh_core::identity::files::write_public(
            Path::new(systemd::RESOLVED_DROPIN),
            dropin.as_bytes(),
        )?;
        let _ = systemd::systemctl(&["try-reload-or-restart", "systemd-resolved.service"]);
        writeln!(
            out,
            "wrote {}: systemd-resolved sends *.{domain} to {}",
            systemd::RESOLVED_DROPIN,
            dns.listen
        )?;
    } else {
        writeln!(
            out,
            "DNS for *.{domain} is served on {}; systemd-resolved does not run here, so point your resolver's {domain} zone there (or add `nameserver {}` to /etc/resolv.conf)",
            dns.listen,
            dns.listen.ip()
        )?;
    }
    Ok(())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn leave(args: &LeaveArgs) -> anyhow::Result<()> {
    let path = &args.config.config;
    let config = AgentConfig::load(path)?;
    let mut out = std::io::stdout().lock();
    if !args.no_systemd && systemd::booted() {
        // Stopping deregisters the workload (the agent does on SIGTERM).
        let _ = systemd::systemctl(&["disable", "--now", systemd::UNIT]);
        writeln!(out, "stopped and disabled {}", systemd::UNIT)?;
        if Path::new(systemd::UNIT_PATH).exists() {
            std::fs::remove_file(systemd::UNIT_PATH)?;
            let _ = systemd::systemctl(&["daemon-reload"]);
            writeln!(out, "removed {}", systemd::UNIT_PATH)?;
        }
    }
    if Path::new(systemd::RESOLVED_DROPIN).exists() && config.dns.is_some() {
        std::fs::remove_file(systemd::RESOLVED_DROPIN)?;
        let _ = systemd::systemctl(&["try-reload-or-restart", "systemd-resolved.service"]);
        writeln!(out, "removed {}", systemd::RESOLVED_DROPIN)?;
    }
    for name in [
        crate::config::LEAF_CRT,
        crate::config::LEAF_KEY,
        crate::config::BUNDLE,
        crate::config::ENROLL_KEY,
    ] {
        let f = config.state_file(name);
        if f.exists() {
            std::fs::remove_file(&f)?;
            writeln!(out, "removed {}", f.display())?;
        }
    }
    std::fs::remove_file(path)?;
    writeln!(out, "removed {}", path.display())?;
    writeln!(
        out,
        "left cluster {}; the control plane forgets {}/{} once its heartbeats stop (removal grace, 5 minutes by default)",
        config.cluster, config.namespace, config.workload
    )?;
    Ok(())
}

fn status(path: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(path)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "joined cluster {} as {}/{} ({})",
        config.cluster,
        config.namespace,
        config.workload,
        config.identity().map_err(anyhow::Error::msg)?
    )?;
    let crt = config.state_file(crate::config::LEAF_CRT);
    match mesh_core::identity::files::read(&crt)
        .ok()
        .and_then(|pem| mesh_core::identity::cert::certs_from_pem(&pem).ok())
        .and_then(|chain| mesh_core::identity::cert::CertInfo::parse(chain.first()?).ok())
    {
        Some(info) => writeln!(out, "identity valid until {}", rfc3339(info.not_after))?,
        None => writeln!(out, "no readable identity at {}", crt.display())?,
    }
    let ready = std::net::TcpStream::connect_timeout(&config.admin_addr, Duration::from_secs(1))
        .ok()
        .and_then(|mut s| {
            use std::io::Read;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            Some(answer)
        });
    match ready {
        Some(a) if a.starts_with("HTTP/1.1 200") || a.starts_with("HTTP/1.0 200") => {
            writeln!(out, "agent ready ({})", config.admin_addr)?
        }
        Some(a) => writeln!(
            out,
            "agent not ready: {}",
            a.split("\r\n\r\n").nth(1).unwrap_or("").trim()
        )?,
        None => writeln!(
            out,
            "agent not running (nothing answers at {})",
            config.admin_addr
        )?,
    }
    match &config.capture {
        None => writeln!(
            out,
            "capture: explicit (HTTP_PROXY=http://{})",
            config.outbound_addr
        )?,
        Some(c) => match crate::capture::check(&c.rules(&config)) {
            Ok(()) => writeln!(
                out,
                "capture: transparent for uids {:?} gids {:?}, rules in place",
                c.app_uids, c.app_gids
            )?,
            Err(why) => writeln!(
                out,
                "capture: transparent for uids {:?} gids {:?}, rules not in place ({why})",
                c.app_uids, c.app_gids
            )?,
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_users_are_looked_up_never_passed_as_options() {
        assert_eq!(uid_of("1001").unwrap(), 1001);
        assert_eq!(uid_of("root").unwrap(), 0);
        for hostile in ["-u", "--help", "", "a\nb"] {
            assert!(uid_of(hostile).is_err(), "{hostile:?}");
        }
        let err = uid_of("no-such-user-mesh").unwrap_err().to_string();
        assert!(err.contains("no such user on this machine"), "{err}");
        assert_eq!(gid_of("root").unwrap(), 0);
        assert_eq!(gid_of("1337").unwrap(), 1337);
        for hostile in ["-s", "", "a\nb", "no-such-group-mesh"] {
            assert!(gid_of(hostile).is_err(), "{hostile:?}");
        }
    }
}
