//! Task round trips through the gateway, and each worker error mapped.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn echo_sleep_and_hash_round_trip() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;

    let response = gateway.task("echo", json!({"hello": ["world", 1]})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["kind"], "echo");
    assert_eq!(body["output"], json!({"hello": ["world", 1]}));
    assert_eq!(body["worker_id"], worker.id.as_str());
    assert!(body["duration_us"].is_u64());

    let body: Value = gateway.task("sleep", json!({"ms": 20})).await.json().await.unwrap();
    assert_eq!(body["output"]["slept_ms"], 20, "{body}");
    assert!(body["duration_us"].as_u64().unwrap() >= 20_000, "{body}");

    let body: Value = gateway.task("hash", json!({"data": "abc", "rounds": 3})).await.json().await.unwrap();
    assert_eq!(body["kind"], "hash");
    assert_eq!(body["output"]["rounds"], 3, "{body}");
    assert_eq!(body["output"]["digest"].as_str().unwrap().len(), 64, "{body}");
}

#[tokio::test]
async fn worker_errors_map_to_problems() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;

    // INVALID_ARGUMENT: unknown kind, or a payload that does not fit.
    let problem = expect_problem(gateway.task("nope", json!({})).await, 400).await;
    assert!(detail(&problem).contains("unknown task kind `nope`"), "{problem}");
    assert_eq!(problem["type"], "urn:shoal:problem:invalid-task");
    let problem = expect_problem(gateway.task("sleep", json!({"ms": "soon"})).await, 400).await;
    assert!(detail(&problem).contains("invalid type"), "{problem}");

    // ABORTED: the task failed on purpose; its message is passed on.
    let problem = expect_problem(gateway.task("fail", json!({"error": "disk on fire"})).await, 422).await;
    assert!(detail(&problem).contains("disk on fire"), "{problem}");
    assert_eq!(problem["type"], "urn:shoal:problem:task-failed");
}

#[tokio::test]
async fn a_busy_worker_is_a_503_with_retry_after() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&["--max-concurrency", "1"]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;

    let url = format!("{}/v1/tasks/sleep", gateway.url);
    let http = gateway.http.clone();
    let slow = tokio::spawn(async move { http.post(url).json(&json!({"ms": 2000})).send().await });
    let busy = eventually(Duration::from_secs(5), || async { (worker.stats.in_flight() == 1).then_some(()) }).await;
    assert!(busy.is_some(), "the slow task never started");

    let response = gateway.task("echo", json!(1)).await;
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()).as_deref(), Some("1"));
    let problem = expect_problem(response, 503).await;
    assert_eq!(problem["type"], "urn:shoal:problem:workers-busy");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn an_unreachable_worker_is_a_503() {
    shoal_telemetry::init_for_tests();
    let gateway = spawn_gateway(&[dead_addr().await], &[], &[]).await;
    let response = gateway.task("echo", json!(1)).await;
    assert!(response.headers().contains_key("retry-after"));
    let problem = expect_problem(response, 503).await;
    assert_eq!(problem["type"], "urn:shoal:problem:upstream-unavailable");
    assert!(!detail(&problem).contains("127.0.0.1"), "internal addresses leak: {problem}");
}

#[tokio::test]
async fn no_worker_address_fails_fast_with_503() {
    shoal_telemetry::init_for_tests();
    let gateway = spawn_gateway(&[], &[], &[]).await;
    let started = std::time::Instant::now();
    expect_problem(gateway.task("echo", json!(1)).await, 503).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn requests_above_max_in_flight_are_shed() {
    shoal_telemetry::init_for_tests();
    let gateway = spawn_gateway(&[], &[], &["--max-in-flight", "1"]).await;
    let url = format!("{}/?delay_ms=1500", gateway.url);
    let http = gateway.http.clone();
    let slow = tokio::spawn(async move { http.get(url).send().await });
    // Bounded poll: until the slow request holds the only slot.
    let shed = eventually(Duration::from_secs(5), || async {
        let response = gateway.http.get(format!("{}/", gateway.url)).send().await.ok()?;
        (response.status() == 503).then_some(response)
    })
    .await
    .expect("a second request is shed while the first is in flight");
    assert!(shed.headers().contains_key("retry-after"));
    let problem = expect_problem(shed, 503).await;
    assert_eq!(problem["type"], "urn:shoal:problem:overloaded");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn task_payloads_are_what_the_openapi_document_says() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    // `integer` in JSON Schema admits a zero fraction.
    let body: Value = gateway.task("sleep", json!({"ms": 5.0})).await.json().await.unwrap();
    assert_eq!(body["output"]["slept_ms"], 5, "{body}");
    let body: Value = gateway.task("hash", json!({"data": "abc", "rounds": 2.0})).await.json().await.unwrap();
    assert_eq!(body["output"]["rounds"], 2, "{body}");
    // `additionalProperties: false`: an unknown field is a 400 naming it.
    for (kind, payload) in [
        ("sleep", json!({"ms": 1, "x": 1})),
        ("hash", json!({"data": "", "x": 1})),
        ("fail", json!({"error": "e", "x": 1})),
    ] {
        let problem = expect_problem(gateway.task(kind, payload).await, 400).await;
        assert!(detail(&problem).contains("unknown field `x`"), "{kind}: {problem}");
    }
    let problem = expect_problem(gateway.task("sleep", json!({"ms": 1.5})).await, 400).await;
    assert!(detail(&problem).contains("invalid type: floating point"), "{problem}");
    // I-JSON: a lone surrogate is a 400 at the gateway, for every kind.
    let response = gateway
        .http
        .post(format!("{}/v1/tasks/echo", gateway.url))
        .header("content-type", "application/json")
        .body(r#"{"a": "\ud800"}"#)
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 400).await;
    assert_eq!(problem["type"], "urn:shoal:problem:invalid-json", "{problem}");
    // The fail kind answers its documented 422 for every valid payload.
    let problem = expect_problem(gateway.task("fail", json!({"error": "0"})).await, 422).await;
    assert_eq!(problem["type"], "urn:shoal:problem:task-failed");
}

#[tokio::test]
async fn a_sleep_longer_than_the_deadline_is_the_documented_504() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &["--default-timeout", "200ms", "--max-timeout", "300ms"]).await;
    let started = std::time::Instant::now();
    let response = gateway
        .http
        .post(format!("{}/v1/tasks/sleep", gateway.url))
        .header("request-timeout", "3600")
        .json(&json!({"ms": 3_600_000}))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 504).await;
    assert_eq!(problem["type"], "urn:shoal:problem:timeout");
    assert!(started.elapsed() < Duration::from_secs(2), "clamped to --max-timeout");
}
