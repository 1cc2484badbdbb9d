//! Waiting for another replica's fetch: woken by its "filled" message, or a
//! slow poll when that message is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::super::protocol::{Claim, Waiting};
use super::super::sealed::KeyName;
use super::{FetchLock, RedisTier};
use crate::domain::Identity;

/// How often a waiter looks at Redis when no "filled" message came: a lock
/// whose holder died costs a few calls a second.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// The replicas of this process waiting for a key's lock to be released.
#[derive(Default)]
pub(super) struct Waiters(Mutex<HashMap<KeyName, Arc<WaitSlot>>>);

#[derive(Default)]
struct WaitSlot {
    /// Releases announced for this key; a waiter compares it with what it saw.
    releases: AtomicU64,
    notify: Notify,
}

impl Waiters {
    fn register(&self, name: &KeyName) -> Arc<WaitSlot> {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(name.clone()).or_default().clone()
    }

    fn release(&self, name: &KeyName, slot: Arc<WaitSlot>) {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and the one being dropped.
        if Arc::strong_count(&slot) <= 2 {
            slots.remove(name);
        }
    }

    pub(super) fn wake(&self, name: &KeyName) {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(name) {
            slot.releases.fetch_add(1, Ordering::AcqRel);
            slot.notify.notify_waiters();
        }
    }
}

/// Waiting for another replica's fetch of one identity: woken when its lock
/// is released, else looking again every `FALLBACK_POLL`, until `upstream.timeout`.
pub(in crate::shared) struct Waiter {
    tier: RedisTier,
    identity: Identity,
    name: KeyName,
    slot: Option<Arc<WaitSlot>>,
    seen: u64,
    deadline: Instant,
}

impl Waiter {
    /// Waits for `identity`'s lock to be released, until `deadline`.
    pub(super) fn register(
        tier: &RedisTier,
        identity: &Identity,
        name: &KeyName,
        deadline: Instant,
    ) -> Self {
        let slot = tier.0.waiters.register(name);
        let seen = slot.releases.load(Ordering::Acquire);
        Self {
            tier: tier.clone(),
            identity: identity.clone(),
            name: name.clone(),
            slot: Some(slot),
            seen,
            deadline,
        }
    }
}

impl Waiting for Waiter {
    type Lock = FetchLock;

    /// The next thing worth looking at: the lock, now free and this
    /// replica's, or a value Redis holds now (possibly too old for the
    /// caller: wait again). `None` once `upstream.timeout` has passed or
    /// Redis cannot be asked (the caller then asks the vendor alone).
    async fn next(&mut self) -> Option<Claim<FetchLock>> {
        let slot = self.slot.clone()?;
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return None;
            }
            let woken = slot.notify.notified();
            if slot.releases.load(Ordering::Acquire) == self.seen {
                let pause = FALLBACK_POLL.min(self.deadline - now);
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
            self.seen = slot.releases.load(Ordering::Acquire);
            match self.tier.claim_lock(&self.identity, &self.name).await? {
                Claim::Theirs(None) => continue,
                claimed => return Some(claimed),
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.tier.0.waiters.release(&self.name, slot);
        }
    }
}
