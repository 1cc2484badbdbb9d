//! The soak's fleet of real processes: three brokers in front of one
//! simulated vendor, the reads and rotations they are given, the history
//! they record and its checks.

use super::*;

/// Three brokers in front of one vendor, each with the `[cache]` TOML given.
pub(super) struct Brokers {
    pub(super) sim: Simulator,
    /// Each slot's broker now, as its API and admin addresses: a new
    /// process can take a slot over.
    pub(super) slots: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    /// Every process started, for their output.
    pub(super) processes: Mutex<Vec<Running>>,
    /// Each slot's configuration, to start another process with.
    pub(super) configs: Vec<std::path::PathBuf>,
    pub(super) http: reqwest::Client,
    pub(super) epoch: Instant,
    pub(super) history: Arc<Mutex<Vec<Op>>>,
    /// Where each phase of the schedule began, and with what.
    pub(super) phases: Mutex<Vec<(Duration, String)>>,
    _dirs: (tempfile::TempDir, Vec<tempfile::TempDir>),
}

impl Brokers {
    pub(super) async fn start(cache: impl Fn(usize) -> String) -> Self {
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

    pub(super) async fn process(config: &std::path::Path) -> Running {
        let mut cmd = command();
        cmd.arg("serve").arg("--config").arg(config);
        Running::start(cmd).await
    }

    /// A new process takes slot `broker` over (the old one keeps running,
    /// unasked): it starts knowing nothing of the fleet.
    pub(super) async fn replace(&self, broker: usize) {
        let process = Self::process(&self.configs[broker]).await;
        self.slots.lock().unwrap()[broker] = (process.api, process.admin);
        self.processes.lock().unwrap().push(process);
    }

    pub(super) fn api(&self, broker: usize) -> SocketAddr {
        self.slots.lock().unwrap()[broker].0
    }

    /// A phase of the schedule begins now.
    pub(super) fn phase(&self, what: impl Into<String>) {
        let at = self.now();
        self.phases.lock().unwrap().push((at, what.into()));
    }

    pub(super) async fn metric(&self, broker: usize, name: &str) -> f64 {
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
    pub(super) fn output_tail(&self, lines: usize) -> Vec<String> {
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
    pub(super) async fn healthy(&self) {
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

    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(super) fn record(&self, op: Op) {
        self.history.lock().unwrap().push(op);
    }

    /// Reads `key` (a customer; `KEYS` is a spare one) through `broker`.
    pub(super) async fn read(&self, broker: usize, key: usize) -> Op {
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
    pub(super) async fn rotate(&self, first: usize, key: usize, version: u64) -> bool {
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
    pub(super) async fn workload(self: &Arc<Self>, seed: u64, length: Duration) {
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
    pub(super) async fn one_fetch_per_generation(&self, seed: u64) {
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
    pub(super) fn check(&self, seed: u64) {
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
    pub(super) fn check_phases(&self, seed: u64, history: &[Op]) {
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
pub(super) fn merged_phases(
    marks: &[(Duration, String)],
    end: Duration,
) -> Vec<(Duration, Duration, String)> {
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
