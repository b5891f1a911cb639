//! Binding, serving and draining a worker.
//!
//! Shutdown is a sequence: readiness off and health `NOT_SERVING` for every
//! service name, new calls refused, in-flight calls finish within the grace
//! (then they are cancelled), the admin listener stops last.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::worker::v1::worker_service_server::{SERVICE_NAME, WorkerServiceServer};
use shoal_telemetry::admin::{self, Readiness};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Config;
use crate::jobs::{JobRunner, JobStore, JobsApi, Keys, RunnerConfig, StoreConfig};
use crate::runner::{Runner, Stats};
use crate::service::Service;
use crate::tasks::TaskRegistry;

/// After the last task ends during a drain, how long connections get to
/// deliver their responses and close before the server is dropped. Bounds
/// the drain when a client holds a stream open (a health `Watch`).
const LINGER: Duration = Duration::from_millis(500);

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] shoal_telemetry::net::BindError),
    #[error("invalid redis url")]
    RedisUrl(#[source] deadpool_redis::CreatePoolError),
}

/// The service failed while running (shared by every gRPC service).
pub use shoal_telemetry::grpc::RunError;

/// A bound, not yet serving, worker.
#[derive(Debug)]
pub struct Worker {
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
    runner: Arc<Runner>,
    jobs: Option<JobStore>,
}

impl Worker {
    /// Binds the gRPC and admin listeners, with the built-in task kinds.
    ///
    /// # Errors
    ///
    /// [`StartError::Bind`] when an address is taken or not allowed.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_with(config, TaskRegistry::builtin()).await
    }

    /// Like [`Worker::bind`], running the kinds in `registry`.
    ///
    /// # Errors
    ///
    /// As [`Worker::bind`].
    pub async fn bind_with(config: Config, registry: TaskRegistry) -> Result<Self, StartError> {
        let grpc = shoal_telemetry::net::bind("grpc", config.grpc_addr).await?;
        let admin = shoal_telemetry::net::bind("admin", config.admin_addr).await?;
        let jobs = config.jobs.redis_url.as_deref().map(|url| job_store(url, &config.jobs)).transpose()?;
        let runner = Arc::new(Runner::new(registry, config.max_concurrency as usize));
        Ok(Self { config, grpc, admin, readiness: Readiness::new(), runner, jobs })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// The identity in every response: `--worker-id`, else
    /// `<instance id>:<grpc port>`.
    pub fn worker_id(&self) -> String {
        match &self.config.worker_id {
            Some(id) => id.clone(),
            None => format!("{}:{}", shoal_telemetry::instance_id(), self.grpc_addr().port()),
        }
    }

    /// Live task counts (in flight, cancelled); they stay valid after
    /// [`Worker::run`] takes the worker.
    pub fn stats(&self) -> Stats {
        self.runner.stats().clone()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls for at
    /// most the configured grace (cancelling what is left) and returns.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let grpc_addr = self.grpc_addr();
        let admin_addr = self.admin_addr();
        let worker_id = self.worker_id();
        let Self { config, grpc, admin, readiness, runner, jobs } = self;

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let (reflection_v1, reflection_v1alpha) = shoal_proto::reflection::services();

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));

        let max_message = config.max_message_bytes as usize;
        let registry = runner.registry().clone();
        let jobs_api = JobsApi::new(jobs.clone(), registry.clone(), &config.jobs);
        let stop_jobs = tokio_util::sync::CancellationToken::new();
        let job_tasks = jobs.map(|store| {
            let runner = JobRunner::new(
                store.clone(),
                registry,
                RunnerConfig {
                    consumer: worker_id.clone(),
                    slots: config.jobs.job_slots as usize,
                    lease: config.jobs.job_lease,
                    reaper_interval: config.jobs.reaper_interval,
                    retry_base: config.jobs.retry_base,
                    retry_max: config.jobs.retry_max,
                },
            );
            readiness.set("redis", false);
            let monitor = tokio::spawn(watch_redis(store, readiness.clone(), stop_jobs.clone()));
            let executor = tokio::spawn(runner.run(stop_jobs.clone(), config.shutdown_grace));
            (monitor, executor)
        });
        let service = Service { runner: Arc::clone(&runner), worker_id: worker_id.as_str().into(), jobs: jobs_api };
        let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .layer(shoal_telemetry::grpc::ServerLayer)
            .layer(tower::util::MapResponseLayer::new(
                crate::error::oversized_as_resource_exhausted::<tonic::body::Body>,
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(WorkerServiceServer::new(service).max_decoding_message_size(max_message))
            .serve_with_incoming_shutdown(shoal_telemetry::net::incoming(grpc), async {
                let _ = grpc_stopped.await;
            });
        let mut server = tokio::spawn(server);

        set_health(&health, ServingStatus::Serving).await;
        readiness.mark_started();
        tracing::info!(
            grpc_addr = %grpc_addr,
            admin_addr = %admin_addr,
            worker_id,
            max_concurrency = config.max_concurrency,
            "listening"
        );

        let result = tokio::select! {
            () = shutdown => {
                tracing::info!(grace_ms = config.shutdown_grace.as_millis() as u64, "draining");
                // Refuse new tasks first: whoever sees readiness or health
                // flip can rely on new calls being refused.
                runner.start_draining();
                readiness.mark_draining();
                set_health(&health, ServingStatus::NotServing).await;
                let _ = stop_grpc.send(());
                stop_jobs.cancel();
                drain(&runner, &mut server, config.shutdown_grace).await
            }
            finished = &mut server => shoal_telemetry::grpc::server_outcome(finished),
        };
        stop_jobs.cancel();
        if let Some((monitor, executor)) = job_tasks {
            // The executor bounds its own drain by the grace; this bound only
            // guards against a bug.
            if tokio::time::timeout(config.shutdown_grace + Duration::from_secs(5), executor).await.is_err() {
                tracing::error!("job executor did not stop in time");
            }
            monitor.abort();
        }
        let _ = stop_admin.send(());
        let admin_result = admin_task.await.unwrap_or(Ok(())).map_err(RunError::Admin);
        tracing::info!("stopped");
        result.and(admin_result)
    }
}

