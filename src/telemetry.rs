//! Logs, traces and the metrics registry.
//!
//! Logs: JSON (or pretty) on stdout, filtered by `log.level`; every event in
//! a request carries its `request_id`, `trace_id` and `span_id` (in `spans`,
//! as the `request` entry).
//! Traces: `tracing` spans become OpenTelemetry spans. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set they are exported over OTLP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` = `http/protobuf`, the default, or `grpc`;
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`
//! honoured). Without it nothing is recorded or exported, and a request makes
//! no span: its `RequestContext` carries the W3C trace context, so logs and
//! the vendor still see the caller's trace id.

pub mod logs;
pub mod metrics;
pub mod process;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, span_processor_with_async_runtime};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings};

/// The service name when `OTEL_SERVICE_NAME` does not give one.
pub const SERVICE_NAME: &str = "token-broker";

/// Keeps the log writer and the trace pipeline alive; `shutdown` flushes
/// what is buffered.
#[must_use = "dropping Telemetry without shutdown loses buffered spans"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
    /// Dropping it writes out the log lines still queued.
    log_writer: logs::WriterGuard,
}

impl Telemetry {
    /// Flushes and stops span export (bounded by the exporter's own timeout),
    /// then the log lines still queued.
    pub async fn shutdown(self) {
        let Telemetry {
            provider,
            exporting,
            log_writer,
        } = self;
        if exporting {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "could not flush traces at shutdown");
            }
        }
        drop(log_writer);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Installs logging and tracing for the process. Call once, inside the runtime.
pub fn init(settings: &LogSettings) -> Telemetry {
    // W3C trace context only: a caller's `baggage` is neither read nor sent
    // on to the vendor, never `baggage`.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint_set = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let mut setup_error = None;
    let provider = if endpoint_set {
        exporting_provider().unwrap_or_else(|error| {
            setup_error = Some(error);
            silent_provider()
        })
    } else {
        silent_provider()
    };
    let exporting = endpoint_set && setup_error.is_none();
    let tracer = provider.tracer(SERVICE_NAME);

    EXPORTING.store(exporting, std::sync::atomic::Ordering::Relaxed);
    REQUEST_SPANS.store(
        exporting || settings.format == LogFormat::Pretty,
        std::sync::atomic::Ordering::Relaxed,
    );
    // A writer thread takes the lines off the request path. Lossless: when
    // its batch is full, callers wait rather than an event being dropped.
    let (writer, log_writer) = logs::BatchWriter::spawn(std::io::stdout());
    let (level, format) = (settings.level.as_str(), settings.format);
    // Without export, no OpenTelemetry layer at all. Not an absent
    // `Option<Layer>` either: that one is interested in every span, so spans
    // the log level turns off would still be made and entered.
    let _ = if exporting {
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(level_filter(level));
        tracing_subscriber::registry()
            .with(otel)
            .with(log_layers(level, format, writer))
            .try_init()
    } else {
        logging_only(level, format, writer).try_init()
    };
    if let Some(error) = setup_error {
        tracing::error!(%error, "cannot set up OTLP trace export; traces are not exported");
    } else if exporting {
        tracing::info!(protocol = %protocol_name(), "exporting traces over OTLP");
    }
    Telemetry {
        provider,
        exporting,
        log_writer,
    }
}

/// The log layers: `level` (an `EnvFilter` directive; `info` if invalid)
/// filters every log but the audit trail, whose own layer writes each audit
/// event whatever the level says.
pub fn log_layers<S, W>(level: &str, format: LogFormat, writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    let general = level_filter(level).add_directive(
        format!("{}=off", crate::audit::TARGET)
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid directive")),
    );
    // A static filter: whether a callsite is an audit event is decided once.
    let audit = Targets::new().with_target(crate::audit::TARGET, LevelFilter::TRACE);
    log_layer(format, writer.clone(), true)
        .with_filter(general)
        .and_then(log_layer(format, writer, false).with_filter(audit))
}

/// The subscriber when no trace is exported: the log layers alone, so a span
/// the log level turns off is never made.
fn logging_only<W>(
    level: &str,
    format: LogFormat,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(log_layers(level, format, writer))
}

/// `log.level` as a filter; `info` if it does not parse (validated at load).
fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// One log layer in the configured format, writing to `writer`; `request`:
/// whether its events name the request they belong to.
fn log_layer<S, W>(format: LogFormat, writer: W, request: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json if request => logs::JsonLogs::new(writer).with_request().boxed(),
        LogFormat::Json => logs::JsonLogs::new(writer).boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .pretty()
            .boxed(),
    }
}

fn protocol_name() -> String {
    env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into())
}

/// Records nothing: spans carry trace context for logs and propagation only.
fn silent_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .build()
}

/// Exports over OTLP with the protocol, endpoint, sampler and resource the
/// standard `OTEL_*` variables give.
fn exporting_provider() -> Result<SdkTracerProvider, String> {
    let exporter = match protocol_name().as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build(),
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported; use grpc or http/protobuf"
            ));
        }
    }
    .map_err(|e| e.to_string())?;
    let processor = span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let mut resource = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// Whether spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` is set and the
