//! The fleet state: every source's series, the limits that bound them, and
//! the queries over them. Pure (time is passed in), no I/O, no locks: the
//! service wraps one [`Store`] in a lock.
//!
//! Series are indexed by metric (metric → source → label set), so a query
//! reads only the series of its metric.
//!
//! Bounds, all checked before anything is allocated for a new series:
//! - `max_series_per_metric`: distinct label sets of one metric, fleet-wide;
//! - `max_series`: series held overall, counted per source;
//! - `max_sources`: sources held;
//! - `max_bytes`: the estimated bytes of every series, label set and window
//!   sample held (see [`Store::bytes`]);
//! - per point: at most [`MAX_LABELS`] labels, names and values of at most
//!   [`MAX_LABEL_LEN`] bytes, at most [`crate::histogram::MAX_BOUNDS`]
//!   bounds, no time later than [`MAX_FUTURE_SKEW_MS`] ahead (checked when
//!   decoding, and again for checkpoints).
//!
//! A point over a bound is rejected and named in the [`Outcome`]; the rest of
//! the push is applied. A source is created by its first accepted point, so
//! empty or fully rejected resources hold nothing.
//!
//! A metric's kind and histogram bounds are those of the sources that hold
//! it. A point of another kind or with other bounds is rejected while any
//! *other* source holding the metric is up; once every such source is down
//! (past `--source-ttl`: the old pods of a rollout are gone), the new kind or
//! bounds take the metric over and the old series are dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::accum::{Accum, Applied, FoldOrder};
use crate::exponential::ExpHistogram;
use crate::histogram::Histogram;
use crate::merge::{Additive, CountSum, Level, Merged, Policy};
use crate::series::{Kind, Labels};
use crate::source::SourceId;

/// Most labels on one point.
pub const MAX_LABELS: usize = 32;
/// Longest label name or value, and metric name, in bytes.
pub const MAX_LABEL_LEN: usize = 256;
/// How far ahead of the aggregator's clock a point's time may be: 5 minutes.
/// A later point is rejected (it would freeze a gauge, win `last` fleet-wide
/// and freeze a cumulative run until that time).
pub const MAX_FUTURE_SKEW_MS: u64 = 5 * 60_000;
/// Most distinct error messages reported for one push.
const MAX_ERRORS: usize = 8;
/// Bytes of one series beyond its points: map slots, the entry, the key.
const SERIES_OVERHEAD: usize = 160;

/// Cardinality and memory bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_series_per_metric: usize,
    pub max_series: usize,
    pub max_sources: usize,
    /// Estimated bytes of series, label sets and window samples.
    pub max_bytes: usize,
}

/// Everything the store needs to know besides the data.
#[derive(Clone, Debug)]
pub struct Settings {
    pub limits: Limits,
    /// A source that has not pushed for this long is down: its gauges leave
    /// the fleet view (its counters and histograms stay).
    pub ttl_ms: u64,
    /// A source that has not pushed for this long is forgotten entirely.
    pub retention_ms: u64,
    /// Per-metric merge policy for gauges and up-down counters.
    pub policies: HashMap<String, Policy>,
}

impl Settings {
    pub fn policy(&self, metric: &str, kind: Kind) -> Policy {
        self.policies.get(metric).copied().unwrap_or_else(|| Policy::default_for(kind))
    }
}

/// A decoded data point, ready to merge.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub labels: Labels,
    /// Start of the run (cumulative) or of the interval (delta), ns; 0 when unknown.
    pub start: u64,
    /// Observation time, ns.
    pub time: u64,
    pub delta: bool,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Histogram(Histogram),
    Exponential(ExpHistogram),
    Summary(CountSum),
}

impl Value {
    fn heap_bytes(&self) -> usize {
        match self {
            Value::Histogram(h) => h.heap_bytes(),
            Value::Exponential(e) => e.heap_bytes(),
            _ => 0,
        }
    }
}

/// One metric of one push.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricPush {
    pub name: String,
    pub description: String,
    pub unit: String,
    pub kind: Kind,
    pub points: Vec<Point>,
}

/// What one source pushed.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcePush {
    pub source: SourceId,
    pub metrics: Vec<MetricPush>,
}

/// The result of a push: counts and, for rejected points, why (by metric).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Metric name → first reason it was rejected (at most a few metrics).
    pub errors: BTreeMap<String, String>,
    /// Metrics rejected beyond those listed.
    pub more_errors: u64,
}

impl Outcome {
    pub fn reject(&mut self, metric: &str, reason: impl FnOnce() -> String, points: u64) {
        self.rejected = self.rejected.saturating_add(points);
        if self.errors.contains_key(metric) {
            return;
        }
        if self.errors.len() < MAX_ERRORS {
            self.errors.insert(metric.to_owned(), reason());
        } else {
            self.more_errors += 1;
        }
    }

    /// One line naming each rejected metric and why, or empty.
    pub fn message(&self) -> String {
        let mut parts: Vec<String> = self.errors.iter().map(|(m, why)| format!("metric `{m}`: {why}")).collect();
        if self.more_errors > 0 {
            parts.push(format!("and {} more metrics", self.more_errors));
        }
        parts.join("; ")
    }

    pub fn absorb(&mut self, other: Outcome) {
        self.accepted = self.accepted.saturating_add(other.accepted);
        self.duplicates = self.duplicates.saturating_add(other.duplicates);
        for (metric, why) in other.errors {
            self.reject(&metric, || why, 0);
        }
        self.rejected = self.rejected.saturating_add(other.rejected);
        self.more_errors += other.more_errors;
    }
}

/// One series of one source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SeriesState {
    Counter(Accum<f64>),
    /// Gauges and cumulative up-down counters: the source's current level.
    Level(Level),
    /// Delta up-down counters: every distinct delta once (joined across
    /// replicas like counters), the level being their sum.
    DeltaLevel(Accum<f64>),
    Histogram(Accum<Histogram>),
    Exponential(Accum<ExpHistogram>),
    Summary(Accum<CountSum>),
}

impl SeriesState {
    fn new(kind: Kind, delta: bool) -> Self {
        match kind {
            Kind::Counter => Self::Counter(Accum::default()),
            Kind::UpDownCounter if delta => Self::DeltaLevel(Accum::default()),
            Kind::Gauge | Kind::UpDownCounter => Self::Level(Level { time: 0, value: 0.0 }),
            Kind::Histogram => Self::Histogram(Accum::default()),
            Kind::ExponentialHistogram => Self::Exponential(Accum::default()),
            Kind::Summary => Self::Summary(Accum::default()),
        }
    }

    fn kind_matches(&self, kind: Kind) -> bool {
        matches!(
            (self, kind),
            (Self::Counter(_), Kind::Counter)
                | (Self::Level(_), Kind::Gauge | Kind::UpDownCounter)
                | (Self::DeltaLevel(_), Kind::UpDownCounter)
                | (Self::Histogram(_), Kind::Histogram)
                | (Self::Exponential(_), Kind::ExponentialHistogram)
                | (Self::Summary(_), Kind::Summary)
        )
    }

