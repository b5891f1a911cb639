//! The load generator: a fixed-rate open loop that corrects for coordinated
//! omission, and a closed loop over N connections (for saturation and for
//! "N concurrent clients").
//!
//! # Open loop
//!
//! Request `i` has an *intended* send time `start + i / rate`. `connections`
//! workers, each owning one keep-alive HTTP/1.1 connection (or sharing the
//! gRPC channels), take the next slot from a shared counter, wait for its
//! intended time and send. When every connection is busy the next slot is
//! taken late, and its latency is counted from the intended time, so time
//! spent queued behind a slow server is measured, not omitted. When a worker
//! was idle and only waiting on the timer, latency is counted from the actual
//! send instead: the timer's lateness (tokio sleeps in 1 ms ticks) is the
//! generator's, not the server's, and it is reported separately as
//! `generator_lag`.
//!
//! # Closed loop
//!
//! Each of `connections` workers sends its next request as soon as the
//! previous one completes, either for `duration` (after `warmup`), or for a
//! fixed number of requests per connection (`requests_per_connection`), all
//! connections starting at the same instant.
//!
//! Every run is bounded: no request is sent after `warmup + duration +
//! max_drain`, and each request is abandoned after `timeout`.
//!
//! # Stopping early
//!
//! [`run_until`] ends the schedule when a future resolves (`shoal-load run`
//! passes SIGINT/SIGTERM): no request intended after that instant is sent,
//! requests in flight complete, a backlog still queued `max_drain` after the
//! stop is never sent (unfinished), and the report's window and `sent` are
//! the part of the schedule before the stop. A driver that does not know in
//! advance how long its disturbance lasts (a rollout) uses a generous
//! `--duration` and signals the generator when it is done.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use shoal_proto::worker::v1::ExecuteRequest;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::stats::Summary;

/// Wire protocol of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive, one connection per worker.
    Http,
    /// gRPC `shoal.worker.v1.WorkerService/Execute` over HTTP/2 channels.
    Grpc,
}

/// Scheduling discipline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fixed request rate, latency from the intended send time.
    Open,
    /// Each connection sends as soon as its previous request completed.
    Closed,
}

/// One load run.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadConfig {
    /// Target: `http://127.0.0.1:PORT/path?query` (HTTP) or
    /// `http://127.0.0.1:PORT` (gRPC).
    #[arg(long)]
    pub url: String,

    /// Wire protocol.
    #[arg(long, value_enum, default_value = "http")]
    pub protocol: Protocol,

    /// HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: Method,

    /// HTTP request body (sent with `content-type: application/json`).
    #[arg(long)]
    pub body: Option<String>,

    /// Extra HTTP header, `name: value`; repeatable.
    #[arg(long = "header")]
    pub headers: Vec<String>,

    /// gRPC task kind for `Execute`.
    #[arg(long, default_value = "echo")]
    pub kind: String,

    /// gRPC `payload_json` for `Execute`.
    #[arg(long, default_value = "{}")]
    pub payload: String,

    /// gRPC: number of HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub channels: u64,

    /// Open (fixed rate) or closed loop.
    #[arg(long, value_enum, default_value = "open")]
    pub mode: Mode,

    /// Open loop: requests per second.
    #[arg(long, required_if_eq("mode", "open"))]
    pub rate: Option<f64>,

    /// Concurrent workers (HTTP: connections; gRPC: concurrent calls).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub connections: u64,

    /// Measured time (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Load applied before measuring, not recorded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Closed loop: send exactly this many requests per connection (no
    /// warm-up; `duration` is ignored). The reported rate is the sum over
    /// connections of each one's successful requests divided by the time
    /// from its first send to its last completion.
    #[arg(long)]
    pub requests_per_connection: Option<u64>,

    /// Closed loop with `--requests-per-connection`: spread the connections'
    /// first sends evenly over this long (0: all start at the same instant,
    /// a synchronized burst).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub ramp: Duration,

    /// A request not answered within this long counts as a timeout (its
    /// connection is dropped and reopened).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// After the schedule ends, how long queued requests may still be sent
    /// before the run stops and counts them as unfinished.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub max_drain: Duration,

    /// Most connections opened at once while connecting.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connect_parallelism: u64,

    /// A free-form name copied into the report.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// The outcome of one run, serialised as the generator's JSON output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub url: String,
    pub protocol: Protocol,
    pub mode: Mode,
    pub connections: u64,
    /// Open loop: the requested rate.
    pub target_rps: Option<f64>,
    /// Requests scheduled (open) or started (closed) in the measured window.
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Scheduled but never completed before the run's hard stop.
    pub unfinished: u64,
    /// Error counts by kind (`status 503`, `connect ConnectionRefused`, …).
    pub error_kinds: BTreeMap<String, u64>,
    /// Successful responses per second over the measured window.
    pub achieved_rps: f64,
    /// Length of the measured window, seconds (open loop: the scheduled
    /// window, or longer when completions trailed it).
    pub window_s: f64,
    /// Latency of successful requests (open loop: corrected for coordinated
    /// omission, see the module docs).
    pub latency: Summary,
    /// Send-to-response time of successful requests, not corrected.
    pub service_time: Summary,
    /// Open loop: how late the generator's timer fired for requests that
    /// were not queued (large values mean the generator was overloaded).
    pub generator_lag: Summary,
    /// Open loop: requests that had to wait for a free connection.
    pub queued: u64,
}

