//! The shared cache (SPEC §9): one Redis behind every replica's moka cache.
//!
//! It holds the sealed answers (`sealed`), the per-key lock that lets one
//! replica at a time ask the vendor, the per-key generation that keeps a
//! fetch begun before an invalidation from storing its answer, the
//! invalidation channel, and the fleet-wide rate limits.
//!
//! Redis trouble degrades, never fails: every call is bounded by
//! `cache.redis_timeout`, and a failed or slow call makes the replica act as
//! if there were no Redis. While Redis is down, one request a second probes
//! it; the others skip it. Each change of state is logged once and shown in
//! `token_broker_shared_cache_up`.

pub mod sealed;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CacheSettings, ConfigError, read_secret_file};
use crate::domain::Identity;
use crate::telemetry::metrics::Metrics;
use sealed::{KeyName, Sealer, Stored};

/// Prefix of every key this service writes; the version changes with the layout.
const PREFIX: &str = "token-broker:v1";
/// Where invalidations are published; the message is the key name.
const CHANNEL: &str = "token-broker:v1:invalidate";
/// How long a generation outlives its last invalidation: far longer than any fetch.
const GENERATION_TTL: Duration = Duration::from_secs(24 * 3600);
/// While Redis is down, how often one request probes it.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause between attempts to re-subscribe to the invalidation channel.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// Takes the lock when it is free; returns whether it did, the key's
/// generation and its current value either way.
const CLAIM: &str = r"
local value = redis.call('GET', KEYS[1]) or ''
local generation = redis.call('GET', KEYS[3]) or '0'
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, generation, value}
end
return {0, generation, value}
";

/// Writes (or, given an empty value, deletes) the entry only if the key's
/// generation is still the one the fetch began with, then releases the lock
/// if this fetch still holds it.
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
return stored
";

/// Compare-and-delete: releases the lock only if this fetch holds it.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Drops the entry, moves the generation on and tells every replica.
const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
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

/// The outcome of `claim`.
pub enum Claim {
    /// This fetch holds the lock: it asks the vendor and stores the answer.
    Acquired { lock: Lock, current: Option<Stored> },
    /// Another fetch holds it; `current` is what Redis has meanwhile.
    Held { current: Option<Stored> },
}

/// A held fetch lock and the key's generation when it was taken.
pub struct Lock {
    owner: String,
    generation: String,
}

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
        now.saturating_sub(last) >= PROBE_INTERVAL.as_millis() as u64
            && self
                .last_probe
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }
}

struct Inner {
    client: redis::Client,
    connection: ConnectionManager,
    timeout: Duration,
    lock_ttl: Duration,
    sealer: Sealer,
    health: Health,
    metrics: Arc<Metrics>,
    claim: Script,
    store: Script,
    unlock: Script,
    invalidate: Script,
    rate_limit: Script,
}

/// The Redis tier; clones share one connection.
#[derive(Clone)]
pub struct SharedCache(Arc<Inner>);

