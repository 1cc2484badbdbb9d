//! A fake BotPenguin that answers `GET /ext/get-user-token` like the vendor,
//! for `demo`, `simulate-upstream` and the tests. It holds a set of team
//! members and customers, checks the partner key, counts the calls it gets,
//! and has fault knobs (latency, hangs, malformed bodies, statuses).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::domain::UserType;

/// How the simulated vendor misbehaves, applied to every request until changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Never answer.
    Hang,
    /// HTTP 200 with a body that is not the documented JSON.
    Malformed,
    /// This HTTP status with a vendor-style error body.
    Status(u16),
    /// This HTTP status with `Retry-After: <seconds>`.
    StatusRetryAfter(u16, u64),
    /// HTTP 200 with `"success":false` and this `code`.
    BodyCode(u16),
    /// HTTP 200 with exactly this body.
    Body(&'static str),
}

/// How an unknown user is reported; the vendor documents neither, so both are simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotFoundStyle {
    /// HTTP 404 with a vendor-style body.
    #[default]
    HttpStatus,
    /// HTTP 200 with `"success":false,"code":404`.
    BodyCode,
}

/// One request as the simulator saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// The raw query string, as sent on the wire.
    pub raw_query: String,
    /// The query decoded as a web server decodes `application/x-www-form-urlencoded`.
    pub params: Vec<(String, String)>,
    pub authorization: Option<String>,
    pub authtype: Option<String>,
    pub headers: HeaderMap,
}

#[derive(Debug, Clone)]
struct SimToken {
    key: String,
    active: bool,
}

#[derive(Default)]
struct SimState {
    partner_keys: RwLock<Vec<String>>,
    members: RwLock<HashMap<(String, UserType), SimToken>>,
    customers: RwLock<HashMap<String, SimToken>>,
    fault: RwLock<Fault>,
    not_found: RwLock<NotFoundStyle>,
    /// Every identity it does not know has an active token too (for fuzzing).
    any_user: std::sync::atomic::AtomicBool,
    latency: RwLock<Duration>,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// The latest `SEEN_REQUESTS` requests: a long-running simulator keeps no more.
    seen: Mutex<VecDeque<SeenRequest>>,
}

/// How many requests a simulator remembers for `requests()`.
pub const SEEN_REQUESTS: usize = 1024;

/// A handle on a simulated vendor; clones share state.
#[derive(Clone, Default)]
pub struct Simulator {
    state: Arc<SimState>,
}

/// Lower-cases the domain, as the broker does, so lookups match.
fn normalise(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_lowercase()),
        None => email.to_owned(),
    }
}

impl Simulator {
    /// An empty vendor that accepts `partner_key`.
    pub fn new(partner_key: &str) -> Self {
        let sim = Self::default();
        sim.set_partner_key(partner_key);
        sim
    }

    /// The data set of `demo` and `simulate-upstream`: three team members, an
    /// inactive one and two customers, with fresh random tokens.
    pub fn demo(partner_key: &str) -> Self {
        let sim = Self::new(partner_key);
        let token = |prefix: &str| format!("{prefix}_{}", random_hex(16));
        sim.add_team_member("alice@example.com", UserType::Agent, &token("agt"));
        sim.add_team_member("bob@example.com", UserType::CustomUser, &token("cus"));
        sim.add_team_member("carol@example.com", UserType::Customer, &token("own"));
        sim.add_inactive_team_member("dave@example.com", UserType::Agent, &token("agt"));
        sim.add_customer("65f0c2a1b2c3d4e5f6a7b8c9", &token("api"));
        sim.add_customer("cust_1002", &token("api"));
        sim
    }

    /// Agents `user0@example.com` … `user{n-1}@example.com`, each with a
    /// random 48-character token (the size of a real one), for load tests.
    pub fn add_numbered_agents(&self, n: usize) {
        let mut members = write(&self.state.members);
        for i in 0..n {
            members.insert(
                (format!("user{i}@example.com"), UserType::Agent),
                SimToken {
                    key: random_hex(24),
                    active: true,
                },
            );
        }
    }

    /// A readable list of the simulated users, for `simulate-upstream`.
    pub fn describe(&self) -> String {
        let mut lines: Vec<String> = read(&self.state.members)
            .iter()
            .map(|((email, t), tok)| {
                format!("  team member  email={email} type={t}{}", inactive(tok))
            })
            .chain(
                read(&self.state.customers)
                    .iter()
                    .map(|(id, tok)| format!("  customer     userId={id}{}", inactive(tok))),
            )
            .collect();
        lines.sort();
        lines.join("\n")
    }

    /// Accept only `key` from now on.
    pub fn set_partner_key(&self, key: &str) {
        self.set_partner_keys(&[key]);
    }

    /// Accept each of `keys`, as a vendor does while a key is being rotated.
    pub fn set_partner_keys(&self, keys: &[&str]) {
        *write(&self.state.partner_keys) = keys.iter().map(|k| (*k).to_owned()).collect();
    }

    pub fn add_team_member(&self, email: &str, user_type: UserType, token: &str) {
        self.put_member(email, user_type, token, true);
    }

