//! `GET /v1/status`: parallel health checks of the worker and aggregator.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

async fn status(gateway: &TestGateway) -> (u16, Value) {
    let response = gateway.http.get(format!("{}/v1/status", gateway.url)).send().await.unwrap();
    let code = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    (code, response.json().await.unwrap())
}

#[tokio::test]
async fn all_up_is_ok() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let aggregator = spawn_aggregator().await;
    let gateway = spawn_gateway(&[worker.addr], &[aggregator.addr], &[]).await;
    // The services mark themselves serving right after they start: poll.
    let ok = eventually(Duration::from_secs(5), || async {
        let (code, body) = status(&gateway).await;
        (code == 200).then_some(body)
    })
    .await
    .expect("status becomes ok");
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["components"]["worker"]["status"], "serving");
    assert_eq!(ok["components"]["worker"]["endpoints"], 1);
    assert_eq!(ok["components"]["aggregator"]["status"], "serving");
}

#[tokio::test]
async fn an_aggregator_never_started_is_named() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[dead_addr().await], &[]).await;
    let body = eventually(Duration::from_secs(5), || async {
        let (code, body) = status(&gateway).await;
        (code == 503 && body["components"]["worker"]["status"] == "serving").then_some(body)
    })
    .await
    .expect("worker serving, aggregator down");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["components"]["aggregator"]["status"], "down");
    // Its health watch never reported SERVING: it never entered the balancer.
    assert_eq!(body["components"]["aggregator"]["detail"], "no address serving", "{body}");
}

#[tokio::test]
async fn a_stopped_aggregator_is_named() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let aggregator = spawn_aggregator().await;
    let gateway = spawn_gateway(&[worker.addr], &[aggregator.addr], &[]).await;
    eventually(Duration::from_secs(5), || async { (status(&gateway).await.0 == 200).then_some(()) })
        .await
        .expect("status ok first");
    aggregator.stop().await;
    let body = eventually(Duration::from_secs(5), || async {
        let (code, body) = status(&gateway).await;
        (code == 503).then_some(body)
    })
    .await
    .expect("status degraded once the aggregator stops");
    assert_eq!(body["components"]["aggregator"]["status"], "down", "{body}");
    assert_eq!(body["components"]["worker"]["status"], "serving", "{body}");
}

#[tokio::test]
async fn both_hanging_answers_within_one_check_deadline() {
    shoal_telemetry::init_for_tests();
    // Listeners that never accept: connections hang, checks time out.
    let hang_worker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_aggregator = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = spawn_gateway(
        &[hang_worker.local_addr().unwrap()],
        &[hang_aggregator.local_addr().unwrap()],
        &["--status-timeout", "1s"],
    )
    .await;
    let started = Instant::now();
    let (code, body) = status(&gateway).await;
    let elapsed = started.elapsed();
    assert_eq!(code, 503);
    assert_eq!(body["status"], "degraded");
    for component in ["worker", "aggregator"] {
        assert_eq!(body["components"][component]["status"], "down", "{body}");
    }
    // In parallel: about one deadline (1 s), not the sum of two.
    assert!(elapsed < Duration::from_millis(1800), "took {elapsed:?}: {body}");
}

#[tokio::test]
async fn nothing_resolved_is_down_at_once_until_an_address_appears() {
    shoal_telemetry::init_for_tests();
    let gateway = spawn_gateway(&[], &[], &[]).await;
    let (code, body) = status(&gateway).await;
    assert_eq!(code, 503);
    assert_eq!(body["components"]["worker"]["detail"], "no address resolved");
    assert_eq!(body["components"]["aggregator"]["endpoints"], 0);

    // The aggregator's addresses are re-resolved like the workers'.
    let aggregator = spawn_aggregator().await;
    gateway.aggregators.insert(aggregator.addr);
    let body = eventually(Duration::from_secs(5), || async {
        let (_, body) = status(&gateway).await;
        (body["components"]["aggregator"]["status"] == "serving").then_some(body)
    })
    .await
    .expect("the aggregator is found once resolved");
    assert_eq!(body["components"]["aggregator"]["endpoints"], 1);
    assert_eq!(body["components"]["worker"]["status"], "down");
}
