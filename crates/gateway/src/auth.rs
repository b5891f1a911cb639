//! Who is calling: API keys, stored hashed in a file that is re-read when it
//! changes, and the per-client policy they carry.
//!
//! A client presents its key as `Authorization: Bearer <key>` or
//! `X-Api-Key: <key>` (both may be sent if they are equal). The gateway
//! hashes it with SHA-256 and looks the hash up in the keys file
//! (`--api-keys-file`), one key per line:
//!
//! ```text
//! # sha256(key), hex          client id   options (all optional)
//! 9f86d081884c7d65...0f00a08  alice       rate=50 burst=100 concurrency=16
//! 2c26b46b68ffc68f...f7b8cc2  alice
//! fcde2b2edba56bf4...d4ee5a0  dashboard   access=read
//! ```
//!
//! - Several lines may name the same client: its keys are all valid at once,
//!   which is how a key is rotated (add the new line, move the clients, delete
//!   the old line). Every key of a client shares the client's limits and its
//!   jobs.
//! - Options: `rate` (requests per second, a decimal), `burst` (requests),
//!   `concurrency` (requests in flight) override `--client-rate`,
//!   `--client-burst`, `--client-max-in-flight` for that client;
//!   `access=read` allows only `GET` (other methods answer `403`).
//!   The lines of one client must not disagree on an option.
//! - The file is re-read every `--api-keys-reload-interval`; a file that no
//!   longer parses is refused with an error log and the previous keys stay
//!   in force. The first read must succeed or the gateway does not start.
//!
//! [`Keys::authenticate`] answers the client's [`Client`], or the
//! [`AuthFailure`] that becomes a `401`/`403` problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, Method, header};
use sha2::{Digest as _, Sha256};

use crate::limits::{ClientLimiter, Limits};

/// Header that may carry an API key instead of `Authorization`.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Longest client id.
const MAX_CLIENT_ID: usize = 64;

/// How the public API authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// API keys from `--api-keys-file`.
    ApiKeys,
    /// No credentials: every caller is the same anonymous client, without
    /// per-client limits. Local development only; logged as a warning.
    None,
}

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every route.
    All,
    /// `GET` only.
    Read,
}

/// An authenticated client: its id (the owner of its jobs), what it may do,
/// and its limiter.
#[derive(Debug)]
pub struct Client {
    pub id: Arc<str>,
    pub access: Access,
    pub limiter: Arc<ClientLimiter>,
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no credential")]
    Missing,
    #[error("malformed credential")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("the key allows only GET")]
    ReadOnly,
}

/// The keys file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("cannot read the API keys file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API keys file {path}, line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// The keys in force, shared by every request; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct Keys {
    set: Arc<RwLock<Arc<KeySet>>>,
    defaults: Limits,
}

#[derive(Debug, Default)]
struct KeySet {
    by_hash: HashMap<[u8; 32], Arc<Client>>,
    clients: HashMap<Arc<str>, Arc<Client>>,
}

impl Keys {
    /// Reads `path` once (it must parse).
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a line is invalid.
    pub fn load(path: &Path, defaults: Limits) -> Result<Self, KeysFileError> {
        let text = read(path)?;
        let set = parse(path, &text, defaults, &KeySet::default())?;
        Ok(Self { set: Arc::new(RwLock::new(Arc::new(set))), defaults })
    }

    /// Re-reads `path` every `interval` while the returned task runs; a
    /// changed file that parses replaces the keys, one that does not is
    /// logged and ignored.
    pub fn watch(&self, path: PathBuf, interval: Duration) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        tokio::spawn(async move {
            let mut last = read(&path).ok();
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let path_for_read = path.clone();
                let text = match tokio::task::spawn_blocking(move || read(&path_for_read)).await {
                    Ok(Ok(text)) => text,
                    Ok(Err(error)) => {
                        tracing::error!(error = &error as &dyn std::error::Error, "API keys not reloaded");
                        continue;
                    }
                    Err(_) => continue,
                };
                if last.as_deref() == Some(text.as_str()) {
                    continue;
                }
                match parse(&path, &text, keys.defaults, &keys.current()) {
                    Ok(set) => {
                        tracing::info!(clients = set.clients.len(), keys = set.by_hash.len(), "API keys reloaded");
                        *keys.set.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
                    }
                    Err(error) => {
                        tracing::error!(
                            error = &error as &dyn std::error::Error,
                            "API keys file refused; the previous keys stay in force"
                        );
                    }
                }
                last = Some(text);
            }
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The client whose key the request carries, if it may use `method`.
    ///
    /// # Errors
    ///
    /// No key, a malformed or unknown one, or a read-only key on a method
    /// other than `GET`/`HEAD`.
    pub fn authenticate(&self, method: &Method, headers: &HeaderMap) -> Result<Arc<Client>, AuthFailure> {
        let key = presented_key(headers)?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let client = self.current().by_hash.get(&hash).cloned().ok_or(AuthFailure::Unknown)?;
        if client.access == Access::Read && method != Method::GET && method != Method::HEAD {
            return Err(AuthFailure::ReadOnly);
        }
        Ok(client)
    }
}

/// The key of `Authorization: Bearer` or `X-Api-Key`.
fn presented_key(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let bearer = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| AuthFailure::Malformed)?;
            let (scheme, token) = text.trim().split_once(' ').ok_or(AuthFailure::Malformed)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthFailure::Malformed);
            }
            Some(token.trim())
        }
    };
    let api_key = match headers.get(API_KEY_HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| AuthFailure::Malformed)?.trim()),
    };
    let key = match (bearer, api_key) {
        (None, None) => return Err(AuthFailure::Missing),
        (Some(a), Some(b)) if a != b => return Err(AuthFailure::Malformed),
        (Some(key), _) | (None, Some(key)) => key,
    };
    if key.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(key)
}

