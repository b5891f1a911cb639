//! Exact latency percentiles over every recorded sample (no histogram
//! buckets: a run records at most a few million samples, which sort in
//! milliseconds).

use std::time::Duration;

use serde::Serialize;

/// Latency distribution of one run, in milliseconds (fractional).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (nanoseconds); sorts them in place.
    pub fn from_nanos(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        let mean = sum as f64 / samples.len() as f64;
        Self {
            count: samples.len() as u64,
            mean_ms: mean / 1e6,
            p50_ms: ms(percentile(samples, 50.0)),
            p90_ms: ms(percentile(samples, 90.0)),
            p99_ms: ms(percentile(samples, 99.0)),
            p999_ms: ms(percentile(samples, 99.9)),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of sorted `samples`: the
/// smallest value with at least `p` % of the samples at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    // In thousandths of a percent, in integers: 99.9 % of 1000 is 999, not
    // 999.0000000000001 rounded up.
    let milli = (p * 1000.0).round() as u128;
    let rank = (milli * sorted.len() as u128).div_ceil(100_000) as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(nanos: u64) -> f64 {
    Duration::from_nanos(nanos).as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50.0), 500);
        assert_eq!(percentile(&sorted, 99.0), 990);
        assert_eq!(percentile(&sorted, 99.9), 999);
        assert_eq!(percentile(&sorted, 100.0), 1000);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut samples = vec![3_000_000, 1_000_000, 2_000_000];
        let s = Summary::from_nanos(&mut samples);
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_ms, 2.0);
        assert_eq!(s.max_ms, 3.0);
        assert!((s.mean_ms - 2.0).abs() < 1e-9);
        assert_eq!(Summary::from_nanos(&mut []), Summary::default());
    }
}
