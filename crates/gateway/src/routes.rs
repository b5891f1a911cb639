//! The public HTTP API: the router, its layers and the shared state.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the blueprint's hello (`?delay_ms=N` waits first, for load tests) |
//! | `POST /v1/tasks/{kind}` | runs a task on a worker over gRPC |
//! | `POST /v1/jobs` | queues a durable job (`202` + `Location`) |
//! | `POST /v1/jobs:batch` | queues up to 100 jobs in one call (`200`, a result per job) |
//! | `GET /v1/jobs/{id}` | reads a job |
//! | `POST /v1/jobs/{id}/cancel` | cancels a job (it stays readable) |
//! | `GET /v1/status` | the health of the worker and aggregator, checked in parallel |
//! | `GET /v1/stats` | the fleet's request and error rates, latency quantiles and job throughput per service, from the aggregator |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of this API |
//!
//! Anything else is a `404` or `405` problem (see [`crate::problem`]).
//! Layers, outermost first: request telemetry (span + metrics by route
//! template), [`crate::edge`] admission (authentication, the client's
//! limits, the body read within its time and size limits), the
//! [`crate::guard`] (load shedding, panic containment), the body limit.

mod hello;
mod jobs;
mod openapi;
mod stats;
mod status;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};

use crate::guard::GuardLayer;
use crate::problem::ApiError;
use crate::upstream::Upstream;

/// What handlers share; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub(crate) struct AppState(Arc<Shared>);

#[derive(Debug)]
pub(crate) struct Shared {
    pub worker: Upstream,
    pub aggregator: Upstream,
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
pub(crate) fn router(
    state: AppState,
    max_in_flight: usize,
    admission: crate::edge::Admission,
    max_delayed: usize,
    max_delay: Duration,
    trust_traceparent: bool,
    stats_cache_ttl: Duration,
) -> Router {
    let body_limit = usize::try_from(state.max_body_bytes).unwrap_or(usize::MAX);
    let max_delay_ms = u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX);
    let delayed = hello::Delayed { places: Arc::new(tokio::sync::Semaphore::new(max_delayed)), max_ms: max_delay_ms };
    let document = openapi::document(max_delay_ms);
    let router = Router::new()
        .route("/", get(move |query| hello::hello(delayed.clone(), query)))
        .route("/v1/tasks/{kind}", post(tasks::execute))
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs:batch", post(jobs::submit_batch))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/status", get(status::status))
        .route(
            "/v1/stats",
            get(stats::stats).layer(axum::middleware::from_fn_with_state(
                Arc::new(crate::cache::ResponseCache::new(stats_cache_ttl)),
                crate::cache::cached,
            )),
        )
        .route("/openapi.json", get(move || openapi::openapi(document.clone())))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(GuardLayer::new(max_in_flight))
        .layer(axum::middleware::from_fn_with_state(Arc::new(admission), crate::edge::admit))
        .layer(shoal_telemetry::http::HttpTelemetryLayer)
        .with_state(state);
    if trust_traceparent { router } else { router.layer(axum::middleware::map_request(untrusted_trace_context)) }
}

/// Drops the caller's trace context (`--trust-traceparent false`): the
/// request starts a trace of the gateway's own.
async fn untrusted_trace_context(mut request: axum::extract::Request) -> axum::extract::Request {
    let headers = request.headers_mut();
    headers.remove("traceparent");
    headers.remove("tracestate");
    request
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
