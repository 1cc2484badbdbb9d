//! The shared tier: the second cache level behind every replica's moka
//! cache, shaped like a cache lock. The broker asks it four things:
//!
//! - `lookup`: what the fleet already has for an identity;
//! - `lock`: `Write(permit)` (this replica asks the vendor and `publish`es the
//!   answer through the permit, which releases the lock on drop) or
//!   `Read(waiter)` (another replica is asking; the waiter is woken when the
//!   answer is stored);
//! - `invalidate`: every replica drops the identity, and confirms only what
//!   the fleet will hold;
//! - `admit`: the fleet-wide rate limit.
//!
//! With no Redis configured, `NoSharedTier` stands in: nothing to look up,
//! every lock is this replica's, invalidations are local. With Redis,
//! `redis_tier::RedisTier` keeps key naming, sealing, the lock protocol,
//! waking, subscription liveness and the remembered invalidations to itself.

pub mod nodes;
pub mod redis_tier;
pub mod sealed;

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{CacheSettings, ConfigError};
use crate::domain::Identity;
use crate::telemetry::metrics::Metrics;
pub use redis_tier::{Next, Waiter};
pub use sealed::{Stored, StoredAnswer};

/// A future the tier returns.
pub type TierFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the tier tells the broker of the rest of the fleet.
#[derive(Debug)]
pub enum Event {
    /// Another replica (or this one) invalidated the identity.
    Invalidated(Identity),
    /// Invalidations may have been missed (a lost or silent subscription):
    /// every local entry must go.
    Lost,
}

/// Receives the tier's events.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// The shared cache did not take an invalidation (unreachable, too slow, or
/// too few Redis replicas acknowledged it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared cache did not take the invalidation")]
pub struct NotShared;

/// The second cache level.
pub trait SharedTier: Send + Sync + 'static {
    /// What the fleet holds for `identity`, if it can be trusted.
    fn lookup<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Option<Stored>>;

    /// The right to fetch `identity` from the vendor, or a wait for whoever has it.
    fn lock<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Lock>;

    /// Makes every replica drop `identity`; `Ok` only once the fleet holds it.
    fn invalidate<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Result<(), NotShared>>;

    /// Takes one request from `client`'s fleet-wide budget; `None` when the
    /// fleet cannot be asked (the caller falls back to a per-replica limiter).
    fn admit<'a>(
        &'a self,
        client: &'a str,
        per_minute: NonZeroU32,
    ) -> TierFuture<'a, Option<Result<(), Duration>>>;

    /// Whether this replica hears every invalidation right now. While it
    /// does not, the broker keeps an answer only briefly.
    fn in_sync(&self) -> bool;

    /// Starts delivering events to `sink` until `stop`.
    fn start(&self, sink: EventSink, stop: CancellationToken);
}

/// The answer to `SharedTier::lock`: who asks the vendor.
pub enum Lock {
    /// This replica fetches: ask the vendor, then `publish` through the permit.
    Fetch(Permit),
    /// Another replica is fetching; wait for its answer.
    Wait(Waiter),
}

/// The right to fetch one identity and share the answer.
pub struct Permit {
    /// What the shared cache held when the lock was taken.
    pub current: Option<Stored>,
    held: Option<redis_tier::Held>,
}

impl Permit {
    /// A permit that shares nothing: no Redis, or Redis unusable now.
    pub fn alone() -> Self {
        Self {
            current: None,
            held: None,
        }
    }

    /// Stores `value` (or removes the shared entry, given `None`) for `ttl`,
    /// unless the identity was invalidated since the lock was taken, and
    /// releases the lock.
    pub async fn publish(self, value: Option<&Stored>, ttl: Duration) {
        if let Some(held) = self.held {
            held.publish(value, ttl).await;
        }
    }
}

/// The tier when no Redis is configured: this replica alone.
pub struct NoSharedTier;

impl SharedTier for NoSharedTier {
    fn lookup<'a>(&'a self, _: &'a Identity) -> TierFuture<'a, Option<Stored>> {
        Box::pin(std::future::ready(None))
    }

    fn lock<'a>(&'a self, _: &'a Identity) -> TierFuture<'a, Lock> {
        Box::pin(std::future::ready(Lock::Fetch(Permit::alone())))
    }

    fn invalidate<'a>(&'a self, _: &'a Identity) -> TierFuture<'a, Result<(), NotShared>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn admit<'a>(
        &'a self,
        _: &'a str,
        _: NonZeroU32,
    ) -> TierFuture<'a, Option<Result<(), Duration>>> {
        Box::pin(std::future::ready(None))
    }

    fn in_sync(&self) -> bool {
        true
    }

    fn start(&self, _: EventSink, _: CancellationToken) {}
}

/// The tier `settings` ask for. `wait` bounds how long a replica waits for
/// another's fetch (and so how long a fetch lock lives): `upstream.timeout`.
pub fn from_settings(
    settings: &CacheSettings,
    wait: Duration,
    metrics: Arc<Metrics>,
) -> Result<Arc<dyn SharedTier>, ConfigError> {
    Ok(
        match redis_tier::RedisTier::from_settings(settings, wait, metrics)? {
            Some(tier) => Arc::new(tier),
            None => Arc::new(NoSharedTier),
        },
    )
}
