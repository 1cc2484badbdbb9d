//! What a request came to: written by whoever answered it, read by the
//! per-request work for the audit event or log line, and the metrics.

use crate::audit::AuditedIdentity;
use crate::broker::CacheResult;
use crate::callers::Rule;
use crate::telemetry::metrics::ClientResult;

/// What a request came to, attached to its response by whoever answered it
/// (the handler, an error), and read back once by `observe` for the audit
/// event (or log line) and the metrics. Who asked is in the request's
/// `RequestContext`.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Where the token came from, when one was handed out.
    pub cache: Option<CacheResult>,
    /// Whether the token handed out is active (the drop-in route passes an
    /// inactive one through).
    pub active: Option<bool>,
    /// The `result` label of `token_broker_client_requests_total`.
    pub result: ClientResult,
    /// The rule that refused the request, for a 403.
    pub denied: Option<Rule>,
    /// Whose token was asked for, once the query named someone.
    pub identity: Option<AuditedIdentity>,
}

impl Outcome {
    pub fn new(result: ClientResult) -> Self {
        Self {
            cache: None,
            active: None,
            result,
            denied: None,
            identity: None,
        }
    }
}
