//! Upgrading a Redis that holds jobs under the key names of releases before
//! the hash tag (`shoal:jobs`, `shoal:job:{id}`, …) to `{shoal}:…`.
//!
//! A worker never runs jobs while keys of the old layout exist: it would
//! leave the jobs queued there unrun. Without `--redis-migrate-legacy-keys`
//! it stays not ready (condition `legacy-keys`), logs why every 30 s and
//! checks again every 5 s, so a rolling update halts with the old workers
//! still serving and nothing is lost. With the flag it moves everything
//! first, merging into what the new layout already holds (submissions a new
//! worker accepted meanwhile):
//!
//! 1. job records and idempotency keys are renamed (`RENAMENX`, keeping
//!    their expiry; a record's `idem` field is rewritten);
//! 2. the open counters are added, the delayed set merged, dead letters
//!    copied;
//! 3. last, every stream entry not yet acknowledged (pending or never
//!    delivered) becomes a new entry of the new stream, so a job's record
//!    is always in place before a worker can read its entry. An entry held
//!    by a dead old worker is simply delivered again (a delivery, no
//!    attempt).
//!
//! Each step is one atomic script per key and skips what is done, so a
//! migration that was interrupted, or runs on several workers at once, is
//! safe to run again. It refuses to start while a consumer of the old
//! stream was active in the last [`OLD_WORKER_IDLE`]: an old worker still
//! running would keep writing to the old names.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands as _, Script};
use shoal_service::admin::Readiness;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::store::{JobStore, StoreError};

/// A consumer of the old stream seen this recently counts as an old worker
/// still running.
pub const OLD_WORKER_IDLE: Duration = Duration::from_secs(10);

/// What a migration moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    pub jobs: u64,
    pub idempotency_keys: u64,
    pub entries: u64,
    pub delayed: u64,
    pub dead_letters: u64,
}

/// Why a migration did not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("an older worker still uses the old key names (consumer `{consumer}` active {idle_ms} ms ago); stop it")]
    OldWorkerRunning { consumer: String, idle_ms: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Renames one key if the new name is free; rewrites a job record's `idem`
/// field. KEYS: old, new. ARGV: old base, new base. Returns 1 when moved.
static RENAME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('RENAMENX', KEYS[1], KEYS[2]) == 0 then return 0 end
if redis.call('TYPE', KEYS[2])['ok'] == 'hash' then
  local idem = redis.call('HGET', KEYS[2], 'idem')
  if idem and string.sub(idem, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
    redis.call('HSET', KEYS[2], 'idem', ARGV[2] .. string.sub(idem, #ARGV[1] + 1))
  end
end
return 1
"#,
    )
});

/// Adds a counter into its new name. KEYS: old, new.
static ADD_COUNTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
redis.call('INCRBY', KEYS[2], tonumber(old))
redis.call('DEL', KEYS[1])
return 1
"#,
    )
});

/// Merges the delayed set (earliest due time wins). KEYS: old, new.
static MERGE_DELAYED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then return 0 end
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MIN')
redis.call('DEL', KEYS[1])
return n
"#,
    )
});

/// Copies the dead letters. KEYS: old, new.
static COPY_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, e in ipairs(entries) do redis.call('XADD', KEYS[2], '*', unpack(e[2])) end
redis.call('DEL', KEYS[1])
return #entries
"#,
    )
});

/// Moves every entry not yet acknowledged (pending, or after the group's
/// last delivered id) to the new stream. KEYS: old, new. ARGV: group.
static MOVE_ENTRIES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = '0-0'
local ids = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then
    last = f['last-delivered-id']
    for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100000000)) do
      table.insert(ids, p[1])
    end
  end
end
local moved = 0
local function move(e)
  redis.call('XADD', KEYS[2], '*', unpack(e[2]))
  moved = moved + 1
end
for _, id in ipairs(ids) do
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], id, id)) do move(e) end
end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+')) do move(e) end
redis.call('DEL', KEYS[1])
return moved
"#,
    )
});

