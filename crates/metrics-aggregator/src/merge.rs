//! The merge algebra, pure and without I/O.
//!
//! Two different operations, kept apart on purpose:
//!
//! - **combining sources** ([`Merged::combine`]): the fleet value of a series
//!   from the values of several sources. Additive kinds add up (counters,
//!   bucket-wise histograms, rescaled exponential histograms, summary count
//!   and sum); gauges and up-down counters follow the metric's [`Policy`].
//!   This operation is associative and commutative (property-tested), so the
//!   order in which sources, services or replicas are combined never matters.
//! - **joining observations of one source** ([`crate::accum::Accum::join`]):
//!   two aggregator replicas, or a replica and its checkpoint, may each have
//!   seen some of a source's pushes. Joining keeps the newest point of every
//!   run and is idempotent as well, so the same push seen twice counts once.

use std::cmp::Ordering;
use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use crate::exponential::ExpHistogram;
use crate::histogram::Histogram;
use crate::series::Kind;

/// `x` kept finite: a sum of finite values that would reach ±∞ stays at
/// ±`f64::MAX` (so rates, differences and JSON stay numbers), and NaN (only
/// ∞ − ∞ makes one) is 0. Every float the merge core adds goes through it.
pub fn finite(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(-f64::MAX, f64::MAX) }
}

/// A value that adds up across sources and across delta points.
pub trait Additive: Clone + PartialEq + Debug {
    /// Adds `other` into `self`.
    fn add(&mut self, other: &Self);
    /// A total order among points, used to pick one of two different points
    /// stamped with the same time (so joins do not depend on arrival order),
    /// and to detect a reset when a run has no start time.
    fn rank(&self, other: &Self) -> Ordering;
    /// Whether a point that did not come through the decoder (a checkpoint)
    /// holds the decoder's invariants.
    ///
    /// # Errors
    ///
    /// What is wrong, in words.
    fn check(&self) -> Result<(), String>;
    /// Heap bytes beyond the value itself (for the byte budget).
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl Additive for f64 {
    fn add(&mut self, other: &Self) {
        *self = finite(*self + *other);
    }
    fn rank(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
    fn check(&self) -> Result<(), String> {
        if self.is_finite() { Ok(()) } else { Err(format!("value {self} is not a finite number")) }
    }
}

/// The mergeable part of a summary: quantiles computed by different sources
/// over different populations cannot be combined into a fleet quantile, so
/// only count and sum are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CountSum {
    pub count: u64,
    pub sum: f64,
}

impl Additive for CountSum {
    fn add(&mut self, other: &Self) {
        self.count = self.count.saturating_add(other.count);
        self.sum = finite(self.sum + other.sum);
    }
    fn rank(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then(self.sum.total_cmp(&other.sum))
    }
    fn check(&self) -> Result<(), String> {
        self.sum.check()
    }
}

/// How the levels (gauges, up-down counters) of several sources merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Policy {
    /// The most recent point of any source (ties: the larger value).
    Last,
    Sum,
    Min,
    Max,
}

impl Policy {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "last" => Some(Self::Last),
            "sum" => Some(Self::Sum),
            "min" => Some(Self::Min),
            "max" => Some(Self::Max),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Sum => "sum",
            Self::Min => "min",
            Self::Max => "max",
        }
    }

    /// The documented defaults: up-down counters measure quantities that add
    /// up across instances (in-flight requests, queue depth), so `sum`;
    /// a gauge's meaning is unknown (a temperature, a ratio, a size), and
    /// `last` is the only choice that invents nothing.
    pub fn default_for(kind: Kind) -> Self {
        match kind {
            Kind::UpDownCounter => Self::Sum,
            _ => Self::Last,
        }
    }
}

/// A level at a time (nanoseconds since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub time: u64,
    pub value: f64,
}

impl Level {
    /// Whether `self` is a later observation than `other` (ties broken by value).
    pub fn is_newer_than(&self, other: &Level) -> bool {
        (self.time, OrdF64(self.value)) > (other.time, OrdF64(other.value))
    }

    /// Combines the levels of two sources under `policy`.
    pub fn combine(&mut self, other: &Level, policy: Policy) {
        let time = self.time.max(other.time);
        match policy {
            Policy::Last => {
                if other.is_newer_than(self) {
                    *self = *other;
                }
                return;
            }
            Policy::Sum => self.value = finite(self.value + other.value),
            Policy::Min => {
                if other.value.total_cmp(&self.value).is_lt() {
                    self.value = other.value;
                }
            }
            Policy::Max => {
                if other.value.total_cmp(&self.value).is_gt() {
                    self.value = other.value;
                }
            }
        }
        self.time = time;
    }
}

