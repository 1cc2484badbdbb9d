//! What the shared cache stores, and how: values sealed with AES-256-GCM
//! under `cache.encryption_key_file`, the identity bound as associated data,
//! and Redis key names that are an HMAC of the identity, never the identity.
//!
//! A sealed value is `[format version][epoch: u64][generation: u64][nonce: 12][ciphertext + tag]`.
//! Format 3's plaintext is `[kind][fetched_at: u64 unix ms][token bytes]`
//! (integers big-endian), and its associated data is the identity followed by
//! the fleet's epoch and the key's generation: a value is bound to the
//! identity it was fetched for and to the epoch and generation it was fetched
//! in, so a value written back after an invalidation (a restored snapshot, a
//! lagging replica, a hand-made write) says when it belongs and cannot lie
//! about it. The version byte lets a later release read old values while
//! writing new ones.
//!
//! Messages between replicas (`Message`) are sealed whole under their own
//! associated data: an invalidation carries the identity itself (so a replica
//! applies it without any map from key names back to identities, a map that
//! could forget), its generation and the fleet's sequence number, none of
//! which a publisher without the key can forge or change.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;

use crate::config::ConfigError;
use crate::domain::Identity;
use crate::domain::Token;

/// The value layout written today.
const FORMAT: u8 = 3;
/// Associated data of a message between replicas.
const MESSAGE_AAD: &[u8] = b"token-broker fleet message v3";
const MESSAGE_INVALIDATED: u8 = 1;
const MESSAGE_EPOCH: u8 = 2;
const MESSAGE_CANARY: u8 = 3;
const NONCE_BYTES: usize = 12;
const KIND_TOKEN_ACTIVE: u8 = 1;
const KIND_NOT_FOUND: u8 = 2;

/// What the vendor said about an identity, as kept in Redis.
#[derive(Debug, Clone)]
pub enum StoredAnswer {
    Token(Token),
    NotFound,
}

/// A decrypted shared-cache value.
#[derive(Debug, Clone)]
pub struct Stored {
    pub answer: StoredAnswer,
    /// When the vendor answered, on the wall clock every replica shares.
    pub fetched_at: SystemTime,
}

impl Stored {
    /// Time since the vendor answered (zero if a replica's clock is behind).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.fetched_at)
            .unwrap_or_default()
    }
}

/// When a value was sealed: the fleet's epoch and its key's generation then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub epoch: u64,
    pub generation: u64,
}

/// A value read back from Redis: when it was sealed, and what it holds.
#[derive(Debug, Clone)]
pub struct Opened {
    pub sealed: Sealed,
    pub stored: Stored,
}

/// What one replica tells the others (and itself) on the fleet's channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `identity` was invalidated into `generation`; the fleet's invalidation
    /// sequence was `sequence` or more.
    Invalidated {
        identity: Identity,
        generation: u64,
        sequence: u64,
    },
    /// The fleet's epoch was raised to `epoch` (Redis was seen to hold less
    /// than a replica knew); the sequence was `sequence` or more.
    Epoch { epoch: u64, sequence: u64 },
    /// A replica's own probe that its subscription hears the fleet.
    Canary { replica: u128, count: u64 },
}

/// The hex HMAC that names one identity's keys in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyName(pub String);

/// Seals values and names keys; holds the encryption key.
pub struct Sealer {
    cipher: Aes256Gcm,
    names: SecretBox<[u8; 32]>,
}

