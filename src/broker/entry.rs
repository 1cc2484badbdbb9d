//! A cache entry: what the vendor last said about an identity, when, and
//! the answer handed to a caller from it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use moka::Expiry;
use tokio::time::Instant;

use super::BrokerError;
use crate::domain::{Identity, Subject, Token};
use crate::shared::{Stored, StoredAnswer};
use crate::upstream::UpstreamError;

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
pub(super) enum Answer {
    Token { token: Arc<Token>, active: bool },
    NotFound,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) answer: Answer,
    pub(super) fetched_at: Stamp,
    /// Asked of the vendor by this replica (else read from the shared cache).
    pub(super) from_vendor: bool,
    /// Set by the hit that starts this entry's background refresh.
    pub(super) refreshing: AtomicBool,
    /// The identity's audit subject, once an answer from here was audited.
    subject: OnceLock<Subject>,
}

impl Entry {
    pub(super) fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            fetched_at: Stamp::of(Instant::now()),
            from_vendor: true,
            refreshing: AtomicBool::new(false),
            subject: OnceLock::new(),
        })
    }

    /// An answer another replica (or this one, earlier) put in the shared cache.
    pub(super) fn from_shared(stored: Stored) -> Arc<Self> {
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

    pub(super) fn age(&self) -> Duration {
        self.fetched_at.instant().elapsed()
    }

    /// The token, or the vendor's "no such user"; `X-Cache` follows `from_vendor`.
    pub(super) fn issued(self: &Arc<Self>) -> Result<Issued, BrokerError> {
        let cache = if self.from_vendor {
            CacheResult::Miss
        } else {
            CacheResult::Hit
        };
        self.issued_as(cache)
    }

    pub(super) fn issued_as(self: &Arc<Self>, cache: CacheResult) -> Result<Issued, BrokerError> {
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
    pub(super) fn to_stored(&self) -> Option<Stored> {
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
pub(super) struct Stamp(i64);

/// The instant stamps count from.
static STAMP_ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Stamp {
    pub(super) fn of(at: Instant) -> Self {
        let origin = *STAMP_ORIGIN;
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(if at >= origin {
            nanos(at - origin)
        } else {
            -nanos(origin - at)
        })
    }

    pub(super) fn instant(self) -> Instant {
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
pub(super) struct Lifetime {
    pub(super) token: Duration,
    pub(super) not_found: Duration,
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn an_entry_and_its_arc_counts_fit_in_64_bytes() {
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