#[derive(Clone, Copy)]
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The value of one series from one or more sources.
#[derive(Clone, Debug, PartialEq)]
pub enum Merged {
    Counter(f64),
    Level(Level),
    Histogram(Histogram),
    Exponential(ExpHistogram),
    Summary(CountSum),
}

impl Merged {
    /// Combines the value of another source (or group of sources) into this
    /// one. Values of different kinds never meet (a metric has one kind);
    /// if they did, `self` is kept.
    pub fn combine(&mut self, other: &Merged, policy: Policy) {
        match (self, other) {
            (Merged::Counter(a), Merged::Counter(b)) => a.add(b),
            (Merged::Level(a), Merged::Level(b)) => a.combine(b, policy),
            (Merged::Histogram(a), Merged::Histogram(b)) => a.add(b),
            (Merged::Exponential(a), Merged::Exponential(b)) => a.add(b),
            (Merged::Summary(a), Merged::Summary(b)) => a.add(b),
            _ => {}
        }
    }

    /// What was added between `baseline` and `self` (both cumulative fleet
    /// values); never negative for counters and histogram buckets.
    pub fn increase_since(&self, baseline: &Merged) -> Merged {
        match (self, baseline) {
            (Merged::Counter(a), Merged::Counter(b)) => Merged::Counter(finite(a - b).max(0.0)),
            (Merged::Histogram(a), Merged::Histogram(b)) => Merged::Histogram(a.increase_since(b)),
            (Merged::Exponential(a), Merged::Exponential(b)) => Merged::Exponential(a.increase_since(b)),
            (Merged::Summary(a), Merged::Summary(b)) => Merged::Summary(CountSum {
                count: a.count.saturating_sub(b.count),
                sum: if a.count > b.count { finite(a.sum - b.sum) } else { 0.0 },
            }),
            (current, _) => current.clone(),
        }
    }

    /// The value with nothing observed yet, of the same shape.
    pub fn zero_like(&self) -> Merged {
        match self {
            Merged::Counter(_) => Merged::Counter(0.0),
            Merged::Level(l) => Merged::Level(Level { time: l.time, value: 0.0 }),
            Merged::Histogram(h) => Merged::Histogram(h.zero_like()),
            Merged::Exponential(e) => Merged::Exponential(e.zero_like()),
            Merged::Summary(_) => Merged::Summary(CountSum::default()),
        }
    }

    /// Approximate heap size, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Merged::Histogram(h) => h.heap_bytes(),
            Merged::Exponential(e) => e.heap_bytes(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_merge_levels() {
        let a = Level { time: 10, value: 3.0 };
        let b = Level { time: 20, value: 1.0 };
        let run = |p| {
            let mut x = a;
            x.combine(&b, p);
            x.value
        };
        assert_eq!(run(Policy::Last), 1.0);
        assert_eq!(run(Policy::Sum), 4.0);
        assert_eq!(run(Policy::Min), 1.0);
        assert_eq!(run(Policy::Max), 3.0);
        assert_eq!(Policy::parse("MAX"), Some(Policy::Max));
        assert_eq!(Policy::parse("avg"), None);
    }

    #[test]
    fn sums_near_the_float_limit_stay_finite() {
        let mut a = f64::MAX;
        a.add(&f64::MAX);
        assert_eq!(a, f64::MAX);
        let mut level = Level { time: 1, value: -f64::MAX };
        level.combine(&Level { time: 2, value: -f64::MAX }, Policy::Sum);
        assert_eq!(level.value, -f64::MAX);
        let mut s = CountSum { count: u64::MAX, sum: f64::MAX };
        s.add(&CountSum { count: 5, sum: f64::MAX });
        assert_eq!((s.count, s.sum), (u64::MAX, f64::MAX));
        assert_eq!(Merged::Counter(f64::MAX).increase_since(&Merged::Counter(-f64::MAX)), Merged::Counter(f64::MAX));
        assert_eq!(finite(f64::INFINITY - f64::INFINITY), 0.0);
    }

    #[test]
    fn a_counter_increase_is_never_negative() {
        assert_eq!(Merged::Counter(5.0).increase_since(&Merged::Counter(7.0)), Merged::Counter(0.0));
        assert_eq!(Merged::Counter(9.0).increase_since(&Merged::Counter(7.0)), Merged::Counter(2.0));
    }
}
