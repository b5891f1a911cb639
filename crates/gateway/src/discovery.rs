//! Client-side load balancing for gRPC upstreams.
//!
//! One HTTP/2 connection to a Kubernetes ClusterIP Service pins every call to
//! one pod, however many replicas there are. Instead, each upstream target
//! (`http://host:port`) is resolved to every address behind it (a headless
//! Service returns one A record per ready pod), re-resolved every
//! `--resolve-interval`, and the set of addresses feeds a tonic balanced
//! channel (tower's power-of-two-choices over one connection per address).
//! Each address enters the balancer only while its `grpc.health.v1` watch
//! reports `SERVING` (see [`Balanced`]): replicas are picked up within one
//! interval and leave at once when they drain or their connection closes.
//!
//! Where addresses come from is pluggable ([`Resolve`]): [`DnsResolver`] in
//! production, [`StaticResolver`] in tests (which can add a replica while
//! traffic flows).
//!
//! With [`UpstreamTls`] every connection is TLS (mutual when the gateway
//! has a certificate), and every address is verified against one server
//! name — the upstream's Service name — since the gateway dials the IPs it
//! resolved. When the certificate files change, each address gets a new
//! endpoint in the balancer and a new health connection (connections open
//! until then keep working: TLS checks a certificate at the handshake).
//!
//! Bounds and failure decisions: a resolution takes at most
//! [`RESOLVE_TIMEOUT`] (or the interval, if shorter); a failed or timed-out
//! resolution keeps the previous address set (a DNS hiccup never empties the
//! pool); a successful empty answer empties it, and calls then fail fast with
//! `503` instead of waiting for an address.

use std::collections::{BTreeMap, BTreeSet};
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
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::Layer as _;

/// Longest a single resolution may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a TCP connect to one upstream address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound of the queue of address changes fed to the balancer.
const CHANGE_QUEUE: usize = 64;

/// A balanced, traced gRPC channel: what generated clients are built on.
pub type GrpcChannel = Traced<Channel, Client>;

/// TLS towards one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CA, and the gateway's certificate, kept current with the files.
    pub tls: shoal_tls::ClientTls,
    /// The name every address's certificate must be valid for.
    pub server_name: String,
}

/// How the connections to one upstream's addresses are made.
#[derive(Debug, Clone, Default)]
struct Connect {
    tls: Option<UpstreamTls>,
}

impl Connect {
    /// A lazily connected endpoint for `address`, with the TLS files as they
    /// are now. `None` when TLS cannot be configured (logged; the address is
    /// never called in plaintext instead).
    fn endpoint(&self, upstream: &'static str, address: SocketAddr) -> Option<Endpoint> {
        let Some(UpstreamTls { tls, server_name }) = &self.tls else {
            return Some(endpoint(address, http::uri::Scheme::HTTP));
        };
        match tls.endpoint(endpoint(address, http::uri::Scheme::HTTPS), server_name) {
            Ok(endpoint) => Some(endpoint),
            Err(error) => {
                tracing::warn!(upstream, %address, error = &error as &dyn std::error::Error, "cannot configure tls");
                None
            }
        }
    }

    /// Changes when new TLS files are in use.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.tls.as_ref().map(|tls| tls.tls.changes())
    }
}

/// Resolves when `changes` says new TLS files are in use; never without TLS.
async fn tls_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(receiver) = changes
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

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

/// A balanced channel kept in sync with a resolver and with the health of
/// every address, by background tasks that stop when this value is dropped.
///
/// Every resolved address gets its own connection carrying one
/// `grpc.health.v1.Health/Watch` stream for the upstream's service name. An
/// address enters the balancer when its watch reports `SERVING` and leaves
/// it the moment the watch reports anything else, fails, or ends (the
/// connection closed): a draining replica is out of rotation within a round
/// trip of its SIGTERM, not at the next re-resolution. A watch that broke is
/// re-opened with a bounded backoff for as long as the address resolves.
#[derive(Debug)]
pub struct Balanced {
    channel: GrpcChannel,
    endpoints: Endpoints,
    refresher: JoinHandle<()>,
}

/// The live counts of one upstream's addresses (shared, cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Endpoints(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    resolved: AtomicUsize,
    serving: AtomicUsize,
}

impl Endpoints {
    /// Addresses the last resolution returned.
    pub fn resolved(&self) -> usize {
        self.0.resolved.load(Ordering::Relaxed)
    }

