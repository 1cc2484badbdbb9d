//! OpenTelemetry trace export over OTLP, configured by the standard
//! `OTEL_*` variables; without an endpoint, a provider that records nothing.

use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, span_processor_with_async_runtime};

use super::SERVICE_NAME;
use crate::config::OtelSettings;

pub(super) fn protocol_name(otel: &OtelSettings) -> String {
    otel.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| otel.get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or("http/protobuf")
        .to_owned()
}

/// Records nothing: spans carry trace context for logs and propagation only.
pub(super) fn silent_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .build()
}

/// Exports over OTLP with the protocol, endpoint, sampler and resource the
/// standard `OTEL_*` variables give. This service decides from `otel`
/// whether to export, with which protocol and under which name; the
/// OpenTelemetry builders read the variables they own (endpoint, headers,
/// sampler, resource attributes) from the process environment themselves.
pub(super) fn exporting_provider(otel: &OtelSettings) -> Result<SdkTracerProvider, String> {
    let exporter = match protocol_name(otel).as_str() {
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
    let named = otel.get("OTEL_SERVICE_NAME").is_some()
        || otel
            .get("OTEL_RESOURCE_ATTRIBUTES")
            .is_some_and(|a| a.contains("service.name="));
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
