//! Cross-replica cases on the in-process fleet (`shared::in_process`), on
//! tokio's paused clock: several brokers, one simulated store and network,
//! and a vendor whose tokens carry their version.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::shared::in_process::{CANARY_EVERY, Faults, Fleet, Replica, SETTLE};

/// How long a replica waits for another's fetch: `upstream.timeout`.
pub(super) const WAIT: Duration = Duration::from_secs(2);

/// A vendor whose token for a key is `v<n>`, `n` its version, rotated by
/// the test. A fetch answers the version current when it began, after a
/// delay drawn from its range.
pub(super) struct Vendor {
    versions: Mutex<HashMap<Identity, u64>>,
    delays: Mutex<(RangeInclusive<Duration>, StdRng)>,
    calls: AtomicUsize,
}

impl Vendor {
    pub(super) fn new(delay: RangeInclusive<Duration>, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            versions: Mutex::default(),
            delays: Mutex::new((delay, StdRng::seed_from_u64(seed))),
            calls: AtomicUsize::new(0),
        })
    }

    /// Every fetch from now on takes a time drawn from `delay`.
    pub(super) fn set_delay(&self, delay: RangeInclusive<Duration>) {
        self.delays.lock().unwrap().0 = delay;
    }

    /// Moves `identity` to its next version; returns it.
    pub(super) fn rotate(&self, identity: &Identity) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let version = versions.entry(identity.clone()).or_insert(1);
        *version += 1;
        *version
    }

    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenSource for Vendor {
    fn fetch<'a>(&'a self, identity: &'a Identity, _: &'a Askers) -> FetchFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let version = *self
                .versions
                .lock()
                .unwrap()
                .entry(identity.clone())
                .or_insert(1);
            let delay = {
                let mut delays = self.delays.lock().unwrap();
                let range = delays.0.clone();
                delays.1.random_range(range)
            };
            tokio::time::sleep(delay).await;
            Ok(Fetched {
                token: Token::new(format!("v{version}")),
                active: true,
            })
        })
    }
}

/// The version of an issued token.
pub(super) fn version(issued: &Issued) -> u64 {
    issued.token.expose()[1..]
        .parse()
        .expect("the vendor's tokens are v<n>")
}

/// Brokers on one in-process fleet, in front of one vendor.
pub(super) struct Replicas {
    pub(super) fleet: Fleet,
    pub(super) tiers: Vec<Replica>,
    pub(super) brokers: Vec<Broker>,
    pub(super) vendor: Arc<Vendor>,
    settings: CacheSettings,
}

impl Replicas {
    pub(super) fn new(count: usize, ttl: Duration, fleet: Fleet, vendor: Arc<Vendor>) -> Self {
        let mut replicas = Self {
            fleet,
            tiers: Vec::new(),
            brokers: Vec::new(),
            vendor,
            settings: settings(ttl, 1_000),
        };
        for _ in 0..count {
            replicas.add();
        }
        replicas
    }

    /// One more replica (a new process joining the fleet); its index.
    pub(super) fn add(&mut self) -> usize {
        let tier = self.fleet.replica(
            WAIT,
            self.settings.max_entries,
            self.settings.ttl + self.settings.stale_if_error,
        );
        let broker = Broker::with_tier(
            &self.settings,
            self.vendor.clone(),
            Arc::new(Metrics::new()),
            Arc::new(tier.clone()),
        );
        broker.listen_to_tier();
        self.tiers.push(tier);
        self.brokers.push(broker);
        self.brokers.len() - 1
    }

    /// A lookup of `identity` on `replica`, left to run.
    pub(super) fn read_in_background(
        &self,
        replica: usize,
        identity: &Identity,
    ) -> tokio::task::JoinHandle<Result<Issued, BrokerError>> {
        let (broker, identity) = (self.brokers[replica].clone(), identity.clone());
        tokio::spawn(async move { broker.lookup(&identity, &caller()).await })
    }

    /// The version `replica` serves for `identity`.
    pub(super) async fn read(&self, replica: usize, identity: &Identity) -> u64 {
        let issued = self.brokers[replica].lookup(identity, &caller()).await;
        version(&issued.expect("the vendor always answers"))
    }
}

