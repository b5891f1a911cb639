//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`: the
//! standard OTLP push, so any OpenTelemetry SDK or collector can push.
//!
//! A push that is partly rejected (a metric over the cardinality limit, a
//! malformed point, histogram bounds that differ, a kind change, a source
//! over its push rate) still succeeds for the rest: the response is `OK`
//! with `partial_success` set, `rejected_data_points` counting the rejected
//! points and `error_message` naming each rejected metric and why. This is
//! how OTLP asks servers to report a partial acceptance (a non-OK status
//! would make the SDK retry or drop the whole batch, including the accepted
//! part). A request that cannot be decoded at all gets tonic's `INTERNAL`
//! decode status; an empty request is a successful no-op.
//!
//! In front of the service, [`IngestGuard`] checks the bearer token (when
//! one is configured) from the request headers, before a byte of the body
//! is read, and bounds how many requests are decoded and applied at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::server::NamedService;
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

/// How long a push waits for an ingestion slot before `UNAVAILABLE` (which
/// OTLP exporters retry with backoff).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Authentication and a concurrency bound in front of the OTLP service.
#[derive(Debug, Clone)]
pub(crate) struct IngestGuard<S> {
    inner: S,
    /// The expected `authorization` header value (`Bearer <token>`).
    expected: Option<Arc<str>>,
    slots: Arc<Semaphore>,
}

impl<S> IngestGuard<S> {
    pub(crate) fn new(inner: S, token: Option<&str>, concurrency: usize) -> Self {
        Self {
            inner,
            expected: token.map(|t| Arc::from(format!("Bearer {t}"))),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> tower::Service<http::Request<Body>> for IngestGuard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(expected) = &self.expected {
            let given = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
            if !same_secret(given, expected.as_bytes()) {
                let status = Status::unauthenticated("a valid bearer token is required to push metrics");
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let slots = self.slots.clone();
        // The clone is ready (tonic's generated services always are).
        let mut inner = self.inner.clone();
        Box::pin(async move {
            // Bounded: a request waiting here holds its unread body in the
            // connection's flow-control window, which could stall the
            // requests being read on the same connection.
            let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, slots.acquire_owned()).await else {
                return Ok(Status::unavailable("too many pushes being applied; retry").into_http());
            };
            inner.call(request).await
        })
    }
}

impl<S: NamedService> NamedService for IngestGuard<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"Bearer abc", b"Bearer abc"));
        assert!(!same_secret(b"Bearer abd", b"Bearer abc"));
        assert!(!same_secret(b"Bearer ab", b"Bearer abc"));
        assert!(!same_secret(b"", b"Bearer abc"));
    }
}
