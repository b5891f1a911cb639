//! The job queue's delivery contract, against a real redis-server: the store
//! and the executor as a worker uses them, without gRPC.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use shoal_testkit::{RedisServer, eventually};
use shoal_worker::jobs::{
    CancelOutcome, JobId, JobRecord, JobRunner, JobState, JobStore, Keys, NewJob, RunnerConfig, RunnerStats,
    StoreConfig, SubmitOutcome,
};
use shoal_worker::{Task, TaskContext, TaskError, TaskRegistry};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn store(redis: &RedisServer, max_open: u64) -> JobStore {
    let pool =
        deadpool_redis::Config::from_url(redis.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("pool");
    JobStore::new(
        pool,
        Keys::new(format!("t{}", rand_suffix())),
        StoreConfig {
            job_ttl: Duration::from_secs(600),
            idempotency_ttl: Duration::from_secs(600),
            max_open,
            ..StoreConfig::default()
        },
    )
}

fn rand_suffix() -> u32 {
    std::process::id() ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos())
}

fn job(kind: &str, payload: &str, max_attempts: u32) -> NewJob {
    NewJob {
        kind: kind.into(),
        payload_json: payload.into(),
        max_attempts,
        timeout: Duration::from_secs(30),
        idempotency_key: None,
        owner: None,
        traceparent: None,
    }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<RunnerStats>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("runner stops").expect("no panic");
    }

    /// Like `kill -9` for the runner: no hand-back, no acknowledgements.
    fn kill(self) {
        self.task.abort();
    }
}

fn start_runner(store: &JobStore, consumer: &str, slots: usize, grace: Duration) -> Running {
    start_runner_with(store, consumer, slots, grace, TaskRegistry::builtin())
}

fn start_runner_with(
    store: &JobStore,
    consumer: &str,
    slots: usize,
    grace: Duration,
    registry: TaskRegistry,
) -> Running {
    shoal_telemetry::init_for_tests();
    let runner = JobRunner::new(
        store.clone(),
        registry,
        RunnerConfig {
            consumer: consumer.into(),
            slots,
            lease: Duration::from_millis(1500),
            reaper_interval: Duration::from_millis(200),
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
            max_result_bytes: 1024 * 1024,
        },
    );
    let stats = runner.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone(), grace));
    Running { stop, task, stats }
}