/// Until every replica heard its first canaries and is in sync.
async fn settled() {
    tokio::time::sleep(SETTLE + CANARY_EVERY * 2).await;
}

fn customer() -> Identity {
    Identity::Customer(UserId::parse("c1").unwrap())
}

fn replicas(count: usize, delay: Duration) -> Replicas {
    Replicas::new(count, TTL, Fleet::new(7), Vendor::new(delay..=delay, 7))
}

#[tokio::test(start_paused = true)]
async fn two_replicas_missing_one_key_at_once_make_one_vendor_call() {
    let fleet = replicas(2, Duration::from_millis(100));
    settled().await;
    let id = customer();
    let (a, b) = tokio::join!(fleet.read(0, &id), fleet.read(1, &id));
    assert_eq!((a, b), (1, 1));
    assert_eq!(
        fleet.vendor.calls(),
        1,
        "the second replica waited for the first"
    );
    // A third replica finds it in the fleet.
    let mut fleet = fleet;
    let third = fleet.add();
    settled().await;
    assert_eq!(fleet.read(third, &id).await, 1);
    assert_eq!(fleet.vendor.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_while_a_fetch_is_in_flight_keeps_its_answer_out_of_every_cache() {
    let fleet = replicas(2, Duration::from_secs(1));
    settled().await;
    let id = customer();
    let first = fleet.read_in_background(0, &id);
    // The fetch has begun (with v1) and has half a second to go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fleet.vendor.calls(), 1);
    fleet.vendor.rotate(&id);
    assert_eq!(fleet.brokers[1].invalidate(&id).await, Ok(()));
    assert_eq!(version(&first.await.unwrap().unwrap()), 1, "begun before");
    fleet.vendor.set_delay(Duration::ZERO..=Duration::ZERO);
    for replica in 0..2 {
        assert_eq!(fleet.read(replica, &id).await, 2, "replica {replica}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_invalidation_message_is_noticed_by_its_sequence_and_the_entry_dropped() {
    let fleet = replicas(2, Duration::from_millis(10));
    settled().await;
    let id = customer();
    assert_eq!(fleet.read(0, &id).await, 1);
    fleet.vendor.rotate(&id);
    // The invalidation's message reaches nobody.
    fleet.fleet.set_faults(Faults {
        drop: 1.0,
        ..Faults::default()
    });
    assert_eq!(fleet.brokers[1].invalidate(&id).await, Ok(()));
    fleet.fleet.set_faults(Faults::default());
    assert_eq!(fleet.read(0, &id).await, 1, "the message was lost");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.read(0, &id).await, 2, "noticed within the bound");
}

#[tokio::test(start_paused = true)]
async fn a_restored_store_brings_no_invalidated_token_back_even_to_a_new_replica() {
    let mut fleet = replicas(2, Duration::from_millis(10));
    settled().await;
    let id = customer();
    assert_eq!(fleet.read(0, &id).await, 1);
    let before = fleet.fleet.snapshot();
    fleet.vendor.rotate(&id);
    assert_eq!(fleet.brokers[1].invalidate(&id).await, Ok(()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A backup from before the invalidation comes back, v1 and all.
    fleet.fleet.restore(&before);
    let third = fleet.add();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The new replica first: nothing has put the key's generation right yet.
    for replica in [third, 0, 1] {
        assert_eq!(fleet.read(replica, &id).await, 2, "replica {replica}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_lock_holder_costs_a_wait_of_the_upstream_timeout_then_a_fetch() {
    let fleet = replicas(2, Duration::from_secs(60));
    settled().await;
    let id = customer();
    let hung = fleet.read_in_background(0, &id);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Replica 0 holds the lock, and dies with it.
    fleet.tiers[0].die();
    fleet.vendor.set_delay(Duration::ZERO..=Duration::ZERO);
    let began = Instant::now();
    assert_eq!(fleet.read(1, &id).await, 1);
    let waited = began.elapsed();
    assert!(
        waited >= WAIT && waited < WAIT + CANARY_EVERY,
        "waited {waited:?}: the lock's holder for the whole wait, then fetched"
    );
    assert_eq!(fleet.vendor.calls(), 2);
    hung.abort();
}
