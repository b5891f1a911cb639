//! Executes jobs: reads the stream as one consumer of the group, runs each
//! job's task with its timeout, records the outcome, renews the leases of the
//! jobs it holds, takes over the jobs of dead workers, promotes due retries
//! and trims the stream. One [`JobRunner`] per worker process.
//!
//! Concurrency is bounded by job slots: the runner only reads (or takes
//! over) as many entries as it has free slots, so nothing waits unleased in
//! memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use shoal_telemetry::metrics::{Counter, Gauge, Histogram, KeyValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::model::{JobId, JobState};
use super::store::{JobStore, StartOutcome, StoreError, now_ms};
use crate::tasks::{Progress, TaskContext, TaskError, TaskRegistry};

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
}

/// How often the read loop looks for lapsed entries to take over.
const CLAIM_EVERY: Duration = Duration::from_millis(100);

const STOP_NONE: u8 = 0;
const STOP_CLIENT: u8 = 1;
const STOP_SHUTDOWN: u8 = 2;

/// A job this runner holds.
struct Held {
    id: JobId,
    cancel: CancellationToken,
    reason: Arc<AtomicU8>,
    progress: Progress,
}

struct Metrics {
    jobs: Counter<u64>,
    duration: Histogram<f64>,
    redeliveries: Counter<u64>,
    dead_letters: Counter<u64>,
    takeovers: Counter<u64>,
    queue: [Gauge<u64>; 6],
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
                .with_description("Attempts after the first")
                .build(),
            dead_letters: meter
                .u64_counter("worker_job_dead_letters")
                .with_description("Jobs moved to the dead-letter stream")
                .build(),
            takeovers: meter
                .u64_counter("worker_job_takeovers")
                .with_description("Entries taken over from workers whose lease lapsed")
                .build(),
            queue: [
                gauge("jobs_queue_open", "Jobs accepted and not yet ended (the bounded quantity)"),
                gauge("jobs_queue_stream_length", "Entries in the job stream"),
                gauge("jobs_queue_pending", "Entries delivered and not yet acknowledged"),
                gauge("jobs_queue_lag", "Entries not yet delivered to any worker (autoscaling signal)"),
                gauge("jobs_queue_delayed", "Jobs waiting for a retry"),
                gauge("jobs_queue_dead_letters", "Entries in the dead-letter stream"),
            ],
        }
    }
}

/// Runs jobs until stopped. See the [module docs](self).
pub struct JobRunner {
    store: JobStore,
    registry: TaskRegistry,
    config: RunnerConfig,
    stats: Arc<RunnerStats>,
    held: Arc<Mutex<HashMap<String, Held>>>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
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
        let mut jobs = JoinSet::new();
        let mut backoff = Backoff::default();
        let mut next_maintenance = Instant::now();
        let mut next_sample = Instant::now();
        let mut group_ready = false;
        let mut last_claim = Instant::now();
        tracing::info!(consumer = %this.config.consumer, slots = this.config.slots, "job runner started");

