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
    assert!(logs.contains("\"target\":\"audit\""), "{logs}");
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
async fn a_token_request_writes_one_line_its_audit_event_and_other_requests_a_request_line() {
    use token_broker::simulator::Fault;
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Running::serve(&dir, upstream).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);
    let fetch = |path: String, key: &'static str, id: &'static str| {
        client
            .get(format!("{base}{path}"))
            .bearer_auth(key)
            .header("x-request-id", id)
            .send()
    };
    let alice = member_query(ALICE, "AGENT");

    let miss = fetch(format!("/v1/tokens?{alice}"), READER_KEY, "ctx-1")
        .await
        .unwrap();
    let hit = fetch(format!("/v1/tokens?{alice}"), READER_KEY, "ctx-2")
        .await
        .unwrap();
    let unknown = fetch(format!("/v1/tokens?{alice}"), "not-a-caller", "ctx-3")
        .await
        .unwrap();
    let other = fetch("/openapi.json".into(), READER_KEY, "ctx-4")
        .await
        .unwrap();
    sim.set_fault(Fault::Malformed);
    let failed = fetch(
        format!("/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
        READER_KEY,
        "ctx-5",
    )
    .await
    .unwrap();
    broker.stop().await;

    let statuses = [&miss, &hit, &unknown, &other, &failed].map(|r| r.status().as_u16());
    assert_eq!(statuses, [200, 200, 401, 200, 502]);
    let output = broker.output();
    let events = events(&output);
    let of = |id: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["request_id"] == id || e["spans"][0]["request_id"] == id)
            .collect()
    };
    for id in ["ctx-1", "ctx-2"] {
        let lines = of(id);
        assert_eq!(lines.len(), 1, "one line for {id}: {output}");
        assert_eq!(lines[0]["target"], "audit");
        assert_eq!(lines[0]["outcome"], "issued");
    }
    let line = of("ctx-1")[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["status"], 200);
    assert_eq!(line["cache"], "miss");
    assert_eq!(line["route"], "/v1/tokens");
    assert!(line["duration_us"].is_u64(), "{line}");
    assert_eq!(line["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(of("ctx-2")[0]["cache"], "hit");

    for (id, status) in [("ctx-3", 401), ("ctx-4", 200)] {
        let lines = of(id);
        assert_eq!(lines.len(), 1, "one line for {id}: {output}");
        let line = lines[0];
        assert_eq!(line["message"], "request completed");
        assert_eq!(line["status"], status);
        assert!(line["duration_us"].is_u64(), "{line}");
        assert_eq!(line["target"], "token_broker::http::observe");
        let request = &line["spans"][0];
        assert_eq!(request["name"], "request");
        assert_eq!(request["request_id"], id);
        assert_eq!(request["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(request["span_id"].as_str().unwrap().len(), 16);
    }
    assert_eq!(of("ctx-4")[0]["spans"][0]["otel.name"], "GET /openapi.json");

    let audit = of("ctx-5")
        .into_iter()
        .find(|e| e["target"] == "audit")
        .expect("the failed request's audit event");
    assert_eq!(audit["outcome"], "failed");
    assert_eq!(audit["status"], 502);
    let warning = events
        .iter()
        .find(|e| e["level"] == "WARN" && e["message"].as_str().unwrap().starts_with("no token"))
        .expect("the handler's warning");
    assert_eq!(warning["spans"][0]["request_id"], "ctx-5");
    assert_eq!(warning["spans"][0]["client"], "reader");
    assert_eq!(warning["spans"][0]["trace_id"], audit["trace_id"]);
    for audit in audit_events(&output) {
        assert!(audit.get("spans").is_none(), "{audit}");
    }
}

/// Requests for alice (request ids `blocked-N`) to a broker whose stdout
/// nobody reads, until one fails for want of its audit event: once the pipe
/// is full, the write of the next event does not return in time (or its
/// lane is full). Checks the admin listener as it goes. Returns the ids
/// answered 200.
async fn fill_the_log_output(broker: &Running) -> Vec<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
    let mut issued = Vec::new();
    for i in 0..20_000 {
        let id = format!("blocked-{i}");
        let response = client
            .get(&url)
            .bearer_auth(READER_KEY)
            .header("x-request-id", &id)
            .send()
            .await
            .expect("the API answers while stdout is blocked");
        match response.status().as_u16() {
            200 => issued.push(id),
            503 => {
                let problem: serde_json::Value = response.json().await.unwrap();
                assert_eq!(
                    problem["type"],
                    "urn:token-broker:problem:audit-unavailable"
                );
                return issued;
            }
            other => panic!("unexpected {other}"),
        }
        if i % 50 == 0 {
            let health = client
                .get(format!("http://{}/healthz", broker.admin))
                .send()
                .await
                .expect("/healthz answers while stdout is blocked");
            assert_eq!(health.status(), 200);
        }
    }
    panic!("20000 audit events fit in a 64 KiB queue and a blocked pipe");
}

/// The smallest log queue there is.
const SMALL_QUEUE: &str = "[log]\nqueue_bytes = 65536\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_stdout_stops_no_probe_and_no_token_leaves_without_its_audit_event() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, SMALL_QUEUE));
    let (mut broker, stdout) = Running::start_stalled(command).await;

    let issued = fill_the_log_output(&broker).await;
    let ready = reqwest::get(format!("http://{}/readyz", broker.admin))
        .await
        .unwrap()
        .status();
    let refused = broker
        .metric(r#"token_broker_log_lines_dropped_total{reason="audit_refused"}"#)
        .await
        .unwrap();
    broker.read_stdout(stdout);
    broker.stop().await;

    assert_eq!(ready, 200);
    assert!(refused >= 1.0, "{refused}");
    assert!(issued.len() > 10, "{}", issued.len());
    let output = broker.output();
    let audited: std::collections::HashSet<String> = audit_events(&output)
        .iter()
        .filter(|e| e["outcome"] == "issued")
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect();
    let unaudited: Vec<_> = issued.iter().filter(|id| !audited.contains(*id)).collect();
    assert!(
        unaudited.is_empty(),
        "answered 200 without an audit event: {unaudited:?}"
    );
    assert!(
        output.contains("log lines dropped while running"),
        "the exit says what was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_while_stdout_stays_blocked() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, SMALL_QUEUE))
        .env("TOKEN_BROKER__SERVER__SHUTDOWN_GRACE", "2s");
    let (mut broker, _unread) = Running::start_stalled(command).await;
    fill_the_log_output(&broker).await;

    let signalled = tokio::time::Instant::now();
    broker.terminate();
    let code = broker.wait().await;
    let took = signalled.elapsed();

    assert_eq!(code, 0);
    // The grace (2 s) plus room for a busy machine; a blocked process would
    // never exit (`wait` gives up after 15 s).
    assert!(took < Duration::from_secs(12), "{took:?}");
    let output = broker.output();
    assert!(output.contains("not written at exit"), "{output}");
}

#[tokio::test]
async fn pretty_logs_write_no_colour_codes_into_a_pipe() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, "[log]\nformat = \"pretty\"\n"));
    let mut broker = Running::start_quiet(command).await;
    let answered = broker
        .get_token(&member_query(ALICE, "AGENT"), READER_KEY)
        .await
        .status();
    broker.stop().await;

    assert_eq!(answered, 200);
    let output = broker.output();
    assert!(output.contains("token issued"), "{output}");
    assert!(
        !output.contains('\u{1b}'),
        "escape codes in a pipe: {output:?}"
    );
}

