//! Durability and replicas, through Redis.
//!
//! Every aggregator replica writes the sources it changed, every checkpoint
//! interval, into one Redis hash (`<prefix>:sources`), one field per source
//! *and replica* (so two replicas never overwrite each other), the value
//! being the source's state as JSON. Every interval each replica also reads
//! the whole hash back and joins every snapshot into its own state. The join
//! is idempotent, commutative and associative (see [`crate::merge`]), so:
//!
//! - a restarted replica recovers everything up to its last checkpoint (and
//!   with cumulative temporality, the sources' next pushes restore the rest);
//! - replicas behind one address converge on the same state within one
//!   interval, and answer the same;
//! - the order in which pushes, checkpoints and loads happen never matters.
//!
//! Fields whose source is past its retention are deleted when read.
//! Without a Redis URL the state lives in memory only.

use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use serde::{Deserialize, Serialize};

use crate::source::SourceId;
use crate::store::SourceSnapshot;

/// Fields written per round trip.
const CHUNK: usize = 256;
/// Fields read per HSCAN step, and most steps per load.
const SCAN_COUNT: usize = 512;
const MAX_SCAN_STEPS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("invalid redis url")]
    Config(#[source] deadpool_redis::CreatePoolError),
    #[error("cannot get a redis connection")]
    Pool(#[source] deadpool_redis::PoolError),
    #[error("redis command failed")]
    Redis(#[source] deadpool_redis::redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("encoding task failed")]
    Task,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    source: SourceId,
    snapshot: SourceSnapshot,
}

/// The Redis side of checkpoints.
#[derive(Clone)]
pub struct Checkpoint {
    pool: Pool,
    key: String,
    replica: String,
    timeout: Duration,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("key", &self.key).field("replica", &self.replica).finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// No connection opens until the first call.
    ///
    /// # Errors
    ///
    /// An unusable URL.
    pub fn new(url: &str, prefix: &str, replica: &str, timeout: Duration) -> Result<Self, CheckpointError> {
        let mut config = deadpool_redis::Config::from_url(url);
        let mut pool_config = deadpool_redis::PoolConfig::new(4);
        pool_config.timeouts.wait = Some(timeout);
        pool_config.timeouts.create = Some(timeout);
        pool_config.timeouts.recycle = Some(timeout);
        config.pool = Some(pool_config);
        let pool = config.create_pool(Some(Runtime::Tokio1)).map_err(CheckpointError::Config)?;
        Ok(Self { pool, key: format!("{prefix}:sources"), replica: replica.to_owned(), timeout })
    }

    fn field(&self, id: &SourceId) -> String {
        format!("{}\u{1f}{}\u{1f}{}", id.service, id.instance, self.replica)
    }

    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, deadpool_redis::redis::RedisError>>,
    ) -> Result<T, CheckpointError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| CheckpointError::Timeout(self.timeout))?
            .map_err(CheckpointError::Redis)
    }

    /// Writes the snapshots of this replica.
    ///
    /// # Errors
    ///
    /// Redis is unreachable, slow or failing.
    pub async fn save(&self, items: Vec<(SourceId, SourceSnapshot)>) -> Result<(), CheckpointError> {
        if items.is_empty() {
            return Ok(());
        }
        let fields: Vec<(String, SourceId)> = items.iter().map(|(id, _)| (self.field(id), id.clone())).collect();
        let encoded = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .zip(fields)
                .filter_map(|((source, snapshot), (field, _))| {
                    serde_json::to_vec(&Stored { source, snapshot }).ok().map(|json| (field, json))
                })
                .collect::<Vec<(String, Vec<u8>)>>()
        })
        .await
        .map_err(|_| CheckpointError::Task)?;
        let mut conn = self.pool.get().await.map_err(CheckpointError::Pool)?;
        for chunk in encoded.chunks(CHUNK) {
            let mut cmd = deadpool_redis::redis::cmd("HSET");
            cmd.arg(&self.key);
            for (field, json) in chunk {
                cmd.arg(field).arg(json);
            }
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        }
        Ok(())
    }

    /// Reads every replica's snapshots; deletes those past `retention_ms`.
    ///
    /// # Errors
    ///
    /// Redis is unreachable, slow or failing.
    pub async fn load(
        &self,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<Vec<(SourceId, SourceSnapshot)>, CheckpointError> {
        let mut conn = self.pool.get().await.map_err(CheckpointError::Pool)?;
        let mut raw: Vec<(String, Vec<u8>)> = Vec::new();
        let mut cursor: u64 = 0;
        for _ in 0..MAX_SCAN_STEPS {
            let mut cmd = deadpool_redis::redis::cmd("HSCAN");
            cmd.arg(&self.key).arg(cursor).arg("COUNT").arg(SCAN_COUNT);
            let (next, page): (u64, Vec<(String, Vec<u8>)>) = self.bounded(cmd.query_async(&mut conn)).await?;
            raw.extend(page);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let (live, stale) = tokio::task::spawn_blocking(move || {
            let mut live = Vec::with_capacity(raw.len());
            let mut stale = Vec::new();
            for (field, json) in raw {
                match serde_json::from_slice::<Stored>(&json) {
                    Ok(s) if now_ms.saturating_sub(s.snapshot.last_seen_ms) <= retention_ms => {
                        live.push((s.source, s.snapshot));
                    }
                    Ok(_) => stale.push(field),
                    Err(error) => {
                        tracing::warn!(field, error = %error, "unreadable checkpoint field, deleting it");
                        stale.push(field);
                    }
                }
            }
            (live, stale)
        })
        .await
        .map_err(|_| CheckpointError::Task)?;
        for chunk in stale.chunks(CHUNK) {
            let mut cmd = deadpool_redis::redis::cmd("HDEL");
            cmd.arg(&self.key).arg(chunk);
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        }
        Ok(live)
    }
}
