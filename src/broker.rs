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

pub mod identity;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::CacheSettings;
use crate::telemetry::metrics::Metrics;
use crate::upstream::{Fetched, Token, UpstreamClient, UpstreamError};
use identity::Identity;

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
    fetched_at: Instant,
    /// Set by the hit that starts this entry's background refresh.
    refreshing: AtomicBool,
}

impl Entry {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            fetched_at: Instant::now(),
            refreshing: AtomicBool::new(false),
        })
    }

    fn issued(&self, cache: CacheResult) -> Result<Issued, BrokerError> {
        match &self.answer {
            Answer::Token { token, active } => Ok(Issued {
                token: token.clone(),
                active: *active,
                cache,
                age: self.fetched_at.elapsed(),
            }),
            Answer::NotFound => Err(UpstreamError::NotFound.into()),
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
        match entry.answer {
            Answer::Token { .. } => self.token,
            Answer::NotFound => self.not_found,
        }
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

struct Inner {
    store: Cache<Identity, Arc<Entry>>,
    flights: Cache<Identity, Arc<Entry>>,
    source: Arc<dyn TokenSource>,
    ttl: Duration,
    refresh_after: Duration,
    stale_for: Duration,
    negative_ttl: Duration,
    metrics: Arc<Metrics>,
}

/// The token cache in front of a `TokenSource`; clones share one cache.
#[derive(Clone)]
pub struct Broker(Arc<Inner>);

impl Broker {
    pub fn new(
        settings: &CacheSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
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
            source,
            ttl: settings.ttl,
            refresh_after: settings.ttl.mul_f64(settings.refresh_ahead),
            stale_for: settings.stale_if_error,
            negative_ttl: settings.negative_ttl,
            metrics,
        }))
    }

    /// The token for `identity`: from the cache while fresh, else from the
    /// vendor, else (while the vendor fails) a stale one.
    pub async fn lookup(&self, identity: &Identity) -> Result<Issued, BrokerError> {
        let span = tracing::info_span!(
            "cache.lookup",
            otel.name = "cache.lookup",
            identity.kind = identity.kind(),
            cache.result = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::telemetry::record_trace_ids(&span);
        self.lookup_in_cache(identity).instrument(span).await
    }

    /// Counts one lookup result and notes it on the lookup span.
    fn counted(&self, result: &'static str) {
        self.0.metrics.cache_lookup(result);
        tracing::Span::current().record("cache.result", result);
    }

    async fn lookup_in_cache(&self, identity: &Identity) -> Result<Issued, BrokerError> {
        let inner = &self.0;
        let cached = inner.store.get(identity).await;
        if let Some(entry) = &cached {
            let age = entry.fetched_at.elapsed();
            match entry.answer {
                Answer::NotFound if age < inner.negative_ttl => {
                    self.counted("negative");
                    return entry.issued(CacheResult::Hit);
                }
                Answer::Token { .. } if age < inner.ttl => {
                    if age >= inner.refresh_after && !entry.refreshing.swap(true, Ordering::AcqRel)
                    {
                        self.refresh_in_background(identity.clone());
                    }
                    self.counted("hit");
                    return entry.issued(CacheResult::Hit);
                }
                _ => {}
            }
        }
        match self.fetch_once(identity).await {
            Ok(entry) => {
                self.counted("miss");
                entry.issued(CacheResult::Miss)
            }
            Err(BrokerError::Upstream(error)) => {
                if let Some(stale) = cached.filter(|e| self.servable_when_failing(e, &error)) {
                    tracing::warn!(%error, outcome = error.outcome(), "vendor failing, serving a stale token");
                    self.counted("stale");
                    return stale.issued(CacheResult::Stale);
                }
                self.counted("miss");
                Err(error.into())
            }
        }
    }

    /// An expired token may stand in while the vendor is failing, within `stale_if_error`.
    fn servable_when_failing(&self, entry: &Entry, error: &UpstreamError) -> bool {
        error.is_outage()
            && matches!(entry.answer, Answer::Token { .. })
            && entry.fetched_at.elapsed() < self.0.ttl + self.0.stale_for
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
        tokio::spawn(
            async move {
                if let Err(error) = broker.fetch_once(&identity).await {
                    tracing::debug!(%error, "background refresh failed; the entry is served until ttl");
                }
            }
            .instrument(span),
        );
    }

    /// Drops the cached token of `identity`; the next lookup asks the vendor.
    pub async fn invalidate(&self, identity: &Identity) {
        self.0.store.invalidate(identity).await;
        self.0.flights.invalidate(identity).await;
    }

    /// Entries currently cached (tokens and remembered "no such user" answers).
    pub fn entry_count(&self) -> u64 {
        self.0.store.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, counts); for metrics and tests.
    pub async fn run_pending_tasks(&self) {
        self.0.store.run_pending_tasks().await;
    }

    /// Asks the vendor, one call per key however many callers ask at once,
    /// and records the answer in `store`.
    async fn fetch_once(&self, identity: &Identity) -> Result<Arc<Entry>, BrokerError> {
        let inner = &self.0;
        let started = Instant::now();
        loop {
            let result = inner
                .flights
                .try_get_with_by_ref(identity, async {
                    match inner.source.fetch(identity).await {
                        Ok(fetched) => {
                            let entry = Entry::new(Answer::Token {
                                token: Arc::new(fetched.token),
                                active: fetched.active,
                            });
                            if fetched.active {
                                inner.store.insert(identity.clone(), entry.clone()).await;
                            } else {
                                inner.store.invalidate(identity).await;
                            }
                            Ok(entry)
                        }
                        Err(UpstreamError::NotFound) => {
                            if inner.negative_ttl.is_zero() {
                                inner.store.invalidate(identity).await;
                            } else {
                                let entry = Entry::new(Answer::NotFound);
                                inner.store.insert(identity.clone(), entry).await;
                            }
                            Err(UpstreamError::NotFound)
                        }
                        Err(error) => Err(error),
                    }
                })
                .await;
            inner.flights.invalidate(identity).await;
            match result {
                // A flight that finished before this call began was left behind by a
                // leader whose caller went away before clearing it: never serve it.
                Ok(entry) if entry.fetched_at < started => continue,
                Ok(entry) => return Ok(entry),
                Err(error) => return Err(BrokerError::from((*error).clone())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::identity::{Email, UserId, UserType};
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
            max_entries,
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
