//! `mesh gateway` and `mesh-gateway`: run until SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::{Gateway, GatewayArgs};

pub fn run(args: GatewayArgs) -> ExitCode {
    let runtime = match mesh_core::shutdown::runtime_with(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = tokio::select! {
            started = Gateway::start(args) => started,
            () = mesh_core::shutdown::signal() => return ExitCode::SUCCESS,
        };
        match gateway {
            Ok(gateway) => {
                mesh_core::shutdown::signal().await;
                tracing::info!("shutting down");
                gateway.shutdown().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
