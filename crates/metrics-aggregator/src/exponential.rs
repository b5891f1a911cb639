//! Exponential histograms (base-2 buckets at a scale): merged by rescaling
//! both sides to a common scale, then adding bucket-wise. Downscaling by one
//! merges pairs of adjacent buckets, which is exact: no point moves to a
//! bucket that does not hold its value. Each sign keeps at most
//! [`MAX_BUCKETS`] buckets; a wider range is downscaled until it fits, like
//! the SDKs do, so quantiles stay within the relative error of the final
//! scale (`2^(2^-scale) - 1`, 4.4 % at scale 4).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::merge::Additive;

/// Most buckets kept per sign.
pub const MAX_BUCKETS: usize = 320;
const MIN_SCALE: i32 = -10;
const MAX_SCALE: i32 = 20;
/// Most buckets accepted in one pushed point (before downscaling).
const MAX_PUSHED_BUCKETS: usize = 1 << 14;

/// The largest bucket index that holds a finite `f64` at `scale`, in
/// absolute value: `2^1024` (above `f64::MAX`) has index `1024 * 2^scale`,
/// the smallest subnormal `2^-1074` index `-1074 * 2^scale - 1`. Any bucket
/// outside `-limit..=limit` cannot hold a value, so a point that has one is
/// malformed. This bounds the span of every point and of every merge: at
/// [`MIN_SCALE`] the whole `f64` range is 5 buckets, so downscaling always
/// ends within [`MAX_BUCKETS`].
pub fn index_limit(scale: i32) -> i64 {
    let scale = scale.clamp(MIN_SCALE, MAX_SCALE);
    ((1075i64 << MAX_SCALE) >> (MAX_SCALE - scale)) + 1
}

/// Buckets of one sign: `counts[i]` holds the values whose index is
/// `offset + i`. Kept trimmed (no leading or trailing zero), so equal
/// contents compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    pub offset: i32,
    pub counts: Vec<u64>,
}

impl Buckets {
    fn trimmed(mut self) -> Self {
        let Some(first) = self.counts.iter().position(|c| *c > 0) else {
            return Self::default();
        };
        let last = self.counts.iter().rposition(|c| *c > 0).unwrap_or(first);
        self.counts.truncate(last + 1);
        self.counts.drain(..first);
        // In i64, so that no offset (even one of an unchecked point) overflows.
        let offset = i64::from(self.offset) + first as i64;
        self.offset = i32::try_from(offset).unwrap_or(i32::MAX);
        self
    }

    /// Whether every non-empty bucket holds finite values at `scale`.
    fn in_range(&self, scale: i32) -> bool {
        let limit = index_limit(scale);
        self.range_after(0).is_none_or(|(lo, hi)| lo >= -limit && hi <= limit)
    }

    /// Index range of the non-empty buckets at `scale - by`.
    fn range_after(&self, by: u32) -> Option<(i64, i64)> {
        if self.counts.is_empty() {
            return None;
        }
        let lo = i64::from(self.offset) >> by;
        let hi = (i64::from(self.offset) + self.counts.len() as i64 - 1) >> by;
        Some((lo, hi))
    }

    fn downscale(&self, by: u32) -> Self {
        if by == 0 || self.counts.is_empty() {
            return self.clone();
        }
        let Some((lo, hi)) = self.range_after(by) else {
            return Self::default();
        };
        let mut counts = vec![0u64; (hi - lo + 1) as usize];
        for (i, c) in self.counts.iter().enumerate() {
            let index = (i64::from(self.offset) + i as i64) >> by;
            let slot = &mut counts[(index - lo) as usize];
            *slot = slot.saturating_add(*c);
        }
        Self { offset: lo as i32, counts }.trimmed()
    }

    fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    fn get(&self, index: i64) -> u64 {
        let i = index - i64::from(self.offset);
        if i < 0 { 0 } else { self.counts.get(i as usize).copied().unwrap_or(0) }
    }

    /// Bucket-wise at the same scale, with `op` (saturating add or subtract).
    /// Callers bring both sides to a [`ExpHistogram::fitting_scale`] first,
    /// so the span is at most [`MAX_BUCKETS`]; a wider span (which only
    /// unchecked input could produce) is refused rather than allocated.
    fn zip_with(&self, other: &Self, op: impl Fn(u64, u64) -> u64) -> Self {
        let ranges = [self.range_after(0), other.range_after(0)];
        let lo = ranges.iter().flatten().map(|r| r.0).min();
        let hi = ranges.iter().flatten().map(|r| r.1).max();
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Self::default();
        };
        if hi - lo >= MAX_PUSHED_BUCKETS as i64 {
            return Self::default();
        }
        let counts = (lo..=hi).map(|i| op(self.get(i), other.get(i))).collect();
        Self { offset: lo as i32, counts }.trimmed()
    }
}

