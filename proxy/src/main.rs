//! `mesh-proxy`: the sidecar proxy as its own binary (the same as
//! `mesh proxy`), configured by `MESH_PROXY_*` environment variables.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about = "Mesh's sidecar proxy")]
struct Cli {
    #[command(flatten)]
    proxy: mesh_proxy::cli::ProxyArgs,
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    mesh_proxy::cli::main(Cli::parse().proxy, std::env::vars().collect())
}
