//! `shoal-metrics-aggregator`: config → telemetry → bind → serve until a
//! signal → drain → flush.

use std::process::ExitCode;
use std::time::Duration;

use shoal_metrics_aggregator::{Aggregator, Config};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(code) = shoal_telemetry::admin::healthcheck_subcommand::<Config>(|config| config.admin_addr).await {
        return code;
    }
    let config: Config = shoal_telemetry::config::parse_or_exit();
    let telemetry = match shoal_telemetry::init("shoal-metrics-aggregator", &config.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("shoal-metrics-aggregator: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match Aggregator::bind(config).await {
        Ok(aggregator) => match aggregator.run(shoal_telemetry::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "aggregator failed");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            tracing::error!(error = &error as &dyn std::error::Error, "cannot start");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown(Duration::from_secs(5));
    code
}
