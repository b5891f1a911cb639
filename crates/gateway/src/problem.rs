//! The one place where errors become HTTP responses: every failure of the
//! public API is an [`ApiError`], answered as RFC 9457
//! `application/problem+json`:
//!
//! ```json
//! {"type": "urn:shoal:problem:invalid-json", "title": "Malformed JSON body",
//!  "status": 400, "detail": "...", "instance": "urn:shoal:request:<id>",
//!  "request_id": "<id>"}
//! ```
//!
//! The request id is the request's trace id (so a client's report finds the
//! trace and the log lines), or a random id when tracing is off.
//!
//! Client mistakes (4xx) carry a `detail` that says what to fix. Our own
//! failures and unexpected upstream failures (5xx) carry an opaque `detail`;
//! the cause is logged with the request id.
//!
//! Worker gRPC codes map as follows (see [`From<tonic::Status>`]):
//!
//! | gRPC | HTTP | why |
//! |---|---|---|
//! | `INVALID_ARGUMENT` | 400 | unknown kind or bad payload: the worker's message says what to fix |
//! | `NOT_FOUND` | 404 | |
//! | `ABORTED` | 422 | the request was well-formed but the task failed (its message is passed on) |
//! | `RESOURCE_EXHAUSTED` | 503 + `Retry-After` | the workers are at capacity: a server-side condition, not this client's rate (so not 429) |
//! | `DEADLINE_EXCEEDED`, `CANCELLED` | 504 | the deadline passed (`CANCELLED` is the gRPC client's own timer firing first) |
//! | `UNAVAILABLE` | 503 + `Retry-After` | no worker reachable, or shutting down |
//! | anything else | 502 | opaque; the code and message are logged |

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `Retry-After` for overload answers, in seconds.
const RETRY_AFTER_SECS: &str = "1";

