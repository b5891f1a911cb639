//! The jobs API end to end: HTTP → gateway → gRPC → worker → a real Redis.

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::RedisServer;

use crate::helpers::{TestGateway, detail, eventually, expect_problem, spawn_gateway, spawn_worker};

async fn fleet(redis: &RedisServer, worker_flags: &[&str]) -> (TestGateway, crate::helpers::TestWorker) {
    let url = redis.url();
    let mut flags = vec!["--redis-url", url.as_str(), "--reaper-interval", "100ms"];
    flags.extend_from_slice(worker_flags);
    let worker = spawn_worker(&flags).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    (gateway, worker)
}

impl TestGateway {
    async fn submit(&self, body: Value, key: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(format!("{}/v1/jobs", self.url)).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("request")
    }

    async fn job(&self, id: &str) -> reqwest::Response {
        self.http.get(format!("{}/v1/jobs/{id}", self.url)).send().await.expect("request")
    }

    async fn cancel(&self, id: &str) -> reqwest::Response {
        self.http.post(format!("{}/v1/jobs/{id}/cancel", self.url)).send().await.expect("request")
    }

    async fn wait_for(&self, id: &str, state: &str) -> Value {
        eventually(Duration::from_secs(10), || async {
            let job: Value = self.job(id).await.json().await.ok()?;
            (job["state"] == state).then_some(job)
        })
        .await
        .unwrap_or_else(|| panic!("job {id} did not reach {state}"))
    }
}

#[tokio::test]
async fn a_job_is_accepted_located_and_completed() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    let response = gateway.submit(json!({"kind": "echo", "payload": {"hello": "jobs"}}), None).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let job: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    assert_eq!(job["kind"], "echo");
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));

    let done = gateway.wait_for(job["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["result"], json!({"hello": "jobs"}));
    assert_eq!(done["progress"], 100);
    assert_eq!(done["attempts"], 1);
    assert!(done["finished_at"].is_string());
}

#[tokio::test]
async fn an_idempotency_key_never_makes_a_second_job() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    let body = json!({"kind": "echo", "payload": 1});
    let first = gateway.submit(body.clone(), Some("pay-2026-11-27-0001")).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let second = gateway.submit(body, Some("pay-2026-11-27-0001")).await;
    assert_eq!(second.status(), 202);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    // The same key with another request: 422, not a 502 or another job.
    let other = gateway.submit(json!({"kind": "echo", "payload": 2}), Some("pay-2026-11-27-0001")).await;
    let problem = expect_problem(other, 422).await;
    assert_eq!(problem["type"], "urn:shoal:problem:idempotency-key-reused");
}

