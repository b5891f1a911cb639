//! Group commit for the job scripts: calls made at the same moment by many
//! tasks (submissions, starts, outcomes) share one pipelined round trip to
//! Redis. Under light load a batch is one call and adds no latency; under
//! heavy load batches grow by themselves, up to [`MAX_BATCH`].
//!
//! Each script stays atomic on its own; a batch only saves round trips. Every
//! batch loads its scripts first (`SCRIPT LOAD` is idempotent), so a Redis
//! that restarted and lost its script cache never fails a call.

use redis::{Script, ToRedisArgs, Value};
use tokio::sync::{mpsc, oneshot};

use super::connection::RedisPool as Pool;
use super::store::StoreError;

/// Most calls in one pipeline.
const MAX_BATCH: usize = 256;
/// Calls waiting for a batch; beyond it callers wait (backpressure).
const QUEUE: usize = 4096;

/// One script invocation, owned so it can wait in the queue.
pub(crate) struct Call {
    script: &'static Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Call {
    pub(crate) fn new(script: &'static Script) -> Self {
        Self { script, keys: Vec::with_capacity(4), args: Vec::with_capacity(12) }
    }

    pub(crate) fn key(mut self, key: String) -> Self {
        self.keys.push(key);
        self
    }

    pub(crate) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }
}

type Reply = oneshot::Sender<Result<Value, StoreError>>;

/// The handle to a batching task; cheap to clone. The task ends when every
/// handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    queue: mpsc::Sender<(Call, Reply)>,
}

impl Batcher {
    /// Starts the batching task on the current Tokio runtime.
    pub(crate) fn spawn(pool: Pool) -> Self {
        let (queue, calls) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, calls));
        Self { queue }
    }

    /// Runs `call` in the next batch and returns its reply.
    pub(crate) async fn call(&self, call: Call) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((call, reply)).await.map_err(|_| StoreError::Protocol("batcher stopped".into()))?;
        answer.await.map_err(|_| StoreError::Protocol("batcher dropped a call".into()))?
    }
}

async fn run(pool: Pool, mut calls: mpsc::Receiver<(Call, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = calls.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that stopped waiting (the API's deadline answered
        // "unavailable, retry") must not have its call run after all: a
        // retried submission would make a second job.
        batch.retain(|(_, reply): &(Call, Reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        match pipeline(&pool, batch.iter().map(|(call, _)| call)).await {
            Ok(values) if values.len() == batch.len() => {
                for ((_, reply), value) in batch.drain(..).zip(values) {
                    let _ = reply.send(value.map_err(StoreError::Redis));
                }
            }
            Ok(values) => {
                let message = format!("pipeline answered {} replies for {} calls", values.len(), batch.len());
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Protocol(message.clone())));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Batch(message.clone())));
                }
            }
        }
    }
}

/// Runs `calls` in one pipelined round trip on a connection from `pool`
/// (loading their scripts first) and returns one reply per call. A call's
/// own error (Redis's `OOM` for a submission, say) is that call's reply
/// only: the other calls of the batch are not failed with it.
pub(crate) async fn pipeline<'a>(
    pool: &Pool,
    calls: impl Iterator<Item = &'a Call> + Clone,
) -> Result<Vec<redis::RedisResult<Value>>, StoreError> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut loaded: Vec<&'static Script> = Vec::with_capacity(4);
    for call in calls.clone() {
        if !loaded.iter().any(|script| std::ptr::eq(*script, call.script)) {
            loaded.push(call.script);
            pipe.load_script(call.script).ignore();
        }
    }
    for call in calls {
        let mut invocation = call.script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in &call.args {
            invocation.arg(arg.as_slice());
        }
        pipe.invoke_script(&invocation);
    }
    let mut conn = pool.get().await?;
    Ok(pipe.query_async(&mut conn).await?)
}
