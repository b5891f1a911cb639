//! The connection layer: one pool type over the three Redis topologies the
//! worker supports, so the store and the batcher are written once.
//!
//! - **Single**: one Redis (`--redis-url`), a pool of multiplexed
//!   connections (deadpool-redis).
//! - **Cluster**: Redis Cluster (`--redis-cluster-urls`, seed nodes). Each
//!   pooled object is a cluster connection of the `redis` crate: it follows
//!   `MOVED` and `ASK` redirections and refreshes its slot map after a
//!   failover or resharding. Every key of a queue shares one hash tag
//!   ([`super::keys`]), so every script and pipeline lands on one slot.
//! - **Sentinel**: a primary managed by Redis Sentinel
//!   (`--redis-sentinel-urls`, `--redis-sentinel-master`). A new connection
//!   asks the sentinels for the current primary and checks its `ROLE`; a
//!   pooled one is reused only while the sentinels still name its server
//!   (asked again at most every [`SENTINEL_RECHECK`]).
//!
//! In every topology a connection that answered `READONLY` (the node it
//! talks to was demoted: the primary moved) or failed on the wire is
//! dropped from its pool instead of being recycled, so the next `get`
//! resolves the primary again; the failed call's caller retries as it
//! would after any Redis error.
//!
//! Bounds: a command waits at most [`RESPONSE_TIMEOUT`] for its reply
//! (keep blocking reads under it), a connect at most [`CONNECT_TIMEOUT`]; a
//! cluster connection retries a redirected or failed command at most
//! [`CLUSTER_RETRIES`] times within [`CLUSTER_OVERALL_TIMEOUT`].

use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleResult};
use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

/// Longest wait for one reply (a blocking `XREADGROUP` blocks for less).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait to open one connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Retries of a cluster command after a redirection or a failed node.
pub const CLUSTER_RETRIES: u32 = 4;
/// Bound of a cluster command including its retries and redirections.
pub const CLUSTER_OVERALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the job keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis.
    Single { url: String },
    /// A Redis Cluster, reached through any of these seed nodes.
    Cluster { urls: Vec<String> },
    /// A primary named `master` that these sentinels watch.
    Sentinel { urls: Vec<String>, master: String },
}

impl Topology {
    /// A short name for logs and metrics: `single`, `cluster`, `sentinel`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Single { .. } => "single",
            Self::Cluster { .. } => "cluster",
            Self::Sentinel { .. } => "sentinel",
        }
    }
}

/// Sizes and waits of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_size: usize,
    /// Bound of waiting for a free connection, of opening one and of
    /// checking one before reuse.
    pub wait: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self { max_size: 16, wait: Duration::from_secs(2) }
    }
}

/// A URL that cannot name a Redis.
#[derive(Debug, thiserror::Error)]
#[error("invalid redis url")]
pub struct UrlError(#[source] pub RedisError);

/// A pool of connections to the topology's primary (or primaries); cheap to
/// clone (clones share the pool).
#[derive(Clone)]
pub struct RedisPool {
    inner: PoolInner,
}

#[derive(Clone)]
enum PoolInner {
    Single(deadpool_redis::Pool),
    Cluster(managed::Pool<ClusterManager>),
    Sentinel(managed::Pool<SentinelManager>),
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            PoolInner::Single(_) => "single",
            PoolInner::Cluster(_) => "cluster",
            PoolInner::Sentinel(_) => "sentinel",
        };
        f.debug_struct("RedisPool").field("topology", &kind).finish_non_exhaustive()
    }
}

impl From<deadpool_redis::Pool> for RedisPool {
    fn from(pool: deadpool_redis::Pool) -> Self {
        Self { inner: PoolInner::Single(pool) }
    }
}

fn timeouts(wait: Duration) -> managed::Timeouts {
    managed::Timeouts { wait: Some(wait), create: Some(wait), recycle: Some(wait) }
}

fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

