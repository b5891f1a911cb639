//! Zero-downtime rollouts on loopback, with the real binaries: every replica
//! of a service is replaced one at a time (a new one first, then SIGTERM to
//! an old one, as a Deployment with `maxSurge: 1, maxUnavailable: 0` does)
//! while 16 clients keep calling through the gateway. Not one request may
//! fail, and every job submitted must succeed.
//!
//! The worker and aggregator binaries are built by cargo on first use (they
//! belong to other packages, so cargo does not build them for this test
//! binary), into the same target directory as the gateway's.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shoal_testkit::{RedisServer, eventually, free_port};

const GATEWAY: &str = env!("CARGO_BIN_EXE_shoal-gateway");
/// Short drain delay for the tests: the gateway's health watch notices a
/// draining replica within a round trip, and the test client polls
/// readiness every [`READY_POLL`].
const DRAIN_DELAY: &str = "1s";
const READY_POLL: Duration = Duration::from_millis(100);
/// Concurrent clients of the load.
const CLIENTS: usize = 16;
/// Hard bound of any load loop.
const LOAD_LIMIT: Duration = Duration::from_secs(50);

/// Requests the worker rollout must see: 3,000 (an idle 2-core machine makes
/// ~10,000 in the rollout's ~10 s; a machine shared with builds ~7,000), or
/// `SHOAL_ROLLOUT_MIN_REQUESTS` for a longer run. The count is asserted, so a
/// load that stalled cannot pass as a rollout without failures.
fn min_requests() -> usize {
    std::env::var("SHOAL_ROLLOUT_MIN_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000)
}

/// The path of a binary of another workspace package, next to the
/// gateway's: `cargo nextest run --workspace` (and `cargo build`) build it
/// with the same profile; when it is missing, cargo builds it here.
fn binary(package: &str, name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().expect("build lock");
    let dir = PathBuf::from(GATEWAY).parent().expect("the gateway binary has a directory").to_path_buf();
    let path = dir.join(name);
    if path.exists() {
        return path;
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    let profile = if profile == "debug" { "dev".to_owned() } else { profile };
    let target_dir = dir.parent().expect("a target directory").to_path_buf();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--bin", name, "--profile", &profile, "--target-dir"])
        .arg(&target_dir)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    path
}

/// A child process that is killed if the test ends before it exits.
struct Proc {
    child: Child,
    /// Fields of its `listening` log line.
    listening: Value,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(path: &PathBuf, args: &[String]) -> Self {
        let mut child = Command::new(path)
            .args(args)
            .args(["--log-format", "json", "--log-filter", "info"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SHOAL_METRICS_PUSH_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            // Reads every line (so the pipe never fills) until the process exits.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(json) = serde_json::from_str::<Value>(&line) else { continue };
                if json["message"] == "listening" {
                    let _ = tx.send(json);
                }
            }
        });
        let listening = rx.recv_timeout(Duration::from_secs(30)).expect("a `listening` log line");
        Self { child, listening }
    }

    fn addr(&self, field: &str) -> String {
        self.listening[field].as_str().unwrap_or_default().to_owned()
    }

    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
    }

    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit, which must be 0.
    async fn stop(mut self) {
        self.terminate();
        let status = self.exit(Duration::from_secs(20)).await;
        assert!(status.success(), "{status:?}");
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn targets(ports: &[u16]) -> String {
    ports.iter().map(|p| format!("http://{}", loopback(*p))).collect::<Vec<_>>().join(",")
}

fn start_worker(port: u16, redis: &RedisServer) -> Proc {
    let grpc = loopback(port).to_string();
    let mut list = args(&["--grpc-addr", &grpc, "--admin-addr", "127.0.0.1:0", "--redis-url", &redis.url()]);
    list.extend(args(&["--drain-delay", DRAIN_DELAY, "--shutdown-grace", "10s"]));
    Proc::start(&binary("shoal-worker", "shoal-worker"), &list)
}

fn start_aggregator(port: u16) -> Proc {
    let grpc = loopback(port).to_string();
    let list = args(&["--grpc-addr", &grpc, "--admin-addr", "127.0.0.1:0", "--drain-delay", DRAIN_DELAY]);
    Proc::start(&binary("shoal-metrics-aggregator", "shoal-metrics-aggregator"), &list)
}

fn start_gateway(workers: &[u16], aggregators: &[u16]) -> Proc {
    let mut list = args(&["--http-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--auth", "none"]);
    list.extend(args(&["--worker-addr", &targets(workers), "--aggregator-addr", &targets(aggregators)]));
    list.extend(args(&["--resolve-interval", "1s", "--status-timeout", "5s", "--drain-delay", DRAIN_DELAY]));
    Proc::start(&PathBuf::from(GATEWAY), &list)
}

/// Serving endpoints of one upstream, as the gateway's `/v1/status` says.
async fn serving(http: &reqwest::Client, gateway: &str, component: &str) -> Option<u64> {
    let body: Value = http.get(format!("{gateway}/v1/status")).send().await.ok()?.json().await.ok()?;
    body["components"][component]["endpoints"].as_u64()
}

/// What the load saw.
#[derive(Debug, Default)]
struct Outcome {
    total: AtomicUsize,
    failed: AtomicUsize,
    failures: Mutex<Vec<String>>,
    jobs: Mutex<Vec<String>>,
}

impl Outcome {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("failures");
        if failures.len() < 20 {
            failures.push(what);
        }
    }

    fn report(&self, what: &str) {
        let (total, failed) = (self.total.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        eprintln!("{what}: {failed} failed of {total} requests, {} jobs", self.jobs.lock().expect("jobs").len());
        let failures = self.failures.lock().expect("failures");
        assert_eq!(failed, 0, "failed requests: {failures:#?}");
    }
}

/// What one request of the load is.
#[derive(Debug, Clone, Copy)]
enum Mix {
    /// Tasks, and a job submission every fifth request.
    TasksAndJobs,
    /// `GET /v1/stats`.
    Stats,
}

/// 16 clients calling `base()` (re-read per request) until `stop` is set and
/// at least `at_least` requests were made, bounded by [`LOAD_LIMIT`].
fn load(
    mix: Mix,
    base: Arc<dyn Fn(usize) -> Option<String> + Send + Sync>,
    stop: Arc<AtomicBool>,
    at_least: usize,
) -> (Arc<Outcome>, Vec<tokio::task::JoinHandle<()>>) {
    let outcome = Arc::new(Outcome::default());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
    let started = Instant::now();
    let clients = (0..CLIENTS)
        .map(|client| {
            let (outcome, http, base, stop) = (outcome.clone(), http.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = client;
                while started.elapsed() < LOAD_LIMIT
                    && !(stop.load(Ordering::Relaxed) && outcome.total.load(Ordering::Relaxed) >= at_least)
                {
                    n += CLIENTS;
                    let Some(base) = base(n) else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    outcome.total.fetch_add(1, Ordering::Relaxed);
                    let (request, expected, job) = match mix {
                        Mix::Stats => (http.get(format!("{base}/v1/stats?window=10")), 200, false),
                        Mix::TasksAndJobs if n % 5 == 0 => {
                            let body = json!({"kind": "echo", "payload": {"n": n}});
                            (http.post(format!("{base}/v1/jobs")).json(&body), 202, true)
                        }
                        Mix::TasksAndJobs => {
                            (http.post(format!("{base}/v1/tasks/echo")).json(&json!({"n": n})), 200, false)
                        }
                    };
                    match request.send().await {
                        Ok(response) if response.status().as_u16() == expected => {
                            if job {
                                match response.json::<Value>().await {
                                    Ok(body) => {
                                        let id = body["id"].as_str().unwrap_or_default().to_owned();
                                        outcome.jobs.lock().expect("jobs").push(id);
                                    }
                                    Err(error) => outcome.fail(format!("job body: {error}")),
                                }
                            } else if let Err(error) = response.bytes().await {
                                outcome.fail(format!("body: {error}"));
                            }
                        }
                        Ok(response) => {
                            let status = response.status();
                            let body = response.text().await.unwrap_or_default();
                            outcome.fail(format!("{status}: {body}"));
                        }
                        Err(error) => outcome.fail(format!("transport: {error:?}")),
                    }
                }
            })
        })
        .collect();
    (outcome, clients)
}

async fn finish(stop: &AtomicBool, clients: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("a load client panicked");
    }
}