/// exporter was built). Without export no OpenTelemetry layer is installed:
/// the W3C trace context is carried by the request's `TraceParent` alone.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once `init` set up span export.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a request makes a `tracing` span: when spans are exported, and
/// for the pretty log format, which shows a request's fields from its span.
/// JSON logs without export take them from the `RequestContext` instead.
static REQUEST_SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when a request makes a `tracing` span (see `REQUEST_SPANS`).
pub fn request_spans() -> bool {
    REQUEST_SPANS.load(std::sync::atomic::Ordering::Relaxed)
}

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
}

impl RequestContext {
    pub fn new(
        name: &'static str,
        route: &'static str,
        request_id: axum::http::HeaderValue,
        trace: Option<TraceParent>,
    ) -> Self {
        Self {
            name,
            route,
            request_id,
            trace,
            client: std::cell::OnceCell::new(),
        }
    }

    /// Runs `future` (a request being served) with this context current.
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        REQUEST.scope(self, future).await
    }

    /// The current request's id, if the task serves a request.
    pub fn current_id() -> Option<axum::http::HeaderValue> {
        REQUEST.try_with(|r| r.request_id.clone()).ok()
    }

    /// The current request's authenticated caller, once known.
    pub fn client() -> Option<std::sync::Arc<str>> {
        REQUEST.try_with(|r| r.client.get().cloned()).ok().flatten()
    }

    /// Names the authenticated caller of the current request, for its log
    /// lines and metrics.
    pub fn record_client(client: &std::sync::Arc<str>) {
        let _ = REQUEST.try_with(|r| {
            let _ = r.client.set(client.clone());
            if request_spans() {
                tracing::Span::current().record("client", &**client);
            }
        });
    }

    /// Calls `write` with the current request, when the log lines take its
    /// fields from here rather than from a span (`request_spans`).
    pub(crate) fn for_log_lines<R>(write: impl FnOnce(&Self) -> R) -> Option<R> {
        if request_spans() {
            return None;
        }
        REQUEST.try_with(write).ok()
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
        if exporting() {
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

/// A W3C trace context (`traceparent`, and `tracestate` passed through), as
/// carried without OpenTelemetry: the caller's trace id, or a new one.
#[derive(Debug, Clone)]
pub struct TraceParent {
    pub trace_id: HexId<32>,
    /// This service's span.
    pub span_id: HexId<16>,
    flags: HexId<2>,
    state: Option<axum::http::HeaderValue>,
}

/// An id as `N` lower-case hex digits, kept inline: a request makes a few.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    /// `text` if it is exactly `N` lower-case hex digits.
    fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; N] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(Self(bytes))
    }

    /// The low `4 * N` bits of `value`.
    fn from_bits(mut value: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b'0'; N];
        for digit in text.iter_mut().rev() {
            *digit = DIGITS[(value & 0xf) as usize];
            value >>= 4;
        }
        Self(text)
    }

    /// A random id that is not all zeros (W3C: an invalid id).
    fn random() -> Self {
        Self::from_bits(rand::random::<u128>() | 1)
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == b'0')
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl<const N: usize> std::fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for HexId<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl TraceParent {
    /// Continues the caller's `traceparent` (version 00), else starts a trace.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Self {
        let caller = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let mut parts = v.split('-');
                let (Some("00"), Some(trace), Some(parent), Some(flags), None) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    return None;
                };
                let trace = HexId::<32>::parse(trace)?;
                let parent = HexId::<16>::parse(parent)?;
                (!trace.is_zero() && !parent.is_zero())
                    .then_some((trace, HexId::<2>::parse(flags)?))
            });
        let (trace_id, flags, state) = match caller {
            Some((trace, flags)) => (trace, flags, headers.get("tracestate").cloned()),
            None => (HexId::random(), HexId(*b"00"), None),
        };
        Self {
            trace_id,
            span_id: HexId::random(),
            flags,
            state,
        }
    }
}