impl Sealer {
    /// Reads a 32-byte key, given as 64 hex characters or as base64.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            key: "cache.encryption_key_file".into(),
            message,
        };
        let text =
            SecretBox::new(Box::new(std::fs::read_to_string(path).map_err(|e| {
                invalid(format!("cannot read {}: {}", path.display(), e.kind()))
            })?));
        let key = decode_key(text.expose_secret().trim()).ok_or_else(|| {
            invalid(format!(
                "{} must hold a 32-byte key as 64 hex characters or base64 (try: openssl rand -hex 32)",
                path.display()
            ))
        })?;
        Ok(Self::new(key.expose_secret()))
    }

    pub fn new(key: &[u8; 32]) -> Self {
        // Key names use a key of their own, derived so that neither reveals the other.
        let mut mac = Hmac::<Sha256>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"token-broker shared-cache key names");
        let names: [u8; 32] = mac.finalize().into_bytes().into();
        Self {
            cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)),
            names: SecretBox::new(Box::new(names)),
        }
    }

    /// The Redis name of `identity`: HMAC-SHA256 under the names key, in hex.
    pub fn name(&self, identity: &Identity) -> KeyName {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.names.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(&associated_data(identity));
        KeyName(hex::encode(mac.finalize().into_bytes()))
    }

    /// Encrypts `stored` for `identity` as of `sealed`, under a fresh random nonce.
    pub fn seal(&self, identity: &Identity, sealed: Sealed, stored: &Stored) -> Vec<u8> {
        let millis = stored
            .fetched_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let millis = u64::try_from(millis).unwrap_or(u64::MAX);
        let (kind, token) = match &stored.answer {
            StoredAnswer::Token(token) => (KIND_TOKEN_ACTIVE, token.expose().as_bytes()),
            StoredAnswer::NotFound => (KIND_NOT_FOUND, &[][..]),
        };
        let mut plain = SecretBox::new(Box::new(Vec::with_capacity(9 + token.len())));
        let buffer = secrecy::ExposeSecretMut::expose_secret_mut(&mut plain);
        buffer.push(kind);
        buffer.extend_from_slice(&millis.to_be_bytes());
        buffer.extend_from_slice(token);
        let when = [sealed.epoch.to_be_bytes(), sealed.generation.to_be_bytes()].concat();
        let mut aad = associated_data(identity);
        aad.extend_from_slice(&when);
        let mut value = Vec::with_capacity(17 + NONCE_BYTES + plain.expose_secret().len() + 16);
        value.push(FORMAT);
        value.extend_from_slice(&when);
        self.encrypt_into(&mut value, plain.expose_secret(), &aad);
        value
    }

    /// Decrypts a value stored for `identity`; `None` if it was not sealed
    /// for this identity, in the epoch and generation it names, under this
    /// key, or is not a format this build reads.
    pub fn open(&self, identity: &Identity, value: &[u8]) -> Option<Opened> {
        let (&version, rest) = value.split_first()?;
        if version != FORMAT {
            return None;
        }
        let (when, sealed) = rest.split_at_checked(16)?;
        let mut aad = associated_data(identity);
        aad.extend_from_slice(when);
        let (epoch, generation) = when.split_at(8);
        let when = Sealed {
            epoch: u64::from_be_bytes(epoch.try_into().ok()?),
            generation: u64::from_be_bytes(generation.try_into().ok()?),
        };
        let plain = self.decrypt(sealed, &aad)?;
        let plain = plain.expose_secret();
        let (&kind, rest) = plain.split_first()?;
        let (millis, token) = rest.split_at_checked(8)?;
        let millis = u64::from_be_bytes(millis.try_into().ok()?);
        let fetched_at = UNIX_EPOCH + Duration::from_millis(millis);
        let answer = match kind {
            KIND_TOKEN_ACTIVE if !token.is_empty() => {
                StoredAnswer::Token(Token::new(std::str::from_utf8(token).ok()?))
            }
            KIND_NOT_FOUND => StoredAnswer::NotFound,
            _ => return None,
        };
        Some(Opened {
            sealed: when,
            stored: Stored { answer, fetched_at },
        })
    }

    /// `message`, sealed for the fleet's channels.
    pub fn seal_message(&self, message: &Message) -> Vec<u8> {
        let mut plain = Vec::with_capacity(96);
        match message {
            Message::Invalidated {
                identity,
                generation,
                sequence,
            } => {
                plain.push(MESSAGE_INVALIDATED);
                plain.extend_from_slice(&generation.to_be_bytes());
                plain.extend_from_slice(&sequence.to_be_bytes());
                plain.extend_from_slice(&associated_data(identity));
            }
            Message::Epoch { epoch, sequence } => {
                plain.push(MESSAGE_EPOCH);
                plain.extend_from_slice(&epoch.to_be_bytes());
                plain.extend_from_slice(&sequence.to_be_bytes());
            }
            Message::Canary { replica, count } => {
                plain.push(MESSAGE_CANARY);
                plain.extend_from_slice(&replica.to_be_bytes());
                plain.extend_from_slice(&count.to_be_bytes());
            }
        }
        let mut sealed = Vec::with_capacity(plain.len() + NONCE_BYTES + 16);
        self.encrypt_into(&mut sealed, &plain, MESSAGE_AAD);
        sealed
    }

    /// The message `sealed` holds; `None` if it was not sealed under this key
    /// or is not one this build reads.
    pub fn open_message(&self, sealed: &[u8]) -> Option<Message> {
        let plain = self.decrypt(sealed, MESSAGE_AAD)?;
        let (&kind, rest) = plain.expose_secret().split_first()?;
        let number = |bytes: &[u8]| bytes.try_into().ok().map(u64::from_be_bytes);
        match kind {
            MESSAGE_INVALIDATED => {
                let (generation, rest) = rest.split_at_checked(8)?;
                let (sequence, identity) = rest.split_at_checked(8)?;
                Some(Message::Invalidated {
                    identity: parse_associated_data(identity)?,
                    generation: number(generation)?,
                    sequence: number(sequence)?,
                })
            }
            MESSAGE_EPOCH if rest.len() == 16 => Some(Message::Epoch {
                epoch: number(&rest[..8])?,
                sequence: number(&rest[8..])?,
            }),
            MESSAGE_CANARY if rest.len() == 24 => Some(Message::Canary {
                replica: u128::from_be_bytes(rest[..16].try_into().ok()?),
                count: number(&rest[16..])?,
            }),
            _ => None,
        }
    }

    /// Appends `[nonce][ciphertext + tag]` of `plain` to `out`.
    fn encrypt_into(&self, out: &mut Vec<u8>, plain: &[u8], aad: &[u8]) {
        let nonce = <Nonce<_> as aes_gcm::aead::Generate>::generate();
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: plain, aad })
            .unwrap_or_else(|_| unreachable!("AES-GCM encrypts any message under 64 GiB"));
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
    }

    /// Opens `[nonce][ciphertext + tag]`.
    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Option<SecretBox<Vec<u8>>> {
        let (nonce, sealed) = sealed.split_at_checked(NONCE_BYTES)?;
        let nonce = Nonce::try_from(nonce).ok()?;
        let plain = self
            .cipher
            .decrypt(&nonce, Payload { msg: sealed, aad })
            .ok()?;
        Some(SecretBox::new(Box::new(plain)))
    }
}

