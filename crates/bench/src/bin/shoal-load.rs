//! `shoal-load`: the load generator and start-up timer of `scripts/bench`.
//!
//! ```text
//! shoal-load run --url http://127.0.0.1:8080/ --mode open --rate 5000 --duration 10s
//! shoal-load run --url http://127.0.0.1:8080/ --mode closed --connections 64 --duration 10s
//! shoal-load run --url http://127.0.0.1:8080/?delay_ms=1000 --mode closed \
//!     --connections 1000 --requests-per-connection 3
//! shoal-load run --protocol grpc --url http://127.0.0.1:50051 --kind echo --mode open --rate 5000
//! shoal-load startup --ready-url http://127.0.0.1:9090/readyz --runs 5 -- target/release/shoal-gateway …
//! ```
//! `run` prints one JSON report on stdout (see `shoal_bench::load::Report`)
//! and a one-line summary on stderr; SIGINT or SIGTERM ends its schedule
//! early and still prints the report of what was scheduled before it.
//! `startup` prints one JSON object.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_bench::load::{self, LoadConfig, parse_duration};
use shoal_bench::startup;

#[derive(Parser)]
#[command(name = "shoal-load", version, about = "Shoal's open/closed-loop load generator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply load and report latency and throughput as JSON.
    Run {
        #[command(flatten)]
        config: Box<LoadConfig>,
        /// Runtime threads (1: a single-threaded runtime, for a generator
        /// pinned to one core).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Time from exec to ready of a service, `--runs` times.
    Startup {
        /// Readiness URL, `http://IP:PORT/path`, polled until it answers 200.
        #[arg(long)]
        ready_url: String,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value = "1ms", value_parser = parse_duration)]
        poll: Duration,
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        deadline: Duration,
        #[arg(long, default_value = "")]
        label: String,
        /// The service's command line.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run { config, threads } => {
            let runtime = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
            };
            let report = runtime.block_on(async {
                let stop = stop_signal()?;
                anyhow::Ok(load::run_until(*config, stop).await?)
            })?;
            eprintln!(
                "{:<28} {:>9.0} req/s  ok {:>8}  err {:>5}  timeout {:>5}  unfinished {:>5}  p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
                report.label,
                report.achieved_rps,
                report.ok,
                report.errors,
                report.timeouts,
                report.unfinished,
                report.latency.p50_ms,
                report.latency.p99_ms,
                report.latency.max_ms
            );
            println!("{}", serde_json::to_string(&report)?);
            // Connections of a timed-out run may still be open: do not wait.
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
        Cmd::Startup { ready_url, runs, poll, deadline, label, command } => {
            let rest = ready_url.strip_prefix("http://").context("--ready-url must start with http://")?;
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let addr: SocketAddr = authority.parse().context("--ready-url needs an IP:PORT")?;
            let path = if path.is_empty() { "/" } else { path };
            let mut results = Vec::with_capacity(runs);
            for _ in 0..runs.max(1) {
                results.push(startup::measure(&command, addr, path, poll, deadline)?);
            }
            let median = |f: &dyn Fn(&startup::Startup) -> Option<f64>| {
                let mut v: Vec<f64> = results.iter().filter_map(f).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| v[v.len() / 2])
            };
            let summary = serde_json::json!({
                "label": label,
                "command": command,
                "runs": results,
                "ready_ms_median": median(&|s| Some(s.ready_ms)),
                "listening_log_ms_median": median(&|s| s.listening_log_ms),
                "rss_at_ready_kib_median": median(&|s| s.rss_at_ready_kib.map(|k| k as f64)),
                "exit_ms_median": median(&|s| Some(s.exit_ms)),
            });
            println!("{summary}");
        }
    }
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM (installed before the run starts,
/// so an early signal is not lost).
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
