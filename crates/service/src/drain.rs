//! The drain, written once for every service. On SIGTERM (or SIGINT):
//!
//! 1. **Not ready, keep serving.** `/readyz` answers `503` and gRPC health
//!    `NOT_SERVING` at once, but new calls are still served, for the *drain
//!    delay* (`--drain-delay`, `SHOAL_DRAIN_DELAY`, default
//!    [`DEFAULT_DRAIN_DELAY`]): long enough for every client to notice (the
//!    gateway's health watch within a round trip; its DNS re-resolve, every
//!    `--resolve-interval`, 5 s by default; in Kubernetes the endpoint
//!    propagation, covered by the preStop sleep).
//! 2. **Idle exits early.** The delay ends as soon as no connection is open
//!    on the serving port *and none has been for [`QUIET_WINDOW`]* (or the
//!    delay, if shorter): every client that
//!    balances over a service's replicas (the gateway, the metrics exporters)
//!    holds a long-lived HTTP/2 connection, and the gateway a health watch on
//!    it, so with none open nobody is routing calls here; the quiet window
//!    covers clients that connect per request or reconnect after the
//!    `Connection: close` they get while draining (HTTP/1.1 clients of the gateway): while
//!    they still route here, they keep connecting, and the delay goes on.
//!    (Clients reaching the gateway through a Kubernetes Service open new
//!    connections until the endpoint removal propagates: the preStop sleep
//!    covers that, before the signal.)
//! 3. **Stop accepting.** HTTP/2 connections get a graceful, two-phase
//!    GOAWAY (streams already opened finish; later ones are refused and the
//!    client retries them elsewhere); HTTP/1.1 keep-alive responses carry
//!    `Connection: close` from step 1 on, and idle ones are closed.
//! 4. **Finish in flight** under the *shutdown grace* (`--shutdown-grace`,
//!    `SHOAL_SHUTDOWN_GRACE`, default 25 s); what is left then is abandoned.
//!    The service's own work (jobs) follows the [`Stages`].
//!
//! Then the service flushes telemetry and exits 0.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::net::Connections;

/// Default of `--drain-delay`: one gateway re-resolve interval (5 s), the
/// longest a client that does not watch health needs to drop a replica.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// How long a draining service must have had no connection open before it
/// ends the drain delay early.
pub const QUIET_WINDOW: Duration = Duration::from_secs(1);
/// Default of `--shutdown-grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The two durations of a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// How long the service keeps serving after the signal, not ready.
    pub delay: Duration,
    /// How long in-flight work may take after it stops accepting.
    pub grace: Duration,
}

/// The moments of a drain, for the work a service runs beside its server
/// (job executors, streams, background loops). Clones share the tokens.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    draining: CancellationToken,
    stopping: CancellationToken,
    abandoning: CancellationToken,
}

impl Stages {
    /// Cancelled at the signal: readiness is false, calls are still served.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Cancelled when the drain delay ends: no new calls; long streams
    /// should end now so the server can close.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Cancelled when the grace is over: cancel what still runs.
    pub fn abandoning(&self) -> CancellationToken {
        self.abandoning.clone()
    }

    pub(crate) fn start_draining(&self) {
        self.draining.cancel();
    }

    pub(crate) fn start_stopping(&self) {
        self.draining.cancel();
        self.stopping.cancel();
    }

    pub(crate) fn start_abandoning(&self) {
        self.abandoning.cancel();
    }
}

/// How the drain delay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayEnd {
    /// The full delay passed.
    Elapsed,
    /// No connection had been open on the serving port for the quiet window.
    Idle,
}

/// Waits out the drain delay, or less when `connections` has had none open
/// for [`QUIET_WINDOW`].
pub async fn delay(delay: Duration, connections: &Connections) -> DelayEnd {
    tokio::select! {
        () = tokio::time::sleep(delay) => DelayEnd::Elapsed,
        () = connections.quiet_for(QUIET_WINDOW.min(delay)) => DelayEnd::Idle,
    }
}

/// Calls in flight (counted by the gRPC server's layer), like
/// [`Connections`] but for calls.
pub type InFlight = Connections;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_open_connection_holds_the_full_delay() {
        let connections = Connections::new();
        let _client = connections.track();
        let started = tokio::time::Instant::now();
        assert_eq!(delay(Duration::from_secs(5), &connections).await, DelayEnd::Elapsed);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_service_ends_the_delay_at_once() {
        let started = tokio::time::Instant::now();
        assert_eq!(delay(Duration::from_secs(5), &Connections::new()).await, DelayEnd::Idle);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_ends_a_quiet_window_after_the_last_connection_closes() {
        let connections = Connections::new();
        let client = connections.track();
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(client);
        });
        let started = tokio::time::Instant::now();
        assert_eq!(delay(Duration::from_secs(5), &connections).await, DelayEnd::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(2) + QUIET_WINDOW);
        closer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reconnects_per_request_holds_the_full_delay() {
        // Each connection lives 100 ms, with 50 ms between them: never two
        // open at once, never a quiet window.
        let connections = Connections::new();
        let client = tokio::spawn({
            let connections = connections.clone();
            async move {
                loop {
                    let open = connections.track();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    drop(open);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        assert_eq!(delay(Duration::from_secs(5), &connections).await, DelayEnd::Elapsed);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        client.abort();
    }

    #[test]
    fn stopping_implies_draining() {
        let stages = Stages::default();
        stages.start_stopping();
        assert!(stages.draining().is_cancelled() && stages.stopping().is_cancelled());
        assert!(!stages.abandoning().is_cancelled());
    }
}
