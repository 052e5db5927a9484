//! `mesh proxy` (and the `mesh-proxy` binary): configured by `MESH_PROXY_*`
//! environment variables (see `env.rs` and the README).

use std::{collections::HashMap, process::ExitCode, time::Duration};

use crate::{Proxy, env};

/// Runs the proxy until SIGTERM or SIGINT; `vars` is the environment.
pub fn run(vars: HashMap<String, String>) -> ExitCode {
    let config = match env::parse(&vars) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!(
                "error: invalid proxy configuration:\n  {}",
                errors.join("\n  ")
            );
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Wait for the identity, but let a signal interrupt the wait.
        let proxy = tokio::select! {
            started = Proxy::start(config) => started,
            () = mesh_core::shutdown::signal() => return ExitCode::SUCCESS,
        };
        match proxy {
            Ok(proxy) => {
                mesh_core::shutdown::signal().await;
                tracing::info!("shutting down");
                proxy.shutdown(Duration::from_secs(5)).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
