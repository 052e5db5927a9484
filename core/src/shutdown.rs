//! Process lifecycle: the runtime every binary runs on, and stopping on
//! SIGTERM or SIGINT.

/// The multi-threaded tokio runtime of a Mesh process.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// A runtime on `threads` threads: one means a current-thread runtime (no
/// cross-thread wake-ups, no work stealing), as a sidecar wants.
pub fn runtime_with(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

/// Completes on the first SIGTERM or SIGINT. Without signal handlers (which
/// only fails in odd sandboxes) it never completes: the process runs until
/// killed.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Runs a component on a one-thread runtime: `start` it (a signal during
/// start-up ends quietly), then wait for SIGTERM or SIGINT and `stop` it.
/// A failed start prints `error: ...` and fails the process.
pub fn run_component<T, E, Start, Stop, StopFut>(start: Start, stop: Stop) -> std::process::ExitCode
where
    E: std::fmt::Display,
    Start: std::future::Future<Output = Result<T, E>>,
    Stop: FnOnce(T) -> StopFut,
    StopFut: std::future::Future<Output = ()>,
{
    use std::process::ExitCode;
    let runtime = match runtime_with(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let started = tokio::select! {
            started = start => started,
            () = signal() => return ExitCode::SUCCESS,
        };
        match started {
            Ok(running) => {
                signal().await;
                tracing::info!("shutting down");
                stop(running).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
