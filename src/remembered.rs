//! What a replica remembers of past invalidations, in bounded memory: per
//! identity, the generation its last invalidation moved it to.
//!
//! Both users of it (the broker's flights and the shared tier) need the same
//! guarantee: forgetting an identity must never make an old answer
//! acceptable. So the memory is bounded twice, and each bound is safe:
//! - by age (`memory`): an entry older than any answer that can still be
//!   served or stored is dropped; nothing from before it can matter any more;
//! - by count (`capacity`, tied to `cache.max_entries`): the oldest entry
//!   goes, and the *floor* rises to its generation. An identity that is not
//!   remembered reads the floor, so everything sealed or begun before the
//!   forgotten invalidation still looks old. The price is refetches (every
//!   identity not remembered looks invalidated once more), never safety.
//!
//! Generations only grow, so "the floor" is simply the highest generation
//! ever evicted by count. Eviction and the floor change under one lock, so no
//! reader sees the entry gone and the floor not yet raised.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::Identity;

/// What is known of one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowest {
    /// Its own last invalidation moved it to this generation.
    Exact(u64),
    /// Not remembered: every identity evicted by count was at or below this.
    Floor(u64),
}

impl Lowest {
    pub fn value(self) -> u64 {
        match self {
            Lowest::Exact(generation) | Lowest::Floor(generation) => generation,
        }
    }
}

/// The bounded memory of invalidations.
pub struct Remembered {
    state: Mutex<State>,
    capacity: usize,
    memory: Duration,
}

#[derive(Default)]
struct State {
    floor: u64,
    /// Per identity: its generation and the stamp of its newest record in `order`.
    known: HashMap<Identity, (u64, u64)>,
    /// Records oldest first; a record whose stamp is no longer its
    /// identity's is left over from an earlier raise and skipped.
    order: VecDeque<(Identity, u64, Instant)>,
    stamps: u64,
}

impl Remembered {
    /// Remembers at most `capacity` identities (at least one), each for `memory`.
    pub fn new(capacity: u64, memory: Duration) -> Self {
        Self {
            state: Mutex::default(),
            capacity: usize::try_from(capacity.max(1)).unwrap_or(usize::MAX),
            memory,
        }
    }

    /// The lowest generation `identity` may be in; it never goes down.
    pub fn get(&self, identity: &Identity) -> Lowest {
        let mut state = self.lock();
        state.expire(self.memory);
        // Never below the floor: an identity remembered before the floor
        // rose past it reads the floor.
        match state.known.get(identity) {
            Some(&(generation, _)) if generation > state.floor => Lowest::Exact(generation),
            _ => Lowest::Floor(state.floor),
        }
    }

    /// `identity` was invalidated into `generation` (kept, and its memory
    /// renewed, if higher than what is known).
    pub fn raise(&self, identity: &Identity, generation: u64) {
        let mut state = self.lock();
        state.expire(self.memory);
        // At or below the floor: the floor already says as much.
        if generation <= state.floor {
            return;
        }
        // Nothing new (a message replayed, say): the memory is not renewed,
        // so it never outlives the generation it remembers.
        if state.known.get(identity).is_some_and(|k| k.0 >= generation) {
            return;
        }
        state.stamps += 1;
        let stamp = state.stamps;
        state.known.insert(identity.clone(), (generation, stamp));
        state
            .order
            .push_back((identity.clone(), stamp, Instant::now()));
        while state.known.len() > self.capacity {
            state.evict_oldest();
        }
        // Left-over records are at most as many as live ones.
        if state.order.len() > self.capacity.saturating_mul(2) {
            let State { known, order, .. } = &mut *state;
            order.retain(|(identity, stamp, _)| known.get(identity).is_some_and(|k| k.1 == *stamp));
        }
    }

