//! The replica's ear on the fleet: the subscription to the "invalidated"
//! and "filled" channels, pinged so a silent one is noticed, made again after
//! any loss (and every local entry dropped then, since invalidations may have
//! been missed).

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::sealed::KeyName;
use super::super::{Event, EventSink, TierFuture};
use super::{FILLED, INVALIDATED, RedisTier};
use crate::telemetry::metrics::{SharedCacheOp, SharedCacheResult, ValueRefusal};

/// Pause between attempts to re-subscribe.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(250);
/// How often the subscription is pinged.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Silence on the subscription after which it counts as dead: with pings
/// every `PING_EVERY`, a dead subscription is noticed within 2 s.
const SILENCE_LIMIT: Duration = Duration::from_millis(1250);

impl RedisTier {
    fn set_in_sync(&self, in_sync: bool) {
        self.0.in_sync.store(in_sync, Ordering::Release);
        self.0
            .metrics
            .shared_cache_subscribed
            .set(i64::from(in_sync));
    }

    /// Listens on both channels until `stop`, pinging the subscription;
    /// a lost or silent one sends `Event::Lost` at once and is made again.
    pub(super) async fn subscribe(self, sink: EventSink, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let bound = self.0.timeout.max(Duration::from_secs(1));
            let subscribed = tokio::time::timeout(bound, async {
                let mut pubsub = self.0.nodes.pubsub().await?;
                pubsub.subscribe(&[INVALIDATED, FILLED]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    self.record(SharedCacheOp::Subscribe, SharedCacheResult::Ok, None);
                    // Invalidations sent while this replica was not listening were missed.
                    sink(Event::Lost);
                    self.set_in_sync(true);
                    if self.listen(pubsub, &sink, &stop).await.is_break() {
                        return;
                    }
                    self.set_in_sync(false);
                    self.record(SharedCacheOp::Subscribe, SharedCacheResult::Error, None);
                    self.0.metrics.shared_cache_subscription_losses.inc();
                    sink(Event::Lost);
                    tracing::warn!(
                        "invalidation subscription lost or silent; dropped every local entry, subscribing again"
                    );
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

    /// Handles messages until the subscription ends or falls silent
    /// (`Continue`) or `stop` (`Break`).
    async fn listen(
        &self,
        pubsub: redis::aio::PubSub,
        sink: &EventSink,
        stop: &CancellationToken,
    ) -> std::ops::ControlFlow<()> {
        let (sink_half, mut messages) = pubsub.split();
        let mut last_heard = Instant::now();
        let mut ticks = tokio::time::interval(PING_EVERY / 2);
        let mut ping: Option<TierFuture<'static, bool>> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return std::ops::ControlFlow::Break(()),
                message = messages.next() => match message {
                    Some(message) => {
                        last_heard = Instant::now();
                        self.handle(&message, sink);
                    }
                    None => return std::ops::ControlFlow::Continue(()),
                },
                answered = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                    ping = None;
                    if answered {
                        last_heard = Instant::now();
                    }
                }
                _ = ticks.tick() => {
                    if last_heard.elapsed() >= SILENCE_LIMIT {
                        return std::ops::ControlFlow::Continue(());
                    }
                    if !self.0.breaker.is_closed() {
                        // Commands were failing: probe them (once a second, as
                        // `call` allows), so a replica serving only hits still
                        // finds Redis back.
                        let tier = self.clone();
                        tokio::spawn(async move {
                            let _: Option<String> = tier
                                .call(SharedCacheOp::Probe, |mut connection| async move {
                                    redis::cmd("PING").query_async(&mut connection).await
                                })
                                .await;
                        });
                    }
                    if ping.is_none() && last_heard.elapsed() >= PING_EVERY / 2 {
                        let mut sink_half = sink_half.clone();
                        ping = Some(Box::pin(async move {
                            sink_half.ping::<redis::Value>().await.is_ok()
                        }));
                    }
                }
            }
        }
    }

    fn handle(&self, message: &redis::Msg, sink: &EventSink) {
        let payload = message.get_payload_bytes();
        match message.get_channel_name() {
            FILLED => {
                if let Ok(name) = std::str::from_utf8(payload) {
                    self.0.waiters.wake(&KeyName(name.to_owned()));
                }
            }
            INVALIDATED => {
                let opened = payload.iter().position(|b| *b == b':').and_then(|colon| {
                    let generation = std::str::from_utf8(&payload[..colon]).ok()?.parse().ok()?;
                    let identity = self.0.sealer.open_identity(&payload[colon + 1..])?;
                    Some((identity, generation))
                });
                match opened {
                    Some((identity, generation)) => {
                        self.remember_invalidation(&identity, generation);
                        sink(Event::Invalidated(identity));
                    }
                    None => {
                        self.0
                            .metrics
                            .shared_cache_value_refused(ValueRefusal::Undecryptable);
                        tracing::warn!(
                            "an invalidation message does not open under this replica's key; ignoring it"
                        );
                    }
                }
            }
            _ => {}
        }
    }
}
