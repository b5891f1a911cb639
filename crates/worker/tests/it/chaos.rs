//! The delivery contract under failure, with real worker processes and a real
//! redis-server: SIGKILLed workers, a Redis restart, SIGTERM mid-job, poison
//! jobs. Every wait is bounded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_proto::worker::v1::{GetJobRequest, JobState as PbState, SubmitJobRequest};
use shoal_testkit::{RedisServer, eventually};
use shoal_worker::jobs::{JobId, JobState, JobStore, Keys, StoreConfig};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{connect, held_by};
use crate::process::Process;

const PREFIX: &str = "chaos";

fn worker(redis: &RedisServer, id: &str, grace: &str) -> Process {
    Process::start(&[
        "--worker-id",
        id,
        "--redis-url",
        &redis.url(),
        "--redis-prefix",
        PREFIX,
        "--job-slots",
        "16",
        "--job-lease",
        "2s",
        "--reaper-interval",
        "250ms",
        "--retry-base",
        "50ms",
        "--retry-max",
        "200ms",
        "--shutdown-grace",
        grace,
    ])
}

fn store(redis: &RedisServer) -> JobStore {
    let pool =
        deadpool_redis::Config::from_url(redis.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("pool");
    JobStore::new(
        pool,
        Keys::new(PREFIX),
        StoreConfig {
            job_ttl: Duration::from_secs(3600),
            idempotency_ttl: Duration::from_secs(3600),
            max_open: 1_000_000,
            ..StoreConfig::default()
        },
    )
}

async fn client(process: &Process) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(connect(process.grpc_addr).await.expect("connect"))
}

async fn submit(
    client: &mut WorkerServiceClient<Channel>,
    kind: &str,
    payload: &str,
    attempts: u32,
) -> Result<JobId, tonic::Status> {
    let response = client
        .submit_job(SubmitJobRequest {
            kind: kind.into(),
            payload_json: payload.into(),
            max_attempts: attempts,
            timeout_ms: 0,
            idempotency_key: String::new(),
            owner: None,
        })
        .await?;
    let job = response.into_inner().job.expect("a job");
    Ok(job.id.parse().expect("a job id"))
}

fn kill9(process: &mut Process) {
    process.child.kill().expect("SIGKILL");
    let _ = process.child.wait();
}

