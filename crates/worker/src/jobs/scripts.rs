//! The Lua scripts that make each state change atomic in Redis. Every script
//! that ends a delivery also acknowledges its stream entry, so "outcome
//! recorded" and "entry acknowledged" can never disagree.

use std::sync::LazyLock;

use redis::Script;

/// KEYS: job, stream, open, idem. ARGV: id, kind, payload, max_attempts,
/// timeout_ms, now_ms, max_open, idem_ttl_s, has_idem.
/// Returns `{"CREATED", id}`, `{"EXISTS", id}` or `{"FULL", open}`.
pub(crate) static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[9] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'EXISTS', existing} end
end
local open = tonumber(redis.call('GET', KEYS[3]) or '0')
if open >= tonumber(ARGV[7]) then return {'FULL', tostring(open)} end
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'payload', ARGV[3], 'state', 'queued',
  'attempts', 0, 'max_attempts', ARGV[4], 'timeout_ms', ARGV[5], 'progress', 0,
  'created_ms', ARGV[6], 'updated_ms', ARGV[6], 'cancel', 0, 'completions', 0)
if ARGV[9] == '1' then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[8])
end
redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
return {'CREATED', ARGV[1]}
"#,
    )
});

/// A delivery begins. KEYS: job. ARGV: entry, consumer, now_ms.
/// Returns `{"RUN", attempts, kind, payload, max_attempts, timeout_ms}`,
/// `{"CANCEL"}` (cancel was requested while queued), `{"TERMINAL", state}` or
/// `{"MISSING"}`.
pub(crate) static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'MISSING'} end
if state ~= 'queued' and state ~= 'running' then return {'TERMINAL', state} end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {'CANCEL'} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'entry', ARGV[1], 'worker', ARGV[2],
  'started_ms', ARGV[3], 'updated_ms', ARGV[3])
redis.call('HDEL', KEYS[1], 'next_attempt_ms')
local f = redis.call('HMGET', KEYS[1], 'kind', 'payload', 'max_attempts', 'timeout_ms')
return {'RUN', tostring(attempts), f[1], f[2], f[3] or '1', f[4] or '0'}
"#,
    )
});

/// Records a terminal outcome and acknowledges the entry, once.
/// KEYS: job, stream, open, dead. ARGV: group, entry, state, text (result or
/// error), now_ms, ttl_s, id.
/// Returns `"DONE"`, `"ALREADY"` or `"MISSING"`.
pub(crate) static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[2] ~= '' then redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
redis.call('HINCRBY', KEYS[1], 'completions', 1)
if state == 'succeeded' or state == 'failed' or state == 'dead' or state == 'cancelled' then
  return 'ALREADY'
end
if ARGV[3] == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result', ARGV[4])
  redis.call('HDEL', KEYS[1], 'error')
elseif ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
if ARGV[3] == 'dead' then
  local f = redis.call('HMGET', KEYS[1], 'kind', 'attempts')
  redis.call('XADD', KEYS[4], '*', 'job', ARGV[7], 'kind', f[1] or '', 'error', ARGV[4],
    'attempts', f[2] or '0', 'at_ms', ARGV[5])
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_ms', ARGV[5], 'updated_ms', ARGV[5])
redis.call('HDEL', KEYS[1], 'next_attempt_ms', 'entry', 'worker')
redis.call('EXPIRE', KEYS[1], ARGV[6])
local open = redis.call('DECR', KEYS[3])
if open < 0 then redis.call('SET', KEYS[3], 0) end
return 'DONE'
"#,
    )
});

/// Schedules a retry after a failed attempt and acknowledges the entry.
/// KEYS: job, stream, delayed. ARGV: group, entry, error, due_ms, now_ms, id.
/// Returns `"RETRY"`, `"CANCEL"` (a cancel was requested: finish it as
/// cancelled instead), `"ALREADY"` or `"MISSING"`.
pub(crate) static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'MISSING'
end
if state == 'succeeded' or state == 'failed' or state == 'dead' or state == 'cancelled' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'ALREADY'
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'CANCEL' end
redis.call('HSET', KEYS[1], 'state', 'queued', 'error', ARGV[3], 'next_attempt_ms', ARGV[4],
  'updated_ms', ARGV[5])
redis.call('HDEL', KEYS[1], 'entry', 'worker')
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return 'RETRY'
"#,
    )
});

/// Moves due retries back into the stream. KEYS: stream, delayed, job key
/// prefix (`{p}:job:`). ARGV: now_ms, limit. Returns how many moved.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('XADD', KEYS[1], '*', 'job', id)
end
return #ids
"#,
    )
});

/// Cancels a job. KEYS: job, open, delayed. ARGV: id, now_ms, ttl_s.
/// Returns `{"CANCELLED"}` (it was queued: now terminal), `{"REQUESTED"}`
/// (it is running: the holder stops it), `{"TERMINAL", state}` or
/// `{"MISSING"}`.
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'MISSING'} end
if state == 'succeeded' or state == 'failed' or state == 'dead' or state == 'cancelled' then
  return {'TERMINAL', state}
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1, 'updated_ms', ARGV[2])
  return {'REQUESTED'}
end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel', 1, 'finished_ms', ARGV[2], 'updated_ms', ARGV[2])
redis.call('HDEL', KEYS[1], 'next_attempt_ms')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local open = redis.call('DECR', KEYS[2])
if open < 0 then redis.call('SET', KEYS[2], 0) end
return {'CANCELLED'}
"#,
    )
});

/// Hands a job back on shutdown: queued again, its entry claimable at once.
/// KEYS: job. ARGV: now_ms. Returns `"OK"` or the terminal/missing state.
pub(crate) static HAND_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' then return state or 'MISSING' end
-- The attempt did not fail: it was interrupted by us, so it does not count.
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_ms', ARGV[1])
redis.call('HDEL', KEYS[1], 'worker')
return 'OK'
"#,
    )
});
