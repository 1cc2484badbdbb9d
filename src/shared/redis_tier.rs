//! The shared tier on Redis: sealed answers, the per-identity fetch lock,
//! generations, the invalidation and "filled" channels, and the fleet-wide
//! rate limit, in any of the three forms of `nodes`.
//!
//! Every key of one identity carries the same hash tag (`{name}`), so in a
//! Cluster they live in one slot and the scripts that touch several of them run.
//!
//! Invalidations cannot be lost:
//! - the message carries the identity sealed under the encryption key, so
//!   applying it needs no map that could have forgotten the name;
//! - every value is sealed with its generation, and this replica remembers
//!   the generation each invalidation it saw moved to for `ttl +
//!   stale_if_error` (as long as any value can be served), so a value from
//!   before it is refused even if Redis gives it back (a restored snapshot,
//!   a lagging replica promoted, a hand-made write);
//! - the subscription is pinged every `PING_EVERY`; silence for
//!   `SILENCE_LIMIT` counts as lost: the broker drops every local entry at
//!   once and this replica re-subscribes (and drops them again once it has).
//!
//! Redis trouble degrades, never fails: every call is bounded by
//! `cache.redis_timeout`, and a failed or slow call makes the replica act as
//! if there were no Redis. While Redis is down, one call a second probes it;
//! the others skip it. Each change of state is logged once and shown in
//! `token_broker_shared_cache_up`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use secrecy::SecretString;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::nodes::{Commands, Nodes, Options};
use super::sealed::{KeyName, Sealer, Stored};
use super::{Event, EventSink, Lock, NotShared, Permit, SharedTier, TierFuture};
use crate::config::{CacheSettings, ConfigError, read_secret_file};
use crate::domain::Identity;
use crate::telemetry::metrics::Metrics;

/// Prefix of every key this service writes; the version changes with the layout.
const PREFIX: &str = "token-broker:v2";
/// Where invalidations are published: `<generation>:<sealed identity>`.
const INVALIDATED: &str = "token-broker:v2:invalidated";
/// Where a released fetch lock is announced: the key name.
const FILLED: &str = "token-broker:v2:filled";
/// How long a generation outlives its last invalidation: far longer than any fetch.
const GENERATION_TTL: Duration = Duration::from_secs(24 * 3600);
/// While Redis is down, how often one call probes it.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause between attempts to re-subscribe.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(250);
/// How often the subscription is pinged.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Silence on the subscription after which it counts as dead: with pings
/// every `PING_EVERY`, a dead subscription is noticed within 2 s.
const SILENCE_LIMIT: Duration = Duration::from_millis(1250);
/// How often a waiter looks at Redis when no "filled" message came: a lock
/// whose holder died costs a few calls a second.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// Takes the lock when it is free; returns whether it did, the key's
/// generation and its current value either way. A generation below the
/// lowest this replica accepts (Redis lost it) is raised to it first.
const CLAIM: &str = r"
local value = redis.call('GET', KEYS[1]) or ''
local generation = redis.call('GET', KEYS[3]) or '0'
if tonumber(generation) < tonumber(ARGV[3]) then
  generation = ARGV[3]
  redis.call('SET', KEYS[3], generation, 'PX', ARGV[4])
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, generation, value}
end
return {0, generation, value}
";

/// Writes (or, given an empty value, deletes) the entry only if the key's
/// generation is still the one the fetch began with, then releases the lock
/// if this fetch still holds it and wakes the replicas waiting for it.
const STORE: &str = r"
local stored = 0
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  end
  stored = 1
end
if redis.call('GET', KEYS[3]) == ARGV[2] then
  redis.call('DEL', KEYS[3])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return stored
";

/// Compare-and-delete: releases the lock only if this fetch holds it, and
/// wakes the waiters so one of them takes it.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

