//! One way to serve gRPC for every Shoal service: [`GrpcServer`].
//!
//! It adds what every service needs around the service's own routes:
//! `grpc.health.v1` (for `""` and every name given), reflection v1 and
//! v1alpha over the given descriptor sets, request telemetry
//! ([`shoal_telemetry::grpc::ServerLayer`]), `TCP_NODELAY`, and the drain of
//! [`crate::drain`]: at the signal readiness goes false and every health
//! name `NOT_SERVING`; calls are served through the drain delay (less when
//! no connection is open); then the server stops accepting (graceful,
//! two-phase GOAWAY) and in-flight calls finish under the grace; after it
//! the service's [`Stages::abandoning`] fires and what is left is dropped.
//!
//! With [`GrpcServer::tls`] every connection is TLS (mutual when the
//! [`shoal_tls::ServerTls`] has a client CA: a client without a valid
//! certificate is refused in the handshake, before any call), with the
//! certificate files as they are at each accept.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::{Layer, Service};

use crate::admin::Readiness;
use crate::drain::{self, DelayEnd, DrainSettings, InFlight, Stages};
use crate::net::{Connections, Tracked};

/// After the last call ends during a drain, how long connections get to
/// deliver their responses and close before the server is dropped. Bounds
/// the drain when a client holds a stream open (a health `Watch`).
pub const LINGER: Duration = Duration::from_millis(500);

/// A gRPC service failed while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("grpc server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("cannot build the reflection service from the descriptor sets")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("admin server failed")]
    Admin(#[source] std::io::Error),
}

/// A response rewrite applied to every call (e.g. to turn a decoding limit
/// into the service's own status).
pub type MapResponse = fn(Response<Body>) -> Response<Body>;

/// A bound gRPC listener and how to serve and drain it.
#[derive(Debug)]
pub struct GrpcServer {
    listener: TcpListener,
    readiness: Readiness,
    drain: DrainSettings,
    health_names: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    map_response: MapResponse,
    stages: Stages,
    connections: Connections,
    tls: Option<shoal_tls::ServerTls>,
}

impl GrpcServer {
    /// Serves on `listener`, reporting through `readiness`, draining per
    /// `drain`. Health covers `""`; reflection covers the health protos.
    pub fn new(listener: TcpListener, readiness: Readiness, drain: DrainSettings) -> Self {
        Self {
            listener,
            readiness,
            drain,
            health_names: vec![""],
            descriptor_sets: vec![tonic_health::pb::FILE_DESCRIPTOR_SET],
            map_response: std::convert::identity,
            stages: Stages::default(),
            connections: Connections::new(),
            tls: None,
        }
    }

    /// Serves TLS with `tls` (`None`: plaintext).
    #[must_use]
    pub fn tls(mut self, tls: Option<shoal_tls::ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Also reports health for these gRPC service names.
    #[must_use]
    pub fn health(mut self, names: &[&'static str]) -> Self {
        self.health_names.extend_from_slice(names);
        self
    }

    /// Also serves reflection over these encoded descriptor sets.
    #[must_use]
    pub fn descriptors(mut self, sets: &[&'static [u8]]) -> Self {
        self.descriptor_sets.extend_from_slice(sets);
        self
    }

    /// Rewrites every response with `map`.
    #[must_use]
    pub fn map_response(mut self, map: MapResponse) -> Self {
        self.map_response = map;
        self
    }

    /// The moments of the drain, for the service's own work.
    pub fn stages(&self) -> Stages {
        self.stages.clone()
    }

    /// The open connections of the listener.
    pub fn connections(&self) -> Connections {
        self.connections.clone()
    }

    /// The bound address.
    ///
    /// # Errors
    ///
    /// When the socket has none (it always has, once bound).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `routes` (the service's own) with health and reflection until
    /// `shutdown` resolves, then drains per the [module docs](self). Marks
    /// the readiness started once serving, then calls `announce` (the
    /// service's `listening` log line).
    ///
    /// # Errors
    ///
    /// [`RunError::Reflection`] for a bad descriptor set, [`RunError::Grpc`]
    /// when the server fails.
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send,
        announce: impl FnOnce(),
    ) -> Result<(), RunError> {
        let Self { listener, readiness, drain, health_names, descriptor_sets, map_response, stages, connections, tls } =
            self;
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, &health_names, ServingStatus::NotServing).await;
        let reflection = || {
            descriptor_sets.iter().fold(tonic_reflection::server::Builder::configure(), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            })
        };
        let reflection_v1 = reflection().build_v1().map_err(RunError::Reflection)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(RunError::Reflection)?;
        let routes = routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);

