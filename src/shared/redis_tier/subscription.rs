//! The replica's ear on the fleet: the subscription to the "invalidated"
//! and "filled" channels and to this replica's own canary channel. Every
//! `CANARY_EVERY` the replica publishes a canary through its command
//! connection; a subscription that does not hear it back within
//! `SILENCE_LIMIT` is dead or deaf (a half-open connection, or one left on an
//! isolated old primary that PONGs but hears nobody), and is made again
//! after every local entry was dropped, since invalidations may have been
//! missed. So is one that hears its canary but missed an invalidation the
//! fleet's sequence says was published (`Fleet::missed`): a live
//! subscription is not enough, it must have heard everything.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::Event;
use super::super::sealed::{KeyName, Message};
use super::{FILLED, INVALIDATED, RedisTier};
use crate::telemetry::metrics::{SharedCacheOp, SharedCacheResult, ValueRefusal};

/// Pause between attempts to re-subscribe.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(250);
/// How often a canary is sent while the last one came back.
const CANARY_EVERY: Duration = Duration::from_millis(250);
/// Time without this replica's canary coming back after which the
/// subscription counts as lost: with a canary every `CANARY_EVERY`, a dead
/// or deaf subscription is noticed within 2 s.
const SILENCE_LIMIT: Duration = Duration::from_millis(1250);

/// The longest an invalidation the fleet's sequence announced may take to arrive.
const MISSED_GRACE_AT_MOST: Duration = Duration::from_millis(750);

/// How long a process listens to its canaries before it first trusts
/// Redis: long enough for a replica that saw an invalidation a restore undid
/// to notice (on its own canary) and raise the fleet's epoch, so a replica
/// started right after a restore never believes the restored generations.
const SETTLE: Duration = SILENCE_LIMIT;

/// Why listening ended.
enum Ended {
    Stopped,
    /// The connection closed.
    Closed,
    /// The canary did not come back in time.
    Deaf,
    /// A message on the fleet's channel did not open: someone without the
    /// key publishes there, or replicas use different keys.
    Unreadable,
    /// An invalidation a canary saw announced never arrived.
    Missed,
}

impl RedisTier {
    fn set_in_sync(&self, in_sync: bool) {
        self.0.in_sync.store(in_sync, Ordering::Release);
        self.0
            .metrics
            .shared_cache_subscribed
            .set(i64::from(in_sync));
    }

