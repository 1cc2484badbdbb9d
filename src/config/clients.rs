//! The callers allowed in: `[[clients]]` entries, their scopes, and the typed
//! credentials they name (a key's digest, Kubernetes service accounts), which
//! are checked once while the configuration is parsed.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::{Digest, Sha256};

use super::ConfigError;
use crate::domain::{UserType, is_dns_label, is_dns_subdomain};

/// The caller name of requests without a key when `auth.allow_anonymous` is
/// on; reserved, so no `[[clients]]` entry may take it.
pub const ANONYMOUS: &str = "anonymous";

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read team-member tokens (email + type).
    TokensRead,
    /// Read customer API tokens (user id).
    CustomerTokensRead,
    /// Drop cached tokens.
    TokensInvalidate,
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const CHOICES: &[(&str, Scope)] = &[
            ("tokens:read", Scope::TokensRead),
            ("customer_tokens:read", Scope::CustomerTokensRead),
            ("tokens:invalidate", Scope::TokensInvalidate),
        ];
        super::words::one_of(deserializer, CHOICES)
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Scope {
    pub const ALL: [Scope; 3] = [
        Scope::TokensRead,
        Scope::CustomerTokensRead,
        Scope::TokensInvalidate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TokensRead => "tokens:read",
            Scope::CustomerTokensRead => "customer_tokens:read",
            Scope::TokensInvalidate => "tokens:invalidate",
        }
    }
}

/// What every key `hash-key --generate` makes starts with, so a key is never
/// mistaken for a digest and secret scanners can recognise one.
pub const CALLER_KEY_PREFIX: &str = "tbk_";

/// The SHA-256 of a caller key: what the configuration holds instead of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key`, as `hash-key` prints it and a request's key is
    /// compared.
    pub fn of_key(key: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(key.as_ref()).into())
    }

    /// 64 hex characters.
    pub fn parse(hex_text: &str) -> Option<Self> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut digest).ok()?;
        Some(Self(digest))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({self})")
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().starts_with(CALLER_KEY_PREFIX) {
            return Err(de::Error::custom(
                "holds a caller key, not its digest: the key itself must never be in the configuration; \
                 pipe it into `token-broker hash-key` and paste the key_sha256 line it prints (then treat this key as leaked and make a new one)",
            ));
        }
        Self::parse(&text).ok_or_else(|| {
            de::Error::custom(
                "must be 64 hex characters (the SHA-256 of the caller key; `token-broker hash-key` prints it)",
            )
        })
    }
}

impl Serialize for KeyDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A Kubernetes service account a client names: one account, or every
/// account of a namespace (`namespace:*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServiceAccount {
    Named { namespace: String, name: String },
    AnyIn { namespace: String },
}

impl ServiceAccount {
    /// `namespace:name` or `namespace:*`: the namespace a DNS-1123 label, the
    /// name a DNS-1123 subdomain.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, name) = text.split_once(':')?;
        if !is_dns_label(namespace) {
            return None;
        }
        let namespace = namespace.to_owned();
        if name == "*" {
            return Some(Self::AnyIn { namespace });
        }
        is_dns_subdomain(name).then(|| Self::Named {
            namespace,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named { namespace, name } => write!(f, "{namespace}:{name}"),
            Self::AnyIn { namespace } => write!(f, "{namespace}:*"),
        }
    }
}

impl<'de> Deserialize<'de> for ServiceAccount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| {
            de::Error::custom("must be namespace:name or namespace:* (lower-case DNS labels)")
        })
    }
}

impl Serialize for ServiceAccount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A SPIFFE ID a client names: a client certificate whose URI SAN equals it
/// is that client. `spiffe://` then a trust domain and a path, matched exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// `spiffe://trust-domain/path`: a lower-case trust domain of letters,
    /// digits, `.`, `-` and `_`, and a non-empty path of printable ASCII.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("spiffe://")?;
        let (domain, path) = rest.split_once('/')?;
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = !path.is_empty()
            && !path.ends_with('/')
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"?#".contains(&b));
        (domain_ok && path_ok).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| {
            de::Error::custom(
                "must be a SPIFFE ID such as spiffe://cluster.local/ns/inbox/sa/embedder",
            )
        })
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// One `[[clients]]` entry: a caller allowed in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    pub name: String,
    /// SHA-256 of the caller's key, never the key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<KeyDigest>,
    /// Kubernetes service accounts that are this caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccount>,
    /// Client-certificate identities (URI SANs) that are this caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spiffe_ids: Vec<SpiffeId>,
    pub scopes: Vec<Scope>,
    /// Team-member types this caller may read; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_types: Option<Vec<UserType>>,
    /// Email domains this caller may read; a domain admits its subdomains. Any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_email_domains: Option<Vec<String>>,
    /// Requests per minute (burst of the same size); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<NonZeroU32>,
}

