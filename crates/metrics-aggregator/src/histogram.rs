//! Explicit-bucket histograms: merged bucket-wise, which is exact, but only
//! when the bucket bounds are the same. The store enforces one set of bounds
//! per metric and rejects a point with other bounds, naming the metric.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::merge::Additive;

/// Most bucket bounds of one histogram (OpenTelemetry's default has 15).
pub const MAX_BOUNDS: usize = 256;

/// A cumulative or delta histogram point. `counts` has one more entry than
/// `bounds` (the last bucket is `(last bound, +Inf)`); bucket `i` holds the
/// points in `(bounds[i-1], bounds[i]]`. Bounds are shared: every point of
/// a metric points at the metric's one copy (see [`Histogram::share_bounds`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    #[serde(with = "shared_floats")]
    pub bounds: Arc<[f64]>,
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

/// Why a histogram point is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("{buckets} bucket counts for {bounds} bounds (want bounds + 1)")]
    Shape { buckets: usize, bounds: usize },
    #[error("bucket bounds must be finite and strictly increasing")]
    Bounds,
    #[error("bucket counts add up to {buckets}, not the point's count {count}")]
    Count { buckets: u64, count: u64 },
    #[error("the sum is not a finite number")]
    Sum,
    #[error("{0} bucket bounds, more than {MAX_BOUNDS}")]
    TooManyBounds(usize),
}

/// Serde for `Arc<[f64]>` as a plain list (without serde's `rc` feature).
mod shared_floats {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Arc<[f64]>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(value.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<[f64]>, D::Error> {
        Vec::<f64>::deserialize(deserializer).map(Arc::from)
    }
}

impl Histogram {
    /// Checks the OTLP invariants. A point with no buckets at all is a
    /// count-and-sum point: one `+Inf` bucket.
    ///
    /// # Errors
    ///
    /// The first invariant that does not hold.
    pub fn new(bounds: Vec<f64>, mut counts: Vec<u64>, count: u64, sum: f64) -> Result<Self, HistogramError> {
        if bounds.is_empty() && counts.is_empty() {
            counts.push(count);
        }
        Self::validate(&bounds, &counts, count, sum)?;
        Ok(Self { bounds: bounds.into(), counts, count, sum })
    }

    /// Checks a point that did not come through [`Histogram::new`] (a checkpoint).
    ///
    /// # Errors
    ///
    /// The first invariant that does not hold.
    pub fn check(&self) -> Result<(), HistogramError> {
        Self::validate(&self.bounds, &self.counts, self.count, self.sum)
    }

    /// This point with `bounds` (equal to its own) shared instead of its copy.
    pub fn share_bounds(&mut self, bounds: &Arc<[f64]>) {
        if !Arc::ptr_eq(&self.bounds, bounds) && *self.bounds == **bounds {
            self.bounds = bounds.clone();
        }
    }

    fn validate(bounds: &[f64], counts: &[u64], count: u64, sum: f64) -> Result<(), HistogramError> {
        if bounds.len() > MAX_BOUNDS {
            return Err(HistogramError::TooManyBounds(bounds.len()));
        }
        if counts.len() != bounds.len() + 1 {
            return Err(HistogramError::Shape { buckets: counts.len(), bounds: bounds.len() });
        }
        if bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(HistogramError::Bounds);
        }
        let buckets = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
        if buckets != count {
            return Err(HistogramError::Count { buckets, count });
        }
        if !sum.is_finite() {
            return Err(HistogramError::Sum);
        }
        Ok(())
    }

    pub fn zero_like(&self) -> Self {
        Self { bounds: self.bounds.clone(), counts: vec![0; self.counts.len()], count: 0, sum: 0.0 }
    }

    pub fn same_bounds(&self, other: &Histogram) -> bool {
        Arc::ptr_eq(&self.bounds, &other.bounds) || *self.bounds == *other.bounds
    }

    /// The bucket-wise difference (saturating at zero): the points observed
    /// between `baseline` and `self`.
    pub fn increase_since(&self, baseline: &Histogram) -> Histogram {
        if !self.same_bounds(baseline) {
            return self.clone();
        }
        let counts: Vec<u64> = self.counts.iter().zip(&baseline.counts).map(|(a, b)| a.saturating_sub(*b)).collect();
        let count = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
        let sum = if count > 0 { crate::merge::finite(self.sum - baseline.sum) } else { 0.0 };
        Histogram { bounds: self.bounds.clone(), counts, count, sum }
    }

