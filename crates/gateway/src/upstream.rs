//! One call path per upstream: [`Upstream::call`] is the only way a route
//! reaches a worker or an aggregator.
//!
//! 1. **Readiness.** No serving endpoint → `503` at once (not a wait for the
//!    deadline).
//! 2. **Deadline.** The caller's deadline bounds every attempt together; each
//!    attempt sends what is left of it as `grpc-timeout`.
//! 3. **Retry.** An attempt the server provably did not start
//!    ([`not_started`]: the connect failed, the stream was refused with
//!    `REFUSED_STREAM`, it was above the last stream id of the server's
//!    GOAWAY, or the connection closed before it was sent) runs again — the
//!    balancer has usually dropped the endpoint by then, so it lands on
//!    another one — at most [`MAX_ATTEMPTS`] times, within the deadline. A
//!    call that may have started is never retried, unless the route's
//!    [`Policy`] says it is safe to repeat ([`Retry::Idempotent`]: reads, and
//!    job submissions, which always carry an idempotency key).
//! 4. **Mapping.** A failed call becomes an [`ApiError`] through the one
//!    gRPC → HTTP table, [`ApiError::from_status`], parameterised by the
//!    route's [`Table`].
//!
//! Errors are recognised by type, walking the `source()` chain of the
//! `tonic::Status` (`tonic::ConnectError`, `h2::Error`, `hyper::Error`),
//! never by message text.

use std::time::Duration;

use tokio::time::Instant;

use crate::discovery::{Balanced, Endpoints, GrpcChannel};
use crate::problem::{ApiError, Table};

/// Most attempts of one call (the first included).
pub const MAX_ATTEMPTS: usize = 4;
/// Pause before the second attempt; doubled for each further one.
const RETRY_BACKOFF: Duration = Duration::from_millis(5);

/// Which failed attempts may run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Only attempts the server provably did not start.
    NotStarted,
    /// Also attempts that may have started but failed with `UNAVAILABLE` or
    /// in the transport (connection reset, GOAWAY with an error): repeating
    /// the call has the same effect as running it once.
    Idempotent,
}

/// How a route calls its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub table: Table,
    pub retry: Retry,
}

impl Policy {
    /// `POST /v1/tasks/{kind}`: not idempotent.
    pub const TASK: Self = Self { table: Table::Task, retry: Retry::NotStarted };
    /// `POST /v1/jobs`: idempotent through its idempotency key.
    pub const JOB_SUBMIT: Self = Self { table: Table::Job, retry: Retry::Idempotent };
    /// `GET /v1/jobs/{id}`: a read.
    pub const JOB_READ: Self = Self { table: Table::Job, retry: Retry::Idempotent };
    /// `POST /v1/jobs/{id}/cancel`: a second cancel answers differently (`409`).
    pub const JOB_CANCEL: Self = Self { table: Table::Job, retry: Retry::NotStarted };
    /// Aggregator queries: reads.
    pub const QUERY: Self = Self { table: Table::Query, retry: Retry::Idempotent };
}

/// A balanced, health-watched upstream and its one call path.
#[derive(Debug)]
pub struct Upstream {
    name: &'static str,
    balanced: Balanced,
}

impl Upstream {
    /// Wraps `balanced`; `name` (`worker`, `aggregator`) appears in errors.
    pub fn new(name: &'static str, balanced: Balanced) -> Self {
        Self { name, balanced }
    }

    /// The upstream's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The balanced channel (for `/v1/status`'s health checks).
    pub fn channel(&self) -> GrpcChannel {
        self.balanced.channel()
    }

    /// The live address counts.
    pub fn endpoints(&self) -> Endpoints {
        self.balanced.endpoints()
    }

