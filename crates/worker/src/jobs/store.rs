//! Every Redis operation on jobs, each one round trip (a command or a Lua
//! script from [`super::scripts`]). The [`JobStore`] knows nothing about
//! gRPC or execution; the runner and the gRPC service build on it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::Pool;
use redis::streams::{StreamAutoClaimReply, StreamInfoGroupsReply, StreamPendingReply, StreamReadReply};
use redis::{AsyncCommands as _, Value};

use super::batch::{Batcher, Call};
use super::keys::Keys;
use super::model::{JobId, JobRecord, JobState, NewJob};
use super::scripts;

/// A Redis failure. Every variant means "Redis is unreachable or misbehaving",
/// never the caller's mistake.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("no redis connection")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    #[error("redis pipeline failed: {0}")]
    Batch(String),
}

/// What a submission did.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// A new job, queued (the record as written).
    Created(Box<JobRecord>),
    /// The idempotency key was seen before: this is its job.
    Existing(JobId),
    /// The queue holds `open` unfinished jobs, its bound: refused.
    Full { open: u64 },
}

/// What a cancellation did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its worker was asked to stop it.
    Requested,
    /// The job had already ended in `state`.
    AlreadyEnded(JobState),
    /// No such job (or it expired).
    NotFound,
}

/// What the start of a delivery found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StartOutcome {
    Run {
        attempts: u32,
        kind: String,
        payload_json: String,
        max_attempts: u32,
        timeout: Duration,
    },
    CancelRequested,
    /// Nothing to run: the job ended (a duplicate delivery) or expired.
    Skip,
}

/// Depth and health of the queue, for metrics and autoscaling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs not yet terminal (the bounded quantity).
    pub open: u64,
    /// Entries in the stream (pending + undelivered + not yet trimmed).
    pub stream_length: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to any worker (the autoscaling signal).
    pub lag: u64,
    /// Jobs waiting for a retry.
    pub delayed: u64,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a job's record stays after it ends.
    pub job_ttl: Duration,
    /// How long an idempotency key maps to its job.
    pub idempotency_ttl: Duration,
    /// Unfinished jobs the queue holds before refusing submissions.
    pub max_open: u64,
}

/// Job operations on one Redis (prefix and pool).
#[derive(Clone)]
pub struct JobStore {
    pool: Pool,
    keys: Keys,
    config: StoreConfig,
    batcher: Batcher,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").field("keys", &self.keys).field("config", &self.config).finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn texts(value: Value) -> Result<Vec<String>, StoreError> {
    match value {
        Value::Array(items) => {
            items.iter().map(|item| as_text(item).ok_or_else(|| StoreError::Protocol(format!("{item:?}")))).collect()
        }
        other => as_text(&other).map(|t| vec![t]).ok_or_else(|| StoreError::Protocol(format!("{other:?}"))),
    }
}

