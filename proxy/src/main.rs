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
    // A sidecar runs without arguments. Leaving clap alone then keeps its
    // code (about 230 KiB) out of every idle sidecar's resident memory;
    // `mesh-proxy --help` and `mesh-proxy init ...` still go through it.
    let args = if std::env::args_os().len() > 1 {
        Cli::parse().proxy
    } else {
        mesh_proxy::cli::ProxyArgs { command: None }
    };
    mesh_proxy::cli::main(args, std::env::vars().collect())
}
