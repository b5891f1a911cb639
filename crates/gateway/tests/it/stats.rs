//! `GET /v1/stats`: the fleet view from the aggregator's query API.

use serde_json::Value;

use crate::helpers::{dead_addr, detail, spawn_aggregator, spawn_gateway};

#[tokio::test]
async fn stats_answer_from_the_aggregator_and_refuse_a_bad_window() {
    let aggregator = spawn_aggregator().await;
    let gateway = spawn_gateway(&[], &[aggregator.addr], &[]).await;
    let response = gateway.http.get(format!("{}/v1/stats?window=300", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["window_seconds"], 300);
    assert!(body["services"].is_object(), "{body}");

    let response = gateway.http.get(format!("{}/v1/stats?window=7200", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.unwrap();
    assert!(detail(&problem).contains("window must be 1..=3600"), "{problem}");
    for bad in ["abc", "-1", "1.5", "99999999999"] {
        let response = gateway.http.get(format!("{}/v1/stats?window={bad}", gateway.url)).send().await.unwrap();
        let problem = crate::helpers::expect_problem(response, 400).await;
        assert!(detail(&problem).contains("window"), "{bad}: {problem}");
    }
    aggregator.stop().await;
}

#[tokio::test]
async fn stats_without_a_reachable_aggregator_are_a_problem_not_a_hang() {
    let gateway = spawn_gateway(&[], &[dead_addr().await], &[]).await;
    let response = gateway.http.get(format!("{}/v1/stats", gateway.url)).send().await.unwrap();
    let status = response.status().as_u16();
    assert!([502, 503, 504].contains(&status), "{status}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
}

#[tokio::test]
async fn stats_answers_are_reused_for_the_cache_ttl() {
    let aggregator = spawn_aggregator().await;
    let gateway = spawn_gateway(&[], &[aggregator.addr], &["--stats-cache-ttl", "60s"]).await;
    let get = |query: &'static str| gateway.http.get(format!("{}/v1/stats?{query}", gateway.url)).send();
    let first = get("window=120").await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("age").is_none(), "a fresh answer");
    let first = first.text().await.unwrap();
    // The aggregator is gone: the answer can only come from the cache.
    aggregator.stop().await;
    let second = get("window=120").await.unwrap();
    assert_eq!(second.status(), 200);
    assert!(second.headers().contains_key("age"));
    assert_eq!(second.text().await.unwrap(), first);
    // Another window is another answer (and now the aggregator is down).
    assert_ne!(get("window=30").await.unwrap().status(), 200);
}
