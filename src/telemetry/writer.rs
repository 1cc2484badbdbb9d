//! Where log lines go: a bounded queue in memory that a thread of its own
//! writes to stdout, so a request never makes a system call to log, and a
//! stalled reader of stdout (a full pipe, a stuck log collector) never stops
//! the service.
//!
//! The queue has two lanes.
//! - Audit events have one of their own, of `capacity` bytes, and are
//!   committed: `AuditTrail::commit` queues one and answers a `Commit`,
//!   which resolves once the write that carries it has returned. Events of
//!   concurrent requests share that write (group commit): an arrival wakes
//!   the writer if it sleeps, and while it writes one batch the next fills.
//!   An event that does not fit is refused at once; one whose write has not
//!   returned in time is withdrawn if the writer has not taken it yet.
//! - Ordinary lines are fire-and-forget: three quarters of `capacity`,
//!   written every few milliseconds in chunks of at most `ORDINARY_CHUNK`
//!   bytes, so a flood of them (strangers' 401s, say) neither fills the audit
//!   lane nor makes an audit event wait behind more than one chunk. One that
//!   does not fit is dropped, and counted.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing_subscriber::fmt::MakeWriter;

use crate::telemetry::metrics::{LogDrop, log_lines_dropped, log_lines_dropped_so_far};

/// How long an ordinary line may wait in the queue before the writer takes it.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// A batch this large wakes the writer at once.
const WAKE_AT_BYTES: usize = 256 * 1024;
/// The most ordinary lines written at once: what an audit event may wait behind.
const ORDINARY_CHUNK: usize = 16 * 1024;

struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here for lines (or its timer).
    filled: Condvar,
    /// Signalled when the writer has written all it took.
    written: Condvar,
    /// Bytes the audit lane holds at most; the ordinary lane holds three quarters of it.
    capacity: usize,
    /// The audit batches written so far, for the requests that wait on them.
    committed: watch::Sender<Committed>,
}

/// How far the audit batches are written.
#[derive(Debug, Clone, Copy, Default)]
struct Committed {
    /// Every audit batch up to this number has been written (or failed).
    through: u64,
    /// The last audit batch whose write failed; 0 for none.
    failed: u64,
}

struct Pending {
    /// Audit events, written first.
    audit: Vec<u8>,
    /// Events in `audit` whose requests stopped waiting: left out of the write.
    withdrawn: Vec<Range<usize>>,
    /// The number of the audit batch `audit` will be written as (from 1).
    filling: u64,
    /// Everything else.
    ordinary: Vec<u8>,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// The writer waits for lines: an audit event wakes it.
    sleeping: bool,
    closed: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.audit.is_empty() && self.ordinary.is_empty()
    }

    fn lines(&self) -> u64 {
        lines_in(&self.audit) + lines_in(&self.ordinary)
    }

    /// The next batch into `batch`: every audit event queued (then its
    /// number), else at most `ORDINARY_CHUNK` bytes of whole ordinary lines
    /// (or one longer line).
    fn take_into(&mut self, batch: &mut Vec<u8>) -> Option<u64> {
        if !self.audit.is_empty() {
            std::mem::swap(&mut self.audit, batch);
            if !self.withdrawn.is_empty() {
                remove_ranges(batch, &mut self.withdrawn);
            }
            self.filling += 1;
            return Some(self.filling - 1);
        }
        if self.ordinary.len() <= ORDINARY_CHUNK {
            std::mem::swap(&mut self.ordinary, batch);
            return None;
        }
        let end = self.ordinary[..ORDINARY_CHUNK]
            .iter()
            .rposition(|b| *b == b'\n')
            .or_else(|| self.ordinary.iter().position(|b| *b == b'\n'))
            .map_or(self.ordinary.len(), |newline| newline + 1);
        batch.extend(self.ordinary.drain(..end));
        None
    }
}

/// Removes the (disjoint) `ranges` from `bytes`, emptying `ranges`.
fn remove_ranges(bytes: &mut Vec<u8>, ranges: &mut Vec<Range<usize>>) {
    ranges.sort_by_key(|range| range.start);
    let mut kept = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for range in ranges.drain(..) {
        kept.extend_from_slice(&bytes[from..range.start]);
        from = range.end;
    }
    kept.extend_from_slice(&bytes[from..]);
    *bytes = kept;
}

