//! Caller authentication and scopes.

use crate::helpers::*;

#[tokio::test]
async fn a_request_without_a_key_is_a_401_with_www_authenticate() {
    let app = TestApp::spawn().await;

    let response = app.get_token_as(None, &member_query(ALICE, "AGENT")).await;

    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    problem(response, 401).await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn a_wrong_key_is_a_401_on_every_route() {
    let app = TestApp::spawn().await;
    let q = member_query(ALICE, "AGENT");

    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/tokens?{q}")),
        (reqwest::Method::GET, format!("/ext/get-user-token?{q}")),
        (reqwest::Method::DELETE, format!("/v1/tokens?{q}")),
    ] {
        let response = app.send(method, Some("not-a-known-key"), &path).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        problem(response, 401).await;
    }
    let partner_key_as_caller = app.get_token_as(Some(PARTNER_KEY), &q).await;
    problem(partner_key_as_caller, 401).await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn authentication_comes_before_input_validation() {
    let app = TestApp::spawn().await;

    let response = app.get_token_as(None, "garbage=1").await;

    problem(response, 401).await;
}

#[tokio::test]
async fn a_missing_scope_is_a_403_for_each_identity_form_and_for_delete() {
    let app = TestApp::spawn().await;
    let q = member_query(ALICE, "AGENT");

    let customer = app
        .get_token_as(Some(TEAM_ONLY_KEY), &format!("user_id={CUSTOMER_ID}"))
        .await;
    let member = app.get_token_as(Some(INVALIDATOR_KEY), &q).await;
    let delete = app.delete_token_as(Some(READER_KEY), &q).await;

    for (response, scope) in [
        (customer, "customer_tokens:read"),
        (member, "tokens:read"),
        (delete, "tokens:invalidate"),
    ] {
        let body = problem(response, 403).await;
        assert!(body["detail"].as_str().unwrap().contains(scope), "{body}");
    }
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn anonymous_callers_are_allowed_only_when_configured() {
    let app = TestApp::builder()
        .without_clients()
        .config("[auth]\nallow_anonymous = true\n")
        .spawn()
        .await;

    let anonymous = app.get_token_as(None, &member_query(ALICE, "AGENT")).await;
    let wrong_key = app
        .get_token_as(Some("wrong"), &member_query(ALICE, "AGENT"))
        .await;

    assert_eq!(anonymous.status(), 200);
    problem(wrong_key, 401).await;
    assert_eq!(
        app.metric(r#"token_broker_client_requests_total{client="anonymous",result="ok"}"#)
            .await,
        1.0
    );
}