/// Drops the entry, moves the generation on and tells every replica;
/// returns the new generation. A generation is at least Redis's clock in
/// microseconds, so one made after Redis lost its keys (a restart, a restore)
/// is still above every generation a replica remembers.
const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local generation = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if generation < now then generation = now end
generation = string.format('%d', generation)
redis.call('SET', KEYS[2], generation, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[1], generation .. ':' .. ARGV[2])
return generation
";

/// GCRA on Redis's own clock: 0 when admitted, else microseconds to wait.
const RATE_LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return 0
";

/// Reachability of Redis, as the metrics and logs report it.
struct Health {
    up: AtomicBool,
    /// Milliseconds since `epoch` of the last probe while down.
    last_probe: AtomicU64,
    epoch: Instant,
}

impl Health {
    /// Whether this call should try Redis: always while up; while down, one
    /// call per `PROBE_INTERVAL`.
    fn usable(&self) -> bool {
        if self.up.load(Ordering::Acquire) {
            return true;
        }
        let now = self.now();
        let last = self.last_probe.load(Ordering::Acquire);
        now.saturating_sub(last) >= millis(PROBE_INTERVAL)
            && self
                .last_probe
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }
}

/// The replicas of this process waiting for a key's lock to be released.
#[derive(Default)]
struct Waiters(Mutex<HashMap<KeyName, Arc<WaitSlot>>>);

#[derive(Default)]
struct WaitSlot {
    /// Releases announced for this key; a waiter compares it with what it saw.
    releases: AtomicU64,
    notify: Notify,
}

impl Waiters {
    fn register(&self, name: &KeyName) -> Arc<WaitSlot> {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(name.clone()).or_default().clone()
    }

    fn release(&self, name: &KeyName, slot: Arc<WaitSlot>) {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and the one being dropped.
        if Arc::strong_count(&slot) <= 2 {
            slots.remove(name);
        }
    }

    fn wake(&self, name: &KeyName) {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(name) {
            slot.releases.fetch_add(1, Ordering::AcqRel);
            slot.notify.notify_waiters();
        }
    }
}

struct Inner {
    nodes: Nodes,
    timeout: Duration,
    /// How long a replica waits for another's fetch: `upstream.timeout`.
    wait: Duration,
    lock_ttl: Duration,
    min_replicas: u32,
    sealer: Sealer,
    health: Health,
    /// The lowest generation this replica accepts per identity, from the
    /// invalidations it saw; kept as long as a value can be served.
    invalidated: moka::sync::Cache<Identity, u64>,
    waiters: Waiters,
    /// Whether the invalidation subscription is live.
    in_sync: AtomicBool,
    metrics: Arc<Metrics>,
    claim: Script,
    store: Script,
    unlock: Script,
    invalidate: Script,
    rate_limit: Script,
}

/// The Redis tier; clones share one connection.
#[derive(Clone)]
pub struct RedisTier(Arc<Inner>);

impl RedisTier {
    /// The Redis tier `settings` ask for, if any. `wait` is the longest a
    /// vendor fetch can take, so a lock outlives its holder's fetch.
    pub fn from_settings(
        settings: &CacheSettings,
        wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(form) = settings.redis_form() else {
            return Ok(None);
        };
        let Some(key_file) = &settings.encryption_key_file else {
            return Err(ConfigError::invalid(
                "cache.encryption_key_file",
                "is required with a Redis",
            ));
        };
        let sealer = Sealer::from_file(key_file)?;
        let password: Option<SecretString> = settings
            .redis_password_file
            .as_deref()
            .map(|path| read_secret_file("cache.redis_password_file", path))
            .transpose()?;
        let nodes = Nodes::new(
            form,
            Options {
                password,
                tls: settings.redis_tls,
                timeout: settings.redis_timeout,
            },
        )?;
        metrics.shared_cache_up.set(1);
        Ok(Some(Self(Arc::new(Inner {
            nodes,
            timeout: settings.redis_timeout,
            wait,
            lock_ttl: wait + Duration::from_secs(1),
            min_replicas: settings.redis_min_replicas,
            sealer,
            // Taken as reachable until a call or the subscription fails.
            health: Health {
                up: AtomicBool::new(true),
                last_probe: AtomicU64::new(0),
                epoch: Instant::now(),
            },
            // Never bounded by count: an invalidation it forgot could be undone.
            invalidated: moka::sync::Cache::builder()
                .time_to_live(settings.ttl + settings.stale_if_error)
                .build(),
            waiters: Waiters::default(),
            in_sync: AtomicBool::new(false),
            metrics,
            claim: Script::new(CLAIM),
            store: Script::new(STORE),
            unlock: Script::new(UNLOCK),
            invalidate: Script::new(INVALIDATE),
            rate_limit: Script::new(RATE_LIMIT),
        }))))
    }