/// Every way a request to the public API can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON body: {0}")]
    InvalidJson(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("cannot read the request body")]
    UnreadableBody(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no route for {path}")]
    RouteNotFound { path: String },
    #[error("method {method} not allowed")]
    MethodNotAllowed { method: String },
    #[error("invalid task: {0}")]
    InvalidTask(String),
    #[error("not found: {0}")]
    UpstreamNotFound(String),
    #[error("task failed: {0}")]
    TaskFailed(String),
    #[error("workers at capacity")]
    UpstreamBusy,
    #[error("job queue full: {0}")]
    QueueFull(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("no {upstream} available: {cause}")]
    UpstreamUnavailable { upstream: &'static str, cause: String },
    #[error("deadline of {0:?} exceeded")]
    Timeout(Duration),
    #[error("the gateway is at its concurrency limit")]
    Overloaded,
    #[error("upstream failed: {0}")]
    BadGateway(String),
    #[error("internal error: {0}")]
    Internal(String),
}

struct Problem {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: Cow<'static, str>,
    retry_after: bool,
}

impl ApiError {
    fn problem(&self) -> Problem {
        use ApiError::*;
        let p = |status, slug, title, detail: Cow<'static, str>| Problem {
            status,
            slug,
            title,
            detail,
            retry_after: false,
        };
        match self {
            InvalidJson(detail) => p(
                StatusCode::BAD_REQUEST,
                "invalid-json",
                "Malformed JSON body",
                format!("{detail}; send a valid JSON document").into(),
            ),
            UnsupportedMediaType => p(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "the body must be JSON: send `Content-Type: application/json`".into(),
            ),
            PayloadTooLarge { limit } => p(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Request body too large",
                format!("the body exceeds the limit of {limit} bytes; send a smaller payload").into(),
            ),
            UnreadableBody(detail) => {
                p(StatusCode::BAD_REQUEST, "unreadable-body", "Cannot read the request body", detail.clone().into())
            }
            BadRequest(detail) => p(StatusCode::BAD_REQUEST, "bad-request", "Bad request", detail.clone().into()),
            RouteNotFound { path } => p(
                StatusCode::NOT_FOUND,
                "route-not-found",
                "No such route",
                format!(
                    "no route matches `{path}`; the API serves GET /, POST /v1/tasks/{{kind}}, POST /v1/jobs, \
                     GET|DELETE /v1/jobs/{{id}}, GET /v1/status and GET /v1/stats"
                )
                .into(),
            ),
            MethodNotAllowed { method } => p(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                format!("{method} is not allowed on this route; see the Allow header").into(),
            ),
            InvalidTask(detail) => p(StatusCode::BAD_REQUEST, "invalid-task", "Invalid task", detail.clone().into()),
            UpstreamNotFound(detail) => p(StatusCode::NOT_FOUND, "not-found", "Not found", detail.clone().into()),
            TaskFailed(detail) => {
                p(StatusCode::UNPROCESSABLE_ENTITY, "task-failed", "The task failed", detail.clone().into())
            }
            UpstreamBusy => Problem {
                retry_after: true,
                ..p(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "workers-busy",
                    "Workers at capacity",
                    "every worker is at its concurrency limit; retry after the Retry-After delay".into(),
                )
            },
            QueueFull(detail) => Problem {
                retry_after: true,
                ..p(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue-full",
                    "Job queue full",
                    format!("{detail}; retry after the Retry-After delay").into(),
                )
            },
            Conflict(detail) => p(StatusCode::CONFLICT, "conflict", "Conflict", detail.clone().into()),
            UpstreamUnavailable { upstream, .. } => Problem {
                retry_after: true,
                ..p(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-unavailable",
                    "Service unavailable",
                    format!("no {upstream} is available right now; retry after the Retry-After delay").into(),
                )
            },
            Timeout(deadline) => p(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "Deadline exceeded",
                format!(
                    "the task did not finish within its deadline of {}s; raise Request-Timeout or send less work",
                    deadline.as_secs_f64()
                )
                .into(),
            ),
            Overloaded => Problem {
                retry_after: true,
                ..p(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Gateway overloaded",
                    "the gateway is at its concurrency limit; retry after the Retry-After delay".into(),
                )
            },
            BadGateway(_) => p(
                StatusCode::BAD_GATEWAY,
                "bad-gateway",
                "Upstream failure",
                "an upstream service failed; the cause is logged with this request id".into(),
            ),
            Internal(_) => p(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the gateway failed; the cause is logged with this request id".into(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let request_id = request_id();
        if problem.status.is_server_error() {
            tracing::warn!(
                status = problem.status.as_u16(),
                request_id,
                error = &self as &dyn std::error::Error,
                "request failed"
            );
        }
        let body = serde_json::json!({
            "type": format!("urn:shoal:problem:{}", problem.slug),
            "title": problem.title,
            "status": problem.status.as_u16(),
            "detail": problem.detail,
            "instance": format!("urn:shoal:request:{request_id}"),
            "request_id": request_id,
        });
        let mut response = (problem.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if problem.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

/// The current request's id: its trace id, else a random one.
fn request_id() -> String {
    shoal_telemetry::propagation::trace_id(&tracing::Span::current())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

impl ApiError {
    /// The error for a body the JSON extractor refused; `limit` is the
    /// configured body limit, to tell the client.
    pub fn from_json(rejection: JsonRejection, limit: u64) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(e) => Self::InvalidJson(e.body_text()),
            JsonRejection::JsonDataError(e) => Self::InvalidJson(e.body_text()),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge { limit }
            }
            other => Self::UnreadableBody(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl ApiError {
    /// The error for a failed call to the worker, per the table in the
    /// [module docs](self).
    pub fn from_worker(status: tonic::Status, deadline: Duration) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Self::InvalidTask(message),
            Code::NotFound => Self::UpstreamNotFound(message),
            Code::Aborted => Self::TaskFailed(message),
            Code::ResourceExhausted => Self::UpstreamBusy,
            // `CANCELLED` reaches the gateway only when its own client-side
            // deadline timer fired first (it cancels nothing else): a timeout.
            Code::DeadlineExceeded | Code::Cancelled => Self::Timeout(deadline),
            Code::Unavailable => Self::UpstreamUnavailable { upstream: "worker", cause: message },
            code => Self::BadGateway(format!("worker answered {code:?}: {message}")),
        }
    }
}

impl ApiError {
    /// The error for a failed jobs call to the worker. Unlike tasks, a full
    /// queue is `429`: the client should slow down its submissions.
    ///
    /// | gRPC | HTTP |
    /// |---|---|
    /// | `INVALID_ARGUMENT` | 400 |
    /// | `NOT_FOUND` | 404 |
    /// | `FAILED_PRECONDITION` | 409 (the job already ended) |
    /// | `RESOURCE_EXHAUSTED` | 429 + `Retry-After` (the queue is at its bound) |
    /// | `UNAVAILABLE` | 503 + `Retry-After` (no worker, or Redis unreachable) |
    /// | `DEADLINE_EXCEEDED` | 504 |
    pub fn from_jobs(status: tonic::Status, deadline: Duration) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Self::BadRequest(message),
            Code::FailedPrecondition => Self::Conflict(message),
            Code::ResourceExhausted => Self::QueueFull(message),
            Code::Unavailable => Self::UpstreamUnavailable { upstream: "job service", cause: message },
            _ => Self::from_worker(status, deadline),
        }
    }
}

/// Turns a panic caught by the catch-panic layer into an opaque `500`.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!(panic = %message, "handler panicked");
    ApiError::Internal(message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(error: ApiError) -> (StatusCode, Option<String>, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
        let retry = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, content_type, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn problems_have_every_rfc9457_member() {
        let (status, content_type, retry, json) = body(ApiError::InvalidJson("expected value".into())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(retry, None);
        assert_eq!(json["type"], "urn:shoal:problem:invalid-json");
        assert_eq!(json["status"], 400);
        assert!(json["title"].is_string());
        assert!(json["detail"].as_str().unwrap().contains("expected value"));
        let id = json["request_id"].as_str().unwrap();
        assert_eq!(json["instance"], format!("urn:shoal:request:{id}"));
    }

    #[tokio::test]
    async fn server_errors_are_opaque() {
        let (status, _, _, json) = body(ApiError::BadGateway("secret internals".into())).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(!json["detail"].as_str().unwrap().contains("secret"));
        let (status, _, _, json) = body(ApiError::Internal("boom at line 3".into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!json["detail"].as_str().unwrap().contains("boom"));
    }

    #[tokio::test]
    async fn worker_codes_map_to_http_statuses() {
        let deadline = Duration::from_secs(1);
        let cases = [
            (tonic::Status::invalid_argument("unknown kind `x`"), 400, false),
            (tonic::Status::not_found("no such thing"), 404, false),
            (tonic::Status::aborted("boom"), 422, false),
            (tonic::Status::resource_exhausted("full"), 503, true),
            (tonic::Status::deadline_exceeded("late"), 504, false),
            (tonic::Status::cancelled("Timeout expired"), 504, false),
            (tonic::Status::unavailable("draining"), 503, true),
            (tonic::Status::internal("oops"), 502, false),
            (tonic::Status::unknown("?"), 502, false),
        ];
        for (status, expected, retry_after) in cases {
            let (got, _, retry, json) = body(ApiError::from_worker(status.clone(), deadline)).await;
            assert_eq!(got.as_u16(), expected, "{status:?}");
            assert_eq!(retry.is_some(), retry_after, "{status:?}");
            if expected < 500 {
                assert!(json["detail"].as_str().unwrap().contains(status.message()), "{json}");
            }
        }
    }

    #[tokio::test]
    async fn panics_become_opaque_500s() {
        let response = panic_response(Box::new("kaboom"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
