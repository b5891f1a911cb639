//! Every bad input gets a precise problem+json answer, never a 500.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn bad_inputs_get_precise_problems() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &["--max-body-bytes", "1024"]).await;
    let tasks = format!("{}/v1/tasks/echo", gateway.url);
    let http = &gateway.http;

    // Malformed JSON.
    let response = http.post(&tasks).header("content-type", "application/json").body("{\"a\":").send().await.unwrap();
    let problem = expect_problem(response, 400).await;
    assert_eq!(problem["type"], "urn:shoal:problem:invalid-json");
    assert!(detail(&problem).contains("line 1"), "{problem}");

    // Wrong or missing content type.
    let response = http.post(&tasks).header("content-type", "text/plain").body("{}").send().await.unwrap();
    let problem = expect_problem(response, 415).await;
    assert!(detail(&problem).contains("application/json"), "{problem}");
    let response = http.post(&tasks).body("{}").send().await.unwrap();
    expect_problem(response, 415).await;

    // Oversized body.
    let big = json!({ "data": "x".repeat(4096) });
    let problem = expect_problem(http.post(&tasks).json(&big).send().await.unwrap(), 413).await;
    assert!(detail(&problem).contains("1024 bytes"), "{problem}");

    // Unknown route, wrong method.
    let problem = expect_problem(http.get(format!("{}/v2/nothing", gateway.url)).send().await.unwrap(), 404).await;
    assert!(detail(&problem).contains("/v2/nothing"), "{problem}");
    let response = http.get(&tasks).send().await.unwrap();
    let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
    let problem = expect_problem(response, 405).await;
    assert!(detail(&problem).contains("GET"), "{problem}");
    assert_eq!(allow.as_deref(), Some("POST"));
    expect_problem(http.delete(format!("{}/", gateway.url)).send().await.unwrap(), 405).await;

    // Bad Request-Timeout.
    for bad in ["abc", "0", "-2", "1s"] {
        let response = http.post(&tasks).header("request-timeout", bad).json(&json!({})).send().await.unwrap();
        let problem = expect_problem(response, 400).await;
        assert!(detail(&problem).contains("Request-Timeout"), "{bad}: {problem}");
    }

    // Unknown task kind, and one that is not even a valid name.
    let problem = expect_problem(gateway.task("teleport", json!({})).await, 400).await;
    assert!(detail(&problem).contains("unknown task kind `teleport`"), "{problem}");
    let problem = expect_problem(gateway.task("Tele%20port", json!({})).await, 400).await;
    assert!(detail(&problem).contains("is not valid"), "{problem}");

    // Bad delay on GET /.
    let problem =
        expect_problem(http.get(format!("{}/?delay_ms=99999999", gateway.url)).send().await.unwrap(), 400).await;
    assert!(detail(&problem).contains("delay_ms"), "{problem}");
}

#[tokio::test]
async fn hello_is_the_blueprints_answer() {
    shoal_telemetry::init_for_tests();
    let gateway = spawn_gateway(&[], &[], &[]).await;
    let response = gateway.http.get(format!("{}/", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!({"message": "Hello, Prometheus!"}));

    let started = std::time::Instant::now();
    let response = gateway.http.get(format!("{}/?delay_ms=200", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
}
