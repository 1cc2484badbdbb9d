//! The `upstream.max_in_flight` vendor slots, shared fairly among callers.
//!
//! A slot that frees up goes to the waiting callers in turn (round robin
//! over per-caller queues, first come first served within one caller), not to
//! whoever asked first: a caller with a thousand cold keys queued delays
//! another caller's single miss by about one vendor round trip, not by the
//! whole backlog. When nobody waits, a free slot is taken at once. Every slot
//! is returned when its `Slot` is dropped, whatever happened meanwhile.
//!
//! One fetch may be for several callers (`Askers`: the broker coalesces
//! callers of one key into one flight). It waits in the turn of each of
//! them, including those who join while it waits, and takes the first slot
//! any of those turns gets: a caller who joins another caller's flight never
//! waits behind that caller's backlog.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::telemetry::metrics::Metrics;

/// A held vendor slot; dropped, it goes to the next waiting caller.
pub struct Slot {
    slots: Arc<Inner>,
    caller: Arc<str>,
    /// Whether dropping it hands it on; not for a slot taken back unsent.
    armed: bool,
}

/// The callers one fetch is for: the one who started it, then everyone who
/// joined it.
pub struct Askers {
    names: Mutex<Vec<Arc<str>>>,
    /// How many there are; watched by a fetch waiting for a slot.
    count: watch::Sender<usize>,
}

impl Askers {
    pub fn new(first: &Arc<str>) -> Self {
        Self {
            names: Mutex::new(vec![first.clone()]),
            count: watch::Sender::new(1),
        }
    }

    /// `caller` asks for the same fetch.
    pub fn join(&self, caller: &Arc<str>) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if !names.contains(caller) {
            names.push(caller.clone());
            self.count.send_replace(names.len());
        }
    }

    /// Who started the fetch.
    pub fn first(&self) -> Arc<str> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)[0].clone()
    }

    /// Everyone who asked, in order.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.from(0)
    }

    fn from(&self, at: usize) -> Vec<Arc<str>> {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.get(at..).map(<[_]>::to_vec).unwrap_or_default()
    }
}

/// One fetch's place in line: queued in several callers' turns, taken by
/// whichever turn comes first.
#[derive(Default)]
struct Ticket(Mutex<Option<oneshot::Sender<Slot>>>);

impl Ticket {
    fn take(&self) -> Option<oneshot::Sender<Slot>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn pending(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// The slots and the callers waiting for them.
pub struct FairSlots(Arc<Inner>);

struct Inner {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    free: usize,
    /// Callers with someone waiting, in the order they are served; each
    /// with its waiters, oldest first.
    turns: VecDeque<(Arc<str>, VecDeque<Arc<Ticket>>)>,
    in_use: HashMap<Arc<str>, i64>,
}

impl FairSlots {
    pub fn new(slots: usize, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            state: Mutex::new(State {
                free: slots,
                ..State::default()
            }),
            metrics,
        }))
    }

    /// A slot for a fetch `askers` want, waiting in each one's turn until
    /// `deadline`; `None` once the deadline passed.
    pub async fn acquire(&self, askers: &Askers, deadline: Instant) -> Option<Slot> {
        let started = Instant::now();
        let mut joined = askers.count.subscribe();
        let (sender, mut receiver) = oneshot::channel();
        let ticket = Arc::new(Ticket(Mutex::new(Some(sender))));
        let mut queued = 0;
        {
            let mut state = self.0.lock();
            if state.free > 0 && state.turns.is_empty() {
                state.free -= 1;
                drop(state);
                let caller = askers.first();
                self.0
                    .metrics
                    .upstream_queue_wait(&caller, started.elapsed());
                return Some(self.0.slot_for(&caller));
            }
            joined.borrow_and_update();
            for name in askers.names() {
                state.queue(&name, &ticket);
                queued += 1;
            }
        }
        // A slot sent just as the deadline passed is dropped with the
        // receiver, and its `Drop` hands it on: none is ever lost.
        let slot = loop {
            tokio::select! {
                slot = &mut receiver => break slot.ok()?,
                changed = joined.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    joined.borrow_and_update();
                    let mut state = self.0.lock();
                    if ticket.pending() {
                        for name in askers.from(queued) {
                            state.queue(&name, &ticket);
                            queued += 1;
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    // Taken back: a turn that pops it later skips it.
                    ticket.take();
                    break receiver.try_recv().ok()?;
                }
            }
        };
        self.0
            .metrics
            .upstream_queue_wait(&slot.caller, started.elapsed());
        Some(slot)
    }
}

