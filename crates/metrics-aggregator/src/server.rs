//! Binding, serving and draining the aggregator.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_proto::aggregator::v1::aggregator_service_server::{AggregatorServiceServer, SERVICE_NAME};
use shoal_telemetry::admin::{self, Readiness};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::Config;
use crate::query::QueryService;

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind the {listener} listener on {addr}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The server failed while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("grpc server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("admin server failed")]
    Admin(#[source] std::io::Error),
}

/// A bound, not yet serving, aggregator.
#[derive(Debug)]
pub struct Aggregator {
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { listener, addr, source })
}

impl Aggregator {
    /// Binds the gRPC and admin listeners.
    ///
    /// # Errors
    ///
    /// [`StartError::Bind`] when an address is taken or not allowed.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let grpc = bind("grpc", config.grpc_addr).await?;
        let admin = bind("admin", config.admin_addr).await?;
        Ok(Self { config, grpc, admin, readiness: Readiness::new() })
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
    /// most the configured grace and returns.
    ///
    /// # Errors
    ///
    /// A listener failure.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let grpc_addr = self.grpc_addr();
        let admin_addr = self.admin_addr();
        let Self { config, grpc, admin, readiness } = self;
        let aggregator_id = format!("{}:{}", shoal_telemetry::instance_id(), grpc_addr.port());

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        let (reflection_v1, reflection_v1alpha) = shoal_proto::reflection::services();

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));

        let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .layer(shoal_telemetry::grpc::ServerLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AggregatorServiceServer::new(QueryService { aggregator_id: aggregator_id.clone() }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async {
                let _ = grpc_stopped.await;
            });
        let mut server = tokio::spawn(server);

        health.set_service_status("", ServingStatus::Serving).await;
        health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
        readiness.mark_started();
        tracing::info!(grpc_addr = %grpc_addr, admin_addr = %admin_addr, aggregator_id, "listening");

        let result = tokio::select! {
            () = shutdown => {
                drain(&readiness, &health, stop_grpc, &mut server, config.shutdown_grace).await
            }
            finished = &mut server => flatten(finished),
        };
        let _ = stop_admin.send(());
        let admin_result = admin_task.await.unwrap_or(Ok(())).map_err(RunError::Admin);
        tracing::info!("stopped");
        result.and(admin_result)
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
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
    let _ = stop_grpc.send(());
    match tokio::time::timeout(grace, &mut *server).await {
        Ok(finished) => flatten(finished),
        Err(_) => {
            tracing::warn!("grace period over, abandoning in-flight calls");
            server.abort();
            Ok(())
        }
    }
}

fn flatten(finished: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) -> Result<(), RunError> {
    match finished {
        Ok(result) => result.map_err(RunError::Grpc),
        // The server task never panics on its own; a cancelled task is an abort.
        Err(_) => Ok(()),
    }
}