/// Errors that stop a run before it starts.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid target url {0:?}: {1}")]
    Url(String, String),
    #[error("invalid header {0:?} (expected `name: value`)")]
    Header(String),
    #[error("open loop needs --rate > 0")]
    Rate,
    #[error("cannot connect the gRPC channel to {0}: {1}")]
    Grpc(String, tonic::transport::Error),
}

/// Runs `config` to completion and returns its report.
pub async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    run_until(config, std::future::pending()).await
}

/// Runs `config` until its schedule ends or `stop` resolves, whichever is
/// first (see "Stopping early" in the module docs).
pub async fn run_until(
    config: LoadConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Report, LoadError> {
    let target = Target::new(&config).await?;
    if config.mode == Mode::Open && !config.rate.is_some_and(|r| r > 0.0 && r.is_finite()) {
        return Err(LoadError::Rate);
    }
    let config = Arc::new(config);

    // Open every connection before the clock starts.
    let permits = Arc::new(Semaphore::new(config.connect_parallelism as usize));
    let mut connecting = Vec::with_capacity(config.connections as usize);
    for i in 0..config.connections {
        let target = target.clone();
        let permits = permits.clone();
        let timeout = config.timeout;
        connecting.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut conn = target.conn(i);
            let _ = tokio::time::timeout(timeout, conn.prepare()).await;
            conn
        }));
    }
    let mut conns = Vec::with_capacity(connecting.len());
    for handle in connecting {
        conns.push(handle.await.expect("connect task panicked"));
    }

    let start = Instant::now() + Duration::from_millis(20);
    let shared = Arc::new(Shared { next: AtomicU64::new(0), start, stopped_at: OnceLock::new() });
    let stopper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            stop.await;
            let _ = shared.stopped_at.set(Instant::now());
        })
    };
    let mut workers = Vec::with_capacity(conns.len());
    for (index, conn) in conns.into_iter().enumerate() {
        let (config, shared) = (config.clone(), shared.clone());
        workers.push(tokio::spawn(async move { worker(&config, &shared, index as u64, conn).await }));
    }
    let mut total = Tally::default();
    for handle in workers {
        total.merge(handle.await.expect("load worker panicked"));
    }
    stopper.abort();
    Ok(total.report(&config, start, shared.stopped_at.get().copied()))
}

struct Shared {
    next: AtomicU64,
    start: Instant,
    /// Set once when the run is stopped early.
    stopped_at: OnceLock<Instant>,
}

impl Shared {
    /// Whether a request intended at `at` comes after an early stop.
    fn stopped_before(&self, at: Instant) -> bool {
        self.stopped_at.get().is_some_and(|stop| at >= *stop)
    }

    /// Whether `max_drain` has passed since an early stop: the backlog
    /// still queued then is never sent (it counts as unfinished).
    fn drain_over(&self, max_drain: Duration) -> bool {
        self.stopped_at.get().is_some_and(|stop| Instant::now() >= *stop + max_drain)
    }
}

