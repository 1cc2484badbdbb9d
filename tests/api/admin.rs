//! The admin listener: health, readiness, metrics.

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness_are_200_while_serving() {
    let app = TestApp::spawn().await;

    assert_eq!(app.admin_get("/healthz").await.0, 200);
    assert_eq!(app.admin_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn metrics_use_the_spec_names_and_no_personal_data() {
    let app = TestApp::spawn().await;
    app.get_token(&member_query(ALICE, "AGENT")).await;
    app.get_token(&format!("user_id={CUSTOMER_ID}")).await;
    app.get_token(&member_query("nobody@example.com", "AGENT"))
        .await;

    let (status, text) = app.admin_get("/metrics").await;

    assert_eq!(status, 200);
    for name in [
        "token_broker_http_requests_total{",
        "token_broker_http_request_duration_seconds_bucket{",
        "token_broker_cache_lookups_total{result=\"hit\"}",
        "token_broker_cache_lookups_total{result=\"miss\"}",
        "token_broker_cache_entries ",
        "token_broker_upstream_requests_total{outcome=",
        "token_broker_upstream_request_duration_seconds_bucket{",
        "token_broker_client_requests_total{client=\"reader\"",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    for private in [
        ALICE,
        "nobody",
        CUSTOMER_ID,
        ALICE_AGENT_TOKEN,
        CUSTOMER_TOKEN,
        PARTNER_KEY,
        READER_KEY,
    ] {
        assert!(!text.contains(private), "metrics leak {private}");
    }
}

#[tokio::test]
async fn the_admin_listener_does_not_serve_tokens() {
    let app = TestApp::spawn().await;

    let (status, _) = app
        .admin_get(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT")))
        .await;

    assert_eq!(status, 404);
}

#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
    let app = TestApp::spawn().await;
    app.get_token(&member_query(ALICE, "AGENT")).await;
    let url = format!("http://{}/metrics", app.admin);

    let plain = app.http.get(&url).send().await.unwrap();
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = plain.text().await.unwrap();
    assert!(!text.contains("# EOF"));
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let kind = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| std::mem::discriminant(&s.value))
    };
    let counter = std::mem::discriminant(&prometheus_parse::Value::Counter(0.0));
    assert_eq!(kind("token_broker_cache_lookups_total"), Some(counter));
    assert_eq!(kind("token_broker_http_requests_total"), Some(counter));
    assert!(matches!(
        scrape
            .samples
            .iter()
            .find(|s| s.metric == "token_broker_http_request_duration_seconds")
            .map(|s| &s.value),
        Some(prometheus_parse::Value::Histogram(_))
    ));
    assert!(scrape.docs.contains_key("token_broker_cache_lookups_total"));

    let open = app
        .http
        .get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        open.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = open.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE token_broker_cache_lookups counter"));
}