impl RedisPool {
    /// A pool for `topology`. No connection opens until the first
    /// [`RedisPool::get`], so a worker starts while Redis is down.
    ///
    /// # Errors
    ///
    /// [`UrlError`] when a URL cannot be parsed.
    pub fn new(topology: &Topology, settings: PoolSettings) -> Result<Self, UrlError> {
        let builder_error = |e: managed::BuildError| {
            UrlError(RedisError::from((ErrorKind::InvalidClientConfig, "pool", e.to_string())))
        };
        let inner = match topology {
            Topology::Single { url } => {
                let mut config = deadpool_redis::Config::from_url(url.as_str());
                config.pool = Some(deadpool_redis::PoolConfig {
                    max_size: settings.max_size,
                    timeouts: timeouts(settings.wait),
                    ..Default::default()
                });
                let pool = config.create_pool(Some(deadpool_redis::Runtime::Tokio1)).map_err(|e| {
                    UrlError(RedisError::from((ErrorKind::InvalidClientConfig, "redis url", e.to_string())))
                })?;
                PoolInner::Single(pool)
            }
            Topology::Cluster { urls } => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .overall_response_timeout(Some(CLUSTER_OVERALL_TIMEOUT))
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .build()
                    .map_err(UrlError)?;
                let pool = managed::Pool::builder(ClusterManager { client })
                    .max_size(settings.max_size)
                    .timeouts(timeouts(settings.wait))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .map_err(builder_error)?;
                PoolInner::Cluster(pool)
            }
            Topology::Sentinel { urls, master } => {
                // The primary is reached with the credentials (and db) of the
                // first sentinel URL: Shoal's deployments give both one password.
                let first = redis::IntoConnectionInfo::into_connection_info(
                    urls.first().map(String::as_str).unwrap_or_default(),
                )
                .map_err(UrlError)?;
                let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone());
                let sentinel =
                    redis::sentinel::Sentinel::build(urls.iter().map(String::as_str).collect()).map_err(UrlError)?;
                let manager =
                    SentinelManager { state: tokio::sync::Mutex::new((sentinel, None)), master: master.clone(), node };
                let pool = managed::Pool::builder(manager)
                    .max_size(settings.max_size)
                    .timeouts(timeouts(settings.wait))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .map_err(builder_error)?;
                PoolInner::Sentinel(pool)
            }
        };
        Ok(Self { inner })
    }

    /// A connection, opened (and, for Sentinel, resolved) if none is free.
    ///
    /// # Errors
    ///
    /// No connection within the pool's wait, or Redis refused to connect.
    pub async fn get(&self) -> Result<Connection, deadpool_redis::PoolError> {
        let conn = match &self.inner {
            PoolInner::Single(pool) => Conn::Single(pool.get().await?),
            PoolInner::Cluster(pool) => Conn::Cluster(pool.get().await?),
            PoolInner::Sentinel(pool) => Conn::Sentinel(pool.get().await?),
        };
        Ok(Connection { conn: Some(conn) })
    }
}

enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(managed::Object<ClusterManager>),
    Sentinel(managed::Object<SentinelManager>),
}

