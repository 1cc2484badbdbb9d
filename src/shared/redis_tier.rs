//! The shared tier on Redis: sealed answers, the per-identity fetch lock,
//! generations, the invalidation and "filled" channels, and the fleet-wide
//! rate limit, in any of the three forms of `nodes`.
//!
//! Every key of one identity carries the same hash tag (`{name}`), so in a
//! Cluster they live in one slot and the scripts that touch several of them run.
//!
//! Invalidations cannot be lost, forged or rolled back:
//! - the message carries the identity, its new generation and the fleet's
//!   invalidation sequence, sealed together under the encryption key: applying
//!   it needs no map that could have forgotten the name, and a publisher
//!   without the key can neither forge one nor change its generation. A
//!   message that does not open counts as a lost subscription;
//! - every value is sealed with the fleet's epoch and its key's generation,
//!   and this replica remembers the generation each invalidation it saw moved
//!   to (`Remembered`: bounded by `cache.max_entries`, for `ttl +
//!   stale_if_error`), so a value from before it is refused even if Redis
//!   gives it back (a restored snapshot, a lagging replica promoted, a
//!   hand-made write);
//! - the fleet's memory (`fleet`): every invalidation advances a fleet-wide
//!   sequence. A replica that sees Redis hold less than it knows (a lower
//!   sequence, epoch or generation, or a counter no replica wrote) raises the
//!   epoch past it, and every replica, including one started afterwards,
//!   then refuses everything sealed before. A restore is undone as long as
//!   one replica that saw the invalidation runs;
//! - the subscription proves it hears the fleet: every `CANARY_EVERY` this
//!   replica publishes a sealed canary through its command connection (with
//!   the read of the epoch and sequence, in one round trip) and expects it
//!   back on its subscription, and every invalidation number the canary read
//!   to have been heard soon after; silence for `SILENCE_LIMIT`, or a
//!   number never heard, counts as lost:
//!   the broker drops every local entry at once and this replica
//!   re-subscribes (and drops them again once its canary comes back).
//!
//! Redis trouble degrades, never fails: every call is bounded by
//! `cache.redis_timeout`, and a failed or slow call makes the replica act as
//! if there were no Redis. While Redis is down, one call a second probes it;
//! the others skip it. Each change of state is logged once and shown in
//! `token_broker_shared_cache_up`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::Script;
use secrecy::SecretString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod fleet;
mod scripts;
mod subscription;
mod waiting;

use super::nodes::{Commands, Nodes, Options};
use super::protocol::{self, Claim, HeldLock, LockedStore};
use super::sealed::{KeyName, Message, Sealed, Sealer, Stored};
use super::{EventSink, Fill, FleetLimiter, NotShared, Publish, SharedTier, TierFuture};
use crate::breaker::{Breaker, Change, Ticket};
use crate::config::{CacheSettings, ConfigError, SharedRedis, read_secret_file};
use crate::domain::Identity;
use crate::remembered::{Lowest, Remembered};
use crate::telemetry::metrics::{Metrics, SharedCacheOp, SharedCacheResult, ValueRefusal};
use fleet::Fleet;
use scripts::{RATE_LIMIT, STORE, UNLOCK, believable};
use waiting::{Waiter, Waiters};

/// Prefix of every key this service writes; the version changes with the layout.
const PREFIX: &str = "token-broker:v3";
/// Where invalidations and epoch raises are published: a sealed `Message`.
const INVALIDATED: &str = "token-broker:v3:invalidated";
/// Where a released fetch lock is announced: the key name.
const FILLED: &str = "token-broker:v3:filled";
/// The fleet's epoch and invalidation sequence, a hash in a slot of its own.
const FLEET: &str = "token-broker:v3:{fleet}";
/// How much longer a generation lives in Redis than a replica remembers it,
/// so a replica never takes a generation that simply expired for a rollback.
const GENERATION_MARGIN: Duration = Duration::from_secs(60);
/// While Redis is down, how often one call probes it.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

