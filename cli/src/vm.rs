//! `mesh vm`: join tokens for VMs on the cluster side (`token create`),
//! and the agent's own commands (`join`, `run`, `leave`, `status`) on the VM.

use std::{collections::BTreeMap, io::Write, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use mesh_control::{admin_socket, store::WorkloadClaims};
use mesh_vm_agent::JoinString;

#[derive(Debug, Subcommand)]
pub(crate) enum VmCmd {
    /// Join tokens for VMs (run where the control plane runs).
    #[command(subcommand)]
    Token(TokenCmd),
    #[command(flatten)]
    Agent(mesh_vm_agent::cli::AgentCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCmd {
    /// Print the one line a VM runs to join: `mesh-vm-agent join <join-string>`.
    Create(Box<TokenCreateArgs>),
}

#[derive(Debug, Args)]
pub(crate) struct TokenCreateArgs {
    /// The VM's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The VM's service account: its SPIFFE ID is spiffe://<td>/ns/<namespace>/sa/<this>.
    #[arg(long)]
    service_account: String,
    /// The workload name the VM registers as (unique in the namespace).
    #[arg(long)]
    workload: String,
    /// Labels it registers, `app=billing,version=v1` (what Services select).
    #[arg(long, value_parser = mesh_control::cli::parse_labels, default_value = "")]
    labels: BTreeMap<String, String>,
    /// The ports its app serves, `5432,8080`.
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// How long the token may be used (single use).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The control plane's address as the VM reaches it: `host` (identity
    /// on 8080, API on 8086) or use --identity-addr and --api-addr.
    #[arg(long, required_unless_present_any = ["gateway", "identity_addr"])]
    control_addr: Option<String>,
    /// The identity service as the VM reaches it, `host:port`.
    #[arg(long)]
    identity_addr: Option<String>,
    /// The control plane API as the VM reaches it, `host:port`.
    #[arg(long)]
    api_addr: Option<String>,
    /// The cluster's gateway as the VM reaches it (`host:port`), when it
    /// is the VM's only route to the cluster: the VM then reaches the
    /// control plane and services, and is called, through it.
    #[arg(long)]
    gateway: Option<String>,
    /// The running control plane's data directory (for its admin socket).
    #[arg(long, env = "MESH_CONTROL_DATA_DIR", conflicts_with = "admin_socket")]
    data_dir: Option<PathBuf>,
    /// The running control plane's admin socket.
    #[arg(long, env = "MESH_CONTROL_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
}

pub(crate) fn run(cmd: VmCmd, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCmd::Agent(command) => Ok(mesh_vm_agent::cli::main(command)),
        VmCmd::Token(TokenCmd::Create(args)) => {
            let line = mesh_core::shutdown::runtime_with(1)?.block_on(token_create(*args))?;
            writeln!(out, "{line}")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Creates the token through the running control plane, which also says
/// which cluster, trust domain and bundle pin the VM must expect.
async fn token_create(args: TokenCreateArgs) -> anyhow::Result<String> {
    let socket = match (&args.admin_socket, &args.data_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join(admin_socket::SOCKET_FILE),
        (None, None) => {
            anyhow::bail!("pass --data-dir DIR or --admin-socket PATH of the running control plane")
        }
    };
    let with_port = |addr: &Option<String>, port: u16| {
        addr.as_ref().map(|a| match a.rsplit_once(':') {
            Some((_, p)) if p.parse::<u16>().is_ok() && !a.ends_with(']') => a.clone(),
            _ => format!("{a}:{port}"),
        })
    };
    // Behind the gateway, the control plane's own addresses are not used.
    let identity_addr = args
        .identity_addr
        .clone()
        .or_else(|| with_port(&args.control_addr, 8080))
        .or_else(|| args.gateway.clone())
        .unwrap_or_default();
    let api_addr = args
        .api_addr
        .clone()
        .or_else(|| with_port(&args.control_addr, 8086))
        .or_else(|| args.gateway.clone())
        .unwrap_or_default();
    let claims = WorkloadClaims {
        workload: args.workload.clone(),
        labels: args.labels.clone(),
        addresses: Vec::new(),
        ports: args.ports.clone(),
    };
    let resp = mesh_control::cli::request_token(
        &socket,
        args.namespace.clone(),
        args.service_account.clone(),
        args.ttl,
        Some(claims),
    )
    .await
    .map_err(|e| {
        e.context("`mesh vm token create` needs the running control plane (its admin socket)")
    })?;
    let facts = resp.cluster.ok_or_else(|| {
        anyhow::anyhow!("the control plane did not say its trust domain and bundle pin; upgrade it")
    })?;
    let js = JoinString {
        cluster: facts.cluster,
        trust_domain: facts.trust_domain,
        identity_addr,
        api_addr,
        gateway: args.gateway.clone(),
        token: resp.token.unwrap_or_default(),
        pin: facts.bundle_pin,
        namespace: args.namespace,
        service_account: args.service_account,
        workload: args.workload,
        labels: args.labels,
        ports: args.ports,
    };
    js.check()?;
    let expires = resp.expires_at.unwrap_or_default();
    let until = time::OffsetDateTime::from_unix_timestamp(expires)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| expires.to_string());
    eprintln!(
        "join string for {}/{} (spiffe://{}/ns/{}/sa/{}), single use, valid until {until}; run this on the VM:",
        js.namespace, js.workload, js.trust_domain, js.namespace, js.service_account
    );
    Ok(format!("mesh-vm-agent join {}", js.encode()))
}