async fn created(store: &JobStore, new: &NewJob) -> JobId {
    match store.submit(new).await.expect("submit") {
        SubmitOutcome::Created(record) => record.id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

async fn terminal(store: &JobStore, id: &JobId, within: Duration) -> JobRecord {
    eventually(within, "job reaches a terminal state", || async {
        store.get(id).await.ok().flatten().filter(|job| job.state.is_terminal())
    })
    .await
}

#[tokio::test]
async fn a_job_runs_once_and_records_its_result() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let runner = start_runner(&store, "w1", 4, Duration::from_secs(5));
    let id = created(&store, &job("echo", r#"{"hello":"jobs"}"#, 3)).await;
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result_json.as_deref(), Some(r#"{"hello":"jobs"}"#));
    assert_eq!(done.attempts, 1);
    assert_eq!(done.completions, 1);
    assert!(done.finished_ms.is_some() && done.started_ms.is_some());
    assert_eq!(store.stats().await.unwrap().open, 0);
    runner.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_gives_the_same_job() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let mut new = job("echo", "{}", 1);
    new.idempotency_key = Some("order-42".into());
    let first = created(&store, &new).await;
    assert_eq!(store.submit(&new).await.unwrap(), SubmitOutcome::Existing(first.clone()));
    assert_eq!(store.stats().await.unwrap().open, 1, "no second job was queued");
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let redis = RedisServer::start();
    let store = store(&redis, 2);
    created(&store, &job("echo", "{}", 1)).await;
    created(&store, &job("echo", "{}", 1)).await;
    assert_eq!(store.submit(&job("echo", "{}", 1)).await.unwrap(), SubmitOutcome::Full { open: 2 });
}

#[tokio::test]
async fn a_poison_job_is_dead_lettered_after_its_attempts() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let runner = start_runner(&store, "w1", 2, Duration::from_secs(5));
    let id = created(&store, &job("fail", r#"{"error":"boom"}"#, 3)).await;
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Dead);
    assert_eq!(done.attempts, 3);
    assert!(done.error.as_deref().unwrap_or_default().contains("boom"), "{done:?}");
    assert_eq!(store.stats().await.unwrap().dead_letters, 1);
    assert_eq!(runner.stats.retried.load(Ordering::Relaxed), 2);
    runner.stop().await;
}

#[tokio::test]
async fn an_invalid_payload_fails_without_retries() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let runner = start_runner(&store, "w1", 2, Duration::from_secs(5));
    let id = created(&store, &job("sleep", r#"{"ms":"soon"}"#, 5)).await;
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.attempts, 1);
    let error = done.error.unwrap_or_default();
    assert!(error.contains("invalid"), "{error}");
    runner.stop().await;
}

#[tokio::test]
async fn cancelling_a_queued_or_running_job_stops_it() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let queued = created(&store, &job("echo", "{}", 1)).await;
    assert_eq!(store.cancel(&queued, None).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(store.cancel(&queued, None).await.unwrap(), CancelOutcome::AlreadyEnded(JobState::Cancelled));

    let runner = start_runner(&store, "w1", 2, Duration::from_secs(5));
    let running = created(&store, &job("sleep", r#"{"ms":60000}"#, 3)).await;
    eventually(Duration::from_secs(5), "job starts", || async {
        store.get(&running).await.ok().flatten().filter(|j| j.state == JobState::Running)
    })
    .await;
    assert_eq!(store.cancel(&running, None).await.unwrap(), CancelOutcome::Requested);
    let done = terminal(&store, &running, Duration::from_secs(5)).await;
    assert_eq!(done.state, JobState::Cancelled);
    assert_eq!(store.get(&queued).await.unwrap().unwrap().attempts, 0, "the cancelled queued job never ran");
    assert_eq!(store.stats().await.unwrap().open, 0);
    runner.stop().await;
}

#[tokio::test]
async fn a_dead_workers_job_is_taken_over() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let doomed = start_runner(&store, "doomed", 2, Duration::from_secs(5));
    let id = created(&store, &job("sleep", r#"{"ms":300}"#, 3)).await;
    eventually(Duration::from_secs(5), "job starts on the doomed worker", || async {
        store.get(&id).await.ok().flatten().filter(|j| j.state == JobState::Running)
    })
    .await;
    doomed.kill();
    let survivor = start_runner(&store, "survivor", 2, Duration::from_secs(5));
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!((done.attempts, done.deliveries), (1, 2), "the lost delivery spent no attempt");
    assert_eq!(survivor.stats.taken_over.load(Ordering::Relaxed), 1);
    survivor.stop().await;
}

#[tokio::test]
async fn shutdown_hands_unfinished_jobs_back_without_spending_an_attempt() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let leaving = start_runner(&store, "leaving", 2, Duration::from_millis(100));
    let id = created(&store, &job("sleep", r#"{"ms":2000}"#, 1)).await;
    eventually(Duration::from_secs(5), "job starts", || async {
        store.get(&id).await.ok().flatten().filter(|j| j.state == JobState::Running)
    })
    .await;
    leaving.stop().await;
    let back = store.get(&id).await.unwrap().unwrap();
    assert_eq!(back.state, JobState::Queued);
    assert_eq!(back.attempts, 0);

    let next = start_runner(&store, "next", 2, Duration::from_secs(5));
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Succeeded, "max_attempts 1 and still run: the hand-back cost no attempt");
    next.stop().await;
}

#[tokio::test]
async fn jobs_survive_a_redis_restart_with_appendonly_and_the_runner_resumes() {
    let mut redis = RedisServer::start_persistent();
    let store = store(&redis, 1000);
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(created(&store, &job("echo", &format!(r#"{{"i":{i}}}"#), 3)).await);
        }
        ids
    };
    redis.kill();
    assert!(store.submit(&job("echo", "{}", 1)).await.is_err(), "redis is down: submission fails, never pretends");
    redis.restart();
    let runner = start_runner(&store, "w1", 4, Duration::from_secs(5));
    for id in &ids {
        let done = terminal(&store, id, Duration::from_secs(20)).await;
        assert_eq!(done.state, JobState::Succeeded, "{id}");
    }
    runner.stop().await;
}

#[tokio::test]
async fn trimming_never_drops_a_pending_or_undelivered_entry() {
    let redis = RedisServer::start();
    let store = store(&redis, 1000);
    let runner = start_runner(&store, "w1", 8, Duration::from_secs(5));
    let mut before = Vec::new();
    for _ in 0..20 {
        before.push(created(&store, &job("echo", "{}", 1)).await);
    }
    for id in &before {
        terminal(&store, id, Duration::from_secs(10)).await;
    }
    // A long job stays pending while more short ones pass it.
    let long = created(&store, &job("sleep", r#"{"ms":2000}"#, 1)).await;
    eventually(Duration::from_secs(5), "long job starts", || async {
        store.get(&long).await.ok().flatten().filter(|j| j.state == JobState::Running)
    })
    .await;
    let mut after = Vec::new();
    for _ in 0..20 {
        after.push(created(&store, &job("echo", "{}", 1)).await);
    }
    for id in &after {
        terminal(&store, id, Duration::from_secs(10)).await;
    }
    let trimmed = store.trim().await.unwrap();
    assert!(trimmed >= 20, "the acknowledged entries before the pending one go: {trimmed}");
    assert_eq!(terminal(&store, &long, Duration::from_secs(10)).await.state, JobState::Succeeded);
    runner.stop().await;

    // Entries nobody has read yet stay too.
    let mut undelivered = Vec::new();
    for _ in 0..5 {
        undelivered.push(created(&store, &job("echo", "{}", 1)).await);
    }
    store.trim().await.unwrap();
    assert!(store.stats().await.unwrap().stream_length >= 5);
    let runner = start_runner(&store, "w2", 8, Duration::from_secs(5));
    for id in &undelivered {
        assert_eq!(terminal(&store, id, Duration::from_secs(10)).await.state, JobState::Succeeded);
    }
    runner.stop().await;
}

/// A kind whose code panics.
struct Panics;

impl Task for Panics {
    fn name(&self) -> &'static str {
        "panics"
    }
    fn description(&self) -> &'static str {
        "panics, for tests"
    }
    fn run(
        &self,
        _payload: serde_json::Value,
        _ctx: TaskContext,
    ) -> BoxFuture<'static, Result<serde_json::Value, TaskError>> {
        Box::pin(async { panic!("the task fell over") })
    }
}

#[tokio::test]
async fn a_panicking_task_fails_its_attempt_and_frees_its_slot() {
    let redis = RedisServer::start();
    let store = store(&redis, 100);
    let mut registry = TaskRegistry::builtin();
    registry.register(Panics);
    let runner = start_runner_with(&store, "w1", 1, Duration::from_secs(5), registry);
    let id = created(&store, &job("panics", "{}", 2)).await;
    let done = terminal(&store, &id, Duration::from_secs(10)).await;
    assert_eq!(done.state, JobState::Dead, "{done:?}");
    assert_eq!(done.attempts, 2, "each panic is one failed attempt");
    assert!(done.error.as_deref().unwrap_or_default().contains("task panicked: the task fell over"), "{done:?}");
    assert_eq!(runner.stats.panicked.load(Ordering::Relaxed), 2);
    // The only slot came back, and nothing is held or open any more.
    let next = created(&store, &job("echo", r#"{"after":"panic"}"#, 1)).await;
    assert_eq!(terminal(&store, &next, Duration::from_secs(10)).await.state, JobState::Succeeded);
    assert_eq!(store.stats().await.unwrap().open, 0);
    assert_eq!(store.stats().await.unwrap().pending, 0);
    runner.stop().await;
}
