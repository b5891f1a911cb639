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
//! Upstream gRPC codes map through one table, [`ApiError::from_status`],
//! whose column is the route's [`Table`]: tasks (`RESOURCE_EXHAUSTED` is the
//! workers at capacity, `503`, a server-side condition, not this client's
//! rate), jobs (`RESOURCE_EXHAUSTED` is a full queue, `429`;
//! `FAILED_PRECONDITION` is `409`), aggregator queries.

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
    #[error("not authenticated: {0}")]
    Unauthenticated(crate::auth::AuthFailure),
    #[error("client over its limit: {0:?}")]
    RateLimited(crate::limits::Refusal),
    #[error("the body was not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("idempotency key reused: {0}")]
    KeyReused(String),
    #[error("batch of {got} jobs, more than {limit}")]
    TooManyJobs { limit: usize, got: usize },
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
                     POST /v1/jobs:batch, GET /v1/jobs/{{id}}, POST /v1/jobs/{{id}}/cancel, GET /v1/status and GET /v1/stats"
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
            Unauthenticated(failure) => {
                use crate::auth::AuthFailure;
                let (status, slug, title, detail) = match failure {
                    AuthFailure::Missing => (
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        "Authentication required",
                        "send an API key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`",
                    ),
                    AuthFailure::Malformed => (
                        StatusCode::UNAUTHORIZED,
                        "invalid-credential",
                        "Invalid credential",
                        "the credential is malformed: send `Authorization: Bearer <key>` or `X-Api-Key: <key>` (the same key if both)",
                    ),
                    AuthFailure::Unknown => (
                        StatusCode::UNAUTHORIZED,
                        "invalid-credential",
                        "Invalid credential",
                        "the API key is not valid (unknown, or revoked); ask for a new one",
                    ),
                    AuthFailure::ReadOnly => (
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "Forbidden",
                        "this API key may only read (GET); use a key with full access",
                    ),
                };
                p(status, slug, title, detail.into())
            }
            RateLimited(crate::limits::Refusal::Rate { retry_after_secs, .. }) => p(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("this client is over its request rate; retry after {retry_after_secs}s (Retry-After)").into(),
            ),
            RateLimited(crate::limits::Refusal::Concurrency { limit }) => p(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-concurrent",
                "Too many concurrent requests",
                format!("this client already has {limit} requests in flight; wait for one to finish").into(),
            ),
            KeyReused(detail) => p(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                format!("{detail}; an Idempotency-Key names one request: use a new key for a different job").into(),
            ),
            TooManyJobs { limit, got } => p(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-many-jobs",
                "Too many jobs in one batch",
                format!("the batch holds {got} jobs, more than the limit of {limit}; split it into smaller batches")
                    .into(),
            ),
            BodyTimeout(limit) => p(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request body too slow",
                format!("the body did not arrive within {}s; send it at once", limit.as_secs_f64()).into(),
            ),
        }
    }

    /// Headers the problem carries besides `Content-Type` and `Retry-After: 1`.
    fn extra_headers(&self, headers: &mut axum::http::HeaderMap) {
        use crate::auth::AuthFailure;
        use crate::limits::Refusal;
        let number = |n: u64| HeaderValue::from_str(&n.to_string()).unwrap_or(HeaderValue::from_static("1"));
        match self {
            Self::Unauthenticated(AuthFailure::Missing) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"shoal\""));
            }
            Self::Unauthenticated(AuthFailure::Malformed | AuthFailure::Unknown) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shoal\", error=\"invalid_token\""),
                );
            }
            Self::Unauthenticated(AuthFailure::ReadOnly) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shoal\", error=\"insufficient_scope\""),
                );
            }
            Self::RateLimited(Refusal::Rate { retry_after_secs, burst, window_secs }) => {
                headers.insert(header::RETRY_AFTER, number(*retry_after_secs));
                if let Ok(policy) = HeaderValue::from_str(&format!("\"client\";q={burst};w={window_secs}")) {
                    headers.insert("ratelimit-policy", policy);
                }
                if let Ok(state) = HeaderValue::from_str(&format!("\"client\";r=0;t={retry_after_secs}")) {
                    headers.insert("ratelimit", state);
                }
            }
            Self::RateLimited(Refusal::Concurrency { .. }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            Self::BodyTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
    }
}

impl ApiError {
    /// The problem as a JSON object and its status, for a response body or
    /// for one item of a batch. `request_id` goes into `instance`.
    fn to_json(&self, problem: &Problem, request_id: &str) -> serde_json::Value {
        serde_json::json!({
            "type": format!("urn:shoal:problem:{}", problem.slug),
            "title": problem.title,
            "status": problem.status.as_u16(),
            "detail": problem.detail,
            "instance": format!("urn:shoal:request:{request_id}"),
            "request_id": request_id,
        })
    }

    /// How long the client should wait before trying again, in seconds,
    /// when the answer says so (`Retry-After`).
    fn retry_after_secs(&self, problem: &Problem) -> Option<u64> {
        match self {
            Self::RateLimited(crate::limits::Refusal::Rate { retry_after_secs, .. }) => Some(*retry_after_secs),
            Self::RateLimited(crate::limits::Refusal::Concurrency { .. }) => Some(1),
            _ if problem.retry_after => RETRY_AFTER_SECS.parse().ok(),
            _ => None,
        }
    }

