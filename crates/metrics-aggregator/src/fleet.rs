//! The shared, locked fleet state that the gRPC services, the admin
//! endpoint and the background loops use: one [`Store`] and its
//! [`Windows`]. Locks are `std` locks held for pure computation only, never
//! across an `.await`; callers run the heavy calls on the blocking pool.

use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use shoal_telemetry::metrics::{Counter, Gauge, KeyValue, meter};

use crate::otlp;
use crate::rate::RateLimiter;
use crate::source::SourceId;
use crate::store::{Answer, MetricSummary, Outcome, Selection, Settings, SourceSnapshot, SourceSummary, Store};
use crate::window::{WindowAnswer, WindowError, Windows};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Instruments {
    points: Counter<u64>,
    series: Gauge<u64>,
    sources: Gauge<u64>,
    window_samples: Gauge<u64>,
    bytes: Gauge<u64>,
}

impl Instruments {
    fn new() -> Self {
        let m = meter("shoal-metrics-aggregator");
        Self {
            points: m
                .u64_counter("aggregator_points")
                .with_description("OTLP data points received, by outcome (accepted, duplicate, rejected)")
                .build(),
            series: m.u64_gauge("aggregator_series").with_description("Series held, counted per source").build(),
            sources: m.u64_gauge("aggregator_sources").with_description("Sources held (up or not)").build(),
            window_samples: m
                .u64_gauge("aggregator_window_samples")
                .with_description("Samples held for rolling windows")
                .build(),
            bytes: m
                .u64_gauge("aggregator_state_bytes")
                .with_description("Estimated bytes of series, label sets and window samples (see --max-bytes)")
                .with_unit("By")
                .build(),
        }
    }
}

/// The fleet view of one aggregator.
#[derive(Debug)]
pub struct Fleet {
    store: RwLock<Store>,
    windows: RwLock<Windows>,
    rates: Mutex<RateLimiter>,
    instruments: Instruments,
}

impl Fleet {
    /// `push_rate`: pushes per second allowed per source.
    pub fn new(settings: Settings, push_rate: f64) -> Self {
        Self {
            store: RwLock::new(Store::new(settings)),
            windows: RwLock::default(),
            rates: Mutex::new(RateLimiter::new(push_rate)),
            instruments: Instruments::new(),
        }
    }

    fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store_mut(&self) -> RwLockWriteGuard<'_, Store> {
        self.store.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decodes and applies one OTLP request (blocking: run it off the runtime).
    /// A source over its push rate has every point of the push rejected.
    pub fn export(&self, request: ExportMetricsServiceRequest) -> Outcome {
        let now = now_ms();
        let (pushes, mut outcome) = otlp::decode(request, now);
        let pushes: Vec<_> = {
            let mut rates = self.rates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let rate = rates.per_second();
            pushes
                .into_iter()
                .filter(|push| {
                    let allowed = rates.allow(&push.source, now);
                    if !allowed {
                        for metric in &push.metrics {
                            outcome.reject(
                                &metric.name,
                                || {
                                    format!(
                                        "push rate limit reached ({rate} pushes/s per source, --max-source-push-rate)"
                                    )
                                },
                                metric.points.len() as u64,
                            );
                        }
                    }
                    allowed
                })
                .collect()
        };
        {
            let mut store = self.store_mut();
            for push in pushes {
                outcome.absorb(store.ingest(push, now));
            }
        }
        let record = |n: u64, what: &'static str| {
            if n > 0 {
                self.instruments.points.add(n, &[KeyValue::new("outcome", what)]);
            }
        };
        record(outcome.accepted, "accepted");
        record(outcome.duplicates, "duplicate");
        record(outcome.rejected, "rejected");
        outcome
    }

    pub fn select(&self, selection: &Selection) -> Option<Answer> {
        self.store().select(selection, now_ms())
    }

    /// See [`Windows::window`].
    ///
    /// # Errors
    ///
    /// [`WindowError::NotAdditive`] for gauges and up-down counters.
    pub fn window(&self, selection: &Selection, window_ms: u64) -> Result<Option<WindowAnswer>, WindowError> {
        let store = self.store();
        let windows = self.windows.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        windows.window(&store, selection, window_ms, now_ms())
    }

    /// Takes one window sample of every additive series and forgets sources
    /// past their retention (blocking).
    pub fn sample(&self) -> Vec<SourceId> {
        let now = now_ms();
        let forgotten = self.store_mut().expire(now);
        let (samples, series, sources) = {
            let store = self.store();
            (store.additive_per_service(), store.total_series(), store.source_count())
        };
        let (window_samples, window_bytes) = {
            let mut windows = self.windows.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            windows.record(now, samples);
            (windows.samples(), windows.bytes())
        };
        let bytes = {
            let mut store = self.store_mut();
            store.set_window_bytes(window_bytes);
            store.bytes()
        };
        self.instruments.series.record(series as u64, &[]);
        self.instruments.sources.record(sources as u64, &[]);
        self.instruments.window_samples.record(window_samples as u64, &[]);
        self.instruments.bytes.record(bytes as u64, &[]);
        forgotten
    }

    pub fn sources(&self) -> Vec<SourceSummary> {
        self.store().sources(now_ms())
    }

    pub fn metrics(&self) -> Vec<MetricSummary> {
        self.store().metrics()
    }

    pub fn total_series(&self) -> usize {
        self.store().total_series()
    }

    pub fn take_dirty(&self) -> Vec<(SourceId, SourceSnapshot)> {
        self.store_mut().take_dirty()
    }

    pub fn mark_dirty(&self, ids: impl IntoIterator<Item = SourceId>) {
        self.store_mut().mark_dirty(ids);
    }

    /// Joins snapshots (from a checkpoint or another replica); returns the
    /// series skipped over the limits.
    pub fn join(&self, snapshots: &[(SourceId, SourceSnapshot)]) -> usize {
        let now = now_ms();
        let mut store = self.store_mut();
        snapshots.iter().map(|(id, snapshot)| store.join(id, snapshot, now)).sum()
    }

    /// The fleet series as Prometheus text (blocking).
    pub fn render_prometheus(&self) -> String {
        crate::prometheus::render(&self.store(), now_ms())
    }

    pub fn retention_ms(&self) -> u64 {
        self.store().settings().retention_ms
    }

    pub fn limits(&self) -> crate::store::Limits {
        self.store().settings().limits
    }

    /// Estimated bytes held (see [`Store::bytes`]).
    pub fn bytes(&self) -> usize {
        self.store().bytes()
    }
}