struct Inner {
    nodes: Nodes,
    timeout: Duration,
    /// How long a replica waits for another's fetch: `upstream.timeout`.
    wait: Duration,
    lock_ttl: Duration,
    /// How long a generation lives in Redis: `ttl + stale_if_error` and a margin.
    generation_ttl: Duration,
    min_replicas: u32,
    sealer: Sealer,
    /// Reachability: opens at the first failed call; while open, one call
    /// per `PROBE_INTERVAL` tries Redis.
    breaker: Breaker,
    /// The lowest generation this replica accepts per identity, from the
    /// invalidations it saw; kept as long as a value can be served.
    invalidated: Remembered,
    /// What this replica knows of the fleet: its epoch and sequence.
    fleet: Fleet,
    waiters: Waiters,
    /// Whether the subscription is live and heard this replica's canary.
    in_sync: AtomicBool,
    /// Where events go, once `start` was called.
    sink: std::sync::OnceLock<EventSink>,
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
        let Some(SharedRedis {
            form,
            encryption_key_file,
        }) = settings.shared_redis()
        else {
            return Ok(None);
        };
        let sealer = Sealer::from_file(encryption_key_file)?;
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
            generation_ttl: settings.ttl + settings.stale_if_error + GENERATION_MARGIN,
            min_replicas: settings.redis_min_replicas,
            sealer,
            // Taken as reachable until a call or the subscription fails.
            breaker: Breaker::new(1, PROBE_INTERVAL),
            invalidated: Remembered::new(
                settings.max_entries,
                settings.ttl + settings.stale_if_error,
            ),
            fleet: Fleet::new(),
            waiters: Waiters::default(),
            in_sync: AtomicBool::new(false),
            sink: std::sync::OnceLock::new(),
            metrics,
            claim: Script::new(&scripts::claim()),
            store: Script::new(STORE),
            unlock: Script::new(UNLOCK),
            invalidate: Script::new(&scripts::invalidate()),
            rate_limit: Script::new(RATE_LIMIT),
        }))))
    }

    /// Reads what Redis holds for `identity` in its current generation.
    async fn get(&self, identity: &Identity) -> Option<Stored> {
        let name = self.0.sealer.name(identity);
        let keys = [entry_key(&name), generation_key(&name)];
        // Read before asking: an invalidation heard meanwhile is no rollback.
        let lowest = self.0.invalidated.get(identity);
        let (value, generation): (Option<Vec<u8>>, Option<String>) = self
            .call(SharedCacheOp::Get, |mut connection| {
                let mut get = redis::cmd("MGET");
                get.arg(&keys);
                async move { get.query_async(&mut connection).await }
            })
            .await?;
        let generation = match generation {
            None => 0,
            // A generation no replica wrote: nothing sealed can belong to it.
            Some(text) => believable(&text)?,
        };
        if let Lowest::Exact(lowest) = lowest
            && generation < lowest
        {
            self.rolled_back("a generation below an invalidation this replica saw");
        }
        self.accept(identity, &value?, generation, lowest)
    }

    /// Takes the fetch lock of `identity` if it is free. `None`: Redis
    /// cannot be asked.
    async fn claim_lock(&self, identity: &Identity, name: &KeyName) -> Option<Claim<FetchLock>> {
        let owner = format!("{:032x}", rand::random::<u128>());
        let lowest = self.0.invalidated.get(identity);
        let epoch = self.0.fleet.view.epoch();
        let mut invocation = self.0.claim.prepare_invoke();
        invocation
            .key(entry_key(name))
            .key(lock_key(name))
            .key(generation_key(name))
            .arg(&owner)
            .arg(millis(self.0.lock_ttl))
            .arg(lowest.value())
            .arg(millis(self.0.generation_ttl));
        let (acquired, generation, value, odd): (i64, String, Vec<u8>, i64) = self
            .call(SharedCacheOp::Claim, invoking(invocation))
            .await?;
        match (odd, lowest) {
            (2, _) => self.rolled_back("a generation no replica wrote"),
            (1, Lowest::Exact(_)) => {
                self.rolled_back("a generation below an invalidation this replica saw");
            }
            _ => {}
        }
        let generation = believable(&generation)?;
        let current = self.accept(identity, &value, generation, lowest);
        Some(if acquired == 1 {
            Claim::Ours {
                current,
                lock: FetchLock {
                    tier: self.clone(),
                    identity: identity.clone(),
                    name: name.clone(),
                    owner,
                    sealed: Sealed { epoch, generation },
                    released: false,
                },
            }
        } else {
            Claim::Theirs(current)
        })
    }

    /// A value read from Redis, if it opens for `identity`, belongs to the
    /// fleet's epoch this replica knows and to `generation` (Redis's current
    /// one), and is not below `lowest` (what this replica saw invalidated).
    fn accept(
        &self,
        identity: &Identity,
        value: &[u8],
        generation: u64,
        lowest: Lowest,
    ) -> Option<Stored> {
        if value.is_empty() {
            return None;
        }
        let Some(opened) = self.0.sealer.open(identity, value) else {
            self.0
                .metrics
                .shared_cache_value_refused(ValueRefusal::Undecryptable);
            tracing::warn!("a shared cache value does not decrypt for its key; ignoring it");
            return None;
        };
        if opened.sealed.epoch != self.0.fleet.view.epoch() {
            self.0
                .metrics
                .shared_cache_value_refused(ValueRefusal::StaleEpoch);
            return None;
        }
        if opened.sealed.generation != generation || opened.sealed.generation < lowest.value() {
            // Counted (and alerted on), not logged per lookup: a restored
            // snapshot brings back many at once.
            self.0
                .metrics
                .shared_cache_value_refused(ValueRefusal::StaleGeneration);
            tracing::debug!(
                "a shared cache value from before an invalidation of its key came back; refusing it"
            );
            return None;
        }
        Some(opened.stored)
    }

    /// Tells the broker (once `start` gave a sink).
    fn emit(&self, event: super::Event) {
        if let Some(sink) = self.0.sink.get() {
            sink(event);
        }
    }

    /// Advances the fleet's sequence, drops the entry, moves the generation
    /// on, tells every replica, and waits for `redis_min_replicas` to hold
    /// it. `Ok` only when every step clearly succeeded.
    async fn invalidate_shared(&self, identity: &Identity) -> Result<(), NotShared> {
        let sequence = self.advance().await.ok_or(NotShared)?;
        let name = self.0.sealer.name(identity);
        let entry = entry_key(&name);
        let mut invocation = self.0.invalidate.prepare_invoke();
        invocation
            .key(&entry)
            .key(generation_key(&name))
            .arg(millis(self.0.generation_ttl))
            .arg(self.0.invalidated.get(identity).value());
        let min_replicas = self.0.min_replicas;
        let timeout = self.0.timeout;
        let invocation = invoking::<(String, i64)>(invocation);
        let sealer = &self.0.sealer;
        let moved: Moved = self
            .call(SharedCacheOp::Invalidate, |mut connection| {
                let invoked = invocation(connection.clone());
                let entry = &entry;
                async move {
                    let (generation, replaced) = invoked.await?;
                    let mut moved = Moved {
                        generation: believable(&generation),
                        replaced: replaced == 1,
                        replicas: 0,
                    };
                    let Some(generation) = moved.generation else {
                        return Ok(moved);
                    };
                    let message = sealer.seal_message(&Message::Invalidated {
                        identity: identity.clone(),
                        generation,
                        sequence,
                    });
                    let _: i64 = redis::cmd("PUBLISH")
                        .arg(INVALIDATED)
                        .arg(message)
                        .query_async(&mut connection)
                        .await?;
                    if min_replicas > 0 {
                        // Half the bound for WAIT itself, so its answer still arrives in time.
                        moved.replicas = connection
                            .wait_replicas(entry, min_replicas, timeout / 2)
                            .await?;
                    }
                    Ok(moved)
                }
            })
            .await
            .ok_or(NotShared)?;
        if moved.replaced {
            // Redis held a generation no replica wrote: whatever was sealed
            // against the old one must go everywhere before this DELETE is
            // confirmed.
            self.raise_epoch("a generation no replica wrote")
                .await
                .ok_or(NotShared)?;
        }
        let (generation, replicas) = (moved.generation, moved.replicas);
        let Some(generation) = generation else {
            tracing::warn!(
                "the invalidation left a generation out of range in Redis; it is not confirmed (the next one replaces it)"
            );
            return Err(NotShared);
        };
        self.0.invalidated.raise(identity, generation);
        // Counted, but not a sign of an unreachable Redis: only this DELETE fails.
        let metrics = &self.0.metrics;
        if replicas < min_replicas {
            metrics.shared_cache_operation(SharedCacheOp::Replicate, SharedCacheResult::Error);
            tracing::warn!(
                replicas,
                min_replicas,
                "too few Redis replicas acknowledged an invalidation; it is not confirmed"
            );
            return Err(NotShared);
        }
        if min_replicas > 0 {
            metrics.shared_cache_operation(SharedCacheOp::Replicate, SharedCacheResult::Ok);
        }
        Ok(())
    }

    /// Runs one Redis call within `redis_timeout`, counting it and tracking
    /// health; `None` when Redis is down, failed or too slow.
    async fn call<T, F, Fut>(&self, op: SharedCacheOp, call: F) -> Option<T>
    where
        F: Fn(Commands) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let ticket = self.0.breaker.admit().ok()?;
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
                self.record(op, SharedCacheResult::Ok, Some(ticket));
                Some(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(op = op.as_str(), kind = ?error.kind(), "shared cache call failed");
                self.0.nodes.failed(&error);
                let result = if error.is_timeout() {
                    SharedCacheResult::Timeout
                } else {
                    SharedCacheResult::Error
                };
                self.record(op, result, Some(ticket));
                None
            }
            Err(_) => {
                self.0
                    .nodes
                    .failed(&redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                self.record(op, SharedCacheResult::Timeout, Some(ticket));
                None
            }
        }
    }

    /// Counts an operation. A command's result (`ticket`: the breaker let it
    /// through) also sets reachability; so does a failed subscription, but
    /// only a command proves the connection that commands use. A change of
    /// reachability is logged once.
    fn record(&self, op: SharedCacheOp, result: SharedCacheResult, ticket: Option<Ticket<'_>>) {
        self.0.metrics.shared_cache_operation(op, result);
        let change = match (ticket, result == SharedCacheResult::Ok) {
            (Some(ticket), true) => ticket.succeeded(),
            (Some(ticket), false) => ticket.failed(),
            (None, true) => None,
            (None, false) => self.0.breaker.failed(),
        };
        match change {
            Some(Change::Closed) => {
                self.0.metrics.shared_cache_up.set(1);
                tracing::info!("shared cache reachable; sharing tokens with the other replicas");
            }
            Some(Change::Opened { .. }) => {
                self.0.metrics.shared_cache_up.set(0);
                tracing::warn!(
                    op = op.as_str(),
                    result = result.as_str(),
                    "shared cache unreachable; serving from memory and the vendor, rate limits per replica"
                );
            }
            Some(Change::Reopened) | None => {}
        }
    }
}

