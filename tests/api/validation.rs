//! Every 400 rule of the input rules, and other refusals before the vendor is asked.

use crate::helpers::*;

async fn assert_bad_request(app: &TestApp, path_and_query: &str, names: &str) {
    let response = app
        .send(reqwest::Method::GET, Some(READER_KEY), path_and_query)
        .await;
    let body = problem(response, 400).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains(names),
        "{path_and_query}: detail {detail:?} should name {names:?}"
    );
}

#[tokio::test]
async fn missing_parameters_are_400s_naming_what_is_required() {
    let app = TestApp::spawn().await;
    assert_bad_request(&app, "/v1/tokens", "email and type").await;
    assert_bad_request(&app, "/v1/tokens?email=a%40example.com", "type").await;
    assert_bad_request(&app, "/v1/tokens?type=AGENT", "email").await;
    assert_bad_request(&app, "/ext/get-user-token", "userId").await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn repeated_and_unknown_parameters_are_400s() {
    let app = TestApp::spawn().await;
    let q = member_query(ALICE, "AGENT");
    assert_bad_request(
        &app,
        &format!("/v1/tokens?{q}&email=b%40example.com"),
        "email",
    )
    .await;
    assert_bad_request(&app, &format!("/v1/tokens?{q}&type=AGENT"), "type").await;
    assert_bad_request(
        &app,
        &format!("/v1/tokens?{q}&debug=1"),
        "debug: is an unknown query parameter",
    )
    .await;
    assert_bad_request(&app, "/v1/tokens?user_id=a&user_id=b", "user_id").await;
    assert_bad_request(&app, "/v1/tokens?userId=abc", "userId: is an unknown").await;
    assert_bad_request(
        &app,
        "/ext/get-user-token?user_id=abc",
        "user_id: is an unknown",
    )
    .await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn malformed_emails_are_400s_naming_email() {
    let app = TestApp::spawn().await;
    let too_long = format!("{}@example.com", "a".repeat(243));
    assert_eq!(too_long.len(), 255);
    for email in [
        too_long.as_str(),
        "no-at-sign.example.com",
        "two@@example.com",
        "@example.com",
        "a@localhost",
        "line\nbreak@example.com",
        "tab\t@example.com",
        "nul\0@example.com",
    ] {
        assert_bad_request(
            &app,
            &format!("/v1/tokens?{}", member_query(email, "AGENT")),
            "email",
        )
        .await;
    }
    assert_bad_request(
        &app,
        "/v1/tokens?email=a%20b%40example.com&type=AGENT",
        "email",
    )
    .await;
    assert_bad_request(
        &app,
        "/v1/tokens?email=%FF%FE%40example.com&type=AGENT",
        "email",
    )
    .await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn a_254_byte_email_is_accepted() {
    let app = TestApp::spawn().await;
    let longest = format!("{}@example.com", "a".repeat(242));
    assert_eq!(longest.len(), 254);

    let response = app.get_token(&member_query(&longest, "AGENT")).await;

    assert_eq!(
        response.status(),
        404,
        "valid input reaches the vendor, which does not know it"
    );
}

#[tokio::test]
async fn a_bad_type_is_a_400_listing_the_allowed_values() {
    let app = TestApp::spawn().await;
    for t in ["ADMIN", "", "AGENTS", "agent%00"] {
        assert_bad_request(
            &app,
            &format!("/v1/tokens?email=a%40example.com&type={t}"),
            "AGENT, CUSTOM_USER, CUSTOMER",
        )
        .await;
    }
}

#[tokio::test]
async fn both_identity_forms_together_are_a_400() {
    let app = TestApp::spawn().await;
    let q = member_query(ALICE, "AGENT");
    assert_bad_request(
        &app,
        &format!("/v1/tokens?{q}&user_id={CUSTOMER_ID}"),
        "not both",
    )
    .await;
    assert_bad_request(
        &app,
        &format!("/ext/get-user-token?{q}&userId={CUSTOMER_ID}"),
        "not both",
    )
    .await;
    assert_bad_request(
        &app,
        &format!("/v1/tokens?email=a%40example.com&user_id={CUSTOMER_ID}"),
        "not both",
    )
    .await;
}

#[tokio::test]
async fn malformed_user_ids_are_400s_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(65);
    for id in ["", "has%20space", "slash%2Fid", "%C3%BC", long.as_str()] {
        assert_bad_request(&app, &format!("/v1/tokens?user_id={id}"), "user_id").await;
        assert_bad_request(&app, &format!("/ext/get-user-token?userId={id}"), "userId").await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::spawn().await;

    let missing = app
        .send(reqwest::Method::GET, Some(READER_KEY), "/v2/tokens")
        .await;
    let method = app
        .send(reqwest::Method::POST, Some(READER_KEY), "/v1/tokens")
        .await;

    problem(missing, 404).await;
    problem(method, 405).await;
}

#[tokio::test]
async fn an_oversized_request_line_is_refused() {
    let app = TestApp::spawn().await;
    let padding = "a".repeat(9 * 1024);

    let response = app
        .send(
            reqwest::Method::GET,
            Some(READER_KEY),
            &format!("/v1/tokens?email={padding}%40x.com&type=AGENT"),
        )
        .await;

    problem(response, 414).await;
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn a_body_on_get_is_refused() {
    let app = TestApp::spawn().await;

    let response = app
        .http
        .get(app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))))
        .bearer_auth(READER_KEY)
        .body("unexpected")
        .send()
        .await
        .unwrap();

    let body = problem(response, 400).await;
    assert_eq!(body["type"], "urn:token-broker:problem:body-not-allowed");
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn an_address_smuggling_another_domain_is_a_400_that_never_reaches_the_vendor() {
    let restricted = format!(
        "[[clients]]\nname = \"corp-only\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nallowed_email_domains = [\"corp.com\"]\n",
        token_broker::config::KeyDigest::of_key(READER_KEY)
    );
    let app = TestApp::builder().config(&restricted).spawn().await;
    for smuggled in [
        "ceo@other.com|.corp.com",
        "ceo@other.com#.corp.com",
        "ceo@other.com?.corp.com",
        "ceo@other.com&x=.corp.com",
        "ceo@other.com/.corp.com",
        "ceo@other.com;.corp.com",
        "ceo@other.com,.corp.com",
        "ceo@other.com\\.corp.com",
        "ceo@*.corp.com",
        "ceo@other.com%.corp.com",
        "\"ceo@other.com\"@corp.com",
        "ceo@corp.com.",
    ] {
        let response = app.get_token(&member_query(smuggled, "AGENT")).await;
        let body = problem(response, 400).await;
        assert!(
            body["detail"].as_str().unwrap().starts_with("email:"),
            "{smuggled}: {body}"
        );
    }
    assert_eq!(app.sim.calls(), 0);
    for fine in ["a+b@corp.com", "o'neil@corp.com", "x@eu.corp.com"] {
        app.sim
            .add_team_member(fine, token_broker::domain::UserType::Agent, "tok-fine");
        assert_eq!(
            app.get_token(&member_query(fine, "AGENT")).await.status(),
            200,
            "{fine}"
        );
    }
}
