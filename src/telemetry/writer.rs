//! Where log lines go: a bounded queue in memory that a thread of its own
//! writes to stdout every few milliseconds, so a request neither makes a
//! system call nor waits to log, and a stalled reader of stdout (a full
//! pipe, a stuck log collector) never stops the service.
//!
//! The queue has two lanes. Audit events have one of their own, of
//! `capacity` bytes, and go first: the writer takes every audit event queued
//! before any ordinary line, and writes ordinary lines in chunks of at most
//! `ORDINARY_CHUNK` bytes, so a flood of ordinary lines (strangers' 401s,
//! say) neither fills the audit lane nor makes an audit event wait behind
//! more than one chunk. Ordinary lines have three quarters of `capacity`.
//!
//! The queue never blocks a logger. An ordinary line that does not fit is
//! dropped, and counted. An audit event that does not fit is refused: the
//! thread that wrote it learns so from `take_audit_refusal`, and its request
//! fails instead of a token leaving without its audit line.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

use crate::telemetry::metrics::{LogDrop, log_lines_dropped, log_lines_dropped_so_far};

/// How long a line may wait in the queue before the writer thread takes it.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// A batch this large wakes the writer at once.
const WAKE_AT_BYTES: usize = 256 * 1024;
/// The most ordinary lines written at once: what an audit event may wait behind.
const ORDINARY_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Set when an audit event written on this thread did not fit.
    static AUDIT_REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// Whether an audit event written on this thread since the last call was
/// refused, clearing the mark. Events are written synchronously, so right
/// after `tracing::info!(target: "audit", …)` this says whether it was queued.
pub fn take_audit_refusal() -> bool {
    AUDIT_REFUSED.with(|refused| refused.replace(false))
}

struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here for lines (or its timer).
    filled: Condvar,
    /// Signalled when the writer has written all it took.
    written: Condvar,
    /// Bytes the audit lane holds at most; the ordinary lane holds three quarters of it.
    capacity: usize,
}

struct Pending {
    /// Audit events, written first.
    audit: Vec<u8>,
    /// Everything else.
    ordinary: Vec<u8>,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    closed: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.audit.is_empty() && self.ordinary.is_empty()
    }

    fn lines(&self) -> u64 {
        lines_in(&self.audit) + lines_in(&self.ordinary)
    }

    /// The next batch into `batch`: every audit event queued, else at most
    /// `ORDINARY_CHUNK` bytes of whole ordinary lines (or one longer line).
    fn take_into(&mut self, batch: &mut Vec<u8>) {
        if !self.audit.is_empty() {
            std::mem::swap(&mut self.audit, batch);
            return;
        }
        if self.ordinary.len() <= ORDINARY_CHUNK {
            std::mem::swap(&mut self.ordinary, batch);
            return;
        }
        let end = self.ordinary[..ORDINARY_CHUNK]
            .iter()
            .rposition(|b| *b == b'\n')
            .or_else(|| self.ordinary.iter().position(|b| *b == b'\n'))
            .map_or(self.ordinary.len(), |newline| newline + 1);
        batch.extend(self.ordinary.drain(..end));
    }
}

/// The queue's two entrances: `ordinary()` for log lines, `audit()` for the
/// audit trail.
#[derive(Clone)]
pub struct LogQueue(Arc<Queue>);

/// Stops the writer thread: `finish` drains the queue within a deadline.
pub struct WriterGuard {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What `WriterGuard::finish` left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Lines dropped since start, for any reason.
    pub dropped: u64,
    /// Lines still queued when the deadline passed (stdout blocked).
    pub unwritten: u64,
}

