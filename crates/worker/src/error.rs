//! Why an execution did not produce an output, and the one place where that
//! becomes a gRPC status.
//!
//! The caller's mistakes say what to fix; a task failing in its own logic is
//! `ABORTED` with the task's message verbatim (the gateway maps it to 422);
//! our own failures are `INTERNAL` with an opaque message, the cause having
//! been logged where it happened.

use std::time::Duration;

use tonic::Status;

/// The longest part of a caller-supplied kind echoed back in a message.
const ECHO_CHARS: usize = 64;

/// No kind of that name is registered: the one message for it, whether an
/// `Execute` call, a job submission or a job's delivery names it. A long
/// kind is cut in the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {noun} kind `{kind}`; this worker runs: {known}")]
pub struct UnknownKind {
    noun: &'static str,
    kind: String,
    known: String,
}

impl UnknownKind {
    /// An unknown task kind (`Execute`); `known` lists the registered names.
    pub(crate) fn task(kind: &str, known: String) -> Self {
        Self { noun: "task", kind: cut(kind), known }
    }

    /// An unknown job kind (submitted or delivered).
    pub(crate) fn job(kind: &str, known: String) -> Self {
        Self { noun: "job", kind: cut(kind), known }
    }
}

fn cut(kind: &str) -> String {
    match kind.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &kind[..cut]),
        None => kind.to_owned(),
    }
}