/// What an invalidation's script, publish and `WAIT` came to.
struct Moved {
    /// The key's new generation; `None` if Redis answered one out of range.
    generation: Option<u64>,
    /// The generation Redis held was not believable, and was replaced.
    replaced: bool,
    /// Redis replicas that acknowledged it (0 without `redis_min_replicas`).
    replicas: u32,
}

impl LockedStore for RedisTier {
    type Waiting = Waiter;

    async fn look(&self, identity: &Identity) -> Option<Stored> {
        self.get(identity).await
    }

    async fn claim(&self, identity: &Identity) -> (Option<Claim<FetchLock>>, Waiter) {
        let name = self.0.sealer.name(identity);
        let waiter = Waiter::register(self, identity, &name, Instant::now() + self.0.wait);
        (self.claim_lock(identity, &name).await, waiter)
    }
}

impl SharedTier for RedisTier {
    fn fill<'a>(&'a self, identity: &'a Identity, fill: &'a dyn Fill) -> TierFuture<'a, ()> {
        Box::pin(protocol::fill(self, identity, fill))
    }

    fn invalidate<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Result<(), NotShared>> {
        Box::pin(self.invalidate_shared(identity))
    }

    fn in_sync(&self) -> bool {
        self.0.in_sync.load(Ordering::Acquire)
    }

    fn start(&self, sink: EventSink, stop: CancellationToken) {
        if self.0.sink.set(sink).is_err() {
            tracing::debug!("the shared tier was started twice; the first listener stays");
            return;
        }
        tokio::spawn(self.clone().subscribe(stop));
    }
}