fn glob_escape(text: &str) -> String {
    text.chars().fold(String::new(), |mut out, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

impl JobStore {
    /// Whether keys of the old layout exist under this prefix (the stream,
    /// a counter, the delayed set or the dead letters). One key per call,
    /// so it also works on a cluster.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn has_legacy_keys(&self) -> Result<bool, StoreError> {
        let legacy = self.legacy_keys();
        let mut conn = self.connection().await?;
        for key in [legacy.stream(), legacy.open(), legacy.delayed(), legacy.dead()] {
            if conn.exists::<_, bool>(&key).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn legacy_keys(&self) -> Keys {
        let tagged = self.keys().base();
        Keys::legacy(tagged.trim_start_matches('{').trim_end_matches('}'))
    }

    /// Moves every job of the old layout to the new one (see the
    /// [module docs](self)); a no-op when there is none. Single Redis
    /// (or Sentinel) only: the old names span many cluster slots.
    ///
    /// # Errors
    ///
    /// [`MigrateError::OldWorkerRunning`] when a consumer of the old stream
    /// was active less than `old_worker_idle` ago; [`StoreError`] when Redis
    /// fails (run it again: every step is idempotent).
    pub async fn migrate_legacy_keys(&self, old_worker_idle: Duration) -> Result<Migrated, MigrateError> {
        let old = self.legacy_keys();
        let new = self.keys().clone();
        let mut conn = self.connection().await?;
        let mut migrated = Migrated::default();
        if conn.exists::<_, bool>(old.stream()).await.map_err(StoreError::from)? {
            let consumers: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
                conn.xinfo_consumers(old.stream(), Keys::GROUP).await;
            for consumer in consumers.map(|r| r.consumers).unwrap_or_default() {
                if consumer.name != "handed-back" && (consumer.idle as u64) < old_worker_idle.as_millis() as u64 {
                    return Err(MigrateError::OldWorkerRunning {
                        consumer: consumer.name,
                        idle_ms: consumer.idle as u64,
                    });
                }
            }
        }
        self.ensure_group().await?;
        let base = |k: &Keys| k.base().to_owned();
        for (pattern, is_job) in [
            (format!("{}:job:*", glob_escape(old.base())), true),
            (format!("{}:idem:*", glob_escape(old.base())), false),
            (format!("{}:idemo:*", glob_escape(old.base())), false),
        ] {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(StoreError::from)?;
                for key in keys {
                    let target = format!("{}{}", new.base(), &key[old.base().len()..]);
                    let moved: u64 = RENAME
                        .key(&key)
                        .key(&target)
                        .arg(base(&old))
                        .arg(base(&new))
                        .invoke_async(&mut conn)
                        .await
                        .map_err(StoreError::from)?;
                    if is_job {
                        migrated.jobs += moved;
                    } else {
                        migrated.idempotency_keys += moved;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        for (from, to) in [(old.open(), new.open()), (old.open_bytes(), new.open_bytes())] {
            let _: u64 = ADD_COUNTER.key(from).key(to).invoke_async(&mut conn).await.map_err(StoreError::from)?;
        }
        migrated.delayed = MERGE_DELAYED
            .key(old.delayed())
            .key(new.delayed())
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        migrated.dead_letters =
            COPY_DEAD.key(old.dead()).key(new.dead()).invoke_async(&mut conn).await.map_err(StoreError::from)?;
        migrated.entries = MOVE_ENTRIES
            .key(old.stream())
            .key(new.stream())
            .arg(Keys::GROUP)
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok(migrated)
    }
}

/// Holds a worker back from running jobs while keys of the old layout
/// exist (see the [module docs](self)); migrates them when `migrate`.
/// Returns `false` when `stop` fired first.
pub async fn prepare(store: &JobStore, migrate: bool, readiness: &Readiness, stop: &CancellationToken) -> bool {
    let mut last_report: Option<tokio::time::Instant> = None;
    while !stop.is_cancelled() {
        let wait = match store.has_legacy_keys().await {
            Ok(false) => {
                readiness.set("legacy-keys", true);
                return true;
            }
            Ok(true) if migrate => match store.migrate_legacy_keys(OLD_WORKER_IDLE).await {
                Ok(migrated) => {
                    tracing::info!(
                        jobs = migrated.jobs,
                        idempotency_keys = migrated.idempotency_keys,
                        entries = migrated.entries,
                        delayed = migrated.delayed,
                        dead_letters = migrated.dead_letters,
                        "jobs moved to the hash-tagged key names"
                    );
                    continue;
                }
                Err(error) => {
                    tracing::warn!(error = &error as &dyn std::error::Error, "cannot migrate the old job keys yet");
                    Duration::from_secs(2)
                }
            },
            Ok(true) => {
                readiness.set("legacy-keys", false);
                if last_report.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                    last_report = Some(tokio::time::Instant::now());
                    tracing::error!(
                        old = %store.legacy_keys().stream(),
                        new = %store.keys().stream(),
                        "redis holds jobs under the old key names; not running jobs until they are migrated \
                         (stop the older workers, then start one with --redis-migrate-legacy-keys)"
                    );
                }
                Duration::from_secs(5)
            }
            // Redis unreachable: the read loop's own backoff reports it later.
            Err(_) => Duration::from_secs(1),
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobState, NewJob};
    use crate::jobs::store::{FinishOutcome, StartOutcome, StoreConfig, SubmitOutcome};

    fn new_job(key: Option<&str>) -> NewJob {
        NewJob {
            kind: "echo".into(),
            payload_json: "{}".into(),
            max_attempts: 3,
            timeout: Duration::from_secs(5),
            idempotency_key: key.map(str::to_owned),
            owner: None,
            traceparent: None,
        }
    }

    fn pool(redis: &shoal_testkit::RedisServer) -> deadpool_redis::Pool {
        deadpool_redis::Config::from_url(redis.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("pool")
    }

    async fn created(store: &JobStore, key: Option<&str>) -> crate::jobs::JobId {
        match store.submit(&new_job(key)).await.unwrap() {
            SubmitOutcome::Created(job) => job.id,
            other => panic!("{other:?}"),
        }
    }

    /// A queue written by an old release (the same scripts under untagged
    /// names): queued, running under a dead worker, waiting for a retry and
    /// dead jobs, idempotency keys; plus a job the new layout accepted
    /// before the migration. Everything is there afterwards, once.
    #[tokio::test]
    async fn a_queue_of_the_old_layout_moves_over_with_nothing_lost() {
        let redis = shoal_testkit::RedisServer::start();
        let old = JobStore::new(pool(&redis), Keys::legacy("mig"), StoreConfig::default());
        let new = JobStore::new(pool(&redis), Keys::new("mig"), StoreConfig::default());
        old.ensure_group().await.unwrap();
        let keyed = created(&old, Some("k1")).await;
        let mut ids = vec![keyed.clone()];
        for _ in 0..4 {
            ids.push(created(&old, None).await);
        }
        // Two delivered to a worker that then died; one of them failed once
        // and waits for a retry; a third ends dead.
        let read = old.read_new("old-worker", 3, Duration::from_millis(10)).await.unwrap();
        for (entry, id) in &read {
            assert!(matches!(old.start(entry, id, "old-worker", "t").await.unwrap(), StartOutcome::Run(_)));
        }
        old.retry(&read[1].0, &read[1].1, "t", "boom", Duration::from_secs(600)).await.unwrap();
        old.finish(&read[2].0, &read[2].1, "t", JobState::Dead, "gone", true).await.unwrap();
        let before = old.stats().await.unwrap();
        assert_eq!((before.open, before.lag, before.pending, before.delayed, before.dead_letters), (4, 2, 1, 1, 1));
        let fresh = created(&new, None).await;

        assert!(new.has_legacy_keys().await.unwrap());
        let refused = new.migrate_legacy_keys(Duration::from_secs(600)).await.unwrap_err();
        assert!(matches!(&refused, MigrateError::OldWorkerRunning { consumer, .. } if consumer == "old-worker"));

        let migrated = new.migrate_legacy_keys(Duration::ZERO).await.unwrap();
        assert_eq!(
            migrated,
            Migrated { jobs: 5, idempotency_keys: 1, entries: 3, delayed: 1, dead_letters: 1 },
            "three entries: two never delivered, one pending under the dead worker"
        );
        assert!(!new.has_legacy_keys().await.unwrap());
        assert_eq!(new.migrate_legacy_keys(Duration::ZERO).await.unwrap(), Migrated::default(), "a re-run is a no-op");
        let after = new.stats().await.unwrap();
        assert_eq!((after.open, after.lag, after.pending, after.delayed, after.dead_letters), (5, 4, 0, 1, 1));
        // The idempotency key still names its job, under the new names.
        assert_eq!(new.submit(&new_job(Some("k1"))).await.unwrap(), SubmitOutcome::Existing(keyed.clone()));

        // A new worker runs every job that was queued or held.
        let mut ran = Vec::new();
        for (entry, id) in new.read_new("new-worker", 10, Duration::from_millis(10)).await.unwrap() {
            let StartOutcome::Run(delivery) = new.start(&entry, &id, "new-worker", "t2").await.unwrap() else {
                panic!("{id} cannot start")
            };
            assert_eq!(
                new.finish(&entry, &id, "t2", JobState::Succeeded, "1", true).await.unwrap(),
                FinishOutcome::Done
            );
            ran.push((id, delivery.deliveries));
        }
        assert_eq!(read[0].1, ids[0]);
        let mut expected: Vec<_> = [&ids[0], &ids[3], &ids[4], &fresh].into_iter().cloned().collect();
        expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut got: Vec<_> = ran.iter().map(|(id, _)| id.clone()).collect();
        got.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(got, expected);
        assert!(ran.iter().any(|(id, deliveries)| *id == read[0].1 && *deliveries == 2), "the held job is redelivered");
        let done = new.stats().await.unwrap();
        assert_eq!((done.open, done.delayed), (1, 1), "only the job waiting for its retry is open");
    }
}
