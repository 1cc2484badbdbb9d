//! The domain: which token a caller gets for an identity, from the cache or
//! from the vendor, with exactly one vendor call per key at a time.
//!
//! Two moka caches share the work. `store` holds what the vendor last said
//! per identity (an active token, or "no such user"), bounded by
//! `cache.max_entries`; moka drops an entry once it can no longer be served
//! (`ttl + stale_if_error`, or `negative_ttl`), while freshness is judged here
//! against tokio's clock (so tests can pause time). `flights` exists only to
//! coalesce: its `try_get_with` runs one fetch per key and hands the result,
//! or the error, to every caller that asked meanwhile.
//!
//! - fresh (`age < ttl`): a hit; past `ttl × refresh_ahead` the first hit also
//!   starts one background refresh.
//! - past `ttl`: fetched again; if the vendor is failing (`is_outage`), the old
//!   token is served as stale until `ttl + stale_if_error`.
//! - a definitive answer (no such user, inactive) replaces the entry.
//! - `Cache-Control: no-cache` (`revalidate`): an answer younger than
//!   `revalidate_min_interval`, else a vendor fetch made after the request.
//!
//! Invalidation moves the key's generation on. A fetch remembers the
//! generation it began with and stores its answer only if it is unchanged,
//! so a fetch already under way never puts a revoked token back.
//!
//! With a shared cache (`crate::shared`), a local miss reads Redis before the
//! vendor, one replica at a time fetches a key (the others wait for its answer
//! in Redis, within `upstream.timeout`), and invalidations reach every
//! replica. A hit never touches Redis.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::Subject;
use crate::config::CacheSettings;
use crate::domain::{Identity, Token};
use crate::shared::SharedCache;
use crate::shared::sealed::{KeyName, Stored, StoredAnswer};
use crate::telemetry::metrics::Metrics;
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};

/// How often a replica waiting for another's fetch looks at Redis.
const SHARED_POLL: Duration = Duration::from_millis(10);
/// How long a key's generation is remembered after an invalidation: longer
/// than any fetch can run.
const GENERATION_MEMORY: Duration = Duration::from_secs(600);

/// A future returned by a `TokenSource`.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Fetched, UpstreamError>> + Send + 'a>>;

/// Where tokens come from: the vendor client in production, a double in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a>;
}

impl TokenSource for UpstreamClient {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> FetchFuture<'a> {
        Box::pin(UpstreamClient::fetch(self, identity))
    }
}

/// Where an answer came from, as reported in `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Stale,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
        }
    }
}

/// Why no token could be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl BrokerError {
    /// A short label for logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            BrokerError::Upstream(e) => e.outcome(),
        }
    }
}

/// A token answer for one lookup.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Shared with the cache entry: a hit copies no secret.
    pub token: Arc<Token>,
    pub active: bool,
    pub cache: CacheResult,
    /// Time since the vendor handed the token out.
    pub age: Duration,
    /// The cache entry it came from, which keeps its audit subject.
    entry: Arc<Entry>,
}

impl Issued {
    /// The audit subject of this answer's identity: `compute`d by the first
    /// answer from a cache entry, kept by the entry for the hits after it.
    pub fn audit_subject(&self, compute: impl FnOnce() -> Subject) -> Subject {
        *self.entry.subject.get_or_init(compute)
    }
}

/// What the vendor last said about an identity.
#[derive(Debug)]
enum Answer {
    Token { token: Arc<Token>, active: bool },
    NotFound,
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    fetched_at: Stamp,
    /// Asked of the vendor by this replica (else read from the shared cache).
    from_vendor: bool,
    /// Set by the hit that starts this entry's background refresh.
    refreshing: AtomicBool,
    /// The identity's audit subject, once an answer from here was audited.
    subject: OnceLock<Subject>,
}

