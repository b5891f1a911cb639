//! The fleet state: every source's series, the limits that bound them, and
//! the queries over them. Pure (time is passed in), no I/O, no locks: the
//! service wraps one [`Store`] in a lock.
//!
//! Bounds, all checked before anything is allocated for a new series:
//! - `max_series_per_metric`: distinct label sets of one metric, fleet-wide;
//! - `max_series`: series held overall, counted per source;
//! - `max_sources`: sources held;
//! - per point: at most [`MAX_LABELS`] labels, names and values of at most
//!   [`MAX_LABEL_LEN`] bytes (checked when decoding).
//!
//! A point over a bound is rejected and named in the [`Outcome`]; the rest of
//! the push is applied.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::accum::{Accum, Applied};
use crate::exponential::ExpHistogram;
use crate::histogram::Histogram;
use crate::merge::{CountSum, Level, Merged, Policy};
use crate::series::{Kind, Labels};
use crate::source::SourceId;

/// Most labels on one point.
pub const MAX_LABELS: usize = 32;
/// Longest label name or value, and metric name, in bytes.
pub const MAX_LABEL_LEN: usize = 256;
/// Most distinct error messages reported for one push.
const MAX_ERRORS: usize = 8;

/// Cardinality bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_series_per_metric: usize,
    pub max_series: usize,
    pub max_sources: usize,
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
        self.rejected += points;
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
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        for (metric, why) in other.errors {
            self.reject(&metric, || why, 0);
        }
        self.rejected += other.rejected;
        self.more_errors += other.more_errors;
    }
}

/// One series of one source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SeriesState {
    Counter(Accum<f64>),
    /// Gauges and up-down counters: the source's current level.
    Level(Level),
    Histogram(Accum<Histogram>),
    Exponential(Accum<ExpHistogram>),
    Summary(Accum<CountSum>),
}

impl SeriesState {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Counter => Self::Counter(Accum::default()),
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
            Self::Histogram(a) => a.total().map(Merged::Histogram),
            Self::Exponential(a) => a.total().map(Merged::Exponential),
            Self::Summary(a) => a.total().map(Merged::Summary),
        }
    }

    fn apply(&mut self, kind: Kind, point: Point) -> Applied {
        let Point { start, time, delta, value, .. } = point;
        match (self, value) {
            (Self::Counter(a), Value::Number(v)) => {
                if delta {
                    a.delta(time, v)
                } else {
                    a.cumulative(start, time, v)
                }
            }
            (Self::Level(level), Value::Number(v)) => {
                if time < level.time || (time == level.time && (delta || v == level.value)) {
                    return Applied::Duplicate;
                }
                let value = if delta && kind == Kind::UpDownCounter { level.value + v } else { v };
                *level = Level { time, value };
                Applied::Accepted
            }
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
            _ => Applied::Late,
        }
    }

    /// Joins another observer's view of the same series of the same source.
    fn join(&mut self, other: &SeriesState) {
        match (self, other) {
            (Self::Counter(a), Self::Counter(b)) => a.join(b),
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
}

impl Entry {
    fn new(state: SeriesState) -> Self {
        Self { state, first: None }
    }

    fn remember_first(&mut self) {
        if self.first.is_none() && !matches!(self.state, SeriesState::Level(_)) {
            self.first = self.state.value();
        }
    }

    /// The value, or for windows what was added since first seen.
    fn value(&self, since_first: bool) -> Option<Merged> {
        let value = self.state.value()?;
        match (&self.first, since_first) {
            (Some(first), true) => Some(value.increase_since(first)),
            _ => Some(value),
        }
    }
}

/// A source and its series.
#[derive(Clone, Debug, Default)]
struct SourceState {
    last_seen_ms: u64,
    metrics: HashMap<String, HashMap<Labels, Entry>>,
    series: usize,
}

/// A source's state in a form that can be stored (a checkpoint) and joined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    pub last_seen_ms: u64,
    pub series: Vec<(String, Kind, Labels, SeriesState)>,
}

#[derive(Clone, Debug)]
struct MetricInfo {
    kind: Kind,
    description: String,
    unit: String,
    /// Histograms: the bounds every source must use.
    bounds: Option<Vec<f64>>,
    /// Distinct label sets fleet-wide → how many sources hold each.
    label_sets: HashMap<Labels, u32>,
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
    dirty: HashSet<SourceId>,
}