    /// Addresses in the balancer: resolved and reporting `SERVING`.
    pub fn serving(&self) -> usize {
        self.0.serving.load(Ordering::Relaxed)
    }
}

/// Longest [`Balanced::start`] waits for the first health answers, so a
/// gateway that just started does not refuse calls its upstreams can serve.
const FIRST_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds of the wait before re-opening a broken health watch.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(50);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Balanced {
    /// Resolves once (bounded by the resolve timeout) and waits (at most
    /// [`FIRST_HEALTH_TIMEOUT`]) for each address's first health answer, so
    /// the channel starts with the serving addresses; then re-resolves every
    /// `interval` in the background. `service` is the gRPC service name whose
    /// health is watched; `tls` makes every connection TLS.
    pub async fn start(
        upstream: &'static str,
        service: &'static str,
        resolver: Arc<dyn Resolve>,
        interval: Duration,
        tls: Option<UpstreamTls>,
    ) -> Self {
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(CHANGE_QUEUE);
        let endpoints = Endpoints::default();
        let (answered, mut first_answers) = tokio::sync::watch::channel(0usize);
        let mut refresher = Refresher {
            upstream,
            service,
            resolver,
            changes,
            watchers: BTreeMap::new(),
            endpoints: endpoints.clone(),
            answered: Arc::new(answered),
            timeout: RESOLVE_TIMEOUT.min(interval),
            connect: Connect { tls },
        };
        refresher.refresh().await;
        let expected = refresher.watchers.len();
        let _ = tokio::time::timeout(FIRST_HEALTH_TIMEOUT, first_answers.wait_for(|n| *n >= expected)).await;
        let refresher = tokio::spawn(refresher.run(interval));
        Self { channel: ClientLayer.layer(channel), endpoints, refresher }
    }

    /// The channel, for a generated client (cheap to clone).
    pub fn channel(&self) -> GrpcChannel {
        self.channel.clone()
    }

    /// The live address counts.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.clone()
    }
}

impl Drop for Balanced {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Aborts the task when dropped.
struct Watcher(JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Refresher {
    upstream: &'static str,
    service: &'static str,
    resolver: Arc<dyn Resolve>,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    watchers: BTreeMap<SocketAddr, Watcher>,
    endpoints: Endpoints,
    answered: Arc<tokio::sync::watch::Sender<usize>>,
    timeout: Duration,
    connect: Connect,
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
        let current: BTreeSet<SocketAddr> = self.watchers.keys().copied().collect();
        let Diff { added, removed } = diff(&current, &next);
        if added.is_empty() && removed.is_empty() {
            return !self.changes.is_closed();
        }
        for address in &removed {
            // Dropping the watcher stops it; the address leaves the balancer.
            self.watchers.remove(address);
            if self.changes.send(Change::Remove(*address)).await.is_err() {
                return false;
            }
        }
        for address in &added {
            let watch = HealthWatch {
                upstream: self.upstream,
                service: self.service,
                address: *address,
                changes: self.changes.clone(),
                endpoints: self.endpoints.clone(),
                answered: self.answered.clone(),
                connect: self.connect.clone(),
            };
            self.watchers.insert(*address, Watcher(tokio::spawn(watch.run())));
        }
        tracing::info!(
            upstream = self.upstream,
            added = ?added,
            removed = ?removed,
            endpoints = next.len(),
            "upstream addresses changed"
        );
        self.endpoints.0.resolved.store(next.len(), Ordering::Relaxed);
        true
    }
}

/// The health of one address, fed into the balancer.
struct HealthWatch {
    upstream: &'static str,
    service: &'static str,
    address: SocketAddr,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    endpoints: Endpoints,
    answered: Arc<tokio::sync::watch::Sender<usize>>,
    connect: Connect,
}

/// Removes the address from the balancer when its watcher stops (dropped
/// because the address left DNS, or aborted with the gateway).
struct InBalancer<'a> {
    serving: bool,
    endpoints: &'a Endpoints,
}

