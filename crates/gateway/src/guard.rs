//! The gateway's protective layer: a global limit on requests in flight with
//! load shedding, and panic containment, in one cheap tower layer.
//!
//! - **Load shedding.** At most `--max-in-flight` requests are served at
//!   once; a request above the bound is refused at once with a `503`
//!   problem and `Retry-After` instead of queueing (a queue in front of a
//!   saturated server only turns overload into timeouts). The permit is held
//!   until the handler's response is ready.
//! - **Panic containment.** A handler that panics (a bug: it should never
//!   happen) answers an opaque `500` problem and the panic is logged; the
//!   connection and the process survive.
//!
//! Why not `tower::limit` + `tower::load_shed` + `tower_http::catch_panic`:
//! axum's `Router::layer` applies a layer to every route separately, so
//! tower's limit would be per route rather than global, and the catch-panic
//! layer boxes every response body. Here one semaphore is shared by every
//! route, and the happy path costs one atomic acquire/release and no
//! allocation, which matters on the `GET /` benchmark path.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use futures::future::CatchUnwind;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::problem::{ApiError, panic_response};

/// Adds [`Guard`] to every route; clones share one in-flight bound.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
}

impl GuardLayer {
    /// At most `max_in_flight` requests at once (at least one).
    ///
    /// Also registers the gauge `gateway_http_requests_in_flight`, read from
    /// the semaphore when `/metrics` is scraped (so it costs nothing per
    /// request).
    pub fn new(max_in_flight: usize) -> Self {
        let max = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(max));
        let observed = Arc::downgrade(&permits);
        let _gauge = shoal_telemetry::metrics::meter("shoal-gateway")
            .u64_observable_gauge("gateway_http_requests_in_flight")
            .with_description("Requests the public HTTP listener is serving now")
            .with_callback(move |observer| {
                if let Some(permits) = observed.upgrade() {
                    observer.observe(max.saturating_sub(permits.available_permits()) as u64, &[]);
                }
            })
            .build();
        Self { permits }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Guard { inner, permits: self.permits.clone() }
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, R> Service<R> for Guard<S>
where
    S: Service<R, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return GuardFuture::Shed;
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(inner) => GuardFuture::Admitted { inner: AssertUnwindSafe(inner).catch_unwind(), _permit: permit },
            Err(panic) => GuardFuture::Panicked { panic: Some(panic) },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`Guard`]ed request.
    #[project = GuardProjection]
    pub enum GuardFuture<F> {
        Admitted { #[pin] inner: CatchUnwind<AssertUnwindSafe<F>>, _permit: OwnedSemaphorePermit },
        Shed,
        Panicked { panic: Option<Box<dyn Any + Send>> },
    }
}

impl<F, E> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardProjection::Admitted { inner, .. } => match std::task::ready!(inner.poll(cx)) {
                Ok(result) => Poll::Ready(result),
                Err(panic) => Poll::Ready(Ok(panic_response(panic))),
            },
            // Built here rather than in `call`, so the problem carries the
            // request's trace id (the telemetry layer enters its span on poll).
            GuardProjection::Shed => Poll::Ready(Ok(ApiError::Overloaded.into_response())),
            GuardProjection::Panicked { panic } => {
                let panic = panic.take().unwrap_or_else(|| Box::new("polled after completion"));
                Poll::Ready(Ok(panic_response(panic)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::http::StatusCode;
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn requests_above_the_bound_are_shed_with_503() {
        let layer = GuardLayer::new(1);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let slow = layer.layer(tower::service_fn(move |(): ()| {
            let released = released.clone();
            async move {
                if let Some(rx) = released.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<_, Infallible>(StatusCode::OK.into_response())
            }
        }));
        let first = tokio::spawn(slow.clone().oneshot(()));
        // Wait (bounded) until the first request holds the only permit.
        for _ in 0..1000 {
            if layer.permits.available_permits() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(layer.permits.available_permits(), 0);
        let shed = slow.clone().oneshot(()).await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(shed.headers().contains_key("retry-after"));
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(layer.permits.available_permits(), 1);
    }

    #[tokio::test]
    async fn panics_become_500_problems() {
        let service = GuardLayer::new(4).layer(tower::service_fn(|fail: bool| async move {
            assert!(!fail, "handler bug");
            Ok::<_, Infallible>(StatusCode::OK.into_response())
        }));
        let response = service.clone().oneshot(true).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        assert_eq!(service.oneshot(false).await.unwrap().status(), StatusCode::OK);
    }
}
