//! The process's stop signals, handled in one place.

use std::future::Future;

/// A future that resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this function is *called*, not when the
/// future is first polled: call it before announcing readiness, so a signal
/// that arrives right after start-up is never the default "terminate now".
/// If a handler cannot be installed (the process is out of resources), the
/// error is logged and that signal is not awaited.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::error!(%error, signal = name, "cannot listen for signal");
                None
            }
        };
        let mut terminate = install(SignalKind::terminate(), "SIGTERM");
        let mut interrupt = install(SignalKind::interrupt(), "SIGINT");
        async move {
            let term = async {
                match terminate.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match interrupt.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                _ = int => tracing::info!(signal = "SIGINT", "shutdown requested"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "ctrl-c", "shutdown requested");
    }
}