impl Drop for InBalancer<'_> {
    fn drop(&mut self) {
        if self.serving {
            self.endpoints.0.serving.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HealthWatch {
    fn health_client(&self) -> Option<HealthClient<Channel>> {
        self.connect.endpoint(self.upstream, self.address).map(|endpoint| HealthClient::new(endpoint.connect_lazy()))
    }

    async fn run(self) {
        let mut tls_changes = self.connect.changes();
        let mut health = self.health_client();
        let mut state = InBalancer { serving: false, endpoints: &self.endpoints };
        let mut first_answer = true;
        let mut backoff = WATCH_BACKOFF_MIN;
        loop {
            if tls_changes.as_mut().is_some_and(|changes| changes.has_changed().unwrap_or(false)) {
                tls_changes.as_mut().map(|changes| changes.borrow_and_update());
                health = self.health_client();
            }
            let request = HealthCheckRequest { service: self.service.to_owned() };
            let watch = match health.as_mut() {
                Some(health) => health.watch(request).await,
                None => Err(tonic::Status::unavailable("tls is not configured for this address")),
            };
            match watch {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        let message = tokio::select! {
                            message = stream.message() => message,
                            () = tls_changed(&mut tls_changes) => {
                                // New certificate files: new connections to this address
                                // for calls and for the next watch; this watch goes on.
                                health = self.health_client();
                                if state.serving && !self.reinsert().await {
                                    return;
                                }
                                continue;
                            }
                        };
                        let serving = match message {
                            Ok(Some(answer)) => answer.status() == ServingStatus::Serving,
                            Ok(None) | Err(_) => break,
                        };
                        if serving {
                            backoff = WATCH_BACKOFF_MIN;
                        }
                        if !self.set(&mut state, serving).await {
                            return;
                        }
                        self.first(&mut first_answer);
                    }
                }
                Err(status) => {
                    tracing::debug!(upstream = self.upstream, address = %self.address, code = ?status.code(), error = %status.message(), "health watch failed");
                }
            }
            // The watch ended or never started: the connection closed or the
            // replica is gone. Out of rotation until it serves again.
            if !self.set(&mut state, false).await {
                return;
            }
            self.first(&mut first_answer);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    }

    /// Replaces the address's endpoint in the balancer with one made from
    /// the current TLS files; `false` once the balancer is gone.
    async fn reinsert(&self) -> bool {
        let Some(endpoint) = self.connect.endpoint(self.upstream, self.address) else { return true };
        tracing::info!(upstream = self.upstream, address = %self.address, "tls files changed, reconnecting");
        self.changes.send(Change::Insert(self.address, endpoint)).await.is_ok()
    }

    fn first(&self, first_answer: &mut bool) {
        if std::mem::take(first_answer) {
            self.answered.send_modify(|n| *n += 1);
        }
    }

    /// Puts the address in or out of the balancer; `false` once the balancer
    /// is gone.
    async fn set(&self, state: &mut InBalancer<'_>, serving: bool) -> bool {
        if state.serving == serving {
            return true;
        }
        let change = if serving {
            match self.connect.endpoint(self.upstream, self.address) {
                Some(endpoint) => Change::Insert(self.address, endpoint),
                None => return true,
            }
        } else {
            Change::Remove(self.address)
        };
        if self.changes.send(change).await.is_err() {
            return false;
        }
        state.serving = serving;
        if serving {
            self.endpoints.0.serving.fetch_add(1, Ordering::Relaxed);
        } else {
            self.endpoints.0.serving.fetch_sub(1, Ordering::Relaxed);
        }
        tracing::info!(upstream = self.upstream, address = %self.address, serving, "endpoint health changed");
        true
    }
}

/// One lazily connected HTTP/2 connection to `address`.
fn endpoint(address: SocketAddr, scheme: http::uri::Scheme) -> Endpoint {
    Endpoint::from(http::Uri::from(AuthorityUri(address, scheme)))
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(5))
}

/// `http://address/` (or `https://`), built without parsing.
struct AuthorityUri(SocketAddr, http::uri::Scheme);

impl From<AuthorityUri> for http::Uri {
    fn from(AuthorityUri(address, scheme): AuthorityUri) -> Self {
        let authority = http::uri::Authority::try_from(address.to_string().as_str());
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = authority.ok();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        // A socket address is always a valid authority.
        http::Uri::from_parts(parts).unwrap_or_default()
    }
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
        assert_eq!(endpoint(address, http::uri::Scheme::HTTP).uri().to_string(), "http://127.0.0.1:4000/");
        let v6: SocketAddr = "[::1]:4000".parse().unwrap();
        assert_eq!(endpoint(v6, http::uri::Scheme::HTTPS).uri().to_string(), "https://[::1]:4000/");
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
