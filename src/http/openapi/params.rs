//! Types that only describe the API's parameters and refusals to the OpenAPI
//! document; requests are parsed by `http::query`.

use utoipa::IntoParams;

use crate::http::error::Problem;

// Patterns are ECMA-262 (JavaScript tools read the document): the type's
// "any letter case" is spelled out, since `(?i)` is no JavaScript syntax.

/// Query parameters of `/v1/tokens`: `email` + `type`, or `user_id`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct V1Query {
    /// A team member's email: at most 254 bytes; an RFC 5322 dot-atom, `@`,
    /// a hostname of two or more labels (`xn--` form for international names).
    /// A literal `+` stays `+`. Give it with `type`.
    email: Option<String>,
    /// `AGENT`, `CUSTOM_USER` or `CUSTOMER` (any case). Give it with `email`.
    #[param(
        rename = "type",
        pattern = "^([Aa][Gg][Ee][Nn][Tt]|[Cc][Uu][Ss][Tt][Oo][Mm]_[Uu][Ss][Ee][Rr]|[Cc][Uu][Ss][Tt][Oo][Mm][Ee][Rr])$"
    )]
    user_type: Option<String>,
    /// A customer's id: 1–64 characters of `A-Z a-z 0-9 _ -`. Not with `email`/`type`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    user_id: Option<String>,
}

/// Query parameters of the drop-in route: `email` + `type`, or `userId`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct VendorQuery {
    /// A team member's email. Give it with `type`.
    email: Option<String>,
    /// `AGENT`, `CUSTOM_USER` or `CUSTOMER` (any case). Give it with `email`.
    #[param(
        rename = "type",
        pattern = "^([Aa][Gg][Ee][Nn][Tt]|[Cc][Uu][Ss][Tt][Oo][Mm]_[Uu][Ss][Ee][Rr]|[Cc][Uu][Ss][Tt][Oo][Mm][Ee][Rr])$"
    )]
    user_type: Option<String>,
    /// A customer's id, as the vendor names it. Not with `email`/`type`.
    #[param(rename = "userId", pattern = "^[A-Za-z0-9_-]{1,64}$")]
    user_id: Option<String>,
}

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
