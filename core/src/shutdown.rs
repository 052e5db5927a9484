//! Process shutdown: every binary stops on SIGTERM or SIGINT.

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
