//! `mesh`: the one binary users run. Each component and tool is a
//! subcommand, so one build runs everything.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod identity;

#[derive(Debug, Parser)]
#[command(name = "mesh", version, about = "Mesh: a federated service mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate authorities, SVIDs and trust bundles.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
}

fn main() -> ExitCode {
    init_tracing();
    mesh_core::crypto::install_default_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Identity(cmd) => identity::run(cmd, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `MESH_LOG` (default `warn` for commands).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
