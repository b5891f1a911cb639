//! `POST /v1/jobs:batch` end to end: HTTP → gateway → gRPC `SubmitJobs` →
//! worker → a real Redis.

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::RedisServer;

use crate::auth::KeysFile;
use crate::helpers::{TestGateway, dead_addr, detail, eventually, expect_problem, spawn_gateway, spawn_worker};

async fn fleet(
    redis: &RedisServer,
    worker_flags: &[&str],
    gateway_flags: &[&str],
) -> (TestGateway, crate::helpers::TestWorker) {
    let url = redis.url();
    let mut flags = vec!["--redis-url", url.as_str(), "--reaper-interval", "100ms"];
    flags.extend_from_slice(worker_flags);
    let worker = spawn_worker(&flags).await;
    let gateway = spawn_gateway(&[worker.addr], &[], gateway_flags).await;
    (gateway, worker)
}

impl TestGateway {
    async fn batch(&self, body: Value, key: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(format!("{}/v1/jobs:batch", self.url)).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.expect("request")
    }

    /// A `200` batch answer's body, checked for its shape.
    async fn batch_ok(&self, body: Value, key: Option<&str>) -> Value {
        let response = self.batch(body.clone(), key).await;
        assert_eq!(response.status(), 200, "{body}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let answer: Value = response.json().await.expect("JSON answer");
        let results = answer["results"].as_array().expect("results");
        assert_eq!(results.len(), body["jobs"].as_array().unwrap().len(), "{answer}");
        for (index, result) in results.iter().enumerate() {
            assert_eq!(result["index"], index, "{answer}");
            match result["outcome"].as_str().unwrap() {
                "accepted" | "replayed" => {
                    assert_eq!(result["status"], 202, "{result}");
                    let id = result["job"]["id"].as_str().unwrap();
                    assert_eq!(result["location"], format!("/v1/jobs/{id}"));
                }
                "problem" => {
                    let problem = &result["problem"];
                    assert_eq!(problem["status"], result["status"], "{result}");
                    for member in ["type", "title", "detail", "instance", "request_id"] {
                        assert!(problem[member].is_string(), "item problem lacks `{member}`: {result}");
                    }
                }
                other => panic!("unknown outcome {other}: {result}"),
            }
        }
        answer
    }

    async fn job_as(&self, location: &str, key: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{location}", self.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.expect("request")
    }
}

fn outcomes(answer: &Value) -> Vec<(String, u64)> {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["outcome"].as_str().unwrap().to_owned(), r["status"].as_u64().unwrap()))
        .collect()
}

fn owned(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(o, s)| ((*o).to_owned(), *s)).collect()
}

#[tokio::test]
async fn a_mixed_batch_answers_each_item_and_queues_the_valid_ones() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[], &[]).await;
    let answer = gateway
        .batch_ok(
            json!({"jobs": [
                {"kind": "echo", "payload": {"n": 0}},
                {"kind": "nope"},
                {"kind": "echo", "max_attempts": 0},
                {"kind": "echo", "colour": "red"},
                "not an object",
                {"kind": "echo", "payload": {"n": 5}, "idempotency_key": "white space"},
                {"kind": "echo", "payload": {"n": 6}, "max_attempts": 2, "timeout_ms": 1000},
            ]}),
            None,
        )
        .await;
    assert_eq!(
        outcomes(&answer),
        owned(&[
            ("accepted", 202),
            ("problem", 400),
            ("problem", 400),
            ("problem", 400),
            ("problem", 400),
            ("problem", 400),
            ("accepted", 202),
        ]),
        "{answer}"
    );
    assert_eq!((answer["accepted"].as_u64(), answer["failed"].as_u64()), (Some(2), Some(5)));
    let results = answer["results"].as_array().unwrap();
    let problem = |i: usize| results[i]["problem"].clone();
    assert!(detail(&problem(1)).contains("unknown job kind"), "{}", problem(1));
    assert!(detail(&problem(2)).contains("max_attempts"), "{}", problem(2));
    assert!(detail(&problem(3)).contains("colour"), "{}", problem(3));
    assert!(detail(&problem(4)).contains("jobs[4]"), "{}", problem(4));
    assert!(detail(&problem(5)).contains("idempotency_key"), "{}", problem(5));
    assert_eq!(results[6]["job"]["max_attempts"], 2);
    assert_eq!(results[6]["job"]["timeout_ms"], 1000);
    // The accepted ones are real jobs: they run to completion.
    for (i, n) in [(0, 0), (6, 6)] {
        let location = results[i]["location"].as_str().unwrap();
        let done = eventually(Duration::from_secs(10), || async {
            let job: Value = gateway.job_as(location, None).await.json().await.ok()?;
            (job["state"] == "succeeded").then_some(job)
        })
        .await
        .unwrap_or_else(|| panic!("{location} did not succeed"));
        assert_eq!(done["result"], json!({"n": n}));
    }
}