/// The bytes that name an identity exactly: bound into every sealed value.
fn associated_data(identity: &Identity) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match identity {
        Identity::TeamMember { email, user_type } => {
            out.extend_from_slice(b"team_member\0");
            out.extend_from_slice(user_type.as_str().as_bytes());
            out.push(0);
            out.extend_from_slice(email.as_str().as_bytes());
        }
        Identity::Customer(id) => {
            out.extend_from_slice(b"customer\0");
            out.extend_from_slice(id.as_str().as_bytes());
        }
    }
    out
}

/// The identity `associated_data` wrote.
fn parse_associated_data(bytes: &[u8]) -> Option<Identity> {
    let text = std::str::from_utf8(bytes).ok()?;
    if let Some(rest) = text.strip_prefix("team_member\0") {
        let (user_type, email) = rest.split_once('\0')?;
        return Some(Identity::TeamMember {
            email: crate::domain::Email::parse(email).ok()?,
            user_type: crate::domain::UserType::parse(user_type).ok()?,
        });
    }
    let id = text.strip_prefix("customer\0")?;
    Some(Identity::Customer(crate::domain::UserId::parse(id).ok()?))
}

fn decode_key(text: &str) -> Option<SecretBox<[u8; 32]>> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
            .ok()?
    };
    let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
    drop(SecretBox::new(Box::new(bytes)));
    Some(SecretBox::new(Box::new(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, UserId, UserType};

    fn alice() -> Identity {
        Identity::TeamMember {
            email: Email::parse("alice@example.com").unwrap(),
            user_type: UserType::Agent,
        }
    }

    fn token(value: &str) -> Stored {
        Stored {
            answer: StoredAnswer::Token(Token::new(value)),
            fetched_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        }
    }

    #[test]
    fn a_sealed_value_opens_for_its_identity_only() {
        let sealer = Sealer::new(&[7; 32]);
        let when = Sealed {
            epoch: 2,
            generation: 3,
        };
        let sealed = sealer.seal(&alice(), when, &token("tok-secret-1"));
        let opened = sealer.open(&alice(), &sealed).unwrap();
        assert_eq!(opened.sealed, when);
        let opened = opened.stored;
        assert!(matches!(&opened.answer, StoredAnswer::Token(t) if t.expose() == "tok-secret-1"));
        assert_eq!(opened.fetched_at, token("x").fetched_at);
        let bob = Identity::Customer(UserId::parse("bob").unwrap());
        assert!(
            sealer.open(&bob, &sealed).is_none(),
            "bound to the identity"
        );
        assert!(Sealer::new(&[8; 32]).open(&alice(), &sealed).is_none());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(&alice(), &tampered).is_none());
        assert!(sealer.open(&alice(), &[]).is_none());
        let mut other_version = sealed.clone();
        other_version[0] = 1;
        assert!(sealer.open(&alice(), &other_version).is_none());
        for byte in [8, 16] {
            let mut other = sealed.clone();
            other[byte] ^= 1;
            assert!(
                sealer.open(&alice(), &other).is_none(),
                "the epoch and generation in the clear are bound by the associated data"
            );
        }
    }

    #[test]
    fn messages_are_sealed_and_opened_whole_and_cannot_be_altered() {
        let sealer = Sealer::new(&[7; 32]);
        let customer = Identity::Customer(UserId::parse("c-1_x").unwrap());
        let messages = [
            Message::Invalidated {
                identity: alice(),
                generation: 1_764_000_000_000_000,
                sequence: 12,
            },
            Message::Invalidated {
                identity: customer.clone(),
                generation: u64::MAX,
                sequence: 0,
            },
            Message::Epoch {
                epoch: 3,
                sequence: 99,
            },
            Message::Canary {
                replica: u128::MAX - 5,
                count: 7,
            },
        ];
        for message in messages {
            let sealed = sealer.seal_message(&message);
            assert!(!String::from_utf8_lossy(&sealed).contains("alice"));
            assert_eq!(sealer.open_message(&sealed), Some(message.clone()));
            assert_eq!(Sealer::new(&[8; 32]).open_message(&sealed), None);
            for byte in 0..sealed.len() {
                let mut altered = sealed.clone();
                altered[byte] ^= 0x20;
                assert_eq!(sealer.open_message(&altered), None, "byte {byte} altered");
            }
        }
        let value = sealer.seal(
            &customer,
            Sealed {
                epoch: 0,
                generation: 0,
            },
            &token("t"),
        );
        assert_eq!(sealer.open_message(&value), None, "a value is no message");
        assert_eq!(sealer.open_message(b"1764000000000000:garbage"), None);
    }

    #[test]
    fn values_hold_no_plain_text_and_never_repeat() {
        let sealer = Sealer::new(&[7; 32]);
        let when = Sealed {
            epoch: 0,
            generation: 1,
        };
        let one = sealer.seal(&alice(), when, &token("tok-secret-1"));
        let two = sealer.seal(&alice(), when, &token("tok-secret-1"));
        assert_ne!(one, two, "a fresh nonce per write");
        for value in [&one, &two] {
            let text = String::from_utf8_lossy(value);
            assert!(!text.contains("tok-secret") && !text.contains("alice"));
        }
        let not_found = Stored {
            answer: StoredAnswer::NotFound,
            fetched_at: SystemTime::now(),
        };
        let sealed = sealer.seal(&alice(), when, &not_found);
        assert!(matches!(
            sealer.open(&alice(), &sealed).unwrap().stored.answer,
            StoredAnswer::NotFound
        ));
    }

    #[test]
    fn names_are_keyed_hashes_of_the_whole_identity() {
        let sealer = Sealer::new(&[7; 32]);
        let name = sealer.name(&alice());
        assert_eq!(name.0.len(), 64);
        assert!(!name.0.contains("alice"));
        assert_eq!(name, sealer.name(&alice()));
        let custom = Identity::TeamMember {
            email: Email::parse("alice@example.com").unwrap(),
            user_type: UserType::CustomUser,
        };
        assert_ne!(name, sealer.name(&custom));
        assert_ne!(name, Sealer::new(&[8; 32]).name(&alice()));
    }

    #[test]
    fn keys_are_read_as_hex_or_base64_and_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for good in [
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n".to_string(),
            base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
        ] {
            std::fs::write(&path, good).unwrap();
            assert!(Sealer::from_file(&path).is_ok());
        }
        for bad in ["", "short", "00112233", &"zz".repeat(32)] {
            std::fs::write(&path, bad).unwrap();
            let err = Sealer::from_file(&path).err().unwrap().to_string();
            assert!(err.contains("cache.encryption_key_file"), "{err}");
        }
    }
}
