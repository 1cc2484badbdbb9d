//! Callers: authentication (`Authorization: Bearer <key>` checked in constant
//! time against the configured SHA-256 digests, or a Kubernetes
//! service-account token verified by `service_accounts::Verifier` and matched
//! against each client's `service_accounts`), per-caller policy (scopes,
//! types, email domains) and per-caller rate limits.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::{ANONYMOUS, ClientSettings, KeyDigest, Scope, ServiceAccount};
use crate::domain::{Identity, UserType};
use crate::http::AppState;
use crate::http::error::{ApiError, whole_seconds};
use crate::http::outcome::Rule;
use crate::service_accounts::Verifier;
use crate::shared::{NoSharedTier, SharedTier};

/// What a caller wants to do with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Invalidate,
}

/// One caller's name and rules.
struct Policy {
    name: Arc<str>,
    scopes: Vec<Scope>,
    allowed_types: Option<Vec<UserType>>,
    /// Lower-cased, without a leading dot.
    allowed_domains: Option<Vec<String>>,
    /// `rate_limit_per_minute` and this replica's limiter for it.
    limit: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
}

/// An authenticated caller; cheap to clone.
#[derive(Clone)]
pub struct Caller {
    policy: Arc<Policy>,
    /// `namespace:name`, when the caller presented a service-account token.
    service_account: Option<Arc<str>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.policy.name)
            .field("service_account", &self.service_account)
            .finish()
    }
}

