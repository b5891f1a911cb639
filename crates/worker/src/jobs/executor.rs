//! Executes jobs: reads the stream as one consumer of the group, takes over
//! the jobs of dead workers, promotes due retries, trims the stream and
//! samples queue depth. One [`JobRunner`] per worker process, split by
//! concern:
//!
//! - `read_loop`: waits for a slot, takes over lapsed entries, reads new
//!   ones, spawns a delivery per entry;
//! - `delivery`: one delivery's state machine, from START to its outcome;
//!   the task itself runs through the worker's one executor
//!   (`crate::execution`), as an `Execute` call's does;
//! - `leases`: the deliveries held, their stop reasons, and the task that
//!   renews their leases on its own connections, so neither a busy read
//!   loop nor a Redis backoff can starve them;
//! - `maintenance`: due retries, trimming, queue depth gauges.
//!
//! Concurrency is bounded by job slots: the runner only reads (or takes
//! over) as many entries as it has free slots, so nothing waits unleased in
//! memory.

mod delivery;
mod leases;
mod maintenance;
mod read_loop;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leases::{Held, Stop};
use shoal_service::admin::Readiness;
use shoal_telemetry::metrics::{Counter, Gauge};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::store::JobStore;
use crate::execution::{Executor, Lane};
use crate::tasks::TaskRegistry;

/// Tunables of the runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This worker's consumer name in the group (its worker id).
    pub consumer: String,
    /// Jobs run at once.
    pub slots: usize,
    /// A held job whose lease is not renewed for this long is taken over.
    pub lease: Duration,
    /// How often leases are renewed, dead workers' jobs taken over and due
    /// retries promoted.
    pub reaper_interval: Duration,
    /// First retry delay; doubled per attempt, with full jitter.
    pub retry_base: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Largest result a job may record; a bigger one fails the job.
    pub max_result_bytes: usize,
}

/// Counters of what this runner did, for tests and operators.
#[derive(Debug, Default)]
pub struct RunnerStats {
    pub started: AtomicU64,
    pub succeeded: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub taken_over: AtomicU64,
    pub handed_back: AtomicU64,
    pub duplicates: AtomicU64,
    /// Deliveries stopped because another worker took the job over.
    pub leases_lost: AtomicU64,
    /// Outcomes refused because a newer delivery held the job.
    pub stale_outcomes: AtomicU64,
    /// Attempts that ended in a panic of the task.
    pub panicked: AtomicU64,
}

/// How often queue depth is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Metrics {
    pub(crate) jobs: Counter<u64>,
    pub(crate) redeliveries: Counter<u64>,
    pub(crate) dead_letters: Counter<u64>,
    takeovers: Counter<u64>,
    pub(crate) leases_lost: Counter<u64>,
    queue: [Gauge<u64>; 7],
    oldest_age: Gauge<f64>,
}

impl Metrics {
    fn new() -> Self {
        let meter = shoal_telemetry::metrics::meter("shoal-worker");
        let gauge = |name: &'static str, help: &'static str| meter.u64_gauge(name).with_description(help).build();
        Self {
            jobs: meter.u64_counter("worker_jobs").with_description("Jobs ended, by kind and outcome").build(),
            redeliveries: meter
                .u64_counter("worker_job_redeliveries")
                .with_description("Deliveries after the first")
                .build(),
            dead_letters: meter
                .u64_counter("worker_job_dead_letters")
                .with_description("Jobs moved to the dead-letter stream")
                .build(),
            takeovers: meter
                .u64_counter("worker_job_takeovers")
                .with_description("Entries taken over from workers whose lease lapsed")
                .build(),
            leases_lost: meter
                .u64_counter("worker_job_leases_lost")
                .with_description("Deliveries this worker stopped because another worker took the job over")
                .build(),
            queue: [
                gauge("jobs_queue_open", "Jobs accepted and not yet ended (the bounded quantity)"),
                gauge("jobs_queue_stream_length", "Entries in the job stream"),
                gauge("jobs_queue_pending", "Entries delivered and not yet acknowledged"),
                gauge("jobs_queue_lag", "Entries not yet delivered to any worker (autoscaling signal)"),
                gauge("jobs_queue_delayed", "Jobs waiting for a retry"),
                gauge("jobs_queue_dead_letters", "Entries in the dead-letter stream"),
                gauge("jobs_queue_open_bytes", "Payload bytes of jobs not yet ended (the byte budget)"),
            ],
            oldest_age: meter
                .f64_gauge("jobs_queue_oldest_age_seconds")
                .with_description("Age of the oldest pending or undelivered job entry, by Redis's clock")
                .build(),
        }
    }
}

