//! The router: key to partition to primary, from the current table; the local fast path when
//! this member is the primary; a gRPC call otherwise; and, on `NotOwner` or an unreachable owner,
//! a table refresh and a retry within a bounded budget.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lock::state::HolderId;
use crate::map::ops::{LockAnswer, LockStatus, MapOp, OpResult};
use crate::membership::MemberId;
use crate::node::{Node, Outcome};
use crate::rpc::proto;

/// Attempts per operation before [`Error::RetriesExhausted`].
pub(crate) const MAX_ATTEMPTS: u32 = 30;

impl Node {
    /// Runs `op` on the partition's primary, wherever it is.
    pub(crate) async fn route(
        self: &Arc<Self>,
        partition: u32,
        map: &str,
        key: Bytes,
        op: MapOp,
    ) -> Result<OpResult> {
        self.route_as(partition, map, key, op, None).await
    }

    /// [`Node::route`] for a write by `writer`, which passes the per-key locks it holds. A write
    /// to a key another holder locked waits for the unlock until the routing deadline, then
    /// fails with [`Error::KeyLocked`].
    pub(crate) async fn route_as(
        self: &Arc<Self>,
        partition: u32,
        map: &str,
        key: Bytes,
        op: MapOp,
        writer: Option<HolderId>,
    ) -> Result<OpResult> {
        self.check_quorum(map, &key, &op)?;
        let deadline = Instant::now() + self.config.rpc_timeout * 2;
        let mut attempts = 0;
        // Whether an earlier attempt may have been applied (its outcome is unknown).
        let mut uncertain = false;
        loop {
            attempts += 1;
            let table = self.table.current();
            let outcome = match table.primary(partition) {
                None => Err(Error::NoOwner { partition }),
                Some(owner) if owner == self.me => {
                    self.execute(
                        partition,
                        map,
                        key.clone(),
                        op.clone(),
                        table.version,
                        writer,
                    )
                    .await
                }
                Some(owner) => {
                    self.remote_call(owner, partition, map, &key, &op, table.version, writer)
                        .await
                }
            };
            let last = match outcome {
                Ok(Outcome::Done(result)) => return Ok(result),
                // Not applied: the primary waited for the key's lock; ask again until the
                // deadline.
                Ok(Outcome::Locked) => {
                    if Instant::now() >= deadline {
                        return Err(Error::KeyLocked {
                            map: map.to_string(),
                        });
                    }
                    continue;
                }
                Ok(Outcome::Pending) => {
                    self.await_table_change(table.version).await;
                    Error::NoOwner { partition }
                }
                Ok(Outcome::NotOwner { version, owner }) => {
                    let answered_by = table.primary(partition);
                    if version > table.version {
                        self.refresh_table(answered_by).await;
                    } else {
                        self.await_table_change(table.version).await;
                    }
                    Error::NotOwner {
                        partition,
                        version,
                        owner,
                    }
                }
                // Not processed: safe to retry once the table has moved on.
                Err(
                    e @ (Error::NoOwner { .. }
                    | Error::Unreachable { .. }
                    | Error::UnknownMember(_)),
                ) => {
                    self.await_table_change(table.version).await;
                    e
                }
                // Applying it twice is the same as once (a token makes it so): retry on the
                // new primary.
                Err(e @ Error::NotBackedUp { .. }) if op.is_repeatable() => {
                    uncertain = true;
                    self.await_table_change(table.version).await;
                    e
                }
                // Reads, and operations made idempotent by their token or claim (queue offers
                // and polls, asking for a load), may simply be sent again when the outcome is
                // unknown: after the table moved on, to the new primary.
                Err(e) if op.is_resendable() && outcome_unknown(&e) => {
                    uncertain = true;
                    self.await_table_change(table.version).await;
                    e
                }
                // A timeout may or may not have been applied; the caller decides.
                Err(e) => return Err(after_uncertain(e, uncertain, partition, attempts)),
            };
            // Idempotent operations keep trying until the deadline, which outlasts failure
            // detection: giving up earlier would hand the caller an unknown outcome to retry
            // without the token.
            if (attempts >= MAX_ATTEMPTS && !op.is_resendable()) || Instant::now() >= deadline {
                return Err(Error::RetriesExhausted {
                    partition,
                    attempts,
                    last: Box::new(last),
                });
            }
        }
    }

