//! The distributed fenced lock: [`Lock`], its [`LockGuard`], and the per-key map locks of
//! [`crate::Map::lock`], over one state machine (`state`) kept by the lock's primary (`owner`).
//!
//! The guarantees are documented on [`Lock`].

pub(crate) mod owner;
pub(crate) mod state;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::map::ops::{LockAnswer, LockStatus, MapOp};
use crate::membership::MemberId;
use crate::node::Node;
use crate::partition::key::partition_of;
use state::HolderId;

/// The pause before asking again after a failed attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How long a caller is willing to wait for a lock.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Patience {
    /// Not at all.
    Try,
    /// Up to this long.
    For(Duration),
    /// Until it gets it.
    Forever,
}

/// Where one lock's state lives, and the name its errors carry.
#[derive(Clone)]
pub(crate) struct LockTarget {
    pub(crate) node: Arc<Node>,
    pub(crate) partition: u32,
    pub(crate) map: &'static str,
    pub(crate) key: Bytes,
    pub(crate) name: Arc<str>,
}

impl LockTarget {
    /// The named lock `name`, in the partition of its name.
    fn named(node: Arc<Node>, name: &str) -> Self {
        let key = Bytes::copy_from_slice(name.as_bytes());
        LockTarget {
            partition: partition_of(&key, node.config.partition_count),
            node,
            map: owner::NAMED,
            key,
            name: Arc::from(name),
        }
    }

    /// The lock of `key` of map `map`, in the key's partition.
    pub(crate) fn keyed(node: Arc<Node>, map: &str, partition: u32, key: &[u8]) -> Self {
        LockTarget {
            node,
            partition,
            map: owner::KEYED,
            key: owner::keyed(map, key),
            name: Arc::from(map),
        }
    }

    async fn run(&self, op: MapOp) -> Result<LockAnswer> {
        let result = self
            .node
            .route(self.partition, self.map, self.key.clone(), op)
            .await?;
        result.lock.ok_or_else(|| Error::Remote {
            member: self.node.me,
            code: tonic::Code::Internal,
            message: "lock operation answered without a lock answer".to_string(),
        })
    }

    /// Acquires a hold for `holder`; returns its fence and token.
    pub(crate) async fn acquire(
        &self,
        holder: HolderId,
        lease: Option<Duration>,
        patience: Patience,
    ) -> Result<(u64, u64)> {
        let token = loop {
            let token: u64 = rand::random();
            if token != 0 {
                break token;
            }
        };
        let start = Instant::now();
        let deadline = match patience {
            Patience::Try => start,
            Patience::For(timeout) => start.checked_add(timeout).unwrap_or(far_future(start)),
            Patience::Forever => far_future(start),
        };
        // Dropped before the acquire returns (the caller's future was dropped, or it failed):
        // the place in the queue, or a grant not yet seen, is given back.
        let mut withdraw = Withdraw {
            target: Some(self.clone()),
            holder,
            token,
        };
        let half_rpc = self.node.config.rpc_timeout / 2;
        loop {
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let queue_for = match patience {
                Patience::Try => Duration::ZERO,
                Patience::Forever => Duration::MAX,
                Patience::For(_) => remaining,
            };
            let op = MapOp::LockAcquire {
                holder,
                token,
                lease: lease.unwrap_or(Duration::ZERO),
                wait: remaining.min(half_rpc),
                queue_for,
            };
            match self.run(op).await {
                Ok(answer) => match answer.status {
                    LockStatus::Granted => {
                        withdraw.target = None;
                        return Ok((answer.fence, token));
                    }
                    LockStatus::Busy => {
                        withdraw.target = None;
                        return Err(match patience {
                            // Under a millisecond was left: the primary took it as a try.
                            Patience::For(_) => Error::LockTimeout {
                                name: self.name.to_string(),
                                waited: start.elapsed(),
                            },
                            _ => Error::LockBusy {
                                name: self.name.to_string(),
                            },
                        });
                    }
                    LockStatus::ReentryLimit => {
                        withdraw.target = None;
                        return Err(Error::ReentryLimit {
                            name: self.name.to_string(),
                            limit: answer.count,
                        });
                    }
                    LockStatus::Queued if Instant::now() < deadline => {}
                    LockStatus::Queued => {
                        withdraw.target = None;
                        // A grant that raced with the timeout is given back.
                        let _ = self.release(holder, token).await;
                        return Err(Error::LockTimeout {
                            name: self.name.to_string(),
                            waited: start.elapsed(),
                        });
                    }
                    other => {
                        return Err(Error::Remote {
                            member: self.node.me,
                            code: tonic::Code::Internal,
                            message: format!("unexpected lock answer {other:?}"),
                        });
                    }
                },
                Err(error) if retry_within(&error, deadline) => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Releases `holder`'s hold `token` (0: its latest); returns the holds left.
    pub(crate) async fn release(&self, holder: HolderId, token: u64) -> Result<u32> {
        let answer = self.run(MapOp::LockRelease { holder, token }).await?;
        let name = || self.name.to_string();
        match answer.status {
            LockStatus::Released => Ok(answer.count),
            LockStatus::Withdrawn => Ok(0),
            LockStatus::NotHolder => Err(Error::NotLockHolder { name: name() }),
            LockStatus::LeaseExpired => Err(Error::LeaseExpired {
                name: name(),
                fence: answer.fence,
            }),
            LockStatus::Lost => Err(Error::LockLost {
                name: name(),
                fence: answer.fence,
            }),
            other => Err(Error::Remote {
                member: self.node.me,
                code: tonic::Code::Internal,
                message: format!("unexpected unlock answer {other:?}"),
            }),
        }
    }

    /// The lock's holder, if it is held.
    pub(crate) async fn holder(&self) -> Result<(Option<LockHolder>, u32)> {
        let answer = self.run(MapOp::LockInfo).await?;
        let holder = answer.holder.map(|h| LockHolder {
            member: MemberId(h.member),
            fence: answer.fence,
            holds: answer.count,
            lease_remaining: (answer.lease_until_ms != 0).then(|| {
                Duration::from_millis(answer.lease_until_ms.saturating_sub(crate::store::now_ms()))
            }),
        });
        Ok((holder, answer.waiters))
    }
}

fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Whether a failed attempt may be made again before `deadline`: its outcome is unknown (the
/// same token makes it harmless) or no member could take it yet.
fn retry_within(error: &Error, deadline: Instant) -> bool {
    Instant::now() < deadline
        && (matches!(error, Error::RetriesExhausted { .. })
            || crate::routing::outcome_unknown(error))
}

/// Gives back an acquire's place (or grant) when dropped armed.
struct Withdraw {
    target: Option<LockTarget>,
    holder: HolderId,
    token: u64,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let Some(target) = self.target.take() else {
            return;
        };
        let (holder, token) = (self.holder, self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = target.release(holder, token).await {
                    tracing::debug!(lock = %target.name, %error, "withdrawing an acquire");
                }
            });
        }
    }
}

/// A holder id for a new handle.
pub(crate) fn new_holder_id() -> u64 {
    rand::random()
}

/// The holder a handle of this member with holder id `id` is right now.
pub(crate) fn holder_of(node: &Node, id: u64) -> HolderId {
    HolderId {
        member: node.me.as_u64(),
        generation: node.membership.local_generation(),
        id,
    }
}

/// Who holds a lock, from [`Lock::holder`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockHolder {
    /// The holder's member.
    pub member: MemberId,
    /// The fence of the holding.
    pub fence: u64,
    /// How many times the holder holds it (reentry).
    pub holds: u32,
    /// How long until the lease runs out, if the holding has one.
    pub lease_remaining: Option<Duration>,
}

