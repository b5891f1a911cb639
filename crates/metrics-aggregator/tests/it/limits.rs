//! Bounds: a cardinality flood is rejected by name while the rest of each
//! push is kept and memory stays bounded; sources past their TTL go down.

use opentelemetry_proto::tonic::metrics::v1::Gauge;
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric};
use shoal_proto::aggregator::v1::{ListMetricsRequest, ListSourcesRequest};
use shoal_testkit::eventually;

use crate::helpers::*;
use crate::ingest::{counter, point, request};

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unique_label_sets_is_bounded_and_named() {
    let mut agg = spawn_aggregator(&["--max-series-per-metric", "100", "--max-series", "150"]).await;
    let mut rejected = 0;
    for batch in 0..20 {
        // 1 000 new user ids per push, plus a well-behaved metric.
        let flood: Vec<_> = (0..1000)
            .map(|i| {
                let user = format!("user-{batch}-{i}");
                point(&[("user", user.as_str())], 1, 2, 1.0)
            })
            .collect();
        let steady = counter("jobs", vec![point(&[], 1, 10 + batch, f64::from(batch as u32))]);
        let response = agg
            .otlp
            .export(request("gateway", "gw-1", vec![counter("logins", flood), steady]))
            .await
            .expect("a flood is answered, not failed")
            .into_inner();
        let partial = response.partial_success.expect("partial success");
        assert!(
            partial.error_message.contains("metric `logins`: cardinality limit reached (100 label sets"),
            "{}",
            partial.error_message
        );
        assert!(!partial.error_message.contains("jobs"), "{}", partial.error_message);
        rejected += partial.rejected_data_points;
    }
    assert_eq!(rejected, 20 * 1000 - 100);
    // The rest of every push was kept.
    assert_eq!(fleet_value(&mut agg, "jobs").await.expect("jobs").value, 19.0);
    let metrics = agg.query.list_metrics(ListMetricsRequest {}).await.unwrap().into_inner().metrics;
    let logins = metrics.iter().find(|m| m.name == "logins").expect("logins");
    assert_eq!(logins.series, 100);

    // A second source may not exceed the overall bound either.
    for instance in ["gw-2", "gw-3", "gw-4"] {
        let flood: Vec<_> = (0..200)
            .map(|i| {
                let user = format!("{instance}-{i}");
                point(&[("user", user.as_str())], 1, 2, 1.0)
            })
            .collect();
        let response = agg.otlp.export(request("gateway", instance, vec![counter("signups", flood)])).await.unwrap();
        let message = response.into_inner().partial_success.expect("over the bound").error_message;
        assert!(message.contains("metric `signups`: overall series limit reached (150 series"), "{message}");
    }
    let sources = agg.query.list_sources(ListSourcesRequest {}).await.unwrap().into_inner().sources;
    let held: u32 = sources.iter().map(|s| s.series).sum();
    assert_eq!(held, 150, "exactly the overall bound");
    agg.stop().await;
}

fn gauge(name: &str, time: u64, value: f64) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Gauge(Gauge { data_points: vec![point(&[], 0, time, value)] })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_source_goes_down_its_gauges_leave_and_its_counters_stay() {
    let mut agg = spawn_aggregator(&["--source-ttl", "500ms", "--gauge-policy", "pool_size=sum"]).await;
    let push = |instance: &str, time: u64| {
        request(
            "worker",
            instance,
            vec![gauge("pool_size", time, 4.0), counter("jobs", vec![point(&[], 1, time, 10.0)])],
        )
    };
    agg.otlp.export(push("w-1", 100)).await.unwrap();
    agg.otlp.export(push("w-2", 100)).await.unwrap();
    assert_eq!(fleet_value(&mut agg, "pool_size").await.unwrap().value, 8.0);

    // w-2 keeps pushing, w-1 stops.
    let mut time = 200;
    let down = eventually(WAIT, "w-1 to go down", || {
        time += 1;
        let mut query = agg.query.clone();
        let mut otlp = agg.otlp.clone();
        let next = push("w-2", time);
        async move {
            otlp.export(next).await.ok()?;
            let sources = query.list_sources(ListSourcesRequest {}).await.ok()?.into_inner().sources;
            let w1 = sources.iter().find(|s| s.instance_id == "w-1")?;
            (!w1.up).then_some(sources)
        }
    })
    .await;
    assert!(down.iter().find(|s| s.instance_id == "w-2").is_some_and(|s| s.up));
    let pool = fleet_value(&mut agg, "pool_size").await.unwrap();
    assert_eq!((pool.value, pool.sources), (4.0, 1), "only the live source's gauge");
    let jobs = fleet_value(&mut agg, "jobs").await.unwrap();
    assert_eq!((jobs.value, jobs.sources), (20.0, 2), "the stale source's counter stays");

    let text = reqwest::get(format!("http://{}/metrics", agg.admin)).await.unwrap().text().await.unwrap();
    assert!(text.contains("fleet_up{service=\"worker\",instance=\"w-1\"} 0\n"), "{text}");
    assert!(text.contains("fleet_up{service=\"worker\",instance=\"w-2\"} 1\n"), "{text}");
    agg.stop().await;
}
