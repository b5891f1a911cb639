//! Request telemetry for HTTP servers: a span per request (child of the
//! caller's `traceparent`, if any) and the RED metrics
//! `http_requests_total{method,endpoint,status}` and
//! `http_request_duration_seconds`.
//!
//! `endpoint` is the matched route template (`/v1/jobs/{id}`), never the raw
//! path, so label cardinality stays bounded; requests that match no route are
//! labelled `unmatched`. Add the layer with `Router::layer` so the matched
//! path is known. Health and metrics live on the admin listener and never
//! pass through here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::MatchedPath;
use http::{Request, Response};
use opentelemetry::KeyValue;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

/// The label value for requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The `method` label: the standard methods as static strings (no
/// allocation on the hot path); any other method is `other`, so a client
/// cannot mint label values.
fn method_label(method: &http::Method) -> opentelemetry::StringValue {
    use http::Method;
    let name: &'static str = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    };
    name.into()
}

/// Adds [`HttpTelemetry`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpTelemetryLayer;

impl<S> Layer<S> for HttpTelemetryLayer {
    type Service = HttpTelemetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpTelemetry { inner }
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct HttpTelemetry<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for HttpTelemetry<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let endpoint = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
        let method = method_label(request.method());
        let route = endpoint.as_deref().unwrap_or(UNMATCHED);
        let span = tracing::info_span!(
            "http.request",
            otel.name = format!("{} {route}", method.as_str()),
            otel.kind = "server",
            http.request.method = method.as_str(),
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        );
        crate::propagation::set_parent(&span, request.headers());
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ResponseFuture {
            inner: future.instrument(span),
            started: Instant::now(),
            method,
            endpoint: endpoint.unwrap_or_else(|| UNMATCHED.to_owned()),
        }
    }
}

pin_project_lite::pin_project! {
    /// Records the metrics when the response head is ready.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        started: Instant,
        method: opentelemetry::StringValue,
        endpoint: String,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = std::task::ready!(this.inner.as_mut().poll(cx));
        let status = match &result {
            Ok(response) => response.status().as_u16(),
            Err(_) => 500,
        };
        this.inner.span().record("http.response.status_code", status);
        let attributes = [
            KeyValue::new("method", this.method.clone()),
            KeyValue::new("endpoint", std::mem::take(this.endpoint)),
            KeyValue::new("status", i64::from(status)),
        ];
        crate::metrics::http_server().record(&attributes, this.started.elapsed().as_secs_f64());
        Poll::Ready(result)
    }
}
