//! The signal every Baton process stops on.

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
///
/// # Panics
/// If the SIGTERM handler cannot be installed (no signal driver in the runtime).
pub async fn signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
