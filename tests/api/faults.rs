//! Fault injection in the spirit of Jepsen. Three brokers (the real binary)
//! and one simulated vendor share a Redis in one of its three forms, while a
//! seeded schedule runs reads, token rotations confirmed by `DELETE`, and
//! faults: a TCP fault proxy between each broker and Redis (pass, delay,
//! blackhole, reset), Redis killed and restarted, a real Sentinel failover,
//! a Cluster node paused. A checker then reads the recorded history:
//!
//! - no read that began more than 2 s after a `DELETE` answered 204 returns a
//!   token older than that rotation;
//! - once healed, one vendor call per key per generation;
//! - every request is answered within `upstream.timeout` + `redis_timeout`
//!   (plus a second of slack for a shared CI machine);
//! - no broker panics.
//!
//! Each run prints its seed; `TOKEN_BROKER_FAULT_SEED=<seed>` replays it, and
//! `TOKEN_BROKER_FAULT_SECONDS=<n>` makes a longer soak (the commands are in
//! `docs/SHARED_CACHE.md`, "Fault injection").

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use token_broker::simulator::Simulator;
use tokio::time::Instant;

use crate::fault_proxy::{Fault, FaultProxy};
use crate::fleet::Backdrop;
use crate::helpers::process::{Running, command, config_file};
use crate::helpers::*;
use crate::redis_servers::{ClusterSet, MASTER_NAME, RedisServer, SentinelSet};

const KEYS: usize = 4;
const BROKERS: usize = 3;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(1);
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// A confirmed invalidation holds everywhere within this.
const INVALIDATION_BOUND: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(1);

fn customer(key: usize) -> String {
    format!("fault-customer-{key}")
}

fn token(key: usize, version: u64) -> String {
    format!("tok-{key}-v{version}")
}

/// What happened, in the order the client saw it.
#[derive(Debug, Clone)]
enum Kind {
    Read {
        status: u16,
        version: Option<u64>,
        /// `X-Cache`: where the answer came from.
        cache: Option<String>,
    },
    Delete {
        status: u16,
        version: u64,
    },
}

#[derive(Debug, Clone)]
struct Op {
    broker: usize,
    key: usize,
    start: Duration,
    end: Duration,
    kind: Kind,
}

/// The seed of this run: given, or drawn (and printed either way).
fn seed() -> u64 {
    let seed = std::env::var("TOKEN_BROKER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault schedule seed: {seed} (replay with TOKEN_BROKER_FAULT_SEED={seed})");
    seed
}

