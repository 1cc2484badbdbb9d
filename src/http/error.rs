//! The one place where failures become RFC 9457 `application/problem+json`
//! responses. Clients get a stable slug, title and short detail; causes go to
//! the log, never into a body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::broker::BrokerError;
use crate::callers::{Refusal, Rule};
use crate::domain::InvalidInput;
use crate::http::outcome::Outcome;
use crate::telemetry::metrics::ClientResult;

/// Seconds a caller is told to wait after the vendor was unavailable.
const UPSTREAM_RETRY_AFTER_SECS: u64 = 5;

/// Every error the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("missing or unknown caller key")]
    Unauthorized,
    #[error("forbidden: {detail}")]
    Forbidden { rule: Rule, detail: String },
    #[error("the vendor has no such user")]
    UserNotFound,
    #[error("the token is inactive")]
    TokenInactive,
    #[error("the vendor answered with something unusable")]
    UpstreamBadResponse,
    #[error("the vendor is unavailable")]
    UpstreamUnavailable { retry_after_secs: u64 },
    #[error("the vendor did not answer in time")]
    UpstreamTimeout,
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("the invalidation did not reach the shared cache")]
    InvalidationNotShared,
    #[error("the audit event could not be written")]
    AuditUnavailable,
    #[error("request URI too long")]
    UriTooLong,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request body not accepted")]
    BodyNotAllowed,
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The `result` label of `token_broker_client_requests_total`.
    pub fn client_result(&self) -> ClientResult {
        match self {
            ApiError::BadRequest(_) | ApiError::BodyNotAllowed => ClientResult::BadRequest,
            ApiError::Forbidden { .. } => ClientResult::Forbidden,
            ApiError::UserNotFound => ClientResult::NotFound,
            ApiError::TokenInactive => ClientResult::Inactive,
            ApiError::RateLimited { .. } => ClientResult::RateLimited,
            ApiError::UpstreamBadResponse
            | ApiError::UpstreamUnavailable { .. }
            | ApiError::UpstreamTimeout
            | ApiError::InvalidationNotShared
            | ApiError::Internal => ClientResult::Error,
            ApiError::Unauthorized
            | ApiError::UriTooLong
            | ApiError::HeadersTooLarge
            | ApiError::RouteNotFound
            | ApiError::MethodNotAllowed
            | ApiError::AuditUnavailable => ClientResult::Refused,
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem<'a> {
    /// `urn:token-broker:problem:<slug>`
    #[serde(rename = "type")]
    #[schema(example = "urn:token-broker:problem:user-not-found")]
    kind: String,
    title: &'a str,
    status: u16,
    /// What went wrong, naming the parameter or rule; never a secret.
    detail: &'a str,
}

impl ApiError {
    /// (status, slug, title, detail)
    fn describe(&self) -> (StatusCode, &'static str, &'static str, &str) {
        match self {
            ApiError::BadRequest(detail) => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                detail,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                "present a known caller key as 'Authorization: Bearer <key>'",
            ),
            ApiError::Forbidden { detail, .. } => {
                (StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
            }
            ApiError::UserNotFound => (
                StatusCode::NOT_FOUND,
                "user-not-found",
                "No such user",
                "BotPenguin has no user with this identity",
            ),
            ApiError::TokenInactive => (
                StatusCode::CONFLICT,
                "token-inactive",
                "Token inactive",
                "BotPenguin reports this user's token as inactive",
            ),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                "this caller is over its rate_limit_per_minute; retry after Retry-After seconds",
            ),
            ApiError::UpstreamBadResponse => (
                StatusCode::BAD_GATEWAY,
                "upstream-bad-response",
                "Bad upstream response",
                "BotPenguin answered with something unusable; the cause is logged",
            ),
            ApiError::UpstreamUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-unavailable",
                "Upstream unavailable",
                "BotPenguin is unavailable and no cached token can be served; retry later",
            ),
            ApiError::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timeout",
                "BotPenguin did not answer within upstream.timeout",
            ),
            ApiError::InvalidationNotShared => (
                StatusCode::SERVICE_UNAVAILABLE,
                "invalidation-not-shared",
                "Invalidation not shared",
                "this replica dropped the token, but the shared cache did not confirm the invalidation for the other replicas; retry until 204",
            ),
            ApiError::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "Audit unavailable",
                "the audit event of this request could not be written (the log output is not keeping up), so no token was handed out; retry later",
            ),
            ApiError::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri-too-long",
                "URI too long",
                "the request line must be at most 8 KiB",
            ),
            ApiError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "Request headers too large",
                "the request headers must be at most 8 KiB and 100 fields",
            ),
            ApiError::BodyNotAllowed => (
                StatusCode::BAD_REQUEST,
                "body-not-allowed",
                "Request body not accepted",
                "requests to this API carry no body",
            ),
            ApiError::RouteNotFound => (
                StatusCode::NOT_FOUND,
                "route-not-found",
                "Not found",
                "no such route; see the README for the API",
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not accept that method",
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "an unexpected error happened; the cause is logged",
            ),
        }
    }
}

impl From<crate::shared::NotShared> for ApiError {
    fn from(_: crate::shared::NotShared) -> Self {
        ApiError::InvalidationNotShared
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title, detail) = self.describe();
        let problem = Problem {
            kind: format!("urn:token-broker:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail,
        };
        let mut response = (status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let mut outcome = Outcome::new(self.client_result());
        if let ApiError::Forbidden { rule, .. } = &self {
            outcome.denied = Some(*rule);
        }
        response.extensions_mut().insert(outcome);
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::UpstreamUnavailable { retry_after_secs }
            | ApiError::RateLimited { retry_after_secs } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.min(MAX_RETRY_AFTER_SECS)),
                );
            }
            ApiError::InvalidationNotShared | ApiError::AuditUnavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        response
    }
}

/// The longest `Retry-After` passed on to callers (60 s), whatever the
/// vendor or a rate limit says.
pub const MAX_RETRY_AFTER_SECS: u64 = 60;

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn whole_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unauthorized => ApiError::Unauthorized,
            Refusal::Forbidden { rule, detail } | Refusal::NotAClient { rule, detail, .. } => {
                ApiError::Forbidden { rule, detail }
            }
            Refusal::RateLimited { wait } => ApiError::RateLimited {
                retry_after_secs: whole_seconds(wait),
            },
        }
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<&BrokerError> for ApiError {
    fn from(e: &BrokerError) -> Self {
        match e {
            BrokerError::TimedOut => ApiError::UpstreamTimeout,
            BrokerError::NotFound => ApiError::UserNotFound,
            BrokerError::Unavailable { retry_after, .. } => ApiError::UpstreamUnavailable {
                retry_after_secs: retry_after.map_or(UPSTREAM_RETRY_AFTER_SECS, whole_seconds),
            },
            BrokerError::Rejected { .. } | BrokerError::Unusable { .. } => {
                ApiError::UpstreamBadResponse
            }
        }
    }
}
