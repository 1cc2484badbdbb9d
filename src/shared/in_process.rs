//! The fleet in one process: several replicas' tiers sharing one simulated
//! store, on tokio's clock, so the broker's cross-replica logic runs on the
//! paused clock, thousands of seeded schedules a second.
//!
//! It keeps the Redis tier's protocol with nothing of Redis: per identity a
//! value, a generation and a fetch lock; the fleet's epoch and invalidation
//! sequence; invalidation, epoch, "filled" and canary messages. What a
//! replica knows of the fleet is the same `FleetView` the Redis tier keeps,
//! and it judges what it reads by the same rules: a value must be of the
//! fleet's epoch and of its key's generation, and not below an invalidation
//! this replica saw; a store showing less than the replica knew is a
//! rollback, and the epoch is raised past it.
//!
//! What the Redis tier cannot be made to do on demand, this one can
//! (`Faults`, `Fleet::restore`, `Fleet::lose`, `Replica::die`): delay, drop,
//! duplicate and replay messages (different delays reorder them), cut one
//! replica off, lose or restore the store, and kill a replica that holds a
//! lock. Its random choices come from the seed the fleet was made with.
//! Values are not sealed: no test here is about a hostile writer.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet_view::{Counters, FleetView, Seen};
use super::protocol::{self, Claim, HeldLock, LockedStore, Waiting};
use super::{Event, EventSink, Fill, NotShared, Publish, SharedTier, Stored, TierFuture};
use crate::domain::Identity;
use crate::remembered::{Lowest, Remembered};

/// How often a replica reads the fleet's counters and sends itself a canary.
pub const CANARY_EVERY: Duration = Duration::from_millis(250);
/// A replica that hears no canary of its own for this long is deaf.
pub const SILENCE_LIMIT: Duration = Duration::from_millis(1250);
/// A process trusts the store only this long after its first canary came
/// back: by then a replica that saw an invalidation a restore undid has
/// raised the epoch (as the Redis tier's `SETTLE`).
pub const SETTLE: Duration = Duration::from_millis(1250);
/// How long an announced invalidation may take to be heard.
pub const MISSED_GRACE: Duration = Duration::from_millis(750);
/// How often a waiter looks again when no "filled" message came.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// What the network does to messages, changed while the fleet runs.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Each delivery waits a time drawn from this range: different delays reorder.
    pub delay: RangeInclusive<Duration>,
    /// The chance that a message to a replica is lost.
    pub drop: f64,
    /// The chance that a message to a replica comes twice.
    pub duplicate: f64,
    /// The chance that an earlier message comes again along with one.
    pub replay: f64,
}

impl Default for Faults {
    /// A network that delivers everything once, within 2 ms.
    fn default() -> Self {
        Self {
            delay: Duration::ZERO..=Duration::from_millis(2),
            drop: 0.0,
            duplicate: 0.0,
            replay: 0.0,
        }
    }
}

/// The store, shared by every replica: what Redis holds in the Redis tier.
#[derive(Debug, Clone, Default)]
struct Store {
    values: HashMap<Identity, Value>,
    generations: HashMap<Identity, u64>,
    locks: HashMap<Identity, Lock>,
    epoch: u64,
    sequence: u64,
    /// The tip the last advance named itself with.
    tip: u64,
}

impl Store {
    /// The fleet's counters as a read of them shows them.
    fn counters(&self) -> Counters {
        Counters {
            epoch: Some(self.epoch),
            sequence: Some(self.sequence),
            tip: Some(self.tip),
        }
    }
}