/// Reads `stdout` at about `bytes_per_second`, as a slow log collector
/// would; what it read, once the broker closes it.
async fn drain_slowly(mut stdout: tokio::process::ChildStdout, bytes_per_second: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let mut buffer = vec![0; bytes_per_second / 10];
    while let Ok(n) = stdout.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buffer[..n]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_beside_a_slow_stdout_fails_no_legitimate_read() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, "[log]\nqueue_bytes = 262144\n"))
        .env("TOKEN_BROKER__SERVER__SHUTDOWN_GRACE", "2s");
    let (mut broker, stdout) = Running::start_stalled(command).await;
    let drained = tokio::spawn(drain_slowly(stdout, 40_000));
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
    // Strangers: as many requests with a key nobody has as they can send.
    let strangers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut sent = 0u64;
                while tokio::time::Instant::now() < until {
                    let refused = client
                        .get(&url)
                        .bearer_auth("not-a-key-of-anyone-0123456789abcdef")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(refused.status(), 401);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    // A legitimate caller: 40 reads a second.
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    while tokio::time::Instant::now() < until {
        statuses.push(
            get(&client, url.clone(), READER_KEY)
                .await
                .status()
                .as_u16(),
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut sent = 0;
    for stranger in strangers {
        sent += stranger.await.unwrap();
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} legitimate reads failed beside {sent} strangers' requests: {statuses:?}",
        statuses.len()
    );
    let sampled = broker
        .metric(r#"token_broker_log_lines_dropped_total{reason="sampled"}"#)
        .await
        .unwrap();
    let refused = broker
        .metric(r#"token_broker_log_lines_dropped_total{reason="audit_refused"}"#)
        .await
        .unwrap();
    broker.terminate();
    broker.wait().await;
    let output = String::from_utf8_lossy(&drained.await.unwrap()).into_owned();
    eprintln!(
        "{sent} strangers' requests, {} reads, {sampled} request lines sampled away",
        statuses.len()
    );
    assert_eq!(refused, 0.0, "no audit event was refused");
    assert!(
        sampled > 0.0,
        "past the budget, strangers' lines are not written"
    );
    let told = events(&output)
        .into_iter()
        .any(|e| e["status"] == 401 && e["suppressed_before"].as_u64().is_some_and(|n| n > 0));
    assert!(
        told,
        "a written 401 line says how many went unwritten before it"
    );
}

/// Four keep-alive callers ask as fast as they can; SIGKILL comes once a few
/// hundred answers are in. Every request answered 200 must have its audit
/// event in what the process wrote before it died (a 5 ms batch lost a few).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_audit_event_of_an_answered_request() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;

    for round in 0..3 {
        let (_sim, upstream) = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let mut command = command();
        command.arg("--config").arg(config_file(&dir, upstream, ""));
        let (mut broker, mut stdout) = Running::start_stalled(command).await;
        let written = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes).await;
            bytes
        });
        let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let callers: Vec<_> = (0..4)
            .map(|caller| {
                let (url, answered) = (url.clone(), answered.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    for i in 0.. {
                        let id = format!("kill-{round}-{caller}-{i}");
                        let sent = client
                            .get(&url)
                            .bearer_auth(READER_KEY)
                            .header("x-request-id", &id)
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status() == 200 => {
                                answered.lock().unwrap().push(id);
                            }
                            // The process is gone.
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while answered.lock().unwrap().len() < 400 {
            assert!(tokio::time::Instant::now() < deadline, "too few answers");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        broker.child.start_kill().unwrap();
        broker.child.wait().await.unwrap();
        for caller in callers {
            caller.await.unwrap();
        }
        let output = String::from_utf8_lossy(&written.await.unwrap()).into_owned();
        let audited: std::collections::HashSet<String> = audit_events(&output)
            .iter()
            .filter_map(|e| e["request_id"].as_str().map(str::to_owned))
            .collect();
        let answered = answered.lock().unwrap();
        let lost: Vec<_> = answered
            .iter()
            .filter(|id| !audited.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} answered requests have no audit event: {lost:?}",
            lost.len(),
            answered.len()
        );
    }
}