/// An exponential histogram point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpHistogram {
    pub scale: i32,
    pub zero_count: u64,
    pub zero_threshold: f64,
    pub positive: Buckets,
    pub negative: Buckets,
    pub count: u64,
    pub sum: f64,
}

/// Why an exponential histogram point is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpHistogramError {
    #[error("scale {0} is outside -10..=20")]
    Scale(i32),
    #[error("more than {MAX_PUSHED_BUCKETS} buckets")]
    TooManyBuckets,
    #[error("bucket counts add up to {buckets}, not the point's count {count}")]
    Count { buckets: u64, count: u64 },
    #[error("the sum or zero threshold is not a finite number")]
    NotFinite,
    #[error("bucket indices beyond ±{limit} hold no finite value at scale {scale}")]
    Range { scale: i32, limit: i64 },
    #[error("more than {MAX_BUCKETS} buckets per sign after downscaling")]
    Unfitted,
}

impl ExpHistogram {
    /// Checks the OTLP invariants and brings the point to at most
    /// [`MAX_BUCKETS`] buckets per sign.
    ///
    /// # Errors
    ///
    /// The first invariant that does not hold.
    pub fn new(
        scale: i32,
        zero_count: u64,
        zero_threshold: f64,
        positive: Buckets,
        negative: Buckets,
        count: u64,
        sum: f64,
    ) -> Result<Self, ExpHistogramError> {
        if !(MIN_SCALE..=MAX_SCALE).contains(&scale) {
            return Err(ExpHistogramError::Scale(scale));
        }
        if positive.counts.len() > MAX_PUSHED_BUCKETS || negative.counts.len() > MAX_PUSHED_BUCKETS {
            return Err(ExpHistogramError::TooManyBuckets);
        }
        if !sum.is_finite() || !zero_threshold.is_finite() {
            return Err(ExpHistogramError::NotFinite);
        }
        if !positive.in_range(scale) || !negative.in_range(scale) {
            return Err(ExpHistogramError::Range { scale, limit: index_limit(scale) });
        }
        let buckets = positive.total().saturating_add(negative.total()).saturating_add(zero_count);
        if buckets != count {
            return Err(ExpHistogramError::Count { buckets, count });
        }
        let point = Self {
            scale,
            zero_count,
            zero_threshold: zero_threshold.abs(),
            positive: positive.trimmed(),
            negative: negative.trimmed(),
            count,
            sum,
        };
        let target = point.fitting_scale(&point, scale);
        Ok(point.at_scale(target))
    }

    /// Checks a point that did not come through [`ExpHistogram::new`] (a
    /// checkpoint): the same invariants, and at most [`MAX_BUCKETS`] per sign.
    ///
    /// # Errors
    ///
    /// The first invariant that does not hold.
    pub fn check(&self) -> Result<(), ExpHistogramError> {
        if !(MIN_SCALE..=MAX_SCALE).contains(&self.scale) {
            return Err(ExpHistogramError::Scale(self.scale));
        }
        if self.positive.counts.len() > MAX_BUCKETS || self.negative.counts.len() > MAX_BUCKETS {
            return Err(ExpHistogramError::Unfitted);
        }
        if !self.sum.is_finite() || !self.zero_threshold.is_finite() {
            return Err(ExpHistogramError::NotFinite);
        }
        if !self.positive.in_range(self.scale) || !self.negative.in_range(self.scale) {
            return Err(ExpHistogramError::Range { scale: self.scale, limit: index_limit(self.scale) });
        }
        let buckets = self.positive.total().saturating_add(self.negative.total()).saturating_add(self.zero_count);
        if buckets != self.count {
            return Err(ExpHistogramError::Count { buckets, count: self.count });
        }
        Ok(())
    }

    pub fn zero_like(&self) -> Self {
        Self {
            scale: self.scale,
            zero_count: 0,
            zero_threshold: self.zero_threshold,
            positive: Buckets::default(),
            negative: Buckets::default(),
            count: 0,
            sum: 0.0,
        }
    }

    /// The largest scale at or below `start` at which the buckets of `self`
    /// and `other` together fit in [`MAX_BUCKETS`] per sign.
    fn fitting_scale(&self, other: &Self, start: i32) -> i32 {
        let mut scale = start;
        while scale > MIN_SCALE {
            let fits = [(&self.positive, &other.positive), (&self.negative, &other.negative)].iter().all(|(a, b)| {
                let ra = a.range_after((self.scale - scale) as u32);
                let rb = b.range_after((other.scale - scale) as u32);
                match (ra, rb) {
                    (None, None) => true,
                    (Some(r), None) | (None, Some(r)) => r.1 - r.0 < MAX_BUCKETS as i64,
                    (Some(x), Some(y)) => x.1.max(y.1) - x.0.min(y.0) < MAX_BUCKETS as i64,
                }
            });
            if fits {
                break;
            }
            scale -= 1;
        }
        scale
    }

