//! The two rules that make the delivery contract honest, with real worker
//! processes and a real redis-server: fenced leases (a paused worker that
//! lost its lease stops and records nothing; it never takes the job back)
//! and attempts that count the job's failures, not the platform's (a
//! SIGKILL or a lost reply spends no attempt; a job that kills every worker
//! still ends dead, by its delivery bound). Also: takeover reaches a dead
//! worker's entry behind live long-running ones, and contradictory settings
//! stop the binary before it binds. Every wait is bounded.

use std::process::Command;
use std::time::Duration;

use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_testkit::{RedisServer, eventually};
use shoal_worker::jobs::{JobId, JobRecord, JobState, JobStore, Keys, NewJob, StoreConfig, SubmitOutcome};

use crate::helpers::{connect, held_by};
use crate::process::{BIN, Process};
use crate::proxy::ReplyDropper;

const PREFIX: &str = "contract";

fn worker(redis_url: &str, id: &str, extra: &[&str]) -> Process {
    worker_with_lease(redis_url, id, "1s", extra)
}

fn worker_with_lease(redis_url: &str, id: &str, lease: &str, extra: &[&str]) -> Process {
    let mut args = vec![
        "--worker-id",
        id,
        "--redis-url",
        redis_url,
        "--redis-prefix",
        PREFIX,
        "--job-lease",
        lease,
        "--reaper-interval",
        "250ms",
        "--retry-base",
        "50ms",
        "--retry-max",
        "200ms",
        "--shutdown-grace",
        "2s",
    ];
    args.extend_from_slice(extra);
    Process::start(&args)
}

