//! The one way a task runs, whoever asked for it: the gRPC `Execute` call
//! ([`crate::runner`]) and durable jobs (`jobs::executor`) both go through an
//! [`Executor`], each with its own pool of slots and its own duration metric.
//!
//! - [`Executor::prepare`] looks the kind up and parses the payload (blank
//!   text is `{}`), before anything is reserved;
//! - a [`Slot`] bounds how many tasks run at once; it is held until the
//!   task's work really ends, including work moved to the blocking pool;
//! - [`Executor::run`] runs the task under its cancellation token and
//!   deadline (the token is cancelled when the deadline passes, or when the
//!   run is dropped), contains a panic, and records the time run.
//!
//! What an outcome means (a gRPC status, a job state) is the caller's
//! business.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use serde_json::Value;
use shoal_telemetry::metrics::{DURATION_BUCKETS, Histogram, KeyValue, UpDownCounter, meter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runner::Stats;
use crate::tasks::{Progress, Task, TaskContext, TaskError, TaskRegistry};

/// Which callers an executor serves: it names the duration metric, and
/// whether slots are counted in the live [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Synchronous tasks (`Execute`): `worker_task_duration_seconds`, slots
    /// counted in `worker_tasks_in_flight` and [`Stats`].
    Tasks,
    /// Durable jobs: `worker_job_duration_seconds`.
    Jobs,
}

/// A slot's share of the live counts (the [`Lane::Tasks`] lane only).
#[derive(Debug, Clone)]
struct InFlight {
    stats: Stats,
    gauge: UpDownCounter<i64>,
}

/// Runs tasks of one registry through one bounded pool of slots. Cheap to
/// share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Executor {
    registry: TaskRegistry,
    slots: Arc<Semaphore>,
    limit: usize,
    duration: Histogram<f64>,
    in_flight: Option<InFlight>,
}

/// A task that is ready to run: its kind resolved, its payload parsed.
pub(crate) struct Prepared {
    task: Arc<dyn Task>,
    payload: Value,
}

impl Prepared {
    /// The kind's registered name.
    pub(crate) fn kind(&self) -> &'static str {
        self.task.name()
    }
}

/// Why a task could not be prepared.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// No kind of that name is registered; `known` lists the names.
    UnknownKind { known: String },
    /// The payload is not JSON.
    InvalidJson(serde_json::Error),
}

/// How a run ended.
pub(crate) enum Ended {
    /// The task returned.
    Returned(Result<Value, TaskError>),
    /// The deadline passed first; the task's token was cancelled.
    DeadlineExceeded,
    /// The task panicked, with this payload.
    Panicked(Box<dyn std::any::Any + Send>),
}

/// A finished run.
pub(crate) struct Ran {
    pub(crate) ended: Ended,
    /// The time run, as recorded in the duration metric.
    pub(crate) duration: Duration,
}

/// One concurrency slot, held until the task's work ends.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Option<InFlight>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, in_flight: Option<&InFlight>) -> Self {
        if let Some(in_flight) = in_flight {
            in_flight.stats.slot_taken();
            in_flight.gauge.add(1, &[]);
        }
        Self { _permit: permit, in_flight: in_flight.cloned() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.gauge.add(-1, &[]);
            in_flight.stats.slot_freed();
        }
    }
}

impl Executor {
    /// An executor of `registry`'s kinds for `lane`, `slots` at a time
    /// (at least one); `stats` gets the live counts of the
    /// [`Lane::Tasks`] lane.
    pub(crate) fn new(registry: TaskRegistry, slots: usize, lane: Lane, stats: &Stats) -> Self {
        let meter = meter("shoal-worker");
        let (name, description) = match lane {
            Lane::Tasks => ("worker_task_duration_seconds", "Time tasks ran, in seconds"),
            Lane::Jobs => ("worker_job_duration_seconds", "Run time of one job attempt"),
        };
        let duration = meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let in_flight = (lane == Lane::Tasks).then(|| InFlight {
            stats: stats.clone(),
            gauge: meter.i64_up_down_counter("worker_tasks_in_flight").with_description("Tasks running").build(),
        });
        let limit = slots.max(1);
        Self { registry, slots: Arc::new(Semaphore::new(limit)), limit, duration, in_flight }
    }

    /// The kinds this executor knows.
    pub(crate) fn registry(&self) -> &TaskRegistry {
        &self.registry
    }

    /// How many tasks run at once at most.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Slots free right now.
    pub(crate) fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// A free slot, or `None` at once when every slot is taken.
    pub(crate) fn try_slot(&self) -> Option<Slot> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(Slot::new(permit, self.in_flight.as_ref()))
    }

    /// The next free slot, waiting for one; `None` only if the pool was
    /// closed (it never is).
    pub(crate) async fn slot(&self) -> Option<Slot> {
        let permit = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        Some(Slot::new(permit, self.in_flight.as_ref()))
    }

    /// Resolves `kind` and parses `payload_json` (blank text is `{}`).
    ///
    /// # Errors
    ///
    /// [`Refusal`]: the kind is unknown or the payload is not JSON.
    pub(crate) fn prepare(&self, kind: &str, payload_json: &str) -> Result<Prepared, Refusal> {
        let task = self.registry.get(kind).ok_or_else(|| Refusal::UnknownKind { known: self.registry.names() })?;
        let payload = match payload_json.trim() {
            "" => Value::Object(serde_json::Map::new()),
            text => serde_json::from_str(text).map_err(Refusal::InvalidJson)?,
        };
        Ok(Prepared { task: Arc::clone(task), payload })
    }

    /// Runs `prepared` holding `slot` (the task's context keeps it until the
    /// task's work really ends), reporting to `progress`, cancelled by
    /// `cancel`, which this run cancels itself when `deadline` passes or
    /// when it is dropped before the task ends. Records the time run in the
    /// lane's duration metric.
    pub(crate) async fn run(
        &self,
        prepared: Prepared,
        slot: Arc<Slot>,
        cancel: CancellationToken,
        deadline: Option<Instant>,
        progress: Progress,
    ) -> Ran {
        let Prepared { task, payload } = prepared;
        let kind = task.name();
        let cancel_on_drop = cancel.clone().drop_guard();
        let ctx = TaskContext::new(cancel.clone()).reporting_to(progress).holding(slot);
        let started = Instant::now();
        let run = AssertUnwindSafe(task.run(payload, ctx)).catch_unwind();
        let returned = match deadline {
            Some(deadline) => tokio::select! {
                returned = run => Some(returned),
                () = tokio::time::sleep_until(deadline) => None,
            },
            None => Some(run.await),
        };
        cancel_on_drop.disarm();
        let ended = match returned {
            Some(Ok(result)) => Ended::Returned(result),
            Some(Err(panic)) => Ended::Panicked(panic),
            None => {
                cancel.cancel();
                Ended::DeadlineExceeded
            }
        };
        let duration = started.elapsed();
        self.duration.record(duration.as_secs_f64(), &[KeyValue::new("kind", kind)]);
        Ran { ended, duration }
    }
}
