//! One delivery of one job, from START to its recorded outcome: the
//! delivery's state machine.
//!
//! - START (with a fresh fencing token; repeated with the same token if its
//!   reply is lost) says what to run, or that there is nothing to run.
//! - A job over its delivery bound (it lost every worker it landed on) is
//!   dead; an unknown kind or a payload that is not JSON fails it.
//! - The task runs under its timeout and the worker's cancellation; a panic
//!   is that attempt's failure, with its message.
//! - The outcome: success; a failure that is retried or dead-letters; a
//!   cancel; a hand-back on shutdown; or nothing at all when the lease was
//!   lost (another delivery holds the job, and only its outcome counts).
//!
//! Each attempt runs in a `job.run` span that continues the submitting
//! call's trace, with the attempt number and the worker id as attributes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng as _;
use shoal_telemetry::metrics::KeyValue;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::JobRunner;
use super::leases::{Held, Stop, StopReason};
use crate::error::UnknownKind;
use crate::execution::{Ended, Refusal, Slot};
use crate::jobs::model::{JobId, JobState};
use crate::jobs::store::{Delivery, FinishOutcome, RetryOutcome, StartOutcome, StoreError};
use crate::tasks::{Progress, TaskError};

/// Why an attempt of the job's code failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Task(TaskError),
    #[error("attempt timed out after {0:?}")]
    Timeout(Duration),
    #[error("task panicked: {0}")]
    Panic(String),
}

/// Removes a delivery from the held set when dropped, whatever ends it.
struct HeldGuard<'a> {
    runner: &'a JobRunner,
    entry: &'a str,
}

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.runner.held.lock() {
            held.remove(self.entry);
        }
    }
}

