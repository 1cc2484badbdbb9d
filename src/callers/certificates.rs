//! Callers by client certificate (mutual TLS): the handshake verified the
//! certificate against `server.tls_client_ca_file`; its URI SANs are matched
//! exactly against the clients' `spiffe_ids`. Asked only when the request
//! has no `Authorization` header (the header wins).

use std::collections::HashMap;
use std::sync::Arc;

use super::policy::{Policy, Rule};
use super::{Caller, Identified, Method, Presented, Refusal};
use crate::domain::Proof;

/// SPIFFE ID → the client naming it.
pub(super) struct Certificates {
    by_id: HashMap<Arc<str>, Arc<Policy>>,
}

impl Certificates {
    pub(super) fn new(by_id: HashMap<Arc<str>, Arc<Policy>>) -> Self {
        Self { by_id }
    }

    fn caller(&self, uris: &[Arc<str>]) -> Result<Caller, Refusal> {
        let mut matched: Option<(&Arc<str>, &Arc<Policy>)> = None;
        for uri in uris {
            let Some(policy) = self.by_id.get(uri) else {
                continue;
            };
            match matched {
                // Two clients in one certificate: no one can say which it is.
                Some((_, first)) if !Arc::ptr_eq(first, policy) => {
                    return Err(Refusal::Unauthorized);
                }
                Some(_) => {}
                None => matched = Some((uri, policy)),
            }
        }
        let (id, policy) = matched.ok_or_else(|| Refusal::NotAClient {
            rule: Rule::Certificate,
            detail: "this client certificate is not a caller of this service".into(),
            proof: Proof::Certificate(uris.first().cloned().unwrap_or_else(|| Arc::from(""))),
        })?;
        Ok(Caller {
            policy: policy.clone(),
            proof: Proof::Certificate(id.clone()),
        })
    }
}

impl Method for Certificates {
    fn identify<'a>(&'a self, presented: &'a Presented<'a>) -> Identified<'a> {
        let certificate = match presented.certificate {
            Some(certificate) if presented.bearer.is_none() && !self.by_id.is_empty() => {
                certificate
            }
            _ => return Identified::Now(Ok(None)),
        };
        Identified::Now(self.caller(&certificate.uris).map(Some))
    }
}
