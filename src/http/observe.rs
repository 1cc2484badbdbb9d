//! Per-request middleware: request id, the request span, the size limits of
//! SPEC §7, one log event and the HTTP metrics for every request.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::broker::CacheResult;
use crate::http::error::ApiError;
use crate::http::openapi::OPENAPI_ROUTE;
use crate::http::{AppState, TOKENS_ROUTE, VENDOR_ROUTE};
use crate::telemetry;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest accepted request target and header block (SPEC §7).
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_REQUEST_ID_LEN: usize = 128;

/// What a request came to, attached to its response by whoever answered it
/// (the handler, the authentication layer, an error), and read back once here
/// for the log line and the metrics.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The authenticated caller, if it got that far.
    pub caller: Option<Arc<str>>,
    /// Where the token came from, when one was handed out.
    pub cache: Option<CacheResult>,
    /// The `result` label of `token_broker_client_requests_total`.
    pub result: &'static str,
}

/// The request id, put into request extensions for handlers (audit events).
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

/// The `route` label: a known path or `unmatched`, so labels stay a closed set.
fn route_label(path: &str) -> &'static str {
    match path {
        TOKENS_ROUTE => TOKENS_ROUTE,
        VENDOR_ROUTE => VENDOR_ROUTE,
        OPENAPI_ROUTE => OPENAPI_ROUTE,
        _ => "unmatched",
    }
}

/// `{method} {route}` for the known routes, else the method alone (OTel HTTP conventions).
fn span_name(method: &Method, route: &'static str) -> &'static str {
    match (method.as_str(), route) {
        ("GET", TOKENS_ROUTE) => "GET /v1/tokens",
        ("DELETE", TOKENS_ROUTE) => "DELETE /v1/tokens",
        ("GET", VENDOR_ROUTE) => "GET /ext/get-user-token",
        ("GET", OPENAPI_ROUTE) => "GET /openapi.json",
        ("GET", _) => "GET",
        ("DELETE", _) => "DELETE",
        ("POST", _) => "POST",
        ("PUT", _) => "PUT",
        ("HEAD", _) => "HEAD",
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
fn request_id(request: &Request) -> HeaderValue {
    request
        .headers()
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

pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    // Continue the caller's trace (W3C traceparent/tracestate), if any. Without
    // export the ids are known before the span exists, so it is made with them.
    let exporting = telemetry::exporting();
    let trace_parent =
        (!exporting).then(|| telemetry::TraceParent::from_headers(request.headers()));
    // `None` leaves the field empty (for `record_trace_ids` when exporting).
    let trace_id = trace_parent.as_ref().map(|p| p.trace_id.as_str());
    let span_id = trace_parent.as_ref().map(|p| p.span_id.as_str());
    let span = tracing::info_span!(
        "request",
        otel.name = span_name(&method, route),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        route,
        request_id = id.to_str().unwrap_or_default(),
        client = tracing::field::Empty,
        trace_id,
        span_id,
    );
    if exporting {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&opentelemetry_http::HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);
        // Semantic-convention attributes go to the trace only, keeping log lines short.
        span.set_attribute("http.request.method", method_name(&method));
        span.set_attribute("http.route", route);
        span.set_attribute("url.scheme", "http");
        telemetry::record_trace_ids(&span);
    }
    request.extensions_mut().insert(RequestId(id.clone()));

    let mut response = match check_request(&request, route) {
        Ok(()) => {
            let handled = next.run(request).instrument(span.clone());
            match trace_parent {
                Some(parent) => parent.scope(handled).await,
                None => handled.await,
            }
        }
        Err(refusal) => refusal.into_response(),
    };

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if exporting {
        span.set_attribute("http.response.status_code", i64::from(status));
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
    }
    state.metrics.http_request(route, status, elapsed);
    let outcome = response.extensions_mut().remove::<Outcome>();
    let outcome = outcome.as_ref();
    if let Some(outcome) = outcome
        && let Some(client) = &outcome.caller
    {
        state.metrics.client_request(client, outcome.result);
    }
    span.in_scope(|| {
        tracing::info!(
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            cache = outcome.and_then(|o| o.cache).map(CacheResult::as_str),
            "request completed"
        );
    });
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}
