//! The admin listener every service runs beside its main one:
//!
//! - `GET /metrics`: Prometheus text exposition of the service's instruments;
//! - `GET /healthz`: liveness, `200` while the process can answer at all. It
//!   never depends on other services, so a dead dependency never gets a pod
//!   restarted;
//! - `GET /readyz`: readiness, `200` only once the service has started, while
//!   every readiness condition holds, and never after shutdown began; `503`
//!   otherwise, with the failing conditions in the JSON body.
//!
//! The admin listener must outlive the main one during a drain, so that
//! `/readyz` keeps answering `503` while in-flight work finishes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

const STARTED: &str = "started";
const NOT_DRAINING: &str = "not_draining";

/// Whether the service can take traffic: a set of named conditions that must
/// all hold. Cloning shares the state.
#[derive(Debug, Clone)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready: the service has not started yet.
    pub fn new() -> Self {
        let conditions = BTreeMap::from([(STARTED, false), (NOT_DRAINING, true)]);
        Self { conditions: Arc::new(Mutex::new(conditions)) }
    }

    /// Sets a named condition (e.g. `"redis"`); all must hold to be ready.
    pub fn set(&self, condition: &'static str, holds: bool) {
        if let Ok(mut conditions) = self.conditions.lock() {
            conditions.insert(condition, holds);
        }
    }

    /// The service has bound its listeners and can serve.
    pub fn mark_started(&self) {
        self.set(STARTED, true);
    }

    /// Shutdown began: not ready from now on, whatever else holds.
    pub fn mark_draining(&self) {
        self.set(NOT_DRAINING, false);
    }

    /// Whether shutdown began.
    pub fn is_draining(&self) -> bool {
        self.failing().contains(&NOT_DRAINING)
    }

    /// All conditions hold.
    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }

    /// The conditions that do not hold.
    pub fn failing(&self) -> Vec<&'static str> {
        match self.conditions.lock() {
            Ok(conditions) => conditions.iter().filter(|(_, ok)| !**ok).map(|(name, _)| *name).collect(),
            Err(_) => vec!["poisoned"],
        }
    }
}

/// The admin router, for services that add routes of their own.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// An I/O error from the listener.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness)).with_graceful_shutdown(shutdown).await
}

async fn metrics() -> Response {
    let body = crate::metrics::render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"alive"}"#).into_response()
}

async fn readyz(State(readiness): State<Readiness>) -> Response {
    let failing = readiness.failing();
    let (status, body) = if failing.is_empty() {
        (StatusCode::OK, serde_json::json!({ "status": "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "status": "not_ready", "failing": failing }))
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_start_and_every_condition_and_no_drain() {
        let readiness = Readiness::new();
        assert_eq!(readiness.failing(), vec![STARTED]);
        readiness.mark_started();
        assert!(readiness.is_ready());
        readiness.set("redis", false);
        assert_eq!(readiness.failing(), vec!["redis"]);
        readiness.set("redis", true);
        readiness.mark_draining();
        assert!(!readiness.is_ready());
        assert!(readiness.is_draining());
    }
}
