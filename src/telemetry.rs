//! Logs, traces and the metrics registry.
//!
//! Logs: JSON (or pretty) on stdout, filtered by `log.level`; every event in
//! a request carries the spans' `request_id`, `trace_id` and `span_id`.
//! Traces: `tracing` spans become OpenTelemetry spans. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set they are exported over OTLP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` = `http/protobuf`, the default, or `grpc`;
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`
//! honoured). Without it nothing is recorded or exported: spans still carry
//! W3C trace context so logs and the vendor see the caller's trace id.

pub mod logs;
pub mod metrics;
pub mod process;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, span_processor_with_async_runtime};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
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
    log_writer: WorkerGuard,
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
    // on to the vendor (SPEC §7).
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

    let level = || EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // `log.level` filters traces and every log but the audit trail, whose own
    // layer writes each audit event whatever the level says (SPEC §7).
    let general = level().add_directive(
        format!("{}=off", crate::audit::TARGET)
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid directive")),
    );
    let audit = filter_fn(|metadata| metadata.target() == crate::audit::TARGET);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(level());
    // A writer thread takes the lines off the request path. Lossless: when
    // its queue is full, callers wait rather than an event being dropped.
    let (writer, log_writer) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("token-broker-logs")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(log_layer(settings.format, writer.clone()).with_filter(general))
        .with(log_layer(settings.format, writer).with_filter(audit))
        .try_init();
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

/// Log lines queued for the writer thread before callers wait.
const LOG_QUEUE_LINES: usize = 64 * 1024;

/// One log layer in the configured format, writing to `writer`.
fn log_layer<S>(format: LogFormat, writer: NonBlocking) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
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
/// fields, so every log event inside it carries them.
pub fn record_trace_ids(span: &tracing::Span) {
    let context = span.context();
    let span_ref = context.span();
    let ids = span_ref.span_context();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
}
