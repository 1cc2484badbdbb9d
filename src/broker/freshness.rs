//! The freshness policy as one pure function: given what the cache holds for
//! a key and how old it is, serve it, serve it and refresh it, or fetch.

use std::time::Duration;

/// While a replica cannot hear invalidations (its subscription to the shared
/// cache is down), an answer is served for at most this long after it was
/// fetched: an invalidation made meanwhile elsewhere still holds within 2 s.
pub const UNSYNCED_MAX_AGE: Duration = Duration::from_secs(1);

/// The settings the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ttl: Duration,
    pub refresh_after: Duration,
    pub negative_ttl: Duration,
    pub revalidate_interval: Duration,
}

/// What a cached entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Token,
    NotFound,
}

/// How a lookup was asked.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// The caller sent `Cache-Control: no-cache`.
    pub revalidate: bool,
    /// This replica hears every invalidation now.
    pub in_sync: bool,
}

/// What to do with a cached entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Serve,
    /// Serve, and start one background refresh.
    ServeAndRefresh,
    Fetch,
}

/// The decision for an entry holding `held`, `age` old.
pub fn decide(lifetimes: &Lifetimes, held: Held, age: Duration, asked: Asked) -> Decision {
    if !asked.in_sync && age >= UNSYNCED_MAX_AGE {
        return Decision::Fetch;
    }
    if asked.revalidate {
        return if age < lifetimes.revalidate_interval {
            Decision::Serve
        } else {
            Decision::Fetch
        };
    }
    match held {
        Held::NotFound if age < lifetimes.negative_ttl => Decision::Serve,
        Held::Token if age < lifetimes.refresh_after => Decision::Serve,
        Held::Token if age < lifetimes.ttl => Decision::ServeAndRefresh,
        _ => Decision::Fetch,
    }
}

/// Whether an expired token may stand in while the vendor fails: within
/// `ttl + stale_if_error`, and only while invalidations are heard.
pub fn servable_when_failing(
    ttl: Duration,
    stale_for: Duration,
    age: Duration,
    in_sync: bool,
) -> bool {
    age < ttl + stale_for && (in_sync || age < UNSYNCED_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFETIMES: Lifetimes = Lifetimes {
        ttl: Duration::from_secs(600),
        refresh_after: Duration::from_secs(480),
        negative_ttl: Duration::from_secs(30),
        revalidate_interval: Duration::from_secs(10),
    };
    const PLAIN: Asked = Asked {
        revalidate: false,
        in_sync: true,
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_token_is_served_then_refreshed_ahead_then_fetched() {
        assert_eq!(
            decide(&LIFETIMES, Held::Token, secs(0), PLAIN),
            Decision::Serve
        );
        assert_eq!(
            decide(&LIFETIMES, Held::Token, secs(479), PLAIN),
            Decision::Serve
        );
        assert_eq!(
            decide(&LIFETIMES, Held::Token, secs(480), PLAIN),
            Decision::ServeAndRefresh
        );
        assert_eq!(
            decide(&LIFETIMES, Held::Token, secs(600), PLAIN),
            Decision::Fetch
        );
    }

    #[test]
    fn no_such_user_is_served_within_negative_ttl_only() {
        assert_eq!(
            decide(&LIFETIMES, Held::NotFound, secs(29), PLAIN),
            Decision::Serve
        );
        assert_eq!(
            decide(&LIFETIMES, Held::NotFound, secs(30), PLAIN),
            Decision::Fetch
        );
    }

    #[test]
    fn a_revalidation_accepts_only_an_answer_younger_than_the_interval() {
        let asked = Asked {
            revalidate: true,
            in_sync: true,
        };
        for held in [Held::Token, Held::NotFound] {
            assert_eq!(decide(&LIFETIMES, held, secs(9), asked), Decision::Serve);
            assert_eq!(decide(&LIFETIMES, held, secs(10), asked), Decision::Fetch);
        }
    }

    #[test]
    fn without_the_invalidation_feed_an_answer_lives_one_second() {
        let asked = Asked {
            revalidate: false,
            in_sync: false,
        };
        assert_eq!(
            decide(&LIFETIMES, Held::Token, Duration::from_millis(999), asked),
            Decision::Serve
        );
        assert_eq!(
            decide(&LIFETIMES, Held::Token, secs(1), asked),
            Decision::Fetch
        );
        assert!(servable_when_failing(
            LIFETIMES.ttl,
            secs(3600),
            secs(700),
            true
        ));
        assert!(!servable_when_failing(
            LIFETIMES.ttl,
            secs(3600),
            secs(700),
            false
        ));
        assert!(!servable_when_failing(
            LIFETIMES.ttl,
            secs(3600),
            secs(4200),
            true
        ));
    }
}
