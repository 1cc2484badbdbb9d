//! The domain: which token a caller gets for an identity, from the cache or
//! from the vendor, with exactly one vendor call per key at a time.
//!
//! Two moka caches share the work. `store` holds what the vendor last said
//! per identity (an active token, or "no such user"), bounded by
//! `cache.max_entries`; moka drops an entry once it can no longer be served
//! (`ttl + stale_if_error`, or `negative_ttl`), while freshness is judged by
//! `freshness::decide` against tokio's clock (so tests can pause time).
//! `flights` exists only to coalesce: its `try_get_with` runs one fetch per
//! key and hands the result, or the error, to every caller that asked meanwhile.
//!
//! Invalidation moves the key's generation on (`flights::Generations`). A
//! fetch remembers the generation it began with and stores its answer only
//! if it is unchanged, so a fetch already under way never puts a revoked
//! token back.
//!
//! Behind the local cache is the shared tier (`crate::shared`): a local miss
//! looks there before the vendor, one replica at a time fetches a key (the
//! others wait for its answer), and invalidations reach every replica. With
//! no Redis, the tier is a no-op. A hit never touches it.

mod entry;
mod flights;
pub mod freshness;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::CacheSettings;
use crate::domain::Identity;
use crate::shared::{
    Event, Fill, NoSharedTier, NotShared, Publish, SharedTier, Stored, TierFuture,
};
use crate::telemetry::metrics::{Lookup, Metrics, UpstreamOutcome};
use crate::upstream::{Askers, Fetched, UpstreamClient, UpstreamError};
use entry::{Answer, Entry, Lifetime};
pub use entry::{CacheResult, Issued};
use flights::{FlightKey, Generation, Generations, Purpose, Want};
use freshness::{Asked, Decision, Held, Lifetimes};

/// A future returned by a `TokenSource`.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Fetched, UpstreamError>> + Send + 'a>>;

/// Where tokens come from: the vendor client in production, a double in unit
/// tests. `askers` are whose fetch it is, for the vendor slots' fair share.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, identity: &'a Identity, askers: &'a Askers) -> FetchFuture<'a>;
}

impl TokenSource for UpstreamClient {
    fn fetch<'a>(&'a self, identity: &'a Identity, askers: &'a Askers) -> FetchFuture<'a> {
        Box::pin(UpstreamClient::fetch(self, identity, askers))
    }
}

/// Why no token could be handed out, in the terms a caller cares about. The
/// vendor's own error stays attached as the source, for logs and metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The vendor cannot answer now (down, overloaded, circuit open, every
    /// slot taken); `retry_after` when it (or the circuit) said how long.
    #[error("the vendor is unavailable")]
    Unavailable {
        retry_after: Option<Duration>,
        #[source]
        cause: UpstreamError,
    },
    /// The vendor did not answer within `upstream.timeout`.
    #[error("the vendor did not answer in time")]
    TimedOut,
    /// The vendor refused the partner key.
    #[error("the vendor rejected the partner key")]
    Rejected {
        #[source]
        cause: UpstreamError,
    },
    /// The vendor answered with something unusable.
    #[error("the vendor answered with something unusable")]
    Unusable {
        #[source]
        cause: UpstreamError,
    },
    /// The vendor has no such user.
    #[error("the vendor has no such user")]
    NotFound,
}

impl From<UpstreamError> for BrokerError {
    fn from(error: UpstreamError) -> Self {
        match error {
            UpstreamError::Timeout => BrokerError::TimedOut,
            UpstreamError::NotFound => BrokerError::NotFound,
            UpstreamError::Rejected(_) => BrokerError::Rejected { cause: error },
            UpstreamError::Malformed(_) | UpstreamError::UnexpectedStatus(_) => {
                BrokerError::Unusable { cause: error }
            }
            UpstreamError::Unavailable { retry_after, .. } => BrokerError::Unavailable {
                retry_after,
                cause: error,
            },
            UpstreamError::CircuitOpen { retry_after } => BrokerError::Unavailable {
                retry_after: Some(retry_after),
                cause: error,
            },
            UpstreamError::Connect(_) | UpstreamError::Transport(_) | UpstreamError::Saturated => {
                BrokerError::Unavailable {
                    retry_after: None,
                    cause: error,
                }
            }
        }
    }
}