fn run_for(short: Duration) -> Duration {
    std::env::var("TOKEN_BROKER_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(short)
}

/// Three brokers in front of one vendor, each with the `[cache]` TOML given.
struct Brokers {
    sim: Simulator,
    brokers: Vec<Running>,
    http: reqwest::Client,
    epoch: Instant,
    history: Arc<Mutex<Vec<Op>>>,
    _dirs: (tempfile::TempDir, Vec<tempfile::TempDir>),
}

impl Brokers {
    async fn start(cache: impl Fn(usize) -> String) -> Self {
        let backdrop = Backdrop::start().await;
        // `KEYS` itself is a spare key the checks of health read.
        for key in 0..=KEYS {
            backdrop.sim.add_customer(&customer(key), &token(key, 0));
        }
        let mut brokers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..BROKERS {
            let dir = tempfile::tempdir().unwrap();
            let extra = format!(
                "[cache]\nencryption_key_file = {:?}\nredis_timeout = \"{}ms\"\n{}",
                backdrop.key_file.display().to_string(),
                REDIS_TIMEOUT.as_millis(),
                cache(i)
            );
            let mut cmd = command();
            cmd.arg("serve")
                .arg("--config")
                .arg(config_file(&dir, backdrop.upstream, &extra));
            brokers.push(Running::start(cmd).await);
            dirs.push(dir);
        }
        Self {
            sim: backdrop.sim,
            brokers,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            epoch: Instant::now(),
            history: Arc::default(),
            _dirs: (backdrop.dir, dirs),
        }
    }

    async fn metric(&self, broker: usize, name: &str) -> f64 {
        self.brokers[broker].metric(name).await.unwrap_or(f64::NAN)
    }

    /// Waits until every broker hears invalidations and reaches Redis.
    async fn healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for broker in 0..BROKERS {
            loop {
                // A read makes a broker that saw Redis down probe it again.
                let _ = self.read(broker, KEYS).await;
                if self
                    .metric(broker, "token_broker_shared_cache_subscribed")
                    .await
                    == 1.0
                    && self.metric(broker, "token_broker_shared_cache_up").await == 1.0
                {
                    break;
                }
                if Instant::now() >= deadline {
                    let output = self.brokers[broker].output();
                    let tail: Vec<&str> = output.lines().rev().take(15).collect();
                    panic!(
                        "broker {broker} never healed: subscribed {}, up {}; last lines: {tail:#?}",
                        self.metric(broker, "token_broker_shared_cache_subscribed")
                            .await,
                        self.metric(broker, "token_broker_shared_cache_up").await,
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn record(&self, op: Op) {
        self.history.lock().unwrap().push(op);
    }

    /// Reads `key` (a customer; `KEYS` is a spare one) through `broker`.
    async fn read(&self, broker: usize, key: usize) -> Op {
        let start = self.now();
        let url = format!(
            "http://{}/v1/tokens?user_id={}",
            self.brokers[broker].api,
            customer(key)
        );
        let response = self.http.get(url).bearer_auth(READER_KEY).send().await;
        let (status, version, cache) = match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let cache = response
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let version = body["token"]
                    .as_str()
                    .and_then(|t| t.rsplit_once("-v"))
                    .and_then(|(_, v)| v.parse().ok());
                (status, version, cache)
            }
            Err(_) => (0, None, None),
        };
        Op {
            broker,
            key,
            start,
            end: self.now(),
            kind: Kind::Read {
                status,
                version,
                cache,
            },
        }
    }

    /// Rotates `key` to `version` at the vendor, then `DELETE`s it until a
    /// 204 (as a caller is told to), for at most 3 s: first through
    /// `broker`, then through the next ones in turn, as retries through a
    /// Service would land.
    async fn rotate(&self, first: usize, key: usize, version: u64) -> bool {
        self.sim.add_customer(&customer(key), &token(key, version));
        let deadline = Instant::now() + Duration::from_secs(3);
        for attempt in 0.. {
            let broker = (first + attempt) % BROKERS;
            let start = self.now();
            let url = format!(
                "http://{}/v1/tokens?user_id={}",
                self.brokers[broker].api,
                customer(key)
            );
            let status = match self
                .http
                .delete(url)
                .bearer_auth(INVALIDATOR_KEY)
                .send()
                .await
            {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            };
            self.record(Op {
                broker,
                key,
                start,
                end: self.now(),
                kind: Kind::Delete { status, version },
            });
            if status == 204 || Instant::now() >= deadline {
                return status == 204;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unreachable!("the loop returns at its deadline")
    }

    /// Runs readers and rotations for `length`, while `nemesis` injects faults.
    async fn workload(self: &Arc<Self>, seed: u64, length: Duration) {
        let end = Instant::now() + length;
        let mut tasks = Vec::new();
        for reader in 0..4u64 {
            let brokers = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (reader + 1));
                while Instant::now() < end {
                    let op = brokers
                        .read(rng.random_range(0..BROKERS), rng.random_range(0..KEYS))
                        .await;
                    brokers.record(op);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
                }
            }));
        }
        let brokers = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0xde1e7e);
            let mut versions = [0u64; KEYS];
            while Instant::now() < end {
                let key = rng.random_range(0..KEYS);
                versions[key] += 1;
                brokers
                    .rotate(rng.random_range(0..BROKERS), key, versions[key])
                    .await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
            }
        }));
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// After healing: every key rotated once more, then read concurrently on
    /// every broker: one vendor call per key for the fleet.
    async fn one_fetch_per_generation(&self, seed: u64) {
        self.healthy().await;
        let version = |key: usize| 1_000 + key as u64;
        for key in 0..KEYS {
            // A healed fleet confirms (with Sentinel, once the old primary
            // has rejoined as a replica for redis_min_replicas).
            let deadline = Instant::now() + Duration::from_secs(30);
            while !self.rotate(key % BROKERS, key, version(key)).await {
                assert!(
                    Instant::now() < deadline,
                    "seed {seed}: a healed fleet never confirmed a DELETE"
                );
            }
        }
        // The invalidations reach every replica within the bound.
        tokio::time::sleep(INVALIDATION_BOUND).await;
        for key in 0..KEYS {
            // Nothing else asks the vendor now, so its exact call counter is
            // this key's (its request log keeps only the latest requests).
            let before = self.sim.calls();
            let reads =
                futures::future::join_all((0..BROKERS * 4).map(|i| self.read(i % BROKERS, key)))
                    .await;
            for read in &reads {
                assert!(
                    matches!(read.kind, Kind::Read { status: 200, version: Some(v), .. } if v == version(key)),
                    "seed {seed}: a healed fleet answered {read:?}"
                );
            }
            let made = self.sim.calls() - before;
            // Whose flight asked the vendor (`X-Cache: miss`): one broker's.
            let fetching: std::collections::BTreeSet<usize> = reads
                .iter()
                .filter(|r| matches!(&r.kind, Kind::Read { cache: Some(c), .. } if c == "miss"))
                .map(|r| r.broker)
                .collect();
            if made != 1 || fetching.len() != 1 {
                for read in &reads {
                    eprintln!("seed {seed}: key {key}: {read:?}");
                }
                // What each broker saw, to tell a fault of ours from a replica
                // that (rightly) went alone because Redis looked down to it.
                for broker in 0..BROKERS {
                    let mut seen = Vec::new();
                    for name in [
                        "token_broker_shared_cache_up",
                        "token_broker_shared_cache_subscribed",
                        "token_broker_shared_cache_subscription_losses_total",
                        r#"token_broker_shared_cache_values_refused_total{reason="stale_generation"}"#,
                        r#"token_broker_shared_cache_operations_total{op="claim",result="timeout"}"#,
                        r#"token_broker_shared_cache_operations_total{op="get",result="timeout"}"#,
                    ] {
                        seen.push(format!("{name} {}", self.metric(broker, name).await));
                    }
                    eprintln!("seed {seed}: broker {broker}: {seen:?}");
                }
            }
            assert_eq!(
                (made, fetching.len()),
                (1, 1),
                "seed {seed}: one vendor call, by one broker, per key per generation while Redis is healthy (key {key})"
            );
        }
    }

    /// The checker: reads against confirmed invalidations, bounds, panics.
    fn check(&self, seed: u64) {
        let history = self.history.lock().unwrap().clone();
        let confirmed: Vec<(usize, u64, Duration)> = history
            .iter()
            .filter_map(|op| match op.kind {
                Kind::Delete {
                    status: 204,
                    version,
                } => Some((op.key, version, op.end)),
                _ => None,
            })
            .collect();
        let bound = UPSTREAM_TIMEOUT + REDIS_TIMEOUT + SLACK;
        let mut reads = 0;
        let mut longest = Duration::ZERO;
        for op in &history {
            let took = op.end - op.start;
            longest = longest.max(took);
            assert!(took <= bound, "seed {seed}: {op:?} took {took:?}");
            match op.kind {
                Kind::Read {
                    status, version, ..
                } => {
                    reads += 1;
                    assert_eq!(status, 200, "seed {seed}: {op:?}");
                    let version = version.expect("a 200 carries a token");
                    for &(key, rotated_to, at) in &confirmed {
                        assert!(
                            !(key == op.key
                                && version < rotated_to
                                && op.start > at + INVALIDATION_BOUND),
                            "seed {seed}: broker {} served v{version} of key {key} {:?} after the DELETE for v{rotated_to} was confirmed",
                            op.broker,
                            op.start - at
                        );
                    }
                }
                Kind::Delete { status, .. } => {
                    assert!(matches!(status, 204 | 503), "seed {seed}: {op:?}");
                }
            }
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let output = broker.output();
            assert!(
                !output.contains("panicked"),
                "seed {seed}: broker {i} panicked:\n{output}"
            );
        }
        eprintln!(
            "seed {seed}: {reads} reads, {} confirmed invalidations, longest request {longest:?}: no violation",
            confirmed.len()
        );
        assert!(
            reads > 0 && !confirmed.is_empty(),
            "seed {seed}: nothing ran"
        );
    }
}

