//! Serving one listener with limits a hostile or broken client cannot get
//! around: a header-read timeout (slow clients are cut off; with TLS the
//! handshake too), a bound on open connections with load shedding (a 503
//! problem, then close), a bound per peer address (so one peer cannot hold
//! every slot), and a read buffer cap. Garbage bytes get hyper's 400 and a
//! closed connection. With TLS, the protocol is the one ALPN chose (HTTP/2
//! for `h2`, else HTTP/1.1), and a verified client certificate is attached to
//! each of the connection's requests as a `PeerCertificate`; without, a
//! connection that opens with the HTTP/2 preface (prior knowledge, h2c) is
//! served HTTP/2, any other HTTP/1.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::telemetry::metrics::{ListenerLabels, Metrics};
use crate::tls::{PeerCertificate, Tls};

/// Largest request head hyper buffers; heads over 8 KiB but under this get
/// a problem+json 414/431 from `http::observe`, larger ones hyper's own 431.
const MAX_BUF_BYTES: usize = 64 * 1024;
/// Header fields hyper parses, so that a request with more than
/// `http::observe::MAX_HEADER_FIELDS` gets a problem+json 431 rather than
/// hyper's bare one (which only a head of more than this many fields gets).
const MAX_PARSED_HEADERS: usize = 512;
/// Shed connections handled at once; beyond it they are simply closed.
const MAX_SHEDDING: usize = 256;
/// How long a shed connection is read from after its 503, so the client
/// sees the answer rather than a reset.
const SHED_LINGER: Duration = Duration::from_millis(500);

const SHED_BODY: &str = r#"{"type":"urn:token-broker:problem:overloaded","title":"Overloaded","status":503,"detail":"too many open connections; retry shortly"}"#;
const PEER_BODY: &str = r#"{"type":"urn:token-broker:problem:overloaded","title":"Overloaded","status":503,"detail":"too many open connections from this address; close idle ones or retry shortly"}"#;

/// The whole answer to a shed connection.
static SHED_RESPONSE: LazyLock<String> = LazyLock::new(|| closing_503(SHED_BODY));
/// The whole answer to a connection over its peer's bound.
static PEER_RESPONSE: LazyLock<String> = LazyLock::new(|| closing_503(PEER_BODY));

