//! Caller authentication: `Authorization: Bearer <key>` checked in constant
//! time against the configured SHA-256 digests, and scope checks.

use std::sync::{Arc, OnceLock};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::broker::identity::Identity;
use crate::config::{ClientSettings, Scope};
use crate::http::AppState;
use crate::http::error::ApiError;

/// The caller name of requests without a key when `auth.allow_anonymous` is on.
pub const ANONYMOUS: &str = "anonymous";

/// The SHA-256 of a caller key, as `hash-key` prints it.
pub fn key_sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[derive(Debug)]
struct Client {
    caller: Caller,
    digest: [u8; 32],
}

/// The configured callers.
#[derive(Debug)]
pub struct Callers {
    clients: Vec<Client>,
    allow_anonymous: bool,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Arc<str>,
    scopes: Vec<Scope>,
}

impl Caller {
    /// Refuses unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this caller lacks the scope {}",
                scope.as_str()
            )))
        }
    }

    /// Refuses unless the caller may read the token of `identity`.
    pub fn authorize_read(&self, identity: &Identity) -> Result<(), ApiError> {
        match identity {
            Identity::TeamMember { .. } => self.require(Scope::TokensRead),
            Identity::Customer(_) => self.require(Scope::CustomerTokensRead),
        }
    }
}

impl Callers {
    pub fn new(clients: &[ClientSettings], allow_anonymous: bool) -> Self {
        let clients = clients
            .iter()
            .filter_map(|c| {
                Some(Client {
                    digest: c.key_digest()?,
                    caller: Caller {
                        name: Arc::from(c.name.as_str()),
                        scopes: c.scopes.clone(),
                    },
                })
            })
            .collect();
        Self {
            clients,
            allow_anonymous,
        }
    }

    /// Finds the caller presenting `authorization` (the header value, if any).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        let Some(value) = authorization else {
            return if self.allow_anonymous {
                Ok(Caller {
                    name: Arc::from(ANONYMOUS),
                    scopes: Scope::ALL.to_vec(),
                })
            } else {
                Err(ApiError::Unauthorized)
            };
        };
        let key = bearer_key(value).ok_or(ApiError::Unauthorized)?;
        let presented: [u8; 32] = Sha256::digest(key).into();
        // Every digest is compared, so timing does not tell which (or whether) one matched.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, client) in self.clients.iter().enumerate() {
            let matches = client.digest.ct_eq(&presented);
            index.conditional_assign(&(i as u32), matches);
            found |= matches;
        }
        if bool::from(found) {
            Ok(self.clients[index as usize].caller.clone())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
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

/// Filled by the `Caller` extractor so the request middleware can label
/// `token_broker_client_requests_total` with the caller's name.
#[derive(Clone, Default)]
pub struct CallerSlot(pub Arc<OnceLock<Arc<str>>>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let caller = state.callers.authenticate(header)?;
        tracing::Span::current().record("client", &*caller.name);
        if let Some(slot) = parts.extensions.get::<CallerSlot>() {
            let _ = slot.0.set(caller.name.clone());
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers() -> Callers {
        let clients = [
            ClientSettings {
                name: "reader".into(),
                key_sha256: key_sha256("reader-key"),
                scopes: vec![Scope::TokensRead],
            },
            ClientSettings {
                name: "admin".into(),
                key_sha256: key_sha256("admin-key"),
                scopes: vec![Scope::TokensInvalidate],
            },
        ];
        Callers::new(&clients, false)
    }

    #[test]
    fn the_matching_client_is_found() {
        let c = callers();
        assert_eq!(
            &*c.authenticate(Some(b"Bearer admin-key")).unwrap().name,
            "admin"
        );
        assert_eq!(
            &*c.authenticate(Some(b"bearer reader-key")).unwrap().name,
            "reader"
        );
    }

    #[test]
    fn unknown_malformed_and_missing_keys_are_refused() {
        let c = callers();
        for header in [
            &b"Bearer wrong"[..],
            b"Basic cmVhZGVyLWtleQ==",
            b"Bearer ",
            b"Bearer",
            b"reader-key",
        ] {
            assert_eq!(
                c.authenticate(Some(header)).unwrap_err(),
                ApiError::Unauthorized
            );
        }
        assert_eq!(c.authenticate(None).unwrap_err(), ApiError::Unauthorized);
    }

    #[test]
    fn anonymous_has_every_scope_but_a_presented_key_is_still_checked() {
        let c = Callers::new(&[], true);
        let anon = c.authenticate(None).unwrap();
        assert_eq!(&*anon.name, ANONYMOUS);
        assert!(Scope::ALL.iter().all(|s| anon.require(*s).is_ok()));
        assert!(c.authenticate(Some(b"Bearer whatever")).is_err());
    }

    #[test]
    fn hash_matches_sha256_test_vector() {
        assert_eq!(
            key_sha256("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
