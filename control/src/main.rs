//! `mesh-control`: the control plane as its own binary (the same as
//! `mesh control`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-control",
    version,
    about = "Mesh's per-cluster control plane"
)]
struct Cli {
    #[command(flatten)]
    control: mesh_control::cli::ControlArgs,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    mesh_control::cli::run(Cli::parse().control)
}
