//! The bare baseline: the smallest axum server that answers `GET /` like the
//! gateway does (`{"message":"Hello, Prometheus!"}`), with no middleware,
//! metrics, tracing or limits. The gateway's throughput is reported as a
//! fraction of this server's.

use std::future::Future;

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;

#[derive(Serialize)]
struct Message {
    message: &'static str,
}

/// The one route.
pub fn router() -> Router {
    Router::new().route("/", get(|| async { Json(Message { message: "Hello, Prometheus!" }) }))
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router()).with_graceful_shutdown(shutdown).await
}