#[tokio::test]
async fn jobs_can_be_cancelled_and_failures_are_visible() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &["--retry-base", "10ms", "--retry-max", "20ms"]).await;
    let running: Value =
        gateway.submit(json!({"kind": "sleep", "payload": {"ms": 60000}}), None).await.json().await.unwrap();
    let id = running["id"].as_str().unwrap();
    gateway.wait_for(id, "running").await;
    let cancel = gateway.cancel(id).await;
    assert_eq!(cancel.status(), 202);
    gateway.wait_for(id, "cancelled").await;
    let again = gateway.cancel(id).await;
    let problem = expect_problem(again, 409).await;
    assert!(detail(&problem).contains("already ended"), "{problem}");

    let poison: Value = gateway
        .submit(json!({"kind": "fail", "payload": {"error": "bad luck"}, "max_attempts": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    let dead = gateway.wait_for(poison["id"].as_str().unwrap(), "dead").await;
    assert_eq!(dead["attempts"], 2);
    assert!(dead["error"].as_str().unwrap().contains("bad luck"));
}

#[tokio::test]
async fn bad_job_requests_get_precise_problems() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    let cases = [
        (json!({"payload": {}}), 400, "kind"),
        (json!({"kind": "nope"}), 400, "unknown job kind"),
        (json!({"kind": "echo", "colour": "red"}), 400, "colour"),
        (json!({"kind": "echo", "max_attempts": 0}), 400, "max_attempts"),
        (json!({"kind": "echo", "max_attempts": 500}), 400, "max_attempts"),
        (json!({"kind": "echo", "timeout_ms": 0}), 400, "timeout_ms"),
        (json!({"kind": "echo", "timeout_ms": 1.5}), 400, "timeout_ms"),
        (json!({"kind": "echo", "max_attempts": -1}), 400, "max_attempts"),
        // The kind's payload is checked when the job is submitted, as the
        // OpenAPI document's per-kind schemas say, not when it runs.
        (json!({"kind": "sleep"}), 400, "kind `sleep`"),
        (json!({"kind": "sleep", "payload": {"ms": 1, "extra": 2}}), 400, "unknown field `extra`"),
        (json!({"kind": "sleep", "payload": {"ms": 3600001}}), 400, "at most 3600000"),
        (json!({"kind": "hash", "payload": {"data": "", "rounds": []}}), 400, "expected a non-negative integer"),
        (json!({"kind": "fail", "payload": {"error": ""}}), 400, "1 to 1024"),
    ];
    for (body, status, needle) in cases {
        let problem = expect_problem(gateway.submit(body.clone(), None).await, status).await;
        assert!(detail(&problem).contains(needle), "{body} → {problem}");
    }
    // I-JSON: a lone surrogate escape is refused anywhere in the body.
    for body in [r#"{"kind": "echo", "payload": "\ud800"}"#, r#"{"kind": "ech\udc00"}"#] {
        let response = gateway
            .http
            .post(format!("{}/v1/jobs", gateway.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, 400).await;
        assert_eq!(problem["type"], "urn:shoal:problem:invalid-json", "{body} → {problem}");
        assert!(detail(&problem).contains("surrogate"), "{body} → {problem}");
    }
    for key in ["white space", "", &"k".repeat(201)] {
        let problem = expect_problem(gateway.submit(json!({"kind": "echo"}), Some(key)).await, 400).await;
        assert!(detail(&problem).contains("Idempotency-Key"), "{key:?} → {problem}");
    }
    expect_problem(gateway.job("not-a-job-id").await, 400).await;
    expect_problem(gateway.job("0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01").await, 404).await;
}

#[tokio::test]
async fn a_full_queue_is_429_with_retry_after() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &["--max-queued-jobs", "1", "--job-slots", "1"]).await;
    let first = gateway.submit(json!({"kind": "sleep", "payload": {"ms": 5000}}), None).await;
    assert_eq!(first.status(), 202);
    let full = gateway.submit(json!({"kind": "echo"}), None).await;
    assert!(full.headers().contains_key("retry-after"));
    let problem = expect_problem(full, 429).await;
    assert!(detail(&problem).contains("queue is full"), "{problem}");
}

#[tokio::test]
async fn redis_down_is_503_not_a_hang_or_a_500() {
    let mut redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    redis.kill();
    let started = std::time::Instant::now();
    let response = gateway.submit(json!({"kind": "echo"}), None).await;
    assert!(response.headers().contains_key("retry-after"));
    expect_problem(response, 503).await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn integers_written_with_a_zero_fraction_are_integers() {
    // JSON Schema's `integer` (the OpenAPI document's) admits `31152.0`.
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    let body = json!({"kind": "sleep", "payload": {"ms": 10.0}, "max_attempts": 2.0, "timeout_ms": 31152.0});
    let response = gateway.submit(body, None).await;
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.unwrap();
    assert_eq!((job["max_attempts"].as_u64(), job["timeout_ms"].as_u64()), (Some(2), Some(31152)));
    gateway.wait_for(job["id"].as_str().unwrap(), "succeeded").await;
}

#[tokio::test]
async fn a_cancelled_job_stays_readable_and_delete_is_not_a_method_of_jobs() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[]).await;
    let queued: Value =
        gateway.submit(json!({"kind": "sleep", "payload": {"ms": 60000}}), None).await.json().await.unwrap();
    let id = queued["id"].as_str().unwrap();
    let cancel = gateway.cancel(id).await;
    assert_eq!(cancel.status(), 202);
    let job: Value = cancel.json().await.unwrap();
    assert_eq!(job["id"], id);
    // Cancelling is not removing: the job is still there, and ends cancelled.
    let read = gateway.job(id).await;
    assert_eq!(read.status(), 200);
    gateway.wait_for(id, "cancelled").await;
    // DELETE would promise that a GET answers 404 afterwards; it is not offered.
    let delete = gateway.http.delete(format!("{}/v1/jobs/{id}", gateway.url)).send().await.unwrap();
    assert_eq!(delete.headers()["allow"], "GET,HEAD");
    expect_problem(delete, 405).await;
    expect_problem(gateway.cancel("not-a-job-id").await, 400).await;
    expect_problem(gateway.cancel("0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01").await, 404).await;
}
