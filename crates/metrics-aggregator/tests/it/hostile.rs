//! Hostile pushers, against the real service: unauthenticated pushes, a
//! source pushing too fast, points from the future, random gRPC paths, a
//! poisoned checkpoint in a real Redis, and maximum-size pushes against the
//! real binary's memory.

use std::process::{Command, Stdio};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, Histogram, HistogramDataPoint, Metric, metric};
use shoal_proto::aggregator::v1::ListSourcesRequest;
use shoal_testkit::{RedisServer, eventually, free_port};

use crate::helpers::*;
use crate::ingest::{counter, point, request};

fn with_token(body: ExportMetricsServiceRequest, token: &str) -> tonic::Request<ExportMetricsServiceRequest> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_configured_unauthenticated_pushes_are_refused() {
    let dir = std::env::temp_dir().join(format!("shoal-agg-it-token-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "let-me-in\n").unwrap();
    let mut agg = spawn_aggregator(&["--ingest-token-file", file.to_str().unwrap()]).await;
    let push = || request("gateway", "gw-1", vec![counter("requests", vec![point(&[], 1, 5, 3.0)])]);

    let none = agg.otlp.export(push()).await.expect_err("no token");
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none:?}");
    let wrong = agg.otlp.export(with_token(push(), "let-me-out")).await.expect_err("wrong token");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    assert!(fleet_value(&mut agg, "requests").await.is_none(), "a refused push was applied");

    let ok = agg.otlp.export(with_token(push(), "let-me-in")).await.expect("the right token");
    assert!(ok.into_inner().partial_success.is_none());
    assert_eq!(fleet_value(&mut agg, "requests").await.expect("requests").value, 3.0);
    // Queries are not behind the ingest token.
    assert_eq!(agg.query.list_sources(ListSourcesRequest {}).await.unwrap().into_inner().sources.len(), 1);
    agg.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_pushing_too_fast_is_limited_and_others_are_not() {
    let mut agg = spawn_aggregator(&["--max-source-push-rate", "1"]).await;
    let mut limited = 0;
    for i in 0..20u64 {
        let push = request("gateway", "noisy", vec![counter("requests", vec![point(&[], 1, 5 + i, i as f64)])]);
        let response = agg.otlp.export(push).await.unwrap().into_inner();
        if let Some(partial) = response.partial_success {
            assert!(partial.error_message.contains("push rate limit reached"), "{}", partial.error_message);
            limited += 1;
        }
    }
    // A burst of 2, then 1 per second: most of 20 quick pushes are refused.
    assert!(limited >= 15, "{limited}");
    let quiet = request("gateway", "quiet", vec![counter("jobs", vec![point(&[], 1, 5, 1.0)])]);
    assert!(agg.otlp.export(quiet).await.unwrap().into_inner().partial_success.is_none());
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_point_from_the_far_future_is_rejected_and_does_not_freeze_a_gauge() {
    let mut agg = spawn_aggregator(&[]).await;
    let gauge = |time: u64, value: f64| Metric {
        name: "temperature".into(),
        data: Some(metric::Data::Gauge(opentelemetry_proto::tonic::metrics::v1::Gauge {
            data_points: vec![point(&[], 0, time, value)],
        })),
        ..Default::default()
    };
    let response = agg.otlp.export(request("sensor", "s-1", vec![gauge(u64::MAX, 99.0)])).await.unwrap();
    let message = response.into_inner().partial_success.expect("rejected").error_message;
    assert!(message.contains("ahead of the aggregator's clock"), "{message}");
    let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    agg.otlp.export(request("sensor", "s-1", vec![gauge(now_ns, 21.0)])).await.unwrap();
    assert_eq!(fleet_value(&mut agg, "temperature").await.expect("a level").value, 21.0);
    // The fully rejected resource created no source.
    agg.otlp.export(request("squatter", "x", vec![gauge(u64::MAX, 1.0)])).await.unwrap();
    let sources = agg.query.list_sources(ListSourcesRequest {}).await.unwrap().into_inner().sources;
    assert_eq!(sources.len(), 1, "{sources:?}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_grpc_paths_do_not_become_metric_labels() {
    let agg = spawn_aggregator(&[]).await;
    let channel = tonic::transport::Channel::from_shared(agg.endpoint()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for i in 0..50 {
        grpc.ready().await.expect("ready");
        let path = http::uri::PathAndQuery::try_from(format!("/random.Service{i}/Method{i}")).unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let answer = grpc.unary(tonic::Request::new(()), path, codec).await;
        assert_eq!(answer.expect_err("no such method").code(), tonic::Code::Unimplemented);
    }
    let text = reqwest::get(format!("http://{}/metrics", agg.admin)).await.unwrap().text().await.unwrap();
    assert!(!text.contains("random.Service"), "raw paths became labels");
    assert!(text.contains("service=\"unknown\""), "{text}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_checkpoint_is_quarantined_and_the_replica_starts() {
    let redis = RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    // Issue #14's histogram: offsets near i32::MIN and i32::MAX at scale -10.
    let poisoned = serde_json::json!({
        "source": {"service": "evil", "instance": "e-1"},
        "snapshot": {"last_seen_ms": now_ms, "series": [["x", "ExponentialHistogram", [], {"Exponential": {
            "runs": {"1": {"time": 2, "point": {"scale": -10, "zero_count": 0, "zero_threshold": 0.0,
                "positive": {"offset": i32::MIN, "counts": [1]}, "negative": {"offset": i32::MAX, "counts": [1]},
                "count": 2, "sum": 0.0}}},
            "deltas": {}, "folded": null, "run_floor": 0, "delta_floor": 0}}]]}
    });
    let good = serde_json::json!({
        "source": {"service": "gateway", "instance": "gw-1"},
        "snapshot": {"last_seen_ms": now_ms, "series": [["requests", "Counter", [], {"Counter": {
            "runs": {"1": {"time": 2, "point": 7.0}}, "deltas": {}, "folded": null, "run_floor": 0, "delta_floor": 0}}]]}
    });
    let _: () = redis::cmd("HSET")
        .arg("shoal:aggregator:v1:sources")
        .arg("evil\u{1f}e-1\u{1f}old")
        .arg(poisoned.to_string())
        .arg("junk")
        .arg("{not json")
        .arg("gateway\u{1f}gw-1\u{1f}old")
        .arg(good.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut agg = spawn_aggregator(&["--redis-url", &url]).await;
    let ready = format!("http://{}/readyz", agg.admin);
    eventually(WAIT, "ready after loading redis", || {
        let ready = ready.clone();
        async move { reqwest::get(ready).await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
    let value = eventually(WAIT, "the good field", || {
        let mut agg_query = agg.query.clone();
        async move {
            let request = shoal_proto::aggregator::v1::InstantRequest {
                selector: Some(shoal_proto::aggregator::v1::Selector {
                    metric: "requests".into(),
                    grouping: Some(shoal_proto::aggregator::v1::Grouping { labels: vec![] }),
                    ..Default::default()
                }),
                quantiles: vec![],
            };
            agg_query.instant(request).await.ok()?.into_inner().series.into_iter().next()
        }
    })
    .await;
    assert_eq!(value.value, 7.0);
    let quarantined: Vec<String> =
        redis::cmd("HKEYS").arg("shoal:aggregator:v1:quarantine").query_async(&mut conn).await.unwrap();
    assert!(quarantined.contains(&"junk".to_owned()) && quarantined.len() == 2, "{quarantined:?}");
    let sources = agg.query.list_sources(ListSourcesRequest {}).await.unwrap().into_inner().sources;
    assert!(sources.iter().all(|s| s.service_name != "evil"), "{sources:?}");
    // Still serving after another sync round.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fleet_value(&mut agg, "requests").await.is_some());
    agg.stop().await;
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
        ..Default::default()
    }
}

/// A push of about `bytes` bytes that decodes to as much memory as a push
/// can: many small attributes, and histograms with the most bounds.
fn heavy_push(instance: &str, round: u64, bytes: usize) -> ExportMetricsServiceRequest {
    let bounds: Vec<f64> = (0..256).map(f64::from).collect();
    let point = |i: u64| HistogramDataPoint {
        attributes: (0..32).map(|k| kv(&format!("k{k}"), format!("{round}-{i}"))).collect(),
        start_time_unix_nano: 1,
        time_unix_nano: 2 + round,
        count: 0,
        bucket_counts: vec![0; 257],
        explicit_bounds: bounds.clone(),
        ..Default::default()
    };
    // Each point is about the same size on the wire (a few bytes of framing).
    let per_point = prost::Message::encoded_len(&point(1_000_000)) + 8;
    let points: Vec<_> = (0..(bytes / per_point) as u64).map(point).collect();
    let metric = Metric {
        name: "heavy".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    };
    request("loader", instance, vec![metric])
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The real binary under a stream of maximum-size pushes from 8 concurrent
/// clients: with a 32 MiB state budget and 2 pushes decoded at once, its
/// peak RSS stays under 256 MiB (8 decodes at once, or an unbounded state,
/// would not). The peak is printed for the record.
#[tokio::test(flavor = "multi_thread")]
async fn maximum_size_pushes_keep_the_real_binary_under_its_memory_limit() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-metrics-aggregator"))
        .args(["--grpc-addr", &format!("127.0.0.1:{port}"), "--admin-addr", "127.0.0.1:0"])
        .args(["--log-format", "text", "--log-filter", "warn", "--max-bytes", "32MiB", "--max-push-bytes", "4MiB"])
        .args(["--max-series", "1000000", "--max-series-per-metric", "1000000", "--max-source-push-rate", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let endpoint = format!("http://127.0.0.1:{port}");
    eventually(WAIT, "the binary to listen", || {
        let endpoint = endpoint.clone();
        async move {
            opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(
                endpoint,
            )
            .await
            .ok()
        }
    })
    .await;
    let mut tasks = Vec::new();
    for pusher in 0..8u64 {
        // One connection per pusher, as separate pods have.
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let client =
                opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(
                    endpoint,
                )
                .await
                .expect("connect");
            let mut client = client.max_encoding_message_size(8 << 20);
            let mut rejected = 0i64;
            for round in 0..4 {
                let push = heavy_push(&format!("p-{pusher}"), round, (4 << 20) - (64 << 10));
                match client.export(push).await {
                    Ok(response) => rejected += response.into_inner().partial_success.map_or(0, |p| p.rejected_data_points),
                    // No slot within the wait: refused whole, as retryable.
                    Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
                }
            }
            rejected
        }));
    }
    let mut rejected = 0;
    for task in tasks {
        rejected += task.await.unwrap();
    }
    let peak = peak_rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!("peak RSS {} MiB over 32 pushes of 4 MiB, {rejected} points rejected over the budget", peak / 1024);
    assert!(rejected > 0, "the budget never refused anything");
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {} MiB", peak / 1024);
}
