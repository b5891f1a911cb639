//! Telemetry settings (from flags or the environment) and value parsers the
//! services share for their own settings.

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
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, log_filter: None, otlp_endpoint: None }
    }
}

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
    if !seconds.is_finite() || seconds < 0.0 || seconds > 365.0 * 86_400.0 {
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
