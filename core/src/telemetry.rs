//! Logging for every Mesh binary: to stderr, filtered by `MESH_LOG`
//! (an `EnvFilter` directive such as `info` or `mesh_control=debug`).

/// Installs the subscriber; `default` applies when `MESH_LOG` is unset.
/// Calling it twice is harmless.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