fn job_store(url: &str, config: &crate::config::JobsConfig) -> Result<JobStore, StartError> {
    let mut pool_config = deadpool_redis::Config::from_url(url);
    let timeouts = deadpool_redis::Timeouts {
        wait: Some(Duration::from_secs(2)),
        create: Some(Duration::from_secs(2)),
        recycle: Some(Duration::from_secs(2)),
    };
    pool_config.pool =
        Some(deadpool_redis::PoolConfig { max_size: config.redis_pool_size as usize, timeouts, ..Default::default() });
    let pool = pool_config.create_pool(Some(deadpool_redis::Runtime::Tokio1)).map_err(StartError::RedisUrl)?;
    Ok(JobStore::new(
        pool,
        Keys::new(config.redis_prefix.clone()),
        StoreConfig {
            job_ttl: config.job_ttl,
            idempotency_ttl: config.idempotency_ttl,
            max_open: config.max_queued_jobs,
        },
    ))
}

/// Keeps the `redis` readiness condition current: pinged every second.
async fn watch_redis(store: JobStore, readiness: Readiness, stop: tokio_util::sync::CancellationToken) {
    let mut was_ok = None;
    while !stop.is_cancelled() {
        let ok = matches!(tokio::time::timeout(Duration::from_secs(2), store.ping()).await, Ok(Ok(())));
        readiness.set("redis", ok);
        if was_ok != Some(ok) {
            if ok {
                tracing::info!("redis reachable");
            } else {
                tracing::warn!("redis unreachable; not ready, retrying");
            }
            was_ok = Some(ok);
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Waits for in-flight tasks, at most `grace`; then cancels what is left and
/// gives connections [`LINGER`] to deliver the last responses.
async fn drain(
    runner: &Runner,
    server: &mut JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) -> Result<(), RunError> {
    let stats = runner.stats().clone();
    let settled = tokio::time::timeout(grace, async {
        tokio::select! {
            finished = &mut *server => Some(shoal_telemetry::grpc::server_outcome(finished)),
            () = stats.idle() => None,
        }
    })
    .await;
    let result = match settled {
        Ok(Some(result)) => return result,
        Ok(None) => Ok(()),
        Err(_) => {
            tracing::warn!(in_flight = stats.in_flight(), "grace period over, cancelling in-flight tasks");
            runner.cancel_all();
            Ok(())
        }
    };
    match tokio::time::timeout(LINGER, &mut *server).await {
        Ok(finished) => shoal_telemetry::grpc::server_outcome(finished),
        Err(_) => {
            tracing::warn!("connections still open after the drain, closing them");
            runner.cancel_all();
            server.abort();
            result
        }
    }
}