impl JobRunner {
    /// One delivery of job `id` from stream entry `entry`, in `slot` (held
    /// until its outcome is recorded).
    pub(super) async fn process(self: &Arc<Self>, entry: String, id: JobId, slot: Arc<Slot>) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let consumer = &self.config.consumer;
        let delivery = match with_retries(|| self.store.start(&entry, &id, consumer, &token)).await {
            Ok(StartOutcome::Run(delivery)) => delivery,
            Ok(StartOutcome::Cancelled) => {
                tracing::info!(job_id = %id, "job cancelled before it ran");
                return;
            }
            Ok(StartOutcome::Skip) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                // The entry stays pending; its lease lapses and it is taken
                // over (a delivery, not an attempt).
                tracing::warn!(job_id = %id, error = &error as &dyn std::error::Error, "cannot start job");
                return;
            }
        };
        let attempt = delivery.attempts + 1;
        let span = tracing::info_span!(
            parent: None,
            "job.run",
            job.id = %id,
            job.kind = %delivery.kind,
            job.attempt = attempt,
            job.delivery = delivery.deliveries,
            worker.id = %consumer,
        );
        if let Ok(value) = http::HeaderValue::from_str(&delivery.traceparent) {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", value);
            shoal_telemetry::propagation::set_parent(&span, &headers);
        }
        let delivered = Delivered { entry: &entry, id: &id, token: &token };
        self.run_delivery(&delivered, delivery, slot).instrument(span).await;
    }

    async fn run_delivery(&self, at: &Delivered<'_>, delivery: Delivery, slot: Arc<Slot>) {
        let Delivery { kind, payload_json, max_attempts, timeout, attempts, deliveries, max_deliveries, .. } = delivery;
        let attempt = attempts + 1;
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        if deliveries > 1 {
            self.metrics.redeliveries.add(1, &[KeyValue::new("kind", kind.clone())]);
        }
        if max_deliveries > 0 && deliveries > max_deliveries {
            let error = format!(
                "delivered {deliveries} times without an outcome (max deliveries {max_deliveries}): \
                 every worker that ran it was lost; {attempts} of {max_attempts} attempts spent"
            );
            self.record(at, &kind, JobState::Dead, &error, false).await;
            return;
        }
        let prepared = match self.executor.prepare(&kind, &payload_json) {
            Ok(prepared) => prepared,
            Err(Refusal::UnknownKind { known }) => {
                let error = UnknownKind::job(&kind, known).to_string();
                self.record(at, &kind, JobState::Failed, &error, false).await;
                return;
            }
            Err(Refusal::InvalidJson(error)) => {
                self.record(at, &kind, JobState::Failed, &format!("payload is not JSON: {error}"), false).await;
                return;
            }
        };

        let cancel = CancellationToken::new();
        let reason = Arc::new(StopReason::default());
        let progress = Progress::default();
        let guard = HeldGuard { runner: self, entry: at.entry };
        if let Ok(mut held) = self.held.lock() {
            held.insert(
                at.entry.to_owned(),
                Held {
                    id: at.id.clone(),
                    token: at.token.to_owned(),
                    cancel: cancel.clone(),
                    reason: reason.clone(),
                    progress: progress.clone(),
                    renewed_at: Instant::now(),
                },
            );
        }
        let deadline = tokio::time::Instant::now() + timeout.max(Duration::from_millis(1));
        // `slot` itself stays held here until the outcome is recorded.
        let ran = self.executor.run(prepared, Arc::clone(&slot), cancel, Some(deadline), progress).await;
        let result = match ran.ended {
            Ended::Returned(result) => result.map_err(Failure::Task),
            Ended::DeadlineExceeded => Err(Failure::Timeout(timeout)),
            Ended::Panicked(panic) => {
                self.stats.panicked.fetch_add(1, Ordering::Relaxed);
                Err(Failure::Panic(panic_message(panic.as_ref())))
            }
        };
        drop(guard);

        match (result, reason.get()) {
            (_, Some(Stop::LeaseLost)) => {
                self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                self.metrics.leases_lost.add(1, &[KeyValue::new("kind", kind.clone())]);
                tracing::warn!(job_id = %at.id, "stopped after losing the lease; the current holder records the outcome");
            }
            (Ok(output), _) => {
                let output = output.to_string();
                if output.len() > self.config.max_result_bytes {
                    let error = format!(
                        "the result is {} bytes, over this worker's limit of {} (--max-result-bytes)",
                        output.len(),
                        self.config.max_result_bytes
                    );
                    self.record(at, &kind, JobState::Failed, &error, true).await;
                } else {
                    self.record(at, &kind, JobState::Succeeded, &output, true).await;
                }
            }
            (Err(_), Some(Stop::Shutdown)) => match self.store.hand_back(at.entry, at.id, at.token).await {
                Ok(true) => {
                    self.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(job_id = %at.id, "job handed back");
                }
                Ok(false) => tracing::info!(job_id = %at.id, "not handed back: another delivery holds it"),
                Err(error) => {
                    tracing::warn!(job_id = %at.id, error = &error as &dyn std::error::Error, "hand back failed; lease will lapse");
                }
            },
            (Err(_), Some(Stop::Client)) => {
                self.record(at, &kind, JobState::Cancelled, "cancelled by client", false).await;
            }
            (Err(Failure::Task(TaskError::InvalidPayload(message))), _) => {
                self.record(at, &kind, JobState::Failed, &message, true).await;
            }
            (Err(failure), None) => {
                let error = failure.to_string();
                if attempt < max_attempts {
                    self.retry(at, &kind, attempt, &error).await;
                } else {
                    self.record(at, &kind, JobState::Dead, &error, true).await;
                }
            }
        }
    }

    async fn retry(&self, at: &Delivered<'_>, kind: &str, attempt: u32, error: &str) {
        let delay = retry_delay(self.config.retry_base, self.config.retry_max, attempt);
        tracing::info!(job_id = %at.id, attempt, delay_ms = delay.as_millis() as u64, error, "job attempt failed, will retry");
        match with_retries(|| self.store.retry(at.entry, at.id, at.token, error, delay)).await {
            Ok(RetryOutcome::Scheduled(_)) => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            Ok(RetryOutcome::CancelRequested) => {
                self.record(at, kind, JobState::Cancelled, "cancelled by client", false).await;
            }
            Ok(RetryOutcome::Stale) => self.stale(at.id),
            Err(error) => {
                tracing::warn!(job_id = %at.id, error = &error as &dyn std::error::Error, "cannot schedule retry; lease will lapse");
            }
        }
    }

    /// Records a terminal outcome, retrying Redis for a while; if Redis stays
    /// away the entry remains pending and another delivery records it.
    async fn record(&self, at: &Delivered<'_>, kind: &str, state: JobState, text: &str, spent: bool) {
        match with_retries(|| self.store.finish(at.entry, at.id, at.token, state, text, spent)).await {
            Ok(FinishOutcome::Done) => {
                match state {
                    JobState::Succeeded => {
                        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    JobState::Dead => {
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        self.metrics.dead_letters.add(1, &[KeyValue::new("kind", kind.to_owned())]);
                        tracing::warn!(job_id = %at.id, kind, error = text, "job dead-lettered");
                    }
                    _ => {}
                }
                self.metrics
                    .jobs
                    .add(1, &[KeyValue::new("kind", kind.to_owned()), KeyValue::new("outcome", state.as_str())]);
            }
            Ok(FinishOutcome::Stale) => self.stale(at.id),
            Ok(FinishOutcome::Missing) => tracing::info!(job_id = %at.id, "job expired before its outcome"),
            Err(error) => {
                tracing::warn!(job_id = %at.id, error = &error as &dyn std::error::Error, "cannot record outcome; lease will lapse");
            }
        }
    }

    fn stale(&self, id: &JobId) {
        self.stats.stale_outcomes.fetch_add(1, Ordering::Relaxed);
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        tracing::info!(job_id = %id, "outcome refused: another delivery holds the job, or it already ended");
    }
}

/// Where a delivery is: its entry, job and fencing token.
struct Delivered<'a> {
    entry: &'a str,
    id: &'a JobId,
    token: &'a str,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    text.chars().take(500).collect()
}

/// Retries a Redis operation 6 times over ~3 s. Every operation retried
/// here is safe to repeat: its script recognises a replay of itself.
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

    #[test]
    fn panic_messages_are_read_and_cut() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&"x".repeat(900)).len(), 500);
        assert_eq!(panic_message(&42_u8), "(no message)");
    }
}
