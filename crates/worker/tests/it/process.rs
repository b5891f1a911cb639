//! The real binary: start-up output, SIGTERM, bad configuration.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;

use crate::helpers::{connect, execute};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_shoal-worker");

/// A worker process, killed if the test ends early.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) admin_addr: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary on port 0 and reads its addresses from the
    /// `listening` log line.
    pub(crate) fn start(extra: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log-filter", "info"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start shoal-worker");
        let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut process = Self { child, grpc_addr: unbound, admin_addr: unbound };
        let stdout = process.child.stdout.take().expect("piped stdout");
        let (lines, received) = mpsc::channel();
        // Keeps draining stdout so the child never blocks on a full pipe.
        // SHOAL_TEST_WORKER_LOGS=1 copies the worker's log lines to stderr.
        let echo = std::env::var_os("SHOAL_TEST_WORKER_LOGS").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{line}");
                }
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = received.recv_timeout(left).expect("a `listening` line within 20 s");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if event["message"] == "listening" {
                let addr = |field: &str| event[field].as_str().and_then(|a| a.parse().ok()).expect(field);
                (process.grpc_addr, process.admin_addr) = (addr("grpc_addr"), addr("admin_addr"));
                return process;
            }
        }
    }

    pub(crate) fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `within`.
    pub(crate) async fn exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
}

#[tokio::test]
async fn sigterm_keeps_serving_through_the_drain_delay_then_finishes_in_flight_calls_and_exits_zero() {
    let mut process = Process::start(&["--shutdown-grace", "10s", "--drain-delay", "1s"]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    assert_eq!(http.get(process.admin_url("/readyz")).send().await.unwrap().status(), 200);

    let channel = connect(process.grpc_addr).await.unwrap();
    let mut client = WorkerServiceClient::new(channel.clone());
    let call = tokio::spawn(async move { client.execute(execute("sleep", r#"{"ms": 2500}"#, None)).await });
    let mut in_flight = false;
    for _ in 0..250 {
        let metrics = http.get(process.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|line| line == "worker_tasks_in_flight 1") {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight, "the sleep never started");

    process.terminate();
    let mut draining = false;
    for _ in 0..100 {
        match http.get(process.admin_url("/readyz")).send().await {
            Ok(response) if response.status() == 503 => {
                draining = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    assert!(draining, "/readyz never answered 503 during the drain");

    // Not ready, but a new call during the drain delay is still served: a
    // client that has not noticed yet loses nothing.
    WorkerServiceClient::new(channel.clone())
        .execute(execute("echo", "1", Some(Duration::from_secs(2))))
        .await
        .expect("a new call during the drain delay is served");

    // After the delay the worker accepts no new connection; the call
    // started before the signal still completes.
    let response = call.await.unwrap().expect("the in-flight call completes");
    assert!(response.into_inner().output_json.contains("2500"));
    let status = process.exit(Duration::from_secs(10)).await.expect("exits after the drain");
    assert!(status.success(), "{status:?}");
    assert!(connect(process.grpc_addr).await.is_err(), "nothing listens after the exit");
}

#[tokio::test]
async fn an_idle_worker_exits_promptly_on_sigterm() {
    // The default drain delay (5 s) ends at once: no connection was ever opened.
    let mut process = Process::start(&[]);
    process.terminate();
    let status = process.exit(Duration::from_secs(3)).await.expect("exits within 3 s");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn an_invalid_setting_stops_start_up_with_a_message() {
    let output = Command::new(BIN)
        .env("SHOAL_WORKER_MAX_CONCURRENCY", "abc")
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .expect("run shoal-worker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-concurrency"), "{stderr}");
    assert!(stderr.contains("SHOAL_WORKER_MAX_CONCURRENCY"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
}
