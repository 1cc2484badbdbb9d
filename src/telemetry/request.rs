//! The request a task serves, kept in a task-local: what every log line of
//! the request names, what its handlers read, and the trace context its
//! vendor call carries.

use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TraceMode;
use super::trace_context::{TraceParent, record_trace_ids};
use crate::domain::Proof;

tokio::task_local! {
    /// The request the current task serves.
    static REQUEST: RequestContext;
}

/// What every log line of a request names (route, request id, trace,
/// caller), its handlers read and its vendor call carries, kept by the
/// request's task for as long as it is
/// served. Without trace export this replaces a `tracing` span: a request
/// then makes no span, and the JSON log layer writes these fields as the
/// `request` entry of an event's `spans`, in the shape the span would have.
pub struct RequestContext {
    /// `{method} {route}`, as OpenTelemetry names the server span.
    name: &'static str,
    route: &'static str,
    request_id: axum::http::HeaderValue,
    /// The W3C trace context; `None` when exporting (OpenTelemetry has it).
    trace: Option<TraceParent>,
    /// The authenticated caller, once known.
    client: std::cell::OnceCell<std::sync::Arc<str>>,
    /// How the caller proved who it is.
    proof: std::cell::OnceCell<Proof>,
    /// Whether the request makes a span and its spans are exported.
    mode: TraceMode,
}

impl RequestContext {
    pub fn new(
        name: &'static str,
        route: &'static str,
        request_id: axum::http::HeaderValue,
        trace: Option<TraceParent>,
        mode: TraceMode,
    ) -> Self {
        Self {
            name,
            route,
            request_id,
            trace,
            client: std::cell::OnceCell::new(),
            proof: std::cell::OnceCell::new(),
            mode,
        }
    }

    /// Calls `read` with the current request, if the task serves one.
    pub fn current<R>(read: impl FnOnce(&Self) -> R) -> Option<R> {
        REQUEST.try_with(read).ok()
    }

