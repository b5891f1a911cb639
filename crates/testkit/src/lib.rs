//! Test support for Shoal's integration tests (a dev-dependency only):
//!
//! - [`RedisServer`]: a real `redis-server` (the Debian package) on a free
//!   loopback port with its own data directory, that a test can stop, kill
//!   and restart (with `appendonly yes` the data survives a restart);
//! - [`eventually`]: poll a condition until it holds or a deadline passes —
//!   the replacement for sleeps as synchronisation;
//! - [`free_port`]: a currently free loopback port;
//! - [`RedisCluster`] and [`RedisSentinel`]: multi-node topologies for the
//!   failover tests ([`topology`]).
//! - [`certs`]: a throwaway CA and certificates for TLS tests, written to a
//!   temporary directory (no private key is ever committed).

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod topology;
pub use topology::{RedisCluster, RedisSentinel, redis_cli};
pub mod certs;

/// A loopback port that was free a moment ago.
///
/// # Panics
///
/// When the OS cannot give a port, which means the test cannot run anyway.
pub fn free_port() -> u16 {
    #[allow(clippy::expect_used)]
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    #[allow(clippy::expect_used)]
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what`
/// after `timeout`.
///
/// # Panics
///
/// When the condition did not hold within `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` child process owned by one test. Dropped → killed.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not come up in 10 s.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a server with `appendonly yes` and `appendfsync always`, so
    /// every acknowledged write survives a kill and restart.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(appendonly: bool) -> Self {
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = Self { port: free_port(), dir, appendonly, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir: PathBuf = self.dir.path().to_path_buf();
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--loglevel")
            .arg("warning")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.appendonly {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        #[allow(clippy::expect_used)]
        let child = command.spawn().expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server with SIGKILL (no chance to save) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
