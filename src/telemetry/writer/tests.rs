//! The log writer's tests: nothing lost while the output keeps up, group
//! commit, withdrawal, and a blocked output never blocking a logger.

use super::*;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Collects what is written and counts the writes; blocks every write
/// while `gate` is shut, and fails every write while `failing` is set.
#[derive(Clone, Default)]
struct Gated {
    out: Arc<Mutex<Vec<u8>>>,
    gate: Arc<Gate>,
    writes: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn shut(&self) {
        *self.shut.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.shut.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut shut = self.shut.lock().unwrap();
        while *shut {
            shut = self.opened.wait(shut).unwrap();
        }
    }
}

impl std::io::Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gate.pass();
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.out.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Gated {
    fn text(&self) -> String {
        String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
    }
}

/// Waits until the writer holds a batch it is writing.
fn until_writing(queue: &LogQueue) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !queue.0.lock().writing {
        assert!(Instant::now() < deadline, "the writer never took the line");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const A_WHILE: Duration = Duration::from_secs(30);

#[test]
fn nothing_is_lost_while_the_output_keeps_up_and_finish_writes_the_rest() {
    let out = Gated::default();
    let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 24);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let entrance = queue.ordinary();
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    (&entrance)
                        .write_all(format!("{t}-{i}\n").as_bytes())
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let drained = guard.finish(Instant::now() + A_WHILE);
    assert_eq!(drained.unwritten, 0);
    let text = out.text();
    assert_eq!(text.lines().count(), 80_000);
    assert!(text.lines().any(|l| l == "3-19999"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_resolves_once_its_write_returned_and_concurrent_events_share_one_write() {
    let out = Gated::default();
    out.gate.shut();
    let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 20);
    let trail = queue.audit_trail();
    let first = trail.commit(b"first\n").unwrap();
    until_writing(&queue);
    // While the writer is stuck on "first", the next batch fills.
    let waiting: Vec<_> = (0..50)
        .map(|i| {
            let commit = trail.commit(format!("event-{i}\n").as_bytes()).unwrap();
            tokio::spawn(commit.written(A_WHILE))
        })
        .collect();
    let first = tokio::spawn(first.written(A_WHILE));
    tokio::task::yield_now().await;
    assert!(
        !first.is_finished() && waiting.iter().all(|w| !w.is_finished()),
        "released before the write returned"
    );
    out.gate.open();
    assert_eq!(first.await.unwrap(), Ok(()));
    for waiter in waiting {
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }
    assert_eq!(
        out.writes.load(Ordering::SeqCst),
        2,
        "the 50 events behind the first share one write"
    );
    assert!(out.text().starts_with("first\nevent-0\n"));
    guard.finish(Instant::now() + A_WHILE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_not_written_in_time_is_withdrawn_and_a_failed_write_is_an_error() {
    let out = Gated::default();
    out.gate.shut();
    let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 20);
    let trail = queue.audit_trail();
    let stuck = trail.commit(b"stuck\n").unwrap();
    until_writing(&queue);
    let late = trail.commit(b"late\n").unwrap();
    let kept = trail.commit(b"kept\n").unwrap();
    let kept = tokio::spawn(kept.written(A_WHILE));
    let refused_before = log_lines_dropped_so_far(LogDrop::AuditRefused);
    assert_eq!(
        late.written(Duration::from_millis(50)).await,
        Err(AuditUnavailable)
    );
    assert!(log_lines_dropped_so_far(LogDrop::AuditRefused) > refused_before);
    // "stuck" was taken already: it cannot be withdrawn, only given up on.
    let refused_before = log_lines_dropped_so_far(LogDrop::AuditRefused);
    assert_eq!(
        stuck.written(Duration::from_millis(50)).await,
        Err(AuditUnavailable)
    );
    assert!(log_lines_dropped_so_far(LogDrop::AuditRefused) > refused_before);
    out.gate.open();
    assert_eq!(kept.await.unwrap(), Ok(()));
    assert_eq!(
        out.text(),
        "stuck\nkept\n",
        "the withdrawn event is left out"
    );

    out.failing.store(true, Ordering::SeqCst);
    let failed = trail.commit(b"lost\n").unwrap();
    assert_eq!(failed.written(A_WHILE).await, Err(AuditUnavailable));
    guard.finish(Instant::now() + A_WHILE);
}

#[test]
fn a_blocked_output_never_blocks_a_logger_and_audit_events_have_a_lane_of_their_own() {
    let out = Gated::default();
    out.gate.shut();
    let (queue, guard) = LogQueue::spawn(out.clone(), 4096);
    let line = format!("{}\n", "x".repeat(99));
    // The writer takes the first line and blocks on the gate.
    assert!(queue.0.push(line.as_bytes()));
    until_writing(&queue);
    let (done, finished) = mpsc::channel();
    let logger = {
        let queue = queue.clone();
        let line = line.clone();
        std::thread::spawn(move || {
            let ordinary = (0..100).filter(|_| queue.0.push(line.as_bytes())).count();
            let trail = queue.audit_trail();
            let audit: Vec<Commit> = (0..100)
                .filter_map(|_| trail.commit(line.as_bytes()).ok())
                .collect();
            done.send((ordinary, audit.len())).unwrap();
            // Dropped without waiting: they stay queued.
        })
    };
    let (ordinary_kept, audit_kept) = finished
        .recv_timeout(A_WHILE)
        .expect("a logger waited for a blocked output");
    logger.join().unwrap();
    assert_eq!(ordinary_kept, 30, "ordinary lines stop at three quarters");
    assert_eq!(audit_kept, 40, "audit events have all of their own lane");
    assert!(
        queue.audit_trail().commit(line.as_bytes()).is_err(),
        "a refused audit event is told"
    );

    let drained = guard.finish(Instant::now() + Duration::from_millis(100));
    assert_eq!(
        drained.unwritten, 70,
        "still queued behind the blocked output"
    );
    out.gate.open();
}

#[test]
fn audit_events_are_written_ahead_of_ordinary_lines_queued_before_them() {
    let out = Gated::default();
    out.gate.shut();
    let (queue, guard) = LogQueue::spawn(out.clone(), 1 << 20);
    let line = |what: &str, i: usize| format!("{what}-{i:04}-{}\n", "x".repeat(90));
    assert!(queue.0.push(line("first", 0).as_bytes()));
    until_writing(&queue);
    // A flood of ordinary lines, far more than one chunk, then one audit event.
    for i in 0..2_000 {
        assert!(queue.0.push(line("ordinary", i).as_bytes()));
    }
    let _queued = queue
        .audit_trail()
        .commit(line("audit", 0).as_bytes())
        .unwrap();
    out.gate.open();
    guard.finish(Instant::now() + A_WHILE);
    let text = out.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2_002);
    let audit_at = lines.iter().position(|l| l.starts_with("audit-")).unwrap();
    assert_eq!(audit_at, 1, "right after the line the writer held");
}

#[test]
fn withdrawn_ranges_leave_the_rest_in_order() {
    let mut bytes = b"a\nbb\nccc\ndd\n".to_vec();
    let mut ranges = vec![5..9, 0..2];
    remove_ranges(&mut bytes, &mut ranges);
    assert_eq!(bytes, b"bb\ndd\n");
    assert!(ranges.is_empty());
}
