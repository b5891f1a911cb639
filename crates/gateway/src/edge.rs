//! The admission of a request to `/v1/*`, in this order, each step cheaper
//! than the next:
//!
//! 1. **Authentication** ([`crate::auth`]): `401`/`403` problems.
//! 2. **The client's rate** ([`crate::limits`]): `429`.
//! 3. **The body**, read whole here within `--body-read-timeout` (`408`)
//!    and `--max-body-bytes` (`413`), *before* any in-flight place is taken:
//!    a slow upload holds a connection, never a permit.
//! 4. **The client's concurrency cap**: `429`, held until the response is
//!    ready; the gateway-wide bound ([`crate::guard`]) comes after this layer.
//!
//! `GET /` and `GET /openapi.json` are open and skip all of it. With
//! `--auth none` only step 3 runs, and every caller is the same anonymous
//! client (no owner on its jobs).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use crate::auth::{Client, Keys};
use crate::problem::ApiError;

/// What the admission layer needs.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    /// `None`: `--auth none`.
    pub keys: Option<Keys>,
    pub max_body_bytes: u64,
    pub body_read_timeout: Duration,
}

/// The authenticated caller, for handlers: its id is the owner of its jobs.
#[derive(Debug, Clone, Default)]
pub struct Caller(Option<Arc<Client>>);

impl Caller {
    /// The owner of the caller's jobs (`None` without authentication).
    pub fn owner(&self) -> Option<String> {
        self.0.as_ref().map(|client| client.id.to_string())
    }

    /// Takes `n` more of the client's rate tokens (a batch's jobs after the
    /// first, which the request's own token paid for): how many it got, and
    /// the refusal for the rest. Without authentication there is no limit.
    pub fn take_more(&self, n: usize) -> (usize, Option<crate::limits::Refusal>) {
        match &self.0 {
            None => (n, None),
            Some(client) => client.limiter.take_up_to(n),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

/// Whether `path` is under the authenticated API.
fn protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The middleware: see the [module docs](self).
pub(crate) async fn admit(State(admission): State<Arc<Admission>>, request: Request, next: Next) -> Response {
    if !protected(request.uri().path()) {
        return next.run(request).await;
    }
    let client = match &admission.keys {
        None => None,
        Some(keys) => match keys.authenticate(request.method(), request.headers()) {
            Ok(client) => Some(client),
            Err(failure) => return ApiError::Unauthenticated(failure).into_response(),
        },
    };
    if let Some(client) = &client
        && let Err(refusal) = client.limiter.take()
    {
        return ApiError::RateLimited(refusal).into_response();
    }
    let request = match read_body(request, &admission).await {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let _permit = match &client {
        None => None,
        Some(client) => match client.limiter.enter() {
            Ok(permit) => Some(permit),
            Err(refusal) => return ApiError::RateLimited(refusal).into_response(),
        },
    };
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(Caller(client));
    next.run(Request::from_parts(parts, body)).await
}

/// The request with its body read into memory, within the time and size
/// limits.
async fn read_body(request: Request, admission: &Admission) -> Result<Request, ApiError> {
    use axum::body::HttpBody as _;
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return Ok(Request::from_parts(parts, body));
    }
    let limit = admission.max_body_bytes;
    if body.size_hint().lower() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match tokio::time::timeout(admission.body_read_timeout, limited.collect()).await {
        Err(_) => return Err(ApiError::BodyTimeout(admission.body_read_timeout)),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        Ok(Err(error)) => return Err(ApiError::UnreadableBody(error.to_string())),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_v1_api_is_protected() {
        for path in ["/v1", "/v1/tasks/echo", "/v1/jobs/x", "/v1/unknown"] {
            assert!(protected(path), "{path}");
        }
        for path in ["/", "/openapi.json", "/v10", "/v1x/jobs"] {
            assert!(!protected(path), "{path}");
        }
    }
}
