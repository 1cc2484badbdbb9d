//! Handing out tokens: both endpoints, both identities, the cache.

use std::sync::Arc;

use crate::helpers::*;
use std::time::Duration;

use token_broker::domain::UserType;

#[tokio::test]
async fn a_team_member_token_is_returned_with_cache_headers() {
    let app = TestApp::spawn().await;

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["x-cache"], "miss");
    let age: u64 = response.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age <= 2, "just fetched, Age {age}");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"email": ALICE, "type": "AGENT", "token": ALICE_AGENT_TOKEN, "active": true})
    );
}

#[tokio::test]
async fn a_customer_token_is_returned_by_user_id() {
    let app = TestApp::spawn().await;

    let response = app.get_token(&format!("user_id={CUSTOMER_ID}")).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"user_id": CUSTOMER_ID, "token": CUSTOMER_TOKEN, "active": true})
    );
}

#[tokio::test]
async fn the_drop_in_route_answers_like_the_vendor_for_both_identities() {
    let app = TestApp::spawn().await;

    let member = app
        .get_vendor_token(&member_query(ALICE, "CUSTOM_USER"))
        .await;
    let customer = app.get_vendor_token(&format!("userId={CUSTOMER_ID}")).await;

    for (response, token) in [(member, ALICE_CUSTOM_TOKEN), (customer, CUSTOMER_TOKEN)] {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert!(response.headers().contains_key("x-cache"));
        let text = response.text().await.unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"success":true,"message":"","data":{{"permanentToken":{{"key":"{token}","active":true}}}},"code":200}}"#
            )
        );
    }
}

#[tokio::test]
async fn the_drop_in_route_passes_an_inactive_token_through() {
    let app = TestApp::spawn().await;

    let response = app.get_vendor_token(&member_query(INACTIVE, "AGENT")).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["data"]["permanentToken"]["active"], false);
    assert_eq!(body["data"]["permanentToken"]["key"], INACTIVE_TOKEN);
}

