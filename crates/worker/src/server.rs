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
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Config;
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
    #[error("cannot bind the {listener} listener on {addr}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The worker failed while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("grpc server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("admin server failed")]
    Admin(#[source] std::io::Error),
}

/// A bound, not yet serving, worker.
#[derive(Debug)]
pub struct Worker {
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    readiness: Readiness,
    runner: Arc<Runner>,
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { listener, addr, source })
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
        let grpc = bind("grpc", config.grpc_addr).await?;
        let admin = bind("admin", config.admin_addr).await?;
        let runner = Arc::new(Runner::new(registry, config.max_concurrency as usize));
        Ok(Self { config, grpc, admin, readiness: Readiness::new(), runner })
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
        let Self { config, grpc, admin, readiness, runner } = self;

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let (reflection_v1, reflection_v1alpha) = shoal_proto::reflection::services();

        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, readiness.clone(), async {
            let _ = admin_stopped.await;
        }));

        let max_message = config.max_message_bytes as usize;
        let service = Service { runner: Arc::clone(&runner), worker_id: worker_id.as_str().into() };
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
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async {
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
                drain(&runner, &mut server, config.shutdown_grace).await
            }
            finished = &mut server => flatten(finished),
        };
        let _ = stop_admin.send(());
        let admin_result = admin_task.await.unwrap_or(Ok(())).map_err(RunError::Admin);
        tracing::info!("stopped");
        result.and(admin_result)
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
            finished = &mut *server => Some(flatten(finished)),
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
        Ok(finished) => flatten(finished),
        Err(_) => {
            tracing::warn!("connections still open after the drain, closing them");
            runner.cancel_all();
            server.abort();
            result
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
