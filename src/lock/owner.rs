//! The owner side of locks: each lock's [`LockState`] is one entry of an internal map in the
//! lock's partition (`"\0locks"`, keyed by the lock's name, for named locks; `"\0keylocks"`,
//! keyed by map name and key, for per-key map locks, which live in the key's partition). Every
//! change is one mutation, applied and replicated under the partition's write lock like a map
//! write, and acknowledged only once the backups have it; so the holder, the holds, the fence
//! counter, the lease and the waiters survive the primary's crash and move with migrations.
//!
//! The primary also drives time and membership: a sweep every [`SWEEP_EVERY`] (and at once on a
//! membership change) ends holdings whose lease ran out or whose member is gone, and grants the
//! lock to the next waiter. Every access sweeps the lock it touches first, so an answer never
//! shows a lease that already ran out.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::lock::state::{Acquired, HolderId, LockState, ReleaseOutcome};
use crate::map::ops::{LockAnswer, LockStatus, MapOp, OpResult};
use crate::membership::MemberId;
use crate::node::{Acks, Node, Outcome};
use crate::rpc::proto;
use crate::store::Record;

/// The internal map of named locks' states.
pub(crate) const NAMED: &str = "\u{0}locks";

/// The internal map of per-key map locks' states.
pub(crate) const KEYED: &str = "\u{0}keylocks";

/// How often the primary looks for leases that ran out and holders that are gone.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The map name in a [`KEYED`] state key.
pub(crate) fn map_of_key_lock(state_key: &[u8]) -> Option<&str> {
    let len = usize::from(u16::from_be_bytes(state_key.get(..2)?.try_into().ok()?));
    std::str::from_utf8(state_key.get(2..2 + len)?).ok()
}

/// The state key of map `map`'s key `key` in [`KEYED`]: the map name's length, the name, the
/// key.
pub(crate) fn keyed(map: &str, key: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + map.len() + key.len());
    out.put_u16(map.len() as u16);
    out.put_slice(map.as_bytes());
    out.put_slice(key);
    out.freeze()
}

/// The background sweep of the locks this member leads.
pub(crate) async fn run(node: Arc<Node>) {
    // Membership changes only wake the sweep: the view itself records who went.
    let mut events = node.membership.subscribe();
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tick.tick() => {}
            event = events.recv() => if event.is_none() { return },
        }
        node.sweep_locks();
    }
}

impl Node {
    /// Whether `holder`'s member incarnation is alive as far as this member knows. A member
    /// missing from the view counts as gone once this member saw it go, or once this member has
    /// been in the cluster for an rpc timeout (its view is complete by then); before that it
    /// may simply not have heard of a member that joined recently.
    pub(crate) fn holder_alive(&self, holder: &HolderId) -> bool {
        if holder.member == self.me.as_u64() {
            return holder.generation == self.membership.local_generation();
        }
        match self.membership.peer(MemberId(holder.member)) {
            Some(peer) => peer.generation <= holder.generation,
            None => {
                let seen_gone = self
                    .membership
                    .gone_generation(MemberId(holder.member))
                    .is_some_and(|generation| generation >= holder.generation);
                !seen_gone && self.started.elapsed() < self.config.rpc_timeout
            }
        }
    }

    /// The signal of `partition`'s locks: notified whenever one changes.
    fn lock_signal(&self, partition: u32) -> Option<&tokio::sync::Notify> {
        self.lock_signals.get(partition as usize)
    }

    /// Runs a lock operation on this member as the lock's primary; an acquire that is queued
    /// waits here up to its `wait` (at most half an rpc timeout; the caller asks again) to be
    /// granted.
    pub(crate) async fn lock_execute(
        self: &Arc<Self>,
        partition: u32,
        map: &str,
        key: Bytes,
        op: MapOp,
    ) -> Result<Outcome<OpResult>> {
        let wait = match &op {
            MapOp::LockAcquire { wait, .. } => *wait,
            _ => Duration::ZERO,
        };
        let signal = self
            .lock_signal(partition)
            .ok_or(Error::NoOwner { partition })?;
        self.apply_waiting(
            partition,
            signal,
            wait,
            || self.lock_apply(partition, map, &key, &op),
            |result| {
                !result
                    .lock
                    .as_ref()
                    .is_some_and(|l| l.status == LockStatus::Queued)
            },
        )
        .await
    }