    /// The source's current value of this series.
    pub fn value(&self) -> Option<Merged> {
        match self {
            Self::Counter(a) => a.total().map(Merged::Counter),
            Self::Level(l) => (l.time > 0).then_some(Merged::Level(*l)),
            Self::DeltaLevel(a) => {
                let time = a.last_time();
                a.total().filter(|_| time > 0).map(|value| Merged::Level(Level { time, value }))
            }
            Self::Histogram(a) => a.total().map(Merged::Histogram),
            Self::Exponential(a) => a.total().map(Merged::Exponential),
            Self::Summary(a) => a.total().map(Merged::Summary),
        }
    }

    /// Whether the series has a value (see [`SeriesState::value`]).
    fn has_value(&self) -> bool {
        match self {
            Self::Counter(a) | Self::DeltaLevel(a) => a.points_iter().next().is_some(),
            Self::Level(l) => l.time > 0,
            Self::Histogram(a) => a.points_iter().next().is_some(),
            Self::Exponential(a) => a.points_iter().next().is_some(),
            Self::Summary(a) => a.points_iter().next().is_some(),
        }
    }

    /// Combines the source's current value into a group's value, without
    /// building it first (what instant queries do for every series).
    fn combine_into(&self, group: &mut Option<Merged>, policy: Policy) {
        fn add<T: Additive>(
            a: &Accum<T>,
            group: &mut Option<Merged>,
            wrap: fn(T) -> Merged,
            unwrap: fn(&mut Merged) -> Option<&mut T>,
        ) {
            match group.as_mut().and_then(unwrap) {
                Some(acc) => a.points_iter().for_each(|p| acc.add(p)),
                None => {
                    let mut slot = None;
                    a.add_total_into(&mut slot);
                    if let Some(total) = slot {
                        *group = Some(wrap(total));
                    }
                }
            }
        }
        match self {
            Self::Counter(a) => add(a, group, Merged::Counter, |m| match m {
                Merged::Counter(x) => Some(x),
                _ => None,
            }),
            Self::Histogram(a) => add(a, group, Merged::Histogram, |m| match m {
                Merged::Histogram(x) => Some(x),
                _ => None,
            }),
            Self::Exponential(a) => add(a, group, Merged::Exponential, |m| match m {
                Merged::Exponential(x) => Some(x),
                _ => None,
            }),
            Self::Summary(a) => add(a, group, Merged::Summary, |m| match m {
                Merged::Summary(x) => Some(x),
                _ => None,
            }),
            Self::Level(_) | Self::DeltaLevel(_) => {
                if let Some(value) = self.value() {
                    match group {
                        Some(acc) => acc.combine(&value, policy),
                        None => *group = Some(value),
                    }
                }
            }
        }
    }

    /// The histogram bounds this series uses, if it is a histogram with points.
    fn bounds(&self) -> Option<Arc<[f64]>> {
        match self {
            Self::Histogram(a) => a.points_iter().next().map(|h| h.bounds.clone()),
            _ => None,
        }
    }

    fn share_bounds(&mut self, bounds: &Arc<[f64]>) {
        if let Self::Histogram(a) = self {
            a.points_mut().for_each(|h| h.share_bounds(bounds));
        }
    }

    /// Checks a state from a checkpoint: every point valid, none later
    /// than `max_time` (ns), one set of bounds per histogram.
    ///
    /// # Errors
    ///
    /// What is wrong, in words.
    pub fn check(&self, max_time: u64) -> Result<(), String> {
        match self {
            Self::Counter(a) | Self::DeltaLevel(a) => a.check(max_time),
            Self::Level(l) => {
                if l.time > max_time {
                    return Err("a point is stamped in the future".into());
                }
                l.value.check()
            }
            Self::Histogram(a) => {
                a.check(max_time)?;
                let mut bounds = a.points_iter().map(|h| &h.bounds);
                let first = bounds.next();
                if bounds.any(|b| Some(b) != first) {
                    return Err("histogram points with different bounds".into());
                }
                Ok(())
            }
            Self::Exponential(a) => a.check(max_time),
            Self::Summary(a) => a.check(max_time),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Self::Counter(a) | Self::DeltaLevel(a) => a.heap_bytes(),
            Self::Level(_) => 0,
            Self::Histogram(a) => a.heap_bytes(),
            Self::Exponential(a) => a.heap_bytes(),
            Self::Summary(a) => a.heap_bytes(),
        }
    }

    /// Whether `point` would add a run or delta point (grow the state).
    fn grows_with(&self, point: &Point) -> bool {
        let (delta, start, time) = (point.delta, point.start, point.time);
        match self {
            Self::Counter(a) | Self::DeltaLevel(a) => a.is_new_key(delta, start, time),
            Self::Level(_) => false,
            Self::Histogram(a) => a.is_new_key(delta, start, time),
            Self::Exponential(a) => a.is_new_key(delta, start, time),
            Self::Summary(a) => a.is_new_key(delta, start, time),
        }
    }

    fn apply(&mut self, point: Point) -> Applied {
        let Point { start, time, delta, value, .. } = point;
        match (self, value) {
            (Self::Counter(a), Value::Number(v)) => {
                if delta {
                    a.delta(time, v)
                } else {
                    a.cumulative(start, time, v)
                }
            }
            (Self::Level(level), Value::Number(v)) if !delta => {
                if time < level.time || (time == level.time && v == level.value) {
                    return Applied::Duplicate;
                }
                *level = Level { time, value: v };
                Applied::Accepted
            }
            (Self::DeltaLevel(a), Value::Number(v)) if delta => a.delta(time, v),
            (Self::Histogram(a), Value::Histogram(h)) => {
                if delta {
                    a.delta(time, h)
                } else {
                    a.cumulative(start, time, h)
                }
            }
            (Self::Exponential(a), Value::Exponential(e)) => {
                if delta {
                    a.delta(time, e)
                } else {
                    a.cumulative(start, time, e)
                }
            }
            (Self::Summary(a), Value::Summary(s)) => {
                if delta {
                    a.delta(time, s)
                } else {
                    a.cumulative(start, time, s)
                }
            }
            // A temporality that changed within one series: ignored.
            _ => Applied::Late,
        }
    }

    /// Joins another observer's view of the same series of the same source.
    fn join(&mut self, other: &SeriesState) {
        match (self, other) {
            (Self::Counter(a), Self::Counter(b)) => a.join(b),
            (Self::DeltaLevel(a), Self::DeltaLevel(b)) => a.join_by(b, FoldOrder::MorePoints),
            (Self::Level(a), Self::Level(b)) if b.is_newer_than(a) => *a = *b,
            (Self::Histogram(a), Self::Histogram(b)) => a.join(b),
            (Self::Exponential(a), Self::Exponential(b)) => a.join(b),
            (Self::Summary(a), Self::Summary(b)) => a.join(b),
            _ => {}
        }
    }
}