    /// Listens until `stop`; a lost, silent or deaf subscription sends
    /// `Event::Lost` at once and is made again.
    pub(super) async fn subscribe(self, stop: CancellationToken) {
        let canary = self.0.fleet.canary_channel();
        while !stop.is_cancelled() {
            let bound = self.0.timeout.max(Duration::from_secs(1));
            let subscribed = tokio::time::timeout(bound, async {
                let mut pubsub = self.0.nodes.pubsub().await?;
                pubsub.subscribe(&[INVALIDATED, FILLED, &canary]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    self.record(SharedCacheOp::Subscribe, SharedCacheResult::Ok, None);
                    self.0.fleet.view.subscribed();
                    // Invalidations sent while this replica was not listening were missed.
                    self.emit(Event::Lost);
                    let ended = self.listen(pubsub, &stop).await;
                    let was_in_sync = self.0.in_sync.load(Ordering::Acquire);
                    self.set_in_sync(false);
                    let why = match ended {
                        Ended::Stopped => return,
                        Ended::Closed => "closed",
                        Ended::Deaf => {
                            self.0.metrics.shared_cache_canary_misses.inc();
                            "deaf: this replica's canary did not come back"
                        }
                        Ended::Unreadable => "a message on the fleet's channel does not open",
                        Ended::Missed => "an invalidation the fleet announced never arrived",
                    };
                    self.record(SharedCacheOp::Subscribe, SharedCacheResult::Error, None);
                    self.0.metrics.shared_cache_subscription_losses.inc();
                    self.emit(Event::Lost);
                    // Once per loss of sync, not once per failed attempt.
                    if was_in_sync {
                        tracing::warn!(
                            reason = why,
                            "invalidation subscription lost; dropped every local entry, subscribing again"
                        );
                    }
                }
                Ok(Err(error)) => {
                    self.0.nodes.failed(&error);
                    self.record(SharedCacheOp::Subscribe, SharedCacheResult::Error, None);
                }
                Err(_) => self.record(SharedCacheOp::Subscribe, SharedCacheResult::Timeout, None),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
    }

    /// Handles messages and sends canaries until the subscription ends, goes
    /// deaf, or `stop`. In sync from the first canary heard back (by then
    /// the fleet's epoch was read, so nothing from before it is trusted);
    /// for a process's first subscription, only after `SETTLE`. Every local
    /// entry is dropped as it becomes in sync: entries fetched meanwhile may
    /// have missed invalidations the canary had not yet proved it heard.
    async fn listen(&self, pubsub: redis::aio::PubSub, stop: &CancellationToken) -> Ended {
        // The sink half is held while listening, though nothing is sent on it.
        let (_sink_half, mut messages) = pubsub.split();
        let fleet = &self.0.fleet;
        let mut last_heard = Instant::now();
        let mut ticks = tokio::time::interval(CANARY_EVERY / 2);
        let mut sending: Option<super::TierFuture<'_, bool>> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ended::Stopped,
                message = messages.next() => match message {
                    Some(message) => match self.handle(&message) {
                        Heard::Nothing => {}
                        Heard::Canary => {
                            last_heard = Instant::now();
                            let settled = *self.0.fleet.settled.get_or_init(|| last_heard + SETTLE);
                            if !self.0.in_sync.load(Ordering::Acquire) && last_heard >= settled {
                                // What was fetched while this replica was not
                                // in sync may have missed an invalidation
                                // published before the canary proved hearing.
                                self.emit(Event::Lost);
                                self.set_in_sync(true);
                            }
                        }
                        Heard::Unreadable => return Ended::Unreadable,
                    },
                    None => return Ended::Closed,
                },
                _ = async { sending.as_mut().expect("guarded").await }, if sending.is_some() => {
                    sending = None;
                }
                _ = ticks.tick() => {
                    if last_heard.elapsed() >= SILENCE_LIMIT {
                        return Ended::Deaf;
                    }
                    // A `DELETE` publishes within two Redis calls of advancing
                    // the sequence; never waited for long enough to break the
                    // 2 s bound (a slower one costs a needless loss, not safety).
                    if fleet.view.missed((self.0.timeout * 2).min(MISSED_GRACE_AT_MOST)) {
                        return Ended::Missed;
                    }
                    let answered = fleet.canaries_heard.load(Ordering::Acquire)
                        >= fleet.canaries_sent.load(Ordering::Acquire);
                    if sending.is_none() && (answered || last_heard.elapsed() >= CANARY_EVERY * 2)
                        && last_heard.elapsed() >= CANARY_EVERY / 2
                    {
                        let count = fleet.canaries_sent.fetch_add(1, Ordering::AcqRel) + 1;
                        sending = Some(Box::pin(self.send_canary(count)));
                    }
                }
            }
        }
    }

    fn handle(&self, message: &redis::Msg) -> Heard {
        let payload = message.get_payload_bytes();
        let channel = message.get_channel_name();
        if channel == FILLED {
            if let Ok(name) = std::str::from_utf8(payload) {
                self.0.waiters.wake(&KeyName(name.to_owned()));
            }
            return Heard::Nothing;
        }
        let Some(opened) = self.0.sealer.open_message(payload) else {
            self.0
                .metrics
                .shared_cache_value_refused(ValueRefusal::Undecryptable);
            return Heard::Unreadable;
        };
        match opened {
            Message::Invalidated {
                identity,
                generation,
                sequence,
            } => {
                // An old message replayed moves nothing back: the generation
                // and sequence only rise, and the entry is dropped either way.
                self.0.metrics.shared_cache_invalidations_heard.inc();
                self.0.invalidated.raise(&identity, generation);
                self.0.fleet.view.heard_sequence(sequence);
                self.emit(Event::Invalidated(identity));
            }
            Message::Epoch { epoch, sequence } => {
                // Learned only when higher: a replayed old raise is nothing new.
                if self.0.fleet.view.learn(epoch, sequence) {
                    self.saw_raised();
                }
            }
            Message::Canary { replica, count } => {
                let fleet = &self.0.fleet;
                // Only this replica's own, and only the newest: a replayed
                // canary proves nothing.
                if replica == fleet.replica
                    && count == fleet.canaries_sent.load(Ordering::Acquire)
                    && fleet.canaries_heard.fetch_max(count, Ordering::AcqRel) < count
                {
                    return Heard::Canary;
                }
            }
        }
        Heard::Nothing
    }
}

/// What one message was.
enum Heard {
    Nothing,
    /// This replica's newest canary came back.
    Canary,
    Unreadable,
}