/// An execution that ended without an output.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// No kind of that name is registered.
    #[error(transparent)]
    UnknownKind(UnknownKind),
    /// `payload_json` is not JSON.
    #[error("payload_json is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// The payload does not fit the kind.
    #[error("kind `{kind}`: {message}")]
    InvalidPayload { kind: &'static str, message: String },
    /// The task ran and failed in its own logic.
    #[error("{message}")]
    Failed { kind: &'static str, message: String },
    /// Every concurrency slot is taken.
    #[error("worker is at its concurrency limit of {limit} tasks; retry later or on another worker")]
    Busy { limit: usize },
    /// The caller's deadline passed; the task was cancelled.
    #[error("deadline of {}ms passed; task `{kind}` was cancelled", .after.as_millis())]
    DeadlineExceeded { kind: &'static str, after: Duration },
    /// The worker is shutting down and takes no new tasks.
    #[error("worker is shutting down; retry on another worker")]
    ShuttingDown,
    /// The worker shut down before the task finished; the task was cancelled.
    #[error("worker shut down before task `{kind}` finished; it was cancelled")]
    Interrupted { kind: &'static str },
    /// Our bug; the cause was logged.
    #[error("internal error")]
    Internal,
}

impl ExecuteError {
    pub(crate) fn unknown_kind(kind: &str, known: String) -> Self {
        Self::UnknownKind(UnknownKind::task(kind, known))
    }

    /// The `outcome` label of `worker_tasks_total` for this error.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::UnknownKind(_) | Self::InvalidJson(_) | Self::InvalidPayload { .. } => "invalid",
            Self::Failed { .. } => "failed",
            Self::Busy { .. } | Self::ShuttingDown => "rejected",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::Interrupted { .. } => "cancelled",
            Self::Internal => "internal",
        }
    }
}

impl From<ExecuteError> for Status {
    fn from(error: ExecuteError) -> Self {
        let message = error.to_string();
        match error {
            ExecuteError::UnknownKind(_) | ExecuteError::InvalidJson(_) | ExecuteError::InvalidPayload { .. } => {
                Status::invalid_argument(message)
            }
            ExecuteError::Failed { .. } => Status::aborted(message),
            ExecuteError::Busy { .. } => Status::resource_exhausted(message),
            ExecuteError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            ExecuteError::ShuttingDown | ExecuteError::Interrupted { .. } => Status::unavailable(message),
            ExecuteError::Internal => Status::internal(message),
        }
    }
}

/// Replaces tonic's `OUT_OF_RANGE` for a request message over the size limit
/// with `RESOURCE_EXHAUSTED` (what gRPC specifies for it) and a message that
/// says what to do. Only that one status is touched: no handler of ours
/// returns `OUT_OF_RANGE`.
pub(crate) fn oversized_as_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != tonic::Code::OutOfRange || !status.message().contains("message length too large") {
        return response;
    }
    let replacement = Status::resource_exhausted(format!(
        "request message too large ({}); send a smaller payload",
        status.message().trim_start_matches("Error, decoded message length too large: ")
    ));
    let headers = response.headers_mut();
    headers.remove("grpc-message");
    if replacement.add_header(headers).is_err() {
        return response;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_right_codes() {
        let code = |e: ExecuteError| Status::from(e).code();
        assert_eq!(code(ExecuteError::unknown_kind("x", "echo".into())), tonic::Code::InvalidArgument);
        assert_eq!(code(ExecuteError::Failed { kind: "fail", message: "m".into() }), tonic::Code::Aborted);
        assert_eq!(code(ExecuteError::Busy { limit: 2 }), tonic::Code::ResourceExhausted);
        assert_eq!(
            code(ExecuteError::DeadlineExceeded { kind: "sleep", after: Duration::from_millis(5) }),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(code(ExecuteError::ShuttingDown), tonic::Code::Unavailable);
        let internal = Status::from(ExecuteError::Internal);
        assert_eq!((internal.code(), internal.message()), (tonic::Code::Internal, "internal error"));
    }

    #[test]
    fn failures_carry_the_task_message_verbatim() {
        let status = Status::from(ExecuteError::Failed { kind: "fail", message: "card declined".into() });
        assert_eq!(status.message(), "card declined");
    }

    #[test]
    fn long_unknown_kinds_are_cut_in_messages() {
        let message = ExecuteError::unknown_kind(&"é".repeat(1000), "echo".into()).to_string();
        assert!(message.len() < 300, "{message}");
        assert!(message.ends_with("this worker runs: echo"));
    }

    #[test]
    fn oversized_requests_become_resource_exhausted() {
        let tonic_status = Status::out_of_range(
            "Error, decoded message length too large: found 2000000 bytes, the limit is: 1048576 bytes",
        );
        let response = oversized_as_resource_exhausted(tonic_status.into_http::<()>());
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("the limit is: 1048576 bytes"), "{}", status.message());

        let other = oversized_as_resource_exhausted(Status::out_of_range("page 9 of 3").into_http::<()>());
        assert_eq!(Status::from_header_map(other.headers()).unwrap().code(), tonic::Code::OutOfRange);
    }
}

/// Why a jobs call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is malformed; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("no job with id {0}")]
    NotFound(String),
    #[error("job {id} already ended ({state}); only queued or running jobs can be cancelled")]
    AlreadyEnded { id: String, state: &'static str },
    #[error("the job queue is full ({open} unfinished jobs); retry later")]
    QueueFull { open: u64 },
    #[error("the job queue's byte budget is used up ({bytes} payload bytes of unfinished jobs); retry later")]
    QueueBytesFull { bytes: u64 },
    /// The idempotency key was used before for a different request.
    #[error(
        "idempotency key already used for job {id} with a different kind, payload or options; use a new key for a new request"
    )]
    KeyReused { id: String },
    /// Redis reached its memory limit; nothing was written.
    #[error("the job store is out of memory; nothing was accepted, retry later")]
    StoreFull,
    /// Redis is unreachable or failing; the cause was logged.
    #[error("the job store is unavailable; retry later")]
    StoreUnavailable,
    #[error("durable jobs are disabled on this worker (SHOAL_WORKER_REDIS_URL is not set)")]
    Disabled,
}

impl From<JobError> for Status {
    fn from(error: JobError) -> Self {
        let message = error.to_string();
        match error {
            JobError::Invalid(_) => Status::invalid_argument(message),
            JobError::NotFound(_) => Status::not_found(message),
            JobError::AlreadyEnded { .. } => Status::failed_precondition(message),
            JobError::QueueFull { .. } | JobError::QueueBytesFull { .. } => Status::resource_exhausted(message),
            JobError::KeyReused { .. } => Status::already_exists(message),
            JobError::StoreUnavailable | JobError::StoreFull | JobError::Disabled => Status::unavailable(message),
        }
    }
}
