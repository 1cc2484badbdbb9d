//! A TCP proxy that injects faults between a broker and Redis: pass, delay,
//! blackhole, reset (every connection, open or new, is reset) and drop
//! messages (every reply passes, PONGs included, but no published message
//! reaches a subscriber: a subscription left on a server nobody publishes to),
//! or only those on one channel (the others, canaries included, still arrive).
//!
//! A blackhole is a partition as TCP sees it: connections stay open and
//! nothing goes through, in either direction, for as long as it lasts; what
//! was sent meanwhile arrives when it heals, as TCP's retransmissions would
//! deliver it (no byte inside a live stream is ever lost). One that outlasts
//! the brokers' patience is, to them, a silently dead connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Delay(Duration),
    Blackhole,
    Reset,
    DropMessages,
    /// Drops the messages published on this channel only.
    DropChannel(&'static str),
}

/// A proxy on 127.0.0.1 in front of `target`; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fault, watching) = watch::channel(Fault::Pass);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target, watching.clone()));
            }
        });
        Self { addr, fault, task }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    // Every close is a reset: a fault proxy has nothing to linger for.
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    if *fault.borrow() == Fault::Reset {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, fault.clone(), false);
    let down = pump(server_read, client_write, fault.clone(), true);
    let reset = async {
        while fault.changed().await.is_ok() {
            if *fault.borrow() == Fault::Reset {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        () = reset => {}
    }
}

/// Copies `from` to `to` under the current fault; `replies`: this is Redis's
/// side, cut into whole RESP frames so published messages can be dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    replies: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if !through_the_blackhole(&mut fault).await {
            return;
        }
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 || !through_the_blackhole(&mut fault).await {
            return;
        }
        let now = *fault.borrow();
        match now {
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            Fault::Reset => return,
            Fault::Pass | Fault::Blackhole | Fault::DropMessages | Fault::DropChannel(_) => {}
        }
        if !replies {
            if to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
            continue;
        }
        pending.extend_from_slice(&buffer[..read]);
        let mut passed = Vec::with_capacity(pending.len());
        let mut at = 0;
        while let Some(length) = frame_length(&pending[at..]) {
            let frame = &pending[at..at + length];
            if !dropped(frame, now) {
                passed.extend_from_slice(frame);
            }
            at += length;
        }
        pending.drain(..at);
        if to.write_all(&passed).await.is_err() {
            return;
        }
    }
}

/// Whether `frame`, one whole frame from Redis, is a published message that
/// `fault` drops.
fn dropped(frame: &[u8], fault: Fault) -> bool {
    let Some(rest) = frame
        .strip_prefix(b"*3\r\n$7\r\nmessage\r\n")
        .or_else(|| frame.strip_prefix(b">3\r\n$7\r\nmessage\r\n"))
    else {
        return false;
    };
    match fault {
        Fault::DropMessages => true,
        Fault::DropChannel(channel) => {
            rest.starts_with(format!("${}\r\n{channel}\r\n", channel.len()).as_bytes())
        }
        _ => false,
    }
}

/// The length of the whole RESP2/RESP3 frame at the start of `bytes`, if
/// it is all there.
fn frame_length(bytes: &[u8]) -> Option<usize> {
    let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let header = std::str::from_utf8(&bytes[1..line_end]).ok()?;
    let after = line_end + 2;
    match bytes.first()? {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(after),
        b'$' | b'=' | b'!' => {
            let length: i64 = header.parse().ok()?;
            if length < 0 {
                return Some(after);
            }
            let end = after + usize::try_from(length).ok()? + 2;
            (bytes.len() >= end).then_some(end)
        }
        kind @ (b'*' | b'>' | b'~' | b'%' | b'|') => {
            let count: i64 = header.parse().ok()?;
            let items = match kind {
                b'%' | b'|' => count.max(0) * 2,
                _ => count.max(0),
            };
            let mut at = after;
            for _ in 0..items {
                at += frame_length(&bytes[at..])?;
            }
            Some(at)
        }
        _ => None,
    }
}

/// Waits while a blackhole lasts; `false` when the connection is to end.
async fn through_the_blackhole(fault: &mut watch::Receiver<Fault>) -> bool {
    loop {
        let now = *fault.borrow_and_update();
        match now {
            Fault::Blackhole => {
                if fault.changed().await.is_err() {
                    return false;
                }
            }
            Fault::Reset => return false,
            Fault::Pass | Fault::Delay(_) | Fault::DropMessages | Fault::DropChannel(_) => {
                return true;
            }
        }
    }
}
