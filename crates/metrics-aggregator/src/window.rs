//! Rolling windows over the additive series (counters, histograms,
//! summaries): the aggregator samples every series' per-service value at a
//! fixed interval into a ring, and a window query subtracts the sample at the
//! window's start from the value now. Because fleet counters never go
//! backwards (see [`crate::accum`]), the difference is the increase; for
//! histograms it is the bucket-wise increase, from which window quantiles
//! are read.
//!
//! Each ring keeps samples at the sampling interval for the last
//! [`FINE_SPAN_MS`] (so 1 m and 5 m windows start within one interval of the
//! requested time) and one per minute up to [`HORIZON_MS`] (1 h windows start
//! within a minute). Rings of series that have not been seen for the horizon
//! are dropped. Rings are kept in memory only: after a restart, windows fill
//! up again (`covered_seconds` says how much history an answer covers).
//!
//! Samples are compact: a sample equal to the previous one (an idle series)
//! shares its value instead of copying it, the fine and coarse rings share
//! values too, and histogram samples share their metric's bounds. The rings
//! count their bytes ([`Windows::bytes`]), which the store's byte budget
//! includes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::merge::{Merged, Policy};
use crate::series::Kind;
use crate::store::{GroupKey, Selection, ServiceSeries, Store};

/// Fine samples are kept this long.
pub const FINE_SPAN_MS: u64 = 6 * 60_000;
/// Spacing of the coarse samples.
pub const COARSE_STEP_MS: u64 = 60_000;
/// The longest window.
pub const HORIZON_MS: u64 = 3_600_000;

type Sample = (u64, Arc<Merged>);

/// Bytes of one sample slot (time and shared pointer) and of one shared value.
const SLOT_BYTES: usize = 16;
const VALUE_BYTES: usize = std::mem::size_of::<Merged>() + 16;

#[derive(Debug, Default)]
struct Ring {
    fine: VecDeque<Sample>,
    coarse: VecDeque<Sample>,
    last_seen_ms: u64,
    /// Bytes of the distinct values the ring holds.
    value_bytes: usize,
}

impl Ring {
    fn push(&mut self, now_ms: u64, value: Merged) {
        self.last_seen_ms = now_ms;
        let last = self.fine.back().or(self.coarse.back()).map(|(_, v)| v);
        let value = match last {
            Some(previous) if **previous == value => previous.clone(),
            _ => {
                self.value_bytes += VALUE_BYTES + value.heap_bytes();
                Arc::new(value)
            }
        };
        if self.coarse.back().is_none_or(|(t, _)| now_ms.saturating_sub(*t) >= COARSE_STEP_MS) {
            self.coarse.push_back((now_ms, value.clone()));
        }
        self.fine.push_back((now_ms, value));
        while self.fine.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > FINE_SPAN_MS) {
            if let Some((_, v)) = self.fine.pop_front() {
                self.release(v);
            }
        }
        while self.coarse.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > HORIZON_MS + COARSE_STEP_MS) {
            if let Some((_, v)) = self.coarse.pop_front() {
                self.release(v);
            }
        }
    }

    /// Drops one reference to a value; its bytes go with the last one.
    fn release(&mut self, value: Arc<Merged>) {
        if let Some(value) = Arc::into_inner(value) {
            self.value_bytes = self.value_bytes.saturating_sub(VALUE_BYTES + value.heap_bytes());
        }
    }

    fn bytes(&self, key: &ServiceSeries) -> usize {
        // The ring, its key (the label set is shared with the store).
        160 + key.0.len() + key.1.len() + self.samples() * SLOT_BYTES + self.value_bytes
    }

    /// The latest sample at or before `at_ms`, else the oldest sample.
    fn baseline(&self, at_ms: u64) -> Option<&Sample> {
        fn latest_before(samples: &VecDeque<Sample>, at_ms: u64) -> Option<&Sample> {
            samples.iter().rev().find(|(t, _)| *t <= at_ms)
        }
        latest_before(&self.fine, at_ms)
            .into_iter()
            .chain(latest_before(&self.coarse, at_ms))
            .max_by_key(|(t, _)| *t)
            .or_else(|| [self.fine.front(), self.coarse.front()].into_iter().flatten().min_by_key(|(t, _)| *t))
    }

    fn samples(&self) -> usize {
        self.fine.len() + self.coarse.len()
    }
}

/// The increase of a group over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowGroup {
    pub increase: Merged,
    /// How much history the answer covers (≤ the window).
    pub covered_ms: u64,
}

/// A window answer: the metric's kind and the increase of each group.
pub type WindowAnswer = (Kind, BTreeMap<GroupKey, WindowGroup>);

/// Why a window cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("metric `{metric}` is a {kind}: windows apply to counters, histograms and summaries; use Instant")]
    NotAdditive { metric: String, kind: &'static str },
}

/// Every series' ring.
#[derive(Debug, Default)]
pub struct Windows {
    rings: HashMap<ServiceSeries, Ring>,
}

impl Windows {
    /// Records one sample of every additive series (from
    /// [`Store::additive_per_service`]) and drops rings unseen for the horizon.
    pub fn record(&mut self, now_ms: u64, samples: HashMap<ServiceSeries, Merged>) {
        for (key, value) in samples {
            self.rings.entry(key).or_default().push(now_ms, value);
        }
        self.rings.retain(|_, ring| now_ms.saturating_sub(ring.last_seen_ms) <= HORIZON_MS);
    }

    pub fn series(&self) -> usize {
        self.rings.len()
    }

    pub fn samples(&self) -> usize {
        self.rings.values().map(Ring::samples).sum()
    }

