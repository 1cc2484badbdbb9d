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

/// Every answer carries `X-Request-Id` (the caller's, or a new one).
struct RequestIds;

impl Modify for RequestIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let header = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(
                "The request's id: the caller's `X-Request-Id` when it is a sane token, else a new UUID; in the log line too",
            ))
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.delete, &mut item.head];
            for operation in operations.into_iter().flatten() {
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response
                            .headers
                            .insert("X-Request-Id".to_owned(), header.clone());
                    }
                }
            }
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
    modifiers(&CallerKey, &RequestIds),
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

    /// Every value under a key named `key`, anywhere in `value`.
    fn all<'a>(value: &'a serde_json::Value, key: &str, found: &mut Vec<&'a serde_json::Value>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == key {
                        found.push(v);
                    }
                    all(v, key, found);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| all(v, key, found)),
            _ => {}
        }
    }

    #[test]
    fn no_field_is_typed_nullable() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut types = Vec::new();
        all(&doc, "type", &mut types);
        for kind in types {
            assert!(
                !kind.as_array().is_some_and(|k| k.contains(&"null".into())),
                "{kind}"
            );
        }
        assert!(!document().contains("\"nullable\""));
    }

    #[test]
    fn every_pattern_is_ecma_262_and_the_type_pattern_takes_any_case() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut patterns = Vec::new();
        all(&doc, "pattern", &mut patterns);
        assert!(patterns.len() >= 4, "{patterns:?}");
        for pattern in &patterns {
            let pattern = pattern.as_str().unwrap();
            regress::Regex::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        }
        let type_pattern = doc["paths"]["/v1/tokens"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "type")
            .unwrap()["schema"]["pattern"]
            .as_str()
            .unwrap();
        let re = regress::Regex::new(type_pattern).unwrap();
        assert!(
            regress::Regex::new("(?i)^(AGENT)$").is_err(),
            "an inline flag is not ECMA-262"
        );
        for good in ["AGENT", "agent", "Custom_User", "CUSTOMER"] {
            assert!(re.find(good).is_some(), "{good}");
        }
        for bad in ["ADMIN", "AGENTS", "custom user", ""] {
            assert!(re.find(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn every_status_an_operation_answers_is_documented_with_its_headers() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let refusals = ["400", "401", "403", "405", "414", "429", "431", "503"];
        let vendor = ["404", "502", "504"];
        let cases: [(&str, &str, Vec<&str>); 3] = [
            (
                "/v1/tokens",
                "get",
                [&["200", "409"][..], &refusals, &vendor].concat(),
            ),
            (
                "/ext/get-user-token",
                "get",
                [&["200"][..], &refusals, &vendor].concat(),
            ),
            ("/v1/tokens", "delete", [&["204"][..], &refusals].concat()),
        ];
        for (path, method, statuses) in cases {
            let responses = &doc["paths"][path][method]["responses"];
            for status in statuses {
                let response = &responses[status];
                assert!(response.is_object(), "{method} {path}: {status}");
                assert!(
                    response["headers"]["X-Request-Id"].is_object(),
                    "{method} {path} {status}: X-Request-Id"
                );
                let header = |name: &str| response["headers"][name].is_object();
                match status {
                    "200" => assert!(header("Cache-Control") && header("X-Cache") && header("Age")),
                    "401" => assert!(header("WWW-Authenticate")),
                    "405" => assert!(header("Allow")),
                    "429" | "503" => assert!(header("Retry-After"), "{method} {path} {status}"),
                    _ => {}
                }
            }
        }
    }
}
