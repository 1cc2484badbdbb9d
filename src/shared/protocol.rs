//! The fill protocol, written once for every tier with a fetch lock
//! (`redis_tier` on Redis, `in_process` in memory): after a look at what the
//! fleet holds, claim the identity's lock; while another replica holds it,
//! offer each value seen and claim again whenever it may be free; once the
//! lock is this replica's, offer what the store held when it was taken,
//! then fetch and share the answer. A tier that cannot be asked, or a wait
//! that outlasts its bound, leaves the fetch to this replica alone.

use std::future::Future;

use super::{Fill, Publish, SharedTier, Stored};
use crate::domain::Identity;

/// The first claim of a lock (`None`: the store cannot be asked), and the
/// wait that follows it.
pub(super) type FirstClaim<W> = (Option<Claim<<W as Waiting>::Lock>>, W);

/// A store with a fetch lock per identity, as the protocol sees it.
pub(super) trait LockedStore: SharedTier {
    type Waiting: Waiting;

    /// What the store holds for `identity`, if this replica may believe it.
    fn look(&self, identity: &Identity) -> impl Future<Output = Option<Stored>> + Send;

    /// Starts a wait for `identity`'s lock (before the claim, so a release
    /// right after it is not missed) and claims the lock; `None`: the store
    /// cannot be asked.
    fn claim(&self, identity: &Identity) -> impl Future<Output = FirstClaim<Self::Waiting>> + Send;
}

/// `SharedTier::fill` on a `LockedStore`.
pub(super) async fn fill<S: LockedStore>(store: &S, identity: &Identity, fill: &dyn Fill) {
    if !store.in_sync() {
        // Invalidations may be missed meanwhile: neither read nor share.
        fill.fetch().await;
        return;
    }
    if let Some(stored) = store.look(identity).await
        && fill.accept(stored).await
    {
        return;
    }
    let (first, waiting) = store.claim(identity).await;
    fill_from(fill, first, waiting).await;
}

/// What a claim of the fetch lock found, with what the store held then.
pub(super) enum Claim<L> {
    /// The lock was free and is now this replica's.
    Ours { current: Option<Stored>, lock: L },
    /// Another replica holds it.
    Theirs(Option<Stored>),
}

/// A held fetch lock: `publish` shares the answer and releases it; dropped
/// unpublished, it is released all the same.
pub(super) trait HeldLock: Send {
    fn publish(self, publish: Publish) -> impl Future<Output = ()> + Send;
}

/// A wait for another replica's fetch.
pub(super) trait Waiting: Send {
    type Lock: HeldLock;

    /// The claim made again once the lock may be free (a release was
    /// announced, or a poll came due); `None` once the wait is over or the
    /// store cannot be asked.
    fn next(&mut self) -> impl Future<Output = Option<Claim<Self::Lock>>> + Send;
}

/// The protocol from the first claim (`None`: the store cannot be asked).
async fn fill_from<W: Waiting>(fill: &dyn Fill, first: Option<Claim<W::Lock>>, mut waiting: W) {
    let mut claimed = first;
    let (current, lock) = loop {
        match claimed {
            None => {
                fill.fetch().await;
                return;
            }
            Some(Claim::Ours { current, lock }) => break (current, lock),
            Some(Claim::Theirs(seen)) => {
                if let Some(stored) = seen
                    && fill.accept(stored).await
                {
                    return;
                }
                claimed = waiting.next().await;
            }
        }
    };
    drop(waiting);
    // Stored by another replica between the look and the lock; dropping
    // the lock releases it.
    if let Some(stored) = current
        && fill.accept(stored).await
    {
        return;
    }
    if let Some(publish) = fill.fetch().await {
        lock.publish(publish).await;
    }
}
