//! The aggregator's settings, from flags or the environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_telemetry::TelemetryConfig;
use shoal_telemetry::config::parse_duration;

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
    /// Largest accepted OTLP request, in bytes.
    #[arg(long, env = "SHOAL_AGGREGATOR_MAX_PUSH_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_push_bytes: usize,
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

impl Config {
    /// The merge core's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits {
                max_series_per_metric: self.max_series_per_metric,
                max_series: self.max_series,
                max_sources: self.max_sources,
            },
            ttl_ms: self.source_ttl.as_millis() as u64,
            retention_ms: self.source_retention.as_millis() as u64,
            policies: self.gauge_policies.iter().cloned().collect::<HashMap<_, _>>(),
        }
    }
}

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
    fn policies_parse_and_bad_ones_say_what_to_fix() {
        let config =
            Config::try_parse_from(["a", "--gauge-policy", "queue_depth=max", "--gauge-policy", "temp=min"]).unwrap();
        assert_eq!(config.settings().policies.get("queue_depth"), Some(&Policy::Max));
        let error = Config::try_parse_from(["a", "--gauge-policy", "queue_depth=avg"]).unwrap_err();
        assert!(error.to_string().contains("unknown policy `avg`"), "{error}");
        assert!(Config::try_parse_from(["a", "--source-ttl", "soon"]).is_err());
    }
}
