//! The audit trail: one structured event per token handed out and per
//! invalidation, on the `audit` tracing target so operators can route it.
//!
//! Events name the caller, the identity kind and type, the cache result and
//! the request id, and carry `subject`, an HMAC-SHA256 of the email or user id
//! under a key every replica shares, instead of the value itself. Never a token.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

use crate::config::{AuditSettings, ConfigError};
use crate::domain::{Identity, Subject};

/// The tracing target of audit events.
pub const TARGET: &str = "audit";
/// Shortest accepted `audit.hash_key_file` content.
const MIN_KEY_BYTES: usize = 16;

/// Writes audit events; holds the subject-hashing key.
pub struct Auditor {
    /// HMAC state with the key already absorbed: each subject clones it
    /// instead of hashing the key again.
    keyed: Hmac<Sha256>,
}

impl Auditor {
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

    /// A token was handed out. `subject` is `self.subject(identity)`, which
    /// the caller may have kept from an earlier event (one per cache entry).
    pub fn issued(
        &self,
        actor: &Actor<'_>,
        identity: &Identity,
        subject: Subject,
        cache: &str,
        active: bool,
    ) {
        Self::event(
            EventKind::Issued,
            actor,
            identity,
            subject,
            Some((cache, active)),
        );
    }

    /// A cached token was dropped on request.
    pub fn invalidated(&self, actor: &Actor<'_>, identity: &Identity) {
        Self::event(
            EventKind::Invalidated,
            actor,
            identity,
            self.subject(identity),
            None,
        );
    }

    fn event(
        outcome: EventKind,
        actor: &Actor<'_>,
        identity: &Identity,
        subject: Subject,
        token: Option<(&str, bool)>,
    ) {
        let mut hex = [0; 32];
        // `message` as a plain field: written as it is, no formatting.
        tracing::info!(
            target: TARGET,
            message = outcome.message(),
            outcome = outcome.as_str(),
            caller = actor.caller,
            service_account = actor.service_account,
            identity = identity.kind(),
            user_type = user_type(identity),
            subject = subject.hex(&mut hex),
            cache = token.map(|(cache, _)| cache),
            active = token.map(|(_, active)| active),
            request_id = actor.request_id,
        );
    }
}

/// Who acted, as an audit event names them.
pub struct Actor<'a> {
    /// The configured client name.
    pub caller: &'a str,
    /// `namespace:name`, when the caller presented a service-account token.
    pub service_account: Option<&'a str>,
    pub request_id: &'a str,
}

#[derive(Clone, Copy)]
enum EventKind {
    Issued,
    Invalidated,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Issued => "issued",
            EventKind::Invalidated => "invalidated",
        }
    }

    fn message(self) -> &'static str {
        match self {
            EventKind::Issued => "token issued",
            EventKind::Invalidated => "token invalidated",
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
        let a = Auditor::with_key(b"0123456789abcdef".to_vec());
        let b = Auditor::with_key(b"0123456789abcdef".to_vec());
        let other = Auditor::with_key(b"fedcba9876543210".to_vec());
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
        let subject =
            Auditor::with_key(key.to_vec()).subject(&member("alice@example.com", UserType::Agent));
        assert_eq!(subject.to_string(), expected);
    }

    #[test]
    fn the_derived_key_follows_the_partner_key() {
        let settings = AuditSettings::default();
        let one = Auditor::from_settings(&settings, &SecretString::from("pk-1")).unwrap();
        let same = Auditor::from_settings(&settings, &SecretString::from("pk-1")).unwrap();
        let two = Auditor::from_settings(&settings, &SecretString::from("pk-2")).unwrap();
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
        let err = Auditor::from_settings(&settings, &SecretString::from("pk"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("audit.hash_key_file"));
    }
}
