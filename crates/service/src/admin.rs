//! The admin listener every service runs beside its main one:
//!
//! - `GET /metrics`: Prometheus text exposition of the service's instruments;
//! - `GET /healthz`: liveness, `200` while the process can answer at all. It
//!   never depends on other services, so a dead dependency never gets a pod
//!   restarted;
//! - `GET /readyz`: readiness, `200` only once the service has started, while
//!   every readiness condition holds, and never after shutdown began; `503`
//!   otherwise, with the failing conditions in the JSON body.
//!
//! The admin listener must outlive the main one during a drain, so that
//! `/readyz` keeps answering `503` while in-flight work finishes.
//!
//! [`healthcheck_subcommand`] is the other side: `shoal-<service> healthcheck`
//! asks the running service's own `/readyz`, so a container `HEALTHCHECK`
//! needs neither a shell nor curl in the image.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const STARTED: &str = "started";
const NOT_DRAINING: &str = "not_draining";

/// Whether the service can take traffic: a set of named conditions that must
/// all hold. Cloning shares the state.
#[derive(Debug, Clone)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready: the service has not started yet.
    pub fn new() -> Self {
        let conditions = BTreeMap::from([(STARTED, false), (NOT_DRAINING, true)]);
        Self { conditions: Arc::new(Mutex::new(conditions)) }
    }

    /// Sets a named condition (e.g. `"redis"`); all must hold to be ready.
    pub fn set(&self, condition: &'static str, holds: bool) {
        if let Ok(mut conditions) = self.conditions.lock() {
            conditions.insert(condition, holds);
        }
    }

    /// The service has bound its listeners and can serve.
    pub fn mark_started(&self) {
        self.set(STARTED, true);
    }

    /// Shutdown began: not ready from now on, whatever else holds.
    pub fn mark_draining(&self) {
        self.set(NOT_DRAINING, false);
    }

    /// Whether shutdown began.
    pub fn is_draining(&self) -> bool {
        self.failing().contains(&NOT_DRAINING)
    }

    /// All conditions hold.
    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }

    /// The conditions that do not hold.
    pub fn failing(&self) -> Vec<&'static str> {
        match self.conditions.lock() {
            Ok(conditions) => conditions.iter().filter(|(_, ok)| !**ok).map(|(name, _)| *name).collect(),
            Err(_) => vec!["poisoned"],
        }
    }
}

/// More Prometheus text that a service appends to its own `/metrics` (the
/// metrics-aggregator adds the fleet view). Called on the blocking pool.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    extra: Option<ExtraMetrics>,
}

/// The admin router, for services that add routes of their own.
pub fn router(readiness: Readiness) -> Router {
    router_with_metrics(readiness, None)
}

/// The admin router whose `/metrics` also serves `extra` after the
/// service's own instruments.
pub fn router_with_metrics(readiness: Readiness, extra: Option<ExtraMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { readiness, extra })
}

