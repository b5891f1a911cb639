use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use shoal_bench::load::{self, LoadConfig, Mode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    config: LoadConfig,
}

fn config(args: &[&str]) -> LoadConfig {
    Args::try_parse_from(std::iter::once("shoal-load").chain(args.iter().copied())).expect("valid flags").config
}

/// The bare hello server on port 0; stops when the sender is dropped.
async fn spawn_hello() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(shoal_bench::hello::serve(listener, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

#[tokio::test]
async fn open_loop_sends_exactly_the_schedule() {
    let (addr, _stop) = spawn_hello().await;
    let url = format!("http://{addr}/");
    let report = load::run(config(&[
        "--url",
        &url,
        "--mode",
        "open",
        "--rate",
        "200",
        "--duration",
        "500ms",
        "--warmup",
        "100ms",
        "--connections",
        "4",
    ]))
    .await
    .unwrap();
    assert_eq!(report.mode, Mode::Open);
    assert_eq!(report.sent, 100, "200/s for 0.5 s");
    assert_eq!(report.ok, 100, "{report:?}");
    assert_eq!((report.errors, report.timeouts, report.unfinished), (0, 0, 0));
    assert_eq!(report.latency.count, 100);
    assert!(report.latency.p50_ms > 0.0 && report.latency.p50_ms <= report.latency.p99_ms);
}

#[tokio::test]
async fn closed_loop_counts_every_request_of_every_connection() {
    let (addr, _stop) = spawn_hello().await;
    let url = format!("http://{addr}/");
    let report =
        load::run(config(&["--url", &url, "--mode", "closed", "--connections", "8", "--requests-per-connection", "5"]))
            .await
            .unwrap();
    assert_eq!((report.sent, report.ok, report.errors, report.unfinished), (40, 40, 0, 0), "{report:?}");
    assert!(report.achieved_rps > 0.0);
}

#[tokio::test]
async fn non_2xx_answers_are_errors_by_status() {
    let (addr, _stop) = spawn_hello().await;
    let url = format!("http://{addr}/missing");
    let report =
        load::run(config(&["--url", &url, "--mode", "closed", "--connections", "2", "--requests-per-connection", "3"]))
            .await
            .unwrap();
    assert_eq!(report.ok, 0);
    assert_eq!(report.errors, 6);
    assert_eq!(report.error_kinds.get("status 404"), Some(&6), "{:?}", report.error_kinds);
}

#[tokio::test]
async fn a_silent_server_gives_timeouts_and_the_run_still_ends() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let url = format!("http://{addr}/");
    let run = load::run(config(&[
        "--url",
        &url,
        "--mode",
        "closed",
        "--connections",
        "3",
        "--requests-per-connection",
        "2",
        "--timeout",
        "100ms",
    ]));
    let report = tokio::time::timeout(Duration::from_secs(30), run).await.expect("bounded").unwrap();
    assert_eq!((report.ok, report.timeouts), (0, 6), "{report:?}");
}

#[tokio::test]
async fn refused_connections_are_errors() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/");
    let report =
        load::run(config(&["--url", &url, "--mode", "closed", "--connections", "2", "--requests-per-connection", "2"]))
            .await
            .unwrap();
    assert_eq!(report.ok, 0);
    assert_eq!(report.error_kinds.get("connect ConnectionRefused"), Some(&4), "{:?}", report.error_kinds);
}

#[test]
fn open_loop_needs_a_rate() {
    assert!(Args::try_parse_from(["shoal-load", "--url", "http://127.0.0.1:1/", "--mode", "open"]).is_err());
}

#[tokio::test]
async fn a_ramped_closed_loop_still_sends_every_request() {
    let (addr, _stop) = spawn_hello().await;
    let url = format!("http://{addr}/");
    let report = load::run(config(&[
        "--url",
        &url,
        "--mode",
        "closed",
        "--connections",
        "10",
        "--requests-per-connection",
        "2",
        "--ramp",
        "100ms",
    ]))
    .await
    .unwrap();
    assert_eq!((report.sent, report.ok, report.errors, report.unfinished), (20, 20, 0, 0), "{report:?}");
    assert!(report.achieved_rps > 0.0);
}

#[tokio::test]
async fn an_early_stop_ends_the_schedule_and_reports_what_was_scheduled_before_it() {
    let (addr, _stop) = spawn_hello().await;
    let url = format!("http://{addr}/");
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(load::run_until(
        config(&[
            "--url",
            &url,
            "--mode",
            "open",
            "--rate",
            "200",
            "--duration",
            "60s",
            "--warmup",
            "0s",
            "--connections",
            "4",
        ]),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run ends soon after the stop")
        .unwrap()
        .unwrap();
    // Not the 12,000 requests of the full minute: about 0.5 s worth.
    assert!(report.sent > 0 && report.sent < 1_000, "{report:?}");
    assert_eq!(report.ok, report.sent, "every request scheduled before the stop completed: {report:?}");
    assert_eq!((report.errors, report.timeouts, report.unfinished), (0, 0, 0));
    assert!(report.window_s < 5.0, "{report:?}");
}
