//! `echo`: returns its payload unchanged (any JSON value).

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Task, TaskContext, TaskError};

/// The `echo` kind.
pub struct Kind;

impl Task for Kind {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn description(&self) -> &'static str {
        "returns the payload unchanged: any JSON value"
    }

    fn run(&self, payload: Value, _ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(async move { Ok(payload) })
    }
}
