//! Traces end to end: the real binary exports to an in-test OTLP receiver
//! (HTTP/protobuf and gRPC), decoded with the OpenTelemetry proto types.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::helpers::process::{Running, command, config_file, upstream};
use crate::helpers::*;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What an OTLP receiver got.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Received {
    /// Every span with the `service.name` of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for request in self.0.lock().unwrap().iter() {
            for resource_spans in &request.resource_spans {
                let service = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| a.value.as_ref()?.value.clone())
                    .map(|v| match v {
                        Value::StringValue(s) => s,
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let router = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(received): State<Received>, body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                received.0.lock().unwrap().push(request);
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, received)
}

async fn grpc_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (addr, received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(Value::StringValue(s)) => s,
                Some(Value::IntValue(i)) => i.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// Runs one miss with the caller's `traceparent` through the binary,
/// exporting to `otlp` = (protocol, collector) or to nothing; returns the
/// broker's log output and the vendor's view.
async fn traced_request(
    otlp: Option<(&str, &str)>,
) -> (String, token_broker::simulator::Simulator) {
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command
        .arg("--config")
        .arg(config_file(&dir, upstream, ""))
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_TRACES_SAMPLER");
    match otlp {
        Some((protocol, collector)) => command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_SERVICE_NAME", "token-broker-test"),
        None => command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    };
    let mut broker = Running::start(command).await;
    let response = reqwest::Client::new()
        .get(broker.tokens_url(&member_query(ALICE, "AGENT")))
        .bearer_auth(READER_KEY)
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .header("baggage", "tenant=caller-private")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    broker.stop().await;
    (broker.output(), sim)
}

/// The spans of the traced request form one tree under the caller's span.
async fn assert_one_trace(received: &Received, sim: &token_broker::simulator::Simulator) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while received.spans().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "spans were not exported"
        );
        // Yield, so the collector on this runtime can take the export.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spans = received.spans();
    let by_id: HashMap<String, &Span> = spans.iter().map(|(_, s)| (hex(&s.span_id), s)).collect();
    let server = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    let client = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("a client span for the vendor call");
    let lookup = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "cache.lookup")
        .expect("a cache lookup span");

    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "token-broker-test")
    );
    assert_eq!(server.name, "GET /v1/tokens");
    assert_eq!(
        hex(&server.trace_id),
        CALLER_TRACE,
        "the caller's trace continues"
    );
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(hex(&lookup.parent_span_id), hex(&server.span_id));
    let mut ancestor = hex(&client.parent_span_id);
    let mut hops = 0;
    while ancestor != hex(&server.span_id) {
        ancestor = hex(&by_id
            .get(&ancestor)
            .expect("parent exported")
            .parent_span_id);
        hops += 1;
        assert!(
            hops < 5,
            "the client span does not descend from the server span"
        );
    }
    let server_attributes = attributes(server);
    assert_eq!(server_attributes["http.request.method"], "GET");
    assert_eq!(server_attributes["http.route"], "/v1/tokens");
    assert_eq!(server_attributes["http.response.status_code"], "200");
    let client_attributes = attributes(client);
    assert_eq!(client_attributes["http.request.method"], "GET");
    assert_eq!(client_attributes["http.response.status_code"], "200");
    assert_eq!(client_attributes["server.address"], "127.0.0.1");

    let traceparent = sim.requests()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let parts: Vec<_> = traceparent.split('-').collect();
    assert_eq!(
        parts[1], CALLER_TRACE,
        "the vendor sees the caller's trace id"
    );
    assert_eq!(
        parts[2],
        hex(&client.span_id),
        "…with the client span as parent"
    );

    for (_, span) in &spans {
        for (key, value) in attributes(span) {
            for secret in [
                ALICE,
                "example.com",
                ALICE_AGENT_TOKEN,
                PARTNER_KEY,
                READER_KEY,
            ] {
                assert!(
                    !value.contains(secret),
                    "span {} attribute {key} holds {secret}",
                    span.name
                );
            }
        }
    }
}