/// Runs the workload for the schedule's length while `nemesis` injects
/// faults until the given end, then checks the history and the healed fleet.
async fn exercise(
    brokers: Arc<Brokers>,
    short: Duration,
    mut nemesis: impl AsyncFnMut(&mut StdRng, Instant),
) {
    brokers.healthy().await;
    let seed = seed();
    let length = run_for(short);
    let workload = {
        let brokers = brokers.clone();
        tokio::spawn(async move { brokers.workload(seed, length).await })
    };
    let mut rng = StdRng::seed_from_u64(seed);
    nemesis(&mut rng, Instant::now() + length).await;
    workload.await.unwrap();
    brokers.check(seed);
    brokers.one_fetch_per_generation(seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_behind_faulty_links_and_restarts_keeps_every_confirmed_invalidation() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let target: SocketAddr = redis.address().parse().unwrap();
    let mut proxies = Vec::new();
    for _ in 0..BROKERS {
        proxies.push(FaultProxy::start(target).await);
    }
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("redis://{}", p.addr))
        .collect();
    let brokers = Arc::new(Brokers::start(|i| format!("redis_url = \"{}\"\n", urls[i])).await);
    exercise(brokers, Duration::from_secs(20), async |rng, end| {
        while Instant::now() < end {
            if rng.random_bool(0.1) {
                redis.kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                redis.restart().await;
            } else {
                let proxy = &proxies[rng.random_range(0..BROKERS)];
                proxy.set(match rng.random_range(0..3) {
                    0 => Fault::Delay(Duration::from_millis(rng.random_range(20..300))),
                    1 => Fault::Blackhole,
                    _ => Fault::Reset,
                });
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
                proxy.set(Fault::Pass);
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failovers_keep_every_confirmed_invalidation_and_the_brokers_follow() {
    let Some(set) = SentinelSet::start().await else {
        return;
    };
    let sentinels = format!(
        "redis_sentinels = [\"{}\"]\nredis_sentinel_master = \"{MASTER_NAME}\"\nredis_min_replicas = 1\n",
        set.sentinel.address()
    );
    let brokers = Arc::new(Brokers::start(|_| sentinels.clone()).await);
    exercise(brokers, Duration::from_secs(12), async |rng, end| {
        let mut failovers = 0;
        while Instant::now() + Duration::from_secs(3) < end {
            tokio::time::sleep(Duration::from_millis(rng.random_range(2000..4000))).await;
            set.failover().await;
            failovers += 1;
        }
        assert!(failovers >= 1, "the schedule made no failover");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_paused_nodes_keeps_every_confirmed_invalidation() {
    let Some(set) = ClusterSet::start().await else {
        return;
    };
    let seeds = set.seeds_toml();
    let brokers = Arc::new(Brokers::start(|_| seeds.clone()).await);
    exercise(brokers, Duration::from_secs(12), async |rng, end| {
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
            let node = &set.nodes[rng.random_range(0..set.nodes.len())];
            node.pause();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            node.resume();
        }
    })
    .await;
}
