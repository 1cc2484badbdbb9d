//! OpenTelemetry trace export over OTLP, configured by the standard
//! `OTEL_*` variables; without an endpoint, a provider that records nothing.

use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, span_processor_with_async_runtime};

use super::{SERVICE_NAME, env};

pub(super) fn protocol_name() -> String {
    env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into())
}

/// Records nothing: spans carry trace context for logs and propagation only.
pub(super) fn silent_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .build()
}

/// Exports over OTLP with the protocol, endpoint, sampler and resource the
/// standard `OTEL_*` variables give.
pub(super) fn exporting_provider() -> Result<SdkTracerProvider, String> {
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
