//! API keys end to end: the keys file, the credential headers, `401`/`403`,
//! the open routes, reloading the file, and the per-client limits.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use shoal_gateway::auth::hash_key;

use crate::helpers::{TestGateway, eventually, expect_problem, spawn_gateway, spawn_worker};

/// A keys file in its own temporary directory.
pub struct KeysFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl KeysFile {
    /// `lines`: `(key, "client [options]")`.
    pub fn new(lines: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-keys");
        let file = Self { _dir: dir, path };
        file.write(lines);
        file
    }

    /// Replaces the file's content atomically (as a Secret update does).
    pub fn write(&self, lines: &[(&str, &str)]) {
        let text: String = lines.iter().map(|(key, rest)| format!("{} {rest}\n", hash_key(key))).collect();
        let staged = self.path.with_extension("tmp");
        std::fs::write(&staged, text).expect("write keys");
        std::fs::rename(&staged, &self.path).expect("rename keys");
    }

    pub fn flag(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

impl TestGateway {
    async fn task_with_key(&self, key: &str, kind: &str, payload: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/tasks/{kind}", self.url))
            .bearer_auth(key)
            .json(&payload)
            .send()
            .await
            .expect("request")
    }
}

#[tokio::test]
async fn every_v1_route_needs_a_key_and_the_open_routes_stay_open() {
    let worker = spawn_worker(&[]).await;
    let keys = KeysFile::new(&[("alice-key", "alice")]);
    let gateway = spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag()]).await;
    let http = &gateway.http;

    for (method, path) in [
        (reqwest::Method::POST, "/v1/tasks/echo"),
        (reqwest::Method::POST, "/v1/jobs"),
        (reqwest::Method::GET, "/v1/jobs/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
        (reqwest::Method::POST, "/v1/jobs/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/cancel"),
        (reqwest::Method::GET, "/v1/status"),
        (reqwest::Method::GET, "/v1/stats"),
        (reqwest::Method::GET, "/v1/no-such-route"),
    ] {
        let response = http.request(method.clone(), format!("{}{path}", gateway.url)).send().await.unwrap();
        let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"shoal\""), "{method} {path}");
        let problem = expect_problem(response, 401).await;
        assert_eq!(problem["type"], "urn:shoal:problem:unauthenticated", "{method} {path}");
    }

    let wrong = http.post(format!("{}/v1/tasks/echo", gateway.url)).bearer_auth("guess").json(&json!(1));
    let response = wrong.send().await.unwrap();
    let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    expect_problem(response, 401).await;
    let basic = http.get(format!("{}/v1/status", gateway.url)).header("authorization", "Basic YWxpY2U6a2V5");
    expect_problem(basic.send().await.unwrap(), 401).await;

    let ok = gateway.task_with_key("alice-key", "echo", json!({"n": 1})).await;
    assert_eq!(ok.status(), 200);
    let ok = http
        .post(format!("{}/v1/tasks/echo", gateway.url))
        .header("x-api-key", "alice-key")
        .json(&json!(2))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    for open in ["/", "/openapi.json"] {
        assert_eq!(http.get(format!("{}{open}", gateway.url)).send().await.unwrap().status(), 200, "{open}");
    }
}

#[tokio::test]
async fn a_read_only_key_may_get_but_not_post() {
    let worker = spawn_worker(&[]).await;
    let keys = KeysFile::new(&[("board-key", "board access=read")]);
    let gateway = spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag()]).await;
    let status = gateway.http.get(format!("{}/v1/status", gateway.url)).bearer_auth("board-key").send().await.unwrap();
    assert_ne!(status.status(), 401);
    assert_ne!(status.status(), 403);
    let response = gateway.task_with_key("board-key", "echo", json!(1)).await;
    let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    let problem = expect_problem(response, 403).await;
    assert_eq!(problem["type"], "urn:shoal:problem:forbidden");
}

