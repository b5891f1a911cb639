//! The bodies of the fuzz targets (`crates/metrics-aggregator/fuzz`, run by
//! `scripts/fuzz-aggregator`), kept in the library so that every input the
//! fuzzer found becomes a regression test of the normal suite
//! (`tests/it/fuzz.rs`). Not an API: no stability promised.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use crate::merge::Merged;
use crate::store::{Limits, Selection, Settings, SourceSnapshot, Store};
use crate::window::Windows;
use crate::{otlp, prometheus};

/// The clock the targets run at.
pub const NOW_MS: u64 = 1_800_000_000_000;

fn settings() -> Settings {
    Settings {
        limits: Limits { max_series_per_metric: 64, max_series: 256, max_sources: 16, max_bytes: 64 << 20 },
        ttl_ms: 30_000,
        retention_ms: 3_600_000,
        policies: Default::default(),
    }
}

/// Reads everything a store can answer: every metric fleet-wide and per
/// service and label set, instant and over a window, with quantiles, and
/// the Prometheus text.
fn read_all(store: &Store, windows: &Windows, now_ms: u64) {
    for metric in store.metrics() {
        let fleet = Selection { grouping: Some(vec![]), ..Selection::metric(&metric.name) };
        let each = Selection { by_service: true, ..Selection::metric(&metric.name) };
        for selection in [fleet, each] {
            for group in store.select(&selection, now_ms).into_iter().flat_map(|a| a.groups.into_values()) {
                quantiles(&group.value);
            }
            if let Ok(Some((_, groups))) = windows.window(store, &selection, 60_000, now_ms) {
                groups.values().for_each(|g| quantiles(&g.increase));
            }
        }
    }
    let _ = prometheus::render(store, now_ms);
}

fn quantiles(value: &Merged) {
    for q in [0.5, 0.99, 1.0] {
        let v = match value {
            Merged::Histogram(h) => h.quantile(q),
            Merged::Exponential(e) => e.quantile(q),
            _ => None,
        };
        assert!(v.is_none_or(|v| !v.is_nan()), "a NaN quantile");
    }
}

/// Decode, ingest, sample twice, query, then snapshot every source, encode,
/// decode, check and join it into a second store, which must hold the same
/// series.
///
/// # Panics
///
/// On any broken invariant: that is what the fuzzer looks for.
pub fn round_trip(request: ExportMetricsServiceRequest) {
    let (pushes, _) = otlp::decode(request, NOW_MS);
    let mut store = Store::new(settings());
    let mut windows = Windows::default();
    for push in pushes.iter().cloned() {
        store.ingest(push, NOW_MS);
    }
    windows.record(NOW_MS, store.additive_per_service());
    // The same push again, later: duplicates, and a second sample.
    for push in pushes {
        store.ingest(push, NOW_MS + 10_000);
    }
    windows.record(NOW_MS + 10_000, store.additive_per_service());
    read_all(&store, &windows, NOW_MS + 10_000);

    let mut other = Store::new(settings());
    for source in store.sources(NOW_MS) {
        let Some(snapshot) = store.snapshot(&source.id) else {
            panic!("a listed source has no snapshot");
        };
        let json = serde_json::to_vec(&snapshot).unwrap_or_else(|e| panic!("a snapshot does not encode: {e}"));
        let back: SourceSnapshot =
            serde_json::from_slice(&json).unwrap_or_else(|e| panic!("a snapshot does not decode: {e}"));
        if let Err(error) = back.check(&store.settings().limits, NOW_MS + 10_000) {
            panic!("the snapshot of a valid state is invalid: {error}");
        }
        assert_eq!(other.join(&source.id, &back, NOW_MS + 10_000), 0, "series skipped in a round trip");
    }
    assert_eq!(other.total_series(), store.total_series());
    for metric in store.metrics() {
        let fleet = Selection { by_service: true, ..Selection::metric(&metric.name) };
        let keys = |s: &Store| s.select(&fleet, NOW_MS + 10_000).map(|a| a.groups.into_keys().collect::<Vec<_>>());
        assert_eq!(keys(&store), keys(&other), "metric {} differs after a round trip", metric.name);
    }
    read_all(&other, &Windows::default(), NOW_MS + 10_000);
}

/// A checkpoint field (JSON) from Redis: decoded, joined (the store checks
/// it), and everything read back.
pub fn checkpoint_field(json: &[u8]) {
    let Ok(snapshot) = serde_json::from_slice::<SourceSnapshot>(json) else {
        return;
    };
    let mut store = Store::new(settings());
    let id = crate::source::SourceId::new("fuzz", "a");
    store.join(&id, &snapshot, NOW_MS);
    store.join(&id, &snapshot, NOW_MS);
    let mut windows = Windows::default();
    windows.record(NOW_MS, store.additive_per_service());
    read_all(&store, &windows, NOW_MS);
}
