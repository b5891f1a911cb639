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
    /// with RESOURCE_EXHAUSTED before it is buffered. Keep it above the
    /// gateway's `--max-body-bytes` plus the message's framing (the default
    /// is twice the gateway's default body limit).
    #[arg(
        long,
        env = "SHOAL_WORKER_MAX_MESSAGE_BYTES",
        default_value_t = 2 * 1024 * 1024,
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
    /// How long the service keeps serving after SIGTERM while reporting not
    /// ready (readiness `503`, gRPC health `NOT_SERVING`), so clients stop
    /// routing to it first; ends early when no connection has been open for 1 s. See
    /// docs/operations.md, "Shutdown sequence".
    #[arg(long, env = "SHOAL_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,
    #[command(flatten)]
    pub tls: shoal_tls::ServerTlsArgs,
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
    #[arg(long = "redis-url", env = "SHOAL_WORKER_REDIS_URL",
          conflicts_with_all = ["redis_cluster_urls", "redis_sentinel_urls"])]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated (`redis://host:port,...`);
    /// any reachable one gives the whole topology. Instead of `--redis-url`.
    #[arg(
        long = "redis-cluster-urls",
        env = "SHOAL_WORKER_REDIS_CLUSTER_URLS",
        value_delimiter = ',',
        conflicts_with = "redis_sentinel_urls"
    )]
    pub redis_cluster_urls: Vec<String>,
    /// Redis Sentinels watching the job queue's primary, comma-separated
    /// (`redis://host:26379,...`); the primary is reached with the first
    /// URL's password. Instead of `--redis-url`.
    #[arg(long = "redis-sentinel-urls", env = "SHOAL_WORKER_REDIS_SENTINEL_URLS", value_delimiter = ',')]
    pub redis_sentinel_urls: Vec<String>,
    /// The name the sentinels know the primary by (`sentinel monitor <name> ...`).
    #[arg(long = "redis-sentinel-master", env = "SHOAL_WORKER_REDIS_SENTINEL_MASTER", default_value = "shoal")]
    pub redis_sentinel_master: String,
    /// Prefix of every job key in Redis; keys are `{prefix}:...` (a hash
    /// tag: one Redis Cluster slot per queue).
    #[arg(long = "redis-prefix", env = "SHOAL_WORKER_REDIS_PREFIX", default_value = "shoal")]
    pub redis_prefix: String,
    /// At start, move jobs kept under the pre-hash-tag key names (`prefix:...`)
    /// to `{prefix}:...`; without it a worker that finds such keys refuses
    /// to run jobs. Stop every older worker first. See docs/jobs.md, "Upgrading
    /// to hash-tagged keys".
    #[arg(long = "redis-migrate-legacy-keys", env = "SHOAL_WORKER_REDIS_MIGRATE_LEGACY_KEYS")]
    pub redis_migrate_legacy_keys: bool,
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
    /// Payload bytes of unfinished jobs the queue holds; beyond it
    /// submissions are refused (HTTP 429) until jobs finish.
    #[arg(long = "max-queued-bytes", env = "SHOAL_WORKER_MAX_QUEUED_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_queued_bytes: u64,
    /// Largest result a job may record, in bytes; a bigger one fails the job.
    #[arg(long = "max-result-bytes", env = "SHOAL_WORKER_MAX_RESULT_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024))]
    pub max_result_bytes: u32,
    /// Deliveries of a job (starts on some worker, lost workers included)
    /// before it is dead: stops a job that kills every worker it lands on.
    /// A job may always be delivered at least its `max_attempts` times.
    #[arg(long = "max-deliveries", env = "SHOAL_WORKER_MAX_DELIVERIES", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_deliveries: u32,
    /// Approximate bound on the dead-letter stream; older letters are trimmed.
    #[arg(long = "max-dead-letters", env = "SHOAL_WORKER_MAX_DEAD_LETTERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_dead_letters: u64,
    /// How long a job's record stays readable after it ends.
    #[arg(long = "job-ttl", env = "SHOAL_WORKER_JOB_TTL", default_value = "168h", value_parser = parse_duration)]
    pub job_ttl: Duration,
    /// How long an `Idempotency-Key` maps to its job after the job ended (at
    /// least `--job-ttl`: a key never names a job that is gone).
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

impl JobsConfig {
    /// Where the job keys live, if jobs are on.
    pub fn topology(&self) -> Option<crate::jobs::Topology> {
        use crate::jobs::Topology;
        let trimmed = |urls: &[String]| urls.iter().map(|u| u.trim().to_owned()).collect::<Vec<_>>();
        if let Some(url) = &self.redis_url {
            Some(Topology::Single { url: url.clone() })
        } else if !self.redis_cluster_urls.is_empty() {
            Some(Topology::Cluster { urls: trimmed(&self.redis_cluster_urls) })
        } else if !self.redis_sentinel_urls.is_empty() {
            Some(Topology::Sentinel {
                urls: trimmed(&self.redis_sentinel_urls),
                master: self.redis_sentinel_master.clone(),
            })
        } else {
            None
        }
    }
}

/// Attempts a job may ask for at most.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

impl Config {
    /// Checks the rules that span several settings, before anything binds.
    ///
    /// # Errors
    ///
    /// A message naming the flags and what to change.
    pub fn validate(&self) -> Result<(), String> {
        self.tls.files().map_err(|error| error.to_string())?;
        self.jobs.validate()
    }
}

