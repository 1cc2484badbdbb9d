//! Unit tests of the broker: freshness, coalescing, invalidation and
//! stale-if-error against a counting token source, on tokio's paused clock
//! where time matters.

mod fleet;
mod simulation;

use super::*;
use crate::domain::{Email, Token, UserId, UserType};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Hands out `token-<n>` for the n-th call, after `delay`.
struct Counting {
    calls: AtomicUsize,
    /// Who asked for each fetch, as it ended.
    askers: Mutex<Vec<Vec<String>>>,
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
            askers: Mutex::default(),
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
    fn fetch<'a>(&'a self, _identity: &'a Identity, askers: &'a Askers) -> FetchFuture<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            let names = askers.names().iter().map(|a| a.to_string()).collect();
            self.askers.lock().unwrap().push(names);
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

fn caller() -> Arc<str> {
    Arc::from("test-caller")
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
        redis_sentinels: Vec::new(),
        redis_sentinel_master: None,
        redis_cluster_nodes: Vec::new(),
        redis_tls: false,
        redis_password_file: None,
        redis_timeout: Duration::from_millis(250),
        redis_min_replicas: 0,
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

fn lookups(metrics: &Metrics, result: Lookup) -> u64 {
    metrics
        .cache_lookups
        .get_or_create(&crate::telemetry::metrics::ResultLabels {
            result: result.as_str(),
        })
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
    let first = broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let second = broker.lookup(&id, &caller()).await.unwrap();
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
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(Duration::from_secs(601)).await;
    let again = broker.lookup(&id, &caller()).await.unwrap();
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
        tokio::spawn(async move { broker.lookup(&id, &caller()).await.unwrap() })
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
                    broker.lookup(&id, &caller()).await.unwrap().token
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

/// A lookup of `id` whose 100 ms fetch is halfway when `id` is invalidated.
async fn invalidated_halfway(
    broker: &Arc<Broker>,
    id: &Identity,
) -> tokio::task::JoinHandle<Issued> {
    let in_flight = {
        let (broker, id) = (broker.clone(), id.clone());
        tokio::spawn(async move { broker.lookup(&id, &caller()).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.invalidate(id).await.unwrap();
    in_flight
}

#[tokio::test(start_paused = true)]
async fn a_fetch_begun_before_an_invalidation_does_not_store_its_answer() {
    let source = Counting::with(Duration::from_millis(100), true);
    let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 100));
    let id = member("a@example.com", UserType::Agent);
    let in_flight = invalidated_halfway(&broker, &id).await;
    let joined_after = broker.lookup(&id, &caller()).await.unwrap();
    assert_eq!(in_flight.await.unwrap().token.expose(), "token-1");
    assert_eq!(
        joined_after.token.expose(),
        "token-2",
        "a lookup after the invalidation does not join the older fetch"
    );
    let next = broker.lookup(&id, &caller()).await.unwrap();
    assert_eq!(next.token.expose(), "token-2");
    assert_eq!(next.cache, CacheResult::Hit);
    assert_eq!(source.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_is_for_every_caller_that_joined_its_flight() {
    let source = Counting::with(Duration::from_millis(300), true);
    let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 100));
    let id = member("a@example.com", UserType::Agent);
    let lookups: Vec<_> = ["bulk", "single", "bulk"]
        .into_iter()
        .map(|who| {
            let (broker, id) = (broker.clone(), id.clone());
            tokio::spawn(async move { broker.lookup(&id, &Arc::from(who)).await.unwrap() })
        })
        .collect();
    for lookup in lookups {
        lookup.await.unwrap();
    }
    assert_eq!(source.calls(), 1);
    let mut askers = source.askers.lock().unwrap()[0].clone();
    askers.sort();
    assert_eq!(askers, ["bulk", "single"], "the fetch waits in both turns");
    assert!(
        broker.0.askers.lock().unwrap().is_empty(),
        "nothing left behind"
    );
}

#[tokio::test(start_paused = true)]
async fn invalidations_are_remembered_in_bounded_memory_without_undoing_one() {
    let source = Counting::with(Duration::from_millis(100), true);
    let broker = Arc::new(broker(source.clone(), Duration::from_secs(600), 8));
    let id = member("a@example.com", UserType::Agent);
    let in_flight = invalidated_halfway(&broker, &id).await;
    // Far more invalidations than max_entries push the first one out.
    for i in 0..20_000 {
        let other = Identity::Customer(UserId::parse(&format!("c{i}")).unwrap());
        broker.invalidate(&other).await.unwrap();
    }
    assert!(broker.0.generations.remembered() <= 8);
    assert_eq!(in_flight.await.unwrap().token.expose(), "token-1");
    let next = broker.lookup(&id, &caller()).await.unwrap();
    assert_eq!(
        next.token.expose(),
        "token-2",
        "the fetch begun before the forgotten invalidation stored nothing"
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn inactive_tokens_and_errors_are_not_cached() {
    let source = Counting::with(Duration::from_millis(1), false);
    let broker = self::broker(source.clone(), Duration::from_secs(600), 100);
    let id = member("a@example.com", UserType::Agent);
    assert!(!broker.lookup(&id, &caller()).await.unwrap().active);
    assert!(!broker.lookup(&id, &caller()).await.unwrap().active);
    assert_eq!(source.calls(), 2);

    let source = Counting::new();
    *source.fail.lock().unwrap() = Some(UpstreamError::Timeout);
    let broker = self::broker(source.clone(), Duration::from_secs(600), 100);
    assert!(broker.lookup(&id, &caller()).await.is_err());
    *source.fail.lock().unwrap() = None;
    assert_eq!(
        broker.lookup(&id, &caller()).await.unwrap().cache,
        CacheResult::Miss
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn types_of_one_email_are_separate_keys() {
    let source = Counting::new();
    let broker = broker(source.clone(), Duration::from_secs(600), 100);
    let agent = broker
        .lookup(&member("a@example.com", UserType::Agent), &caller())
        .await
        .unwrap();
    let custom = broker
        .lookup(&member("a@EXAMPLE.com", UserType::CustomUser), &caller())
        .await
        .unwrap();
    assert_ne!(agent.token.expose(), custom.token.expose());
    let agent_again = broker
        .lookup(&member("a@Example.Com", UserType::Agent), &caller())
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
        broker.lookup(&id, &caller()).await.unwrap();
    }
    broker.run_pending_tasks().await;
    assert!(broker.entry_count() <= 50, "{}", broker.entry_count());
}

#[tokio::test(start_paused = true)]
async fn the_audit_subject_is_computed_once_per_cache_entry() {
    let source = Counting::new();
    let broker = broker(source.clone(), Duration::from_secs(600), 100);
    let auditor = crate::audit::SubjectKey::with_key(b"0123456789abcdef".to_vec());
    let id = member("a@example.com", UserType::Agent);
    let computed = AtomicUsize::new(0);
    let subject_of = |issued: &Issued| {
        issued.audit_subject(|| {
            computed.fetch_add(1, Ordering::SeqCst);
            auditor.subject(&id)
        })
    };
    let first = subject_of(&broker.lookup(&id, &caller()).await.unwrap());
    let hit = subject_of(&broker.lookup(&id, &caller()).await.unwrap());
    assert_eq!((first, hit), (auditor.subject(&id), auditor.subject(&id)));
    assert_eq!(computed.load(Ordering::SeqCst), 1, "a hit reuses it");
    broker.invalidate(&id).await.unwrap();
    subject_of(&broker.lookup(&id, &caller()).await.unwrap());
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
    broker.lookup(&id, &caller()).await.unwrap();
    broker.invalidate(&id).await.unwrap();
    assert_eq!(
        broker.lookup(&id, &caller()).await.unwrap().cache,
        CacheResult::Miss
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stale_token_is_served_on_each_outage_kind_within_the_window_only() {
    let id = member("a@example.com", UserType::Agent);
    for outage in outages() {
        let source = Counting::new();
        let (broker, metrics) = broker_with(source.clone(), settings(TTL, 100));
        broker.lookup(&id, &caller()).await.unwrap();
        source.fail_with(Some(outage.clone()));

        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        let stale = broker.lookup(&id, &caller()).await.unwrap();
        assert_eq!(stale.cache, CacheResult::Stale, "{outage:?}");
        assert_eq!(stale.token.expose(), "token-1");
        assert_eq!(lookups(&metrics, Lookup::Stale), 1);

        tokio::time::advance(STALE - Duration::from_secs(2)).await;
        assert_eq!(
            broker.lookup(&id, &caller()).await.unwrap().cache,
            CacheResult::Stale
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let expired = broker.lookup(&id, &caller()).await.unwrap_err();
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
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(TTL).await;
    source.fail_with(Some(UpstreamError::Timeout));
    broker.lookup(&id, &caller()).await.unwrap();
    source.fail_with(None);
    let recovered = broker.lookup(&id, &caller()).await.unwrap();
    assert_eq!(recovered.cache, CacheResult::Miss);
    assert_eq!(recovered.token.expose(), "token-3");
    assert_eq!(
        broker.lookup(&id, &caller()).await.unwrap().cache,
        CacheResult::Hit
    );
}

#[tokio::test(start_paused = true)]
async fn a_definitive_answer_replaces_the_entry_instead_of_being_masked() {
    let id = member("a@example.com", UserType::Agent);
    // No such user: the stale token is not served, and later outages find nothing.
    let source = Counting::new();
    let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(TTL).await;
    source.fail_with(Some(UpstreamError::NotFound));
    assert!(matches!(
        broker.lookup(&id, &caller()).await,
        Err(BrokerError::NotFound)
    ));
    tokio::time::advance(NEGATIVE).await;
    source.fail_with(Some(UpstreamError::Timeout));
    assert!(broker.lookup(&id, &caller()).await.is_err());

    // Inactive: returned as the vendor said, and the old token is gone.
    let source = Counting::new();
    let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(TTL).await;
    source.active.store(false, Ordering::SeqCst);
    let inactive = broker.lookup(&id, &caller()).await.unwrap();
    assert!(!inactive.active);
    source.fail_with(Some(UpstreamError::Timeout));
    assert!(
        broker.lookup(&id, &caller()).await.is_err(),
        "no stale token after inactive"
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_makes_one_background_call_under_50_concurrent_hits() {
    let source = Counting::with(Duration::from_millis(200), true);
    let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
    let id = member("a@example.com", UserType::Agent);
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(TTL.mul_f64(0.8)).await;

    let asker = caller();
    let hits = futures::future::join_all((0..50).map(|_| broker.lookup(&id, &asker))).await;
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
    let refreshed = broker.lookup(&id, &caller()).await.unwrap();
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
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::advance(TTL.mul_f64(0.79)).await;
    broker.lookup(&id, &caller()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_serving_until_ttl_without_retrying_each_hit() {
    let source = Counting::new();
    let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
    let id = member("a@example.com", UserType::Agent);
    broker.lookup(&id, &caller()).await.unwrap();
    source.fail_with(Some(UpstreamError::Timeout));
    tokio::time::advance(TTL.mul_f64(0.9)).await;
    for _ in 0..10 {
        assert_eq!(
            broker.lookup(&id, &caller()).await.unwrap().cache,
            CacheResult::Hit
        );
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

    assert!(broker.lookup(&id, &caller()).await.is_err());
    tokio::time::advance(NEGATIVE - Duration::from_secs(1)).await;
    let remembered = broker.lookup(&id, &caller()).await;
    assert!(matches!(remembered, Err(BrokerError::NotFound)));
    assert_eq!(source.calls(), 1);
    assert_eq!(lookups(&metrics, Lookup::Negative), 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    source.fail_with(None);
    assert!(
        broker.lookup(&id, &caller()).await.is_ok(),
        "expired: asked again"
    );
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
    assert!(broker.lookup(&id, &caller()).await.is_err());
    assert!(broker.lookup(&id, &caller()).await.is_err());
    assert_eq!(source.calls(), 2);

    let source = Counting::new();
    let (broker, _) = broker_with(source.clone(), settings(TTL, 100));
    for error in outages() {
        source.fail_with(Some(error));
        assert!(broker.lookup(&id, &caller()).await.is_err());
    }
    assert_eq!(source.calls(), outages().len());
}

/// Whether a `BrokerError` is the one expected.
type Expect = fn(&BrokerError) -> bool;

#[test]
fn vendor_errors_become_what_callers_care_about() {
    let wait = Duration::from_secs(7);
    let cases: [(UpstreamError, Expect); 10] = [
        (UpstreamError::Timeout, |e| {
            matches!(e, BrokerError::TimedOut)
        }),
        (UpstreamError::NotFound, |e| {
            matches!(e, BrokerError::NotFound)
        }),
        (UpstreamError::Rejected(401), |e| {
            matches!(e, BrokerError::Rejected { .. })
        }),
        (UpstreamError::Malformed("html".into()), |e| {
            matches!(e, BrokerError::Unusable { .. })
        }),
        (UpstreamError::UnexpectedStatus(418), |e| {
            matches!(e, BrokerError::Unusable { .. })
        }),
        (
            UpstreamError::Unavailable {
                status: 503,
                retry_after: Some(Duration::from_secs(7)),
            },
            |e| matches!(e, BrokerError::Unavailable { retry_after: Some(w), .. } if w.as_secs() == 7),
        ),
        (
            UpstreamError::CircuitOpen { retry_after: wait },
            |e| matches!(e, BrokerError::Unavailable { retry_after: Some(w), .. } if w.as_secs() == 7),
        ),
        (UpstreamError::Connect("refused".into()), |e| {
            matches!(
                e,
                BrokerError::Unavailable {
                    retry_after: None,
                    ..
                }
            )
        }),
        (UpstreamError::Transport("reset".into()), |e| {
            matches!(
                e,
                BrokerError::Unavailable {
                    retry_after: None,
                    ..
                }
            )
        }),
        (UpstreamError::Saturated, |e| {
            matches!(
                e,
                BrokerError::Unavailable {
                    retry_after: None,
                    ..
                }
            )
        }),
    ];
    for (vendor, expected) in cases {
        let outcome = vendor.outcome();
        let broker = BrokerError::from(vendor.clone());
        assert!(expected(&broker), "{vendor:?} became {broker:?}");
        assert_eq!(
            broker.outcome(),
            outcome,
            "the log label stays the vendor's"
        );
    }
}
