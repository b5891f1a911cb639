//! Per-client limits: a token bucket (requests per second with a burst) and
//! a cap on requests in flight. Both refuse with `429`, never queue.
//!
//! The bucket holds at most `burst` tokens and gains `rate` a second; each
//! request takes one. A refused request is told when a token will be there
//! (`Retry-After`, whole seconds, at least 1) and the policy
//! (`RateLimit-Policy: "client";q=<burst>;w=<burst/rate>`,
//! `RateLimit: "client";r=0;t=<seconds>`, after the IETF
//! draft-ietf-httpapi-ratelimit-headers).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One client's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Tokens gained per second.
    pub rate: f64,
    /// Most tokens held (the largest burst).
    pub burst: u32,
    /// Most requests in flight.
    pub concurrency: u32,
}

/// A refusal, with what the `429` tells the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The bucket is empty: a token comes in `retry_after_secs`.
    Rate { retry_after_secs: u64, burst: u32, window_secs: u64 },
    /// `limit` requests already in flight.
    Concurrency { limit: u32 },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The limiter of one client, shared by all of its keys and kept across
/// reloads of the keys file.
#[derive(Debug)]
pub struct ClientLimiter {
    limits: Limits,
    bucket: Arc<Mutex<Bucket>>,
    in_flight: Arc<Semaphore>,
}

impl ClientLimiter {
    pub fn new(limits: Limits) -> Self {
        let bucket = Bucket { tokens: f64::from(limits.burst), last: Instant::now() };
        Self {
            limits,
            bucket: Arc::new(Mutex::new(bucket)),
            in_flight: Arc::new(Semaphore::new(limits.concurrency as usize)),
        }
    }

    /// The limiter for new `limits`, keeping this one's tokens, and its
    /// in-flight count unless the cap changed.
    pub fn reconfigured(&self, limits: Limits) -> Arc<Self> {
        let in_flight = if limits.concurrency == self.limits.concurrency {
            self.in_flight.clone()
        } else {
            Arc::new(Semaphore::new(limits.concurrency as usize))
        };
        Arc::new(Self { limits, bucket: self.bucket.clone(), in_flight })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes a token.
    ///
    /// # Errors
    ///
    /// The bucket is empty.
    pub fn take(&self) -> Result<(), Refusal> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Result<(), Refusal> {
        let Limits { rate, burst, .. } = self.limits;
        let mut bucket = self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gained = now.saturating_duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + gained).min(f64::from(burst));
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate;
        Err(Refusal::Rate { retry_after_secs: seconds(wait), burst, window_secs: seconds(f64::from(burst) / rate) })
    }

    /// Takes up to `n` tokens, for the further jobs of one batch request
    /// (each job counts as one request): answers how many it took, and the
    /// refusal for the rest when the bucket ran out.
    pub fn take_up_to(&self, n: usize) -> (usize, Option<Refusal>) {
        self.take_up_to_at(n, Instant::now())
    }

    fn take_up_to_at(&self, n: usize, now: Instant) -> (usize, Option<Refusal>) {
        for taken in 0..n {
            if let Err(refusal) = self.take_at(now) {
                return (taken, Some(refusal));
            }
        }
        (n, None)
    }

    /// A place among the client's requests in flight, held until dropped.
    ///
    /// # Errors
    ///
    /// The client is at its cap.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| Refusal::Concurrency { limit: self.limits.concurrency })
    }
}

/// Whole seconds, rounded up, at least 1.
fn seconds(value: f64) -> u64 {
    if value.is_finite() { (value.ceil() as u64).max(1) } else { u64::MAX }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limiter = ClientLimiter::new(Limits { rate: 2.0, burst: 3, concurrency: 1 });
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take_at(start), Ok(()));
        }
        assert_eq!(limiter.take_at(start), Err(Refusal::Rate { retry_after_secs: 1, burst: 3, window_secs: 2 }));
        // Half a second at 2/s: one token.
        assert_eq!(limiter.take_at(start + Duration::from_millis(500)), Ok(()));
        assert!(limiter.take_at(start + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst only.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.take_at(later), Ok(()));
        }
        assert!(limiter.take_at(later).is_err());
    }

    #[test]
    fn slow_rates_say_how_long_to_wait() {
        let limiter = ClientLimiter::new(Limits { rate: 0.1, burst: 1, concurrency: 1 });
        let now = Instant::now();
        assert_eq!(limiter.take_at(now), Ok(()));
        assert_eq!(limiter.take_at(now), Err(Refusal::Rate { retry_after_secs: 10, burst: 1, window_secs: 10 }));
    }

    #[test]
    fn a_batch_takes_what_the_bucket_holds_and_is_told_when_more_come() {
        let limiter = ClientLimiter::new(Limits { rate: 0.5, burst: 3, concurrency: 1 });
        let now = Instant::now();
        assert_eq!(limiter.take_up_to_at(2, now), (2, None));
        let (taken, refusal) = limiter.take_up_to_at(5, now);
        assert_eq!(taken, 1);
        assert_eq!(refusal, Some(Refusal::Rate { retry_after_secs: 2, burst: 3, window_secs: 6 }));
        assert_eq!(limiter.take_up_to_at(0, now), (0, None));
    }

    #[test]
    fn concurrency_is_capped_and_released() {
        let limiter = ClientLimiter::new(Limits { rate: 1.0, burst: 1, concurrency: 2 });
        let a = limiter.enter().unwrap();
        let _b = limiter.enter().unwrap();
        assert_eq!(limiter.enter().unwrap_err(), Refusal::Concurrency { limit: 2 });
        drop(a);
        assert!(limiter.enter().is_ok());
    }

    #[test]
    fn a_reload_keeps_the_bucket() {
        let limiter = ClientLimiter::new(Limits { rate: 1.0, burst: 1, concurrency: 1 });
        limiter.take().unwrap();
        let permit = limiter.enter().unwrap();
        let same_cap = limiter.reconfigured(Limits { rate: 1.0, burst: 5, concurrency: 1 });
        assert!(same_cap.take_at(Instant::now()).is_err(), "the spent token stays spent");
        assert!(same_cap.enter().is_err(), "the in-flight request still counts");
        drop(permit);
    }
}
