//! `mesh-service-mirror`: the service mirror as its own binary (the same as
//! `mesh service-mirror`); every flag is also read from `MESH_SERVICE_MIRROR_*`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mesh-service-mirror", version, about = "Mesh's service mirror")]
struct Cli {
    #[command(flatten)]
    mirror: mesh_service_mirror::MirrorArgs,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    mesh_service_mirror::cli::run(Cli::parse().mirror)
}
