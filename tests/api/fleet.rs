//! Several replicas sharing one Redis, against a real
//! `redis-server` each test starts on a free port. Skipped, loudly, only
//! where the binary is absent; `.ci/run` installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use token_broker::domain::UserType;
use token_broker::simulator::Simulator;
use tokio::time::Instant;

use crate::helpers::process::{Running, command, config_file};
use crate::helpers::*;
use crate::redis_servers::RedisServer;

/// Replicas in front of one simulator, sharing one Redis.
pub struct Fleet {
    pub redis: RedisServer,
    pub sim: Simulator,
    pub upstream: SocketAddr,
    pub replicas: Vec<TestApp>,
    pub key_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// The simulated vendor a test fleet fronts, and the cache encryption key
/// file every replica of it shares.
pub struct Backdrop {
    pub sim: Simulator,
    pub upstream: SocketAddr,
    pub key_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Backdrop {
    pub async fn start() -> Self {
        let sim = simulator();
        let upstream = sim
            .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("cache-key");
        std::fs::write(&key_file, format!("{ENCRYPTION_KEY}\n")).unwrap();
        Self {
            sim,
            upstream,
            key_file,
            dir,
        }
    }
}

pub const ENCRYPTION_KEY: &str = "8d2b6b1f0c3e4a5d9e7f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";

impl Fleet {
    /// `replicas` brokers with `extra` TOML; `None` when Redis is not installed.
    pub async fn start(replicas: usize, extra: &str) -> Option<Fleet> {
        let redis = RedisServer::start().await?;
        let Backdrop {
            sim,
            upstream,
            key_file,
            dir,
        } = Backdrop::start().await;
        let mut fleet = Fleet {
            redis,
            sim,
            upstream,
            replicas: Vec::new(),
            key_file,
            _dir: dir,
        };
        for _ in 0..replicas {
            let replica = fleet.replica(extra).await;
            fleet.replicas.push(replica);
        }
        // A replica that does not hear invalidations yet shares nothing.
        fleet.subscribed().await;
        Some(fleet)
    }

    /// The `[cache]` section that points a broker at this fleet's Redis (`redis_url`).
    pub fn cache_toml(&self) -> String {
        self.cache_toml_for(&self.redis.url())
    }

    /// The `[cache]` section for a broker that reaches Redis at `url`.
    pub fn cache_toml_for(&self, url: &str) -> String {
        format!(
            "[cache]\nredis_url = \"{}\"\nencryption_key_file = {:?}\n",
            url,
            self.key_file.display().to_string()
        )
    }

    pub async fn replica(&self, extra: &str) -> TestApp {
        self.replica_via(&self.redis.url(), extra).await
    }

    /// A replica that reaches this fleet's Redis at `url` (a fault proxy, say).
    pub async fn replica_via(&self, url: &str, extra: &str) -> TestApp {
        TestApp::builder()
            .upstream(&self.sim, self.upstream)
            .config(&self.cache_toml_for(url))
            .config(extra)
            .spawn()
            .await
    }

    /// Fetches the customer once (so Redis names its keys), then leaves in
    /// Redis only a lock on it, written by hand to expire in `px`
    /// milliseconds, as a replica that died holding it would; its key.
    pub async fn only_a_lock_for_the_customer(&self, px: u64) -> String {
        token_of(
            self.replicas[0]
                .get_token(&format!("user_id={CUSTOMER_ID}"))
                .await,
        )
        .await;
        let mut redis = self.redis.connection().await.unwrap();
        let entries: Vec<String> = redis::cmd("KEYS")
            .arg("*:entry")
            .query_async(&mut redis)
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&entries)
            .query_async(&mut redis)
            .await
            .unwrap();
        let lock = entries[0].replace(":entry", ":lock");
        let _: () = redis::cmd("SET")
            .arg(&lock)
            .arg("written-by-hand")
            .arg("PX")
            .arg(px)
            .query_async(&mut redis)
            .await
            .unwrap();
        lock
    }

