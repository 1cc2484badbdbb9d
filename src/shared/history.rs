//! The judge of a fleet's history: what clients saw of reads and `DELETE`s
//! across replicas, checked against the promise of a confirmed
//! invalidation. The fault suite (real processes, real Redis) and the
//! in-process simulation (`in_process`, on the paused clock) record their
//! histories in these terms and are judged by the same `judge`.
//!
//! Tokens carry their version: a read's `version` is the version of the
//! token it got, a `DELETE`'s the version its key was rotated to just
//! before it.

use std::fmt::Write as _;
use std::time::Duration;

/// What one request was, and what it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Read {
        status: u16,
        version: Option<u64>,
        /// `X-Cache`: where the answer came from.
        cache: Option<String>,
    },
    Delete {
        status: u16,
        version: u64,
    },
}

/// One request: through which replica, for which key, when (from the
/// history's start), and what it got.
#[derive(Debug, Clone)]
pub struct Op {
    pub broker: usize,
    pub key: usize,
    pub start: Duration,
    pub end: Duration,
    pub kind: Kind,
}

/// What the history must keep to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A confirmed invalidation holds on every replica within this.
    pub invalidation_bound: Duration,
    /// No request takes longer.
    pub longest: Duration,
}

/// What a history that kept its promises held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub reads: usize,
    pub confirmed: usize,
    pub longest: Duration,
}

/// Judges `history`: every read is a 200 with a versioned token, every
/// `DELETE` a 204 or a 503, no request takes longer than `limits.longest`,
/// and no read that began more than `limits.invalidation_bound` after a
/// `DELETE` of its key answered 204 returns a version older than that
/// `DELETE`'s. `Err` describes the first violation with what its key went
/// through around it.
pub fn judge(history: &[Op], limits: Limits) -> Result<Judged, String> {
    let confirmed: Vec<(usize, u64, Duration)> = history
        .iter()
        .filter_map(|op| match op.kind {
            Kind::Delete {
                status: 204,
                version,
            } => Some((op.key, version, op.end)),
            _ => None,
        })
        .collect();
    let mut judged = Judged {
        reads: 0,
        confirmed: confirmed.len(),
        longest: Duration::ZERO,
    };
    for op in history {
        let took = op.end.saturating_sub(op.start);
        judged.longest = judged.longest.max(took);
        if took > limits.longest {
            return Err(format!("{op:?} took {took:?}"));
        }
        match op.kind {
            Kind::Read {
                status, version, ..
            } => {
                judged.reads += 1;
                let Some(version) = version.filter(|_| status == 200) else {
                    return Err(format!("a read failed: {op:?}"));
                };
                let rotated = confirmed.iter().find(|&&(key, rotated_to, at)| {
                    key == op.key
                        && version < rotated_to
                        && op.start > at + limits.invalidation_bound
                });
                if let Some(&(key, rotated_to, at)) = rotated {
                    let mut told = format!(
                        "broker {} served v{version} of key {key} {:?} after the DELETE for v{rotated_to} was confirmed",
                        op.broker,
                        op.start - at
                    );
                    let window = at.saturating_sub(Duration::from_secs(2))..=op.end;
                    for other in history
                        .iter()
                        .filter(|o| o.key == key && window.contains(&o.start))
                    {
                        let _ = write!(told, "\n  key {key}: {other:?}");
                    }
                    return Err(told);
                }
            }
            Kind::Delete { status, .. } => {
                if !matches!(status, 204 | 503) {
                    return Err(format!("a DELETE answered neither 204 nor 503: {op:?}"));
                }
            }
        }
    }
    Ok(judged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(broker: usize, at: u64, version: u64) -> Op {
        Op {
            broker,
            key: 0,
            start: Duration::from_secs(at),
            end: Duration::from_secs(at),
            kind: Kind::Read {
                status: 200,
                version: Some(version),
                cache: None,
            },
        }
    }

    fn delete(at: u64, status: u16, version: u64) -> Op {
        Op {
            broker: 0,
            key: 0,
            start: Duration::from_secs(at),
            end: Duration::from_secs(at),
            kind: Kind::Delete { status, version },
        }
    }

    const LIMITS: Limits = Limits {
        invalidation_bound: Duration::from_secs(2),
        longest: Duration::from_secs(3),
    };

    #[test]
    fn an_old_version_past_the_bound_after_a_confirmed_delete_is_a_violation() {
        let kept = [
            read(0, 1, 1),
            delete(2, 204, 2),
            read(1, 3, 1),
            read(1, 5, 2),
        ];
        assert_eq!(
            judge(&kept, LIMITS),
            Ok(Judged {
                reads: 3,
                confirmed: 1,
                longest: Duration::ZERO
            }),
            "within the bound the old version may still be served"
        );
        let broken = [delete(2, 204, 2), read(1, 5, 1)];
        let told = judge(&broken, LIMITS).unwrap_err();
        assert!(
            told.contains("broker 1 served v1 of key 0 3s after"),
            "{told}"
        );
        // A DELETE refused with 503 promised nothing.
        assert!(judge(&[delete(2, 503, 2), read(1, 5, 1)], LIMITS).is_ok());
    }

    #[test]
    fn failed_reads_slow_requests_and_odd_statuses_are_violations() {
        let mut failed = read(0, 1, 1);
        failed.kind = Kind::Read {
            status: 503,
            version: None,
            cache: None,
        };
        assert!(judge(&[failed], LIMITS).is_err());
        let mut slow = read(0, 1, 1);
        slow.end = Duration::from_secs(5);
        assert!(judge(&[slow], LIMITS).is_err());
        assert!(judge(&[delete(1, 500, 1)], LIMITS).is_err());
    }
}
