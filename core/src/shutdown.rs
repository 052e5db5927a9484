//! Process lifecycle: the runtime every binary runs on, and stopping on
//! SIGTERM or SIGINT.

/// The multi-threaded tokio runtime of a Mesh process.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
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
