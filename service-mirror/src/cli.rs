//! `mesh service-mirror` and `mesh-service-mirror`: run until SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::{MirrorArgs, ServiceMirror};

pub fn run(args: MirrorArgs) -> ExitCode {
    let runtime = match mesh_core::shutdown::runtime_with(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mirror = tokio::select! {
            started = ServiceMirror::start(args) => started,
            () = mesh_core::shutdown::signal() => return ExitCode::SUCCESS,
        };
        match mirror {
            Ok(mirror) => {
                mesh_core::shutdown::signal().await;
                tracing::info!("shutting down");
                mirror.shutdown().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