impl State {
    /// Queues `ticket` in `caller`'s turn.
    fn queue(&mut self, caller: &Arc<str>, ticket: &Arc<Ticket>) {
        match self.turns.iter_mut().find(|(name, _)| name == caller) {
            Some((_, queue)) => queue.push_back(ticket.clone()),
            None => self
                .turns
                .push_back((caller.clone(), VecDeque::from([ticket.clone()]))),
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a slot as `caller`'s and wraps it.
    fn slot_for(self: &Arc<Self>, caller: &Arc<str>) -> Slot {
        let in_use = {
            let mut state = self.lock();
            let count = state.in_use.entry(caller.clone()).or_default();
            *count += 1;
            *count
        };
        self.metrics.upstream_slots_in_use(caller, in_use);
        Slot {
            slots: self.clone(),
            caller: caller.clone(),
            armed: true,
        }
    }

    fn uncount(&self, caller: &Arc<str>) -> i64 {
        let mut state = self.lock();
        let count = state.in_use.entry(caller.clone()).or_default();
        *count -= 1;
        *count
    }

    /// A slot came back from `caller`: to the next caller in turn, else free.
    fn release(self: &Arc<Self>, caller: &Arc<str>) {
        self.metrics
            .upstream_slots_in_use(caller, self.uncount(caller));
        loop {
            let next = {
                let mut state = self.lock();
                let Some((name, mut queue)) = state.turns.pop_front() else {
                    state.free += 1;
                    return;
                };
                // Tickets another turn already served, or whose fetch gave
                // up, are skipped without spending this caller's turn.
                let mut sender = None;
                while let Some(ticket) = queue.pop_front() {
                    sender = ticket.take();
                    if sender.is_some() {
                        break;
                    }
                }
                if !queue.is_empty() {
                    // Served: to the back of the line.
                    state.turns.push_back((name.clone(), queue));
                }
                sender.map(|sender| (name, sender))
            };
            let Some((name, sender)) = next else {
                continue;
            };
            // A waiter whose deadline passed has dropped its receiver: the
            // slot comes back here through `send`'s error, for the next one.
            match sender.send(self.slot_for(&name)) {
                Ok(()) => return,
                Err(mut unsent) => {
                    unsent.armed = false;
                    self.metrics
                        .upstream_slots_in_use(&name, self.uncount(&name));
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.slots.release(&self.caller);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn slots(n: usize) -> FairSlots {
        FairSlots::new(n, Arc::new(Metrics::new()))
    }

    fn name(text: &str) -> Askers {
        Askers::new(&Arc::from(text))
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_round_the_waiting_callers_in_turn() {
        let slots = Arc::new(slots(1));
        let far = Instant::now() + Duration::from_secs(60);
        let held = slots.acquire(&name("bulk"), far).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        // The bulk caller queues three fetches before the other one asks.
        for (who, i) in [("bulk", 1), ("bulk", 2), ("bulk", 3), ("single", 1)] {
            let (slots, order) = (slots.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let slot = slots.acquire(&name(who), far).await.unwrap();
                order.lock().unwrap().push(format!("{who}{i}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["bulk1", "single1", "bulk2", "bulk3"],
            "the single miss is served second, not last"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_joined_by_another_caller_waits_in_that_callers_turn_too() {
        let slots = Arc::new(slots(1));
        let far = Instant::now() + Duration::from_secs(60);
        let held = slots.acquire(&name("other"), far).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        // The bulk caller's backlog: five fetches queued, the last one for
        // the key the single caller will ask for too.
        let shared = Arc::new(name("bulk"));
        for i in 1..=5 {
            let (slots, order) = (slots.clone(), order.clone());
            let askers = if i == 5 {
                shared.clone()
            } else {
                Arc::new(name("bulk"))
            };
            waiters.push(tokio::spawn(async move {
                let slot = slots.acquire(&askers, far).await.unwrap();
                order.lock().unwrap().push(format!("bulk{i}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            }));
            tokio::task::yield_now().await;
        }
        // The single caller joins the flight of bulk5 instead of starting its own.
        shared.join(&Arc::from("single"));
        tokio::task::yield_now().await;
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["bulk1", "bulk5", "bulk2", "bulk3", "bulk4"],
            "the joined fetch is served in the single caller's turn, not after the backlog"
        );
        assert_eq!(slots.0.lock().free, 1, "every slot came back");
        assert!(slots.0.lock().turns.is_empty(), "no ticket left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_past_its_deadline_gives_up_and_loses_no_slot() {
        let slots = slots(1);
        let held = slots
            .acquire(&name("a"), Instant::now() + Duration::from_secs(60))
            .await
            .unwrap();
        assert!(
            slots
                .acquire(&name("b"), Instant::now() + Duration::from_millis(50))
                .await
                .is_none()
        );
        drop(held);
        // The abandoned waiter's turn is skipped; the slot is free again.
        assert!(
            slots
                .acquire(&name("c"), Instant::now() + Duration::from_millis(1))
                .await
                .is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_slots_in_use_than_there_are() {
        let slots = Arc::new(slots(3));
        let (running, peak) = (
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (slots, running, peak) = (slots.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let caller = name(["a", "b", "c", "d"][i % 4]);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let slot = slots.acquire(&caller, deadline).await.unwrap();
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    drop(slot);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        assert_eq!(slots.0.lock().free, 3, "every slot came back");
    }
}
