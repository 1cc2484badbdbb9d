//! The fleet in a test tube: seeded schedules of reads, rotations confirmed
//! by `DELETE`, and faults (messages delayed, reordered, dropped,
//! duplicated and replayed; a replica cut off; the store lost or restored
//! from an older snapshot; a replica replaced by a new process), run by
//! brokers on the in-process fleet and the paused clock, and judged by the
//! fault suite's checker (`shared::history::judge`). Once healed, every key
//! is rotated again and read on every replica at once: one vendor call.
//!
//! `SEEDS` schedules run in a plain `cargo test`, split over `PARTS` tests so
//! they share the cores. Each failure names its seed; replay one with
//! `TOKEN_BROKER_SIMULATION_SEED=<seed> cargo test --lib simulation`, and
//! run more with `TOKEN_BROKER_SIMULATION_SEEDS=<n>`.

use std::sync::Mutex as StdMutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fleet::{Replicas, Vendor, WAIT, version};
use super::*;
use crate::shared::history::{Judged, Kind, Limits, Op, judge};
use crate::shared::in_process::{CANARY_EVERY, Faults, Fleet, SETTLE};

const SEEDS: u64 = 1_000;
const PARTS: u64 = 4;
const REPLICAS: usize = 3;
const KEYS: usize = 3;
/// How long each schedule runs, on the paused clock.
const LENGTH: Duration = Duration::from_secs(10);
/// Short enough that entries expire and are refreshed ahead within a schedule.
const SIMULATED_TTL: Duration = Duration::from_secs(4);

const LIMITS: Limits = Limits {
    invalidation_bound: Duration::from_secs(2),
    longest: WAIT.saturating_add(Duration::from_secs(1)),
};

fn key(key: usize) -> Identity {
    Identity::Customer(UserId::parse(&format!("sim-{key}")).unwrap())
}

/// One schedule's world: the brokers (a replaced one takes its index), the
/// history, and the clock it counts from.
struct World {
    replicas: StdMutex<Replicas>,
    history: StdMutex<Vec<Op>>,
    /// The faults, with when each began, for whoever reads a failure.
    faults: StdMutex<Vec<(Duration, String)>>,
    origin: Instant,
}

impl World {
    fn fault(&self, what: impl Into<String>) {
        let at = Instant::now() - self.origin;
        self.faults.lock().unwrap().push((at, what.into()));
    }

    fn broker(&self, index: usize) -> Broker {
        self.replicas.lock().unwrap().brokers[index].clone()
    }

    /// `replica`'s process is replaced by a new one, which knows nothing.
    fn replace(&self, replica: usize) {
        self.fault(format!("replica {replica} replaced"));
        let mut replicas = self.replicas.lock().unwrap();
        replicas.tiers[replica].die();
        let new = replicas.add();
        replicas.tiers.swap(replica, new);
        replicas.brokers.swap(replica, new);
    }

    fn record(&self, broker: usize, key: usize, start: Instant, kind: Kind) {
        self.history.lock().unwrap().push(Op {
            broker,
            key,
            start: start - self.origin,
            end: Instant::now() - self.origin,
            kind,
        });
    }

    async fn read(&self, broker: usize, which: usize, revalidate: bool) -> Option<u64> {
        let start = Instant::now();
        let handle = self.broker(broker);
        let identity = key(which);
        let issued = if revalidate {
            handle.revalidate(&identity, &caller()).await
        } else {
            handle.lookup(&identity, &caller()).await
        };
        let (status, version, cache) = match &issued {
            Ok(issued) => (200, Some(version(issued)), Some(issued.cache.as_str())),
            Err(_) => (503, None, None),
        };
        let cache = cache.map(str::to_owned);
        let kind = Kind::Read {
            status,
            version,
            cache,
        };
        self.record(broker, which, start, kind);
        version
    }

    /// Rotates `which` at the vendor and `DELETE`s it through `first`, then
    /// the next replicas in turn, until one confirms.
    async fn rotate(&self, first: usize, which: usize) {
        let version = self.replicas.lock().unwrap().vendor.rotate(&key(which));
        for attempt in 0..REPLICAS {
            let broker = (first + attempt) % REPLICAS;
            let start = Instant::now();
            let confirmed = self.broker(broker).invalidate(&key(which)).await.is_ok();
            let status = if confirmed { 204 } else { 503 };
            self.record(broker, which, start, Kind::Delete { status, version });
            if confirmed {
                return;
            }
        }
    }
}

/// A network fault for a while: some delay, and some messages dropped,
/// duplicated or replayed.
fn faulty_network(rng: &mut StdRng) -> Faults {
    let most = Duration::from_millis(rng.random_range(1..400));
    Faults {
        delay: Duration::ZERO..=most,
        drop: rng.random_range(0.0..0.5),
        duplicate: rng.random_range(0.0..0.3),
        replay: rng.random_range(0.0..0.3),
    }
}