impl Caller {
    fn by_key(policy: &Arc<Policy>) -> Self {
        Self {
            policy: policy.clone(),
            service_account: None,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.policy.name
    }

    /// The service account it authenticated as, if not by key.
    pub fn service_account(&self) -> Option<&str> {
        self.service_account.as_deref()
    }

    /// Refuses unless the caller holds `scope`.
    fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.policy.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                rule: Rule::Scope,
                detail: format!("this caller lacks the scope {}", scope.as_str()),
            })
        }
    }

    /// Refuses unless this caller may do `action` on the token of `identity`.
    /// The detail names the rule, never the caller's configured values.
    pub fn authorize(&self, action: Action, identity: &Identity) -> Result<(), ApiError> {
        let scope = match (action, identity) {
            (Action::Invalidate, _) => Scope::TokensInvalidate,
            (Action::Read, Identity::TeamMember { .. }) => Scope::TokensRead,
            (Action::Read, Identity::Customer(_)) => Scope::CustomerTokensRead,
        };
        self.require(scope)?;
        let Identity::TeamMember { email, user_type } = identity else {
            return Ok(());
        };
        if let Some(types) = &self.policy.allowed_types
            && !types.contains(user_type)
        {
            return Err(ApiError::Forbidden {
                rule: Rule::Type,
                detail: format!("this caller may not use tokens of type {user_type}"),
            });
        }
        if let Some(domains) = &self.policy.allowed_domains
            && !domains.iter().any(|d| domain_admits(d, email.domain()))
        {
            return Err(ApiError::Forbidden {
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

/// The configured callers.
pub struct Callers {
    keyed: Vec<(Arc<Policy>, KeyDigest)>,
    /// `namespace:name` → client.
    by_account: HashMap<String, Arc<Policy>>,
    /// `namespace` → the client naming `namespace:*`.
    by_namespace: HashMap<String, Arc<Policy>>,
    verifier: Option<Arc<Verifier>>,
    anonymous: Option<Arc<Policy>>,
    /// The fleet-wide rate limiter, when Redis is shared.
    tier: Arc<dyn SharedTier>,
}

impl Callers {
    pub fn new(clients: &[ClientSettings], allow_anonymous: bool) -> Self {
        let mut callers = Self {
            keyed: Vec::new(),
            by_account: HashMap::new(),
            by_namespace: HashMap::new(),
            verifier: None,
            anonymous: None,
            tier: Arc::new(NoSharedTier),
        };
        for client in clients {
            let policy = Arc::new(Policy {
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
                    .map(|limit| (limit, per_minute(limit))),
            });
            if let Some(digest) = client.key_sha256 {
                callers.keyed.push((policy.clone(), digest));
            }
            for account in &client.service_accounts {
                match account {
                    ServiceAccount::AnyIn { namespace } => {
                        callers
                            .by_namespace
                            .insert(namespace.clone(), policy.clone());
                    }
                    named => {
                        callers.by_account.insert(named.to_string(), policy.clone());
                    }
                }
            }
        }
        callers.anonymous = allow_anonymous.then(|| {
            Arc::new(Policy {
                name: Arc::from(ANONYMOUS),
                scopes: Scope::ALL.to_vec(),
                allowed_types: None,
                allowed_domains: None,
                limit: None,
            })
        });
        callers
    }

    /// Rate limits hold for the whole fleet through `tier` while it answers.
    pub fn with_tier(mut self, tier: Arc<dyn SharedTier>) -> Self {
        self.tier = tier;
        self
    }

    /// Service-account tokens are verified by `verifier`.
    pub fn with_verifier(mut self, verifier: Option<Arc<Verifier>>) -> Self {
        self.verifier = verifier;
        self
    }

    /// Finds the caller presenting `authorization` (the header value, if any):
    /// 401 for a missing, unknown or unverifiable credential; 403 for a valid
    /// service-account token that no client names.
    pub async fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        let Some(value) = authorization else {
            return self
                .anonymous
                .as_ref()
                .map(Caller::by_key)
                .ok_or(ApiError::Unauthorized);
        };
        let credential = bearer_key(value).ok_or(ApiError::Unauthorized)?;
        if let Some(verifier) = &self.verifier
            && looks_like_a_jwt(credential)
        {
            let token = std::str::from_utf8(credential).map_err(|_| ApiError::Unauthorized)?;
            let verified = verifier.verify(token).await.map_err(|rejected| {
                tracing::debug!(%rejected, "service-account token refused");
                ApiError::Unauthorized
            })?;
            return self.for_service_account(&verified.service_account);
        }
        self.by_key(credential)
    }

    /// The client naming `account` (`namespace:name`), exactly or by `namespace:*`.
    fn for_service_account(&self, account: &Arc<str>) -> Result<Caller, ApiError> {
        let namespace = account.split_once(':').map_or("", |(ns, _)| ns);
        let policy = self
            .by_account
            .get(&**account)
            .or_else(|| self.by_namespace.get(namespace))
            .ok_or_else(|| ApiError::Forbidden {
                rule: Rule::ServiceAccount,
                detail: "this service account is not a caller of this service".into(),
            })?;
        Ok(Caller {
            policy: policy.clone(),
            service_account: Some(account.clone()),
        })
    }

    fn by_key(&self, key: &[u8]) -> Result<Caller, ApiError> {
        let presented = KeyDigest::of_key(key);
        // Every digest is compared, so timing does not tell which (or whether) one matched.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, (_, digest)) in self.keyed.iter().enumerate() {
            let matches = digest.as_bytes().ct_eq(presented.as_bytes());
            index.conditional_assign(&(i as u32), matches);
            found |= matches;
        }
        if bool::from(found) {
            Ok(Caller::by_key(&self.keyed[index as usize].0))
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// Takes one request from `caller`'s rate limit: the fleet's when Redis
    /// is shared and answering, else this replica's.
    async fn admit(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some((per_minute, limiter)) = &caller.policy.limit else {
            return Ok(());
        };
        let fleet = self.tier.admit(&caller.policy.name, *per_minute).await;
        let verdict = fleet.unwrap_or_else(|| {
            limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
        });
        verdict.map_err(|wait| ApiError::RateLimited {
            retry_after_secs: whole_seconds(wait),
        })
    }
}

/// Three base64url parts joined by dots, the first a JSON object: a JWT, not a key.
fn looks_like_a_jwt(credential: &[u8]) -> bool {
    credential.starts_with(b"eyJ") && credential.iter().filter(|b| **b == b'.').count() == 2
}

fn per_minute(limit: NonZeroU32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_minute(limit))
}

/// The key of `Bearer <key>` (scheme case-insensitive), if well-formed.
fn bearer_key(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Authenticates and rate-limits the token routes, as their first extractor:
/// 401 before 429 before anything else (the query is parsed after).
impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let caller = state
            .callers
            .authenticate(header)
            .await
            .map_err(IntoResponse::into_response)?;
        crate::telemetry::RequestContext::record_client(
            caller.name(),
            caller.service_account.as_ref(),
        );
        match state.callers.admit(&caller).await {
            Ok(()) => Ok(caller),
            Err(refusal) => Err(refusal.into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, UserId};

    fn client(name: &str, key: &str, scopes: Vec<Scope>) -> ClientSettings {
        ClientSettings::new(name, KeyDigest::of_key(key), scopes)
    }

    fn callers() -> Callers {
        let mut restricted = client("restricted", "restricted-key", vec![Scope::TokensRead]);
        restricted.allowed_types = Some(vec![UserType::Agent]);
        restricted.allowed_email_domains = Some(vec!["Example.com".into()]);
        Callers::new(
            &[
                client("reader", "reader-key", vec![Scope::TokensRead]),
                client("admin", "admin-key", vec![Scope::TokensInvalidate]),
                restricted,
            ],
            false,
        )
    }

    fn member(email: &str, user_type: UserType) -> Identity {
        Identity::TeamMember {
            email: Email::parse(email).unwrap(),
            user_type,
        }
    }

    #[tokio::test]
    async fn the_matching_client_is_found() {
        let c = callers();
        assert_eq!(
            &**c.authenticate(Some(b"Bearer admin-key"))
                .await
                .unwrap()
                .name(),
            "admin"
        );
        assert_eq!(
            &**c.authenticate(Some(b"bearer reader-key"))
                .await
                .unwrap()
                .name(),
            "reader"
        );
    }

    #[tokio::test]
    async fn unknown_malformed_and_missing_keys_are_refused() {
        let c = callers();
        for header in [
            &b"Bearer wrong"[..],
            b"Basic cmVhZGVyLWtleQ==",
            b"Bearer ",
            b"Bearer",
            b"reader-key",
        ] {
            assert_eq!(
                c.authenticate(Some(header)).await.unwrap_err(),
                ApiError::Unauthorized
            );
        }
        assert_eq!(
            c.authenticate(None).await.unwrap_err(),
            ApiError::Unauthorized
        );
    }

    #[tokio::test]
    async fn anonymous_has_every_scope_but_a_presented_key_is_still_checked() {
        let c = Callers::new(&[], true);
        let anon = c.authenticate(None).await.unwrap();
        assert_eq!(&**anon.name(), ANONYMOUS);
        let customer = Identity::Customer(UserId::parse("c1").unwrap());
        assert!(anon.authorize(Action::Read, &customer).is_ok());
        assert!(anon.authorize(Action::Invalidate, &customer).is_ok());
        assert!(c.authenticate(Some(b"Bearer whatever")).await.is_err());
    }

    #[test]
    fn a_domain_admits_its_subdomains_but_not_look_alikes() {
        assert!(domain_admits("example.com", "example.com"));
        assert!(domain_admits("example.com", "eu.example.com"));
        assert!(domain_admits("example.com", "a.b.example.com"));
        assert!(!domain_admits("example.com", "badexample.com"));
        assert!(!domain_admits("example.com", "example.com.evil.org"));
        assert!(!domain_admits("example.com", "example.co"));
    }

    #[tokio::test]
    async fn policy_refusals_name_the_rule() {
        let c = callers();
        let restricted = c
            .authenticate(Some(b"Bearer restricted-key"))
            .await
            .unwrap();
        assert!(
            restricted
                .authorize(Action::Read, &member("a@eu.EXAMPLE.com", UserType::Agent))
                .is_ok()
        );
        let type_refusal = restricted
            .authorize(Action::Read, &member("a@example.com", UserType::CustomUser))
            .unwrap_err();
        assert!(type_refusal.to_string().contains("type CUSTOM_USER"));
        let domain_refusal = restricted
            .authorize(Action::Read, &member("a@badexample.com", UserType::Agent))
            .unwrap_err();
        assert!(domain_refusal.to_string().contains("email domain"));
        assert!(!domain_refusal.to_string().contains("example.com"));
        let customer = Identity::Customer(UserId::parse("c1").unwrap());
        let scope = restricted.authorize(Action::Read, &customer).unwrap_err();
        assert!(scope.to_string().contains("customer_tokens:read"));
    }

    #[tokio::test]
    async fn the_rate_limit_refuses_beyond_the_burst_with_a_wait() {
        let mut limited = client("limited", "limited-key", vec![Scope::TokensRead]);
        limited.rate_limit_per_minute = NonZeroU32::new(2);
        let c = Callers::new(&[limited], false);
        let caller = c.authenticate(Some(b"Bearer limited-key")).await.unwrap();
        assert!(c.admit(&caller).await.is_ok());
        assert!(c.admit(&caller).await.is_ok());
        let Err(ApiError::RateLimited { retry_after_secs }) = c.admit(&caller).await else {
            panic!("third request in a minute should be limited");
        };
        assert!((1..=30).contains(&retry_after_secs), "{retry_after_secs}");
    }
}