    pub fn add_inactive_team_member(&self, email: &str, user_type: UserType, token: &str) {
        self.put_member(email, user_type, token, false);
    }

    fn put_member(&self, email: &str, user_type: UserType, token: &str, active: bool) {
        write(&self.state.members).insert(
            (normalise(email), user_type),
            SimToken {
                key: token.to_owned(),
                active,
            },
        );
    }

    pub fn add_customer(&self, user_id: &str, token: &str) {
        write(&self.state.customers).insert(
            user_id.to_owned(),
            SimToken {
                key: token.to_owned(),
                active: true,
            },
        );
    }

    /// Whether every identity it does not know has an active token too (a
    /// schema-driven fuzzer then reaches 200s with the identities it makes
    /// up); the token is the same each time for the same identity.
    pub fn set_any_user(&self, any: bool) {
        self.state.any_user.store(any, Ordering::SeqCst);
    }

    pub fn set_fault(&self, fault: Fault) {
        *write(&self.state.fault) = fault;
    }

    pub fn set_not_found_style(&self, style: NotFoundStyle) {
        *write(&self.state.not_found) = style;
    }

    /// Added before every answer.
    pub fn set_latency(&self, latency: Duration) {
        *write(&self.state.latency) = latency;
    }

    /// Requests received so far.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at one time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The requests received so far (the latest `SEEN_REQUESTS`), oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state.seen).iter().cloned().collect()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/ext/get-user-token", get(get_user_token))
            .with_state(self.clone())
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(bound)
    }
}

// A panicking test thread must not take the simulator down with it: poisoned
// locks are used as they are.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

fn inactive(token: &SimToken) -> &'static str {
    if token.active {
        ""
    } else {
        "  (inactive token)"
    }
}

/// Random lowercase hex of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// Decrements the in-flight count however the request ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn vendor_error(status: StatusCode, code: u16, message: &str) -> Response {
    let body = json!({ "success": false, "message": message, "data": null, "code": code });
    (status, axum::Json(body)).into_response()
}

async fn get_user_token(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let state = &sim.state;
    state.calls.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&state.in_flight);

    let raw_query = raw.unwrap_or_default();
    let params: Vec<(String, String)> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header_text(header::AUTHORIZATION.as_str());
    let authtype = header_text("authtype");
    {
        let mut seen = lock(&state.seen);
        if seen.len() == SEEN_REQUESTS {
            seen.pop_front();
        }
        seen.push_back(SeenRequest {
            raw_query,
            params: params.clone(),
            authorization: authorization.clone(),
            authtype: authtype.clone(),
            headers: headers.clone(),
        });
    }

    let latency = *read(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fault = *read(&state.fault);
    match fault {
        Fault::None => {}
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Malformed => {
            return (
                StatusCode::OK,
                "<html><body>Service temporarily unavailable</body></html>",
            )
                .into_response();
        }
        Fault::Status(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return vendor_error(status, status.as_u16(), "simulated failure");
        }
        Fault::StatusRetryAfter(status, seconds) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = vendor_error(status, status.as_u16(), "simulated failure");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
            return response;
        }
        Fault::BodyCode(code) => return vendor_error(StatusCode::OK, code, "simulated failure"),
        Fault::Body(body) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
        }
    }

    let presented = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    let known = presented.is_some_and(|key| read(&state.partner_keys).iter().any(|k| k == key));
    if !known || authtype.as_deref() != Some("Key") {
        return vendor_error(StatusCode::UNAUTHORIZED, 401, "Unauthorized");
    }

    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let any_user = |identity: &str| {
        state.any_user.load(Ordering::SeqCst).then(|| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(identity.as_bytes());
            SimToken {
                key: format!("any_{}", hex::encode(&digest[..16])),
                active: true,
            }
        })
    };
    let found = match (param("email"), param("type"), param("userId")) {
        (Some(email), Some(t), None) => {
            let Ok(user_type) = UserType::parse(t) else {
                return vendor_error(StatusCode::BAD_REQUEST, 400, "Invalid type");
            };
            let key = (normalise(email), user_type);
            let known = read(&state.members).get(&key).cloned();
            known.or_else(|| any_user(&format!("{}|{}", key.0, user_type.as_str())))
        }
        (None, None, Some(id)) => {
            let known = read(&state.customers).get(id).cloned();
            known.or_else(|| any_user(id))
        }
        _ => {
            return vendor_error(
                StatusCode::BAD_REQUEST,
                400,
                "email and type, or userId, required",
            );
        }
    };
    match found {
        Some(token) => axum::Json(json!({
            "success": true,
            "message": "",
            "data": { "permanentToken": { "key": token.key, "active": token.active } },
            "code": 200,
        }))
        .into_response(),
        None => match *read(&state.not_found) {
            NotFoundStyle::HttpStatus => vendor_error(StatusCode::NOT_FOUND, 404, "User not found"),
            NotFoundStyle::BodyCode => vendor_error(StatusCode::OK, 404, "User not found"),
        },
    }
}
