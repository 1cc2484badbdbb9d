//! Domain values: what names a token (`Email`, `UserType`, `UserId` and the
//! `Identity` they form) and the `Token` itself. This module imports nothing
//! of the crate, so every layer can depend on it. Each value that comes from
//! a caller has a `parse` constructor that is the only way in, so once a value
//! exists it is valid everywhere.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// Why a caller-supplied value was refused; `parameter` names the query parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {reason}")]
pub struct InvalidInput {
    pub parameter: &'static str,
    pub reason: String,
}

impl InvalidInput {
    pub fn new(parameter: &'static str, reason: impl Into<String>) -> Self {
        Self {
            parameter,
            reason: reason.into(),
        }
    }
}

/// Longest address accepted, in bytes (RFC 5321 path limit).
pub const MAX_EMAIL_BYTES: usize = 254;
/// Longest customer id accepted, in characters.
pub const MAX_USER_ID_CHARS: usize = 64;

/// A team member's role as the vendor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UserType {
    Agent,
    CustomUser,
    Customer,
}

impl UserType {
    /// Every type, in the order the vendor documents them.
    pub const ALL: [UserType; 3] = [UserType::Agent, UserType::CustomUser, UserType::Customer];

    /// Accepts `AGENT`, `CUSTOM_USER` or `CUSTOMER` in any letter case.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(raw))
            .ok_or_else(|| InvalidInput::new("type", "must be one of AGENT, CUSTOM_USER, CUSTOMER"))
    }

    /// The vendor's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Agent => "AGENT",
            UserType::CustomUser => "CUSTOM_USER",
            UserType::Customer => "CUSTOMER",
        }
    }
}

/// The vendor's exact spelling; anything else is refused with the list.
impl<'de> serde::Deserialize<'de> for UserType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == text)
            .ok_or_else(|| {
                serde::de::Error::custom("must be one of `AGENT`, `CUSTOM_USER`, `CUSTOMER`")
            })
    }
}

impl fmt::Display for UserType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One e-mail address: the local part kept exactly, the domain lower-cased.
/// Compact, since every cache entry's key holds one.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email {
    /// Exactly one `@` in it.
    address: Box<str>,
}

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let bad = |reason: &str| InvalidInput::new("email", reason);
        if raw.is_empty() {
            return Err(bad("must not be empty"));
        }
        if raw.len() > MAX_EMAIL_BYTES {
            return Err(bad("must be at most 254 bytes"));
        }
        let Some((local, domain)) = raw.split_once('@') else {
            return Err(bad("must contain exactly one '@'"));
        };
        if domain.contains('@') {
            return Err(bad("must contain exactly one '@'"));
        }
        if !is_dot_atom(local) {
            return Err(bad(
                "the part before '@' must be letters, digits and !#$%&'*+/=?^_`{|}~- with single dots between them",
            ));
        }
        if !is_hostname(domain) {
            return Err(bad(
                "the domain must be a hostname such as example.com: two or more labels of letters, digits and inner hyphens, 1 to 63 characters each (xn-- form for international names)",
            ));
        }
        // One pass, one allocation: the domain is ASCII by now.
        let mut address = String::with_capacity(raw.len());
        address.push_str(local);
        address.push('@');
        address.push_str(domain);
        address[local.len() + 1..].make_ascii_lowercase();
        Ok(Self {
            address: address.into_boxed_str(),
        })
    }

    /// The normalised address (domain lower-cased).
    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The lower-cased domain, without the `@`.
    pub fn domain(&self) -> &str {
        self.address
            .split_once('@')
            .map_or("", |(_, domain)| domain)
    }
}

/// RFC 5322 `dot-atom-text`: atoms of `atext` joined by single dots.
fn is_dot_atom(local: &str) -> bool {
    const SPECIALS: &[u8] = b"!#$%&'*+/=?^_`{|}~-";
    !local.is_empty()
        && local.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || SPECIALS.contains(&b))
        })
}

