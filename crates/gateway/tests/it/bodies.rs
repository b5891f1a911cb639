//! Request bodies: forwarded as raw JSON (no value tree), a body at exactly
//! the size limit is served, large integers stay exact, and eight
//! concurrent 1 MiB array bodies fit a memory budget of the real binary.

use shoal_testkit::RedisServer;

use crate::helpers::{expect_problem, spawn_gateway, spawn_worker};
use crate::lifecycle::start_with;

const LIMIT: usize = 1024 * 1024;

/// A JSON string document of exactly `len` bytes.
fn string_of(len: usize) -> String {
    format!("\"{}\"", "x".repeat(len - 2))
}

/// A JSON array `[0,0,…,0]` of exactly `len` bytes (`len` odd).
fn zeros_of(len: usize) -> String {
    let mut text = String::with_capacity(len);
    text.push('[');
    text.push('0');
    while text.len() + 2 < len {
        text.push_str(",0");
    }
    text.push(']');
    text
}

#[tokio::test]
async fn a_body_at_exactly_the_limit_is_served_and_one_byte_more_is_413() {
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    let post = |body: String| {
        gateway
            .http
            .post(format!("{}/v1/tasks/echo", gateway.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let at_limit = post(string_of(LIMIT)).await.unwrap();
    assert_eq!(at_limit.status(), 200, "a body of exactly --max-body-bytes");
    let output: serde_json::Value = at_limit.json().await.unwrap();
    assert_eq!(output["output"].as_str().map(str::len), Some(LIMIT - 2));
    expect_problem(post(string_of(LIMIT + 1)).await.unwrap(), 413).await;
}

#[tokio::test]
async fn bodies_that_are_not_json_or_too_deep_are_400() {
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    for body in ["[1,", "{} {}", deep.as_str()] {
        let response = gateway
            .http
            .post(format!("{}/v1/tasks/echo", gateway.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, 400).await;
        assert_eq!(problem["type"], "urn:shoal:problem:invalid-json", "{body:.20}");
    }
}

#[tokio::test]
async fn large_integers_in_a_job_payload_are_kept_exactly() {
    let redis = RedisServer::start();
    let url = redis.url();
    let worker = spawn_worker(&["--redis-url", url.as_str()]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    let big = "123456789012345678901234567890";
    let body = format!(r#"{{"kind": "echo", "payload": {{"id": {big}, "f": 0.1000000000000000055511151231257827}}}}"#);
    let submitted = gateway
        .http
        .post(format!("{}/v1/jobs", gateway.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);
    let text = submitted.text().await.unwrap();
    assert!(text.contains(&format!("\"id\": {big}")) || text.contains(&format!("\"id\":{big}")), "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"].as_str().unwrap().to_owned();
    let read = gateway.http.get(format!("{}/v1/jobs/{id}", gateway.url)).send().await.unwrap().text().await.unwrap();
    assert!(read.contains(big), "{read}");
    assert!(read.contains("0.1000000000000000055511151231257827"), "{read}");
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_1_mib_array_bodies_fit_the_memory_budget() {
    /// The budget for the gateway process (measured: ~43 MiB, debug build);
    /// a `serde_json::Value` per body (~16-24 MiB each for this shape, so
    /// 128 MiB or more for eight) would exceed it.
    const BUDGET_KIB: u64 = 72 * 1024;
    let worker = spawn_worker(&[]).await;
    let (process, url, _, _) = start_with(worker.addr, &["--auth", "none"]);
    let pid = process.0.id();
    let body = zeros_of(LIMIT - 1);
    let http = reqwest::Client::new();
    let requests = (0..8).map(|_| {
        http.post(format!("{url}/v1/tasks/echo"))
            .header("content-type", "application/json")
            .header("request-timeout", "50")
            .body(body.clone())
            .timeout(std::time::Duration::from_secs(60))
            .send()
    });
    let answers = futures::future::join_all(requests).await;
    for answer in answers {
        let status = answer.expect("the gateway stays up and answers").status().as_u16();
        // Served, shed, or (a slow debug-build worker on a busy machine) past its deadline.
        assert!([200, 503, 504].contains(&status), "{status}");
    }
    let peak = peak_rss_kib(pid);
    eprintln!("gateway peak RSS after 8 concurrent 1 MiB array bodies: {} KiB", peak);
    assert!(peak < BUDGET_KIB, "peak RSS {peak} KiB over the budget of {BUDGET_KIB} KiB");
    assert_eq!(http.get(format!("{url}/")).send().await.unwrap().status(), 200, "still up");
}