    /// Reads what Redis holds for `identity` in its current generation.
    async fn get(&self, identity: &Identity) -> Option<Stored> {
        let name = self.0.sealer.name(identity);
        let keys = [entry_key(&name), generation_key(&name)];
        let (value, generation): (Option<Vec<u8>>, Option<u64>) = self
            .call("get", |mut connection| {
                let mut get = redis::cmd("MGET");
                get.arg(&keys);
                async move { get.query_async(&mut connection).await }
            })
            .await?;
        self.accept(identity, &value?, generation.unwrap_or(0))
    }

    /// Takes the fetch lock of `identity` if it is free. `None`: Redis
    /// cannot be asked.
    async fn claim(&self, identity: &Identity, name: &KeyName) -> Option<Claimed> {
        let owner = format!("{:032x}", rand::random::<u128>());
        let mut invocation = self.0.claim.prepare_invoke();
        invocation
            .key(entry_key(name))
            .key(lock_key(name))
            .key(generation_key(name))
            .arg(&owner)
            .arg(millis(self.0.lock_ttl))
            .arg(self.lowest_generation(identity))
            .arg(millis(GENERATION_TTL));
        let (acquired, generation, value): (i64, String, Vec<u8>) =
            self.call("claim", invoking(invocation)).await?;
        let generation = generation.parse().unwrap_or(0);
        let current = self.accept(identity, &value, generation);
        Some(if acquired == 1 {
            Claimed::Acquired(Permit {
                current,
                held: Some(Held {
                    tier: self.clone(),
                    identity: identity.clone(),
                    name: name.clone(),
                    owner,
                    generation,
                    released: false,
                }),
            })
        } else {
            Claimed::Held(current)
        })
    }

    /// A value read from Redis, if it opens for `identity` and belongs to
    /// `generation` (Redis's current one) and to no generation this replica
    /// saw invalidated.
    fn accept(&self, identity: &Identity, value: &[u8], generation: u64) -> Option<Stored> {
        if value.is_empty() {
            return None;
        }
        let Some(opened) = self.0.sealer.open(identity, value) else {
            self.0.metrics.shared_cache_value_refused("undecryptable");
            tracing::warn!("a shared cache value does not decrypt for its key; ignoring it");
            return None;
        };
        if opened.generation != generation || opened.generation < self.lowest_generation(identity) {
            self.0
                .metrics
                .shared_cache_value_refused("stale_generation");
            tracing::warn!(
                "a shared cache value from before an invalidation of its key came back; refusing it"
            );
            return None;
        }
        Some(opened.stored)
    }

    fn lowest_generation(&self, identity: &Identity) -> u64 {
        self.0.invalidated.get(identity).unwrap_or(0)
    }

    /// Remembers that `identity` was invalidated into `generation`.
    fn remember_invalidation(&self, identity: &Identity, generation: u64) {
        self.0
            .invalidated
            .entry_by_ref(identity)
            .and_upsert_with(|seen| seen.map_or(generation, |e| (*e.value()).max(generation)));
    }

