//! The promised metrics: present from the first scrape, values that follow
//! a scripted sequence exactly, and a dashboard built only on names that exist.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::*;
use token_broker::simulator::Fault;

/// Every sample name of a scrape (`name` of `name{…} value`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_spec_metric_is_present_at_zero_from_the_first_scrape() {
    let app = TestApp::spawn().await;

    let (status, text) = app.admin_get("/metrics").await;

    assert_eq!(status, 200);
    for sample in [
        r#"token_broker_http_requests_total{route="/v1/tokens",status="200"} 0"#,
        r#"token_broker_http_requests_total{route="/ext/get-user-token",status="200"} 0"#,
        r#"token_broker_http_request_duration_seconds_count{route="/v1/tokens"} 0"#,
        r#"token_broker_cache_lookups_total{result="hit"} 0"#,
        r#"token_broker_cache_lookups_total{result="miss"} 0"#,
        r#"token_broker_cache_lookups_total{result="stale"} 0"#,
        r#"token_broker_cache_lookups_total{result="negative"} 0"#,
        "token_broker_cache_entries 0",
        r#"token_broker_upstream_requests_total{outcome="ok"} 0"#,
        r#"token_broker_upstream_requests_total{outcome="timeout"} 0"#,
        r#"token_broker_upstream_requests_total{outcome="circuit_open"} 0"#,
        "token_broker_upstream_request_duration_seconds_count 0",
        "token_broker_upstream_circuit_open 0",
        r#"token_broker_client_requests_total{client="reader",result="ok"} 0"#,
        r#"token_broker_client_requests_total{client="reader",result="forbidden"} 0"#,
        r#"token_broker_client_requests_total{client="reader",result="rate_limited"} 0"#,
        r#"token_broker_partner_key_reloads_total{result="failed"} 0"#,
        r#"token_broker_connections_shed_total{listener="api"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "missing `{sample}` in\n{text}"
        );
    }
    assert!(text.contains(&format!(
        "token_broker_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    )));
    for process in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(sample_names(&text).contains(process), "missing {process}");
    }
}

#[tokio::test]
async fn metric_values_follow_a_scripted_sequence() {
    let app = TestApp::builder()
        .config(
            // A ttl the first requests fall inside on any machine; slept past below.
            "[cache]\nttl = \"2s\"\nstale_if_error = \"10m\"\nnegative_ttl = \"10m\"\n\
             [upstream]\nmax_retries = 0\ncircuit_failures = 100\ntimeout = \"300ms\"\n",
        )
        .spawn()
        .await;
    let alice = member_query(ALICE, "AGENT");
    let ghost = member_query("ghost@example.com", "AGENT");
    let mut statuses = Vec::new();

    statuses.push(app.get_token(&alice).await.status().as_u16()); // miss, ok
    statuses.push(app.get_token(&alice).await.status().as_u16()); // hit
    statuses.push(app.get_vendor_token(&alice).await.status().as_u16()); // hit
    statuses.push(app.get_token(&ghost).await.status().as_u16()); // miss, not_found
    statuses.push(app.get_token(&ghost).await.status().as_u16()); // negative
    statuses.push(
        app.get_token(&member_query(INACTIVE, "AGENT"))
            .await
            .status()
            .as_u16(),
    ); // miss, inactive
    app.sim.set_fault(Fault::Malformed);
    statuses.push(
        app.get_token(&member_query(ALICE, "CUSTOM_USER"))
            .await
            .status()
            .as_u16(),
    ); // miss, malformed
    app.sim.set_fault(Fault::Status(503));
    statuses.push(
        app.get_token(&format!("user_id={CUSTOMER_ID}"))
            .await
            .status()
            .as_u16(),
    ); // miss, unavailable
    tokio::time::sleep(Duration::from_millis(2100)).await;
    app.sim.set_fault(Fault::Hang);
    statuses.push(app.get_token(&alice).await.status().as_u16()); // stale, timeout
    app.sim.set_fault(Fault::None);
    app.sim.set_partner_key("revoked");
    statuses.push(
        app.get_token(&format!("user_id={CUSTOMER_ID}"))
            .await
            .status()
            .as_u16(),
    ); // miss, rejected

    assert_eq!(statuses, [200, 200, 200, 404, 404, 409, 502, 503, 200, 502]);
    let expected = [
        (r#"token_broker_cache_lookups_total{result="hit"}"#, 2.0),
        (r#"token_broker_cache_lookups_total{result="miss"}"#, 6.0),
        (
            r#"token_broker_cache_lookups_total{result="negative"}"#,
            1.0,
        ),
        (r#"token_broker_cache_lookups_total{result="stale"}"#, 1.0),
        ("token_broker_cache_entries", 2.0),
        (r#"token_broker_upstream_requests_total{outcome="ok"}"#, 1.0),
        (
            r#"token_broker_upstream_requests_total{outcome="not_found"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="inactive"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="malformed"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="unavailable"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="timeout"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="rejected"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{outcome="connect_error"}"#,
            0.0,
        ),
        ("token_broker_upstream_request_duration_seconds_count", 7.0),
        ("token_broker_upstream_circuit_open", 0.0),
        (
            r#"token_broker_http_requests_total{route="/v1/tokens",status="200"}"#,
            3.0,
        ),
        (
            r#"token_broker_http_requests_total{route="/ext/get-user-token",status="200"}"#,
            1.0,
        ),
        (
            r#"token_broker_http_requests_total{route="/v1/tokens",status="404"}"#,
            2.0,
        ),
        (
            r#"token_broker_http_requests_total{route="/v1/tokens",status="409"}"#,
            1.0,
        ),
        (
            r#"token_broker_http_requests_total{route="/v1/tokens",status="502"}"#,
            2.0,
        ),
        (
            r#"token_broker_http_requests_total{route="/v1/tokens",status="503"}"#,
            1.0,
        ),
        (
            r#"token_broker_http_request_duration_seconds_count{route="/v1/tokens"}"#,
            9.0,
        ),
        (
            r#"token_broker_http_request_duration_seconds_count{route="/ext/get-user-token"}"#,
            1.0,
        ),
        (
            r#"token_broker_client_requests_total{client="reader",result="ok"}"#,
            4.0,
        ),
        (
            r#"token_broker_client_requests_total{client="reader",result="not_found"}"#,
            2.0,
        ),
        (
            r#"token_broker_client_requests_total{client="reader",result="inactive"}"#,
            1.0,
        ),
        (
            r#"token_broker_client_requests_total{client="reader",result="error"}"#,
            3.0,
        ),
    ];
    for (sample, value) in expected {
        assert_eq!(app.metric(sample).await, value, "{sample}");
    }
}

/// Metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = ["token_broker_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_dashboard_queries_only_metrics_the_service_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/token-broker-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // With a shared cache configured (unreachable is fine) and HTTPS, so
    // their series exist too.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cache-key");
    std::fs::write(&key_file, "11".repeat(32)).unwrap();
    let (cert, key) = crate::helpers::certs::Authority::new("CA")
        .server("broker")
        .write(dir.path());
    let app = TestApp::builder()
        .config(&format!(
            "[cache]\nredis_url = \"redis://127.0.0.1:1\"\nencryption_key_file = {:?}\n\
             [server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n",
            key_file.display().to_string()
        ))
        .spawn()
        .await;
    let (_, text) = app.admin_get("/metrics").await;
    let exported = sample_names(&text);

    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();

    assert!(queries.len() >= 15, "{queries:?}");
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which is not exported"
        );
    }
    for needed in [
        "token_broker_http_requests_total",
        "token_broker_http_request_duration_seconds_bucket",
        "token_broker_cache_lookups_total",
        "token_broker_upstream_requests_total",
        "token_broker_upstream_request_duration_seconds_bucket",
        "token_broker_upstream_circuit_open",
        "token_broker_client_requests_total",
        "token_broker_shared_cache_up",
        "token_broker_shared_cache_operations_total",
        "token_broker_tls_certificate_expiry_timestamp_seconds",
        "token_broker_tls_handshakes_total",
        "token_broker_tls_reloads_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    assert!(
        queries
            .iter()
            .any(|q| q.contains(r#"result="rate_limited""#))
    );
    assert!(queries.iter().any(|q| q.contains(r#"result="forbidden""#)));
}