impl ClientSettings {
    /// A caller with these scopes and no other restriction.
    pub fn new(name: &str, key: KeyDigest, scopes: Vec<Scope>) -> Self {
        Self {
            name: name.to_owned(),
            key_sha256: Some(key),
            service_accounts: Vec::new(),
            spiffe_ids: Vec::new(),
            scopes,
            allowed_types: None,
            allowed_email_domains: None,
            rate_limit_per_minute: None,
        }
    }

    /// Checks what the types alone cannot: `i` is the entry's place in the list.
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |field: &str| format!("clients[{i}].{field}");
        if self.name.trim().is_empty() || self.name.len() > 64 {
            return Err(ConfigError::invalid(
                key("name"),
                "must be 1 to 64 characters",
            ));
        }
        if self.name == ANONYMOUS {
            return Err(ConfigError::invalid(
                key("name"),
                "\"anonymous\" is reserved",
            ));
        }
        if self.key_sha256.is_none()
            && self.service_accounts.is_empty()
            && self.spiffe_ids.is_empty()
        {
            return Err(ConfigError::invalid(
                key("key_sha256"),
                "a client needs a key_sha256, service_accounts, spiffe_ids, or any of them",
            ));
        }
        if self.allowed_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::invalid(
                key("allowed_types"),
                "must name at least one of AGENT, CUSTOM_USER, CUSTOMER (omit it to allow all)",
            ));
        }
        if let Some(domains) = &self.allowed_email_domains {
            if domains.is_empty() {
                return Err(ConfigError::invalid(
                    key("allowed_email_domains"),
                    "must name at least one domain (omit it to allow any)",
                ));
            }
            if let Some(bad) = domains
                .iter()
                .position(|d| !crate::domain::is_hostname(d.trim_start_matches('.')))
            {
                return Err(ConfigError::invalid(
                    format!("clients[{i}].allowed_email_domains[{bad}]"),
                    "must be a hostname such as example.com (letters, digits, inner hyphens; xn-- form for international names)",
                ));
            }
        }
        if self.scopes.is_empty() {
            return Err(ConfigError::invalid(
                key("scopes"),
                "must name at least one of tokens:read, customer_tokens:read, tokens:invalidate",
            ));
        }
        Ok(())
    }
}

/// Checks every entry, and that no name, key or service account is claimed twice.
pub(super) fn validate(clients: &[ClientSettings]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    let mut accounts = HashSet::new();
    let mut spiffe_ids = HashSet::new();
    for (i, client) in clients.iter().enumerate() {
        client.validate(i)?;
        if !names.insert(client.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("clients[{i}].name"),
                "is used by another client",
            ));
        }
        if let Some(digest) = client.key_sha256
            && !digests.insert(digest)
        {
            return Err(ConfigError::invalid(
                format!("clients[{i}].key_sha256"),
                "is used by another client",
            ));
        }
        for (j, account) in client.service_accounts.iter().enumerate() {
            if !accounts.insert(account) {
                return Err(ConfigError::invalid(
                    format!("clients[{i}].service_accounts[{j}]"),
                    "is named by another client",
                ));
            }
        }
        for (j, id) in client.spiffe_ids.iter().enumerate() {
            if !spiffe_ids.insert(id) {
                return Err(ConfigError::invalid(
                    format!("clients[{i}].spiffe_ids[{j}]"),
                    "is named by another client",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_are_dns_names_with_a_namespace() {
        for good in ["inbox:embedder", "inbox:*", "a-1:b.c-2", "ns:x"] {
            let parsed = ServiceAccount::parse(good).unwrap_or_else(|| panic!("{good}"));
            assert_eq!(parsed.to_string(), good);
        }
        for bad in [
            "inbox", ":name", "inbox:", "Inbox:x", "inbox:X", "-ns:x", "ns:x-", "ns:a..b", "ns:*x",
            "ns_1:x",
        ] {
            assert_eq!(ServiceAccount::parse(bad), None, "{bad}");
        }
        let long_label = "a".repeat(64);
        assert_eq!(ServiceAccount::parse(&format!("{long_label}:x")), None);
        assert_eq!(ServiceAccount::parse(&format!("ns:{long_label}")), None);
    }

    #[test]
    fn spiffe_ids_have_a_trust_domain_and_a_path() {
        for good in [
            "spiffe://cluster.local/ns/inbox/sa/embedder",
            "spiffe://example.org/service",
        ] {
            assert_eq!(SpiffeId::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "https://cluster.local/ns/a",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/a",
            "spiffe://Cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/",
            "spiffe://cluster.local/ns a",
            "spiffe://cluster.local/ns?a",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_key_digest_is_the_hex_sha256_of_the_key() {
        let digest = KeyDigest::of_key("test");
        assert_eq!(
            digest.to_string(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(KeyDigest::parse(&digest.to_string()), Some(digest));
        assert_eq!(KeyDigest::parse("9f86"), None);
        assert_eq!(KeyDigest::parse(&"zz".repeat(32)), None);
    }
}