    /// Waits briefly for a table newer than `version` (a change in flight).
    pub(crate) async fn await_table_change(&self, version: u64) {
        let mut changes = self.table.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            changes.wait_for(|v| *v > version),
        )
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn remote_call(
        &self,
        owner: MemberId,
        partition: u32,
        map: &str,
        key: &Bytes,
        op: &MapOp,
        table_version: u64,
        writer: Option<HolderId>,
    ) -> Result<Outcome<OpResult>> {
        let (kind, value, expected) = op_to_proto(op);
        let request = self.rpc.request(proto::MapRequest {
            table_version,
            partition,
            map: map.to_string(),
            key: key.clone(),
            op: kind as i32,
            value,
            expected,
            ttl_ms: op_ttl(op),
            load_member: match op {
                MapOp::LoadBegin { member, .. } => member.as_u64(),
                _ => 0,
            },
            load_claim: match op {
                MapOp::LoadBegin { claim, .. } | MapOp::LoadEnd { claim, .. } => *claim,
                _ => 0,
            },
            load_failed: matches!(
                op,
                MapOp::LoadEnd {
                    outcome: crate::map::ops::LoadOutcome::Failed(_),
                    ..
                }
            ),
            token: match op {
                MapOp::QueueOffer { token, .. }
                | MapOp::QueuePoll { token, .. }
                | MapOp::LockAcquire { token, .. }
                | MapOp::LockRelease { token, .. } => *token,
                _ => 0,
            },
            capacity: match op {
                MapOp::QueueOffer { capacity, .. } => *capacity,
                _ => 0,
            },
            max: match op {
                MapOp::QueuePoll { max, .. } => *max,
                _ => 0,
            },
            refresh_version: match op {
                MapOp::LoadEnd { refresh_of, .. } => *refresh_of,
                _ => None,
            },
            wait_ms: match op {
                MapOp::QueueOffer { wait, .. }
                | MapOp::QueuePoll { wait, .. }
                | MapOp::LockAcquire { wait, .. } => millis(*wait),
                _ => 0,
            },
            holder: match op {
                MapOp::LockAcquire { holder, .. } | MapOp::LockRelease { holder, .. } => {
                    Some(holder_to_proto(holder))
                }
                _ => writer.as_ref().map(holder_to_proto),
            },
            lease_ms: match op {
                MapOp::LockAcquire { lease, .. } => millis(*lease),
                _ => 0,
            },
            queue_ms: match op {
                MapOp::LockAcquire { queue_for, .. } => millis(*queue_for),
                _ => 0,
            },
            fence: match op {
                MapOp::LockMerge { fence } => *fence,
                _ => 0,
            },
            lineage: match op {
                MapOp::Merge { lineage, .. } | MapOp::QueueOffer { lineage, .. } => *lineage,
                _ => 0,
            },
            merge_entries: match op {
                MapOp::Merge { entries, .. } => entries.clone(),
                _ => Vec::new(),
            },
            merge_from_primary: matches!(
                op,
                MapOp::Merge {
                    from_primary: true,
                    ..
                }
            ),
        });
        let mut call = self.peer_client(owner)?;
        let response = call
            .client
            .map_call(request)
            .await
            .map_err(|status| call.error("map_call", status))?
            .into_inner();
        Ok(match response.outcome {
            Some(proto::map_response::Outcome::Result(r)) => Outcome::Done(OpResult {
                found: r.found,
                value: r.found.then_some(r.value),
                applied: r.applied,
                expires_at_ms: r.expires_at_ms,
                version: r.version,
                items: r.items,
                count: r.count,
                lock: r.lock.map(|l| lock_answer_from_proto(&l)),
            }),
            Some(proto::map_response::Outcome::KeyLocked(_)) => Outcome::Locked,
            Some(proto::map_response::Outcome::NotOwner(n)) => Outcome::NotOwner {
                version: n.version,
                owner: n.owner.map(MemberId),
            },
            None => {
                return Err(Error::Remote {
                    member: owner,
                    code: tonic::Code::Internal,
                    message: "empty map response".to_string(),
                });
            }
        })
    }
}

/// Whether a failed call may or may not have been executed (and another attempt may succeed):
/// it timed out, or the member stopped or lost the connection while answering. Not errors that
/// would fail again (a refused request, a value too large to answer with).
/// `error` ends an operation after `attempts`; `uncertain` says whether an earlier attempt's
/// outcome is unknown (it may have been applied). A definite refusal then does not speak for
/// the whole operation, so it is reported inside [`Error::RetriesExhausted`]: a definite error
/// (such as [`Error::QuorumNotPresent`]) reaching a caller always means nothing was applied.
pub(crate) fn after_uncertain(
    error: Error,
    uncertain: bool,
    partition: u32,
    attempts: u32,
) -> Error {
    if uncertain && !outcome_unknown(&error) && !matches!(error, Error::RetriesExhausted { .. }) {
        Error::RetriesExhausted {
            partition,
            attempts,
            last: Box::new(error),
        }
    } else {
        error
    }
}

pub(crate) fn outcome_unknown(error: &Error) -> bool {
    match error {
        Error::Timeout { .. } => true,
        Error::Remote { code, message, .. } => {
            matches!(
                code,
                tonic::Code::Aborted
                    | tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
            ) || (*code == tonic::Code::Internal && message.starts_with("h2 protocol error"))
        }
        _ => false,
    }
}

