//! Each built-in kind, round trip through gRPC.

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use shoal_proto::worker::v1::ListKindsRequest;

use crate::helpers::{execute, spawn_worker};

fn output(response: &shoal_proto::worker::v1::ExecuteResponse) -> Value {
    serde_json::from_str(&response.output_json).expect("output is JSON")
}

#[tokio::test]
async fn echo_returns_the_payload_and_who_ran_it() {
    let mut worker = spawn_worker(&[]).await;
    let payload = json!({"a": [1, 2, {"b": null}], "s": "é"});
    let response = worker.client.execute(execute("echo", &payload.to_string(), None)).await.unwrap().into_inner();
    assert_eq!(output(&response), payload);
    assert_eq!(response.worker_id, worker.worker_id);
    assert!(response.worker_id.ends_with(&format!(":{}", worker.grpc_addr.port())), "{}", response.worker_id);
}

#[tokio::test]
async fn worker_id_can_be_set() {
    let mut worker = spawn_worker(&["--worker-id", "worker-7"]).await;
    let response = worker.client.execute(execute("echo", "1", None)).await.unwrap().into_inner();
    assert_eq!(response.worker_id, "worker-7");
}

#[tokio::test]
async fn sleep_waits_and_reports_its_duration() {
    let mut worker = spawn_worker(&[]).await;
    let response = worker.client.execute(execute("sleep", r#"{"ms": 50}"#, None)).await.unwrap().into_inner();
    assert_eq!(output(&response), json!({"slept_ms": 50}));
    assert!(response.duration_us >= 50_000, "{}", response.duration_us);
}

#[tokio::test]
async fn hash_of_one_round_is_plain_sha256() {
    let mut worker = spawn_worker(&[]).await;
    let response = worker.client.execute(execute("hash", r#"{"data": "hello"}"#, None)).await.unwrap().into_inner();
    // `printf hello | sha256sum`
    assert_eq!(
        output(&response),
        json!({"digest": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "rounds": 1})
    );
}

#[tokio::test]
async fn hash_of_many_rounds_chains_and_is_deterministic() {
    let mut worker = spawn_worker(&[]).await;
    let payload = r#"{"data": "shoal", "rounds": 1000}"#;
    let first = worker.client.execute(execute("hash", payload, None)).await.unwrap().into_inner();
    let second = worker.client.execute(execute("hash", payload, None)).await.unwrap().into_inner();
    assert_eq!(first.output_json, second.output_json);

    let mut expected: [u8; 32] = Sha256::digest(b"shoal").into();
    for _ in 1..1000 {
        expected = Sha256::digest(expected).into();
    }
    assert_eq!(output(&first), json!({"digest": hex::encode(expected), "rounds": 1000}));
}

#[tokio::test]
async fn fail_is_aborted_with_the_task_message() {
    let mut worker = spawn_worker(&[]).await;
    let status = worker.client.execute(execute("fail", r#"{"error": "card declined"}"#, None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert_eq!(status.message(), "card declined");
}

#[tokio::test]
async fn list_kinds_names_every_kind() {
    let mut worker = spawn_worker(&[]).await;
    let response = worker.client.list_kinds(ListKindsRequest {}).await.unwrap().into_inner();
    let names: Vec<_> = response.kinds.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["echo", "fail", "hash", "sleep"]);
    assert!(response.kinds.iter().all(|k| !k.description.is_empty()));
    assert_eq!(response.worker_id, worker.worker_id);
}
