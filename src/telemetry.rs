//! Logs, traces and the metrics registry.
//!
//! Logs: JSON (or pretty) on stdout, filtered by `log.level`; every event in
//! a request carries its `request_id`, `trace_id` and `span_id` (in `spans`,
//! as the `request` entry).
//! Traces: `tracing` spans become OpenTelemetry spans. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set (read with the rest of the
//! configuration, `config::OtelSettings`) they are exported over OTLP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` = `http/protobuf`, the default, or `grpc`;
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`
//! honoured). Without it nothing is recorded or exported, and a request makes
//! no span: its `RequestContext` carries the W3C trace context, so logs and
//! the vendor still see the caller's trace id. Which of the two is on is
//! one value, `TraceMode`, handed to whatever needs it.

mod escape;
mod json;
pub mod line;
pub mod metrics;
mod otlp;
pub mod process;
mod request;
mod trace_context;
pub mod writer;

pub use json::JsonLogs;
pub use request::{RequestContext, inject_current};
pub use trace_context::{HexId, TraceParent, record_trace_ids};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, OtelSettings};
use otlp::{exporting_provider, protocol_name, silent_provider};

/// The target the audit trail's lines name. They do not pass through
/// `tracing`: the audit trail writes them into a lane of the log queue of
/// their own (`writer::AuditTrail`), and `log.level` does not filter them.
pub const AUDIT_TARGET: &str = "audit";

/// `duration` in whole microseconds, as log lines give durations.
pub fn whole_micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The service name when `OTEL_SERVICE_NAME` does not give one.
pub const SERVICE_NAME: &str = "token-broker";

/// Keeps the log writer and the trace pipeline alive; `shutdown` flushes
/// what is buffered.
#[must_use = "dropping Telemetry without shutdown loses buffered spans"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    mode: TraceMode,
    /// Stops the log writer thread once the queue is written.
    log_writer: writer::WriterGuard,
    /// Where audit events are committed.
    audit_trail: writer::AuditTrail,
}

impl Telemetry {
    /// Where the audit trail commits its events.
    pub fn audit_trail(&self) -> writer::AuditTrail {
        self.audit_trail.clone()
    }

    /// How requests are traced.
    pub fn mode(&self) -> TraceMode {
        self.mode
    }

    /// Flushes and stops span export (bounded by the exporter's own timeout),
    /// then writes the log lines still queued, until `deadline` at most, and
    /// says on stderr how many lines were lost.
    pub async fn shutdown(self, deadline: std::time::Instant) {
        let Telemetry {
            provider,
            mode,
            log_writer,
            ..
        } = self;
        if mode.exporting {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "could not flush traces at shutdown");
            }
        }
        let dropped = writer::dropped_so_far();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines were dropped since start (stdout did not keep up); see token_broker_log_lines_dropped_total"
            );
        }
        let drained = tokio::task::spawn_blocking(move || log_writer.finish(deadline))
            .await
            .ok();
        if let Some(drained) = drained.filter(|d| d.dropped > 0 || d.unwritten > 0) {
            writer::report_on_stderr(&drained);
        }
    }
}

/// Installs logging and tracing for the process, with trace export when
/// `otel` names an endpoint. Call once, inside the runtime.
pub fn init(settings: &LogSettings, otel: &OtelSettings) -> Telemetry {
    // W3C trace context only: a caller's `baggage` is neither read nor sent
    // on to the vendor, never `baggage`.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint_set = otel.endpoint_set();
    let mut setup_error = None;
    let provider = if endpoint_set {
        exporting_provider(otel).unwrap_or_else(|error| {
            setup_error = Some(error);
            silent_provider()
        })
    } else {
        silent_provider()
    };
    let exporting = endpoint_set && setup_error.is_none();
    let tracer = provider.tracer(SERVICE_NAME);
    // A writer thread takes the lines off the request path; a full queue
    // drops lines rather than making a request wait.
    let (queue, log_writer) = writer::LogQueue::spawn(std::io::stdout(), settings.queue_bytes);
    let ordinary = queue.ordinary();
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
            .with(log_layer(level, format, ordinary))
            .try_init()
    } else {
        logging_only(level, format, ordinary).try_init()
    };
    if let Some(error) = setup_error {
        tracing::error!(%error, "cannot set up OTLP trace export; traces are not exported");
    } else if exporting {
        tracing::info!(protocol = %protocol_name(otel), "exporting traces over OTLP");
    }
    Telemetry {
        provider,
        mode: TraceMode::new(exporting, settings.format),
        log_writer,
        audit_trail: queue.audit_trail(),
    }
}

/// The log layer: the configured format, filtered by `level` (an
/// `EnvFilter` directive; `info` if invalid), writing to `writer`. (The
/// audit trail does not pass through it.)
pub fn log_layer<S, W>(level: &str, format: LogFormat, writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    formatted(format, writer).with_filter(level_filter(level))
}

/// The subscriber when no trace is exported: the log layer alone, so a span
/// the log level turns off is never made.
fn logging_only<W>(
    level: &str,
    format: LogFormat,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(log_layer(level, format, writer))
}

/// `log.level` as a filter; `info` if it does not parse (validated at load).
fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A layer writing each event in `format` to `writer`.
fn formatted<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => JsonLogs::new(writer).boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            // Colours for a person at a terminal, never escape codes in a file or pipe.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .pretty()
            .boxed(),
    }
}

/// How requests are traced, decided once by `init` and passed on as a
/// value (to the API service, which puts it in each `RequestContext`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceMode {
    /// Spans are exported over OTLP: an OpenTelemetry layer is installed,
    /// and it carries the W3C trace context. Without it, no OpenTelemetry
    /// layer: the request's `TraceParent` carries the context.
    pub exporting: bool,
    /// A request makes a `tracing` span: when spans are exported, and for
    /// the pretty log format, which shows a request's fields from its span.
    /// JSON logs without export take them from the `RequestContext` instead.
    pub request_spans: bool,
}

impl TraceMode {
    /// The mode for `format` with export on or off.
    pub fn new(exporting: bool, format: LogFormat) -> Self {
        Self {
            exporting,
            request_spans: exporting || format == LogFormat::Pretty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_export_a_span_below_the_log_level_is_never_made() {
        let sink = json::tests::Sink::default();
        let subscriber = logging_only("warn", LogFormat::Json, sink.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "r-1");
            assert!(span.is_disabled());
            assert!(!tracing::warn_span!("failing").is_disabled());
            span.in_scope(|| tracing::warn!("shown"));
            tracing::info!("hidden");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains(r#""message":"shown""#), "{text}");
        assert!(!text.contains("hidden"), "{text}");
    }
}