/// A DNS hostname of LDH labels: at least two, 1–63 characters each, no
/// hyphen at either end of a label, no trailing dot.
pub fn is_hostname(domain: &str) -> bool {
    let mut labels = 0;
    for label in domain.split('.') {
        let bytes = label.as_bytes();
        let valid = (1..=63).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if !valid {
            return false;
        }
        labels += 1;
    }
    labels >= 2
}

/// A Kubernetes namespace: an RFC 1123 label (lower-case letters, digits and `-`, 1–63,
/// starting and ending alphanumeric).
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A Kubernetes object name (a service account's): an RFC 1123 subdomain (labels joined by dots, at most 253).
pub fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// Addresses are personal data: never printed by `Debug`.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Email([REDACTED])")
    }
}

/// A customer id, as the vendor returns it in `data[]._id`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(Box<str>);

impl UserId {
    /// 1–64 characters of `A-Z a-z 0-9 _ -`.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let valid_chars = raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if raw.is_empty() || raw.len() > MAX_USER_ID_CHARS || !valid_chars {
            return Err(InvalidInput::new(
                "user_id",
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
            ));
        }
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserId([REDACTED])")
    }
}

/// Whose token: a team member (email + type) or a customer (id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    TeamMember { email: Email, user_type: UserType },
    Customer(UserId),
}

impl Identity {
    /// `"team_member"` or `"customer"`, for logs and audit events.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::TeamMember { .. } => "team_member",
            Identity::Customer(_) => "customer",
        }
    }
}

/// A permanent token. Redacted in `Debug`, zeroised on drop; exposed only
/// where a response body is written.
#[derive(Clone)]
pub struct Token(SecretString);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([REDACTED])")
    }
}

/// The keyed hash that stands for an email or user id in audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject([u8; 16]);

impl Subject {
    /// The first 16 bytes of the keyed hash (the audit trail computes it).
    pub fn from_hash(hash: [u8; 16]) -> Self {
        Self(hash)
    }

    /// As lower-case hex, written into `out` (no allocation).
    pub fn hex<'a>(&self, out: &'a mut [u8; 32]) -> &'a str {
        // Cannot fail: `out` is exactly twice the length of the subject.
        let _ = hex::encode_to_slice(self.0, out);
        std::str::from_utf8(out).unwrap_or_default()
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hex(&mut [0; 32]))
    }
}

/// How a caller proved who it is, as its audit event names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// No credential: `auth.allow_anonymous`.
    Anonymous,
    /// A caller key (`Authorization: Bearer`).
    Key,
    /// A Kubernetes service-account token: `namespace:name`.
    ServiceAccount(std::sync::Arc<str>),
    /// A client certificate: the SPIFFE ID that matched.
    Certificate(std::sync::Arc<str>),
}

