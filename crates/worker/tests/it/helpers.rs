//! Starting a worker in-process and talking to it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use shoal_proto::worker::v1::ExecuteRequest;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_worker::{Config, RunError, Stats, Worker};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// A running worker and typed clients for it.
pub struct TestWorker {
    pub client: WorkerServiceClient<Channel>,
    pub channel: Channel,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub worker_id: String,
    pub stats: Stats,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

impl TestWorker {
    /// Triggers shutdown and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("worker stops").expect("no panic")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts a worker on 127.0.0.1:0 with `extra` flags.
pub async fn spawn_worker(extra: &[&str]) -> TestWorker {
    shoal_telemetry::init_for_tests();
    let mut args = vec!["shoal-worker", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let config = Config::try_parse_from(args).expect("valid test config");
    let worker = Worker::bind(config).await.expect("bind on port 0");
    let (grpc_addr, admin_addr, worker_id, stats) =
        (worker.grpc_addr(), worker.admin_addr(), worker.worker_id(), worker.stats());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let channel = connect(grpc_addr).await.expect("connect to the worker");
    TestWorker {
        client: WorkerServiceClient::new(channel.clone()),
        channel,
        grpc_addr,
        admin_addr,
        worker_id,
        stats,
        stop: Some(stop),
        task: Some(task),
    }
}

pub async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// An `Execute` request, optionally with a client deadline.
pub fn execute(kind: &str, payload: &str, timeout: Option<Duration>) -> tonic::Request<ExecuteRequest> {
    let mut request = tonic::Request::new(ExecuteRequest { kind: kind.into(), payload_json: payload.into() });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// Polls `condition` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many entries of the job stream of queue `prefix` `consumer` holds
/// (delivered, not acknowledged).
pub async fn held_by(redis: &shoal_testkit::RedisServer, prefix: &str, consumer: &str) -> usize {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(shoal_worker::jobs::Keys::new(prefix).stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer)
        .query_async(&mut conn)
        .await
        .expect("xpending");
    reply.ids.len()
}
