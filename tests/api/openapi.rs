//! The OpenAPI document: served, and kept in `docs/openapi.json` without drift.

use crate::helpers::*;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

#[tokio::test]
async fn the_served_document_matches_docs_openapi_json() {
    let app = TestApp::spawn().await;

    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();

    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(DOC_PATH, &served).unwrap();
    }
    let kept = std::fs::read_to_string(DOC_PATH).unwrap_or_default();
    assert!(
        served == kept,
        "docs/openapi.json is out of date; regenerate it with: \
         UPDATE_OPENAPI=1 cargo test --test api openapi"
    );
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/tokens", "get"),
        ("/v1/tokens", "delete"),
        ("/ext/get-user-token", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
}