    /// Identities remembered one by one now.
    pub fn len(&self) -> usize {
        self.lock().known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Whether `record` is its identity's newest.
    fn live(&self, identity: &Identity, stamp: u64) -> bool {
        self.known.get(identity).is_some_and(|k| k.1 == stamp)
    }

    /// Forgets the oldest identity and raises the floor to its generation.
    fn evict_oldest(&mut self) {
        while let Some((identity, stamp, _)) = self.order.pop_front() {
            if self.live(&identity, stamp) {
                if let Some((generation, _)) = self.known.remove(&identity) {
                    self.floor = self.floor.max(generation);
                }
                return;
            }
        }
    }

    /// Forgets what is older than `memory`; the floor stays.
    fn expire(&mut self, memory: Duration) {
        let now = Instant::now();
        while let Some((identity, stamp, at)) = self.order.front() {
            if now.duration_since(*at) < memory {
                return;
            }
            if self.live(identity, *stamp) {
                let identity = identity.clone();
                self.known.remove(&identity);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UserId;

    fn customer(i: usize) -> Identity {
        Identity::Customer(UserId::parse(&format!("c{i}")).unwrap())
    }

    #[test]
    fn an_identity_evicted_by_count_reads_a_floor_at_least_its_generation() {
        let remembered = Remembered::new(3, Duration::from_secs(3600));
        for i in 0..10 {
            remembered.raise(&customer(i), 100 + i as u64);
        }
        assert_eq!(remembered.len(), 3);
        for i in 0..7 {
            let lowest = remembered.get(&customer(i));
            assert_eq!(
                lowest,
                Lowest::Floor(106),
                "evicted {i} is never below its own"
            );
            assert!(lowest.value() >= 100 + i as u64);
        }
        assert_eq!(remembered.get(&customer(9)), Lowest::Exact(109));
        assert_eq!(remembered.get(&customer(99)), Lowest::Floor(106));
    }

    #[test]
    fn a_generation_below_the_floor_never_lowers_what_a_forgotten_identity_reads() {
        let remembered = Remembered::new(1, Duration::from_secs(3600));
        remembered.raise(&customer(0), 100);
        remembered.raise(&customer(1), 7);
        assert_eq!(remembered.get(&customer(0)), Lowest::Floor(100));
        // A late or replayed invalidation of the forgotten identity.
        remembered.raise(&customer(0), 5);
        assert_eq!(remembered.get(&customer(0)), Lowest::Floor(100));
        // One remembered below the floor reads the floor, and a raise under it changes nothing.
        assert_eq!(remembered.get(&customer(1)), Lowest::Floor(100));
        remembered.raise(&customer(1), 50);
        assert_eq!(remembered.get(&customer(1)), Lowest::Floor(100));
    }

    #[test]
    fn a_raise_keeps_the_highest_generation_and_renews_the_identity() {
        let remembered = Remembered::new(2, Duration::from_secs(3600));
        remembered.raise(&customer(0), 50);
        remembered.raise(&customer(1), 40);
        remembered.raise(&customer(0), 45);
        assert_eq!(remembered.get(&customer(0)), Lowest::Exact(50));
        remembered.raise(&customer(0), 55);
        // customer 0 was renewed, so customer 1 is the oldest now.
        remembered.raise(&customer(2), 70);
        assert_eq!(remembered.get(&customer(0)), Lowest::Exact(55));
        assert_eq!(remembered.get(&customer(1)), Lowest::Floor(40));
    }

    #[test]
    fn many_raises_of_one_identity_keep_the_records_bounded() {
        let remembered = Remembered::new(4, Duration::from_secs(3600));
        for generation in 1..10_000 {
            remembered.raise(&customer(generation as usize % 2), generation);
        }
        let state = remembered.lock();
        assert!(state.order.len() <= 8, "{}", state.order.len());
        assert_eq!(state.floor, 0, "nothing was evicted by count");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_older_than_the_memory_is_forgotten_without_raising_the_floor() {
        let remembered = Remembered::new(10, Duration::from_secs(60));
        remembered.raise(&customer(0), 5);
        tokio::time::advance(Duration::from_secs(30)).await;
        remembered.raise(&customer(1), 6);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(remembered.get(&customer(0)), Lowest::Floor(0));
        assert_eq!(remembered.get(&customer(1)), Lowest::Exact(6));
        assert_eq!(remembered.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_raises_never_leave_an_identity_below_its_generation() {
        let remembered = std::sync::Arc::new(Remembered::new(16, Duration::from_secs(3600)));
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let remembered = remembered.clone();
                tokio::spawn(async move {
                    for i in 0..2_000u64 {
                        let identity = customer((t * 1000 + i as usize) % 64);
                        let generation = i * 4 + t as u64;
                        remembered.raise(&identity, generation);
                        assert!(remembered.get(&identity).value() >= generation);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(remembered.len() <= 16);
    }
}