#[derive(Debug, Clone)]
struct Value {
    stored: Stored,
    /// When it was stored, on tokio's clock: its age moves with that clock.
    at: Instant,
    until: Instant,
    epoch: u64,
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Lock {
    owner: u64,
    until: Instant,
}

/// The store as it was once, to be restored.
#[derive(Debug, Clone)]
pub struct Snapshot(Store);

#[derive(Debug, Clone)]
enum Message {
    Invalidated {
        identity: Identity,
        generation: u64,
        sequence: u64,
    },
    Epoch {
        epoch: u64,
        sequence: u64,
    },
    /// A lock was released: waiters look again.
    Filled,
    Canary {
        count: u64,
    },
}

struct Shared {
    store: Mutex<Store>,
    replicas: Mutex<Vec<Weak<Inner>>>,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    /// Messages sent so far (the last 64), for replays.
    sent: Mutex<Vec<Message>>,
    owners: AtomicU64,
    /// The generation clock's origin: a new generation is at least the time
    /// since, as Redis's own clock makes it.
    origin: Instant,
}

/// The fleet: a store and a network that replicas share. Clones share it.
#[derive(Clone)]
pub struct Fleet(Arc<Shared>);

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// An empty fleet whose random choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Shared {
            store: Mutex::default(),
            replicas: Mutex::default(),
            faults: Mutex::default(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            sent: Mutex::default(),
            owners: AtomicU64::new(0),
            origin: Instant::now(),
        }))
    }

    /// A new replica's tier. `wait` bounds a wait for another replica's
    /// fetch (`upstream.timeout`); `max_entries` and `memory` bound what it
    /// remembers of invalidations, as `cache.max_entries` and `ttl +
    /// stale_if_error` do.
    pub fn replica(&self, wait: Duration, max_entries: u64, memory: Duration) -> Replica {
        let inner = Arc::new(Inner {
            fleet: self.clone(),
            wait,
            lock_ttl: wait + Duration::from_secs(1),
            invalidated: Remembered::new(max_entries, memory),
            view: FleetView::default(),
            in_sync: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            deaf: AtomicBool::new(false),
            filled: Notify::new(),
            canaries_sent: AtomicU64::new(0),
            canaries_heard: AtomicU64::new(0),
            settled: OnceLock::new(),
            sink: OnceLock::new(),
        });
        locked(&self.0.replicas).push(Arc::downgrade(&inner));
        Replica(inner)
    }

    /// What the network does from now on.
    pub fn set_faults(&self, faults: Faults) {
        *locked(&self.0.faults) = faults;
    }

    /// The store as it is now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(locked(&self.0.store).clone())
    }

    /// Puts the store back as `snapshot` had it (a restored backup, a
    /// failover to a replica that lagged); locks are not restored.
    pub fn restore(&self, snapshot: &Snapshot) {
        let mut store = locked(&self.0.store);
        let locks = std::mem::take(&mut store.locks);
        *store = snapshot.0.clone();
        store.locks = locks;
    }

    /// Loses everything the store held (a restart without persistence).
    pub fn lose(&self) {
        *locked(&self.0.store) = Store::default();
    }

    fn random<T>(&self, draw: impl FnOnce(&mut StdRng) -> T) -> T {
        draw(&mut locked(&self.0.rng))
    }

    /// A generation above `current` and `lowest`, and at least the clock.
    fn next_generation(&self, current: u64, lowest: u64) -> u64 {
        let clock = u64::try_from(self.0.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        let current = current.max(lowest);
        if current < clock { clock } else { current + 1 }
    }

    /// Sends `message` to every replica (`only`: to one), through the faults.
    fn publish(&self, message: Message, only: Option<&Arc<Inner>>) {
        let replicas: Vec<Arc<Inner>> = match only {
            Some(replica) => vec![replica.clone()],
            None => locked(&self.0.replicas)
                .iter()
                .filter_map(Weak::upgrade)
                .collect(),
        };
        let faults = locked(&self.0.faults).clone();
        for replica in replicas {
            let mut deliveries = Vec::new();
            self.random(|rng| {
                if !rng.random_bool(faults.drop) {
                    deliveries.push(message.clone());
                }
                if rng.random_bool(faults.duplicate) {
                    deliveries.push(message.clone());
                }
            });
            if self.random(|rng| rng.random_bool(faults.replay)) {
                let sent = locked(&self.0.sent);
                if !sent.is_empty() {
                    let old = self.random(|rng| rng.random_range(0..sent.len()));
                    deliveries.push(sent[old].clone());
                }
            }
            for delivery in deliveries {
                let delay = self.random(|rng| rng.random_range(faults.delay.clone()));
                let replica = Replica(replica.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    replica.receive(delivery);
                });
            }
        }
        if !matches!(message, Message::Canary { .. }) {
            let mut sent = locked(&self.0.sent);
            if sent.len() == 64 {
                sent.remove(0);
            }
            sent.push(message);
        }
    }
}

