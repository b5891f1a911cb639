//! Every Redis operation on jobs, each one round trip (a command or a Lua
//! script from [`super::scripts`]). The [`JobStore`] knows nothing about
//! gRPC or execution; the runner and the gRPC service build on it.

use std::collections::HashMap;
use std::time::Duration;

use redis::streams::{
    StreamAutoClaimReply, StreamInfoGroupsReply, StreamPendingReply, StreamRangeReply, StreamReadReply,
};
use redis::{AsyncCommands as _, Value};

use super::batch::{Batcher, Call};
use super::connection::{Connection, RedisPool as Pool};
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
    /// The idempotency key was seen before, with the same request: this is
    /// its job.
    Existing(JobId),
    /// The idempotency key names job `0`, submitted with another kind,
    /// payload or options: refused.
    KeyMismatch(JobId),
    /// The queue holds `open` unfinished jobs, its bound: refused.
    Full { open: u64 },
    /// Unfinished jobs' payloads fill the byte budget (`bytes` used): refused.
    FullBytes { bytes: u64 },
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
    /// No such job (or it expired, or it belongs to another owner).
    NotFound,
}

/// What the start of a delivery found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StartOutcome {
    Run(Delivery),
    /// A cancel was requested while the job waited: it is now cancelled.
    Cancelled,
    /// Nothing to run: the job ended (a duplicate delivery), expired, or
    /// another worker holds the entry now.
    Skip,
}

/// One delivery of a job that is to run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Delivery {
    pub(crate) kind: String,
    pub(crate) payload_json: String,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Duration,
    /// Attempts spent before this delivery.
    pub(crate) attempts: u32,
    /// Deliveries so far, this one included.
    pub(crate) deliveries: u32,
    pub(crate) max_deliveries: u32,
    /// The submitting call's trace context (empty: none).
    pub(crate) traceparent: String,
}

/// What recording an outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishOutcome {
    /// Recorded (or this very call was recorded before).
    Done,
    /// Refused: another delivery holds the job, or it ended already.
    Stale,
    /// The job expired.
    Missing,
}

/// What scheduling a retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryOutcome {
    /// Queued again, due at this Redis time (ms).
    Scheduled(u64),
    /// A cancel was requested: finish it as cancelled.
    CancelRequested,
    /// Refused: another delivery holds the job.
    Stale,
}

/// A delivery whose lease is to be renewed.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) entry: String,
    pub(crate) id: JobId,
    pub(crate) token: String,
    pub(crate) progress: u32,
}

/// What a renewal found for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseStatus {
    Renewed,
    /// Renewed, and a cancel was requested.
    CancelRequested,
    /// Another delivery holds the job: stop it, record nothing.
    Lost,
}

/// Depth and health of the queue, for metrics and autoscaling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// Jobs not yet terminal (the bounded quantity).
    pub open: u64,
    /// Payload bytes of jobs not yet terminal (the byte budget).
    pub open_bytes: u64,
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
    /// Age of the oldest entry that is pending or not yet delivered, by
    /// Redis's clock (0 when there is none).
    pub oldest_age: Duration,
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a job's record stays after it ends.
    pub job_ttl: Duration,
    /// How long an idempotency key stays after its job ends, at least the
    /// record's `job_ttl` (a key never outlives the job it names).
    pub idempotency_ttl: Duration,
    /// Unfinished jobs the queue holds before refusing submissions.
    pub max_open: u64,
    /// Payload bytes of unfinished jobs before refusing submissions.
    pub max_open_bytes: u64,
    /// Deliveries of a job before it is dead (at least its `max_attempts`).
    pub max_deliveries: u32,
    /// Approximate bound on the dead-letter stream (`XADD MAXLEN ~`).
    pub dead_letter_cap: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            job_ttl: Duration::from_secs(7 * 24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            max_open: 100_000,
            max_open_bytes: 256 * 1024 * 1024,
            max_deliveries: 10,
            dead_letter_cap: 100_000,
        }
    }
}

