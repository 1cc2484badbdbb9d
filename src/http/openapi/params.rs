//! Types that only describe the API's headers and refusals to the OpenAPI
//! document; requests are parsed by `http::query`.

use utoipa::IntoParams;

use crate::http::error::Problem;

// The identity parameters are described by `openapi::identity_forms`: the
// two forms as `oneOf`, which a parameter struct cannot say.

/// Request headers of the token reads.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct ReadHeaders {
    /// `no-cache` (or `max-age=0`): answer from a vendor fetch made after this
    /// request (`X-Cache: miss`), unless the key was fetched less than
    /// `cache.revalidate_min_interval` ago (that answer, `X-Cache: hit`). For a
    /// caller whose token BotPenguin just rejected.
    #[param(rename = "Cache-Control", example = "no-cache", value_type = String, required = false)]
    cache_control: Option<String>,
}

/// Refusals every token operation can answer with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum CallerErrors {
    /// Bad, missing, repeated or unknown parameter
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem<'static>),
    /// Missing or unknown caller credential: a key, a service-account token
    /// that fails verification, or a client certificate naming two clients
    #[response(
        status = 401,
        content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer`"))
    )]
    Unauthorized(Problem<'static>),
    /// The caller lacks the scope, type or email domain, or no client names
    /// its service account or client certificate
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem<'static>),
    /// `HEAD` or another method the route does not serve
    #[response(
        status = 405,
        content_type = "application/problem+json",
        headers(("Allow" = String, description = "The methods the route serves"))
    )]
    MethodNotAllowed(Problem<'static>),
    /// Request target over 8 KiB
    #[response(status = 414, content_type = "application/problem+json")]
    UriTooLong(Problem<'static>),
    /// Caller over its rate limit
    #[response(
        status = 429,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait (at most 60)"))
    )]
    RateLimited(Problem<'static>),
    /// Headers over 8 KiB or more than 100 fields
    #[response(status = 431, content_type = "application/problem+json")]
    HeadersTooLarge(Problem<'static>),
}

/// What asking the vendor can end in, for the token reads.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum VendorErrors {
    /// The vendor has no such user
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem<'static>),
    /// The vendor answered with something unusable
    #[response(status = 502, content_type = "application/problem+json")]
    BadGateway(Problem<'static>),
    /// The vendor is unavailable (`upstream-unavailable`), the audit event
    /// could not be written (`audit-unavailable`), or too many connections
    /// are open (`overloaded`)
    #[response(
        status = 503,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait (at most 60)"))
    )]
    Unavailable(Problem<'static>),
    /// The vendor did not answer in time
    #[response(status = 504, content_type = "application/problem+json")]
    Timeout(Problem<'static>),
}
