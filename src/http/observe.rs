//! The per-request work around the API router: request id, the request's
//! `RequestContext` (and span, when there is one), the 8 KiB size limits,
//! one log event and the HTTP metrics for every request (the log lines of
//! requests refused before their caller is known are budgeted).

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{self, HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use tower::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::audit::{self, EventKind, Record};
use crate::broker::CacheResult;
use crate::callers::Rule;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::outcome::Outcome;
use crate::http::routes::{self, SPAN_NAMES, TOKENS_ROUTE, VENDOR_ROUTE};
use crate::telemetry;
use crate::telemetry::RequestContext;
use crate::telemetry::metrics::{ClientResult, LogDrop};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest accepted request target and header block: 8 KiB each.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most header fields a request may carry; more is a 431 problem (up to the
/// listener's `MAX_PARSED_HEADERS`, past which hyper answers its own 431).
pub const MAX_HEADER_FIELDS: usize = 100;
const MAX_REQUEST_ID_LEN: usize = 128;

/// `{method} {route}` for the known routes, else the method alone (OTel HTTP conventions).
fn span_name(method: &Method, route: &'static str) -> &'static str {
    let method = method.as_str();
    if let Some((_, _, name)) = SPAN_NAMES
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
    {
        return name;
    }
    match method {
        "GET" => "GET",
        "DELETE" => "DELETE",
        "POST" => "POST",
        "PUT" => "PUT",
        "HEAD" => "HEAD",
        _ => "HTTP",
    }
}

/// The method as OTel names it: the known ones, else `_OTHER`.
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The caller's `x-request-id` if it is a sane token, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_REQUEST_ID_LEN
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            // A v4 UUID from the thread's generator: no system call per request.
            let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            let mut text = uuid::Uuid::encode_buffer();
            HeaderValue::from_str(id.hyphenated().encode_lower(&mut text))
                .unwrap_or(HeaderValue::from_static("invalid"))
        })
}

/// Refuses oversized requests, bodies, and `HEAD` on a token route (which
/// would otherwise run the lookup, maybe a vendor call, and write an audit
/// event for an answer nobody reads) before any handler runs.
fn check_request(request: &Request, route: &'static str) -> Result<(), ApiError> {
    if request.method() == Method::HEAD && matches!(route, TOKENS_ROUTE | VENDOR_ROUTE) {
        return Err(ApiError::MethodNotAllowed);
    }
    let headers = request.headers();
    // RFC 9112 §3.2: an HTTP/1.1 request names exactly one Host. (HTTP/2
    // carries `:authority` instead.)
    if request.version() == http::Version::HTTP_11
        && headers.get_all(header::HOST).iter().count() != 1
    {
        return Err(ApiError::BadRequest(
            "Host: an HTTP/1.1 request needs exactly one Host header".into(),
        ));
    }
    // Two credentials: a proxy reading the last and this service the first
    // would disagree about who asked.
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::BadRequest(
            "Authorization: give one Authorization header, not several".into(),
        ));
    }
    if headers.len() > MAX_HEADER_FIELDS {
        return Err(ApiError::HeadersTooLarge);
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if target > MAX_REQUEST_LINE_BYTES {
        return Err(ApiError::UriTooLong);
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge);
    }
    if matches!(
        *request.method(),
        Method::GET | Method::DELETE | Method::HEAD
    ) {
        let has_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
        if has_length || request.headers().contains_key(header::TRANSFER_ENCODING) {
            return Err(ApiError::BodyNotAllowed);
        }
    }
    Ok(())
}

/// The API: the router behind the per-request work every answer gets
/// (request id, span and trace context, the size limits, a caught panic
/// turned into a 500, the log line and the HTTP metrics). A service of its own
/// around the whole router rather than a router layer, so a request pays for
/// it once: no per-route boxing or cloning.
#[derive(Clone)]
pub struct Api {
    state: AppState,
    router: Router,
    unauthenticated: Arc<Unauthenticated>,
}

impl Api {
    pub fn new(state: AppState, router: Router) -> Self {
        Self {
            state,
            router,
            unauthenticated: Arc::new(Unauthenticated::new()),
        }
    }
}

/// Request lines of requests refused before their caller is known (401s)
/// written per second at most; the rest are counted, not written, so
/// strangers cannot take the log output's bandwidth.
pub const UNAUTHENTICATED_LINES_PER_SECOND: u32 = 100;

