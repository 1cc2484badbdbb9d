//! The circuit breaker in front of every dependency the service calls: the
//! vendor and the shared Redis. After `threshold` consecutive failures it
//! opens for `cooldown`; then one call probes, and its result closes the
//! breaker or opens it again. Callers say what counts as a failure; the
//! breaker only keeps the state, so each dependency logs and counts its own
//! changes.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Open, with the one probe under way.
    Probing,
}

/// A change a result made, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Closed → open: the last of `threshold` failures in a row.
    Opened { failures: u32 },
    /// The probe failed: open for another cooldown.
    Reopened,
    /// Open (or probing) → closed: a call succeeded.
    Closed,
}

/// Refused: the breaker is open, or its probe is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Until the next probe may start; `None` while a probe is deciding.
    pub retry_after: Option<Duration>,
}

pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` (at least 1) failures in a row, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets one call through: every call while closed; once the cooldown is
    /// over, the one probe.
    pub fn admit(&self) -> Result<Ticket<'_>, Refused> {
        let now = Instant::now();
        let mut state = self.state();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => {
                return Err(Refused {
                    retry_after: Some(until - now),
                });
            }
            State::Open { .. } => {
                *state = State::Probing;
                true
            }
            State::Probing => return Err(Refused { retry_after: None }),
        };
        Ok(Ticket {
            breaker: self,
            probe,
            decided: false,
        })
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Whether calls go through without waiting for a probe.
    pub fn is_closed(&self) -> bool {
        matches!(*self.state(), State::Closed { .. })
    }

    /// A failure seen outside any admitted call (a dropped subscription).
    pub fn failed(&self) -> Option<Change> {
        self.fail(&mut self.state(), false)
    }

    fn fail(&self, state: &mut State, probe: bool) -> Option<Change> {
        let open = State::Open {
            until: Instant::now() + self.cooldown,
        };
        match *state {
            _ if probe => {
                *state = open;
                Some(Change::Reopened)
            }
            State::Closed { failures } if failures + 1 >= self.threshold => {
                *state = open;
                Some(Change::Opened {
                    failures: failures + 1,
                })
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::Open { .. } | State::Probing => None,
        }
    }
}

/// Permission for one call; says how it went. Dropped undecided, it decides
/// nothing: if it was the probe, the next call probes.
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
    decided: bool,
}

impl Ticket<'_> {
    /// The dependency answered.
    pub fn succeeded(mut self) -> Option<Change> {
        self.decided = true;
        let mut state = self.breaker.state();
        let was = std::mem::replace(&mut *state, State::Closed { failures: 0 });
        (!matches!(was, State::Closed { .. })).then_some(Change::Closed)
    }

    /// The dependency failed.
    pub fn failed(mut self) -> Option<Change> {
        self.decided = true;
        self.breaker.fail(&mut self.breaker.state(), self.probe)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.decided {
            *self.breaker.state() = State::Open {
                until: Instant::now(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_once_after_the_cooldown() {
        let breaker = Breaker::new(2, COOLDOWN);
        assert_eq!(breaker.admit().unwrap().failed(), None);
        assert_eq!(
            breaker.admit().unwrap().failed(),
            Some(Change::Opened { failures: 2 })
        );
        let refused = breaker.admit().err().unwrap();
        assert_eq!(refused.retry_after, Some(COOLDOWN));

        tokio::time::advance(COOLDOWN).await;
        let probe = breaker.admit().unwrap();
        assert_eq!(breaker.admit().err().unwrap().retry_after, None);
        assert_eq!(probe.failed(), Some(Change::Reopened));
        assert!(breaker.admit().is_err());

        tokio::time::advance(COOLDOWN).await;
        assert_eq!(breaker.admit().unwrap().succeeded(), Some(Change::Closed));
        assert!(breaker.is_closed());
        assert_eq!(breaker.admit().unwrap().succeeded(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_and_an_undecided_probe_lets_the_next_call_probe() {
        let breaker = Breaker::new(2, COOLDOWN);
        assert_eq!(breaker.admit().unwrap().failed(), None);
        assert_eq!(breaker.admit().unwrap().succeeded(), None);
        assert_eq!(breaker.admit().unwrap().failed(), None);
        assert!(breaker.is_closed());

        assert_eq!(breaker.failed(), Some(Change::Opened { failures: 2 }));
        tokio::time::advance(COOLDOWN).await;
        drop(breaker.admit().unwrap());
        let probe = breaker.admit().unwrap();
        assert_eq!(probe.succeeded(), Some(Change::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_open_change_nothing() {
        let breaker = Breaker::new(1, COOLDOWN);
        let before = breaker.admit().unwrap();
        assert_eq!(breaker.failed(), Some(Change::Opened { failures: 1 }));
        assert_eq!(before.failed(), None);
        assert_eq!(breaker.failed(), None);
        assert_eq!(breaker.admit().err().unwrap().retry_after, Some(COOLDOWN));
    }
}