    /// The `q` quantile (0 < q ≤ 1) by linear interpolation inside the bucket
    /// that holds it, as Prometheus' `histogram_quantile` does: exact to the
    /// bucket's width. The first bucket starts at 0 (or at its bound when
    /// negative); a quantile in the `+Inf` bucket is the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(q > 0.0 && q <= 1.0) {
            return None;
        }
        let rank = q * self.count as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let cumulative = below.saturating_add(c);
            if c > 0 && cumulative as f64 >= rank {
                let Some(&upper) = self.bounds.get(i) else {
                    return self.bounds.last().copied().or(Some(self.sum / self.count as f64));
                };
                let lower = if i == 0 { upper.min(0.0) } else { self.bounds[i - 1] };
                let fraction = (rank - below as f64) / c as f64;
                return Some(lower + (upper - lower) * fraction.clamp(0.0, 1.0));
            }
            below = cumulative;
        }
        self.bounds.last().copied()
    }

    /// Heap bytes of the counts (the bounds are shared per metric).
    pub fn heap_bytes(&self) -> usize {
        self.counts.len() * 8
    }
}

impl Additive for Histogram {
    /// Bucket-wise. The store guarantees equal bounds; a histogram with other
    /// bounds is ignored rather than mixed.
    fn add(&mut self, other: &Self) {
        if !self.same_bounds(other) {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum = crate::merge::finite(self.sum + other.sum);
    }

    fn check(&self) -> Result<(), String> {
        Histogram::check(self).map_err(|e| e.to_string())
    }

    fn heap_bytes(&self) -> usize {
        Histogram::heap_bytes(self)
    }

    fn rank(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then(self.sum.total_cmp(&other.sum))
            .then_with(|| self.counts.cmp(&other.counts))
            .then_with(|| {
                self.bounds
                    .iter()
                    .zip(other.bounds.iter())
                    .map(|(a, b)| a.total_cmp(b))
                    .find(|o| o.is_ne())
                    .unwrap_or(self.bounds.len().cmp(&other.bounds.len()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(counts: &[u64]) -> Histogram {
        let count = counts.iter().sum();
        Histogram::new(vec![1.0, 2.0, 4.0], counts.to_vec(), count, count as f64).unwrap()
    }

    #[test]
    fn malformed_points_are_named() {
        assert_eq!(Histogram::new(vec![1.0], vec![1], 1, 1.0), Err(HistogramError::Shape { buckets: 1, bounds: 1 }));
        assert_eq!(Histogram::new(vec![2.0, 1.0], vec![0, 0, 0], 0, 0.0), Err(HistogramError::Bounds));
        assert_eq!(Histogram::new(vec![1.0], vec![1, 1], 3, 0.0), Err(HistogramError::Count { buckets: 2, count: 3 }));
        assert!(Histogram::new(vec![], vec![], 5, 2.0).is_ok());
        let many: Vec<f64> = (0..100_000).map(f64::from).collect();
        assert_eq!(Histogram::new(many, vec![0; 100_001], 0, 0.0), Err(HistogramError::TooManyBounds(100_000)));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let x = h(&[0, 10, 0, 0]);
        assert_eq!(x.quantile(0.5), Some(1.5));
        assert_eq!(x.quantile(1.0), Some(2.0));
        let inf = h(&[0, 0, 0, 4]);
        assert_eq!(inf.quantile(0.99), Some(4.0));
        assert_eq!(h(&[0, 0, 0, 0]).quantile(0.5), None);
        assert_eq!(h(&[10, 0, 0, 0]).quantile(0.5), Some(0.5));
    }

    #[test]
    fn merging_is_bucket_wise_and_other_bounds_are_not_mixed_in() {
        let mut a = h(&[1, 2, 3, 4]);
        a.add(&h(&[1, 1, 1, 1]));
        assert_eq!(a.counts, vec![2, 3, 4, 5]);
        assert_eq!(a.count, 14);
        let other = Histogram::new(vec![5.0], vec![1, 1], 2, 1.0).unwrap();
        a.add(&other);
        assert_eq!(a.count, 14);
        assert_eq!(a.increase_since(&h(&[1, 2, 3, 4])).counts, vec![1, 1, 1, 1]);
    }
}
