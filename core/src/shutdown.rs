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
