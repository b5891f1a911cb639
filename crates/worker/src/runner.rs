//! The gRPC `Execute` call's rules, over the one executor
//! (`crate::execution`) that durable jobs use too:
//!
//! - the kind and payload are checked before anything is reserved;
//! - at most `max_concurrency` tasks run at once; over the bound the call is
//!   refused at once ([`ExecuteError::Busy`]), never queued;
//! - a deadline cancels the task when it passes; a dropped call (client gone)
//!   cancels it too; after the shutdown grace every task is cancelled;
//! - a task counts as in flight (and keeps its slot) until its work really
//!   ends, including work it moved to the blocking pool;
//! - every outcome is counted in `worker_tasks_total{kind,outcome}`, and the
//!   time run in `worker_task_duration_seconds{kind}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use shoal_telemetry::metrics::{Counter, KeyValue, meter};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::ExecuteError;
use crate::execution::{Ended, Executor, Lane, Refusal};
use crate::tasks::{Progress, TaskError, TaskRegistry};

/// A task's output and the time it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub output: Value,
    pub duration: Duration,
}

/// Live counts of a worker's tasks, for tests and operators. Cloning shares
/// the counts.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<StatsInner>);

#[derive(Debug, Default)]
struct StatsInner {
    in_flight: AtomicUsize,
    cancelled: AtomicU64,
    idle: Notify,
}

impl Stats {
    /// Tasks whose work has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Tasks cancelled so far: deadline passed, caller gone, or shutdown.
    pub fn cancelled(&self) -> u64 {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once no task is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn count_cancelled(&self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
    }

    /// A slot was taken (its task is in flight).
    pub(crate) fn slot_taken(&self) {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// A slot came back (its task's work ended).
    pub(crate) fn slot_freed(&self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

#[derive(Debug, Clone)]
struct Instruments {
    tasks: Counter<u64>,
}

impl Instruments {
    fn new() -> Self {
        let meter = meter("shoal-worker");
        Self {
            tasks: meter.u64_counter("worker_tasks").with_description("Tasks finished, by kind and outcome").build(),
        }
    }

    fn finished(&self, kind: &'static str, outcome: &'static str) {
        self.tasks.add(1, &[KeyValue::new("kind", kind), KeyValue::new("outcome", outcome)]);
    }
}

/// Cancels the task if the execution is dropped before it ends (the caller
/// went away, or tonic's own deadline dropped the call).
struct CancelOnDrop<'a> {
    token: CancellationToken,
    kind: &'static str,
    runner: &'a Runner,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.token.cancel();
            self.runner.stats.count_cancelled();
            self.runner.instruments.finished(self.kind, "cancelled");
            tracing::info!(kind = self.kind, "task cancelled: call dropped");
        }
    }
}

/// Runs tasks from a registry within the worker's limits. Cheap to share
/// behind an `Arc`.
#[derive(Debug)]
pub struct Runner {
    executor: Executor,
    stats: Stats,
    instruments: Instruments,
    draining: AtomicBool,
    shutdown: CancellationToken,
}

impl Runner {
    /// A runner of `registry`'s kinds, `max_concurrency` at a time.
    pub fn new(registry: TaskRegistry, max_concurrency: usize) -> Self {
        let stats = Stats::default();
        Self {
            executor: Executor::new(registry, max_concurrency, Lane::Tasks, &stats),
            stats,
            instruments: Instruments::new(),
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        }
    }

    /// The kinds this runner knows.
    pub fn registry(&self) -> &TaskRegistry {
        self.executor.registry()
    }

    /// The live counts.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Refuses new tasks from now on; running ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Cancels every running task (the shutdown grace is over).
    pub fn cancel_all(&self) {
        self.shutdown.cancel();
    }

    /// Runs the task `kind` on `payload_json`, cancelling it at `deadline`.
    /// An empty payload means `{}`.
    ///
    /// # Errors
    ///
    /// See [`ExecuteError`]: the caller's mistakes, the task's own failure,
    /// the concurrency bound, the deadline, shutdown, or our bug.
    pub async fn execute(
        &self,
        kind: &str,
        payload_json: &str,
        deadline: Option<Instant>,
    ) -> Result<Outcome, ExecuteError> {
        let result = self.execute_inner(kind, payload_json, deadline).await;
        let label = self.registry().get(kind).map_or("unknown", |task| task.name());
        match &result {
            Ok(_) => self.instruments.finished(label, "ok"),
            Err(error) => self.instruments.finished(label, error.outcome()),
        }
        result
    }