/// One series of one source, with the value this aggregator first saw.
#[derive(Clone, Debug)]
struct Entry {
    state: SeriesState,
    /// Additive kinds: the value when this aggregator first saw the series.
    /// Windows count from here, so a source's history from before the
    /// aggregator knew it (a long-running source connecting, a restart
    /// without Redis) never shows up as a burst in a window.
    first: Option<Merged>,
    /// Estimated bytes, kept in step with the store's total.
    bytes: usize,
}

impl Entry {
    fn new(state: SeriesState) -> Self {
        let mut entry = Self { state, first: None, bytes: 0 };
        entry.bytes = entry.estimate();
        entry
    }

    fn estimate(&self) -> usize {
        SERIES_OVERHEAD + self.state.heap_bytes() + self.first.as_ref().map_or(0, |f| 48 + f.heap_bytes())
    }

    fn remember_first(&mut self) {
        if self.first.is_none() && !matches!(self.state, SeriesState::Level(_) | SeriesState::DeltaLevel(_)) {
            self.first = self.state.value();
        }
    }
}

/// One source's series of one metric, as the metric index holds them.
type SourceSeries<'a> = (&'a SourceId, &'a HashMap<Labels, Entry>);

/// A group being merged: the value so far, the first values so far (for
/// windows), the sources counted.
type Slot = (Option<Merged>, Option<Merged>, u32);

/// Selections of at least this many series are scanned on several threads.
const PARALLEL_SCAN_SERIES: usize = 8_192;
/// The most threads one query scans with.
const MAX_SCAN_THREADS: usize = 4;

/// Merges the series of `sources` into the selection's groups.
fn scan_groups(
    sources: &[SourceSeries<'_>],
    selection: &Selection,
    policy: Policy,
    since_first: bool,
) -> BTreeMap<GroupKey, Slot> {
    let mut slots: Vec<Slot> = Vec::new();
    let mut keys: Vec<GroupKey> = Vec::new();
    let mut by_key: HashMap<GroupKey, usize> = HashMap::new();
    // The group of a (service, label set): label sets are shared within a
    // metric (see `Store::entry`), so the set's address finds it without
    // building, hashing or comparing a key per series; a key is built once
    // per distinct pair. Two equal sets at different addresses still land in
    // one group through `by_key`.
    let mut group_of: HashMap<(&str, usize), usize> = HashMap::new();
    // Per group, the last source counted in it.
    let mut last_source: Vec<usize> = Vec::new();
    for (index, (id, series)) in sources.iter().enumerate() {
        let service = if selection.by_service { id.service.as_str() } else { "" };
        for (labels, state) in series.iter() {
            if !state.state.has_value() || !selection.matches(labels) {
                continue;
            }
            let group = *group_of.entry((service, labels.addr())).or_insert_with(|| {
                let key = selection.group_key(&id.service, labels);
                *by_key.entry(key).or_insert_with_key(|key| {
                    keys.push(key.clone());
                    slots.push((None, None, 0));
                    last_source.push(usize::MAX);
                    slots.len() - 1
                })
            });
            let (value, firsts, sources) = &mut slots[group];
            state.state.combine_into(value, policy);
            // Since first seen: the group's values minus the group's first
            // values (each series only grows from its first).
            if since_first && let Some(first) = &state.first {
                match firsts {
                    Some(acc) => acc.combine(first, Policy::Sum),
                    None => *firsts = Some(first.clone()),
                }
            }
            if last_source[group] != index {
                last_source[group] = index;
                *sources += 1;
            }
        }
    }
    keys.into_iter().zip(slots).collect()
}

/// The groups' answers: each value counted since its first values, if any.
fn finish(groups: BTreeMap<GroupKey, Slot>) -> BTreeMap<GroupKey, Group> {
    groups
        .into_iter()
        .filter_map(|(key, (value, firsts, sources))| {
            let value = match (value?, firsts) {
                (value, Some(firsts)) => value.increase_since(&firsts),
                (value, None) => value,
            };
            Some((key, Group { value, sources }))
        })
        .collect()
}

fn combine_option(acc: &mut Option<Merged>, other: Option<Merged>, policy: Policy) {
    match (acc.as_mut(), other) {
        (Some(acc), Some(other)) => acc.combine(&other, policy),
        (None, other) => *acc = other,
        (Some(_), None) => {}
    }
}

/// A source: when it last pushed and which metrics it holds series of.
#[derive(Clone, Debug, Default)]
struct SourceState {
    last_seen_ms: u64,
    metrics: HashSet<String>,
    series: usize,
}

/// A source's state in a form that can be stored (a checkpoint) and joined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    pub last_seen_ms: u64,
    pub series: Vec<(String, Kind, Labels, SeriesState)>,
}

/// Why a snapshot (from Redis) cannot be joined: it breaks a bound that
/// pushes are held to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} series, more than --max-series")]
    TooManySeries(usize),
    #[error("last seen in the future")]
    Future,
    #[error("metric `{metric}`: {why}")]
    Series { metric: String, why: String },
}

