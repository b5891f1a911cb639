//! The gateway's settings, from flags or the environment. Every knob has a
//! default that runs on a laptop beside a worker and an aggregator.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_telemetry::TelemetryConfig;
use shoal_telemetry::config::parse_duration;

use crate::discovery::Target;

/// Settings of one gateway instance.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "shoal-gateway", version, about = "Shoal gateway: the HTTP front door that fans out over gRPC")]
pub struct Config {
    /// Address of the public HTTP listener (the JSON API).
    #[arg(long, env = "SHOAL_GATEWAY_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SHOAL_GATEWAY_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Worker gRPC targets, `http://host:port`, comma-separated. Each host is
    /// re-resolved every `--resolve-interval` and calls are balanced over
    /// every address found (point it at a headless Service in Kubernetes).
    #[arg(
        long,
        env = "SHOAL_GATEWAY_WORKER_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ',',
        value_parser = Target::parse,
    )]
    pub worker_addr: Vec<Target>,

    /// Metrics-aggregator gRPC targets, `http://host:port`, comma-separated;
    /// resolved and balanced like the workers.
    #[arg(
        long,
        env = "SHOAL_GATEWAY_AGGREGATOR_ADDR",
        default_value = "http://127.0.0.1:50052",
        value_delimiter = ',',
        value_parser = Target::parse,
    )]
    pub aggregator_addr: Vec<Target>,

    /// How often worker and aggregator host names are re-resolved (DNS), so
    /// replicas that appear or disappear are picked up.
    #[arg(long, env = "SHOAL_GATEWAY_RESOLVE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub resolve_interval: Duration,

    /// Deadline of a task call when the request has no `Request-Timeout`
    /// header. Must not exceed `--max-timeout`.
    #[arg(long, env = "SHOAL_GATEWAY_DEFAULT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub default_timeout: Duration,

    /// Largest deadline a task call may have: a longer `Request-Timeout` is
    /// clamped to it.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub max_timeout: Duration,

    /// Deadline of each component check of `GET /v1/status` (the checks run
    /// in parallel, so the route answers within about this long).
    #[arg(long, env = "SHOAL_GATEWAY_STATUS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub status_timeout: Duration,

    /// Largest accepted request body, in bytes; larger bodies get `413`.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Most requests served at once; above it requests are shed at once with
    /// `503` and `Retry-After` instead of queueing.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_IN_FLIGHT", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_in_flight: u64,

    /// How long in-flight requests may take to finish after SIGTERM; after
    /// it the gateway stops waiting and exits.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

/// A combination of settings that cannot work together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--default-timeout (SHOAL_GATEWAY_DEFAULT_TIMEOUT) {default:?} exceeds --max-timeout (SHOAL_GATEWAY_MAX_TIMEOUT) {max:?}"
    )]
    DefaultAboveMax { default: Duration, max: Duration },
    #[error("--{flag} ({env}) must be greater than zero")]
    Zero { flag: &'static str, env: &'static str },
}

impl Config {
    /// Checks the rules that span several settings (clap checks each alone).
    ///
    /// # Errors
    ///
    /// The first rule broken, naming the flags and variables involved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            (self.default_timeout, "default-timeout", "SHOAL_GATEWAY_DEFAULT_TIMEOUT"),
            (self.max_timeout, "max-timeout", "SHOAL_GATEWAY_MAX_TIMEOUT"),
            (self.status_timeout, "status-timeout", "SHOAL_GATEWAY_STATUS_TIMEOUT"),
            (self.resolve_interval, "resolve-interval", "SHOAL_GATEWAY_RESOLVE_INTERVAL"),
        ];
        for (value, flag, env) in positive {
            if value.is_zero() {
                return Err(ConfigError::Zero { flag, env });
            }
        }
        if self.default_timeout > self.max_timeout {
            return Err(ConfigError::DefaultAboveMax { default: self.default_timeout, max: self.max_timeout });
        }
        Ok(())
    }
}

impl shoal_telemetry::service::ServiceConfig for Config {
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
    fn defaults_are_valid() {
        let config = Config::try_parse_from(["shoal-gateway"]).unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.worker_addr.len(), 1);
        assert_eq!(config.max_body_bytes, 1024 * 1024);
        assert_eq!(config.default_timeout, Duration::from_secs(10));
    }

    #[test]
    fn worker_targets_are_a_comma_separated_list() {
        let config = Config::try_parse_from(["shoal-gateway", "--worker-addr", "http://a:1,http://b:2"]).unwrap();
        let targets: Vec<String> = config.worker_addr.iter().map(ToString::to_string).collect();
        assert_eq!(targets, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let error = Config::try_parse_from(["shoal-gateway", "--worker-addr", "a:b:c"]).unwrap_err().to_string();
        assert!(error.contains("--worker-addr"), "{error}");
        let error = Config::try_parse_from(["shoal-gateway", "--max-in-flight", "0"]).unwrap_err().to_string();
        assert!(error.contains("--max-in-flight"), "{error}");
    }

    #[test]
    fn default_timeout_may_not_exceed_max() {
        let config =
            Config::try_parse_from(["shoal-gateway", "--default-timeout", "30s", "--max-timeout", "5s"]).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("SHOAL_GATEWAY_MAX_TIMEOUT"), "{error}");
        let config = Config::try_parse_from(["shoal-gateway", "--resolve-interval", "0s"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--resolve-interval"));
    }
}
