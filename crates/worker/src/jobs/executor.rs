//! Executes jobs: reads the stream as one consumer of the group, takes over
//! the jobs of dead workers, promotes due retries, trims the stream and
//! samples queue depth. One [`JobRunner`] per worker process; each delivery
//! runs in [`super::delivery`], and leases are renewed by a task of their own
//! ([`JobRunner::keep_leases`]) on their own connections, so neither a busy
//! read loop nor a Redis backoff can starve them.
//!
//! Concurrency is bounded by job slots: the runner only reads (or takes
//! over) as many entries as it has free slots, so nothing waits unleased in
//! memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_service::admin::Readiness;
use shoal_telemetry::metrics::{Counter, Gauge, Histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::model::JobId;
use super::store::{JobStore, Lease, LeaseStatus, StoreError};
use crate::tasks::{Progress, TaskRegistry};

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

/// How often the read loop looks for lapsed entries to take over.
const CLAIM_EVERY: Duration = Duration::from_millis(100);
/// How soon a failed lease renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(100);
/// How often queue depth is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Why a running delivery was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stop {
    Running = 0,
    /// The client cancelled the job.
    Client = 1,
    /// The worker is shutting down: hand the job back.
    Shutdown = 2,
    /// Another delivery holds the job now: record nothing.
    LeaseLost = 3,
}

/// A delivery's stop reason, shared with the lease task. The first reason
/// wins, except that a lost lease overrides any other (nothing may be
/// recorded then).
#[derive(Debug, Default)]
pub(crate) struct StopReason(AtomicU8);

