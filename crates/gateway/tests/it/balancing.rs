//! Client-side load balancing: calls spread over every worker address, and
//! a worker that appears while traffic flows gets calls within seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// Sends `total` echo calls, `concurrency` at a time; counts by worker id.
async fn spread(gateway: &Arc<TestGateway>, total: usize, concurrency: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..total / concurrency {
                let response = gateway.task("echo", json!(null)).await;
                assert_eq!(response.status(), 200);
                let body: Value = response.json().await.unwrap();
                ids.push(body["worker_id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut counts = HashMap::new();
    for task in tasks {
        for id in task.await.unwrap() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn calls_spread_over_three_workers() {
    shoal_telemetry::init_for_tests();
    let workers = [spawn_worker(&[]).await, spawn_worker(&[]).await, spawn_worker(&[]).await];
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = Arc::new(spawn_gateway(&addrs, &[], &[]).await);

    let counts = spread(&gateway, 300, 10).await;
    assert_eq!(counts.values().sum::<usize>(), 300);
    for worker in &workers {
        let share = counts.get(&worker.id).copied().unwrap_or(0);
        assert!(share >= 45, "worker {} got {share} of 300 calls: {counts:?}", worker.id);
    }
}

#[tokio::test]
async fn a_worker_added_while_traffic_flows_gets_calls() {
    shoal_telemetry::init_for_tests();
    let workers = [spawn_worker(&[]).await, spawn_worker(&[]).await, spawn_worker(&[]).await];
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = Arc::new(spawn_gateway(&addrs, &[], &[]).await);
    let fourth = spawn_worker(&[]).await;

    // Traffic flows in the background for the whole test (bounded).
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<String>(1024);
    let traffic = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            for _ in 0..5000 {
                let response = gateway.task("echo", json!(1)).await;
                assert_eq!(response.status(), 200);
                let body: Value = response.json().await.unwrap();
                if seen_tx.send(body["worker_id"].as_str().unwrap().to_owned()).await.is_err() {
                    return;
                }
            }
        })
    };
    // Before the change, the 4th worker gets nothing.
    for _ in 0..30 {
        assert_ne!(seen_rx.recv().await.unwrap(), fourth.id);
    }
    gateway.workers.insert(fourth.addr);
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(id) = seen_rx.recv().await {
            if id == fourth.id {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found.ok(), Some(true), "the added worker got no call within 5 s");
    drop(seen_rx);
    traffic.abort();
    let _ = traffic.await;

    // And a removed worker stops getting calls.
    gateway.workers.remove(workers[0].addr);
    let gone = eventually(Duration::from_secs(5), || async {
        let counts = spread(&gateway, 40, 4).await;
        (!counts.contains_key(&workers[0].id)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "a removed worker kept getting calls");
}

#[tokio::test]
async fn a_dead_address_among_live_workers_costs_no_failed_request() {
    // A killed pod's address stays in DNS for a few seconds: calls that
    // cannot even connect there are retried on another worker.
    let live = spawn_worker(&[]).await;
    let dead = crate::helpers::dead_addr().await;
    let gateway = spawn_gateway(&[live.addr, dead], &[], &[]).await;
    let mut failures = Vec::new();
    for i in 0..60 {
        let response = gateway.task("echo", serde_json::json!({ "i": i })).await;
        if response.status() != 200 {
            failures.push(response.status().as_u16());
        }
    }
    assert!(failures.is_empty(), "requests failed with {failures:?}");
}