impl Entry {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            fetched_at: Stamp::of(Instant::now()),
            from_vendor: true,
            refreshing: AtomicBool::new(false),
            subject: OnceLock::new(),
        })
    }

    /// An answer another replica (or this one, earlier) put in the shared cache.
    fn from_shared(stored: Stored) -> Arc<Self> {
        let age = stored.age();
        let answer = match stored.answer {
            StoredAnswer::Token(token) => Answer::Token {
                token: Arc::new(token),
                active: true,
            },
            StoredAnswer::NotFound => Answer::NotFound,
        };
        let now = Instant::now();
        Arc::new(Self {
            answer,
            fetched_at: Stamp::of(now.checked_sub(age).unwrap_or(now)),
            from_vendor: false,
            refreshing: AtomicBool::new(false),
            subject: OnceLock::new(),
        })
    }

    fn age(&self) -> Duration {
        self.fetched_at.instant().elapsed()
    }

    /// The token, or the vendor's "no such user"; `X-Cache` follows `from_vendor`.
    fn issued(self: &Arc<Self>) -> Result<Issued, BrokerError> {
        let cache = if self.from_vendor {
            CacheResult::Miss
        } else {
            CacheResult::Hit
        };
        self.issued_as(cache)
    }

    fn issued_as(self: &Arc<Self>, cache: CacheResult) -> Result<Issued, BrokerError> {
        match &self.answer {
            Answer::Token { token, active } => Ok(Issued {
                token: token.clone(),
                active: *active,
                cache,
                age: self.age(),
                entry: self.clone(),
            }),
            Answer::NotFound => Err(UpstreamError::NotFound.into()),
        }
    }

    /// What the shared cache keeps of this entry: active tokens and "no such user".
    fn to_stored(&self) -> Option<Stored> {
        let answer = match &self.answer {
            Answer::Token {
                token,
                active: true,
            } => StoredAnswer::Token(Token::clone(token)),
            Answer::Token { active: false, .. } => return None,
            Answer::NotFound => StoredAnswer::NotFound,
        };
        Some(Stored {
            answer,
            fetched_at: SystemTime::now()
                .checked_sub(self.age())
                .unwrap_or_else(SystemTime::now),
        })
    }
}

/// An instant as signed nanoseconds from a fixed one: eight bytes in every
/// cache entry rather than an `Instant`'s sixteen. Signed, since an answer
/// read from the shared cache may be older than the process.
#[derive(Debug, Clone, Copy)]
struct Stamp(i64);

/// The instant stamps count from.
static STAMP_ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Stamp {
    fn of(at: Instant) -> Self {
        let origin = *STAMP_ORIGIN;
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(if at >= origin {
            nanos(at - origin)
        } else {
            -nanos(origin - at)
        })
    }

    fn instant(self) -> Instant {
        let origin = *STAMP_ORIGIN;
        let offset = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            origin + offset
        } else {
            origin.checked_sub(offset).unwrap_or(origin)
        }
    }
}

/// How long moka keeps an entry: as long as it may still be served.
struct Lifetime {
    token: Duration,
    not_found: Duration,
}

impl Lifetime {
    fn of(&self, entry: &Entry) -> Duration {
        let whole = match entry.answer {
            Answer::Token { .. } => self.token,
            Answer::NotFound => self.not_found,
        };
        // An entry read from the shared cache arrives with some age already.
        whole.saturating_sub(entry.age())
    }
}

impl Expiry<Identity, Arc<Entry>> for Lifetime {
    fn expire_after_create(
        &self,
        _: &Identity,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.of(entry))
    }

    fn expire_after_update(
        &self,
        _: &Identity,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(entry))
    }
}

/// Why a fetch runs; fetches for different reasons accept different answers,
/// so each reason coalesces with its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Purpose {
    /// A miss, or an entry past `ttl`.
    Lookup,
    /// Refresh-ahead of an entry still fresh.
    Refresh,
    /// The caller asked for `no-cache`.
    Revalidate,
}

/// The answers a fetch may hand back: younger than `max_age`, or fetched
/// after `since`.
#[derive(Debug, Clone, Copy)]
struct Want {
    max_age: Duration,
    since: Option<Instant>,
}

impl Want {
    fn accepts(&self, entry: &Entry) -> bool {
        entry.age() < self.max_age
            || self
                .since
                .is_some_and(|since| entry.fetched_at.instant() >= since)
    }
}

/// One flight per key, generation and purpose: a fetch begun before an
/// invalidation is never joined after it.
type FlightKey = (Identity, u64, Purpose);

/// The shared cache, and the key names this replica has looked up, so an
/// invalidation (which names a key by its hash) can be applied here.
struct SharedTier {
    cache: SharedCache,
    names: moka::sync::Cache<KeyName, Identity>,
    /// How long to wait for another replica's fetch: `upstream.timeout`.
    wait: Duration,
}

