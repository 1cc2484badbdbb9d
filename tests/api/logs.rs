//! What the real binary writes: one line per request, events that name
//! their request, and never a secret or an address.

use std::time::Duration;

use crate::helpers::process::*;
use crate::helpers::*;

#[tokio::test]
async fn no_secret_or_email_appears_in_the_logs_of_a_full_scenario() {
    use token_broker::simulator::Fault;
    let (sim, upstream) = upstream().await;
    sim.set_partner_keys(&[PARTNER_KEY, ROTATED_KEY]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command.arg("--config").arg(config_file(
        &dir,
        upstream,
        &format!("[log]\nlevel = \"trace\"\n{}", limited_client()),
    ));
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);
    let alice = member_query(ALICE, "AGENT");
    let mut statuses = Vec::new();
    let mut call = async |path: String, key: &str| {
        statuses.push(
            get(&client, format!("{base}{path}"), key)
                .await
                .status()
                .as_u16(),
        );
    };

    call(format!("/v1/tokens?{alice}"), READER_KEY).await;
    call(format!("/v1/tokens?{alice}"), READER_KEY).await;
    call(
        format!("/ext/get-user-token?userId={CUSTOMER_ID}"),
        READER_KEY,
    )
    .await;
    call(
        format!("/ext/get-user-token?{}", member_query(INACTIVE, "AGENT")),
        READER_KEY,
    )
    .await;
    call(
        format!("/v1/tokens?{}", member_query(INACTIVE, "AGENT")),
        READER_KEY,
    )
    .await;
    call(
        format!("/v1/tokens?{}", member_query("ghost@example.com", "AGENT")),
        READER_KEY,
    )
    .await;
    call(format!("/v1/tokens?{alice}"), "wrong-caller-key").await;
    call(
        format!("/v1/tokens?{}", member_query(ALICE, "ADMIN")),
        READER_KEY,
    )
    .await;
    call(format!("/v1/tokens?user_id={CUSTOMER_ID}"), TEAM_ONLY_KEY).await;
    call(format!("/v1/tokens?{alice}"), LIMITED_KEY).await;
    call(format!("/v1/tokens?{alice}"), LIMITED_KEY).await;
    for fault in [Fault::Malformed, Fault::Status(500), Fault::Hang] {
        sim.set_fault(fault);
        call(
            format!("/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
            READER_KEY,
        )
        .await;
    }
    sim.set_fault(Fault::None);
    sim.set_partner_key("only-the-vendor-knows");
    call(
        format!("/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
        READER_KEY,
    )
    .await;
    sim.set_partner_keys(&[PARTNER_KEY, ROTATED_KEY]);
    std::fs::write(dir.path().join("partner-key"), ROTATED_KEY).unwrap();
    while !broker.output().contains("partner key reloaded") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call(
        format!("/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
        READER_KEY,
    )
    .await;
    let deleted = client
        .delete(format!("{base}/v1/tokens?{alice}"))
        .bearer_auth(INVALIDATOR_KEY)
        .send()
        .await
        .unwrap();
    broker.stop().await;

    assert_eq!(
        statuses,
        [
            200, 200, 200, 200, 409, 404, 401, 400, 403, 200, 429, 502, 503, 504, 502, 200
        ]
    );
    assert_eq!(deleted.status(), 204);
    let logs = broker.output();
    assert!(logs.contains("request completed"), "{logs}");
    for secret in [
        PARTNER_KEY,
        ROTATED_KEY,
        ALICE_AGENT_TOKEN,
        ALICE_CUSTOM_TOKEN,
        INACTIVE_TOKEN,
        CUSTOMER_TOKEN,
        READER_KEY,
        LIMITED_KEY,
        INVALIDATOR_KEY,
        "wrong-caller-key",
        ALICE,
        INACTIVE,
        "ghost@example.com",
        "example.com",
        CUSTOMER_ID,
    ] {
        assert!(!logs.contains(secret), "logs contain {secret}:\n{logs}");
    }
}

#[tokio::test]
async fn each_request_logs_one_line_and_its_events_carry_the_request() {
    use token_broker::simulator::Fault;
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Running::serve(&dir, upstream).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);
    let fetch = |query: String, id: &'static str| {
        client
            .get(format!("{base}/v1/tokens?{query}"))
            .bearer_auth(READER_KEY)
            .header("x-request-id", id)
            .send()
    };

    let served = fetch(member_query(ALICE, "AGENT"), "ctx-1").await.unwrap();
    sim.set_fault(Fault::Malformed);
    let failed = fetch(member_query(ALICE, "CUSTOM_USER"), "ctx-2")
        .await
        .unwrap();
    broker.stop().await;

    assert_eq!(
        (served.status().as_u16(), failed.status().as_u16()),
        (200, 502)
    );
    let output = broker.output();
    let events = events(&output);
    let completed: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "request completed")
        .collect();
    assert_eq!(completed.len(), 2, "{output}");
    let line = completed[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["status"], 200);
    assert_eq!(line["cache"], "miss");
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(line["target"], "token_broker::http::observe");
    let request = &line["spans"][0];
    assert_eq!(request["name"], "request");
    assert_eq!(request["otel.name"], "GET /v1/tokens");
    assert_eq!(request["route"], "/v1/tokens");
    assert_eq!(request["request_id"], "ctx-1");
    assert_eq!(request["client"], "reader");
    assert_eq!(request["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(request["span_id"].as_str().unwrap().len(), 16);
    assert_eq!(completed[1]["status"], 502);
    assert_eq!(completed[1]["spans"][0]["request_id"], "ctx-2");

    let warning = events
        .iter()
        .find(|e| e["level"] == "WARN" && e["message"].as_str().unwrap().starts_with("no token"))
        .expect("the handler's warning");
    assert_eq!(warning["spans"][0]["request_id"], "ctx-2");
    assert_eq!(warning["spans"][0]["client"], "reader");
    assert_eq!(
        warning["spans"][0]["trace_id"],
        completed[1]["spans"][0]["trace_id"]
    );
    for audit in audit_events(&output) {
        assert!(audit.get("spans").is_none(), "{audit}");
    }
}
