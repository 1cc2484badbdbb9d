//! The BotPenguin client: one pooled `reqwest` client that asks
//! `GET /ext/get-user-token` for a token and turns every answer into either
//! a `Fetched` token or a typed `UpstreamError`.

pub mod fair;
pub mod partner_key;
pub mod resilience;

pub use fair::Askers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;

use partner_key::PartnerKey;
use resilience::Resilience;
use serde::Deserialize;
use tracing::Instrument;
use url::Url;

use crate::config::UpstreamSettings;
use crate::domain::{Identity, Token};
use crate::telemetry::metrics::{Metrics, UpstreamOutcome};

/// The vendor endpoint, relative to `upstream.base_url`.
pub const TOKEN_PATH: &str = "ext/get-user-token";
/// Largest vendor answer read; a token answer is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the vendor handed out.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub token: Token,
    pub active: bool,
}

/// Every way asking the vendor can fail. Messages carry no URL, body, key or token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the vendor did not answer within the timeout")]
    Timeout,
    #[error("cannot connect to the vendor: {0}")]
    Connect(String),
    #[error("the vendor rejected the partner key (status {0})")]
    Rejected(u16),
    #[error("the vendor has no such user")]
    NotFound,
    #[error("the vendor is unavailable (status {status})")]
    Unavailable {
        status: u16,
        /// The vendor's `Retry-After`, when it sent one in seconds.
        retry_after: Option<Duration>,
    },
    #[error("the vendor answered with an unusable body: {0}")]
    Malformed(String),
    #[error("the vendor answered with unexpected status {0}")]
    UnexpectedStatus(u16),
    #[error("request to the vendor failed: {0}")]
    Transport(String),
    #[error("the circuit to the vendor is open")]
    CircuitOpen { retry_after: Duration },
    #[error("too many requests to the vendor are in flight")]
    Saturated,
}

impl UpstreamError {
    /// The `outcome` label of `token_broker_upstream_requests_total`.
    pub fn outcome(&self) -> UpstreamOutcome {
        match self {
            UpstreamError::Timeout => UpstreamOutcome::Timeout,
            UpstreamError::Connect(_) => UpstreamOutcome::ConnectError,
            UpstreamError::Rejected(_) => UpstreamOutcome::Rejected,
            UpstreamError::NotFound => UpstreamOutcome::NotFound,
            UpstreamError::Unavailable { .. } => UpstreamOutcome::Unavailable,
            UpstreamError::Malformed(_) => UpstreamOutcome::Malformed,
            UpstreamError::UnexpectedStatus(_) => UpstreamOutcome::UnexpectedStatus,
            UpstreamError::Transport(_) => UpstreamOutcome::TransportError,
            UpstreamError::CircuitOpen { .. } => UpstreamOutcome::CircuitOpen,
            UpstreamError::Saturated => UpstreamOutcome::Saturated,
        }
    }

    /// Worth another attempt: connect errors, 429, 502, 503, 504.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::Unavailable {
                    status: 429 | 502 | 503 | 504,
                    ..
                }
        )
    }

    /// The vendor is failing (not answering, or not usefully): counts against
    /// the circuit and lets a stale entry be served.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout
                | UpstreamError::Connect(_)
                | UpstreamError::Unavailable { .. }
                | UpstreamError::Transport(_)
                | UpstreamError::Malformed(_)
                | UpstreamError::CircuitOpen { .. }
                | UpstreamError::Saturated
        )
    }

    /// Maps a vendor status (HTTP, or the body's `code`) that is not success.
    fn from_status(status: u16, retry_after: Option<Duration>) -> Self {
        match status {
            401 | 403 => UpstreamError::Rejected(status),
            404 => UpstreamError::NotFound,
            429 | 500..=599 => UpstreamError::Unavailable {
                status,
                retry_after,
            },
            _ => UpstreamError::UnexpectedStatus(status),
        }
    }

    fn from_reqwest(err: reqwest::Error) -> Self {
        // `without_url`: the URL holds the email address.
        let err = err.without_url();
        // A connect timeout is both `is_connect` and `is_timeout`: it is a
        // connect error (retried), not the vendor being slow to answer.
        if err.is_connect() {
            UpstreamError::Connect(error_chain(&err))
        } else if err.is_timeout() {
            UpstreamError::Timeout
        } else {
            UpstreamError::Transport(error_chain(&err))
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Deserialize)]
struct VendorBody {
    success: Option<bool>,
    code: Option<i64>,
    data: Option<VendorData>,
}