    fn at_scale(&self, scale: i32) -> Self {
        let by = (self.scale - scale).max(0) as u32;
        Self {
            scale: self.scale - by as i32,
            positive: self.positive.downscale(by),
            negative: self.negative.downscale(by),
            ..self.clone()
        }
    }

    /// The points observed between `baseline` and `self`, at a common scale
    /// at which both fit.
    pub fn increase_since(&self, baseline: &ExpHistogram) -> ExpHistogram {
        let scale = self.fitting_scale(baseline, self.scale.min(baseline.scale));
        let (a, b) = (self.at_scale(scale), baseline.at_scale(scale));
        let sub = |x: u64, y: u64| x.saturating_sub(y);
        let positive = a.positive.zip_with(&b.positive, sub);
        let negative = a.negative.zip_with(&b.negative, sub);
        let zero_count = a.zero_count.saturating_sub(b.zero_count);
        let count = positive.total().saturating_add(negative.total()).saturating_add(zero_count);
        let sum = if count > 0 { crate::merge::finite(a.sum - b.sum) } else { 0.0 };
        ExpHistogram { scale, zero_count, zero_threshold: a.zero_threshold, positive, negative, count, sum }
    }

    /// Lower bound of the bucket `index` (positive side), at most `f64::MAX`.
    fn lower(&self, index: i64) -> f64 {
        (index as f64 * (-f64::from(self.scale)).exp2()).exp2().min(f64::MAX)
    }

    /// The `q` quantile, interpolated inside the bucket that holds it: within
    /// the relative error of the scale.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(q > 0.0 && q <= 1.0) {
            return None;
        }
        let rank = q * self.count as f64;
        let mut below = 0u64;
        let mut within = |c: u64, lower: f64, upper: f64| -> Option<f64> {
            let cumulative = below.saturating_add(c);
            if c > 0 && cumulative as f64 >= rank {
                let fraction = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * fraction);
            }
            below = cumulative;
            None
        };
        // Most negative values first: the highest negative index.
        for (i, c) in self.negative.counts.iter().enumerate().rev() {
            let index = i64::from(self.negative.offset) + i as i64;
            if let Some(v) = within(*c, -self.lower(index + 1), -self.lower(index)) {
                return Some(v);
            }
        }
        if let Some(v) = within(self.zero_count, -self.zero_threshold, self.zero_threshold) {
            return Some(v);
        }
        for (i, c) in self.positive.counts.iter().enumerate() {
            let index = i64::from(self.positive.offset) + i as i64;
            if let Some(v) = within(*c, self.lower(index), self.lower(index + 1)) {
                return Some(v);
            }
        }
        None
    }

    pub fn heap_bytes(&self) -> usize {
        (self.positive.counts.len() + self.negative.counts.len()) * 8
    }
}

impl Additive for ExpHistogram {
    fn add(&mut self, other: &Self) {
        let scale = self.fitting_scale(other, self.scale.min(other.scale));
        let (a, b) = (self.at_scale(scale), other.at_scale(scale));
        let add = |x: u64, y: u64| x.saturating_add(y);
        *self = ExpHistogram {
            scale,
            zero_count: a.zero_count.saturating_add(b.zero_count),
            zero_threshold: a.zero_threshold.max(b.zero_threshold),
            positive: a.positive.zip_with(&b.positive, add),
            negative: a.negative.zip_with(&b.negative, add),
            count: a.count.saturating_add(b.count),
            sum: crate::merge::finite(a.sum + b.sum),
        };
    }

    fn check(&self) -> Result<(), String> {
        ExpHistogram::check(self).map_err(|e| e.to_string())
    }

    fn heap_bytes(&self) -> usize {
        ExpHistogram::heap_bytes(self)
    }

