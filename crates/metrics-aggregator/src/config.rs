//! The aggregator's settings, from flags or the environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_service::config::parse_duration;
use shoal_telemetry::TelemetryConfig;

use crate::merge::Policy;
use crate::store::{Limits, Settings};

/// Settings of one aggregator instance. Every value has a default that runs
/// on a laptop beside the gateway and the worker.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shoal-metrics-aggregator",
    version,
    about = "Shoal metrics-aggregator: one fleet view of every replica's metrics"
)]
pub struct Config {
    /// Address of the gRPC listener (query API, OTLP ingestion, health, reflection).
    #[arg(long, env = "SHOAL_AGGREGATOR_GRPC_ADDR", default_value = "0.0.0.0:50052")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SHOAL_AGGREGATOR_ADMIN_ADDR", default_value = "0.0.0.0:9092")]
    pub admin_addr: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long the service keeps serving after SIGTERM while reporting not
    /// ready (readiness `503`, gRPC health `NOT_SERVING`), so clients stop
    /// routing to it first; ends early when no connection has been open for 1 s. See
    /// docs/operations.md, "Shutdown sequence".
    #[arg(long, env = "SHOAL_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,
    /// Redis for checkpoints and for sharing state between replicas
    /// (`redis://host:6379`). Unset: state is in memory only and lost on restart.
    #[arg(long, env = "SHOAL_AGGREGATOR_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of the aggregator's Redis keys. Replicas that share it share state.
    #[arg(long, env = "SHOAL_AGGREGATOR_REDIS_PREFIX", default_value = "shoal:aggregator:v1")]
    pub redis_prefix: String,
    /// How often state is written to and read back from Redis: a restart
    /// loses at most this much, and replicas agree within it.
    #[arg(long, env = "SHOAL_AGGREGATOR_CHECKPOINT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// Deadline of each Redis command.
    #[arg(long, env = "SHOAL_AGGREGATOR_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// Name of this replica in Redis (default: the instance id and gRPC port).
    #[arg(long, env = "SHOAL_AGGREGATOR_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// A source that has not pushed for this long is down (`up` = 0): its
    /// gauges leave the fleet view; its counters and histograms stay.
    #[arg(long, env = "SHOAL_AGGREGATOR_SOURCE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub source_ttl: Duration,
    /// A source that has not pushed for this long is forgotten entirely.
    #[arg(long, env = "SHOAL_AGGREGATOR_SOURCE_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub source_retention: Duration,
    /// How often windows take a sample of every counter and histogram.
    #[arg(long, env = "SHOAL_AGGREGATOR_SAMPLE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub sample_interval: Duration,
    /// Most distinct label sets of one metric, fleet-wide.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_SERIES_PER_METRIC", default_value_t = 2000)]
    pub max_series_per_metric: usize,
    /// Most series held overall, counted per source.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_SERIES", default_value_t = 100_000)]
    pub max_series: usize,
    /// Most sources held.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_SOURCES", default_value_t = 2000)]
    pub max_sources: usize,
    /// Merge policy of a gauge or up-down counter, `metric=last|sum|min|max`;
    /// repeat the flag, or separate with commas in the environment. Default:
    /// `sum` for up-down counters, `last` for gauges.
    #[arg(long = "gauge-policy", env = "SHOAL_AGGREGATOR_GAUGE_POLICY", value_delimiter = ',', value_parser = parse_policy)]
    pub gauge_policies: Vec<(String, Policy)>,
    /// Most concurrent Watch streams.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_WATCHES", default_value_t = 256)]
    pub max_watches: usize,
    /// Largest accepted OTLP request, in bytes (`4MiB`, `512KiB` or a number).
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_PUSH_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_push_bytes: usize,
    /// OTLP requests decoded and applied at once; more wait (each can take
    /// several times its size while decoded).
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_CONCURRENT_PUSHES", default_value_t = 2)]
    pub max_concurrent_pushes: usize,
    /// Budget of the estimated bytes of series, label sets and window
    /// samples; new series beyond it are rejected by name.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_BYTES", default_value = "512MiB", value_parser = parse_bytes)]
    pub max_bytes: usize,
    /// Most pushes per second one source may make (a burst of twice as
    /// many is allowed); beyond, its points are rejected by name.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_SOURCE_PUSH_RATE", default_value_t = 5.0)]
    pub max_source_push_rate: f64,
    /// A file holding the bearer token pushers must send
    /// (`authorization: Bearer <token>`) on OTLP Export; others get
    /// `UNAUTHENTICATED`. Unset: pushes are not authenticated.
    #[arg(long, env = "SHOAL_AGGREGATOR_INGEST_TOKEN_FILE")]
    pub ingest_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: shoal_tls::ServerTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

fn parse_policy(text: &str) -> Result<(String, Policy), String> {
    let (metric, policy) =
        text.split_once('=').ok_or_else(|| format!("`{text}` is not `metric=policy` (e.g. queue_depth=max)"))?;
    let policy =
        Policy::parse(policy).ok_or_else(|| format!("unknown policy `{policy}`; use last, sum, min or max"))?;
    if metric.trim().is_empty() {
        return Err(format!("`{text}` names no metric"));
    }
    Ok((metric.trim().to_owned(), policy))
}

/// Parses `4MiB`, `512KiB`, `1GiB` or a plain number of bytes.
///
/// # Errors
///
/// Text that is none of these.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit `{other}`; use KiB, MiB or GiB")),
    };
    let number: usize = number.parse().map_err(|_| format!("`{text}` is not a size like 4MiB"))?;
    number.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))
}