struct Inner {
    fleet: Fleet,
    wait: Duration,
    lock_ttl: Duration,
    invalidated: Remembered,
    view: FleetView,
    in_sync: AtomicBool,
    dead: AtomicBool,
    deaf: AtomicBool,
    filled: Notify,
    canaries_sent: AtomicU64,
    canaries_heard: AtomicU64,
    /// `SETTLE` after the first canary came back.
    settled: OnceLock<Instant>,
    sink: OnceLock<EventSink>,
}

/// One replica's tier in the in-process fleet.
#[derive(Clone)]
pub struct Replica(Arc<Inner>);

impl Replica {
    /// The replica's process dies: it sends and hears nothing more, and
    /// the locks it holds stay taken until they expire.
    pub fn die(&self) {
        self.0.dead.store(true, Ordering::Release);
        self.0.in_sync.store(false, Ordering::Release);
    }

    /// Cuts the replica off from every message (`true`), or heals it.
    pub fn set_deaf(&self, deaf: bool) {
        self.0.deaf.store(deaf, Ordering::Release);
    }

    fn dead(&self) -> bool {
        self.0.dead.load(Ordering::Acquire)
    }

    fn emit(&self, event: Event) {
        if let Some(sink) = self.0.sink.get() {
            sink(event);
        }
    }

    /// What the store holds for `identity`, if this replica may believe it.
    fn get(&self, identity: &Identity) -> Option<Stored> {
        let lowest = self.0.invalidated.get(identity);
        let (value, generation) = {
            let store = locked(&self.0.fleet.0.store);
            let generation = store.generations.get(identity).copied().unwrap_or(0);
            (store.values.get(identity).cloned(), generation)
        };
        if let Lowest::Exact(lowest) = lowest
            && generation < lowest
        {
            self.raise_epoch();
        }
        self.accept(value?, generation, lowest)
    }

    /// `value`, if it is of the fleet's epoch and its key's `generation`, and
    /// not below `lowest`; aged by tokio's clock since it was stored.
    fn accept(&self, value: Value, generation: u64, lowest: Lowest) -> Option<Stored> {
        let now = Instant::now();
        let believed = now < value.until
            && value.epoch == self.0.view.epoch()
            && value.generation == generation
            && value.generation >= lowest.value();
        let mut stored = value.stored;
        stored.fetched_at = stored
            .fetched_at
            .checked_sub(now - value.at)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        believed.then_some(stored)
    }

    /// Takes the fetch lock of `identity` if it is free.
    fn claim_lock(&self, identity: &Identity) -> Claim<FetchLock> {
        let lowest = self.0.invalidated.get(identity);
        let epoch = self.0.view.epoch();
        let now = Instant::now();
        let (taken, value, generation, below) = {
            let mut store = locked(&self.0.fleet.0.store);
            let mut generation = store.generations.get(identity).copied().unwrap_or(0);
            let below = generation < lowest.value();
            if below {
                generation = lowest.value();
                store.generations.insert(identity.clone(), generation);
            }
            let free = store
                .locks
                .get(identity)
                .is_none_or(|lock| lock.until <= now);
            let taken = free.then(|| {
                let owner = self.0.fleet.0.owners.fetch_add(1, Ordering::AcqRel);
                let until = now + self.0.lock_ttl;
                store.locks.insert(identity.clone(), Lock { owner, until });
                owner
            });
            (
                taken,
                store.values.get(identity).cloned(),
                generation,
                below,
            )
        };
        if below && matches!(lowest, Lowest::Exact(_)) {
            self.raise_epoch();
        }
        let current = value.and_then(|value| self.accept(value, generation, lowest));
        match taken {
            Some(owner) => Claim::Ours {
                current,
                lock: FetchLock {
                    replica: self.clone(),
                    identity: identity.clone(),
                    owner,
                    epoch,
                    generation,
                    released: false,
                },
            },
            None => Claim::Theirs(current),
        }
    }

