//! Audit events: written whatever `log.level` says, one per token handed out
//! and per invalidation, none for `HEAD`.

use crate::helpers::process::*;
use crate::helpers::*;

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
async fn every_issued_token_and_invalidation_writes_one_audit_event() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Running::serve(&dir, upstream).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);
    let alice = member_query(ALICE, "AGENT");
    let requests = [
        (
            reqwest::Method::GET,
            format!("/v1/tokens?{alice}"),
            READER_KEY,
            "audit-1",
        ),
        (
            reqwest::Method::GET,
            format!("/v1/tokens?{alice}"),
            READER_KEY,
            "audit-2",
        ),
        (
            reqwest::Method::GET,
            format!("/ext/get-user-token?userId={CUSTOMER_ID}"),
            READER_KEY,
            "audit-3",
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/tokens?{alice}"),
            INVALIDATOR_KEY,
            "audit-4",
        ),
        (
            reqwest::Method::GET,
            format!("/v1/tokens?{}", member_query(INACTIVE, "AGENT")),
            READER_KEY,
            "refused-1",
        ),
        (
            reqwest::Method::GET,
            format!("/v1/tokens?user_id={CUSTOMER_ID}"),
            TEAM_ONLY_KEY,
            "refused-2",
        ),
    ];
    for (method, path, key, id) in requests {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(key)
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
    }
    broker.stop().await;

    let output = broker.output();
    let audit: Vec<_> = events(&output)
        .into_iter()
        .filter(|e| e["target"] == "audit")
        .collect();
    let ids: Vec<_> = audit
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["audit-1", "audit-2", "audit-3", "audit-4"],
        "{output}"
    );
    let expect = [
        (
            "issued",
            "reader",
            "team_member",
            Some("AGENT"),
            Some("miss"),
        ),
        (
            "issued",
            "reader",
            "team_member",
            Some("AGENT"),
            Some("hit"),
        ),
        ("issued", "reader", "customer", None, Some("miss")),
        (
            "invalidated",
            "invalidator",
            "team_member",
            Some("AGENT"),
            None,
        ),
    ];
    for (event, (outcome, caller, kind, user_type, cache)) in audit.iter().zip(expect) {
        assert_eq!(event["outcome"], outcome);
        assert_eq!(event["caller"], caller);
        assert_eq!(event["identity"], kind);
        assert_eq!(event["user_type"].as_str(), user_type);
        assert_eq!(event["cache"].as_str(), cache);
        let subject = event["subject"].as_str().unwrap();
        assert_eq!(subject.len(), 32);
        assert!(subject.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    assert_eq!(
        audit[0]["subject"], audit[1]["subject"],
        "one person, one subject"
    );
    assert_eq!(audit[0]["subject"], audit[3]["subject"]);
    assert_ne!(audit[0]["subject"], audit[2]["subject"]);
    for line in output.lines().filter(|l| l.contains("\"audit\"")) {
        for secret in [ALICE, ALICE_AGENT_TOKEN, CUSTOMER_ID, CUSTOMER_TOKEN] {
            assert!(!line.contains(secret), "audit event holds {secret}: {line}");
        }
    }
}