/// A pooled connection; back to its pool when dropped, unless it showed it
/// must not be reused (a `READONLY` reply or a broken connection).
pub struct Connection {
    conn: Option<Conn>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// Whether `error` says this connection must not be reused: the node was
/// demoted (`READONLY`), or the connection broke.
fn poisons(error: &RedisError) -> bool {
    matches!(error.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
}

fn value_poisons(value: &Value) -> bool {
    match value {
        Value::ServerError(error) => error.kind() == Some(ServerErrorKind::ReadOnly),
        Value::Array(items) => items.iter().any(value_poisons),
        _ => false,
    }
}

impl Connection {
    fn inner(&mut self) -> &mut dyn ConnectionLike {
        match self.conn.as_mut() {
            Some(Conn::Single(c)) => &mut **c,
            Some(Conn::Cluster(c)) => &mut **c,
            Some(Conn::Sentinel(c)) => &mut c.0,
            None => unreachable!("a connection is only discarded on drop"),
        }
    }

    /// Removes the connection from its pool: it is closed when dropped.
    fn discard(&mut self) {
        match self.conn.take() {
            Some(Conn::Single(c)) => drop(deadpool_redis::Connection::take(c)),
            Some(Conn::Cluster(c)) => drop(managed::Object::take(c)),
            Some(Conn::Sentinel(c)) => drop(managed::Object::take(c)),
            None => {}
        }
    }

    fn check<T>(&mut self, result: &redis::RedisResult<T>, values: impl FnOnce(&T) -> bool) {
        let poisoned = match result {
            Ok(value) => values(value),
            Err(error) => poisons(error),
        };
        if poisoned {
            tracing::warn!("redis connection dropped from the pool (primary moved or connection broken)");
            self.discard();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Returned to the pool by the inner object's own drop.
        let _ = self.conn.take();
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.inner().req_packed_command(cmd).await;
            self.check(&result, value_poisons);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.inner().req_packed_commands(cmd, offset, count).await;
            self.check(&result, |values: &Vec<Value>| values.iter().any(value_poisons));
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.conn {
            Some(Conn::Single(c)) => c.get_db(),
            Some(Conn::Cluster(c)) => c.get_db(),
            Some(Conn::Sentinel(c)) => c.0.get_db(),
            None => 0,
        }
    }
}

/// Opens cluster connections (each follows redirections and refreshes its
/// slot map by itself).
struct ClusterManager {
    client: redis::cluster::ClusterClient,
}

impl managed::Manager for ClusterManager {
    type Type = redis::cluster_async::ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<Self::Type, RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(&self, _: &mut Self::Type, _: &Metrics) -> RecycleResult<RedisError> {
        // No check: PING would go to every node, so one failed node (a
        // failover under way) would fail every connection. A cluster
        // connection reconnects to its nodes by itself, and one that fails
        // a call is discarded (`Connection::check`).
        Ok(())
    }
}

/// How long the primary the sentinels named is trusted before a connection
/// is handed out again.
pub const SENTINEL_RECHECK: Duration = Duration::from_millis(500);

/// Opens connections to the primary the sentinels name now, and retires a
/// connection to any other server when it would be reused: after a
/// failover the old primary keeps accepting writes until Sentinel demotes
/// it (seconds later), and whatever it accepts then is lost.
struct SentinelManager {
    /// The sentinels, and the primary they named last (with when).
    state: tokio::sync::Mutex<(redis::sentinel::Sentinel, Option<(std::time::Instant, String)>)>,
    master: String,
    node: redis::sentinel::SentinelNodeConnectionInfo,
}

impl SentinelManager {
    /// The primary's client, asked of the sentinels (its role checked).
    async fn resolve(&self) -> Result<(redis::Client, String), RedisError> {
        let mut state = self.state.lock().await;
        let client = state.0.async_master_for(&self.master, Some(&self.node)).await?;
        let addr = client.get_connection_info().addr().to_string();
        state.1 = Some((std::time::Instant::now(), addr.clone()));
        Ok((client, addr))
    }

    /// The primary's address, asked again when older than
    /// [`SENTINEL_RECHECK`]; `None` when the sentinels cannot say.
    async fn current(&self) -> Option<String> {
        {
            let state = self.state.lock().await;
            if let Some((at, addr)) = &state.1
                && at.elapsed() < SENTINEL_RECHECK
            {
                return Some(addr.clone());
            }
        }
        self.resolve().await.ok().map(|(_, addr)| addr)
    }
}

impl managed::Manager for SentinelManager {
    /// A connection and the address of the server it talks to.
    type Type = (redis::aio::MultiplexedConnection, String);
    type Error = RedisError;

    async fn create(&self) -> Result<Self::Type, RedisError> {
        let (client, addr) = self.resolve().await?;
        let conn = client.get_multiplexed_async_connection_with_config(&connection_config()).await?;
        Ok((conn, addr))
    }

    async fn recycle(&self, conn: &mut Self::Type, _: &Metrics) -> RecycleResult<RedisError> {
        if let Some(current) = self.current().await
            && current != conn.1
        {
            return Err(managed::RecycleError::message("the sentinels name another primary"));
        }
        let _: String = redis::cmd("PING").query_async(&mut conn.0).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readonly_reply_poisons_the_connection_and_a_script_error_does_not() {
        let readonly = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "READONLY"));
        assert!(poisons(&readonly));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR in script"));
        assert!(!poisons(&script));
        assert!(!value_poisons(&Value::Array(vec![Value::Int(1), Value::Nil])));
    }
}