impl SourceSnapshot {
    /// Checks everything a push is checked for, with `now_ms` the clock.
    ///
    /// # Errors
    ///
    /// The first bound it breaks.
    pub fn check(&self, limits: &Limits, now_ms: u64) -> Result<(), SnapshotError> {
        if self.series.len() > limits.max_series {
            return Err(SnapshotError::TooManySeries(self.series.len()));
        }
        let max_ms = now_ms.saturating_add(MAX_FUTURE_SKEW_MS);
        if self.last_seen_ms > max_ms {
            return Err(SnapshotError::Future);
        }
        let max_time = max_ms.saturating_mul(1_000_000);
        for (metric, kind, labels, state) in &self.series {
            let fail = |why: String| SnapshotError::Series { metric: metric.chars().take(64).collect(), why };
            if metric.is_empty() || metric.len() > MAX_LABEL_LEN {
                return Err(fail("a metric name must have 1 to 256 bytes".into()));
            }
            if labels.len() > MAX_LABELS
                || labels.iter().any(|(k, v)| k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
            {
                return Err(fail("labels over the bounds".into()));
            }
            if !state.kind_matches(*kind) {
                return Err(fail(format!("state does not match the kind {}", kind.name())));
            }
            state.check(max_time).map_err(fail)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct MetricInfo {
    kind: Kind,
    description: String,
    unit: String,
    /// Histograms: the bounds every source must use (one shared copy).
    bounds: Option<Arc<[f64]>>,
    /// Distinct label sets fleet-wide → how many sources hold each.
    label_sets: HashMap<Labels, u32>,
    /// The index: source → its series of this metric.
    series: HashMap<SourceId, HashMap<Labels, Entry>>,
}

impl MetricInfo {
    fn new(kind: Kind, description: &str, unit: &str) -> Self {
        Self {
            kind,
            description: description.to_owned(),
            unit: unit.to_owned(),
            bounds: None,
            label_sets: HashMap::new(),
            series: HashMap::new(),
        }
    }
}

/// A metric as listed by [`Store::metrics`].
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSummary {
    pub name: String,
    pub kind: Kind,
    pub description: String,
    pub unit: String,
    pub series: usize,
    pub policy: Policy,
    pub bounds: Vec<f64>,
}

/// A source as listed by [`Store::sources`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSummary {
    pub id: SourceId,
    pub last_seen_ms: u64,
    pub up: bool,
    pub series: usize,
}

/// What a query reads and how it groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub metric: String,
    pub labels: Vec<(String, String)>,
    pub service: Option<String>,
    pub by_service: bool,
    /// `None`: one answer per label set; `Some(keep)`: merge label sets that
    /// agree on `keep`.
    pub grouping: Option<Vec<String>>,
}

impl Selection {
    pub fn metric(name: &str) -> Self {
        Self { metric: name.to_owned(), ..Self::default() }
    }

    pub fn group_key(&self, service: &str, labels: &Labels) -> GroupKey {
        GroupKey {
            service: self.by_service.then(|| service.to_owned()),
            labels: match &self.grouping {
                Some(keep) => labels.project(keep),
                None => labels.clone(),
            },
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        labels.matches(self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// One answer of a query: a service (or the fleet) and a label set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// `None`: fleet-wide.
    pub service: Option<String>,
    pub labels: Labels,
}

/// The merged value of a group and how many sources contributed.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub value: Merged,
    pub sources: u32,
}

/// The answer to a query: the metric's kind and one value per group.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub kind: Kind,
    pub groups: BTreeMap<GroupKey, Group>,
}

/// Per-service value of one additive series: the unit windows are kept in.
pub type ServiceSeries = (String, String, Labels);

/// The fleet state.
#[derive(Debug)]
pub struct Store {
    settings: Settings,
    sources: HashMap<SourceId, SourceState>,
    metrics: HashMap<String, MetricInfo>,
    total_series: usize,
    /// Estimated bytes of series and label sets.
    bytes: usize,
    /// Estimated bytes of the window samples (set by the sampler).
    window_bytes: usize,
    dirty: HashSet<SourceId>,
}

fn is_up(settings: &Settings, source: &SourceState, now_ms: u64) -> bool {
    now_ms.saturating_sub(source.last_seen_ms) <= settings.ttl_ms
}

impl Store {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            sources: HashMap::new(),
            metrics: HashMap::new(),
            total_series: 0,
            bytes: 0,
            window_bytes: 0,
            dirty: HashSet::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Series held overall (per source).
    pub fn total_series(&self) -> usize {
        self.total_series
    }

    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// Estimated bytes held: series, label sets and window samples. New
    /// series (and new runs of old ones) are refused beyond `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes.saturating_add(self.window_bytes)
    }

    /// Records the windows' estimated bytes (they count in the budget).
    pub fn set_window_bytes(&mut self, bytes: usize) {
        self.window_bytes = bytes;
    }

    /// Applies one source's push at `now_ms` (the aggregator's clock).
    pub fn ingest(&mut self, push: SourcePush, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        let SourcePush { source: id, metrics } = push;
        if let Some(source) = self.sources.get_mut(&id) {
            source.last_seen_ms = source.last_seen_ms.max(now_ms);
            self.dirty.insert(id.clone());
        }
        for metric in metrics {
            let MetricPush { name, description, unit, kind, points } = metric;
            for point in points {
                match self.ingest_point(&id, (&name, kind, &description, &unit), point, now_ms) {
                    Ok(Applied::Accepted) => outcome.accepted += 1,
                    Ok(Applied::Duplicate | Applied::Late) => outcome.duplicates += 1,
                    Err(why) => outcome.reject(&name, || why, 1),
                }
            }
        }
        outcome
    }

    fn ingest_point(
        &mut self,
        id: &SourceId,
        (name, kind, description, unit): (&str, Kind, &str, &str),
        mut point: Point,
        now_ms: u64,
    ) -> Result<Applied, String> {
        let bounds = match &point.value {
            Value::Histogram(h) => Some(h.bounds.clone()),
            _ => None,
        };
        self.settle_conflict(id, name, kind, bounds.as_ref(), now_ms)?;
        let exists = self
            .metrics
            .get(name)
            .and_then(|i| i.series.get(id))
            .and_then(|s| s.get(&point.labels))
            .map(|e| e.state.grows_with(&point));
        match exists {
            None => self.admit(id, name, &point.labels, point.value.heap_bytes())?,
            Some(true) => self.admit_growth(name, point.value.heap_bytes())?,
            Some(false) => {}
        }
        if let (Value::Histogram(h), Some(Some(b))) = (&mut point.value, self.metrics.get(name).map(|i| &i.bounds)) {
            h.share_bounds(b);
        }
        let delta = point.delta;
        let labels = point.labels.clone();
        let entry = self.entry(id, name, kind, (description, unit), &labels, bounds, now_ms, || {
            Entry::new(SeriesState::new(kind, delta))
        });
        let before = entry.bytes;
        let applied = entry.state.apply(point);
        entry.remember_first();
        entry.bytes = entry.estimate();
        let after = entry.bytes;
        self.bytes = self.bytes.saturating_sub(before).saturating_add(after);
        if let Some(source) = self.sources.get_mut(id) {
            source.last_seen_ms = source.last_seen_ms.max(now_ms);
        }
        self.dirty.insert(id.clone());
        Ok(applied)
    }

    /// A point of another kind, or with other bounds, than the metric's:
    /// rejected while another source holding the metric is up; otherwise
    /// it takes the metric over (the old series are dropped).
    fn settle_conflict(
        &mut self,
        id: &SourceId,
        name: &str,
        kind: Kind,
        bounds: Option<&Arc<[f64]>>,
        now_ms: u64,
    ) -> Result<(), String> {
        let Some(info) = self.metrics.get(name) else {
            return Ok(());
        };
        let why = if info.kind != kind {
            format!("is a {}, this push has a {}", info.kind.name(), kind.name())
        } else if let (Some(want), Some(got)) = (&info.bounds, bounds)
            && **want != **got
        {
            format!("histogram bucket bounds {:?} differ from the metric's bounds {:?}", &got[..], &want[..])
        } else {
            return Ok(());
        };
        let held_by_others = info
            .series
            .keys()
            .any(|holder| holder != id && self.sources.get(holder).is_some_and(|s| is_up(&self.settings, s, now_ms)));
        if held_by_others {
            return Err(format!("{why} (accepted once every other source using the metric's is down, --source-ttl)"));
        }
        self.drop_metric(name);
        Ok(())
    }

    /// Forgets every series of a metric (a takeover by another kind or bounds).
    fn drop_metric(&mut self, name: &str) {
        let Some(info) = self.metrics.remove(name) else {
            return;
        };
        for labels in info.label_sets.keys() {
            self.bytes = self.bytes.saturating_sub(labels.heap_bytes());
        }
        for (holder, series) in info.series {
            let entries: usize = series.values().map(|e| e.bytes).sum();
            self.bytes = self.bytes.saturating_sub(entries);
            self.total_series = self.total_series.saturating_sub(series.len());
            if let Some(source) = self.sources.get_mut(&holder) {
                source.series = source.series.saturating_sub(series.len());
                source.metrics.remove(name);
                if source.series == 0 {
                    self.sources.remove(&holder);
                }
            }
            self.dirty.insert(holder);
        }
        self.bytes = self.bytes.saturating_sub(name.len() + SERIES_OVERHEAD);
    }

    /// Whether a new series of `name` with `labels` for source `id` fits
    /// every bound.
    fn admit(&self, id: &SourceId, name: &str, labels: &Labels, point_bytes: usize) -> Result<(), String> {
        let limits = &self.settings.limits;
        if !self.sources.contains_key(id) && self.sources.len() >= limits.max_sources {
            return Err(format!("source limit reached ({} sources, --max-sources)", limits.max_sources));
        }
        let info = self.metrics.get(name);
        let known_labels = info.is_some_and(|i| i.label_sets.contains_key(labels));
        if !known_labels && info.map_or(0, |i| i.label_sets.len()) >= limits.max_series_per_metric {
            return Err(format!(
                "cardinality limit reached ({} label sets, --max-series-per-metric)",
                limits.max_series_per_metric
            ));
        }
        if self.total_series >= limits.max_series {
            return Err(format!("overall series limit reached ({} series, --max-series)", limits.max_series));
        }
        let mut cost = SERIES_OVERHEAD + 2 * (48 + point_bytes);
        if !known_labels {
            cost += labels.heap_bytes();
        }
        if info.is_none() {
            cost += name.len() + SERIES_OVERHEAD;
        }
        self.admit_bytes(cost)
    }

    fn admit_growth(&self, _name: &str, point_bytes: usize) -> Result<(), String> {
        self.admit_bytes(48 + point_bytes)
    }

    fn admit_bytes(&self, cost: usize) -> Result<(), String> {
        let max = self.settings.limits.max_bytes;
        if self.bytes().saturating_add(cost) > max {
            return Err(format!("memory budget reached ({max} bytes, --max-bytes)"));
        }
        Ok(())
    }

    /// The entry of a series, created (with its source and metric) if new.
    /// Bounds were checked by [`Store::admit`].
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        id: &SourceId,
        name: &str,
        kind: Kind,
        (description, unit): (&str, &str),
        labels: &Labels,
        bounds: Option<Arc<[f64]>>,
        now_ms: u64,
        new: impl FnOnce() -> Entry,
    ) -> &mut Entry {
        let Self { sources, metrics, total_series, bytes, .. } = self;
        let info = metrics.entry(name.to_owned()).or_insert_with(|| {
            *bytes += name.len() + SERIES_OVERHEAD;
            let mut info = MetricInfo::new(kind, description, unit);
            info.bounds = bounds;
            info
        });
        let by_labels = info.series.entry(id.clone()).or_default();
        if !by_labels.contains_key(labels) {
            // One shared copy of the label set for every holder.
            let labels = match info.label_sets.get_key_value(labels) {
                Some((shared, _)) => shared.clone(),
                None => {
                    *bytes += labels.heap_bytes();
                    labels.clone()
                }
            };
            *info.label_sets.entry(labels.clone()).or_insert(0) += 1;
            *total_series += 1;
            let source =
                sources.entry(id.clone()).or_insert_with(|| SourceState { last_seen_ms: now_ms, ..Default::default() });
            source.series += 1;
            source.metrics.insert(name.to_owned());
            let entry = new();
            *bytes += entry.bytes;
            by_labels.insert(labels, entry);
        }
        by_labels.get_mut(labels).unwrap_or_else(|| unreachable!("inserted above"))
    }

    fn is_up(&self, source: &SourceState, now_ms: u64) -> bool {
        is_up(&self.settings, source, now_ms)
    }

    /// The merged values of the selected series at `now_ms`. Gauges and
    /// up-down counters of sources past their TTL are left out; counters,
    /// histograms and summaries of every known source count.
    pub fn select(&self, selection: &Selection, now_ms: u64) -> Option<Answer> {
        self.select_values(selection, now_ms, false)
    }

    /// Like [`Store::select`], but each source's additive series counts only
    /// what was added since this aggregator first saw it: the values windows
    /// are computed from.
    pub fn select_since_first(&self, selection: &Selection, now_ms: u64) -> Option<Answer> {
        self.select_values(selection, now_ms, true)
    }

    fn select_values(&self, selection: &Selection, now_ms: u64, since_first: bool) -> Option<Answer> {
        let info = self.metrics.get(&selection.metric)?;
        let policy = self.settings.policy(&selection.metric, info.kind);
        let sources: Vec<SourceSeries<'_>> = info
            .series
            .iter()
            .filter(|(id, _)| selection.service.as_ref().is_none_or(|s| *s == id.service))
            .filter(|(id, _)| info.kind.is_additive() || self.sources.get(*id).is_some_and(|s| self.is_up(s, now_ms)))
            .collect();
        // A large selection is scanned on several threads, by source (each
        // source's series are in one part, so a group's sources add up).
        let series: usize = sources.iter().map(|(_, s)| s.len()).sum();
        let parts = if series < PARALLEL_SCAN_SERIES {
            1
        } else {
            std::thread::available_parallelism().map_or(1, usize::from).min(MAX_SCAN_THREADS)
        };
        let scan = |part: &[SourceSeries<'_>]| scan_groups(part, selection, policy, since_first);
        let mut partials = if parts <= 1 {
            vec![scan(&sources)]
        } else {
            let chunk = sources.len().div_ceil(parts).max(1);
            std::thread::scope(|scope| {
                let handles: Vec<_> = sources.chunks(chunk).map(|part| scope.spawn(move || scan(part))).collect();
                handles
                    .into_iter()
                    .map(|handle| handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect::<Vec<_>>()
            })
        };
        let mut groups: BTreeMap<GroupKey, Slot> = partials.pop().unwrap_or_default();
        for partial in partials {
            for (key, (value, firsts, sources)) in partial {
                match groups.entry(key) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert((value, firsts, sources));
                    }
                    std::collections::btree_map::Entry::Occupied(mut slot) => {
                        let (acc_value, acc_firsts, acc_sources) = slot.get_mut();
                        combine_option(acc_value, value, policy);
                        combine_option(acc_firsts, firsts, Policy::Sum);
                        *acc_sources += sources;
                    }
                }
            }
        }
        Some(Answer { kind: info.kind, groups: finish(groups) })
    }

    /// The metric's kind, if known.
    pub fn kind(&self, metric: &str) -> Option<Kind> {
        self.metrics.get(metric).map(|i| i.kind)
    }

    /// Every additive series merged per service, counted since first seen
    /// (see [`Store::select_since_first`]): what windows sample.
    pub fn additive_per_service(&self) -> HashMap<ServiceSeries, Merged> {
        let mut out: HashMap<ServiceSeries, Merged> = HashMap::new();
        for (metric, info) in &self.metrics {
            if !info.kind.is_additive() {
                continue;
            }
            // The same scan as a window's current values, so a ring's samples
            // and the value a window subtracts them from are computed alike.
            let selection = Selection { by_service: true, ..Selection::metric(metric) };
            let Some(answer) = self.select_since_first(&selection, 0) else {
                continue;
            };
            for (key, group) in answer.groups {
                out.insert((key.service.unwrap_or_default(), metric.clone(), key.labels), group.value);
            }
        }
        out
    }

    /// Every known source, sorted.
    pub fn sources(&self, now_ms: u64) -> Vec<SourceSummary> {
        let mut out: Vec<SourceSummary> = self
            .sources
            .iter()
            .map(|(id, s)| SourceSummary {
                id: id.clone(),
                last_seen_ms: s.last_seen_ms,
                up: self.is_up(s, now_ms),
                series: s.series,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every known metric, sorted by name.
    pub fn metrics(&self) -> Vec<MetricSummary> {
        let mut out: Vec<MetricSummary> = self
            .metrics
            .iter()
            .map(|(name, i)| MetricSummary {
                name: name.clone(),
                kind: i.kind,
                description: i.description.clone(),
                unit: i.unit.clone(),
                series: i.label_sets.len(),
                policy: self.settings.policy(name, i.kind),
                bounds: i.bounds.as_deref().map(<[f64]>::to_vec).unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Forgets sources that have not pushed within the retention; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<SourceId> {
        let retention = self.settings.retention_ms;
        let gone: Vec<SourceId> = self
            .sources
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.last_seen_ms) > retention)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(source) = self.sources.remove(id) {
                self.forget_series(id, source);
            }
            self.dirty.remove(id);
        }
        gone
    }

    fn forget_series(&mut self, id: &SourceId, source: SourceState) {
        for metric in source.metrics {
            let Some(info) = self.metrics.get_mut(&metric) else {
                continue;
            };
            let Some(series) = info.series.remove(id) else {
                continue;
            };
            for (labels, entry) in series {
                if let Some(n) = info.label_sets.get_mut(&labels) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        info.label_sets.remove(&labels);
                        self.bytes = self.bytes.saturating_sub(labels.heap_bytes());
                    }
                }
                self.bytes = self.bytes.saturating_sub(entry.bytes);
                self.total_series = self.total_series.saturating_sub(1);
            }
            if info.series.is_empty() {
                self.metrics.remove(&metric);
                self.bytes = self.bytes.saturating_sub(metric.len() + SERIES_OVERHEAD);
            }
        }
    }

    /// Snapshots of the sources changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<(SourceId, SourceSnapshot)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().filter_map(|id| self.snapshot(&id).map(|s| (id, s))).collect()
    }

    /// Marks sources as changed again (their checkpoint failed).
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = SourceId>) {
        for id in ids {
            if self.sources.contains_key(&id) {
                self.dirty.insert(id);
            }
        }
    }