/// Job operations on one Redis (prefix and pool).
#[derive(Clone)]
pub struct JobStore {
    pool: Pool,
    /// Connections for lease renewals only, so API traffic on `pool` can
    /// never starve them.
    lease_pool: Pool,
    keys: Keys,
    config: StoreConfig,
    batcher: Batcher,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").field("keys", &self.keys).field("config", &self.config).finish_non_exhaustive()
    }
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

impl StoreError {
    /// Whether Redis refused a write because it reached `maxmemory`.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Self::Redis(error) => error.code() == Some("OOM"),
            _ => false,
        }
    }
}

impl JobStore {
    /// A store over `pool` with keys under `keys`; lease renewals share the
    /// pool until [`JobStore::with_lease_pool`] gives them their own.
    ///
    /// Must be called inside a Tokio runtime: it starts the task that batches
    /// script calls ([`super::batch`]).
    pub fn new(pool: impl Into<Pool>, keys: Keys, config: StoreConfig) -> Self {
        let pool = pool.into();
        let batcher = Batcher::spawn(pool.clone());
        Self { lease_pool: pool.clone(), pool, keys, config, batcher }
    }

    /// Lease renewals use `pool` (a small pool of their own).
    #[must_use]
    pub fn with_lease_pool(mut self, pool: impl Into<Pool>) -> Self {
        self.lease_pool = pool.into();
        self
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The tunables.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    async fn conn(&self) -> Result<Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A connection from the shared pool.
    pub(crate) async fn connection(&self) -> Result<Connection, StoreError> {
        self.conn().await
    }

    /// Whether Redis answers.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // A keyed read, not PING: in a cluster PING goes to every node, and
        // the queue's health is that of the one primary holding its slot.
        let _: bool = conn.exists(self.keys.open()).await?;
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
    /// when the queue is full or the key was used for another request.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails (or is out of memory); then nothing
    /// was written.
    pub async fn submit(&self, job: &NewJob) -> Result<SubmitOutcome, StoreError> {
        let id = JobId::generate();
        let idem = job.idempotency_key.as_deref();
        let owner = job.owner.as_deref().filter(|o| !o.is_empty());
        let max_deliveries = self.config.max_deliveries.max(job.max_attempts);
        let job_ttl = self.config.job_ttl.as_secs().max(1);
        let call = Call::new(&scripts::SUBMIT)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.open())
            .key(self.keys.idempotency(owner, idem.unwrap_or("")))
            .key(self.keys.open_bytes())
            .key(self.keys.job_prefix())
            .arg(id.as_str())
            .arg(&job.kind)
            .arg(&job.payload_json)
            .arg(job.max_attempts)
            .arg(job.timeout.as_millis() as u64)
            .arg(self.config.max_open)
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(job.fingerprint())
            .arg(owner.unwrap_or(""))
            .arg(max_deliveries)
            .arg(job_ttl)
            .arg(self.config.idempotency_ttl.as_secs().max(job_ttl))
            .arg(self.config.max_open_bytes)
            .arg(job.traceparent.as_deref().unwrap_or(""));
        let reply = texts(self.batcher.call(call).await?)?;
        match reply.as_slice() {
            [tag, _, now] if tag == "CREATED" => {
                let now = now.parse().unwrap_or_default();
                Ok(SubmitOutcome::Created(Box::new(JobRecord {
                    id,
                    kind: job.kind.clone(),
                    payload_json: job.payload_json.clone(),
                    state: JobState::Queued,
                    attempts: 0,
                    max_attempts: job.max_attempts,
                    deliveries: 0,
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
                    owner: owner.map(str::to_owned),
                })))
            }
            [tag, id] if tag == "EXISTS" => Ok(SubmitOutcome::Existing(parse_id(id)?)),
            [tag, id] if tag == "MISMATCH" => Ok(SubmitOutcome::KeyMismatch(parse_id(id)?)),
            [tag, open] if tag == "FULL" => Ok(SubmitOutcome::Full { open: open.parse().unwrap_or_default() }),
            [tag, bytes] if tag == "FULL_BYTES" => {
                Ok(SubmitOutcome::FullBytes { bytes: bytes.parse().unwrap_or_default() })
            }
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

    /// Cancels job `id`: at once if queued, cooperatively if running. With
    /// an `owner`, a job of another owner is [`CancelOutcome::NotFound`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn cancel(&self, id: &JobId, owner: Option<&str>) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Value = scripts::CANCEL
            .key(self.keys.job(id.as_str()))
            .key(self.keys.open())
            .key(self.keys.delayed())
            .key(self.keys.open_bytes())
            .arg(id.as_str())
            .arg(owner.unwrap_or(""))
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
        conn: &mut Connection,
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
    /// for `min_idle` (a dead or stuck worker), scanning the pending list
    /// from `cursor`. Returns the entries and the cursor of the next scan
    /// (`0-0` once the whole list was walked), so entries behind live
    /// long-running ones are reached within a few passes.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub(crate) async fn take_over(
        &self,
        consumer: &str,
        min_idle: Duration,
        count: usize,
        cursor: &str,
    ) -> Result<(Vec<(String, JobId)>, String), StoreError> {
        let mut conn = self.conn().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.stream())
            .arg(Keys::GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
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
        Ok((entries, reply.next_stream_id))
    }

    /// Makes entries read but never started claimable by any worker at once
    /// (a read that completed while the worker was stopping).
    pub(crate) async fn release(&self, entries: &[(String, JobId)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut claim = redis::cmd("XCLAIM");
        claim.arg(self.keys.stream()).arg(Keys::GROUP).arg("handed-back").arg(0);
        for (entry, _) in entries {
            claim.arg(entry);
        }
        claim.arg("IDLE").arg(i64::from(i32::MAX)).arg("JUSTID");
        let _: Value = claim.query_async(&mut conn).await?;
        Ok(())
    }

    /// Begins delivery `token` of job `id` from stream entry `entry`. Safe to
    /// repeat with the same token (a lost reply).
    pub(crate) async fn start(
        &self,
        entry: &str,
        id: &JobId,
        consumer: &str,
        token: &str,
    ) -> Result<StartOutcome, StoreError> {
        let call = Call::new(&scripts::START)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.open())
            .key(self.keys.open_bytes())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(consumer)
            .arg(token);
        let reply = texts(self.batcher.call(call).await?)?;
        let number = |i: usize| reply.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match reply.first().map(String::as_str) {
            Some("RUN") if reply.len() == 9 => Ok(StartOutcome::Run(Delivery {
                kind: reply[1].clone(),
                payload_json: reply[2].clone(),
                max_attempts: number(3).max(1) as u32,
                timeout: Duration::from_millis(number(4)),
                attempts: number(5) as u32,
                deliveries: number(6).max(1) as u32,
                max_deliveries: number(7) as u32,
                traceparent: reply[8].clone(),
            })),
            Some("CANCELLED") => Ok(StartOutcome::Cancelled),
            Some("TERMINAL" | "MISSING" | "NOT_OURS") => Ok(StartOutcome::Skip),
            _ => Err(StoreError::Protocol(format!("start: {reply:?}"))),
        }
    }

    /// Records the terminal `state` of delivery `token` of job `id` (with its
    /// result or error text) and acknowledges `entry`; `spent` when the
    /// job's code ran (an attempt is counted).
    pub(crate) async fn finish(
        &self,
        entry: &str,
        id: &JobId,
        token: &str,
        state: JobState,
        text: &str,
        spent: bool,
    ) -> Result<FinishOutcome, StoreError> {
        debug_assert!(state.is_terminal());
        let call = Call::new(&scripts::FINISH)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.open())
            .key(self.keys.dead())
            .key(self.keys.open_bytes())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(token)
            .arg(state.as_str())
            .arg(text)
            .arg(if spent { "1" } else { "0" })
            .arg(self.config.dead_letter_cap)
            .arg(id.as_str());
        let reply = self.batcher.call(call).await?;
        match as_text(&reply).as_deref() {
            Some("DONE") => Ok(FinishOutcome::Done),
            Some("STALE") => Ok(FinishOutcome::Stale),
            Some("MISSING") => Ok(FinishOutcome::Missing),
            other => Err(StoreError::Protocol(format!("finish: {other:?}"))),
        }
    }

