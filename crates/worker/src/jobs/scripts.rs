//! The Lua scripts that make each state change atomic in Redis. Every script
//! that ends a delivery also acknowledges its stream entry, so "outcome
//! recorded" and "entry acknowledged" can never disagree.
//!
//! Three rules hold in every script:
//!
//! - **Redis's clock.** Every time the contract depends on (creation, start,
//!   end, retry due times, promotion) is read from Redis `TIME` inside the
//!   script, never from a worker's wall clock.
//! - **Fencing.** Each delivery carries a token (chosen by the worker at
//!   START, stored on the job). RENEW, FINISH, RETRY and HAND_BACK act only
//!   when the job's token is the caller's; otherwise they answer `STALE` or
//!   `LOST` and change nothing, so a worker that lost its lease can never
//!   overwrite the current holder's outcome or take its entry back.
//! - **Honest attempts.** `deliveries` counts STARTs; `attempts` counts runs
//!   of the job's code that ended (FINISH with `spent`, RETRY). A worker
//!   killed under a job, or a reply lost on the wire, spends a delivery and
//!   no attempt; a hand-back on shutdown spends neither.
//!
//! The scripts that free memory (ending, renewing, handing back) carry the
//! `allow-oom` flag: at Redis's `maxmemory` they still run, so jobs keep
//! finishing and memory comes back. SUBMIT has no flag and fails with `OOM`
//! before its first write.

use std::sync::LazyLock;

use redis::Script;

/// Functions shared by the scripts, prepended to each.
macro_rules! prelude {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%d', n) end
local function terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'dead' or state == 'cancelled'
end
-- Ends job `job` in `state`: its record and idempotency key expire, and it
-- leaves the open count and the open byte budget.
local function close(job, open, bytes, state, now)
  redis.call('HSET', job, 'state', state, 'finished_ms', now, 'updated_ms', now)
  redis.call('HDEL', job, 'next_attempt_ms', 'worker')
  local f = redis.call('HMGET', job, 'ttl', 'idem', 'idem_ttl', 'bytes')
  redis.call('EXPIRE', job, tonumber(f[1] or '604800'))
  if f[2] then redis.call('EXPIRE', f[2], tonumber(f[3] or f[1] or '604800')) end
  if redis.call('DECR', open) < 0 then redis.call('SET', open, 0) end
  if redis.call('DECRBY', bytes, tonumber(f[4] or '0')) < 0 then redis.call('SET', bytes, 0) end
end
"#
    };
}

/// Queues a job. KEYS: job, stream, open, idem, open bytes, job key prefix.
/// ARGV: id, kind, payload, max_attempts, timeout_ms, max_open, has_idem,
/// fingerprint, owner, max_deliveries, ttl_s, idem_ttl_s, max_open_bytes,
/// traceparent.
/// Returns `{"CREATED", id, now_ms}` (also for a replay of this same call:
/// the id is new per call), `{"EXISTS", id}`, `{"MISMATCH", id}`
/// (the key names a job with another fingerprint), `{"FULL", open}` or
/// `{"FULL_BYTES", bytes}`.
pub(crate) static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
-- This very call again (its reply was lost and the client retried it, as a
-- cluster connection does after a failover): the job exists already.
local created = redis.call('HGET', KEYS[1], 'created_ms')
if created then return {'CREATED', ARGV[1], created} end
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local id, fp = string.match(existing, '^(%S+) (%S+)$')
    if not id then id = existing end
    -- A key whose job expired is no key: the submission is new.
    if redis.call('EXISTS', KEYS[6] .. id) == 1 then
      if fp and fp ~= ARGV[8] then return {'MISMATCH', id} end
      return {'EXISTS', id}
    end
  end
end
local open = tonumber(redis.call('GET', KEYS[3]) or '0')
if open >= tonumber(ARGV[6]) then return {'FULL', tostring(open)} end
local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
local size = string.len(ARGV[3])
if bytes + size > tonumber(ARGV[13]) then return {'FULL_BYTES', fmt(bytes)} end
local now = fmt(now_ms())
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'payload', ARGV[3], 'state', 'queued',
  'attempts', 0, 'deliveries', 0, 'max_attempts', ARGV[4], 'max_deliveries', ARGV[10],
  'timeout_ms', ARGV[5], 'progress', 0, 'created_ms', now, 'updated_ms', now, 'cancel', 0,
  'completions', 0, 'bytes', size, 'ttl', ARGV[11])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[9]) end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'traceparent', ARGV[14]) end
