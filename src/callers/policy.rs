//! What a caller may do once known: its scopes, team-member types and email
//! domains, and its rate limit. Refusals name the rule, never the caller's
//! configured values.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::Refusal;
use crate::config::{ANONYMOUS, ClientSettings, Scope};
use crate::domain::{Identity, UserType};

/// What a caller wants to do with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Invalidate,
}

/// The rule that refused a caller (a 403): named in the audit event, never
/// with the caller's configured values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The caller lacks the scope the action needs.
    Scope,
    /// The caller may not read tokens of this team-member type.
    Type,
    /// The caller may not read tokens for this email domain.
    EmailDomain,
    /// A valid service-account token that no client names.
    ServiceAccount,
    /// A verified client certificate that no client names.
    Certificate,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Scope => "scope",
            Rule::Type => "type",
            Rule::EmailDomain => "email_domain",
            Rule::ServiceAccount => "service_account",
            Rule::Certificate => "certificate",
        }
    }
}

/// One caller's name and rules.
pub(super) struct Policy {
    pub(super) name: Arc<str>,
    scopes: Vec<Scope>,
    allowed_types: Option<Vec<UserType>>,
    /// Lower-cased, without a leading dot.
    allowed_domains: Option<Vec<String>>,
    /// `rate_limit_per_minute` and this replica's limiter for it.
    pub(super) limit: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
}

impl Policy {
    pub(super) fn of(client: &ClientSettings) -> Self {
        Self {
            name: Arc::from(client.name.as_str()),
            scopes: client.scopes.clone(),
            allowed_types: client.allowed_types.clone(),
            allowed_domains: client.allowed_email_domains.as_ref().map(|domains| {
                domains
                    .iter()
                    .map(|d| d.trim_start_matches('.').to_lowercase())
                    .collect()
            }),
            limit: client
                .rate_limit_per_minute
                .map(|limit| (limit, RateLimiter::direct(Quota::per_minute(limit)))),
        }
    }

    /// `auth.allow_anonymous`: every scope, no limits.
    pub(super) fn anonymous() -> Self {
        Self {
            name: Arc::from(ANONYMOUS),
            scopes: Scope::ALL.to_vec(),
            allowed_types: None,
            allowed_domains: None,
            limit: None,
        }
    }

    /// Refuses unless this caller may do `action` on the token of `identity`.
    pub(super) fn authorize(&self, action: Action, identity: &Identity) -> Result<(), Refusal> {
        let scope = match (action, identity) {
            (Action::Invalidate, _) => Scope::TokensInvalidate,
            (Action::Read, Identity::TeamMember { .. }) => Scope::TokensRead,
            (Action::Read, Identity::Customer(_)) => Scope::CustomerTokensRead,
        };
        if !self.scopes.contains(&scope) {
            return Err(Refusal::Forbidden {
                rule: Rule::Scope,
                detail: format!("this caller lacks the scope {}", scope.as_str()),
            });
        }
        let Identity::TeamMember { email, user_type } = identity else {
            return Ok(());
        };
        if let Some(types) = &self.allowed_types
            && !types.contains(user_type)
        {
            return Err(Refusal::Forbidden {
                rule: Rule::Type,
                detail: format!("this caller may not use tokens of type {user_type}"),
            });
        }
        if let Some(domains) = &self.allowed_domains
            && !domains.iter().any(|d| domain_admits(d, email.domain()))
        {
            return Err(Refusal::Forbidden {
                rule: Rule::EmailDomain,
                detail: "this caller may not use tokens for this email domain".into(),
            });
        }
        Ok(())
    }
}

/// `example.com` admits `example.com` and `eu.example.com`, not `badexample.com`.
fn domain_admits(allowed: &str, domain: &str) -> bool {
    domain == allowed
        || domain
            .strip_suffix(allowed)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_admits_its_subdomains_but_not_look_alikes() {
        assert!(domain_admits("example.com", "example.com"));
        assert!(domain_admits("example.com", "eu.example.com"));
        assert!(domain_admits("example.com", "a.b.example.com"));
        assert!(!domain_admits("example.com", "badexample.com"));
        assert!(!domain_admits("example.com", "example.com.evil.org"));
        assert!(!domain_admits("example.com", "example.co"));
    }
}
