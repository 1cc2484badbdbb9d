//! What a request came to: written by whoever answered it, read by the
//! per-request work for the log line and the metrics.

use crate::broker::CacheResult;
use crate::telemetry::metrics::ClientResult;

/// What a request came to, attached to its response by whoever answered it
/// (the handler, an error), and read back once here for the log line and the
/// metrics. Who asked is in the request's `RequestContext`.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Where the token came from, when one was handed out.
    pub cache: Option<CacheResult>,
    /// The `result` label of `token_broker_client_requests_total`.
    pub result: ClientResult,
}