#[tokio::test]
async fn keys_are_rotated_by_editing_the_file_without_a_restart() {
    let worker = spawn_worker(&[]).await;
    let keys = KeysFile::new(&[("old-key", "alice")]);
    let gateway =
        spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag(), "--api-keys-reload-interval", "50ms"])
            .await;
    assert_eq!(gateway.task_with_key("old-key", "echo", json!(1)).await.status(), 200);

    // Both keys of the client valid at once, then the old one removed.
    keys.write(&[("old-key", "alice"), ("new-key", "alice")]);
    let both = eventually(Duration::from_secs(10), || async {
        (gateway.task_with_key("new-key", "echo", json!(1)).await.status() == 200).then_some(())
    })
    .await;
    assert!(both.is_some(), "the new key was not picked up");
    assert_eq!(gateway.task_with_key("old-key", "echo", json!(1)).await.status(), 200);

    keys.write(&[("new-key", "alice")]);
    let revoked = eventually(Duration::from_secs(10), || async {
        (gateway.task_with_key("old-key", "echo", json!(1)).await.status() == 401).then_some(())
    })
    .await;
    assert!(revoked.is_some(), "the removed key still works");

    // A broken file is refused: the keys in force stay.
    std::fs::write(&keys.path, "not a keys file\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gateway.task_with_key("new-key", "echo", json!(1)).await.status(), 200);
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_ratelimit_headers() {
    let worker = spawn_worker(&[]).await;
    // One token per 100 s: the third request within the test is refused.
    let keys = KeysFile::new(&[("a", "alice rate=0.01 burst=2"), ("b", "bob")]);
    let gateway = spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag()]).await;
    for _ in 0..2 {
        assert_eq!(gateway.task_with_key("a", "echo", json!(1)).await.status(), 200);
    }
    let refused = gateway.task_with_key("a", "echo", json!(1)).await;
    let header = |name: &str| refused.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let retry_after: u64 = header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=100).contains(&retry_after), "{retry_after}");
    assert_eq!(header("ratelimit-policy").as_deref(), Some("\"client\";q=2;w=200"));
    assert_eq!(header("ratelimit"), Some(format!("\"client\";r=0;t={retry_after}")));
    let problem = expect_problem(refused, 429).await;
    assert_eq!(problem["type"], "urn:shoal:problem:rate-limited");
    // Another client is not affected.
    assert_eq!(gateway.task_with_key("b", "echo", json!(1)).await.status(), 200);
}

#[tokio::test]
async fn a_client_at_its_concurrency_cap_gets_429() {
    let worker = spawn_worker(&[]).await;
    let keys = KeysFile::new(&[("a", "alice concurrency=1"), ("b", "bob")]);
    let gateway = spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag()]).await;
    let slow = gateway.task_with_key("a", "sleep", json!({"ms": 3000}));
    let second = async {
        // Bounded wait until the slow request is in flight.
        let refused = eventually(Duration::from_secs(5), || async {
            let response = gateway.task_with_key("a", "echo", json!(1)).await;
            (response.status() == 429).then_some(response)
        })
        .await
        .expect("a second request of the client is refused while the first runs");
        assert!(refused.headers().contains_key("retry-after"));
        let problem = expect_problem(refused, 429).await;
        assert_eq!(problem["type"], "urn:shoal:problem:too-many-concurrent");
        assert_eq!(gateway.task_with_key("b", "echo", json!(1)).await.status(), 200);
    };
    let (slow, ()) = tokio::join!(slow, second);
    assert_eq!(slow.status(), 200);
    assert_eq!(gateway.task_with_key("a", "echo", json!(1)).await.status(), 200, "the place is released");
}

#[tokio::test]
async fn a_job_belongs_to_its_client_and_idempotency_keys_are_per_client() {
    let redis = shoal_testkit::RedisServer::start();
    let url = redis.url();
    let worker = spawn_worker(&["--redis-url", url.as_str()]).await;
    let keys = KeysFile::new(&[("a1", "alice"), ("a2", "alice"), ("b", "bob")]);
    let gateway = spawn_gateway(&[worker.addr], &[], &["--api-keys-file", keys.flag()]).await;
    let submit = |key: &'static str, idempotency: &'static str| {
        let owner = if key == "b" { "bob" } else { "alice" };
        gateway
            .http
            .post(format!("{}/v1/jobs", gateway.url))
            .bearer_auth(key)
            .header("idempotency-key", idempotency)
            .json(&json!({"kind": "echo", "payload": {"secret": owner}}))
            .send()
    };
    let alice: serde_json::Value = {
        let response = submit("a1", "same-key").await.unwrap();
        assert_eq!(response.status(), 202);
        response.json().await.unwrap()
    };
    let id = alice["id"].as_str().unwrap().to_owned();
    let job = |key: &'static str, method: reqwest::Method| {
        gateway.http.request(method, format!("{}/v1/jobs/{id}", gateway.url)).bearer_auth(key).send()
    };
    // Every key of the client sees it; another client gets 404, for reads and cancels.
    assert_eq!(job("a2", reqwest::Method::GET).await.unwrap().status(), 200);
    expect_problem(job("b", reqwest::Method::GET).await.unwrap(), 404).await;
    let cancel = gateway.http.post(format!("{}/v1/jobs/{id}/cancel", gateway.url)).bearer_auth("b").send();
    expect_problem(cancel.await.unwrap(), 404).await;

    // The same Idempotency-Key from another client is another job.
    let bob = submit("b", "same-key").await.unwrap();
    assert_eq!(bob.status(), 202);
    assert!(bob.headers().get("idempotent-replayed").is_none());
    let bob: serde_json::Value = bob.json().await.unwrap();
    assert_ne!(bob["id"], alice["id"]);
    assert_eq!(bob["payload"]["secret"], "bob");
    // Replayed by the same client (another of its keys): the same job.
    let replay = submit("a2", "same-key").await.unwrap();
    assert_eq!(replay.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], alice["id"]);
}
