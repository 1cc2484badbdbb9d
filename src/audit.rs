//! The audit trail: one structured event for every request on a token route
//! from a known caller, whatever it came to (issued, invalidated, denied,
//! rate limited, failed), with the `audit` target so operators can route it.
//! It is that request's only log line, and its answer leaves once the write
//! of the event has returned (`Auditor::record`, then `Commit::written`).
//!
//! Events name the caller, the identity kind and type, the status, duration,
//! cache result, request id and trace id, and carry `subject`, an HMAC-SHA256
//! of the email or user id under a key every replica shares, instead of the
//! value itself. Never a token.

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

use crate::config::{AuditSettings, ConfigError, LogFormat};
use crate::domain::{Identity, Proof, Subject};
use crate::telemetry::AUDIT_TARGET;
use crate::telemetry::line::Line;
pub use crate::telemetry::writer::{AuditTrail, AuditUnavailable, Commit};

/// Shortest accepted `audit.hash_key_file` content.
const MIN_KEY_BYTES: usize = 16;

/// How long a request waits for the write of its audit event before it
/// fails with 503 `audit-unavailable`: far longer than a write to a log
/// collector that keeps up takes (microseconds), long enough for a pipe
/// that a slow collector drains to pass the lines ahead of it.
pub const WRITE_WITHIN: Duration = Duration::from_secs(5);

/// Writes audit events: the subject key, the trail they are committed to,
/// and the log format.
pub struct Auditor {
    key: SubjectKey,
    trail: AuditTrail,
    format: LogFormat,
}

/// The key of the HMAC that stands for an email or user id in audit events.
pub struct SubjectKey {
    /// HMAC state with the key already absorbed: each subject clones it
    /// instead of hashing the key again.
    keyed: Hmac<Sha256>,
}

impl SubjectKey {
    /// The key from `audit.hash_key_file`, or else one derived from the partner key.
    pub fn from_settings(
        settings: &AuditSettings,
        partner_key: &SecretString,
    ) -> Result<Self, ConfigError> {
        match &settings.hash_key_file {
            Some(path) => Self::from_file(path),
            None => {
                let derived = Sha256::new()
                    .chain_update(b"token-broker audit subject key\0")
                    .chain_update(partner_key.expose_secret().as_bytes())
                    .finalize();
                Ok(Self::with_key(derived.to_vec()))
            }
        }
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            key: "audit.hash_key_file".into(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let key = text.trim().as_bytes().to_vec();
        if key.len() < MIN_KEY_BYTES {
            return Err(invalid(format!(
                "{} must hold at least {MIN_KEY_BYTES} characters (try: openssl rand -hex 32)",
                path.display()
            )));
        }
        Ok(Self::with_key(key))
    }

    pub fn with_key(key: Vec<u8>) -> Self {
        let key = SecretBox::new(Box::new(key));
        let Ok(keyed) = Hmac::<Sha256>::new_from_slice(key.expose_secret()) else {
            unreachable!("HMAC accepts keys of any length")
        };
        Self { keyed }
    }

    /// The HMAC-SHA256 (first 128 bits) of the email (or user id) of `identity`.
    pub fn subject(&self, identity: &Identity) -> Subject {
        let mut mac = self.keyed.clone();
        match identity {
            Identity::TeamMember { email, .. } => {
                mac.update(b"email:");
                mac.update(email.as_str().as_bytes());
            }
            Identity::Customer(user_id) => {
                mac.update(b"user_id:");
                mac.update(user_id.as_str().as_bytes());
            }
        }
        let mut subject = [0; 16];
        subject.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        Subject::from_hash(subject)
    }
}

thread_local! {
    /// The line being written; reused, so an event allocates nothing here.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

impl Auditor {
    pub fn new(key: SubjectKey, trail: AuditTrail, format: LogFormat) -> Self {
        Self { key, trail, format }
    }

    /// The keyed hash of the email or user id of `identity`.
    pub fn subject(&self, identity: &Identity) -> Subject {
        self.key.subject(identity)
    }

    /// Whose token a request asked for, as its audit event names them.
    pub fn identity(&self, identity: &Identity) -> AuditedIdentity {
        AuditedIdentity::with_subject(identity, self.subject(identity))
    }

    /// Queues the audit event of one token-route request; its answer may
    /// leave once `Commit::written` says the event is written. `Err` when
    /// the log output cannot take it: the request must then fail, since no
    /// token leaves without its audit event.
    pub fn record(&self, record: &Record<'_>) -> Result<Commit, AuditUnavailable> {
        LINE.with(|line| {
            let mut out = line.borrow_mut();
            let mut hex = [0; 32];
            let identity = record.identity.as_ref();
            let mut line = Line::info(&mut out, self.format, AUDIT_TARGET, record.event.message());
            line.text("outcome", Some(record.event.as_str()))
                .number("status", Some(u64::from(record.status)))
                .text("rule", record.rule)
                .text("caller", record.caller)
                .text("proof", Some(record.proof.method()))
                .text("service_account", record.proof.service_account())
                .text("spiffe_id", record.proof.spiffe_id())
                .text("identity", identity.map(|i| i.kind))
                .text("user_type", identity.and_then(|i| i.user_type))
                .text("subject", identity.map(|i| i.subject.hex(&mut hex)))
                .text("cache", record.cache)
                .flag("active", record.active)
                .number(
                    "duration_us",
                    Some(crate::telemetry::whole_micros(record.duration)),
                )
                .text("route", Some(record.route))
                .text("request_id", Some(record.request_id))
                .text("trace_id", record.trace_id);
            line.end();
            self.trail.commit(out.as_bytes())
        })
    }
}

/// Whose token a request asked for: the kind of identity, the type, and the
/// keyed hash of the email or user id, never the value.
#[derive(Debug, Clone, Copy)]
pub struct AuditedIdentity {
    kind: &'static str,
    user_type: Option<&'static str>,
    subject: Subject,
}

impl AuditedIdentity {
    /// `subject` is the auditor's `subject(identity)`, which a cache entry
    /// may have kept from an earlier event.
    pub fn with_subject(identity: &Identity, subject: Subject) -> Self {
        Self {
            kind: identity.kind(),
            user_type: user_type(identity),
            subject,
        }
    }
}

/// The audit event of one request on a token route from a known caller:
/// what it came to and everything its log line says.
pub struct Record<'a> {
    pub event: EventKind,
    pub status: u16,
    /// The rule that refused a `Denied` request.
    pub rule: Option<&'static str>,
    /// The configured client name; none for a verified service account or
    /// certificate that no client names (its `denied` event).
    pub caller: Option<&'a str>,
    /// How the caller proved who it is: `key`, `service_account` (with its
    /// `namespace:name`), `certificate` (with its SPIFFE ID) or `anonymous`.
    pub proof: &'a Proof,
    /// Whose token, once the query named someone.
    pub identity: Option<AuditedIdentity>,
    pub cache: Option<&'static str>,
    pub active: Option<bool>,
    pub duration: Duration,
    pub route: &'a str,
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
}

/// What a token-route request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A token was handed out.
    Issued,
    /// A cached token was dropped on request.
    Invalidated,
    /// A 403: the caller may not do this.
    Denied,
    /// A 429: the caller is over its rate limit.
    RateLimited,
    /// Any other refusal or failure (400, 404, 409, 5xx).
    Failed,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Issued => "issued",
            EventKind::Invalidated => "invalidated",
            EventKind::Denied => "denied",
            EventKind::RateLimited => "rate_limited",
            EventKind::Failed => "failed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            EventKind::Issued => "token issued",
            EventKind::Invalidated => "token invalidated",
            EventKind::Denied => "request denied",
            EventKind::RateLimited => "request rate limited",
            EventKind::Failed => "request failed",
        }
    }
}

