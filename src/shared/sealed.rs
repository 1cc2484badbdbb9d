//! What the shared cache stores, and how: values sealed with AES-256-GCM
//! under `cache.encryption_key_file`, the identity bound as associated data,
//! and Redis key names that are an HMAC of the identity, never the identity.
//!
//! A sealed value is `[format version][generation: u64][nonce: 12][ciphertext + tag]`.
//! Format 2's plaintext is `[kind][fetched_at: u64 unix ms][token bytes]`
//! (integers big-endian), and its associated data is the identity followed by
//! the key's generation: a value is bound to the identity it was fetched for
//! and to the generation it was fetched in, so a value written back after an
//! invalidation (a restored snapshot, a lagging replica, a hand-made write)
//! says which generation it belongs to and cannot lie about it. The version
//! byte lets a later release read old values while writing new ones.
//!
//! Invalidation messages carry the identity itself, sealed under its own
//! associated data, so a replica applies an invalidation without any map
//! from key names back to identities (a map that could forget).

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
const FORMAT: u8 = 2;
/// Associated data of a sealed identity in an invalidation message.
const IDENTITY_AAD: &[u8] = b"token-broker invalidated identity";
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

/// A value read back from Redis: the generation it was sealed in, and what it holds.
#[derive(Debug, Clone)]
pub struct Opened {
    pub generation: u64,
    pub stored: Stored,
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

    /// Encrypts `stored` for `identity` in `generation`, under a fresh random nonce.
    pub fn seal(&self, identity: &Identity, generation: u64, stored: &Stored) -> Vec<u8> {
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
        let mut aad = associated_data(identity);
        aad.extend_from_slice(&generation.to_be_bytes());
        let mut value = Vec::with_capacity(9 + NONCE_BYTES + plain.expose_secret().len() + 16);
        value.push(FORMAT);
        value.extend_from_slice(&generation.to_be_bytes());
        self.encrypt_into(&mut value, plain.expose_secret(), &aad);
        value
    }

    /// Decrypts a value stored for `identity`; `None` if it was not sealed
    /// for this identity and the generation it names under this key, or is
    /// not a format this build reads.
    pub fn open(&self, identity: &Identity, value: &[u8]) -> Option<Opened> {
        let (&version, rest) = value.split_first()?;
        if version != FORMAT {
            return None;
        }
        let (generation, sealed) = rest.split_at_checked(8)?;
        let generation = u64::from_be_bytes(generation.try_into().ok()?);
        let mut aad = associated_data(identity);
        aad.extend_from_slice(&generation.to_be_bytes());
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
            generation,
            stored: Stored { answer, fetched_at },
        })
    }

    /// `identity`, sealed for an invalidation message.
    pub fn seal_identity(&self, identity: &Identity) -> Vec<u8> {
        let mut value = Vec::with_capacity(96);
        self.encrypt_into(&mut value, &associated_data(identity), IDENTITY_AAD);
        value
    }

    /// The identity an invalidation message names; `None` if it was not
    /// sealed under this key.
    pub fn open_identity(&self, sealed: &[u8]) -> Option<Identity> {
        let plain = self.decrypt(sealed, IDENTITY_AAD)?;
        parse_associated_data(plain.expose_secret())
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
        let sealed = sealer.seal(&alice(), 3, &token("tok-secret-1"));
        let opened = sealer.open(&alice(), &sealed).unwrap();
        assert_eq!(opened.generation, 3);
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
        let mut other_generation = sealed;
        other_generation[8] = 4;
        assert!(
            sealer.open(&alice(), &other_generation).is_none(),
            "the generation in the clear is bound by the associated data"
        );
    }

    #[test]
    fn an_invalidated_identity_is_sealed_and_opened_whole() {
        let sealer = Sealer::new(&[7; 32]);
        let customer = Identity::Customer(UserId::parse("c-1_x").unwrap());
        for identity in [alice(), customer] {
            let sealed = sealer.seal_identity(&identity);
            assert!(!String::from_utf8_lossy(&sealed).contains("alice"));
            assert_eq!(sealer.open_identity(&sealed), Some(identity.clone()));
            assert_eq!(Sealer::new(&[8; 32]).open_identity(&sealed), None);
            let value = sealer.seal(&identity, 0, &token("t"));
            assert_eq!(sealer.open_identity(&value), None, "a value is no message");
        }
    }

    #[test]
    fn values_hold_no_plain_text_and_never_repeat() {
        let sealer = Sealer::new(&[7; 32]);
        let one = sealer.seal(&alice(), 1, &token("tok-secret-1"));
        let two = sealer.seal(&alice(), 1, &token("tok-secret-1"));
        assert_ne!(one, two, "a fresh nonce per write");
        for value in [&one, &two] {
            let text = String::from_utf8_lossy(value);
            assert!(!text.contains("tok-secret") && !text.contains("alice"));
        }
        let not_found = Stored {
            answer: StoredAnswer::NotFound,
            fetched_at: SystemTime::now(),
        };
        let sealed = sealer.seal(&alice(), 0, &not_found);
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
