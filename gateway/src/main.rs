//! `mesh-gateway`: the cross-cluster gateway as its own binary (the same
//! as `mesh gateway`); every flag is also read from `MESH_GATEWAY_*`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mesh-gateway", version, about = "Mesh's cross-cluster gateway")]
struct Cli {
    #[command(flatten)]
    gateway: mesh_gateway::GatewayArgs,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    mesh_gateway::cli::run(Cli::parse().gateway)
}