/// The SHA-256 of `key` as lowercase hex: what the keys file stores.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn read(path: &Path) -> Result<String, KeysFileError> {
    std::fs::read_to_string(path).map_err(|source| KeysFileError::Read { path: path.to_owned(), source })
}

/// One client's settings as the file's lines state them.
#[derive(Debug, Default, Clone, PartialEq)]
struct Options {
    rate: Option<f64>,
    burst: Option<u32>,
    concurrency: Option<u32>,
    read_only: Option<bool>,
}

fn parse(path: &Path, text: &str, defaults: Limits, previous: &KeySet) -> Result<KeySet, KeysFileError> {
    let error = |line: usize, reason: String| KeysFileError::Line { path: path.to_owned(), line, reason };
    let mut keys: Vec<([u8; 32], Arc<str>)> = Vec::new();
    let mut options: HashMap<Arc<str>, (usize, Options)> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(hash), Some(id)) = (fields.next(), fields.next()) else {
            return Err(error(number, "expected `<sha256 hex> <client id> [options]`".into()));
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hash, &mut digest)
            .map_err(|_| error(number, "the first field must be the key's SHA-256 as 64 hex digits".into()))?;
        let valid_id =
            id.len() <= MAX_CLIENT_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if !valid_id {
            return Err(error(number, format!("client id `{id}`: use 1 to {MAX_CLIENT_ID} of A-Z a-z 0-9 - _ . @")));
        }
        let mut these = Options::default();
        for option in fields {
            let (name, value) =
                option.split_once('=').ok_or_else(|| error(number, format!("option `{option}` is not name=value")))?;
            let bad = |what: &str| error(number, format!("option `{option}`: {what}"));
            match name {
                "rate" => {
                    these.rate = Some(
                        value
                            .parse::<f64>()
                            .ok()
                            .filter(|r| r.is_finite() && *r > 0.0)
                            .ok_or_else(|| bad("a positive number of requests per second"))?,
                    );
                }
                "burst" => {
                    these.burst =
                        Some(value.parse::<u32>().ok().filter(|b| *b >= 1).ok_or_else(|| bad("an integer >= 1"))?);
                }
                "concurrency" => {
                    these.concurrency =
                        Some(value.parse::<u32>().ok().filter(|c| *c >= 1).ok_or_else(|| bad("an integer >= 1"))?);
                }
                "access" => {
                    these.read_only = Some(match value {
                        "read" => true,
                        "all" => false,
                        _ => return Err(bad("`read` or `all`")),
                    });
                }
                _ => return Err(bad("unknown option (rate, burst, concurrency, access)")),
            }
        }
        if keys.iter().any(|(known, _)| *known == digest) {
            return Err(error(number, "this key hash appears twice".into()));
        }
        let id: Arc<str> = Arc::from(id);
        let merged = options.entry(id.clone()).or_insert_with(|| (number, Options::default()));
        merge(&mut merged.1, &these)
            .map_err(|field| error(number, format!("`{field}` differs from line {} of client `{id}`", merged.0)))?;
        keys.push((digest, id));
    }
    let mut clients = HashMap::new();
    for (id, (_, options)) in options {
        let limits = Limits {
            rate: options.rate.unwrap_or(defaults.rate),
            burst: options.burst.unwrap_or(defaults.burst),
            concurrency: options.concurrency.unwrap_or(defaults.concurrency),
        };
        // A reload keeps a client's bucket and in-flight count.
        let limiter = match previous.clients.get(&id) {
            Some(old) => old.limiter.reconfigured(limits),
            None => Arc::new(ClientLimiter::new(limits)),
        };
        let access = if options.read_only == Some(true) { Access::Read } else { Access::All };
        clients.insert(id.clone(), Arc::new(Client { id, access, limiter }));
    }
    let by_hash = keys.into_iter().map(|(digest, id)| (digest, clients[&id].clone())).collect();
    Ok(KeySet { by_hash, clients })
}