impl SharedCache {
    /// The shared cache `settings` ask for, if any. Connects lazily: a Redis
    /// that is down at start is not an error. `fetch_bound` is the longest a
    /// vendor fetch can take, so a lock outlives its holder's fetch.
    pub fn from_settings(
        settings: &CacheSettings,
        fetch_bound: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &settings.redis_url else {
            return Ok(None);
        };
        let invalid = |message: String| ConfigError::Invalid {
            key: "cache.redis_url".into(),
            message,
        };
        let Some(key_file) = &settings.encryption_key_file else {
            return Err(ConfigError::Invalid {
                key: "cache.encryption_key_file".into(),
                message: "is required with cache.redis_url".into(),
            });
        };
        let sealer = Sealer::from_file(key_file)?;
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(format!("is not a usable Redis URL ({:?})", e.kind())))?;
        if let Some(path) = &settings.redis_password_file {
            let password = read_secret_file("cache.redis_password_file", path)?;
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        if url.scheme() == "rediss" {
            // Both rustls users (the vendor client and this one) share the process default.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let client = redis::Client::open(info)
            .map_err(|e| invalid(format!("cannot be used ({:?})", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.redis_timeout))
            .set_response_timeout(Some(settings.redis_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| invalid(format!("cannot be used ({:?})", e.kind())))?;
        metrics.shared_cache_up.set(1);
        Ok(Some(Self(Arc::new(Inner {
            client,
            connection,
            timeout: settings.redis_timeout,
            lock_ttl: fetch_bound + Duration::from_secs(1),
            sealer,
            // Taken as reachable until a call or the subscription fails.
            health: Health {
                up: AtomicBool::new(true),
                last_probe: AtomicU64::new(0),
                epoch: Instant::now(),
            },
            metrics,
            claim: Script::new(CLAIM),
            store: Script::new(STORE),
            unlock: Script::new(UNLOCK),
            invalidate: Script::new(INVALIDATE),
            rate_limit: Script::new(RATE_LIMIT),
        }))))
    }

    /// The Redis name of `identity` (a keyed hash).
    pub fn name(&self, identity: &Identity) -> KeyName {
        self.0.sealer.name(identity)
    }

    /// What Redis holds for `identity`; `None` when nothing usable is there
    /// or Redis cannot be asked.
    pub async fn get(&self, identity: &Identity, name: &KeyName) -> Option<Stored> {
        let mut connection = self.0.connection.clone();
        let key = entry_key(name);
        let value: Option<Vec<u8>> = self
            .call("get", async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        self.open(identity, &value?)
    }

    /// Takes the fetch lock of `name` if it is free. `None`: Redis cannot be asked.
    pub async fn claim(&self, identity: &Identity, name: &KeyName) -> Option<Claim> {
        let owner = format!("{:032x}", rand::random::<u128>());
        let mut connection = self.0.connection.clone();
        let mut invocation = self.0.claim.prepare_invoke();
        invocation
            .key(entry_key(name))
            .key(lock_key(name))
            .key(generation_key(name))
            .arg(&owner)
            .arg(millis(self.0.lock_ttl));
        let (acquired, generation, value): (i64, String, Vec<u8>) = self
            .call("claim", async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        let current = self.open(identity, &value);
        Some(if acquired == 1 {
            Claim::Acquired {
                lock: Lock { owner, generation },
                current,
            }
        } else {
            Claim::Held { current }
        })
    }

    /// Stores `value` (or deletes the entry, given `None`) for `ttl` unless an
    /// invalidation came after the fetch began, and releases `lock`.
    pub async fn store(
        &self,
        identity: &Identity,
        name: &KeyName,
        lock: Lock,
        value: Option<&Stored>,
        ttl: Duration,
    ) {
        let sealed = value.map(|v| self.0.sealer.seal(identity, v));
        let mut connection = self.0.connection.clone();
        let mut invocation = self.0.store.prepare_invoke();
        invocation
            .key(entry_key(name))
            .key(generation_key(name))
            .key(lock_key(name))
            .arg(lock.generation)
            .arg(lock.owner)
            .arg(sealed.unwrap_or_default())
            .arg(millis(ttl).max(1));
        let stored: Option<i64> = self
            .call("store", async move {
                invocation.invoke_async(&mut connection).await
            })
            .await;
        if stored == Some(0) {
            tracing::debug!("key invalidated during the fetch; its answer is not shared");
        }
    }

    /// Releases `lock` after a fetch that has nothing to store.
    pub async fn unlock(&self, name: &KeyName, lock: Lock) {
        let mut connection = self.0.connection.clone();
        let mut invocation = self.0.unlock.prepare_invoke();
        invocation.key(lock_key(name)).arg(lock.owner);
        let _: Option<i64> = self
            .call("unlock", async move {
                invocation.invoke_async(&mut connection).await
            })
            .await;
    }

    /// Drops the shared entry, moves the key's generation on and tells every
    /// replica to evict it. Returns whether Redis took it.
    pub async fn invalidate(&self, name: &KeyName) -> bool {
        let mut connection = self.0.connection.clone();
        let mut invocation = self.0.invalidate.prepare_invoke();
        invocation
            .key(entry_key(name))
            .key(generation_key(name))
            .arg(CHANNEL)
            .arg(&name.0)
            .arg(millis(GENERATION_TTL));
        let published: Option<i64> = self
            .call("invalidate", async move {
                invocation.invoke_async(&mut connection).await
            })
            .await;
        published.is_some()
    }

    /// Takes one request from `client`'s fleet-wide budget of `per_minute`
    /// (burst of the same size). `None`: Redis cannot be asked, so the caller
    /// falls back to its per-replica limiter.
    pub async fn admit(
        &self,
        client: &str,
        per_minute: NonZeroU32,
    ) -> Option<Result<(), Duration>> {
        let interval = 60_000_000 / u64::from(per_minute.get());
        let tolerance = interval * u64::from(per_minute.get() - 1);
        let mut connection = self.0.connection.clone();
        let mut invocation = self.0.rate_limit.prepare_invoke();
        invocation
            .key(format!("{PREFIX}:rate:{client}"))
            .arg(interval)
            .arg(tolerance);
        let wait: i64 = self
            .call("rate_limit", async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        Some(match u64::try_from(wait) {
            Ok(0) | Err(_) => Ok(()),
            Ok(micros) => Err(Duration::from_micros(micros)),
        })
    }

    /// Listens on the invalidation channel until `stop`: `evict` gets each
    /// invalidated key name; `resubscribed` runs after every (re)subscription,
    /// since invalidations sent while this replica was cut off were missed.
    pub fn spawn_subscriber(
        &self,
        evict: impl Fn(KeyName) + Send + Sync + 'static,
        resubscribed: impl Fn() + Send + Sync + 'static,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let connect_bound = shared.0.timeout.max(Duration::from_secs(1));
                let subscribed = tokio::time::timeout(connect_bound, async {
                    let mut pubsub = shared.0.client.get_async_pubsub().await?;
                    pubsub.subscribe(CHANNEL).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
                match subscribed {
                    Ok(Ok(pubsub)) => {
                        shared.record("subscribe", "ok");
                        resubscribed();
                        let mut messages = pubsub.into_on_message();
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                message = messages.next() => match message {
                                    Some(message) => evict(KeyName(
                                        String::from_utf8_lossy(message.get_payload_bytes()).into_owned(),
                                    )),
                                    None => break,
                                },
                            }
                        }
                        shared.record("subscribe", "error");
                    }
                    Ok(Err(_)) => shared.record("subscribe", "error"),
                    Err(_) => shared.record("subscribe", "timeout"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
                }
            }
        })
    }

    /// Runs one Redis call within `redis_timeout`, counting it and tracking
    /// health; `None` when Redis is down, failed or too slow.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.0.health.usable() {
            return None;
        }
        match tokio::time::timeout(self.0.timeout, call).await {
            Ok(Ok(value)) => {
                self.record(op, "ok");
                Some(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(op, kind = ?error.kind(), "shared cache call failed");
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
                self.record(op, "timeout");
                None
            }
        }
    }

    /// Counts an operation; a command's result (or a lost subscription)
    /// also sets reachability, and a change of it is logged once.
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

    fn open(&self, identity: &Identity, value: &[u8]) -> Option<Stored> {
        if value.is_empty() {
            return None;
        }
        let opened = self.0.sealer.open(identity, value);
        if opened.is_none() {
            tracing::warn!("a shared cache value does not decrypt for its key; ignoring it");
        }
        opened
    }
}

fn entry_key(name: &KeyName) -> String {
    format!("{PREFIX}:entry:{}", name.0)
}

fn lock_key(name: &KeyName) -> String {
    format!("{PREFIX}:lock:{}", name.0)
}

fn generation_key(name: &KeyName) -> String {
    format!("{PREFIX}:generation:{}", name.0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