/// The wire form of an operation: kind, value, expected value.
pub(crate) fn op_to_proto(op: &MapOp) -> (proto::MapOp, Bytes, Bytes) {
    let none = Bytes::new();
    match op {
        MapOp::Get | MapOp::RemoveIfExpired => (proto::MapOp::Get, none.clone(), none),
        MapOp::ContainsKey => (proto::MapOp::ContainsKey, none.clone(), none),
        MapOp::Put(v) | MapOp::PutWithTtl(v, _) => (proto::MapOp::Put, v.clone(), none),
        MapOp::Set(v) | MapOp::SetWithTtl(v, _) | MapOp::RefreshTo { value: v, .. } => {
            (proto::MapOp::Set, v.clone(), none)
        }
        MapOp::Expire(_) => (proto::MapOp::Expire, none.clone(), none),
        MapOp::LoadBegin { .. } => (proto::MapOp::LoadBegin, none.clone(), none),
        MapOp::LoadEnd { outcome, .. } => (
            proto::MapOp::LoadEnd,
            match outcome {
                crate::map::ops::LoadOutcome::Loaded(v) => v.clone(),
                crate::map::ops::LoadOutcome::Failed(m) => Bytes::from(m.clone()),
            },
            none,
        ),
        MapOp::QueueOffer { item, .. } => (proto::MapOp::QueueOffer, item.clone(), none),
        MapOp::QueuePoll { .. } => (proto::MapOp::QueuePoll, none.clone(), none),
        MapOp::QueuePeek => (proto::MapOp::QueuePeek, none.clone(), none),
        MapOp::QueueLen => (proto::MapOp::QueueLen, none.clone(), none),
        MapOp::QueueClear => (proto::MapOp::QueueClear, none.clone(), none),
        MapOp::LockAcquire { .. } => (proto::MapOp::LockAcquire, none.clone(), none),
        MapOp::LockRelease { .. } => (proto::MapOp::LockRelease, none.clone(), none),
        MapOp::LockMerge { .. } => (proto::MapOp::LockMerge, none.clone(), none),
        MapOp::Merge { .. } => (proto::MapOp::Merge, none.clone(), none),
        // The sweep never travels; as an info request it changes nothing.
        MapOp::LockInfo | MapOp::LockSweep => (proto::MapOp::LockInfo, none.clone(), none),
        MapOp::Remove => (proto::MapOp::Remove, none.clone(), none),
        MapOp::Delete => (proto::MapOp::Delete, none.clone(), none),
        MapOp::PutIfAbsent(v) => (proto::MapOp::PutIfAbsent, v.clone(), none),
        MapOp::Replace(v) => (proto::MapOp::Replace, v.clone(), none),
        MapOp::ReplaceIfEqual { expected, value } => (
            proto::MapOp::ReplaceIfEqual,
            value.clone(),
            expected.clone(),
        ),
    }
}

/// The time to live an operation carries, in milliseconds.
fn op_ttl(op: &MapOp) -> Option<u64> {
    match op {
        MapOp::PutWithTtl(_, ttl) | MapOp::SetWithTtl(_, ttl) | MapOp::Expire(ttl) => {
            Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        }
        _ => None,
    }
}

