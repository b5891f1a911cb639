//! `fail`: fails on purpose with the caller's message, so clients and tests
//! can see how a task failure travels. Payload `{"error": "message"}`
//! (1 to 1024 characters).

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Task, TaskContext, TaskError, parse_payload, parse_payload_text};

const MAX_CHARS: usize = 1024;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    error: String,
}

fn parse(payload: Value) -> Result<String, TaskError> {
    check(parse_payload(payload)?)
}

fn check(Input { error }: Input) -> Result<String, TaskError> {
    let chars = error.chars().count();
    if chars == 0 || chars > MAX_CHARS {
        return Err(TaskError::InvalidPayload(format!("`error` must be 1 to {MAX_CHARS} characters, got {chars}")));
    }
    Ok(error)
}

/// The `fail` kind.
pub struct Kind;

impl Task for Kind {
    fn name(&self) -> &'static str {
        "fail"
    }

    fn description(&self) -> &'static str {
        r#"fails on purpose with the given message: {"error": "message"}"#
    }

    fn validate(&self, payload_json: &str) -> Result<(), TaskError> {
        check(parse_payload_text(payload_json)?).map(drop)
    }

    fn run(&self, payload: Value, _ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(async move { Err(TaskError::Failed(parse(payload)?)) })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn payload_is_checked() {
        assert_eq!(parse(json!({"error": "boom"})).unwrap(), "boom");
        assert!(parse(json!({"error": ""})).unwrap_err().to_string().contains("1 to 1024"));
        assert!(parse(json!({"error": 3})).unwrap_err().to_string().contains("invalid type"));
        assert!(parse(json!({"message": "x"})).unwrap_err().to_string().contains("unknown field `message`"));
        assert!(Kind.validate(r#"{"error": "boom"}"#).is_ok());
        assert!(matches!(Kind.validate(r#"{"error": ""}"#), Err(TaskError::InvalidPayload(_))));
        assert!(matches!(Kind.validate("null"), Err(TaskError::InvalidPayload(_))));
    }
}
