//! The gateway's settings, from flags or the environment. Every knob has a
//! default that runs on a laptop beside a worker and an aggregator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_service::config::parse_duration;
use shoal_telemetry::TelemetryConfig;

use crate::auth::AuthMode;
use crate::discovery::Target;
use crate::limits::Limits;

/// Settings of one gateway instance.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "shoal-gateway", version, about = "Shoal gateway: the HTTP front door that fans out over gRPC")]
pub struct Config {
    /// Address of the public HTTP listener (the JSON API).
    #[arg(long, env = "SHOAL_GATEWAY_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SHOAL_GATEWAY_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Worker gRPC targets, `http://host:port`, comma-separated. Each host is
    /// re-resolved every `--resolve-interval` and calls are balanced over
    /// every address found (point it at a headless Service in Kubernetes).
    #[arg(
        long,
        env = "SHOAL_GATEWAY_WORKER_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ',',
        value_parser = Target::parse,
    )]
    pub worker_addr: Vec<Target>,

    /// Metrics-aggregator gRPC targets, `http://host:port`, comma-separated;
    /// resolved and balanced like the workers.
    #[arg(
        long,
        env = "SHOAL_GATEWAY_AGGREGATOR_ADDR",
        default_value = "http://127.0.0.1:50052",
        value_delimiter = ',',
        value_parser = Target::parse,
    )]
    pub aggregator_addr: Vec<Target>,

    /// How often worker and aggregator host names are re-resolved (DNS), so
    /// replicas that appear or disappear are picked up.
    #[arg(long, env = "SHOAL_GATEWAY_RESOLVE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub resolve_interval: Duration,

    /// Deadline of a task call when the request has no `Request-Timeout`
    /// header. Must not exceed `--max-timeout`.
    #[arg(long, env = "SHOAL_GATEWAY_DEFAULT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub default_timeout: Duration,

    /// Largest deadline a task call may have: a longer `Request-Timeout` is
    /// clamped to it.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub max_timeout: Duration,

    /// Deadline of each component check of `GET /v1/status` (the checks run
    /// in parallel, so the route answers within about this long).
    #[arg(long, env = "SHOAL_GATEWAY_STATUS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub status_timeout: Duration,

    /// Largest accepted request body, in bytes; larger bodies get `413`.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Most requests served at once; above it requests are shed at once with
    /// `503` and `Retry-After` instead of queueing.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_IN_FLIGHT", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_in_flight: u64,

    /// How long in-flight requests may take to finish after SIGTERM; after
    /// it the gateway stops waiting and exits.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How long the service keeps serving after SIGTERM while reporting not
    /// ready (readiness `503`, gRPC health `NOT_SERVING`), so clients (and a
    /// Kubernetes Service) stop routing to it first; HTTP/1.1 responses carry
    /// `Connection: close` meanwhile; ends early when no connection has been open for 1 s. See
    /// docs/operations.md, "Shutdown sequence".
    #[arg(long, env = "SHOAL_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// How `/v1/*` callers authenticate: `api-keys` (the keys in
    /// `--api-keys-file`) or `none` (local development only: no credential,
    /// no per-client limits or job ownership; logged as a warning at start).
    #[arg(long, env = "SHOAL_GATEWAY_AUTH", value_enum, default_value = "api-keys")]
    pub auth: AuthMode,

    /// The API keys file: one `<sha256 hex of the key> <client id> [options]`
    /// per line (see docs/api.md). Re-read when it changes.
    #[arg(long, env = "SHOAL_GATEWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// How often the API keys file is checked for changes.
    #[arg(long, env = "SHOAL_GATEWAY_API_KEYS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub api_keys_reload_interval: Duration,

    /// Requests per second a client may make (token bucket rate), unless its
    /// key line sets `rate=`.
    #[arg(long, env = "SHOAL_GATEWAY_CLIENT_RATE", default_value_t = 100.0, value_parser = positive_rate)]
    pub client_rate: f64,

    /// Largest burst of requests a client may make at once (bucket size),
    /// unless its key line sets `burst=`.
    #[arg(long, env = "SHOAL_GATEWAY_CLIENT_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_burst: u32,

    /// Most requests one client may have in flight, unless its key line sets
    /// `concurrency=`.
    #[arg(long, env = "SHOAL_GATEWAY_CLIENT_MAX_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_max_in_flight: u32,

    /// How long a request body may take to arrive; a slower one gets `408`
    /// and the connection is closed.
    #[arg(long, env = "SHOAL_GATEWAY_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// How long an HTTP/1 request head (request line and headers) may take
    /// to arrive; also how long an idle HTTP/1 keep-alive connection waits
    /// for its next request. Then the connection is closed.
    #[arg(long, env = "SHOAL_GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A connection with no request in flight for this long is closed
    /// (HTTP/1 and HTTP/2).
    #[arg(long, env = "SHOAL_GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Most open client connections; above it a new connection is answered
    /// `503` with `Connection: close` and closed.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Most concurrent streams (requests) on one HTTP/2 connection.
    #[arg(long, env = "SHOAL_GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub http2_max_concurrent_streams: u32,

    /// Largest request head, in bytes: the HTTP/2 header list, and the
    /// HTTP/1 read buffer (at least 8192). A larger head is refused.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(8192..=1024 * 1024))]
    pub max_header_bytes: u32,

    /// Most `GET /?delay_ms=N` requests waiting at once; above it they are
    /// shed with `503` (so cheap sleeping requests cannot hold every
    /// in-flight place).
    #[arg(long, env = "SHOAL_GATEWAY_MAX_DELAYED", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_delayed: u32,

    /// Longest wait a `GET /?delay_ms=N` may ask for: a larger `delay_ms` is
    /// a `400`. The served OpenAPI document (`GET /openapi.json`) states this
    /// bound as the parameter's `maximum`.
    #[arg(long, env = "SHOAL_GATEWAY_MAX_DELAY", default_value = "60s", value_parser = parse_duration)]
    pub max_delay: Duration,

    /// How long a `GET /v1/stats` answer is reused (per query string; each
    /// fresh answer costs five full-scan queries on the aggregator). `0s`:
    /// no cache.
    #[arg(long, env = "SHOAL_GATEWAY_STATS_CACHE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub stats_cache_ttl: Duration,

    /// Whether an incoming W3C `traceparent`/`tracestate` is honoured. `false`
    /// (the default on a public edge): the headers are dropped, every request
    /// starts a trace of the gateway's own (its id is the problem's
    /// `request_id`) and the gateway's sampler decides. `true` (behind a
    /// trusted proxy): the request continues the caller's trace, with its
    /// trace id and sampled flag.
    #[arg(long, env = "SHOAL_GATEWAY_TRUST_TRACEPARENT", default_value = "false", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub trust_traceparent: bool,

    /// PEM CA certificate(s) that workers' and aggregators' certificates
    /// must chain to: set, the gateway calls them over TLS. Unset: plaintext
    /// (local development). Re-read every 5 s, like the certificate and key.
    #[arg(long, env = "SHOAL_GATEWAY_UPSTREAM_TLS_CA")]
    pub upstream_tls_ca: Option<PathBuf>,

    /// PEM certificate chain the gateway presents to workers and aggregators
    /// (mutual TLS; with `--upstream-tls-key`, needs `--upstream-tls-ca`).
    #[arg(long, env = "SHOAL_GATEWAY_UPSTREAM_TLS_CERT")]
    pub upstream_tls_cert: Option<PathBuf>,

    /// PEM private key of `--upstream-tls-cert`.
    #[arg(long, env = "SHOAL_GATEWAY_UPSTREAM_TLS_KEY")]
    pub upstream_tls_key: Option<PathBuf>,

    /// Name every worker's certificate must be valid for. The gateway dials
    /// the addresses it resolved (pod IPs behind a headless Service), so it
    /// verifies them against this name, not the IP. Default: the host of
    /// `--worker-addr` (all targets must share it).
    #[arg(long, env = "SHOAL_GATEWAY_WORKER_TLS_SERVER_NAME")]
    pub worker_tls_server_name: Option<String>,

    /// Name every aggregator's certificate must be valid for; default: the
    /// host of `--aggregator-addr` (as `--worker-tls-server-name`).
    #[arg(long, env = "SHOAL_GATEWAY_AGGREGATOR_TLS_SERVER_NAME")]
    pub aggregator_tls_server_name: Option<String>,

    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("`{text}` is not a positive number of requests per second")),
    }
}

