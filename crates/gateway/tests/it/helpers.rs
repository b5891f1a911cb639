//! `spawn_*` helpers that start the real services on port 0 and stop them
//! when dropped, and bounded polling.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser as _;
use serde_json::Value;
use shoal_gateway::discovery::StaticResolver;
use shoal_gateway::{Config, Gateway, Upstreams};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker serving in this process; stops when dropped.
pub struct TestWorker {
    pub addr: SocketAddr,
    pub id: String,
    pub stats: shoal_worker::Stats,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<()>,
}

pub async fn spawn_worker(extra: &[&str]) -> TestWorker {
    let mut args = vec!["shoal-worker", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let config = shoal_worker::Config::try_parse_from(args).expect("worker config");
    let worker = shoal_worker::Worker::bind(config).await.expect("worker binds");
    let (addr, id, stats) = (worker.grpc_addr(), worker.worker_id(), worker.stats());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = worker
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    TestWorker { addr, id, stats, _stop: stop, _task: task }
}

/// An aggregator serving in this process.
pub struct TestAggregator {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestAggregator {
    /// Stops it and waits until it has stopped.
    pub async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

pub async fn spawn_aggregator() -> TestAggregator {
    let config = shoal_metrics_aggregator::Config::try_parse_from([
        "shoal-metrics-aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--shutdown-grace",
        "1s",
    ])
    .expect("aggregator config");
    let aggregator = shoal_metrics_aggregator::Aggregator::bind(config).await.expect("aggregator binds");
    let addr = aggregator.grpc_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = aggregator
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    TestAggregator { addr, stop: Some(stop), task: Some(task) }
}

/// An address where nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// A gateway serving in this process, with test resolvers for its upstreams.
pub struct TestGateway {
    pub url: String,
    pub admin_url: String,
    pub http: reqwest::Client,
    pub workers: StaticResolver,
    pub aggregators: StaticResolver,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<()>,
}

pub async fn spawn_gateway(workers: &[SocketAddr], aggregators: &[SocketAddr], extra: &[&str]) -> TestGateway {
    let mut args = vec![
        "shoal-gateway",
        "--http-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--resolve-interval",
        "100ms",
        "--shutdown-grace",
        "2s",
    ];
    if !extra.iter().any(|arg| *arg == "--auth" || *arg == "--api-keys-file") {
        args.extend(["--auth", "none"]);
    }
    args.extend_from_slice(extra);
    let config = Config::try_parse_from(args).expect("gateway config");
    let worker_resolver = StaticResolver::new(workers.iter().copied());
    let aggregator_resolver = StaticResolver::new(aggregators.iter().copied());
    let upstreams = Upstreams {
        worker: std::sync::Arc::new(worker_resolver.clone()),
        aggregator: std::sync::Arc::new(aggregator_resolver.clone()),
    };
    let gateway = Gateway::bind_with(config, upstreams).await.expect("gateway binds");
    let url = format!("http://{}", gateway.http_addr());
    let admin_url = format!("http://{}", gateway.admin_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = gateway
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    TestGateway {
        url,
        admin_url,
        http,
        workers: worker_resolver,
        aggregators: aggregator_resolver,
        _stop: stop,
        _task: task,
    }
}

impl TestGateway {
    /// `POST /v1/tasks/{kind}` with a JSON body.
    pub async fn task(&self, kind: &str, payload: Value) -> reqwest::Response {
        self.http.post(format!("{}/v1/tasks/{kind}", self.url)).json(&payload).send().await.expect("request")
    }
}

/// Asserts a problem+json answer with `status`, returns its body.
pub async fn expect_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "{body}");
    for member in ["type", "title", "detail", "instance", "request_id"] {
        assert!(body[member].is_string(), "problem lacks `{member}`: {body}");
    }
    body
}

/// The problem's detail.
pub fn detail(problem: &Value) -> &str {
    problem["detail"].as_str().unwrap_or_default()
}
