//! `shoal-worker`: config → telemetry → bind → serve until a signal → drain
//! → flush.

use std::process::ExitCode;
use std::time::Duration;

use shoal_worker::{Config, Worker};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(code) = shoal_telemetry::admin::healthcheck_subcommand::<Config>(|config| config.admin_addr).await {
        return code;
    }
    let config: Config = shoal_telemetry::config::parse_or_exit();
    let telemetry = match shoal_telemetry::init("shoal-worker", &config.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("shoal-worker: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match Worker::bind(config).await {
        Ok(worker) => match worker.run(shoal_telemetry::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "worker failed");
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
