//! The promises a security and code review checked: addresses that are only
//! addresses, vendor answers that never reach the logs, audit events at any
//! level, no redirects, capped `Retry-After`, `HEAD` without a lookup, connect
//! timeouts that are retried, and a drain that really ends.

use std::net::SocketAddr;
use std::time::Duration;

use axum::response::Redirect;
use token_broker::simulator::Fault;
use tokio::time::Instant;

use crate::helpers::*;
use crate::process::{Running, audit_events, command, config_file, upstream};

#[tokio::test]
async fn an_address_smuggling_another_domain_is_a_400_that_never_reaches_the_vendor() {
    let restricted = format!(
        "[[clients]]\nname = \"corp-only\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nallowed_email_domains = [\"corp.com\"]\n",
        token_broker::http::auth::key_sha256(READER_KEY)
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

#[tokio::test]
async fn a_malformed_vendor_body_carrying_a_token_never_reaches_the_logs() {
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config_file(&dir, upstream, "[log]\nlevel = \"trace\"\n"));
    let mut broker = Running::start(cmd).await;
    let http = reqwest::Client::new();
    for body in [
        r#"{"success":true,"code":200,"data":{"permanentToken":{"key":"tok-leaky-1","active":"tok-leaky-2"}}}"#,
        r#"{"success":"tok-leaky-3","code":200}"#,
        r#"{"success":true,"code":200,"data":{"permanentToken":{"key":"tok-leaky-4","active":true}}} tok-leaky-5"#,
        r#"{"data":{"permanentToken":{"key":["tok-leaky-6"]}}}"#,
    ] {
        sim.set_fault(Fault::Body(body));
        let response = http
            .get(format!(
                "http://{}/v1/tokens?{}",
                broker.api,
                member_query(ALICE, "AGENT")
            ))
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502, "{body}");
        assert!(!response.text().await.unwrap().contains("tok-leaky"));
    }
    broker.stop().await;
    let output = broker.output();
    assert!(output.contains("unusable body"), "the failure is logged");
    assert!(!output.contains("tok-leaky"), "{output}");
}

#[tokio::test]
async fn audit_events_are_written_whatever_the_log_level_and_head_writes_none() {
    for level in ["warn", "token_broker=debug", "error"] {
        let (sim, upstream) = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = command();
        cmd.arg("--config").arg(config_file(
            &dir,
            upstream,
            &format!("[log]\nlevel = \"{level}\"\n"),
        ));
        let mut broker = Running::start_quiet(cmd).await;
        let http = reqwest::Client::new();
        let url = format!(
            "http://{}/v1/tokens?{}",
            broker.api,
            member_query(ALICE, "AGENT")
        );
        let got = http.get(&url).bearer_auth(READER_KEY).send().await.unwrap();
        assert_eq!(got.status(), 200);
        let head = http
            .head(&url)
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 405, "HEAD is refused on a token route");
        let vendor_head = http
            .head(format!(
                "http://{}/ext/get-user-token?userId={CUSTOMER_ID}",
                broker.api
            ))
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(vendor_head.status(), 405);
        broker.stop().await;

        let audit = audit_events(&broker.output());
        assert_eq!(audit.len(), 1, "level {level}: {audit:?}");
        assert_eq!(audit[0]["outcome"], "issued");
        assert_eq!(audit[0]["caller"], "reader");
        assert_eq!(sim.calls(), 1, "HEAD made no vendor call");
    }
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

#[tokio::test]
async fn a_retry_after_of_an_hour_reaches_the_caller_as_at_most_a_minute() {
    let app = TestApp::builder()
        .config("[upstream]\nmax_retries = 0\n")
        .spawn()
        .await;
    app.sim.set_fault(Fault::StatusRetryAfter(503, 3600));

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    assert_eq!(response.headers()["retry-after"], "60");
    problem(response, 503).await;
}

#[tokio::test]
async fn a_connect_timeout_is_a_retried_connect_error_not_a_504() {
    // A listener whose backlog is full: further SYNs are dropped, so connecting
    // hangs, as with a vendor behind a packet-dropping firewall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match attempt {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    let app = TestApp::builder()
        .config(&format!(
            "[upstream]\nbase_url = \"http://{addr}\"\nconnect_timeout = \"200ms\"\ntimeout = \"5s\"\n"
        ))
        .spawn()
        .await;

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    problem(response, 503).await;
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="connect_error"}"#)
            .await,
        3.0,
        "each attempt is a connect error, retried max_retries (2) times"
    );
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="timeout"}"#)
            .await,
        0.0
    );
    drop((full, fillers));
}

#[tokio::test]
async fn a_request_hanging_past_the_grace_is_cut_and_the_process_exits_on_time() {
    let (sim, upstream) = upstream().await;
    sim.set_fault(Fault::Hang);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config_file(&dir, upstream, ""))
        .env("TOKEN_BROKER__SERVER__SHUTDOWN_GRACE", "1s")
        .env("TOKEN_BROKER__UPSTREAM__TIMEOUT", "60s");
    let mut broker = Running::start(cmd).await;
    let url = format!(
        "http://{}/v1/tokens?{}",
        broker.api,
        member_query(ALICE, "AGENT")
    );
    let hanging = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(READER_KEY)
            .send()
            .await
    });
    while sim.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    broker.terminate();
    let code = broker.wait().await;

    assert_eq!(code, 0, "{}", broker.output());
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "exited after the 1 s grace, not after the 60 s vendor timeout"
    );
    assert!(
        hanging.await.unwrap().is_err(),
        "the hanging request's connection was closed"
    );
    assert!(broker.output().contains("closing remaining connections"));
}
