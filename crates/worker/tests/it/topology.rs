//! The delivery contract on the multi-node Redis topologies the worker
//! supports: a Redis Cluster (3 primaries, 1 replica each) and a Sentinel
//! setup (1 primary, 1 replica, 3 sentinels), all real `redis-server`
//! processes on loopback, with real worker processes. A primary is
//! SIGKILLed under load; every job accepted (gRPC OK) before the kill is
//! checked afterwards, and the ones lost are counted with how long before
//! the kill they were accepted (replication is asynchronous: the window the
//! docs state). Every wait is bounded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::worker::v1::SubmitJobRequest;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_testkit::{RedisCluster, RedisSentinel, eventually};
use shoal_worker::jobs::{JobId, JobState, JobStore, Keys, PoolSettings, RedisPool, StoreConfig, Topology};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::helpers::connect;
use crate::process::Process;

/// Acknowledged jobs may be lost only when accepted this shortly before
/// their primary died (asynchronous replication; docs/jobs.md states it).
const LOSS_WINDOW: Duration = Duration::from_secs(1);

fn worker(redis_flags: &[&str], id: &str, prefix: &str) -> Process {
    let mut args = vec![
        "--worker-id",
        id,
        "--redis-prefix",
        prefix,
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
        "3s",
        "--drain-delay",
        "0s",
    ];
    args.extend_from_slice(redis_flags);
    Process::start(&args)
}

fn store(topology: &Topology, prefix: &str) -> JobStore {
    let pool = RedisPool::new(topology, PoolSettings::default()).expect("pool");
    JobStore::new(
        pool,
        Keys::new(prefix),
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

fn request(kind: &str, payload: &str, attempts: u32, key: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        kind: kind.into(),
        payload_json: payload.into(),
        max_attempts: attempts,
        timeout_ms: 0,
        idempotency_key: key.into(),
        owner: None,
    }
}

async fn submit(
    client: &mut WorkerServiceClient<Channel>,
    req: SubmitJobRequest,
) -> Result<(JobId, bool), tonic::Status> {
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(5));
    let reply = client.submit_job(request).await?.into_inner();
    let job = reply.job.expect("a job");
    Ok((job.id.parse().expect("a job id"), reply.created))
}

async fn ended(store: &JobStore, id: &JobId, within: Duration) -> shoal_worker::jobs::JobRecord {
    eventually(within, "the job ends", || async {
        store.get(id).await.ok().flatten().filter(|j| j.state.is_terminal())
    })
    .await
}

/// Jobs accepted by the submitters, with when their OK arrived.
type Accepted = Arc<Mutex<Vec<(JobId, Instant)>>>;

