//! Deadline propagation: `Request-Timeout` bounds the HTTP answer and the
//! worker's work.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn request_timeout_cancels_the_work_on_the_worker() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;

    let started = Instant::now();
    let response = gateway
        .http
        .post(format!("{}/v1/tasks/sleep", gateway.url))
        .header("request-timeout", "0.3")
        .json(&json!({"ms": 5000}))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let problem = expect_problem(response, 504).await;
    assert_eq!(problem["type"], "urn:shoal:problem:timeout");
    assert!(detail(&problem).contains("0.3s"), "{problem}");
    assert!(elapsed < Duration::from_secs(2), "answered after {elapsed:?}");

    // The worker stopped working on it.
    let idle = eventually(Duration::from_secs(3), || async { (worker.stats.in_flight() == 0).then_some(()) }).await;
    assert!(idle.is_some(), "the worker kept the task running");
    assert!(worker.stats.cancelled() >= 1);
}

#[tokio::test]
async fn a_long_request_timeout_is_clamped_to_the_max() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &["--default-timeout", "200ms", "--max-timeout", "400ms"]).await;
    let started = Instant::now();
    let response = gateway
        .http
        .post(format!("{}/v1/tasks/sleep", gateway.url))
        .header("request-timeout", "3600")
        .json(&json!({"ms": 5000}))
        .send()
        .await
        .unwrap();
    expect_problem(response, 504).await;
    assert!(started.elapsed() < Duration::from_secs(3));

    // Without the header, the default applies.
    let problem = expect_problem(gateway.task("sleep", json!({"ms": 5000})).await, 504).await;
    assert!(detail(&problem).contains("0.2s"), "{problem}");
}