/// A combination of settings that cannot work together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--default-timeout (SHOAL_GATEWAY_DEFAULT_TIMEOUT) {default:?} exceeds --max-timeout (SHOAL_GATEWAY_MAX_TIMEOUT) {max:?}"
    )]
    DefaultAboveMax { default: Duration, max: Duration },
    #[error("--{flag} ({env}) must be greater than zero")]
    Zero { flag: &'static str, env: &'static str },
    #[error(
        "--auth api-keys needs --api-keys-file (SHOAL_GATEWAY_API_KEYS_FILE); pass --auth none (SHOAL_GATEWAY_AUTH=none) to run without authentication"
    )]
    NoKeysFile,
    #[error("{0}")]
    Tls(String),
}

/// The name the certificates of `targets` are verified against: `explicit`,
/// else the targets' one host.
fn server_name(explicit: Option<&str>, targets: &[Target], flag: &str) -> Result<String, ConfigError> {
    let name = match explicit {
        Some(name) => name.to_owned(),
        None => {
            let mut hosts = targets.iter().map(Target::host);
            let first = hosts.next().unwrap_or_default();
            if hosts.any(|host| host != first) {
                return Err(ConfigError::Tls(format!(
                    "the targets have different hosts: set --{flag} to the name their certificates are valid for"
                )));
            }
            first.to_owned()
        }
    };
    shoal_tls::check_server_name(&name).map_err(|error| ConfigError::Tls(format!("--{flag}: {error}")))?;
    Ok(name)
}

