//! Redis servers of a test's own, on 127.0.0.1 and free ports: one server,
//! a primary with a replica behind a Sentinel, or a three-node Cluster.
//! Where `redis-server` is missing, a test skips loudly; under CI (`CI` set)
//! it fails instead, since `.ci/run` installs it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// Whether `redis-server` (and `redis-cli`) can run here; panics under CI when not.
pub fn redis_installed() -> bool {
    let installed = ["redis-server", "redis-cli"].iter().all(|binary| {
        Command::new(binary)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
    });
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server and redis-cli are required under CI (.ci/run installs them)"
        );
        eprintln!(
            "\n!!! SKIPPED: redis-server or redis-cli is not installed; the shared-cache tests did not run. \
             Install them (apt-get install redis-server redis-tools) or run .ci/run, which does. !!!\n"
        );
    }
    installed
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test's own.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// A config file to start from (a sentinel's, which it rewrites).
    config: Option<String>,
    args: Vec<String>,
    dir: tempfile::TempDir,
    /// Whether it ran once: a restart keeps its port.
    started: bool,
}

impl RedisServer {
    /// Starts one; `None` (after saying why) when `redis-server` is not installed.
    pub async fn start() -> Option<Self> {
        Self::start_with(&[]).await
    }

    /// Starts one with extra `redis-server` arguments.
    pub async fn start_with(args: &[&str]) -> Option<Self> {
        if !redis_installed() {
            return None;
        }
        let mut server = Self {
            child: None,
            port: free_port(),
            config: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
            started: false,
        };
        server.run().await;
        Some(server)
    }

    /// A Sentinel started from `config` (written into the server's own folder).
    async fn sentinel(config: impl Fn(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, config(dir.path())).unwrap();
        let mut server = Self {
            child: None,
            port: free_port(),
            config: Some(path.display().to_string()),
            args: vec!["--sentinel".into()],
            dir,
            started: false,
        };
        server.run().await;
        server
    }

    /// Starts the server on its port and waits until it answers as itself.
    /// A port is picked free and then released, so another process may take
    /// it first: then the server exits, and a first start moves to a new
    /// port (a restart keeps its port: the brokers know it).
    async fn run(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut command = Command::new("redis-server");
            match &self.config {
                // A config file comes first; a sentinel keeps no data.
                Some(config) => command.arg(config),
                None => command
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(self.dir.path()),
            };
            let mut child = command
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            let pid = child.id();
            let up = loop {
                assert!(Instant::now() < deadline, "redis-server did not come up");
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if self.answering_pid().await == Some(pid) {
                    break true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if up {
                self.child = Some(child);
                self.started = true;
                return;
            }
            assert!(!self.started, "port {} was taken meanwhile", self.port);
            self.port = free_port();
        }
    }

    /// The process id of whatever `redis-server` answers on this port.
    async fn answering_pid(&self) -> Option<u32> {
        let mut connection = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut connection)
            .await
            .ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A plain connection, to look at what the brokers stored.
    pub async fn connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        let connect = client.get_multiplexed_async_connection();
        let mut connection = tokio::time::timeout(Duration::from_secs(1), connect)
            .await
            .ok()?
            .ok()?;
        let _: String = redis::cmd("PING").query_async(&mut connection).await.ok()?;
        Some(connection)
    }

    /// Runs one command and returns its answer as text lines (for `INFO`, `SENTINEL`…).
    pub async fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut connection = self.connection().await.expect("redis answers");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut connection).await.unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    /// SIGSTOP: connections stay open but nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// A primary, one replica, and one Sentinel watching them as `mymaster`.
pub struct SentinelSet {
    pub primary: RedisServer,
    /// Kept running for as long as the set lives.
    replica: RedisServer,
    pub sentinel: RedisServer,
}

pub const MASTER_NAME: &str = "mymaster";

