//! Binding, serving and draining the aggregator, and its background loops
//! (window sampling and expiry; checkpoints to and from Redis).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
use shoal_proto::aggregator::v1::aggregator_service_server::{AggregatorServiceServer, SERVICE_NAME};
use shoal_service::admin::{self, Readiness};
use shoal_service::{DrainSettings, GrpcServer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::fleet::{Fleet, now_ms};
use crate::ingest::{IngestGuard, IngestService};
use crate::query::QueryService;

/// The OTLP metrics service name, as health and reflection know it.
pub const OTLP_SERVICE_NAME: &str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
/// Readiness condition: the first load from Redis is done (only with Redis).
const REDIS_LOADED: &str = "redis_loaded";

/// The aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] shoal_service::net::BindError),
    #[error("cannot use the redis url")]
    Redis(#[source] CheckpointError),
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot serve grpc over tls")]
    Tls(#[from] shoal_tls::TlsError),
}

/// The service failed while running (shared by every gRPC service).
pub use shoal_service::RunError;

/// A bound, not yet serving, aggregator.
#[derive(Debug)]
pub struct Aggregator {
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
    fleet: Arc<Fleet>,
    checkpoint: Option<Checkpoint>,
    replica_id: String,
    ingest_token: Option<String>,
    tls: Option<shoal_tls::ServerTls>,
}

impl Aggregator {
    /// Binds the gRPC and admin listeners and prepares the Redis pool (no
    /// connection opens until the first checkpoint).
    ///
    /// # Errors
    ///
    /// [`StartError::Config`] when settings contradict each other (checked
    /// before anything binds); [`StartError::Bind`] when an address is taken
    /// or not allowed;
    /// [`StartError::Redis`] for an unusable Redis URL.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let ingest_token = config.ingest_token()?;
        let tls = match config.tls.files()? {
            Some(files) => Some(shoal_tls::ServerTls::load(&files)?.reloading(shoal_tls::RELOAD_INTERVAL)),
            None => None,
        };
        let grpc = shoal_service::net::bind("grpc", config.grpc_addr).await?;
        let admin = shoal_service::net::bind("admin", config.admin_addr).await?;
        let port = grpc.local_addr().map(|a| a.port()).unwrap_or(config.grpc_addr.port());
        let replica_id =
            config.replica_id.clone().unwrap_or_else(|| format!("{}:{port}", shoal_telemetry::instance_id()));
        let checkpoint = match &config.redis_url {
            Some(url) => Some(
                Checkpoint::new(url, &config.redis_prefix, &replica_id, config.redis_timeout)
                    .map_err(StartError::Redis)?,
            ),
            None => None,
        };
        let fleet = Arc::new(Fleet::new(config.settings(), config.max_source_push_rate));
        Ok(Self { config, grpc, admin, readiness: Readiness::new(), fleet, checkpoint, replica_id, ingest_token, tls })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls for at
    /// most the configured grace, writes a last checkpoint and returns.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let grpc_addr = self.grpc_addr();
        let admin_addr = self.admin_addr();
        let Self { config, grpc, admin, readiness, fleet, checkpoint, replica_id, ingest_token, tls } = self;
        let mutual_tls = tls.as_ref().map(shoal_tls::ServerTls::is_mutual);
        if mutual_tls != Some(true) && ingest_token.is_none() {
            // Anything that reaches the port can push: fine on a laptop.
            tracing::warn!("otlp ingestion is open: no --grpc-tls-client-ca and no --ingest-token-file");
        }
        let aggregator_id = replica_id.clone();
        let grpc = GrpcServer::new(
            grpc,
            readiness.clone(),
            DrainSettings { delay: config.drain_delay, grace: config.shutdown_grace },
        )
        .tls(tls)
        .health(&[SERVICE_NAME, OTLP_SERVICE_NAME])
        .descriptors(&[shoal_proto::FILE_DESCRIPTOR_SET, opentelemetry_proto::DESCRIPTORS]);
        // Watches and the background loops end when the drain delay is over,
        // so that the drain is not held open by streams.
        let stop: CancellationToken = grpc.stages().stopping();

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let render_fleet = fleet.clone();
        let extra: admin::ExtraMetrics = Arc::new(move || render_fleet.render_prometheus());
        let admin_task = tokio::spawn(admin::serve_router(
            admin,
            admin::router_with_metrics(readiness.clone(), Some(extra)),
            async {
                let _ = admin_stopped.await;
            },
        ));

        // Background loops: sampling (windows, expiry) and checkpoints.
        let sampler = tokio::spawn(sample_loop(fleet.clone(), config.sample_interval, stop.clone()));
        if checkpoint.is_some() {
            readiness.set(REDIS_LOADED, false);
        }
        let syncer = checkpoint.clone().map(|c| {
            tokio::spawn(sync_loop(c, fleet.clone(), readiness.clone(), config.checkpoint_interval, stop.clone()))
        });

        let query = QueryService {
            fleet: fleet.clone(),
            aggregator_id: aggregator_id.clone(),
            watches: Arc::new(Semaphore::new(config.max_watches)),
            max_watches: config.max_watches,
            shutdown: stop.clone(),
        };
        let ingest = IngestGuard::new(
            MetricsServiceServer::new(IngestService { fleet: fleet.clone() })
                .max_decoding_message_size(config.max_push_bytes),
            ingest_token.as_deref(),
            config.max_concurrent_pushes,
        );
        let routes = tonic::service::Routes::new(AggregatorServiceServer::new(query)).add_service(ingest);
        let announce = || {
            tracing::info!(
                grpc_addr = %grpc_addr,
                admin_addr = %admin_addr,
                aggregator_id,
                redis = checkpoint.is_some(),
                grpc_tls = shoal_tls::mode(mutual_tls),
                ingest_token = ingest_token.is_some(),
                "listening"
            );
        };
        let result = grpc.serve(routes, shutdown, announce).await;
        stop.cancel();
        let _ = sampler.await;
        if let Some(syncer) = syncer {
            let _ = syncer.await;
        }
        if let Some(checkpoint) = &checkpoint {
            let dirty = fleet.take_dirty();
            let sources = dirty.len();
            let deadline = config.redis_timeout.min(config.shutdown_grace);
            match tokio::time::timeout(deadline, checkpoint.save(dirty)).await {
                Ok(Ok(())) => tracing::info!(sources, "final checkpoint written"),
                Ok(Err(error)) => {
                    tracing::warn!(error = &error as &dyn std::error::Error, "final checkpoint failed");
                }
                Err(_) => tracing::warn!("final checkpoint timed out"),
            }
        }
        let _ = stop_admin.send(());
        let admin_result = admin_task.await.unwrap_or(Ok(())).map_err(RunError::Admin);
        tracing::info!("stopped");
        result.and(admin_result)
    }
}

async fn sample_loop(fleet: Arc<Fleet>, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let fleet = fleet.clone();
        match tokio::task::spawn_blocking(move || fleet.sample()).await {
            Ok(forgotten) if !forgotten.is_empty() => {
                tracing::info!(sources = forgotten.len(), "forgot sources past their retention");
            }
            Ok(_) => {}
            Err(error) => tracing::error!(error = %error, "sampling failed"),
        }
    }
}

