//! What stands between callers and a slow, failing or absent vendor, and
//! between the vendor and a burst from us: a circuit breaker, a bound on
//! requests in flight, and retries with backoff, all inside one deadline
//! (`upstream.timeout`) per fetch. Generic over the attempt, so it is tested
//! with tokio's paused clock and no network.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use crate::breaker::{Breaker, Change, Ticket};
use crate::config::UpstreamSettings;
use crate::telemetry::metrics::Metrics;
use crate::upstream::UpstreamError;
use crate::upstream::fair::{Askers, FairSlots};

/// First backoff ceiling; doubles per retry up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The longest vendor `Retry-After` honoured; longer ones are cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// What callers are told to wait while a probe is deciding the circuit.
const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The policy around every vendor fetch.
pub struct Resilience {
    metrics: Arc<Metrics>,
    in_flight: FairSlots,
    max_retries: u32,
    budget: Duration,
    circuit: Breaker,
}

impl Resilience {
    pub fn new(settings: &UpstreamSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            in_flight: FairSlots::new(settings.max_in_flight, metrics.clone()),
            max_retries: settings.max_retries,
            budget: settings.timeout,
            circuit: Breaker::new(settings.circuit_failures, settings.circuit_cooldown),
            metrics,
        }
    }

    /// Runs `attempt` for `askers` until it succeeds, fails for good, or the
    /// deadline (`upstream.timeout` from now) would pass. Each attempt waits
    /// for a vendor slot in the turns of its askers, and is given the
    /// deadline so it can end itself (and be counted) rather than be dropped.
    /// Generic over what a successful attempt returns, so a second vendor
    /// endpoint shares the same circuit, slots and deadline.
    pub async fn run<T, F, Fut>(&self, askers: &Askers, mut attempt: F) -> Result<T, UpstreamError>
    where
        F: FnMut(Instant) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let deadline = Instant::now() + self.budget;
        let ticket = self.circuit.admit().map_err(|refused| {
            let refused = UpstreamError::CircuitOpen {
                retry_after: refused.retry_after.unwrap_or(PROBE_RETRY_AFTER),
            };
            self.metrics.upstream_outcome(refused.outcome());
            refused
        })?;
        let mut retries = 0;
        let result = loop {
            let Some(permit) = self.in_flight.acquire(askers, deadline).await else {
                self.metrics
                    .upstream_outcome(UpstreamError::Saturated.outcome());
                break Err(UpstreamError::Saturated);
            };
            let result = timeout_at(deadline, attempt(deadline))
                .await
                .unwrap_or(Err(UpstreamError::Timeout));
            drop(permit);
            match result {
                Err(error) if error.is_retryable() && retries < self.max_retries => {
                    let wait = match &error {
                        UpstreamError::Unavailable {
                            retry_after: Some(asked),
                            ..
                        } => (*asked).min(MAX_RETRY_AFTER),
                        _ => backoff(retries),
                    };
                    if Instant::now() + wait >= deadline {
                        break Err(error);
                    }
                    tracing::debug!(retry = retries + 1, ?wait, %error, "retrying the vendor");
                    tokio::time::sleep(wait).await;
                    retries += 1;
                }
                other => break other,
            }
        };
        self.record(ticket, &result);
        result
    }

    /// Tells the breaker how a fetch went: only an outage counts against
    /// the vendor; our own limits say nothing about it.
    fn record<T>(&self, ticket: Ticket<'_>, result: &Result<T, UpstreamError>) {
        let change = match result {
            Err(UpstreamError::Saturated | UpstreamError::CircuitOpen { .. }) => None,
            Err(error) if error.is_outage() => ticket.failed(),
            _ => ticket.succeeded(),
        };
        match change {
            Some(Change::Opened { failures }) => {
                let cooldown = self.circuit.cooldown();
                tracing::warn!(failures, ?cooldown, "circuit to the vendor opened");
                self.metrics.upstream_circuit_open.set(1);
            }
            Some(Change::Reopened) => {
                if let Err(error) = result {
                    tracing::warn!(%error, "circuit probe failed, circuit stays open");
                }
            }
            Some(Change::Closed) => {
                tracing::info!("circuit to the vendor closed");
                self.metrics.upstream_circuit_open.set(0);
            }
            None => {}
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base × 2^n)]`.
fn backoff(retries: u32) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1u32 << retries.min(16))
        .min(MAX_BACKOFF);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Fetched;
    use std::sync::Mutex;

    fn caller() -> &'static Askers {
        static CALLER: std::sync::LazyLock<Askers> =
            std::sync::LazyLock::new(|| Askers::new(&Arc::from("test-caller")));
        &CALLER
    }
    use crate::domain::Token;
    use futures::future::join_all;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings(max_retries: u32, failures: u32) -> UpstreamSettings {
        let mut settings = crate::config::Settings::load(&Default::default())
            .unwrap()
            .upstream;
        settings.timeout = Duration::from_secs(5);
        settings.max_in_flight = 4;
        settings.max_retries = max_retries;
        settings.circuit_failures = failures;
        settings.circuit_cooldown = Duration::from_secs(10);
        settings
    }

    fn resilience(max_retries: u32, failures: u32) -> (Resilience, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (
            Resilience::new(&settings(max_retries, failures), metrics.clone()),
            metrics,
        )
    }

    fn ok() -> Result<Fetched, UpstreamError> {
        Ok(Fetched {
            token: Token::new("t"),
            active: true,
        })
    }

    fn unavailable(status: u16) -> UpstreamError {
        UpstreamError::Unavailable {
            status,
            retry_after: None,
        }
    }

    /// Runs one fetch whose every attempt returns `error`; returns the attempt count.
    async fn attempts_for(r: &Resilience, error: UpstreamError) -> usize {
        let calls = AtomicUsize::new(0);
        let result: Result<Fetched, _> = r
            .run(caller(), |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                let error = error.clone();
                async move { Err(error) }
            })
            .await;
        assert!(result.is_err());
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_max_retries_times() {
        let (r, _) = resilience(2, 100);
        for error in [
            UpstreamError::Connect("refused".into()),
            unavailable(429),
            unavailable(502),
            unavailable(503),
            unavailable(504),
        ] {
            assert_eq!(attempts_for(&r, error.clone()).await, 3, "{error:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_not_retried() {
        let (r, _) = resilience(2, 100);
        for error in [
            UpstreamError::UnexpectedStatus(400),
            UpstreamError::Rejected(401),
            UpstreamError::NotFound,
            UpstreamError::Malformed("html".into()),
            unavailable(500),
            UpstreamError::Timeout,
        ] {
            assert_eq!(attempts_for(&r, error.clone()).await, 1, "{error:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_succeeds_after_a_transient_failure() {
        let (r, _) = resilience(2, 100);
        let calls = AtomicUsize::new(0);
        let result: Result<Fetched, _> = r
            .run(caller(), |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move { if n == 0 { Err(unavailable(503)) } else { ok() } }
            })
            .await;
        assert!(result.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_from_the_vendor_is_honoured() {
        let (r, _) = resilience(1, 100);
        let started = Instant::now();
        let times = Mutex::new(Vec::new());
        let _: Result<Fetched, _> = r
            .run(caller(), |_| {
                times.lock().unwrap().push(started.elapsed());
                async {
                    Err(UpstreamError::Unavailable {
                        status: 503,
                        retry_after: Some(Duration::from_secs(3)),
                    })
                }
            })
            .await;
        let times = times.into_inner().unwrap();
        assert_eq!(times.len(), 2);
        assert!(times[1] >= Duration::from_secs(3), "{times:?}");
        assert!(times[1] < Duration::from_millis(3100), "{times:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_is_made_past_the_deadline() {
        let (r, _) = resilience(5, 100);
        let started = Instant::now();
        let attempts = attempts_for(
            &r,
            UpstreamError::Unavailable {
                status: 503,
                retry_after: Some(Duration::from_secs(6)),
            },
        )
        .await;
        assert_eq!(attempts, 1, "a 6 s Retry-After does not fit a 5 s deadline");
        assert!(started.elapsed() < Duration::from_secs(1));

        let started = Instant::now();
        let calls = AtomicUsize::new(0);
        let result: Result<Fetched, _> = r
            .run(caller(), |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending()
            })
            .await;
        assert!(matches!(result, Err(UpstreamError::Timeout)));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_with_full_jitter_and_stays_capped() {
        for retries in 0..20 {
            let ceiling = (BASE_BACKOFF * 2u32.pow(retries.min(16))).min(MAX_BACKOFF);
            for _ in 0..50 {
                assert!(backoff(retries) <= ceiling);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(3)).collect();
        assert!(spread.len() > 10, "jitter spreads the waits");
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_n_failures_then_probes_once_and_closes() {
        let (r, metrics) = resilience(0, 3);
        let calls = AtomicUsize::new(0);
        let failing = |_: Instant| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(unavailable(503)) }
        };
        for _ in 0..3 {
            assert!(matches!(
                r.run(caller(), failing).await,
                Err(UpstreamError::Unavailable { .. })
            ));
        }
        assert_eq!(metrics.upstream_circuit_open.get(), 1);

        let open: Result<Fetched, _> = r.run(caller(), failing).await;
        assert!(
            matches!(open, Err(UpstreamError::CircuitOpen { retry_after }) if retry_after == Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(matches!(
            r.run(caller(), failing).await,
            Err(UpstreamError::CircuitOpen { .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "no call while open");

        tokio::time::advance(Duration::from_secs(1)).await;
        let probe_calls = AtomicUsize::new(0);
        let (probe, concurrent) = tokio::join!(
            r.run(caller(), |_| {
                probe_calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    ok()
                }
            }),
            async {
                tokio::task::yield_now().await;
                r.run(caller(), |_| {
                    probe_calls.fetch_add(1, Ordering::SeqCst);
                    async { ok() }
                })
                .await
            }
        );
        assert!(probe.is_ok());
        assert!(
            matches!(concurrent, Err(UpstreamError::CircuitOpen { .. })),
            "only one probe"
        );
        assert_eq!(probe_calls.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.upstream_circuit_open.get(), 0);
        assert!(
            r.run(caller(), |_| async { ok() }).await.is_ok(),
            "closed again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_definitive_answers_count_as_success() {
        let (r, metrics) = resilience(0, 1);
        let _: Result<Fetched, _> = r
            .run(caller(), |_| async { Err(UpstreamError::Timeout) })
            .await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let _: Result<Fetched, _> = r.run(caller(), |_| async { Err(unavailable(502)) }).await;
        assert!(matches!(
            r.run(caller(), |_| async { ok() }).await,
            Err(UpstreamError::CircuitOpen { .. })
        ));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(matches!(
            r.run(caller(), |_| async {
                Err::<Fetched, _>(UpstreamError::NotFound)
            })
            .await,
            Err(UpstreamError::NotFound)
        ));
        assert_eq!(
            metrics.upstream_circuit_open.get(),
            0,
            "a 404 shows the vendor is up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_caller_went_away_lets_the_next_fetch_probe() {
        let (r, _) = resilience(0, 1);
        let _: Result<Fetched, _> = r
            .run(caller(), |_| async { Err(UpstreamError::Timeout) })
            .await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let abandoned = tokio::time::timeout(
            Duration::from_millis(10),
            r.run(caller(), |_| std::future::pending::<Result<Fetched, _>>()),
        )
        .await;
        assert!(abandoned.is_err());
        assert!(r.run(caller(), |_| async { ok() }).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_max_in_flight_attempts_run_at_once() {
        let (r, _) = resilience(0, 1000);
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let fetches = (0..50).map(|_| {
            r.run(caller(), |_| async {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                ok()
            })
        });
        let results = join_all(fetches).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_beyond_the_bound_give_up_at_the_deadline_with_saturated() {
        let (r, _) = resilience(0, 1000);
        let holders = join_all(
            (0..4).map(|_| r.run(caller(), |_| std::future::pending::<Result<Fetched, _>>())),
        );
        let waiting = async {
            // Let the holders take every permit first.
            tokio::task::yield_now().await;
            r.run(caller(), |_| async { ok() }).await
        };
        // `join!` polls in order: at the shared deadline the waiter is polled
        // before the holders give their permits back.
        let (waited, held) = tokio::join!(waiting, holders);
        assert!(
            matches!(waited, Err(UpstreamError::Saturated)),
            "{waited:?}"
        );
        assert!(
            held.iter()
                .all(|h| matches!(h, Err(UpstreamError::Timeout)))
        );
    }
}
