//! Parsing a service's config: flags, the environment, and the `*_FILE`
//! convention for secrets. Durations parse with [`parse_duration`] (it lives
//! in `shoal-telemetry`, whose own settings need it, and is re-exported here).

pub use shoal_telemetry::config::parse_duration;

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
