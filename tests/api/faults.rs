//! Fault injection in the spirit of Jepsen. Three brokers (the real binary)
//! and one simulated vendor share a Redis in one of its three forms, while a
//! seeded schedule runs reads, token rotations confirmed by `DELETE`, and
//! faults: a TCP fault proxy between each broker and Redis (pass, delay,
//! blackhole, reset, and one that passes every reply but drops published
//! messages), Redis killed and restarted, a Redis writer that sets
//! generations out of range, a publisher that replays and forges messages, a
//! restore of an older snapshot followed by a new broker process, a real
//! Sentinel failover, a Cluster node paused. A checker then reads the
//! recorded history:
//!
//! - no read that began more than 2 s after a `DELETE` answered 204 returns a
//!   token older than that rotation;
//! - every phase of the schedule (from one fault to the next, at least
//!   `MIN_PHASE` long) confirms at least one invalidation, so the first
//!   promise is never kept by confirming nothing;
//! - once healed, one vendor call per key per generation;
//! - every request is answered within `upstream.timeout` + `redis_timeout`
//!   (plus a second of slack for a shared CI machine);
//! - no broker panics.
//!
//! The soak is not part of a plain `cargo test` (a new seed each run, and
//! about a minute of real processes): `.ci/run` runs it as a step of its own,
//! `cargo test --test api faults:: -- --ignored`. The broker's cross-replica
//! logic is run by seed, reproducibly, in the in-process simulation
//! (`src/broker/tests/simulation.rs`); this suite keeps what only real
//! Redis and real sockets show.
//!
//! Each run prints its seed; `TOKEN_BROKER_FAULT_SEED=<seed>` replays it, and
//! `TOKEN_BROKER_FAULT_SECONDS=<n>` makes a longer soak (the commands are in
//! `docs/SHARED_CACHE.md`, "Fault injection").

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use token_broker::shared::history::{Kind, Limits, Op, judge};
use token_broker::simulator::Simulator;
use tokio::time::Instant;

use crate::fault_proxy::{Fault, FaultProxy};
use crate::fleet::Backdrop;
use crate::helpers::process::{Running, command, config_file};
use crate::helpers::*;
use crate::redis_servers::{
    ClusterSet, MASTER_NAME, RedisServer, SentinelSet, Snapshot, restore, snapshot,
};
use redis::aio::ConnectionLike;

/// What a nemesis does to Redis itself, besides its form's own faults: it
/// sets generations by hand, replays and forges messages, and restores an
/// older snapshot and starts a new broker (where the form allows a restore).
struct Hostile {
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    listener: tokio::task::JoinHandle<()>,
    saved: Option<(Instant, Snapshot)>,
}

impl Hostile {
    /// Listens on the invalidation channel through the server at `url`.
    fn new(url: String) -> Self {
        let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let listener = tokio::spawn(capture_messages(url, captured.clone()));
        Self {
            captured,
            listener,
            saved: None,
        }
    }