#[tokio::test]
async fn the_vendor_receives_the_partner_key_headers_and_exact_encoding() {
    let app = TestApp::spawn().await;
    let tricky = [
        "a+b@example.com",
        "o'neil@example.com",
        "100%sure@example.com",
    ];
    for email in tricky {
        app.sim
            .add_team_member(email, UserType::Agent, "tok-tricky");
    }

    for email in tricky {
        let response = app.get_token(&member_query(email, "agent")).await;
        assert_eq!(response.status(), 200, "{email}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["email"], email);
    }
    app.get_token(&format!("user_id={CUSTOMER_ID}")).await;

    let seen = app.sim.requests();
    assert_eq!(seen.len(), 4);
    for (request, email) in seen.iter().zip(tricky) {
        assert_eq!(
            request.authorization.as_deref(),
            Some(&*format!("Bearer {PARTNER_KEY}"))
        );
        assert_eq!(request.authtype.as_deref(), Some("Key"));
        assert_eq!(
            request.params,
            vec![
                ("email".to_owned(), email.to_owned()),
                ("type".to_owned(), "AGENT".to_owned())
            ]
        );
    }
    assert!(seen[0].raw_query.starts_with("email=a%2Bb%40example.com&"));
    assert_eq!(
        seen[3].params,
        vec![("userId".to_owned(), CUSTOMER_ID.to_owned())]
    );
}

#[tokio::test]
async fn a_literal_plus_in_the_callers_query_reaches_the_vendor_as_a_plus() {
    let app = TestApp::spawn().await;
    app.sim
        .add_team_member("a+b@example.com", UserType::Agent, "tok-plus");

    let response = app.get_token("email=a+b@example.com&type=AGENT").await;

    assert_eq!(response.status(), 200);
    assert_eq!(app.sim.requests()[0].params[0].1, "a+b@example.com");
}

#[tokio::test]
async fn a_second_request_is_served_from_the_cache() {
    let app = TestApp::spawn().await;
    let query = member_query(ALICE, "AGENT");

    app.get_token(&query).await;
    let second = app.get_token(&query).await;
    let drop_in = app.get_vendor_token(&query).await;

    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-cache"], "hit");
    assert_eq!(drop_in.headers()["x-cache"], "hit");
    assert_eq!(app.sim.calls(), 1);
    assert_eq!(
        app.metric(r#"token_broker_cache_lookups_total{result="hit"}"#)
            .await,
        2.0
    );
    assert_eq!(
        app.metric(r#"token_broker_cache_lookups_total{result="miss"}"#)
            .await,
        1.0
    );
    assert_eq!(app.metric("token_broker_cache_entries").await, 1.0);
}

#[tokio::test]
async fn the_email_domain_is_case_insensitive_for_the_cache() {
    let app = TestApp::spawn().await;

    app.get_token(&member_query("alice@EXAMPLE.com", "AGENT"))
        .await;
    let second = app
        .get_token(&member_query("alice@example.COM", "agent"))
        .await;

    assert_eq!(second.headers()["x-cache"], "hit");
    assert_eq!(app.sim.calls(), 1);
}

#[tokio::test]
async fn two_types_of_one_email_stay_apart() {
    let app = TestApp::spawn().await;

    let agent: serde_json::Value = app
        .get_token(&member_query(ALICE, "AGENT"))
        .await
        .json()
        .await
        .unwrap();
    let custom: serde_json::Value = app
        .get_token(&member_query(ALICE, "CUSTOM_USER"))
        .await
        .json()
        .await
        .unwrap();
    let agent_again: serde_json::Value = app
        .get_token(&member_query(ALICE, "AGENT"))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(agent["token"], ALICE_AGENT_TOKEN);
    assert_eq!(custom["token"], ALICE_CUSTOM_TOKEN);
    assert_eq!(agent_again["token"], ALICE_AGENT_TOKEN);
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_exactly_one_upstream_call() {
    let app = Arc::new(TestApp::spawn().await);
    app.sim.set_latency(std::time::Duration::from_millis(200));
    let query = member_query(ALICE, "AGENT");

    let requests: Vec<_> = (0..100)
        .map(|_| {
            let app = app.clone();
            let query = query.clone();
            tokio::spawn(async move { app.get_token(&query).await.status().as_u16() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }

    assert_eq!(app.sim.calls(), 1);
}

#[tokio::test]
async fn an_inactive_token_is_a_409_and_never_cached() {
    let app = TestApp::spawn().await;
    let query = member_query(INACTIVE, "AGENT");

    let first = app.get_token(&query).await;
    let body = problem(first, 409).await;
    app.get_token(&query).await;

    assert_eq!(body["type"], "urn:token-broker:problem:token-inactive");
    assert!(!body.to_string().contains(INACTIVE_TOKEN));
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test]
async fn delete_makes_the_next_read_go_upstream() {
    let app = TestApp::spawn().await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;

    let deleted = app.delete_token_as(Some(INVALIDATOR_KEY), &query).await;
    let after = app.get_token(&query).await;

    assert_eq!(deleted.status(), 204);
    assert_eq!(after.headers()["x-cache"], "miss");
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_slow_fetch_keeps_its_answer_out_of_the_cache() {
    let app = TestApp::spawn().await;
    let query = member_query(ALICE, "AGENT");
    app.sim.set_latency(Duration::from_secs(1));
    let delete = async {
        // Once the fetch has reached the vendor, during its one second there.
        while app.sim.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        app.delete_token_as(Some(INVALIDATOR_KEY), &query).await
    };
    let (fetched, deleted) = tokio::join!(app.get_token(&query), delete);
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        fetched.status(),
        200,
        "the caller already waiting still gets its answer"
    );

    app.sim.set_latency(Duration::ZERO);
    app.sim
        .add_team_member(ALICE, UserType::Agent, "tok-alice-after-delete");
    let after = app.get_token(&query).await;
    assert_eq!(after.headers()["x-cache"], "miss");
    let body: serde_json::Value = after.json().await.unwrap();
    assert_eq!(body["token"], "tok-alice-after-delete");
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test]
async fn the_caller_request_id_is_returned_and_one_is_generated_otherwise() {
    let app = TestApp::spawn().await;

    let given = app
        .http
        .get(app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))))
        .bearer_auth(READER_KEY)
        .header("x-request-id", "req-42.abc")
        .send()
        .await
        .unwrap();
    let generated = app.get_token(&member_query(ALICE, "AGENT")).await;
    let too_long = "x".repeat(200);
    let mut hostile = Vec::new();
    for id in ["has space", "quote\"s", too_long.as_str()] {
        let response = app
            .http
            .get(app.url("/nowhere"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        hostile.push((id, response.headers()["x-request-id"].clone()));
    }

    assert_eq!(given.headers()["x-request-id"], "req-42.abc");
    assert_eq!(generated.headers()["x-request-id"].len(), 36);
    for (sent, returned) in hostile {
        assert_ne!(returned, sent, "an unsafe request id is replaced");
        assert_eq!(returned.len(), 36);
    }
}

#[tokio::test]
async fn client_requests_are_counted_per_caller_and_result() {
    let app = TestApp::spawn().await;

    app.get_token(&member_query(ALICE, "AGENT")).await;
    app.get_token_as(Some(TEAM_ONLY_KEY), &format!("user_id={CUSTOMER_ID}"))
        .await;

    assert_eq!(
        app.metric(r#"token_broker_client_requests_total{client="reader",result="ok"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"token_broker_client_requests_total{client="team-only",result="forbidden"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"token_broker_http_requests_total{route="/v1/tokens",status="200"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="ok"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric("token_broker_upstream_request_duration_seconds_count")
            .await,
        1.0
    );
}

/// A broker whose `no-cache` answers may be 300 ms old.
/// An app with a 300 ms revalidation interval, and Alice's agent token cached
/// longer ago than that; with her query.
async fn alice_cached_past_the_interval() -> (TestApp, String) {
    let app = TestApp::builder()
        .config("[cache]\nrevalidate_min_interval = \"300ms\"\n")
        .spawn()
        .await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    (app, query)
}

async fn get_no_cache(app: &TestApp, query: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/v1/tokens?{query}")))
        .bearer_auth(READER_KEY)
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap()
}

async fn token_and_cache(response: reqwest::Response) -> (String, String) {
    assert_eq!(response.status(), 200);
    let cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    (body["token"].as_str().unwrap().to_owned(), cache)
}

#[tokio::test]
async fn no_cache_fetches_anew_where_a_plain_get_keeps_the_cached_token() {
    let (app, query) = alice_cached_past_the_interval().await;
    app.sim
        .add_team_member(ALICE, UserType::Agent, "tok-alice-regenerated");

    let plain = token_and_cache(app.get_token(&query).await).await;
    let fresh = token_and_cache(get_no_cache(&app, &query).await).await;
    let max_age_zero = app
        .http
        .get(app.url(&format!("/ext/get-user-token?{query}")))
        .bearer_auth(READER_KEY)
        .header("cache-control", "max-age=0")
        .send()
        .await
        .unwrap();
    let after = token_and_cache(app.get_token(&query).await).await;

    assert_eq!(plain, (ALICE_AGENT_TOKEN.into(), "hit".into()));
    assert_eq!(fresh, ("tok-alice-regenerated".into(), "miss".into()));
    assert_eq!(
        max_age_zero.headers()["x-cache"],
        "hit",
        "within the interval the recent answer is returned"
    );
    let age: u64 = max_age_zero.headers()["age"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(age, 0);
    assert_eq!(after, ("tok-alice-regenerated".into(), "hit".into()));
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_no_cache_requests_share_one_vendor_call() {
    let (app, query) = alice_cached_past_the_interval().await;
    app.sim.set_latency(Duration::from_millis(200));

    let answers = futures::future::join_all((0..50).map(|_| get_no_cache(&app, &query))).await;

    for answer in answers {
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(app.sim.calls(), 2, "one revalidation for 50 callers");
}

#[tokio::test]
async fn a_no_cache_get_of_a_now_inactive_token_is_a_409_and_drops_the_entry() {
    let (app, query) = alice_cached_past_the_interval().await;
    app.sim
        .add_inactive_team_member(ALICE, UserType::Agent, ALICE_AGENT_TOKEN);

    problem(get_no_cache(&app, &query).await, 409).await;
    let next = app.get_token(&query).await;

    problem(next, 409).await;
    assert_eq!(app.sim.calls(), 3, "the next plain GET asked the vendor");
}

#[tokio::test]
async fn a_simulator_answering_any_user_gives_made_up_identities_a_token_of_their_own() {
    let app = TestApp::spawn().await;
    let stranger = member_query("nobody@example.org", "AGENT");
    assert_eq!(
        app.get_token(&stranger).await.status(),
        404,
        "not by default"
    );

    app.sim.set_any_user(true);
    let mut tokens = Vec::new();
    for query in [
        member_query("somebody@example.org", "AGENT"),
        member_query("somebody@example.org", "CUSTOMER"),
        "user_id=made-up-1".to_owned(),
    ] {
        let response = app.get_token(&query).await;
        assert_eq!(response.status(), 200, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["active"], true);
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "each identity its own token: {tokens:?}");
    let known = app.get_token(&member_query(ALICE, "AGENT")).await;
    let body: serde_json::Value = known.json().await.unwrap();
    assert_eq!(body["token"], ALICE_AGENT_TOKEN, "known users keep theirs");
}
