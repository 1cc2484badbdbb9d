//! The three forms Redis can take here, behind one handle: a standalone
//! server (`cache.redis_url`), a primary behind Sentinel
//! (`cache.redis_sentinels`), or a Cluster (`cache.redis_cluster_nodes`).
//!
//! Discovery is the redis crate's own: `SentinelClient` names the current
//! primary, `ClusterClient` follows the slot map. What is added here is only
//! when to start over: a call that fails on the connection or times out
//! condemns it (its answers may never come, or come out of order), and the
//! next call makes a new one; for Sentinel that means asking the sentinels
//! again, so a primary that went away or was demoted (`READONLY`) is left.
//! Behind Sentinel, `follow_primary` (asked with every canary) also leaves a
//! primary the sentinels no longer name, before it is demoted.
//!
//! Every connection has TCP keepalive and a user timeout, so a peer that
//! vanished without a reset is noticed by the kernel too, not only by the
//! canaries.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisFuture, RedisResult, TlsMode,
    Value,
};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, RedisForm, parse_node};

/// How a Redis is reached: a command connection and subscriptions.
pub enum Nodes {
    Single(Box<SingleNodes>),
    Cluster(Box<ClusterNodes>),
}

/// One server at a time: a fixed one, or the primary Sentinel names.
pub struct SingleNodes {
    source: Source,
    /// The connection commands go to, and the server it talks to.
    current: ArcSwapOption<(ConnectionManager, ConnectionAddr)>,
    config: ConnectionManagerConfig,
}

enum Source {
    Fixed(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A Cluster: the crate's cluster connection, made on first use.
pub struct ClusterNodes {
    client: ClusterClient,
    current: ArcSwapOption<ClusterConnection>,
    making: tokio::sync::Mutex<()>,
    /// The seed nodes, where subscriptions go in turn (a `PUBLISH` reaches every node).
    seeds: Vec<ConnectionInfo>,
    next_seed: std::sync::atomic::AtomicUsize,
}

/// A command connection of any form; scripts and commands run on it.
#[derive(Clone)]
pub enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What building the handle needs besides the form.
pub struct Options {
    pub password: Option<SecretString>,
    pub tls: bool,
    pub timeout: Duration,
}

/// Keepalive probes after 1 s of silence, and a 2 s bound on unacknowledged data.
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(2);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(2))
}

