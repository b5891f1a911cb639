//! Inputs the fuzzer (`scripts/fuzz-aggregator`) found, and the hand-made
//! ones of issue #14, replayed through the same bodies as the fuzz target
//! (`shoal_metrics_aggregator::fuzzing`): none may panic.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Metric, metric,
};
use prost::Message as _;
use shoal_metrics_aggregator::fuzzing;

use crate::ingest::request;

fn exponential(offsets: [i32; 2], time: u64) -> Metric {
    Metric {
        name: "wide".into(),
        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
            data_points: offsets
                .iter()
                .map(|offset| ExponentialHistogramDataPoint {
                    scale: -10,
                    count: 1,
                    start_time_unix_nano: 1,
                    time_unix_nano: time,
                    positive: Some(Buckets { offset: *offset, bucket_counts: vec![1] }),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    }
}

#[test]
fn the_exponential_histogram_of_issue_14_is_harmless() {
    // Two points at scale -10 with offsets near i32::MIN and i32::MAX.
    fuzzing::round_trip(request("evil", "e-1", vec![exponential([i32::MIN + 1, i32::MAX - 1], 5)]));
    fuzzing::round_trip(request("evil", "e-1", vec![exponential([-2, 1], 5)]));
}

#[test]
fn found_inputs_do_not_panic() {
    // The seed corpus, and what the fuzzer found (`scripts/fuzz-aggregator`
    // copies its crashes to `fuzz/regressions`).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    let entries = ["seeds", "regressions"].iter().filter_map(|d| std::fs::read_dir(root.join(d)).ok()).flatten();
    for entry in entries {
        let path = entry.expect("entry").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        if bytes.first() == Some(&b'{') {
            fuzzing::checkpoint_field(&bytes);
        } else if let Ok(request) = ExportMetricsServiceRequest::decode(bytes.as_slice()) {
            fuzzing::round_trip(request);
        }
        replayed += 1;
    }
    assert!(replayed >= 3, "only {replayed} inputs under {}", root.display());
}
