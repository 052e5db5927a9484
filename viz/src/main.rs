//! `mesh-viz`: viz as its own binary (the same as `mesh viz serve`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-viz",
    version,
    about = "Mesh's viz: one view of every linked cluster"
)]
struct Cli {
    #[command(flatten)]
    viz: mesh_viz::VizArgs,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    let args = Cli::parse().viz;
    mesh_core::shutdown::run_component(mesh_viz::Viz::start(args), mesh_viz::Viz::shutdown)
}