    fn invalidate_shared(&self, identity: &Identity) -> Result<(), NotShared> {
        if self.dead() {
            return Err(NotShared);
        }
        let sequence = self.advance();
        let lowest = self.0.invalidated.get(identity).value();
        let generation = {
            let mut store = locked(&self.0.fleet.0.store);
            store.values.remove(identity);
            let current = store.generations.get(identity).copied().unwrap_or(0);
            let generation = self.0.fleet.next_generation(current, lowest);
            store.generations.insert(identity.clone(), generation);
            generation
        };
        self.0.invalidated.raise(identity, generation);
        self.0.fleet.publish(
            Message::Invalidated {
                identity: identity.clone(),
                generation,
                sequence,
            },
            None,
        );
        Ok(())
    }

    /// Advances the fleet's sequence for an invalidation, under a fresh
    /// tip; a rollback it shows raises the epoch, and the sequence is
    /// advanced again in the new one.
    fn advance(&self) -> u64 {
        loop {
            let known = self.0.view.known();
            let read = {
                let mut store = locked(&self.0.fleet.0.store);
                store.sequence += 1;
                store.tip = self.0.fleet.0.owners.fetch_add(1, Ordering::AcqRel) + 1;
                store.counters()
            };
            if !self.saw(self.0.view.see_advanced(known, read)) {
                return read.sequence.unwrap_or_default();
            }
        }
    }

    /// Acts on what a read of the counters showed: news of a raised epoch
    /// drops every local entry, a rollback raises the epoch past it.
    /// Whether it was a rollback.
    fn saw(&self, seen: Seen) -> bool {
        match seen {
            Seen::AsKnown => false,
            Seen::Raised => {
                self.emit(Event::Lost);
                false
            }
            Seen::RolledBack => {
                self.raise_epoch();
                true
            }
        }
    }

    /// The store shows less than this replica knew: raise the epoch past
    /// both, drop every local entry, and tell the others.
    fn raise_epoch(&self) {
        let (epoch, sequence) = {
            let mut store = locked(&self.0.fleet.0.store);
            store.epoch = store.epoch.max(self.0.view.epoch()) + 1;
            store.sequence = store.sequence.max(self.0.view.sequence());
            (store.epoch, store.sequence)
        };
        self.0.view.learn(epoch, sequence);
        self.emit(Event::Lost);
        self.0
            .fleet
            .publish(Message::Epoch { epoch, sequence }, None);
    }

    fn receive(&self, message: Message) {
        if self.dead() || self.0.deaf.load(Ordering::Acquire) {
            return;
        }
        match message {
            Message::Invalidated {
                identity,
                generation,
                sequence,
            } => {
                self.0.invalidated.raise(&identity, generation);
                self.0.view.heard_sequence(sequence);
                self.emit(Event::Invalidated(identity));
            }
            Message::Epoch { epoch, sequence } => {
                if self.0.view.learn(epoch, sequence) {
                    self.emit(Event::Lost);
                }
            }
            Message::Filled => self.0.filled.notify_waiters(),
            Message::Canary { count } => {
                self.0.canaries_heard.fetch_max(count, Ordering::AcqRel);
            }
        }
    }

    /// One canary round: reads the fleet's counters, judges them, and sends
    /// a canary. In sync once a canary came back (for a new process, only
    /// after `SETTLE`); the subscription is lost (every local entry
    /// dropped, out of sync until a canary comes back again) when it was
    /// silent for `SILENCE_LIMIT` or missed an announced invalidation.
    fn check(&self, last_heard: &mut Instant, heard: &mut u64) {
        let known = self.0.view.known();
        let read = locked(&self.0.fleet.0.store).counters();
        self.saw(self.0.view.see(known, read));
        self.0.view.expect(read.sequence.unwrap_or_default());
        let now = Instant::now();
        let canaries = self.0.canaries_heard.load(Ordering::Acquire);
        if canaries > *heard {
            *heard = canaries;
            *last_heard = now;
            let settled = *self.0.settled.get_or_init(|| now + SETTLE);
            if !self.in_sync() && now >= settled {
                // What was fetched while out of sync may have missed an invalidation.
                self.emit(Event::Lost);
                self.0.in_sync.store(true, Ordering::Release);
            }
        }
        let silent = now - *last_heard >= SILENCE_LIMIT;
        if self.in_sync() && (silent || self.0.view.missed(MISSED_GRACE)) {
            self.0.in_sync.store(false, Ordering::Release);
            self.0.view.subscribed();
            self.emit(Event::Lost);
        }
        let count = self.0.canaries_sent.fetch_add(1, Ordering::AcqRel) + 1;
        self.0
            .fleet
            .publish(Message::Canary { count }, Some(&self.0));
    }

