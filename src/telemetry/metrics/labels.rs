//! The label sets of the metric families, and the closed sets of label
//! values, one enum per label, so a value that dashboards and alerts do not
//! know cannot be counted by a typo.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

// The label sets of the families, by the labels they carry.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub client: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: Arc<str>,
    pub result: &'static str,
}

/// An enum of label values, each with the text it is exported as, and
/// `ALL` to start every series at zero.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order exported.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// Its place in `ALL`.
            pub fn index(self) -> usize {
                self as usize
            }

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }
    };
}

label_values! {
    /// `result` of `token_broker_cache_lookups_total`.
    Lookup {
        Hit => "hit",
        Miss => "miss",
        Stale => "stale",
        /// A remembered "no such user".
        Negative => "negative",
    }
}

label_values! {
    /// `outcome` of `token_broker_upstream_requests_total`.
    UpstreamOutcome {
        Ok => "ok",
        Inactive => "inactive",
        NotFound => "not_found",
        Rejected => "rejected",
        Unavailable => "unavailable",
        Malformed => "malformed",
        UnexpectedStatus => "unexpected_status",
        Timeout => "timeout",
        ConnectError => "connect_error",
        TransportError => "transport_error",
        CircuitOpen => "circuit_open",
        Saturated => "saturated",
    }
}

label_values! {
    /// `result` of `token_broker_client_requests_total`.
    ClientResult {
        Ok => "ok",
        BadRequest => "bad_request",
        Forbidden => "forbidden",
        NotFound => "not_found",
        Inactive => "inactive",
        RateLimited => "rate_limited",
        Error => "error",
        /// Refused by the service itself (overload, audit unavailable).
        Refused => "refused",
    }
}

label_values! {
    /// `op` of `token_broker_shared_cache_operations_total`.
    SharedCacheOp {
        Get => "get",
        Claim => "claim",
        Store => "store",
        Unlock => "unlock",
        Invalidate => "invalidate",
        Replicate => "replicate",
        RateLimit => "rate_limit",
        Subscribe => "subscribe",
        Probe => "probe",
        /// The fleet's counters read and this replica's canary published.
        Canary => "canary",
        RaiseEpoch => "raise_epoch",
    }
}

label_values! {
    /// `result` of `token_broker_shared_cache_operations_total`.
    SharedCacheResult {
        Ok => "ok",
        Error => "error",
        Timeout => "timeout",
    }
}

label_values! {
    /// `reason` of `token_broker_shared_cache_values_refused_total`.
    ValueRefusal {
        /// Sealed in a generation older than an invalidation.
        StaleGeneration => "stale_generation",
        /// Sealed in another epoch of the fleet (before a rollback was seen).
        StaleEpoch => "stale_epoch",
        Undecryptable => "undecryptable",
    }
}

label_values! {
    /// `result` of `token_broker_service_account_tokens_total`.
    ServiceAccountResult {
        /// A signature check passed.
        Verified => "verified",
        /// Seen and verified before.
        Cached => "cached",
        RejectedMalformed => "rejected_malformed",
        RejectedUnknownKey => "rejected_unknown_key",
        RejectedInvalid => "rejected_invalid",
        RejectedLifetime => "rejected_lifetime",
        RejectedSubject => "rejected_subject",
    }
}

label_values! {
    /// `reason` of `token_broker_log_lines_dropped_total`.
    LogDrop {
        /// An ordinary line found its lane of the log queue full.
        QueueFull => "queue_full",
        /// An audit event found its lane of the log queue full; its request failed with a 503.
        AuditRefused => "audit_refused",
        /// Writing to stdout failed (closed or broken).
        WriteFailed => "write_failed",
        /// The request line of a request refused before its caller was known
        /// (a 401), past `UNAUTHENTICATED_LINES_PER_SECOND`.
        Sampled => "sampled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_sits_at_its_index_in_all() {
        for (i, result) in ClientResult::ALL.into_iter().enumerate() {
            assert_eq!(result.index(), i, "{result:?}");
        }
    }
}
