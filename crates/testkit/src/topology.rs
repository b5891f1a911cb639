//! Real multi-node Redis topologies on loopback, owned by one test: a Redis
//! Cluster of three primaries with a replica each ([`RedisCluster`]), and a
//! primary with one replica watched by three sentinels ([`RedisSentinel`]).
//! Every process has its own free ports and data directory and is killed
//! when the value is dropped (a failing test cleans up too). Every wait is
//! bounded.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// One `redis-server` process (a node or a sentinel).
#[derive(Debug)]
struct Node {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(port: u16, args: Vec<String>) -> Self {
        let mut node = Self { port, args, child: None };
        node.start();
        node
    }

    fn start(&mut self) {
        #[allow(clippy::expect_used)]
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `redis-cli -p port args...` and returns its output ("" when the
/// node does not answer).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster on loopback: three primaries, one replica each,
/// `cluster-node-timeout` 1 s (a dead primary's replica takes over within
/// about 2-3 s), `appendonly yes` with `appendfsync everysec`.
#[derive(Debug)]
pub struct RedisCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts six nodes and joins them (`redis-cli --cluster create ...
    /// --cluster-replicas 1`); returns once every node reports
    /// `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// When redis-server or redis-cli is missing, or the cluster does not
    /// form within 20 s.
    pub fn start() -> Self {
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut nodes = Vec::new();
        for i in 0..6 {
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.path().join(format!("n{i}"));
            #[allow(clippy::expect_used)]
            std::fs::create_dir(&node_dir).expect("node dir");
            let args = [
                "--port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &node_dir.to_string_lossy(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--loglevel",
                "warning",
            ];
            nodes.push(Node::spawn(port, args.iter().map(|a| (*a).to_owned()).collect()));
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        #[allow(clippy::expect_used)]
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = Self { _dir: dir, nodes };
        cluster.wait_healthy(Duration::from_secs(20));
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// The ports of the nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of the primary serving `key`'s slot now, as the first live
    /// node that knows says (`None` while none does: a failover under way).
    pub fn primary_for(&self, key: &str) -> Option<u16> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let slot: u16 = match redis_cli(node.port, &["cluster", "keyslot", key]).trim().parse() {
                Ok(slot) => slot,
                Err(_) => continue,
            };
            for line in redis_cli(node.port, &["cluster", "nodes"]).lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                    continue;
                }
                let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                    Some((a, b)) => {
                        a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
                    }
                    None => range.parse::<u16>() == Ok(slot),
                });
                if serves && let Some(port) = fields[1].split(['@', ':']).nth(1).and_then(|p| p.parse().ok()) {
                    return Some(port);
                }
            }
        }
        None
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }

    /// Waits until every live node reports `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// When that does not happen `within`.
    pub fn wait_healthy(&self, within: Duration) {
        wait_for(within, "cluster_state:ok on every live node", || {
            self.nodes
                .iter()
                .filter(|n| n.child.is_some())
                .all(|n| redis_cli(n.port, &["cluster", "info"]).contains("cluster_state:ok"))
        });
    }
}

/// One primary, one replica and three sentinels (quorum 2,
/// `down-after-milliseconds` 1000) on loopback; the primary's name is
/// [`RedisSentinel::MASTER`].
#[derive(Debug)]
pub struct RedisSentinel {
    _dir: tempfile::TempDir,
    servers: Vec<Node>,
    sentinels: Vec<Node>,
}

impl RedisSentinel {
    /// The name the sentinels monitor.
    pub const MASTER: &'static str = "shoal";

    /// Starts the primary, its replica and three sentinels; returns once
    /// the replica is in sync and every sentinel knows the replica and the
    /// two other sentinels (so a failover can be agreed).
    ///
    /// # Panics
    ///
    /// When redis-server is missing or the setup does not settle in 30 s.
    pub fn start() -> Self {
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("temp dir for sentinel");
        let (primary, replica) = (free_port(), free_port());
        let server = |port: u16, name: &str, extra: &[String]| {
            let path = dir.path().join(name);
            #[allow(clippy::expect_used)]
            std::fs::create_dir(&path).expect("server dir");
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &path.to_string_lossy(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--loglevel",
                "warning",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
            args.extend_from_slice(extra);
            Node::spawn(port, args)
        };
        let servers = vec![
            server(primary, "primary", &[]),
            server(replica, "replica", &["--replicaof".into(), "127.0.0.1".into(), primary.to_string()]),
        ];
        wait_for(Duration::from_secs(15), "the replica is in sync", || {
            redis_cli(replica, &["info", "replication"]).contains("master_link_status:up")
        });
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel{i}.conf"));
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {m} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {m} 1000\nsentinel failover-timeout {m} 10000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = dir.path().display(),
                m = Self::MASTER,
            );
            #[allow(clippy::expect_used)]
            std::fs::write(&conf, text).expect("write sentinel.conf");
            sentinels.push(Node::spawn(
                port,
                vec![conf.to_string_lossy().into_owned(), "--sentinel".into(), "--loglevel".into(), "warning".into()],
            ));
        }
        let setup = Self { _dir: dir, servers, sentinels };
        wait_for(Duration::from_secs(30), "every sentinel knows the replica and two other sentinels", || {
            setup.sentinels.iter().all(|s| {
                let replicas = redis_cli(s.port, &["sentinel", "replicas", Self::MASTER]);
                let others = redis_cli(s.port, &["sentinel", "sentinels", Self::MASTER]);
                replicas.contains(&replica.to_string()) && others.matches("runid").count() == 2
            })
        });
        setup
    }

    /// `redis://127.0.0.1:PORT` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// The port of the primary as the first live sentinel names it.
    pub fn primary(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let out = redis_cli(s.port, &["sentinel", "get-master-addr-by-name", Self::MASTER]);
            out.lines().nth(1).and_then(|p| p.trim().parse().ok())
        })
    }

    /// Kills the server on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.servers.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }

    /// Starts the server on `port` again (same data and arguments; the
    /// sentinels turn a former primary into a replica).
    pub fn restart(&mut self, port: u16) {
        if let Some(node) = self.servers.iter_mut().find(|n| n.port == port) {
            node.kill();
            node.start();
        }
    }

    /// Asks the first sentinel for a graceful failover (`SENTINEL
    /// FAILOVER`): the primary is demoted while it runs, so clients still
    /// connected to it get `READONLY`.
    pub fn failover(&self) -> String {
        self.sentinels.first().map(|s| redis_cli(s.port, &["sentinel", "failover", Self::MASTER])).unwrap_or_default()
    }

    /// Waits until the sentinels name a primary other than `old`, and that
    /// server says it is a primary; returns its port.
    ///
    /// # Panics
    ///
    /// When no promotion happens `within`.
    pub fn wait_promoted(&self, old: u16, within: Duration) -> u16 {
        let mut promoted = 0;
        wait_for(within, "a replica promoted by the sentinels", || match self.primary() {
            Some(port) if port != old => {
                promoted = port;
                redis_cli(port, &["role"]).starts_with("master")
            }
            _ => false,
        });
        promoted
    }

    /// Waits until the server on `port` is a replica in sync.
    ///
    /// # Panics
    ///
    /// When it is not `within`.
    pub fn wait_replica_in_sync(&self, port: u16, within: Duration) {
        wait_for(within, "the server is a replica in sync", || {
            redis_cli(port, &["info", "replication"]).contains("master_link_status:up")
        });
    }
}
