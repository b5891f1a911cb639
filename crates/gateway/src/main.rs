//! `shoal-gateway`: config → telemetry → bind → serve until a signal →
//! drain → flush.

use std::process::ExitCode;
use std::time::Duration;

use shoal_gateway::{Config, Gateway};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(code) = shoal_telemetry::admin::healthcheck_subcommand::<Config>(|config| config.admin_addr).await {
        return code;
    }
    let config: Config = shoal_telemetry::config::parse_or_exit();
    if let Err(error) = config.validate() {
        eprintln!("shoal-gateway: invalid configuration: {error}");
        return ExitCode::from(2);
    }
    let telemetry = match shoal_telemetry::init("shoal-gateway", &config.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("shoal-gateway: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match Gateway::bind(config).await {
        Ok(gateway) => match gateway.run(shoal_telemetry::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "gateway failed");
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