/// Polls every job until it ended; returns (succeeded, ran more than once).
async fn settle_jobs(http: &reqwest::Client, gateway: &str, jobs: &[String]) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut pending: Vec<&String> = jobs.iter().collect();
    let (mut succeeded, mut retried) = (0, 0);
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for chunk in pending.chunks(CLIENTS) {
            let answers = futures::future::join_all(chunk.iter().map(|id| async move {
                let body: Option<Value> = match http.get(format!("{gateway}/v1/jobs/{id}")).send().await {
                    Ok(response) => response.json().await.ok(),
                    Err(_) => None,
                };
                (*id, body)
            }))
            .await;
            for (id, body) in answers {
                match body.as_ref().and_then(|b| b["state"].as_str()) {
                    Some("succeeded") => {
                        succeeded += 1;
                        if body.as_ref().and_then(|b| b["attempts"].as_u64()).unwrap_or(1) > 1 {
                            retried += 1;
                        }
                    }
                    Some("failed" | "dead" | "cancelled") => panic!("job {id} ended badly: {body:?}"),
                    _ => still.push(id),
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (succeeded, retried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_replaced_one_at_a_time_under_load_fail_no_request_and_no_job() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    // Three slots, each with the port of the replica now and of the next one.
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let mut workers: Vec<Proc> = ports[..3].iter().map(|p| start_worker(*p, &redis)).collect();
    let gateway = start_gateway(&ports, &[free_port()]);
    let url = format!("http://{}", gateway.addr("http_addr"));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(15), "three workers serving", || async {
        (serving(&http, &url, "worker").await == Some(3)).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let base = {
        let url = url.clone();
        Arc::new(move |_| Some(url.clone()))
    };
    let (outcome, clients) = load(Mix::TasksAndJobs, base, stop.clone(), min_requests());
    let rollout = Instant::now();
    for slot in 0..3 {
        let next = start_worker(ports[3 + slot], &redis);
        eventually(Duration::from_secs(15), "the new worker in rotation", || async {
            (serving(&http, &url, "worker").await == Some(4)).then_some(())
        })
        .await;
        let old = std::mem::replace(&mut workers[slot], next);
        old.stop().await;
        eventually(Duration::from_secs(15), "the old worker out of rotation", || async {
            (serving(&http, &url, "worker").await == Some(3)).then_some(())
        })
        .await;
    }
    eprintln!("worker rollout took {:?}", rollout.elapsed());
    finish(&stop, clients).await;
    outcome.report("workers rollout");
    let total = outcome.total.load(Ordering::Relaxed);
    assert!(total >= min_requests(), "only {total} requests within {LOAD_LIMIT:?}");

    let jobs = outcome.jobs.lock().expect("jobs").clone();
    let (succeeded, retried) = settle_jobs(&http, &url, &jobs).await;
    eprintln!("jobs: {succeeded} of {} succeeded, {retried} ran more than once", jobs.len());
    assert_eq!(succeeded, jobs.len(), "every submitted job succeeds");
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_aggregators_replaced_one_at_a_time_under_stats_load_fail_no_request() {
    shoal_telemetry::init_for_tests();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut aggregators: Vec<Proc> = ports[..2].iter().map(|p| start_aggregator(*p)).collect();
    let gateway = start_gateway(&[free_port()], &ports);
    let url = format!("http://{}", gateway.addr("http_addr"));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(15), "two aggregators serving", || async {
        (serving(&http, &url, "aggregator").await == Some(2)).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let base = {
        let url = url.clone();
        Arc::new(move |_| Some(url.clone()))
    };
    let (outcome, clients) = load(Mix::Stats, base, stop.clone(), 1_000);
    for slot in 0..2 {
        let next = start_aggregator(ports[2 + slot]);
        eventually(Duration::from_secs(15), "the new aggregator in rotation", || async {
            (serving(&http, &url, "aggregator").await == Some(3)).then_some(())
        })
        .await;
        let old = std::mem::replace(&mut aggregators[slot], next);
        old.stop().await;
        eventually(Duration::from_secs(15), "the old aggregator out of rotation", || async {
            (serving(&http, &url, "aggregator").await == Some(2)).then_some(())
        })
        .await;
    }
    finish(&stop, clients).await;
    outcome.report("aggregators rollout");
    drop(aggregators);
}

/// Gateways a client may use: those whose `/readyz` answered `200` at the
/// last poll, as a Kubernetes Service's endpoints.
#[derive(Debug, Default)]
struct ReadyList {
    /// (public URL, admin URL) of every gateway started.
    known: Mutex<Vec<(String, String)>>,
    ready: RwLock<Vec<String>>,
}

impl ReadyList {
    fn add(&self, gateway: &Proc) {
        let urls = (format!("http://{}", gateway.addr("http_addr")), format!("http://{}", gateway.addr("admin_addr")));
        self.known.lock().expect("known").push(urls);
    }

    fn pick(&self, n: usize) -> Option<String> {
        let ready = self.ready.read().expect("ready");
        (!ready.is_empty()).then(|| ready[n % ready.len()].clone())
    }

    fn len(&self) -> usize {
        self.ready.read().expect("ready").len()
    }

    async fn poll(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().expect("client");
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT + Duration::from_secs(15) {
            let known = self.known.lock().expect("known").clone();
            let mut ready = Vec::new();
            for (public, admin) in known {
                if let Ok(response) = http.get(format!("{admin}/readyz")).send().await
                    && response.status() == 200
                {
                    ready.push(public);
                }
            }
            *self.ready.write().expect("ready") = ready;
            tokio::time::sleep(READY_POLL).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_replaced_one_at_a_time_behind_a_readiness_aware_client_fail_no_request() {
    shoal_telemetry::init_for_tests();
    let redis = RedisServer::start();
    let worker_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let workers: Vec<Proc> = worker_ports.iter().map(|p| start_worker(*p, &redis)).collect();
    let aggregator = [free_port()];
    let list = Arc::new(ReadyList::default());
    let mut gateways: Vec<Proc> = (0..2).map(|_| start_gateway(&worker_ports, &aggregator)).collect();
    for gateway in &gateways {
        list.add(gateway);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(list.clone().poll(stop.clone()));
    eventually(Duration::from_secs(15), "two gateways ready", || async { (list.len() == 2).then_some(()) }).await;

    let load_stop = Arc::new(AtomicBool::new(false));
    let base = {
        let list = list.clone();
        Arc::new(move |n| list.pick(n))
    };
    let (outcome, clients) = load(Mix::TasksAndJobs, base, load_stop.clone(), 2_000);
    for gateway in &mut gateways {
        let next = start_gateway(&worker_ports, &aggregator);
        list.add(&next);
        eventually(Duration::from_secs(15), "the new gateway ready", || async { (list.len() == 3).then_some(()) })
            .await;
        let old = std::mem::replace(gateway, next);
        old.stop().await;
        eventually(Duration::from_secs(15), "the old gateway dropped", || async { (list.len() == 2).then_some(()) })
            .await;
    }
    finish(&load_stop, clients).await;
    stop.store(true, Ordering::Relaxed);
    poller.await.expect("poller");
    outcome.report("gateways rollout");
    drop((gateways, workers));
}