    /// Schedules another attempt of `id` `delay` after (Redis time) delivery
    /// `token` failed with `error`, and acknowledges `entry`.
    pub(crate) async fn retry(
        &self,
        entry: &str,
        id: &JobId,
        token: &str,
        error: &str,
        delay: Duration,
    ) -> Result<RetryOutcome, StoreError> {
        let call = Call::new(&scripts::RETRY)
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .key(self.keys.delayed())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(token)
            .arg(error)
            .arg(delay.as_millis() as u64)
            .arg(id.as_str());
        let reply = texts(self.batcher.call(call).await?)?;
        match reply.first().map(String::as_str) {
            Some("RETRY") => Ok(RetryOutcome::Scheduled(reply.get(1).and_then(|d| d.parse().ok()).unwrap_or(0))),
            Some("CANCEL") => Ok(RetryOutcome::CancelRequested),
            Some("STALE" | "MISSING") => Ok(RetryOutcome::Stale),
            _ => Err(StoreError::Protocol(format!("retry: {reply:?}"))),
        }
    }

    /// Hands delivery `token` back on shutdown: the job is queued again and
    /// its entry claimable by any worker at once. Returns `false` when the
    /// delivery was no longer ours.
    pub(crate) async fn hand_back(&self, entry: &str, id: &JobId, token: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Value = scripts::HAND_BACK
            .key(self.keys.job(id.as_str()))
            .key(self.keys.stream())
            .arg(Keys::GROUP)
            .arg(entry)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(as_text(&reply).as_deref() == Some("OK"))
    }

