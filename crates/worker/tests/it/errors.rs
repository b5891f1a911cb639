//! Bad input gets the right code and a message that says what to fix.

use tonic::Code;

use crate::helpers::{execute, spawn_worker};

async fn status_of(kind: &str, payload: &str) -> tonic::Status {
    let mut worker = spawn_worker(&[]).await;
    worker.client.execute(execute(kind, payload, None)).await.expect_err("refused")
}

async fn assert_invalid(kind: &str, payload: &str, needle: &str) {
    let status = status_of(kind, payload).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{kind} {payload}: {status:?}");
    assert!(status.message().contains(needle), "{kind} {payload}: `{}` lacks `{needle}`", status.message());
}

#[tokio::test]
async fn unknown_kind_lists_the_kinds_that_exist() {
    assert_invalid("teleport", "{}", "unknown task kind `teleport`; this worker runs: echo, fail, hash, sleep").await;
}

#[tokio::test]
async fn invalid_json_is_refused() {
    assert_invalid("echo", "{not json", "payload_json is not valid JSON").await;
}

#[tokio::test]
async fn wrong_field_types_name_the_field() {
    assert_invalid("sleep", r#"{"ms": "soon"}"#, "invalid type: string \"soon\", expected a non-negative integer")
        .await;
    assert_invalid("hash", r#"{"data": 42}"#, "invalid type: integer `42`, expected a string").await;
    assert_invalid("fail", r#"{"error": ["x"]}"#, "invalid type: sequence").await;
}

#[tokio::test]
async fn missing_and_unknown_fields_are_named() {
    assert_invalid("sleep", "{}", "kind `sleep`: invalid payload: missing field `ms`").await;
    assert_invalid("sleep", r#"{"ms": 1, "msec": 2}"#, "unknown field `msec`").await;
    assert_invalid("hash", r#"{"rounds": 3}"#, "missing field `data`").await;
}

#[tokio::test]
async fn out_of_range_values_say_the_range() {
    assert_invalid("sleep", r#"{"ms": 3600001}"#, "`ms` must be at most 3600000").await;
    assert_invalid("sleep", r#"{"ms": -5}"#, "invalid value: integer `-5`").await;
    assert_invalid("hash", r#"{"data": "x", "rounds": 0}"#, "`rounds` must be between 1 and 10000000, got 0").await;
    assert_invalid("hash", r#"{"data": "x", "rounds": 10000001}"#, "got 10000001").await;
    assert_invalid("fail", r#"{"error": ""}"#, "`error` must be 1 to 1024 characters").await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_without_buffering_it() {
    let mut worker = spawn_worker(&[]).await;
    let big = format!("\"{}\"", "x".repeat(3 * 1024 * 1024));
    let status = worker.client.execute(execute("echo", &big, None)).await.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("request message too large"), "{}", status.message());
    assert!(status.message().contains("2097152"), "{}", status.message());
    // The worker is still fine.
    assert!(worker.client.execute(execute("echo", "1", None)).await.is_ok());
}
