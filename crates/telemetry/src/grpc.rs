//! Request telemetry for gRPC, server and client side, as tower layers over
//! the HTTP/2 requests tonic sends and receives:
//!
//! - [`ServerLayer`]: a span per call (child of the caller's `traceparent`
//!   metadata) and `grpc_server_requests_total{service,method,code}` plus
//!   `grpc_server_request_duration_seconds`;
//! - [`ClientLayer`]: a client span whose context is injected into the
//!   outgoing metadata, and the `grpc_client_*` equivalents.
//!
//! Health checks and reflection stay out of spans and metrics. The status
//! code is read from the response head: calls that fail before sending a
//! message (every unary error tonic produces) carry it there; a stream that
//! fails after its first message is counted as `OK`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use opentelemetry::KeyValue;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

/// Services whose calls are infrastructure, not traffic.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// Splits `/pkg.Service/Method` into `("pkg.Service", "Method")`.
pub fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The gRPC status code name of a response head: `grpc-status` when present
/// (trailers-only responses), `OK` for a 200 without it, else `UNKNOWN`.
fn code_of<B>(response: &Response<B>) -> &'static str {
    match response.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some(code) => code_name(code.parse().unwrap_or(2)),
        None if response.status().is_success() => "OK",
        None => "UNAVAILABLE",
    }
}

/// The canonical name of a numeric gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// Adds server-side telemetry to a tonic server (`Server::builder().layer(..)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerLayer;

impl<S> Layer<S> for ServerLayer {
    type Service = Traced<S, Server>;
    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner, side: Server }
    }
}

/// Adds client-side telemetry and trace propagation to a tonic channel.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLayer;

impl<S> Layer<S> for ClientLayer {
    type Service = Traced<S, Client>;
    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner, side: Client }
    }
}

/// Marker for the server side.
#[derive(Debug, Clone, Copy)]
pub struct Server;
/// Marker for the client side.
#[derive(Debug, Clone, Copy)]
pub struct Client;

/// Which side of a call a [`Traced`] service is on.
pub trait Side: Copy {
    fn span(service: &str, method: &str) -> tracing::Span;
    fn prepare<B>(span: &tracing::Span, request: &mut Request<B>);
    fn metrics() -> &'static crate::metrics::RequestMetrics;
}

impl Side for Server {
    fn span(service: &str, method: &str) -> tracing::Span {
        tracing::info_span!(
            "grpc.server",
            otel.name = format!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        )
    }
    fn prepare<B>(span: &tracing::Span, request: &mut Request<B>) {
        crate::propagation::set_parent(span, request.headers());
    }
    fn metrics() -> &'static crate::metrics::RequestMetrics {
        crate::metrics::grpc_server()
    }
}

impl Side for Client {
    fn span(service: &str, method: &str) -> tracing::Span {
        tracing::info_span!(
            "grpc.client",
            otel.name = format!("{service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        )
    }
    fn prepare<B>(span: &tracing::Span, request: &mut Request<B>) {
        crate::propagation::inject(span, request.headers_mut());
    }
    fn metrics() -> &'static crate::metrics::RequestMetrics {
        crate::metrics::grpc_client()
    }
}

/// A service wrapped with gRPC telemetry for one [`Side`].
#[derive(Debug, Clone)]
pub struct Traced<S, D> {
    inner: S,
    side: D,
}

impl<S, D, B, ResBody> Service<Request<B>> for Traced<S, D>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    D: Side,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TracedFuture<S::Future, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if is_infrastructure(path) {
            return TracedFuture { inner: self.inner.call(request).instrument(tracing::Span::none()), record: None };
        }
        let (service, method) = split_path(path);
        let (service, method) = (service.to_owned(), method.to_owned());
        let span = D::span(&service, &method);
        D::prepare(&span, &mut request);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        TracedFuture { inner: future.instrument(span), record: Some((Instant::now(), service, method, self.side)) }
    }
}

pin_project_lite::pin_project! {
    /// Records the call's outcome when the response head arrives.
    pub struct TracedFuture<F, D> {
        #[pin]
        inner: Instrumented<F>,
        record: Option<(Instant, String, String, D)>,
    }
}

impl<F, D, ResBody, E> Future for TracedFuture<F, D>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    D: Side,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = std::task::ready!(this.inner.as_mut().poll(cx));
        if let Some((started, service, method, _)) = this.record.take() {
            let code = match &result {
                Ok(response) => code_of(response),
                Err(_) => "UNAVAILABLE",
            };
            this.inner.span().record("rpc.grpc.status_code", code);
            // A path no service answers is any text a caller chose: one
            // bounded label instead, so random paths cannot fill the
            // series cap of the metrics everyone shares.
            let (service, method) =
                if code == "UNIMPLEMENTED" { ("unknown".to_owned(), "unknown".to_owned()) } else { (service, method) };
            let attributes =
                [KeyValue::new("service", service), KeyValue::new("method", method), KeyValue::new("code", code)];
            D::metrics().record(&attributes, started.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(split_path("/shoal.worker.v1.WorkerService/Execute"), ("shoal.worker.v1.WorkerService", "Execute"));
        assert_eq!(split_path("/odd"), ("odd", ""));
        assert!(is_infrastructure("/grpc.health.v1.Health/Check"));
        assert!(is_infrastructure("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!is_infrastructure("/shoal.worker.v1.WorkerService/Execute"));
    }

    #[test]
    fn status_codes_have_their_canonical_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(4), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(8), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(99), "UNKNOWN");
    }
}
