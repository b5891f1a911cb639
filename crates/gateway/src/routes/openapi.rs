//! `GET /openapi.json`: the API's OpenAPI 3.1 document (`crates/gateway/openapi.json`),
//! compiled into the binary, with the bounds this gateway was configured
//! with written in, so that the document served states exactly what the
//! server enforces.

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// The document, as shipped (the bounds of the default configuration).
pub const DOCUMENT: &str = include_str!("../../openapi.json");

/// The document with `--max-delay` (`max_delay_ms`) as the maximum of
/// `GET /`'s `delay_ms`: the shipped text itself when that is the default.
pub fn document(max_delay_ms: u64) -> Bytes {
    let Ok(mut document) = serde_json::from_str::<Value>(DOCUMENT) else {
        return Bytes::from_static(DOCUMENT.as_bytes());
    };
    let delay = document.pointer_mut("/paths/~1/get/parameters/0");
    match delay {
        Some(parameter) if parameter["name"] == "delay_ms" => {
            if parameter["schema"]["maximum"] == max_delay_ms {
                return Bytes::from_static(DOCUMENT.as_bytes());
            }
            parameter["schema"]["maximum"] = max_delay_ms.into();
            parameter["description"] = format!(
                "Wait this long (asynchronously) before answering, 0 to {max_delay_ms} (the gateway's `--max-delay`); for load tests."
            )
            .into();
        }
        _ => return Bytes::from_static(DOCUMENT.as_bytes()),
    }
    Bytes::from(serde_json::to_vec_pretty(&document).unwrap_or_else(|_| DOCUMENT.as_bytes().to_vec()))
}

/// Serves `document`.
pub async fn openapi(document: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_bound_serves_the_shipped_text() {
        assert_eq!(document(60_000), DOCUMENT.as_bytes());
    }

    #[test]
    fn a_configured_bound_is_written_in() {
        let served: Value = serde_json::from_slice(&document(250)).unwrap();
        let parameter = served.pointer("/paths/~1/get/parameters/0").unwrap();
        assert_eq!(parameter["name"], "delay_ms");
        assert_eq!(parameter["schema"]["maximum"], 250);
        assert!(parameter["description"].as_str().unwrap().contains("0 to 250"));
        let mut shipped: Value = serde_json::from_str(DOCUMENT).unwrap();
        shipped["paths"]["/"]["get"]["parameters"][0] = parameter.clone();
        assert_eq!(served, shipped, "only the bound changes");
    }
}
