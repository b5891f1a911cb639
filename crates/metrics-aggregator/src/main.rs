//! `shoal-metrics-aggregator`: see [`shoal_service::service::main`] for the sequence
//! (config → telemetry → bind → serve until a signal → drain → flush).

use std::process::ExitCode;

use shoal_metrics_aggregator::{Aggregator, Config};
use shoal_service::service::Failure;

#[tokio::main]
async fn main() -> ExitCode {
    shoal_service::service::main::<Config, _, _>("shoal-metrics-aggregator", async |config, shutdown| {
        Aggregator::bind(config).await.map_err(Failure::start)?.run(shutdown).await.map_err(Failure::run)
    })
    .await
}
