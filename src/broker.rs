//! The domain: which token a caller gets for an identity, from the cache or
//! from the vendor, with exactly one vendor call per key at a time.
//!
//! Two moka caches share the work. `store` holds the last active token per
//! identity, bounded by `cache.max_entries`; freshness is judged here against
//! tokio's clock (so tests can pause time). `flights` exists only to coalesce:
//! its `try_get_with` runs one fetch per key and hands the result, or the
//! error, to every caller that asked meanwhile. Errors are never stored.

pub mod identity;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;

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
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
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
    pub token: Token,
    pub active: bool,
    pub cache: CacheResult,
    /// Time since the vendor handed the token out.
    pub age: Duration,
}

#[derive(Debug)]
struct Entry {
    token: Token,
    active: bool,
    fetched_at: Instant,
}

impl Entry {
    fn issued(&self, cache: CacheResult) -> Issued {
        Issued {
            token: self.token.clone(),
            active: self.active,
            cache,
            age: self.fetched_at.elapsed(),
        }
    }
}

/// The token cache in front of a `TokenSource`.
pub struct Broker {
    store: Cache<Identity, Arc<Entry>>,
    flights: Cache<Identity, Arc<Entry>>,
    source: Arc<dyn TokenSource>,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl Broker {
    pub fn new(
        settings: &CacheSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(settings.ttl)
            .build();
        let flights = Cache::builder().max_capacity(settings.max_entries).build();
        Self {
            store,
            flights,
            source,
            ttl: settings.ttl,
            metrics,
        }
    }

    /// The token for `identity`: from the cache while fresh, else from the vendor.
    pub async fn lookup(&self, identity: &Identity) -> Result<Issued, BrokerError> {
        if let Some(entry) = self.store.get(identity).await
            && entry.fetched_at.elapsed() < self.ttl
        {
            self.metrics.cache_lookup("hit");
            return Ok(entry.issued(CacheResult::Hit));
        }
        self.metrics.cache_lookup("miss");
        let entry = self.fetch_once(identity).await?;
        Ok(entry.issued(CacheResult::Miss))
    }

    /// Drops the cached token of `identity`; the next lookup asks the vendor.
    pub async fn invalidate(&self, identity: &Identity) {
        self.store.invalidate(identity).await;
        self.flights.invalidate(identity).await;
    }

    /// Tokens currently cached.
    pub fn entry_count(&self) -> u64 {
        self.store.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, counts); for metrics and tests.
    pub async fn run_pending_tasks(&self) {
        self.store.run_pending_tasks().await;
    }

    async fn fetch_once(&self, identity: &Identity) -> Result<Arc<Entry>, BrokerError> {
        let started = Instant::now();
        loop {
            let result = self
                .flights
                .try_get_with_by_ref(identity, async {
                    let fetched = self.source.fetch(identity).await?;
                    let entry = Arc::new(Entry {
                        token: fetched.token,
                        active: fetched.active,
                        fetched_at: Instant::now(),
                    });
                    if entry.active {
                        self.store.insert(identity.clone(), entry.clone()).await;
                    }
                    Ok::<_, UpstreamError>(entry)
                })
                .await;
            self.flights.invalidate(identity).await;
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
        active: bool,
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
                active,
                fail: Mutex::new(None),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
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
                    active: self.active,
                })
            })
        }
    }

    fn broker(source: Arc<Counting>, ttl: Duration, max_entries: u64) -> Broker {
        let settings = CacheSettings { ttl, max_entries };
        Broker::new(&settings, source, Arc::new(Metrics::new()))
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
        let broker = broker(source.clone(), Duration::from_secs(600), 100);
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
}
