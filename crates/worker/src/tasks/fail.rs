//! `fail`: fails on purpose with the caller's message, so clients and tests
//! can see how a task failure travels. Payload `{"error": "message"}`
//! (1 to 1024 characters).

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Task, TaskContext, TaskError, parse_payload};

const MAX_CHARS: usize = 1024;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    error: String,
}

fn parse(payload: Value) -> Result<String, TaskError> {
    let Input { error } = parse_payload(payload)?;
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
    }
}