    /// Estimated bytes of every ring.
    pub fn bytes(&self) -> usize {
        self.rings.iter().map(|(key, ring)| ring.bytes(key)).sum()
    }

    /// The increase of the selected series over the `window_ms` that end at
    /// `now_ms`, grouped as the selection asks. `None`: unknown metric.
    ///
    /// # Errors
    ///
    /// [`WindowError::NotAdditive`] for gauges and up-down counters.
    pub fn window(
        &self,
        store: &Store,
        selection: &Selection,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<Option<WindowAnswer>, WindowError> {
        let Some(kind) = store.kind(&selection.metric) else {
            return Ok(None);
        };
        if !kind.is_additive() {
            return Err(WindowError::NotAdditive { metric: selection.metric.clone(), kind: kind.name() });
        }
        // Current values per service and label set, from the store.
        let per_service = Selection { by_service: true, grouping: None, ..selection.clone() };
        let Some(current) = store.select_since_first(&per_service, now_ms) else {
            return Ok(None);
        };
        let start = now_ms.saturating_sub(window_ms);
        let mut out: BTreeMap<GroupKey, WindowGroup> = BTreeMap::new();
        for (key, group) in current.groups {
            let service = key.service.unwrap_or_default();
            let ring_key = (service, selection.metric.clone(), key.labels);
            let (increase, covered_ms) = match self.rings.get(&ring_key).and_then(|r| r.baseline(start)) {
                Some((t, baseline)) => (group.value.increase_since(baseline), now_ms.saturating_sub(*t)),
                // Not sampled yet: the series is newer than the last sample,
                // so all of it (counted since first seen) is in the window.
                None => (group.value, 0),
            };
            let (service, _, labels) = ring_key;
            let key = selection.group_key(&service, &labels);
            match out.get_mut(&key) {
                Some(acc) => {
                    acc.increase.combine(&increase, Policy::Sum);
                    acc.covered_ms = acc.covered_ms.max(covered_ms);
                }
                None => {
                    out.insert(key, WindowGroup { increase, covered_ms });
                }
            }
        }
        Ok(Some((kind, out)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::series::Labels;
    use crate::source::SourceId;
    use crate::store::{Limits, MetricPush, Point, Settings, SourcePush, Value};

    fn store() -> Store {
        Store::new(Settings {
            limits: Limits { max_series_per_metric: 100, max_series: 1000, max_sources: 10, max_bytes: 1 << 30 },
            ttl_ms: 30_000,
            retention_ms: 7_200_000,
            policies: HashMap::new(),
        })
    }

    fn push(store: &mut Store, instance: &str, value: f64, now_ms: u64) {
        store.ingest(
            SourcePush {
                source: SourceId::new("gw", instance),
                metrics: vec![MetricPush {
                    name: "requests".into(),
                    description: String::new(),
                    unit: String::new(),
                    kind: Kind::Counter,
                    points: vec![Point {
                        labels: Labels::default(),
                        start: 1,
                        time: now_ms * 1_000_000,
                        delta: false,
                        value: Value::Number(value),
                    }],
                }],
            },
            now_ms,
        );
    }

    #[test]
    fn a_window_is_the_increase_since_its_start() {
        let mut store = store();
        let mut windows = Windows::default();
        // Two sources each add 1 per second for 10 minutes, sampled every 10 s.
        for second in (0..=600u64).step_by(10) {
            let now = second * 1000;
            push(&mut store, "a", second as f64, now);
            push(&mut store, "b", second as f64, now);
            windows.record(now, store.additive_per_service());
        }
        let fleet = Selection { grouping: Some(vec![]), ..Selection::metric("requests") };
        let (_, groups) = windows.window(&store, &fleet, 60_000, 600_000).unwrap().unwrap();
        let group = groups.values().next().unwrap();
        assert_eq!(group.increase, Merged::Counter(120.0));
        assert_eq!(group.covered_ms, 60_000);
        // 1 h asked, 10 min known.
        let (_, groups) = windows.window(&store, &fleet, 3_600_000, 600_000).unwrap().unwrap();
        let group = groups.values().next().unwrap();
        assert_eq!(group.increase, Merged::Counter(1200.0));
        assert_eq!(group.covered_ms, 600_000);
    }

    #[test]
    fn rings_stay_bounded() {
        let mut store = store();
        let mut windows = Windows::default();
        for second in (0..=7200u64).step_by(10) {
            push(&mut store, "a", second as f64, second * 1000);
            windows.record(second * 1000, store.additive_per_service());
        }
        assert!(windows.samples() <= 37 + 62, "{}", windows.samples());
    }

    #[test]
    fn idle_series_share_their_samples() {
        let mut store = store();
        let mut windows = Windows::default();
        push(&mut store, "a", 5.0, 1000);
        for second in (0..=600u64).step_by(10) {
            windows.record(1000 + second * 1000, store.additive_per_service());
        }
        let idle = windows.bytes();
        let mut busy = Windows::default();
        for second in (0..=600u64).step_by(10) {
            push(&mut store, "a", 5.0 + second as f64, 1000 + second * 1000);
            busy.record(1000 + second * 1000, store.additive_per_service());
        }
        assert_eq!(windows.samples(), busy.samples());
        assert!(idle < busy.bytes(), "{idle} vs {}", busy.bytes());
        // The bytes go down again as samples leave the rings.
        let before = busy.bytes();
        for second in (610..=4800u64).step_by(10) {
            busy.record(1000 + second * 1000, store.additive_per_service());
        }
        assert!(busy.bytes() < before);
    }
}
