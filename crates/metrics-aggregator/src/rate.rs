//! Per-source push rate limits: a token bucket per source (pushes per
//! second, a burst of twice as many), so one noisy or hostile source cannot
//! take the ingestion slots and the store's lock from the others. Bounded:
//! at most [`MAX_TRACKED`] buckets; beyond, buckets that are full again (their
//! source has been quiet) are forgotten first, then the oldest.

use std::collections::HashMap;

use crate::source::SourceId;

/// Most sources whose bucket is kept.
pub const MAX_TRACKED: usize = 8192;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets by source.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<SourceId, Bucket>,
}

impl RateLimiter {
    /// `per_second` pushes per source (positive, checked by the config).
    pub fn new(per_second: f64) -> Self {
        Self { per_second, burst: (2.0 * per_second).max(1.0), buckets: HashMap::new() }
    }

    /// Takes one push from `source`'s bucket at `now_ms`; `false`: over the rate.
    pub fn allow(&mut self, source: &SourceId, now_ms: u64) -> bool {
        if !self.buckets.contains_key(source) && self.buckets.len() >= MAX_TRACKED {
            self.evict(now_ms);
        }
        let (per_second, burst) = (self.per_second, self.burst);
        let bucket = self.buckets.entry(source.clone()).or_insert(Bucket { tokens: burst, at_ms: now_ms });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn evict(&mut self, now_ms: u64) {
        let (per_second, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, b| b.tokens + now_ms.saturating_sub(b.at_ms) as f64 / 1000.0 * per_second < burst);
        if self.buckets.len() >= MAX_TRACKED
            && let Some(oldest) = self.buckets.iter().min_by_key(|(_, b)| b.at_ms).map(|(id, _)| id.clone())
        {
            self.buckets.remove(&oldest);
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut limiter = RateLimiter::new(2.0);
        let (a, b) = (SourceId::new("gw", "a"), SourceId::new("gw", "b"));
        let allowed = (0..10).filter(|_| limiter.allow(&a, 0)).count();
        assert_eq!(allowed, 4);
        // Another source is not affected.
        assert!(limiter.allow(&b, 0));
        // Half a second later: one more push for a.
        assert!(limiter.allow(&a, 500));
        assert!(!limiter.allow(&a, 500));
    }

    #[test]
    fn the_buckets_stay_bounded() {
        let mut limiter = RateLimiter::new(1.0);
        for i in 0..(MAX_TRACKED + 100) {
            limiter.allow(&SourceId::new("gw", i.to_string()), i as u64);
        }
        assert!(limiter.tracked() <= MAX_TRACKED);
    }
}