    /// One hostile event through `connection`, if `roll` (0..24) picks one:
    /// 0..8 a generation written, 8..16 a message forged, 16..24 a snapshot
    /// or its restore (when `restores`).
    async fn act(
        &mut self,
        brokers: &Brokers,
        connection: impl ConnectionLike,
        roll: u32,
        restores: bool,
        rng: &mut StdRng,
    ) {
        match roll {
            0..8 => {
                brokers.phase("a generation written by hand");
                write_a_generation(connection, rng).await;
            }
            8..16 => {
                brokers.phase("a message replayed or forged");
                publish_a_forgery(connection, &self.captured, rng).await;
            }
            _ if restores => match self.saved.take() {
                Some((at, dumped)) if at.elapsed() >= Duration::from_secs(2) => {
                    brokers.phase("an older snapshot restored, then a new broker");
                    let _ = restore(connection, &dumped, true).await;
                    brokers.replace(rng.random_range(0..BROKERS)).await;
                }
                Some(kept) => self.saved = Some(kept),
                None => {
                    let saved = snapshot(connection).await.unwrap_or_default();
                    self.saved = Some((Instant::now(), saved));
                }
            },
            _ => {}
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

const KEYS: usize = 4;
const BROKERS: usize = 3;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(1);
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// A confirmed invalidation holds everywhere within this.
const INVALIDATION_BOUND: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(1);
/// Phases shorter than this are merged with the next one.
const MIN_PHASE: Duration = Duration::from_secs(3);
/// Where the brokers publish invalidations.
const INVALIDATED: &str = "token-broker:v3:invalidated";

fn customer(key: usize) -> String {
    format!("fault-customer-{key}")
}

fn token(key: usize, version: u64) -> String {
    format!("tok-{key}-v{version}")
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
    /// Each slot's broker now, as its API and admin addresses: a new
    /// process can take a slot over.
    slots: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    /// Every process started, for their output.
    processes: Mutex<Vec<Running>>,
    /// Each slot's configuration, to start another process with.
    configs: Vec<std::path::PathBuf>,
    http: reqwest::Client,
    epoch: Instant,
    history: Arc<Mutex<Vec<Op>>>,
    /// Where each phase of the schedule began, and with what.
    phases: Mutex<Vec<(Duration, String)>>,
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
        let mut configs = Vec::new();
        for i in 0..BROKERS {
            let dir = tempfile::tempdir().unwrap();
            let extra = format!(
                "[cache]\nencryption_key_file = {:?}\nredis_timeout = \"{}ms\"\n{}",
                backdrop.key_file.display().to_string(),
                REDIS_TIMEOUT.as_millis(),
                cache(i)
            );
            let config = config_file(&dir, backdrop.upstream, &extra);
            brokers.push(Self::process(&config).await);
            configs.push(config);
            dirs.push(dir);
        }
        Self {
            sim: backdrop.sim,
            slots: Mutex::new(brokers.iter().map(|b| (b.api, b.admin)).collect()),
            processes: Mutex::new(brokers),
            configs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            epoch: Instant::now(),
            history: Arc::default(),
            phases: Mutex::default(),
            _dirs: (backdrop.dir, dirs),
        }
    }

    async fn process(config: &std::path::Path) -> Running {
        let mut cmd = command();
        cmd.arg("serve").arg("--config").arg(config);
        Running::start(cmd).await
    }

    /// A new process takes slot `broker` over (the old one keeps running,
    /// unasked): it starts knowing nothing of the fleet.
    async fn replace(&self, broker: usize) {
        let process = Self::process(&self.configs[broker]).await;
        self.slots.lock().unwrap()[broker] = (process.api, process.admin);
        self.processes.lock().unwrap().push(process);
    }

    fn api(&self, broker: usize) -> SocketAddr {
        self.slots.lock().unwrap()[broker].0
    }

    /// A phase of the schedule begins now.
    fn phase(&self, what: impl Into<String>) {
        let at = self.now();
        self.phases.lock().unwrap().push((at, what.into()));
    }

    async fn metric(&self, broker: usize, name: &str) -> f64 {
        let admin = self.slots.lock().unwrap()[broker].1;
        let Ok(response) = self
            .http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
        else {
            return f64::NAN;
        };
        let text = response.text().await.unwrap_or_default();
        sample_value(&text, name).unwrap_or(f64::NAN)
    }

    /// The last lines of every process that ever took slot `broker`'s place.
    fn output_tail(&self, lines: usize) -> Vec<String> {
        self.processes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| {
                let output = p.output();
                let tail: Vec<String> = output
                    .lines()
                    .rev()
                    .take(lines)
                    .map(str::to_owned)
                    .collect();
                tail
            })
            .collect()
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
                    let tail = self.output_tail(15);
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
            self.api(broker),
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
                self.api(broker),
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
        for (at, what) in self.phases.lock().unwrap().iter() {
            eprintln!("seed {seed}: at {at:.2?}: {what}");
        }
        let limits = Limits {
            invalidation_bound: INVALIDATION_BOUND,
            longest: UPSTREAM_TIMEOUT + REDIS_TIMEOUT + SLACK,
        };
        let judged = judge(&history, limits).unwrap_or_else(|violation| {
            panic!("seed {seed}: {violation}");
        });
        for (i, broker) in self.processes.lock().unwrap().iter().enumerate() {
            let output = broker.output();
            assert!(
                !output.contains("panicked"),
                "seed {seed}: broker process {i} panicked:\n{output}"
            );
        }
        eprintln!(
            "seed {seed}: {} reads, {} confirmed invalidations, longest request {:?}: no violation",
            judged.reads, judged.confirmed, judged.longest
        );
        assert!(
            judged.reads > 0 && judged.confirmed > 0,
            "seed {seed}: nothing ran"
        );
        self.check_phases(seed, &history);
    }

    /// Every phase confirms at least one invalidation: a promise about
    /// confirmed `DELETE`s proves nothing in a phase that confirms none.
    fn check_phases(&self, seed: u64, history: &[Op]) {
        let end = history.iter().map(|op| op.end).max().unwrap_or_default();
        let phases = merged_phases(&self.phases.lock().unwrap(), end);
        let mut starved = Vec::new();
        for (start, stop, what) in &phases {
            let within = |op: &&Op| op.end >= *start && op.end < *stop;
            let deletes: Vec<&Op> = history
                .iter()
                .filter(within)
                .filter(|op| matches!(op.kind, Kind::Delete { .. }))
                .collect();
            let confirmed = deletes
                .iter()
                .filter(|op| matches!(op.kind, Kind::Delete { status: 204, .. }))
                .count();
            let reads = history
                .iter()
                .filter(within)
                .filter(|op| matches!(op.kind, Kind::Read { .. }))
                .count();
            eprintln!(
                "seed {seed}: phase {start:.1?}..{stop:.1?} ({what}): {reads} reads, {confirmed} of {} DELETEs confirmed",
                deletes.len()
            );
            if confirmed == 0 {
                starved.push(format!("{start:.1?}..{stop:.1?} ({what})"));
            }
        }
        assert!(
            starved.is_empty(),
            "seed {seed}: phases that confirmed no invalidation: {starved:?}"
        );
    }
}

/// The schedule's phases from their starts, each at least `MIN_PHASE` long
/// (a phase shorter than that takes in the ones after it; a short last one
/// joins the one before): `(start, end, what)`.
fn merged_phases(marks: &[(Duration, String)], end: Duration) -> Vec<(Duration, Duration, String)> {
    let mut marks = marks.to_vec();
    marks.sort_by_key(|(at, _)| *at);
    let mut merged: Vec<(Duration, Duration, String)> = Vec::new();
    for (i, (at, what)) in marks.iter().enumerate() {
        let stop = marks.get(i + 1).map_or(end, |(next, _)| *next).min(end);
        match merged.last_mut() {
            Some(last) if last.1.saturating_sub(last.0) < MIN_PHASE => {
                last.1 = stop;
                last.2 = format!("{}, {what}", last.2);
            }
            _ => merged.push(((*at).min(stop), stop, what.clone())),
        }
    }
    if merged.len() > 1
        && let Some(last) = merged.last()
        && last.1.saturating_sub(last.0) < MIN_PHASE
    {
        let last = merged.pop().expect("there are two");
        let before = merged.last_mut().expect("there are two");
        before.1 = last.1;
        before.2 = format!("{}, {}", before.2, last.2);
    }
    merged
}

#[test]
fn phases_are_merged_until_each_is_long_enough() {
    let secs = Duration::from_secs_f64;
    let marks: Vec<(Duration, String)> =
        [(0.0, "a"), (1.0, "b"), (4.0, "c"), (8.0, "d"), (9.0, "e")]
            .into_iter()
            .map(|(at, what)| (secs(at), what.to_owned()))
            .collect();
    let phases = merged_phases(&marks, secs(10.0));
    assert_eq!(
        phases,
        [
            (secs(0.0), secs(4.0), "a, b".to_owned()),
            (secs(4.0), secs(10.0), "c, d, e".to_owned()),
        ]
    );
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
    brokers.phase("start");
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

/// Keeps the last messages published on the invalidation channel, for a
/// publisher to replay and forge; follows Redis through restarts.
async fn capture_messages(url: String, captured: Arc<Mutex<Vec<Vec<u8>>>>) {
    use futures::StreamExt;
    loop {
        if let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(INVALIDATED).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let mut captured = captured.lock().unwrap();
                captured.push(message.get_payload_bytes().to_vec());
                let excess = captured.len().saturating_sub(16);
                captured.drain(..excess);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Someone with write access to Redis sets a generation to a value no
/// replica wrote: beyond 64 bits, negative, garbage, zero, the largest believed.
async fn write_a_generation(mut connection: impl ConnectionLike, rng: &mut StdRng) {
    let entries: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:*:entry")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    if entries.is_empty() {
        return;
    }
    let key = entries[rng.random_range(0..entries.len())].replace(":entry", ":generation");
    let value = [
        "18446744073709551615",
        "-9223372036854775808",
        "garbage",
        "0",
        "99999999999999999",
    ][rng.random_range(0..5)];
    let _: redis::RedisResult<()> = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut connection)
        .await;
}

/// Someone who can publish replays a captured invalidation, alters one,
/// puts the old clear-text generation before one, or sends garbage.
async fn publish_a_forgery(
    mut connection: impl ConnectionLike,
    captured: &Mutex<Vec<Vec<u8>>>,
    rng: &mut StdRng,
) {
    let real = {
        let captured = captured.lock().unwrap();
        (!captured.is_empty()).then(|| captured[rng.random_range(0..captured.len())].clone())
    };
    let message = match (real, rng.random_range(0..4)) {
        (Some(real), 0) => real,
        (Some(mut real), 1) => {
            let at = rng.random_range(0..real.len());
            real[at] ^= 0x40;
            real
        }
        (Some(real), 2) => [b"18446744073709551615:".as_slice(), &real].concat(),
        _ => b"garbage".to_vec(),
    };
    let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(INVALIDATED)
        .arg(message)
        .query_async(&mut connection)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault soak, a step of its own: cargo test --test api faults:: -- --ignored"]
async fn standalone_redis_behind_faulty_links_restarts_restores_and_forgeries_keeps_every_confirmed_invalidation()
 {
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
    let mut hostile = Hostile::new(redis.url());
    let fleet = brokers.clone();
    exercise(brokers, Duration::from_secs(20), async |rng, end| {
        while Instant::now() < end {
            match rng.random_range(0..100) {
                0..10 => {
                    fleet.phase("Redis killed and restarted empty");
                    redis.kill();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                    redis.restart().await;
                }
                roll @ 10..34 => {
                    if let Some(connection) = redis.connection().await {
                        hostile.act(&fleet, connection, roll - 10, true, rng).await;
                    }
                }
                _ => {
                    let broker = rng.random_range(0..BROKERS);
                    let proxy = &proxies[broker];
                    let fault = match rng.random_range(0..4) {
                        0 => Fault::Delay(Duration::from_millis(rng.random_range(20..300))),
                        1 => Fault::Blackhole,
                        2 => Fault::DropMessages,
                        _ => Fault::Reset,
                    };
                    fleet.phase(format!("{fault:?} on broker {broker}'s link"));
                    proxy.set(fault);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
                    proxy.set(Fault::Pass);
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        }
    })
    .await;
}

/// Real Sentinel failovers, each waited out until the old primary replicates again.
async fn sentinel_failovers(min_replicas: u32) {
    let Some(set) = SentinelSet::start().await else {
        return;
    };
    let sentinels = format!(
        "redis_sentinels = [\"{}\"]\nredis_sentinel_master = \"{MASTER_NAME}\"\nredis_min_replicas = {min_replicas}\n",
        set.sentinel.address()
    );
    let brokers = Arc::new(Brokers::start(|_| sentinels.clone()).await);
    let fleet = brokers.clone();
    let mut hostile = Hostile::new(set.primary.url());
    exercise(brokers, Duration::from_secs(12), async |rng, end| {
        let mut failovers = 0;
        // Room after the last failover (about 4 s with re-attachment) to confirm some more.
        while Instant::now() + Duration::from_secs(8) < end {
            tokio::time::sleep(Duration::from_millis(rng.random_range(3000..5000))).await;
            // Now and then something hostile first, through the primary of the moment.
            // (Not before the first failover: a short run needs its room.)
            let roll = rng.random_range(0..48);
            if roll < 24
                && failovers > 0
                && let Some(connection) = set.current_primary().await.connection().await
            {
                hostile.act(&fleet, connection, roll, true, rng).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2000))).await;
            }
            // The first always; later ones only with room left to confirm after them.
            if failovers > 0 && Instant::now() + Duration::from_secs(8) > end {
                break;
            }
            fleet.phase("failover");
            set.failover().await;
            failovers += 1;
        }
        assert!(failovers >= 1, "the schedule made no failover");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault soak, a step of its own: cargo test --test api faults:: -- --ignored"]
async fn sentinel_failovers_keep_every_confirmed_invalidation_and_the_brokers_follow() {
    sentinel_failovers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault soak, a step of its own: cargo test --test api faults:: -- --ignored"]
async fn sentinel_failovers_without_min_replicas_keep_every_confirmed_invalidation() {
    sentinel_failovers(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault soak, a step of its own: cargo test --test api faults:: -- --ignored"]
async fn a_cluster_with_paused_nodes_keeps_every_confirmed_invalidation() {
    let Some(set) = ClusterSet::start().await else {
        return;
    };
    let seeds = set.seeds_toml();
    let brokers = Arc::new(Brokers::start(|_| seeds.clone()).await);
    let fleet = brokers.clone();
    let mut hostile = Hostile::new(set.nodes[0].url());
    let client = redis::cluster::ClusterClient::new(
        set.nodes.iter().map(RedisServer::url).collect::<Vec<_>>(),
    )
    .unwrap();
    exercise(brokers, Duration::from_secs(12), async |rng, end| {
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
            // Writes and forgeries; a restore of a whole Cluster is not scheduled.
            let roll = rng.random_range(0..48);
            if roll < 16
                && let Ok(connection) = client.get_async_connection().await
            {
                hostile.act(&fleet, connection, roll, false, rng).await;
                continue;
            }
            let node = &set.nodes[rng.random_range(0..set.nodes.len())];
            fleet.phase("a node paused");
            node.pause();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            node.resume();
        }
    })
    .await;
}
