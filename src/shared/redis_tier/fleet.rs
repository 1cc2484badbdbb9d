//! The fleet's memory that a restore cannot roll back: the epoch every value
//! is sealed in, the sequence every invalidation advances, and what this
//! replica knows of both.
//!
//! Redis holds both in one hash (`FLEET`). A replica learns them from every
//! canary round trip (`check`, every `CANARY_EVERY`), from every
//! `DELETE` it makes and from the messages of the others. Whenever Redis
//! shows less than the replica knows (a lower epoch or sequence, a counter
//! no replica wrote, a key's generation below an invalidation the replica
//! saw), Redis lost writes: a restore, a failover to a lagging replica, a
//! flush. The replica then raises the epoch past both, every replica drops
//! what it holds and refuses every value sealed before, and a replica
//! started afterwards reads the raised epoch before it trusts Redis at all.
//!
//! Not covered: every replica restarted together with the restore. Then no
//! running process remembers what Redis forgot.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::super::Event;
use super::super::sealed::Message;
use super::scripts::{self, believable};
use super::{FLEET, INVALIDATED, RedisTier, invoking};
use crate::telemetry::metrics::SharedCacheOp;

/// What this replica knows of the fleet.
pub(super) struct Fleet {
    epoch: AtomicU64,
    sequence: AtomicU64,
    /// A raise is under way (one at a time is enough).
    raising: AtomicBool,
    /// This replica's name on its canary channel.
    pub(super) replica: u128,
    /// The count of the last canary sent, and of the last one heard back.
    pub(super) canaries_sent: AtomicU64,
    pub(super) canaries_heard: AtomicU64,
    /// When this process first trusts Redis (`SETTLE` after its first canary).
    pub(super) settled: std::sync::OnceLock<tokio::time::Instant>,
    /// Which invalidations this subscription heard, by sequence number.
    continuity: Mutex<Continuity>,
    fleet: redis::Script,
    advance: redis::Script,
    raise: redis::Script,
}

