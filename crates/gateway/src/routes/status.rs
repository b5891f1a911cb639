//! `GET /v1/status`: whether the gateway's upstreams serve.
//!
//! The worker and the aggregator are asked in parallel (`grpc.health.v1`
//! `Check` for their service name), each with `--status-timeout` (1 s by
//! default), so the route answers within about one timeout even when both
//! hang. With client-side balancing, the check reaches one replica of each.
//!
//! The answer is a status document, not a problem:
//!
//! ```json
//! {"status": "ok" | "degraded",
//!  "components": {"worker": {"status": "serving" | "down", "detail": "...", "endpoints": 3},
//!                 "aggregator": {...}}}
//! ```
//!
//! **Status code:** `200` when every component serves, `503` when any is
//! down (so a monitor can alert on the code alone; the body names which).
//! This route is for humans and monitors; Kubernetes probes use the admin
//! listener's `/readyz`, which never depends on other services.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shoal_proto::aggregator::v1::aggregator_service_server::SERVICE_NAME as AGGREGATOR_SERVICE;
use shoal_proto::worker::v1::worker_service_server::SERVICE_NAME as WORKER_SERVICE;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::AppState;
use crate::upstream::Upstream;

#[derive(Debug, Serialize)]
struct Status {
    status: &'static str,
    components: Components,
}

#[derive(Debug, Serialize)]
struct Components {
    worker: Component,
    aggregator: Component,
}

#[derive(Debug, Serialize)]
struct Component {
    status: &'static str,
    detail: String,
    endpoints: usize,
}

impl Component {
    fn serving(&self) -> bool {
        self.status == "serving"
    }
}

/// Checks both upstreams in parallel; `200` when all serve, else `503`.
pub async fn status(State(state): State<AppState>) -> Response {
    let timeout = state.status_timeout;
    let (worker, aggregator) = tokio::join!(
        check(&state.worker, WORKER_SERVICE, timeout),
        check(&state.aggregator, AGGREGATOR_SERVICE, timeout),
    );
    let healthy = worker.serving() && aggregator.serving();
    let (code, status) = if healthy { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "degraded") };
    (code, Json(Status { status, components: Components { worker, aggregator } })).into_response()
}

async fn check(upstream: &Upstream, service: &'static str, timeout: Duration) -> Component {
    let counts = upstream.endpoints();
    let endpoints = counts.serving();
    let down = |detail: String| Component { status: "down", detail, endpoints };
    if counts.resolved() == 0 {
        return down("no address resolved".into());
    }
    if endpoints == 0 {
        return down("no address serving".into());
    }
    let mut client = HealthClient::new(upstream.channel());
    let mut request = tonic::Request::new(HealthCheckRequest { service: service.to_owned() });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(request)).await {
        Ok(Ok(response)) => match response.into_inner().status() {
            ServingStatus::Serving => Component { status: "serving", detail: "health check passed".into(), endpoints },
            other => down(format!("health check answered {}", other.as_str_name())),
        },
        Ok(Err(status)) => {
            tracing::debug!(service, code = ?status.code(), message = status.message(), "health check failed");
            down(format!("health check failed: {}", shoal_telemetry::grpc::code_name(status.code() as i32)))
        }
        Err(_) => down(format!("no answer within {}ms", timeout.as_millis())),
    }
}
