//! Binding, serving and draining the gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::aggregator::v1::aggregator_service_server::SERVICE_NAME as AGGREGATOR_SERVICE;
use shoal_proto::worker::v1::worker_service_server::SERVICE_NAME as WORKER_SERVICE;
use shoal_service::DrainSettings;
use shoal_service::admin::{self, Readiness};
use tokio::net::TcpListener;

use crate::Config;
use crate::auth::{AuthMode, Keys};
use crate::config::ConfigError;
use crate::discovery::{Balanced, DnsResolver, Resolve, UpstreamTls};
use crate::edge::Admission;
use crate::routes::{AppState, Shared};
use crate::upstream::Upstream;

/// How long the admin listener may take to stop after the drain.
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] shoal_service::net::BindError),
    #[error(transparent)]
    Keys(#[from] crate::auth::KeysFileError),
    #[error("cannot call the upstreams over tls")]
    Tls(#[from] shoal_tls::TlsError),
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
    _keys_watch: Option<AbortOnDrop>,
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
        let (keys, keys_watch) = match (config.auth, &config.api_keys_file) {
            (AuthMode::ApiKeys, Some(path)) => {
                let keys = Keys::load(path, config.client_limits())?;
                let watch = keys.watch(path.clone(), config.api_keys_reload_interval);
                (Some(keys), Some(AbortOnDrop(watch)))
            }
            _ => {
                tracing::warn!(
                    "--auth none: the API accepts every caller without a credential (local development only)"
                );
                (None, None)
            }
        };
        let admission =
            Admission { keys, max_body_bytes: config.max_body_bytes, body_read_timeout: config.body_read_timeout };
        let http = shoal_service::net::bind("http", config.http_addr).await?;
        let admin = shoal_service::net::bind("admin", config.admin_addr).await?;
        let interval = config.resolve_interval;
        let (worker_tls, aggregator_tls) = match config.upstream_tls()? {
            Some(files) => {
                let tls = shoal_tls::ClientTls::load(&files)?.reloading(shoal_tls::RELOAD_INTERVAL);
                (
                    Some(UpstreamTls { tls: tls.clone(), server_name: config.worker_server_name()? }),
                    Some(UpstreamTls { tls, server_name: config.aggregator_server_name()? }),
                )
            }
            None => (None, None),
        };
        let (worker, aggregator) = tokio::join!(
            Balanced::start("worker", WORKER_SERVICE, upstreams.worker, interval, worker_tls),
            Balanced::start("aggregator", AGGREGATOR_SERVICE, upstreams.aggregator, interval, aggregator_tls),
        );
        // The state owns the upstreams: dropping the router stops their
        // re-resolution and health watches.
        let state = AppState::new(Shared {
            worker: Upstream::new("worker", worker),
            aggregator: Upstream::new("aggregator", aggregator),
            default_timeout: config.default_timeout,
            max_timeout: config.max_timeout,
            status_timeout: config.status_timeout,
            max_body_bytes: config.max_body_bytes,
        });
        let max_in_flight = usize::try_from(config.max_in_flight).unwrap_or(usize::MAX);
        let max_delayed = usize::try_from(config.max_delayed).unwrap_or(usize::MAX);
        let app = crate::routes::router(
            state,
            max_in_flight,
            admission,
            max_delayed,
            config.max_delay,
            config.trust_traceparent,
            config.stats_cache_ttl,
        );
        Ok(Self { config, http, admin, readiness: Readiness::new(), app, _keys_watch: keys_watch })
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

    /// Serves until `shutdown` resolves (with the connection limits of
    /// [`crate::listener`]), then drains as [`shoal_service::http`] does: readiness off while still serving for
    /// `--drain-delay` (`Connection: close` on HTTP/1.1), stop accepting, let
    /// in-flight requests finish for at most `--shutdown-grace`, stop the
    /// admin listener, return.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let http_addr = self.http_addr();
        let admin_addr = self.admin_addr();
        let Self { config, http, admin, readiness, app, _keys_watch } = self;

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let mut admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));
        readiness.mark_started();
        tracing::info!(http_addr = %http_addr, admin_addr = %admin_addr, "listening");
        let drain = DrainSettings { delay: config.drain_delay, grace: config.shutdown_grace };
        let result = crate::listener::serve_http(http, app, config.connection_limits(), readiness, drain, shutdown)
            .await
            .map_err(RunError::Http);
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