impl Config {
    /// Checks the rules that span several settings (clap checks each alone).
    ///
    /// # Errors
    ///
    /// The first rule broken, naming the flags and variables involved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            (self.default_timeout, "default-timeout", "SHOAL_GATEWAY_DEFAULT_TIMEOUT"),
            (self.max_timeout, "max-timeout", "SHOAL_GATEWAY_MAX_TIMEOUT"),
            (self.status_timeout, "status-timeout", "SHOAL_GATEWAY_STATUS_TIMEOUT"),
            (self.resolve_interval, "resolve-interval", "SHOAL_GATEWAY_RESOLVE_INTERVAL"),
            (self.api_keys_reload_interval, "api-keys-reload-interval", "SHOAL_GATEWAY_API_KEYS_RELOAD_INTERVAL"),
            (self.body_read_timeout, "body-read-timeout", "SHOAL_GATEWAY_BODY_READ_TIMEOUT"),
            (self.header_read_timeout, "header-read-timeout", "SHOAL_GATEWAY_HEADER_READ_TIMEOUT"),
            (self.idle_timeout, "idle-timeout", "SHOAL_GATEWAY_IDLE_TIMEOUT"),
        ];
        for (value, flag, env) in positive {
            if value.is_zero() {
                return Err(ConfigError::Zero { flag, env });
            }
        }
        if self.default_timeout > self.max_timeout {
            return Err(ConfigError::DefaultAboveMax { default: self.default_timeout, max: self.max_timeout });
        }
        if self.auth == AuthMode::ApiKeys && self.api_keys_file.is_none() {
            return Err(ConfigError::NoKeysFile);
        }
        if self.upstream_tls()?.is_some() {
            self.worker_server_name()?;
            self.aggregator_server_name()?;
        }
        Ok(())
    }

    /// The TLS files for calls to workers and aggregators; `None`: plaintext.
    ///
    /// # Errors
    ///
    /// A certificate without its key, or without a CA.
    pub fn upstream_tls(&self) -> Result<Option<shoal_tls::ClientTlsFiles>, ConfigError> {
        shoal_tls::ClientTlsFiles::from_flags(
            "upstream-tls",
            self.upstream_tls_ca.as_deref(),
            self.upstream_tls_cert.as_deref(),
            self.upstream_tls_key.as_deref(),
        )
        .map_err(|error| ConfigError::Tls(error.to_string()))
    }

    /// The name workers' certificates are verified against.
    ///
    /// # Errors
    ///
    /// Targets with different hosts and no `--worker-tls-server-name`, or an
    /// invalid name.
    pub fn worker_server_name(&self) -> Result<String, ConfigError> {
        server_name(self.worker_tls_server_name.as_deref(), &self.worker_addr, "worker-tls-server-name")
    }

    /// The name aggregators' certificates are verified against.
    ///
    /// # Errors
    ///
    /// As [`Config::worker_server_name`].
    pub fn aggregator_server_name(&self) -> Result<String, ConfigError> {
        server_name(self.aggregator_tls_server_name.as_deref(), &self.aggregator_addr, "aggregator-tls-server-name")
    }
}

