//! The API described as OpenAPI 3.1, generated from the handlers and body
//! types so it cannot drift; served at `GET /openapi.json` and kept in
//! `docs/openapi.json` (a test fails when the two differ).

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::http::error::Problem;
use crate::http::tokens::{self, TokenBody, VendorBody, VendorData, VendorToken};

/// The route of the document.
pub const OPENAPI_ROUTE: &str = "/openapi.json";

// The two query types below exist only to describe the parameters: requests
// are parsed by `http::query`, which also refuses repeated and unknown ones.

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
    #[param(rename = "type", pattern = "(?i)^(AGENT|CUSTOM_USER|CUSTOMER)$")]
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
    #[param(rename = "type", pattern = "(?i)^(AGENT|CUSTOM_USER|CUSTOMER)$")]
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
    #[param(rename = "Cache-Control", example = "no-cache")]
    cache_control: Option<String>,
}

/// Refusals every token operation can answer with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum CallerErrors {
    /// Bad, missing, repeated or unknown parameter
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem<'static>),
    /// Missing or unknown caller key, or a service-account token that fails verification
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem<'static>),
    /// The caller lacks the scope, type or email domain, or no client names its service account
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem<'static>),
    /// Caller over its rate limit (`Retry-After`)
    #[response(status = 429, content_type = "application/problem+json")]
    RateLimited(Problem<'static>),
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
    /// The vendor is unavailable (`Retry-After`)
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem<'static>),
    /// The vendor did not answer in time
    #[response(status = 504, content_type = "application/problem+json")]
    Timeout(Problem<'static>),
}

struct CallerKey;

impl Modify for CallerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "caller_key",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "The caller key whose SHA-256 is configured in [[clients]]",
                        ))
                        .build(),
                ),
            );
            components.add_security_scheme(
                "service_account",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "A Kubernetes projected service-account token (audience token-broker) \
                             whose namespace:name a client lists in service_accounts",
                        ))
                        .build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "token-broker",
        description = "Hands internal callers BotPenguin user tokens without exposing the partner key. \
                       Every error is application/problem+json (RFC 9457)."
    ),
    paths(tokens::get_token, tokens::delete_token, tokens::get_vendor_token),
    components(schemas(TokenBody, VendorBody, VendorData, VendorToken, Problem)),
    modifiers(&CallerKey),
    security(("caller_key" = []), ("service_account" = [])),
    tags((name = "tokens", description = "Team-member and customer tokens"))
)]
pub struct ApiDoc;

static DOCUMENT: LazyLock<String> = LazyLock::new(document);

/// The document as pretty JSON with a trailing newline, as kept in `docs/openapi.json`.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    json.push('\n');
    json
}

/// `GET /openapi.json`
pub async fn serve() -> Response {
    let mut response = DOCUMENT.as_str().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/v1/tokens"]["get"].is_object());
        assert!(doc["paths"]["/v1/tokens"]["delete"].is_object());
        assert!(doc["paths"]["/ext/get-user-token"]["get"].is_object());
        assert!(doc["components"]["securitySchemes"]["caller_key"].is_object());
    }
}
