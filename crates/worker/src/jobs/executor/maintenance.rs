//! Maintenance on the reaper interval: due retries go back into the
//! stream, and (every few seconds) the stream is trimmed and the queue's
//! depth sampled into the `jobs_queue_*` gauges.

use super::JobRunner;
use crate::jobs::store::StoreError;

impl JobRunner {
    /// Promotes due retries, trims, and samples queue depth. (Leases are
    /// renewed by their own task; lapsed entries are taken over by the read
    /// loop, ahead of new work.)
    pub(super) async fn maintain(&self, sample: bool) -> Result<(), StoreError> {
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
}
