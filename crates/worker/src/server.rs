//! Binding, serving and draining a worker.
//!
//! Serving and the shutdown sequence are [`shoal_service::GrpcServer`]'s:
//! readiness off and health `NOT_SERVING` for every service name while calls
//! are still served through the drain delay; then no new calls (GOAWAY),
//! in-flight calls finish within the grace (then they are cancelled). The job
//! executor stops claiming at the signal and finishes or hands back its jobs
//! under the grace; the admin listener stops last.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::worker::v1::worker_service_server::{SERVICE_NAME, WorkerServiceServer};
use shoal_service::admin::{self, Readiness};
use shoal_service::{DrainSettings, GrpcServer};
use tokio::net::TcpListener;

use crate::Config;
use crate::jobs::{JobRunner, JobStore, JobsApi, Keys, PoolSettings, RedisPool, RunnerConfig, StoreConfig, Topology};

/// Most pooled connections to a Redis Cluster (`--redis-pool-size` caps it
/// lower).
const CLUSTER_POOL_SIZE: usize = 8;
use crate::runner::{Runner, Stats};
use crate::service::Service;
use crate::tasks::TaskRegistry;

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] shoal_service::net::BindError),
    #[error(transparent)]
    RedisUrl(#[from] crate::jobs::UrlError),
    #[error("cannot serve grpc over tls")]
    Tls(#[from] shoal_tls::TlsError),
}

/// The service failed while running (shared by every gRPC service).
pub use shoal_service::RunError;

/// A bound, not yet serving, worker.
#[derive(Debug)]
pub struct Worker {
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
    runner: Arc<Runner>,
    jobs: Option<JobStore>,
    tls: Option<shoal_tls::ServerTls>,
}

impl Worker {
    /// Binds the gRPC and admin listeners, with the built-in task kinds.
    ///
    /// # Errors
    ///
    /// [`StartError::Tls`] for unusable certificate files (checked before
    /// anything binds); [`StartError::Bind`] when an address is taken or not
    /// allowed.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_with(config, TaskRegistry::builtin()).await
    }

    /// Like [`Worker::bind`], running the kinds in `registry`.
    ///
    /// # Errors
    ///
    /// As [`Worker::bind`].
    pub async fn bind_with(config: Config, registry: TaskRegistry) -> Result<Self, StartError> {
        let tls = match config.tls.files()? {
            Some(files) => Some(shoal_tls::ServerTls::load(&files)?.reloading(shoal_tls::RELOAD_INTERVAL)),
            None => None,
        };
        let grpc = shoal_service::net::bind("grpc", config.grpc_addr).await?;
        let admin = shoal_service::net::bind("admin", config.admin_addr).await?;
        let jobs = config.jobs.topology().map(|topology| job_store(&topology, &config.jobs)).transpose()?;
        let runner = Arc::new(Runner::new(registry, config.max_concurrency as usize));
        Ok(Self { config, grpc, admin, readiness: Readiness::new(), runner, jobs, tls })
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

    /// Serves until `shutdown` resolves, then drains per the
    /// [module docs](self) and returns.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let grpc_addr = self.grpc_addr();
        let admin_addr = self.admin_addr();
        let worker_id = self.worker_id();
        let Self { config, grpc, admin, readiness, runner, jobs, tls } = self;
        let mutual_tls = tls.as_ref().map(shoal_tls::ServerTls::is_mutual);

        let grpc = GrpcServer::new(
            grpc,
            readiness.clone(),
            DrainSettings { delay: config.drain_delay, grace: config.shutdown_grace },
        )
        .tls(tls)
        .health(&[SERVICE_NAME])
        .descriptors(&[shoal_proto::FILE_DESCRIPTOR_SET])
        .map_response(crate::error::oversized_as_resource_exhausted::<tonic::body::Body>);
        let stages = grpc.stages();

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));

        let max_message = config.max_message_bytes as usize;
        let registry = runner.registry().clone();
        let jobs_api = JobsApi::new(jobs.clone(), registry.clone(), &config.jobs);
        // The executor stops claiming jobs at the signal and finishes (or
        // hands back) the ones it holds under the grace.
        let stop_jobs = stages.draining();
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
                    max_result_bytes: config.jobs.max_result_bytes as usize,
                },
            );
            readiness.set("redis", false);
            let monitor = tokio::spawn(watch_redis(store, readiness.clone(), stop_jobs.clone()));
            // No job runs while the old key layout holds jobs (migrated
            // first with --redis-migrate-legacy-keys).
            let (migrate, grace, ready, stop) =
                (config.jobs.redis_migrate_legacy_keys, config.shutdown_grace, readiness.clone(), stop_jobs.clone());
            let executor = tokio::spawn(async move {
                if crate::jobs::migrate::prepare(&runner.store, migrate, &ready, &stop).await {
                    runner.run_or_exit(stop, grace, ready).await;
                }
            });
            (monitor, executor)
        });
        // Tasks still running when the grace is over are cancelled.
        let abandon = tokio::spawn({
            let (runner, abandoning) = (Arc::clone(&runner), stages.abandoning());
            async move {
                abandoning.cancelled().await;
                runner.start_draining();
                runner.cancel_all();
            }
        });
        let service = Service { runner: Arc::clone(&runner), worker_id: worker_id.as_str().into(), jobs: jobs_api };
        let routes =
            tonic::service::Routes::new(WorkerServiceServer::new(service).max_decoding_message_size(max_message));
        let announce = || {
            tracing::info!(
                grpc_addr = %grpc_addr,
                admin_addr = %admin_addr,
                worker_id,
                max_concurrency = config.max_concurrency,
                grpc_tls = shoal_tls::mode(mutual_tls),
                "listening"
            );
        };
        let result = grpc.serve(routes, shutdown, announce).await;
        abandon.abort();
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

fn job_store(topology: &Topology, config: &crate::config::JobsConfig) -> Result<JobStore, StartError> {
    // A cluster connection is multiplexed over every primary already; a
    // few per worker are plenty (each is one socket per node).
    let size = match topology {
        Topology::Cluster { .. } => (config.redis_pool_size as usize).min(CLUSTER_POOL_SIZE),
        _ => config.redis_pool_size as usize,
    };
    let pool = |max_size: usize| RedisPool::new(topology, PoolSettings { max_size, wait: Duration::from_secs(2) });
    let store = JobStore::new(
        pool(size)?,
        Keys::new(config.redis_prefix.clone()),
        StoreConfig {
            job_ttl: config.job_ttl,
            idempotency_ttl: config.idempotency_ttl,
            max_open: config.max_queued_jobs,
            max_open_bytes: config.max_queued_bytes,
            max_deliveries: config.max_deliveries,
            dead_letter_cap: config.max_dead_letters,
        },
    );
    // Lease renewals get connections of their own: API traffic on the
    // shared pool can never starve them.
    Ok(store.with_lease_pool(pool(2)?))
}

/// Keeps the `redis` readiness condition and the `worker_redis_up` gauge
/// current: pinged every second.
async fn watch_redis(store: JobStore, readiness: Readiness, stop: tokio_util::sync::CancellationToken) {
    let up = shoal_telemetry::metrics::meter("shoal-worker")
        .u64_gauge("worker_redis_up")
        .with_description("1 while this worker reaches its Redis (its readiness condition), else 0")
        .build();
    let mut was_ok = None;
    while !stop.is_cancelled() {
        let ok = matches!(tokio::time::timeout(Duration::from_secs(2), store.ping()).await, Ok(Ok(())));
        readiness.set("redis", ok);
        up.record(u64::from(ok), &[]);
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
