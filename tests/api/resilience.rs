//! Serving through vendor trouble without stampeding it: stale-if-error,
//! refresh-ahead, negative cache, retries, the circuit, the in-flight bound.
//! Timing logic is covered with tokio's paused clock in `broker` and
//! `upstream::resilience`; these tests check the same over HTTP with short
//! real durations.

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::*;
use token_broker::simulator::Fault;

const STALE_CONFIG: &str = "[cache]\nttl = \"150ms\"\nstale_if_error = \"10m\"\n[upstream]\nmax_retries = 0\ntimeout = \"300ms\"\n";

#[tokio::test]
async fn an_expired_token_is_served_stale_while_the_vendor_fails() {
    let app = TestApp::builder().config(STALE_CONFIG).spawn().await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut answers = Vec::new();
    for fault in [
        Fault::Status(503),
        Fault::Status(500),
        Fault::Malformed,
        Fault::Hang,
    ] {
        app.sim.set_fault(fault);
        let response = app.get_token(&query).await;
        assert_eq!(response.status(), 200, "{fault:?}");
        assert_eq!(response.headers()["cache-control"], "no-store");
        answers.push(response.headers()["x-cache"].to_str().unwrap().to_owned());
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["token"], ALICE_AGENT_TOKEN);
    }

    assert_eq!(answers, ["stale"; 4]);
    assert_eq!(
        app.metric(r#"token_broker_cache_lookups_total{result="stale"}"#)
            .await,
        4.0
    );
    assert_eq!(
        app.sim.calls(),
        5,
        "every stale answer tried the vendor once"
    );
}

