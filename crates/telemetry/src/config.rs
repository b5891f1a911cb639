//! Telemetry settings (from flags or the environment) and the duration
//! parser they use (shared with the services' own settings through
//! `shoal-service`).

use std::time::Duration;

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with `trace_id` and `span_id` (containers).
    Json,
    /// Human-readable lines (a terminal).
    Text,
}

/// Telemetry settings shared by every service; flatten into a service's
/// `clap` config.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// Log line format.
    #[arg(long = "log-format", env = "SHOAL_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter directives (`info`, `shoal_worker=debug,info`, ...).
    #[arg(long = "log-filter", env = "RUST_LOG")]
    pub log_filter: Option<String>,
    /// OTLP/gRPC collector for traces (e.g. `http://otel-collector:4317`).
    /// Unset: no spans leave the process.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP/gRPC endpoint that receives this service's metrics (the
    /// metrics-aggregator, e.g. `http://metrics-aggregator:50052`), pushed
    /// from the same instruments that feed `/metrics`. Unset: no push.
    #[arg(long = "metrics-push-endpoint", env = "SHOAL_METRICS_PUSH_ENDPOINT")]
    pub metrics_push_endpoint: Option<String>,
    /// How often metrics are pushed to `--metrics-push-endpoint`.
    #[arg(long = "metrics-push-interval", env = "SHOAL_METRICS_PUSH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_push_interval: Duration,
    /// A file holding the bearer token sent with every metrics push (the
    /// aggregator's `--ingest-token-file`). Unset: pushes carry no token.
    #[arg(long = "metrics-push-token-file", env = "SHOAL_METRICS_PUSH_TOKEN_FILE")]
    pub metrics_push_token_file: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) the aggregator's certificate must chain to:
    /// set, metrics are pushed over TLS (the endpoint may say `https://`).
    /// Re-read every 5 s, like the certificate and key below.
    #[arg(long = "metrics-push-tls-ca", env = "SHOAL_METRICS_PUSH_TLS_CA")]
    pub metrics_push_tls_ca: Option<std::path::PathBuf>,
    /// PEM certificate chain presented to the aggregator (mutual TLS; with
    /// `--metrics-push-tls-key`, needs `--metrics-push-tls-ca`).
    #[arg(long = "metrics-push-tls-cert", env = "SHOAL_METRICS_PUSH_TLS_CERT")]
    pub metrics_push_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--metrics-push-tls-cert`.
    #[arg(long = "metrics-push-tls-key", env = "SHOAL_METRICS_PUSH_TLS_KEY")]
    pub metrics_push_tls_key: Option<std::path::PathBuf>,
    /// Name the aggregator's certificate must be valid for; default: the
    /// host of `--metrics-push-endpoint`.
    #[arg(long = "metrics-push-tls-server-name", env = "SHOAL_METRICS_PUSH_TLS_SERVER_NAME")]
    pub metrics_push_tls_server_name: Option<String>,
}

impl TelemetryConfig {
    /// The TLS files of the metrics push; `None`: plaintext.
    ///
    /// # Errors
    ///
    /// A certificate without its key, or without a CA.
    pub fn metrics_push_tls(&self) -> Result<Option<shoal_tls::ClientTlsFiles>, shoal_tls::TlsError> {
        shoal_tls::ClientTlsFiles::from_flags(
            "metrics-push-tls",
            self.metrics_push_tls_ca.as_deref(),
            self.metrics_push_tls_cert.as_deref(),
            self.metrics_push_tls_key.as_deref(),
        )
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: None,
            otlp_endpoint: None,
            metrics_push_endpoint: None,
            metrics_push_interval: DEFAULT_METRICS_PUSH_INTERVAL,
            metrics_push_token_file: None,
            metrics_push_tls_ca: None,
            metrics_push_tls_cert: None,
            metrics_push_tls_key: None,
            metrics_push_tls_server_name: None,
        }
    }
}

/// Default of `--metrics-push-interval`.
pub const DEFAULT_METRICS_PUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Parses a duration such as `250ms`, `30s`, `2m` or `1h`. A bare number is
/// milliseconds.
///
/// # Errors
///
/// A message saying which forms are accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration; use e.g. 500ms, 30s, 2m"))?;
    let seconds = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!("unknown unit `{other}` in `{text}`; use ms, s, m or h"));
        }
    };
    if !seconds.is_finite() || !(0.0..=365.0 * 86_400.0).contains(&seconds) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn bad_durations_say_what_to_fix() {
        assert!(parse_duration("ten").unwrap_err().contains("not a duration"));
        assert!(parse_duration("3 weeks").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999h").unwrap_err().contains("out of range"));
    }
}
