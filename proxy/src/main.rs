//! `mesh-proxy`: the sidecar proxy as its own binary (the same as
//! `mesh proxy`), configured by `MESH_PROXY_*` environment variables.

use std::process::ExitCode;

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    mesh_core::telemetry::init("info");
    mesh_proxy::cli::run(std::env::vars().collect())
}