        while !stop.is_cancelled() {
            while jobs.try_join_next().is_some() {}
            if !group_ready {
                match this.store.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        backoff.wait(&stop, &error, "cannot create the consumer group").await;
                        continue;
                    }
                }
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + this.config.reaper_interval;
                if let Err(error) = this.maintain(Instant::now() >= next_sample).await {
                    backoff.wait(&stop, &error, "job maintenance failed").await;
                    continue;
                }
                if Instant::now() >= next_sample {
                    next_sample = Instant::now() + Duration::from_secs(5);
                }
            }
            // Wait for a free slot, but wake for maintenance and for stop.
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next_maintenance.into()) => continue,
                permit = this.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let free = 1 + this.slots.available_permits();
            // Lapsed entries of dead workers go before new work, so a backlog
            // never delays a takeover by more than one freed slot.
            if last_claim.elapsed() >= CLAIM_EVERY {
                last_claim = Instant::now();
                match this.store.take_over(&this.config.consumer, this.config.lease, free).await {
                    Ok(entries) if !entries.is_empty() => {
                        this.spawn_all(&mut jobs, entries, Some(permit), true);
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        drop(permit);
                        backoff.wait(&stop, &error, "cannot take over lapsed jobs").await;
                        continue;
                    }
                }
            }
            let read = tokio::select! {
                () = stop.cancelled() => break,
                read = this.store.read_new(&this.config.consumer, free, Duration::from_millis(250)) => read,
            };
            match read {
                Ok(entries) => {
                    backoff.reset();
                    this.spawn_all(&mut jobs, entries, Some(permit), false);
                }
                Err(error) => {
                    if is_nogroup(&error) {
                        group_ready = false;
                    }
                    drop(permit);
                    backoff.wait(&stop, &error, "cannot read the job stream").await;
                }
            }
        }

        this.drain(jobs, grace).await;
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
            let span = tracing::info_span!("job", job_id = %id, entry = %entry);
            jobs.spawn(
                async move {
                    this.process(entry, id).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    /// Renews leases (and picks up cancel requests and progress), promotes
    /// due retries, trims, and samples queue depth. (Lapsed entries are taken
    /// over by the read loop, ahead of new work.)
    async fn maintain(&self, sample: bool) -> Result<(), StoreError> {
        self.renew().await?;
        self.store.promote_due(1000).await?;
        if sample {
            self.store.trim().await?;
            let stats = self.store.stats().await?;
            let values = [stats.open, stats.stream_length, stats.pending, stats.lag, stats.delayed, stats.dead_letters];
            for (gauge, value) in self.metrics.queue.iter().zip(values) {
                gauge.record(value, &[]);
            }
        }
        Ok(())
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let held: Vec<(String, JobId, u32)> = match self.held.lock() {
            Ok(held) => held
                .iter()
                .map(|(entry, h)| {
                    let report = h.progress.latest();
                    let percent = (report.done.min(report.total) * 100).checked_div(report.total).unwrap_or(0) as u32;
                    (entry.clone(), h.id.clone(), percent)
                })
                .collect(),
            Err(_) => return Ok(()),
        };
        let cancels = self.store.renew(&self.config.consumer, &held).await?;
        if let Ok(held_now) = self.held.lock() {
            for ((entry, _, _), cancel) in held.iter().zip(cancels) {
                if let (true, Some(h)) = (cancel, held_now.get(entry)) {
                    h.reason.store(STOP_CLIENT, Ordering::SeqCst);
                    h.cancel.cancel();
                }
            }
        }
        Ok(())
    }

    async fn drain(self: Arc<Self>, mut jobs: JoinSet<()>, grace: Duration) {
        let running = jobs.len();
        tracing::info!(running, grace_ms = grace.as_millis() as u64, "job runner draining");
        let deadline = Instant::now() + grace;
        let mut renew_at = Instant::now() + self.config.reaper_interval;
        loop {
            tokio::select! {
                next = jobs.join_next() => if next.is_none() { break },
                () = tokio::time::sleep_until(renew_at.into()) => {
                    renew_at = Instant::now() + self.config.reaper_interval;
                    if let Err(error) = self.renew().await {
                        tracing::warn!(error = &error as &dyn std::error::Error, "lease renewal failed while draining");
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    // Interrupt what is left; each job hands itself back.
                    if let Ok(held) = self.held.lock() {
                        for h in held.values() {
                            h.reason.store(STOP_SHUTDOWN, Ordering::SeqCst);
                            h.cancel.cancel();
                        }
                    }
                    let bounded = tokio::time::timeout(Duration::from_secs(2), async {
                        while jobs.join_next().await.is_some() {}
                    });
                    if bounded.await.is_err() {
                        tracing::warn!("jobs did not stop after cancellation; their leases will lapse");
                    }
                    break;
                }
            }
        }
        tracing::info!("job runner stopped");
    }

    /// One delivery of one job, from start to recorded outcome.
    async fn process(&self, entry: String, id: JobId) {
        let start = match self.store.start(&entry, &id, &self.config.consumer).await {
            Ok(start) => start,
            Err(error) => {
                // The entry stays pending; its lease lapses and it is taken over.
                tracing::warn!(job_id = %id, error = &error as &dyn std::error::Error, "cannot start job");
                return;
            }
        };
        let (attempts, kind, payload_json, max_attempts, timeout) = match start {
            StartOutcome::Run { attempts, kind, payload_json, max_attempts, timeout } => {
                (attempts, kind, payload_json, max_attempts, timeout)
            }
            StartOutcome::CancelRequested => {
                self.record(&entry, &id, "", JobState::Cancelled, "cancelled by client").await;
                return;
            }
            StartOutcome::Skip => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        if attempts > 1 {
            self.metrics.redeliveries.add(1, &[KeyValue::new("kind", kind.clone())]);
        }
        if attempts > max_attempts {
            let error = format!("attempt limit reached ({max_attempts}): the job's worker was lost on every attempt");
            self.record(&entry, &id, &kind, JobState::Dead, &error).await;
            return;
        }
        let Some(task) = self.registry.get(&kind).cloned() else {
            let error = format!("unknown job kind `{kind}`; this worker runs: {}", self.registry.names());
            self.record(&entry, &id, &kind, JobState::Failed, &error).await;
            return;
        };
        let payload = match serde_json::from_str(&payload_json) {
            Ok(payload) => payload,
            Err(error) => {
                self.record(&entry, &id, &kind, JobState::Failed, &format!("payload is not JSON: {error}")).await;
                return;
            }
        };

        let cancel = CancellationToken::new();
        let reason = Arc::new(AtomicU8::new(STOP_NONE));
        let ctx = TaskContext::new(cancel.clone());
        if let Ok(mut held) = self.held.lock() {
            held.insert(
                entry.clone(),
                Held {
                    id: id.clone(),
                    cancel: cancel.clone(),
                    reason: reason.clone(),
                    progress: ctx.progress().clone(),
                },
            );
        }
        let started = Instant::now();
        let run = task.run(payload, ctx);
        let result = tokio::select! {
            result = run => result.map_err(Failure::Task),
            () = tokio::time::sleep(timeout.max(Duration::from_millis(1))) => {
                cancel.cancel();
                Err(Failure::Timeout(timeout))
            }
        };
        self.metrics.duration.record(started.elapsed().as_secs_f64(), &[KeyValue::new("kind", kind.clone())]);
        if let Ok(mut held) = self.held.lock() {
            held.remove(&entry);
        }

        match (result, reason.load(Ordering::SeqCst)) {
            (Ok(output), _) => {
                self.record(&entry, &id, &kind, JobState::Succeeded, &output.to_string()).await;
            }
            (Err(_), STOP_SHUTDOWN) => {
                match self.store.hand_back(&[(entry.clone(), id.clone())]).await {
                    Ok(()) => tracing::info!(job_id = %id, "job handed back"),
                    Err(error) => {
                        tracing::warn!(job_id = %id, error = &error as &dyn std::error::Error, "hand back failed; lease will lapse");
                    }
                }
                self.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            }
            (Err(_), STOP_CLIENT) => {
                self.record(&entry, &id, &kind, JobState::Cancelled, "cancelled by client").await;
            }
            (Err(Failure::Task(TaskError::InvalidPayload(message))), _) => {
                self.record(&entry, &id, &kind, JobState::Failed, &message).await;
            }
            (Err(failure), _) => {
                let error = failure.to_string();
                if attempts < max_attempts {
                    self.retry(&entry, &id, &kind, attempts, &error).await;
                } else {
                    self.record(&entry, &id, &kind, JobState::Dead, &error).await;
                }
            }
        }
    }

    async fn retry(&self, entry: &str, id: &JobId, kind: &str, attempts: u32, error: &str) {
        let delay = retry_delay(self.config.retry_base, self.config.retry_max, attempts);
        let due = now_ms() + delay.as_millis() as u64;
        tracing::info!(job_id = %id, attempt = attempts, delay_ms = delay.as_millis() as u64, error, "job attempt failed, will retry");
        let result = with_retries(|| self.store.retry(entry, id, error, due)).await;
        match result {
            Ok(true) => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => self.record(entry, id, kind, JobState::Cancelled, "cancelled by client").await,
            Err(error) => {
                tracing::warn!(job_id = %id, error = &error as &dyn std::error::Error, "cannot schedule retry; lease will lapse");
            }
        }
    }

    /// Records a terminal outcome, retrying Redis for a while; if Redis stays
    /// away the entry remains pending and another delivery records it.
    async fn record(&self, entry: &str, id: &JobId, kind: &str, state: JobState, text: &str) {
        match with_retries(|| self.store.finish(entry, id, state, text)).await {
            Ok(true) => {
                match state {
                    JobState::Succeeded => {
                        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    JobState::Dead => {
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        self.metrics.dead_letters.add(1, &[KeyValue::new("kind", kind.to_owned())]);
                    }
                    _ => {}
                }
                self.metrics
                    .jobs
                    .add(1, &[KeyValue::new("kind", kind.to_owned()), KeyValue::new("outcome", state.as_str())]);
                if state == JobState::Dead {
                    tracing::warn!(job_id = %id, kind, error = text, "job dead-lettered");
                }
            }
            Ok(false) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(job_id = %id, "outcome already recorded by an earlier delivery");
            }
            Err(error) => {
                tracing::warn!(job_id = %id, error = &error as &dyn std::error::Error, "cannot record outcome; lease will lapse");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Task(TaskError),
    #[error("attempt timed out after {0:?}")]
    Timeout(Duration),
}

fn is_nogroup(error: &StoreError) -> bool {
    matches!(error, StoreError::Redis(e) if e.code() == Some("NOGROUP"))
}

/// Retries a Redis operation 6 times over ~3 s.
async fn with_retries<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if tries >= 5 => return Err(error),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Exponential backoff with full jitter: uniform in
/// `[0, min(max, base · 2^(attempt-1))]`, at least 10 ms.
pub(crate) fn retry_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let cap = exp.min(max).max(Duration::from_millis(10));
    let millis = rand::rng().random_range(10..=cap.as_millis().max(10) as u64);
    Duration::from_millis(millis)
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
    fn retry_delays_grow_and_stay_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..40 {
            let delay = retry_delay(base, max, attempt);
            assert!(delay >= Duration::from_millis(10), "{delay:?}");
            assert!(delay <= max, "{delay:?}");
            let bound = base.saturating_mul(1 << (attempt - 1).min(20)).min(max).max(Duration::from_millis(10));
            assert!(delay <= bound, "attempt {attempt}: {delay:?} > {bound:?}");
        }
    }
}
