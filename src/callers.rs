//! Callers: who is asking, and what they may do.
//!
//! A caller proves who it is by one of the methods, each a file of this
//! module behind the `Method` trait: `keys` (a bearer key's SHA-256 against
//! the configured digests), `service_accounts` (a Kubernetes service-account
//! token verified against the cluster's JWKS) and `certificates` (a verified
//! client certificate's SPIFFE ID). `Callers` asks them in that order; the
//! first that recognises what the request presents decides. Nothing here
//! guesses a method from the shape of a header: a bearer credential is a key
//! if its digest is configured, else whatever the next method makes of it.
//! `policy` holds what a known caller may do; its rate limit is taken here,
//! the fleet's through the `FleetLimiter` when Redis answers.

mod certificates;
mod keys;
mod policy;
pub mod service_accounts;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};

use crate::config::{ClientSettings, KeyDigest};
use crate::domain::{Identity, Proof};
use crate::shared::{FleetLimiter, NoSharedTier};
use crate::tls::PeerCertificate;
use certificates::Certificates;
use keys::Keys;
use policy::Policy;
use service_accounts::{ServiceAccounts, Verifier};

pub use policy::{Action, Rule};

/// Why a request has no caller, or its caller may not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A 401: no credential, or one that proves no caller.
    #[error("missing or unknown caller credential")]
    Unauthorized,
    /// A 403: who asked is known, and may not do this.
    #[error("forbidden: {detail}")]
    Forbidden { rule: Rule, detail: String },
    /// A 403: the cluster or the CA vouches for who asked (`proof`), but no
    /// client is them.
    #[error("forbidden: {detail}")]
    NotAClient {
        rule: Rule,
        detail: String,
        proof: Proof,
    },
    /// A 429: over the caller's rate limit for `wait`.
    #[error("over the rate limit")]
    RateLimited { wait: Duration },
}

impl Refusal {
    /// Who the cluster or a CA vouches for, when no client is them.
    pub fn vouched_for(&self) -> Option<&Proof> {
        match self {
            Refusal::NotAClient { proof, .. } => Some(proof),
            _ => None,
        }
    }
}

/// An authenticated caller; cheap to clone.
#[derive(Clone)]
pub struct Caller {
    policy: Arc<Policy>,
    proof: Proof,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.policy.name)
            .field("proof", &self.proof)
            .finish()
    }
}

impl Caller {
    pub fn name(&self) -> &Arc<str> {
        &self.policy.name
    }

    /// How it proved who it is.
    pub fn proof(&self) -> &Proof {
        &self.proof
    }

    /// Refuses unless this caller may do `action` on the token of `identity`.
    /// The detail names the rule, never the caller's configured values.
    pub fn authorize(&self, action: Action, identity: &Identity) -> Result<(), Refusal> {
        self.policy.authorize(action, identity)
    }
}

/// A bearer credential and its SHA-256, computed once for every method.
pub struct Bearer<'a> {
    credential: &'a [u8],
    digest: KeyDigest,
}

/// What a request presents to prove who it is.
pub struct Presented<'a> {
    bearer: Option<Bearer<'a>>,
    certificate: Option<&'a PeerCertificate>,
}

impl<'a> Presented<'a> {
    /// From the `Authorization` header's value, if any, and the connection's
    /// verified client certificate, if any. A header that is not `Bearer
    /// <credential>` is a 401 whatever else is presented.
    pub fn new(
        authorization: Option<&'a [u8]>,
        certificate: Option<&'a PeerCertificate>,
    ) -> Result<Self, Refusal> {
        let bearer = match authorization {
            None => None,
            Some(value) => {
                let credential = bearer_credential(value).ok_or(Refusal::Unauthorized)?;
                Some(Bearer {
                    credential,
                    digest: KeyDigest::of_key(credential),
                })
            }
        };
        Ok(Self {
            bearer,
            certificate,
        })
    }
}

