//! Serving and draining a public HTTP listener (the gateway), per
//! [`crate::drain`]: at the signal readiness goes false while requests are
//! still served through the drain delay (less when no connection is open),
//! every response to an HTTP/1.x request carries `Connection: close` so
//! keep-alive clients reconnect elsewhere; then the listener stops accepting
//! (HTTP/2 connections get a graceful GOAWAY, idle HTTP/1.1 ones are closed)
//! and in-flight requests finish under the grace.

use std::future::{Future, IntoFuture as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::net::TcpListener;

use crate::admin::Readiness;
use crate::drain::{self, DelayEnd, DrainSettings};
use crate::net::Connections;

/// How [`serve_http`] starts the server: given the app (with the drain
/// layer), the counter every accepted connection must be counted in, and a
/// future that resolves when the server must stop accepting and finish its
/// connections gracefully.
pub type StopSignal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves `app` on `listener` with `axum::serve` until `shutdown` resolves,
/// then drains. Marks the readiness started once serving.
///
/// # Errors
///
/// An I/O error of the server.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    readiness: Readiness,
    settings: DrainSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_http_with(app, readiness, settings, shutdown, |app, connections, stop| {
        axum::serve(crate::net::http_listener(listener, connections), app).with_graceful_shutdown(stop).into_future()
    })
    .await
}

/// The drain sequence of [`serve_http`] around a server of the caller's
/// (the gateway's own connection handling, with its timeouts and caps):
/// `start` gets the app with the drain layer, the connection counter to count
/// accepted connections in, and the stop signal.
///
/// # Errors
///
/// An I/O error of the server.
pub async fn serve_http_with<S, F>(
    app: axum::Router,
    readiness: Readiness,
    settings: DrainSettings,
    shutdown: impl Future<Output = ()> + Send,
    start: S,
) -> std::io::Result<()>
where
    S: FnOnce(axum::Router, Connections, StopSignal) -> F,
    F: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let connections = Connections::new();
    let draining = Arc::new(AtomicBool::new(false));
    let app = app.layer(axum::middleware::from_fn({
        let draining = draining.clone();
        move |request: Request, next: Next| close_while_draining(draining.clone(), request, next)
    }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop_signal: StopSignal = Box::pin(async {
        let _ = stopped.await;
    });
    let mut server = tokio::spawn(start(app, connections.clone(), stop_signal));
    readiness.mark_started();

    tokio::select! {
        () = shutdown => {}
        finished = &mut server => return outcome(finished),
    }
    tracing::info!(
        drain_delay_ms = settings.delay.as_millis() as u64,
        grace_ms = settings.grace.as_millis() as u64,
        "draining: not ready, still serving"
    );
    readiness.mark_draining();
    draining.store(true, Ordering::SeqCst);
    tokio::select! {
        end = drain::delay(settings.delay, &connections) => {
            if end == DelayEnd::Idle {
                tracing::info!("no connection open: ending the drain delay early");
            }
        }
        finished = &mut server => return outcome(finished),
    }
    tracing::info!(connections = connections.open(), "stopping: no new connections, finishing in-flight requests");
    let _ = stop.send(());
    match tokio::time::timeout(settings.grace, &mut server).await {
        Ok(finished) => outcome(finished),
        Err(_) => {
            tracing::warn!(connections = connections.open(), "grace period over, abandoning in-flight requests");
            server.abort();
            Ok(())
        }
    }
}

async fn close_while_draining(draining: Arc<AtomicBool>, request: Request, next: Next) -> Response {
    let http1 = request.version() <= Version::HTTP_11;
    let mut response = next.run(request).await;
    if http1 && draining.load(Ordering::SeqCst) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn outcome(finished: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    match finished {
        Ok(result) => result,
        // The server task never panics on its own; a cancelled task is an abort.
        Err(_) => Ok(()),
    }
}