struct Inner {
    store: Cache<Identity, Arc<Entry>>,
    flights: Cache<FlightKey, Arc<Entry>>,
    /// Generation per key, from `invalidations`; absent is 0.
    generations: moka::sync::Cache<Identity, u64>,
    invalidations: AtomicU64,
    shared: Option<SharedTier>,
    source: Arc<dyn TokenSource>,
    ttl: Duration,
    refresh_after: Duration,
    stale_for: Duration,
    negative_ttl: Duration,
    revalidate_interval: Duration,
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
        Self::with_shared(settings, source, metrics, None, Duration::ZERO)
    }

    /// A broker backed by `shared` (when given); `wait` bounds how long a
    /// replica waits for another one's fetch.
    pub fn with_shared(
        settings: &CacheSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
        shared: Option<SharedCache>,
        wait: Duration,
    ) -> Self {
        let store = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(Lifetime {
                token: settings.ttl + settings.stale_if_error,
                not_found: settings.negative_ttl,
            })
            .build();
        let flights = Cache::builder().max_capacity(settings.max_entries).build();
        let generations = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(GENERATION_MEMORY)
            .build();
        let shared = shared.map(|cache| SharedTier {
            cache,
            names: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_idle(settings.ttl + settings.stale_if_error)
                .build(),
            wait,
        });
        Self(Arc::new(Inner {
            store,
            flights,
            generations,
            invalidations: AtomicU64::new(0),
            shared,
            source,
            ttl: settings.ttl,
            refresh_after: settings.ttl.mul_f64(settings.refresh_ahead),
            stale_for: settings.stale_if_error,
            negative_ttl: settings.negative_ttl,
            revalidate_interval: settings.revalidate_min_interval,
            serving_stale: AtomicBool::new(false),
            stop: CancellationToken::new(),
            metrics,
        }))
    }

    /// The token for `identity`: from the cache while fresh, else from the
    /// vendor, else (while the vendor fails) a stale one.
    pub async fn lookup(&self, identity: &Identity) -> Result<Issued, BrokerError> {
        self.lookup_in_cache(identity, false).await
    }

    /// The token for `identity` from a vendor fetch made after this call,
    /// unless the key's last vendor answer is younger than
    /// `revalidate_min_interval` (then that answer).
    pub async fn revalidate(&self, identity: &Identity) -> Result<Issued, BrokerError> {
        self.lookup_in_cache(identity, true).await
    }

    /// Counts one lookup result.
    fn counted(&self, result: &'static str) {
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

    async fn lookup_in_cache(
        &self,
        identity: &Identity,
        revalidate: bool,
    ) -> Result<Issued, BrokerError> {
        let inner = &self.0;
        if let Some(entry) = inner.store.get(identity).await {
            let age = entry.age();
            match entry.answer {
                _ if revalidate && age < inner.revalidate_interval => {
                    return self.counted_cached(&entry);
                }
                _ if revalidate => {}
                Answer::NotFound if age < inner.negative_ttl => {
                    return self.counted_cached(&entry);
                }
                Answer::Token { .. } if age < inner.ttl => {
                    if age >= inner.refresh_after && !entry.refreshing.swap(true, Ordering::AcqRel)
                    {
                        self.refresh_in_background(identity.clone());
                    }
                    return self.counted_cached(&entry);
                }
                _ => {}
            }
        }
        let (purpose, want) = if revalidate {
            let want = Want {
                max_age: inner.revalidate_interval,
                since: Some(Instant::now()),
            };
            (Purpose::Revalidate, want)
        } else {
            let want = Want {
                max_age: inner.ttl,
                since: None,
            };
            (Purpose::Lookup, want)
        };
        let span = Self::miss_span(identity);
        let fetched = self
            .fetch_once(identity, purpose, want)
            .instrument(span.clone())
            .await;
        let (result, label) = match fetched {
            Ok(entry) => {
                let label = match (&entry.answer, entry.from_vendor) {
                    (_, true) => "miss",
                    (Answer::NotFound, false) => "negative",
                    (Answer::Token { .. }, false) => "hit",
                };
                (entry.issued(), label)
            }
            Err(BrokerError::Upstream(error)) => {
                // Read again: a fetch may have brought a stale entry from the shared cache.
                let cached = inner.store.get(identity).await;
                match cached.filter(|e| self.servable_when_failing(e, &error)) {
                    Some(stale) => {
                        if !inner.serving_stale.swap(true, Ordering::AcqRel) {
                            span.in_scope(|| tracing::warn!(%error, outcome = error.outcome(), "vendor failing, serving stale tokens (each counted as a stale cache lookup)"));
                        }
                        (stale.issued_as(CacheResult::Stale), "stale")
                    }
                    None => (Err(error.into()), "miss"),
                }
            }
        };
        self.counted(label);
        span.record("cache.result", label);
        result
    }

    /// An answer from this replica's memory.
    fn counted_cached(&self, entry: &Arc<Entry>) -> Result<Issued, BrokerError> {
        self.counted(match entry.answer {
            Answer::NotFound => "negative",
            Answer::Token { .. } => "hit",
        });
        entry.issued_as(CacheResult::Hit)
    }

    /// An expired token may stand in while the vendor is failing, within `stale_if_error`.
    fn servable_when_failing(&self, entry: &Entry, error: &UpstreamError) -> bool {
        error.is_outage()
            && matches!(entry.answer, Answer::Token { active: true, .. })
            && entry.age() < self.0.ttl + self.0.stale_for
    }

    fn refresh_in_background(&self, identity: Identity) {
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
            max_age: self.0.refresh_after,
            since: None,
        };
        let stop = self.0.stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    result = broker.fetch_once(&identity, Purpose::Refresh, want) => {
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

    /// Stops background refreshes; for shutdown.
    pub fn shutdown(&self) {
        self.0.stop.cancel();
    }

    /// Drops the cached token of `identity` here and, with a shared cache, on
    /// every replica; a fetch already under way will not store its answer.
    pub async fn invalidate(&self, identity: &Identity) {
        self.forget(identity).await;
        if let Some(shared) = &self.0.shared {
            let name = shared.cache.name(identity);
            if !shared.cache.invalidate(&name).await {
                tracing::warn!(
                    "the shared cache did not take the invalidation; other replicas keep the token until they reconnect or it expires"
                );
            }
        }
    }

    /// Moves the generation of `identity` on and drops its local entry.
    async fn forget(&self, identity: &Identity) {
        let generation = self.0.invalidations.fetch_add(1, Ordering::AcqRel) + 1;
        self.0.generations.insert(identity.clone(), generation);
        self.0.store.invalidate(identity).await;
    }

    fn generation(&self, identity: &Identity) -> u64 {
        self.0.generations.get(identity).unwrap_or(0)
    }

    /// Applies an invalidation published by any replica (this one included).
    pub async fn evict_shared(&self, name: &KeyName) {
        let Some(shared) = &self.0.shared else {
            return;
        };
        if let Some(identity) = shared.names.get(name) {
            self.forget(&identity).await;
        }
    }

    /// Drops every local entry: after a reconnect to the shared cache, since
    /// invalidations sent meanwhile were missed.
    pub fn evict_all(&self) {
        let generation = self.0.invalidations.fetch_add(1, Ordering::AcqRel) + 1;
        for (identity, _) in self.0.store.iter() {
            self.0
                .generations
                .insert(Identity::clone(&identity), generation);
        }
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
        purpose: Purpose,
        want: Want,
    ) -> Result<Arc<Entry>, BrokerError> {
        let inner = &self.0;
        loop {
            let generation = self.generation(identity);
            let key = (identity.clone(), generation, purpose);
            let result = inner
                .flights
                .try_get_with_by_ref(&key, self.fill(identity, generation, want))
                .await;
            inner.flights.invalidate(&key).await;
            match result {
                Ok(entry) if want.accepts(&entry) => return Ok(entry),
                // Left behind by a flight whose callers all went away before
                // clearing it, and too old for this caller: fetch again.
                Ok(_) => continue,
                Err(error) => return Err(BrokerError::from((*error).clone())),
            }
        }
    }

    /// One flight's work: the shared cache if there is one, else the vendor.
    async fn fill(
        &self,
        identity: &Identity,
        generation: u64,
        want: Want,
    ) -> Result<Arc<Entry>, UpstreamError> {
        match &self.0.shared {
            None => self.ask_vendor(identity, generation, None).await,
            Some(shared) => self.fill_shared(shared, identity, generation, want).await,
        }
    }

    /// Redis first; else one replica asks the vendor while the others wait
    /// for its answer in Redis (within `upstream.timeout`).
    async fn fill_shared(
        &self,
        shared: &SharedTier,
        identity: &Identity,
        generation: u64,
        want: Want,
    ) -> Result<Arc<Entry>, UpstreamError> {
        let name = shared.cache.name(identity);
        // Known before the first read, so an invalidation racing this fill applies here.
        shared.names.insert(name.clone(), identity.clone());
        if let Some(entry) = self
            .usable_shared(
                identity,
                generation,
                want,
                shared.cache.get(identity, &name).await,
            )
            .await
        {
            return entry;
        }
        let deadline = Instant::now() + shared.wait;
        loop {
            let lock = match shared.cache.claim(identity, &name).await {
                None => break,
                Some(crate::shared::Claim::Acquired { lock, current }) => {
                    if let Some(entry) = self
                        .usable_shared(identity, generation, want, current)
                        .await
                    {
                        shared.cache.unlock(&name, lock).await;
                        return entry;
                    }
                    lock
                }
                Some(crate::shared::Claim::Held { current }) => {
                    if let Some(entry) = self
                        .usable_shared(identity, generation, want, current)
                        .await
                    {
                        return entry;
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(SHARED_POLL).await;
                    continue;
                }
            };
            return self
                .ask_vendor(identity, generation, Some((shared, &name, lock)))
                .await;
        }
        // Redis cannot be asked, or the holder outran our wait: ask alone.
        self.ask_vendor(identity, generation, None).await
    }

    /// A value read from Redis as this fill's answer, if `want` takes it;
    /// a stale token is kept locally so stale-if-error can serve it.
    async fn usable_shared(
        &self,
        identity: &Identity,
        generation: u64,
        want: Want,
        stored: Option<Stored>,
    ) -> Option<Result<Arc<Entry>, UpstreamError>> {
        let entry = Entry::from_shared(stored?);
        let usable = match entry.answer {
            Answer::NotFound => entry.age() < self.0.negative_ttl,
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
            && entry.age() < self.0.ttl + self.0.stale_for
            && !self.0.store.contains_key(identity)
        {
            self.remember(identity, generation, Some(entry)).await;
        }
        None
    }

    /// Asks the vendor and records the answer here and, holding the key's
    /// shared lock, in Redis.
    async fn ask_vendor(
        &self,
        identity: &Identity,
        generation: u64,
        shared: Option<(&SharedTier, &KeyName, crate::shared::Lock)>,
    ) -> Result<Arc<Entry>, UpstreamError> {
        let inner = &self.0;
        let fetched = inner.source.fetch(identity).await;
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
                let kept = (!inner.negative_ttl.is_zero()).then(|| Entry::new(Answer::NotFound));
                (kept, Err(UpstreamError::NotFound))
            }
            Err(error) => {
                if let Some((tier, name, lock)) = shared {
                    tier.cache.unlock(name, lock).await;
                }
                return Err(error);
            }
        };
        self.remember(identity, generation, entry.clone()).await;
        if let Some((tier, name, lock)) = shared {
            let stored = entry.as_deref().and_then(Entry::to_stored);
            let ttl = match entry.as_deref().map(|e| &e.answer) {
                Some(Answer::NotFound) => inner.negative_ttl,
                _ => inner.ttl + inner.stale_for,
            };
            tier.cache
                .store(identity, name, lock, stored.as_ref(), ttl)
                .await;
        }
        result
    }

    /// Keeps `entry` (or drops the key, given `None`) unless the key was
    /// invalidated since the fetch that produced it began.
    async fn remember(&self, identity: &Identity, generation: u64, entry: Option<Arc<Entry>>) {
        let store = &self.0.store;
        if self.generation(identity) != generation {
            tracing::debug!("key invalidated during the fetch; its answer is not cached");
            return;
        }
        match entry {
            Some(entry) => store.insert(identity.clone(), entry).await,
            None => store.invalidate(identity).await,
        }
        // An invalidation between the check and the insert: undo the insert.
        if self.generation(identity) != generation {
            store.invalidate(identity).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, UserId, UserType};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Hands out `token-<n>` for the n-th call, after `delay`.
    struct Counting {
        calls: AtomicUsize,
        delay: Duration,
        active: AtomicBool,
        fail: Mutex<Option<UpstreamError>>,
    }

    impl Counting {
        fn new() -> Arc<Self> {
            Self::with(Duration::from_millis(10), true)
        }

        fn with(delay: Duration, active: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                delay,
                active: AtomicBool::new(active),
                fail: Mutex::new(None),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn fail_with(&self, error: Option<UpstreamError>) {
            *self.fail.lock().unwrap() = error;
        }
    }

    impl TokenSource for Counting {
        fn fetch<'a>(&'a self, _identity: &'a Identity) -> FetchFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if let Some(error) = self.fail.lock().unwrap().clone() {
                    return Err(error);
                }
                Ok(Fetched {
                    token: Token::new(format!("token-{n}")),
                    active: self.active.load(Ordering::SeqCst),
                })
            })
        }
    }

    const TTL: Duration = Duration::from_secs(600);
    const STALE: Duration = Duration::from_secs(3600);
    const NEGATIVE: Duration = Duration::from_secs(30);

    fn settings(ttl: Duration, max_entries: u64) -> CacheSettings {
        CacheSettings {
            ttl,
            refresh_ahead: 0.8,
            stale_if_error: STALE,
            negative_ttl: NEGATIVE,
            revalidate_min_interval: Duration::from_secs(10),
            max_entries,
            redis_url: None,
            redis_password_file: None,
            redis_timeout: Duration::from_millis(250),
            encryption_key_file: None,
        }
    }

    fn broker(source: Arc<Counting>, ttl: Duration, max_entries: u64) -> Broker {
        Broker::new(
            &settings(ttl, max_entries),
            source,
            Arc::new(Metrics::new()),
        )
    }

    fn broker_with(source: Arc<Counting>, settings: CacheSettings) -> (Broker, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Broker::new(&settings, source, metrics.clone()), metrics)
    }

    fn lookups(metrics: &Metrics, result: &'static str) -> u64 {
        metrics
            .cache_lookups
            .get_or_create(&crate::telemetry::metrics::ResultLabels { result })
            .get()
    }

    fn outages() -> Vec<UpstreamError> {
        vec![
            UpstreamError::Timeout,
            UpstreamError::Connect("refused".into()),
            UpstreamError::Unavailable {
                status: 503,
                retry_after: None,
            },
            UpstreamError::Unavailable {
                status: 500,
                retry_after: None,
            },
            UpstreamError::Transport("reset".into()),
            UpstreamError::Malformed("html".into()),
            UpstreamError::CircuitOpen {
                retry_after: Duration::from_secs(3),
            },
            UpstreamError::Saturated,
        ]
    }

    fn member(email: &str, user_type: UserType) -> Identity {
        Identity::TeamMember {
            email: Email::parse(email).unwrap(),
            user_type,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_entry_is_served_without_a_second_fetch() {
        let source = Counting::new();
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
        let id = member("a@example.com", UserType::Agent);
        let first = broker.lookup(&id).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let second = broker.lookup(&id).await.unwrap();
        assert_eq!(first.cache, CacheResult::Miss);
        assert_eq!(second.cache, CacheResult::Hit);
        assert_eq!(second.token.expose(), "token-1");
        assert_eq!(second.age.as_secs(), 5);
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_older_than_ttl_is_fetched_again() {
        let source = Counting::new();
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
        let id = Identity::Customer(UserId::parse("c1").unwrap());
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(Duration::from_secs(601)).await;
        let again = broker.lookup(&id).await.unwrap();
        assert_eq!(again.cache, CacheResult::Miss);
        assert_eq!(again.token.expose(), "token-2");
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_for_one_key_make_one_fetch() {
        let source = Counting::with(Duration::from_millis(200), true);
        let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 100));
        let id = member("a@example.com", UserType::Agent);
        let lookups = (0..100).map(|_| {
            let broker = broker.clone();
            let id = id.clone();
            tokio::spawn(async move { broker.lookup(&id).await.unwrap() })
        });
        for handle in lookups.collect::<Vec<_>>() {
            assert_eq!(handle.await.unwrap().token.expose(), "token-1");
        }
        assert_eq!(source.calls(), 1);
    }

    /// On real threads, where a waiter can join while the leader is still
    /// storing its answer: never a second vendor call for one key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_on_many_threads_make_one_fetch_per_key() {
        let source = Counting::with(Duration::from_millis(5), true);
        let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 1000));
        for round in 0..50 {
            let id = Identity::Customer(UserId::parse(&format!("c{round}")).unwrap());
            let lookups: Vec<_> = (0..64)
                .map(|i| {
                    let broker = broker.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        broker.lookup(&id).await.unwrap().token
                    })
                })
                .collect();
            let mut tokens = Vec::new();
            for lookup in lookups {
                tokens.push(lookup.await.unwrap().expose().to_owned());
            }
            assert!(tokens.windows(2).all(|w| w[0] == w[1]), "round {round}");
            assert_eq!(source.calls(), round + 1, "round {round}: one fetch");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_begun_before_an_invalidation_does_not_store_its_answer() {
        let source = Counting::with(Duration::from_millis(100), true);
        let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 100));
        let id = member("a@example.com", UserType::Agent);
        let in_flight = {
            let broker = broker.clone();
            let id = id.clone();
            tokio::spawn(async move { broker.lookup(&id).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        broker.invalidate(&id).await;
        let joined_after = broker.lookup(&id).await.unwrap();
        assert_eq!(in_flight.await.unwrap().token.expose(), "token-1");
        assert_eq!(
            joined_after.token.expose(),
            "token-2",
            "a lookup after the invalidation does not join the older fetch"
        );
        let next = broker.lookup(&id).await.unwrap();
        assert_eq!(next.token.expose(), "token-2");
        assert_eq!(next.cache, CacheResult::Hit);
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn inactive_tokens_and_errors_are_not_cached() {
        let source = Counting::with(Duration::from_millis(1), false);
        let broker = self::broker(source.clone(), Duration::from_secs(600), 100);
        let id = member("a@example.com", UserType::Agent);
        assert!(!broker.lookup(&id).await.unwrap().active);
        assert!(!broker.lookup(&id).await.unwrap().active);
        assert_eq!(source.calls(), 2);

        let source = Counting::new();
        *source.fail.lock().unwrap() = Some(UpstreamError::Timeout);
        let broker = self::broker(source.clone(), Duration::from_secs(600), 100);
        assert!(broker.lookup(&id).await.is_err());
        *source.fail.lock().unwrap() = None;
        assert_eq!(broker.lookup(&id).await.unwrap().cache, CacheResult::Miss);
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn types_of_one_email_are_separate_keys() {
        let source = Counting::new();
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
        let agent = broker
            .lookup(&member("a@example.com", UserType::Agent))
            .await
            .unwrap();
        let custom = broker
            .lookup(&member("a@EXAMPLE.com", UserType::CustomUser))
            .await
            .unwrap();
        assert_ne!(agent.token.expose(), custom.token.expose());
        let agent_again = broker
            .lookup(&member("a@Example.Com", UserType::Agent))
            .await
            .unwrap();
        assert_eq!(agent_again.token.expose(), agent.token.expose());
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test]
    async fn memory_stays_bounded_by_max_entries() {
        let source = Counting::with(Duration::ZERO, true);
        let broker = broker(source, Duration::from_secs(600), 50);
        for i in 0..1_000 {
            let id = Identity::Customer(UserId::parse(&format!("c{i}")).unwrap());
            broker.lookup(&id).await.unwrap();
        }
        broker.run_pending_tasks().await;
        assert!(broker.entry_count() <= 50, "{}", broker.entry_count());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stamp_gives_back_its_instant_before_and_after_its_origin() {
        let origin = *STAMP_ORIGIN;
        for at in [
            origin,
            origin + Duration::from_nanos(1),
            origin + Duration::from_secs(86_400 * 365),
            origin
                .checked_sub(Duration::from_secs(600))
                .unwrap_or(origin),
        ] {
            assert_eq!(Stamp::of(at).instant(), at);
        }
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "an entry with its Arc's counts in 64 bytes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_audit_subject_is_computed_once_per_cache_entry() {
        let source = Counting::new();
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
        let auditor = crate::audit::Auditor::with_key(b"0123456789abcdef".to_vec());
        let id = member("a@example.com", UserType::Agent);
        let computed = AtomicUsize::new(0);
        let subject_of = |issued: &Issued| {
            issued.audit_subject(|| {
                computed.fetch_add(1, Ordering::SeqCst);
                auditor.subject(&id)
            })
        };
        let first = subject_of(&broker.lookup(&id).await.unwrap());
        let hit = subject_of(&broker.lookup(&id).await.unwrap());
        assert_eq!((first, hit), (auditor.subject(&id), auditor.subject(&id)));
        assert_eq!(computed.load(Ordering::SeqCst), 1, "a hit reuses it");
        broker.invalidate(&id).await;
        subject_of(&broker.lookup(&id).await.unwrap());
        assert_eq!(
            computed.load(Ordering::SeqCst),
            2,
            "a new entry computes it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_makes_the_next_lookup_fetch() {
        let source = Counting::new();
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
        let id = member("a@example.com", UserType::Agent);
        broker.lookup(&id).await.unwrap();
        broker.invalidate(&id).await;
        assert_eq!(broker.lookup(&id).await.unwrap().cache, CacheResult::Miss);
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_token_is_served_on_each_outage_kind_within_the_window_only() {
        let id = member("a@example.com", UserType::Agent);
        for outage in outages() {
            let source = Counting::new();
            let (broker, metrics) = broker_with(source.clone(), settings(TTL, 100));
            broker.lookup(&id).await.unwrap();
            source.fail_with(Some(outage.clone()));

            tokio::time::advance(TTL + Duration::from_secs(1)).await;
            let stale = broker.lookup(&id).await.unwrap();
            assert_eq!(stale.cache, CacheResult::Stale, "{outage:?}");
            assert_eq!(stale.token.expose(), "token-1");
            assert_eq!(lookups(&metrics, "stale"), 1);

            tokio::time::advance(STALE - Duration::from_secs(2)).await;
            assert_eq!(broker.lookup(&id).await.unwrap().cache, CacheResult::Stale);
            tokio::time::advance(Duration::from_secs(2)).await;
            let expired = broker.lookup(&id).await.unwrap_err();
            assert_eq!(
                expired.outcome(),
                outage.outcome(),
                "not past ttl + stale_if_error"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_vendor_gets_a_fresh_attempt_on_each_stale_lookup() {
        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        let id = member("a@example.com", UserType::Agent);
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(TTL).await;
        source.fail_with(Some(UpstreamError::Timeout));
        broker.lookup(&id).await.unwrap();
        source.fail_with(None);
        let recovered = broker.lookup(&id).await.unwrap();
        assert_eq!(recovered.cache, CacheResult::Miss);
        assert_eq!(recovered.token.expose(), "token-3");
        assert_eq!(broker.lookup(&id).await.unwrap().cache, CacheResult::Hit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_definitive_answer_replaces_the_entry_instead_of_being_masked() {
        let id = member("a@example.com", UserType::Agent);
        // No such user: the stale token is not served, and later outages find nothing.
        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(TTL).await;
        source.fail_with(Some(UpstreamError::NotFound));
        assert!(matches!(
            broker.lookup(&id).await,
            Err(BrokerError::Upstream(UpstreamError::NotFound))
        ));
        tokio::time::advance(NEGATIVE).await;
        source.fail_with(Some(UpstreamError::Timeout));
        assert!(broker.lookup(&id).await.is_err());

        // Inactive: returned as the vendor said, and the old token is gone.
        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(TTL).await;
        source.active.store(false, Ordering::SeqCst);
        let inactive = broker.lookup(&id).await.unwrap();
        assert!(!inactive.active);
        source.fail_with(Some(UpstreamError::Timeout));
        assert!(
            broker.lookup(&id).await.is_err(),
            "no stale token after inactive"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_makes_one_background_call_under_50_concurrent_hits() {
        let source = Counting::with(Duration::from_millis(200), true);
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        let id = member("a@example.com", UserType::Agent);
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(TTL.mul_f64(0.8)).await;

        let hits = futures::future::join_all((0..50).map(|_| broker.lookup(&id))).await;
        for hit in &hits {
            let hit = hit.as_ref().unwrap();
            assert_eq!(
                hit.cache,
                CacheResult::Hit,
                "answered at once from the cache"
            );
            assert_eq!(hit.token.expose(), "token-1");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(source.calls(), 2, "exactly one background refresh");
        let refreshed = broker.lookup(&id).await.unwrap();
        assert_eq!(refreshed.token.expose(), "token-2");
        assert!(
            refreshed.age < Duration::from_millis(200),
            "fetched by the refresh"
        );
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_refresh_point_hits_start_no_refresh() {
        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        let id = member("a@example.com", UserType::Agent);
        broker.lookup(&id).await.unwrap();
        tokio::time::advance(TTL.mul_f64(0.79)).await;
        broker.lookup(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_serving_until_ttl_without_retrying_each_hit() {
        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        let id = member("a@example.com", UserType::Agent);
        broker.lookup(&id).await.unwrap();
        source.fail_with(Some(UpstreamError::Timeout));
        tokio::time::advance(TTL.mul_f64(0.9)).await;
        for _ in 0..10 {
            assert_eq!(broker.lookup(&id).await.unwrap().cache, CacheResult::Hit);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn no_such_user_is_remembered_for_negative_ttl() {
        let source = Counting::new();
        source.fail_with(Some(UpstreamError::NotFound));
        let (broker, metrics) = broker_with(source.clone(), settings(TTL, 100));
        let id = member("ghost@example.com", UserType::Agent);

        assert!(broker.lookup(&id).await.is_err());
        tokio::time::advance(NEGATIVE - Duration::from_secs(1)).await;
        let remembered = broker.lookup(&id).await;
        assert!(matches!(
            remembered,
            Err(BrokerError::Upstream(UpstreamError::NotFound))
        ));
        assert_eq!(source.calls(), 1);
        assert_eq!(lookups(&metrics, "negative"), 1);

        tokio::time::advance(Duration::from_secs(1)).await;
        source.fail_with(None);
        assert!(broker.lookup(&id).await.is_ok(), "expired: asked again");
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_negative_ttl_and_other_errors_are_never_remembered() {
        let source = Counting::new();
        source.fail_with(Some(UpstreamError::NotFound));
        let mut no_negative = settings(TTL, 100);
        no_negative.negative_ttl = Duration::ZERO;
        let (broker, _) = broker_with(source.clone(), no_negative);
        let id = member("ghost@example.com", UserType::Agent);
        assert!(broker.lookup(&id).await.is_err());
        assert!(broker.lookup(&id).await.is_err());
        assert_eq!(source.calls(), 2);

        let source = Counting::new();
        let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
        for error in outages() {
            source.fail_with(Some(error));
            assert!(broker.lookup(&id).await.is_err());
        }
        assert_eq!(source.calls(), outages().len());
    }
}
