//! The API described as OpenAPI 3.1, generated from the handlers and body
//! types so it cannot drift; served at `GET /openapi.json` and kept in
//! `docs/openapi.json` (a test fails when the two differ).

pub mod params;

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::error::Problem;
use crate::http::tokens::{self, TokenBody, VendorBody, VendorData, VendorToken};

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