        let in_flight = InFlight::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer(shoal_telemetry::grpc::ServerLayer)
            .layer(InFlightLayer(in_flight.clone()))
            .layer(tower::util::MapResponseLayer::new(map_response))
            .add_routes(routes);
        let incoming = crate::net::incoming(listener, connections.clone());
        let stopped = async {
            let _ = stopped.await;
        };
        // Serving before the first call can be accepted, so no client ever
        // sees a start-up NOT_SERVING.
        set_health(&health, &health_names, ServingStatus::Serving).await;
        readiness.mark_started();
        let mut server = match tls {
            Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(shoal_tls::accept(tls, incoming), stopped)),
            None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped)),
        };
        announce();

        tokio::select! {
            () = shutdown => {}
            finished = &mut server => return outcome(finished),
        }
        tracing::info!(
            drain_delay_ms = drain.delay.as_millis() as u64,
            grace_ms = drain.grace.as_millis() as u64,
            "draining: not ready, still serving"
        );
        readiness.mark_draining();
        set_health(&health, &health_names, ServingStatus::NotServing).await;
        stages.start_draining();
        tokio::select! {
            end = drain::delay(drain.delay, &connections) => {
                if end == DelayEnd::Idle {
                    tracing::info!("no connection open: ending the drain delay early");
                }
            }
            finished = &mut server => return outcome(finished),
        }
        tracing::info!(in_flight = in_flight.open(), "stopping: no new calls, finishing in-flight ones");
        let _ = stop.send(());
        stages.start_stopping();
        let settled = tokio::time::timeout(drain.grace, async {
            tokio::select! {
                finished = &mut server => Some(outcome(finished)),
                () = in_flight.none_open() => None,
            }
        })
        .await;
        match settled {
            Ok(Some(result)) => return result,
            Ok(None) => {}
            Err(_) => {
                tracing::warn!(in_flight = in_flight.open(), "grace period over, abandoning in-flight calls");
                stages.start_abandoning();
            }
        }
        match tokio::time::timeout(LINGER, &mut server).await {
            Ok(finished) => outcome(finished),
            Err(_) => {
                tracing::debug!(
                    connections = connections.open(),
                    "connections still open after the drain, closing them"
                );
                stages.start_abandoning();
                server.abort();
                Ok(())
            }
        }
    }
}

async fn set_health(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// The outcome of the spawned tonic server task. A cancelled task is the
/// drain's deliberate abort, not a failure; the task never panics on its own.
fn outcome(finished: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) -> Result<(), RunError> {
    match finished {
        Ok(result) => result.map_err(RunError::Grpc),
        Err(_) => Ok(()),
    }
}

/// Counts the calls in flight (not health or reflection) until their
/// response head is ready.
#[derive(Debug, Clone)]
struct InFlightLayer(InFlight);

impl<S> Layer<S> for InFlightLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Counted { inner, in_flight: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
struct Counted<S> {
    inner: S,
    in_flight: InFlight,
}

impl<S, B> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        let infrastructure = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        let guard: Option<Tracked> = (!infrastructure).then(|| self.in_flight.track());
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(guard);
            response
        })
    }
}
