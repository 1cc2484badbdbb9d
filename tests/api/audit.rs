//! Audit events: one for every token-route request from a known caller,
//! whatever it came to, written whatever `log.level` says; none for `HEAD`.

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
        let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
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
async fn every_token_request_from_a_known_caller_writes_one_audit_event_whatever_its_outcome() {
    use token_broker::simulator::Fault;
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, &limited_client()));
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);
    let alice = member_query(ALICE, "AGENT");
    let get = reqwest::Method::GET;
    let requests = [
        (
            get.clone(),
            format!("/v1/tokens?{alice}"),
            READER_KEY,
            "audit-1",
        ),
        (
            get.clone(),
            format!("/v1/tokens?{alice}"),
            READER_KEY,
            "audit-2",
        ),
        (
            get.clone(),
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
            get.clone(),
            format!("/v1/tokens?{}", member_query(INACTIVE, "AGENT")),
            READER_KEY,
            "audit-5",
        ),
        (
            get.clone(),
            format!("/v1/tokens?user_id={CUSTOMER_ID}"),
            TEAM_ONLY_KEY,
            "audit-6",
        ),
        (
            get.clone(),
            format!("/v1/tokens?{}", member_query("ghost@example.com", "AGENT")),
            READER_KEY,
            "audit-7",
        ),
        (
            get.clone(),
            format!("/v1/tokens?email={ALICE}"),
            READER_KEY,
            "audit-8",
        ),
        (
            get.clone(),
            format!("/v1/tokens?{alice}"),
            LIMITED_KEY,
            "audit-9",
        ),
        (
            get.clone(),
            format!("/v1/tokens?{alice}"),
            LIMITED_KEY,
            "audit-10",
        ),
        (
            get.clone(),
            format!("/v1/tokens?{alice}"),
            "wrong-key",
            "unknown-1",
        ),
    ];
    let mut statuses = Vec::new();
    for (method, path, key, id) in requests {
        let response = client
            .request(method, format!("{base}{path}"))
            .bearer_auth(key)
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    sim.set_fault(Fault::Status(503));
    let down = client
        .get(format!(
            "{base}/v1/tokens?{}",
            member_query(ALICE, "CUSTOM_USER")
        ))
        .bearer_auth(READER_KEY)
        .header("x-request-id", "audit-11")
        .send()
        .await
        .unwrap();
    statuses.push(down.status().as_u16());
    broker.stop().await;

    assert_eq!(
        statuses,
        [200, 200, 200, 204, 409, 403, 404, 400, 200, 429, 401, 503]
    );
    let output = broker.output();
    let audit = audit_events(&output);
    let ids: Vec<_> = audit
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let expected_ids: Vec<String> = (1..=11).map(|i| format!("audit-{i}")).collect();
    assert_eq!(ids, expected_ids, "{output}");
    // (outcome, status, caller, identity, user_type, cache, rule)
    let expect = [
        (
            "issued",
            200,
            "reader",
            Some("team_member"),
            Some("AGENT"),
            Some("miss"),
            None,
        ),
        (
            "issued",
            200,
            "reader",
            Some("team_member"),
            Some("AGENT"),
            Some("hit"),
            None,
        ),
        (
            "issued",
            200,
            "reader",
            Some("customer"),
            None,
            Some("miss"),
            None,
        ),
        (
            "invalidated",
            204,
            "invalidator",
            Some("team_member"),
            Some("AGENT"),
            None,
            None,
        ),
        (
            "failed",
            409,
            "reader",
            Some("team_member"),
            Some("AGENT"),
            None,
            None,
        ),
        (
            "denied",
            403,
            "team-only",
            Some("customer"),
            None,
            None,
            Some("scope"),
        ),
        (
            "failed",
            404,
            "reader",
            Some("team_member"),
            Some("AGENT"),
            None,
            None,
        ),
        ("failed", 400, "reader", None, None, None, None),
        (
            "issued",
            200,
            "limited",
            Some("team_member"),
            Some("AGENT"),
            Some("miss"),
            None,
        ),
        // A 429 says whose token was asked for too.
        (
            "rate_limited",
            429,
            "limited",
            Some("team_member"),
            Some("AGENT"),
            None,
            None,
        ),
        (
            "failed",
            503,
            "reader",
            Some("team_member"),
            Some("CUSTOM_USER"),
            None,
            None,
        ),
    ];
    for (event, (outcome, status, caller, kind, user_type, cache, rule)) in audit.iter().zip(expect)
    {
        let id = &event["request_id"];
        assert_eq!(event["outcome"], outcome, "{id}");
        assert_eq!(event["status"], status, "{id}");
        assert_eq!(event["caller"], caller, "{id}");
        assert_eq!(event["identity"].as_str(), kind, "{id}");
        assert_eq!(event["user_type"].as_str(), user_type, "{id}");
        assert_eq!(event["cache"].as_str(), cache, "{id}");
        assert_eq!(event["rule"].as_str(), rule, "{id}");
        assert!(event["duration_us"].is_u64(), "{event}");
        assert!(event["route"].as_str().unwrap().starts_with('/'), "{event}");
        let trace = event["trace_id"].as_str().unwrap();
        assert!(trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()));
        if kind.is_some() {
            let subject = event["subject"].as_str().unwrap();
            assert_eq!(subject.len(), 32);
            assert!(subject.bytes().all(|b| b.is_ascii_hexdigit()));
        } else {
            assert!(event.get("subject").is_none(), "{event}");
        }
    }
    assert_eq!(
        audit[0]["subject"], audit[1]["subject"],
        "one person, one subject"
    );
    assert_eq!(audit[0]["subject"], audit[3]["subject"]);
    assert_eq!(
        audit[9]["subject"], audit[0]["subject"],
        "the 429 names the same person"
    );
    assert_ne!(audit[0]["subject"], audit[2]["subject"]);
    let unknown: Vec<_> = events(&output)
        .into_iter()
        .filter(|e| e["spans"][0]["request_id"] == "unknown-1")
        .collect();
    assert_eq!(
        unknown.len(),
        1,
        "an unknown caller's request line: {output}"
    );
    assert_eq!(unknown[0]["message"], "request completed");
    assert_eq!(unknown[0]["status"], 401);
    for line in output.lines().filter(|l| l.contains("\"audit\"")) {
        for secret in [
            ALICE,
            ALICE_AGENT_TOKEN,
            CUSTOMER_ID,
            CUSTOMER_TOKEN,
            "example.com",
        ] {
            assert!(!line.contains(secret), "audit event holds {secret}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_finds_its_audit_event_already_written() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    // Concurrent requests, so events share writes; each answer, the moment
    // it arrives, must find its event written (a 5 ms batch would not).
    let askers: Vec<_> = (0..8)
        .map(|asker| {
            let app = app.clone();
            tokio::spawn(async move {
                let url = app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT")));
                for i in 0..50 {
                    let id = format!("commit-{asker}-{i}");
                    let response = app
                        .http
                        .get(&url)
                        .bearer_auth(READER_KEY)
                        .header("x-request-id", &id)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let written = app.audit_events().iter().any(|e| e["request_id"] == id);
                    assert!(written, "{id} was answered before its event was written");
                }
            })
        })
        .collect();
    for asker in askers {
        asker.await.unwrap();
    }
    assert_eq!(app.audit_events().len(), 400);
}
