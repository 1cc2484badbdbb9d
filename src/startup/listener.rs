//! Serving one listener with limits a hostile or broken client cannot get
//! around: a header-read timeout (slow clients are cut off), a bound on open
//! connections with load shedding (a 503 problem, then close), and a read
//! buffer cap. Garbage bytes get hyper's 400 and a closed connection.

use std::convert::Infallible;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::telemetry::metrics::{ListenerLabels, Metrics};

/// Largest request head hyper buffers; heads over 8 KiB but under this get
/// a problem+json 414/431 from `http::observe`, larger ones hyper's own 431.
const MAX_BUF_BYTES: usize = 64 * 1024;
/// Shed connections handled at once; beyond it they are simply closed.
const MAX_SHEDDING: usize = 256;
/// How long a shed connection is read from after its 503, so the client
/// sees the answer rather than a reset.
const SHED_LINGER: Duration = Duration::from_millis(500);

const SHED_BODY: &str = r#"{"type":"urn:token-broker:problem:overloaded","title":"Overloaded","status":503,"detail":"too many open connections; retry shortly"}"#;

/// The whole answer to a shed connection.
static SHED_RESPONSE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{SHED_BODY}",
        SHED_BODY.len()
    )
});

/// Per-listener limits, from `server.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Accepts connections until `stop` turns true, then lets open ones finish
/// (idle keep-alive connections are closed at once); `close` cuts those still
/// open. Returns once every connection has ended.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    name: &'static str,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    close: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let shedding = Arc::new(Semaphore::new(MAX_SHEDDING));
    let graceful = GracefulShutdown::new();
    // Every connection's task, so `close` can abort them. (A per-connection
    // select on the cancellation token would be polled with every request.)
    let mut connections_open = JoinSet::new();
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off, never exit.
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Reap finished connections, so the set holds only open ones.
        while connections_open.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics
                .connections_shed
                .get_or_create(&ListenerLabels { listener: name })
                .inc();
            if let Ok(permit) = shedding.clone().try_acquire_owned() {
                connections_open.spawn(async move {
                    shed(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        let service = TowerToHyperService::new(service.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections_open.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        // Aborting a connection's task drops it, closing its socket mid-request or not.
        () = close.cancelled() => connections_open.abort_all(),
    }
    while connections_open.join_next().await.is_some() {}
}

/// Answers 503 and closes, reading briefly so the client gets the answer.
async fn shed(mut stream: TcpStream) {
    let _ = tokio::time::timeout(SHED_LINGER, async {
        let mut buf = [0u8; 1024];
        // Read what the client sent so far, so closing does not reset the connection.
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
        stream.write_all(SHED_RESPONSE.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shed_response_is_a_complete_problem() {
        let (head, body) = SHED_RESPONSE.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(SHED_RESPONSE.contains(&format!("content-length: {}\r\n", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
    }
}