    /// Renews the leases `consumer` holds, in one pipelined round trip on
    /// the lease connections, and says per lease whether it still holds it
    /// and whether a cancel was requested.
    pub(crate) async fn renew(&self, consumer: &str, held: &[Lease]) -> Result<Vec<LeaseStatus>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let calls: Vec<Call> = held
            .iter()
            .map(|lease| {
                Call::new(&scripts::RENEW)
                    .key(self.keys.job(lease.id.as_str()))
                    .key(self.keys.stream())
                    .arg(Keys::GROUP)
                    .arg(&lease.entry)
                    .arg(consumer)
                    .arg(&lease.token)
                    .arg(lease.progress)
            })
            .collect();
        let replies = super::batch::pipeline(&self.lease_pool, calls.iter()).await?;
        if replies.len() != held.len() {
            return Err(StoreError::Protocol(format!("renew: {} replies for {} leases", replies.len(), held.len())));
        }
        let replies = replies.into_iter().collect::<Result<Vec<Value>, _>>()?;
        Ok(replies
            .iter()
            .map(|reply| match as_text(reply).as_deref() {
                Some("OK") => LeaseStatus::Renewed,
                Some("CANCEL") => LeaseStatus::CancelRequested,
                _ => LeaseStatus::Lost,
            })
            .collect())
    }

    /// Moves retries that are due (by Redis's clock) back into the stream;
    /// returns how many.
    pub(crate) async fn promote_due(&self, limit: usize) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let moved: u64 = scripts::PROMOTE
            .key(self.keys.stream())
            .key(self.keys.delayed())
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

    /// Queue depth figures, in two round trips.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        let mut conn = self.conn().await?;
        let stream = self.keys.stream();
        let (open, open_bytes, stream_length, delayed, dead_letters, time): (
            Option<i64>,
            Option<i64>,
            u64,
            u64,
            u64,
            (u64, u64),
        ) = redis::pipe()
            .get(self.keys.open())
            .get(self.keys.open_bytes())
            .xlen(&stream)
            .zcard(self.keys.delayed())
            .xlen(self.keys.dead())
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let now_ms = time.0 * 1000 + time.1 / 1000;
        let groups: redis::RedisResult<StreamInfoGroupsReply> = conn.xinfo_groups(&stream).await;
        let group = groups.ok().and_then(|groups| groups.groups.into_iter().find(|g| g.name == Keys::GROUP));
        let pending = group.as_ref().map(|g| g.pending as u64).unwrap_or_default();
        let (lag, repaired): (i64, i64) =
            scripts::LAG.key(&stream).arg(Keys::GROUP).arg(LAG_COUNT_CAP).invoke_async(&mut conn).await?;
        if repaired == 1 {
            let reported = group.as_ref().and_then(|g| g.lag);
            tracing::info!(lag, ?reported, "consumer group lag counter was wrong (a failover); set right");
        }
        let lag = lag.max(0) as u64;
        let mut oldest: Option<u64> = None;
        if let Some(group) = &group {
            let (summary, next): (StreamPendingReply, StreamRangeReply) = redis::pipe()
                .xpending(&stream, Keys::GROUP)
                .xrange_count(&stream, format!("({}", group.last_delivered_id), "+", 1)
                .query_async(&mut conn)
                .await?;
            if let StreamPendingReply::Data(data) = summary {
                oldest = Some(parse_stream_id(&data.start_id).0);
            }
            if let Some(entry) = next.ids.first() {
                let ms = parse_stream_id(&entry.id).0;
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
        let oldest_age = oldest.map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))).unwrap_or_default();
        Ok(QueueStats {
            open: open.unwrap_or(0).max(0) as u64,
            open_bytes: open_bytes.unwrap_or(0).max(0) as u64,
            stream_length,
            pending,
            lag,
            delayed,
            dead_letters,
            oldest_age,
        })
    }
}