    /// Drops the entry, moves the generation on, tells every replica, and
    /// waits for `redis_min_replicas` to hold it.
    async fn invalidate_shared(&self, identity: &Identity) -> Result<(), NotShared> {
        let name = self.0.sealer.name(identity);
        let entry = entry_key(&name);
        let mut invocation = self.0.invalidate.prepare_invoke();
        invocation
            .key(&entry)
            .key(generation_key(&name))
            .arg(INVALIDATED)
            .arg(self.0.sealer.seal_identity(identity))
            .arg(millis(GENERATION_TTL));
        let min_replicas = self.0.min_replicas;
        let timeout = self.0.timeout;
        let invocation = invoking::<String>(invocation);
        let (generation, replicas): (String, u32) = self
            .call("invalidate", |mut connection| {
                let invoked = invocation(connection.clone());
                let entry = &entry;
                async move {
                    let generation = invoked.await?;
                    if min_replicas == 0 {
                        return Ok((generation, 0));
                    }
                    // Half the bound for WAIT itself, so its answer still arrives in time.
                    let replicas = connection
                        .wait_replicas(entry, min_replicas, timeout / 2)
                        .await?;
                    Ok((generation, replicas))
                }
            })
            .await
            .ok_or(NotShared)?;
        if let Ok(generation) = generation.parse() {
            self.remember_invalidation(identity, generation);
        }
        // Counted, but not a sign of an unreachable Redis: only this DELETE fails.
        let metrics = &self.0.metrics;
        if replicas < min_replicas {
            metrics.shared_cache_operation("replicate", "error");
            tracing::warn!(
                replicas,
                min_replicas,
                "too few Redis replicas acknowledged an invalidation; it is not confirmed"
            );
            return Err(NotShared);
        }
        if min_replicas > 0 {
            metrics.shared_cache_operation("replicate", "ok");
        }
        Ok(())
    }

