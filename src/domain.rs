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
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
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

impl fmt::Display for UserType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One e-mail address: the local part kept exactly, the domain lower-cased.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email {
    address: String,
    at: usize,
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
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("must not contain whitespace or control characters"));
        }
        let mut parts = raw.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("must contain exactly one '@'"));
        };
        if local.is_empty() {
            return Err(bad("must have a non-empty part before '@'"));
        }
        if !domain.contains('.') || domain.split('.').any(str::is_empty) {
            return Err(bad("must have a domain with a dot, such as example.com"));
        }
        let address = format!("{local}@{}", domain.to_lowercase());
        Ok(Self {
            at: local.len(),
            address,
        })
    }

    /// The normalised address (domain lower-cased).
    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The lower-cased domain, without the `@`.
    pub fn domain(&self) -> &str {
        &self.address[self.at + 1..]
    }
}

/// Addresses are personal data: never printed by `Debug`.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Email([REDACTED])")
    }
}

/// A customer id, as the vendor returns it in `data[]._id`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

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
        Ok(Self(raw.to_owned()))
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
}