impl SentinelSet {
    pub async fn start() -> Option<Self> {
        // A full resynchronisation starts at once, not after the default 5 s.
        let at_once = ["--repl-diskless-sync-delay", "0"];
        let primary = RedisServer::start_with(&at_once).await?;
        let port = primary.port.to_string();
        let replica_of = ["--replicaof", "127.0.0.1", &port, at_once[0], at_once[1]];
        let replica = RedisServer::start_with(&replica_of).await?;
        let primary_port = primary.port;
        let sentinel = RedisServer::sentinel(|_| {
            format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n"
            )
        })
        .await;
        let set = Self {
            primary,
            replica,
            sentinel,
        };
        set.wait_for_replication().await;
        Some(set)
    }

    /// The port the sentinel names as primary now.
    pub async fn primary_port(&self) -> u16 {
        let address: Vec<String> = self
            .sentinel
            .command(&["SENTINEL", "get-master-addr-by-name", MASTER_NAME])
            .await;
        address[1].parse().unwrap()
    }

    /// The server the sentinel names as primary now.
    pub async fn current_primary(&self) -> &RedisServer {
        let port = self.primary_port().await;
        if self.primary.port == port {
            &self.primary
        } else {
            &self.replica
        }
    }

    /// Waits until the primary the sentinel names has its replica online
    /// and caught up; how long that took. Sentinel reconfigures a demoted
    /// primary that stayed up only at its next look at it (every 10 s); after
    /// `NUDGE_AFTER`, this sends the `REPLICAOF` Sentinel would send.
    pub async fn wait_for_replication(&self) -> Duration {
        const NUDGE_AFTER: Duration = Duration::from_secs(3);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        let mut nudged = false;
        loop {
            let port = self.primary_port().await;
            let (primary, other) = if self.primary.port == port {
                (&self.primary, &self.replica)
            } else {
                (&self.replica, &self.primary)
            };
            assert_eq!(primary.port, port, "the sentinel names one of the set");
            if !nudged && started.elapsed() >= NUDGE_AFTER {
                let role: String = other.command(&["INFO", "replication"]).await;
                if role.contains("role:master") {
                    let _: String = other
                        .command(&["REPLICAOF", "127.0.0.1", &port.to_string()])
                        .await;
                }
                nudged = true;
            }
            let info: String = primary.command(&["INFO", "replication"]).await;
            let lag = info
                .lines()
                .find(|line| line.starts_with("slave0:"))
                .and_then(|line| line.split(",lag=").nth(1))
                .and_then(|lag| lag.trim().parse::<u64>().ok());
            if info.contains("role:master")
                && info.contains("connected_slaves:1")
                && info.contains("state=online")
                && lag.is_some_and(|lag| lag <= 1)
            {
                return started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the replica never re-attached to {port}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A real failover: the sentinel promotes the replica; returns once it
    /// names it and the old primary replicates from it again (so the next
    /// failover, and `redis_min_replicas`, have a replica to count on).
    pub async fn failover(&self) {
        let before = self.primary_port().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let asked: redis::RedisResult<String> = {
                let mut connection = self.sentinel.connection().await.unwrap();
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(MASTER_NAME)
                    .query_async(&mut connection)
                    .await
            };
            if asked.is_ok() {
                break;
            }
            // "NOGOODSLAVE" until the sentinel has seen the replica.
            assert!(Instant::now() < deadline, "failover refused: {asked:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        while self.primary_port().await == before {
            assert!(Instant::now() < deadline, "the failover never completed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = self.wait_for_replication().await;
        eprintln!("failover: the old primary replicates again after {took:?}");
    }
}

/// Three primaries made one Cluster by `redis-cli --cluster create`.
pub struct ClusterSet {
    pub nodes: Vec<RedisServer>,
}

impl ClusterSet {
    pub async fn start() -> Option<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node = RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "15000",
            ])
            .await?;
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes.iter().map(RedisServer::address).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let set = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &set.nodes {
            loop {
                let info: String = node.command(&["CLUSTER", "INFO"]).await;
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster never became ok");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some(set)
    }

    pub fn seeds_toml(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.address()))
            .collect();
        format!("redis_cluster_nodes = [{}]\n", seeds.join(", "))
    }
}

/// Keys and their `DUMP`s, as a backup holds them.
pub type Snapshot = Vec<(String, Vec<u8>)>;

/// Every key the brokers wrote, as a backup would take it.
pub async fn snapshot(
    mut connection: impl redis::aio::ConnectionLike,
) -> redis::RedisResult<Snapshot> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:*")
        .query_async(&mut connection)
        .await?;
    let mut dumped = Vec::new();
    for key in keys {
        let value: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut connection)
            .await?;
        dumped.push((key, value));
    }
    Ok(dumped)
}

/// `saved` restored over what Redis holds (after emptying it, with `flush`).
pub async fn restore(
    mut connection: impl redis::aio::ConnectionLike,
    saved: &[(String, Vec<u8>)],
    flush: bool,
) -> redis::RedisResult<()> {
    if flush {
        let () = redis::cmd("FLUSHALL").query_async(&mut connection).await?;
    }
    for (key, dumped) in saved {
        let () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dumped)
            .arg("REPLACE")
            .query_async(&mut connection)
            .await?;
    }
    Ok(())
}
