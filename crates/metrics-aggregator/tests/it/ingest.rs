//! Real OTLP pushes from the OpenTelemetry SDK by several sources; merging
//! per type; duplicates and restarts; malformed and empty pushes.

use crate::helpers::*;
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as PbKeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

fn kv(key: &str, value: &str) -> PbKeyValue {
    PbKeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

pub fn request(service: &str, instance: &str, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service), kv("service.instance.id", instance)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
            ..Default::default()
        }],
    }
}

pub fn counter(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

pub fn point(labels: &[(&str, &str)], start: u64, time: u64, value: f64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_pushes_from_several_sources_merge_per_type() {
    let mut agg = spawn_aggregator(&["--gauge-policy", "queue_depth=max"]).await;
    let mut providers = Vec::new();
    for (i, instance) in ["gw-1", "gw-2", "gw-3"].iter().enumerate() {
        let provider = sdk_provider(&agg.endpoint(), "gateway", instance);
        let meter = provider.meter("test");
        let requests = meter.u64_counter("http_requests").build();
        requests.add(10 * (i as u64 + 1), &[KeyValue::new("status", "200")]);
        requests.add(1, &[KeyValue::new("status", "500")]);
        let latency = meter
            .f64_histogram("http_request_duration_seconds")
            .with_boundaries((1..=10).map(|b| f64::from(b) * 10.0).collect())
            .build();
        for v in 1..=100 {
            latency.record(f64::from(v), &[]);
        }
        meter.i64_up_down_counter("in_flight").build().add(2, &[]);
        meter.u64_gauge("queue_depth").build().record(5 * (i as u64 + 1), &[]);
        flush(&provider).await;
        providers.push(provider);
    }

    let total = fleet_value(&mut agg, "http_requests").await.expect("requests");
    assert_eq!(total.value, 63.0);
    assert_eq!(total.sources, 3);
    let errors = instant(
        &mut agg,
        shoal_proto::aggregator::v1::Selector {
            metric: "http_requests".into(),
            labels: [("status".to_owned(), "500".to_owned())].into(),
            by_service: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((errors.len(), errors[0].value, errors[0].service.as_str()), (1, 3.0, "gateway"));

    let latency = fleet_value(&mut agg, "http_request_duration_seconds").await.expect("latency");
    assert_eq!(latency.count, 300);
    assert_eq!(latency.sum, 3.0 * 5050.0);
    let p50 = latency.quantiles.iter().find(|q| q.quantile == 0.5).expect("p50").value;
    assert!((45.0..=55.0).contains(&p50), "p50 {p50}");
    assert_eq!(fleet_value(&mut agg, "in_flight").await.expect("in_flight").value, 6.0, "up-down: sum");
    assert_eq!(fleet_value(&mut agg, "queue_depth").await.expect("gauge").value, 15.0, "gauge policy max");

    // Pushing again without new measurements changes nothing (cumulative).
    for provider in &providers {
        flush(provider).await;
    }
    assert_eq!(fleet_value(&mut agg, "http_requests").await.expect("requests").value, 63.0);

    // gw-1 restarts: a new provider (new start time) with a small count.
    let restarted = sdk_provider(&agg.endpoint(), "gateway", "gw-1");
    restarted.meter("test").u64_counter("http_requests").build().add(2, &[KeyValue::new("status", "200")]);
    flush(&restarted).await;
    assert_eq!(fleet_value(&mut agg, "http_requests").await.expect("requests").value, 65.0, "never backwards");

    let sources = agg.query.list_sources(shoal_proto::aggregator::v1::ListSourcesRequest {}).await.unwrap();
    let ids: Vec<String> = sources.into_inner().sources.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["gateway/gw-1", "gateway/gw-2", "gateway/gw-3"]);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_cumulative_push_twice_counts_once_and_replays_in_any_order_agree() {
    let mut agg = spawn_aggregator(&[]).await;
    let push =
        |value: f64, time: u64| request("worker", "w-1", vec![counter("jobs", vec![point(&[], 100, time, value)])]);
    // Out of order, with a duplicate.
    for (value, time) in [(5.0, 300), (3.0, 200), (5.0, 300), (4.0, 250)] {
        let response = agg.otlp.export(push(value, time)).await.expect("export").into_inner();
        assert_eq!(response.partial_success, None);
    }
    assert_eq!(fleet_value(&mut agg, "jobs").await.expect("jobs").value, 5.0);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_points_are_named_and_the_rest_of_the_push_is_kept() {
    let mut agg = spawn_aggregator(&[]).await;
    let bad_histogram = Metric {
        name: "latency".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                start_time_unix_nano: 1,
                time_unix_nano: 2,
                count: 5,
                bucket_counts: vec![1, 1],
                explicit_bounds: vec![1.0],
                ..Default::default()
            }],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    };
    let bad_gauge = Metric {
        name: "temperature".into(),
        data: Some(metric::Data::Gauge(Gauge { data_points: vec![point(&[], 0, 5, f64::NAN)] })),
        ..Default::default()
    };
    let good = counter("jobs", vec![point(&[], 1, 2, 7.0)]);
    let response =
        agg.otlp.export(request("worker", "w-1", vec![bad_histogram, bad_gauge, good])).await.expect("export");
    let partial = response.into_inner().partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 2);
    assert!(
        partial.error_message.contains("metric `latency`: malformed point: bucket counts add up to 2"),
        "{}",
        partial.error_message
    );
    assert!(partial.error_message.contains("metric `temperature`: malformed point"), "{}", partial.error_message);
    assert_eq!(fleet_value(&mut agg, "jobs").await.expect("jobs").value, 7.0);

    // Other bounds for a known histogram: rejected, named.
    let hist = |bounds: Vec<f64>| Metric {
        name: "latency".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                start_time_unix_nano: 1,
                time_unix_nano: 2,
                count: 2,
                bucket_counts: vec![1, 1],
                explicit_bounds: bounds,
                ..Default::default()
            }],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    };
    let ok = agg.otlp.export(request("worker", "w-1", vec![hist(vec![1.0])])).await.unwrap().into_inner();
    assert_eq!(ok.partial_success, None);
    let other = agg.otlp.export(request("worker", "w-2", vec![hist(vec![2.0])])).await.unwrap().into_inner();
    let message = other.partial_success.expect("rejected").error_message;
    assert!(message.contains("metric `latency`: histogram bucket bounds [2.0] differ"), "{message}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_pushes_succeed_and_garbage_bytes_get_an_error_status() {
    let mut agg = spawn_aggregator(&[]).await;
    let empty = agg.otlp.export(ExportMetricsServiceRequest::default()).await.expect("empty push");
    assert_eq!(empty.into_inner().partial_success, None);
    let no_metrics = agg.otlp.export(request("worker", "w-1", vec![])).await.expect("no metrics");
    assert_eq!(no_metrics.into_inner().partial_success, None);

    let status = raw::export_bytes(agg.endpoint(), vec![0xff, 0xff, 0xff, 0x0f, 0x01]).await.expect_err("garbage");
    assert_ne!(status.code(), tonic::Code::Ok);
    // Still serving; the resource without metrics created no source.
    let sources = agg.query.list_sources(shoal_proto::aggregator::v1::ListSourcesRequest {}).await.expect("alive");
    assert_eq!(sources.into_inner().sources.len(), 0);
    agg.stop().await;
}

mod raw {
    //! A gRPC client that sends arbitrary bytes as the Export request.

    use bytes::{Buf as _, BufMut as _};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default)]
    struct Raw;
    struct RawEncoder;
    struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = ();
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
            let n = src.remaining();
            src.advance(n);
            Ok(Some(()))
        }
    }

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = ();
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    pub async fn export_bytes(endpoint: String, bytes: Vec<u8>) -> Result<(), tonic::Status> {
        let channel = tonic::transport::Channel::from_shared(endpoint)
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path =
            http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export");
        grpc.unary(tonic::Request::new(bytes), path, Raw).await.map(|_| ())
    }
}
