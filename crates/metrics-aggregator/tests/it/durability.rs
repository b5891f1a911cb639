//! State in Redis: a restart recovers the fleet view, and two replicas
//! behind one address give the same answer.

use shoal_testkit::{RedisServer, eventually};

use crate::helpers::*;
use crate::ingest::{counter, point, request};

async fn checkpoint_fields(url: &str) -> usize {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    redis::cmd("HLEN").arg("shoal:aggregator:v1:sources").query_async(&mut conn).await.expect("hlen")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_aggregator_recovers_the_fleet_view_from_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut first = spawn_aggregator(&["--redis-url", &url, "--replica-id", "one"]).await;
    for instance in ["gw-1", "gw-2"] {
        first
            .otlp
            .export(request("gateway", instance, vec![counter("requests", vec![point(&[], 1, 5, 21.0)])]))
            .await
            .unwrap();
    }
    assert_eq!(fleet_value(&mut first, "requests").await.unwrap().value, 42.0);
    eventually(WAIT, "a checkpoint", || {
        let url = url.clone();
        async move { (checkpoint_fields(&url).await == 2).then_some(()) }
    })
    .await;
    first.stop().await;

    let mut second = spawn_aggregator(&["--redis-url", &url, "--replica-id", "one"]).await;
    let recovered = eventually(WAIT, "the state to come back", || {
        let mut query = second.query.clone();
        async move {
            let request = shoal_proto::aggregator::v1::InstantRequest {
                selector: Some(shoal_proto::aggregator::v1::Selector {
                    metric: "requests".into(),
                    grouping: Some(shoal_proto::aggregator::v1::Grouping { labels: vec![] }),
                    ..Default::default()
                }),
                quantiles: vec![],
            };
            query.instant(request).await.ok()?.into_inner().series.into_iter().next()
        }
    })
    .await;
    assert_eq!(recovered.value, 42.0);
    // The same cumulative point pushed again after the restart counts once.
    second
        .otlp
        .export(request("gateway", "gw-1", vec![counter("requests", vec![point(&[], 1, 5, 21.0)])]))
        .await
        .unwrap();
    assert_eq!(fleet_value(&mut second, "requests").await.unwrap().value, 42.0);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_behind_one_address_give_the_same_answer() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut a = spawn_aggregator(&["--redis-url", &url, "--replica-id", "a"]).await;
    let mut b = spawn_aggregator(&["--redis-url", &url, "--replica-id", "b"]).await;
    // Each replica gets some sources; one source's pushes alternate between them.
    a.otlp.export(request("gateway", "gw-1", vec![counter("requests", vec![point(&[], 1, 5, 10.0)])])).await.unwrap();
    b.otlp.export(request("gateway", "gw-2", vec![counter("requests", vec![point(&[], 1, 5, 20.0)])])).await.unwrap();
    a.otlp.export(request("worker", "w-1", vec![counter("requests", vec![point(&[], 1, 5, 3.0)])])).await.unwrap();
    b.otlp.export(request("worker", "w-1", vec![counter("requests", vec![point(&[], 1, 9, 7.0)])])).await.unwrap();
    a.otlp.export(request("worker", "w-1", vec![counter("requests", vec![point(&[], 1, 7, 5.0)])])).await.unwrap();

    for replica in [&mut a, &mut b] {
        eventually(WAIT, "the replica to converge", || {
            let mut query = replica.query.clone();
            async move {
                let request = shoal_proto::aggregator::v1::InstantRequest {
                    selector: Some(shoal_proto::aggregator::v1::Selector {
                        metric: "requests".into(),
                        by_service: true,
                        grouping: Some(shoal_proto::aggregator::v1::Grouping { labels: vec![] }),
                        ..Default::default()
                    }),
                    quantiles: vec![],
                };
                let series = query.instant(request).await.ok()?.into_inner().series;
                let values: Vec<(String, f64)> = series.into_iter().map(|s| (s.service, s.value)).collect();
                (values == [("gateway".to_owned(), 30.0), ("worker".to_owned(), 7.0)]).then_some(())
            }
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
}