/// The queue: `ordinary()` is the entrance for log lines, `audit_trail()`
/// the one for audit events.
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
                withdrawn: Vec::new(),
                filling: 1,
                ordinary: Vec::new(),
                writing: false,
                sleeping: false,
                closed: false,
            }),
            filled: Condvar::new(),
            written: Condvar::new(),
            capacity,
            committed: watch::Sender::new(Committed::default()),
        });
        let shared = queue.clone();
        let thread = std::thread::Builder::new()
            .name("token-broker-logs".into())
            .spawn(move || {
                yield_on_wakeup();
                let mut batch = Vec::with_capacity(WAKE_AT_BYTES.min(capacity));
                loop {
                    let (taken, closed) = {
                        let mut pending = shared.lock();
                        pending.writing = false;
                        shared.written.notify_all();
                        if pending.is_empty() && !pending.closed {
                            pending.sleeping = true;
                            pending = shared
                                .filled
                                .wait_timeout(pending, FLUSH_EVERY)
                                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
                            pending.sleeping = false;
                        }
                        let taken = pending.take_into(&mut batch);
                        pending.writing = !batch.is_empty() || taken.is_some();
                        (taken, pending.closed && !pending.writing)
                    };
                    if closed {
                        return;
                    }
                    let written = batch.is_empty()
                        || out.write_all(&batch).and_then(|()| out.flush()).is_ok();
                    if !written {
                        log_lines_dropped(LogDrop::WriteFailed, lines_in(&batch));
                    }
                    if let Some(number) = taken {
                        shared.committed.send_modify(|committed| {
                            committed.through = number;
                            if !written {
                                committed.failed = number;
                            }
                        });
                    }
                    batch.clear();
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
        Entrance(self.0.clone())
    }

    /// The entrance for audit events.
    pub fn audit_trail(&self) -> AuditTrail {
        AuditTrail {
            queue: self.0.clone(),
            waits: true,
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an ordinary `line` if it fits.
    fn push(&self, line: &[u8]) -> bool {
        let mut pending = self.lock();
        if pending.closed || pending.ordinary.len() + line.len() > self.capacity / 4 * 3 {
            return false;
        }
        pending.ordinary.extend_from_slice(line);
        if pending.ordinary.len() >= WAKE_AT_BYTES {
            self.filled.notify_one();
        }
        true
    }
}

/// Where audit events are committed: the audit lane of a `LogQueue`.
#[derive(Clone)]
pub struct AuditTrail {
    queue: Arc<Queue>,
    /// Whether a commit waits for its write (always, but in a benchmark).
    waits: bool,
}

/// An audit event the log output did not write: its lane was full (stdout
/// blocked), the write failed, or it did not return in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

impl AuditTrail {
    /// Queues `line`, one whole audit event, and wakes the writer if it
    /// sleeps. `Err` when the audit lane cannot take it.
    pub fn commit(&self, line: &[u8]) -> Result<Commit, AuditUnavailable> {
        let queue = &self.queue;
        let mut pending = queue.lock();
        if pending.closed || pending.audit.len() + line.len() > queue.capacity {
            drop(pending);
            log_lines_dropped(LogDrop::AuditRefused, 1);
            return Err(AuditUnavailable);
        }
        let start = pending.audit.len();
        pending.audit.extend_from_slice(line);
        if pending.sleeping {
            pending.sleeping = false;
            queue.filled.notify_one();
        }
        Ok(Commit {
            queue: queue.clone(),
            batch: pending.filling,
            line: start..pending.audit.len(),
            waits: self.waits,
        })
    }

    /// The same lane, its commits done once queued, as before group commit:
    /// for `bench/run` to measure what waiting for the write costs. The
    /// service never uses it (a crash would lose the queued events of
    /// answered requests).
    #[doc(hidden)]
    pub fn done_when_queued(self) -> Self {
        Self {
            waits: false,
            ..self
        }
    }
}

/// One queued audit event: `written` waits for the write that carries it.
#[must_use = "an audit event counts once its write has returned"]
pub struct Commit {
    queue: Arc<Queue>,
    /// The audit batch it will be written in.
    batch: u64,
    /// Where it sits in the audit lane until that batch is taken.
    line: Range<usize>,
    waits: bool,
}

impl Commit {
    /// Waits, `within` at most, for the write of this event to return.
    /// `Err` when it failed or took longer. One that took longer is counted
    /// as refused, and withdrawn if the writer has not taken it yet (else it
    /// may still be written later, as the event of a request that failed).
    pub async fn written(self, within: Duration) -> Result<(), AuditUnavailable> {
        if !self.waits {
            return Ok(());
        }
        let mut committed = self.queue.committed.subscribe();
        let waited = tokio::time::timeout(
            within,
            committed.wait_for(|committed| committed.through >= self.batch),
        )
        .await;
        match waited {
            Ok(Ok(committed)) if committed.failed < self.batch => Ok(()),
            Ok(_) => Err(AuditUnavailable),
            Err(_elapsed) => {
                log_lines_dropped(LogDrop::AuditRefused, 1);
                self.withdraw();
                Err(AuditUnavailable)
            }
        }
    }

    /// Leaves the event out of its batch, if the writer has not taken it.
    fn withdraw(self) {
        let mut pending = self.queue.lock();
        if pending.filling == self.batch {
            pending.withdrawn.push(self.line);
        }
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

/// Puts the calling thread (the writer) under `SCHED_BATCH`, at nice 0: it
/// gets its fair share of the CPU, but its wakeups do not preempt the
/// thread that woke it. Otherwise every audit event that finds the writer
/// asleep hands the core to it at once, and on a busy core batches shrink
/// to two or three events: measured on one pinned core, 64 connections,
/// about 200,000 context switches and 35-45k answers per 5 s run, against
/// 18,000 and 53-57k under `SCHED_BATCH` (about 19 events per write). Best
/// effort: where the policy cannot be set, the writer runs as it is.
fn yield_on_wakeup() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue,
            ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id,
        };
        let _ = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Os(ThreadPriorityOsValue::default()),
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
        );
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

/// The entrance for ordinary lines, as a `MakeWriter`: each write is one line.
#[derive(Clone)]
pub struct Entrance(Arc<Queue>);

impl std::io::Write for &Entrance {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.0.push(buf) {
            log_lines_dropped(LogDrop::QueueFull, 1);
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
mod tests;