#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    timeouts: u64,
    queued: u64,
    errors: BTreeMap<String, u64>,
    latency: Vec<u64>,
    service: Vec<u64>,
    lag: Vec<u64>,
    first_start: Option<Instant>,
    last_done: Option<Instant>,
    /// Closed loop with a fixed count: the sum of each connection's rate.
    client_rates: f64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.timeouts += other.timeouts;
        self.queued += other.queued;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.lag.extend(other.lag);
        self.client_rates += other.client_rates;
        self.last_done = self.last_done.max(other.last_done);
        self.first_start = match (self.first_start, other.first_start) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn record(
        &mut self,
        outcome: Result<Result<(), String>, tokio::time::error::Elapsed>,
        from: Instant,
        sent: Instant,
    ) {
        let done = Instant::now();
        match outcome {
            Ok(Ok(())) => {
                self.ok += 1;
                self.latency.push(nanos(done - from));
                self.service.push(nanos(done - sent));
                self.last_done = self.last_done.max(Some(done));
            }
            Ok(Err(kind)) => *self.errors.entry(kind).or_default() += 1,
            Err(_) => self.timeouts += 1,
        }
    }

    fn report(mut self, config: &LoadConfig, start: Instant, stopped_at: Option<Instant>) -> Report {
        let measure_from = start + config.warmup;
        // The part of the measured window before an early stop.
        let duration = stopped_at
            .map_or(config.duration, |stop| stop.saturating_duration_since(measure_from).min(config.duration));
        let (sent, window) = match (config.mode, config.requests_per_connection) {
            (Mode::Open, _) => {
                // When the server fell behind, completions trail the
                // schedule: the rate is over the time they really took.
                let rate = config.rate.unwrap_or(1.0);
                let took = self.last_done.map_or(Duration::ZERO, |d| d.saturating_duration_since(measure_from));
                let sent = match stopped_at {
                    Some(stop) => scheduled_before_stop(
                        rate,
                        config.warmup,
                        config.duration,
                        stop.saturating_duration_since(start),
                    ),
                    None => scheduled(rate, config.duration),
                };
                (sent, took.max(duration))
            }
            (Mode::Closed, Some(_)) => {
                let end = self.last_done.unwrap_or(start);
                (self.sent, end.saturating_duration_since(start))
            }
            (Mode::Closed, None) => (self.sent, duration),
        };
        let errors: u64 = self.errors.values().sum();
        let window_s = window.as_secs_f64();
        Report {
            label: config.label.clone(),
            url: config.url.clone(),
            protocol: config.protocol,
            mode: config.mode,
            connections: config.connections,
            target_rps: config.rate.filter(|_| config.mode == Mode::Open),
            sent,
            ok: self.ok,
            errors,
            timeouts: self.timeouts,
            unfinished: sent.saturating_sub(self.ok + errors + self.timeouts),
            error_kinds: self.errors,
            achieved_rps: match (config.mode, config.requests_per_connection) {
                (Mode::Closed, Some(_)) => self.client_rates,
                _ if window_s > 0.0 => self.ok as f64 / window_s,
                _ => 0.0,
            },
            window_s,
            latency: Summary::from_nanos(&mut self.latency),
            service_time: Summary::from_nanos(&mut self.service),
            generator_lag: Summary::from_nanos(&mut self.lag),
            queued: self.queued,
        }
    }
}

fn scheduled(rate: f64, window: Duration) -> u64 {
    (rate * window.as_secs_f64()).round() as u64
}