/// A distributed, reentrant, fenced lock, from [`crate::Grid::lock`].
///
/// # Holders
///
/// A holder is one handle value: each [`crate::Grid::lock`] call, and each clone of a [`Lock`],
/// is a holder of its own, so tasks that share a lock through clones exclude each other. The
/// same handle acquiring again while it holds the lock reenters it (up to
/// [`crate::LockConfig::reentry_limit`]) and gets the same fence; each acquire is one hold and
/// needs one unlock.
///
/// # What the fence guarantees
///
/// Every grant to a new holder gets a fencing token larger than any token the lock handed out
/// before, for the life of the lock, across the crash of its primary and migrations: the state
/// (with its token counter) is on the backups before a grant is acknowledged, and a promoted
/// backup continues from it. A resource that remembers the largest token it has seen and refuses
/// smaller ones is therefore safe from a stale holder: one whose lease ran out, whose member was
/// declared down (paused, cut off, or slow) while it still believed it held the lock, or whose
/// message was delayed in the network. The fence does **not** protect a resource that does not
/// check it, and it does not make the lock itself exclusive in time: after a lease expiry or a
/// member declared down, the old holder may still be running when the next holder is granted.
/// If the lock's partition loses every replica at once (more crashes than backups, or a split
/// that leaves every replica on the other side), its state is gone and the lock starts afresh,
/// free; its tokens still stay above every earlier one, because the partition restarts its
/// sequence numbers (the tokens' floor) above any the lost copy could have reached. Tokens only
/// grow; they are not consecutive.
///
/// # Failure handling
///
/// - A holder whose member is declared down by the lock's primary loses the lock once the
///   primary sees it go (after failure detection); its late unlock fails with
///   [`Error::LockLost`].
/// - A lease that runs out releases the lock; the late unlock fails with
///   [`Error::LeaseExpired`].
/// - Waiters are served in the order they queued, across members. A waiter keeps its place
///   while its acquire keeps asking (it asks again at least every half rpc timeout); one that
///   stops (its future was dropped: the place is withdrawn at once; its process died: after
///   failure detection; it hung: after one rpc timeout) loses its place, and a grant it does
///   not claim in that time goes to the next waiter.
/// - Lease deadlines are wall-clock times on the primary, so a failover to a member whose clock
///   differs shifts them by the difference.
pub struct Lock {
    target: LockTarget,
    id: u64,
}