fn closing_503(body: &str) -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Per-listener limits, from `server.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Open connections from one peer address; `None`: no bound per peer.
    pub max_connections_per_peer: Option<usize>,
}

/// Open connections by peer address, for `max_connections_per_peer`.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One open connection of a peer; dropping it when the connection ends
/// gives the slot back.
struct PeerSlot {
    peers: Arc<Peers>,
    address: IpAddr,
}

impl Peers {
    /// A slot for `address`, unless it already holds `bound`.
    fn take(self: &Arc<Self>, address: IpAddr, bound: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(address).or_insert(0);
        if *count >= bound {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            address,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// What a listener serves: the whole router, as one infallible service.
pub trait Served:
    Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Served for S where
    S: Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// One listener: its name (the `listener` label), limits, and TLS if it is HTTPS.
#[derive(Clone)]
pub struct Serving {
    pub name: &'static str,
    pub limits: Limits,
    pub tls: Option<Arc<Tls>>,
}

/// Accepts connections until `stop` turns true, then lets open ones finish
/// (idle keep-alive connections are closed at once); `close` cuts those still
/// open. Returns once every connection has ended.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    serving: Serving,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    close: CancellationToken,
) where
    S: Served,
{
    let Serving { name, limits, tls } = serving;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_BYTES)
        .max_headers(MAX_PARSED_HEADERS);
    let protocols = Arc::new(Protocols {
        http1: http,
        http2: http2_builder(),
    });
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers::default());
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
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
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
        // Refused: counted, answered 503 and closed (when not too many are
        // being answered already).
        let mut refuse =
            |stream: TcpStream, counter: &Family<ListenerLabels, Counter>, response| {
                counter
                    .get_or_create(&ListenerLabels { listener: name })
                    .inc();
                if let Ok(permit) = shedding.clone().try_acquire_owned() {
                    connections_open.spawn(async move {
                        shed(stream, response).await;
                        drop(permit);
                    });
                }
            };
        let peer_slot = match limits.max_connections_per_peer {
            Some(bound) => match peers.take(peer.ip(), bound) {
                Some(slot) => Some(slot),
                None => {
                    refuse(
                        stream,
                        &metrics.connections_refused_per_peer,
                        &PEER_RESPONSE,
                    );
                    continue;
                }
            },
            None => None,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refuse(stream, &metrics.connections_shed, &SHED_RESPONSE);
            continue;
        };
        let permit = (permit, peer_slot);
        let handshake = tls.as_ref().map(|tls| Handshake {
            acceptor: tls.acceptor(),
            timeout: limits.header_read_timeout,
            metrics: metrics.clone(),
        });
        let (protocols, service) = (protocols.clone(), service.clone());
        let (watcher, timeout) = (graceful.watcher(), limits.header_read_timeout);
        connections_open.spawn(async move {
            match handshake {
                Some(handshake) => {
                    handshake
                        .then_serve(stream, service, &protocols, watcher)
                        .await;
                }
                None => {
                    let preface =
                        tokio::time::timeout(timeout, opens_with_h2_preface(&stream)).await;
                    if let Ok(Ok(h2)) = preface {
                        serve_http(TokioIo::new(stream), h2, service, &protocols, watcher).await;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        // Aborting a connection's task drops it, closing its socket mid-request or not.
        () = close.cancelled() => {}
    }
    // Every served connection has ended (or the grace is over); what is left
    // has sent no request yet (a handshake, an unread preface, a shed
    // answer): closed at once, like an idle keep-alive connection.
    connections_open.abort_all();
    while connections_open.join_next().await.is_some() {}
}

/// The connection builders of one listener.
#[derive(Clone)]
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_BUF_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS);
    http2
}

/// Concurrent requests on one HTTP/2 connection.
const MAX_STREAMS: u32 = 256;

/// A TLS handshake bounded like a request head, then the connection served.
struct Handshake {
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Handshake {
    async fn then_serve<S>(
        self,
        stream: TcpStream,
        service: S,
        protocols: &Protocols,
        watcher: Watcher,
    ) where
        S: Served,
    {
        let accepted = tokio::time::timeout(self.timeout, self.acceptor.accept(stream)).await;
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                self.metrics.tls.handshake(false);
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls.handshake(false);
                tracing::debug!("TLS handshake not finished within server.header_read_timeout");
                return;
            }
        };
        self.metrics.tls.handshake(true);
        let (_, connection) = stream.get_ref();
        let h2 = connection.alpn_protocol() == Some(b"h2");
        let peer = PeerCertificate::of(connection).map(Arc::new);
        let service = service.map_request(move |mut request: Request<Incoming>| {
            if let Some(peer) = &peer {
                request.extensions_mut().insert(peer.clone());
            }
            request
        });
        serve_http(TokioIo::new(stream), h2, service, protocols, watcher).await;
    }
}

/// Serves one connection, HTTP/2 or HTTP/1.1, until it ends or shutdown
/// closes it.
async fn serve_http<I, S>(
    io: TokioIo<I>,
    h2: bool,
    service: S,
    protocols: &Protocols,
    watcher: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Served,
{
    let service = TowerToHyperService::new(service);
    let ended = if h2 {
        watcher
            .watch(protocols.http2.serve_connection(io, service))
            .await
    } else {
        watcher
            .watch(protocols.http1.serve_connection(io, service))
            .await
    };
    if let Err(error) = ended {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the connection opens with the HTTP/2 preface, read without
/// taking it off the socket; decided at the first byte that differs (`G` of
/// `GET` at once). An error when the peer closes first.
async fn opens_with_h2_preface(stream: &TcpStream) -> std::io::Result<bool> {
    let mut seen = [0u8; H2_PREFACE.len()];
    loop {
        let read = stream.peek(&mut seen).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if seen[..read] != H2_PREFACE[..read] {
            return Ok(false);
        }
        if read == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far: a peek would return at once with the
        // same bytes, so wait a little for the rest (bounded by the caller).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Answers `response` (a 503) and closes, reading briefly so the client gets the answer.
async fn shed(mut stream: TcpStream, response: &'static str) {
    let _ = tokio::time::timeout(SHED_LINGER, async {
        let mut buf = [0u8; 1024];
        // Read what the client sent so far, so closing does not reset the connection.
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
        stream.write_all(response.as_bytes()).await?;
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
    fn the_shed_responses_are_complete_problems() {
        for response in [&*SHED_RESPONSE, &*PEER_RESPONSE] {
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 503 "));
            assert!(response.contains(&format!("content-length: {}\r\n", body.len())));
            let problem: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(problem["status"], 503);
        }
    }

    #[test]
    fn a_peer_gets_its_bound_and_its_slots_back_when_connections_end() {
        let peers = Arc::new(Peers::default());
        let (one, two) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = peers.take(one, 2).unwrap();
        let _second = peers.take(one, 2).unwrap();
        assert!(peers.take(one, 2).is_none(), "the third of one peer");
        assert!(peers.take(two, 2).is_some(), "another peer is not affected");
        drop(first);
        assert!(
            peers.take(one, 2).is_some(),
            "a closed connection frees its slot"
        );
    }
}
