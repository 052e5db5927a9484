//! `mesh proxy` (and the `mesh-proxy` binary): configured by `MESH_PROXY_*`
//! environment variables (see `env.rs` and the README); `mesh proxy init`
//! prints or applies the iptables rules of transparent mode.

use std::{collections::HashMap, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    Proxy, env,
    init::{ProxyOwner, Rules},
};

/// Run the sidecar proxy (configured by MESH_PROXY_* variables), or set up
/// transparent interception.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(subcommand)]
    pub command: Option<ProxyCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Print the iptables rules that redirect the workload's TCP to the proxy (or apply them).
    Init(InitArgs),
    /// Ask the proxy's admin endpoint whether it is ready or live (exit 0
    /// if so): what the injected pod's probes run.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// `ready` (has its identity and serves) or `live` (the process answers).
    #[arg(value_parser = ["ready", "live"])]
    what: String,
    /// Keep asking until it passes or this long has passed (e.g. 120s).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Apply the rules with iptables (needs root) instead of printing them.
    #[arg(long)]
    apply: bool,
    /// The user id the proxy runs as; its own traffic is never redirected.
    #[arg(
        long,
        required_unless_present = "proxy_gid",
        conflicts_with = "proxy_gid"
    )]
    proxy_uid: Option<u32>,
    /// Or the group id the proxy runs with (the workload runs with another,
    /// even as the same user).
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// Where redirected inbound traffic goes.
    #[arg(long, default_value_t = 4143)]
    inbound_port: u16,
    /// Where redirected outbound traffic goes.
    #[arg(long, default_value_t = 4140)]
    outbound_port: u16,
    /// Inbound ports that reach the workload directly (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "4191")]
    skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy (comma separated).
    #[arg(long, value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
}

/// Runs `mesh proxy ...`; `vars` is the environment.
pub fn main(args: ProxyArgs, vars: HashMap<String, String>) -> ExitCode {
    let init = match args.command {
        None => return run(vars),
        Some(ProxyCommand::Probe(probe)) => {
            return crate::probe::main(&probe.what, probe.wait, &vars);
        }
        Some(ProxyCommand::Init(init)) => init,
    };
    let rules = Rules {
        inbound_port: init.inbound_port,
        outbound_port: init.outbound_port,
        proxy: match (init.proxy_uid, init.proxy_gid) {
            (Some(uid), _) => ProxyOwner::Uid(uid),
            (None, Some(gid)) => ProxyOwner::Gid(gid),
            (None, None) => unreachable!("clap requires one of them"),
        },
        skip_inbound_ports: init.skip_inbound_ports,
        skip_outbound_ports: init.skip_outbound_ports,
    };
    if !init.apply {
        #[allow(clippy::print_stdout)]
        {
            print!("{}", rules.script());
        }
        return ExitCode::SUCCESS;
    }
    match rules.apply() {
        Ok(()) => {
            eprintln!(
                "transparent interception rules applied (chains MESH_INBOUND, MESH_OUTBOUND)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the proxy until SIGTERM or SIGINT; `vars` is the environment.
pub fn run(vars: HashMap<String, String>) -> ExitCode {
    let config = match env::parse(&vars) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!(
                "error: invalid proxy configuration:\n  {}",
                errors.join("\n  ")
            );
            return ExitCode::FAILURE;
        }
    };
    let runtime = match mesh_core::shutdown::runtime_with(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Wait for the identity, but let a signal interrupt the wait.
        let grace = config.shutdown_grace;
        let proxy = tokio::select! {
            started = Proxy::start(config) => started,
            () = mesh_core::shutdown::signal() => return ExitCode::SUCCESS,
        };
        match proxy {
            Ok(proxy) => {
                mesh_core::shutdown::signal().await;
                tracing::info!("shutting down");
                proxy.shutdown(grace).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
