//! Hostile or broken clients: oversized heads, slow headers, too many
//! connections, garbage bytes. Nothing panics and the service keeps serving.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Reads until the server closes (or 3 s pass); returns what arrived.
async fn read_to_close(stream: &mut TcpStream) -> (String, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

async fn still_serves(app: &TestApp) {
    let response = reqwest::Client::new()
        .get(app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))))
        .bearer_auth(READER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn headers_over_8_kib_are_a_431_problem() {
    let app = TestApp::spawn().await;

    let response = app
        .http
        .get(app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))))
        .bearer_auth(READER_KEY)
        .header("x-padding", "p".repeat(9 * 1024))
        .send()
        .await
        .unwrap();

    let body = problem(response, 431).await;
    assert_eq!(body["type"], "urn:token-broker:problem:headers-too-large");
    assert_eq!(app.sim.calls(), 0);
}

#[tokio::test]
async fn a_huge_request_head_is_refused_without_harm() {
    let app = TestApp::spawn().await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();

    let head = format!(
        "GET /v1/tokens?email={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let (answer, closed) = read_to_close(&mut stream).await;

    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 414"),
        "{answer:?}"
    );
    assert!(closed);
    still_serves(&app).await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_and_does_not_hold_up_others() {
    let app = TestApp::builder()
        .config("[server]\nheader_read_timeout = \"500ms\"\n")
        .spawn()
        .await;
    let mut slow = TcpStream::connect(app.api).await.unwrap();
    slow.write_all(b"GET /v1/tokens HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            if slow.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (answer, closed) = read_to_close(&mut slow).await;
        (answer, closed, started.elapsed())
    });

    let others = Instant::now();
    still_serves(&app).await;
    let others_took = others.elapsed();
    let (answer, closed, cut_after) = trickle.await.unwrap();

    // Others are served while the slow one still trickles; it is cut by the
    // 500 ms header timeout, long before its 5 s of trickling would end.
    assert!(
        others_took < cut_after,
        "others took {others_took:?}, the slow one was cut after {cut_after:?}"
    );
    assert!(closed, "the slow connection was not closed");
    assert!(!answer.contains("200 OK"), "{answer:?}");
    assert!(
        cut_after < Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_get_a_503_and_the_service_recovers() {
    let app = TestApp::builder()
        .config("[server]\nmax_connections = 2\n")
        .spawn()
        .await;
    // The listener accepts in the order connections arrive: these two first.
    let idle_a = TcpStream::connect(app.api).await.unwrap();
    let idle_b = TcpStream::connect(app.api).await.unwrap();

    let mut extra = TcpStream::connect(app.api).await.unwrap();
    extra
        .write_all(b"GET /v1/tokens?user_id=x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut extra).await;
    drop((idle_a, idle_b));

    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("application/problem+json"));
    assert!(answer.contains("urn:token-broker:problem:overloaded"));
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    assert!(closed);
    // Once the server has seen the idle ones close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.get_token(&member_query(ALICE, "AGENT")).await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        app.metric(r#"token_broker_connections_shed_total{listener="api"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn garbage_bytes_get_a_400_and_a_closed_connection() {
    let app = TestApp::spawn().await;
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\0\0\0\0\0\0\0\0\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(app.api).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let (answer, closed) = read_to_close(&mut stream).await;
        assert!(closed, "connection left open after {garbage:?}");
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer:?}"
        );
    }
    still_serves(&app).await;
}

/// `GET` of Alice's token as the reader on `stream`; the whole answer.
async fn ask_on(mut stream: TcpStream) -> String {
    let request = format!(
        "GET /v1/tokens?{} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {READER_KEY}\r\nconnection: close\r\n\r\n",
        member_query(ALICE, "AGENT")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    read_to_close(&mut stream).await.0
}

async fn connect_from(local: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((local, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_connection_slot() {
    let app = TestApp::builder()
        .config("[server]\nmax_connections = 8\nmax_connections_per_peer = 3\n")
        .spawn()
        .await;
    // Three idle connections hold 127.0.0.1's share.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from([127, 0, 0, 1], app.api).await);
    }
    let refused = ask_on(connect_from([127, 0, 0, 1], app.api).await).await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(
        refused.contains("urn:token-broker:problem:overloaded"),
        "{refused}"
    );
    assert!(refused.contains("from this address"), "{refused}");

    // Another address of this machine is another peer: served.
    let other = ask_on(connect_from([127, 0, 0, 2], app.api).await).await;
    assert!(other.starts_with("HTTP/1.1 200 "), "{other}");
    assert!(other.contains(ALICE_AGENT_TOKEN));
    assert_eq!(
        app.metric(r#"token_broker_connections_refused_per_peer_total{listener="api"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"token_broker_connections_shed_total{listener="api"}"#)
            .await,
        0.0,
        "the listener as a whole had room"
    );

    // A closed connection gives its slot back.
    drop(idle.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = ask_on(connect_from([127, 0, 0, 1], app.api).await).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_half_a_preface_is_closed() {
    let app = TestApp::builder()
        .config("[server]\nheader_read_timeout = \"500ms\"\n")
        .spawn()
        .await;
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut stream = TcpStream::connect(app.api).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let (_, closed) = read_to_close(&mut stream).await;
        assert!(
            closed,
            "{:?}: closed by the server",
            String::from_utf8_lossy(opening)
        );
    }
    still_serves(&app).await;
}
