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
use crate::http::query;
use crate::http::routes::{TOKENS_ROUTE, VENDOR_ROUTE};
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
    modifiers(&CallerKey, &IdentityForms, &RequestIds),
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

/// The identity parameters of each token operation as `oneOf` its two
/// forms, which a parameter struct cannot say.
struct IdentityForms;

impl Modify for IdentityForms {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::HttpMethod;
        for (path, method, customer) in [
            (TOKENS_ROUTE, HttpMethod::Get, query::V1.0),
            (TOKENS_ROUTE, HttpMethod::Delete, query::V1.0),
            (VENDOR_ROUTE, HttpMethod::Get, query::VENDOR.0),
        ] {
            let Some(item) = openapi.paths.paths.get_mut(path) else {
                continue;
            };
            let operation = match method {
                HttpMethod::Delete => &mut item.delete,
                _ => &mut item.get,
            };
            if let Some(operation) = operation {
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                parameters.insert(0, identity_forms(customer));
            }
        }
    }
}

/// An RFC 5322 dot-atom, `@`, and a hostname of two or more LDH labels: what
/// `domain::Email::parse` accepts, in ECMA-262 syntax (with `maxLength` 254).
const EMAIL_PATTERN: &str = "^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$";
/// `AGENT`, `CUSTOM_USER` or `CUSTOMER` in any letter case (no `(?i)` in ECMA-262).
const TYPE_PATTERN: &str = "^([Aa][Gg][Ee][Nn][Tt]|[Cc][Uu][Ss][Tt][Oo][Mm]_[Uu][Ss][Ee][Rr]|[Cc][Uu][Ss][Tt][Oo][Mm][Ee][Rr])$";
/// A customer's id, as `domain::UserId::parse` accepts it.
const USER_ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// The identity parameter of one operation as what the service accepts:
/// exactly one of the two forms, nothing else, each value with its bounds
/// and pattern. One query object (`style: form`, `explode: true`: each
/// property its own query parameter) whose schema is `oneOf` the two forms
/// with no other property.
fn identity_forms(customer: &str) -> utoipa::openapi::path::Parameter {
    use serde_json::json;
    let team_member = json!({
        "type": "object",
        "title": "TeamMember",
        "description": "A team member: `email` and `type`",
        "properties": {
            "email": {
                "type": "string",
                "minLength": 3,
                "maxLength": crate::domain::MAX_EMAIL_BYTES,
                "pattern": EMAIL_PATTERN,
                "description": "One address: an RFC 5322 dot-atom, `@`, a hostname of two or more labels (`xn--` form for international names); percent-encoded, a literal `+` stays `+`",
                "example": "alice@example.com",
            },
            "type": {
                "type": "string",
                "pattern": TYPE_PATTERN,
                "description": "`AGENT`, `CUSTOM_USER` or `CUSTOMER`, in any letter case",
                "example": "AGENT",
            },
        },
        "required": ["email", "type"],
        "additionalProperties": false,
    });
    let customer_form = json!({
        "type": "object",
        "title": "Customer",
        "description": format!("A customer: `{customer}`"),
        "properties": {
            customer: {
                "type": "string",
                "minLength": 1,
                "maxLength": crate::domain::MAX_USER_ID_CHARS,
                "pattern": USER_ID_PATTERN,
                "description": "1 to 64 characters of `A-Z a-z 0-9 _ -`",
                "example": "65f0c2a1b2c3d4e5f6a7b8c9",
            },
        },
        "required": [customer],
        "additionalProperties": false,
    });
    let parameter = json!({
        "name": "identity",
        "in": "query",
        "required": true,
        "style": "form",
        "explode": true,
        "description": format!("Whose token: `email` and `type` (a team member), or `{customer}` (a customer); exactly one form, each parameter once, no other parameter"),
        "schema": { "oneOf": [team_member, customer_form] },
    });
    serde_json::from_value(parameter).expect("a well-formed parameter, fixed at compile time")
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
        let re = regress::Regex::new(TYPE_PATTERN).unwrap();
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
    fn the_documented_patterns_accept_exactly_what_the_service_accepts() {
        use crate::domain::{Email, UserId};
        let email = regress::Regex::new(EMAIL_PATTERN).unwrap();
        let user_id = regress::Regex::new(USER_ID_PATTERN).unwrap();
        let long_label = "a".repeat(63);
        for address in [
            "alice@example.com",
            "a+b@x.com",
            "o'brien.x-y@Sub.Example.COM",
            "!#$%&'*+/=?^_`{|}~-@xn--bcher-kva.example",
            "a@b.c",
            &format!("a@{long_label}.com"),
            "a@example.com.",
            "a..b@example.com",
            ".a@example.com",
            "a@-example.com",
            "a@example-.com",
            "a@localhost",
            "a@@example.com",
            "a b@example.com",
            "\"q\"@example.com",
            &format!("a@{long_label}a.com"),
            "a@exa_mple.com",
        ] {
            assert_eq!(
                email.find(address).is_some(),
                Email::parse(address).is_ok(),
                "{address}"
            );
        }
        for id in [
            "c1",
            "A_b-9",
            &"x".repeat(64),
            "",
            &"x".repeat(65),
            "a b",
            "a.b",
        ] {
            assert_eq!(
                user_id.find(id).is_some(),
                UserId::parse(id).is_ok(),
                "{id:?}"
            );
        }
    }

    #[test]
    fn each_identity_form_is_an_alternative_with_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        for (path, method, customer) in [
            ("/v1/tokens", "get", "user_id"),
            ("/v1/tokens", "delete", "user_id"),
            ("/ext/get-user-token", "get", "userId"),
        ] {
            let parameters = doc["paths"][path][method]["parameters"].as_array().unwrap();
            let query: Vec<_> = parameters.iter().filter(|p| p["in"] == "query").collect();
            assert_eq!(query.len(), 1, "{method} {path}");
            let identity = query[0];
            assert_eq!(identity["required"], true);
            assert_eq!(
                (identity["style"].as_str(), identity["explode"].as_bool()),
                (Some("form"), Some(true))
            );
            let forms = identity["schema"]["oneOf"].as_array().unwrap();
            assert_eq!(forms.len(), 2);
            assert_eq!(forms[0]["required"], serde_json::json!(["email", "type"]));
            assert_eq!(forms[1]["required"], serde_json::json!([customer]));
            for form in forms {
                assert_eq!(form["additionalProperties"], false, "{method} {path}");
            }
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