impl JobsConfig {
    /// Checks the rules between the job settings.
    ///
    /// # Errors
    ///
    /// A message naming the flags and what to change.
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis();
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return Err(format!(
                "--redis-prefix ({:?}) must be non-empty and without braces: the worker wraps it in a hash tag \
                 ({{prefix}}:jobs)",
                self.redis_prefix
            ));
        }
        if self.redis_sentinel_urls.iter().chain(&self.redis_cluster_urls).any(|url| url.trim().is_empty()) {
            return Err("--redis-cluster-urls and --redis-sentinel-urls take comma-separated redis:// urls, \
                        none of them empty"
                .to_owned());
        }
        if self.redis_migrate_legacy_keys && !self.redis_cluster_urls.is_empty() {
            return Err("--redis-migrate-legacy-keys needs --redis-url or --redis-sentinel-urls: keys of the old \
                        layout exist only on a single Redis (migrate there, then move the data to a cluster)"
                .to_owned());
        }
        if self.default_job_timeout > self.max_job_timeout {
            return Err(format!(
                "--default-job-timeout ({} ms) is above --max-job-timeout ({} ms); lower the default or raise the maximum",
                ms(self.default_job_timeout),
                ms(self.max_job_timeout)
            ));
        }
        if self.job_lease <= self.reaper_interval {
            return Err(format!(
                "--job-lease ({} ms) must be longer than --reaper-interval ({} ms), which is also the lease renewal \
                 interval: a lease that lapses before it is renewed hands every job to another worker",
                ms(self.job_lease),
                ms(self.reaper_interval)
            ));
        }
        if self.reaper_interval.is_zero() {
            return Err("--reaper-interval must be above zero".to_owned());
        }
        if self.retry_base > self.retry_max {
            return Err(format!(
                "--retry-base ({} ms) is above --retry-max ({} ms); lower the base or raise the maximum",
                ms(self.retry_base),
                ms(self.retry_max)
            ));
        }
        if self.max_deliveries < self.default_max_attempts {
            return Err(format!(
                "--max-deliveries ({}) is below --default-max-attempts ({}): every attempt needs a delivery",
                self.max_deliveries, self.default_max_attempts
            ));
        }
        Ok(())
    }
}

impl shoal_service::service::ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin_addr
    }
    fn validate(&self) -> Result<(), String> {
        Config::validate(self)
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
    fn the_defaults_are_valid() {
        Config::try_parse_from(["shoal-worker"]).unwrap().validate().unwrap();
    }

    #[test]
    fn settings_that_contradict_each_other_are_refused_naming_both() {
        let cases: [(&[&str], [&str; 2]); 4] = [
            (
                &["--default-job-timeout", "2h", "--max-job-timeout", "1h"],
                ["--default-job-timeout", "--max-job-timeout"],
            ),
            (&["--job-lease", "1s", "--reaper-interval", "1s"], ["--job-lease", "--reaper-interval"]),
            (&["--retry-base", "2m", "--retry-max", "1m"], ["--retry-base", "--retry-max"]),
            (&["--max-deliveries", "2", "--default-max-attempts", "3"], ["--max-deliveries", "--default-max-attempts"]),
        ];
        for (flags, named) in cases {
            let config = Config::try_parse_from(std::iter::once("shoal-worker").chain(flags.iter().copied())).unwrap();
            let message = config.validate().unwrap_err();
            for flag in named {
                assert!(message.contains(flag), "{flags:?}: {message}");
            }
        }
    }

    #[test]
    fn one_redis_topology_is_chosen_and_the_prefix_is_checked() {
        use crate::jobs::Topology;
        let parse =
            |flags: &[&str]| Config::try_parse_from(std::iter::once("shoal-worker").chain(flags.iter().copied()));
        let config = parse(&["--redis-cluster-urls", "redis://127.0.0.1:7000, redis://127.0.0.1:7001"]).unwrap();
        assert_eq!(
            config.jobs.topology(),
            Some(Topology::Cluster { urls: vec!["redis://127.0.0.1:7000".into(), "redis://127.0.0.1:7001".into()] })
        );
        let config = parse(&["--redis-sentinel-urls", "redis://s1:26379", "--redis-sentinel-master", "m"]).unwrap();
        assert_eq!(
            config.jobs.topology(),
            Some(Topology::Sentinel { urls: vec!["redis://s1:26379".into()], master: "m".into() })
        );
        assert_eq!(parse(&[]).unwrap().jobs.topology(), None);
        let error = parse(&["--redis-url", "redis://a", "--redis-cluster-urls", "redis://b"]).unwrap_err();
        assert!(error.to_string().contains("--redis-cluster-urls"), "{error}");
        let message = parse(&["--redis-prefix", "{x}"]).unwrap().validate().unwrap_err();
        assert!(message.contains("--redis-prefix"), "{message}");
        let message = parse(&["--redis-cluster-urls", "redis://b", "--redis-migrate-legacy-keys"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(message.contains("--redis-migrate-legacy-keys"), "{message}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let error = Config::try_parse_from(["shoal-worker", "--max-concurrency", "abc"]).unwrap_err();
        assert!(error.to_string().contains("--max-concurrency"), "{error}");
        let error = Config::try_parse_from(["shoal-worker", "--max-concurrency", "0"]).unwrap_err();
        assert!(error.to_string().contains("--max-concurrency"), "{error}");
    }
}
