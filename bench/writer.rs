//! token-broker's `serve` with the log writer chosen on the command line, so
//! `bench/run` measures the writer on the real hit path and nothing else
//! differs: `queue` (the service's own `LogQueue`), `appender-lossy` and
//! `appender-blocking` (tracing-appender's `non_blocking`, dropping lines or
//! waiting when its channel is full).
//!
//!     bench-writer WRITER CONFIG_FILE

use std::path::PathBuf;

use token_broker::config::{Settings, Sources};
use token_broker::startup::{Application, shutdown_signal};
use token_broker::telemetry::log_layers;
use token_broker::telemetry::writer::LogQueue;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// As the binary: see `src/main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(writer), Some(config)) = (args.next(), args.next()) else {
        panic!("usage: bench-writer queue|appender-lossy|appender-blocking CONFIG_FILE");
    };
    let settings = Settings::load(&Sources {
        file: Some(PathBuf::from(config)),
        ..Sources::default()
    })
    .expect("a valid configuration");
    let (level, format) = (settings.log.level.as_str(), settings.log.format);
    // Each guard writes out what its writer holds when dropped at exit.
    let mut _queue_guard = None;
    let mut _appender_guard = None;
    match writer.as_str() {
        "queue" => {
            let (queue, guard) = LogQueue::spawn(std::io::stdout(), settings.log.queue_bytes);
            _queue_guard = Some(guard);
            tracing_subscriber::registry()
                .with(log_layers(level, format, queue.ordinary(), queue.audit()))
                .init();
        }
        "appender-lossy" | "appender-blocking" => {
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(writer == "appender-lossy")
                .finish(std::io::stdout());
            _appender_guard = Some(guard);
            tracing_subscriber::registry()
                .with(log_layers(level, format, writer.clone(), writer))
                .init();
        }
        other => panic!("unknown writer {other}"),
    }
    let app = Application::build(&settings)
        .await
        .unwrap_or_else(|e| panic!("cannot start: {e}"));
    tracing::info!(api = %app.api_addr(), admin = %app.admin_addr(), writer, "listening");
    app.run_until(shutdown_signal()).await;
}