impl BrokerError {
    /// A short label for logs: the vendor outcome behind it.
    pub fn outcome(&self) -> UpstreamOutcome {
        match self {
            BrokerError::Unavailable { cause, .. }
            | BrokerError::Rejected { cause }
            | BrokerError::Unusable { cause } => cause.outcome(),
            BrokerError::TimedOut => UpstreamError::Timeout.outcome(),
            BrokerError::NotFound => UpstreamError::NotFound.outcome(),
        }
    }
}

struct Inner {
    store: Cache<Identity, Arc<Entry>>,
    flights: Cache<FlightKey, Arc<Entry>>,
    /// Who asks for each flight under way, so its fetch waits in every
    /// one's turn for a vendor slot, not only in the first one's.
    askers: std::sync::Mutex<std::collections::HashMap<FlightKey, Arc<Askers>>>,
    generations: Generations,
    tier: Arc<dyn SharedTier>,
    source: Arc<dyn TokenSource>,
    lifetimes: Lifetimes,
    stale_for: Duration,
    /// Set while stale answers are served, so the outage is logged once.
    serving_stale: AtomicBool,
    /// Cancelled at shutdown: background refreshes stop.
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

/// The token cache in front of a `TokenSource`; clones share one cache.
#[derive(Clone)]
pub struct Broker(Arc<Inner>);

impl Broker {
    /// A broker whose cache lives in this replica's memory only.
    pub fn new(
        settings: &CacheSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_tier(settings, source, metrics, Arc::new(NoSharedTier))
    }

    /// A broker backed by the shared `tier`.
    pub fn with_tier(
        settings: &CacheSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
        tier: Arc<dyn SharedTier>,
    ) -> Self {
        let store = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(Lifetime {
                token: settings.ttl + settings.stale_if_error,
                not_found: settings.negative_ttl,
            })
            .build();
        let flights = Cache::builder().max_capacity(settings.max_entries).build();
        Self(Arc::new(Inner {
            store,
            flights,
            askers: std::sync::Mutex::default(),
            generations: Generations::new(
                settings.max_entries,
                settings.ttl + settings.stale_if_error,
            ),
            tier,
            source,
            lifetimes: Lifetimes {
                ttl: settings.ttl,
                refresh_after: settings.ttl.mul_f64(settings.refresh_ahead),
                negative_ttl: settings.negative_ttl,
                revalidate_interval: settings.revalidate_min_interval,
            },
            stale_for: settings.stale_if_error,
            serving_stale: AtomicBool::new(false),
            stop: CancellationToken::new(),
            metrics,
        }))
    }

    /// Starts listening to the shared tier's events (invalidations from the
    /// fleet, a lost feed) until shutdown.
    pub fn listen_to_tier(&self) {
        let broker = self.clone();
        let sink = Arc::new(move |event: Event| match event {
            Event::Invalidated(identity) => {
                // The generation moves at once; the entry goes a moment later.
                broker.0.generations.invalidate(&identity);
                let broker = broker.clone();
                tokio::spawn(async move { broker.0.store.invalidate(&identity).await });
            }
            Event::Lost => broker.evict_all(),
        });
        self.0.tier.start(sink, self.0.stop.clone());
    }

    /// The token for `identity`, asked by `caller`: from the cache while
    /// fresh, else from the vendor, else (while the vendor fails) a stale one.
    pub async fn lookup(
        &self,
        identity: &Identity,
        caller: &Arc<str>,
    ) -> Result<Issued, BrokerError> {
        self.cached_or_fetched(identity, caller, false).await
    }

    /// The token for `identity` from a vendor fetch made after this call,
    /// unless the key's last vendor answer is younger than
    /// `revalidate_min_interval` (then that answer).
    pub async fn revalidate(
        &self,
        identity: &Identity,
        caller: &Arc<str>,
    ) -> Result<Issued, BrokerError> {
        self.cached_or_fetched(identity, caller, true).await
    }

    /// Counts one lookup result.
    fn counted(&self, result: Lookup) {
        self.0.metrics.cache_lookup(result);
    }

