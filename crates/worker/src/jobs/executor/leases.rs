//! Leases: each delivery this runner holds, and the task that renews their
//! leases on its own connections (so neither a busy read loop nor a Redis
//! backoff can starve it), stopping a delivery that is cancelled by its
//! client or whose lease is lost or expired.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::JobRunner;
use crate::jobs::model::JobId;
use crate::jobs::store::{Lease, LeaseStatus, StoreError};
use crate::tasks::Progress;

/// How soon a failed lease renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(100);

/// Why a running delivery was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The client cancelled the job.
    Client,
    /// The worker is shutting down: hand the job back.
    Shutdown,
    /// Another delivery holds the job now: record nothing.
    LeaseLost,
}

/// A delivery's stop reason, shared with the lease task: `None` while it
/// runs on. The first reason wins, except that a lost lease overrides any
/// other (nothing may be recorded then).
#[derive(Debug, Default)]
pub(crate) struct StopReason(Mutex<Option<Stop>>);

impl StopReason {
    pub(crate) fn set(&self, reason: Stop) {
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_none() || reason == Stop::LeaseLost {
            *current = Some(reason);
        }
    }

    pub(crate) fn get(&self) -> Option<Stop> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
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

impl JobRunner {
    /// Renews every held lease each reaper interval until `stop`; a failed
    /// renewal is tried again after [`RENEW_RETRY`], not a full interval.
    pub(super) async fn keep_leases(self: Arc<Self>, stop: CancellationToken) {
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
            if h.renewed_at.elapsed() > self.config.lease && h.reason.get() != Some(Stop::LeaseLost) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lease_overrides_every_other_stop_reason() {
        let reason = StopReason::default();
        assert_eq!(reason.get(), None);
        reason.set(Stop::Client);
        reason.set(Stop::Shutdown);
        assert_eq!(reason.get(), Some(Stop::Client), "the first reason wins");
        reason.set(Stop::LeaseLost);
        reason.set(Stop::Shutdown);
        assert_eq!(reason.get(), Some(Stop::LeaseLost));
    }
}