impl Nodes {
    /// The handle `form` names. Connects lazily: a Redis that is down at
    /// start is not an error.
    pub fn new(form: RedisForm<'_>, options: Options) -> Result<Self, ConfigError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let tls =
            options.tls || matches!(form, RedisForm::Standalone(url) if url.scheme() == "rediss");
        if tls {
            // Both rustls users (the vendor client and this one) share the process default.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        match form {
            RedisForm::Standalone(url) => {
                let invalid = |kind| {
                    ConfigError::invalid(
                        "cache.redis_url",
                        format!("is not a usable Redis URL ({kind:?})"),
                    )
                };
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| invalid(e.kind()))?;
                let info = with_password(info, &options.password).set_tcp_settings(tcp_settings());
                let client = redis::Client::open(info).map_err(|e| invalid(e.kind()))?;
                Ok(Nodes::Single(Box::new(SingleNodes {
                    source: Source::Fixed(client),
                    current: ArcSwapOption::empty(),
                    config,
                })))
            }
            RedisForm::Sentinel { sentinels, master } => {
                let invalid = |kind| {
                    ConfigError::invalid(
                        "cache.redis_sentinels",
                        format!("cannot be used ({kind:?})"),
                    )
                };
                let addresses = sentinels
                    .iter()
                    .map(|node| address(node, options.tls))
                    .collect::<Vec<_>>();
                let mut redis_settings = redis::RedisConnectionInfo::default();
                if let Some(password) = &options.password {
                    redis_settings = redis_settings.set_password(password.expose_secret());
                }
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(redis_settings)
                    .set_tcp_settings(tcp_settings());
                if options.tls {
                    node = node.set_tls_mode(TlsMode::Secure);
                }
                let sentinel = SentinelClient::build(
                    addresses,
                    master,
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| invalid(e.kind()))?;
                Ok(Nodes::Single(Box::new(SingleNodes {
                    source: Source::Sentinel(tokio::sync::Mutex::new(sentinel)),
                    current: ArcSwapOption::empty(),
                    config,
                })))
            }
            RedisForm::Cluster(nodes) => {
                let seeds = nodes
                    .iter()
                    .map(|node| {
                        let info = address(node, options.tls)
                            .into_connection_info()
                            .expect("a parsed host:port is a connection address");
                        with_password(info, &options.password).set_tcp_settings(tcp_settings())
                    })
                    .collect::<Vec<_>>();
                let mut builder = ClusterClient::builder(seeds.clone())
                    .connection_timeout(options.timeout)
                    .response_timeout(options.timeout)
                    .retries(1)
                    .tcp_settings(tcp_settings());
                if let Some(password) = &options.password {
                    builder = builder.password(password.expose_secret());
                }
                if options.tls {
                    builder = builder.tls(TlsMode::Secure);
                }
                let client = builder.build().map_err(|e| {
                    ConfigError::invalid(
                        "cache.redis_cluster_nodes",
                        format!("cannot be used ({:?})", e.kind()),
                    )
                })?;
                Ok(Nodes::Cluster(Box::new(ClusterNodes {
                    client,
                    current: ArcSwapOption::empty(),
                    making: tokio::sync::Mutex::new(()),
                    seeds,
                    next_seed: std::sync::atomic::AtomicUsize::new(0),
                })))
            }
        }
    }

    /// The connection commands go to now, made if there is none.
    pub async fn commands(&self) -> RedisResult<Commands> {
        match self {
            Nodes::Single(single) => single.connection().await.map(Commands::Single),
            Nodes::Cluster(cluster) => cluster.connection().await.map(Commands::Cluster),
        }
    }

    /// Called with every failed call: a connection that failed on the wire,
    /// timed out or reached a demoted primary is dropped, and the next call
    /// makes a new one.
    pub fn failed(&self, error: &redis::RedisError) {
        let condemned = error.is_io_error()
            || error.is_connection_refusal()
            || error.is_connection_dropped()
            || error.is_timeout()
            || error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if !condemned {
            return;
        }
        match self {
            Nodes::Single(single) => single.current.store(None),
            Nodes::Cluster(cluster) => cluster.current.store(None),
        }
    }

    /// Behind Sentinel: asks the sentinels which server is primary now, and
    /// condemns the command connection if it talks to another. Without it,
    /// a replica keeps writing to a demoted primary until Sentinel
    /// reconfigures it (up to its 10 s poll), apart from replicas that
    /// already moved; whether `true`: it moved.
    pub async fn follow_primary(&self) -> RedisResult<bool> {
        let Nodes::Single(single) = self else {
            return Ok(false);
        };
        let Source::Sentinel(sentinel) = &single.source else {
            return Ok(false);
        };
        let primary = sentinel.lock().await.async_get_client().await?;
        let primary = primary.get_connection_info().addr();
        let moved = single
            .current
            .load()
            .as_deref()
            .is_some_and(|(_, address)| address != primary);
        if moved {
            single.current.store(None);
        }
        Ok(moved)
    }

    /// A new subscription connection: to the server, to the current
    /// primary, or to the next cluster seed in turn.
    pub async fn pubsub(&self) -> RedisResult<PubSub> {
        let client = match self {
            Nodes::Single(single) => single.client().await?,
            Nodes::Cluster(cluster) => {
                let turn = cluster
                    .next_seed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                redis::Client::open(cluster.seeds[turn % cluster.seeds.len()].clone())?
            }
        };
        client.get_async_pubsub().await
    }
}

impl SingleNodes {
    /// The server to talk to now: the fixed one, or the primary the sentinels name.
    async fn client(&self) -> RedisResult<redis::Client> {
        match &self.source {
            Source::Fixed(client) => Ok(client.clone()),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }

    async fn connection(&self) -> RedisResult<ConnectionManager> {
        if let Some(current) = self.current.load_full() {
            return Ok(current.0.clone());
        }
        let client = self.client().await?;
        let address = client.get_connection_info().addr().clone();
        let manager = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        // Several calls may race here; each gets a working manager, the last one stays.
        self.current
            .store(Some(Arc::new((manager.clone(), address))));
        Ok(manager)
    }
}

impl ClusterNodes {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        if let Some(current) = self.current.load_full() {
            return Ok(ClusterConnection::clone(&current));
        }
        let _making = self.making.lock().await;
        if let Some(current) = self.current.load_full() {
            return Ok(ClusterConnection::clone(&current));
        }
        let made = self.client.get_async_connection().await?;
        self.current.store(Some(Arc::new(made.clone())));
        Ok(made)
    }
}

impl Commands {
    /// `WAIT` for `replicas` to hold this connection's writes so far, on the
    /// node that holds `key`; the number that acknowledged within `timeout`.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Commands::Single(connection) => wait.query_async(connection).await,
            Commands::Cluster(connection) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let acknowledged = connection.route_command(wait, routing).await?;
                redis::from_redis_value(acknowledged).map_err(Into::into)
            }
        }
    }
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(connection) => connection.req_packed_command(cmd),
            Commands::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(connection) => connection.get_db(),
            Commands::Cluster(connection) => connection.get_db(),
        }
    }
}

fn address(node: &str, tls: bool) -> ConnectionAddr {
    let (host, port) = parse_node(node).expect("node addresses are checked at load");
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    }
}

fn with_password(info: ConnectionInfo, password: &Option<SecretString>) -> ConnectionInfo {
    let Some(password) = password else {
        return info;
    };
    let redis = info
        .redis_settings()
        .clone()
        .set_password(password.expose_secret());
    info.set_redis_settings(redis)
}
