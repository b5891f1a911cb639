//! The read loop: waits for a free slot, then takes over lapsed entries of
//! dead workers (ahead of new work) or reads new entries, and spawns one
//! delivery per entry; it wakes for maintenance on the reaper interval, and
//! backs off while Redis is in trouble.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{JobRunner, SAMPLE_EVERY, log_panic};
use crate::execution::Slot;
use crate::jobs::model::JobId;
use crate::jobs::store::StoreError;

/// How often the read loop looks for lapsed entries to take over.
const CLAIM_EVERY: Duration = Duration::from_millis(100);

impl JobRunner {
    pub(super) async fn read_loop(self: &Arc<Self>, stop: &CancellationToken) -> JoinSet<()> {
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
            let slot = tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next_maintenance.into()) => continue,
                slot = self.executor.slot() => match slot {
                    Some(slot) => slot,
                    None => break,
                },
            };
            let free = 1 + self.executor.free_slots();
            // Lapsed entries of dead workers go before new work, so a backlog
            // never delays a takeover by more than one freed slot. The scan
            // walks the whole pending list over successive passes.
            if last_claim.elapsed() >= CLAIM_EVERY {
                last_claim = Instant::now();
                match self.store.take_over(&self.config.consumer, self.config.lease, free, &cursor).await {
                    Ok((entries, next)) => {
                        cursor = next;
                        if !entries.is_empty() {
                            self.spawn_all(&mut jobs, entries, Some(slot), true);
                            continue;
                        }
                    }
                    Err(error) => {
                        drop(slot);
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
                    drop(slot);
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
                    self.spawn_all(&mut jobs, entries, Some(slot), false);
                }
                Err(error) => {
                    if is_nogroup(&error) {
                        group_ready = false;
                    }
                    drop(slot);
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
        mut first: Option<Slot>,
        taken_over: bool,
    ) {
        for (entry, id) in entries {
            let slot = match first.take() {
                Some(slot) => slot,
                None => match self.executor.try_slot() {
                    Some(slot) => slot,
                    // We only ever ask for as many entries as free slots;
                    // an extra one stays pending and is taken over later.
                    None => {
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
            // The delivery holds the slot until its outcome is recorded.
            jobs.spawn(async move { this.process(entry, id, Arc::new(slot)).await });
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
