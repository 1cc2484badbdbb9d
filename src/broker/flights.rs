//! Coalescing and generations: one flight per key, generation and purpose,
//! and the generations that keep a fetch begun before an invalidation from
//! storing its answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::entry::Entry;
use crate::domain::Identity;
use crate::remembered::Remembered;

/// Why a fetch runs; fetches for different reasons accept different answers,
/// so each reason coalesces with its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Purpose {
    /// A miss, or an entry past `ttl`.
    Lookup,
    /// Refresh-ahead of an entry still fresh.
    Refresh,
    /// The caller asked for `no-cache`.
    Revalidate,
}

/// The answers a fetch may hand back: younger than `max_age`, or fetched
/// after `since`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Want {
    pub(super) max_age: Duration,
    pub(super) since: Option<Instant>,
}

impl Want {
    pub(super) fn accepts(&self, entry: &Entry) -> bool {
        entry.age() < self.max_age
            || self
                .since
                .is_some_and(|since| entry.fetched_at.instant() >= since)
    }
}

/// A key's generation: the epoch (moved on when every entry is dropped) and
/// the key's own count of invalidations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Generation {
    epoch: u64,
    key: u64,
}

/// One flight per key, generation and purpose: a fetch begun before an
/// invalidation is never joined after it.
pub(super) type FlightKey = (Identity, Generation, Purpose);

/// The generations of this replica's keys.
pub(super) struct Generations {
    /// Per key, from `invalidations`. Bounded by `cache.max_entries`: a key
    /// forgotten by count reads a floor at least its own generation, so a
    /// fetch begun before its invalidation still sees it changed.
    keys: Remembered,
    invalidations: AtomicU64,
    epoch: AtomicU64,
}

impl Generations {
    /// At most `capacity` keys remembered for `memory`: as long as any fetch can run.
    pub(super) fn new(capacity: u64, memory: Duration) -> Self {
        Self {
            keys: Remembered::new(capacity, memory),
            invalidations: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    pub(super) fn of(&self, identity: &Identity) -> Generation {
        Generation {
            epoch: self.epoch.load(Ordering::Acquire),
            key: self.keys.get(identity).value(),
        }
    }

    /// Moves `identity`'s generation on.
    pub(super) fn invalidate(&self, identity: &Identity) {
        let generation = self.invalidations.fetch_add(1, Ordering::AcqRel) + 1;
        self.keys.raise(identity, generation);
    }

    /// Moves every key's generation on.
    pub(super) fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Keys remembered one by one now.
    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.keys.len()
    }
}
