//! The worker's settings, from flags or the environment, parsed once at start
//! so a bad value stops the process before anything is bound.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_telemetry::TelemetryConfig;
use shoal_telemetry::config::parse_duration;

/// Settings of one worker instance. Every value has a default that runs on a
/// laptop beside the gateway and the metrics-aggregator.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "shoal-worker", version, about = "Shoal worker: runs tasks over gRPC")]
pub struct Config {
    /// Address of the gRPC listener (WorkerService, health, reflection).
    #[arg(long, env = "SHOAL_WORKER_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SHOAL_WORKER_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,
    /// Tasks that may run at once; a call over the bound is refused at once
    /// with RESOURCE_EXHAUSTED (never queued).
    #[arg(
        long,
        env = "SHOAL_WORKER_MAX_CONCURRENCY",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_concurrency: u32,
    /// Largest request message accepted, in bytes; a bigger one is refused
    /// with RESOURCE_EXHAUSTED before it is buffered.
    #[arg(
        long,
        env = "SHOAL_WORKER_MAX_MESSAGE_BYTES",
        default_value_t = 1024 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024)
    )]
    pub max_message_bytes: u32,
    /// Identity reported in every response; default `<instance id>:<grpc port>`,
    /// so several workers in one process or host differ.
    #[arg(long, env = "SHOAL_WORKER_ID")]
    pub worker_id: Option<String>,
    /// How long in-flight calls may take to finish after SIGTERM; after it
    /// they are cancelled.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub jobs: JobsConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

/// Durable jobs: where they live and how they are run. See `docs/jobs.md`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsConfig {
    /// Redis holding the job queue and job state (`redis://[:password@]host:port[/db]`).
    /// Unset: durable jobs are off and the jobs API answers UNAVAILABLE; tasks
    /// still run through `Execute`.
    #[arg(long = "redis-url", env = "SHOAL_WORKER_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every job key in Redis.
    #[arg(long = "redis-prefix", env = "SHOAL_WORKER_REDIS_PREFIX", default_value = "shoal")]
    pub redis_prefix: String,
    /// Redis connections in the pool.
    #[arg(long = "redis-pool-size", env = "SHOAL_WORKER_REDIS_POOL_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub redis_pool_size: u32,
    /// Jobs this worker runs at once (separate from `--max-concurrency`, which
    /// bounds synchronous `Execute` calls).
    #[arg(long = "job-slots", env = "SHOAL_WORKER_JOB_SLOTS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub job_slots: u32,
    /// A running job whose worker has not renewed its lease for this long is
    /// taken over by another worker.
    #[arg(long = "job-lease", env = "SHOAL_WORKER_JOB_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub job_lease: Duration,
    /// How often leases are renewed and lapsed jobs taken over.
    #[arg(long = "reaper-interval", env = "SHOAL_WORKER_REAPER_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reaper_interval: Duration,
    /// First retry delay after a failed attempt; doubles per attempt, with full jitter.
    #[arg(long = "retry-base", env = "SHOAL_WORKER_RETRY_BASE", default_value = "500ms", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Largest retry delay.
    #[arg(long = "retry-max", env = "SHOAL_WORKER_RETRY_MAX", default_value = "60s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Unfinished jobs the queue holds; beyond it submissions are refused
    /// (HTTP 429) until jobs finish.
    #[arg(long = "max-queued-jobs", env = "SHOAL_WORKER_MAX_QUEUED_JOBS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_jobs: u64,
    /// How long a job's record stays readable after it ends.
    #[arg(long = "job-ttl", env = "SHOAL_WORKER_JOB_TTL", default_value = "168h", value_parser = parse_duration)]
    pub job_ttl: Duration,
    /// How long an `Idempotency-Key` maps to its job.
    #[arg(long = "idempotency-ttl", env = "SHOAL_WORKER_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    /// Attempts of a job that does not say.
    #[arg(long = "default-max-attempts", env = "SHOAL_WORKER_DEFAULT_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub default_max_attempts: u32,
    /// Bound on one attempt of a job that does not say.
    #[arg(long = "default-job-timeout", env = "SHOAL_WORKER_DEFAULT_JOB_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub default_job_timeout: Duration,
    /// Largest per-attempt timeout a job may ask for.
    #[arg(long = "max-job-timeout", env = "SHOAL_WORKER_MAX_JOB_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub max_job_timeout: Duration,
}

/// Attempts a job may ask for at most.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

impl shoal_telemetry::service::ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin_addr
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn flags_parse_into_typed_values() {
        let config = Config::try_parse_from([
            "shoal-worker",
            "--grpc-addr",
            "127.0.0.1:0",
            "--max-concurrency",
            "2",
            "--shutdown-grace",
            "3s",
            "--worker-id",
            "w1",
        ])
        .unwrap();
        assert_eq!(config.grpc_addr, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.max_concurrency, 2);
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
        assert_eq!(config.worker_id.as_deref(), Some("w1"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let error = Config::try_parse_from(["shoal-worker", "--max-concurrency", "abc"]).unwrap_err();
        assert!(error.to_string().contains("--max-concurrency"), "{error}");
        let error = Config::try_parse_from(["shoal-worker", "--max-concurrency", "0"]).unwrap_err();
        assert!(error.to_string().contains("--max-concurrency"), "{error}");
    }
}