    fn rank(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then(self.sum.total_cmp(&other.sum))
            .then(self.scale.cmp(&other.scale))
            .then(self.zero_count.cmp(&other.zero_count))
            .then_with(|| {
                (self.positive.offset, &self.positive.counts).cmp(&(other.positive.offset, &other.positive.counts))
            })
            .then_with(|| {
                (self.negative.offset, &self.negative.counts).cmp(&(other.negative.offset, &other.negative.counts))
            })
            .then(self.zero_threshold.total_cmp(&other.zero_threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(scale: i32, offset: i32, counts: &[u64]) -> ExpHistogram {
        let count = counts.iter().sum();
        ExpHistogram::new(scale, 0, 0.0, Buckets { offset, counts: counts.to_vec() }, Buckets::default(), count, 0.0)
            .unwrap()
    }

    #[test]
    fn downscaling_merges_adjacent_buckets_by_floor_division() {
        let b = Buckets { offset: -3, counts: vec![1, 1, 1, 1, 1] }; // -3..=1
        let d = b.downscale(1); // -2, -1, -1, 0, 0
        assert_eq!(d, Buckets { offset: -2, counts: vec![1, 2, 2] });
    }

    #[test]
    fn merging_rescales_to_the_lower_scale() {
        let mut a = point(2, 4, &[1, 1]); // indices 4, 5 at scale 2 → 2, 2 at scale 1
        a.add(&point(1, 2, &[3]));
        assert_eq!(a.scale, 1);
        assert_eq!(a.positive, Buckets { offset: 2, counts: vec![5] });
        assert_eq!(a.count, 5);
    }

    #[test]
    fn a_wide_range_is_downscaled_to_fit() {
        let mut a = point(5, 0, &[1]);
        a.add(&point(5, 10_000, &[1]));
        assert!(a.scale < 5);
        assert!(a.positive.counts.len() <= MAX_BUCKETS);
        assert_eq!(a.count, 2);
    }

    #[test]
    fn quantiles_are_within_the_bucket() {
        // Scale 0: bucket i is (2^i, 2^(i+1)]; 100 values in bucket 3 = (8, 16].
        let a = point(0, 3, &[100]);
        let p50 = a.quantile(0.5).unwrap();
        assert!((8.0..=16.0).contains(&p50), "{p50}");
        assert_eq!(a.quantile(1.0), Some(16.0));
    }

    #[test]
    fn offsets_far_outside_the_f64_range_are_rejected() {
        let at = |scale, offset: i32| {
            ExpHistogram::new(scale, 0, 0.0, Buckets { offset, counts: vec![1] }, Buckets::default(), 1, 0.0)
        };
        assert!(matches!(at(-10, i32::MIN), Err(ExpHistogramError::Range { .. })));
        assert!(matches!(at(-10, i32::MAX), Err(ExpHistogramError::Range { .. })));
        assert!(matches!(at(20, i32::MAX - 1), Err(ExpHistogramError::Range { .. })));
        // The extremes of f64 are fine, at either end of the scales.
        assert!(at(20, (1024 << 20) - 1).is_ok());
        assert!(at(-10, -2).is_ok() && at(-10, 1).is_ok());
    }

    #[test]
    fn merging_the_widest_valid_points_stays_small() {
        // The whole f64 range, positive and negative, at the finest scale.
        let limit = index_limit(20) as i32;
        let wide = |offset| {
            ExpHistogram::new(
                20,
                0,
                0.0,
                Buckets { offset, counts: vec![1] },
                Buckets { offset, counts: vec![1] },
                2,
                0.0,
            )
            .unwrap()
        };
        let (low, high) = (wide(-limit), wide(limit));
        let mut merged = low.clone();
        merged.add(&high);
        assert!(merged.positive.counts.len() <= MAX_BUCKETS && merged.negative.counts.len() <= MAX_BUCKETS);
        assert_eq!(merged.count, 4);
        let increase = high.increase_since(&low);
        assert!(increase.positive.counts.len() <= MAX_BUCKETS);
        assert_eq!(increase.count, 2);
        assert!(merged.quantile(1.0).is_some_and(f64::is_finite));
    }

    #[test]
    fn a_checkpointed_point_is_checked_again() {
        let bad = ExpHistogram {
            scale: -10,
            zero_count: 0,
            zero_threshold: 0.0,
            positive: Buckets { offset: i32::MIN, counts: vec![1] },
            negative: Buckets { offset: i32::MAX, counts: vec![1] },
            count: 2,
            sum: 0.0,
        };
        assert!(matches!(bad.check(), Err(ExpHistogramError::Range { .. })));
        // Even unchecked, a merge does not allocate the span.
        let mut other = bad.clone();
        other.add(&bad);
        assert!(other.positive.counts.len() <= MAX_PUSHED_BUCKETS);
        assert!(point(3, 5, &[1, 2]).check().is_ok());
    }

    #[test]
    fn trimming_never_overflows_the_offset() {
        let b = Buckets { offset: i32::MAX, counts: vec![0, 0, 1] }.trimmed();
        assert_eq!(b.offset, i32::MAX);
    }

    #[test]
    fn inconsistent_counts_are_rejected() {
        let e = ExpHistogram::new(0, 0, 0.0, Buckets { offset: 0, counts: vec![1] }, Buckets::default(), 2, 0.0);
        assert_eq!(e, Err(ExpHistogramError::Count { buckets: 1, count: 2 }));
        assert!(matches!(
            ExpHistogram::new(30, 0, 0.0, Buckets::default(), Buckets::default(), 0, 0.0),
            Err(ExpHistogramError::Scale(30))
        ));
    }
}