#[tokio::test]
async fn spans_of_one_request_reach_an_otlp_http_collector_as_one_trace() {
    let (collector, received) = http_receiver().await;

    let (logs, sim) = traced_request(Some(("http/protobuf", &format!("http://{collector}")))).await;

    assert_one_trace(&received, &sim).await;
    let audit = logs
        .lines()
        .find(|l| l.contains("\"target\":\"audit\""))
        .expect("the request's audit event");
    assert!(
        audit.contains(&format!("\"trace_id\":\"{CALLER_TRACE}\"")),
        "{audit}"
    );
    for line in logs.lines().filter(|l| l.contains("\"spans\":[{")) {
        assert!(
            line.contains(&format!("\"trace_id\":\"{CALLER_TRACE}\"")),
            "{line}"
        );
        assert!(line.contains("\"span_id\":\""), "{line}");
    }
}

#[tokio::test]
async fn spans_reach_an_otlp_grpc_collector() {
    let (collector, received) = grpc_receiver().await;

    let (_, sim) = traced_request(Some(("grpc", &format!("http://{collector}")))).await;

    assert_one_trace(&received, &sim).await;
}

#[tokio::test]
async fn without_an_endpoint_logs_and_the_vendor_still_see_the_callers_trace_id() {
    let (logs, sim) = traced_request(None).await;

    let traceparent = sim.requests()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(traceparent.split('-').nth(1), Some(CALLER_TRACE));
    assert!(
        !sim.requests()[0].headers.contains_key("baggage"),
        "the caller's baggage is never sent to the vendor"
    );
    let completed = logs
        .lines()
        .find(|l| l.contains("\"target\":\"audit\""))
        .expect("the request's audit event");
    assert!(
        completed.contains(&format!("\"trace_id\":\"{CALLER_TRACE}\"")),
        "{completed}"
    );
    assert!(!logs.contains("exporting traces"), "nothing is exported");
}

#[tokio::test]
async fn sampler_and_resource_attributes_come_from_the_standard_variables() {
    let (collector, received) = http_receiver().await;
    let endpoint = format!("http://{collector}");
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |sampler: &'static str| {
        let mut command = command();
        command
            .arg("--config")
            .arg(config_file(&dir, upstream, ""))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_TRACES_SAMPLER", sampler)
            .env(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=ci,service.name=from-attributes",
            );
        command
    };

    for sampler in ["always_off", "always_on"] {
        let mut broker = Running::start(run(sampler)).await;
        let response = reqwest::Client::new()
            .get(format!(
                "http://{}/v1/tokens?user_id={CUSTOMER_ID}",
                broker.api
            ))
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        broker.stop().await;
        if sampler == "always_off" {
            assert!(received.spans().is_empty(), "always_off exports nothing");
        }
    }

    let spans = received.spans();
    assert!(!spans.is_empty());
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "from-attributes")
    );
    let requests = received.0.lock().unwrap();
    let resource = requests[0].resource_spans[0].resource.as_ref().unwrap();
    assert!(
        resource
            .attributes
            .iter()
            .any(|a| a.key == "deployment.environment.name")
    );
    assert_eq!(sim.calls(), 2, "each run fetched the token itself");
}

/// Spans an in-process app exported, kept in memory.
#[derive(Clone, Debug, Default)]
struct Exported(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanExporter for Exported {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

// On the current-thread runtime: the app's tasks run on this thread, under
// the OpenTelemetry layer this test installs for it.
#[tokio::test]
async fn an_in_process_app_with_export_on_continues_the_callers_trace_to_the_vendor() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let exported = Exported::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    // tracing caches whether a callsite is of interest, process-wide. While
    // a single dispatcher is registered, a callsite first hit on another
    // test's thread is judged by that thread's (absent) subscriber alone,
    // and stays off here too; with two registered, every one is asked.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let _traced = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let app = TestApp::builder().exporting().spawn().await;

    let response = app
        .http
        .get(app.url(&format!("/v1/tokens?{}", member_query(ALICE, "AGENT"))))
        .bearer_auth(READER_KEY)
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let spans = exported.0.lock().unwrap().clone();
    let server = spans
        .iter()
        .find(|s| s.name == "GET /v1/tokens")
        .unwrap_or_else(|| panic!("no server span among {spans:?}"));
    let context = &server.span_context;
    assert_eq!(context.trace_id().to_string(), CALLER_TRACE);
    assert_eq!(server.parent_span_id.to_string(), CALLER_SPAN);
    let lookup = spans
        .iter()
        .find(|s| s.name == "cache.lookup")
        .expect("a miss makes a cache.lookup span");
    assert_eq!(lookup.span_context.trace_id(), context.trace_id());
    let sent = app.sim.requests()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with(&format!("00-{CALLER_TRACE}-")),
        "the vendor sees the caller's trace: {sent}"
    );
}