impl Config {
    /// The limits of each public connection.
    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            max_header_bytes: self.max_header_bytes,
        }
    }

    /// The limits of a client whose key line sets none.
    pub fn client_limits(&self) -> Limits {
        Limits { rate: self.client_rate, burst: self.client_burst, concurrency: self.client_max_in_flight }
    }
}

impl shoal_service::service::ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin_addr
    }
    fn validate(&self) -> Result<(), String> {
        Config::validate(self).map_err(|error| error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = Config::try_parse_from(["shoal-gateway", "--api-keys-file", "keys"]).unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.auth, AuthMode::ApiKeys);
        assert_eq!(config.worker_addr.len(), 1);
        assert_eq!(config.max_body_bytes, 1024 * 1024);
        assert_eq!(config.default_timeout, Duration::from_secs(10));
    }

    #[test]
    fn worker_targets_are_a_comma_separated_list() {
        let config = Config::try_parse_from(["shoal-gateway", "--worker-addr", "http://a:1,http://b:2"]).unwrap();
        let targets: Vec<String> = config.worker_addr.iter().map(ToString::to_string).collect();
        assert_eq!(targets, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let error = Config::try_parse_from(["shoal-gateway", "--worker-addr", "a:b:c"]).unwrap_err().to_string();
        assert!(error.contains("--worker-addr"), "{error}");
        let error = Config::try_parse_from(["shoal-gateway", "--max-in-flight", "0"]).unwrap_err().to_string();
        assert!(error.contains("--max-in-flight"), "{error}");
    }

    #[test]
    fn default_timeout_may_not_exceed_max() {
        let config = Config::try_parse_from([
            "shoal-gateway",
            "--auth",
            "none",
            "--default-timeout",
            "30s",
            "--max-timeout",
            "5s",
        ])
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("SHOAL_GATEWAY_MAX_TIMEOUT"), "{error}");
        let config = Config::try_parse_from(["shoal-gateway", "--auth", "none", "--resolve-interval", "0s"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--resolve-interval"));
    }

    #[test]
    fn api_keys_need_a_file_unless_auth_is_off() {
        let config = Config::try_parse_from(["shoal-gateway"]).unwrap();
        assert_eq!(config.validate(), Err(ConfigError::NoKeysFile));
        let config = Config::try_parse_from(["shoal-gateway", "--auth", "none"]).unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert!(Config::try_parse_from(["shoal-gateway", "--client-rate", "0"]).is_err());
    }

    #[test]
    fn upstream_tls_names_the_servers_by_their_service_name() {
        let config = Config::try_parse_from([
            "shoal-gateway",
            "--auth",
            "none",
            "--upstream-tls-ca",
            "ca.crt",
            "--worker-addr",
            "http://worker.shoal.svc:50051",
        ])
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.worker_server_name().unwrap(), "worker.shoal.svc");
        let config = Config::try_parse_from([
            "shoal-gateway",
            "--auth",
            "none",
            "--upstream-tls-ca",
            "ca.crt",
            "--worker-addr",
            "http://a:1,http://b:1",
        ])
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--worker-tls-server-name"), "{error}");
        let config =
            Config::try_parse_from(["shoal-gateway", "--auth", "none", "--upstream-tls-cert", "c.crt"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--upstream-tls-cert and --upstream-tls-key"));
    }
}
