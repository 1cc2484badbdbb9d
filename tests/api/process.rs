//! The real binary: command line, exit codes, logs, signals.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_token-broker");

fn command() -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_remove("TOKEN_BROKER_CONFIG")
        .env("TOKEN_BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("TOKEN_BROKER__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running `token-broker` whose output is captured line by line.
struct Running {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    api: SocketAddr,
    admin: SocketAddr,
}

impl Running {
    /// Starts `args` and waits until the broker logs that it is listening.
    async fn start(mut command: Command) -> Running {
        let mut child = command.spawn().expect("binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().unwrap().push(line);
                }
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listening = output.lock().unwrap().iter().find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                (event["message"] == "listening").then(|| {
                    (
                        event["api"].as_str().unwrap().parse().unwrap(),
                        event["admin"].as_str().unwrap().parse().unwrap(),
                    )
                })
            });
            if let Some((api, admin)) = listening {
                return Running {
                    child,
                    output,
                    api,
                    admin,
                };
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not start: {:?}",
                output.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait(&mut self) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("broker exits after SIGTERM")
            .unwrap();
        // Let the readers drain the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.code().expect("exited, not killed")
    }
}

/// A config file for a broker in front of `upstream`.
fn config_file(dir: &tempfile::TempDir, upstream: SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = dir.path().join("token-broker.toml");
    let key_file = dir.path().join("partner-key");
    std::fs::write(&key_file, format!("{PARTNER_KEY}\n")).unwrap();
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"http://{upstream}\"\npartner_key_file = {key_file:?}\ntimeout = \"2s\"\n\
             [server]\nshutdown_grace = \"10s\"\n{extra}\n{}",
            clients_toml()
        ),
    )
    .unwrap();
    path
}

async fn upstream() -> (token_broker::simulator::Simulator, SocketAddr) {
    let sim = simulator();
    let addr = sim
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    (sim, addr)
}

async fn get(client: &reqwest::Client, url: String, key: &str) -> reqwest::Response {
    client.get(url).bearer_auth(key).send().await.unwrap()
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_slow_request_and_exits_zero() {
    let (sim, upstream) = upstream().await;
    sim.set_latency(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("serve")
        .arg("--config")
        .arg(config_file(&dir, upstream, ""));
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/tokens?{}",
        broker.api,
        member_query(ALICE, "AGENT")
    );

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { get(&client, url, READER_KEY).await }
    });
    while sim.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let readiness = client
        .get(format!("http://{}/readyz", broker.admin))
        .send()
        .await;

    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        readiness.unwrap().status(),
        503,
        "readiness turns 503 while draining"
    );
    assert_eq!(broker.wait().await, 0);
    assert!(broker.output().contains("all requests finished"));
}

#[tokio::test]
async fn neither_the_partner_key_nor_tokens_nor_emails_appear_in_logs() {
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, "[log]\nlevel = \"trace\"\n"));
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", broker.api);

    for (path, key) in [
        (
            format!("/v1/tokens?{}", member_query(ALICE, "AGENT")),
            READER_KEY,
        ),
        (
            format!("/v1/tokens?{}", member_query(ALICE, "AGENT")),
            READER_KEY,
        ),
        (
            format!("/ext/get-user-token?userId={CUSTOMER_ID}"),
            READER_KEY,
        ),
        (
            format!("/v1/tokens?{}", member_query(INACTIVE, "AGENT")),
            READER_KEY,
        ),
        (
            format!("/v1/tokens?{}", member_query("ghost@example.com", "AGENT")),
            READER_KEY,
        ),
        (
            format!("/v1/tokens?{}", member_query(ALICE, "AGENT")),
            "wrong-caller-key",
        ),
        (
            format!("/v1/tokens?{}", member_query(ALICE, "ADMIN")),
            READER_KEY,
        ),
    ] {
        get(&client, format!("{base}{path}"), key).await;
    }
    sim.set_fault(token_broker::simulator::Fault::Malformed);
    get(
        &client,
        format!("{base}/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
        READER_KEY,
    )
    .await;
    sim.set_fault(token_broker::simulator::Fault::None);
    sim.set_partner_key("something-else");
    get(
        &client,
        format!("{base}/v1/tokens?{}", member_query(ALICE, "CUSTOM_USER")),
        READER_KEY,
    )
    .await;
    broker.terminate();
    assert_eq!(broker.wait().await, 0);

    let logs = broker.output();
    assert!(logs.contains("request completed"), "{logs}");
    for secret in [
        PARTNER_KEY,
        ALICE_AGENT_TOKEN,
        ALICE_CUSTOM_TOKEN,
        INACTIVE_TOKEN,
        CUSTOMER_TOKEN,
        READER_KEY,
        "wrong-caller-key",
        ALICE,
        INACTIVE,
        "ghost@example.com",
        "example.com",
    ] {
        assert!(!logs.contains(secret), "logs contain {secret}:\n{logs}");
    }
}