/// What this replica knew of the fleet before it asked Redis: an answer is
/// compared with that, since Redis can show nothing lower than what was
/// known when the question left (but a later answer may already have been
/// learned meanwhile).
#[derive(Debug, Clone, Copy)]
pub(super) struct Known {
    epoch: u64,
    sequence: u64,
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
enum Seen {
    AsKnown,
    /// Another replica raised the epoch.
    Raised,
    /// Redis holds less than this replica knows.
    RolledBack,
}

impl Fleet {
    pub(super) fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            sequence: AtomicU64::new(0),
            raising: AtomicBool::new(false),
            replica: rand::random(),
            canaries_sent: AtomicU64::new(0),
            canaries_heard: AtomicU64::new(0),
            settled: std::sync::OnceLock::new(),
            continuity: Mutex::default(),
            fleet: redis::Script::new(&scripts::fleet()),
            advance: redis::Script::new(&scripts::advance()),
            raise: redis::Script::new(&scripts::raise()),
        }
    }

    /// The epoch values are sealed in now.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The channel this replica's canaries come back on.
    pub(super) fn canary_channel(&self) -> String {
        format!("{FLEET}:canary:{:032x}", self.replica)
    }

    /// What is known now, before asking Redis.
    pub(super) fn known(&self) -> Known {
        Known {
            epoch: self.epoch(),
            sequence: self.sequence.load(Ordering::Acquire),
        }
    }

    /// Compares what Redis shows with what was `known` before asking, and learns it.
    fn see(&self, known: Known, epoch: Option<u64>, sequence: Option<u64>) -> Seen {
        let (Some(epoch), Some(sequence)) = (epoch, sequence) else {
            return Seen::RolledBack;
        };
        if epoch < known.epoch || sequence < known.sequence {
            return Seen::RolledBack;
        }
        if self.learn(epoch, sequence) {
            Seen::Raised
        } else {
            Seen::AsKnown
        }
    }

    /// The epoch was raised to `epoch` (by a replica, maybe this one) with
    /// the sequence at `sequence`; whether that is news.
    pub(super) fn learn(&self, epoch: u64, sequence: u64) -> bool {
        self.sequence.fetch_max(sequence, Ordering::AcqRel);
        let news = self.epoch.fetch_max(epoch, Ordering::AcqRel) < epoch;
        if news {
            // The numbers a raise skipped were never published.
            self.continuity().past(sequence);
        }
        news
    }

    /// An invalidation message said the sequence reached `sequence`.
    pub(super) fn heard_sequence(&self, sequence: u64) {
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
    pub(super) fn subscribed(&self) {
        let mut continuity = self.continuity();
        continuity.expected.clear();
        continuity.started = false;
    }

    /// A canary read the fleet's sequence as `sequence`.
    fn expect(&self, sequence: u64) {
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
    pub(super) fn missed(&self, grace: Duration) -> bool {
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

impl RedisTier {
    /// What Redis shows of the fleet: `epoch` and `sequence` (`None` where
    /// not believable). Learns them, or raises the epoch past them when they
    /// are less than this replica `known` before it asked. `Some(true)`:
    /// taken as they were; `Some(false)`: rolled back, and the epoch raised;
    /// `None`: rolled back, and the raise failed.
    async fn saw_fleet(
        &self,
        known: Known,
        epoch: Option<u64>,
        sequence: Option<u64>,
    ) -> Option<bool> {
        match self.0.fleet.see(known, epoch, sequence) {
            Seen::AsKnown => Some(true),
            Seen::Raised => {
                self.saw_raised();
                Some(true)
            }
            Seen::RolledBack => self
                .raise_epoch("the fleet's epoch or sequence went back")
                .await
                .map(|_| false),
        }
    }

    /// Redis showed less than this replica knows: raises the epoch in the
    /// background, unless a raise is under way.
    pub(super) fn rolled_back(&self, why: &'static str) {
        if self.0.fleet.raising.swap(true, Ordering::AcqRel) {
            return;
        }
        let tier = self.clone();
        tokio::spawn(async move {
            tier.raise_epoch(why).await;
        });
    }

    /// Raises the fleet's epoch past Redis's and this replica's, drops every
    /// local entry, and tells the other replicas; the new epoch, or `None`
    /// when Redis could not be asked (the next check tries again).
    pub(super) async fn raise_epoch(&self, why: &'static str) -> Option<u64> {
        let fleet = &self.0.fleet;
        fleet.raising.store(true, Ordering::Release);
        let mut invocation = fleet.raise.prepare_invoke();
        invocation
            .key(FLEET)
            .arg(fleet.epoch())
            .arg(fleet.sequence.load(Ordering::Acquire));
        let raised: Option<(String, String)> = self
            .call(SharedCacheOp::RaiseEpoch, invoking(invocation))
            .await;
        fleet.raising.store(false, Ordering::Release);
        let (epoch, sequence) = raised?;
        let (epoch, sequence) = (believable(&epoch)?, believable(&sequence)?);
        fleet.learn(epoch, sequence);
        self.0.metrics.shared_cache_rollbacks.inc();
        self.emit(Event::Lost);
        tracing::warn!(
            reason = why,
            epoch,
            "Redis holds less than this replica saw (a restore, a failover to a lagging replica, a flush or a hand-made write); raised the fleet's epoch, so every replica drops and refuses everything stored before"
        );
        let message = self
            .0
            .sealer
            .seal_message(&Message::Epoch { epoch, sequence });
        let _: Option<i64> = self
            .call(SharedCacheOp::RaiseEpoch, |mut connection| {
                let message = message.clone();
                async move {
                    redis::cmd("PUBLISH")
                        .arg(INVALIDATED)
                        .arg(message)
                        .query_async(&mut connection)
                        .await
                }
            })
            .await;
        Some(epoch)
    }

    /// Advances the fleet's sequence for an invalidation; the new sequence,
    /// or `None` when Redis could not be asked or the epoch could not be raised.
    pub(super) async fn advance(&self) -> Option<u64> {
        for _ in 0..2 {
            let known = self.0.fleet.known();
            let mut invocation = self.0.fleet.advance.prepare_invoke();
            invocation.key(FLEET);
            let (epoch, sequence): (String, String) = self
                .call(SharedCacheOp::Invalidate, invoking(invocation))
                .await?;
            let (epoch, sequence) = (believable(&epoch), believable(&sequence));
            // Rolled back (and raised): advance again, in the new epoch.
            if self.saw_fleet(known, epoch, sequence).await? {
                return sequence;
            }
        }
        None
    }

    /// Another replica raised the epoch: everything held here goes.
    pub(super) fn saw_raised(&self) {
        self.emit(Event::Lost);
        tracing::warn!(
            epoch = self.0.fleet.epoch(),
            "another replica raised the fleet's epoch (Redis lost writes); dropped every local entry"
        );
    }

    /// One canary round trip: reads the fleet's counters and publishes
    /// canary `count` on this replica's channel; `false` when Redis could not
    /// be asked.
    pub(super) async fn send_canary(&self, count: u64) -> bool {
        // Behind Sentinel, commands move to a new primary as soon as the
        // sentinels name it; the subscription follows when this canary,
        // published there, does not come back on the old one.
        match tokio::time::timeout(self.0.timeout, self.0.nodes.follow_primary()).await {
            Ok(Ok(true)) => {
                tracing::info!("Sentinel names a new Redis primary; moving to it");
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::debug!(kind = ?error.kind(), "the sentinels could not be asked");
            }
            Err(_) => tracing::debug!("the sentinels did not answer in time"),
        }
        let fleet = &self.0.fleet;
        let canary = self.0.sealer.seal_message(&Message::Canary {
            replica: fleet.replica,
            count,
        });
        let known = fleet.known();
        let mut invocation = fleet.fleet.prepare_invoke();
        invocation
            .key(FLEET)
            .arg(fleet.canary_channel())
            .arg(canary);
        let read: Option<(String, String)> =
            self.call(SharedCacheOp::Canary, invoking(invocation)).await;
        let Some((epoch, sequence)) = read else {
            return false;
        };
        let (epoch, sequence) = (believable(&epoch), believable(&sequence));
        // A failed raise is tried again with the next canary.
        let _ = self.saw_fleet(known, epoch, sequence).await;
        if let Some(sequence) = sequence {
            fleet.expect(sequence);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_showing_less_than_known_is_a_rollback_and_more_is_learned() {
        let fleet = Fleet::new();
        let see = |epoch, sequence| fleet.see(fleet.known(), epoch, sequence);
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
        let fleet = Fleet::new();
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
        let fleet = Fleet::new();
        let asked = fleet.known();
        // Another request's later answer (or a message) arrived first.
        fleet.heard_sequence(7);
        assert_eq!(fleet.see(asked, Some(0), Some(6)), Seen::AsKnown);
        assert_eq!(fleet.known().sequence, 7, "nothing learned moves back");
    }
}
