//! The real binary as a test harness: a `Command` for it, a `Running`
//! broker with its output captured, a config file, and readers of its logs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::*;

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

/// The child's output, line by line, and the readers that collect it.
#[derive(Clone, Default)]
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    readers: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Output {
    /// Collects the child's stdout and stderr.
    fn capture(child: &mut Child) -> Self {
        let output = Output::default();
        output.collect(child.stdout.take().unwrap());
        output.collect(child.stderr.take().unwrap());
        output
    }

    /// Appends each line of `stream` until it ends.
    fn collect(&self, stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let lines = self.lines.clone();
        let reader = tokio::spawn(async move {
            let mut stream = BufReader::new(stream).lines();
            while let Ok(Some(line)) = stream.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
        self.readers.lock().unwrap().push(reader);
    }

    /// Waits until every stream read so far has ended (the process exited).
    async fn drained(&self) {
        let readers = std::mem::take(&mut *self.readers.lock().unwrap());
        for reader in readers {
            tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .expect("the output ends once the process has exited")
                .unwrap();
        }
    }
}

/// A running `token-broker` whose output is captured line by line.
pub struct Running {
    pub child: Child,
    output: Output,
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
        let output = Output::capture(&mut child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listening = output.lines.lock().unwrap().iter().find_map(|line| {
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
                output.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `command` on port 0 and waits for `/healthz`: for log levels
    /// that do not print the `listening` line.
    pub async fn start_quiet(command: Command) -> Running {
        let (running, stdout) = Running::start_unread(command).await;
        running.read_stdout(stdout);
        running
    }

    /// Starts `command` with a stdout nobody reads (a stalled log
    /// collector: once the pipe is full every write blocks) until
    /// `read_stdout`; stderr is captured. Waits for `/healthz`.
    pub async fn start_stalled(command: Command) -> (Running, tokio::process::ChildStdout) {
        Running::start_unread(command).await
    }

    /// Starts `command` on port 0, capturing stderr, and waits for
    /// `/healthz`; stdout is handed back unread. The ports are the ones the
    /// process listens on (its two listening sockets, found in `/proc`): the
    /// one answering `/healthz` is the admin listener.
    async fn start_unread(mut command: Command) -> (Running, tokio::process::ChildStdout) {
        let mut child = command.spawn().expect("binary starts");
        let stdout = child.stdout.take().unwrap();
        let output = Output::default();
        output.collect(child.stderr.take().unwrap());
        let pid = child.id().expect("just started");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            let ports = listening_ports(pid);
            if let [first, second] = ports[..] {
                for (admin, api) in [(first, second), (second, first)] {
                    let healthz = format!("http://127.0.0.1:{admin}/healthz");
                    if let Ok(response) = http.get(healthz).send().await
                        && response.status() == 200
                    {
                        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
                        let running = Running {
                            child,
                            output,
                            api: at(api),
                            admin: at(admin),
                        };
                        return (running, stdout);
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not start: {:?}",
                output.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /v1/tokens?{query}` on this broker's API.
    pub fn tokens_url(&self, query: &str) -> String {
        format!("http://{}/v1/tokens?{query}", self.api)
    }

    /// `GET /v1/tokens?{query}` as the caller with `key`.
    pub async fn get_token(&self, query: &str, key: &str) -> reqwest::Response {
        get(&reqwest::Client::new(), self.tokens_url(query), key).await
    }

    /// Starts reading the stdout `start_stalled` left unread.
    pub fn read_stdout(&self, stdout: tokio::process::ChildStdout) {
        self.output.collect(stdout);
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
        self.output.lines.lock().unwrap().join("\n")
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
        self.output.drained().await;
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

pub async fn get(client: &reqwest::Client, url: String, key: &str) -> reqwest::Response {
    client.get(url).bearer_auth(key).send().await.unwrap()
}

/// A partner key the tests rotate to.
pub const ROTATED_KEY: &str = "pk-rotated-in-logs-test-77aa";
pub const LIMITED_KEY: &str = "limited-caller-key-5d1f";

/// A caller allowed one request a minute, for the 429 path.
pub fn limited_client() -> String {
    format!(
        "[[clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nrate_limit_per_minute = 1\n",
        token_broker::config::KeyDigest::of_key(LIMITED_KEY)
    )
}

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

/// The TCP ports process `pid` listens on: its socket inodes, found among
/// the listening sockets of its network namespace (Linux).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // local address, state (0A: LISTEN), inode
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != "0A" || !inodes.contains(*inode) {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}
