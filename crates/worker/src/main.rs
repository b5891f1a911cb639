//! `shoal-worker`: see [`shoal_service::service::main`] for the sequence
//! (config → telemetry → bind → serve until a signal → drain → flush).

use std::process::ExitCode;

use shoal_service::service::Failure;
use shoal_worker::{Config, Worker};

#[tokio::main]
async fn main() -> ExitCode {
    shoal_service::service::main::<Config, _, _>("shoal-worker", async |config, shutdown| {
        Worker::bind(config).await.map_err(Failure::start)?.run(shutdown).await.map_err(Failure::run)
    })
    .await
}