    async fn execute_inner(
        &self,
        kind: &str,
        payload_json: &str,
        deadline: Option<Instant>,
    ) -> Result<Outcome, ExecuteError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ExecuteError::ShuttingDown);
        }
        let prepared = self.executor.prepare(kind, payload_json).map_err(|refusal| match refusal {
            Refusal::UnknownKind { known } => ExecuteError::unknown_kind(kind, known),
            Refusal::InvalidJson(error) => ExecuteError::InvalidJson(error),
        })?;
        let name = prepared.kind();
        let slot = self.executor.try_slot().ok_or(ExecuteError::Busy { limit: self.executor.limit() })?;

        let token = self.shutdown.child_token();
        let mut guard = CancelOnDrop { token: token.clone(), kind: name, runner: self, armed: true };
        let ran = self.executor.run(prepared, Arc::new(slot), token, deadline, Progress::default()).await;
        guard.armed = false;
        let duration = ran.duration;

        match ran.ended {
            Ended::Returned(Ok(output)) => Ok(Outcome { output, duration }),
            Ended::Returned(Err(TaskError::InvalidPayload(message))) => {
                Err(ExecuteError::InvalidPayload { kind: name, message })
            }
            Ended::Returned(Err(TaskError::Failed(message))) => Err(ExecuteError::Failed { kind: name, message }),
            Ended::Returned(Err(TaskError::Cancelled)) if self.shutdown.is_cancelled() => {
                self.stats.count_cancelled();
                tracing::warn!(kind = name, "task cancelled: shutdown grace over");
                Err(ExecuteError::Interrupted { kind: name })
            }
            Ended::Returned(Err(TaskError::Cancelled)) => {
                tracing::error!(kind = name, "task reported cancellation nobody asked for");
                Err(ExecuteError::Internal)
            }
            Ended::Returned(Err(TaskError::Internal(source))) => {
                tracing::error!(kind = name, error = &*source as &dyn std::error::Error, "task failed internally");
                Err(ExecuteError::Internal)
            }
            Ended::DeadlineExceeded => {
                self.stats.count_cancelled();
                tracing::info!(kind = name, elapsed_ms = duration.as_millis() as u64, "task cancelled: deadline");
                Err(ExecuteError::DeadlineExceeded { kind: name, after: duration })
            }
            Ended::Panicked(panic) => {
                // Execute does not answer a panic: it unwinds on into the
                // call, which tonic drops, and the guard counts the task
                // cancelled.
                guard.armed = true;
                std::panic::resume_unwind(panic)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadline_cancels_and_counts() {
        let runner = Runner::new(TaskRegistry::builtin(), 4);
        let deadline = Instant::now() + Duration::from_millis(100);
        let error = runner.execute("sleep", r#"{"ms": 5000}"#, Some(deadline)).await.unwrap_err();
        assert!(matches!(error, ExecuteError::DeadlineExceeded { kind: "sleep", .. }), "{error:?}");
        assert_eq!((runner.stats().in_flight(), runner.stats().cancelled()), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_bound_is_refused_at_once() {
        let runner = Arc::new(Runner::new(TaskRegistry::builtin(), 1));
        let first = tokio::spawn({
            let runner = Arc::clone(&runner);
            async move { runner.execute("sleep", r#"{"ms": 1000}"#, None).await }
        });
        while runner.stats().in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let error = runner.execute("echo", "1", None).await.unwrap_err();
        assert!(matches!(error, ExecuteError::Busy { limit: 1 }), "{error:?}");
        assert!(first.await.unwrap().is_ok());
        assert_eq!(runner.execute("echo", "1", None).await.unwrap().output, Value::from(1));
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_taking_a_slot() {
        let runner = Runner::new(TaskRegistry::builtin(), 1);
        let error = runner.execute("nope", "{}", None).await.unwrap_err();
        assert_eq!(error.to_string(), "unknown task kind `nope`; this worker runs: echo, fail, hash, sleep");
        let error = runner.execute("echo", "{", None).await.unwrap_err();
        assert!(error.to_string().starts_with("payload_json is not valid JSON"), "{error}");
        let error = runner.execute("sleep", "", None).await.unwrap_err();
        assert_eq!(error.to_string(), "kind `sleep`: invalid payload: missing field `ms`");
    }

    #[tokio::test]
    async fn draining_refuses_new_tasks_and_cancel_all_interrupts() {
        let runner = Arc::new(Runner::new(TaskRegistry::builtin(), 2));
        let running = tokio::spawn({
            let runner = Arc::clone(&runner);
            async move { runner.execute("sleep", r#"{"ms": 3600000}"#, None).await }
        });
        while runner.stats().in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        runner.start_draining();
        assert!(matches!(runner.execute("echo", "1", None).await, Err(ExecuteError::ShuttingDown)));
        runner.cancel_all();
        assert!(matches!(running.await.unwrap(), Err(ExecuteError::Interrupted { kind: "sleep" })));
        runner.stats().idle().await;
        assert_eq!(runner.stats().cancelled(), 1);
    }
}
