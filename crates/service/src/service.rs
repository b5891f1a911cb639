//! The life of a service binary, written once: `main.rs` of every service is
//! a call to [`main`] with the service's own start-and-serve step.
//!
//! 1. `<binary> healthcheck` probes the admin `/readyz` and exits (the
//!    container healthcheck; no shell or curl needed);
//! 2. the config is parsed from flags and the environment (a bad value exits
//!    with status 2 naming the flag and the variable, before anything binds),
//!    then checked by [`ServiceConfig::validate`];
//! 3. telemetry is installed;
//! 4. the service binds and serves until SIGTERM or SIGINT, then drains;
//! 5. telemetry is flushed; the exit status says how it went.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use shoal_telemetry::TelemetryConfig;

/// How long the final flush of spans and metrics may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`main`] needs to know of a service's config.
pub trait ServiceConfig: clap::Parser {
    /// The telemetry settings.
    fn telemetry(&self) -> &TelemetryConfig;
    /// The admin listener, probed by the `healthcheck` subcommand.
    fn admin_addr(&self) -> SocketAddr;
    /// Checks that span several settings; the message names them.
    ///
    /// # Errors
    ///
    /// A message saying what to fix.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why a service stopped with a failure.
#[derive(Debug)]
pub enum Failure {
    /// It could not start (bind, connect, ...).
    Start(Box<dyn std::error::Error + Send + Sync>),
    /// It failed while serving.
    Run(Box<dyn std::error::Error + Send + Sync>),
}

impl Failure {
    /// A start-up failure.
    pub fn start(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Start(Box::new(error))
    }

    /// A failure while serving.
    pub fn run(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Run(Box::new(error))
    }
}

/// Runs the service `name`: see the [module docs](self). `serve` binds and
/// serves with the parsed config until the shutdown future resolves.
pub async fn main<C, F, Fut>(name: &'static str, serve: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    if let Some(code) = crate::admin::healthcheck_subcommand::<C>(|config| config.admin_addr()).await {
        return code;
    }
    let config: C = crate::config::parse_or_exit();
    if let Err(message) = config.validate() {
        eprintln!("{name}: invalid configuration: {message}");
        return ExitCode::from(2);
    }
    let telemetry = match shoal_telemetry::init(name, config.telemetry()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Handlers are installed here, before the service reports ready.
    let code = match serve(config, Box::pin(crate::shutdown::signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Start(error)) => {
            tracing::error!(error = &*error as &dyn std::error::Error, "cannot start");
            ExitCode::FAILURE
        }
        Err(Failure::Run(error)) => {
            tracing::error!(error = &*error as &dyn std::error::Error, "{name} failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown(FLUSH_TIMEOUT);
    code
}