fn user_type(identity: &Identity) -> Option<&'static str> {
    match identity {
        Identity::TeamMember { user_type, .. } => Some(user_type.as_str()),
        Identity::Customer(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, UserId, UserType};

    fn member(email: &str, user_type: UserType) -> Identity {
        Identity::TeamMember {
            email: Email::parse(email).unwrap(),
            user_type,
        }
    }

    #[test]
    fn subjects_are_keyed_stable_and_distinct() {
        let a = SubjectKey::with_key(b"0123456789abcdef".to_vec());
        let b = SubjectKey::with_key(b"0123456789abcdef".to_vec());
        let other = SubjectKey::with_key(b"fedcba9876543210".to_vec());
        let alice = member("alice@example.com", UserType::Agent);
        assert_eq!(
            a.subject(&alice),
            b.subject(&alice),
            "same key, same subject"
        );
        assert_ne!(a.subject(&alice), other.subject(&alice), "the key matters");
        assert_eq!(
            a.subject(&alice),
            a.subject(&member("alice@EXAMPLE.com", UserType::CustomUser)),
            "one person, one subject"
        );
        assert_ne!(
            a.subject(&alice),
            a.subject(&member("bob@example.com", UserType::Agent))
        );
        let customer = Identity::Customer(UserId::parse("alice").unwrap());
        assert_ne!(a.subject(&customer), a.subject(&alice));
        let text = a.subject(&alice).to_string();
        assert_eq!(text.len(), 32);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!text.contains("alice"));
    }

    #[test]
    fn a_subject_is_the_hex_of_the_first_half_of_the_hmac_of_the_labelled_value() {
        let key = b"0123456789abcdef";
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(b"email:alice@example.com");
        let expected = hex::encode(&mac.finalize().into_bytes()[..16]);
        let subject = SubjectKey::with_key(key.to_vec())
            .subject(&member("alice@example.com", UserType::Agent));
        assert_eq!(subject.to_string(), expected);
    }

    #[test]
    fn the_derived_key_follows_the_partner_key() {
        let settings = AuditSettings::default();
        let one = SubjectKey::from_settings(&settings, &SecretString::from("pk-1")).unwrap();
        let same = SubjectKey::from_settings(&settings, &SecretString::from("pk-1")).unwrap();
        let two = SubjectKey::from_settings(&settings, &SecretString::from("pk-2")).unwrap();
        let id = member("a@example.com", UserType::Agent);
        assert_eq!(one.subject(&id), same.subject(&id));
        assert_ne!(one.subject(&id), two.subject(&id));
    }

    #[test]
    fn a_short_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "short\n").unwrap();
        let settings = AuditSettings {
            hash_key_file: Some(path),
        };
        let err = SubjectKey::from_settings(&settings, &SecretString::from("pk"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("audit.hash_key_file"));
    }
}