#[tokio::test]
async fn idempotency_keys_replay_per_item_and_per_client() {
    let redis = RedisServer::start();
    let keys = KeysFile::new(&[("a1", "alice"), ("a2", "alice"), ("b", "bob")]);
    let (gateway, _worker) = fleet(&redis, &[], &["--api-keys-file", keys.flag()]).await;
    let body = json!({"jobs": [
        {"kind": "echo", "payload": 1, "idempotency_key": "k-1"},
        {"kind": "echo", "payload": 2, "idempotency_key": "k-2"},
        {"kind": "echo", "payload": 3},
    ]});
    let first = gateway.batch_ok(body.clone(), Some("a1")).await;
    assert_eq!(outcomes(&first), owned(&[("accepted", 202), ("accepted", 202), ("accepted", 202)]));
    let id = |answer: &Value, i: usize| answer["results"][i]["job"]["id"].as_str().unwrap().to_owned();

    // The same client (another of its keys): keyed items replay, the unkeyed one is new.
    let again = gateway.batch_ok(body.clone(), Some("a2")).await;
    assert_eq!(outcomes(&again), owned(&[("replayed", 202), ("replayed", 202), ("accepted", 202)]));
    assert_eq!(again["replayed"], 2);
    assert_eq!(id(&again, 0), id(&first, 0));
    assert_eq!(id(&again, 1), id(&first, 1));
    assert_ne!(id(&again, 2), id(&first, 2));

    // Another client's identical keys are its own jobs, never alice's.
    let bob = gateway.batch_ok(body.clone(), Some("b")).await;
    assert_eq!(outcomes(&bob), owned(&[("accepted", 202), ("accepted", 202), ("accepted", 202)]));
    for i in 0..3 {
        assert_ne!(id(&bob, i), id(&first, i));
    }
    let alices = format!("/v1/jobs/{}", id(&first, 0));
    expect_problem(gateway.job_as(&alices, Some("b")).await, 404).await;
    assert_eq!(gateway.job_as(&alices, Some("a2")).await.status(), 200);

    // A key reused with another payload is that item's 422; the rest go through.
    let reused = gateway
        .batch_ok(
            json!({"jobs": [
                {"kind": "echo", "payload": "different", "idempotency_key": "k-1"},
                {"kind": "echo", "payload": 2, "idempotency_key": "k-2"},
            ]}),
            Some("a1"),
        )
        .await;
    assert_eq!(outcomes(&reused), owned(&[("problem", 422), ("replayed", 202)]));
    assert_eq!(reused["results"][0]["problem"]["type"], "urn:shoal:problem:idempotency-key-reused");

    // The single route shares the keys: a batch's key replays there too.
    let single = gateway
        .http
        .post(format!("{}/v1/jobs", gateway.url))
        .bearer_auth("a1")
        .header("idempotency-key", "k-2")
        .json(&json!({"kind": "echo", "payload": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(single.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let single: Value = single.json().await.unwrap();
    assert_eq!(single["id"], first["results"][1]["job"]["id"]);
}

#[tokio::test]
async fn bad_batches_are_whole_request_problems() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[], &[]).await;
    let too_many: Vec<Value> = (0..101).map(|n| json!({"kind": "echo", "payload": n})).collect();
    let problem = expect_problem(gateway.batch(json!({ "jobs": too_many }), None).await, 413).await;
    assert_eq!(problem["type"], "urn:shoal:problem:too-many-jobs");
    assert!(detail(&problem).contains("100"), "{problem}");
    let exactly: Vec<Value> = (0..100).map(|n| json!({"kind": "echo", "payload": n})).collect();
    let answer = gateway.batch_ok(json!({ "jobs": exactly }), None).await;
    assert_eq!(answer["accepted"], 100);

    for body in [json!({"jobs": []}), json!({"jobs": 3}), json!({"kind": "echo"}), json!([{"kind": "echo"}])] {
        expect_problem(gateway.batch(body.clone(), None).await, 400).await;
    }
    let not_json = gateway
        .http
        .post(format!("{}/v1/jobs:batch", gateway.url))
        .header("content-type", "application/json")
        .body("{\"jobs\": [")
        .send()
        .await
        .unwrap();
    expect_problem(not_json, 400).await;
    let not_typed = gateway.http.post(format!("{}/v1/jobs:batch", gateway.url)).body("{\"jobs\": []}").send().await;
    expect_problem(not_typed.unwrap(), 415).await;
    let big = "x".repeat(2 << 20);
    let huge = gateway.batch(json!({"jobs": [{"kind": "echo", "payload": big}]}), None).await;
    expect_problem(huge, 413).await;
}

#[tokio::test]
async fn each_job_counts_against_the_clients_rate() {
    let redis = RedisServer::start();
    // A burst of 5 and one token per 100 s: a batch of 8 gets 5 places.
    let keys = KeysFile::new(&[("a", "alice rate=0.01 burst=5"), ("b", "bob")]);
    let (gateway, _worker) = fleet(&redis, &[], &["--api-keys-file", keys.flag()]).await;
    let jobs: Vec<Value> = (0..8).map(|n| json!({"kind": "echo", "payload": n})).collect();
    let answer = gateway.batch_ok(json!({ "jobs": jobs }), Some("a")).await;
    let mut expected = vec![("accepted", 202); 5];
    expected.extend([("problem", 429); 3]);
    assert_eq!(outcomes(&answer), owned(&expected), "{answer}");
    let refused = &answer["results"][7]["problem"];
    assert_eq!(refused["type"], "urn:shoal:problem:rate-limited");
    let retry_after = refused["retry_after"].as_u64().expect("retry_after on a rate-limited item");
    assert!((1..=100).contains(&retry_after), "{refused}");
    // The bucket is empty now: the next request is refused whole.
    let next = gateway.batch(json!({"jobs": [{"kind": "echo"}]}), Some("a")).await;
    expect_problem(next, 429).await;
    // Another client is not affected.
    let bob = gateway.batch_ok(json!({"jobs": [{"kind": "echo"}, {"kind": "echo"}]}), Some("b")).await;
    assert_eq!(bob["accepted"], 2);
}

#[tokio::test]
async fn a_queue_that_fills_mid_batch_refuses_the_rest_per_item_with_retry_info() {
    let redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &["--max-queued-jobs", "3", "--job-slots", "1"], &[]).await;
    let jobs: Vec<Value> = (0..5).map(|_| json!({"kind": "sleep", "payload": {"ms": 5000}})).collect();
    let answer = gateway.batch_ok(json!({ "jobs": jobs }), None).await;
    assert_eq!(
        outcomes(&answer),
        owned(&[("accepted", 202), ("accepted", 202), ("accepted", 202), ("problem", 429), ("problem", 429)]),
        "{answer}"
    );
    let full = &answer["results"][3]["problem"];
    assert_eq!(full["type"], "urn:shoal:problem:queue-full");
    assert!(detail(full).contains("queue is full"), "{full}");
    assert_eq!(full["retry_after"], 1);
}

#[tokio::test]
async fn no_worker_is_503_for_the_whole_batch() {
    let gateway = spawn_gateway(&[dead_addr().await], &[], &[]).await;
    let response = gateway.batch(json!({"jobs": [{"kind": "echo"}, {"kind": "nope"}]}), None).await;
    assert!(response.headers().contains_key("retry-after"));
    let problem = expect_problem(response, 503).await;
    assert_eq!(problem["type"], "urn:shoal:problem:upstream-unavailable");
}

#[tokio::test]
async fn redis_down_is_an_item_level_503_not_a_hang() {
    let mut redis = RedisServer::start();
    let (gateway, _worker) = fleet(&redis, &[], &[]).await;
    redis.kill();
    let started = std::time::Instant::now();
    let answer = gateway.batch_ok(json!({"jobs": [{"kind": "echo"}, {"kind": "nope"}]}), None).await;
    assert_eq!(outcomes(&answer), owned(&[("problem", 503), ("problem", 400)]), "{answer}");
    assert_eq!(answer["results"][0]["problem"]["retry_after"], 1);
    assert!(started.elapsed() < Duration::from_secs(10));
}
