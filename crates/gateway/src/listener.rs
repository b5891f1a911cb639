//! Serving the public listener with hyper-util's connection builder, so that
//! a slow or hostile client holds bounded resources for a bounded time
//! (`axum::serve` sets no timer at all):
//!
//! - **Header-read timeout** (`--header-read-timeout`): an HTTP/1 request
//!   head must arrive whole within it, else the connection is closed. It also
//!   bounds how long an idle HTTP/1 keep-alive connection waits for its next
//!   request (hyper starts the timer when it waits for a head).
//! - **Idle timeout** (`--idle-timeout`): a connection (HTTP/1 or HTTP/2)
//!   with no request in flight and no request started for this long is shut
//!   down gracefully.
//! - **Body-read timeout**: enforced by [`crate::edge`] (`408`).
//! - **Connection cap** (`--max-connections`): above it a new connection
//!   gets a plain `503` problem with `Connection: close` (written within one
//!   second) and is closed, instead of being left in the kernel's backlog.
//! - **HTTP/2 limits**: `--http2-max-concurrent-streams`, and
//!   `--max-header-bytes` for the header list (HTTP/2) and the read buffer
//!   (HTTP/1, at least 8 KiB).
//!
//! Shutdown: stop accepting, ask every connection to finish its in-flight
//! requests and close ([`hyper`]'s graceful shutdown), wait until they have.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use shoal_service::DrainSettings;
use shoal_service::admin::Readiness;
use shoal_service::net::Connections;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    pub http2_max_concurrent_streams: u32,
    pub max_header_bytes: u32,
}

/// How long a refused connection gets to receive its `503`.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (out of file descriptors, say), so the loop
/// does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown` resolves, then drains with
/// [`shoal_service::http::serve_http_with`] (readiness off while still
/// serving for the drain delay, `Connection: close` on HTTP/1 answers
/// meanwhile; then stop accepting, let in-flight requests finish under the
/// grace), with this module's connection handling.
///
/// # Errors
///
/// An I/O error of the server.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    readiness: Readiness,
    settings: DrainSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    shoal_service::http::serve_http_with(app, readiness, settings, shutdown, move |app, connections, stop| {
        serve(listener, app, limits, connections, stop)
    })
    .await
}

/// Accepts on `listener` until `shutdown` resolves, then asks every
/// connection to finish and waits until they have (the caller bounds how long
/// with its grace period). Each open connection is counted in `open`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    open: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let max = limits.max_connections.max(1) as usize;
    let connections = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(max));
    let (stop, stopped) = watch::channel(false);
    let builder = Arc::new(builder(&limits));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Refusals are bounded too: past that the socket is just closed.
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let builder = builder.clone();
        let app = app.clone();
        let stopped = stopped.clone();
        let tracked = open.track();
        tokio::spawn(async move {
            connection(stream, &builder, app, limits.idle_timeout, stopped).await;
            drop((permit, tracked));
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it has closed.
    let _ = connections.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)).await;
    Ok(())
}

fn builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes);
    builder
}

/// Activity of one connection, for the idle timeout.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the connection opened, at the last request's start
    /// or end.
    last_ms: AtomicU64,
}

async fn connection(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    app: axum::Router,
    idle_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let opened = Instant::now();
    let activity = Arc::new(Activity::default());
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let activity = tracked.clone();
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.last_ms.store(elapsed_ms(opened), Ordering::Relaxed);
        async move {
            let response = tower::ServiceExt::oneshot(app, request).await;
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
            activity.last_ms.store(elapsed_ms(opened), Ordering::Relaxed);
            response
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut draining = false;
    let mut idle_check = tokio::time::interval(idle_timeout / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "connection closed with an error");
                }
                return;
            }
            changed = stopped.changed(), if !draining => {
                let _ = changed;
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick(), if !draining => {
                let idle_for = elapsed_ms(opened).saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if activity.in_flight.load(Ordering::Relaxed) == 0 && idle_for >= duration_ms(idle_timeout) {
                    tracing::debug!(idle_ms = idle_for, "closing an idle connection");
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    duration_ms(since.elapsed())
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Answers a connection over the cap with a `503` problem and closes it.
async fn refuse(mut stream: TcpStream) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let body = format!(
        r#"{{"type":"urn:shoal:problem:too-many-connections","title":"Too many connections","status":503,"detail":"the gateway is at its connection limit; retry after the Retry-After delay","instance":"urn:shoal:request:{id}","request_id":"{id}"}}"#
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
}
