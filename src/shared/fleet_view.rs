//! What a replica knows of the fleet: the epoch every shared value is
//! sealed in, the sequence every invalidation advances, and which
//! invalidations it heard. Any tier whose store can lose writes (a restore,
//! a failover to a lagging replica, a flush) judges what it reads against
//! this: when the store shows less than the replica knew, writes were lost
//! and the epoch must be raised past them; a sequence number announced and
//! never heard is an invalidation missed.
//!
//! Pure logic, on tokio's clock: `redis_tier` and `in_process` share it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// What this replica knows of the fleet.
#[derive(Default)]
pub struct FleetView {
    epoch: AtomicU64,
    sequence: AtomicU64,
    /// The newest sequence read from the store, with the tip that named it.
    tip: Mutex<Option<Tip>>,
    /// Which invalidations this subscription heard, by sequence number.
    continuity: Mutex<Continuity>,
}

/// What this replica knew of the fleet before it asked Redis: an answer is
/// compared with that, since Redis can show nothing lower than what was
/// known when the question left (but a later answer may already have been
/// learned meanwhile).
#[derive(Debug, Clone, Copy)]
pub struct Known {
    epoch: u64,
    sequence: u64,
    tip: Option<Tip>,
}

/// Which advance made a sequence number: every advance names itself with a
/// fresh random tip, so the same number reached again by another history
/// (a restore undid an advance, and a new one took its number) shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    epoch: u64,
    sequence: u64,
    tip: u64,
}

/// What one read of the store's counters showed (`None` where not believable).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub epoch: Option<u64>,
    pub sequence: Option<u64>,
    pub tip: Option<u64>,
}

/// Whether the subscription heard every invalidation: every `DELETE`
/// advances the fleet's sequence by one before it publishes, so the numbers
/// heard must leave no hole below what a canary read. A hole that stays
/// longer than a `DELETE` takes to publish is an invalidation this replica
/// missed while its subscription looked alive (a message lost between
/// Cluster nodes, a subscription briefly on the wrong server).
#[derive(Default)]
struct Continuity {
    /// Every sequence number up to this one was heard (or is older than the subscription).
    low: u64,
    /// Numbers heard above `low`.
    above: BTreeSet<u64>,
    /// Sequences canaries read, with when: by `when + grace`, all must be heard.
    expected: VecDeque<(Instant, u64)>,
    /// Whether `low` was set from this subscription's first canary.
    started: bool,
}

impl Continuity {
    fn heard(&mut self, sequence: u64) {
        if sequence > self.low {
            self.above.insert(sequence);
        }
        while self.above.remove(&(self.low + 1)) {
            self.low += 1;
        }
    }

    /// Everything up to `sequence` counts as heard (it is older than this
    /// subscription, or an epoch raise moved past it).
    fn past(&mut self, sequence: u64) {
        self.low = self.low.max(sequence);
        let low = self.low;
        self.above.retain(|heard| *heard > low);
        self.heard(low);
    }
}

/// What a read of the fleet's counters showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    AsKnown,
    /// Another replica raised the epoch.
    Raised,
    /// Redis holds less than this replica knows.
    RolledBack,
}