impl Clone for Lock {
    /// A new holder of the same lock.
    fn clone(&self) -> Self {
        Lock {
            target: self.target.clone(),
            id: new_holder_id(),
        }
    }
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock")
            .field("name", &self.target.name)
            .finish()
    }
}

impl Lock {
    pub(crate) fn new(node: Arc<Node>, name: &str) -> Self {
        Lock {
            target: LockTarget::named(node, name),
            id: new_holder_id(),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.target.name
    }

    /// The member that leads the lock's state in this member's current partition table.
    pub fn owner(&self) -> Option<MemberId> {
        self.target
            .node
            .table
            .current()
            .primary(self.target.partition)
    }

    /// The partition that holds the lock's state (its replicas are
    /// `Grid::partition_table().replicas[partition]`).
    pub fn partition(&self) -> u32 {
        self.target.partition
    }

    fn holder_id(&self) -> HolderId {
        holder_of(&self.target.node, self.id)
    }

    async fn acquire(&self, lease: Option<Duration>, patience: Patience) -> Result<LockGuard> {
        let holder = self.holder_id();
        let (fence, token) = self.target.acquire(holder, lease, patience).await?;
        Ok(LockGuard {
            target: self.target.clone(),
            holder,
            token,
            fence,
            done: false,
        })
    }

    /// Waits until this holder holds the lock; FIFO among waiters on every member.
    pub async fn lock(&self) -> Result<LockGuard> {
        self.acquire(None, Patience::Forever).await
    }

    /// [`Lock::lock`] with a lease: the lock is released by itself `lease` after the grant if
    /// not unlocked before (a reentry with a lease starts a new lease for the whole holding).
    pub async fn lock_with_lease(&self, lease: Duration) -> Result<LockGuard> {
        self.acquire(Some(lease), Patience::Forever).await
    }

    /// Takes the lock if it is free (or held by this holder); [`Error::LockBusy`] otherwise.
    pub async fn try_lock(&self) -> Result<LockGuard> {
        self.acquire(None, Patience::Try).await
    }

    /// Waits up to `timeout` for the lock; [`Error::LockTimeout`] if it did not come.
    pub async fn try_lock_for(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire(None, Patience::For(timeout)).await
    }

    /// Releases this holder's latest hold (for code that keeps no guard): [`Error::NotLockHolder`]
    /// if it holds none, [`Error::LeaseExpired`] or [`Error::LockLost`] if it lost the lock.
    /// Prefer [`LockGuard::unlock`], which releases exactly its own hold and is safe to retry.
    pub async fn unlock(&self) -> Result<()> {
        self.target.release(self.holder_id(), 0).await.map(|_| ())
    }

    /// Whether any holder holds the lock.
    pub async fn is_locked(&self) -> Result<bool> {
        Ok(self.target.holder().await?.0.is_some())
    }

    /// Who holds the lock, if anyone.
    pub async fn holder(&self) -> Result<Option<LockHolder>> {
        Ok(self.target.holder().await?.0)
    }

    /// How many holders are queued for the lock.
    pub async fn waiting(&self) -> Result<usize> {
        Ok(self.target.holder().await?.1 as usize)
    }
}

/// One hold of a [`Lock`]. Unlock it with [`LockGuard::unlock`]; a guard dropped without it
/// releases its hold in the background (on the Tokio runtime it is dropped in).
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    target: LockTarget,
    holder: HolderId,
    token: u64,
    fence: u64,
    done: bool,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.target.name)
            .field("fence", &self.fence)
            .finish()
    }
}

impl LockGuard {
    /// The fencing token of this holding: larger than any token the lock handed out before.
    /// Pass it to the resource the lock protects, which should refuse a token smaller than the
    /// largest it has seen.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Releases this hold. Fails with [`Error::LeaseExpired`] or [`Error::LockLost`] if the
    /// holding ended before (the work done under it since is unprotected but for the fence);
    /// `LockLost` also when this member merged into another cluster after a network split,
    /// which drops the locks of the smaller side.
    pub async fn unlock(mut self) -> Result<()> {
        // Marked done only once the release answered: if this future is dropped first, the
        // guard's drop releases the same hold again (a retried release changes nothing).
        let released = self.target.release(self.holder, self.token).await;
        self.done = true;
        match released {
            // This member renewed its identity since the grant: it merged into another cluster
            // after a network split (the smaller side's locks are dropped), or it was declared
            // down (its holdings released). Either way the holding ended.
            Err(Error::NotLockHolder { name })
                if self.holder.generation != self.target.node.membership.local_generation() =>
            {
                Err(Error::LockLost {
                    name,
                    fence: self.fence,
                })
            }
            other => other.map(|_| ()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        drop(Withdraw {
            target: Some(self.target.clone()),
            holder: self.holder,
            token: self.token,
        });
    }
}
