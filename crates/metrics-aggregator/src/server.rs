//! Binding, serving and draining the aggregator, and its background loops
//! (window sampling and expiry; checkpoints to and from Redis).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
use shoal_proto::aggregator::v1::aggregator_service_server::{AggregatorServiceServer, SERVICE_NAME};
use shoal_telemetry::admin::{self, Readiness};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::Config;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::fleet::{Fleet, now_ms};
use crate::ingest::IngestService;
use crate::query::QueryService;

/// The OTLP metrics service name, as health and reflection know it.
pub const OTLP_SERVICE_NAME: &str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
/// Readiness condition: the first load from Redis is done (only with Redis).
const REDIS_LOADED: &str = "redis_loaded";

/// The aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] shoal_telemetry::net::BindError),
    #[error("cannot use the redis url")]
    Redis(#[source] CheckpointError),
    #[error("--replica-id must not contain control characters")]
    ReplicaId,
}

/// The service failed while running (shared by every gRPC service).
pub use shoal_telemetry::grpc::RunError;

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
}

impl Aggregator {
    /// Binds the gRPC and admin listeners and prepares the Redis pool (no
    /// connection opens until the first checkpoint).
    ///
    /// # Errors
    ///
    /// [`StartError::Bind`] when an address is taken or not allowed;
    /// [`StartError::Redis`] for an unusable Redis URL.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let grpc = shoal_telemetry::net::bind("grpc", config.grpc_addr).await?;
        let admin = shoal_telemetry::net::bind("admin", config.admin_addr).await?;
        let port = grpc.local_addr().map(|a| a.port()).unwrap_or(config.grpc_addr.port());
        let replica_id =
            config.replica_id.clone().unwrap_or_else(|| format!("{}:{port}", shoal_telemetry::instance_id()));
        if replica_id.chars().any(char::is_control) {
            return Err(StartError::ReplicaId);
        }
        let checkpoint = match &config.redis_url {
            Some(url) => Some(
                Checkpoint::new(url, &config.redis_prefix, &replica_id, config.redis_timeout)
                    .map_err(StartError::Redis)?,
            ),
            None => None,
        };
        let fleet = Arc::new(Fleet::new(config.settings()));
        Ok(Self { config, grpc, admin, readiness: Readiness::new(), fleet, checkpoint, replica_id })
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
        let Self { config, grpc, admin, readiness, fleet, checkpoint, replica_id } = self;
        let aggregator_id = replica_id.clone();
        let stop = CancellationToken::new();

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in ["", SERVICE_NAME, OTLP_SERVICE_NAME] {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        let (reflection_v1, reflection_v1alpha) = reflection();

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
        let ingest = MetricsServiceServer::new(IngestService { fleet: fleet.clone() })
            .max_decoding_message_size(config.max_push_bytes);
        let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .layer(shoal_telemetry::grpc::ServerLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AggregatorServiceServer::new(query))
            .add_service(ingest)
            .serve_with_incoming_shutdown(shoal_telemetry::net::incoming(grpc), async {
                let _ = grpc_stopped.await;
            });
        let mut server = tokio::spawn(server);

        for name in ["", SERVICE_NAME, OTLP_SERVICE_NAME] {
            health.set_service_status(name, ServingStatus::Serving).await;
        }
        readiness.mark_started();
        tracing::info!(
            grpc_addr = %grpc_addr,
            admin_addr = %admin_addr,
            aggregator_id,
            redis = checkpoint.is_some(),
            "listening"
        );

        let result = tokio::select! {
            () = shutdown => {
                // Watches end now, so that the drain is not held open by streams.
                stop.cancel();
                drain(&readiness, &health, stop_grpc, &mut server, config.shutdown_grace).await
            }
            finished = &mut server => shoal_telemetry::grpc::server_outcome(finished),
        };
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

/// Reflection over Shoal's protos, health, and the OTLP metrics service.
fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shoal_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(opentelemetry_proto::DESCRIPTORS)
    };
    // The descriptors are compiled in and checked by the tests.
    #[allow(clippy::expect_used)]
    let v1 = builder().build_v1().expect("compiled-in descriptors are valid");
    #[allow(clippy::expect_used)]
    let v1alpha = builder().build_v1alpha().expect("compiled-in descriptors are valid");
    (v1, v1alpha)
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
        match checkpoint.load(now_ms(), fleet.retention_ms()).await {
            Ok(snapshots) => {
                let fleet = fleet.clone();
                let joined = tokio::task::spawn_blocking(move || fleet.join(&snapshots)).await;
                if let Ok(skipped) = joined
                    && skipped > 0
                {
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

async fn drain(
    readiness: &Readiness,
    health: &tonic_health::server::HealthReporter,
    stop_grpc: tokio::sync::oneshot::Sender<()>,
    server: &mut tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) -> Result<(), RunError> {
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
    readiness.mark_draining();
    for name in ["", SERVICE_NAME, OTLP_SERVICE_NAME] {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let _ = stop_grpc.send(());
    match tokio::time::timeout(grace, &mut *server).await {
        Ok(finished) => shoal_telemetry::grpc::server_outcome(finished),
        Err(_) => {
            tracing::warn!("grace period over, abandoning in-flight calls");
            server.abort();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflection_accepts_every_descriptor_set() {
        let _ = super::reflection();
    }
}