/// The budget of 401 request lines, and how many went unwritten since the
/// last one written (which says so).
struct Unauthenticated {
    budget: governor::DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl Unauthenticated {
    fn new() -> Self {
        let per_second = NonZeroU32::new(UNAUTHENTICATED_LINES_PER_SECOND)
            .unwrap_or_else(|| unreachable!("a constant above zero"));
        Self {
            budget: governor::RateLimiter::direct(governor::Quota::per_second(per_second)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed before this one)` when this line is written.
    fn admit(&self) -> Option<u64> {
        if self.budget.check().is_ok() {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        telemetry::metrics::log_lines_dropped(LogDrop::Sampled, 1);
        None
    }
}

impl<B> Service<http::Request<B>> for Api
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // An axum `Router` is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> <Self as Service<http::Request<B>>>::Future {
        let request = request.map(Body::new);
        let started = Instant::now();
        let id = request_id(request.headers());
        let route = routes::label(request.uri().path());
        let name = span_name(request.method(), route);
        let mode = self.state.trace_mode;
        // Continue the caller's trace (W3C traceparent/tracestate), if any:
        // by OpenTelemetry when exporting, else by the request's context.
        let trace =
            (!mode.exporting).then(|| telemetry::TraceParent::from_headers(request.headers()));
        let context = RequestContext::new(name, route, id.clone(), trace, mode);
        let span = if mode.request_spans {
            context.span(request.headers(), method_name(request.method()))
        } else {
            tracing::Span::none()
        };
        let handled = check_request(&request, route).map(|()| {
            // Always ready (see `poll_ready`), so called without waiting.
            AssertUnwindSafe(self.router.call(request)).catch_unwind()
        });
        let state = self.state.clone();
        let unauthenticated = self.unauthenticated.clone();
        let served = async move {
            let mut response = match handled {
                Ok(handled) => match handled.await {
                    Ok(Ok(response)) => response,
                    Err(_panic) => {
                        tracing::error!("handler panicked");
                        ApiError::Internal.into_response()
                    }
                },
                Err(refusal) => refusal.into_response(),
            };
            if response.status() == http::StatusCode::METHOD_NOT_ALLOWED
                && let Some(allowed) = routes::allowed_methods(route)
            {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            finish(
                &state,
                &unauthenticated,
                route,
                started,
                &mut response,
                mode.exporting,
            )
            .await;
            response.headers_mut().insert(X_REQUEST_ID, id);
            Ok(response)
        };
        // The router runs inside the context (and the span, if any) when polled.
        Box::pin(context.scope(served.instrument(span)))
    }
}

/// The audit event or log line, and the metrics, of one answered request.
/// On a token route the answer waits for the write of its audit event, and
/// becomes a 503 `audit-unavailable` if that write fails or does not return
/// in time: a token that cannot be audited is not handed out.
async fn finish(
    state: &AppState,
    unauthenticated: &Unauthenticated,
    route: &'static str,
    started: Instant,
    response: &mut Response,
    exporting: bool,
) {
    let elapsed = started.elapsed();
    let outcome = response.extensions_mut().remove::<Outcome>();
    let mut result = outcome.as_ref().map_or(ClientResult::Ok, |o| o.result);
    let cache = outcome
        .as_ref()
        .and_then(|o| o.cache)
        .map(CacheResult::as_str);
    let token_route = matches!(route, TOKENS_ROUTE | VENDOR_ROUTE);
    // The context is read once: the caller, for the metrics, and on a token
    // route the request's audit event, its only line.
    let mut audit = None;
    let who = RequestContext::current(|request| {
        let (caller, proof) = request.who()?;
        if token_route {
            let trace_id = request.trace_id();
            let status = response.status().as_u16();
            let record = Record {
                event: event_of(outcome.as_ref(), status),
                status,
                rule: outcome.as_ref().and_then(|o| o.denied).map(Rule::as_str),
                caller: caller.map(|c| &**c),
                proof,
                identity: outcome.as_ref().and_then(|o| o.identity),
                cache,
                active: outcome.as_ref().and_then(|o| o.active),
                duration: elapsed,
                route,
                request_id: request.request_id(),
                trace_id: trace_id.as_ref().map(|id| id.as_str()),
            };
            audit = Some(state.auditor.record(&record));
        }
        Some(caller.cloned())
    })
    .flatten();
    if let Some(audit) = audit {
        let written = match audit {
            Ok(commit) => commit.written(audit::WRITE_WITHIN).await,
            Err(refused) => Err(refused),
        };
        if written.is_err() {
            *response = ApiError::AuditUnavailable.into_response();
            result = ClientResult::Refused;
        }
    }
    // A token-route request whose asker is known wrote its audit event;
    // the client, if any, is counted below.
    let audited = token_route && who.is_some();
    let status = response.status().as_u16();
    // Refused before the caller was known: anyone can send these, so their
    // lines are budgeted.
    let written = if who.is_none() && status == 401 {
        unauthenticated.admit()
    } else {
        Some(0)
    };
    let client = who.flatten();
    if !audited && let Some(suppressed) = written {
        // `message` as a plain field: written as it is, no formatting.
        tracing::info!(
            message = "request completed",
            status,
            duration_us = telemetry::whole_micros(elapsed),
            cache,
            suppressed_before = (suppressed > 0).then_some(suppressed),
        );
    }
    if exporting {
        let span = tracing::Span::current();
        span.set_attribute("http.response.status_code", i64::from(status));
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
    }
    // The wait for the audit event's write is part of the answer's time.
    state.metrics.http_request(route, status, started.elapsed());
    if let Some(client) = client {
        state.metrics.client_request(&client, result);
    }
}

/// What a token-route request came to, as its audit event says.
fn event_of(outcome: Option<&Outcome>, status: u16) -> EventKind {
    match (outcome.map(|o| o.result), status) {
        (Some(ClientResult::Ok), 204) => EventKind::Invalidated,
        (Some(ClientResult::Ok), _) => EventKind::Issued,
        (Some(ClientResult::Forbidden), _) => EventKind::Denied,
        (Some(ClientResult::RateLimited), _) => EventKind::RateLimited,
        _ => EventKind::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Auditor, SubjectKey};
    use crate::broker::{Broker, FetchFuture, TokenSource};
    use crate::callers::Callers;
    use crate::config::LogFormat;
    use crate::config::{Settings, Sources};
    use crate::domain::Identity;
    use crate::http::AppParts;
    use crate::telemetry::metrics::Metrics;
    use crate::telemetry::writer::LogQueue;
    use crate::upstream::UpstreamError;
    use axum::routing::get;
    use std::sync::Arc;
    use tower::ServiceExt;

    struct Nothing;

    impl TokenSource for Nothing {
        fn fetch<'a>(&'a self, _: &'a Identity, _: &'a crate::upstream::Askers) -> FetchFuture<'a> {
            Box::pin(async { Err(UpstreamError::NotFound) })
        }
    }

    fn state() -> AppState {
        let settings = Settings::load(&Sources::default()).unwrap();
        let metrics = Arc::new(Metrics::new());
        AppState::new(AppParts {
            broker: Arc::new(Broker::new(
                &settings.cache,
                Arc::new(Nothing),
                metrics.clone(),
            )),
            auditor: Auditor::new(
                SubjectKey::with_key(b"test-audit-key".to_vec()),
                LogQueue::spawn(std::io::sink(), 1 << 16).0.audit_trail(),
                LogFormat::Json,
            ),
            callers: Callers::new(&[], false, None),
            metrics,
            trace_mode: crate::telemetry::TraceMode::default(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_is_a_problem_500_with_a_request_id_and_the_service_lives_on() {
        let api = Api::new(
            state(),
            Router::new()
                .route(
                    "/boom",
                    get(|| async {
                        panic!("boom");
                        #[allow(unreachable_code)]
                        "never"
                    }),
                )
                .route("/fine", get(|| async { "fine" })),
        );
        let request = |path: &str| {
            http::Request::builder()
                .uri(path)
                .header(header::HOST, "localhost")
                .body(Body::empty())
                .unwrap()
        };

        let response = api.clone().oneshot(request("/boom")).await.unwrap();

        assert_eq!(response.status(), 500);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(response.headers().contains_key(X_REQUEST_ID));
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("boom"));
        let after = api.oneshot(request("/fine")).await.unwrap();
        assert_eq!(after.status(), 200);
    }
}
