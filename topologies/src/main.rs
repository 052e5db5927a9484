//! `mesh-demo`: the demo workloads alone (also `mesh demo`).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mesh-demo", version, about = "Mesh demo workloads")]
struct Cli {
    #[command(subcommand)]
    command: mesh_topologies::demo::DemoCmd,
}

fn main() -> std::process::ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    match mesh_topologies::demo::run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
