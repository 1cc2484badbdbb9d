//! The shared tier: the second cache level behind every replica's moka
//! cache, shaped like a cache lock. It owns a miss across the fleet:
//!
//! - `fill`: one call for one miss. The tier looks at what the fleet holds
//!   and offers it to the broker (`Fill::accept`); else it takes the
//!   identity's fetch lock, has the broker ask the vendor (`Fill::fetch`) and
//!   shares the answer; or, while another replica holds the lock, waits for
//!   that replica's answer and offers it. Locks and waiters never leave the
//!   tier;
//! - `invalidate`: every replica drops the identity, and confirms only what
//!   the fleet will hold;
//!
//! Redis also holds the fleet-wide rate limit (`FleetLimiter`), a second job
//! with a trait of its own.
//!
//! Three tiers implement it. With no Redis configured, `NoSharedTier` stands
//! in: nothing to look up, every fetch is this replica's, invalidations are
//! local. With Redis, `redis_tier::RedisTier` keeps key naming, sealing, the
//! lock protocol, waking, subscription liveness and the remembered
//! invalidations to itself. `in_process::Fleet` is a whole fleet inside one
//! process, on tokio's clock, with a network that can delay, drop, duplicate
//! and replay messages and a store that can be lost or restored: the tests
//! run the broker's cross-replica logic on it by seed.
//!
//! Generations are one concept with two homes. The broker's (`broker::flights`)
//! keep a fetch begun before an invalidation from storing its answer in this
//! replica's memory; the tier's keep it from storing (or anyone from reading)
//! it in the fleet's. Both remember invalidations in `crate::remembered`.

pub mod fleet_view;
pub mod history;
#[cfg(test)]
pub mod in_process;

pub mod nodes;
mod protocol;
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
    /// One miss of `identity` for the fleet: what the fleet holds, if
    /// `fill` accepts it; else `fill` asks the vendor, with the fleet's fetch
    /// lock when it can be had, and its answer is shared; or, while another
    /// replica fetches, that replica's answer (if `fill` accepts it) once it
    /// comes, for at most the wait the tier was built with. Returns once
    /// `fill` accepted a value or fetched.
    fn fill<'a>(&'a self, identity: &'a Identity, fill: &'a dyn Fill) -> TierFuture<'a, ()>;

    /// Makes every replica drop `identity`; `Ok` only once the fleet holds it.
    fn invalidate<'a>(&'a self, identity: &'a Identity) -> TierFuture<'a, Result<(), NotShared>>;

    /// Whether this replica hears every invalidation right now. While it
    /// does not, the broker keeps an answer only briefly.
    fn in_sync(&self) -> bool;

    /// Starts delivering events to `sink` until `stop`.
    fn start(&self, sink: EventSink, stop: CancellationToken);
}

/// The fleet-wide rate limit: one budget per client across every replica.
/// Redis serves both this and the cache; they are two jobs, so two traits.
pub trait FleetLimiter: Send + Sync + 'static {
    /// Takes one request from `client`'s fleet-wide budget; `None` when the
    /// fleet cannot be asked (the caller falls back to a per-replica limiter).
    fn admit<'a>(
        &'a self,
        client: &'a str,
        per_minute: NonZeroU32,
    ) -> TierFuture<'a, Option<Result<(), Duration>>>;
}

/// The broker's half of a `SharedTier::fill`.
pub trait Fill: Send + Sync {
    /// Whether `stored`, read from the fleet, answers this miss. (It may
    /// keep a value it does not take, say a stale token for stale-if-error.)
    fn accept(&self, stored: Stored) -> TierFuture<'_, bool>;

    /// Asks the vendor; what the fleet should hold afterwards, or `None`
    /// when there is nothing to share (the fetch failed).
    fn fetch(&self) -> TierFuture<'_, Option<Publish>>;
}

/// What a fetch leaves in the fleet: `value` (or no entry, given `None`)
/// for `ttl`, unless the identity was invalidated since the fetch began.
#[derive(Debug, Clone)]
pub struct Publish {
    pub value: Option<Stored>,
    pub ttl: Duration,
}

/// The tier when no Redis is configured: this replica alone.
pub struct NoSharedTier;

impl SharedTier for NoSharedTier {
    fn fill<'a>(&'a self, _: &'a Identity, fill: &'a dyn Fill) -> TierFuture<'a, ()> {
        Box::pin(async move {
            // Nobody to share the answer with.
            fill.fetch().await;
        })
    }

    fn invalidate<'a>(&'a self, _: &'a Identity) -> TierFuture<'a, Result<(), NotShared>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn in_sync(&self) -> bool {
        true
    }

    fn start(&self, _: EventSink, _: CancellationToken) {}
}

impl FleetLimiter for NoSharedTier {
    fn admit<'a>(
        &'a self,
        _: &'a str,
        _: NonZeroU32,
    ) -> TierFuture<'a, Option<Result<(), Duration>>> {
        Box::pin(std::future::ready(None))
    }
}

/// What the fleet shares: the cache tier and the rate limit.
pub struct Shared {
    pub tier: Arc<dyn SharedTier>,
    pub limiter: Arc<dyn FleetLimiter>,
}

/// The tier `settings` ask for. `wait` bounds how long a replica waits for
/// another's fetch (and so how long a fetch lock lives): `upstream.timeout`.
pub fn from_settings(
    settings: &CacheSettings,
    wait: Duration,
    metrics: Arc<Metrics>,
) -> Result<Shared, ConfigError> {
    Ok(
        match redis_tier::RedisTier::from_settings(settings, wait, metrics)? {
            Some(tier) => Shared {
                tier: Arc::new(tier.clone()),
                limiter: Arc::new(tier),
            },
            None => Shared {
                tier: Arc::new(NoSharedTier),
                limiter: Arc::new(NoSharedTier),
            },
        },
    )
}