impl JobStore {
    /// A store over `pool` with keys under `keys`.
    ///
    /// Must be called inside a Tokio runtime: it starts the task that batches
    /// script calls ([`super::batch`]).
    pub fn new(pool: Pool, keys: Keys, config: StoreConfig) -> Self {
        let batcher = Batcher::spawn(pool.clone());
        Self { pool, keys, config, batcher }
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Whether Redis answers.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Creates the stream and the consumer group if missing (from the start of
    /// the stream, so no entry written before is skipped).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn ensure_group(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let created: redis::RedisResult<String> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.stream())
            .arg(Keys::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Queues a job, or returns the job of a known idempotency key, or refuses
    /// when the queue is full.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails; then nothing was written.
    pub async fn submit(&self, job: &NewJob) -> Result<SubmitOutcome, StoreError> {
        let id = JobId::generate();
        let idem = job.idempotency_key.as_deref();
        let now = now_ms();
        let call = Call::new(&scripts::SUBMIT)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.open())
            .key(self.keys.idempotency(idem.unwrap_or("")))
            .arg(id.as_str())
            .arg(&job.kind)
            .arg(&job.payload_json)
            .arg(job.max_attempts)
            .arg(job.timeout.as_millis() as u64)
            .arg(now)
            .arg(self.config.max_open)
            .arg(self.config.idempotency_ttl.as_secs().max(1))
            .arg(if idem.is_some() { "1" } else { "0" });
        let reply = texts(self.batcher.call(call).await?)?;
        match reply.as_slice() {
            [tag, _] if tag == "CREATED" => Ok(SubmitOutcome::Created(Box::new(JobRecord {
                id,
                kind: job.kind.clone(),
                payload_json: job.payload_json.clone(),
                state: JobState::Queued,
                attempts: 0,
                max_attempts: job.max_attempts,
                timeout_ms: job.timeout.as_millis() as u64,
                progress: 0,
                result_json: None,
                error: None,
                created_ms: now,
                updated_ms: now,
                started_ms: None,
                finished_ms: None,
                next_attempt_ms: None,
                completions: 0,
                worker: None,
            }))),
            [tag, id] if tag == "EXISTS" => Ok(SubmitOutcome::Existing(parse_id(id)?)),
            [tag, open] if tag == "FULL" => Ok(SubmitOutcome::Full { open: open.parse().unwrap_or_default() }),
            other => Err(StoreError::Protocol(format!("submit: {other:?}"))),
        }
    }

    /// The job `id`, if it exists (ended jobs expire after the job TTL).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn get(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let fields: HashMap<String, String> = conn.hgetall(self.keys.job(id.as_str())).await?;
        Ok(JobRecord::from_hash(id.clone(), fields))
    }

    /// Cancels job `id`: at once if queued, cooperatively if running.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn cancel(&self, id: &JobId) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Value = scripts::CANCEL
            .key(self.keys.job(id.as_str()))
            .key(self.keys.open())
            .key(self.keys.delayed())
            .arg(id.as_str())
            .arg(now_ms())
            .arg(self.config.job_ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        let reply = texts(reply)?;
        Ok(match reply.first().map(String::as_str) {
            Some("CANCELLED") => CancelOutcome::Cancelled,
            Some("REQUESTED") => CancelOutcome::Requested,
            Some("TERMINAL") => {
                let state = reply.get(1).and_then(|s| JobState::parse(s)).unwrap_or(JobState::Cancelled);
                CancelOutcome::AlreadyEnded(state)
            }
            Some("MISSING") => CancelOutcome::NotFound,
            _ => return Err(StoreError::Protocol(format!("cancel: {reply:?}"))),
        })
    }

    /// Reads up to `count` new entries for `consumer`, waiting at most
    /// `block` for the first (keep it under the connection's 500 ms response
    /// timeout).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails (`NOGROUP` after Redis lost its data:
    /// call [`JobStore::ensure_group`]).
    pub(crate) async fn read_new(
        &self,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, JobId)>, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(Keys::GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.keys.stream())
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                self.collect_entry(&mut conn, &mut entries, entry).await?;
            }
        }
        Ok(entries)
    }

    /// An entry's job id; an entry without one is acknowledged and dropped
    /// (it cannot be ours to run).
    async fn collect_entry(
        &self,
        conn: &mut deadpool_redis::Connection,
        entries: &mut Vec<(String, JobId)>,
        entry: redis::streams::StreamId,
    ) -> Result<(), StoreError> {
        match entry.get::<String>("job").and_then(|id| id.parse::<JobId>().ok()) {
            Some(id) => entries.push((entry.id, id)),
            None => {
                tracing::warn!(entry = %entry.id, "stream entry without a job id, acknowledged");
                let _: u64 = conn.xack(self.keys.stream(), Keys::GROUP, &[&entry.id]).await?;
            }
        }
        Ok(())
    }

    /// Takes over up to `count` entries whose holder has not renewed its lease
    /// for `min_idle` (a dead or stuck worker).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub(crate) async fn take_over(
        &self,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<(String, JobId)>, StoreError> {
        let mut conn = self.conn().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.stream())
            .arg(Keys::GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        if !reply.deleted_ids.is_empty() {
            // Pending entries that were trimmed away: nothing left to run.
            let _: u64 = conn.xack(self.keys.stream(), Keys::GROUP, &reply.deleted_ids).await?;
        }
        let mut entries = Vec::new();
        for entry in reply.claimed {
            self.collect_entry(&mut conn, &mut entries, entry).await?;
        }
        Ok(entries)
    }

    /// Begins a delivery of job `id` from stream entry `entry`.
    pub(crate) async fn start(&self, entry: &str, id: &JobId, consumer: &str) -> Result<StartOutcome, StoreError> {
        let call = Call::new(&scripts::START).key(self.keys.job(id.as_str())).arg(entry).arg(consumer).arg(now_ms());
        let reply = texts(self.batcher.call(call).await?)?;
        match reply.first().map(String::as_str) {
            Some("RUN") if reply.len() == 6 => Ok(StartOutcome::Run {
                attempts: reply[1].parse().unwrap_or(1),
                kind: reply[2].clone(),
                payload_json: reply[3].clone(),
                max_attempts: reply[4].parse().unwrap_or(1),
                timeout: Duration::from_millis(reply[5].parse().unwrap_or(0)),
            }),
            Some("CANCEL") => Ok(StartOutcome::CancelRequested),
            Some("TERMINAL" | "MISSING") => {
                let mut conn = self.conn().await?;
                let _: u64 = conn.xack(self.keys.stream(), Keys::GROUP, &[entry]).await?;
                Ok(StartOutcome::Skip)
            }
            _ => Err(StoreError::Protocol(format!("start: {reply:?}"))),
        }
    }

    /// Records the terminal `state` of job `id` (with its result or error
    /// text) and acknowledges `entry`. Returns whether this call recorded it
    /// (`false`: an earlier outcome stands).
    pub(crate) async fn finish(
        &self,
        entry: &str,
        id: &JobId,
        state: JobState,
        text: &str,
    ) -> Result<bool, StoreError> {
        debug_assert!(state.is_terminal());
        let call = Call::new(&scripts::FINISH)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.open())
            .key(self.keys.dead())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(state.as_str())
            .arg(text)
            .arg(now_ms())
            .arg(self.config.job_ttl.as_secs().max(1))
            .arg(id.as_str());
        let reply = self.batcher.call(call).await?;
        Ok(as_text(&reply).as_deref() == Some("DONE"))
    }

    /// Schedules another attempt of `id` at `due_ms` after an attempt failed
    /// with `error`, and acknowledges `entry`. Returns `false` when a cancel
    /// was requested instead (the caller finishes it as cancelled).
    pub(crate) async fn retry(&self, entry: &str, id: &JobId, error: &str, due_ms: u64) -> Result<bool, StoreError> {
        let call = Call::new(&scripts::RETRY)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.delayed())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(error)
            .arg(due_ms)
            .arg(now_ms())
            .arg(id.as_str());
        let reply = self.batcher.call(call).await?;
        Ok(as_text(&reply).as_deref() != Some("CANCEL"))
    }

    /// Hands unfinished deliveries back on shutdown: the jobs are queued again
    /// and their entries made claimable by any worker at once.
    pub(crate) async fn hand_back(&self, entries: &[(String, JobId)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for (_, id) in entries {
            let _: Value =
                scripts::HAND_BACK.key(self.keys.job(id.as_str())).arg(now_ms()).invoke_async(&mut conn).await?;
        }
        // Reassign to a consumer that never reads, with a huge idle time, so
        // the next reaper pass of any worker claims them.
        let mut claim = redis::cmd("XCLAIM");
        claim.arg(self.keys.stream()).arg(Keys::GROUP).arg("handed-back").arg(0);
        for (entry, _) in entries {
            claim.arg(entry);
        }
        claim.arg("IDLE").arg(i64::from(i32::MAX)).arg("JUSTID");
        let _: Value = claim.query_async(&mut conn).await?;
        Ok(())
    }

    /// Renews the lease of the entries `consumer` holds (resets their idle
    /// time) and returns, per job, whether a cancel was requested.
    pub(crate) async fn renew(&self, consumer: &str, held: &[(String, JobId, u32)]) -> Result<Vec<bool>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        let mut claim = redis::cmd("XCLAIM");
        claim.arg(self.keys.stream()).arg(Keys::GROUP).arg(consumer).arg(0);
        for (entry, _, _) in held {
            claim.arg(entry);
        }
        claim.arg("JUSTID");
        pipe.add_command(claim).ignore();
        for (_, id, progress) in held {
            let key = self.keys.job(id.as_str());
            pipe.cmd("HSET").arg(&key).arg("progress").arg(*progress).ignore();
            pipe.cmd("HGET").arg(&key).arg("cancel");
        }
        let flags: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        Ok(flags.into_iter().map(|flag| flag.as_deref() == Some("1")).collect())
    }

    /// Moves retries that are due back into the stream; returns how many.
    pub(crate) async fn promote_due(&self, limit: usize) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let moved: u64 = scripts::PROMOTE
            .key(self.keys.stream())
            .key(self.keys.delayed())
            .arg(now_ms())
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved)
    }

    /// Trims acknowledged entries from the stream, never one that is pending
    /// or not yet delivered: everything older than both the oldest pending
    /// entry and the group's last delivered entry goes.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn trim(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let stream = self.keys.stream();
        let groups: StreamInfoGroupsReply = conn.xinfo_groups(&stream).await?;
        let Some(group) = groups.groups.iter().find(|g| g.name == Keys::GROUP) else { return Ok(0) };
        let pending: StreamPendingReply = conn.xpending(&stream, Keys::GROUP).await?;
        let floor = match &pending {
            StreamPendingReply::Data(data) => data.start_id.clone(),
            _ => successor(&group.last_delivered_id),
        };
        let floor = min_id(&floor, &successor(&group.last_delivered_id));
        let trimmed: u64 = redis::cmd("XTRIM").arg(&stream).arg("MINID").arg(&floor).query_async(&mut conn).await?;
        Ok(trimmed)
    }

    /// Queue depth figures, in one pipeline.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        let mut conn = self.conn().await?;
        let stream = self.keys.stream();
        let (open, stream_length, delayed, dead_letters): (Option<i64>, u64, u64, u64) = redis::pipe()
            .get(self.keys.open())
            .xlen(&stream)
            .zcard(self.keys.delayed())
            .xlen(self.keys.dead())
            .query_async(&mut conn)
            .await?;
        let groups: redis::RedisResult<StreamInfoGroupsReply> = conn.xinfo_groups(&stream).await;
        let (pending, lag) = match groups {
            Ok(groups) => groups
                .groups
                .iter()
                .find(|g| g.name == Keys::GROUP)
                .map(|g| (g.pending as u64, g.lag.unwrap_or_default() as u64))
                .unwrap_or_default(),
            Err(_) => (0, 0),
        };
        Ok(QueueStats { open: open.unwrap_or(0).max(0) as u64, stream_length, pending, lag, delayed, dead_letters })
    }
}

fn parse_id(text: &str) -> Result<JobId, StoreError> {
    text.parse().map_err(|_| StoreError::Protocol(format!("bad job id in redis: {text}")))
}

/// The stream id right after `id` (`ms-seq` → `ms-(seq+1)`).
fn successor(id: &str) -> String {
    match id.split_once('-') {
        Some((ms, seq)) => match seq.parse::<u64>() {
            Ok(seq) => format!("{ms}-{}", seq.saturating_add(1)),
            Err(_) => id.to_owned(),
        },
        None => id.to_owned(),
    }
}

fn parse_stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn min_id(a: &str, b: &str) -> String {
    if parse_stream_id(a) <= parse_stream_id(b) { a.to_owned() } else { b.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        assert_eq!(successor("1700000000000-5"), "1700000000000-6");
        assert_eq!(successor("0-0"), "0-1");
        assert_eq!(min_id("10-2", "9-100"), "9-100");
        assert_eq!(min_id("10-2", "10-10"), "10-2");
    }
}