#[derive(Deserialize)]
struct VendorData {
    #[serde(rename = "permanentToken")]
    permanent_token: Option<VendorToken>,
}

#[derive(Deserialize)]
struct VendorToken {
    key: String,
    active: bool,
}

/// Interprets a vendor answer. The vendor may say HTTP 200 with
/// `"success":false` and the real status in `code`: the body's code wins.
fn parse_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Fetched, UpstreamError> {
    if !status.is_success() {
        return Err(UpstreamError::from_status(status.as_u16(), retry_after));
    }
    // serde_json's message quotes the offending value, which may be a token:
    // only its category and position are kept.
    let body: VendorBody = serde_json::from_slice(body).map_err(|e| {
        UpstreamError::Malformed(format!(
            "not the documented JSON shape ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let code = body.code.unwrap_or(i64::from(status.as_u16()));
    if code != 200 {
        let code = u16::try_from(code).unwrap_or(0);
        return Err(UpstreamError::from_status(code, retry_after));
    }
    if body.success != Some(true) {
        return Err(UpstreamError::Malformed("success is not true".into()));
    }
    let token = body
        .data
        .and_then(|d| d.permanent_token)
        .ok_or_else(|| UpstreamError::Malformed("data.permanentToken is missing".into()))?;
    if token.key.is_empty() {
        return Err(UpstreamError::Malformed(
            "data.permanentToken.key is empty".into(),
        ));
    }
    Ok(Fetched {
        token: Token::new(token.key),
        active: token.active,
    })
}

/// `Retry-After` in its seconds form; the date form is ignored.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The one long-lived client for the vendor API.
pub struct UpstreamClient {
    http: reqwest::Client,
    endpoint: Url,
    /// `server.address` and `server.port` of the client spans.
    host: String,
    port: u16,
    partner_key: Arc<PartnerKey>,
    resilience: Resilience,
    metrics: Arc<Metrics>,
}

impl UpstreamClient {
    pub fn new(
        settings: &UpstreamSettings,
        partner_key: Arc<PartnerKey>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            // A 3xx is an answer like any other (a 502): never followed to
            // wherever it points, partner key and all.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let endpoint = endpoint(&settings.base_url);
        Ok(Self {
            http,
            host: endpoint.host_str().unwrap_or_default().to_owned(),
            port: endpoint.port_or_known_default().unwrap_or_default(),
            endpoint,
            partner_key,
            resilience: Resilience::new(settings, metrics.clone()),
            metrics,
        })
    }

    /// Asks the vendor for the token of `identity` on behalf of `askers`,
    /// within the limits of `Resilience`: circuit, vendor slots shared in
    /// turn among callers, retries, one overall deadline.
    pub async fn fetch(
        &self,
        identity: &Identity,
        askers: &Askers,
    ) -> Result<Fetched, UpstreamError> {
        self.resilience
            .run(askers, |deadline| self.measured_attempt(identity, deadline))
            .await
    }

    /// One request to the vendor, in its own client span, timed and counted.
    async fn measured_attempt(
        &self,
        identity: &Identity,
        deadline: tokio::time::Instant,
    ) -> Result<Fetched, UpstreamError> {
        let span = tracing::info_span!(
            "upstream",
            otel.name = "GET /ext/get-user-token",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "GET",
            url.template = "/ext/get-user-token",
            server.address = %self.host,
            server.port = self.port,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::telemetry::record_trace_ids(&span);
        let started = Instant::now();
        let result = tokio::time::timeout_at(deadline, self.attempt(identity))
            .instrument(span.clone())
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        if let Err(error) = &result {
            span.record("error.type", error.outcome().as_str());
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.upstream_duration.observe(started.elapsed());
        self.metrics.upstream_outcome(match &result {
            Ok(fetched) if fetched.active => UpstreamOutcome::Ok,
            Ok(_) => UpstreamOutcome::Inactive,
            Err(e) => e.outcome(),
        });
        result
    }

    async fn attempt(&self, identity: &Identity) -> Result<Fetched, UpstreamError> {
        let mut url = self.endpoint.clone();
        {
            let mut query = url.query_pairs_mut();
            match identity {
                Identity::TeamMember { email, user_type } => {
                    query
                        .append_pair("email", email.as_str())
                        .append_pair("type", user_type.as_str());
                }
                Identity::Customer(user_id) => {
                    query.append_pair("userId", user_id.as_str());
                }
            }
        }
        let mut trace_headers = reqwest::header::HeaderMap::new();
        crate::telemetry::inject_current(&mut trace_headers);
        let partner_key = self.partner_key.current();
        let mut response = self
            .http
            .get(url)
            .headers(trace_headers)
            .bearer_auth(partner_key.expose_secret())
            .header("authtype", HeaderValue::from_static("Key"))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .send()
            .await
            .map_err(UpstreamError::from_reqwest)?;
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(UpstreamError::from_reqwest)?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(UpstreamError::Malformed("answer is too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        parse_answer(status, retry_after, &body)
    }
}

/// `{base_url}/ext/get-user-token`, keeping any path prefix of the base URL.
fn endpoint(base: &Url) -> Url {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    // A base URL validated by `config` always joins with a relative path.
    base.join(TOKEN_PATH).unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<Fetched, UpstreamError> {
        parse_answer(StatusCode::OK, None, body.as_bytes())
    }

    #[test]
    fn documented_success_body_parses() {
        let f = ok(r#"{"success":true,"message":"","data":{"permanentToken":{"key":"t1","active":true}},"code":200}"#).unwrap();
        assert_eq!(f.token.expose(), "t1");
        assert!(f.active);
    }

    #[test]
    fn body_code_wins_over_http_200() {
        let r = ok(r#"{"success":false,"message":"User not found","data":null,"code":404}"#);
        assert!(matches!(r, Err(UpstreamError::NotFound)));
        let r = ok(r#"{"success":false,"message":"bad key","code":401}"#);
        assert!(matches!(r, Err(UpstreamError::Rejected(401))));
        let r = ok(r#"{"success":false,"message":"busy","code":503}"#);
        assert!(matches!(
            r,
            Err(UpstreamError::Unavailable { status: 503, .. })
        ));
    }

    #[test]
    fn unusable_bodies_are_malformed() {
        for body in [
            "<html>",
            "",
            r#"{"success":true,"code":200}"#,
            r#"{"success":true,"code":200,"data":{"permanentToken":{"key":"","active":true}}}"#,
            r#"{"success":true,"code":200,"data":{"permanentToken":{"key":7,"active":true}}}"#,
            r#"{"code":200,"data":{"permanentToken":{"key":"k","active":true}}}"#,
        ] {
            assert!(
                matches!(ok(body), Err(UpstreamError::Malformed(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn http_statuses_map_to_typed_errors() {
        let at = |s: u16| parse_answer(StatusCode::from_u16(s).unwrap(), None, b"{}");
        assert!(matches!(at(401), Err(UpstreamError::Rejected(401))));
        assert!(matches!(at(403), Err(UpstreamError::Rejected(403))));
        assert!(matches!(at(404), Err(UpstreamError::NotFound)));
        assert!(matches!(
            at(429),
            Err(UpstreamError::Unavailable { status: 429, .. })
        ));
        assert!(matches!(
            at(502),
            Err(UpstreamError::Unavailable { status: 502, .. })
        ));
        assert!(matches!(at(418), Err(UpstreamError::UnexpectedStatus(418))));
    }

    #[test]
    fn retry_after_is_read_in_seconds_form_only() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2026 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
        let r = parse_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(3)),
            b"",
        );
        assert!(matches!(
            r,
            Err(UpstreamError::Unavailable { retry_after: Some(d), .. }) if d.as_secs() == 3
        ));
    }

    #[test]
    fn only_connect_errors_and_429_502_503_504_are_retried() {
        let unavailable = |status| UpstreamError::Unavailable {
            status,
            retry_after: None,
        };
        for retried in [
            UpstreamError::Connect("refused".into()),
            unavailable(429),
            unavailable(502),
            unavailable(503),
            unavailable(504),
        ] {
            assert!(retried.is_retryable(), "{retried:?}");
        }
        for not in [
            unavailable(500),
            UpstreamError::Timeout,
            UpstreamError::NotFound,
            UpstreamError::Rejected(401),
            UpstreamError::UnexpectedStatus(400),
            UpstreamError::Malformed("x".into()),
        ] {
            assert!(!not.is_retryable(), "{not:?}");
        }
    }

    #[test]
    fn endpoint_keeps_a_base_path() {
        let e = endpoint(&Url::parse("https://api.v7.botpenguin.com").unwrap());
        assert_eq!(
            e.as_str(),
            "https://api.v7.botpenguin.com/ext/get-user-token"
        );
        let e = endpoint(&Url::parse("http://gw.internal/botpenguin").unwrap());
        assert_eq!(
            e.as_str(),
            "http://gw.internal/botpenguin/ext/get-user-token"
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", Token::new("very-secret")),
            "Token([REDACTED])"
        );
    }
}
