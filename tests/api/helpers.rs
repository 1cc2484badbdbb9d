//! `TestApp`: a broker and a simulated vendor on port 0, with one helper per
//! endpoint; `process`: the real binary; `service_accounts`: signed
//! Kubernetes tokens and their JWKS.

pub mod certs;
pub mod process;
pub mod service_accounts;

use std::net::SocketAddr;

use token_broker::config::KeyDigest;
use token_broker::config::{Settings, Sources};
use token_broker::domain::UserType;
use token_broker::simulator::Simulator;
use token_broker::startup::Application;
use token_broker::telemetry::TraceMode;
use token_broker::telemetry::writer::LogQueue;
use tokio::sync::oneshot;

pub const PARTNER_KEY: &str = "pk-test-partner-key-4b1d";
/// Reads team-member and customer tokens.
pub const READER_KEY: &str = "reader-key-0123456789";
/// Reads team-member tokens only.
pub const TEAM_ONLY_KEY: &str = "team-only-key-0123456789";
/// Invalidates only.
pub const INVALIDATOR_KEY: &str = "invalidator-key-0123456789";

pub const ALICE: &str = "alice@example.com";
pub const ALICE_AGENT_TOKEN: &str = "tok-alice-agent-7f3a";
pub const ALICE_CUSTOM_TOKEN: &str = "tok-alice-custom-19cd";
pub const INACTIVE: &str = "inactive@example.com";
pub const INACTIVE_TOKEN: &str = "tok-inactive-5e21";
pub const CUSTOMER_ID: &str = "65f0c2a1b2c3d4e5f6a7b8c9";
pub const CUSTOMER_TOKEN: &str = "tok-customer-a0b1";

/// The vendor's users in every test.
pub fn simulator() -> Simulator {
    let sim = Simulator::new(PARTNER_KEY);
    sim.add_team_member(ALICE, UserType::Agent, ALICE_AGENT_TOKEN);
    sim.add_team_member(ALICE, UserType::CustomUser, ALICE_CUSTOM_TOKEN);
    sim.add_inactive_team_member(INACTIVE, UserType::Agent, INACTIVE_TOKEN);
    sim.add_customer(CUSTOMER_ID, CUSTOMER_TOKEN);
    sim
}

/// The `[[clients]]` of every test, as TOML.
pub fn clients_toml() -> String {
    format!(
        r#"
[[clients]]
name = "reader"
key_sha256 = "{}"
scopes = ["tokens:read", "customer_tokens:read"]

[[clients]]
name = "team-only"
key_sha256 = "{}"
scopes = ["tokens:read"]

[[clients]]
name = "invalidator"
key_sha256 = "{}"
scopes = ["tokens:invalidate"]
"#,
        KeyDigest::of_key(READER_KEY),
        KeyDigest::of_key(TEAM_ONLY_KEY),
        KeyDigest::of_key(INVALIDATOR_KEY),
    )
}

pub struct TestAppBuilder {
    sections: Vec<String>,
    simulator: Simulator,
    /// A simulator already serving here, shared with other brokers.
    upstream: Option<SocketAddr>,
    partner_key_file: Option<std::path::PathBuf>,
    /// Whether the callers of `clients_toml` are configured.
    default_clients: bool,
    /// Whether requests are traced as with OTLP export on.
    exporting: bool,
}

impl TestAppBuilder {
    /// Extra TOML, layered after the test defaults (e.g. `[upstream]\ntimeout = "300ms"`).
    pub fn config(mut self, toml: &str) -> Self {
        self.sections.push(toml.to_owned());
        self
    }

    /// Read the partner key from this file (and watch it) instead of inline.
    pub fn partner_key_file(mut self, path: &std::path::Path) -> Self {
        self.partner_key_file = Some(path.to_owned());
        self
    }

    /// Traces requests as the binary does with OTLP export on: the test
    /// installs the OpenTelemetry layer (`traces::Exported` does).
    pub fn exporting(mut self) -> Self {
        self.exporting = true;
        self
    }

    /// No configured callers (for `auth.allow_anonymous`).
    pub fn without_clients(mut self) -> Self {
        self.default_clients = false;
        self
    }

    /// In front of `simulator`, already serving at `addr` (several brokers, one vendor).
    pub fn upstream(mut self, simulator: &Simulator, addr: SocketAddr) -> Self {
        self.simulator = simulator.clone();
        self.upstream = Some(addr);
        self
    }