    /// Runs `f` (one attempt: build the client on the channel, send the
    /// request with the given `grpc-timeout`) per the [module docs](self).
    ///
    /// # Errors
    ///
    /// `503` when no endpoint serves, `504` when the deadline passes, the
    /// last attempt's status mapped by [`ApiError::from_status`].
    pub async fn call<T, F, Fut>(&self, deadline: Duration, policy: Policy, mut f: F) -> Result<T, ApiError>
    where
        F: FnMut(GrpcChannel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.ready()?;
        let until = Instant::now() + deadline;
        let attempts = async {
            let mut attempt = 1;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match f(self.balanced.channel(), left).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if attempt < MAX_ATTEMPTS && retryable(&status, policy.retry) => {
                        tracing::debug!(upstream = self.name, attempt, code = ?status.code(), "call not started, retrying");
                        tokio::time::sleep(RETRY_BACKOFF * (1 << (attempt - 1))).await;
                        self.ready()?;
                        attempt += 1;
                    }
                    Err(status) => return Err(ApiError::from_status(status, deadline, self.name, policy.table)),
                }
            }
        };
        match tokio::time::timeout_at(until, attempts).await {
            Ok(result) => result,
            // Dropping the call resets its HTTP/2 stream: the upstream cancels too.
            Err(_) => Err(ApiError::Timeout(deadline)),
        }
    }

    fn ready(&self) -> Result<(), ApiError> {
        let endpoints = self.endpoints();
        if endpoints.serving() > 0 {
            return Ok(());
        }
        let cause = if endpoints.resolved() == 0 { "no address resolved" } else { "no address serving" };
        Err(ApiError::UpstreamUnavailable { upstream: self.name, cause: cause.into() })
    }
}

fn retryable(status: &tonic::Status, retry: Retry) -> bool {
    match retry {
        Retry::NotStarted => not_started(status),
        Retry::Idempotent => status.code() == tonic::Code::Unavailable || transport_failed(status),
    }
}

/// Whether the call failed in the transport (connect, HTTP/2, socket)
/// rather than with an answer of the upstream's handler.
fn transport_failed(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>()
            || error.is::<h2::Error>()
            || error.is::<hyper::Error>()
            || error.is::<std::io::Error>()
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Whether the failed call provably never reached the server's handler.
/// The status code does not say (tonic reports a stream above the GOAWAY's
/// last id as `INTERNAL` and a request dropped unsent as `CANCELLED`): the
/// error types in its `source()` chain do.
pub fn not_started(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            // REFUSED_STREAM: the server did not process the stream. A
            // graceful (NO_ERROR) remote GOAWAY as a stream's error: the
            // stream was above the GOAWAY's last stream id (streams at or
            // below it run to completion). A GOAWAY with an error reason
            // fails every stream, started or not.
            let above_last_id = h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || above_last_id;
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && (hyper.is_canceled() || hyper.is_closed())
        {
            // The connection closed before the request was sent.
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_source(source: impl std::error::Error + Send + Sync + 'static) -> tonic::Status {
        tonic::Status::from_error(Box::new(source))
    }

    #[test]
    fn connect_errors_and_refused_streams_were_not_started() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(not_started(&with_source(tonic::ConnectError(Box::new(refused)))));
        assert!(not_started(&with_source(h2::Error::from(h2::Reason::REFUSED_STREAM))));
    }

    #[test]
    fn other_failures_may_have_started() {
        assert!(!not_started(&tonic::Status::unavailable("no source")));
        assert!(!not_started(&with_source(h2::Error::from(h2::Reason::INTERNAL_ERROR))));
        assert!(!not_started(&with_source(std::io::Error::from(std::io::ErrorKind::ConnectionReset))));
        assert!(!not_started(&tonic::Status::deadline_exceeded("late")));
    }

    #[test]
    fn idempotent_calls_also_retry_unavailable() {
        let reset = tonic::Status::unavailable("connection reset");
        assert!(retryable(&reset, Retry::Idempotent));
        assert!(!retryable(&reset, Retry::NotStarted));
        assert!(!retryable(&tonic::Status::internal("bug"), Retry::Idempotent));
        let broken = with_source(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert!(retryable(&broken, Retry::Idempotent));
        assert!(!retryable(&broken, Retry::NotStarted));
    }
}