    async fn run(self, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(CANARY_EVERY);
        let mut last_heard = Instant::now();
        let mut heard = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if self.dead() {
                return;
            }
            self.check(&mut last_heard, &mut heard);
        }
    }
}

impl LockedStore for Replica {
    type Waiting = Wait;

    async fn look(&self, identity: &Identity) -> Option<Stored> {
        self.get(identity)
    }

    async fn claim(&self, identity: &Identity) -> (Option<Claim<FetchLock>>, Wait) {
        let wait = Wait {
            replica: self.clone(),
            identity: identity.clone(),
            deadline: Instant::now() + self.0.wait,
        };
        (Some(self.claim_lock(identity)), wait)
    }
}

/// A wait for another replica's fetch: woken by a "filled" message, else
/// looking again every `FALLBACK_POLL`, until the replica's wait is over.
pub(super) struct Wait {
    replica: Replica,
    identity: Identity,
    deadline: Instant,
}

impl Waiting for Wait {
    type Lock = FetchLock;

    async fn next(&mut self) -> Option<Claim<FetchLock>> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        tokio::select! {
            () = self.replica.0.filled.notified() => {}
            () = tokio::time::sleep(FALLBACK_POLL.min(self.deadline - now)) => {}
        }
        Some(self.replica.claim_lock(&self.identity))
    }
}

/// A held fetch lock; released when published or dropped.
pub(super) struct FetchLock {
    replica: Replica,
    identity: Identity,
    owner: u64,
    epoch: u64,
    generation: u64,
    released: bool,
}

impl HeldLock for FetchLock {
    /// Stores `value` (or removes the entry) unless the generation moved
    /// on since the lock was taken, and releases the lock.
    async fn publish(mut self, Publish { value, ttl }: Publish) {
        if self.replica.dead() {
            return;
        }
        self.released = true;
        let fleet = &self.replica.0.fleet;
        {
            let mut store = locked(&fleet.0.store);
            let generation = store.generations.get(&self.identity).copied();
            if generation.unwrap_or(0) == self.generation {
                match value {
                    Some(stored) => {
                        let at = Instant::now();
                        let value = Value {
                            stored,
                            at,
                            until: at + ttl,
                            epoch: self.epoch,
                            generation: self.generation,
                        };
                        store.values.insert(self.identity.clone(), value);
                    }
                    None => {
                        store.values.remove(&self.identity);
                    }
                }
            }
            Self::unlock(&mut store, &self.identity, self.owner);
        }
        fleet.publish(Message::Filled, None);
    }
}

impl FetchLock {
    fn unlock(store: &mut Store, identity: &Identity, owner: u64) {
        if store
            .locks
            .get(identity)
            .is_some_and(|lock| lock.owner == owner)
        {
            store.locks.remove(identity);
        }
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        if self.released || self.replica.dead() {
            return;
        }
        let fleet = &self.replica.0.fleet;
        Self::unlock(&mut locked(&fleet.0.store), &self.identity, self.owner);
        fleet.publish(Message::Filled, None);
    }
}

impl SharedTier for Replica {
    fn fill<'a>(&'a self, identity: &'a Identity, fill: &'a dyn Fill) -> TierFuture<'a, ()> {
        Box::pin(protocol::fill(self, identity, fill))
    }

    fn invalidate<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Result<(), NotShared>> {
        Box::pin(std::future::ready(self.invalidate_shared(identity)))
    }

    fn in_sync(&self) -> bool {
        self.0.in_sync.load(Ordering::Acquire)
    }

    fn start(&self, sink: EventSink, stop: CancellationToken) {
        if self.0.sink.set(sink).is_ok() {
            tokio::spawn(self.clone().run(stop));
        }
    }
}
