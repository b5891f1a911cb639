//! Load driver for `scripts/bench-jobs`: submits no-op jobs through the
//! gateway's HTTP API with bounded concurrency — one job per `POST /v1/jobs`,
//! or `BATCH` jobs per `POST /v1/jobs:batch` — then waits until the queue has
//! none left unfinished (Redis `{prefix}:open` = 0, through [`shoal_worker::jobs::Keys`]), checks that every job
//! succeeded, and prints one JSON line: jobs, seconds, jobs per second,
//! submission latency quantiles (per HTTP call), end-to-end latency
//! quantiles (the client's send time to the job's `finished_ms`, which the
//! worker's scripts take from Redis' clock on this same machine; 1 ms
//! resolution), errors.
//!
//! ```sh
//! cargo run --release -p shoal-worker --example jobs_load -- \
//!     http://127.0.0.1:8080 redis://127.0.0.1:6379 shoal 5000 32 [BATCH]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands as _;
use tokio::sync::Semaphore;

/// Prints the first failed call (status and body, or the error) to stderr,
/// so a run that counts only errors says why.
fn report_first_failure(what: String) {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| eprintln!("jobs_load: first failed call: {what}"));
}

async fn describe(response: Result<reqwest::Response, reqwest::Error>) -> String {
    match response {
        Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
        Err(e) => format!("{e:?}"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One HTTP call: the ids of the jobs it queued, when it was sent, how long it took.
struct Sent {
    ids: Vec<String>,
    sent_unix_ms: u64,
    latency: Duration,
    errors: usize,
}

async fn submit(http: &reqwest::Client, gateway: &str, batch: usize) -> Sent {
    let sent_unix_ms = unix_ms();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(batch);
    let mut errors = 0;
    if batch <= 1 {
        let response = http
            .post(format!("{gateway}/v1/jobs"))
            .header("content-type", "application/json")
            .body(r#"{"kind":"echo","payload":null}"#)
            .send()
            .await;
        match response {
            Ok(r) if r.status().as_u16() == 202 => match r.json::<serde_json::Value>().await {
                Ok(job) => ids.extend(job["id"].as_str().map(str::to_owned)),
                Err(_) => errors += 1,
            },
            other => {
                report_first_failure(describe(other).await);
                errors += 1;
            }
        }
    } else {
        let items = vec![r#"{"kind":"echo","payload":null}"#; batch].join(",");
        let response = http
            .post(format!("{gateway}/v1/jobs:batch"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"jobs":[{items}]}}"#))
            .send()
            .await;
        match response {
            Ok(r) if r.status().as_u16() == 200 => match r.json::<serde_json::Value>().await {
                Ok(answer) => {
                    for result in answer["results"].as_array().into_iter().flatten() {
                        match result["job"]["id"].as_str() {
                            Some(id) if result["outcome"] == "accepted" => ids.push(id.to_owned()),
                            _ => errors += 1,
                        }
                    }
                }
                Err(_) => errors += batch,
            },
            other => {
                report_first_failure(describe(other).await);
                errors += batch;
            }
        }
    }
    Sent { ids, sent_unix_ms, latency: started.elapsed(), errors }
}

fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (gateway, redis_url, prefix, jobs, concurrency, batch) = match args.as_slice() {
        [_, g, r, p, j, c] => (g, r, p, j, c, "1"),
        [_, g, r, p, j, c, b] => (g, r, p, j, c, b.as_str()),
        _ => return Err("usage: jobs_load GATEWAY_URL REDIS_URL PREFIX JOBS CONCURRENCY [BATCH]".into()),
    };
    let jobs: usize = jobs.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let batch: usize = batch.parse::<usize>()?.max(1);
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(concurrency).timeout(Duration::from_secs(30)).build()?;
    let client = redis::Client::open(redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let keys = shoal_worker::jobs::Keys::new(prefix);
    let open_key = keys.open();

    let limit = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut left = jobs;
    while left > 0 {
        let n = batch.min(left);
        left -= n;
        let permit = limit.clone().acquire_owned().await?;
        let (http, gateway) = (http.clone(), gateway.clone());
        tasks.spawn(async move {
            let sent = submit(&http, &gateway, n).await;
            drop(permit);
            sent
        });
    }
    let mut calls = Vec::with_capacity(jobs / batch + 1);
    while let Some(result) = tasks.join_next().await {
        calls.push(result?);
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

    // Every queued job must have succeeded; its end-to-end latency is its
    // finished_ms minus its call's send time.
    let mut errors: usize = calls.iter().map(|c| c.errors).sum();
    let mut e2e_ms = Vec::with_capacity(jobs);
    let jobs_sent: Vec<(&str, u64)> =
        calls.iter().flat_map(|c| c.ids.iter().map(move |id| (id.as_str(), c.sent_unix_ms))).collect();
    for chunk in jobs_sent.chunks(1000) {
        let mut pipe = redis::pipe();
        for (id, _) in chunk {
            pipe.cmd("HMGET").arg(keys.job(id)).arg("state").arg("finished_ms");
        }
        let replies: Vec<(Option<String>, Option<u64>)> = pipe.query_async(&mut redis).await?;
        for ((_, sent), (state, finished)) in chunk.iter().zip(replies) {
            match (state.as_deref(), finished) {
                (Some("succeeded"), Some(finished)) => e2e_ms.push(finished.saturating_sub(*sent)),
                _ => errors += 1,
            }
        }
    }
    let done = e2e_ms.len();
    e2e_ms.sort_unstable();
    let mut latencies: Vec<Duration> = calls.iter().map(|c| c.latency).collect();
    latencies.sort();
    let submit_ms = |q: f64| quantile(&latencies, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let e2e = |q: f64| quantile(&e2e_ms, q).unwrap_or(0) as f64;
    let system = if batch > 1 { format!("shoal-batch{batch}") } else { "shoal".to_owned() };
    println!(
        "{}",
        serde_json::json!({
            "system": system,
            "jobs": done,
            "errors": errors,
            "concurrency": concurrency,
            "batch": batch,
            "submit_seconds": submitted_in.as_secs_f64(),
            "seconds": total.as_secs_f64(),
            "jobs_per_second": done as f64 / total.as_secs_f64(),
            "submit_p50_ms": submit_ms(0.50),
            "submit_p99_ms": submit_ms(0.99),
            "e2e_p50_ms": e2e(0.50),
            "e2e_p99_ms": e2e(0.99),
        })
    );
    Ok(())
}
