//! Binding, serving and draining the gateway.

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_telemetry::admin::{self, Readiness};
use tokio::net::TcpListener;
use tonic_health::pb::health_client::HealthClient;

use crate::Config;
use crate::config::ConfigError;
use crate::discovery::{Balanced, DnsResolver, Resolve};
use crate::routes::{AppState, Shared};

/// How long the admin listener may take to stop after the drain.
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] shoal_telemetry::net::BindError),
}

/// The gateway failed while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("http server failed")]
    Http(#[source] std::io::Error),
    #[error("admin server failed")]
    Admin(#[source] std::io::Error),
}

/// Where the gateway finds its upstreams' addresses.
pub struct Upstreams {
    /// Addresses of the worker replicas.
    pub worker: Arc<dyn Resolve>,
    /// Addresses of the aggregator replicas.
    pub aggregator: Arc<dyn Resolve>,
}

impl Upstreams {
    /// DNS resolution of the configured targets (production).
    pub fn from_config(config: &Config) -> Self {
        Self {
            worker: Arc::new(DnsResolver::new(config.worker_addr.clone())),
            aggregator: Arc::new(DnsResolver::new(config.aggregator_addr.clone())),
        }
    }
}

/// A bound, not yet serving, gateway.
pub struct Gateway {
    config: Config,
    http: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
    app: axum::Router,
    // Dropping them stops the re-resolution tasks.
    _upstreams: (Balanced, Balanced),
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("http_addr", &self.http_addr()).field("admin_addr", &self.admin_addr()).finish()
    }
}

impl Gateway {
    /// Checks the config, binds the HTTP and admin listeners and starts
    /// resolving the upstreams over DNS.
    ///
    /// # Errors
    ///
    /// An invalid config, or an address that is taken or not allowed.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let upstreams = Upstreams::from_config(&config);
        Self::bind_with(config, upstreams).await
    }

    /// Like [`Gateway::bind`], with the upstream addresses from `upstreams`
    /// (tests use a [`crate::discovery::StaticResolver`]).
    ///
    /// # Errors
    ///
    /// As [`Gateway::bind`].
    pub async fn bind_with(config: Config, upstreams: Upstreams) -> Result<Self, StartError> {
        config.validate()?;
        let http = shoal_telemetry::net::bind("http", config.http_addr).await?;
        let admin = shoal_telemetry::net::bind("admin", config.admin_addr).await?;
        let interval = config.resolve_interval;
        let (worker, aggregator) = tokio::join!(
            Balanced::start("worker", upstreams.worker, interval),
            Balanced::start("aggregator", upstreams.aggregator, interval),
        );
        let state = AppState::new(Shared {
            worker: WorkerServiceClient::new(worker.channel()),
            worker_health: HealthClient::new(worker.channel()),
            worker_endpoints: worker.endpoints(),
            aggregator: AggregatorServiceClient::new(aggregator.channel()),
            aggregator_health: HealthClient::new(aggregator.channel()),
            aggregator_endpoints: aggregator.endpoints(),
            default_timeout: config.default_timeout,
            max_timeout: config.max_timeout,
            status_timeout: config.status_timeout,
            max_body_bytes: config.max_body_bytes,
        });
        let max_in_flight = usize::try_from(config.max_in_flight).unwrap_or(usize::MAX);
        let app = crate::routes::router(state, max_in_flight);
        Ok(Self { config, http, admin, readiness: Readiness::new(), app, _upstreams: (worker, aggregator) })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http_addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// The readiness reported on `/readyz` (shared).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves until `shutdown` resolves, then: readiness off, stop accepting,
    /// let in-flight requests finish for at most `--shutdown-grace`, stop the
    /// admin listener, return.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let http_addr = self.http_addr();
        let admin_addr = self.admin_addr();
        let Self { config, http, admin, readiness, app, _upstreams } = self;

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let mut admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(shoal_telemetry::net::http_listener(http), app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .into_future();
        let mut server = tokio::spawn(server);

        readiness.mark_started();
        tracing::info!(http_addr = %http_addr, admin_addr = %admin_addr, "listening");

        let result = tokio::select! {
            () = shutdown => {
                tracing::info!(grace_ms = config.shutdown_grace.as_millis() as u64, "draining");
                readiness.mark_draining();
                let _ = stop_http.send(());
                match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                    Ok(finished) => flatten(finished, RunError::Http),
                    Err(_) => {
                        tracing::warn!("grace period over, abandoning in-flight requests");
                        server.abort();
                        Ok(())
                    }
                }
            }
            finished = &mut server => flatten(finished, RunError::Http),
        };
        let _ = stop_admin.send(());
        let admin_result = match tokio::time::timeout(ADMIN_STOP_TIMEOUT, &mut admin_task).await {
            Ok(finished) => flatten(finished, RunError::Admin),
            Err(_) => {
                admin_task.abort();
                Ok(())
            }
        };
        tracing::info!("stopped");
        result.and(admin_result)
    }
}

fn flatten(
    finished: Result<std::io::Result<()>, tokio::task::JoinError>,
    error: fn(std::io::Error) -> RunError,
) -> Result<(), RunError> {
    match finished {
        Ok(result) => result.map_err(error),
        // The server tasks never panic on their own; a cancelled task is an abort.
        Err(_) => Ok(()),
    }
}
