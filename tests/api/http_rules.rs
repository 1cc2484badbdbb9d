//! HTTP as RFC 9110 and 9112 say (SPEC §4, Inputs): exactly one `Host` on
//! HTTP/1.1, one `Authorization`, an `Allow` that lists exactly what a route
//! serves, and a head with too many fields a 431 problem. Sent with raw
//! sockets, since a client library would not send most of these.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Sends `head` (without its final empty line) and reads one answer: the
/// head, lower-cased, and the body.
async fn exchange(app: &TestApp, head: &str) -> (String, String) {
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    let request = format!("{head}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    (head.to_ascii_lowercase(), body.to_owned())
}

fn alice_path() -> String {
    format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))
}

fn assert_problem(head: &str, body: &str, status: u16, slug: &str) {
    assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert!(head.contains("x-request-id: "), "{head}");
    let problem: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["type"], format!("urn:token-broker:problem:{slug}"));
    assert!(!body.contains(ALICE_AGENT_TOKEN));
}

#[tokio::test]
async fn an_http_1_1_request_without_exactly_one_host_is_a_400() {
    let app = TestApp::spawn().await;
    let auth = format!("authorization: Bearer {READER_KEY}");
    let path = alice_path();

    let (head, body) = exchange(&app, &format!("GET {path} HTTP/1.1\r\n{auth}")).await;
    assert_problem(&head, &body, 400, "invalid-request");
    assert!(body.contains("Host"), "{body}");

    let two = format!("GET {path} HTTP/1.1\r\nhost: a\r\nhost: b\r\n{auth}");
    let (head, body) = exchange(&app, &two).await;
    assert_problem(&head, &body, 400, "invalid-request");

    let one = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}");
    let (head, body) = exchange(&app, &one).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(body.contains(ALICE_AGENT_TOKEN));
    assert_eq!(
        app.sim.calls(),
        1,
        "only the well-formed request reached the vendor"
    );
}

#[tokio::test]
async fn two_authorization_headers_are_a_400_whatever_their_order() {
    let app = TestApp::spawn().await;
    let path = alice_path();
    for (first, second) in [(READER_KEY, "wrong-key"), ("wrong-key", READER_KEY)] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {first}\r\nauthorization: Bearer {second}"
        );
        let (head, body) = exchange(&app, &request).await;
        assert_problem(&head, &body, 400, "invalid-request");
        assert!(body.contains("Authorization"), "{body}");
    }
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn every_405_lists_exactly_the_methods_its_route_serves() {
    let app = TestApp::spawn().await;
    let cases = [
        ("HEAD", "/v1/tokens", "get, delete"),
        ("POST", "/v1/tokens", "get, delete"),
        ("PUT", "/v1/tokens", "get, delete"),
        ("HEAD", "/ext/get-user-token", "get"),
        ("DELETE", "/ext/get-user-token", "get"),
        ("POST", "/openapi.json", "get, head"),
    ];
    for (method, path, allowed) in cases {
        let request = format!(
            "{method} {path}?user_id=c1 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {READER_KEY}"
        );
        let (head, _) = exchange(&app, &request).await;
        assert!(head.starts_with("http/1.1 405 "), "{method} {path}: {head}");
        let allow: Vec<&str> = head.lines().filter(|l| l.starts_with("allow:")).collect();
        assert_eq!(
            allow,
            [format!("allow: {allowed}").as_str()],
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_head_of_400_fields_is_a_431_problem_and_a_browser_sized_one_passes() {
    let app = TestApp::spawn().await;
    let path = alice_path();
    let fields = |n: usize| (0..n).map(|i| format!("x-f{i}: v\r\n")).collect::<String>();
    let request = |n: usize| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {READER_KEY}\r\n{}",
            fields(n).trim_end()
        )
    };
    let (head, body) = exchange(&app, &request(400)).await;
    assert_problem(&head, &body, 431, "headers-too-large");

    // Sixty fields, more than browsers and proxies send: served.
    let (head, body) = exchange(&app, &request(60)).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(body.contains(ALICE_AGENT_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_served_over_cleartext() {
    let app = TestApp::spawn().await;
    let stream = TcpStream::connect(app.api).await.unwrap();
    let response = http2_get(stream, &alice_path(), READER_KEY).await;
    assert_eq!(response.version(), axum::http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(response.headers().contains_key("x-request-id"));

    // HTTP/1.1 on the same port, as before.
    let (head, body) = exchange(
        &app,
        &format!(
            "GET {} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {READER_KEY}",
            alice_path()
        ),
    )
    .await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(body.contains(ALICE_AGENT_TOKEN));
}