    /// This error as one item's result in a batch answer: its status and an
    /// RFC 9457 problem object, which also carries `retry_after` (seconds)
    /// where a whole response would carry `Retry-After`. A server-side
    /// failure is logged here, as [`IntoResponse`] does.
    pub fn item_problem(&self, index: usize) -> (StatusCode, serde_json::Value) {
        let problem = self.problem();
        let request_id = request_id();
        if problem.status.is_server_error() {
            tracing::warn!(
                status = problem.status.as_u16(),
                request_id,
                index,
                error = self as &dyn std::error::Error,
                "batch item failed"
            );
        }
        let mut body = self.to_json(&problem, &request_id);
        if let Some(secs) = self.retry_after_secs(&problem) {
            body["retry_after"] = secs.into();
        }
        (problem.status, body)
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
        let body = self.to_json(&problem, &request_id);
        let mut response = (problem.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if problem.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        self.extra_headers(headers);
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

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(format!("bad query string: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

/// Which column of the gRPC → HTTP table a route uses (see
/// [`ApiError::from_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `POST /v1/tasks/{kind}` on a worker.
    Task,
    /// The jobs API on a worker.
    Job,
    /// The aggregator's query API: every answer but success, unavailable and
    /// late is our own failure.
    Query,
}

impl ApiError {
    /// The one mapping of a failed gRPC call to HTTP, for every route.
    /// `upstream` names the service in `503` answers.
    ///
    /// | gRPC | task | job | query |
    /// |---|---|---|---|
    /// | `INVALID_ARGUMENT` | 400 invalid-task | 400 bad-request | 502 |
    /// | `NOT_FOUND` | 404 | 404 | 502 |
    /// | `ABORTED` | 422 (the task failed) | 422 | 502 |
    /// | `FAILED_PRECONDITION` | 502 | 409 (the job already ended) | 502 |
    /// | `ALREADY_EXISTS` | 502 | 422 (an `Idempotency-Key` reused with another request) | 502 |
    /// | `RESOURCE_EXHAUSTED` | 503 + `Retry-After` (workers at capacity) | 429 + `Retry-After` (queue full) | 502 |
    /// | `DEADLINE_EXCEEDED`, `CANCELLED` | 504 | 504 | 504 |
    /// | `UNAVAILABLE` | 503 + `Retry-After` | 503 + `Retry-After` | 503 + `Retry-After` |
    /// | anything else | 502 | 502 | 502 |
    ///
    /// `CANCELLED` reaches the gateway only when its own client-side deadline
    /// timer fired first (it cancels nothing else): a timeout, on every route.
    pub fn from_status(status: tonic::Status, deadline: Duration, upstream: &'static str, table: Table) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match (status.code(), table) {
            (Code::DeadlineExceeded | Code::Cancelled, _) => Self::Timeout(deadline),
            (Code::Unavailable, _) => Self::UpstreamUnavailable { upstream, cause: message },
            (Code::InvalidArgument, Table::Task) => Self::InvalidTask(message),
            (Code::InvalidArgument, Table::Job) => Self::BadRequest(message),
            (Code::NotFound, Table::Task | Table::Job) => Self::UpstreamNotFound(message),
            (Code::Aborted, Table::Task | Table::Job) => Self::TaskFailed(message),
            (Code::FailedPrecondition, Table::Job) => Self::Conflict(message),
            (Code::AlreadyExists, Table::Job) => Self::KeyReused(message),
            (Code::ResourceExhausted, Table::Task) => Self::UpstreamBusy,
            (Code::ResourceExhausted, Table::Job) => Self::QueueFull(message),
            (code, _) => Self::BadGateway(format!("{upstream} answered {code:?}: {message}")),
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
            let (got, _, retry, json) =
                body(ApiError::from_status(status.clone(), deadline, "worker", Table::Task)).await;
            assert_eq!(got.as_u16(), expected, "{status:?}");
            assert_eq!(retry.is_some(), retry_after, "{status:?}");
            if expected < 500 {
                assert!(json["detail"].as_str().unwrap().contains(status.message()), "{json}");
            }
        }
    }

    #[test]
    fn routes_differ_only_where_the_table_says() {
        let deadline = Duration::from_secs(1);
        let code = |status: tonic::Status, table| {
            ApiError::from_status(status, deadline, "worker", table).problem().status.as_u16()
        };
        assert_eq!(code(tonic::Status::resource_exhausted("full"), Table::Job), 429);
        assert_eq!(code(tonic::Status::failed_precondition("ended"), Table::Job), 409);
        assert_eq!(code(tonic::Status::failed_precondition("ended"), Table::Task), 502);
        assert_eq!(code(tonic::Status::invalid_argument("bad"), Table::Query), 502);
        for table in [Table::Task, Table::Job, Table::Query] {
            assert_eq!(code(tonic::Status::cancelled("Timeout expired"), table), 504);
            assert_eq!(code(tonic::Status::unavailable("gone"), table), 503);
        }
    }

    #[tokio::test]
    async fn panics_become_opaque_500s() {
        let response = panic_response(Box::new("kaboom"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
