//! The jobs API over gRPC, against an in-process worker and a real Redis:
//! validation, idempotency, lookups, cancellation, backpressure, a dead
//! Redis, and readiness.

use std::time::Duration;

use shoal_proto::worker::v1::{CancelJobRequest, GetJobRequest, Job, JobState, SubmitJobRequest};
use shoal_testkit::{RedisServer, eventually};
use tonic::Code;

use crate::helpers::{TestWorker, spawn_worker};

async fn spawn_with_redis(redis: &RedisServer, extra: &[&str]) -> TestWorker {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--reaper-interval", "100ms"];
    args.extend_from_slice(extra);
    spawn_worker(&args).await
}

fn request(kind: &str, payload: &str) -> SubmitJobRequest {
    SubmitJobRequest { kind: kind.into(), payload_json: payload.into(), ..Default::default() }
}

async fn wait_for_state(worker: &TestWorker, id: &str, state: JobState) -> Job {
    eventually(Duration::from_secs(10), "job reaches the state", || {
        let mut client = worker.client.clone();
        let id = id.to_owned();
        async move {
            let job = client.get_job(GetJobRequest { id, owner: None }).await.ok()?.into_inner();
            (job.state == state as i32).then_some(job)
        }
    })
    .await
}

#[tokio::test]
async fn a_submitted_job_runs_and_can_be_read_back() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let mut client = worker.client.clone();
    let submitted = client.submit_job(request("echo", r#"{"n":1}"#)).await.unwrap().into_inner();
    assert!(submitted.created);
    let job = submitted.job.unwrap();
    assert_eq!(job.kind, "echo");
    assert_eq!(job.max_attempts, 3, "the worker's default");
    let done = wait_for_state(&worker, &job.id, JobState::Succeeded).await;
    assert_eq!(done.result_json.as_deref(), Some(r#"{"n":1}"#));
    assert_eq!(done.progress, 100);
    assert!(done.finished_unix_ms.unwrap() >= done.created_unix_ms);
}

#[tokio::test]
async fn submissions_are_validated_with_messages_that_say_what_to_fix() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--max-job-timeout", "10s"]).await;
    let mut client = worker.client.clone();
    let cases = [
        (request("nope", "{}"), "unknown job kind `nope`"),
        (request("echo", "{not json"), "not valid JSON"),
        (SubmitJobRequest { max_attempts: 1000, ..request("echo", "{}") }, "max_attempts must be between 1 and 100"),
        (SubmitJobRequest { timeout_ms: 60_000, ..request("echo", "{}") }, "timeout_ms must be at most 10000"),
        (SubmitJobRequest { idempotency_key: "has space".into(), ..request("echo", "{}") }, "idempotency key"),
    ];
    for (bad, expected) in cases {
        let status = client.submit_job(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{:?} should contain {expected:?}", status.message());
    }
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let mut client = worker.client.clone();
    let keyed = SubmitJobRequest { idempotency_key: "invoice-7".into(), ..request("echo", "{}") };
    let first = client.submit_job(keyed.clone()).await.unwrap().into_inner();
    let second = client.submit_job(keyed).await.unwrap().into_inner();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.job.unwrap().id, second.job.unwrap().id);
}

#[tokio::test]
async fn lookups_and_cancellations_answer_precisely() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let mut client = worker.client.clone();

    let bad = client.get_job(GetJobRequest { id: "not-a-uuid".into(), owner: None }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = uuid_like();
    let missing = client.get_job(GetJobRequest { id: unknown.clone(), owner: None }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        client.cancel_job(CancelJobRequest { id: unknown, owner: None }).await.unwrap_err().code(),
        Code::NotFound
    );

    let running = client.submit_job(request("sleep", r#"{"ms":60000}"#)).await.unwrap().into_inner().job.unwrap();
    wait_for_state(&worker, &running.id, JobState::Running).await;
    client.cancel_job(CancelJobRequest { id: running.id.clone(), owner: None }).await.unwrap();
    let cancelled = wait_for_state(&worker, &running.id, JobState::Cancelled).await;
    assert!(cancelled.error.unwrap_or_default().contains("cancelled"));
    let again = client.cancel_job(CancelJobRequest { id: running.id, owner: None }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("already ended (cancelled)"), "{again:?}");
}

#[tokio::test]
async fn a_full_queue_refuses_with_resource_exhausted() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--max-queued-jobs", "2", "--job-slots", "1"]).await;
    let mut client = worker.client.clone();
    for _ in 0..2 {
        client.submit_job(request("sleep", r#"{"ms":5000}"#)).await.unwrap();
    }
    let full = client.submit_job(request("echo", "{}")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(full.message().contains("queue is full"), "{full:?}");
}

#[tokio::test]
async fn without_redis_the_api_is_unavailable_fast_and_readiness_says_why() {
    let mut redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(5), "ready with redis", || async {
        let response = http.get(worker.admin_url("/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    redis.kill();
    let started = std::time::Instant::now();
    let status = worker.client.clone().submit_job(request("echo", "{}")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("job store is unavailable"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "answers within its store deadline, never hangs");

    let body = eventually(Duration::from_secs(5), "not ready without redis", || async {
        let response = http.get(worker.admin_url("/readyz")).send().await.ok()?;
        (response.status() == 503).then_some(response.text().await.ok()?)
    })
    .await;
    assert!(body.contains("redis"), "{body}");
    let alive = http.get(worker.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(alive.status(), 200, "liveness never depends on redis");

    redis.restart();
    eventually(Duration::from_secs(10), "ready again after redis returns", || async {
        let response = http.get(worker.admin_url("/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    worker.client.clone().submit_job(request("echo", "{}")).await.expect("accepted again");
}

#[tokio::test]
async fn jobs_are_off_without_a_redis_url() {
    let worker = spawn_worker(&[]).await;
    let status = worker.client.clone().submit_job(request("echo", "{}")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("SHOAL_WORKER_REDIS_URL"), "{status:?}");
}

fn uuid_like() -> String {
    "0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01".into()
}
