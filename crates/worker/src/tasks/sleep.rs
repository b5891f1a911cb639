//! `sleep`: waits without using a thread. Payload `{"ms": N}` with
//! `0 <= N <= 3_600_000` (one hour); output `{"slept_ms": N}`.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{Task, TaskContext, TaskError, parse_payload, parse_payload_text, whole_number};

/// The longest sleep accepted, in milliseconds.
pub const MAX_MS: u64 = 3_600_000;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(deserialize_with = "whole_number")]
    ms: u64,
}

fn parse(payload: Value) -> Result<Duration, TaskError> {
    check(parse_payload(payload)?)
}

fn check(Input { ms }: Input) -> Result<Duration, TaskError> {
    if ms > MAX_MS {
        return Err(TaskError::InvalidPayload(format!("`ms` must be at most {MAX_MS} (one hour), got {ms}")));
    }
    Ok(Duration::from_millis(ms))
}

/// The `sleep` kind.
pub struct Kind;

impl Task for Kind {
    fn name(&self) -> &'static str {
        "sleep"
    }

    fn description(&self) -> &'static str {
        r#"waits asynchronously: {"ms": 0..=3600000}"#
    }

    fn validate(&self, payload_json: &str) -> Result<(), TaskError> {
        check(parse_payload_text(payload_json)?).map(drop)
    }

    fn run(&self, payload: Value, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(async move {
            let duration = parse(payload)?;
            tokio::select! {
                () = tokio::time::sleep(duration) => Ok(json!({ "slept_ms": duration.as_millis() as u64 })),
                () = ctx.cancelled() => Err(TaskError::Cancelled),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[test]
    fn payload_is_checked() {
        assert_eq!(parse(json!({"ms": 1000})).unwrap(), Duration::from_secs(1));
        assert_eq!(parse(json!({"ms": MAX_MS})).unwrap(), Duration::from_secs(3600));
        assert!(parse(json!({"ms": MAX_MS + 1})).unwrap_err().to_string().contains("at most 3600000"));
        assert!(parse(json!({"ms": -1})).unwrap_err().to_string().contains("invalid value"));
        assert!(parse(json!({"ms": 1.5})).unwrap_err().to_string().contains("invalid type"));
        assert!(parse(json!({})).unwrap_err().to_string().contains("missing field `ms`"));
        assert_eq!(parse(json!({"ms": 1000.0})).unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn submitted_payloads_get_the_same_checks() {
        assert!(Kind.validate(r#"{"ms": 5}"#).is_ok());
        assert!(Kind.validate(r#"{"ms": 5.0}"#).is_ok());
        for bad in ["null", "{}", r#"{"ms": 3600001}"#, r#"{"ms": 1, "x": 2}"#, r#"{"ms": []}"#] {
            assert!(matches!(Kind.validate(bad), Err(TaskError::InvalidPayload(_))), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_then_stops_when_cancelled() {
        let output = Kind.run(json!({"ms": 1000}), TaskContext::new(CancellationToken::new())).await.unwrap();
        assert_eq!(output, json!({"slept_ms": 1000}));

        let token = CancellationToken::new();
        let task = tokio::spawn(Kind.run(json!({"ms": MAX_MS}), TaskContext::new(token.clone())));
        token.cancel();
        assert!(matches!(task.await.unwrap(), Err(TaskError::Cancelled)));
    }
}