#[tokio::test]
async fn check_config_redacts_secrets_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\npartner_key = \"{PARTNER_KEY}\"\n{}",
            clients_toml()
        ),
    )
    .unwrap();

    let output = command()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();

    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("partner_key = \"[REDACTED]\""), "{stdout}");
    assert!(stdout.contains("name = \"reader\""));
    assert!(!stdout.contains(PARTNER_KEY));
    assert!(!String::from_utf8_lossy(&output.stderr).contains(PARTNER_KEY));
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let valid = format!("[upstream]\npartner_key = \"{PARTNER_KEY}\"\n");
    // (case, config file, environment, the key the message must name)
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 7] = [
        (
            "unknown key",
            format!("{valid}{}[cache]\nttl_seconds = 3\n", clients_toml()),
            &[],
            "ttl_seconds",
        ),
        (
            "bad duration",
            format!("{valid}{}[cache]\nttl = \"ten minutes\"\n", clients_toml()),
            &[],
            "cache.ttl",
        ),
        (
            "no partner key",
            clients_toml(),
            &[],
            "upstream.partner_key",
        ),
        ("no clients", valid.clone(), &[], "clients"),
        (
            "bad env override",
            format!("{valid}{}", clients_toml()),
            &[("TOKEN_BROKER__UPSTREAM__TIMEOUT", "soon")],
            "upstream.timeout",
        ),
        (
            "bad hash",
            format!(
                "{valid}[[clients]]\nname = \"x\"\nkey_sha256 = \"abc\"\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "clients[0].key_sha256",
        ),
        (
            "missing key file",
            format!(
                "[upstream]\npartner_key_file = \"/nonexistent/key\"\n{}",
                clients_toml()
            ),
            &[],
            "upstream.partner_key_file",
        ),
    ];
    for (case, text, env, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for subcommand in ["serve", "check-config"] {
            let output = command()
                .arg(subcommand)
                .arg("--config")
                .arg(&path)
                .envs(env.iter().copied())
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{case} ({subcommand}): {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{case} ({subcommand}): {stderr:?} should name {key}"
            );
            assert!(!stderr.contains(PARTNER_KEY));
        }
    }
}

#[tokio::test]
async fn the_config_file_can_come_from_token_broker_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[cache]\nttl = \"nope\"\n").unwrap();

    let output = command()
        .arg("check-config")
        .env("TOKEN_BROKER_CONFIG", &path)
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cache.ttl"));
}

#[tokio::test]
async fn hash_key_prints_the_config_line() {
    let mut child = command()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"test\n")
        .await
        .unwrap();
    drop(stdin);

    let output = child.wait_with_output().await.unwrap();

    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "key_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n"
    );
}

#[tokio::test]
async fn demo_prints_a_curl_line_that_returns_a_token() {
    let mut broker = Running::start({
        let mut c = command();
        c.arg("demo");
        c
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let curl = loop {
        if let Some(line) = broker
            .output
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.trim_start().starts_with("curl "))
        {
            break line.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no curl line: {}",
            broker.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let key = curl
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    let url = curl.split('\'').nth(3).unwrap().to_owned();
    let response = get(&reqwest::Client::new(), url, &key).await;

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["email"], "alice@example.com");
    assert_eq!(body["active"], true);
    assert!(body["token"].as_str().unwrap().len() > 8);
    broker.terminate();
    assert_eq!(broker.wait().await, 0);
}