/// Adds `traceparent` (and `tracestate`) for an outgoing request: from the
/// current span when exporting, else from the request's `TraceParent` with a
/// new span id for the call. Never `baggage`.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    if exporting() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(
                &tracing::Span::current().context(),
                &mut opentelemetry_http::HeaderInjector(headers),
            );
        });
        return;
    }
    let _ = REQUEST.try_with(|request| {
        let Some(parent) = &request.trace else {
            return;
        };
        let value = format!(
            "00-{}-{}-{}",
            parent.trace_id,
            HexId::<16>::random(),
            parent.flags
        );
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
            headers.insert("traceparent", value);
        }
        if let Some(state) = &parent.state {
            headers.insert("tracestate", state.clone());
        }
    });
}

/// Lets something through at most once per interval, across threads: for
/// warnings that would otherwise repeat with every request.
pub struct Throttle {
    interval_ms: u64,
    /// Milliseconds since `PROCESS_START` of the last pass, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
}

static PROCESS_START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

impl Throttle {
    pub const fn every(interval: std::time::Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// True for the first call of each interval.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = u64::try_from(PROCESS_START.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.interval_ms)
            && self
                .last
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

/// Copies the OpenTelemetry ids of `span` into its `trace_id` and `span_id`
/// fields, so every log event inside it carries them (when exporting; else
/// the log lines have them from the request's `TraceParent`).
pub fn record_trace_ids(span: &tracing::Span) {
    if !exporting() {
        return;
    }
    let context = span.context();
    let span_ref = context.span();
    let ids = span_ref.span_context();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
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

    #[test]
    fn without_export_a_span_below_the_log_level_is_never_made_and_audit_events_still_are() {
        let sink = logs::tests::Sink::default();
        let subscriber = logging_only("warn", LogFormat::Json, sink.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "r-1");
            assert!(span.is_disabled());
            assert!(!tracing::warn_span!("failing").is_disabled());
            span.in_scope(|| tracing::info!(target: crate::audit::TARGET, "token issued"));
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains(r#""message":"token issued""#), "{text}");
    }

    #[test]
    fn hex_ids_are_fixed_width_lower_case() {
        assert_eq!(HexId::<16>::from_bits(0xab), "00000000000000ab");
        assert_eq!(HexId::<2>::from_bits(u128::MAX), "ff");
        assert_eq!(HexId::<4>::parse("0a1f"), Some(HexId(*b"0a1f")));
        assert_eq!(HexId::<4>::parse("0A1F"), None);
        assert_eq!(HexId::<4>::parse("0a1"), None);
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
            assert!(!fresh.trace_id.is_zero());
        }
        let mut none = reqwest::header::HeaderMap::new();
        inject_current(&mut none);
        assert!(none.is_empty(), "outside a request nothing is invented");
    }
}