    /// Runs one Redis call within `redis_timeout`, counting it and tracking
    /// health; `None` when Redis is down, failed or too slow.
    async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: Fn(Commands) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.0.health.usable() {
            return None;
        }
        let result = tokio::time::timeout(self.0.timeout, async {
            match call(self.0.nodes.commands().await?).await {
                Err(error) if safe_to_repeat(&error) => {
                    self.0.nodes.failed(&error);
                    call(self.0.nodes.commands().await?).await
                }
                other => other,
            }
        })
        .await;
        match result {
            Ok(Ok(value)) => {
                self.record(op, "ok");
                Some(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(op, kind = ?error.kind(), "shared cache call failed");
                self.0.nodes.failed(&error);
                self.record(
                    op,
                    if error.is_timeout() {
                        "timeout"
                    } else {
                        "error"
                    },
                );
                None
            }
            Err(_) => {
                self.0
                    .nodes
                    .failed(&redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                self.record(op, "timeout");
                None
            }
        }
    }

    /// Counts an operation; a command's result also sets reachability, and a
    /// change of it is logged once.
    fn record(&self, op: &'static str, result: &'static str) {
        self.0.metrics.shared_cache_operation(op, result);
        let up = result == "ok";
        if up && op == "subscribe" {
            // Only a command proves the connection that commands use.
            return;
        }
        let health = &self.0.health;
        if health.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        self.0.metrics.shared_cache_up.set(i64::from(up));
        if up {
            tracing::info!("shared cache reachable; sharing tokens with the other replicas");
        } else {
            health.last_probe.store(health.now(), Ordering::Release);
            tracing::warn!(
                op,
                result,
                "shared cache unreachable; serving from memory and the vendor, rate limits per replica"
            );
        }
    }

    fn set_in_sync(&self, in_sync: bool) {
        self.0.in_sync.store(in_sync, Ordering::Release);
        self.0
            .metrics
            .shared_cache_subscribed
            .set(i64::from(in_sync));
    }

    /// Listens on both channels until `stop`, pinging the subscription;
    /// a lost or silent one sends `Event::Lost` at once and is made again.
    async fn subscribe(self, sink: EventSink, stop: CancellationToken) {
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
                    self.record("subscribe", "ok");
                    // Invalidations sent while this replica was not listening were missed.
                    sink(Event::Lost);
                    self.set_in_sync(true);
                    if self.listen(pubsub, &sink, &stop).await.is_break() {
                        return;
                    }
                    self.set_in_sync(false);
                    self.record("subscribe", "error");
                    self.0.metrics.shared_cache_subscription_losses.inc();
                    sink(Event::Lost);
                    tracing::warn!(
                        "invalidation subscription lost or silent; dropped every local entry, subscribing again"
                    );
                }
                Ok(Err(error)) => {
                    self.0.nodes.failed(&error);
                    self.record("subscribe", "error");
                }
                Err(_) => self.record("subscribe", "timeout"),
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
                    if !self.0.health.up.load(Ordering::Acquire) {
                        // Commands were failing: probe them (once a second, as
                        // `call` allows), so a replica serving only hits still
                        // finds Redis back.
                        let tier = self.clone();
                        tokio::spawn(async move {
                            let _: Option<String> = tier
                                .call("probe", |mut connection| async move {
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
                        self.0.metrics.shared_cache_value_refused("undecryptable");
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

/// What `claim` found.
enum Claimed {
    Acquired(Permit),
    Held(Option<Stored>),
}

impl SharedTier for RedisTier {
    fn lookup<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Option<Stored>> {
        Box::pin(async move {
            if !self.in_sync() {
                return None;
            }
            self.get(identity).await
        })
    }

    fn lock<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Lock> {
        Box::pin(async move {
            if !self.in_sync() {
                return Lock::Write(Permit::alone());
            }
            let name = self.0.sealer.name(identity);
            // Registered before the claim, so a release right after it is not missed.
            let slot = self.0.waiters.register(&name);
            let seen = slot.releases.load(Ordering::Acquire);
            match self.claim(identity, &name).await {
                None => {
                    self.0.waiters.release(&name, slot);
                    Lock::Write(Permit::alone())
                }
                Some(Claimed::Acquired(permit)) => {
                    self.0.waiters.release(&name, slot);
                    Lock::Write(permit)
                }
                Some(Claimed::Held(current)) => Lock::Read(Waiter {
                    tier: self.clone(),
                    identity: identity.clone(),
                    name,
                    slot: Some(slot),
                    seen,
                    current,
                    deadline: Instant::now() + self.0.wait,
                }),
            }
        })
    }

    fn invalidate<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Result<(), NotShared>> {
        Box::pin(self.invalidate_shared(identity))
    }

    fn admit<'a>(
        &'a self,
        client: &'a str,
        per_minute: NonZeroU32,
    ) -> TierFuture<'a, Option<Result<(), Duration>>> {
        Box::pin(async move {
            let interval = 60_000_000 / u64::from(per_minute.get());
            let tolerance = interval * u64::from(per_minute.get() - 1);
            let mut invocation = self.0.rate_limit.prepare_invoke();
            invocation
                .key(format!("{PREFIX}:rate:{{{client}}}"))
                .arg(interval)
                .arg(tolerance);
            let wait: i64 = self.call("rate_limit", invoking(invocation)).await?;
            Some(match u64::try_from(wait) {
                Ok(0) | Err(_) => Ok(()),
                Ok(micros) => Err(Duration::from_micros(micros)),
            })
        })
    }

    fn in_sync(&self) -> bool {
        self.0.in_sync.load(Ordering::Acquire)
    }

    fn start(&self, sink: EventSink, stop: CancellationToken) {
        tokio::spawn(self.clone().subscribe(sink, stop));
    }
}

/// A held fetch lock: `publish` stores the answer and releases it; dropped
/// unpublished, it is released all the same.
pub struct Held {
    tier: RedisTier,
    identity: Identity,
    name: KeyName,
    owner: String,
    generation: u64,
    released: bool,
}

impl Held {
    pub(super) async fn publish(mut self, value: Option<&Stored>, ttl: Duration) {
        self.released = true;
        let sealed = value.map(|v| self.tier.0.sealer.seal(&self.identity, self.generation, v));
        let mut invocation = self.tier.0.store.prepare_invoke();
        invocation
            .key(entry_key(&self.name))
            .key(generation_key(&self.name))
            .key(lock_key(&self.name))
            .arg(self.generation)
            .arg(&self.owner)
            .arg(sealed.unwrap_or_default())
            .arg(millis(ttl).max(1))
            .arg(FILLED)
            .arg(&self.name.0);
        let stored: Option<i64> = self.tier.call("store", invoking(invocation)).await;
        if stored == Some(0) {
            tracing::debug!("key invalidated during the fetch; its answer is not shared");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let tier = self.tier.clone();
        let name = self.name.clone();
        let owner = std::mem::take(&mut self.owner);
        runtime.spawn(async move {
            let mut invocation = tier.0.unlock.prepare_invoke();
            invocation
                .key(lock_key(&name))
                .arg(&owner)
                .arg(FILLED)
                .arg(&name.0);
            let _: Option<i64> = tier.call("unlock", invoking(invocation)).await;
        });
    }
}

/// Waiting for another replica's fetch of one identity: woken when its lock
/// is released, else looking again every `FALLBACK_POLL`, until `upstream.timeout`.
pub struct Waiter {
    tier: RedisTier,
    identity: Identity,
    name: KeyName,
    slot: Option<Arc<WaitSlot>>,
    seen: u64,
    /// What Redis held when the wait began.
    current: Option<Stored>,
    deadline: Instant,
}

/// What a waiter got.
pub enum Next {
    /// What Redis holds now (possibly too old for the caller: wait again).
    Value(Stored),
    /// The lock was free: this replica fetches.
    Write(Permit),
}

impl Waiter {
    /// What Redis held when the wait began.
    pub fn take_current(&mut self) -> Option<Stored> {
        self.current.take()
    }

    /// The next thing worth looking at; `None` once `upstream.timeout` has
    /// passed or Redis cannot be asked (the caller then asks the vendor alone).
    pub async fn next(&mut self) -> Option<Next> {
        let slot = self.slot.clone()?;
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return None;
            }
            let woken = slot.notify.notified();
            if slot.releases.load(Ordering::Acquire) == self.seen {
                let pause = FALLBACK_POLL.min(self.deadline - now);
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
            self.seen = slot.releases.load(Ordering::Acquire);
            match self.tier.claim(&self.identity, &self.name).await? {
                Claimed::Acquired(permit) => return Some(Next::Write(permit)),
                Claimed::Held(Some(value)) => return Some(Next::Value(value)),
                Claimed::Held(None) => continue,
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.tier.0.waiters.release(&self.name, slot);
        }
    }
}

/// A script call that can be made again (after a failover, say).
fn invoking<'a, T: redis::FromRedisValue + Send + 'a>(
    invocation: redis::ScriptInvocation<'a>,
) -> impl Fn(Commands) -> TierFuture<'a, redis::RedisResult<T>> + 'a {
    let invocation = Arc::new(invocation);
    move |mut connection| {
        let invocation = invocation.clone();
        Box::pin(async move { invocation.invoke_async(&mut connection).await })
    }
}

/// Whether a failed call certainly did not run, so it may be made again at
/// once on a new connection: a demoted primary (`READONLY`), a refused connection.
fn safe_to_repeat(error: &redis::RedisError) -> bool {
    error.is_connection_refusal()
        || error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

fn entry_key(name: &KeyName) -> String {
    format!("{PREFIX}:{{{}}}:entry", name.0)
}

fn lock_key(name: &KeyName) -> String {
    format!("{PREFIX}:{{{}}}:lock", name.0)
}

fn generation_key(name: &KeyName) -> String {
    format!("{PREFIX}:{{{}}}:generation", name.0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
