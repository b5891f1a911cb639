//! Windows (rates and quantiles), the Watch stream, Prometheus text,
//! health and reflection.

use std::time::Duration;

use futures::StreamExt as _;
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use shoal_proto::aggregator::v1::{Grouping, Selector, WatchRequest, WindowRequest};
use shoal_testkit::eventually;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn windows_give_rates_and_quantiles_fleet_wide_and_per_service() {
    let mut agg = spawn_aggregator(&[]).await;
    let mut instruments = Vec::new();
    for (service, instance) in [("gateway", "gw-1"), ("gateway", "gw-2"), ("worker", "w-1")] {
        let provider = sdk_provider(&agg.endpoint(), service, instance);
        let meter = provider.meter("test");
        let requests = meter.u64_counter("requests").build();
        let latency = meter.f64_histogram("latency").with_boundaries(vec![0.01, 0.1, 1.0]).build();
        requests.add(100, &[]);
        flush(&provider).await;
        instruments.push((provider, requests, latency));
    }
    // Let windows sample the starting point, then add traffic.
    let sampled = |agg: &mut Spawned| {
        let mut query = agg.query.clone();
        async move {
            let request = WindowRequest {
                selector: Some(Selector { metric: "requests".into(), ..Default::default() }),
                window_seconds: 60,
                quantiles: vec![],
            };
            let series = query.window(request).await.ok()?.into_inner().series;
            (series.first()?.covered_seconds > 0.0).then_some(())
        }
    };
    eventually(WAIT, "a first window sample", || sampled(&mut agg)).await;
    for (provider, requests, latency) in &instruments {
        requests.add(30, &[]);
        for _ in 0..90 {
            latency.record(0.05, &[KeyValue::new("route", "/")]);
        }
        for _ in 0..10 {
            latency.record(0.5, &[KeyValue::new("route", "/")]);
        }
        flush(provider).await;
    }
    let window = |by_service: bool, metric: &str| WindowRequest {
        selector: Some(Selector {
            metric: metric.into(),
            by_service,
            grouping: Some(Grouping { labels: vec![] }),
            ..Default::default()
        }),
        window_seconds: 300,
        quantiles: vec![0.5, 0.99],
    };
    let fleet = agg.query.window(window(false, "requests")).await.unwrap().into_inner();
    assert_eq!(fleet.window_seconds, 300);
    assert_eq!(fleet.series.len(), 1);
    assert_eq!(fleet.series[0].increase, 90.0);
    assert!(fleet.series[0].rate_per_second > 0.0);

    let per_service = agg.query.window(window(true, "requests")).await.unwrap().into_inner().series;
    let increases: Vec<(String, f64)> = per_service.iter().map(|s| (s.service.clone(), s.increase)).collect();
    assert_eq!(increases, [("gateway".to_owned(), 60.0), ("worker".to_owned(), 30.0)]);

    // The latency histogram appeared after the first sample: wait for one.
    let latency = eventually(WAIT, "latency quantiles over the window", || {
        let mut query = agg.query.clone();
        let request = window(false, "latency");
        async move {
            // Push nothing new: the window must be computed from samples.
            let series = query.window(request).await.ok()?.into_inner().series;
            let s = series.into_iter().next()?;
            (s.covered_seconds > 0.0).then_some(s)
        }
    })
    .await;
    // All 300 points arrived before the histogram's first sample: the window
    // saw no new points. Add some now and read the window quantiles.
    assert_eq!(latency.increase, 0.0);
    for (provider, _, histogram) in &instruments {
        for _ in 0..99 {
            histogram.record(0.05, &[KeyValue::new("route", "/")]);
        }
        histogram.record(0.5, &[KeyValue::new("route", "/")]);
        flush(provider).await;
    }
    let latency = agg.query.window(window(false, "latency")).await.unwrap().into_inner().series.remove(0);
    assert_eq!(latency.increase, 300.0);
    let p50 = latency.quantiles[0].value;
    let p99 = latency.quantiles[1].value;
    assert!((0.01..=0.1).contains(&p50), "p50 {p50}");
    assert!((0.1..=1.0).contains(&p99), "p99 {p99}");

    // A window over a gauge is refused clearly.
    instruments[0].0.meter("test").u64_gauge("temperature").build().record(3, &[]);
    flush(&instruments[0].0).await;
    let status = agg.query.window(window(false, "temperature")).await.expect_err("gauge window");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("metric `temperature` is a gauge"), "{}", status.message());
    let status = agg.query.window(WindowRequest { window_seconds: 7200, ..window(false, "requests") }).await;
    assert_eq!(status.expect_err("too long").code(), tonic::Code::InvalidArgument);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_updates_and_ends_on_shutdown() {
    let mut agg = spawn_aggregator(&[]).await;
    let provider = sdk_provider(&agg.endpoint(), "gateway", "gw-1");
    let requests = provider.meter("test").u64_counter("requests").build();
    requests.add(1, &[]);
    flush(&provider).await;
    let request = WatchRequest {
        selector: Some(Selector { metric: "requests".into(), ..Default::default() }),
        window_seconds: 0,
        interval_ms: 100,
        quantiles: vec![],
    };
    let mut stream = agg.query.watch(request).await.expect("watch").into_inner();
    let first = stream.next().await.expect("an update").expect("ok");
    assert_eq!(first.instant[0].value, 1.0);
    requests.add(4, &[]);
    flush(&provider).await;
    let mut seen = 1.0;
    for _ in 0..100 {
        let update = stream.next().await.expect("an update").expect("ok");
        seen = update.instant[0].value;
        if seen == 5.0 {
            break;
        }
    }
    assert_eq!(seen, 5.0);
    // Shutdown ends the stream instead of holding the drain open.
    agg.stop().await;
    let end =
        tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = stream.next().await {} }).await;
    assert!(end.is_ok(), "the watch ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_metrics_show_the_fleet_beside_the_aggregators_own_metrics() {
    let agg = spawn_aggregator(&[]).await;
    let provider = sdk_provider(&agg.endpoint(), "gateway", "gw-1");
    let meter = provider.meter("test");
    meter.u64_counter("http_requests").build().add(7, &[KeyValue::new("endpoint", "/")]);
    meter.f64_histogram("http_request_duration_seconds").with_boundaries(vec![0.1, 1.0]).build().record(0.05, &[]);
    flush(&provider).await;
    let text = reqwest::get(format!("http://{}/metrics", agg.admin)).await.unwrap().text().await.unwrap();
    assert!(text.contains("fleet_http_requests_total{service=\"gateway\",endpoint=\"/\"} 7\n"), "{text}");
    assert!(text.contains("fleet_http_request_duration_seconds_bucket{service=\"gateway\",le=\"0.1\"} 1\n"), "{text}");
    assert!(text.contains("aggregator_points_total{outcome=\"accepted\"}"), "own metrics too: {text}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_every_service() {
    let agg = spawn_aggregator(&[]).await;
    let channel = tonic::transport::Channel::from_shared(agg.endpoint()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", shoal_metrics_aggregator::OTLP_SERVICE_NAME, "shoal.aggregator.v1.AggregatorService"] {
        let response =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.expect("health");
        assert_eq!(
            response.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    agg.stop().await;
}
