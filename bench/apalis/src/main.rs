//! The apalis side of `scripts/bench-jobs`: the same no-op job as Shoal's
//! and arq's, on `apalis-redis` (the Redis backend apalis documents), with a
//! worker written as apalis' README shows (`WorkerBuilder`, `.backend(..)`,
//! `.concurrency(n)`, `.parallelize(tokio::spawn)`, `.data(..)`).
//!
//! ```sh
//! apalis-bench worker REDIS_URL SLOTS JOBS DONE_FILE   # runs until JOBS jobs ran, writes DONE_FILE
//! apalis-bench load REDIS_URL JOBS CONCURRENCY DONE_FILE
//! ```
//!
//! The job carries the client's submission time (Unix µs); the worker
//! records `now - sent` when the job has run (end-to-end latency, submit →
//! done), and after `JOBS` jobs writes the quantiles to `DONE_FILE`. The
//! load driver submits `JOBS` jobs with `CONCURRENCY` pushes in flight, then
//! waits for `DONE_FILE` and prints one JSON line like Shoal's and arq's
//! drivers do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    sent_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[derive(Debug)]
struct Done {
    expected: usize,
    count: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
    file: String,
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |us| *us as f64 / 1000.0)
}

async fn noop(job: Noop, done: Data<Arc<Done>>, worker: WorkerContext) -> Result<(), BoxDynError> {
    let latency = now_us().saturating_sub(job.sent_us);
    let n = {
        let mut latencies = done.latencies_us.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latencies.push(latency);
        done.count.fetch_add(1, Ordering::SeqCst) + 1
    };
    if n == done.expected {
        let mut latencies =
            std::mem::take(&mut *done.latencies_us.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        latencies.sort_unstable();
        let line = serde_json::json!({
            "done_unix_us": now_us(),
            "e2e_p50_ms": quantile(&latencies, 0.50),
            "e2e_p99_ms": quantile(&latencies, 0.99),
        });
        let staged = format!("{}.tmp", done.file);
        std::fs::write(&staged, line.to_string())?;
        std::fs::rename(&staged, &done.file)?;
        let _ = worker.stop();
    }
    Ok(())
}

async fn worker(redis_url: &str, slots: usize, jobs: usize, file: String) -> Result<(), BoxDynError> {
    let conn = apalis_redis::connect(redis_url).await?;
    let storage: RedisStorage<Noop, _> = RedisStorage::new(conn);
    let done = Arc::new(Done {
        expected: jobs,
        count: AtomicUsize::new(0),
        latencies_us: Mutex::new(Vec::with_capacity(jobs)),
        file,
    });
    WorkerBuilder::new("bench-apalis")
        .backend(storage)
        .concurrency(slots)
        .parallelize(tokio::spawn)
        .data(done)
        .build(noop)
        .run()
        .await?;
    Ok(())
}

async fn load(redis_url: &str, jobs: usize, concurrency: usize, file: &str) -> Result<(), BoxDynError> {
    let conn = apalis_redis::connect(redis_url).await?;
    let storage: RedisStorage<Noop, _> = RedisStorage::new(conn);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = jobs.div_ceil(concurrency);
    for t in 0..concurrency {
        let mut storage = storage.clone();
        let n = per_task.min(jobs.saturating_sub(t * per_task));
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            let mut errors = 0usize;
            for _ in 0..n {
                let sent = Instant::now();
                match storage.push(Noop { sent_us: now_us() }).await {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::with_capacity(jobs);
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let (mut l, e) = result?;
        latencies.append(&mut l);
        errors += e;
    }
    let submitted_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    let worker_line = loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            break text;
        }
        if Instant::now() > deadline {
            return Err("the apalis worker did not finish within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let total = started.elapsed();
    let worker: serde_json::Value = serde_json::from_str(&worker_line)?;
    latencies.sort();
    let q = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let done = jobs - errors;
    println!(
        "{}",
        serde_json::json!({
            "system": "apalis",
            "jobs": done,
            "errors": errors,
            "concurrency": concurrency,
            "submit_seconds": submitted_in.as_secs_f64(),
            "seconds": total.as_secs_f64(),
            "jobs_per_second": done as f64 / total.as_secs_f64(),
            "submit_p50_ms": q(0.50),
            "submit_p99_ms": q(0.99),
            "e2e_p50_ms": worker["e2e_p50_ms"],
            "e2e_p99_ms": worker["e2e_p99_ms"],
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [_, "worker", url, slots, jobs, file] => worker(url, slots.parse()?, jobs.parse()?, (*file).to_owned()).await,
        [_, "load", url, jobs, concurrency, file] => load(url, jobs.parse()?, concurrency.parse()?, file).await,
        _ => {
            Err("usage: apalis-bench worker REDIS_URL SLOTS JOBS DONE_FILE | load REDIS_URL JOBS CONCURRENCY DONE_FILE"
                .into())
        }
    }
}