    /// The route label, such as `/v1/tokens`.
    pub fn route(&self) -> &'static str {
        self.route
    }

    /// The request id (visible ASCII, built by `observe`).
    pub fn request_id(&self) -> &str {
        std::str::from_utf8(self.request_id.as_bytes()).unwrap_or_default()
    }

    /// Who asked, once a credential proved it: the client, if one is them
    /// (a verified service account or certificate may be no client's), and
    /// how it was proved.
    pub fn who(&self) -> Option<(Option<&std::sync::Arc<str>>, &Proof)> {
        Some((self.client.get(), self.proof.get()?))
    }

    /// The request's trace id: the W3C context's, or when exporting the
    /// current span's.
    pub fn trace_id(&self) -> Option<super::HexId<32>> {
        if let Some(trace) = &self.trace {
            return Some(trace.trace_id);
        }
        use opentelemetry::trace::TraceContextExt;
        let context = tracing::Span::current().context();
        let span = context.span();
        let ids = span.span_context();
        ids.is_valid()
            .then(|| super::HexId::from_bits(u128::from_be_bytes(ids.trace_id().to_bytes())))
    }

    /// Runs `future` (a request being served) with this context current.
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        REQUEST.scope(self, future).await
    }

    /// Names the authenticated caller of the current request (and how it
    /// proved who it is), for its log lines and metrics.
    pub fn record_client(client: &std::sync::Arc<str>, proof: &Proof) {
        let _ = REQUEST.try_with(|r| {
            let _ = r.client.set(client.clone());
            let _ = r.proof.set(proof.clone());
            if r.mode.request_spans {
                tracing::Span::current().record("client", &**client);
            }
        });
    }

    /// Records who the cluster or a CA vouches for when no client is them
    /// (their 403 is audited too).
    pub fn record_proof(proof: &Proof) {
        let _ = REQUEST.try_with(|r| {
            let _ = r.proof.set(proof.clone());
        });
    }

    /// Calls `write` with the current request, when the log lines take its
    /// fields from here rather than from a span (`request_spans`).
    pub(crate) fn for_log_lines<R>(write: impl FnOnce(&Self) -> R) -> Option<R> {
        REQUEST
            .try_with(|request| (!request.mode.request_spans).then(|| write(request)))
            .ok()
            .flatten()
    }

    /// The request's `tracing` span, for when requests make one
    /// (`request_spans`), with the fields `fields` writes; when exporting, a
    /// child of the caller's trace (from `headers`) with the HTTP attributes
    /// of the OpenTelemetry conventions. `method` as those name it.
    pub fn span(&self, headers: &axum::http::HeaderMap, method: &'static str) -> tracing::Span {
        // Empty when exporting: `record_trace_ids` fills them.
        let trace_id = self.trace.as_ref().map(|t| t.trace_id.as_str());
        let span_id = self.trace.as_ref().map(|t| t.span_id.as_str());
        let span = tracing::info_span!(
            "request",
            otel.name = self.name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            route = self.route,
            request_id = self.request_id.to_str().unwrap_or_default(),
            client = tracing::field::Empty,
            trace_id,
            span_id,
        );
        if self.mode.exporting {
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
            });
            let _ = span.set_parent(parent);
            // Semantic-convention attributes go to the trace only, keeping log lines short.
            span.set_attribute("http.request.method", method);
            span.set_attribute("http.route", self.route);
            span.set_attribute("url.scheme", "http");
            record_trace_ids(&span);
        }
        span
    }

    /// Calls `field` with each field, as the request span's would be
    /// written: `otel.name`, `otel.kind`, `route`, `request_id`, `trace_id`,
    /// `span_id`, `client` (those known, in that order). The keys need no
    /// JSON escaping.
    pub(crate) fn fields(&self, mut field: impl FnMut(&'static str, &str)) {
        field("otel.name", self.name);
        field("otel.kind", "server");
        field("route", self.route);
        // Built by `observe` from visible ASCII; read without a second check.
        if let Ok(id) = std::str::from_utf8(self.request_id.as_bytes()) {
            field("request_id", id);
        }
        if let Some(trace) = &self.trace {
            field("trace_id", trace.trace_id.as_str());
            field("span_id", trace.span_id.as_str());
        }
        if let Some(client) = self.client.get() {
            field("client", client);
        }
    }
}

/// Adds `traceparent` (and `tracestate`) for an outgoing request: from the
/// request's `TraceParent` with a new span id for the call, or (when spans
/// are exported, and for a background refresh) from the current span, if it
/// has an OpenTelemetry context. Never `baggage`.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    let own = REQUEST.try_with(|request| match &request.trace {
        Some(parent) => {
            parent.inject_child(headers);
            true
        }
        None => false,
    });
    if own == Ok(true) {
        return;
    }
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    axum::http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_callers_trace_is_continued_and_anything_else_starts_a_new_one() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let given = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
            ("baggage", "secret=1"),
        ]);
        let parent = TraceParent::from_headers(&given);
        assert_eq!(parent.trace_id, trace);
        assert_ne!(parent.span_id, "00f067aa0ba902b7");
        let mut out = reqwest::header::HeaderMap::new();
        let request = RequestContext::new(
            "GET /v1/tokens",
            "/v1/tokens",
            HeaderValue::from_static("r-1"),
            Some(parent),
            TraceMode::default(),
        );
        request.scope(async { inject_current(&mut out) }).await;
        let sent = out["traceparent"].to_str().unwrap();
        assert!(
            sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-01"),
            "{sent}"
        );
        assert_eq!(out["tracestate"], "vendor=x");
        assert!(!out.contains_key("baggage"));

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "garbage",
        ] {
            let mut map = HeaderMap::new();
            map.insert("traceparent", HeaderValue::from_static(bad));
            let fresh = TraceParent::from_headers(&map);
            assert_ne!(fresh.trace_id, trace, "{bad}");
            let id = fresh.trace_id.as_str();
            assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_ne!(fresh.trace_id, "00000000000000000000000000000000");
        }
        let mut none = reqwest::header::HeaderMap::new();
        inject_current(&mut none);
        assert!(none.is_empty(), "outside a request nothing is invented");
    }
}