impl Proof {
    /// `anonymous`, `key`, `service_account` or `certificate`.
    pub fn method(&self) -> &'static str {
        match self {
            Proof::Anonymous => "anonymous",
            Proof::Key => "key",
            Proof::ServiceAccount(_) => "service_account",
            Proof::Certificate(_) => "certificate",
        }
    }

    /// The service account, when proved by one.
    pub fn service_account(&self) -> Option<&str> {
        match self {
            Proof::ServiceAccount(account) => Some(account),
            _ => None,
        }
    }

    /// The SPIFFE ID, when proved by a certificate.
    pub fn spiffe_id(&self) -> Option<&str> {
        match self {
            Proof::Certificate(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_domain_is_lower_cased_and_local_part_kept() {
        let email = Email::parse("Alice.Smith+x@Example.COM").unwrap();
        assert_eq!(email.as_str(), "Alice.Smith+x@example.com");
        assert_eq!(email.domain(), "example.com");
    }

    #[test]
    fn an_identity_is_three_words_since_every_cache_key_is_one() {
        assert!(std::mem::size_of::<Identity>() <= 24);
    }

    #[test]
    fn email_rules_refuse_malformed_addresses() {
        let too_long = format!("{}@example.com", "a".repeat(243));
        assert_eq!(too_long.len(), 255);
        for raw in [
            "",
            "no-at.example.com",
            "two@@example.com",
            "a@b@example.com",
            "@example.com",
            "a@localhost",
            "a@example.",
            "a@.example.com",
            "a b@example.com",
            "a@exa\tmple.com",
            "a\u{7f}@example.com",
            "a\u{0}@example.com",
            too_long.as_str(),
        ] {
            assert!(Email::parse(raw).is_err(), "{raw:?} should be refused");
        }
        let longest = format!("{}@example.com", "a".repeat(242));
        assert!(Email::parse(&longest).is_ok());
    }

    #[test]
    fn only_dot_atom_local_parts_and_hostname_domains_pass() {
        let label64 = format!("a@{}.com", "b".repeat(64));
        let label63 = format!("a@{}.com", "b".repeat(63));
        for refused in [
            "ceo@other.com|.corp.com",
            "ceo@other.com#.corp.com",
            "ceo@other.com?.corp.com",
            "ceo@other.com&x=.corp.com",
            "ceo@other.com/.corp.com",
            "ceo@other.com;.corp.com",
            "ceo@other.com,.corp.com",
            "ceo@other.com\\.corp.com",
            "ceo@*.corp.com",
            "ceo@other%2ecom.corp.com",
            "ceo@exa_mple.com",
            "\"ceo\"@corp.com",
            "\"a b\"@corp.com",
            ".ceo@corp.com",
            "ceo.@corp.com",
            "c..eo@corp.com",
            "ceo@corp.com.",
            "ceo@-corp.com",
            "ceo@corp-.com",
            "ceo@corp..com",
            "c(e)o@corp.com",
            "c<e>o@corp.com",
            "c[e]o@corp.com",
            "c:o@corp.com",
            "ceo@corp",
            "ceo@bücher.example",
            label64.as_str(),
        ] {
            assert!(
                Email::parse(refused).is_err(),
                "{refused:?} should be refused"
            );
        }
        for accepted in [
            "a+b@x.com",
            "o'neil@x.com",
            "x@xn--bcher-kva.example",
            "x@eu.corp.com",
            "first.last@x.com",
            "a!#$%&'*+/=?^_`{|}~-z@x.com",
            "x@a-b.c0m",
            "x@123.example",
            label63.as_str(),
        ] {
            assert!(Email::parse(accepted).is_ok(), "{accepted:?} should pass");
        }
        let err = Email::parse("ceo@other.com|.corp.com").unwrap_err();
        assert_eq!(err.parameter, "email");
    }

    #[test]
    fn user_type_is_case_insensitive_on_input() {
        assert_eq!(UserType::parse("agent").unwrap(), UserType::Agent);
        assert_eq!(
            UserType::parse("Custom_User").unwrap(),
            UserType::CustomUser
        );
        let err = UserType::parse("ADMIN").unwrap_err();
        assert!(err.reason.contains("AGENT, CUSTOM_USER, CUSTOMER"));
    }

    #[test]
    fn user_id_rules() {
        assert!(UserId::parse("65f0c2_a-9").is_ok());
        assert!(UserId::parse(&"x".repeat(64)).is_ok());
        for raw in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(UserId::parse(raw).is_err(), "{raw:?} should be refused");
        }
    }

    #[test]
    fn debug_never_prints_personal_data() {
        let email = Email::parse("secret.person@example.com").unwrap();
        let id = Identity::TeamMember {
            email,
            user_type: UserType::Agent,
        };
        assert!(!format!("{id:?}").contains("secret.person"));
    }

    #[test]
    fn namespaces_are_dns_labels_and_names_dns_subdomains() {
        for good in ["a", "crm", "a-1", &"n".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"n".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("billing.v2"));
        for bad in ["", "a..b", ".a", "a.", &"a".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
