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
    /// OTLP/gRPC endpoint that receives this service's metrics (the
    /// metrics-aggregator, e.g. `http://metrics-aggregator:50052`), pushed
    /// from the same instruments that feed `/metrics`. Unset: no push.
    #[arg(long = "metrics-push-endpoint", env = "SHOAL_METRICS_PUSH_ENDPOINT")]
    pub metrics_push_endpoint: Option<String>,
    /// How often metrics are pushed to `--metrics-push-endpoint`.
    #[arg(long = "metrics-push-interval", env = "SHOAL_METRICS_PUSH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_push_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: None,
            otlp_endpoint: None,
            metrics_push_endpoint: None,
            metrics_push_interval: DEFAULT_METRICS_PUSH_INTERVAL,
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

/// Parses a service's config from flags and the environment, or exits.
///
/// Secrets may come from files: for a flag whose variable `X` is unset, a
/// set `X_FILE` names a file whose content (less a trailing newline) is the
/// value, as in `SHOAL_WORKER_REDIS_URL_FILE=/run/secrets/redis/url` (see
/// [`args_with_env_files`]).
///
/// On a bad value the message names the flag *and* the environment variable
/// that set it, and the process exits with status 2 before anything binds.
/// `--help` and `--version` print and exit 0.
pub fn parse_or_exit<C: clap::Parser>() -> C {
    let args = match args_with_env_files::<C>(std::env::args_os(), |name| std::env::var_os(name)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    match C::try_parse_from(args) {
        Ok(config) => config,
        Err(error) => {
            let hint = env_hint::<C>(&error);
            let _ = error.print();
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            std::process::exit(error.exit_code());
        }
    }
}

/// The `*_FILE` convention for secrets (container secrets are files): for
/// every flag of `C` that takes a value and can be set by an environment
/// variable `X`, when `X` is unset, the flag is not on the command line and
/// `X_FILE` is set, appends `--flag=<content of the file>` (less a trailing
/// newline) to `args`. The value never appears in the process's command
/// line or environment. `env` looks variables up (`std::env::var_os`).
///
/// # Errors
///
/// A message naming `X_FILE` when its file cannot be read.
pub fn args_with_env_files<C: clap::CommandFactory>(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, String> {
    let mut args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let command = C::command();
    for arg in command.get_arguments() {
        let (Some(long), Some(name)) = (arg.get_long(), arg.get_env().and_then(|name| name.to_str())) else {
            continue;
        };
        if !arg.get_action().takes_values() || env(name).is_some() {
            continue;
        }
        let Some(path) = env(&format!("{name}_FILE")) else {
            continue;
        };
        let flag = format!("--{long}");
        let given =
            args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if given {
            continue;
        }
        let content = std::fs::read_to_string(&path)
            .map_err(|error| format!("cannot read {name}_FILE ({}): {error}", std::path::Path::new(&path).display()))?;
        let value = content.strip_suffix('\n').unwrap_or(&content);
        let value = value.strip_suffix('\r').unwrap_or(value);
        args.push(format!("{flag}={value}").into());
    }
    Ok(args)
}

/// For a bad value, which environment variable can set the offending flag.
fn env_hint<C: clap::CommandFactory>(error: &clap::Error) -> Option<String> {
    let clap::error::ContextValue::String(arg) = error.get(clap::error::ContextKind::InvalidArg)? else {
        return None;
    };
    let long = arg.trim_start_matches("--").split([' ', '=']).next()?;
    let command = C::command();
    let env = command.get_arguments().find(|a| a.get_long() == Some(long))?.get_env()?.to_string_lossy().into_owned();
    let from_env = std::env::var_os(&env).is_some();
    Some(if from_env {
        format!("the value came from the environment variable {env}; fix or unset it")
    } else {
        format!("--{long} can also be set with the environment variable {env}")
    })
}

#[cfg(test)]
mod parse_tests {
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Demo {
        #[arg(long, env = "SHOAL_DEMO_PORT_FOR_TEST", default_value = "1")]
        port: u16,
    }

    #[test]
    fn a_bad_value_names_the_environment_variable() {
        let error = Demo::try_parse_from(["demo", "--port", "x"]).unwrap_err();
        let hint = super::env_hint::<Demo>(&error).unwrap();
        assert!(hint.contains("SHOAL_DEMO_PORT_FOR_TEST"), "{hint}");
    }

    #[derive(Debug, clap::Parser)]
    struct WithSecret {
        #[arg(long, env = "SHOAL_DEMO_URL_FOR_TEST")]
        url: Option<String>,
        #[arg(long, env = "SHOAL_DEMO_FLAG_FOR_TEST")]
        flag: bool,
    }

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<WithSecret, String> {
        let env: std::collections::HashMap<String, std::ffi::OsString> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())).collect();
        let args =
            super::args_with_env_files::<WithSecret>(args.iter().map(Into::into), |name| env.get(name).cloned())?;
        WithSecret::try_parse_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn a_file_variable_supplies_a_secret_value() {
        let dir = std::env::temp_dir().join(format!("shoal-env-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "redis://:s3cret@redis:6379/0\n").unwrap();
        let path = file.to_str().unwrap();
        let config =
            parse_with(&["demo"], &[("SHOAL_DEMO_URL_FOR_TEST_FILE", path), ("SHOAL_DEMO_FLAG_FOR_TEST_FILE", path)])
                .unwrap();
        assert_eq!(config.url.as_deref(), Some("redis://:s3cret@redis:6379/0"));
        assert!(!config.flag, "flags without a value ignore *_FILE");
        // The command line and the variable itself win over the file.
        let config = parse_with(&["demo", "--url", "redis://cli"], &[("SHOAL_DEMO_URL_FOR_TEST_FILE", path)]).unwrap();
        assert_eq!(config.url.as_deref(), Some("redis://cli"));
        let args = super::args_with_env_files::<WithSecret>(["demo".into()], |name| match name {
            "SHOAL_DEMO_URL_FOR_TEST" => Some("redis://env".into()),
            "SHOAL_DEMO_URL_FOR_TEST_FILE" => Some(path.into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(args.len(), 1, "the variable is set: clap reads it, the file is not used");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_file_names_the_variable() {
        let error = parse_with(&["demo"], &[("SHOAL_DEMO_URL_FOR_TEST_FILE", "/nonexistent/shoal/url")]).unwrap_err();
        assert!(error.contains("SHOAL_DEMO_URL_FOR_TEST_FILE"), "{error}");
    }
}