/// Faults for the schedule's length, one at a time, each healed after.
async fn nemesis(world: &World, seed: u64, end: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e656d);
    let mut snapshot = None;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_500))).await;
        let fleet = world.replicas.lock().unwrap().fleet.clone();
        let lasting = Duration::from_millis(rng.random_range(100..2_000));
        match rng.random_range(0..6) {
            0 | 1 => {
                let faults = faulty_network(&mut rng);
                world.fault(format!("{faults:?} for {lasting:?}"));
                fleet.set_faults(faults);
                tokio::time::sleep(lasting).await;
                fleet.set_faults(Faults::default());
            }
            2 => {
                let replica = rng.random_range(0..REPLICAS);
                world.fault(format!("replica {replica} deaf for {lasting:?}"));
                let tier = world.replicas.lock().unwrap().tiers[replica].clone();
                tier.set_deaf(true);
                tokio::time::sleep(lasting).await;
                tier.set_deaf(false);
            }
            3 => match snapshot.take() {
                None => {
                    world.fault("snapshot");
                    snapshot = Some(fleet.snapshot());
                }
                Some(older) => {
                    world.fault("restore");
                    fleet.restore(&older);
                    // Often with a new process that saw none of what was undone.
                    if rng.random_bool(0.5) {
                        world.replace(rng.random_range(0..REPLICAS));
                    }
                }
            },
            4 => {
                world.fault("store lost");
                fleet.lose();
            }
            _ => world.replace(rng.random_range(0..REPLICAS)),
        }
    }
}

/// Runs schedule `seed`; what the checker made of it.
async fn schedule(seed: u64) -> Result<Judged, String> {
    let vendor = Vendor::new(Duration::from_millis(1)..=Duration::from_millis(300), seed);
    let replicas = Replicas::new(REPLICAS, SIMULATED_TTL, Fleet::new(seed), vendor);
    tokio::time::sleep(SETTLE + CANARY_EVERY * 2).await;
    let world = Arc::new(World {
        replicas: StdMutex::new(replicas),
        history: StdMutex::default(),
        faults: StdMutex::default(),
        origin: Instant::now(),
    });
    let end = Instant::now() + LENGTH;
    let mut tasks = Vec::new();
    for reader in 0..3u64 {
        let world = world.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (reader + 1));
            while Instant::now() < end {
                let broker = rng.random_range(0..REPLICAS);
                let which = rng.random_range(0..KEYS);
                world.read(broker, which, rng.random_bool(0.05)).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
            }
        }));
    }
    let rotator = world.clone();
    tasks.push(tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0de1e7e);
        while Instant::now() < end {
            let which = rng.random_range(0..KEYS);
            rotator.rotate(rng.random_range(0..REPLICAS), which).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        }
    }));
    nemesis(&world, seed, end).await;
    for task in tasks {
        task.await.map_err(|e| format!("a task failed: {e}"))?;
    }
    let history = world.history.lock().unwrap().clone();
    let judged = judge(&history, LIMITS).map_err(|violation| {
        let faults = world.faults.lock().unwrap();
        let told: Vec<String> = faults
            .iter()
            .map(|(at, f)| format!("  at {at:.3?}: {f}"))
            .collect();
        format!("{violation}\nfaults:\n{}", told.join("\n"))
    })?;
    one_fetch_per_generation(&world).await?;
    Ok(judged)
}

/// Once healed: each key rotated, and read on every replica at once, costs
/// one vendor call.
async fn one_fetch_per_generation(world: &World) -> Result<(), String> {
    world
        .replicas
        .lock()
        .unwrap()
        .fleet
        .set_faults(Faults::default());
    // Every replica back in sync (a lost subscription takes a canary round).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for which in 0..KEYS {
        world.rotate(which % REPLICAS, which).await;
        tokio::time::sleep(LIMITS.invalidation_bound).await;
        let vendor = world.replicas.lock().unwrap().vendor.clone();
        let before = vendor.calls();
        let reads = (0..REPLICAS * 2).map(|i| world.read(i % REPLICAS, which, false));
        let versions = futures::future::join_all(reads).await;
        let made = vendor.calls() - before;
        if made != 1 || versions.iter().any(|v| *v != versions[0]) {
            return Err(format!(
                "healed: key {which} read as {versions:?} with {made} vendor calls"
            ));
        }
    }
    Ok(())
}

fn run(seed: u64) -> Result<Judged, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(schedule(seed))
}

/// Runs part `part` of the seeds (or the one seed asked for).
fn run_part(part: u64) {
    let env = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("TOKEN_BROKER_SIMULATION_SEED") {
        Some(seed) if part == 0 => vec![seed],
        Some(_) => Vec::new(),
        None => {
            let total = env("TOKEN_BROKER_SIMULATION_SEEDS").unwrap_or(SEEDS);
            (0..total).filter(|seed| seed % PARTS == part).collect()
        }
    };
    let (mut reads, mut confirmed) = (0, 0);
    for &seed in &seeds {
        match run(seed) {
            Ok(judged) => {
                assert!(
                    judged.reads > 0 && judged.confirmed > 0,
                    "seed {seed}: nothing ran"
                );
                reads += judged.reads;
                confirmed += judged.confirmed;
            }
            Err(violation) => panic!(
                "seed {seed}: {violation}\n(replay: TOKEN_BROKER_SIMULATION_SEED={seed} cargo test --lib simulation)"
            ),
        }
    }
    eprintln!(
        "simulation part {part}: {} seeds, {reads} reads, {confirmed} confirmed invalidations: no violation",
        seeds.len()
    );
}

#[test]
fn simulated_fleets_keep_every_confirmed_invalidation_part_0() {
    run_part(0);
}

#[test]
fn simulated_fleets_keep_every_confirmed_invalidation_part_1() {
    run_part(1);
}

#[test]
fn simulated_fleets_keep_every_confirmed_invalidation_part_2() {
    run_part(2);
}

#[test]
fn simulated_fleets_keep_every_confirmed_invalidation_part_3() {
    run_part(3);
}