/// A setting that cannot work, or a token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read --ingest-token-file {path}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--ingest-token-file {0} is empty")]
    EmptyToken(String),
    #[error("--replica-id (SHOAL_AGGREGATOR_REPLICA_ID) must not be empty or contain control characters")]
    ReplicaId,
    #[error("--{flag} ({env}) must be greater than zero")]
    Zero { flag: &'static str, env: &'static str },
    #[error(
        "--source-ttl (SHOAL_AGGREGATOR_SOURCE_TTL) {ttl:?} exceeds --source-retention (SHOAL_AGGREGATOR_SOURCE_RETENTION) {retention:?}"
    )]
    TtlAboveRetention { ttl: Duration, retention: Duration },
}

impl Config {
    /// The cross-field rules, checked before anything binds.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the setting to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tls.files().map_err(|error| ConfigError::Invalid(error.to_string()))?;
        if self.replica_id.as_deref().is_some_and(|id| id.is_empty() || id.chars().any(char::is_control)) {
            return Err(ConfigError::ReplicaId);
        }
        let positive = [
            (self.sample_interval, "sample-interval", "SHOAL_AGGREGATOR_SAMPLE_INTERVAL"),
            (self.checkpoint_interval, "checkpoint-interval", "SHOAL_AGGREGATOR_CHECKPOINT_INTERVAL"),
            (self.redis_timeout, "redis-timeout", "SHOAL_AGGREGATOR_REDIS_TIMEOUT"),
            (self.source_ttl, "source-ttl", "SHOAL_AGGREGATOR_SOURCE_TTL"),
        ];
        for (value, flag, env) in positive {
            if value.is_zero() {
                return Err(ConfigError::Zero { flag, env });
            }
        }
        if self.source_ttl > self.source_retention {
            return Err(ConfigError::TtlAboveRetention { ttl: self.source_ttl, retention: self.source_retention });
        }
        let invalid = |why: &str| Err(ConfigError::Invalid(why.to_owned()));
        if self.source_ttl.is_zero() || self.source_ttl > self.source_retention {
            return invalid("--source-ttl must be above 0 and at most --source-retention");
        }
        if self.sample_interval.is_zero() || self.sample_interval > Duration::from_secs(60) {
            return invalid("--sample-interval must be between 1ms and 60s (windows keep 1-minute samples)");
        }
        if self.checkpoint_interval.is_zero() || self.redis_timeout.is_zero() {
            return invalid("--checkpoint-interval and --redis-timeout must be above 0");
        }
        if self.max_concurrent_pushes == 0 || self.max_watches == 0 {
            return invalid("--max-concurrent-pushes and --max-watches must be at least 1");
        }
        if self.max_push_bytes == 0 || self.max_push_bytes > self.max_bytes {
            return invalid("--max-push-bytes must be above 0 and at most --max-bytes");
        }
        if self.max_series_per_metric == 0 || self.max_series_per_metric > self.max_series {
            return invalid("--max-series-per-metric must be above 0 and at most --max-series");
        }
        if self.max_sources == 0 {
            return invalid("--max-sources must be at least 1");
        }
        if !(self.max_source_push_rate.is_finite() && self.max_source_push_rate > 0.0) {
            return invalid("--max-source-push-rate must be a positive number of pushes per second");
        }
        Ok(())
    }

    /// The ingest bearer token, read from `--ingest-token-file` (trimmed).
    ///
    /// # Errors
    ///
    /// The file cannot be read or holds only whitespace.
    pub fn ingest_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.ingest_token_file else {
            return Ok(None);
        };
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile { path: shown.clone(), source })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ConfigError::EmptyToken(shown));
        }
        Ok(Some(token.to_owned()))
    }

    /// The merge core's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits {
                max_series_per_metric: self.max_series_per_metric,
                max_series: self.max_series,
                max_sources: self.max_sources,
                max_bytes: self.max_bytes,
            },
            ttl_ms: self.source_ttl.as_millis() as u64,
            retention_ms: self.source_retention.as_millis() as u64,
            policies: self.gauge_policies.iter().cloned().collect::<HashMap<_, _>>(),
        }
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
        Config::validate(self).map_err(|error| error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_say_what_to_fix() {
        let config =
            Config::try_parse_from(["a", "--gauge-policy", "queue_depth=max", "--gauge-policy", "temp=min"]).unwrap();
        assert_eq!(config.settings().policies.get("queue_depth"), Some(&Policy::Max));
        let error = Config::try_parse_from(["a", "--gauge-policy", "queue_depth=avg"]).unwrap_err();
        assert!(error.to_string().contains("unknown policy `avg`"), "{error}");
        assert!(Config::try_parse_from(["a", "--source-ttl", "soon"]).is_err());
    }

    #[test]
    fn cross_field_rules_name_the_settings() {
        assert!(Config::try_parse_from(["a"]).unwrap().validate().is_ok());
        let bad = |args: &[&str]| {
            let args = std::iter::once("a").chain(args.iter().copied());
            Config::try_parse_from(args).unwrap().validate().unwrap_err().to_string()
        };
        assert!(bad(&["--replica-id", "a\nb"]).contains("SHOAL_AGGREGATOR_REPLICA_ID"));
        assert!(bad(&["--replica-id", ""]).contains("--replica-id"));
        assert!(bad(&["--sample-interval", "0s"]).contains("--sample-interval"));
        let error = bad(&["--source-ttl", "2h", "--source-retention", "1h"]);
        assert!(error.contains("SHOAL_AGGREGATOR_SOURCE_RETENTION"), "{error}");
    }

    #[test]
    fn sizes_parse_and_cross_field_rules_hold() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert!(parse_bytes("4MB").is_err());
        let config = Config::try_parse_from(["a"]).unwrap();
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        let bad = Config::try_parse_from(["a", "--max-push-bytes", "1GiB", "--max-bytes", "64MiB"]).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("--max-push-bytes"));
        let bad = Config::try_parse_from(["a", "--source-ttl", "48h"]).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("--source-ttl"));
        let bad = Config::try_parse_from(["a", "--max-source-push-rate", "0"]).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_ingest_token_comes_trimmed_from_its_file() {
        let dir = std::env::temp_dir().join(format!("shoal-agg-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let config = Config::try_parse_from(["a", "--ingest-token-file", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.ingest_token().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(config.ingest_token(), Err(ConfigError::EmptyToken(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
