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
    pub telemetry: TelemetryConfig,
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
