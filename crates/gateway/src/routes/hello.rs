//! `GET /`: the blueprint's endpoint, and the benchmark hot path: a static
//! body, no allocation unless a query string is present.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::problem::ApiError;

/// The places of `GET /?delay_ms=N` requests waiting at once
/// (`--max-delayed`: above it they are shed with `503`), and the longest
/// accepted `delay_ms` (`--max-delay`, one minute by default).
#[derive(Debug, Clone)]
pub struct Delayed {
    pub places: Arc<Semaphore>,
    pub max_ms: u64,
}

const BODY: &str = r#"{"message":"Hello, Prometheus!"}"#;

/// `{"message": "Hello, Prometheus!"}`, after waiting `?delay_ms=N`
/// milliseconds (asynchronously, at most `--max-delay`) when asked, if
/// fewer than `--max-delayed` others are waiting.
///
/// # Errors
///
/// `400` when `delay_ms` is not an integer in `0..=max`; `503` when
/// `--max-delayed` requests are already waiting.
pub async fn hello(delayed: Delayed, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    if let Some(delay) = query.as_deref().map(|query| delay(query, delayed.max_ms)).transpose()?.flatten() {
        let _place = delayed.places.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded)?;
        tokio::time::sleep(delay).await;
    }
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], BODY).into_response())
}

/// The `delay_ms` parameter of a query string, if present.
fn delay(query: &str, max_ms: u64) -> Result<Option<Duration>, ApiError> {
    let Some(value) = query.split('&').find_map(|pair| pair.strip_prefix("delay_ms=")) else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms <= max_ms => Ok(Some(Duration::from_millis(ms))),
        _ => Err(ApiError::BadRequest(format!(
            "query parameter delay_ms must be an integer number of milliseconds from 0 to {max_ms}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 60_000;

    #[test]
    fn delay_is_read_from_the_query() {
        assert_eq!(delay("delay_ms=1500", MAX).unwrap(), Some(Duration::from_millis(1500)));
        assert_eq!(delay("x=1&delay_ms=0", MAX).unwrap(), Some(Duration::ZERO));
        assert_eq!(delay("x=1", MAX).unwrap(), None);
        assert_eq!(delay("", MAX).unwrap(), None);
        assert_eq!(delay("delay_ms=200", 200).unwrap(), Some(Duration::from_millis(200)));
        assert!(delay("delay_ms=201", 200).is_err());
    }

    #[test]
    fn bad_delays_are_refused() {
        for bad in ["delay_ms=", "delay_ms=-1", "delay_ms=1.5", "delay_ms=60001", "delay_ms=abc"] {
            assert!(delay(bad, MAX).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_body_is_the_blueprints() {
        let json: serde_json::Value = serde_json::from_str(BODY).unwrap();
        assert_eq!(json, serde_json::json!({"message": "Hello, Prometheus!"}));
    }
}
