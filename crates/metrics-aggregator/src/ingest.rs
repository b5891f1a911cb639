//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`: the
//! standard OTLP push, so any OpenTelemetry SDK or collector can push.
//!
//! A push that is partly rejected (a metric over the cardinality limit, a
//! malformed point, histogram bounds that differ, a kind change) still
//! succeeds for the rest: the response is `OK` with `partial_success` set,
//! `rejected_data_points` counting the rejected points and `error_message`
//! naming each rejected metric and why. This is how OTLP asks servers to
//! report a partial acceptance (a non-OK status would make the SDK retry or
//! drop the whole batch, including the accepted part). A request that cannot
//! be decoded at all gets tonic's `INTERNAL` decode status; an empty request
//! is a successful no-op.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tonic::{Request, Response, Status};

use crate::fleet::Fleet;

#[derive(Debug, Clone)]
pub(crate) struct IngestService {
    pub(crate) fleet: Arc<Fleet>,
}

#[tonic::async_trait]
impl MetricsService for IngestService {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let request = request.into_inner();
        if request.resource_metrics.is_empty() {
            return Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }));
        }
        let fleet = self.fleet.clone();
        let outcome = tokio::task::spawn_blocking(move || fleet.export(request)).await.map_err(|error| {
            tracing::error!(error = %error, "ingest task failed");
            Status::internal("internal error")
        })?;
        let partial_success = (outcome.rejected > 0).then(|| {
            let error_message = outcome.message();
            tracing::debug!(rejected = outcome.rejected, error_message, "push partly rejected");
            ExportMetricsPartialSuccess { rejected_data_points: outcome.rejected as i64, error_message }
        });
        Ok(Response::new(ExportMetricsServiceResponse { partial_success }))
    }
}
