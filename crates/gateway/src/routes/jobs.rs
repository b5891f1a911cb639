//! Durable jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}`.
//! The worker owns the queue (see `docs/jobs.md`); these handlers validate,
//! call its gRPC jobs API, and shape the answers.
//!
//! - `POST /v1/jobs` with `{"kind": "sleep", "payload": {...}, "max_attempts": 3,
//!   "timeout_ms": 60000}` (only `kind` is required) and an optional
//!   `Idempotency-Key` header → `202 Accepted`, the job, and
//!   `Location: /v1/jobs/{id}`. Repeating the key returns the same job (still
//!   `202`, with `Idempotent-Replayed: true`), never a second one.
//! - `GET /v1/jobs/{id}` → `200` and the job; `404` when unknown or expired.
//! - `DELETE /v1/jobs/{id}` → `202` and the job: a queued job is cancelled
//!   at once, a running one is interrupted cooperatively (poll until
//!   `cancelled`); `409` when it already ended.
//!
//! A full queue is `429` with `Retry-After`; Redis or the workers unreachable
//! is `503` with `Retry-After`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_proto::worker::v1::{self as pb, CancelJobRequest, GetJobRequest, SubmitJobRequest};

use super::AppState;
use super::tasks::{REQUEST_TIMEOUT, deadline};
use crate::problem::ApiError;

/// The header that makes a submission idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    kind: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The body, with every rejection turned into a problem.
pub struct SubmitJson(SubmitBody);

impl FromRequest<AppState> for SubmitJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Json::<SubmitBody>::from_request(request, state).await {
            Ok(Json(body)) => Ok(Self(body)),
            Err(rejection) => Err(ApiError::from_json(rejection, state.max_body_bytes)),
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Serialize)]
struct JobView {
    id: String,
    kind: String,
    state: &'static str,
    attempts: u32,
    max_attempts: u32,
    progress: u32,
    payload: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    timeout_ms: u64,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<String>,
}

fn at(ms: i64) -> String {
    shoal_telemetry::rfc3339_from_unix_ms(u64::try_from(ms).unwrap_or(0))
}

impl JobView {
    fn from_proto(job: pb::Job) -> Self {
        let state = match pb::JobState::try_from(job.state).unwrap_or(pb::JobState::Unspecified) {
            pb::JobState::Queued => "queued",
            pb::JobState::Running => "running",
            pb::JobState::Succeeded => "succeeded",
            pb::JobState::Failed => "failed",
            pb::JobState::Dead => "dead",
            pb::JobState::Cancelled => "cancelled",
            pb::JobState::Unspecified => "unknown",
        };
        let json = |text: &str| serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.into()));
        Self {
            state,
            payload: json(&job.payload_json),
            result: job.result_json.as_deref().map(json),
            error: job.error,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            progress: job.progress,
            timeout_ms: job.timeout_ms,
            created_at: at(job.created_unix_ms),
            updated_at: at(job.updated_unix_ms),
            started_at: job.started_unix_ms.map(at),
            finished_at: job.finished_unix_ms.map(at),
            next_attempt_at: job.next_attempt_unix_ms.map(at),
            id: job.id,
            kind: job.kind,
        }
    }
}

fn accepted(job: pb::Job, replayed: bool) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    let mut response = (StatusCode::ACCEPTED, Json(JobView::from_proto(job))).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn worker_ready(state: &AppState) -> Result<(), ApiError> {
    if state.worker_endpoints.load(Ordering::Relaxed) == 0 {
        return Err(ApiError::UpstreamUnavailable { upstream: "worker", cause: "no worker address resolved".into() });
    }
    Ok(())
}

/// Calls the worker with the request's deadline (`Request-Timeout` or the
/// default), bounding this handler by it too; a call that could not connect
/// is retried on another worker.
async fn call<T, F, Fut>(state: &AppState, headers: &HeaderMap, call: F) -> Result<T, ApiError>
where
    F: Fn(WorkerClient, std::time::Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    worker_ready(state)?;
    let deadline = deadline(headers.get(REQUEST_TIMEOUT), state.default_timeout, state.max_timeout)?;
    let attempts = crate::discovery::retry_unconnected(|| call(state.worker.clone(), deadline));
    match tokio::time::timeout(deadline, attempts).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(ApiError::from_jobs(status, deadline)),
        Err(_) => Err(ApiError::Timeout(deadline)),
    }
}

type WorkerClient = shoal_proto::worker::v1::worker_service_client::WorkerServiceClient<crate::discovery::GrpcChannel>;

fn with_timeout<T>(message: T, deadline: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// `POST /v1/jobs`.
///
/// # Errors
///
/// Bad input (`400`, `413`, `415`), `429` when the queue is full, the
/// worker's other errors per [`ApiError::from_jobs`].
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    SubmitJson(body): SubmitJson,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => String::new(),
        Some(value) => value
            .to_str()
            .map_err(|_| ApiError::BadRequest("Idempotency-Key must be visible ASCII text".into()))?
            .to_owned(),
    };
    let request = SubmitJobRequest {
        kind: body.kind,
        payload_json: body.payload.to_string(),
        max_attempts: body.max_attempts.unwrap_or(0),
        timeout_ms: body.timeout_ms.unwrap_or(0),
        idempotency_key,
    };
    if request.max_attempts == 0 && body.max_attempts.is_some() {
        return Err(ApiError::BadRequest("max_attempts must be at least 1 (omit it for the default)".into()));
    }
    if request.timeout_ms == 0 && body.timeout_ms.is_some() {
        return Err(ApiError::BadRequest("timeout_ms must be at least 1 (omit it for the default)".into()));
    }
    let response = call(&state, &headers, |mut worker, deadline| {
        let request = with_timeout(request.clone(), deadline);
        async move { worker.submit_job(request).await }
    })
    .await?;
    let job = response.job.ok_or_else(|| ApiError::BadGateway("worker answered SubmitJob without a job".into()))?;
    Ok(accepted(job, !response.created))
}

/// `GET /v1/jobs/{id}`.
///
/// # Errors
///
/// `400` for a malformed id, `404` for an unknown one, the worker's errors.
pub async fn get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = id?.0;
    let job = call(&state, &headers, |mut worker, deadline| {
        let request = with_timeout(GetJobRequest { id: id.clone() }, deadline);
        async move { worker.get_job(request).await }
    })
    .await?;
    Ok(Json(JobView::from_proto(job)).into_response())
}

/// `DELETE /v1/jobs/{id}`.
///
/// # Errors
///
/// `409` when the job already ended, `404` for an unknown id, the worker's
/// errors.
pub async fn cancel(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = id?.0;
    let job = call(&state, &headers, |mut worker, deadline| {
        let request = with_timeout(CancelJobRequest { id: id.clone() }, deadline);
        async move { worker.cancel_job(request).await }
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from_proto(job))).into_response())
}