impl Store {
    pub fn new(settings: Settings) -> Self {
        Self { settings, sources: HashMap::new(), metrics: HashMap::new(), total_series: 0, dirty: HashSet::new() }
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

    /// Applies one source's push at `now_ms` (the aggregator's clock).
    pub fn ingest(&mut self, push: SourcePush, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        let Self { settings, sources, metrics, total_series, dirty } = self;
        if !sources.contains_key(&push.source) && sources.len() >= settings.limits.max_sources {
            for metric in &push.metrics {
                let limit = settings.limits.max_sources;
                outcome.reject(
                    &metric.name,
                    || format!("source limit reached ({limit} sources, --max-sources)"),
                    metric.points.len() as u64,
                );
            }
            return outcome;
        }
        let source = sources.entry(push.source.clone()).or_default();
        source.last_seen_ms = source.last_seen_ms.max(now_ms);
        dirty.insert(push.source.clone());
        for metric in push.metrics {
            let name = metric.name;
            if let Some(info) = metrics.get(&name)
                && info.kind != metric.kind
            {
                let (was, now) = (info.kind.name(), metric.kind.name());
                outcome.reject(&name, || format!("is a {was}, this push has a {now}"), metric.points.len() as u64);
                continue;
            }
            for point in metric.points {
                if let (Value::Histogram(h), Some(Some(bounds))) =
                    (&point.value, metrics.get(&name).map(|i| i.bounds.as_ref()))
                    && h.bounds != *bounds
                {
                    let (got, want) = (h.bounds.clone(), bounds.clone());
                    outcome.reject(
                        &name,
                        || format!("histogram bucket bounds {got:?} differ from the metric's bounds {want:?}"),
                        1,
                    );
                    continue;
                }
                let series = source.metrics.entry(name.clone()).or_default();
                let state = match series.get_mut(&point.labels) {
                    Some(state) => state,
                    None => {
                        let info = metrics.get(&name);
                        let known_labels = info.is_some_and(|i| i.label_sets.contains_key(&point.labels));
                        let metric_sets = info.map_or(0, |i| i.label_sets.len());
                        if !known_labels && metric_sets >= settings.limits.max_series_per_metric {
                            let limit = settings.limits.max_series_per_metric;
                            outcome.reject(
                                &name,
                                || format!("cardinality limit reached ({limit} label sets, --max-series-per-metric)"),
                                1,
                            );
                            continue;
                        }
                        if *total_series >= settings.limits.max_series {
                            let limit = settings.limits.max_series;
                            outcome.reject(
                                &name,
                                || format!("overall series limit reached ({limit} series, --max-series)"),
                                1,
                            );
                            continue;
                        }
                        let info = metrics.entry(name.clone()).or_insert_with(|| MetricInfo {
                            kind: metric.kind,
                            description: metric.description.clone(),
                            unit: metric.unit.clone(),
                            bounds: match &point.value {
                                Value::Histogram(h) => Some(h.bounds.clone()),
                                _ => None,
                            },
                            label_sets: HashMap::new(),
                        });
                        *info.label_sets.entry(point.labels.clone()).or_insert(0) += 1;
                        *total_series += 1;
                        source.series += 1;
                        series.entry(point.labels.clone()).or_insert_with(|| Entry::new(SeriesState::new(metric.kind)))
                    }
                };
                match state.state.apply(metric.kind, point) {
                    Applied::Accepted => outcome.accepted += 1,
                    Applied::Duplicate | Applied::Late => outcome.duplicates += 1,
                }
                state.remember_first();
            }
            if source.metrics.get(&name).is_some_and(HashMap::is_empty) {
                source.metrics.remove(&name);
            }
        }
        outcome
    }

    fn is_up(&self, source: &SourceState, now_ms: u64) -> bool {
        now_ms.saturating_sub(source.last_seen_ms) <= self.settings.ttl_ms
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
        let mut groups: BTreeMap<GroupKey, (Group, usize)> = BTreeMap::new();
        for (index, (id, source)) in self.sources.iter().enumerate() {
            if selection.service.as_ref().is_some_and(|s| *s != id.service) {
                continue;
            }
            if !info.kind.is_additive() && !self.is_up(source, now_ms) {
                continue;
            }
            let Some(series) = source.metrics.get(&selection.metric) else {
                continue;
            };
            for (labels, state) in series {
                if !selection.matches(labels) {
                    continue;
                }
                let Some(value) = state.value(since_first) else {
                    continue;
                };
                let key = selection.group_key(&id.service, labels);
                match groups.get_mut(&key) {
                    Some((group, last)) => {
                        group.value.combine(&value, policy);
                        if *last != index {
                            group.sources += 1;
                            *last = index;
                        }
                    }
                    None => {
                        groups.insert(key, (Group { value, sources: 1 }, index));
                    }
                }
            }
        }
        Some(Answer { kind: info.kind, groups: groups.into_iter().map(|(k, (g, _))| (k, g)).collect() })
    }

    /// The metric's kind, if known.
    pub fn kind(&self, metric: &str) -> Option<Kind> {
        self.metrics.get(metric).map(|i| i.kind)
    }

    /// Every additive series merged per service, counted since first seen
    /// (see [`Store::select_since_first`]): what windows sample.
    pub fn additive_per_service(&self) -> HashMap<ServiceSeries, Merged> {
        let mut out: HashMap<ServiceSeries, Merged> = HashMap::new();
        for (id, source) in &self.sources {
            for (metric, series) in &source.metrics {
                if !self.metrics.get(metric).is_some_and(|i| i.kind.is_additive()) {
                    continue;
                }
                for (labels, state) in series {
                    let Some(value) = state.value(true) else {
                        continue;
                    };
                    match out.get_mut(&(id.service.clone(), metric.clone(), labels.clone())) {
                        Some(acc) => acc.combine(&value, Policy::Sum),
                        None => {
                            out.insert((id.service.clone(), metric.clone(), labels.clone()), value);
                        }
                    }
                }
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
                bounds: i.bounds.clone().unwrap_or_default(),
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
                self.forget_series(source);
            }
            self.dirty.remove(id);
        }
        gone
    }

    fn forget_series(&mut self, source: SourceState) {
        for (metric, series) in source.metrics {
            let Some(info) = self.metrics.get_mut(&metric) else {
                continue;
            };
            for labels in series.keys() {
                if let Some(n) = info.label_sets.get_mut(labels) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        info.label_sets.remove(labels);
                    }
                }
                self.total_series = self.total_series.saturating_sub(1);
            }
            if info.label_sets.is_empty() {
                self.metrics.remove(&metric);
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
        for (metric, by_labels) in &source.metrics {
            let Some(info) = self.metrics.get(metric) else {
                continue;
            };
            for (labels, entry) in by_labels {
                series.push((metric.clone(), info.kind, labels.clone(), entry.state.clone()));
            }
        }
        series.sort_by(|a, b| (&a.0, &a.2).cmp(&(&b.0, &b.2)));
        Some(SourceSnapshot { last_seen_ms: source.last_seen_ms, series })
    }

    /// Joins what another observer (a checkpoint, another replica) knows of
    /// a source. Idempotent: joining the same snapshot twice changes nothing.
    /// Series over the limits, or of a conflicting kind, are skipped; the
    /// number skipped is returned.
    pub fn join(&mut self, id: &SourceId, snapshot: &SourceSnapshot, now_ms: u64) -> usize {
        if now_ms.saturating_sub(snapshot.last_seen_ms) > self.settings.retention_ms {
            return 0;
        }
        let Self { settings, sources, metrics, total_series, .. } = self;
        if !sources.contains_key(id) && sources.len() >= settings.limits.max_sources {
            return snapshot.series.len();
        }
        let source = sources.entry(id.clone()).or_default();
        source.last_seen_ms = source.last_seen_ms.max(snapshot.last_seen_ms);
        let mut skipped = 0;
        for (metric, kind, labels, state) in &snapshot.series {
            if !state.kind_matches(*kind) || metrics.get(metric).is_some_and(|i| i.kind != *kind) {
                skipped += 1;
                continue;
            }
            if let Some(existing) = source.metrics.get_mut(metric).and_then(|s| s.get_mut(labels)) {
                existing.state.join(state);
                existing.remember_first();
                continue;
            }
            let info = metrics.get(metric);
            let known = info.is_some_and(|i| i.label_sets.contains_key(labels));
            if (!known && info.map_or(0, |i| i.label_sets.len()) >= settings.limits.max_series_per_metric)
                || *total_series >= settings.limits.max_series
            {
                skipped += 1;
                continue;
            }
            let bounds = match state {
                SeriesState::Histogram(a) => a.total().map(|h| h.bounds),
                _ => None,
            };
            let info = metrics.entry(metric.clone()).or_insert_with(|| MetricInfo {
                kind: *kind,
                description: String::new(),
                unit: String::new(),
                bounds: bounds.clone(),
                label_sets: HashMap::new(),
            });
            if info.bounds.is_some() && bounds.is_some() && info.bounds != bounds {
                skipped += 1;
                continue;
            }
            *info.label_sets.entry(labels.clone()).or_insert(0) += 1;
            *total_series += 1;
            source.series += 1;
            let mut entry = Entry::new(state.clone());
            entry.remember_first();
            source.metrics.entry(metric.clone()).or_default().insert(labels.clone(), entry);
        }
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn settings() -> Settings {
        Settings {
            limits: Limits { max_series_per_metric: 100, max_series: 1000, max_sources: 10 },
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
        let id = SourceId::new("gw", "a");
        store.ingest(counter(&id, 1, 10, 1.0), 0);
        let mut push = gauge(&id, 10, 1.0);
        push.metrics[0].name = "requests".into();
        let outcome = store.ingest(push, 0);
        assert_eq!(outcome.message(), "metric `requests`: is a counter, this push has a gauge");

        let hist = |bounds: Vec<f64>| {
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
        assert_eq!(store.ingest(hist(vec![1.0, 2.0]), 0).accepted, 1);
        let outcome = store.ingest(hist(vec![1.0, 5.0]), 0);
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
}