/// Undelivered entries counted exactly for the lag gauge; beyond it the
/// figure is Redis's own (or this bound, if larger).
const LAG_COUNT_CAP: u64 = 1000;

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

    fn new_job() -> NewJob {
        NewJob {
            kind: "echo".into(),
            payload_json: "{}".into(),
            max_attempts: 3,
            timeout: Duration::from_secs(5),
            idempotency_key: None,
            owner: None,
            traceparent: None,
        }
    }

    /// The fencing rules of the scripts, step by step on a real Redis: a
    /// delivery that lost its entry can neither renew nor record, a repeated
    /// call is recognised, and only the current holder's outcome counts.
    #[tokio::test]
    async fn a_stale_delivery_can_neither_renew_nor_record() {
        let redis = shoal_testkit::RedisServer::start();
        let pool = deadpool_redis::Config::from_url(redis.url())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        let store = JobStore::new(pool, Keys::new("fence"), StoreConfig::default());
        store.ensure_group().await.unwrap();
        let SubmitOutcome::Created(_) = store.submit(&new_job()).await.unwrap() else { panic!("not created") };
        let (entry, id) = store.read_new("old", 1, Duration::from_millis(10)).await.unwrap().remove(0);
        let lease = |token: &str| Lease { entry: entry.clone(), id: id.clone(), token: token.into(), progress: 0 };

        let StartOutcome::Run(first) = store.start(&entry, &id, "old", "t-old").await.unwrap() else { panic!() };
        let StartOutcome::Run(again) = store.start(&entry, &id, "old", "t-old").await.unwrap() else { panic!() };
        assert_eq!((first.deliveries, again.deliveries), (1, 1), "a repeated START is the same delivery");
        assert_eq!(store.renew("old", &[lease("t-old")]).await.unwrap(), vec![LeaseStatus::Renewed]);

        // The lease lapses and another worker claims the entry: from then on
        // the old holder's renewal cannot take it back.
        let (claimed, _) = store.take_over("new", Duration::ZERO, 10, "0-0").await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(store.renew("old", &[lease("t-old")]).await.unwrap(), vec![LeaseStatus::Lost]);
        let StartOutcome::Run(current) = store.start(&entry, &id, "new", "t-new").await.unwrap() else { panic!() };
        assert_eq!((current.deliveries, current.attempts), (2, 0), "the lost delivery spent no attempt");
        assert_eq!(store.renew("old", &[lease("t-old")]).await.unwrap(), vec![LeaseStatus::Lost]);
        assert_eq!(store.renew("new", &[lease("t-new")]).await.unwrap(), vec![LeaseStatus::Renewed]);

        // The stale holder's outcomes change nothing.
        let stale = store.finish(&entry, &id, "t-old", JobState::Dead, "stale", true).await.unwrap();
        assert_eq!(stale, FinishOutcome::Stale);
        let retry = store.retry(&entry, &id, "t-old", "stale", Duration::from_millis(1)).await.unwrap();
        assert_eq!(retry, RetryOutcome::Stale);
        assert!(!store.hand_back(&entry, &id, "t-old").await.unwrap());
        assert_eq!(store.get(&id).await.unwrap().unwrap().state, JobState::Running);

        let done = store.finish(&entry, &id, "t-new", JobState::Succeeded, "42", true).await.unwrap();
        assert_eq!(done, FinishOutcome::Done);
        let replay = store.finish(&entry, &id, "t-new", JobState::Succeeded, "42", true).await.unwrap();
        assert_eq!(replay, FinishOutcome::Done, "a repeated FINISH is recognised");
        let record = store.get(&id).await.unwrap().unwrap();
        assert_eq!(record.state, JobState::Succeeded);
        assert_eq!(record.result_json.as_deref(), Some("42"));
        assert_eq!((record.attempts, record.deliveries), (1, 2));
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.open, stats.open_bytes, stats.pending), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_repeated_retry_is_recognised_and_due_by_redis_time() {
        let redis = shoal_testkit::RedisServer::start();
        let pool = deadpool_redis::Config::from_url(redis.url())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        let store = JobStore::new(pool, Keys::new("retry"), StoreConfig::default());
        store.ensure_group().await.unwrap();
        let SubmitOutcome::Created(job) = store.submit(&new_job()).await.unwrap() else { panic!("not created") };
        let (entry, id) = store.read_new("w", 1, Duration::from_millis(10)).await.unwrap().remove(0);
        let StartOutcome::Run(_) = store.start(&entry, &id, "w", "t").await.unwrap() else { panic!() };
        let delay = Duration::from_secs(60);
        let RetryOutcome::Scheduled(due) = store.retry(&entry, &id, "t", "boom", delay).await.unwrap() else {
            panic!()
        };
        assert_eq!(store.retry(&entry, &id, "t", "boom", delay).await.unwrap(), RetryOutcome::Scheduled(due));
        assert!(due >= job.created_ms + 60_000, "due {due} is 60 s after creation {} by Redis's clock", job.created_ms);
        let record = store.get(&id).await.unwrap().unwrap();
        assert_eq!((record.state, record.attempts, record.next_attempt_ms), (JobState::Queued, 1, Some(due)));
        assert_eq!(store.promote_due(10).await.unwrap(), 0, "not due yet");
    }

    #[test]
    fn stream_ids_order_numerically() {
        assert_eq!(successor("1700000000000-5"), "1700000000000-6");
        assert_eq!(successor("0-0"), "0-1");
        assert_eq!(min_id("10-2", "9-100"), "9-100");
        assert_eq!(min_id("10-2", "10-10"), "10-2");
    }
}