if ARGV[7] == '1' then
  -- No expiry while the job is open; it expires with the record.
  redis.call('SET', KEYS[4], ARGV[1] .. ' ' .. ARGV[8])
  redis.call('HSET', KEYS[1], 'idem', KEYS[4], 'idem_ttl', ARGV[12])
end
redis.call('INCR', KEYS[3])
redis.call('INCRBY', KEYS[5], size)
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
return {'CREATED', ARGV[1], now}
"#
    ))
});

/// A delivery begins. KEYS: job, stream, open, open bytes. ARGV: group,
/// entry, consumer, token.
/// Returns `{"RUN", kind, payload, max_attempts, timeout_ms, attempts,
/// deliveries, max_deliveries, traceparent}` (`attempts` as spent before this
/// delivery), `{"CANCELLED"}` (a cancel was requested while it was queued:
/// now ended), `{"TERMINAL", state}`, `{"MISSING"}` (both acknowledged) or
/// `{"NOT_OURS"}` (another consumer holds the entry now).
pub(crate) static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local function run()
  local f = redis.call('HMGET', KEYS[1], 'kind', 'payload', 'max_attempts', 'timeout_ms',
    'attempts', 'deliveries', 'max_deliveries', 'traceparent')
  return {'RUN', f[1] or '', f[2] or 'null', f[3] or '1', f[4] or '0', f[5] or '0',
    f[6] or '1', f[7] or '0', f[8] or ''}
end
local f = redis.call('HMGET', KEYS[1], 'state', 'token', 'cancel')
local state = f[1]
if not state then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {'MISSING'}
end
if terminal(state) then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {'TERMINAL', state}
end
-- Our own START again (its reply was lost): the same delivery.
if state == 'running' and f[2] == ARGV[4] then return run() end
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return {'NOT_OURS'} end
local now = fmt(now_ms())
if f[3] == '1' then
  redis.call('HSET', KEYS[1], 'error', 'cancelled by client')
  close(KEYS[1], KEYS[3], KEYS[4], 'cancelled', now)
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {'CANCELLED'}
end
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'entry', ARGV[2], 'worker', ARGV[3],
  'token', ARGV[4], 'started_ms', now, 'updated_ms', now)
redis.call('HDEL', KEYS[1], 'next_attempt_ms')
return run()
"#
    ))
});

/// Records a terminal outcome of the delivery holding `token` and
/// acknowledges its entry. KEYS: job, stream, open, dead, open bytes.
/// ARGV: group, entry, token, state, text (result or error), spent (`1`: the
/// job's code ran, an attempt is spent), dead-letter cap, id.
/// Returns `"DONE"` (also for a replay of this same call), `"STALE"` (another
/// delivery holds the job, or it already ended: nothing changed) or
/// `"MISSING"`.
pub(crate) static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'token')
local state = f[1]
if not state then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'MISSING'
end
redis.call('HINCRBY', KEYS[1], 'completions', 1)
if f[2] ~= ARGV[3] then return 'STALE' end
if terminal(state) then
  redis.call('HINCRBY', KEYS[1], 'completions', -1)
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'DONE'
end
if state ~= 'running' then return 'STALE' end
local now = fmt(now_ms())
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if ARGV[4] == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result', ARGV[5])
  redis.call('HDEL', KEYS[1], 'error')
elseif ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
end
if ARGV[4] == 'dead' then
  local d = redis.call('HMGET', KEYS[1], 'kind', 'attempts', 'deliveries')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'job', ARGV[8], 'kind', d[1] or '',
    'error', ARGV[5], 'attempts', d[2] or '0', 'deliveries', d[3] or '0', 'at_ms', now)
end
close(KEYS[1], KEYS[3], KEYS[5], ARGV[4], now)
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return 'DONE'
"#
    ))
});

/// Schedules another attempt after the delivery holding `token` failed, and
/// acknowledges its entry. KEYS: job, stream, delayed. ARGV: group, entry,
/// token, error, delay_ms, id.
/// Returns `{"RETRY", due_ms}` (also for a replay), `{"CANCEL"}` (a cancel
/// was requested: finish it as cancelled instead), `{"STALE"}` or
/// `{"MISSING"}`.
pub(crate) static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'token', 'cancel', 'next_attempt_ms')
local state = f[1]
if not state then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {'MISSING'}
end
if f[2] ~= ARGV[3] then return {'STALE'} end
if state == 'queued' and f[4] then return {'RETRY', f[4]} end
if state ~= 'running' then return {'STALE'} end
if f[3] == '1' then return {'CANCEL'} end
local now = now_ms()
local due = fmt(now + tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'error', ARGV[4], 'next_attempt_ms', due,
  'updated_ms', fmt(now))