    /// The span of a lookup that goes past this replica's memory; a plain hit
    /// makes none.
    fn miss_span(identity: &Identity) -> tracing::Span {
        let span = tracing::info_span!(
            "cache.lookup",
            otel.name = "cache.lookup",
            identity.kind = identity.kind(),
            cache.result = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::telemetry::record_trace_ids(&span);
        span
    }

    async fn cached_or_fetched(
        &self,
        identity: &Identity,
        caller: &Arc<str>,
        revalidate: bool,
    ) -> Result<Issued, BrokerError> {
        let inner = &self.0;
        if let Some(entry) = inner.store.get(identity).await {
            let held = match entry.answer {
                Answer::Token { .. } => Held::Token,
                Answer::NotFound => Held::NotFound,
            };
            let asked = Asked {
                revalidate,
                in_sync: inner.tier.in_sync(),
            };
            match freshness::decide(&inner.lifetimes, held, entry.age(), asked) {
                Decision::Serve => return self.counted_cached(&entry),
                Decision::ServeAndRefresh => {
                    if !entry.refreshing.swap(true, Ordering::AcqRel) {
                        self.refresh_in_background(identity.clone(), caller.clone());
                    }
                    return self.counted_cached(&entry);
                }
                Decision::Fetch => {}
            }
        }
        let (purpose, want) = if revalidate {
            let want = Want {
                max_age: inner.lifetimes.revalidate_interval,
                since: Some(Instant::now()),
            };
            (Purpose::Revalidate, want)
        } else {
            let want = Want {
                max_age: inner.lifetimes.ttl,
                since: None,
            };
            (Purpose::Lookup, want)
        };
        let span = Self::miss_span(identity);
        let fetched = self
            .fetch_once(identity, caller, purpose, want)
            .instrument(span.clone())
            .await;
        let (result, label) = match fetched {
            Ok(entry) => {
                let label = match (&entry.answer, entry.from_vendor) {
                    (_, true) => Lookup::Miss,
                    (Answer::NotFound, false) => Lookup::Negative,
                    (Answer::Token { .. }, false) => Lookup::Hit,
                };
                (entry.issued(), label)
            }
            Err(error) => {
                // Read again: a fetch may have brought a stale entry from the shared cache.
                let cached = inner.store.get(identity).await;
                match cached.filter(|e| self.servable_when_failing(e, &error)) {
                    Some(stale) => {
                        if !inner.serving_stale.swap(true, Ordering::AcqRel) {
                            span.in_scope(|| tracing::warn!(%error, outcome = error.outcome().as_str(), "vendor failing, serving stale tokens (each counted as a stale cache lookup)"));
                        }
                        (stale.issued_as(CacheResult::Stale), Lookup::Stale)
                    }
                    None => (Err(error.into()), Lookup::Miss),
                }
            }
        };
        self.counted(label);
        span.record("cache.result", label.as_str());
        result
    }

    /// An answer from this replica's memory.
    fn counted_cached(&self, entry: &Arc<Entry>) -> Result<Issued, BrokerError> {
        self.counted(match entry.answer {
            Answer::NotFound => Lookup::Negative,
            Answer::Token { .. } => Lookup::Hit,
        });
        entry.issued_as(CacheResult::Hit)
    }

    /// An expired token may stand in while the vendor is failing, within `stale_if_error`.
    fn servable_when_failing(&self, entry: &Entry, error: &UpstreamError) -> bool {
        error.is_outage()
            && matches!(entry.answer, Answer::Token { active: true, .. })
            && freshness::servable_when_failing(
                self.0.lifetimes.ttl,
                self.0.stale_for,
                entry.age(),
                self.0.tier.in_sync(),
            )
    }

    /// One background refresh of `identity`, counted as `caller`'s (whose
    /// hit started it) for the vendor slots' fair share.
    fn refresh_in_background(&self, identity: Identity, caller: Arc<str>) {
        let broker = self.clone();
        // Its own trace, linked to the request that started it.
        let span = tracing::info_span!(
            parent: None,
            "cache.refresh",
            otel.name = "cache.refresh",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        span.follows_from(tracing::Span::current());
        crate::telemetry::record_trace_ids(&span);
        let want = Want {
            max_age: self.0.lifetimes.refresh_after,
            since: None,
        };
        let stop = self.0.stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    result = broker.fetch_once(&identity, &caller, Purpose::Refresh, want) => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "background refresh failed; the entry is served until ttl");
                        }
                    }
                    () = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }

