//! `shoal.worker.v1.WorkerService` over the [`Runner`]: reads the call's
//! deadline, runs the task, and turns the result into a response or a status.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::worker::v1::worker_service_server::WorkerService;
use shoal_proto::worker::v1::{
    CancelJobRequest, ExecuteRequest, ExecuteResponse, GetJobRequest, Job, KindInfo, ListKindsRequest,
    ListKindsResponse, SubmitJobRequest, SubmitJobResponse, SubmitJobsRequest, SubmitJobsResponse,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::jobs::JobsApi;
use crate::runner::Runner;

/// How much earlier than the caller's deadline the worker gives up. Tonic
/// enforces `grpc-timeout` itself by dropping the call and answering
/// `CANCELLED`; answering first lets the caller see `DEADLINE_EXCEEDED`.
const DEADLINE_MARGIN: Duration = Duration::from_millis(25);

/// The gRPC face of a worker.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub(crate) runner: Arc<Runner>,
    pub(crate) worker_id: Arc<str>,
    pub(crate) jobs: JobsApi,
}

#[tonic::async_trait]
impl WorkerService for Service {
    // No span of its own: the telemetry layer's `grpc.server` span covers the
    // call, and the caller's `kind` (unbounded text) stays out of logs until
    // the runner has matched it to a registered name.
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let deadline = deadline(request.metadata());
        let ExecuteRequest { kind, payload_json } = request.into_inner();
        let outcome = self.runner.execute(&kind, &payload_json, deadline).await?;
        Ok(Response::new(ExecuteResponse {
            output_json: outcome.output.to_string(),
            worker_id: self.worker_id.to_string(),
            duration_us: u64::try_from(outcome.duration.as_micros()).unwrap_or(u64::MAX),
        }))
    }

    async fn list_kinds(&self, _request: Request<ListKindsRequest>) -> Result<Response<ListKindsResponse>, Status> {
        let kinds = self
            .runner
            .registry()
            .kinds()
            .map(|task| KindInfo { name: task.name().to_owned(), description: task.description().to_owned() })
            .collect();
        Ok(Response::new(ListKindsResponse { kinds, worker_id: self.worker_id.to_string() }))
    }

    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        Ok(Response::new(self.jobs.submit(request.into_inner(), current_traceparent()).await?))
    }

    async fn submit_jobs(&self, request: Request<SubmitJobsRequest>) -> Result<Response<SubmitJobsResponse>, Status> {
        Ok(Response::new(self.jobs.submit_many(request.into_inner(), current_traceparent()).await?))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let GetJobRequest { id, owner } = request.into_inner();
        Ok(Response::new(self.jobs.get(&id, owner.as_deref()).await?))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let CancelJobRequest { id, owner } = request.into_inner();
        Ok(Response::new(self.jobs.cancel(&id, owner.as_deref()).await?))
    }
}

/// The W3C `traceparent` of the current span (the call's `grpc.server`
/// span, a child of the caller's trace), to store with a submitted job.
fn current_traceparent() -> Option<String> {
    let mut headers = http::HeaderMap::new();
    shoal_telemetry::propagation::inject(&tracing::Span::current(), &mut headers);
    headers.get("traceparent").and_then(|value| value.to_str().ok()).map(str::to_owned)
}

/// When the worker stops the call: the caller's `grpc-timeout` (if any),
/// less [`DEADLINE_MARGIN`].
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN))
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
