//! The JSON log layer: one object per event, the shape tracing-subscriber's
//! JSON formatter gives (`timestamp`, `level`, the event's fields, `target`,
//! and `spans`, the list of enclosing spans with their fields, led by the
//! request's own `RequestContext` when no span stands for it), built for the
//! request path: a span's fields are serialised once, when they are recorded,
//! and each event only copies them into the line it hands to its writer.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::escape::{escape_into, push_json_str};
use super::request::RequestContext;

/// A span's fields as JSON members (`"key":value,…`, no braces), written
/// when they are recorded.
struct SpanFields(String);

/// Writes each event as one JSON line to `W`; an event in a request names
/// it (`RequestContext`) as the first of its `spans`, when no request span
/// does.
pub struct JsonLogs<W> {
    writer: W,
}

impl<W> JsonLogs<W> {
    pub fn new(writer: W) -> Self {
        Self { writer }
    }
}

thread_local! {
    /// The line being built; reused, so an event allocates nothing here.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
    /// The current second as RFC 3339 (`2026-11-27T06:23:18`), formatted once
    /// a second rather than once a line.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `now` as RFC 3339 UTC with microseconds, as `humantime` writes it.
pub(super) fn push_timestamp(line: &mut String, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second));
            cached.1.clear();
            let _ = write!(cached.1, "{text}");
            cached.1.pop(); // the `Z`
            cached.0 = second;
        }
        line.push_str(&cached.1);
    });
    let micros = since_epoch.subsec_micros();
    let mut digits = *b".000000Z";
    let mut rest = micros;
    for digit in digits[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    line.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

impl<S, W> Layer<S> for JsonLogs<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = String::with_capacity(128);
        attrs.record(&mut JsonFields::new(&mut fields));
        span.extensions_mut().replace(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut JsonFields::new(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            open_line(&mut line, event.metadata().level());
            event.record(&mut JsonFields {
                out: &mut line,
                leading_comma: true,
            });
            name_target(&mut line, event.metadata().target());
            let mut first = true;
            RequestContext::for_log_lines(|request| {
                open_span(&mut line, &mut first, "request");
                // Its keys are known JSON-safe names: written as they are.
                request.fields(|key, value| {
                    line.push_str(",\"");
                    line.push_str(key);
                    line.push_str("\":");
                    push_json_str(&mut line, value);
                });
                line.push('}');
            });
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope.from_root() {
                    open_span(&mut line, &mut first, span.name());
                    if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>()
                        && !fields.is_empty()
                    {
                        line.push(',');
                        line.push_str(fields);
                    }
                    line.push('}');
                }
            }
            if !first {
                line.push(']');
            }
            line.push_str("}\n");
            let _ = self.writer.make_writer().write_all(line.as_bytes());
        });
    }
}

/// Starts a JSON log line: `{"timestamp":"…","level":"…"`, now.
pub(super) fn open_line(line: &mut String, level: &tracing::Level) {
    line.push_str("{\"timestamp\":\"");
    push_timestamp(line, SystemTime::now());
    line.push_str("\",\"level\":\"");
    line.push_str(level.as_str());
    line.push('"');
}

/// The `target` member, after the event's fields.
pub(super) fn name_target(line: &mut String, target: &str) {
    line.push_str(",\"target\":");
    push_json_str(line, target);
}

/// Opens the entry of span `name` in `spans`, and the list itself before the
/// `first` entry; the caller appends its fields and the closing `}`.
fn open_span(line: &mut String, first: &mut bool, name: &str) {
    line.push_str(if *first { ",\"spans\":[" } else { "," });
    *first = false;
    line.push_str("{\"name\":");
    push_json_str(line, name);
}

/// Appends fields as JSON members.
struct JsonFields<'a> {
    out: &'a mut String,
    /// Whether a comma is due before the next member.
    leading_comma: bool,
}

impl<'a> JsonFields<'a> {
    fn new(out: &'a mut String) -> Self {
        let leading_comma = !out.is_empty();
        Self { out, leading_comma }
    }

