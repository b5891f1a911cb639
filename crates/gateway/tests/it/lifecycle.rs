//! The real binary: start-up, SIGTERM with a request in flight, bad config.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-gateway");

/// Kills the child if a test fails before it exits.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `extra` flags; also returns the log lines before
/// `listening`.
pub fn start_with(worker: std::net::SocketAddr, extra: &[&str]) -> (Process, String, String, Vec<Value>) {
    let mut child = Command::new(BIN)
        .args(["--http-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--shutdown-grace", "10s"])
        .args(extra)
        .args(["--worker-addr", &format!("http://{worker}"), "--aggregator-addr", "http://127.0.0.1:9"])
        .env("SHOAL_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the gateway binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, Vec<Value>)>();
    std::thread::spawn(move || {
        let mut before = Vec::new();
        // Reads every line (so the pipe never fills) until the process exits.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(json) = serde_json::from_str::<Value>(&line) else { continue };
            if json["message"] == "listening" {
                let field = |name: &str| json[name].as_str().unwrap_or_default().to_owned();
                let _ = tx.send((field("http_addr"), field("admin_addr"), std::mem::take(&mut before)));
            } else {
                before.push(json);
            }
        }
    });
    let (http, admin, before) = rx.recv_timeout(Duration::from_secs(20)).expect("a `listening` log line");
    (Process(child), format!("http://{http}"), format!("http://{admin}"), before)
}

fn wait_exit(process: &mut Process, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let (mut process, url, admin_url, _) = start_with(worker.addr, &["--auth", "none", "--drain-delay", "2s"]);
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{url}/")).send().await.unwrap().status(), 200);

    // Longer than the drain delay: still in flight when the gateway stops
    // accepting.
    let slow = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move { http.get(format!("{url}/?delay_ms=3500")).send().await }
    });
    // Bounded poll until the gateway reports the request in flight.
    let in_flight = eventually(Duration::from_secs(5), || async {
        let text = http.get(format!("{admin_url}/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines()
            .filter_map(|l| l.strip_prefix("gateway_http_requests_in_flight "))
            .any(|v| v.trim().parse::<f64>().is_ok_and(|v| v >= 1.0))
            .then_some(())
    })
    .await;
    assert!(in_flight.is_some(), "the slow request never showed as in flight");

    let pid = process.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success());
    // `kill` returns once the signal is sent, not once it is handled: the
    // drain has begun when readiness turns false.
    let unready = eventually(Duration::from_secs(5), || async {
        let status = http.get(format!("{admin_url}/readyz")).send().await.ok()?.status();
        (status == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "readiness still true 5 s after SIGTERM");

    // Through the drain delay a new client is still served, told to close;
    // a client that keeps connecting keeps the delay from ending early, so
    // the full delay (2 s) passes, then new connections are refused.
    let served = reqwest::Client::new().get(format!("{url}/")).send().await.expect("served while draining");
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["connection"], "close");
    let refused = eventually(Duration::from_secs(5), || async {
        let fresh = reqwest::Client::new();
        fresh.get(format!("{url}/")).send().await.is_err().then_some(())
    })
    .await;
    assert!(refused.is_some(), "new requests still accepted 5 s after SIGTERM (drain delay 2 s)");

    let response = slow.await.unwrap().expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"], "Hello, Prometheus!");

    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut process, Duration::from_secs(10));
        (status, process)
    })
    .await
    .unwrap()
    .0
    .expect("the gateway exits after the drain");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn invalid_config_exits_non_zero_naming_the_setting_before_binding() {
    // A port the test holds: had the gateway bound anything, it would fail
    // with a bind error instead of the config error.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    /// Flags, environment, and the setting the error must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 5] = [
        (&[], &[], "SHOAL_GATEWAY_API_KEYS_FILE"),
        (&["--worker-addr", "ftp://x:1"], &[], "--worker-addr"),
        (&[], &[("SHOAL_GATEWAY_MAX_IN_FLIGHT", "0")], "SHOAL_GATEWAY_MAX_IN_FLIGHT"),
        (&["--default-timeout", "90s"], &[], "SHOAL_GATEWAY_MAX_TIMEOUT"),
        (&["--resolve-interval", "soon"], &[], "--resolve-interval"),
    ];
    for (args, env, expected) in cases {
        let output = Command::new(BIN)
            .args(["--http-addr", &taken, "--admin-addr", &taken])
            .env_remove("SHOAL_GATEWAY_AUTH")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
        assert!(!stderr.contains("cannot bind"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn running_without_authentication_is_a_warning_at_start() {
    let worker = spawn_worker(&[]).await;
    let (_process, _, _, before) = start_with(worker.addr, &["--auth", "none"]);
    let warning = before.iter().find(|line| line["message"].as_str().unwrap_or_default().contains("--auth none"));
    let warning = warning.unwrap_or_else(|| panic!("no --auth none line before `listening`: {before:?}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
}
