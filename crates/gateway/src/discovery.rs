//! Client-side load balancing for gRPC upstreams.
//!
//! One HTTP/2 connection to a Kubernetes ClusterIP Service pins every call to
//! one pod, however many replicas there are. Instead, each upstream target
//! (`http://host:port`) is resolved to every address behind it (a headless
//! Service returns one A record per ready pod), re-resolved every
//! `--resolve-interval`, and the set of addresses feeds a tonic balanced
//! channel (tower's power-of-two-choices over one connection per address).
//! Addresses that appear are inserted, addresses that disappear are removed,
//! so replicas are picked up within one interval.
//!
//! Where addresses come from is pluggable ([`Resolve`]): [`DnsResolver`] in
//! production, [`StaticResolver`] in tests (which can add a replica while
//! traffic flows).
//!
//! Bounds and failure decisions: a resolution takes at most
//! [`RESOLVE_TIMEOUT`] (or the interval, if shorter); a failed or timed-out
//! resolution keeps the previous address set (a DNS hiccup never empties the
//! pool); a successful empty answer empties it, and calls then fail fast with
//! `503` instead of waiting for an address.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use shoal_telemetry::grpc::{Client, ClientLayer, Traced};
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tower::Layer as _;

/// Longest a single resolution may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a TCP connect to one upstream address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound of the queue of address changes fed to the balancer.
const CHANGE_QUEUE: usize = 64;

/// A balanced, traced gRPC channel: what generated clients are built on.
pub type GrpcChannel = Traced<Channel, Client>;

/// An upstream target as configured: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// Parses `http://host:port` (the scheme defaults to `http`; `https` is
    /// not supported: traffic inside the cluster is plain HTTP/2).
    ///
    /// # Errors
    ///
    /// A message saying what is wrong with `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let with_scheme = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
        let uri: http::Uri = with_scheme.parse().map_err(|_| format!("`{text}` is not a URI like http://host:port"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("`{text}`: only http:// targets are supported"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(format!("`{text}`: a target has no path"));
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("`{text}` has no host"))?;
        let port = uri.port_u16().ok_or_else(|| format!("`{text}` has no port; use http://host:port"))?;
        Ok(Self { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port })
    }

    /// The host name or IP literal, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// A resolution failed; the previous addresses stay in use.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {target}")]
    Lookup {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

/// A source of upstream addresses, asked again every resolve interval.
pub trait Resolve: Send + Sync + 'static {
    /// Every address the upstream currently has.
    ///
    /// # Errors
    ///
    /// When the answer is unknown (not when it is empty).
    fn resolve(&self) -> BoxFuture<'_, Result<BTreeSet<SocketAddr>, ResolveError>>;
}

/// Resolves targets with the system resolver (`tokio::net::lookup_host`):
/// every A/AAAA record of every target.
#[derive(Debug, Clone)]
pub struct DnsResolver {
    targets: Vec<Target>,
}

impl DnsResolver {
    /// Resolves `targets`, all of them, every time.
    pub fn new(targets: Vec<Target>) -> Self {
        Self { targets }
    }
}

impl Resolve for DnsResolver {
    fn resolve(&self) -> BoxFuture<'_, Result<BTreeSet<SocketAddr>, ResolveError>> {
        Box::pin(async move {
            let lookups = self.targets.iter().map(|target| async move {
                tokio::net::lookup_host((target.host(), target.port()))
                    .await
                    .map(Iterator::collect::<Vec<_>>)
                    .map_err(|source| ResolveError::Lookup { target: target.to_string(), source })
            });
            let mut addresses = BTreeSet::new();
            // Any failure makes the whole answer unknown, so the caller keeps
            // the previous set rather than dropping one target's replicas.
            for found in futures::future::join_all(lookups).await {
                addresses.extend(found?);
            }
            Ok(addresses)
        })
    }
}

/// A fixed address set that can be changed at run time (tests, or a fleet
/// with known addresses). Clones share the set.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    addresses: Arc<Mutex<BTreeSet<SocketAddr>>>,
}

impl StaticResolver {
    /// A resolver that answers `addresses`.
    pub fn new(addresses: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self { addresses: Arc::new(Mutex::new(addresses.into_iter().collect())) }
    }

    /// Adds an address; it is picked up at the next resolution.
    pub fn insert(&self, address: SocketAddr) {
        if let Ok(mut addresses) = self.addresses.lock() {
            addresses.insert(address);
        }
    }

