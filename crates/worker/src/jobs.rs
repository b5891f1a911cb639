//! Durable jobs: the queue, job state, execution, leases, retries and dead
//! letters, all in Redis. The worker is the only service that touches these
//! keys; the gateway reaches them through the worker's gRPC API.
//!
//! # Delivery contract
//!
//! - A job accepted by [`JobStore::submit`] (HTTP `202`) is in Redis before
//!   the call returns: the job hash and its stream entry are written by one
//!   Lua script, so it is never half-created. With `appendonly yes` and
//!   `appendfsync always` (or `everysec`, losing at most a second of
//!   acknowledgements on a power cut) it survives a Redis restart.
//! - Execution is at-least-once: a stream entry is acknowledged (`XACK`) only
//!   by the same script that records the job's outcome. A worker that dies
//!   holds its entries in the consumer group's pending list; its lease (the
//!   entry's idle time, renewed while the job runs) lapses and the reaper of
//!   any live worker takes the entry over with `XAUTOCLAIM` within
//!   `lease + reaper interval` (5 s + 1 s by default).
//! - Leases are fenced: each delivery has a token; renewal and every outcome
//!   act only for the current token, so a worker that lost its lease learns
//!   it at its next renewal, stops, and can never overwrite the current
//!   holder's outcome ([`scripts`](self) documents the rules).
//! - Attempts count runs of the job's code that ended; a lost worker or a
//!   lost reply spends a delivery, bounded separately (`max_deliveries`).
//! - Recording an outcome is idempotent: the first terminal outcome wins and
//!   later ones (a job executed twice) change nothing.
//! - A failing attempt is retried with exponential backoff and full jitter;
//!   after `max_attempts` the job is `dead`: its last error is recorded and a
//!   copy goes to the dead-letter stream.
//! - On SIGTERM a worker stops reading, lets running jobs finish within its
//!   grace, and hands the rest back (their entries become claimable at once).
//!
//! # Key layout (hash tag `{shoal}` by default, `--redis-prefix`: one Cluster slot per queue)
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p}:jobs` | stream, group `workers` | one entry per delivery of a job: field `job` = id |
//! | `{p}:job:{id}` | hash | the job: kind, payload, state, attempts, result/error, times; expires `--job-ttl` after it ends |
//! | `{p}:idem:{key}` | string | `{id} {fingerprint}` for an `Idempotency-Key` (`{p}:idemo:{owner hash}:{key}` with an owner); expires with the job's record |
//! | `{p}:delayed` | sorted set | job ids waiting for a retry, scored by due time (ms) |
//! | `{p}:dead` | stream | dead letters: `job`, `kind`, `error`, `attempts` |
//! | `{p}:open` | string (counter) | jobs not yet in a terminal state: the queue bound |
//! | `{p}:open_bytes` | string (counter) | their payload bytes: the byte budget |

mod api;
mod batch;
mod connection;
mod executor;
mod keys;
pub mod migrate;
mod model;
mod scripts;
mod store;

pub use api::{JobsApi, MAX_BATCH_JOBS};
pub use connection::{Connection, PoolSettings, RedisPool, Topology, UrlError};
pub use executor::{JobRunner, RunnerConfig, RunnerStats};
pub use keys::Keys;
pub use model::{JobId, JobRecord, JobState, NewJob, ParseJobIdError};
pub use store::{CancelOutcome, JobStore, QueueStats, StoreConfig, StoreError, SubmitOutcome};