/// The operation a request carries; `None` for an unknown kind.
pub(crate) fn op_from_proto(request: &proto::MapRequest) -> Option<MapOp> {
    let value = request.value.clone();
    let ttl = request.ttl_ms.map(std::time::Duration::from_millis);
    Some(match proto::MapOp::try_from(request.op).ok()? {
        proto::MapOp::Get => MapOp::Get,
        proto::MapOp::ContainsKey => MapOp::ContainsKey,
        proto::MapOp::Put => match ttl {
            Some(ttl) => MapOp::PutWithTtl(value, ttl),
            None => MapOp::Put(value),
        },
        proto::MapOp::Set => match ttl {
            Some(ttl) => MapOp::SetWithTtl(value, ttl),
            None => MapOp::Set(value),
        },
        proto::MapOp::Expire => MapOp::Expire(ttl?),
        proto::MapOp::LoadBegin => MapOp::LoadBegin {
            member: crate::MemberId(request.load_member),
            claim: request.load_claim,
        },
        proto::MapOp::LoadEnd => MapOp::LoadEnd {
            claim: request.load_claim,
            refresh_of: request.refresh_version,
            outcome: if request.load_failed {
                crate::map::ops::LoadOutcome::Failed(String::from_utf8_lossy(&value).into_owned())
            } else {
                crate::map::ops::LoadOutcome::Loaded(value)
            },
        },
        proto::MapOp::QueueOffer => MapOp::QueueOffer {
            item: value,
            token: request.token,
            capacity: request.capacity,
            wait: std::time::Duration::from_millis(request.wait_ms),
            lineage: request.lineage,
        },
        proto::MapOp::QueuePoll => MapOp::QueuePoll {
            token: request.token,
            max: request.max.max(1),
            wait: std::time::Duration::from_millis(request.wait_ms),
        },
        proto::MapOp::QueuePeek => MapOp::QueuePeek,
        proto::MapOp::QueueLen => MapOp::QueueLen,
        proto::MapOp::QueueClear => MapOp::QueueClear,
        proto::MapOp::LockAcquire => MapOp::LockAcquire {
            holder: holder_from_proto(request.holder.as_ref()?),
            token: request.token,
            lease: std::time::Duration::from_millis(request.lease_ms),
            wait: std::time::Duration::from_millis(request.wait_ms),
            queue_for: std::time::Duration::from_millis(request.queue_ms),
        },
        proto::MapOp::LockRelease => MapOp::LockRelease {
            holder: holder_from_proto(request.holder.as_ref()?),
            token: request.token,
        },
        proto::MapOp::LockInfo => MapOp::LockInfo,
        proto::MapOp::LockMerge => MapOp::LockMerge {
            fence: request.fence,
        },
        proto::MapOp::Merge => MapOp::Merge {
            entries: request.merge_entries.clone(),
            from_primary: request.merge_from_primary,
            lineage: request.lineage,
        },
        proto::MapOp::Remove => MapOp::Remove,
        proto::MapOp::Delete => MapOp::Delete,
        proto::MapOp::PutIfAbsent => MapOp::PutIfAbsent(value),
        proto::MapOp::Replace => MapOp::Replace(value),
        proto::MapOp::ReplaceIfEqual => MapOp::ReplaceIfEqual {
            expected: request.expected.clone(),
            value,
        },
    })
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn holder_to_proto(holder: &HolderId) -> proto::LockHolder {
    proto::LockHolder {
        member: holder.member,
        generation: holder.generation,
        id: holder.id,
    }
}

pub(crate) fn holder_from_proto(holder: &proto::LockHolder) -> HolderId {
    HolderId {
        member: holder.member,
        generation: holder.generation,
        id: holder.id,
    }
}

pub(crate) fn lock_answer_to_proto(answer: &LockAnswer) -> proto::LockAnswer {
    let status = match answer.status {
        LockStatus::None => proto::LockStatus::None,
        LockStatus::Granted => proto::LockStatus::Granted,
        LockStatus::Queued => proto::LockStatus::Queued,
        LockStatus::Busy => proto::LockStatus::Busy,
        LockStatus::ReentryLimit => proto::LockStatus::ReentryLimit,
        LockStatus::Released => proto::LockStatus::Released,
        LockStatus::Withdrawn => proto::LockStatus::Withdrawn,
        LockStatus::NotHolder => proto::LockStatus::NotHolder,
        LockStatus::LeaseExpired => proto::LockStatus::LeaseExpired,
        LockStatus::Lost => proto::LockStatus::Lost,
        LockStatus::Info => proto::LockStatus::Info,
    };
    proto::LockAnswer {
        status: status as i32,
        fence: answer.fence,
        count: answer.count,
        holder: answer.holder.as_ref().map(holder_to_proto),
        lease_until_ms: answer.lease_until_ms,
        waiters: answer.waiters,
    }
}

/// A lock answer from the wire (an unknown status reads as none, which callers refuse).
pub(crate) fn lock_answer_from_proto(answer: &proto::LockAnswer) -> LockAnswer {
    let status = match proto::LockStatus::try_from(answer.status) {
        Ok(proto::LockStatus::Granted) => LockStatus::Granted,
        Ok(proto::LockStatus::Queued) => LockStatus::Queued,
        Ok(proto::LockStatus::Busy) => LockStatus::Busy,
        Ok(proto::LockStatus::ReentryLimit) => LockStatus::ReentryLimit,
        Ok(proto::LockStatus::Released) => LockStatus::Released,
        Ok(proto::LockStatus::Withdrawn) => LockStatus::Withdrawn,
        Ok(proto::LockStatus::NotHolder) => LockStatus::NotHolder,
        Ok(proto::LockStatus::LeaseExpired) => LockStatus::LeaseExpired,
        Ok(proto::LockStatus::Lost) => LockStatus::Lost,
        Ok(proto::LockStatus::Info) => LockStatus::Info,
        Ok(proto::LockStatus::None) | Err(_) => LockStatus::None,
    };
    LockAnswer {
        status,
        fence: answer.fence,
        count: answer.count,
        holder: answer.holder.as_ref().map(holder_from_proto),
        lease_until_ms: answer.lease_until_ms,
        waiters: answer.waiters,
    }
}