    /// Removes an address; it is dropped at the next resolution.
    pub fn remove(&self, address: SocketAddr) {
        if let Ok(mut addresses) = self.addresses.lock() {
            addresses.remove(&address);
        }
    }

    fn snapshot(&self) -> BTreeSet<SocketAddr> {
        self.addresses.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Resolve for StaticResolver {
    fn resolve(&self) -> BoxFuture<'_, Result<BTreeSet<SocketAddr>, ResolveError>> {
        let snapshot = self.snapshot();
        Box::pin(async move { Ok(snapshot) })
    }
}

/// What changed between two address sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

/// The changes that turn `current` into `next`, in address order.
pub fn diff(current: &BTreeSet<SocketAddr>, next: &BTreeSet<SocketAddr>) -> Diff {
    Diff { added: next.difference(current).copied().collect(), removed: current.difference(next).copied().collect() }
}

/// A balanced channel kept in sync with a resolver by a background task,
/// which stops when this value is dropped.
#[derive(Debug)]
pub struct Balanced {
    channel: GrpcChannel,
    endpoints: Arc<AtomicUsize>,
    refresher: JoinHandle<()>,
}

impl Balanced {
    /// Resolves once (bounded by the resolve timeout) so the channel starts
    /// with addresses, then re-resolves every `interval` in the background.
    pub async fn start(upstream: &'static str, resolver: Arc<dyn Resolve>, interval: Duration) -> Self {
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(CHANGE_QUEUE);
        let endpoints = Arc::new(AtomicUsize::new(0));
        let mut refresher = Refresher {
            upstream,
            resolver,
            changes,
            current: BTreeSet::new(),
            endpoints: endpoints.clone(),
            timeout: RESOLVE_TIMEOUT.min(interval),
        };
        refresher.refresh().await;
        let refresher = tokio::spawn(refresher.run(interval));
        Self { channel: ClientLayer.layer(channel), endpoints, refresher }
    }

    /// The channel, for a generated client (cheap to clone).
    pub fn channel(&self) -> GrpcChannel {
        self.channel.clone()
    }

    /// A shared count of the addresses currently in the balancer.
    pub fn endpoints(&self) -> Arc<AtomicUsize> {
        self.endpoints.clone()
    }
}

impl Drop for Balanced {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

struct Refresher {
    upstream: &'static str,
    resolver: Arc<dyn Resolve>,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    current: BTreeSet<SocketAddr>,
    endpoints: Arc<AtomicUsize>,
    timeout: Duration,
}

impl Refresher {
    async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if !self.refresh().await {
                break;
            }
        }
    }

    /// One resolution and its changes; `false` once the channel is gone.
    async fn refresh(&mut self) -> bool {
        let next = match tokio::time::timeout(self.timeout, self.resolver.resolve()).await {
            Ok(Ok(next)) => next,
            Ok(Err(error)) => {
                tracing::warn!(
                    upstream = self.upstream,
                    error = &error as &dyn std::error::Error,
                    "resolution failed, keeping addresses"
                );
                return !self.changes.is_closed();
            }
            Err(_) => {
                tracing::warn!(
                    upstream = self.upstream,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "resolution timed out, keeping addresses"
                );
                return !self.changes.is_closed();
            }
        };
        let Diff { added, removed } = diff(&self.current, &next);
        if added.is_empty() && removed.is_empty() {
            return !self.changes.is_closed();
        }
        for address in &removed {
            if self.changes.send(Change::Remove(*address)).await.is_err() {
                return false;
            }
        }
        for address in &added {
            if self.changes.send(Change::Insert(*address, endpoint(*address))).await.is_err() {
                return false;
            }
        }
        tracing::info!(
            upstream = self.upstream,
            added = ?added,
            removed = ?removed,
            endpoints = next.len(),
            "upstream addresses changed"
        );
        self.endpoints.store(next.len(), Ordering::Relaxed);
        self.current = next;
        true
    }
}

/// One lazily connected HTTP/2 connection to `address`.
fn endpoint(address: SocketAddr) -> Endpoint {
    Endpoint::from(http::Uri::from(AuthorityUri(address)))
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(5))
}

/// `http://address/`, built without parsing.
struct AuthorityUri(SocketAddr);