impl LogQueue {
    /// Starts the writer thread on `out`, with room for `capacity` bytes.
    pub fn spawn(
        mut out: impl std::io::Write + Send + 'static,
        capacity: usize,
    ) -> (Self, WriterGuard) {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                audit: Vec::with_capacity(WAKE_AT_BYTES.min(capacity)),
                ordinary: Vec::new(),
                writing: false,
                closed: false,
            }),
            filled: Condvar::new(),
            written: Condvar::new(),
            capacity,
        });
        let shared = queue.clone();
        let thread = std::thread::Builder::new()
            .name("token-broker-logs".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(WAKE_AT_BYTES.min(capacity));
                loop {
                    let closed = {
                        let mut pending = shared.lock();
                        pending.writing = false;
                        shared.written.notify_all();
                        if pending.is_empty() && !pending.closed {
                            pending = shared
                                .filled
                                .wait_timeout(pending, FLUSH_EVERY)
                                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
                        }
                        pending.take_into(&mut batch);
                        pending.writing = !batch.is_empty();
                        pending.closed && batch.is_empty()
                    };
                    if closed {
                        return;
                    }
                    if !batch.is_empty() {
                        if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                            log_lines_dropped(LogDrop::WriteFailed, lines_in(&batch));
                        }
                        batch.clear();
                    }
                    if batch.capacity() > 4 * WAKE_AT_BYTES {
                        batch.shrink_to(WAKE_AT_BYTES);
                    }
                }
            })
            .ok();
        (
            Self(queue.clone()),
            WriterGuard {
                queue,
                thread: Some(thread).flatten(),
            },
        )
    }

    /// The entrance for ordinary log lines: dropped when the queue is
    /// three-quarters full.
    pub fn ordinary(&self) -> Entrance {
        Entrance {
            queue: self.0.clone(),
            audit: false,
        }
    }

    /// The entrance for audit events: refused only when the queue is full.
    pub fn audit(&self) -> Entrance {
        Entrance {
            queue: self.0.clone(),
            audit: true,
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `line` in its lane if it fits.
    fn push(&self, line: &[u8], audit: bool) -> bool {
        let limit = if audit {
            self.capacity
        } else {
            self.capacity / 4 * 3
        };
        let mut pending = self.lock();
        let Pending {
            audit: audit_lane,
            ordinary,
            closed,
            ..
        } = &mut *pending;
        let lane = if audit { audit_lane } else { ordinary };
        if *closed || lane.len() + line.len() > limit {
            return false;
        }
        lane.extend_from_slice(line);
        if lane.len() >= WAKE_AT_BYTES {
            self.filled.notify_one();
        }
        true
    }
}

impl WriterGuard {
    /// Closes the queue and waits, until `deadline` at most, for the writer
    /// to write what it holds. A writer blocked on stdout is left behind
    /// (the process is about to exit) and what it holds is counted.
    pub fn finish(mut self, deadline: Instant) -> Drained {
        let queue = self.queue.clone();
        let mut pending = queue.lock();
        pending.closed = true;
        queue.filled.notify_one();
        while !pending.is_empty() || pending.writing {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            pending = queue
                .written
                .wait_timeout(pending, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
        }
        let drained = pending.is_empty() && !pending.writing;
        let unwritten = pending.lines();
        drop(pending);
        if drained && let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Drained {
            dropped: dropped_so_far(),
            unwritten,
        }
    }
}

/// Log lines dropped since start, for any reason.
pub fn dropped_so_far() -> u64 {
    LogDrop::ALL.into_iter().map(log_lines_dropped_so_far).sum()
}

/// Says on stderr what the log output lost, from a thread of its own so a
/// blocked stderr cannot hold up the exit either.
pub fn report_on_stderr(drained: &Drained) {
    let message = format!(
        "token-broker: {} log lines dropped while running, {} not written at exit (stdout did not keep up)\n",
        drained.dropped, drained.unwritten
    );
    let (done, written) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("token-broker-report".into())
        .spawn(move || {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
            let _ = done.send(());
        });
    let _ = written.recv_timeout(Duration::from_millis(200));
}

fn lines_in(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|b| **b == b'\n').count() as u64
}

/// One entrance of the queue, as a `MakeWriter`: each write is one line.
#[derive(Clone)]
pub struct Entrance {
    queue: Arc<Queue>,
    audit: bool,
}

impl std::io::Write for &Entrance {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.queue.push(buf, self.audit) {
            if self.audit {
                AUDIT_REFUSED.with(|refused| refused.set(true));
                log_lines_dropped(LogDrop::AuditRefused, 1);
            } else {
                log_lines_dropped(LogDrop::QueueFull, 1);
            }
        }
        // Accepted either way: a logger is never told to retry.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Entrance {
    type Writer = &'a Entrance;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::sync::mpsc;

    /// Collects what is written; blocks every write while `gate` is held.
    #[derive(Clone, Default)]
    struct Gated {
        out: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl std::io::Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn write_line(entrance: &Entrance, line: &str) -> bool {
        (&*entrance).write_all(line.as_bytes()).unwrap();
        !take_audit_refusal()
    }

    #[test]
    fn nothing_is_lost_while_the_output_keeps_up_and_finish_writes_the_rest() {
        let out = Gated::default();
        let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 24);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let entrance = queue.ordinary();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        write_line(&entrance, &format!("{t}-{i}\n"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let drained = guard.finish(Instant::now() + Duration::from_secs(30));
        assert_eq!(drained.unwritten, 0);
        let text = String::from_utf8(out.out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 80_000);
        assert!(text.lines().any(|l| l == "3-19999"));
    }

    #[test]
    fn a_blocked_output_never_blocks_a_logger_and_audit_events_have_a_lane_of_their_own() {
        let out = Gated::default();
        let gate = out.gate.lock().unwrap();
        let (queue, guard) = LogQueue::spawn(out.clone(), 4096);
        let line = format!("{}\n", "x".repeat(99));
        // The writer takes the first line and blocks on the gate.
        assert!(queue.0.push(line.as_bytes(), false));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !queue.0.lock().writing {
            assert!(Instant::now() < deadline, "the writer never took the line");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (done, finished) = mpsc::channel();
        let logger = {
            let queue = queue.clone();
            let line = line.clone();
            std::thread::spawn(move || {
                let ordinary = (0..100).filter(|_| queue.0.push(line.as_bytes(), false));
                let ordinary = ordinary.count();
                let audit = (0..100).filter(|_| queue.0.push(line.as_bytes(), true));
                done.send((ordinary, audit.count())).unwrap();
            })
        };
        let (ordinary_kept, audit_kept) = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("a logger waited for a blocked output");
        logger.join().unwrap();
        assert_eq!(ordinary_kept, 30, "ordinary lines stop at three quarters");
        assert_eq!(audit_kept, 40, "audit events have all of their own lane");
        assert!(
            !write_line(&queue.audit(), &line),
            "a refused audit line is told"
        );
        assert!(
            write_line(&queue.ordinary(), &line),
            "an ordinary line never is"
        );

        let drained = guard.finish(Instant::now() + Duration::from_millis(100));
        assert_eq!(
            drained.unwritten, 70,
            "still queued behind the blocked output"
        );
        drop(gate);
    }

    #[test]
    fn audit_events_are_written_ahead_of_ordinary_lines_queued_before_them() {
        let out = Gated::default();
        let gate = out.gate.lock().unwrap();
        let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 20);
        let line = |what: &str, i: usize| format!("{what}-{i:04}-{}\n", "x".repeat(90));
        assert!(queue.0.push(line("first", 0).as_bytes(), false));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !queue.0.lock().writing {
            assert!(Instant::now() < deadline, "the writer never took the line");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A flood of ordinary lines, far more than one chunk, then one audit event.
        for i in 0..2_000 {
            assert!(queue.0.push(line("ordinary", i).as_bytes(), false));
        }
        assert!(queue.0.push(line("audit", 0).as_bytes(), true));
        drop(gate);
        guard.finish(Instant::now() + Duration::from_secs(30));
        let text = String::from_utf8(out.out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2_002);
        let audit_at = lines.iter().position(|l| l.starts_with("audit-")).unwrap();
        assert_eq!(audit_at, 1, "right after the line the writer held");
    }
}