fn store(redis: &RedisServer) -> JobStore {
    let pool =
        deadpool_redis::Config::from_url(redis.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("pool");
    JobStore::new(pool, Keys::new(PREFIX), StoreConfig::default())
}

async fn submit(store: &JobStore, kind: &str, payload: &str, max_attempts: u32) -> JobId {
    let job = NewJob {
        kind: kind.into(),
        payload_json: payload.into(),
        max_attempts,
        timeout: Duration::from_secs(60),
        idempotency_key: None,
        owner: None,
        traceparent: None,
    };
    match store.submit(&job).await.expect("submit") {
        SubmitOutcome::Created(record) => record.id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

async fn running_on(store: &JobStore, id: &JobId, worker: &str) -> JobRecord {
    eventually(Duration::from_secs(15), "the job runs on the expected worker", || async {
        store
            .get(id)
            .await
            .ok()
            .flatten()
            .filter(|j| j.state == JobState::Running && j.worker.as_deref() == Some(worker))
    })
    .await
}

async fn ended(store: &JobStore, id: &JobId) -> JobRecord {
    eventually(Duration::from_secs(30), "the job ends", || async {
        store.get(id).await.ok().flatten().filter(|j| j.state.is_terminal())
    })
    .await
}

fn kill9(process: &mut Process) {
    process.child.kill().expect("SIGKILL");
    let _ = process.child.wait();
}

fn signal(process: &Process, signal: &str) {
    let status = Command::new("kill").args([signal, &process.child.id().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill {signal}");
}

async fn metrics(process: &Process) -> String {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("http client");
    match http.get(process.admin_url("/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_that_lost_its_lease_stops_and_records_nothing() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    let paused = worker(&redis.url(), "fence-paused", &[]);
    let id = submit(&store, "sleep", r#"{"ms":4000}"#, 1).await;
    running_on(&store, &id, "fence-paused").await;

    // A VM pause: no renewals, the lease lapses, another worker takes over.
    signal(&paused, "-STOP");
    let _current = worker(&redis.url(), "fence-current", &[]);
    let taken = running_on(&store, &id, "fence-current").await;
    assert_eq!(taken.deliveries, 2);
    signal(&paused, "-CONT");

    // The paused worker learns at its next renewal that it lost the job.
    eventually(Duration::from_secs(10), "the paused worker reports the lost lease", || async {
        metrics(&paused)
            .await
            .lines()
            .any(|l| l.starts_with("worker_job_leases_lost_total") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    assert_eq!(held_by(&redis, PREFIX, "fence-paused").await, 0, "the stale holder never took the entry back");
    assert_eq!(store.get(&id).await.unwrap().unwrap().worker.as_deref(), Some("fence-current"));

    let done = ended(&store, &id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempts, done.deliveries), (1, 2), "one attempt ran to its end: the current holder's");
    assert_eq!(done.completions, 1, "the stale holder offered no outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_stops_its_job_once_its_lease_is_over() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    let proxy = ReplyDropper::start(redis.addr()).await;
    let cut_off = worker(&proxy.url(), "cut-off", &[]);
    let id = submit(&store, "sleep", r#"{"ms":6000}"#, 1).await;
    running_on(&store, &id, "cut-off").await;
    proxy.cut();
    // It cannot renew nor learn that it lost the job: after a lease without
    // a renewal it stops the job by itself, so two workers do not run it at
    // once for the length of the partition.
    eventually(Duration::from_secs(10), "the cut-off worker stops its job", || async {
        metrics(&cut_off)
            .await
            .lines()
            .any(|l| l.starts_with("worker_job_leases_lost_total") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    let _other = worker(&redis.url(), "cut-other", &[]);
    let done = ended(&store, &id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempts, done.deliveries), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_under_a_single_attempt_job_spends_no_attempt() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    let mut first = worker(&redis.url(), "kill-first", &[]);
    let id = submit(&store, "sleep", r#"{"ms":1500}"#, 1).await;
    running_on(&store, &id, "kill-first").await;
    kill9(&mut first);
    let _second = worker(&redis.url(), "kill-second", &[]);
    let done = ended(&store, &id).await;
    assert_eq!(done.state, JobState::Succeeded, "max_attempts 1 and the lost worker cost no attempt: {done:?}");
    assert_eq!((done.attempts, done.deliveries), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_start_reply_spends_no_attempt() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    let proxy = ReplyDropper::start(redis.addr()).await;
    let id = submit(&store, "sleep", r#"{"ms":300}"#, 1).await;
    // The worker's first request naming the job (its START) loses its reply.
    proxy.drop_reply_to(id.as_str());
    let w = worker(&proxy.url(), "lossy", &["--job-slots", "1"]);
    let done = ended(&store, &id).await;
    assert_eq!(proxy.dropped(), 1, "the START's reply was lost on the wire");
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 1);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_loses_every_worker_ends_dead_by_its_delivery_bound() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    // The bound is fixed at submission, by the submitting worker's setting.
    let pool =
        deadpool_redis::Config::from_url(redis.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("pool");
    let store = JobStore::new(pool, Keys::new(PREFIX), StoreConfig { max_deliveries: 2, ..StoreConfig::default() });
    let bound = ["--max-deliveries", "2", "--default-max-attempts", "1"];
    let id = submit(&store, "sleep", r#"{"ms":60000}"#, 1).await;
    for name in ["lost-1", "lost-2"] {
        let mut w = worker(&redis.url(), name, &bound);
        running_on(&store, &id, name).await;
        kill9(&mut w);
    }
    let _last = worker(&redis.url(), "lost-3", &bound);
    let done = ended(&store, &id).await;
    assert_eq!(done.state, JobState::Dead, "{done:?}");
    assert_eq!(done.attempts, 0, "the job's code never failed");
    let error = done.error.unwrap_or_default();
    assert!(error.contains("max deliveries 2"), "{error}");
    assert_eq!(store.stats().await.unwrap().dead_letters, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_entry_behind_live_long_jobs_is_taken_over() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    // 30 long jobs ahead in the pending list, held by a live worker.
    let busy = worker(&redis.url(), "fair-busy", &["--job-slots", "30"]);
    let mut long = Vec::new();
    for _ in 0..30 {
        long.push(submit(&store, "sleep", r#"{"ms":30000}"#, 1).await);
    }
    eventually(Duration::from_secs(15), "the busy worker holds all 30", || async {
        (held_by(&redis, PREFIX, "fair-busy").await == 30).then_some(())
    })
    .await;
    let mut doomed = worker(&redis.url(), "fair-doomed", &["--job-slots", "1"]);
    let behind = submit(&store, "sleep", r#"{"ms":200}"#, 1).await;
    running_on(&store, &behind, "fair-doomed").await;
    kill9(&mut doomed);
    // One free slot: each takeover scan looks at a few entries only, so only
    // a scan that walks on from where the last one stopped reaches it.
    let _survivor = worker(&redis.url(), "fair-survivor", &["--job-slots", "1"]);
    let done = ended(&store, &behind).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    for id in &long {
        assert_eq!(store.get(id).await.unwrap().unwrap().state, JobState::Running, "the long jobs still run");
    }
    drop(busy);
}

#[test]
fn contradictory_job_settings_stop_the_binary_before_it_binds() {
    for (flags, named) in [
        (["--job-lease", "1s", "--reaper-interval", "2s"], "--reaper-interval"),
        (["--retry-base", "10s", "--retry-max", "1s"], "--retry-max"),
        (["--default-job-timeout", "2h", "--max-job-timeout", "1h"], "--max-job-timeout"),
    ] {
        let output = Command::new(BIN)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(flags)
            .output()
            .expect("run shoal-worker");
        assert_eq!(output.status.code(), Some(2), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("invalid configuration") && stderr.contains(named), "{flags:?}: {stderr}");
        assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_read_in_flight_loses_no_entry() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let store = store(&redis);
    // An idle worker sits in its blocking read most of the time.
    let mut leaving = worker(&redis.url(), "read-leaving", &[]);
    let mut client = WorkerServiceClient::new(connect(leaving.grpc_addr).await.expect("connect"));
    let _ = client.list_kinds(shoal_proto::worker::v1::ListKindsRequest {}).await.expect("serving");
    signal(&leaving, "-TERM");
    // Whatever it read while stopping is handed back, not held for a lease.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&store, "echo", "{}", 1).await);
    }
    assert!(leaving.exit(Duration::from_secs(10)).await.is_some_and(|s| s.success()));
    let _next = worker_with_lease(&redis.url(), "read-next", "60s", &[]);
    for id in &ids {
        // A 60 s lease: an entry stranded with the leaving worker could not
        // end within the 30 s wait below; a released one ends at once.
        let done = ended(&store, id).await;
        assert_eq!(done.state, JobState::Succeeded);
    }
}