/// Serves an admin `router` (from [`router`] or [`router_with_metrics`],
/// possibly with more routes) on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// An I/O error from the listener.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(crate::net::http_listener(listener, crate::net::Connections::new()), router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// An I/O error from the listener.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(crate::net::http_listener(listener, crate::net::Connections::new()), router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = shoal_telemetry::metrics::render();
    if let Some(extra) = state.extra {
        match tokio::task::spawn_blocking(move || extra()).await {
            Ok(text) => body.push_str(&text),
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"alive"}"#).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let failing = state.readiness.failing();
    let (status, body) = if failing.is_empty() {
        (StatusCode::OK, serde_json::json!({ "status": "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "status": "not_ready", "failing": failing }))
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The first argument that makes a service binary probe itself instead of
/// serving.
pub const HEALTHCHECK_ARG: &str = "healthcheck";

/// How long `healthcheck` waits for the whole probe.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest probe response read; `/readyz` answers a few dozen bytes.
const MAX_PROBE_RESPONSE: u64 = 16 * 1024;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot reach {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered something that is not HTTP")]
    NotHttp { addr: SocketAddr },
    #[error("{addr}{path} answered {status}: {body}")]
    Status { addr: SocketAddr, path: String, status: u16, body: String },
}

/// `GET path` on `addr` over plain HTTP/1.1, bounded by `timeout` as a
/// whole; `Ok` with the body on `200`. An unspecified address (`0.0.0.0`,
/// `::`), as a listener is configured, is probed on loopback.
///
/// # Errors
///
/// Unreachable, too slow, not HTTP, or a status other than `200`.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    let addr = loopback_if_unspecified(addr);
    match tokio::time::timeout(timeout, http_get(addr, path)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { addr, timeout }),
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String, ProbeError> {
    let io = |source| ProbeError::Io { addr, source };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: shoal-healthcheck\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    stream.take(MAX_PROBE_RESPONSE).read_to_end(&mut response).await.map_err(io)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(ProbeError::NotHttp { addr })?;
    let body = body.trim().to_owned();
    if status == 200 { Ok(body) } else { Err(ProbeError::Status { addr, path: path.to_owned(), status, body }) }
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// The `healthcheck` subcommand every service binary offers, for container
/// healthchecks that need no shell or curl (`HEALTHCHECK CMD ["shoal-worker",
/// "healthcheck"]`).
///
/// Returns `None` unless the first argument is `healthcheck`; then parses the
/// service's config `C` from the remaining flags and the environment (the
/// same `SHOAL_<SERVICE>_ADMIN_ADDR` the service itself reads), probes
/// `/readyz` on the admin address that `admin_addr` picks from it, prints
/// the outcome, and returns the exit code: `0` when ready, `1` otherwise
/// (`2` for a config that does not parse). Call it first thing in `main`.
pub async fn healthcheck_subcommand<C: clap::Parser>(admin_addr: impl FnOnce(&C) -> SocketAddr) -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let program = args.next()?;
    if args.next()?.to_str() != Some(HEALTHCHECK_ARG) {
        return None;
    }
    let args = match crate::config::args_with_env_files::<C>(std::iter::once(program).chain(args), |name| {
        std::env::var_os(name)
    }) {
        Ok(args) => args,
        Err(message) => {
            println!("not ready: {message}");
            return Some(ExitCode::from(2));
        }
    };
    let config = match C::try_parse_from(args) {
        Ok(config) => config,
        Err(error) => {
            let _ = error.print();
            return Some(ExitCode::from(2));
        }
    };
    let addr = admin_addr(&config);
    Some(match probe(addr, "/readyz", HEALTHCHECK_TIMEOUT).await {
        Ok(body) => {
            println!("ready: {body}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("not ready: {error}");
            ExitCode::FAILURE
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_start_and_every_condition_and_no_drain() {
        let readiness = Readiness::new();
        assert_eq!(readiness.failing(), vec![STARTED]);
        readiness.mark_started();
        assert!(readiness.is_ready());
        readiness.set("redis", false);
        assert_eq!(readiness.failing(), vec!["redis"]);
        readiness.set("redis", true);
        readiness.mark_draining();
        assert!(!readiness.is_ready());
        assert!(readiness.is_draining());
    }

    async fn spawn_admin(readiness: Readiness) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, readiness, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    #[tokio::test]
    async fn probe_is_ok_only_when_ready() {
        let readiness = Readiness::new();
        let (addr, _stop) = spawn_admin(readiness.clone()).await;
        let error = probe(addr, "/readyz", HEALTHCHECK_TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ProbeError::Status { status: 503, .. }), "{error}");
        assert!(error.to_string().contains("started"), "{error}");
        readiness.mark_started();
        let body = probe(addr, "/readyz", HEALTHCHECK_TIMEOUT).await.unwrap();
        assert!(body.contains("ready"), "{body}");
        readiness.mark_draining();
        assert!(probe(addr, "/readyz", HEALTHCHECK_TIMEOUT).await.is_err());
    }

    #[tokio::test]
    async fn probe_of_an_unspecified_address_goes_to_loopback() {
        let readiness = Readiness::new();
        readiness.mark_started();
        let (addr, _stop) = spawn_admin(readiness).await;
        let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
        probe(unspecified, "/readyz", HEALTHCHECK_TIMEOUT).await.unwrap();
    }

    #[tokio::test]
    async fn probe_fails_fast_when_nothing_listens_or_nothing_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel but never answered: the timeout bounds it.
        let error = probe(addr, "/readyz", Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(error, ProbeError::Timeout { .. }), "{error}");
        drop(listener);
        let error = probe(addr, "/readyz", HEALTHCHECK_TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ProbeError::Io { .. }), "{error}");
    }
}
