//! What callers get when the vendor says no, misbehaves or hangs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::response::Redirect;
use token_broker::simulator::{Fault, NotFoundStyle};

use crate::helpers::process::{Running, command, config_file, upstream};
use crate::helpers::*;

#[tokio::test]
async fn an_unknown_user_is_a_404_in_both_vendor_shapes() {
    let app = TestApp::spawn().await;
    for (n, style) in [NotFoundStyle::HttpStatus, NotFoundStyle::BodyCode]
        .into_iter()
        .enumerate()
    {
        app.sim.set_not_found_style(style);

        let member = app
            .get_token(&member_query(&format!("nobody{n}@example.com"), "AGENT"))
            .await;
        let customer = app
            .get_vendor_token(&format!("userId=unknown_customer_{n}"))
            .await;

        let body = problem(member, 404).await;
        assert_eq!(body["type"], "urn:token-broker:problem:user-not-found");
        problem(customer, 404).await;
    }
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="not_found"}"#)
            .await,
        4.0
    );
}

#[tokio::test]
async fn a_malformed_vendor_body_is_a_502_that_does_not_echo_it() {
    let app = TestApp::spawn().await;
    app.sim.set_fault(Fault::Malformed);

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    let body = problem(response, 502).await;
    assert_eq!(
        body["type"],
        "urn:token-broker:problem:upstream-bad-response"
    );
    assert!(!body.to_string().contains("html"));
}

#[tokio::test]
async fn a_vendor_rejecting_the_partner_key_is_a_502() {
    let app = TestApp::spawn().await;
    app.sim.set_partner_key("rotated-elsewhere");

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    let body = problem(response, 502).await;
    assert!(!body.to_string().contains(PARTNER_KEY));
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="rejected"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_success_false_body_code_is_treated_as_the_status() {
    let app = TestApp::spawn().await;
    app.sim.set_fault(Fault::BodyCode(401));

    let rejected = app.get_token(&member_query(ALICE, "AGENT")).await;
    app.sim.set_fault(Fault::BodyCode(503));
    let unavailable = app.get_token(&member_query(ALICE, "AGENT")).await;

    problem(rejected, 502).await;
    assert!(unavailable.headers().contains_key("retry-after"));
    problem(unavailable, 503).await;
}

#[tokio::test]
async fn a_vendor_5xx_is_a_503_with_retry_after() {
    let app = TestApp::spawn().await;
    app.sim.set_fault(Fault::Status(500));

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    assert!(
        response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    let body = problem(response, 503).await;
    assert_eq!(
        body["type"],
        "urn:token-broker:problem:upstream-unavailable"
    );
}

#[tokio::test]
async fn an_unreachable_vendor_is_a_503() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = unused.local_addr().unwrap();
    drop(unused);
    let app = TestApp::builder()
        .config(&format!("[upstream]\nbase_url = \"http://{closed}\"\n"))
        .spawn()
        .await;

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    problem(response, 503).await;
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="connect_error"}"#)
            .await,
        3.0,
        "connect errors are retried upstream.max_retries (2) times"
    );
}

#[tokio::test]
async fn a_hanging_vendor_is_a_504_once_the_timeout_passes() {
    let app = TestApp::builder()
        .config("[upstream]\ntimeout = \"400ms\"\n")
        .spawn()
        .await;
    app.sim.set_fault(Fault::Hang);

    let started = Instant::now();
    let response = app.get_token(&member_query(ALICE, "AGENT")).await;
    let elapsed = started.elapsed();

    let body = problem(response, 504).await;
    assert_eq!(body["type"], "urn:token-broker:problem:upstream-timeout");
    // The vendor never answers: only the 400 ms timeout ends the wait. The
    // upper bound leaves a loaded machine room; it is not a latency target.
    assert!(elapsed >= Duration::from_millis(400), "took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test]
async fn errors_are_not_cached() {
    let app = TestApp::spawn().await;
    app.sim.set_fault(Fault::Status(500));
    let query = member_query(ALICE, "AGENT");

    app.get_token(&query).await;
    app.sim.set_fault(Fault::None);
    let recovered = app.get_token(&query).await;

    assert_eq!(recovered.status(), 200);
    assert_eq!(recovered.headers()["x-cache"], "miss");
    assert_eq!(app.sim.calls(), 2);
}

#[tokio::test]
async fn no_error_body_contains_a_secret() {
    let app = TestApp::spawn().await;
    let q = member_query(ALICE, "AGENT");
    app.get_token(&q).await;
    let mut bodies = Vec::new();
    for fault in [
        Fault::Malformed,
        Fault::Status(401),
        Fault::Status(500),
        Fault::BodyCode(404),
    ] {
        app.sim.set_fault(fault);
        let response = app.get_token(&member_query(INACTIVE, "AGENT")).await;
        bodies.push(response.text().await.unwrap());
    }
    app.sim.set_fault(Fault::None);
    bodies.push(
        app.get_token(&member_query(INACTIVE, "AGENT"))
            .await
            .text()
            .await
            .unwrap(),
    );
    bodies.push(
        app.get_token_as(Some("wrong"), &q)
            .await
            .text()
            .await
            .unwrap(),
    );

    for body in bodies {
        for secret in [
            PARTNER_KEY,
            ALICE_AGENT_TOKEN,
            INACTIVE_TOKEN,
            READER_KEY,
            INACTIVE,
        ] {
            assert!(!body.contains(secret), "{body} leaks {secret}");
        }
    }
}

#[tokio::test]
async fn a_malformed_vendor_body_carrying_a_token_never_reaches_the_logs() {
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config_file(&dir, upstream, "[log]\nlevel = \"trace\"\n"));
    let mut broker = Running::start(cmd).await;
    for body in [
        r#"{"success":true,"code":200,"data":{"permanentToken":{"key":"tok-leaky-1","active":"tok-leaky-2"}}}"#,
        r#"{"success":"tok-leaky-3","code":200}"#,
        r#"{"success":true,"code":200,"data":{"permanentToken":{"key":"tok-leaky-4","active":true}}} tok-leaky-5"#,
        r#"{"data":{"permanentToken":{"key":["tok-leaky-6"]}}}"#,
    ] {
        sim.set_fault(Fault::Body(body));
        let response = broker
            .get_token(&member_query(ALICE, "AGENT"), READER_KEY)
            .await;
        assert_eq!(response.status(), 502, "{body}");
        assert!(!response.text().await.unwrap().contains("tok-leaky"));
    }
    broker.stop().await;
    let output = broker.output();
    assert!(output.contains("unusable body"), "the failure is logged");
    assert!(!output.contains("tok-leaky"), "{output}");
}

#[tokio::test]
async fn a_vendor_redirect_is_a_502_and_is_never_followed() {
    let sim = simulator();
    let target = sim
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let redirector = axum::Router::new().fallback(move || async move {
        Redirect::temporary(&format!("http://{target}/ext/get-user-token?userId=x"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirecting = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, redirector).await });

    let app = TestApp::builder()
        .config(&format!(
            "[upstream]\nbase_url = \"http://{redirecting}\"\n"
        ))
        .spawn()
        .await;
    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    problem(response, 502).await;
    assert_eq!(
        sim.calls(),
        0,
        "the redirect target never saw the partner key"
    );
}