/// Every interval: write what changed, then read and join every replica's
/// state. The first successful load makes the aggregator ready.
async fn sync_loop(
    checkpoint: Checkpoint,
    fleet: Arc<Fleet>,
    readiness: Readiness,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loaded = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let dirty = fleet.take_dirty();
        let ids: Vec<_> = dirty.iter().map(|(id, _)| id.clone()).collect();
        if let Err(error) = checkpoint.save(dirty).await {
            fleet.mark_dirty(ids);
            tracing::warn!(error = &error as &dyn std::error::Error, "checkpoint failed");
            continue;
        }
        match load(&checkpoint, &fleet).await {
            Ok(skipped) => {
                if skipped > 0 {
                    tracing::warn!(skipped, "series from redis skipped: over the limits or conflicting");
                }
                if !loaded {
                    loaded = true;
                    readiness.set(REDIS_LOADED, true);
                    tracing::info!("state loaded from redis");
                }
            }
            Err(error) => tracing::warn!(error = &error as &dyn std::error::Error, "loading replicas' state failed"),
        }
    }
}

/// Reads every replica's state page by page, joining each page before the
/// next is read; returns the series skipped.
async fn load(checkpoint: &Checkpoint, fleet: &Arc<Fleet>) -> Result<usize, CheckpointError> {
    let (now, retention, limits) = (now_ms(), fleet.retention_ms(), fleet.limits());
    let mut cursor = 0;
    let mut skipped = 0;
    for _ in 0..crate::checkpoint::MAX_SCAN_STEPS {
        let (next, page) = checkpoint.load_page(cursor, now, retention, limits).await?;
        let fleet = fleet.clone();
        skipped += tokio::task::spawn_blocking(move || fleet.join(&page)).await.map_err(|_| CheckpointError::Task)?;
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(skipped)
}
