//! `mesh-vm-agent`: the VM agent as its own binary (the same as `mesh vm`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-vm-agent",
    version,
    about = "Mesh's VM agent: join this VM to the mesh and keep it there"
)]
struct Cli {
    #[command(subcommand)]
    command: mesh_vm_agent::cli::AgentCommand,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    let cli = Cli::parse();
    let serving = matches!(cli.command, mesh_vm_agent::cli::AgentCommand::Run(_));
    mesh_core::telemetry::init(if serving { "info" } else { "warn" });
    mesh_vm_agent::cli::main(cli.command)
}