impl From<AuthorityUri> for http::Uri {
    fn from(AuthorityUri(address): AuthorityUri) -> Self {
        let authority = http::uri::Authority::try_from(address.to_string().as_str());
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = authority.ok();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        // A socket address is always a valid authority.
        http::Uri::from_parts(parts).unwrap_or_default()
    }
}

/// Extra attempts for a call that could not connect to the chosen address.
const CONNECT_RETRIES: usize = 2;

/// Runs `call`, and runs it again (at most [`CONNECT_RETRIES`] times) when it
/// failed because no connection to the chosen address could be made — a pod
/// that was just killed stays in DNS until the next re-resolution. The
/// request never left the gateway then, so repeating it is safe even for a
/// call that is not idempotent (a job submission). Any other failure is
/// returned as it is.
///
/// # Errors
///
/// The last attempt's status.
pub async fn retry_unconnected<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(status) if attempt < CONNECT_RETRIES && never_connected(&status) => {
                attempt += 1;
                tracing::debug!(attempt, error = %status, "worker address refused the connection, retrying elsewhere");
            }
            result => return result,
        }
    }
}

/// Whether `status` says the call failed to connect (so it was never sent).
fn never_connected(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable)
        {
            return true;
        }
        if error.to_string().contains("tcp connect error") {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(ports: &[u16]) -> BTreeSet<SocketAddr> {
        ports.iter().map(|p| SocketAddr::from(([10, 0, 0, 1], *p))).collect()
    }

    #[test]
    fn diff_reports_added_and_removed_addresses() {
        let d = diff(&addrs(&[1, 2, 3]), &addrs(&[2, 3, 4, 5]));
        assert_eq!(d.added, addrs(&[4, 5]).into_iter().collect::<Vec<_>>());
        assert_eq!(d.removed, addrs(&[1]).into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn diff_of_equal_sets_is_empty() {
        assert_eq!(diff(&addrs(&[1, 2]), &addrs(&[2, 1])), Diff::default());
        assert_eq!(diff(&BTreeSet::new(), &BTreeSet::new()), Diff::default());
    }

    #[test]
    fn diff_from_and_to_nothing() {
        assert_eq!(diff(&BTreeSet::new(), &addrs(&[7])).added.len(), 1);
        assert_eq!(diff(&addrs(&[7, 8]), &BTreeSet::new()).removed.len(), 2);
    }

    #[test]
    fn targets_parse_and_print() {
        let t = Target::parse("http://worker.shoal.svc:50051").unwrap();
        assert_eq!((t.host(), t.port()), ("worker.shoal.svc", 50051));
        assert_eq!(t.to_string(), "http://worker.shoal.svc:50051");
        assert_eq!(Target::parse("127.0.0.1:9").unwrap().to_string(), "http://127.0.0.1:9");
        let v6 = Target::parse("http://[::1]:50051").unwrap();
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.to_string(), "http://[::1]:50051");
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        assert!(Target::parse("http://worker").unwrap_err().contains("no port"));
        assert!(Target::parse("https://worker:1").unwrap_err().contains("only http://"));
        assert!(Target::parse("http://worker:1/x").unwrap_err().contains("no path"));
        assert!(Target::parse("http://:1").is_err());
    }

    #[test]
    fn endpoints_point_at_the_address() {
        let address = SocketAddr::from(([127, 0, 0, 1], 4000));
        assert_eq!(endpoint(address).uri().to_string(), "http://127.0.0.1:4000/");
        let v6: SocketAddr = "[::1]:4000".parse().unwrap();
        assert_eq!(endpoint(v6).uri().to_string(), "http://[::1]:4000/");
    }

    #[tokio::test]
    async fn static_resolver_answers_its_current_set() {
        let resolver = StaticResolver::new(addrs(&[1]));
        resolver.insert(SocketAddr::from(([10, 0, 0, 1], 2)));
        resolver.remove(SocketAddr::from(([10, 0, 0, 1], 1)));
        assert_eq!(resolver.resolve().await.unwrap(), addrs(&[2]));
    }

    #[tokio::test]
    async fn dns_resolver_resolves_ip_literals_and_localhost() {
        let resolver = DnsResolver::new(vec![Target::parse("http://127.0.0.1:5").unwrap()]);
        let found = resolver.resolve().await.unwrap();
        assert_eq!(found, [SocketAddr::from(([127, 0, 0, 1], 5))].into_iter().collect());
    }
}