impl FleetView {
    /// The epoch values are sealed in now.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The sequence this replica knows the fleet reached.
    pub fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::Acquire)
    }

    /// What is known now, before asking the store.
    pub fn known(&self) -> Known {
        Known {
            epoch: self.epoch(),
            sequence: self.sequence.load(Ordering::Acquire),
            tip: *self.tip.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Compares what a read of the store shows with what was `known` before
    /// asking, and learns it. Less than known is a rollback: a lower epoch
    /// or sequence, a counter not believable, or the sequence this replica
    /// read before under another tip.
    pub fn see(&self, known: Known, read: Counters) -> Seen {
        self.judge(known, read, false)
    }

    /// As `see`, for the counters an advance of the sequence returned: a
    /// number this replica already knew was taken before (a restore undid
    /// the advance that took it first), so it is a rollback too.
    pub fn see_advanced(&self, known: Known, read: Counters) -> Seen {
        self.judge(known, read, true)
    }

    fn judge(&self, known: Known, read: Counters, advanced: bool) -> Seen {
        let (Some(epoch), Some(sequence)) = (read.epoch, read.sequence) else {
            return Seen::RolledBack;
        };
        let retaken = known.tip.is_some_and(|tip| {
            tip.epoch == epoch && tip.sequence == sequence && read.tip != Some(tip.tip)
        });
        if epoch < known.epoch
            || sequence < known.sequence
            || (advanced && sequence <= known.sequence)
            || retaken
        {
            return Seen::RolledBack;
        }
        if let Some(tip) = read.tip {
            let mut newest = self.tip.lock().unwrap_or_else(PoisonError::into_inner);
            if newest.is_none_or(|n| (n.epoch, n.sequence) <= (epoch, sequence)) {
                *newest = Some(Tip {
                    epoch,
                    sequence,
                    tip,
                });
            }
        }
        if self.learn(epoch, sequence) {
            Seen::Raised
        } else {
            Seen::AsKnown
        }
    }

    /// The epoch was raised to `epoch` (by a replica, maybe this one) with
    /// the sequence at `sequence`; whether that is news.
    pub fn learn(&self, epoch: u64, sequence: u64) -> bool {
        self.sequence.fetch_max(sequence, Ordering::AcqRel);
        let news = self.epoch.fetch_max(epoch, Ordering::AcqRel) < epoch;
        if news {
            // The numbers a raise skipped were never published.
            self.continuity().past(sequence);
        }
        news
    }

    /// An invalidation message said the sequence reached `sequence`.
    pub fn heard_sequence(&self, sequence: u64) {
        self.sequence.fetch_max(sequence, Ordering::AcqRel);
        self.continuity().heard(sequence);
    }

    fn continuity(&self) -> std::sync::MutexGuard<'_, Continuity> {
        self.continuity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A new subscription: what came before it is covered by dropping every
    /// entry; its first canary sets where hearing starts.
    pub fn subscribed(&self) {
        let mut continuity = self.continuity();
        continuity.expected.clear();
        continuity.started = false;
    }

    /// A canary read the fleet's sequence as `sequence`.
    pub fn expect(&self, sequence: u64) {
        let mut continuity = self.continuity();
        if continuity.started {
            continuity.expected.push_back((Instant::now(), sequence));
        } else {
            continuity.past(sequence);
            continuity.started = true;
        }
    }

    /// Whether an invalidation a canary saw announced more than `grace` ago
    /// was never heard.
    pub fn missed(&self, grace: Duration) -> bool {
        let mut continuity = self.continuity();
        while let Some(&(at, sequence)) = continuity.expected.front() {
            if at.elapsed() < grace {
                return false;
            }
            continuity.expected.pop_front();
            if continuity.low < sequence {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_showing_less_than_known_is_a_rollback_and_more_is_learned() {
        let fleet = FleetView::default();
        let see = |epoch, sequence| {
            let read = Counters {
                epoch,
                sequence,
                tip: None,
            };
            fleet.see(fleet.known(), read)
        };
        assert_eq!(see(Some(0), Some(0)), Seen::AsKnown);
        assert_eq!(see(Some(0), Some(5)), Seen::AsKnown);
        assert_eq!(see(Some(0), Some(4)), Seen::RolledBack, "sequence back");
        assert_eq!(see(Some(2), Some(5)), Seen::Raised);
        assert_eq!(fleet.epoch(), 2);
        assert_eq!(see(Some(1), Some(9)), Seen::RolledBack, "epoch back");
        assert_eq!(see(None, Some(9)), Seen::RolledBack, "not believable");
        assert_eq!(see(Some(2), None), Seen::RolledBack);
        fleet.heard_sequence(12);
        assert_eq!(see(Some(2), Some(11)), Seen::RolledBack);
        assert_eq!(see(Some(2), Some(12)), Seen::AsKnown);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_announced_but_never_heard_is_missed_once_its_grace_passed() {
        let fleet = FleetView::default();
        let grace = Duration::from_millis(500);
        fleet.subscribed();
        fleet.expect(10);
        // Heard out of order, with nothing missing.
        fleet.heard_sequence(12);
        fleet.heard_sequence(11);
        fleet.expect(12);
        tokio::time::advance(grace).await;
        assert!(!fleet.missed(grace));
        // 13 is announced and never heard, though 14 is.
        fleet.heard_sequence(14);
        fleet.expect(14);
        tokio::time::advance(grace / 2).await;
        assert!(!fleet.missed(grace), "a DELETE may still be publishing it");
        tokio::time::advance(grace / 2).await;
        assert!(fleet.missed(grace));
        // A new subscription starts over from its first canary.
        fleet.subscribed();
        fleet.expect(14);
        fleet.heard_sequence(15);
        fleet.expect(15);
        tokio::time::advance(grace).await;
        assert!(!fleet.missed(grace));
        // An epoch raise skips numbers that were never published.
        assert!(fleet.learn(3, 20));
        fleet.expect(20);
        tokio::time::advance(grace).await;
        assert!(!fleet.missed(grace));
    }

    #[test]
    fn an_answer_older_than_what_was_learned_meanwhile_is_no_rollback() {
        let fleet = FleetView::default();
        let asked = fleet.known();
        // Another request's later answer (or a message) arrived first.
        fleet.heard_sequence(7);
        let read = Counters {
            epoch: Some(0),
            sequence: Some(6),
            tip: None,
        };
        assert_eq!(fleet.see(asked, read), Seen::AsKnown);
        assert_eq!(fleet.known().sequence, 7, "nothing learned moves back");
    }

    fn read(sequence: u64, tip: u64) -> Counters {
        Counters {
            epoch: Some(0),
            sequence: Some(sequence),
            tip: Some(tip),
        }
    }

    #[test]
    fn a_number_taken_again_by_another_history_is_a_rollback() {
        let fleet = FleetView::default();
        assert_eq!(fleet.see(fleet.known(), read(3, 30)), Seen::AsKnown);
        assert_eq!(fleet.see(fleet.known(), read(3, 30)), Seen::AsKnown);
        // A restore took 3 back to 2, and a new advance made 3 again.
        assert_eq!(fleet.see(fleet.known(), read(3, 31)), Seen::RolledBack);
        // A later number under a tip of its own is news, not a rollback.
        assert_eq!(fleet.see(fleet.known(), read(4, 40)), Seen::AsKnown);
    }

    #[test]
    fn an_advance_that_returns_a_known_number_is_a_rollback() {
        let fleet = FleetView::default();
        fleet.heard_sequence(3);
        let advanced = |sequence| fleet.see_advanced(fleet.known(), read(sequence, sequence * 10));
        assert_eq!(advanced(3), Seen::RolledBack, "3 was someone else's");
        assert_eq!(advanced(4), Seen::AsKnown);
    }
}
