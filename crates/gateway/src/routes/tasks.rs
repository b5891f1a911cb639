//! `POST /v1/tasks/{kind}`: runs one task on a worker over gRPC.
//!
//! The body is the task's JSON payload (`Content-Type: application/json`,
//! at most `--max-body-bytes`). The answer is
//! `200 {"kind", "output", "worker_id", "duration_us"}`.
//!
//! **Deadline.** A `Request-Timeout` header (seconds, decimals allowed:
//! `2.5`) sets the call's deadline, else `--default-timeout`. A value above
//! `--max-timeout` is clamped to it (the client said how long it is willing
//! to wait; waiting less honours that). Zero, negative, or non-numeric values
//! are a `400`. The deadline is sent to the worker as `grpc-timeout`, so it
//! stops working when the caller stops waiting, and also bounds this handler:
//! when it passes, the answer is `504` and the gRPC call is cancelled.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shoal_proto::worker::v1::ExecuteRequest;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;

use super::AppState;
use crate::body::RawJson;
use crate::problem::ApiError;
use crate::upstream::Policy;

/// The header that carries the caller's deadline, in seconds.
pub const REQUEST_TIMEOUT: &str = "request-timeout";

/// A task kind as it appears in the path: 1 to 64 of `a-z 0-9 - _ .`.
/// Whether a worker knows the kind is the worker's to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskKind(String);

impl TaskKind {
    const MAX_LEN: usize = 64;

    fn parse(text: String) -> Result<Self, ApiError> {
        let valid = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if valid {
            Ok(Self(text))
        } else {
            let shown: String = text.chars().take(Self::MAX_LEN).collect();
            Err(ApiError::BadRequest(format!(
                "task kind `{shown}` is not valid: use 1 to {} characters among a-z, 0-9, `-`, `_`, `.`",
                Self::MAX_LEN
            )))
        }
    }
}

/// The call's deadline from the `Request-Timeout` header, per the
/// [module docs](self).
pub fn deadline(header: Option<&HeaderValue>, default: Duration, max: Duration) -> Result<Duration, ApiError> {
    let Some(header) = header else {
        return Ok(default);
    };
    let text = header.to_str().unwrap_or_default().trim();
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => {
            Ok(Duration::try_from_secs_f64(seconds).unwrap_or(max).min(max))
        }
        _ => {
            let shown: String = text.chars().take(32).collect();
            Err(ApiError::BadRequest(format!(
                "Request-Timeout must be a positive number of seconds such as `2.5`, got `{shown}`"
            )))
        }
    }
}

#[derive(Serialize)]
struct TaskResult {
    kind: String,
    output: Box<serde_json::value::RawValue>,
    worker_id: String,
    duration_us: u64,
}

/// Runs the task on a worker.
///
/// # Errors
///
/// Bad input (`400`, `413`, `415`), the worker's errors mapped by
/// [`ApiError::from_status`], `504` when the deadline passes.
pub async fn execute(
    State(state): State<AppState>,
    kind: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    RawJson(payload): RawJson,
) -> Result<Response, ApiError> {
    let TaskKind(kind) = TaskKind::parse(kind?.0)?;
    let deadline = deadline(headers.get(REQUEST_TIMEOUT), state.default_timeout, state.max_timeout)?;
    let message = ExecuteRequest { kind: kind.clone(), payload_json: payload };
    let started = Instant::now();
    let response = state
        .worker
        .call(deadline, Policy::TASK, |channel, left| {
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(left);
            async move { WorkerServiceClient::new(channel).execute(request).await }
        })
        .await?;
    crate::body::validate(response.output_json.as_bytes()).map_err(|error| {
        ApiError::BadGateway(format!("worker {} returned invalid output JSON: {error}", response.worker_id))
    })?;
    let output = crate::body::raw(response.output_json);
    tracing::debug!(worker_id = %response.worker_id, elapsed_us = started.elapsed().as_micros() as u64, "task done");
    Ok(Json(TaskResult { kind, output, worker_id: response.worker_id, duration_us: response.duration_us })
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Duration = Duration::from_secs(10);
    const MAX: Duration = Duration::from_secs(60);

    fn parse(value: &str) -> Result<Duration, ApiError> {
        deadline(Some(&HeaderValue::from_str(value).unwrap()), DEFAULT, MAX)
    }

    #[test]
    fn deadlines_come_from_the_header_in_seconds() {
        assert_eq!(deadline(None, DEFAULT, MAX).unwrap(), DEFAULT);
        assert_eq!(parse("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse(" 1 ").unwrap(), Duration::from_secs(1));
        assert_eq!(parse("0.3").unwrap(), Duration::from_millis(300));
    }

    #[test]
    fn long_deadlines_are_clamped_to_the_max() {
        assert_eq!(parse("3600").unwrap(), MAX);
        assert_eq!(parse("1e300").unwrap(), MAX);
    }

    #[test]
    fn bad_deadlines_are_client_errors() {
        for bad in ["", "abc", "0", "-1", "NaN", "inf", "1s"] {
            match parse(bad) {
                Err(ApiError::BadRequest(detail)) => assert!(detail.contains("Request-Timeout"), "{detail}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn kinds_are_checked_at_the_boundary() {
        assert_eq!(TaskKind::parse("echo".into()).unwrap(), TaskKind("echo".into()));
        assert!(TaskKind::parse("hash_v2.fast-1".into()).is_ok());
        for bad in ["", "Echo", "a b", "x/y", &"k".repeat(65)] {
            assert!(TaskKind::parse(bad.to_owned()).is_err(), "{bad}");
        }
    }
}