    /// One source's state in storable form.
    pub fn snapshot(&self, id: &SourceId) -> Option<SourceSnapshot> {
        let source = self.sources.get(id)?;
        let mut series = Vec::with_capacity(source.series);
        for metric in &source.metrics {
            let Some(info) = self.metrics.get(metric) else {
                continue;
            };
            for (labels, entry) in info.series.get(id).into_iter().flatten() {
                series.push((metric.clone(), info.kind, labels.clone(), entry.state.clone()));
            }
        }
        series.sort_by(|a, b| (&a.0, &a.2).cmp(&(&b.0, &b.2)));
        Some(SourceSnapshot { last_seen_ms: source.last_seen_ms, series })
    }

    /// Joins what another observer (a checkpoint, another replica) knows of
    /// a source. Idempotent: joining the same snapshot twice changes nothing.
    /// Series over the limits, of a conflicting kind or bounds, or invalid
    /// (see [`SourceSnapshot::check`]) are skipped; the number skipped is
    /// returned.
    pub fn join(&mut self, id: &SourceId, snapshot: &SourceSnapshot, now_ms: u64) -> usize {
        if now_ms.saturating_sub(snapshot.last_seen_ms) > self.settings.retention_ms {
            return 0;
        }
        if snapshot.check(&self.settings.limits, now_ms).is_err() {
            return snapshot.series.len();
        }
        let mut skipped = 0;
        for (metric, kind, labels, state) in &snapshot.series {
            let bounds = state.bounds();
            // The snapshot's time stands for the pushes: a source down in
            // it does not take a metric over from live ones.
            let pushed_at = snapshot.last_seen_ms;
            if self.settle_conflict(id, metric, *kind, bounds.as_ref(), pushed_at.max(now_ms)).is_err() {
                skipped += 1;
                continue;
            }
            let exists =
                self.metrics.get(metric).and_then(|i| i.series.get(id)).is_some_and(|s| s.contains_key(labels));
            if !exists && self.admit(id, metric, labels, state.heap_bytes()).is_err() {
                skipped += 1;
                continue;
            }
            let mut state = state.clone();
            if let Some(Some(shared)) = self.metrics.get(metric).map(|i| &i.bounds) {
                state.share_bounds(shared);
            }
            let mut incoming = Some(state);
            let entry = self.entry(id, metric, *kind, ("", ""), labels, bounds, snapshot.last_seen_ms, || {
                Entry::new(incoming.take().unwrap_or_else(|| unreachable!("taken once")))
            });
            let before = entry.bytes;
            if let Some(state) = incoming {
                entry.state.join(&state);
            }
            entry.remember_first();
            entry.bytes = entry.estimate();
            let after = entry.bytes;
            self.bytes = self.bytes.saturating_sub(before).saturating_add(after);
        }
        if let Some(source) = self.sources.get_mut(id) {
            source.last_seen_ms = source.last_seen_ms.max(snapshot.last_seen_ms);
        }
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn settings() -> Settings {
        Settings {
            limits: Limits { max_series_per_metric: 100, max_series: 1000, max_sources: 10, max_bytes: 1 << 30 },
            ttl_ms: 30_000,
            retention_ms: 3_600_000,
            policies: HashMap::new(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    fn counter(source: &SourceId, start: u64, time: u64, value: f64) -> SourcePush {
        SourcePush {
            source: source.clone(),
            metrics: vec![MetricPush {
                name: "requests".into(),
                description: String::new(),
                unit: String::new(),
                kind: Kind::Counter,
                points: vec![Point {
                    labels: labels(&[("m", "GET")]),
                    start,
                    time,
                    delta: false,
                    value: Value::Number(value),
                }],
            }],
        }
    }

    fn gauge(source: &SourceId, time: u64, value: f64) -> SourcePush {
        SourcePush {
            source: source.clone(),
            metrics: vec![MetricPush {
                name: "temp".into(),
                description: String::new(),
                unit: String::new(),
                kind: Kind::Gauge,
                points: vec![Point {
                    labels: Labels::default(),
                    start: 0,
                    time,
                    delta: false,
                    value: Value::Number(value),
                }],
            }],
        }
    }

    fn fleet(store: &Store, metric: &str, now: u64) -> Option<Merged> {
        let answer = store.select(&Selection { grouping: Some(vec![]), ..Selection::metric(metric) }, now)?;
        answer.groups.into_values().next().map(|g| g.value)
    }

    #[test]
    fn counters_add_across_sources_and_survive_restarts_and_duplicates() {
        let mut store = Store::new(settings());
        let (a, b) = (SourceId::new("gw", "a"), SourceId::new("gw", "b"));
        store.ingest(counter(&a, 1, 10, 5.0), 1000);
        store.ingest(counter(&a, 1, 10, 5.0), 1000);
        store.ingest(counter(&b, 1, 10, 7.0), 1000);
        assert_eq!(fleet(&store, "requests", 1000), Some(Merged::Counter(12.0)));
        // a restarts: a new run from 0.
        store.ingest(counter(&a, 20, 30, 1.0), 2000);
        assert_eq!(fleet(&store, "requests", 2000), Some(Merged::Counter(13.0)));
    }

    #[test]
    fn a_stale_source_leaves_gauges_but_not_counters() {
        let mut store = Store::new(settings());
        let (a, b) = (SourceId::new("gw", "a"), SourceId::new("gw", "b"));
        store.ingest(gauge(&a, 10, 5.0), 0);
        store.ingest(counter(&a, 1, 10, 5.0), 0);
        store.ingest(gauge(&b, 5, 3.0), 20_000);
        assert_eq!(fleet(&store, "temp", 20_000), Some(Merged::Level(Level { time: 10, value: 5.0 })));
        // a is past its TTL at 40 s: only b's gauge remains, a's counter stays.
        assert_eq!(fleet(&store, "temp", 40_000), Some(Merged::Level(Level { time: 5, value: 3.0 })));
        assert_eq!(fleet(&store, "requests", 40_000), Some(Merged::Counter(5.0)));
        let sources = store.sources(40_000);
        assert!(!sources[0].up && sources[1].up);
    }

    #[test]
    fn gauge_policy_is_per_metric() {
        let mut s = settings();
        s.policies.insert("temp".into(), Policy::Max);
        let mut store = Store::new(s);
        store.ingest(gauge(&SourceId::new("gw", "a"), 10, 5.0), 0);
        store.ingest(gauge(&SourceId::new("gw", "b"), 20, 3.0), 0);
        assert_eq!(fleet(&store, "temp", 0), Some(Merged::Level(Level { time: 20, value: 5.0 })));
    }

    #[test]
    fn over_the_cardinality_limit_points_are_rejected_by_name_and_the_rest_is_kept() {
        let mut s = settings();
        s.limits.max_series_per_metric = 3;
        let mut store = Store::new(s);
        let id = SourceId::new("gw", "a");
        let mut push = counter(&id, 1, 10, 1.0);
        push.metrics[0].points = (0..10)
            .map(|i| Point {
                labels: labels(&[("user", &i.to_string())]),
                start: 1,
                time: 10,
                delta: false,
                value: Value::Number(1.0),
            })
            .collect();
        push.metrics.push(gauge(&id, 10, 1.0).metrics.remove(0));
        let outcome = store.ingest(push, 0);
        assert_eq!(outcome.accepted, 4);
        assert_eq!(outcome.rejected, 7);
        assert!(outcome.message().contains("metric `requests`: cardinality limit"), "{}", outcome.message());
        assert_eq!(store.total_series(), 4);
    }

    #[test]
    fn a_kind_change_or_other_bounds_are_rejected_clearly() {
        let mut store = Store::new(settings());
        let (id, other) = (SourceId::new("gw", "a"), SourceId::new("gw", "b"));
        store.ingest(counter(&id, 1, 10, 1.0), 0);
        let mut push = gauge(&other, 10, 1.0);
        push.metrics[0].name = "requests".into();
        let outcome = store.ingest(push, 0);
        assert!(outcome.message().starts_with("metric `requests`: is a counter, this push has a gauge"));

        let hist = |bounds: Vec<f64>, id: &SourceId| {
            let n = bounds.len() + 1;
            SourcePush {
                source: id.clone(),
                metrics: vec![MetricPush {
                    name: "latency".into(),
                    description: String::new(),
                    unit: String::new(),
                    kind: Kind::Histogram,
                    points: vec![Point {
                        labels: Labels::default(),
                        start: 1,
                        time: 10,
                        delta: false,
                        value: Value::Histogram(Histogram::new(bounds, vec![1; n], n as u64, 1.0).unwrap()),
                    }],
                }],
            }
        };
        assert_eq!(store.ingest(hist(vec![1.0, 2.0], &id), 0).accepted, 1);
        let outcome = store.ingest(hist(vec![1.0, 5.0], &other), 0);
        assert_eq!(outcome.rejected, 1);
        assert!(outcome.message().contains("bucket bounds [1.0, 5.0] differ"), "{}", outcome.message());
    }

    #[test]
    fn expired_sources_are_forgotten_and_their_series_freed() {
        let mut store = Store::new(settings());
        store.ingest(counter(&SourceId::new("gw", "a"), 1, 10, 1.0), 0);
        assert_eq!(store.expire(3_600_001), vec![SourceId::new("gw", "a")]);
        assert_eq!(store.total_series(), 0);
        assert!(store.metrics().is_empty());
    }

    #[test]
    fn snapshots_join_idempotently_into_another_store() {
        let mut one = Store::new(settings());
        let id = SourceId::new("gw", "a");
        one.ingest(counter(&id, 1, 10, 5.0), 0);
        one.ingest(gauge(&id, 10, 2.0), 0);
        let snapshot = one.snapshot(&id).unwrap();
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: SourceSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snapshot);

        let mut two = Store::new(settings());
        two.ingest(counter(&id, 1, 20, 8.0), 0);
        two.join(&id, &back, 0);
        two.join(&id, &back, 0);
        assert_eq!(fleet(&two, "requests", 0), Some(Merged::Counter(8.0)));
        assert_eq!(fleet(&two, "temp", 0), Some(Merged::Level(Level { time: 10, value: 2.0 })));
        assert_eq!(two.total_series(), 2);
    }

    fn histogram_push(id: &SourceId, bounds: Vec<f64>, time: u64) -> SourcePush {
        let n = bounds.len() + 1;
        SourcePush {
            source: id.clone(),
            metrics: vec![MetricPush {
                name: "latency".into(),
                description: String::new(),
                unit: String::new(),
                kind: Kind::Histogram,
                points: vec![Point {
                    labels: Labels::default(),
                    start: 1,
                    time,
                    delta: false,
                    value: Value::Histogram(Histogram::new(bounds, vec![1; n], n as u64, 1.0).unwrap()),
                }],
            }],
        }
    }

    #[test]
    fn empty_or_fully_rejected_resources_create_no_source() {
        let mut s = settings();
        s.limits.max_sources = 2;
        let mut store = Store::new(s);
        for i in 0..2000 {
            let id = SourceId::new("squat", i.to_string());
            store.ingest(SourcePush { source: id.clone(), metrics: vec![] }, 0);
            let mut push = counter(&id, 1, 10, 1.0);
            push.metrics[0].kind = Kind::Gauge;
            store.ingest(counter(&SourceId::new("gw", "a"), 1, 10, 1.0), 0);
            store.ingest(push, 0); // a kind conflict: rejected
        }
        assert_eq!(store.source_count(), 1);
        let outcome = store.ingest(counter(&SourceId::new("gw", "new-pod"), 1, 10, 1.0), 0);
        assert_eq!(outcome.accepted, 1, "{}", outcome.message());
        assert_eq!(store.source_count(), 2);
    }

    #[test]
    fn new_bounds_take_over_once_the_old_sources_are_down() {
        let mut store = Store::new(settings());
        let (old, new) = (SourceId::new("gw", "old"), SourceId::new("gw", "new"));
        assert_eq!(store.ingest(histogram_push(&old, vec![1.0, 2.0], 10), 0).accepted, 1);
        // While the old pod is up, the new bounds are refused, saying when.
        let outcome = store.ingest(histogram_push(&new, vec![1.0, 5.0], 10), 10_000);
        assert_eq!(outcome.rejected, 1);
        assert!(outcome.message().contains("accepted once every other source"), "{}", outcome.message());
        // The old pod is gone (past its TTL): the new bounds take the metric over.
        let outcome = store.ingest(histogram_push(&new, vec![1.0, 5.0], 20), 40_000);
        assert_eq!(outcome.accepted, 1, "{}", outcome.message());
        assert_eq!(store.metrics()[0].bounds, vec![1.0, 5.0]);
        assert_eq!(store.total_series(), 1);
        // The old pod, back with old bounds, is now the one refused.
        assert_eq!(store.ingest(histogram_push(&old, vec![1.0, 2.0], 30), 41_000).rejected, 1);
    }

    #[test]
    fn the_byte_budget_rejects_new_series_by_name_and_frees_on_expiry() {
        let mut s = settings();
        s.limits.max_bytes = 64 * 1024;
        s.limits.max_series_per_metric = 100_000;
        s.limits.max_series = 100_000;
        let mut store = Store::new(s);
        let id = SourceId::new("gw", "a");
        let mut push = counter(&id, 1, 10, 1.0);
        push.metrics[0].points = (0..10_000)
            .map(|i| Point {
                labels: labels(&[("user", &format!("{i:0>200}"))]),
                start: 1,
                time: 10,
                delta: false,
                value: Value::Number(1.0),
            })
            .collect();
        let outcome = store.ingest(push, 0);
        assert!(outcome.rejected > 9_000, "{}", outcome.rejected);
        assert!(
            outcome.message().contains("memory budget reached (65536 bytes, --max-bytes)"),
            "{}",
            outcome.message()
        );
        assert!(store.bytes() <= 64 * 1024, "{}", store.bytes());
        store.expire(3_600_001);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn delta_up_down_counters_join_every_delta_once() {
        let id = SourceId::new("gw", "a");
        let delta = |time: u64, value: f64| SourcePush {
            source: id.clone(),
            metrics: vec![MetricPush {
                name: "queue".into(),
                description: String::new(),
                unit: String::new(),
                kind: Kind::UpDownCounter,
                points: vec![Point {
                    labels: Labels::default(),
                    start: time - 1,
                    time,
                    delta: true,
                    value: Value::Number(value),
                }],
            }],
        };
        let (mut one, mut two) = (Store::new(settings()), Store::new(settings()));
        one.ingest(delta(10, 5.0), 0);
        two.ingest(delta(20, -2.0), 0);
        one.ingest(delta(30, 4.0), 0);
        let (a, b) = (one.snapshot(&id).unwrap(), two.snapshot(&id).unwrap());
        one.join(&id, &b, 0);
        two.join(&id, &a, 0);
        let level = |store: &Store| match fleet(store, "queue", 0) {
            Some(Merged::Level(l)) => l.value,
            other => panic!("{other:?}"),
        };
        assert_eq!(level(&one), 7.0);
        assert_eq!(level(&two), 7.0);
    }

    #[test]
    fn a_poisoned_snapshot_is_skipped_whole() {
        let mut store = Store::new(settings());
        let id = SourceId::new("gw", "a");
        let snapshot = SourceSnapshot {
            last_seen_ms: 0,
            series: vec![(
                "temp".into(),
                Kind::Gauge,
                Labels::default(),
                SeriesState::Level(Level { time: u64::MAX, value: 1.0 }),
            )],
        };
        assert_eq!(store.join(&id, &snapshot, 0), 1);
        assert_eq!(store.source_count(), 0);
    }

    #[test]
    fn a_selection_scanned_on_several_threads_answers_as_one_scan() {
        // 40 sources of 2 services x 300 label sets: 12,000 series, above
        // the parallel threshold; each series also has a first value.
        let limits = Limits { max_series_per_metric: 20_000, max_series: 20_000, max_sources: 100, max_bytes: 1 << 30 };
        let mut store = Store::new(Settings { limits, ..settings() });
        for source in 0..40u64 {
            let id = SourceId::new(format!("svc-{}", source % 2), format!("i-{source}"));
            for round in 1..=2u64 {
                let points = (0..300u64)
                    .map(|i| Point {
                        labels: labels(&[("route", &format!("/r/{i}")), ("status", &format!("{}", 200 + i % 3))]),
                        start: 1,
                        time: 10 * round,
                        delta: false,
                        value: Value::Number((source * 1000 + i * round) as f64),
                    })
                    .collect();
                let metric = MetricPush {
                    name: "requests".into(),
                    description: String::new(),
                    unit: String::new(),
                    kind: Kind::Counter,
                    points,
                };
                store.ingest(SourcePush { source: id.clone(), metrics: vec![metric] }, 0);
            }
        }
        assert!(store.total_series() >= PARALLEL_SCAN_SERIES);
        let info = store.metrics.get("requests").unwrap();
        let sources: Vec<SourceSeries<'_>> = info.series.iter().collect();
        for selection in [
            Selection { grouping: Some(vec![]), ..Selection::metric("requests") },
            Selection { grouping: Some(vec!["status".into()]), by_service: true, ..Selection::metric("requests") },
            Selection { by_service: true, ..Selection::metric("requests") },
        ] {
            for since_first in [false, true] {
                let one: BTreeMap<GroupKey, Group> =
                    finish(scan_groups(&sources, &selection, Policy::Sum, since_first));
                let answer = store.select_values(&selection, 0, since_first).unwrap();
                assert_eq!(answer.groups, one, "{selection:?} since_first={since_first}");
            }
        }
        let fleet = store.select(&Selection { grouping: Some(vec![]), ..Selection::metric("requests") }, 0).unwrap();
        let group = fleet.groups.values().next().unwrap();
        assert_eq!(group.sources, 40);
        let expected: u64 = (0..40u64).map(|s| (0..300u64).map(|i| s * 1000 + 2 * i).sum::<u64>()).sum();
        assert_eq!(group.value, Merged::Counter(expected as f64));
    }
}