    fn key(&mut self, field: &Field) {
        self.out
            .push_str(if self.leading_comma { ",\"" } else { "\"" });
        self.leading_comma = true;
        escape_into(self.out, field.name());
        self.out.push_str("\":");
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            self.out.push_str(ryu::Buffer::new().format_finite(value));
        } else {
            self.out.push_str("null");
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.key(field);
        push_json_display(self.out, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        push_json_display(self.out, &DebugAsDisplay(value));
    }
}

struct DebugAsDisplay<'a>(&'a dyn fmt::Debug);

impl fmt::Display for DebugAsDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `value`'s text as a JSON string, escaped while it is written.
fn push_json_display(out: &mut String, value: &dyn fmt::Display) {
    struct Escaping<'a>(&'a mut String);
    impl fmt::Write for Escaping<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            escape_into(self.0, s);
            Ok(())
        }
    }
    out.push('"');
    let _ = write!(Escaping(out), "{value}");
    out.push('"');
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects what is written, for tests of the log layers.
    #[derive(Clone, Default)]
    pub(in crate::telemetry) struct Sink(pub(in crate::telemetry) Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    #[test]
    fn events_are_json_lines_with_their_spans_fields() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry().with(JsonLogs::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "r-1",
                client = tracing::field::Empty
            );
            span.record("client", "app");
            let _entered = span.enter();
            let inner = tracing::info_span!("cache.lookup", cache.result = "hit");
            let _inner = inner.enter();
            tracing::info!(
                status = 200u16,
                ratio = 0.5,
                whole = 2.0,
                delta = -3i64,
                ok = true,
                note = "a \"quoted\"\nline\u{1}",
                "request completed"
            );
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'));
        let event: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["message"], "request completed");
        assert_eq!(event["status"], 200);
        assert_eq!(event["ratio"], 0.5);
        assert_eq!(event["whole"], 2.0);
        assert_eq!(event["delta"], -3);
        assert_eq!(event["ok"], true);
        assert_eq!(event["note"], "a \"quoted\"\nline\u{1}");
        assert_eq!(event["target"], module_path!());
        assert_eq!(event["spans"][0]["name"], "request");
        assert_eq!(event["spans"][0]["request_id"], "r-1");
        assert_eq!(event["spans"][0]["client"], "app");
        assert_eq!(event["spans"][1]["cache.result"], "hit");
        assert!(event["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[tokio::test]
    async fn events_in_a_request_name_it_first_among_their_spans() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry().with(JsonLogs::new(sink.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let trace = crate::telemetry::TraceParent::from_headers(&Default::default());
        let (trace_id, span_id) = (trace.trace_id, trace.span_id);
        let request = RequestContext::new(
            "GET /v1/tokens",
            "/v1/tokens",
            axum::http::HeaderValue::from_static("r-1"),
            Some(trace),
            crate::telemetry::TraceMode::default(),
        );
        request
            .scope(async {
                tracing::info!("before the caller is known");
                RequestContext::record_client(&Arc::from("app"), &crate::domain::Proof::Key);
                let lookup = tracing::info_span!("cache.lookup", cache.result = "miss");
                lookup.in_scope(|| tracing::info!("inside"));
            })
            .await;
        tracing::info!("outside");

        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(events.len(), 3, "{text}");
        assert_eq!(
            events[0]["spans"],
            serde_json::json!([{
                "name": "request",
                "otel.name": "GET /v1/tokens",
                "otel.kind": "server",
                "route": "/v1/tokens",
                "request_id": "r-1",
                "trace_id": trace_id.as_str(),
                "span_id": span_id.as_str(),
            }])
        );
        let inside = &events[1]["spans"];
        assert_eq!(inside[0]["client"], "app");
        assert_eq!(inside[0]["request_id"], "r-1");
        assert_eq!(inside[1]["name"], "cache.lookup");
        assert_eq!(inside[1]["cache.result"], "miss");
        assert!(events[2].get("spans").is_none(), "{text}");
    }

    #[test]
    fn timestamps_are_rfc_3339_with_microseconds_across_seconds() {
        for offset in [
            0,
            1,
            999_999,
            1_000_000,
            86_400_000_001,
            1_234_567_890_123_456,
        ] {
            let now = UNIX_EPOCH + Duration::from_micros(offset);
            let mut line = String::new();
            push_timestamp(&mut line, now);
            assert_eq!(line, humantime::format_rfc3339_micros(now).to_string());
        }
    }
}
