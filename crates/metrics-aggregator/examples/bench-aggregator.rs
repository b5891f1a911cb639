//! Benchmark of the metrics-aggregator: N sources push M series each over
//! real OTLP/gRPC (loopback) to an in-process aggregator as fast as they
//! can; then query latency is measured on the resulting state.
//!
//! Run through `scripts/bench-aggregator` (release build):
//! `cargo run --release -p shoal-metrics-aggregator --example bench-aggregator -- --sources 20 --series 500`
//!
//! Half the series are counters, half histograms (16 buckets), every push is
//! cumulative with a new timestamp, so every point is merged (none is a
//! duplicate). Figures: data points ingested per second, and p50/p99 latency
//! of an Instant query (fleet-wide, merged over all label sets), an Instant
//! query per service and label set, and a 1-minute Window query.

use std::time::{Duration, Instant};

use clap::Parser;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use shoal_metrics_aggregator::{Aggregator, Config};
use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::aggregator::v1::{Grouping, InstantRequest, Selector, WindowRequest};

#[derive(Debug, Parser)]
struct Args {
    /// Sources (service instances) pushing concurrently.
    #[arg(long, default_value_t = 20)]
    sources: usize,
    /// Series per source (half counters, half histograms).
    #[arg(long, default_value_t = 500)]
    series: usize,
    /// How long to push.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries per kind for the latency figures.
    #[arg(long, default_value_t = 200)]
    queries: usize,
}

const BOUNDS: [f64; 15] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
        ..Default::default()
    }
}

fn request(source: usize, series: usize, round: u64) -> ExportMetricsServiceRequest {
    let start = 1_000_000_000;
    let time = start + round * 1_000_000;
    let per_metric = series / 2;
    let counters = (0..per_metric)
        .map(|i| NumberDataPoint {
            attributes: vec![kv("endpoint", format!("/route/{i}")), kv("status", "200".into())],
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsDouble((round * 10 + i as u64) as f64)),
            ..Default::default()
        })
        .collect();
    let histograms = (0..series - per_metric)
        .map(|i| {
            let mut counts = vec![round; BOUNDS.len() + 1];
            let n = counts.len();
            counts[i % n] += 1;
            let count = counts.iter().sum();
            HistogramDataPoint {
                attributes: vec![kv("endpoint", format!("/route/{i}"))],
                start_time_unix_nano: start,
                time_unix_nano: time,
                count,
                sum: Some(count as f64 * 0.01),
                bucket_counts: counts,
                explicit_bounds: BOUNDS.to_vec(),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", format!("svc-{}", source % 4)),
                    kv("service.instance.id", format!("instance-{source}")),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "requests".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: counters,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: "latency_seconds".into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: histograms,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::try_parse_from([
        "bench",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--log-filter",
        "off",
        "--max-series",
        &(args.sources * args.series + 1000).to_string(),
        "--max-series-per-metric",
        &(args.series + 1000).to_string(),
        "--sample-interval",
        "1s",
        "--max-source-push-rate",
        "1000000",
        "--max-bytes",
        "8GiB",
        "--max-concurrent-pushes",
        "4",
    ])?;
    let aggregator = Aggregator::bind(config).await?;
    let endpoint = format!("http://{}", aggregator.grpc_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(aggregator.run(async {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let began = Instant::now();
    let mut pushers = Vec::new();
    for source in 0..args.sources {
        let endpoint = endpoint.clone();
        let series = args.series;
        pushers.push(tokio::spawn(async move {
            let mut client = MetricsServiceClient::connect(endpoint).await?.max_encoding_message_size(64 * 1024 * 1024);
            let mut points = 0u64;
            let mut round = 1;
            while Instant::now() < deadline {
                let response = client.export(request(source, series, round)).await?.into_inner();
                anyhow::ensure!(response.partial_success.is_none(), "rejected: {:?}", response.partial_success);
                points += series as u64;
                round += 1;
            }
            anyhow::Ok(points)
        }));
    }
    let mut points = 0;
    for pusher in pushers {
        points += pusher.await??;
    }
    let elapsed = began.elapsed().as_secs_f64();

    let mut query = AggregatorServiceClient::connect(endpoint).await?;
    let fleet = |metric: &str| Selector {
        metric: metric.into(),
        grouping: Some(Grouping { labels: vec![] }),
        ..Default::default()
    };
    let per_label_set = |metric: &str| Selector { metric: metric.into(), by_service: true, ..Default::default() };
    let mut figures = Vec::new();
    for (name, selector, window) in [
        ("instant, fleet-wide histogram (p50/p90/p99)", fleet("latency_seconds"), false),
        ("instant, per service and label set", per_label_set("requests"), false),
        ("window 1m, fleet-wide histogram", fleet("latency_seconds"), true),
    ] {
        let mut latencies = Vec::with_capacity(args.queries);
        for _ in 0..args.queries {
            let t = Instant::now();
            if window {
                query
                    .window(WindowRequest { selector: Some(selector.clone()), window_seconds: 60, quantiles: vec![] })
                    .await?;
            } else {
                query.instant(InstantRequest { selector: Some(selector.clone()), quantiles: vec![] }).await?;
            }
            latencies.push(t.elapsed());
        }
        latencies.sort();
        figures.push((name, percentile(&latencies, 0.5), percentile(&latencies, 0.99)));
    }
    let _ = stop.send(());
    let _ = server.await;

    println!(
        "aggregator benchmark: {} sources x {} series ({} series held), {:.1} s of pushes",
        args.sources,
        args.series,
        args.sources * args.series,
        elapsed
    );
    println!("ingest: {points} data points in {elapsed:.1} s = {:.0} points/s", points as f64 / elapsed);
    for (name, p50, p99) in figures {
        println!("query {name}: p50 {:.2} ms, p99 {:.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
    }
    Ok(())
}