    /// The synchronous part of a lock operation: ownership check, the state machine, and the
    /// mutation, applied, numbered and queued for the backups.
    pub(crate) fn lock_apply(
        &self,
        partition: u32,
        map: &str,
        key: &Bytes,
        op: &MapOp,
    ) -> Result<(Outcome<OpResult>, Acks)> {
        let (data, mut seq, table) = match self.lock_leading(partition)? {
            Ok(locked) => locked,
            Err(outcome) => return Ok((outcome, Vec::new())),
        };
        let mut acks = Vec::new();
        let now = crate::store::now_ms();
        // A grant in this mutation gets at least its sequence number as fence: sequence numbers
        // only grow, across failovers too, and every fence handed out was acknowledged by the
        // backups with its mutation.
        let floor = *seq + 1;
        let entries = data.entries(map);
        let stored = entries.as_ref().and_then(|e| e.get(key));
        let mut state = match &stored {
            Some(record) => LockState::decode(&record.value).unwrap_or_else(|| {
                tracing::warn!(partition, "lock state does not decode; starting it afresh");
                LockState::default()
            }),
            None => LockState::default(),
        };
        let before = state.clone();
        let alive = |holder: &HolderId| self.holder_alive(holder);
        state.sweep(now, floor, &alive);
        let mut answer = LockAnswer::default();
        match op {
            MapOp::LockAcquire {
                holder,
                token,
                lease,
                wait,
                queue_for,
            } => {
                if !alive(holder) {
                    // Not known here yet (or gone): nothing is changed; the caller asks again.
                    return Err(Error::UnknownMember(MemberId(holder.member)));
                }
                let queue_until = if queue_for.is_zero() {
                    0
                } else {
                    // The caller keeps its place while it asks again within an rpc timeout.
                    let keep = (*queue_for).min(*wait + self.config.rpc_timeout);
                    now.saturating_add(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX))
                };
                let limit = self.reentry_limit(map, key);
                let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                answer = match state.acquire(
                    *holder,
                    *token,
                    lease_ms,
                    queue_until,
                    limit,
                    now,
                    floor,
                ) {
                    Acquired::Granted { fence, count } => LockAnswer {
                        status: LockStatus::Granted,
                        fence,
                        count,
                        ..LockAnswer::default()
                    },
                    Acquired::Queued { position } => LockAnswer {
                        status: LockStatus::Queued,
                        count: position,
                        ..LockAnswer::default()
                    },
                    Acquired::Busy => LockAnswer {
                        status: LockStatus::Busy,
                        ..LockAnswer::default()
                    },
                    Acquired::ReentryLimit => LockAnswer {
                        status: LockStatus::ReentryLimit,
                        count: limit,
                        ..LockAnswer::default()
                    },
                };
            }
            MapOp::LockRelease { holder, token } => {
                let (status, fence, count) = match state
                    .release(*holder, *token, now, floor, &alive)
                {
                    ReleaseOutcome::Released { remaining } => (LockStatus::Released, 0, remaining),
                    ReleaseOutcome::Withdrawn => (LockStatus::Withdrawn, 0, 0),
                    ReleaseOutcome::NotHolder => (LockStatus::NotHolder, 0, 0),
                    ReleaseOutcome::LeaseExpired { fence } => (LockStatus::LeaseExpired, fence, 0),
                    ReleaseOutcome::Lost { fence } => (LockStatus::Lost, fence, 0),
                };
                answer = LockAnswer {
                    status,
                    fence,
                    count,
                    ..LockAnswer::default()
                };
            }
            MapOp::LockMerge { fence } => {
                state.fence = state.fence.max(*fence);
                answer = LockAnswer {
                    status: LockStatus::Info,
                    fence: state.fence,
                    ..LockAnswer::default()
                };
            }
            MapOp::LockInfo => {
                answer = LockAnswer {
                    status: LockStatus::Info,
                    fence: state.holding.as_ref().map_or(state.fence, |h| h.fence),
                    count: state.holding.as_ref().map_or(0, |h| h.tokens.len() as u32),
                    holder: state.holding.as_ref().map(|h| h.holder),
                    lease_until_ms: state.holding.as_ref().map_or(0, |h| h.lease_until_ms),
                    waiters: state.waiters.len() as u32,
                };
            }
            _ => {}
        }
        let changed = state != before;
        // An answer that repeats an earlier change (a retried acquire or unlock) writes the
        // state again, numbered: the backups apply in order, so their acknowledgement of this
        // write covers the earlier one, which they may not have yet.
        let repeats = !changed
            && matches!(
                answer.status,
                LockStatus::Granted
                    | LockStatus::Released
                    | LockStatus::Withdrawn
                    | LockStatus::LeaseExpired
                    | LockStatus::Lost
            );
        if changed || repeats {
            *seq += 1;
            let version = stored.as_ref().map_or(1, |r| r.version + 1);
            // An idle per-key lock is deleted (a named lock keeps its fence counter), once the
            // sequence has passed its last fence: later grants start above the sequence.
            let change = if map == KEYED && state.is_idle() && state.fence <= *seq {
                if let Some(entries) = &entries {
                    entries.remove(key);
                }
                proto::mutation::Change::Remove(true)
            } else {
                let record = Record {
                    value: Bytes::from(state.encode()),
                    version,
                    expires_at_ms: 0,
                    last_access_ms: now,
                    hits: 0,
                    updated_ms: now,
                };
                data.entries_or_create(map).insert(key, &record);
                proto::mutation::Change::Upsert(proto::Record::from(&record))
            };
            let map_config = self.config.map_config(map);
            let ctx = (partition, &*table, &map_config);
            self.replicate_change(ctx, *seq, map, key.clone(), change, &mut acks);
        }
        drop(seq);
        if changed && let Some(signal) = self.lock_signal(partition) {
            signal.notify_waiters();
        }
        Ok((
            Outcome::Done(OpResult {
                lock: Some(answer),
                ..OpResult::default()
            }),
            acks,
        ))
    }

    /// The reentry limit of the lock stored at (`map`, `key`).
    fn reentry_limit(&self, map: &str, key: &[u8]) -> u32 {
        let name = if map == NAMED {
            String::from_utf8_lossy(key).into_owned()
        } else {
            "*".to_string()
        };
        self.config.lock_config(&name).reentry_limit
    }

    /// Whether a write by `writer` to `key` of `map` must wait for another holder's lock on the
    /// key (the caller holds the partition's write lock).
    pub(crate) fn key_locked(
        &self,
        data: &crate::store::PartitionData,
        map: &str,
        key: &[u8],
        writer: Option<&HolderId>,
        now_ms: u64,
    ) -> bool {
        let Some(locks) = data.entries(KEYED) else {
            return false;
        };
        if locks.is_empty() {
            return false;
        }
        locks
            .get(&keyed(map, key))
            .and_then(|record| LockState::decode(&record.value))
            .is_some_and(|state| state.blocks(writer, now_ms))
    }

    /// Notified when a lock of `partition` changes.
    pub(crate) fn lock_changed(&self, partition: u32) -> tokio::sync::futures::Notified<'_> {
        self.lock_signals[partition as usize % self.lock_signals.len()].notified()
    }

    /// One sweep of the locks this member leads: leases that ran out, holders whose member is
    /// gone, grants never claimed, waiters that stopped asking.
    pub(crate) fn sweep_locks(&self) {
        let table = self.table.current();
        let now = crate::store::now_ms();
        let alive = |holder: &HolderId| self.holder_alive(holder);
        for partition in 0..table.partition_count() {
            if table.primary(partition) != Some(self.me) {
                continue;
            }
            let Some(data) = self.store.partition(partition) else {
                continue;
            };
            if data.is_pending() {
                continue;
            }
            for map in [NAMED, KEYED] {
                let Some(entries) = data.entries(map) else {
                    continue;
                };
                // Keys are collected first: no map guard is held while a state is written.
                let mut due = Vec::new();
                entries.for_each(|entry| {
                    if LockState::decode(entry.value())
                        .is_some_and(|state| state.needs_sweep(now, &alive))
                    {
                        due.push(Bytes::copy_from_slice(entry.key()));
                    }
                });
                for key in due {
                    // Replicated like any change; nobody waits for the acknowledgements.
                    if let Err(error) = self.lock_apply(partition, map, &key, &MapOp::LockSweep) {
                        tracing::debug!(partition, %error, "lock sweep");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_lock_states_are_keyed_by_map_and_key() {
        let key = keyed("sessions", b"user:1");
        assert_eq!(&key[..], b"\x00\x08sessionsuser:1");
        assert_ne!(keyed("a", b"bc"), keyed("ab", b"c"));
    }
}
