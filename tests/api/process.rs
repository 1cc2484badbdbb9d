//! The real binary: command line, exit codes, logs, signals.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_broker::simulator::Fault;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_token-broker");

pub fn command() -> Command {
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

/// Collects the child's stdout and stderr, line by line.
fn capture(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
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
    output
}

/// A running `token-broker` whose output is captured line by line.
pub struct Running {
    pub child: Child,
    output: Arc<Mutex<Vec<String>>>,
    pub api: SocketAddr,
    pub admin: SocketAddr,
}

impl Running {
    /// `serve` with the test configuration, written into `dir`, in front of `upstream`.
    pub async fn serve(dir: &tempfile::TempDir, upstream: SocketAddr) -> Running {
        let mut command = command();
        command
            .arg("serve")
            .arg("--config")
            .arg(config_file(dir, upstream, ""));
        Running::start(command).await
    }

    /// Starts `args` and waits until the broker logs that it is listening.
    pub async fn start(mut command: Command) -> Running {
        let mut child = command.spawn().expect("binary starts");
        let output = capture(&mut child);
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

    /// Starts `command` on free ports it is given, and waits for `/healthz`:
    /// for log levels that do not print the `listening` line.
    pub async fn start_quiet(mut command: Command) -> Running {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (api, admin) = (free(), free());
        command
            .env("TOKEN_BROKER__SERVER__LISTEN", api.to_string())
            .env("TOKEN_BROKER__SERVER__ADMIN_LISTEN", admin.to_string());
        let mut child = command.spawn().expect("binary starts");
        let output = capture(&mut child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        while http
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not start: {:?}",
                output.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Running {
            child,
            output,
            api,
            admin,
        }
    }

    /// The value of `sample` on its `/metrics`; `None` when it is not there.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sample_value(&text, sample)
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn terminate(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then asserts the clean exit (code 0) the command line promises.
    pub async fn stop(&mut self) {
        self.terminate();
        assert_eq!(self.wait().await, 0, "a clean shutdown exits 0");
    }

    pub async fn wait(&mut self) -> i32 {
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
pub fn config_file(
    dir: &tempfile::TempDir,
    upstream: SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.path().join("token-broker.toml");
    let key_file = dir.path().join("partner-key");
    std::fs::write(&key_file, format!("{PARTNER_KEY}\n")).unwrap();
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"http://{upstream}\"\npartner_key_file = {key_file:?}\ntimeout = \"1s\"\n\
             [server]\nshutdown_grace = \"10s\"\n{extra}\n{}",
            clients_toml()
        ),
    )
    .unwrap();
    path
}

pub async fn upstream() -> (token_broker::simulator::Simulator, SocketAddr) {
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
    sim.set_latency(Duration::from_millis(700));
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Running::serve(&dir, upstream).await;
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

const LIMITED_KEY: &str = "limited-caller-key-5d1f";
const ROTATED_KEY: &str = "pk-rotated-in-logs-test-77aa";

/// A caller allowed one request a minute, for the 429 path.
fn limited_client() -> String {
    format!(
        "[[clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nrate_limit_per_minute = 1\n",
        token_broker::config::KeyDigest::of_key(LIMITED_KEY)
    )
}

/// The JSON events a broker logged.
/// The JSON log events of `output`.
pub fn events(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The audit events of `output`.
pub fn audit_events(output: &str) -> Vec<serde_json::Value> {
    events(output)
        .into_iter()
        .filter(|event| event["target"] == "audit")
        .collect()
}

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

#[tokio::test]
async fn sighup_rereads_a_key_file_the_watcher_cannot_see() {
    let (sim, upstream) = upstream().await;
    sim.set_partner_keys(&[PARTNER_KEY, ROTATED_KEY]);
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = config_file(&dir, upstream, "[cache]\nttl = \"1ms\"\n");
    // The key file is a link into a directory nobody watches: only SIGHUP tells.
    let real_key = elsewhere.path().join("real-key");
    std::fs::write(&real_key, PARTNER_KEY).unwrap();
    std::fs::remove_file(dir.path().join("partner-key")).unwrap();
    std::os::unix::fs::symlink(&real_key, dir.path().join("partner-key")).unwrap();
    let mut command = command();
    command.arg("--config").arg(config);
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/tokens?{}",
        broker.api,
        member_query(ALICE, "AGENT")
    );
    let last_bearer = || sim.requests().pop().and_then(|r| r.authorization).unwrap();

    assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
    std::fs::write(&real_key, ROTATED_KEY).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
    assert_eq!(last_bearer(), format!("Bearer {PARTNER_KEY}"));
    let pid = broker.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
        if last_bearer() == format!("Bearer {ROTATED_KEY}") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the key"
        );
    }

    broker.terminate();
    assert_eq!(broker.wait().await, 0, "SIGHUP does not stop the service");
}

#[tokio::test]
async fn core_dumps_are_disabled() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command.arg("--config").arg(config_file(&dir, upstream, ""));
    let mut broker = Running::start(command).await;

    let pid = broker.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    broker.terminate();
    broker.wait().await;

    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let values: Vec<_> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "{core}");
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
    let cases: [Case; 17] = [
        (
            "service accounts without an issuer",
            format!(
                "{valid}[[clients]]\nname = \"sa\"\nservice_accounts = [\"inbox:app\"]\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "auth.kubernetes.issuer",
        ),
        (
            "a malformed service account",
            format!(
                "{valid}[auth.kubernetes]\nissuer = \"https://k\"\njwks_file = \"/nonexistent\"\n[[clients]]\nname = \"sa\"\nservice_accounts = [\"Inbox/App\"]\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "clients[0].service_accounts[0]",
        ),
        (
            "a JWKS URL without TLS",
            format!(
                "{valid}{}[auth.kubernetes]\nissuer = \"https://k\"\njwks_url = \"http://kubernetes.default.svc/openid/v1/jwks\"\n",
                clients_toml()
            ),
            &[],
            "auth.kubernetes.jwks_url",
        ),
        (
            "an unreadable JWKS file",
            format!(
                "{valid}{}[auth.kubernetes]\nissuer = \"https://k\"\njwks_file = \"/nonexistent/jwks.json\"\n",
                clients_toml()
            ),
            &[],
            "auth.kubernetes.jwks_file",
        ),
        (
            "plain http to a remote vendor",
            format!(
                "{valid}base_url = \"http://vendor.example:80\"\n{}",
                clients_toml()
            ),
            &[],
            "upstream.base_url",
        ),
        (
            "anonymous beside clients",
            format!(
                "{valid}[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n{}",
                clients_toml()
            ),
            &[],
            "auth.allow_anonymous",
        ),
        (
            "anonymous off loopback",
            format!("{valid}[auth]\nallow_anonymous = true\n"),
            &[("TOKEN_BROKER__SERVER__LISTEN", "0.0.0.0:0")],
            "auth.allow_anonymous",
        ),
        (
            "a shared cache without an encryption key",
            format!(
                "{valid}{}[cache]\nredis_url = \"redis://127.0.0.1:6379\"\n",
                clients_toml()
            ),
            &[],
            "cache.encryption_key_file",
        ),
        (
            "an unreadable encryption key",
            format!(
                "{valid}{}[cache]\nredis_url = \"redis://127.0.0.1:6379\"\nencryption_key_file = \"/nonexistent/k\"\n",
                clients_toml()
            ),
            &[],
            "cache.encryption_key_file",
        ),
        (
            "missing audit key file",
            format!(
                "{valid}[audit]\nhash_key_file = \"/nonexistent/audit-key\"\n{}",
                clients_toml()
            ),
            &[],
            "audit.hash_key_file",
        ),
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
async fn a_configuration_line_holding_a_secret_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    let secret = "pk-inline-secret-4f7a";
    std::fs::write(
        &path,
        format!("[upstream]\npartner_key = \"{secret}\nbase_url = 1\n"),
    )
    .unwrap();
    for subcommand in ["serve", "check-config"] {
        let output = command()
            .arg(subcommand)
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("line 2"), "{stderr}");
        assert!(
            !stderr.contains(secret) && !String::from_utf8_lossy(&output.stdout).contains(secret)
        );
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

async fn hash_key(args: &[&str], stdin_text: &[u8]) -> std::process::Output {
    let mut child = command()
        .arg("hash-key")
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, stdin_text)
        .await
        .unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn hash_key_prints_the_config_line() {
    let key = "caller-key-0123456789-0123456789-x";
    let output = hash_key(&[], format!("{key}\n").as_bytes()).await;

    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!(
            "key_sha256 = \"{}\"\n",
            token_broker::config::KeyDigest::of_key(key)
        )
    );
}

#[tokio::test]
async fn hash_key_refuses_a_short_key_and_generates_a_strong_one() {
    let short = hash_key(&[], b"test\n").await;
    assert_ne!(short.status.code(), Some(0));
    assert!(short.stdout.is_empty());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 characters"));

    let generated = hash_key(&["--generate"], b"").await;
    assert_eq!(generated.status.code(), Some(0));
    let text = String::from_utf8(generated.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.rsplit_once(": ").map(|(_, k)| k.to_owned()))
        .expect("the key is printed");
    assert!(
        key.len() >= 32 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    assert!(text.contains(&format!(
        "key_sha256 = \"{}\"",
        token_broker::config::KeyDigest::of_key(&key)
    )));
    let again = hash_key(&["--generate"], b"").await;
    assert_ne!(
        String::from_utf8(again.stdout).unwrap(),
        text,
        "random each time"
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
    assert!(
        broker.output().contains("Listening on loopback only"),
        "the demo says where it listens"
    );

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["email"], "alice@example.com");
    assert_eq!(body["active"], true);
    assert!(body["token"].as_str().unwrap().len() > 8);
    broker.stop().await;
}

#[tokio::test]
async fn sighup_with_an_inline_key_does_not_stop_the_service() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"http://{upstream}\"\npartner_key = \"{PARTNER_KEY}\"\n{}",
            clients_toml()
        ),
    )
    .unwrap();
    let mut command = command();
    command.arg("--config").arg(&path);
    let mut broker = Running::start(command).await;

    let pid = broker.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = get(
        &reqwest::Client::new(),
        format!(
            "http://{}/v1/tokens?{}",
            broker.api,
            member_query(ALICE, "AGENT")
        ),
        READER_KEY,
    )
    .await;

    assert!(sent.success());
    assert_eq!(response.status(), 200, "still serving after SIGHUP");
    broker.stop().await;
    assert!(broker.output().contains("nothing to re-read"));
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
