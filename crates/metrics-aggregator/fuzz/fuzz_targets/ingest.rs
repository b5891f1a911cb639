//! Decode + merge + sample + checkpoint round trip, on arbitrary bytes.
//!
//! The input is an OTLP `ExportMetricsServiceRequest` in protobuf (as a
//! pusher would send it) or, when it starts with `{`, a checkpoint field
//! (JSON) as another replica would have written it. Every path must finish
//! without a panic, an abort or an allocation beyond the bounds: decode,
//! ingest into a store, query every metric (instant and window), render
//! Prometheus text, snapshot every source, encode it, decode it, check it,
//! and join it into a second store, which must then answer the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message as _;
use shoal_metrics_aggregator::fuzzing;

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&b'{') {
        fuzzing::checkpoint_field(data);
    } else if let Ok(request) = ExportMetricsServiceRequest::decode(data) {
        fuzzing::round_trip(request);
    }
});