#[tokio::test]
async fn nothing_stale_is_served_past_ttl_plus_stale_if_error() {
    let app = TestApp::builder()
        .config(
            "[cache]\nttl = \"100ms\"\nstale_if_error = \"100ms\"\n[upstream]\nmax_retries = 0\n",
        )
        .spawn()
        .await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    app.sim.set_fault(Fault::Status(503));

    let response = app.get_token(&query).await;

    assert!(response.headers().contains_key("retry-after"));
    problem(response, 503).await;
    assert_eq!(
        app.metric(r#"token_broker_cache_lookups_total{result="stale"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_definitive_no_from_the_vendor_is_not_masked_by_a_stale_token() {
    let app = TestApp::builder().config(STALE_CONFIG).spawn().await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.sim.set_fault(Fault::BodyCode(404));

    let response = app.get_token(&query).await;

    problem(response, 404).await;
}

#[tokio::test]
async fn a_hit_past_refresh_ahead_is_answered_at_once_and_refreshed_in_the_background() {
    let app = TestApp::builder()
        .config("[cache]\nttl = \"20s\"\nrefresh_ahead = 0.1\n[upstream]\ntimeout = \"10s\"\n")
        .spawn()
        .await;
    let query = member_query(ALICE, "AGENT");
    let first_fetch = std::time::Instant::now();
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Slower than any plausible stall, so "still in flight" means "not waited for".
    app.sim.set_latency(Duration::from_secs(5));

    let hits = futures::future::join_all((0..20).map(|_| app.get_token(&query))).await;

    for hit in &hits {
        assert_eq!(hit.headers()["x-cache"], "hit");
    }
    assert_eq!(
        app.sim.in_flight(),
        1,
        "every hit was answered while the refresh was still at the vendor"
    );
    while app.sim.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.sim.calls(), 2, "one background refresh");
    let after = app.get_token(&query).await;
    assert_eq!(after.headers()["x-cache"], "hit");
    let age: u64 = after.headers()["age"].to_str().unwrap().parse().unwrap();
    // The first token is as old as the test; the refreshed one was stored
    // at least 2.1 s later.
    let elapsed = first_fetch.elapsed().as_secs();
    assert!(
        age + 2 <= elapsed,
        "the refreshed token: Age {age} after {elapsed} s"
    );
}

#[tokio::test]
async fn an_unknown_user_is_remembered_for_negative_ttl() {
    let app = TestApp::builder()
        // Long enough that the first two requests fall inside it on any machine.
        .config("[cache]\nnegative_ttl = \"2s\"\n")
        .spawn()
        .await;
    let query = member_query("ghost@example.com", "AGENT");

    problem(app.get_token(&query).await, 404).await;
    problem(app.get_token(&query).await, 404).await;
    let remembered_calls = app.sim.calls();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    problem(app.get_token(&query).await, 404).await;

    assert_eq!(remembered_calls, 1);
    assert_eq!(app.sim.calls(), 2, "asked again once negative_ttl passed");
    assert_eq!(
        app.metric(r#"token_broker_cache_lookups_total{result="negative"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn retries_happen_only_for_connect_errors_429_502_503_504() {
    let app = TestApp::builder()
        .config("[upstream]\nmax_retries = 2\ncircuit_failures = 100\n")
        .spawn()
        .await;
    let mut seen = Vec::new();
    for (n, status) in [429u16, 502, 503, 504, 500, 400, 401, 403, 404]
        .into_iter()
        .enumerate()
    {
        app.sim.set_fault(Fault::Status(status));
        let before = app.sim.calls();
        let response = app
            .get_token(&member_query(&format!("user{n}@example.com"), "AGENT"))
            .await;
        assert!(response.status().is_client_error() || response.status().is_server_error());
        seen.push((status, app.sim.calls() - before));
    }

    assert_eq!(
        seen,
        [
            (429, 3),
            (502, 3),
            (503, 3),
            (504, 3),
            (500, 1),
            (400, 1),
            (401, 1),
            (403, 1),
            (404, 1)
        ]
    );
    assert_eq!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="unavailable"}"#)
            .await,
        13.0
    );
}

#[tokio::test]
async fn the_vendors_retry_after_reaches_the_caller() {
    let app = TestApp::builder()
        .config("[upstream]\nmax_retries = 0\n")
        .spawn()
        .await;
    app.sim.set_fault(Fault::StatusRetryAfter(503, 30));

    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    assert_eq!(response.headers()["retry-after"], "30");
    problem(response, 503).await;
}

#[tokio::test]
async fn the_circuit_opens_fails_fast_then_lets_one_probe_close_it() {
    let app = TestApp::builder()
        .config("[upstream]\nmax_retries = 0\ncircuit_failures = 2\ncircuit_cooldown = \"3s\"\n")
        .spawn()
        .await;
    app.sim.set_fault(Fault::Status(503));
    let query = member_query(ALICE, "AGENT");

    problem(app.get_token(&query).await, 503).await;
    problem(app.get_token(&query).await, 503).await;
    let open = app.get_token(&query).await;
    let retry_after = open.headers()["retry-after"].to_str().unwrap().to_owned();
    let body = problem(open, 503).await;
    let calls_while_open = app.sim.calls();
    let gauge_open = app.metric("token_broker_upstream_circuit_open").await;
    let ready_while_open = app.admin_get("/readyz").await.0;

    app.sim.set_fault(Fault::None);
    // Asked again until the cooldown is over: every refusal is made without
    // the vendor, and the first request after it is the one probe.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let probe = loop {
        let response = app.get_token(&query).await;
        if response.status() != 503 || tokio::time::Instant::now() > deadline {
            break response;
        }
        assert_eq!(
            app.sim.calls(),
            2,
            "a vendor call while the circuit was open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(
        body["type"],
        "urn:token-broker:problem:upstream-unavailable"
    );
    assert!(
        ["1", "2", "3"].contains(&retry_after.as_str()),
        "the rest of the cooldown, rounded up: {retry_after}"
    );
    assert_eq!(
        calls_while_open, 2,
        "no vendor call while the circuit is open"
    );
    assert_eq!(gauge_open, 1.0);
    assert_eq!(
        ready_while_open, 200,
        "an open circuit does not make the broker unready"
    );
    assert_eq!(probe.status(), 200);
    assert_eq!(app.sim.calls(), 3);
    assert_eq!(app.metric("token_broker_upstream_circuit_open").await, 0.0);
    assert!(
        app.metric(r#"token_broker_upstream_requests_total{outcome="circuit_open"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn stale_tokens_are_served_while_the_circuit_is_open() {
    let app = TestApp::builder()
        .config(&format!(
            "{STALE_CONFIG}circuit_failures = 1\ncircuit_cooldown = \"10s\"\n"
        ))
        .spawn()
        .await;
    let cached = member_query(ALICE, "AGENT");
    app.get_token(&cached).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.sim.set_fault(Fault::Status(503));
    problem(
        app.get_token(&member_query(ALICE, "CUSTOM_USER")).await,
        503,
    )
    .await;

    let response = app.get_token(&cached).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-cache"], "stale");
    assert_eq!(
        app.sim.calls(),
        2,
        "the stale answer did not reach the vendor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vendor_never_sees_more_than_max_in_flight_requests() {
    let app = Arc::new(
        TestApp::builder()
            .config("[upstream]\nmax_in_flight = 8\n")
            .spawn()
            .await,
    );
    app.sim.set_latency(Duration::from_millis(20));
    for i in 0..500 {
        app.sim
            .add_customer(&format!("cust_{i}"), &format!("tok-{i}"));
    }

    let requests = (0..500).map(|i| {
        let app = app.clone();
        tokio::spawn(async move {
            app.get_token(&format!("user_id=cust_{i}"))
                .await
                .status()
                .as_u16()
        })
    });
    let statuses = futures::future::join_all(requests).await;

    assert!(statuses.iter().all(|s| *s.as_ref().unwrap() == 200));
    assert_eq!(app.sim.calls(), 500);
    assert!(
        app.sim.max_in_flight() <= 8,
        "peak {}",
        app.sim.max_in_flight()
    );
    assert_eq!(app.sim.max_in_flight(), 8, "the bound was reached");
}

#[tokio::test]
async fn a_rejected_partner_key_is_not_hidden_by_a_stale_token() {
    let app = TestApp::builder().config(STALE_CONFIG).spawn().await;
    let query = member_query(ALICE, "AGENT");
    app.get_token(&query).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.sim.set_partner_key("revoked-elsewhere");

    let response = app.get_token(&query).await;

    problem(response, 502).await;
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