/// Waits until the dead `consumer` holds nothing (its entries were taken
/// over); returns how long that took since the kill.
async fn takeover_time(redis: &RedisServer, consumer: &str, killed_at: Instant) -> Duration {
    eventually(Duration::from_secs(30), "a dead worker's jobs are taken over", || async {
        (held_by(redis, PREFIX, consumer).await == 0).then_some(())
    })
    .await;
    killed_at.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_survive_two_sigkilled_workers() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start_persistent();
    let store = store(&redis);
    let mut a = worker(&redis, "chaos-a", "5s");
    let mut b = worker(&redis, "chaos-b", "5s");
    let mut c = worker(&redis, "chaos-c", "5s");
    let mut submitter = client(&a).await;

    // About 15 s of work for 48 slots: long enough to kill two workers
    // mid-run even when a loaded machine makes submitting slow.
    let mut ids = Vec::with_capacity(1000);
    for i in 0..1000u64 {
        let ms = 400 + (i * 37) % 600;
        ids.push(submit(&mut submitter, "sleep", &format!(r#"{{"ms":{ms}}}"#), 5).await.expect("accepted"));
    }

    // First victim: b, once it holds jobs.
    let held = eventually(Duration::from_secs(10), "b runs jobs", || async {
        let held = held_by(&redis, PREFIX, "chaos-b").await;
        (held > 0).then_some(held)
    })
    .await;
    let killed_at = Instant::now();
    kill9(&mut b);
    let first = takeover_time(&redis, "chaos-b", killed_at).await;
    eprintln!("b held {held} jobs when killed");

    // Second victim: c, while a replacement joins.
    let _d = worker(&redis, "chaos-d", "5s");
    let held = eventually(Duration::from_secs(20), "c runs jobs", || async {
        let held = held_by(&redis, PREFIX, "chaos-c").await;
        (held > 0).then_some(held)
    })
    .await;
    let killed_at = Instant::now();
    kill9(&mut c);
    let second = takeover_time(&redis, "chaos-c", killed_at).await;
    eprintln!("c held {held} jobs when killed");
    eprintln!("takeover after SIGKILL: {first:?} and {second:?} (lease 2 s, reaper every 250 ms)");

    // Every job ends exactly once, and the first recorded outcome stands.
    let mut first_seen: HashMap<JobId, (Option<String>, Option<u64>)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while first_seen.len() < ids.len() {
        assert!(Instant::now() < deadline, "only {} of 1000 jobs ended within 90 s", first_seen.len());
        for id in &ids {
            if first_seen.contains_key(id) {
                continue;
            }
            if let Some(job) = store.get(id).await.expect("redis").filter(|j| j.state.is_terminal()) {
                assert_eq!(job.state, JobState::Succeeded, "{job:?}");
                first_seen.insert(id.clone(), (job.result_json.clone(), job.finished_ms));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give any duplicate execution still running time to try to record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut redelivered = 0;
    for id in &ids {
        let job = store.get(id).await.expect("redis").expect("job kept");
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!((job.result_json.clone(), job.finished_ms), first_seen[id], "outcome of {id} never rewritten");
        assert!(job.completions >= 1);
        assert_eq!(job.attempts, 1, "a lost delivery spends no attempt: {job:?}");
        redelivered += usize::from(job.deliveries > 1);
    }
    assert!(redelivered > 0, "the kills interrupted some jobs, which ran again");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.open, 0, "every job left the open set exactly once");
    assert_eq!(stats.dead_letters, 0);
    eprintln!("{redelivered} of 1000 jobs ran more than once; each recorded one outcome");
    a.terminate();
    assert!(a.exit(Duration::from_secs(10)).await.is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_jobs_survive_a_redis_restart_mid_run() {
    shoal_telemetry::init_for_tests();
    let mut redis = RedisServer::start_persistent();
    let store = store(&redis);
    let w = worker(&redis, "restart-a", "5s");
    let mut submitter = client(&w).await;
    let mut accepted = Vec::new();
    for i in 0..300u64 {
        accepted
            .push(submit(&mut submitter, "sleep", &format!(r#"{{"ms":{}}}"#, 20 + i % 30), 5).await.expect("accepted"));
    }
    redis.kill();
    // While Redis is down, submissions fail clearly and fast, never pretend.
    let refused = submit(&mut submitter, "echo", "{}", 1).await.expect_err("redis is down");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    redis.restart();
    // The worker reconnects by itself and every accepted job ends.
    for id in &accepted {
        let job = eventually(Duration::from_secs(60), "accepted job ends after the restart", || async {
            store.get(id).await.ok().flatten().filter(|j| j.state.is_terminal())
        })
        .await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
    // And new submissions work again.
    let id = submit(&mut submitter, "echo", r#"{"after":"restart"}"#, 1).await.expect("accepted after restart");
    let job = eventually(Duration::from_secs(10), "new job ends", || async {
        store.get(&id).await.ok().flatten().filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(job.result_json.as_deref(), Some(r#"{"after":"restart"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_hands_it_to_another_worker() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start_persistent();
    let store = store(&redis);
    let mut leaving = worker(&redis, "term-a", "300ms");
    let mut submitter = client(&leaving).await;
    let long = submit(&mut submitter, "sleep", r#"{"ms":3000}"#, 1).await.expect("accepted");
    let short = submit(&mut submitter, "sleep", r#"{"ms":100}"#, 1).await.expect("accepted");
    eventually(Duration::from_secs(10), "the long job runs", || async {
        store.get(&long).await.ok().flatten().filter(|j| j.state == JobState::Running)
    })
    .await;
    leaving.terminate();
    let status = leaving.exit(Duration::from_secs(10)).await.expect("exits within its grace");
    assert!(status.success(), "{status:?}");
    // The short job finished within the grace; the long one was handed back.
    assert_eq!(store.get(&short).await.unwrap().unwrap().state, JobState::Succeeded);
    let back = store.get(&long).await.unwrap().unwrap();
    assert_eq!(back.state, JobState::Queued, "{back:?}");

    let _next = worker(&redis, "term-b", "5s");
    let done = eventually(Duration::from_secs(15), "another worker finishes it", || async {
        store.get(&long).await.ok().flatten().filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "max_attempts 1: the hand-back cost no attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_after_its_attempts_with_its_error() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let w = worker(&redis, "poison", "5s");
    let mut client = client(&w).await;
    let id = submit(&mut client, "fail", r#"{"error":"disk on fire"}"#, 4).await.expect("accepted");
    let job = eventually(Duration::from_secs(20), "poison job dies", || {
        let mut client = client.clone();
        let id = id.to_string();
        async move {
            let job = client.get_job(GetJobRequest { id, owner: None }).await.ok()?.into_inner();
            (job.state == PbState::Dead as i32).then_some(job)
        }
    })
    .await;
    assert_eq!(job.attempts, 4);
    assert!(job.error.as_deref().unwrap_or_default().contains("disk on fire"), "{job:?}");
    assert_eq!(store(&redis).stats().await.unwrap().dead_letters, 1);
}
