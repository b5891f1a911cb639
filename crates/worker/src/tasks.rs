//! Task kinds: what a worker can run, and the registry that names them.
//!
//! A task takes a JSON payload and returns a JSON output. The gRPC `Execute`
//! call runs one synchronously and durable jobs run the same tasks, both
//! through one executor (`execution`), so a task knows nothing about gRPC or Redis.
//!
//! # Adding a kind
//!
//! 1. Write `src/tasks/<kind>.rs` with a unit struct implementing [`Task`]:
//!    parse the payload into a typed input with [`parse_payload`] (a
//!    `#[serde(deny_unknown_fields)]` struct; check ranges and return
//!    [`TaskError::InvalidPayload`] saying what to fix; integers through
//!    [`whole_number`]), do the work, and return the output. Implement
//!    [`Task::validate`] with the same checks, so a job of the kind with a
//!    payload it cannot take is refused when it is submitted, not when it runs. Wait with `tokio::select!` on
//!    [`TaskContext::cancelled`]; move CPU work over ~0.5 ms to
//!    `spawn_blocking`, taking a clone of the context along and checking
//!    [`TaskContext::is_cancelled`] every few milliseconds of work.
//! 2. Add `mod <kind>;` below and one `.register(<kind>::Kind)` line in
//!    [`TaskRegistry::builtin`].
//! 3. Add a round trip to `tests/it/tasks.rs`.
//!
//! Errors map to the wire in one place (`crate::error`): a bad payload is the
//! caller's mistake (`INVALID_ARGUMENT`), [`TaskError::Failed`] is the task
//! refusing in its own logic (`ABORTED`, HTTP 422 at the gateway), and
//! [`TaskError::Internal`] is our bug (`INTERNAL`, opaque, cause logged).

mod echo;
mod fail;
mod hash;
mod sleep;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One kind of task the worker can run.
pub trait Task: Send + Sync + 'static {
    /// The kind's name on the wire (`ExecuteRequest.kind`): lowercase, stable.
    fn name(&self) -> &'static str;

    /// One line for `ListKinds`, including the payload's shape.
    fn description(&self) -> &'static str;

    /// Runs the task on `payload`.
    ///
    /// The future may be dropped at any await point (deadline, client gone,
    /// shutdown); the context's token is cancelled when that happens, so
    /// work moved off the runtime must watch it.
    ///
    /// # Errors
    ///
    /// [`TaskError::InvalidPayload`] for input the task cannot take,
    /// [`TaskError::Failed`] when the task fails in its own logic,
    /// [`TaskError::Cancelled`] when it stopped because the token fired, and
    /// [`TaskError::Internal`] for a bug.
    fn run(&self, payload: Value, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskError>>;

    /// Checks, without running anything, that `payload_json` (valid JSON
    /// text) is a payload this kind takes: a job is validated this way when
    /// it is submitted. The default takes any JSON value.
    ///
    /// # Errors
    ///
    /// [`TaskError::InvalidPayload`] saying what to fix.
    fn validate(&self, payload_json: &str) -> Result<(), TaskError> {
        let _ = payload_json;
        Ok(())
    }
}

/// Why a task did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The payload is not what the kind takes; the message says what to fix.
    #[error("{0}")]
    InvalidPayload(String),
    /// The task ran and failed in its own logic; the message is for the caller.
    #[error("{0}")]
    Failed(String),
    /// The task stopped because its cancellation token fired.
    #[error("cancelled")]
    Cancelled,
    /// A bug or an environment failure; never shown to the caller.
    #[error("internal task error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Parses a payload into a kind's typed input, with a message that says
/// which field is wrong and how.
///
/// # Errors
///
/// [`TaskError::InvalidPayload`] naming the missing, unknown or mistyped field.
pub fn parse_payload<T: DeserializeOwned>(payload: Value) -> Result<T, TaskError> {
    serde_json::from_value(payload).map_err(|e| TaskError::InvalidPayload(format!("invalid payload: {e}")))
}

/// Parses a payload's JSON text straight into a kind's typed input (no
/// [`Value`] tree), with the messages of [`parse_payload`].
///
/// # Errors
///
/// [`TaskError::InvalidPayload`] naming the missing, unknown or mistyped field.
pub fn parse_payload_text<T: DeserializeOwned>(payload_json: &str) -> Result<T, TaskError> {
    serde_json::from_str(payload_json).map_err(|e| TaskError::InvalidPayload(format!("invalid payload: {e}")))
}

pub use shoal_service::json::whole_number;

/// What a running task can see of its surroundings. Cloning is cheap; a clone
/// moved into `spawn_blocking` keeps the work counted as in flight (and its
/// concurrency permit held) until the blocking work really ends.
#[derive(Clone)]
pub struct TaskContext {
    cancel: CancellationToken,
    progress: Progress,
    _hold: Option<Arc<dyn Send + Sync>>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext").field("cancelled", &self.cancel.is_cancelled()).finish_non_exhaustive()
    }
}

impl TaskContext {
    /// A context cancelled by `cancel`, reporting to a fresh [`Progress`].
    pub fn new(cancel: CancellationToken) -> Self {
        Self { cancel, progress: Progress::default(), _hold: None }
    }

