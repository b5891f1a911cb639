//! A short-lived cache in front of `GET /v1/stats`: each call fans out to
//! five full-scan window queries on the aggregator, so a burst of dashboards
//! (or a hostile client) must not multiply them. A `200` answer is kept for
//! `--stats-cache-ttl` per query string and served with an `Age` header;
//! concurrent misses of one query string wait for the first one's answer
//! (one upstream fan-out, not one per caller). At most [`MAX_ENTRIES`]
//! query strings are kept; past that, answers pass through uncached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

/// Most query strings cached at once.
pub const MAX_ENTRIES: usize = 256;

/// Largest answer kept.
const MAX_CACHED_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug)]
struct Entry {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct ResponseCache {
    ttl: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

impl ResponseCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self { ttl, slots: Mutex::new(HashMap::new()) }
    }

    /// The slot of `key`, unless the cache is full of live entries.
    fn slot(&self, key: &str) -> Option<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = slots.get(key) {
            return Some(slot.clone());
        }
        if slots.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            // A slot in use (locked) is kept; an expired or empty one goes.
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(entry) => entry.as_ref().is_some_and(|entry| entry.at.elapsed() < ttl),
                Err(_) => true,
            });
            if slots.len() >= MAX_ENTRIES {
                return None;
            }
        }
        let slot = Slot::default();
        slots.insert(key.to_owned(), slot.clone());
        Some(slot)
    }
}

/// The middleware.
pub(crate) async fn cached(State(cache): State<Arc<ResponseCache>>, request: Request, next: Next) -> Response {
    if cache.ttl.is_zero() {
        return next.run(request).await;
    }
    let key = request.uri().query().unwrap_or_default().to_owned();
    let Some(slot) = cache.slot(&key) else {
        return next.run(request).await;
    };
    let mut entry = slot.lock().await;
    if let Some(hit) = entry.as_ref() {
        let age = hit.at.elapsed();
        if age < cache.ttl {
            let mut response = Response::new(Body::from(hit.body.clone()));
            *response.headers_mut() = hit.headers.clone();
            response.headers_mut().insert(header::AGE, HeaderValue::from(age.as_secs()));
            return response;
        }
    }
    let response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, MAX_CACHED_BYTES).await {
        Ok(bytes) => {
            *entry = Some(Entry { at: Instant::now(), headers: parts.headers.clone(), body: bytes.clone() });
            Response::from_parts(parts, Body::from(bytes))
        }
        Err(error) => axum::response::IntoResponse::into_response(crate::problem::ApiError::Internal(format!(
            "stats answer not buffered: {error}"
        ))),
    }
}
