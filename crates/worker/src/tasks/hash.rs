//! `hash`: CPU work. SHA-256 of `data` (its UTF-8 bytes), then of the
//! previous 32-byte digest, `rounds` times in all. Payload
//! `{"data": "text", "rounds": 1..=10000000}` (`rounds` defaults to 1);
//! output `{"digest": "<64 hex digits>", "rounds": N}`.
//!
//! The rounds run on the blocking pool, never on the async runtime, and stop
//! within one check interval (a few milliseconds) of cancellation.

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{Task, TaskContext, TaskError, parse_payload, parse_payload_text, whole_number};

/// The most rounds accepted.
pub const MAX_ROUNDS: u64 = 10_000_000;
/// Rounds between two looks at the cancellation token (about a millisecond).
const CHECK_EVERY: u64 = 4096;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    data: String,
    #[serde(default = "one", deserialize_with = "whole_number")]
    rounds: u64,
}

fn one() -> u64 {
    1
}

fn parse(payload: Value) -> Result<Input, TaskError> {
    check(parse_payload(payload)?)
}

fn check(input: Input) -> Result<Input, TaskError> {
    if !(1..=MAX_ROUNDS).contains(&input.rounds) {
        return Err(TaskError::InvalidPayload(format!(
            "`rounds` must be between 1 and {MAX_ROUNDS}, got {}",
            input.rounds
        )));
    }
    Ok(input)
}

/// Hashes `data` `rounds` times, or returns `None` once `ctx` is cancelled.
fn digest(data: &[u8], rounds: u64, ctx: &TaskContext) -> Option<[u8; 32]> {
    let mut digest: [u8; 32] = Sha256::digest(data).into();
    for round in 1..rounds {
        if round % CHECK_EVERY == 0 {
            if ctx.is_cancelled() {
                return None;
            }
            ctx.progress().report(round, rounds);
        }
        digest = Sha256::digest(digest).into();
    }
    ctx.progress().report(rounds, rounds);
    Some(digest)
}

/// The `hash` kind.
pub struct Kind;

impl Task for Kind {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn description(&self) -> &'static str {
        r#"sha256 of data, then of each digest, rounds times (CPU work): {"data": "text", "rounds": 1..=10000000}"#
    }

    fn validate(&self, payload_json: &str) -> Result<(), TaskError> {
        check(parse_payload_text(payload_json)?).map(drop)
    }

    fn run(&self, payload: Value, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(async move {
            let Input { data, rounds } = parse(payload)?;
            // The context moves along, so the work counts as in flight until
            // the thread really stops, even if this future is dropped.
            let work = tokio::task::spawn_blocking(move || digest(data.as_bytes(), rounds, &ctx));
            match work.await {
                Ok(Some(digest)) => Ok(json!({ "digest": hex::encode(digest), "rounds": rounds })),
                Ok(None) => Err(TaskError::Cancelled),
                Err(error) => Err(TaskError::Internal(Box::new(error))),
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
        let input = parse(json!({"data": "x"})).unwrap();
        assert_eq!((input.data.as_str(), input.rounds), ("x", 1));
        assert_eq!(parse(json!({"data": "x", "rounds": MAX_ROUNDS})).unwrap().rounds, MAX_ROUNDS);
        assert!(parse(json!({"data": "x", "rounds": 0})).unwrap_err().to_string().contains("between 1 and 10000000"));
        assert!(
            parse(json!({"data": "x", "rounds": MAX_ROUNDS + 1})).unwrap_err().to_string().contains("got 10000001")
        );
        assert!(parse(json!({"data": 5})).unwrap_err().to_string().contains("invalid type: integer"));
        assert!(parse(json!({"rounds": 2})).unwrap_err().to_string().contains("missing field `data`"));
        assert_eq!(parse(json!({"data": "x", "rounds": 3360.0})).unwrap().rounds, 3360);
    }

    #[test]
    fn submitted_payloads_get_the_same_checks() {
        assert!(Kind.validate(r#"{"data": ""}"#).is_ok());
        for bad in ["null", r#"{"data": "", "rounds": []}"#, r#"{"data": "", "rounds": 0}"#, r#"{"data": "", "x": 1}"#]
        {
            assert!(matches!(Kind.validate(bad), Err(TaskError::InvalidPayload(_))), "{bad}");
        }
    }

    #[test]
    fn one_round_is_plain_sha256_and_more_rounds_chain() {
        let ctx = TaskContext::new(CancellationToken::new());
        // `printf hello | sha256sum`
        assert_eq!(
            hex::encode(digest(b"hello", 1, &ctx).unwrap()),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let first: [u8; 32] = Sha256::digest(b"hello").into();
        let second: [u8; 32] = Sha256::digest(first).into();
        assert_eq!(digest(b"hello", 2, &ctx).unwrap(), second);
        assert_eq!(ctx.progress().latest().done, 2);
    }

    #[test]
    fn a_cancelled_context_stops_the_rounds() {
        let token = CancellationToken::new();
        token.cancel();
        assert_eq!(digest(b"x", MAX_ROUNDS, &TaskContext::new(token)), None);
    }
}