/// Submits short jobs from `tasks` concurrent clients until `stop`; counts
/// refusals (a primary down answers UNAVAILABLE, never a false OK).
fn submitters(clients: Vec<WorkerServiceClient<Channel>>, stop: &CancellationToken) -> (Accepted, Arc<Mutex<u64>>) {
    let accepted: Accepted = Arc::default();
    let refused = Arc::new(Mutex::new(0u64));
    for (n, mut client) in clients.into_iter().enumerate() {
        let (accepted, refused, stop) = (accepted.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let key = format!("s{n}-{i}");
                match submit(&mut client, request("sleep", r#"{"ms":5}"#, 3, &key)).await {
                    Ok((id, _)) => accepted.lock().unwrap().push((id, Instant::now())),
                    Err(_) => {
                        *refused.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    (accepted, refused)
}

/// A change of primary: writes acknowledged from `LOSS_WINDOW` before
/// `from` until `to` (when the new primary was seen serving) may be lost.
struct Switch {
    from: Instant,
    to: Instant,
}

/// What became of the accepted jobs once they settled: lost ones (no
/// record), per switch, with how long before the switch began the earliest
/// of them was accepted (negative: after it began).
struct Settled {
    accepted: usize,
    lost: Vec<(usize, Option<i128>)>,
}

async fn settle(store: &JobStore, accepted: &[(JobId, Instant)], switches: &[Switch], within: Duration) -> Settled {
    let deadline = Instant::now() + within;
    let mut open: HashSet<JobId> = accepted.iter().map(|(id, _)| id.clone()).collect();
    let mut lost = HashSet::new();
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted jobs did not end within {within:?}",
            open.len(),
            accepted.len()
        );
        for id in open.clone() {
            match store.get(&id).await {
                Ok(Some(job)) if job.state.is_terminal() => {
                    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
                    open.remove(&id);
                }
                Ok(None) => {
                    lost.insert(id.clone());
                    open.remove(&id);
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut per_switch = vec![(0usize, None::<i128>); switches.len()];
    for (id, at) in accepted {
        if !lost.contains(id) {
            continue;
        }
        let Some(n) =
            switches.iter().position(|s| *at + LOSS_WINDOW >= s.from && *at <= s.to + Duration::from_millis(50))
        else {
            panic!("job {id} was lost though accepted outside every switch's window");
        };
        let before_ms = if *at <= switches[n].from {
            switches[n].from.duration_since(*at).as_millis() as i128
        } else {
            -(at.duration_since(switches[n].from).as_millis() as i128)
        };
        per_switch[n] = (per_switch[n].0 + 1, Some(per_switch[n].1.map_or(before_ms, |ms| ms.max(before_ms))));
    }
    Settled { accepted: accepted.len(), lost: per_switch }
}

async fn cluster_pending(urls: &[String], stream: &str, consumer: &str) -> usize {
    let client = redis::cluster::ClusterClient::new(urls.to_vec()).expect("cluster client");
    let Ok(mut conn) = client.get_async_connection().await else { return usize::MAX };
    let reply: redis::RedisResult<redis::streams::StreamPendingCountReply> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(Keys::GROUP)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer)
        .query_async(&mut conn)
        .await;
    reply.map(|r| r.ids.len()).unwrap_or(usize::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_contract_holds_on_a_redis_cluster_through_a_primary_failover() {
    shoal_telemetry::init_for_tests();
    let began = Instant::now();
    let mut cluster = RedisCluster::start();
    let urls = cluster.urls();
    let joined = urls.join(",");
    let flags = ["--redis-cluster-urls", joined.as_str()];
    let prefix = "cl";
    let keys = Keys::new(prefix);
    let store = store(&Topology::Cluster { urls: urls.clone() }, prefix);
    eprintln!("cluster of 6 up in {:?}", began.elapsed());

    // Scale signals before any worker runs: what KEDA and the gauges read.
    store.ensure_group().await.expect("group");
    let mut early = Vec::new();
    for i in 0..5 {
        let new = shoal_worker::jobs::NewJob {
            kind: "echo".into(),
            payload_json: format!(r#"{{"early":{i}}}"#),
            max_attempts: 1,
            timeout: Duration::from_secs(5),
            idempotency_key: None,
            owner: None,
            traceparent: None,
        };
        match store.submit(&new).await.expect("submit") {
            shoal_worker::jobs::SubmitOutcome::Created(job) => early.push(job.id),
            other => panic!("{other:?}"),
        }
    }
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.open, stats.lag, stats.pending, stats.stream_length), (5, 5, 0, 5), "{stats:?}");

    let mut a = worker(&flags, "cl-a", prefix);
    let b = worker(&flags, "cl-b", prefix);
    let mut to_a = client(&a).await;
    let mut to_b = client(&b).await;

    // Submit, run, succeed; idempotency; retries to a dead letter.
    for id in &early {
        assert_eq!(ended(&store, id, Duration::from_secs(15)).await.state, JobState::Succeeded);
    }
    let (first, created) = submit(&mut to_a, request("echo", r#"{"x":1}"#, 1, "same-key")).await.expect("accepted");
    let (again, created_again) =
        submit(&mut to_b, request("echo", r#"{"x":1}"#, 1, "same-key")).await.expect("accepted");
    assert_eq!((first.clone(), created, created_again), (again, true, false), "one job per idempotency key");
    let conflict = submit(&mut to_b, request("echo", r#"{"x":2}"#, 1, "same-key")).await.expect_err("other request");
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert_eq!(ended(&store, &first, Duration::from_secs(10)).await.result_json.as_deref(), Some(r#"{"x":1}"#));
    let (poison, _) = submit(&mut to_a, request("fail", r#"{"error":"boom"}"#, 3, "")).await.expect("accepted");
    let dead = ended(&store, &poison, Duration::from_secs(15)).await;
    assert_eq!((dead.state, dead.attempts), (JobState::Dead, 3), "{dead:?}");
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.open, stats.lag, stats.pending, stats.dead_letters), (0, 0, 0, 1), "{stats:?}");

    // Takeover after a worker's SIGKILL: its jobs run again elsewhere, no
    // attempt spent.
    let mut long = Vec::new();
    for _ in 0..24 {
        long.push(submit(&mut to_b, request("sleep", r#"{"ms":1500}"#, 1, "")).await.expect("accepted").0);
    }
    eventually(Duration::from_secs(10), "a holds jobs", || async {
        let held = cluster_pending(&urls, &keys.stream(), "cl-a").await;
        (held > 0 && held != usize::MAX).then_some(())
    })
    .await;
    let killed_at = Instant::now();
    a.child.kill().expect("SIGKILL");
    let _ = a.child.wait();
    eventually(Duration::from_secs(15), "b takes over a's jobs", || async {
        (cluster_pending(&urls, &keys.stream(), "cl-a").await == 0).then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    for id in &long {
        let job = ended(&store, id, Duration::from_secs(30)).await;
        assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1), "{job:?}");
    }
    eprintln!("worker SIGKILL: its jobs taken over in {takeover:?} (lease 2 s)");

    // A primary dies under load; its replica is promoted by the cluster.
    let c = worker(&flags, "cl-c", prefix);
    let stop = CancellationToken::new();
    let clients = vec![client(&b).await, client(&b).await, client(&c).await, client(&c).await];
    let (accepted, refused) = submitters(clients, &stop);
    eventually(Duration::from_secs(10), "submissions flow", || async {
        (accepted.lock().unwrap().len() > 200).then_some(())
    })
    .await;
    let victim = cluster.primary_for(&keys.stream()).expect("the queue's primary");
    let killed_at = Instant::now();
    cluster.kill(victim);
    let before_kill = accepted.lock().unwrap().len();
    let promoted = eventually(Duration::from_secs(15), "another primary serves the queue's slot", || async {
        cluster.primary_for(&keys.stream()).filter(|port| *port != victim)
    })
    .await;
    let promotion = killed_at.elapsed();
    // Writes are accepted again through the new primary.
    let resumed = eventually(Duration::from_secs(15), "submissions accepted after the failover", || async {
        let list = accepted.lock().unwrap();
        list.iter().find(|(_, at)| *at > killed_at + promotion).map(|(_, at)| at.duration_since(killed_at))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let accepted = accepted.lock().unwrap().clone();
    let refused = *refused.lock().unwrap();
    let switches = [Switch { from: killed_at, to: killed_at }];
    let settled = settle(&store, &accepted, &switches, Duration::from_secs(40)).await;
    eprintln!(
        "cluster primary SIGKILL: replica {promoted} promoted after {promotion:?}, submissions accepted again after \
         {resumed:?}; {} accepted ({before_kill} before the kill), {refused} refused meanwhile; lost (count, ms \
         before the kill): {:?}",
        settled.accepted, settled.lost
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.lag, stats.pending), (0, 0), "{stats:?}");
    assert_eq!(stats.open, 0, "the open count agrees with the jobs after the failover: {stats:?}");
    drop(b);
    drop(c);
    eprintln!("cluster test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_the_primary_through_sentinel_failovers() {
    shoal_telemetry::init_for_tests();
    let began = Instant::now();
    let mut redis = RedisSentinel::start();
    let urls = redis.sentinel_urls();
    let joined = urls.join(",");
    let flags = ["--redis-sentinel-urls", joined.as_str(), "--redis-sentinel-master", RedisSentinel::MASTER];
    let prefix = "sn";
    let topology = Topology::Sentinel { urls: urls.clone(), master: RedisSentinel::MASTER.into() };
    let store = store(&topology, prefix);
    eprintln!("primary, replica and 3 sentinels up in {:?}", began.elapsed());
    let w = worker(&flags, "sn-a", prefix);
    let (first, _) = submit(&mut client(&w).await, request("echo", "1", 1, "")).await.expect("accepted");
    assert_eq!(ended(&store, &first, Duration::from_secs(10)).await.state, JobState::Succeeded);

    let stop = CancellationToken::new();
    let (accepted, refused) = submitters(vec![client(&w).await, client(&w).await], &stop);
    eventually(Duration::from_secs(10), "submissions flow", || async {
        (accepted.lock().unwrap().len() > 100).then_some(())
    })
    .await;

    // 1. The primary is SIGKILLed; the sentinels promote the replica.
    let old = redis.primary().expect("a primary");
    let killed_at = Instant::now();
    redis.kill(old);
    let new = redis.wait_promoted(old, Duration::from_secs(20));
    let promotion = killed_at.elapsed();
    let resumed = eventually(Duration::from_secs(15), "submissions accepted after the promotion", || async {
        let list = accepted.lock().unwrap();
        list.iter().find(|(_, at)| *at > killed_at + promotion).map(|(_, at)| at.duration_since(killed_at))
    })
    .await;
    eprintln!(
        "sentinel, primary SIGKILL: {new} promoted after {promotion:?}, submissions accepted again after {resumed:?}"
    );

    // 2. The old primary comes back as a replica; a manual failover
    // (`SENTINEL FAILOVER`) demotes the running primary under the worker's
    // open connections (they answer READONLY and must be dropped, not
    // reused). Sentinel promotes the replica before it demotes the
    // primary, and does not pause writes: what the old primary accepts in
    // between is lost, so the worker must stop using it as soon as the
    // sentinels name the new one.
    // The sentinels turn the returning primary into a replica on their next
    // INFO refresh (every 10 s), then it syncs: 60 s leaves room for a
    // loaded machine.
    redis.restart(old);
    let restarted_at = Instant::now();
    redis.wait_replica_in_sync(old, Duration::from_secs(60));
    eprintln!("sentinel, the former primary is a replica in sync after {:?}", restarted_at.elapsed());
    let switched_at = Instant::now();
    let reply = redis.failover();
    assert!(reply.starts_with("OK"), "SENTINEL FAILOVER: {reply}");
    redis.wait_promoted(new, Duration::from_secs(20));
    let switched = switched_at.elapsed();
    let demoted = eventually(Duration::from_secs(20), "the former primary is demoted", || async {
        shoal_testkit::redis_cli(new, &["role"]).starts_with("slave").then(Instant::now)
    })
    .await;
    let resumed_again = eventually(Duration::from_secs(15), "submissions accepted after the switch", || async {
        let list = accepted.lock().unwrap();
        list.iter().find(|(_, at)| *at > switched_at + switched).map(|(_, at)| at.duration_since(switched_at))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let accepted = accepted.lock().unwrap().clone();
    let refused = *refused.lock().unwrap();
    // The worker follows the sentinels' answer within 0.5 s (it re-asks
    // before reusing a connection), not the old primary's demotion, which
    // comes seconds later: only what reached the old primary before the
    // worker moved may be lost.
    let followed = switched_at + switched + Duration::from_secs(1);
    let switches = [Switch { from: killed_at, to: killed_at }, Switch { from: switched_at, to: followed }];
    let settled = settle(&store, &accepted, &switches, Duration::from_secs(40)).await;
    eprintln!(
        "sentinel, SENTINEL FAILOVER back to {old}: promoted after {switched:?}, old primary demoted after {:?}, \
         submissions accepted again after {resumed_again:?}; {} accepted, {refused} refused meanwhile; lost per \
         switch (count, ms before it began; negative: after): {:?}",
        demoted.duration_since(switched_at),
        settled.accepted,
        settled.lost
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.lag, stats.pending, stats.open), (0, 0, 0), "{stats:?}");
    drop(w);
    eprintln!("sentinel test took {:?}", began.elapsed());
}