/// Adds `new` into `into`; the name of an option both set differently.
fn merge(into: &mut Options, new: &Options) -> Result<(), &'static str> {
    fn one<T: PartialEq + Copy>(into: &mut Option<T>, new: Option<T>, name: &'static str) -> Result<(), &'static str> {
        match (*into, new) {
            (Some(a), Some(b)) if a != b => Err(name),
            (None, Some(b)) => {
                *into = Some(b);
                Ok(())
            }
            _ => Ok(()),
        }
    }
    one(&mut into.rate, new.rate, "rate")?;
    one(&mut into.burst, new.burst, "burst")?;
    one(&mut into.concurrency, new.concurrency, "concurrency")?;
    one(&mut into.read_only, new.read_only, "access")
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const DEFAULTS: Limits = Limits { rate: 10.0, burst: 20, concurrency: 4 };

    fn keys(text: &str) -> Result<KeySet, KeysFileError> {
        parse(Path::new("keys"), text, DEFAULTS, &KeySet::default())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_sha256_of_a_key_is_lowercase_hex() {
        assert_eq!(hash_key("test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    }

    #[test]
    fn lines_name_a_hash_a_client_and_options() {
        let text = format!(
            "# comment\n\n{} alice rate=2.5 burst=3\n{} alice concurrency=1 # rotated\n{} board access=read\n",
            hash_key("a1"),
            hash_key("a2"),
            hash_key("b")
        );
        let set = keys(&text).unwrap();
        assert_eq!(set.by_hash.len(), 3);
        assert_eq!(set.clients.len(), 2);
        let alice = &set.clients["alice"];
        assert_eq!(alice.limiter.limits(), Limits { rate: 2.5, burst: 3, concurrency: 1 });
        assert_eq!(set.clients["board"].access, Access::Read);
        assert_eq!(set.clients["board"].limiter.limits(), DEFAULTS);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let h = hash_key("x");
        for (text, reason) in [
            ("abc alice".to_owned(), "64 hex"),
            (h.clone(), "expected"),
            (format!("{h} al/ice"), "client id"),
            (format!("{h} alice rate=0"), "positive"),
            (format!("{h} alice speed=1"), "unknown option"),
            (format!("{h} alice\n{h} bob"), "twice"),
            (format!("{h} alice rate=1\n{} alice rate=2", hash_key("y")), "differs from line 1"),
        ] {
            let error = keys(&text).unwrap_err().to_string();
            assert!(error.contains("line") && error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn keys_are_read_from_bearer_or_x_api_key() {
        assert_eq!(presented_key(&headers(&[("authorization", "Bearer k1")])), Ok("k1"));
        assert_eq!(presented_key(&headers(&[("authorization", "bearer  k1 ")])), Ok("k1"));
        assert_eq!(presented_key(&headers(&[("x-api-key", "k2")])), Ok("k2"));
        assert_eq!(presented_key(&headers(&[("x-api-key", "k"), ("authorization", "Bearer k")])), Ok("k"));
        assert_eq!(presented_key(&HeaderMap::new()), Err(AuthFailure::Missing));
        assert_eq!(presented_key(&headers(&[("authorization", "Basic a2V5")])), Err(AuthFailure::Malformed));
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "a"), ("authorization", "Bearer b")])),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", "")])), Err(AuthFailure::Malformed));
    }

    #[test]
    fn read_only_keys_may_only_get() {
        let dir = std::env::temp_dir().join(format!("shoal-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, format!("{} board access=read\n", hash_key("r"))).unwrap();
        let keys = Keys::load(&path, DEFAULTS).unwrap();
        let read = headers(&[("x-api-key", "r")]);
        assert_eq!(keys.authenticate(&Method::GET, &read).unwrap().id.as_ref(), "board");
        assert_eq!(keys.authenticate(&Method::POST, &read).unwrap_err(), AuthFailure::ReadOnly);
        assert_eq!(keys.authenticate(&Method::GET, &headers(&[("x-api-key", "w")])).unwrap_err(), AuthFailure::Unknown);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