/// A method's answer: at once (no I/O needed), or after a future.
enum Identified<'a> {
    Now(Result<Option<Caller>, Refusal>),
    Later(Pin<Box<dyn Future<Output = Result<Option<Caller>, Refusal>> + Send + 'a>>),
}

/// One way to prove who one is. `Ok(None)`: nothing this method reads was
/// presented, or what was is not its kind; `Err`: it is its kind and is
/// refused. A new method is one file implementing this, added in `Callers::new`.
trait Method: Send + Sync {
    fn identify<'a>(&'a self, presented: &'a Presented<'a>) -> Identified<'a>;
}

/// The configured callers and the methods that find them.
pub struct Callers {
    methods: Vec<Box<dyn Method>>,
    anonymous: Option<Arc<Policy>>,
    /// The fleet-wide rate limiter, when Redis is shared.
    limiter: Arc<dyn FleetLimiter>,
}

impl Callers {
    /// The callers of `clients`; service-account tokens are verified by
    /// `verifier` when the cluster's are accepted.
    pub fn new(
        clients: &[ClientSettings],
        allow_anonymous: bool,
        verifier: Option<Arc<Verifier>>,
    ) -> Self {
        let policies: Vec<_> = clients
            .iter()
            .map(|client| (client, Arc::new(Policy::of(client))))
            .collect();
        let keyed = policies
            .iter()
            .filter_map(|(client, policy)| Some((policy.clone(), client.key_sha256?)))
            .collect();
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(Keys::new(keyed))];
        if let Some(verifier) = verifier {
            let named = policies.iter().flat_map(|(client, policy)| {
                client
                    .service_accounts
                    .iter()
                    .map(|account| (account, policy.clone()))
            });
            methods.push(Box::new(ServiceAccounts::new(verifier, named)));
        }
        let by_id: HashMap<_, _> = policies
            .iter()
            .flat_map(|(client, policy)| {
                client
                    .spiffe_ids
                    .iter()
                    .map(|id| (Arc::from(id.as_str()), policy.clone()))
            })
            .collect();
        methods.push(Box::new(Certificates::new(by_id)));
        Self {
            methods,
            anonymous: allow_anonymous.then(|| Arc::new(Policy::anonymous())),
            limiter: Arc::new(NoSharedTier),
        }
    }

    /// Rate limits hold for the whole fleet through `limiter` while it answers.
    pub fn with_limiter(mut self, limiter: Arc<dyn FleetLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Finds the caller of what a request presents: 401 for a missing,
    /// unknown or unverifiable credential; 403 for one that proves someone
    /// (a service account, a certificate) no client names.
    pub async fn authenticate(&self, presented: &Presented<'_>) -> Result<Caller, Refusal> {
        for method in &self.methods {
            let found = match method.identify(presented) {
                Identified::Now(found) => found,
                Identified::Later(found) => found.await,
            };
            if let Some(caller) = found? {
                return Ok(caller);
            }
        }
        match &self.anonymous {
            Some(policy) if presented.bearer.is_none() => Ok(Caller {
                policy: policy.clone(),
                proof: Proof::Anonymous,
            }),
            _ => Err(Refusal::Unauthorized),
        }
    }

    /// Takes one request from `caller`'s rate limit: the fleet's when Redis
    /// is shared and answering, else this replica's.
    pub async fn admit(&self, caller: &Caller) -> Result<(), Refusal> {
        let Some((per_minute, limiter)) = &caller.policy.limit else {
            return Ok(());
        };
        let fleet = self.limiter.admit(&caller.policy.name, *per_minute).await;
        let verdict = fleet.unwrap_or_else(|| {
            limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
        });
        verdict.map_err(|wait| Refusal::RateLimited { wait })
    }
}

/// The credential of `Bearer <credential>` (scheme case-insensitive), if well-formed.
fn bearer_credential(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let credential = rest.trim_ascii();
    (!credential.is_empty()).then_some(credential)
}

#[cfg(test)]
mod tests;