/// Open loop stopped early: the slots of the schedule intended from the end
/// of the warm-up up to `stop` (both measured from the start), as the
/// workers count them (slot `i` is intended at `i / rate`).
fn scheduled_before_stop(rate: f64, warmup: Duration, duration: Duration, stop: Duration) -> u64 {
    let total = scheduled(rate, warmup) + scheduled(rate, duration);
    let slots_before = |at: Duration| ((rate * at.as_secs_f64()).ceil() as u64).min(total);
    slots_before(stop).saturating_sub(slots_before(warmup))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn worker(config: &LoadConfig, shared: &Shared, index: u64, mut conn: Conn) -> Tally {
    let mut tally = Tally::default();
    let measure_from = shared.start + config.warmup;
    tokio::time::sleep_until(shared.start).await;
    match (config.mode, config.requests_per_connection) {
        (Mode::Open, _) => {
            let rate = config.rate.unwrap_or(1.0);
            let total = scheduled(rate, config.warmup) + scheduled(rate, config.duration);
            let hard_stop = measure_from + config.duration + config.max_drain;
            loop {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let intended = shared.start + Duration::from_secs_f64(i as f64 / rate);
                if shared.stopped_before(intended) {
                    break;
                }
                let queued = Instant::now() > intended;
                if queued && (Instant::now() >= hard_stop || shared.drain_over(config.max_drain)) {
                    break;
                }
                if !queued {
                    tokio::time::sleep_until(intended).await;
                    if shared.stopped_before(intended) {
                        break;
                    }
                }
                let sent = Instant::now();
                let outcome = conn.call(config.timeout).await;
                if intended < measure_from {
                    continue;
                }
                tally.sent += 1;
                if queued {
                    tally.queued += 1;
                } else {
                    tally.lag.push(nanos(sent - intended));
                }
                tally.record(outcome, if queued { intended } else { sent }, sent);
            }
        }
        (Mode::Closed, Some(count)) => {
            let offset = config.ramp.mul_f64(index as f64 / config.connections as f64);
            tokio::time::sleep_until(shared.start + offset).await;
            let first = Instant::now();
            let hard_stop = shared.start + config.ramp + config.max_drain.max(config.timeout * 2);
            for _ in 0..count {
                if Instant::now() >= hard_stop {
                    break;
                }
                let sent = Instant::now();
                let outcome = conn.call(config.timeout).await;
                tally.sent += 1;
                tally.record(outcome, sent, sent);
            }
            // Requests never sent because of the hard stop are unfinished.
            tally.sent = count;
            let took = tally.last_done.map_or(Duration::ZERO, |done| done.saturating_duration_since(first));
            if !took.is_zero() {
                tally.client_rates = tally.ok as f64 / took.as_secs_f64();
            }
        }
        (Mode::Closed, None) => {
            let end = measure_from + config.duration;
            loop {
                let sent = Instant::now();
                if sent >= end || shared.stopped_before(sent) {
                    break;
                }
                let outcome = conn.call(config.timeout).await;
                if sent < measure_from {
                    continue;
                }
                tally.sent += 1;
                tally.record(outcome, sent, sent);
            }
        }
    }
    tally
}

/// What every worker needs to reach the target.
#[derive(Clone)]
enum Target {
    Http(Arc<HttpTarget>),
    Grpc(Arc<[Channel]>, Arc<ExecuteRequest>),
}

struct HttpTarget {
    addr: SocketAddr,
    request: http::request::Parts,
    body: Bytes,
}

impl Target {
    async fn new(config: &LoadConfig) -> Result<Self, LoadError> {
        let bad = |why: &str| LoadError::Url(config.url.clone(), why.to_owned());
        let uri: Uri = config.url.parse().map_err(|_| bad("not a URI"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
        let port = authority.port_u16().unwrap_or(80);
        let ip = match authority.host() {
            "localhost" => "127.0.0.1".parse().expect("literal ip"),
            host => host.parse().map_err(|_| bad("the host must be an IP address"))?,
        };
        match config.protocol {
            Protocol::Http => {
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                let mut builder =
                    Request::builder().method(config.method.clone()).uri(path).header(HOST, authority.as_str());
                if config.body.is_some() {
                    builder = builder.header(CONTENT_TYPE, "application/json");
                }
                for header in &config.headers {
                    let (name, value) = header.split_once(':').ok_or_else(|| LoadError::Header(header.clone()))?;
                    let name = HeaderName::try_from(name.trim()).map_err(|_| LoadError::Header(header.clone()))?;
                    let value = HeaderValue::try_from(value.trim()).map_err(|_| LoadError::Header(header.clone()))?;
                    builder = builder.header(name, value);
                }
                let (request, ()) = builder.body(()).map_err(|_| bad("cannot build a request"))?.into_parts();
                let body = Bytes::from(config.body.clone().unwrap_or_default());
                Ok(Self::Http(Arc::new(HttpTarget { addr: SocketAddr::new(ip, port), request, body })))
            }
            Protocol::Grpc => {
                let mut channels = Vec::new();
                for _ in 0..config.channels {
                    let endpoint = Endpoint::from_shared(config.url.clone())
                        .map_err(|e| LoadError::Grpc(config.url.clone(), e))?
                        .tcp_nodelay(true)
                        .connect_timeout(config.timeout);
                    channels.push(endpoint.connect().await.map_err(|e| LoadError::Grpc(config.url.clone(), e))?);
                }
                let request = ExecuteRequest { kind: config.kind.clone(), payload_json: config.payload.clone() };
                Ok(Self::Grpc(channels.into(), Arc::new(request)))
            }
        }
    }

    fn conn(&self, index: u64) -> Conn {
        match self {
            Self::Http(target) => Conn::Http { target: target.clone(), sender: None },
            Self::Grpc(channels, request) => {
                let channel = channels[(index % channels.len() as u64) as usize].clone();
                Conn::Grpc { client: WorkerServiceClient::new(channel), request: request.clone() }
            }
        }
    }
}

/// One worker's connection.
enum Conn {
    Http { target: Arc<HttpTarget>, sender: Option<SendRequest<Full<Bytes>>> },
    Grpc { client: WorkerServiceClient<Channel>, request: Arc<ExecuteRequest> },
}

impl Conn {
    /// Opens the connection ahead of the run (HTTP); errors are retried by
    /// the first call.
    async fn prepare(&mut self) {
        if let Self::Http { target, sender } = self {
            *sender = connect(target.addr).await.ok();
        }
    }

    /// One request, bounded by `timeout`. The error is a stable kind name.
    async fn call(&mut self, timeout: Duration) -> Result<Result<(), String>, tokio::time::error::Elapsed> {
        let outcome = tokio::time::timeout(timeout, self.call_once()).await;
        if let (Self::Http { sender, .. }, Err(_) | Ok(Err(_))) = (&mut *self, &outcome) {
            // Unknown connection state after a timeout or an error: reopen.
            *sender = None;
        }
        outcome
    }

    async fn call_once(&mut self) -> Result<(), String> {
        match self {
            Self::Http { target, sender } => {
                let ready = match sender {
                    Some(s) if !s.is_closed() => s,
                    _ => sender.insert(connect(target.addr).await?),
                };
                ready.ready().await.map_err(|e| hyper_kind("send", &e))?;
                let mut request = Request::new(Full::new(target.body.clone()));
                *request.method_mut() = target.request.method.clone();
                *request.uri_mut() = target.request.uri.clone();
                *request.headers_mut() = target.request.headers.clone();
                let response = ready.send_request(request).await.map_err(|e| hyper_kind("send", &e))?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| hyper_kind("body", &e))?;
                if status.is_success() { Ok(()) } else { Err(format!("status {}", status.as_u16())) }
            }
            Self::Grpc { client, request } => match client.execute(ExecuteRequest::clone(request)).await {
                Ok(_) => Ok(()),
                Err(status) => Err(format!("grpc {:?}", status.code())),
            },
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {:?}", e.kind()))?;
    stream.set_nodelay(true).map_err(|e| format!("connect {:?}", e.kind()))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| hyper_kind("handshake", &e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

fn hyper_kind(stage: &str, error: &hyper::Error) -> String {
    let kind = if error.is_closed() || error.is_incomplete_message() {
        "closed"
    } else if error.is_parse() {
        "parse"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_canceled() {
        "canceled"
    } else {
        "io"
    };
    format!("{stage} {kind}")
}

/// Parses `250ms`, `10s`, `2m`, `500us` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid duration {text:?}"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {text:?} (use us, ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn schedule_counts() {
        assert_eq!(scheduled(1000.0, Duration::from_secs(2)), 2000);
        assert_eq!(scheduled(0.5, Duration::from_secs(4)), 2);
    }
}