    pub async fn spawn(self) -> TestApp {
        let upstream = match self.upstream {
            Some(addr) => addr,
            None => self
                .simulator
                .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("simulator binds"),
        };
        let key = match &self.partner_key_file {
            Some(path) => format!("partner_key_file = {:?}", path.display().to_string()),
            None => format!("partner_key = \"{PARTNER_KEY}\""),
        };
        let base = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
             [upstream]\nbase_url = \"http://{upstream}\"\n{key}\n"
        );
        let mut layers = vec![base];
        if self.default_clients && !self.sections.iter().any(|s| s.contains("[[clients]]")) {
            layers.push(clients_toml());
        }
        layers.extend(self.sections);
        let settings = Settings::load(&Sources {
            layers,
            ..Sources::default()
        })
        .expect("test configuration is valid");
        settings
            .require_serving()
            .expect("test configuration can serve");
        // Audit events are written to memory, in order, as the binary writes
        // them to stdout; the writer thread ends with the test process.
        let audit = Captured::default();
        let (queue, _writer) = LogQueue::spawn(audit.clone(), settings.log.queue_bytes);
        let mode = TraceMode::new(self.exporting, settings.log.format);
        let app = Application::build(&settings, queue.audit_trail(), mode)
            .await
            .expect("application builds");
        let api = app.api_addr();
        let admin = app.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            app.run_until(async {
                let _ = stopped.await;
            })
            .await;
        });
        TestApp {
            api,
            admin,
            sim: self.simulator,
            http: reqwest::Client::new(),
            stop: Some(stop),
            audit,
        }
    }
}

/// What a log queue wrote, kept in memory.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct TestApp {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub sim: Simulator,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    audit: Captured,
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            sections: Vec::new(),
            simulator: simulator(),
            upstream: None,
            partner_key_file: None,
            default_clients: true,
            exporting: false,
        }
    }

    pub async fn spawn() -> TestApp {
        Self::builder().spawn().await
    }

    /// The audit events written so far (each answered request's is there).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.audit.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("an audit event is one JSON line"))
            .collect()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.api)
    }

    /// `GET /v1/tokens?{query}` as the reader.
    pub async fn get_token(&self, query: &str) -> reqwest::Response {
        self.get_token_as(Some(READER_KEY), query).await
    }

    /// `GET /v1/tokens?{query}` with `key` as bearer (none: no Authorization).
    pub async fn get_token_as(&self, key: Option<&str>, query: &str) -> reqwest::Response {
        self.send(reqwest::Method::GET, key, &format!("/v1/tokens?{query}"))
            .await
    }

    /// `GET /ext/get-user-token?{query}` as the reader.
    pub async fn get_vendor_token(&self, query: &str) -> reqwest::Response {
        self.send(
            reqwest::Method::GET,
            Some(READER_KEY),
            &format!("/ext/get-user-token?{query}"),
        )
        .await
    }

    /// `DELETE /v1/tokens?{query}` with `key`.
    pub async fn delete_token_as(&self, key: Option<&str>, query: &str) -> reqwest::Response {
        self.send(reqwest::Method::DELETE, key, &format!("/v1/tokens?{query}"))
            .await
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        key: Option<&str>,
        path_and_query: &str,
    ) -> reqwest::Response {
        let mut request = self.http.request(method, self.url(path_and_query));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.expect("broker answers")
    }

    /// `GET` on the admin listener; returns status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("admin answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The value of one sample line of `/metrics`, e.g.
    /// `token_broker_cache_lookups_total{result="hit"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        sample_value(&text, sample).unwrap_or(0.0)
    }
}

impl Drop for TestApp {
    /// Begins the broker's shutdown so no test leaves a server behind.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Query string for a team member (email percent-encoded).
pub fn member_query(email: &str, user_type: &str) -> String {
    format!("email={}&type={user_type}", urlencode(email))
}

pub fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// The problem+json body of an error response, after checking its shape.
pub async fn problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "errors are problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:token-broker:problem:")
    );
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

/// `GET path` as the caller with `key`, over HTTP/2 on `io` (a connection
/// opened with prior knowledge, or one whose ALPN chose `h2`).
pub async fn http2_get(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    path: &str,
    key: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("an HTTP/2 connection");
    tokio::spawn(connection);
    let request = axum::http::Request::get(format!("http://localhost{path}"))
        .header("authorization", format!("Bearer {key}"))
        .body(axum::body::Body::empty())
        .unwrap();
    sender.send_request(request).await.unwrap()
}

/// The value of `sample` (a metric name with its labels, as exposed) in
/// Prometheus text; `None` when it is not there.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}