    /// Stops background refreshes and the tier's listener; for shutdown.
    pub fn shutdown(&self) {
        self.0.stop.cancel();
    }

    /// Drops the cached token of `identity` here and on every replica; a
    /// fetch already under way will not store its answer. `Err` when the
    /// shared tier did not take it: the local entry is gone all the same.
    pub async fn invalidate(&self, identity: &Identity) -> Result<(), NotShared> {
        self.forget(identity).await;
        let shared = self.0.tier.invalidate(identity).await;
        // A fetch that read the shared cache just before the invalidation
        // reached it may have stored its answer meanwhile.
        self.forget(identity).await;
        shared
    }

    /// Moves the generation of `identity` on and drops its local entry.
    async fn forget(&self, identity: &Identity) {
        self.0.generations.invalidate(identity);
        self.0.store.invalidate(identity).await;
    }

    /// Drops every local entry: when invalidations may have been missed.
    pub fn evict_all(&self) {
        self.0.generations.invalidate_all();
        self.0.store.invalidate_all();
    }

    /// Entries currently cached (tokens and remembered "no such user" answers).
    pub fn entry_count(&self) -> u64 {
        self.0.store.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, counts); for metrics and tests.
    pub async fn run_pending_tasks(&self) {
        self.0.store.run_pending_tasks().await;
    }

    /// Fetches `identity`, one fetch per key and purpose however many callers
    /// ask at once, and returns an answer `want` accepts.
    async fn fetch_once(
        &self,
        identity: &Identity,
        caller: &Arc<str>,
        purpose: Purpose,
        want: Want,
    ) -> Result<Arc<Entry>, UpstreamError> {
        let inner = &self.0;
        loop {
            let generation = inner.generations.of(identity);
            let key = (identity.clone(), generation, purpose);
            let askers = self.ask(&key, caller);
            let result = inner
                .flights
                // Boxed: a miss is rare, and the fill's future is deep.
                .try_get_with_by_ref(
                    &key,
                    Box::pin(self.fill(identity, &askers, generation, want)),
                )
                .await;
            self.landed(&key, &askers);
            inner.flights.invalidate(&key).await;
            match result {
                Ok(entry) if want.accepts(&entry) => return Ok(entry),
                // Left behind by a flight whose callers all went away before
                // clearing it, and too old for this caller: fetch again.
                Ok(_) => continue,
                Err(error) => return Err((*error).clone()),
            }
        }
    }