impl FleetLimiter for RedisTier {
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
            let wait: i64 = self
                .call(SharedCacheOp::RateLimit, invoking(invocation))
                .await?;
            Some(match u64::try_from(wait) {
                Ok(0) | Err(_) => Ok(()),
                Ok(micros) => Err(Duration::from_micros(micros)),
            })
        })
    }
}

/// A held fetch lock: `publish` stores the answer and releases it; dropped
/// unpublished, it is released all the same.
pub(super) struct FetchLock {
    tier: RedisTier,
    identity: Identity,
    name: KeyName,
    owner: String,
    /// The epoch and generation the fetch began in.
    sealed: Sealed,
    released: bool,
}

impl HeldLock for FetchLock {
    async fn publish(mut self, Publish { value, ttl }: Publish) {
        self.released = true;
        let sealer = &self.tier.0.sealer;
        let sealed = value.map(|v| sealer.seal(&self.identity, self.sealed, &v));
        let mut invocation = self.tier.0.store.prepare_invoke();
        invocation
            .key(entry_key(&self.name))
            .key(generation_key(&self.name))
            .key(lock_key(&self.name))
            .arg(self.sealed.generation)
            .arg(&self.owner)
            .arg(sealed.unwrap_or_default())
            .arg(millis(ttl).max(1))
            .arg(FILLED)
            .arg(&self.name.0)
            .arg(millis(self.tier.0.generation_ttl.max(ttl)));
        let stored: Option<i64> = self
            .tier
            .call(SharedCacheOp::Store, invoking(invocation))
            .await;
        if stored == Some(0) {
            tracing::debug!("key invalidated during the fetch; its answer is not shared");
        }
    }
}

impl Drop for FetchLock {
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
            let _: Option<i64> = tier.call(SharedCacheOp::Unlock, invoking(invocation)).await;
        });
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