redis.call('HDEL', KEYS[1], 'entry', 'worker')
redis.call('ZADD', KEYS[3], due, ARGV[6])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return {'RETRY', due}
"#
    ))
});

/// Moves due retries back into the stream. KEYS: stream, delayed. ARGV:
/// limit. Returns how many moved.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(now_ms()), 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('XADD', KEYS[1], '*', 'job', id)
end
return #ids
"#
    ))
});

/// Cancels a job. KEYS: job, open, delayed, open bytes. ARGV: id, owner (``
/// = any).
/// Returns `{"CANCELLED"}` (it was queued: now ended), `{"REQUESTED"}` (it is
/// running: the holder stops it), `{"TERMINAL", state}` or `{"MISSING"}`
/// (also for a job of another owner).
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
local state = f[1]
if not state then return {'MISSING'} end
if ARGV[2] ~= '' and f[2] ~= ARGV[2] then return {'MISSING'} end
if terminal(state) then return {'TERMINAL', state} end
local now = fmt(now_ms())
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1, 'updated_ms', now)
  return {'REQUESTED'}
end
redis.call('HSET', KEYS[1], 'cancel', 1, 'error', 'cancelled by client')
redis.call('ZREM', KEYS[3], ARGV[1])
close(KEYS[1], KEYS[2], KEYS[4], 'cancelled', now)
return {'CANCELLED'}
"#
    ))
});

/// Hands a delivery back on shutdown: the job is queued again and its entry
/// made claimable by any worker at once (reassigned to a consumer that
/// never reads, with a huge idle time). The interrupted delivery costs
/// neither an attempt nor a delivery. KEYS: job, stream. ARGV: group, entry,
/// token. Returns `"OK"` or `"STALE"`.
pub(crate) static HAND_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        prelude!(),
        r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'token')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 'STALE' end
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_ms', fmt(now_ms()))
redis.call('HDEL', KEYS[1], 'worker')
redis.call('XCLAIM', KEYS[2], ARGV[1], 'handed-back', 0, ARGV[2], 'IDLE', 2147483647, 'JUSTID')
return 'OK'
"#
    ))
});

/// Renews the lease of one delivery: only while the job is still `running`
/// under `token` and the entry is still held by `consumer`; resets the
/// entry's idle time and stores progress. KEYS: job, stream. ARGV: group,
/// entry, consumer, token, progress.
/// Returns `"OK"`, `"CANCEL"` (renewed; a cancel was requested) or `"LOST"`
/// (another delivery holds the job: stop, record nothing).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua flags=allow-oom\n",
        r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'token', 'cancel')
if f[1] ~= 'running' or f[2] ~= ARGV[4] then return 'LOST' end
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return 'LOST' end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
redis.call('HSET', KEYS[1], 'progress', ARGV[5])
if f[3] == '1' then return 'CANCEL' end
return 'OK'
"#
    ))
});

/// The consumer group's lag (entries not yet delivered), counted: Redis's
/// own `lag` (entries added minus entries read) can be wrong after a
/// failover (a promoted replica's group counters), so up to `cap` entries
/// after the last delivered one are counted, and a wrong counter is set
/// right (`XGROUP SETID` to the same id with the counted `ENTRIESREAD`,
/// which never moves the group). Beyond `cap`, Redis's figure is used if
/// larger. KEYS: stream. ARGV: group, cap. Returns `{lag, repaired}`
/// (`lag` -1: no group).
pub(crate) static LAG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local last, reported
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then last = f['last-delivered-id']; reported = f['lag'] end
end
if not last then return {-1, 0} end
local cap = tonumber(ARGV[2])
local n = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', cap + 1)
if n > cap then
  if reported and reported > n then return {reported, 0} end
  return {n, 0}
end
if reported == n then return {n, 0} end
local added
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do if info[i] == 'entries-added' then added = info[i + 1] end end
if not added then return {n, 0} end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added - n)
return {n, 1}
"#,
    )
});