impl StopReason {
    pub(crate) fn set(&self, reason: Stop) {
        if reason == Stop::LeaseLost {
            self.0.store(reason as u8, Ordering::SeqCst);
        } else {
            let _ = self.0.compare_exchange(Stop::Running as u8, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    pub(crate) fn get(&self) -> Stop {
        match self.0.load(Ordering::SeqCst) {
            1 => Stop::Client,
            2 => Stop::Shutdown,
            3 => Stop::LeaseLost,
            _ => Stop::Running,
        }
    }
}

/// A delivery this runner holds, keyed by its stream entry.
pub(crate) struct Held {
    pub(crate) id: JobId,
    pub(crate) token: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) reason: Arc<StopReason>,
    pub(crate) progress: Progress,
    /// When the last renewal that succeeded was sent (or the delivery began).
    pub(crate) renewed_at: Instant,
}

pub(crate) struct Metrics {
    pub(crate) jobs: Counter<u64>,
    pub(crate) duration: Histogram<f64>,
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
            duration: meter
                .f64_histogram("worker_job_duration_seconds")
                .with_unit("s")
                .with_description("Run time of one job attempt")
                .with_boundaries(shoal_telemetry::metrics::DURATION_BUCKETS.to_vec())
                .build(),
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
    pub(crate) registry: TaskRegistry,
    pub(crate) config: RunnerConfig,
    pub(crate) stats: Arc<RunnerStats>,
    pub(crate) held: Arc<Mutex<HashMap<String, Held>>>,
    slots: Arc<Semaphore>,
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
        let slots = Arc::new(Semaphore::new(config.slots.max(1)));
        Self {
            store,
            registry,
            config,
            stats: Arc::default(),
            held: Arc::default(),
            slots,
            metrics: Arc::new(Metrics::new()),
        }
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

    async fn read_loop(self: &Arc<Self>, stop: &CancellationToken) -> JoinSet<()> {
        let mut jobs = JoinSet::new();
        let mut backoff = Backoff::default();
        let mut next_maintenance = Instant::now();
        let mut next_sample = Instant::now();
        let mut group_ready = false;
        let mut last_claim = Instant::now();
        let mut cursor = String::from("0-0");
        tracing::info!(consumer = %self.config.consumer, slots = self.config.slots, "job runner started");

        while !stop.is_cancelled() {
            reap(&mut jobs);
            if !group_ready {
                match self.store.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        backoff.wait(stop, &error, "cannot create the consumer group").await;
                        continue;
                    }
                }
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + self.config.reaper_interval;
                let sample = Instant::now() >= next_sample;
                if let Err(error) = self.maintain(sample).await {
                    backoff.wait(stop, &error, "job maintenance failed").await;
                    continue;
                }
                if sample {
                    next_sample = Instant::now() + SAMPLE_EVERY;
                }
            }
            // Wait for a free slot, but wake for maintenance and for stop.
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next_maintenance.into()) => continue,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let free = 1 + self.slots.available_permits();
            // Lapsed entries of dead workers go before new work, so a backlog
            // never delays a takeover by more than one freed slot. The scan
            // walks the whole pending list over successive passes.
            if last_claim.elapsed() >= CLAIM_EVERY {
                last_claim = Instant::now();
                match self.store.take_over(&self.config.consumer, self.config.lease, free, &cursor).await {
                    Ok((entries, next)) => {
                        cursor = next;
                        if !entries.is_empty() {
                            self.spawn_all(&mut jobs, entries, Some(permit), true);
                            continue;
                        }
                    }
                    Err(error) => {
                        drop(permit);
                        backoff.wait(stop, &error, "cannot take over lapsed jobs").await;
                        continue;
                    }
                }
            }
            // The read is not raced against `stop`: dropping it could lose
            // entries Redis already delivered (they would wait out a lease).
            // It ends within its 250 ms block.
            match self.store.read_new(&self.config.consumer, free, Duration::from_millis(250)).await {
                Ok(entries) if stop.is_cancelled() => {
                    drop(permit);
                    if let Err(error) = self.store.release(&entries).await {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            "cannot release entries read while stopping; their lease will lapse"
                        );
                    }
                    break;
                }
                Ok(entries) => {
                    backoff.reset();
                    self.spawn_all(&mut jobs, entries, Some(permit), false);
                }
                Err(error) => {
                    if is_nogroup(&error) {
                        group_ready = false;
                    }
                    drop(permit);
                    backoff.wait(stop, &error, "cannot read the job stream").await;
                }
            }
        }
        jobs
    }

    fn spawn_all(
        self: &Arc<Self>,
        jobs: &mut JoinSet<()>,
        entries: Vec<(String, JobId)>,
        mut first: Option<OwnedSemaphorePermit>,
        taken_over: bool,
    ) {
        for (entry, id) in entries {
            let permit = match first.take() {
                Some(permit) => permit,
                None => match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    // We only ever ask for as many entries as free slots;
                    // an extra one stays pending and is taken over later.
                    Err(_) => {
                        tracing::warn!(%entry, "no free slot for a delivered entry");
                        continue;
                    }
                },
            };
            if taken_over {
                self.stats.taken_over.fetch_add(1, Ordering::Relaxed);
                self.metrics.takeovers.add(1, &[]);
                tracing::info!(job_id = %id, %entry, "job taken over");
            }
            let this = self.clone();
            jobs.spawn(async move {
                this.process(entry, id).await;
                drop(permit);
            });
        }
    }

    /// Promotes due retries, trims, and samples queue depth. (Leases are
    /// renewed by their own task; lapsed entries are taken over by the read
    /// loop, ahead of new work.)
    async fn maintain(&self, sample: bool) -> Result<(), StoreError> {
        self.store.promote_due(1000).await?;
        if sample {
            self.store.trim().await?;
            let stats = self.store.stats().await?;
            let values = [
                stats.open,
                stats.stream_length,
                stats.pending,
                stats.lag,
                stats.delayed,
                stats.dead_letters,
                stats.open_bytes,
            ];
            for (gauge, value) in self.metrics.queue.iter().zip(values) {
                gauge.record(value, &[]);
            }
            self.metrics.oldest_age.record(stats.oldest_age.as_secs_f64(), &[]);
        }
        Ok(())
    }

    /// Renews every held lease each reaper interval until `stop`; a failed
    /// renewal is tried again after [`RENEW_RETRY`], not a full interval.
    async fn keep_leases(self: Arc<Self>, stop: CancellationToken) {
        let mut next = Instant::now() + self.config.reaper_interval;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(next.into()) => {}
            }
            // Bounded, so a connection that hangs cannot hold up the fence,
            // yet long enough for a slow Redis on a loaded machine.
            let bound = self.config.lease.saturating_sub(self.config.reaper_interval).max(Duration::from_millis(500));
            next = match tokio::time::timeout(bound, self.renew()).await {
                Ok(Ok(())) => Instant::now() + self.config.reaper_interval,
                failed => {
                    match failed {
                        Ok(Err(error)) => {
                            tracing::warn!(error = &error as &dyn std::error::Error, "lease renewal failed, retrying");
                        }
                        _ => tracing::warn!(bound_ms = bound.as_millis() as u64, "lease renewal timed out, retrying"),
                    }
                    self.fence_expired();
                    Instant::now() + RENEW_RETRY
                }
            };
        }
    }

    /// Stops every delivery whose lease was not renewed for a whole lease
    /// (Redis unreachable from here): another worker may hold it by now, so
    /// running on would run the job twice at once.
    fn fence_expired(&self) {
        let Ok(held) = self.held.lock() else { return };
        for (entry, h) in held.iter() {
            if h.renewed_at.elapsed() > self.config.lease && h.reason.get() != Stop::LeaseLost {
                tracing::warn!(job_id = %h.id, %entry, "lease expired without a renewal; stopping the job");
                h.reason.set(Stop::LeaseLost);
                h.cancel.cancel();
            }
        }
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        let leases: Vec<Lease> = match self.held.lock() {
            Ok(held) => held
                .iter()
                .map(|(entry, h)| {
                    let report = h.progress.latest();
                    let percent = (report.done.min(report.total) * 100).checked_div(report.total).unwrap_or(0) as u32;
                    Lease { entry: entry.clone(), id: h.id.clone(), token: h.token.clone(), progress: percent }
                })
                .collect(),
            Err(_) => return Ok(()),
        };
        let statuses = self.store.renew(&self.config.consumer, &leases).await?;
        if let Ok(mut held) = self.held.lock() {
            for (lease, status) in leases.iter().zip(statuses) {
                let Some(h) = held.get_mut(&lease.entry).filter(|h| h.token == lease.token) else { continue };
                if status != LeaseStatus::Lost {
                    h.renewed_at = sent;
                }
                match status {
                    LeaseStatus::Renewed => {}
                    LeaseStatus::CancelRequested => {
                        h.reason.set(Stop::Client);
                        h.cancel.cancel();
                    }
                    LeaseStatus::Lost => {
                        tracing::warn!(job_id = %h.id, entry = %lease.entry, "lease lost: another worker holds the job; stopping it");
                        h.reason.set(Stop::LeaseLost);
                        h.cancel.cancel();
                    }
                }
            }
        }
        Ok(())
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

/// Collects finished deliveries. A delivery contains its task's panic
/// itself; one that escapes is a bug in the delivery code, logged here.
fn reap(jobs: &mut JoinSet<()>) {
    while let Some(result) = jobs.try_join_next() {
        log_panic(result);
    }
}

fn log_panic(result: Result<(), tokio::task::JoinError>) {
    if let Err(error) = result
        && error.is_panic()
    {
        tracing::error!(error = %error, "a job delivery panicked outside its task");
    }
}

fn is_nogroup(error: &StoreError) -> bool {
    matches!(error, StoreError::Redis(e) if e.code() == Some("NOGROUP"))
}

/// Backoff for the runner's own Redis trouble: 100 ms doubling to 5 s.
#[derive(Debug)]
struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay: Duration::from_millis(100) }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.delay = Duration::from_millis(100);
    }

    async fn wait(&mut self, stop: &CancellationToken, error: &StoreError, what: &'static str) {
        tracing::warn!(error = error as &dyn std::error::Error, retry_ms = self.delay.as_millis() as u64, "{what}");
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lease_overrides_every_other_stop_reason() {
        let reason = StopReason::default();
        assert_eq!(reason.get(), Stop::Running);
        reason.set(Stop::Client);
        reason.set(Stop::Shutdown);
        assert_eq!(reason.get(), Stop::Client, "the first reason wins");
        reason.set(Stop::LeaseLost);
        reason.set(Stop::Shutdown);
        assert_eq!(reason.get(), Stop::LeaseLost);
    }
}