    /// Reports to `progress` instead of a fresh one (a job's lease carries
    /// it to Redis).
    pub(crate) fn reporting_to(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// Keeps `hold` alive as long as any clone of this context lives (the
    /// executor passes its slot).
    pub(crate) fn holding(mut self, hold: Arc<dyn Send + Sync>) -> Self {
        self._hold = Some(hold);
        self
    }

    /// Whether the task should stop now.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the task should stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// The token itself, for code that wants to select on it or pass it on.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Where the task reports how far it got.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }
}

/// How far a task got, as `done` out of `total` units of its own choosing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressReport {
    pub done: u64,
    pub total: u64,
}

/// A task's progress reporter. Reporting is cheap and never blocks; the
/// latest report wins. A job's lease renewal stores it with the job.
#[derive(Debug, Clone)]
pub struct Progress {
    sender: Arc<watch::Sender<ProgressReport>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self { sender: Arc::new(watch::Sender::new(ProgressReport::default())) }
    }
}

impl Progress {
    /// Records that `done` of `total` units are finished.
    pub fn report(&self, done: u64, total: u64) {
        self.sender.send_replace(ProgressReport { done, total });
    }

    /// The latest report.
    pub fn latest(&self) -> ProgressReport {
        *self.sender.borrow()
    }

    /// A receiver that sees every later report.
    pub fn subscribe(&self) -> watch::Receiver<ProgressReport> {
        self.sender.subscribe()
    }
}

/// The task kinds a worker can run, by name.
#[derive(Clone, Default)]
pub struct TaskRegistry {
    tasks: BTreeMap<&'static str, Arc<dyn Task>>,
}

impl std::fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl TaskRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every built-in kind: `sleep`, `hash`, `echo`, `fail`.
    pub fn builtin() -> Self {
        let mut registry = Self::new();
        registry.register(sleep::Kind).register(hash::Kind).register(echo::Kind).register(fail::Kind);
        registry
    }

    /// Adds a kind.
    ///
    /// # Panics
    ///
    /// When a kind of the same name is already registered: two kinds with one
    /// name is a programming error, caught by the first test that starts a
    /// worker.
    pub fn register(&mut self, task: impl Task) -> &mut Self {
        let name = task.name();
        let previous = self.tasks.insert(name, Arc::new(task));
        assert!(previous.is_none(), "task kind `{name}` registered twice");
        self
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Task>> {
        self.tasks.get(name)
    }

    /// Every kind, in name order.
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn Task>> {
        self.tasks.values()
    }

    /// The registered names, in order, comma-separated (for error messages).
    pub fn names(&self) -> String {
        self.tasks.keys().copied().collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_has_every_kind_in_order() {
        let registry = TaskRegistry::builtin();
        assert_eq!(registry.names(), "echo, fail, hash, sleep");
        for kind in registry.kinds() {
            assert!(!kind.description().is_empty(), "{} has no description", kind.name());
        }
        assert!(registry.get("sleep").is_some());
        assert!(registry.get("nope").is_none());
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn registering_a_name_twice_panics() {
        TaskRegistry::builtin().register(echo::Kind);
    }

    #[test]
    fn parse_errors_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Input {
            ms: u64,
        }
        let message = |value: Value| parse_payload::<Input>(value).unwrap_err().to_string();
        assert!(message(serde_json::json!({})).contains("missing field `ms`"));
        assert!(message(serde_json::json!({"ms": "1"})).contains("invalid type: string"));
        assert!(message(serde_json::json!({"ms": 1, "msx": 2})).contains("unknown field `msx`"));
    }

    #[test]
    fn integers_may_be_written_with_a_zero_fraction() {
        #[derive(Debug, serde::Deserialize)]
        struct Input {
            #[serde(deserialize_with = "whole_number")]
            n: u64,
        }
        let n = |text: &str| parse_payload_text::<Input>(text).map(|input| input.n).map_err(|e| e.to_string());
        assert_eq!(n(r#"{"n": 31152}"#), Ok(31152));
        assert_eq!(n(r#"{"n": 31152.0}"#), Ok(31152));
        assert_eq!(n(r#"{"n": 3.1152e4}"#), Ok(31152));
        assert_eq!(n(r#"{"n": 0.0}"#), Ok(0));
        assert!(n(r#"{"n": 1.5}"#).unwrap_err().contains("invalid type: floating point `1.5`"));
        assert!(n(r#"{"n": -1}"#).unwrap_err().contains("invalid value: integer `-1`"));
        assert!(n(r#"{"n": -1.0}"#).unwrap_err().contains("invalid value"));
        assert!(n(r#"{"n": 1e300}"#).unwrap_err().contains("invalid value"));
        assert!(n(r#"{"n": "1"}"#).unwrap_err().contains("invalid type: string"));
        let via_value = parse_payload::<Input>(serde_json::json!({"n": 7.0})).unwrap();
        assert_eq!(via_value.n, 7);
    }

    #[test]
    fn progress_keeps_the_latest_report() {
        let progress = Progress::default();
        let mut receiver = progress.subscribe();
        progress.report(1, 10);
        progress.report(5, 10);
        assert_eq!(progress.latest(), ProgressReport { done: 5, total: 10 });
        assert!(receiver.has_changed().unwrap());
        assert_eq!(*receiver.borrow_and_update(), ProgressReport { done: 5, total: 10 });
    }
}
