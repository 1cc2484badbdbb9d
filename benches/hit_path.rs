//! The cache-hit path in process: the API service through `oneshot`, from
//! request to response bytes, with the production per-request work (request
//! id, span, authentication, metrics) and JSON logging at `info` into a sink
//! through the service's log queue (so one request at a time waits for the
//! write of its audit event, its batch of one), so a regression shows
//! without a network.
//!
//!     cargo bench --bench hit_path

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

use token_broker::audit::{Auditor, SubjectKey};
use token_broker::broker::{Broker, FetchFuture, TokenSource};
use token_broker::callers::Callers;
use token_broker::config::{ClientSettings, KeyDigest, LogFormat, Scope, Settings, Sources};
use token_broker::domain::{Identity, Token};
use token_broker::http::{AppParts, AppState, router};
use token_broker::telemetry::metrics::Metrics;
use token_broker::telemetry::writer::LogQueue;
use token_broker::telemetry::{TraceMode, log_layer};
use token_broker::upstream::Fetched;

const KEY: &str = "bench-caller-key-0123456789abcdef0123";

/// Answers at once, like a vendor that is never asked twice.
struct Immediate;

impl TokenSource for Immediate {
    fn fetch<'a>(
        &'a self,
        _identity: &'a Identity,
        _: &'a token_broker::upstream::Askers,
    ) -> FetchFuture<'a> {
        Box::pin(async {
            Ok(Fetched {
                token: Token::new("0123456789abcdef0123456789abcdef0123456789abcdef"),
                active: true,
            })
        })
    }
}

fn request() -> Request<Body> {
    Request::builder()
        .uri("/ext/get-user-token?email=alice%40example.com&type=AGENT")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::empty())
        .unwrap()
}

fn hit_path(c: &mut Criterion) {
    // What `telemetry::init` installs, at the default level, into a sink.
    let (queue, _writer) = LogQueue::spawn(std::io::sink(), 1 << 24);
    let subscriber =
        tracing_subscriber::registry().with(log_layer("info", LogFormat::Json, queue.ordinary()));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = Settings::load(&Sources::default()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let clients = [ClientSettings::new(
        "bench",
        KeyDigest::of_key(KEY),
        vec![Scope::TokensRead],
    )];
    metrics.register_clients(["bench"]);
    let app = router(AppState::new(AppParts {
        broker: Arc::new(Broker::new(
            &settings.cache,
            Arc::new(Immediate),
            metrics.clone(),
        )),
        auditor: Auditor::new(
            SubjectKey::with_key(b"bench-audit-key-0123456789".to_vec()),
            queue.audit_trail(),
            LogFormat::Json,
        ),
        callers: Callers::new(&clients, false, None),
        metrics,
        trace_mode: TraceMode::new(false, LogFormat::Json),
    }));
    let warm = runtime.block_on(app.clone().oneshot(request())).unwrap();
    assert_eq!(warm.status(), 200);

    c.bench_function("cache hit, info logging, key caller", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = app.clone().oneshot(request()).await.unwrap();
            axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap()
        })
    });
}

criterion_group!(benches, hit_path);
criterion_main!(benches);
