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
//! Fields whose source is past its retention are deleted when read. A field
//! that does not decode, is larger than the byte budget, or breaks a bound
//! that pushes are held to (see [`SourceSnapshot::check`]) is *quarantined*:
//! moved to `<prefix>:quarantine` (kept 7 days, for a look) with a warning
//! naming it and why, so a poisoned checkpoint can never crash or stall a
//! replica, at start or later. The hash is read one HSCAN page at a time and
//! each page joined before the next is read, so a load never holds the
//! whole hash. Without a Redis URL the state lives in memory only.

use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use serde::{Deserialize, Serialize};

use crate::source::SourceId;
use crate::store::{Limits, SourceSnapshot};

/// Fields written per round trip.
const CHUNK: usize = 256;
/// Fields read per HSCAN step, and most steps per load.
const SCAN_COUNT: usize = 512;
/// Most HSCAN steps per load.
pub const MAX_SCAN_STEPS: usize = 100_000;
/// How long quarantined fields are kept.
const QUARANTINE_TTL_SECONDS: u64 = 7 * 24 * 3600;

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
    quarantine: String,
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
        Ok(Self {
            pool,
            key: format!("{prefix}:sources"),
            quarantine: format!("{prefix}:quarantine"),
            replica: replica.to_owned(),
            timeout,
        })
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

    /// Reads one page of every replica's snapshots from `cursor` (0 to
    /// begin); deletes those past `retention_ms`, quarantines invalid ones
    /// (see the module). Returns the next cursor (0: done) and the page.
    ///
    /// # Errors
    ///
    /// Redis is unreachable, slow or failing.
    pub async fn load_page(
        &self,
        cursor: u64,
        now_ms: u64,
        retention_ms: u64,
        limits: Limits,
    ) -> Result<(u64, Vec<(SourceId, SourceSnapshot)>), CheckpointError> {
        let mut conn = self.pool.get().await.map_err(CheckpointError::Pool)?;
        let mut cmd = deadpool_redis::redis::cmd("HSCAN");
        cmd.arg(&self.key).arg(cursor).arg("COUNT").arg(SCAN_COUNT);
        let (next, page): (u64, Vec<(String, Vec<u8>)>) = self.bounded(cmd.query_async(&mut conn)).await?;
        let verdicts: Vec<(String, Field)> = tokio::task::spawn_blocking(move || {
            page.into_iter().map(|(field, json)| (field, read_field(json, now_ms, retention_ms, &limits))).collect()
        })
        .await
        .map_err(|_| CheckpointError::Task)?;
        let mut live = Vec::new();
        let mut stale = Vec::new();
        let mut poisoned = Vec::new();
        for (field, verdict) in verdicts {
            match verdict {
                Field::Live(source, snapshot) => live.push((source, snapshot)),
                Field::Stale => stale.push(field),
                Field::Poisoned(json, why) => {
                    tracing::warn!(field, why, "invalid checkpoint field, quarantined");
                    poisoned.push((field, json));
                }
            }
        }
        for (field, json) in &poisoned {
            let mut cmd = deadpool_redis::redis::cmd("HSET");
            cmd.arg(&self.quarantine).arg(field).arg(json);
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
            stale.push(field.clone());
        }
        if !poisoned.is_empty() {
            let mut cmd = deadpool_redis::redis::cmd("EXPIRE");
            cmd.arg(&self.quarantine).arg(QUARANTINE_TTL_SECONDS);
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        }
        for chunk in stale.chunks(CHUNK) {
            let mut cmd = deadpool_redis::redis::cmd("HDEL");
            cmd.arg(&self.key).arg(chunk);
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        }
        Ok((next, live))
    }
}

/// What a stored field is worth.
enum Field {
    Live(SourceId, SourceSnapshot),
    Stale,
    /// The raw value (for the quarantine) and why.
    Poisoned(Vec<u8>, String),
}

/// Decodes and checks one field (blocking: JSON decoding).
fn read_field(json: Vec<u8>, now_ms: u64, retention_ms: u64, limits: &Limits) -> Field {
    if json.len() > limits.max_bytes {
        let why = format!("{} bytes, more than the whole budget (--max-bytes)", json.len());
        return Field::Poisoned(json, why);
    }
    match serde_json::from_slice::<Stored>(&json) {
        Ok(s) if now_ms.saturating_sub(s.snapshot.last_seen_ms) > retention_ms => Field::Stale,
        Ok(s) => match s.snapshot.check(limits, now_ms) {
            Ok(()) => Field::Live(s.source, s.snapshot),
            Err(error) => Field::Poisoned(json, error.to_string()),
        },
        Err(error) => Field::Poisoned(json, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exponential::{Buckets, ExpHistogram};
    use crate::series::{Kind, Labels};
    use crate::store::SeriesState;

    fn limits() -> Limits {
        Limits { max_series_per_metric: 10, max_series: 100, max_sources: 10, max_bytes: 1 << 20 }
    }

    fn stored(series: Vec<(String, Kind, Labels, SeriesState)>, last_seen_ms: u64) -> Vec<u8> {
        let source = SourceId::new("gw", "a");
        serde_json::to_vec(&Stored { source, snapshot: SourceSnapshot { last_seen_ms, series } }).unwrap()
    }

    #[test]
    fn undecodable_oversized_or_out_of_bounds_fields_are_poisoned_not_loaded() {
        let now = 1_800_000_000_000;
        assert!(matches!(read_field(b"{not json".to_vec(), now, 1000, &limits()), Field::Poisoned(..)));
        assert!(matches!(read_field(vec![b' '; (1 << 20) + 1], now, 1000, &limits()), Field::Poisoned(..)));
        // The exponential histogram of issue #14: offsets near i32::MIN/MAX.
        let mut accum = crate::accum::Accum::default();
        let wide = ExpHistogram {
            scale: -10,
            zero_count: 0,
            zero_threshold: 0.0,
            positive: Buckets { offset: i32::MIN, counts: vec![1] },
            negative: Buckets { offset: i32::MAX, counts: vec![1] },
            count: 2,
            sum: 0.0,
        };
        accum.cumulative(1, 2, wide);
        let json = stored(
            vec![("x".into(), Kind::ExponentialHistogram, Labels::default(), SeriesState::Exponential(accum))],
            now,
        );
        match read_field(json, now, 1000, &limits()) {
            Field::Poisoned(_, why) => assert!(why.contains("hold no finite value"), "{why}"),
            _ => panic!("a poisoned histogram was accepted"),
        }
        // A gauge from the far future.
        let level = SeriesState::Level(crate::merge::Level { time: u64::MAX, value: 1.0 });
        let json = stored(vec![("g".into(), Kind::Gauge, Labels::default(), level)], now);
        assert!(matches!(read_field(json, now, 1000, &limits()), Field::Poisoned(..)));
        // A good one, and a stale one.
        let level = SeriesState::Level(crate::merge::Level { time: 5, value: 1.0 });
        let json = stored(vec![("g".into(), Kind::Gauge, Labels::default(), level)], now);
        assert!(matches!(read_field(json.clone(), now, 1000, &limits()), Field::Live(..)));
        assert!(matches!(read_field(json, now + 2000, 1000, &limits()), Field::Stale));
    }
}
