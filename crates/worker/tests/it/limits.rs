//! The concurrency bound, deadlines and dropped calls.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::helpers::{eventually, execute, spawn_worker};

#[tokio::test]
async fn over_the_concurrency_bound_is_refused_at_once_and_dropped_calls_are_cancelled() {
    let worker = spawn_worker(&["--max-concurrency", "2"]).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut client = worker.client.clone();
            tokio::spawn(async move { client.execute(execute("sleep", r#"{"ms": 60000}"#, None)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || worker.stats.in_flight() == 2).await, "two sleeps in flight");

    let started = Instant::now();
    let status = worker.client.clone().execute(execute("echo", "1", None)).await.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("concurrency limit of 2"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not queued");

    // The callers go away: their tasks are cancelled, not left running.
    for call in &slow {
        call.abort();
    }
    assert!(eventually(Duration::from_secs(2), || worker.stats.in_flight() == 0).await, "slots freed");
    assert_eq!(worker.stats.cancelled(), 2);
    assert!(worker.client.clone().execute(execute("echo", "1", None)).await.is_ok());
}

#[tokio::test]
async fn a_passed_deadline_cancels_a_sleep() {
    let mut worker = spawn_worker(&[]).await;
    let started = Instant::now();
    let status = worker
        .client
        .execute(execute("sleep", r#"{"ms": 5000}"#, Some(Duration::from_millis(200))))
        .await
        .expect_err("deadline");
    assert_deadline(&status);
    assert!(started.elapsed() < Duration::from_secs(2), "answered at the deadline, not after the sleep");
    assert!(eventually(Duration::from_secs(1), || worker.stats.in_flight() == 0).await);
    assert_eq!(worker.stats.cancelled(), 1);
}

#[tokio::test]
async fn a_passed_deadline_stops_blocking_hash_work() {
    let mut worker = spawn_worker(&[]).await;
    let status = worker
        .client
        .execute(execute("hash", r#"{"data": "x", "rounds": 10000000}"#, Some(Duration::from_millis(200))))
        .await
        .expect_err("deadline");
    assert_deadline(&status);
    // The blocking thread notices within one check interval.
    assert!(
        eventually(Duration::from_secs(1), || worker.stats.in_flight() == 0).await,
        "hash still running after its deadline"
    );
    assert_eq!(worker.stats.cancelled(), 1);
}

#[tokio::test]
async fn stopping_waits_for_in_flight_calls() {
    let worker = spawn_worker(&[]).await;
    let mut client = worker.client.clone();
    let call = tokio::spawn(async move { client.execute(execute("sleep", r#"{"ms": 300}"#, None)).await });
    assert!(eventually(Duration::from_secs(5), || worker.stats.in_flight() == 1).await);
    let stats = worker.stats.clone();
    worker.stop().await.expect("clean stop");
    assert!(call.await.unwrap().is_ok(), "the in-flight call finished");
    assert_eq!((stats.in_flight(), stats.cancelled()), (0, 0));
}

#[tokio::test]
async fn after_the_grace_in_flight_tasks_are_cancelled() {
    let worker = spawn_worker(&["--shutdown-grace", "200ms"]).await;
    let mut client = worker.client.clone();
    let call = tokio::spawn(async move { client.execute(execute("sleep", r#"{"ms": 60000}"#, None)).await });
    assert!(eventually(Duration::from_secs(5), || worker.stats.in_flight() == 1).await);
    let stats = worker.stats.clone();
    worker.stop().await.expect("clean stop");
    let status = call.await.unwrap().expect_err("interrupted");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!((stats.in_flight(), stats.cancelled()), (0, 1));
}

/// The worker answers `DEADLINE_EXCEEDED` just before the caller's deadline;
/// on a loaded machine the client's own deadline timer can still fire first
/// (`CANCELLED`, "Timeout expired"). Either way the deadline was honoured;
/// the worker-side cancellation is asserted separately.
fn assert_deadline(status: &tonic::Status) {
    let client_timer = status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    assert!(status.code() == Code::DeadlineExceeded || client_timer, "{status:?}");
}