    /// Waits until every replica's invalidation subscription is live.
    pub async fn subscribed(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for replica in &self.replicas {
            while replica.metric("token_broker_shared_cache_subscribed").await < 1.0 {
                assert!(Instant::now() < deadline, "a replica never subscribed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Polls `replica`'s metric until it reads `value` (within 10 s).
pub async fn wait_for_metric(replica: &TestApp, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica.metric(sample).await != value {
        assert!(Instant::now() < deadline, "{sample} never reached {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn token_of(response: reqwest::Response) -> (String, String) {
    assert_eq!(response.status(), 200);
    let cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    (body["token"].as_str().unwrap().to_owned(), cache)
}

pub fn alice() -> String {
    member_query(ALICE, "AGENT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_fetched_through_one_replica_is_served_by_another_without_a_vendor_call() {
    let Some(fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    assert_eq!(
        token_of(a.get_token(&alice()).await).await,
        (ALICE_AGENT_TOKEN.into(), "miss".into())
    );
    assert_eq!(
        token_of(b.get_token(&alice()).await).await,
        (ALICE_AGENT_TOKEN.into(), "hit".into()),
        "from the shared cache"
    );
    let customer = format!("user_id={CUSTOMER_ID}");
    token_of(b.get_token(&customer).await).await;
    assert_eq!(token_of(a.get_token(&customer).await).await.1, "hit");
    assert_eq!(
        fleet.sim.calls(),
        2,
        "one vendor call per key for the fleet"
    );
    assert_eq!(b.metric("token_broker_shared_cache_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_requests_over_three_replicas_make_one_vendor_call() {
    let Some(fleet) = Fleet::start(3, "[upstream]\ntimeout = \"5s\"\n").await else {
        return;
    };
    fleet.sim.set_latency(Duration::from_millis(500));
    let answers = join_all((0..200).map(|i| {
        let replica = &fleet.replicas[i % 3];
        async move { token_of(replica.get_token(&alice()).await).await.0 }
    }))
    .await;
    assert!(
        answers.iter().all(|t| t == ALICE_AGENT_TOKEN),
        "{answers:?}"
    );
    assert_eq!(fleet.sim.calls(), 1, "exactly one vendor call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_one_replica_makes_every_replica_fetch_anew_within_a_second() {
    let Some(fleet) = Fleet::start(3, "").await else {
        return;
    };
    fleet.subscribed().await;
    for replica in &fleet.replicas {
        assert_eq!(
            token_of(replica.get_token(&alice()).await).await.0,
            ALICE_AGENT_TOKEN
        );
    }
    fleet
        .sim
        .add_team_member(ALICE, UserType::Agent, "tok-alice-rotated");
    let deleted = fleet.replicas[0]
        .delete_token_as(Some(INVALIDATOR_KEY), &alice())
        .await;
    assert_eq!(deleted.status(), 204);
    let deadline = Instant::now() + Duration::from_secs(1);
    for replica in &fleet.replicas[1..] {
        loop {
            let (token, _) = token_of(replica.get_token(&alice()).await).await;
            if token == "tok-alice-rotated" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a replica still serves the revoked token a second after DELETE"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        token_of(fleet.replicas[0].get_token(&alice()).await)
            .await
            .0,
        "tok-alice-rotated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_slow_fetch_leaves_no_old_token_in_any_cache() {
    let Some(fleet) = Fleet::start(2, "[upstream]\ntimeout = \"5s\"\n").await else {
        return;
    };
    fleet.subscribed().await;
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    fleet.sim.set_latency(Duration::from_secs(2));
    let query = alice();
    let in_flight = a.get_token(&query);
    // Sent once the fetch has reached the vendor, which holds it for 2 s.
    let delete = async {
        while fleet.sim.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b.delete_token_as(Some(INVALIDATOR_KEY), &alice()).await
    };
    let (fetched, deleted) = tokio::join!(in_flight, delete);
    assert_eq!(deleted.status(), 204);
    assert_eq!(token_of(fetched).await.0, ALICE_AGENT_TOKEN);

    fleet.sim.set_latency(Duration::ZERO);
    fleet
        .sim
        .add_team_member(ALICE, UserType::Agent, "tok-alice-after-delete");
    for replica in [a, b] {
        assert_eq!(
            token_of(replica.get_token(&alice()).await).await.0,
            "tok-alice-after-delete",
            "the answer of the fetch begun before DELETE was cached somewhere"
        );
    }
    assert_eq!(fleet.sim.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_neither_token_nor_email_and_a_moved_value_does_not_decrypt() {
    let Some(fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    token_of(a.get_token(&alice()).await).await;
    let custom = member_query(ALICE, "CUSTOM_USER");
    token_of(a.get_token(&custom).await).await;
    assert_eq!(fleet.sim.calls(), 2);

    let mut redis = fleet.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis)
        .await
        .unwrap();
    let entries: Vec<&String> = keys.iter().filter(|k| k.ends_with(":entry")).collect();
    assert_eq!(entries.len(), 2, "{keys:?}");
    for key in &keys {
        assert!(!key.contains("alice") && !key.contains("example"), "{key}");
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if kind == "string" {
            let value: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&value);
            for secret in [ALICE_AGENT_TOKEN, ALICE_CUSTOM_TOKEN, "alice", "tok-"] {
                assert!(!text.contains(secret), "{key} holds {secret}");
            }
        }
    }
    // Swap the two values: each is sealed to its own identity, so neither opens.
    let first: Vec<u8> = redis::cmd("GET")
        .arg(entries[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    let second: Vec<u8> = redis::cmd("GET")
        .arg(entries[1])
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(entries[0])
        .arg(second)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(entries[1])
        .arg(first)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        token_of(b.get_token(&alice()).await).await,
        (ALICE_AGENT_TOKEN.into(), "miss".into()),
        "a value moved to another key is not served; the vendor is asked"
    );
    assert_eq!(
        token_of(b.get_token(&custom).await).await,
        (ALICE_CUSTOM_TOKEN.into(), "miss".into())
    );
    assert_eq!(fleet.sim.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_for_the_whole_fleet() {
    let limited = format!(
        "[[clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nrate_limit_per_minute = 5\n",
        token_broker::config::KeyDigest::of_key(READER_KEY)
    );
    let Some(fleet) = Fleet::start(2, &limited).await else {
        return;
    };
    let mut admitted = 0;
    let mut limited_answers = 0;
    for i in 0..10 {
        let replica = &fleet.replicas[i % 2];
        match replica.get_token(&alice()).await.status().as_u16() {
            200 => admitted += 1,
            429 => limited_answers += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (admitted, limited_answers),
        (5, 5),
        "two replicas together admit rate_limit_per_minute, not twice it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_costs_a_request_at_most_the_redis_timeout() {
    let Some(fleet) = Fleet::start(1, "[cache]\nredis_timeout = \"300ms\"\n").await else {
        return;
    };
    let replica = &fleet.replicas[0];
    token_of(replica.get_token(&alice()).await).await;
    fleet.redis.pause();
    let started = Instant::now();
    let customer = format!("user_id={CUSTOMER_ID}");
    let (token, cache) = token_of(replica.get_token(&customer).await).await;
    assert_eq!((token.as_str(), cache.as_str()), (CUSTOMER_TOKEN, "miss"));
    // One Redis call times out; the rest of the request skips Redis. Generous
    // slack for a loaded machine, but far below a hang.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        token_of(replica.get_token(&alice()).await).await.1,
        "hit",
        "cached keys are served from memory"
    );
    assert_eq!(replica.metric("token_broker_shared_cache_up").await, 0.0);
    assert!(
        replica
            .metric("token_broker_shared_cache_operations_total{op=\"get\",result=\"timeout\"}")
            .await
            >= 1.0
    );
    fleet.redis.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_that_died_blocks_the_key_no_longer_than_the_lock_expiry() {
    let Some(fleet) = Fleet::start(1, "[upstream]\ntimeout = \"3s\"\n").await else {
        return;
    };
    // A replica took the lock of the customer key and died: it expires in 1.5 s.
    let lock = fleet.only_a_lock_for_the_customer(1500).await;
    let mut redis = fleet.redis.connection().await.unwrap();
    let other = fleet.replica("").await;
    wait_for_metric(&other, "token_broker_shared_cache_subscribed", 1.0).await;
    let (token, cache) = token_of(other.get_token(&format!("user_id={CUSTOMER_ID}")).await).await;
    assert_eq!((token.as_str(), cache.as_str()), (CUSTOMER_TOKEN, "miss"));
    assert_eq!(
        fleet.sim.calls(),
        2,
        "fetched once the dead holder's lock expired"
    );
    let held: Option<String> = redis::cmd("GET")
        .arg(&lock)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(held, None, "the new holder released its lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_replicas_keep_answering_say_so_once_and_share_again_after_restart() {
    let Some(mut fleet) = Fleet::start(0, "").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        fleet.upstream,
        &format!("{}redis_timeout = \"200ms\"\n", fleet.cache_toml()),
    );
    let start = |config: PathBuf| async move {
        let mut cmd = command();
        cmd.arg("serve").arg("--config").arg(config);
        Running::start(cmd).await
    };
    let mut a = start(config.clone()).await;
    let mut b = start(config).await;
    let http = reqwest::Client::new();
    let get = |replica: &Running, query: String| {
        http.get(format!("http://{}/v1/tokens?{query}", replica.api))
            .bearer_auth(READER_KEY)
            .send()
    };
    async fn metric(replica: &Running, name: &str) -> f64 {
        replica.metric(name).await.unwrap()
    }
    async fn subscribed(replica: &Running) -> f64 {
        metric(replica, "token_broker_shared_cache_subscribed").await
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for replica in [&a, &b] {
        while subscribed(replica).await < 1.0 {
            assert!(Instant::now() < deadline, "never subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    token_of(get(&a, alice()).await.unwrap()).await;
    assert_eq!(token_of(get(&b, alice()).await.unwrap()).await.1, "hit");

    fleet.redis.kill();
    for round in 0..5 {
        for replica in [&a, &b] {
            let started = Instant::now();
            // Its subscription died with Redis, so its entries went with it:
            // the token comes from the vendor, and is kept only briefly.
            assert_eq!(
                token_of(get(replica, alice()).await.unwrap()).await.0,
                ALICE_AGENT_TOKEN
            );
            let customer = format!("user_id=cust-{round}");
            fleet.sim.add_customer(&format!("cust-{round}"), "tok-cust");
            let response = get(replica, customer).await.unwrap();
            assert_eq!(response.status(), 200, "new keys come from the vendor");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "within upstream.timeout (1s) and a Redis timeout"
            );
        }
    }
    for replica in [&a, &b] {
        assert_eq!(metric(replica, "token_broker_shared_cache_up").await, 0.0);
        let said = replica
            .output()
            .lines()
            .filter(|l| l.contains("shared cache unreachable"))
            .count();
        assert_eq!(said, 1, "one log line per transition, not per request");
    }

    fleet.redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for replica in [&a, &b] {
        // Requests probe Redis (at most once a second while it is down).
        let mut probe = 0;
        while metric(replica, "token_broker_shared_cache_up").await < 1.0
            || subscribed(replica).await < 1.0
        {
            assert!(Instant::now() < deadline, "sharing did not resume");
            probe += 1;
            let _ = get(replica, format!("user_id=probe-{probe}")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let calls = fleet.sim.calls();
    fleet.sim.add_customer("after-restart", "tok-after-restart");
    token_of(get(&a, "user_id=after-restart".into()).await.unwrap()).await;
    assert_eq!(
        token_of(get(&b, "user_id=after-restart".into()).await.unwrap())
            .await
            .1,
        "hit",
        "shared again, without restarting the brokers"
    );
    assert_eq!(fleet.sim.calls() - calls, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revalidation_interval_holds_across_replicas() {
    let Some(fleet) = Fleet::start(2, "[cache]\nrevalidate_min_interval = \"5s\"\n").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    let no_cache = |replica: &TestApp| {
        replica
            .http
            .get(replica.url(&format!("/v1/tokens?{}", alice())))
            .bearer_auth(READER_KEY)
            .header("cache-control", "no-cache")
            .send()
    };
    token_of(a.get_token(&alice()).await).await;
    assert_eq!(
        token_of(no_cache(b).await.unwrap()).await.1,
        "hit",
        "another replica's answer, younger than the interval"
    );
    assert_eq!(fleet.sim.calls(), 1);
}
