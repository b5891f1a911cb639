//! The aggregator's settings, from flags or the environment.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_telemetry::TelemetryConfig;
use shoal_telemetry::config::parse_duration;

/// Settings of one aggregator instance. Every value has a default that runs
/// on a laptop beside the gateway and the worker.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "shoal-metrics-aggregator", version, about = "Shoal metrics-aggregator: one fleet view of every replica's metrics")]
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
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}