/// Runs jobs until stopped. See the [module docs](self).
pub struct JobRunner {
    pub(crate) store: JobStore,
    executor: Executor,
    pub(crate) config: RunnerConfig,
    pub(crate) stats: Arc<RunnerStats>,
    pub(crate) held: Arc<Mutex<HashMap<String, Held>>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner").field("config", &self.config).finish_non_exhaustive()
    }
}

impl JobRunner {
    /// A runner for `store`, running the kinds in `registry`.
    pub fn new(store: JobStore, registry: TaskRegistry, config: RunnerConfig) -> Self {
        let executor = Executor::new(registry, config.slots, Lane::Jobs, &crate::runner::Stats::default());
        Self { store, executor, config, stats: Arc::default(), held: Arc::default(), metrics: Arc::new(Metrics::new()) }
    }

    /// What this runner did so far.
    pub fn stats(&self) -> Arc<RunnerStats> {
        self.stats.clone()
    }

    /// Runs until `stop` fires, then stops reading, lets running jobs finish
    /// for at most `grace` (still renewing their leases), and hands back the
    /// rest.
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let this = Arc::new(self);
        let stop_leases = CancellationToken::new();
        let mut leases = tokio::spawn(this.clone().keep_leases(stop_leases.clone()));
        let jobs = tokio::select! {
            jobs = this.read_loop(&stop) => jobs,
            ended = &mut leases => panic!("the lease renewal task ended on its own: {ended:?}"),
        };
        this.drain(jobs, grace).await;
        stop_leases.cancel();
        if let Err(error) = leases.await
            && error.is_panic()
        {
            panic!("the lease renewal task panicked: {error}");
        }
        tracing::info!("job runner stopped");
    }

    /// Like [`JobRunner::run`], for a worker process: if the runner itself
    /// panics (a bug outside any job), the worker turns unready (`jobs`) and
    /// exits with status 70 rather than serve with no runner; its jobs'
    /// leases lapse and other workers take them over.
    pub async fn run_or_exit(self, stop: CancellationToken, grace: Duration, readiness: Readiness) {
        use futures::FutureExt as _;
        let outcome = std::panic::AssertUnwindSafe(self.run(stop, grace)).catch_unwind().await;
        if outcome.is_err() {
            readiness.set("jobs", false);
            tracing::error!("the job runner panicked; exiting so that the worker is replaced");
            std::process::exit(70);
        }
    }

    async fn drain(&self, mut jobs: JoinSet<()>, grace: Duration) {
        let running = jobs.len();
        tracing::info!(running, grace_ms = grace.as_millis() as u64, "job runner draining");
        let deadline = Instant::now() + grace;
        loop {
            tokio::select! {
                next = jobs.join_next() => match next {
                    None => break,
                    Some(result) => log_panic(result),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    // Interrupt what is left; each job hands itself back.
                    if let Ok(held) = self.held.lock() {
                        for h in held.values() {
                            h.reason.set(Stop::Shutdown);
                            h.cancel.cancel();
                        }
                    }
                    let bounded = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(result) = jobs.join_next().await {
                            log_panic(result);
                        }
                    });
                    if bounded.await.is_err() {
                        tracing::warn!("jobs did not stop after cancellation; their leases will lapse");
                    }
                    break;
                }
            }
        }
    }
}

fn log_panic(result: Result<(), tokio::task::JoinError>) {
    if let Err(error) = result
        && error.is_panic()
    {
        tracing::error!(error = %error, "a job delivery panicked outside its task");
    }
}
