//! Who may get which token: types, email domains, scopes, rate limits.

use std::time::Duration;

use crate::helpers::*;
use token_broker::config::KeyDigest;
use token_broker::domain::UserType;

const RESTRICTED_KEY: &str = "restricted-key-0123456789";
const LIMITED_KEY: &str = "limited-key-0123456789";

fn restricted_clients() -> String {
    format!(
        r#"
[[clients]]
name = "restricted"
key_sha256 = "{}"
scopes = ["tokens:read", "tokens:invalidate"]
allowed_types = ["AGENT"]
allowed_email_domains = ["example.com"]

[[clients]]
name = "limited"
key_sha256 = "{}"
scopes = ["tokens:read"]
rate_limit_per_minute = 60
"#,
        KeyDigest::of_key(RESTRICTED_KEY),
        KeyDigest::of_key(LIMITED_KEY)
    )
}

async fn restricted_app() -> TestApp {
    let app = TestApp::builder()
        .config(&format!("{}{}", clients_toml(), restricted_clients()))
        .spawn()
        .await;
    app.sim
        .add_team_member("bob@eu.example.com", UserType::Agent, "tok-bob-eu");
    app.sim
        .add_team_member("eve@badexample.com", UserType::Agent, "tok-eve");
    app
}

#[tokio::test]
async fn a_type_outside_allowed_types_is_a_403_naming_the_rule() {
    let app = restricted_app().await;

    let response = app
        .get_token_as(Some(RESTRICTED_KEY), &member_query(ALICE, "CUSTOM_USER"))
        .await;

    let body = problem(response, 403).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("type CUSTOM_USER"),
        "{body}"
    );
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn an_allowed_domain_admits_itself_and_its_subdomains() {
    let app = restricted_app().await;

    let own = app
        .get_token_as(Some(RESTRICTED_KEY), &member_query(ALICE, "AGENT"))
        .await;
    let sub = app
        .get_token_as(
            Some(RESTRICTED_KEY),
            &member_query("bob@EU.example.com", "AGENT"),
        )
        .await;

    assert_eq!(own.status(), 200);
    assert_eq!(sub.status(), 200);
}

#[tokio::test]
async fn a_look_alike_domain_is_a_403_that_does_not_echo_the_configuration() {
    let app = restricted_app().await;

    let response = app
        .get_token_as(
            Some(RESTRICTED_KEY),
            &member_query("eve@badexample.com", "AGENT"),
        )
        .await;

    let body = problem(response, 403).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("email domain"), "{detail}");
    assert!(!body.to_string().contains("example.com"), "{body}");
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn the_customer_form_needs_customer_tokens_read() {
    let app = restricted_app().await;

    let v1 = app
        .get_token_as(Some(RESTRICTED_KEY), &format!("user_id={CUSTOMER_ID}"))
        .await;
    let drop_in = app
        .send(
            reqwest::Method::GET,
            Some(RESTRICTED_KEY),
            &format!("/ext/get-user-token?userId={CUSTOMER_ID}"),
        )
        .await;

    for response in [v1, drop_in] {
        let body = problem(response, 403).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("customer_tokens:read")
        );
    }
}

#[tokio::test]
async fn delete_follows_the_same_type_and_domain_rules() {
    let app = restricted_app().await;

    let other_domain = app
        .delete_token_as(
            Some(RESTRICTED_KEY),
            &member_query("eve@badexample.com", "AGENT"),
        )
        .await;
    let other_type = app
        .delete_token_as(Some(RESTRICTED_KEY), &member_query(ALICE, "CUSTOMER"))
        .await;
    let allowed = app
        .delete_token_as(Some(RESTRICTED_KEY), &member_query(ALICE, "AGENT"))
        .await;

    problem(other_domain, 403).await;
    problem(other_type, 403).await;
    assert_eq!(allowed.status(), 204);
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_gets_429_with_retry_after_and_recovers() {
    let app = restricted_app().await;
    let query = member_query(ALICE, "AGENT");

    let mut admitted = 0;
    let limited = loop {
        let response = app.get_token_as(Some(LIMITED_KEY), &query).await;
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        admitted += 1;
        assert!(admitted <= 120, "the limit never applied");
    };
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = problem(limited, 429).await;
    let other_caller = app.get_token(&query).await;
    // One request a second comes back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let recovered = app.get_token_as(Some(LIMITED_KEY), &query).await;

    assert!(
        admitted >= 60,
        "a burst of rate_limit_per_minute is allowed, got {admitted}"
    );
    assert_eq!(retry_after, 1);
    assert_eq!(body["type"], "urn:token-broker:problem:rate-limited");
    assert_eq!(other_caller.status(), 200, "limits are per caller");
    assert_eq!(recovered.status(), 200);
    assert!(
        app.metric(r#"token_broker_client_requests_total{client="limited",result="rate_limited"}"#)
            .await
            >= 1.0
    );
}