    /// `caller` asks for the flight `key`: joins its askers, or starts them.
    fn ask(&self, key: &FlightKey, caller: &Arc<str>) -> Arc<Askers> {
        let mut flights = self.0.askers.lock().unwrap_or_else(PoisonError::into_inner);
        let askers = flights
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Askers::new(caller)));
        askers.join(caller);
        askers.clone()
    }

    /// The flight `key` is over: its askers go (unless a new flight took the key).
    fn landed(&self, key: &FlightKey, askers: &Arc<Askers>) {
        let mut flights = self.0.askers.lock().unwrap_or_else(PoisonError::into_inner);
        if flights.get(key).is_some_and(|a| Arc::ptr_eq(a, askers)) {
            flights.remove(key);
        }
    }

    /// One flight's work, through the shared tier: a value the fleet
    /// holds, else this replica's vendor fetch, else another replica's
    /// (within `upstream.timeout`).
    async fn fill(
        &self,
        identity: &Identity,
        askers: &Askers,
        generation: Generation,
        want: Want,
    ) -> Result<Arc<Entry>, UpstreamError> {
        let filling = Filling {
            broker: self,
            identity,
            askers,
            generation,
            want,
            answer: std::sync::Mutex::new(None),
        };
        self.0.tier.fill(identity, &filling).await;
        let answer = filling
            .answer
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        match answer {
            Some(answer) => answer,
            // A tier that neither offered a value nor fetched: ask alone.
            None => self.ask_vendor(identity, askers, generation).await.1,
        }
    }

    /// A value read from the shared tier as this fill's answer, if `want`
    /// takes it; a stale token is kept locally so stale-if-error can serve it.
    async fn usable_shared(
        &self,
        identity: &Identity,
        generation: Generation,
        want: Want,
        stored: Stored,
    ) -> Option<Result<Arc<Entry>, UpstreamError>> {
        let entry = Entry::from_shared(stored);
        let usable = match entry.answer {
            Answer::NotFound => entry.age() < self.0.lifetimes.negative_ttl,
            Answer::Token { .. } => want.accepts(&entry),
        };
        if usable {
            self.remember(identity, generation, Some(entry.clone()))
                .await;
            return Some(match entry.answer {
                Answer::NotFound => Err(UpstreamError::NotFound),
                Answer::Token { .. } => Ok(entry),
            });
        }
        if matches!(entry.answer, Answer::Token { .. })
            && entry.age() < self.0.lifetimes.ttl + self.0.stale_for
            && !self.0.store.contains_key(identity)
        {
            self.remember(identity, generation, Some(entry)).await;
        }
        None
    }

    /// Asks the vendor and keeps the answer here; with what the shared tier
    /// should hold, unless the fetch failed.
    async fn ask_vendor(
        &self,
        identity: &Identity,
        askers: &Askers,
        generation: Generation,
    ) -> (Option<Publish>, Result<Arc<Entry>, UpstreamError>) {
        let inner = &self.0;
        let fetched = inner.source.fetch(identity, askers).await;
        if fetched.is_ok() && inner.serving_stale.swap(false, Ordering::AcqRel) {
            tracing::info!("vendor answering again; no more stale tokens");
        }
        let (entry, result) = match fetched {
            Ok(fetched) => {
                let entry = Entry::new(Answer::Token {
                    token: Arc::new(fetched.token),
                    active: fetched.active,
                });
                let kept = fetched.active.then(|| entry.clone());
                (kept, Ok(entry))
            }
            Err(UpstreamError::NotFound) => {
                let kept =
                    (!inner.lifetimes.negative_ttl.is_zero()).then(|| Entry::new(Answer::NotFound));
                (kept, Err(UpstreamError::NotFound))
            }
            // Nothing to share: the fleet's lock goes to the next replica.
            Err(error) => return (None, Err(error)),
        };
        self.remember(identity, generation, entry.clone()).await;
        let value = entry.as_deref().and_then(Entry::to_stored);
        let ttl = match entry.as_deref().map(|e| &e.answer) {
            Some(Answer::NotFound) => inner.lifetimes.negative_ttl,
            _ => inner.lifetimes.ttl + inner.stale_for,
        };
        (Some(Publish { value, ttl }), result)
    }

    /// Keeps `entry` (or drops the key, given `None`) unless the key was
    /// invalidated since the fetch that produced it began.
    async fn remember(
        &self,
        identity: &Identity,
        generation: Generation,
        entry: Option<Arc<Entry>>,
    ) {
        let store = &self.0.store;
        if self.0.generations.of(identity) != generation {
            tracing::debug!("key invalidated during the fetch; its answer is not cached");
            return;
        }
        match entry {
            Some(entry) => store.insert(identity.clone(), entry).await,
            None => store.invalidate(identity).await,
        }
        // An invalidation between the check and the insert: undo the insert.
        if self.0.generations.of(identity) != generation {
            store.invalidate(identity).await;
        }
    }
}

/// The broker's half of one flight's `SharedTier::fill`: it judges what
/// the fleet holds, asks the vendor, and keeps the flight's answer.
struct Filling<'a> {
    broker: &'a Broker,
    identity: &'a Identity,
    askers: &'a Askers,
    generation: Generation,
    want: Want,
    answer: std::sync::Mutex<Option<Result<Arc<Entry>, UpstreamError>>>,
}

impl Filling<'_> {
    fn answered(&self, answer: Result<Arc<Entry>, UpstreamError>) {
        *self.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
    }
}

impl Fill for Filling<'_> {
    fn accept(&self, stored: Stored) -> TierFuture<'_, bool> {
        Box::pin(async move {
            let usable = self
                .broker
                .usable_shared(self.identity, self.generation, self.want, stored)
                .await;
            let taken = usable.is_some();
            if let Some(answer) = usable {
                self.answered(answer);
            }
            taken
        })
    }

    fn fetch(&self) -> TierFuture<'_, Option<Publish>> {
        Box::pin(async move {
            let (publish, answer) = self
                .broker
                .ask_vendor(self.identity, self.askers, self.generation)
                .await;
            self.answered(answer);
            publish
        })
    }
}

#[cfg(test)]
mod tests;
