//! JSON bodies forwarded without building a value tree: a 1 MiB array such
//! as `[0,0,0,…]` parsed into a `serde_json::Value` takes ~16–24 MiB, and
//! a large integer would be rounded to an `f64`. [`RawJson`] only checks the
//! syntax (serde's `IgnoredAny`: nothing is kept) and the nesting depth (at
//! most [`MAX_DEPTH`]), and forwards the bytes as they came; [`raw`] wraps
//! JSON text an upstream returned.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde_json::value::RawValue;

use crate::problem::ApiError;
use crate::routes::AppState;

/// A JSON body, syntax-checked, as text.
#[derive(Debug)]
pub struct RawJson(pub String);

impl FromRequest<AppState> for RawJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.max_body_bytes;
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::UnreadableBody(rejection.body_text())
            }
        })?;
        validate(&bytes)?;
        // Valid JSON is UTF-8; the check is kept so no invalid text travels.
        String::from_utf8(Vec::from(bytes)).map(Self).map_err(|error| ApiError::InvalidJson(error.to_string()))
    }
}

/// Checks that `bytes` is one JSON document, building nothing.
///
/// # Errors
///
/// The syntax error, or nesting over the recursion limit.
pub fn validate(bytes: &[u8]) -> Result<(), ApiError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|error| ApiError::InvalidJson(error.to_string()))?;
    if let Some(at) = lone_surrogate(bytes) {
        return Err(ApiError::InvalidJson(format!(
            "a string holds a lone UTF-16 surrogate escape at byte {at}; strings must be Unicode text (I-JSON, RFC 7493)"
        )));
    }
    let depth = depth(bytes);
    if depth > MAX_DEPTH {
        return Err(ApiError::InvalidJson(format!(
            "arrays and objects nest {depth} deep, more than the limit of {MAX_DEPTH}"
        )));
    }
    Ok(())
}

/// Deepest nesting of arrays and objects accepted (serde_json, which the
/// worker parses with, stops at 128).
pub const MAX_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in valid JSON text, in one pass
/// over the bytes (brackets inside strings do not count).
fn depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The offset of the first `\uXXXX` escape in valid JSON text that is a
/// UTF-16 surrogate without its other half (`"\ud800"`): RFC 8259 leaves
/// its meaning undefined and I-JSON (RFC 7493) forbids it. serde's
/// `IgnoredAny` and `RawValue` do not decode escapes, so this is checked
/// here, in one pass, for every body.
fn lone_surrogate(bytes: &[u8]) -> Option<usize> {
    let unit = |at: usize| -> Option<u16> {
        let hex = bytes.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if bytes.get(i + 1) == Some(&b'u') {
                    let code = unit(i + 2)?;
                    if (0xDC00..=0xDFFF).contains(&code) {
                        return Some(i);
                    }
                    if (0xD800..=0xDBFF).contains(&code) {
                        let low = (bytes.get(i + 6..i + 8) == Some(&b"\\u"[..])).then(|| unit(i + 8)).flatten();
                        if !low.is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) {
                            return Some(i);
                        }
                        i += 6;
                    }
                    i += 5;
                } else {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// [`shoal_service::json::whole_number`] for an optional field (with
/// `#[serde(default)]`): absent is `None`.
///
/// # Errors
///
/// The deserializer's error for anything but a whole number.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    shoal_service::json::whole_number(deserializer).map(Some)
}

/// `Content-Type: application/json` (or `application/<x>+json`).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// JSON text from an upstream, embedded as is; text that is not JSON is
/// embedded as a JSON string.
pub fn raw(text: String) -> Box<RawValue> {
    if validate(text.as_bytes()).is_ok()
        && let Ok(value) = RawValue::from_string(text.clone())
    {
        return value;
    }
    serde_json::value::to_raw_value(&text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_is_checked_without_a_tree() {
        assert!(validate(b"[0,0,0]").is_ok());
        assert!(validate(br#"{"n": 123456789012345678901234567890}"#).is_ok());
        for bad in [&b""[..], b"[1,", b"{} {}", b"nul"] {
            assert!(validate(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let error = validate(deep.as_bytes()).unwrap_err().to_string();
        assert!(error.contains("65 deep"), "{error}");
        // I-JSON (RFC 7493): a lone surrogate escape is not text; a pair is.
        for lone in [&br#""\ud800""#[..], br#"{"\udc00": 1}"#, br#"["a\ud83d"]"#] {
            assert!(validate(lone).is_err(), "{}", String::from_utf8_lossy(lone));
        }
        assert!(validate(br#""\ud83d\ude00""#).is_ok());
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(validate(ok.as_bytes()).is_ok());
        assert_eq!(depth(br#"{"a": "[[[\"[[", "b": [{}]}"#), 3);
    }

    #[test]
    fn integers_may_carry_a_zero_fraction() {
        #[derive(Debug, serde::Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "whole_number")]
            n: Option<u64>,
        }
        let n = |text: &str| serde_json::from_str::<Body>(text).map(|b| b.n).map_err(|e| e.to_string());
        assert_eq!(n("{}"), Ok(None));
        assert_eq!(n(r#"{"n": 31152}"#), Ok(Some(31152)));
        assert_eq!(n(r#"{"n": 31152.0}"#), Ok(Some(31152)));
        assert_eq!(n(r#"{"n": 3.1152e4}"#), Ok(Some(31152)));
        assert!(n(r#"{"n": 1.5}"#).unwrap_err().contains("invalid type: floating point `1.5`"));
        assert!(n(r#"{"n": -1}"#).unwrap_err().contains("invalid value: integer `-1`"));
        assert!(n(r#"{"n": 1e300}"#).unwrap_err().contains("invalid value"));
        assert!(n(r#"{"n": null}"#).unwrap_err().contains("invalid type: null"));
    }

    #[test]
    fn upstream_text_is_embedded_exactly() {
        assert_eq!(raw("123456789012345678901234567890".into()).get(), "123456789012345678901234567890");
        assert_eq!(raw("not json".into()).get(), r#""not json""#);
    }

    #[test]
    fn json_media_types() {
        for (value, json) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_json(&headers), json, "{value}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
