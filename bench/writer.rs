//! token-broker's `serve` with its audit events committed one of two ways,
//! so `bench/run` measures what group commit costs on the real hit path and
//! nothing else differs: `commit` (the service: an answer leaves once the
//! write of its audit event returned) and `queued` (an answer leaves once
//! its event is queued, as before group commit).
//!
//!     bench-writer commit|queued CONFIG_FILE

use std::path::PathBuf;

use token_broker::config::{Settings, Sources};
use token_broker::startup::{Application, shutdown_signal};
use token_broker::telemetry::writer::LogQueue;
use token_broker::telemetry::{TraceMode, log_layer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// As the binary: see `src/main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(writer), Some(config)) = (args.next(), args.next()) else {
        panic!("usage: bench-writer commit|queued CONFIG_FILE");
    };
    let settings = Settings::load(&Sources {
        file: Some(PathBuf::from(config)),
        ..Sources::default()
    })
    .expect("a valid configuration");
    let (queue, _guard) = LogQueue::spawn(std::io::stdout(), settings.log.queue_bytes);
    tracing_subscriber::registry()
        .with(log_layer(
            settings.log.level.as_str(),
            settings.log.format,
            queue.ordinary(),
        ))
        .init();
    let trail = match writer.as_str() {
        "commit" => queue.audit_trail(),
        "queued" => queue.audit_trail().done_when_queued(),
        other => panic!("unknown writer {other}"),
    };
    let app = Application::build(&settings, trail, TraceMode::new(false, settings.log.format))
        .await
        .unwrap_or_else(|e| panic!("cannot start: {e}"));
    tracing::info!(api = %app.api_addr(), admin = %app.admin_addr(), writer, "listening");
    app.run_until(shutdown_signal()).await;
}
