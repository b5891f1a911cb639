//! `GET /`: the blueprint's endpoint, and the benchmark hot path: a static
//! body, no allocation unless a query string is present.

use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::problem::ApiError;

/// Longest accepted `delay_ms`: one minute.
pub const MAX_DELAY_MS: u64 = 60_000;

const BODY: &str = r#"{"message":"Hello, Prometheus!"}"#;

/// `{"message": "Hello, Prometheus!"}`, after waiting `?delay_ms=N`
/// milliseconds (asynchronously, at most [`MAX_DELAY_MS`]) when asked.
///
/// # Errors
///
/// `400` when `delay_ms` is not an integer in `0..=60000`.
pub async fn hello(RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    if let Some(delay) = query.as_deref().map(delay).transpose()?.flatten() {
        tokio::time::sleep(delay).await;
    }
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], BODY).into_response())
}

/// The `delay_ms` parameter of a query string, if present.
fn delay(query: &str) -> Result<Option<Duration>, ApiError> {
    let Some(value) = query.split('&').find_map(|pair| pair.strip_prefix("delay_ms=")) else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_DELAY_MS => Ok(Some(Duration::from_millis(ms))),
        _ => Err(ApiError::BadRequest(format!(
            "query parameter delay_ms must be an integer number of milliseconds from 0 to {MAX_DELAY_MS}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_read_from_the_query() {
        assert_eq!(delay("delay_ms=1500").unwrap(), Some(Duration::from_millis(1500)));
        assert_eq!(delay("x=1&delay_ms=0").unwrap(), Some(Duration::ZERO));
        assert_eq!(delay("x=1").unwrap(), None);
        assert_eq!(delay("").unwrap(), None);
    }

    #[test]
    fn bad_delays_are_refused() {
        for bad in ["delay_ms=", "delay_ms=-1", "delay_ms=1.5", "delay_ms=60001", "delay_ms=abc"] {
            assert!(delay(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_body_is_the_blueprints() {
        let json: serde_json::Value = serde_json::from_str(BODY).unwrap();
        assert_eq!(json, serde_json::json!({"message": "Hello, Prometheus!"}));
    }
}
