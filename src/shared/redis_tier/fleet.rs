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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::super::Event;
use super::super::fleet_view::{Counters, FleetView, Seen};
use super::super::sealed::Message;
use super::scripts::{self, believable};
use super::{FLEET, INVALIDATED, RedisTier, invoking};
use crate::telemetry::metrics::SharedCacheOp;

/// What this replica knows of the fleet.
pub(super) struct Fleet {
    /// The epoch, the sequence and which invalidations were heard.
    pub(super) view: FleetView,
    /// A raise is under way (one at a time is enough).
    raising: AtomicBool,
    /// This replica's name on its canary channel.
    pub(super) replica: u128,
    /// The count of the last canary sent, and of the last one heard back.
    pub(super) canaries_sent: AtomicU64,
    pub(super) canaries_heard: AtomicU64,
    /// When this process first trusts Redis (`SETTLE` after its first canary).
    pub(super) settled: std::sync::OnceLock<tokio::time::Instant>,
    fleet: redis::Script,
    advance: redis::Script,
    raise: redis::Script,
}

impl Fleet {
    pub(super) fn new() -> Self {
        Self {
            view: FleetView::default(),
            raising: AtomicBool::new(false),
            replica: rand::random(),
            canaries_sent: AtomicU64::new(0),
            canaries_heard: AtomicU64::new(0),
            settled: std::sync::OnceLock::new(),
            fleet: redis::Script::new(&scripts::fleet()),
            advance: redis::Script::new(&scripts::advance()),
            raise: redis::Script::new(&scripts::raise()),
        }
    }

    /// The channel this replica's canaries come back on.
    pub(super) fn canary_channel(&self) -> String {
        format!("{FLEET}:canary:{:032x}", self.replica)
    }
}

impl RedisTier {
    /// What Redis shows of the fleet (`seen`: `FleetView::see`, or
    /// `see_advanced` for an advance's answer). Learns it, or raises the
    /// epoch past it when it is less than this replica knew. `Some(true)`:
    /// taken as it was; `Some(false)`: rolled back, and the epoch raised;
    /// `None`: rolled back, and the raise failed.
    async fn saw_fleet(&self, seen: Seen) -> Option<bool> {
        match seen {
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
            .arg(fleet.view.epoch())
            .arg(fleet.view.sequence());
        let raised: Option<(String, String)> = self
            .call(SharedCacheOp::RaiseEpoch, invoking(invocation))
            .await;
        fleet.raising.store(false, Ordering::Release);
        let (epoch, sequence) = raised?;
        let (epoch, sequence) = (believable(&epoch)?, believable(&sequence)?);
        fleet.view.learn(epoch, sequence);
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
            let known = self.0.fleet.view.known();
            let mut invocation = self.0.fleet.advance.prepare_invoke();
            invocation.key(FLEET).arg(new_tip());
            let read: (String, String, String) = self
                .call(SharedCacheOp::Invalidate, invoking(invocation))
                .await?;
            let read = counters(&read);
            // Rolled back (and raised): advance again, in the new epoch.
            if self
                .saw_fleet(self.0.fleet.view.see_advanced(known, read))
                .await?
            {
                return read.sequence;
            }
        }
        None
    }

    /// Another replica raised the epoch: everything held here goes.
    pub(super) fn saw_raised(&self) {
        self.emit(Event::Lost);
        tracing::warn!(
            epoch = self.0.fleet.view.epoch(),
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
        let known = fleet.view.known();
        let mut invocation = fleet.fleet.prepare_invoke();
        invocation
            .key(FLEET)
            .arg(fleet.canary_channel())
            .arg(canary);
        let read: Option<(String, String, String)> =
            self.call(SharedCacheOp::Canary, invoking(invocation)).await;
        let Some(read) = read else {
            return false;
        };
        let read = counters(&read);
        // A failed raise is tried again with the next canary.
        let _ = self.saw_fleet(fleet.view.see(known, read)).await;
        if let Some(sequence) = read.sequence {
            fleet.view.expect(sequence);
        }
        true
    }
}

/// The epoch, sequence and tip the scripts answer, each if believable.
fn counters((epoch, sequence, tip): &(String, String, String)) -> Counters {
    Counters {
        epoch: believable(epoch),
        sequence: believable(sequence),
        tip: believable(tip),
    }
}

/// A fresh tip for an advance: random, and believable as a counter.
fn new_tip() -> String {
    rand::random_range(1..100_000_000_000_000_000u64).to_string()
}
