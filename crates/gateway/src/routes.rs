//! The public HTTP API: the router, its layers and the shared state.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the blueprint's hello (`?delay_ms=N` waits first, for load tests) |
//! | `POST /v1/tasks/{kind}` | runs a task on a worker over gRPC |
//! | `POST /v1/jobs` | queues a durable job (`202` + `Location`) |
//! | `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` | reads or cancels a job |
//! | `GET /v1/status` | the health of the worker and aggregator, checked in parallel |
//! | `GET /v1/stats` | the fleet's request and error rates, latency quantiles and job throughput per service, from the aggregator |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of this API |
//!
//! Anything else is a `404` or `405` problem (see [`crate::problem`]).
//! Layers, outermost first: request telemetry (span + metrics by route
//! template), the [`crate::guard`] (load shedding, panic containment), the
//! body limit.

mod hello;
mod jobs;
mod openapi;
mod stats;
mod status;
mod tasks;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use tonic_health::pb::health_client::HealthClient;

use crate::discovery::GrpcChannel;
use crate::guard::GuardLayer;
use crate::problem::ApiError;

/// What handlers share; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub(crate) struct AppState(Arc<Shared>);

#[derive(Debug)]
pub(crate) struct Shared {
    pub worker: WorkerServiceClient<GrpcChannel>,
    pub worker_health: HealthClient<GrpcChannel>,
    pub worker_endpoints: Arc<AtomicUsize>,
    pub aggregator: AggregatorServiceClient<GrpcChannel>,
    pub aggregator_health: HealthClient<GrpcChannel>,
    pub aggregator_endpoints: Arc<AtomicUsize>,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub status_timeout: Duration,
    pub max_body_bytes: u64,
}

impl AppState {
    pub(crate) fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The public router with every layer.
pub(crate) fn router(state: AppState, max_in_flight: usize) -> Router {
    let body_limit = usize::try_from(state.max_body_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(hello::hello))
        .route("/v1/tasks/{kind}", post(tasks::execute))
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/status", get(status::status))
        .route("/v1/stats", get(stats::stats))
        .route("/openapi.json", get(openapi::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(GuardLayer::new(max_in_flight))
        .layer(shoal_telemetry::http::HttpTelemetryLayer)
        .with_state(state)
}

/// Longest piece of a client's path echoed back in a problem.
const ECHO_LIMIT: usize = 200;

async fn not_found(uri: Uri) -> ApiError {
    let path = uri.path();
    let end = path.char_indices().nth(ECHO_LIMIT).map_or(path.len(), |(i, _)| i);
    ApiError::RouteNotFound { path: path[..end].to_owned() }
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string() }
}
