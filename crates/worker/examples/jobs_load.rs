//! Load driver for `scripts/bench-jobs`: submits no-op jobs through the
//! gateway's HTTP API with bounded concurrency, then waits until the queue has
//! none left unfinished (Redis `{prefix}:open` = 0), and prints one JSON line:
//! jobs, seconds, jobs per second, submission latency quantiles, errors.
//!
//! ```sh
//! cargo run --release -p shoal-worker --example jobs_load -- \
//!     http://127.0.0.1:8080 redis://127.0.0.1:6379 shoal 5000 32
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, gateway, redis_url, prefix, jobs, concurrency] = args.as_slice() else {
        return Err("usage: jobs_load GATEWAY_URL REDIS_URL PREFIX JOBS CONCURRENCY".into());
    };
    let jobs: usize = jobs.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(concurrency).timeout(Duration::from_secs(30)).build()?;
    let client = redis::Client::open(redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let open_key = format!("{prefix}:open");
    let url = format!("{gateway}/v1/jobs");

    let limit = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let permit = limit.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let ok = http
                .post(&url)
                .header("content-type", "application/json")
                .body(r#"{"kind":"echo","payload":null}"#)
                .send()
                .await
                .map(|r| r.status().as_u16() == 202)
                .unwrap_or(false);
            drop(permit);
            (ok, sent.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(jobs);
    let mut errors = 0usize;
    while let Some(result) = tasks.join_next().await {
        let (ok, latency) = result?;
        if ok {
            latencies.push(latency);
        } else {
            errors += 1;
        }
    }
    let submitted_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let open: Option<i64> = redis.get(&open_key).await?;
        if open.unwrap_or(0) <= 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{} jobs still unfinished after 300 s", open.unwrap_or(0)).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    latencies.sort();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let done = jobs - errors;
    println!(
        "{}",
        serde_json::json!({
            "system": "shoal",
            "jobs": done,
            "errors": errors,
            "concurrency": concurrency,
            "submit_seconds": submitted_in.as_secs_f64(),
            "seconds": total.as_secs_f64(),
            "jobs_per_second": done as f64 / total.as_secs_f64(),
            "submit_p50_ms": quantile(0.50),
            "submit_p99_ms": quantile(0.99),
        })
    );
    Ok(())
}
