//! The owner-side map operations: one value per operation, decided purely from the entry's
//! current record. The store applies the resulting change and replicates it; nothing here does
//! I/O.

use std::time::Duration;

use bytes::Bytes;

use crate::lock::state::HolderId;
use crate::store::Record;

/// A single-key map operation as the primary executes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MapOp {
    Get,
    ContainsKey,
    Put(Bytes),
    Set(Bytes),
    /// `put` with its own time to live (zero: never expires).
    PutWithTtl(Bytes, Duration),
    /// `set` with its own time to live (zero: never expires).
    SetWithTtl(Bytes, Duration),
    /// Gives an existing entry a new time to live (zero: never expires).
    Expire(Duration),
    /// Removes the entry if it expired, and nothing else (the expiry sweep; never sent over the
    /// wire, and not counted as a read).
    RemoveIfExpired,
    /// `get_or_load`, first step (handled by [`crate::node::Node::execute`], not `decide`).
    LoadBegin {
        member: crate::MemberId,
        claim: u64,
    },
    /// The end of an early refresh: stores the loaded value only if the entry still has the
    /// version the refresh was granted on (a write or removal meanwhile wins). Executed on the
    /// primary itself, never sent over the wire.
    RefreshTo {
        value: Bytes,
        version: u64,
    },
    /// `get_or_load`, last step (handled by [`crate::node::Node::execute`], not `decide`).
    LoadEnd {
        claim: u64,
        outcome: LoadOutcome,
        /// For an early refresh: the version of the entry it replaces.
        refresh_of: Option<u64>,
    },
    /// Queue operations (handled by `queue::owner`, not `decide`); see `proto::MapOp`.
    QueueOffer {
        item: Bytes,
        token: u64,
        capacity: u64,
        wait: Duration,
        /// For an item a merge hands over: the lineage of the partition copy it comes from
        /// (0: a client's offer).
        lineage: u64,
    },
    QueuePoll {
        token: u64,
        max: u32,
        wait: Duration,
    },
    QueuePeek,
    QueueLen,
    QueueClear,
    /// Lock operations (handled by `lock::owner`, not `decide`); see `proto::MapOp`.
    LockAcquire {
        holder: HolderId,
        token: u64,
        lease: Duration,
        wait: Duration,
        /// How much longer the caller keeps waiting in all (zero: it does not wait).
        queue_for: Duration,
    },
    LockRelease {
        holder: HolderId,
        token: u64,
    },
    LockInfo,
    /// Applies time and membership to a lock's state (the lock sweep; never sent over the
    /// wire).
    LockSweep,
    /// Raises a lock's fence counter to at least `fence` (a merge after a split: the merged
    /// lock's next token is above every token either side handed out).
    LockMerge {
        fence: u64,
    },
    /// Entries of the smaller side of a healed split, all of one partition and map, from one
    /// copy of the partition there; each merged by the map's merge policy on the partition's
    /// primary (handled by `split_brain::merge`, not `decide`).
    Merge {
        /// The entries.
        entries: Vec<MergeEntry>,
        /// Whether they come from the copy's primary (else from a backup's copy).
        from_primary: bool,
        /// The lineage of the partition copy they come from (0: unknown).
        lineage: u64,
    },
    Remove,
    Delete,
    PutIfAbsent(Bytes),
    Replace(Bytes),
    ReplaceIfEqual {
        expected: Bytes,
        value: Bytes,
    },
}

/// What the caller learns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OpResult {
    /// Whether the key had a value before the operation.
    pub(crate) found: bool,
    /// The previous value, for the operations that return it.
    pub(crate) value: Option<Bytes>,
    /// Whether a conditional operation changed the entry.
    pub(crate) applied: bool,
    /// For `Get`: when the entry expires, in milliseconds since the Unix epoch (0: never); what
    /// a near cache keeps it until at most.
    pub(crate) expires_at_ms: u64,
    /// For `Get`: the entry's version (local to the primary's answer; not sent over the wire).
    pub(crate) version: u64,
    /// Queue poll and peek: the items, in queue order.
    pub(crate) items: Vec<Bytes>,
    /// Queue length.
    pub(crate) count: u64,
    /// Lock operations: the answer.
    pub(crate) lock: Option<LockAnswer>,
}

/// What a lock operation answers (see `proto::LockStatus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum LockStatus {
    #[default]
    None,
    Granted,
    Queued,
    Busy,
    ReentryLimit,
    Released,
    Withdrawn,
    NotHolder,
    LeaseExpired,
    Lost,
    Info,
}

/// A lock operation's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LockAnswer {
    pub(crate) status: LockStatus,
    pub(crate) fence: u64,
    /// Granted, Info: the holds; Queued: the position; Released: the holds left.
    pub(crate) count: u32,
    pub(crate) holder: Option<HolderId>,
    pub(crate) lease_until_ms: u64,
    pub(crate) waiters: u32,
}

/// What a loader produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoadOutcome {
    Loaded(Bytes),
    Failed(String),
}

/// When an upserted entry expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The map's default time to live, from now (or never, without one).
    MapDefault,
    /// This time to live from now; zero: never.
    After(Duration),
}

/// What happens to the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    Upsert(Bytes, Expiry),
    Remove,
}

/// One entry of a [`MapOp::Merge`]: its key, value, last update, reads and expiry; its token,
/// which identifies the key in the partition copy it comes from (the same on the copy's primary
/// and its backups: see `split_brain::merge::merge_identity`); and its version in that copy (of
/// two merges of one token, the newer wins). The wire message itself: merges are internal.
pub(crate) type MergeEntry = crate::rpc::proto::MergeEntry;

impl MapOp {
    /// Whether applying the operation twice is the same as once, so a write whose outcome is
    /// unknown may simply be sent again: the queue and lock operations made idempotent by their
    /// token, merges, and the end of a load (its value is set, then handed to the waiters).
    ///
    /// A plain set is not: sent again after an unknown outcome, it can land after another
    /// client's later write and undo it (the Jepsen suite's register workload caught exactly
    /// that: a value read, overwritten, then read again). Its outcome is the caller's to decide.
    pub(crate) fn is_repeatable(&self) -> bool {
        matches!(
            self,
            MapOp::QueueOffer { .. }
                | MapOp::QueuePoll { .. }
                | MapOp::LockAcquire { .. }
                | MapOp::LockInfo
                | MapOp::LockMerge { .. }
                | MapOp::Merge { .. }
                | MapOp::LoadEnd {
                    outcome: LoadOutcome::Loaded(_),
                    ..
                }
        ) || matches!(self, MapOp::LockRelease { token, .. } if *token != 0)
    }

    /// Whether the operation is a user's write to a key, which a per-key lock held by another
    /// holder makes wait.
    pub(crate) fn is_keyed_write(&self) -> bool {
        matches!(
            self,
            MapOp::Put(_)
                | MapOp::Set(_)
                | MapOp::PutWithTtl(..)
                | MapOp::SetWithTtl(..)
                | MapOp::Expire(_)
                | MapOp::Remove
                | MapOp::Delete
                | MapOp::PutIfAbsent(_)
                | MapOp::Replace(_)
                | MapOp::ReplaceIfEqual { .. }
                | MapOp::RefreshTo { .. }
        )
    }

    /// Whether the operation may be sent again after a timeout: it changes nothing (reads), or
    /// sending it twice is the same as once (asking for a load under the same claim).
    pub(crate) fn is_resendable(&self) -> bool {
        self.is_read()
            || matches!(
                self,
                MapOp::LoadBegin { .. }
                    | MapOp::QueueOffer { .. }
                    | MapOp::QueuePoll { .. }
                    | MapOp::QueuePeek
                    | MapOp::QueueLen
                    | MapOp::LockAcquire { .. }
                    | MapOp::LockInfo
            )
            || matches!(self, MapOp::LockRelease { token, .. } if *token != 0)
    }

    /// Whether the operation only reads.
    pub(crate) fn is_read(&self) -> bool {
        matches!(self, MapOp::Get | MapOp::ContainsKey)
    }

    /// Decides the result and the change from the entry's current record (`None` if absent or
    /// expired).
    pub(crate) fn decide(&self, current: Option<&Record>) -> (OpResult, Change) {
        let default = Expiry::MapDefault;
        let found = current.is_some();
        let previous = || current.map(|r| r.value.clone());
        match self {
            MapOp::Get => (
                OpResult {
                    found,
                    value: previous(),
                    applied: false,
                    expires_at_ms: current.map_or(0, |r| r.expires_at_ms),
                    version: current.map_or(0, |r| r.version),
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::None,
            ),
            MapOp::ContainsKey => (
                OpResult {
                    found,
                    ..OpResult::default()
                },
                Change::None,
            ),
            MapOp::Put(v) => (
                OpResult {
                    found,
                    value: previous(),
                    applied: true,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::Upsert(v.clone(), default),
            ),
            MapOp::PutWithTtl(v, ttl) => (
                OpResult {
                    found,
                    value: previous(),
                    applied: true,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::Upsert(v.clone(), Expiry::After(*ttl)),
            ),
            MapOp::Set(v) => (
                OpResult {
                    found,
                    value: None,
                    applied: true,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::Upsert(v.clone(), default),
            ),
            MapOp::SetWithTtl(v, ttl) => (
                OpResult {
                    found,
                    value: None,
                    applied: true,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::Upsert(v.clone(), Expiry::After(*ttl)),
            ),
            // The expired case is handled by the caller, which sees the record's deadline.
            MapOp::RefreshTo { value, version } => {
                let same = current.is_some_and(|r| r.version == *version);
                (
                    OpResult {
                        found,
                        applied: same,
                        // Not stored: the newer value wins, and is the answer.
                        value: if same { None } else { previous() },
                        ..OpResult::default()
                    },
                    if same {
                        Change::Upsert(value.clone(), default)
                    } else {
                        Change::None
                    },
                )
            }
            MapOp::RemoveIfExpired
            | MapOp::LoadBegin { .. }
            | MapOp::LoadEnd { .. }
            | MapOp::QueueOffer { .. }
            | MapOp::QueuePoll { .. }
            | MapOp::QueuePeek
            | MapOp::QueueLen
            | MapOp::QueueClear
            | MapOp::LockAcquire { .. }
            | MapOp::LockRelease { .. }
            | MapOp::LockInfo
            | MapOp::LockSweep
            | MapOp::LockMerge { .. }
            | MapOp::Merge { .. } => (OpResult::default(), Change::None),
            MapOp::Expire(ttl) => (
                OpResult {
                    found,
                    value: None,
                    applied: found,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                match current {
                    Some(r) => Change::Upsert(r.value.clone(), Expiry::After(*ttl)),
                    None => Change::None,
                },
            ),
            MapOp::Remove | MapOp::Delete => {
                let result = OpResult {
                    found,
                    value: if matches!(self, MapOp::Remove) {
                        previous()
                    } else {
                        None
                    },
                    applied: found,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                };
                (result, if found { Change::Remove } else { Change::None })
            }
            MapOp::PutIfAbsent(v) => {
                let result = OpResult {
                    found,
                    value: previous(),
                    applied: !found,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                };
                (
                    result,
                    if found {
                        Change::None
                    } else {
                        Change::Upsert(v.clone(), default)
                    },
                )
            }
            MapOp::Replace(v) => {
                let result = OpResult {
                    found,
                    value: previous(),
                    applied: found,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                };
                (
                    result,
                    if found {
                        Change::Upsert(v.clone(), default)
                    } else {
                        Change::None
                    },
                )
            }
            MapOp::ReplaceIfEqual { expected, value } => {
                let equal = current.is_some_and(|r| r.value == *expected);
                let result = OpResult {
                    found,
                    value: None,
                    applied: equal,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                };
                (
                    result,
                    if equal {
                        Change::Upsert(value.clone(), default)
                    } else {
                        Change::None
                    },
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &'static str) -> Record {
        Record {
            value: Bytes::from_static(v.as_bytes()),
            version: 1,
            ..Record::default()
        }
    }
    fn b(v: &'static str) -> Bytes {
        Bytes::from_static(v.as_bytes())
    }

    #[test]
    fn each_operation_decides_from_the_current_record() {
        let a = rec("a");
        assert_eq!(MapOp::Get.decide(Some(&a)).0.value, Some(b("a")));
        assert_eq!(MapOp::Get.decide(None).1, Change::None);
        assert!(MapOp::ContainsKey.decide(Some(&a)).0.found);
        assert_eq!(
            MapOp::Put(b("x")).decide(Some(&a)),
            (
                OpResult {
                    found: true,
                    value: Some(b("a")),
                    applied: true,
                    expires_at_ms: 0,
                    version: 0,
                    items: Vec::new(),
                    count: 0,
                    lock: None,
                },
                Change::Upsert(b("x"), Expiry::MapDefault)
            )
        );
        assert_eq!(MapOp::Remove.decide(Some(&a)).1, Change::Remove);
        assert_eq!(MapOp::Remove.decide(None).1, Change::None);
        assert_eq!(MapOp::Delete.decide(Some(&a)).0.value, None);
        assert_eq!(MapOp::PutIfAbsent(b("x")).decide(Some(&a)).1, Change::None);
        assert_eq!(
            MapOp::PutIfAbsent(b("x")).decide(None).1,
            Change::Upsert(b("x"), Expiry::MapDefault)
        );
        assert_eq!(MapOp::Replace(b("x")).decide(None).1, Change::None);
        assert_eq!(
            MapOp::Replace(b("x")).decide(Some(&a)).1,
            Change::Upsert(b("x"), Expiry::MapDefault)
        );
        let cas = |expected| MapOp::ReplaceIfEqual {
            expected: b(expected),
            value: b("x"),
        };
        assert_eq!(
            cas("a").decide(Some(&a)).1,
            Change::Upsert(b("x"), Expiry::MapDefault)
        );
        assert!(cas("a").decide(Some(&a)).0.applied);
        assert_eq!(cas("z").decide(Some(&a)).1, Change::None);
        assert_eq!(cas("a").decide(None).1, Change::None);
        assert!(MapOp::Get.is_read() && !MapOp::Set(b("v")).is_read());
        assert!(MapOp::Get.is_resendable() && !MapOp::Put(b("v")).is_resendable());
    }

    #[test]
    fn time_to_live_operations() {
        let a = rec("a");
        let ttl = Duration::from_secs(5);
        assert_eq!(
            MapOp::SetWithTtl(b("x"), ttl).decide(None).1,
            Change::Upsert(b("x"), Expiry::After(ttl))
        );
        let (result, change) = MapOp::PutWithTtl(b("x"), ttl).decide(Some(&a));
        assert_eq!(result.value, Some(b("a")));
        assert_eq!(change, Change::Upsert(b("x"), Expiry::After(ttl)));
        // Expire keeps the value and sets the new time to live; on a missing key it does nothing.
        let (result, change) = MapOp::Expire(ttl).decide(Some(&a));
        assert!(result.applied && result.found);
        assert_eq!(change, Change::Upsert(b("a"), Expiry::After(ttl)));
        let (result, change) = MapOp::Expire(ttl).decide(None);
        assert!(!result.applied);
        assert_eq!(change, Change::None);
        assert!(!MapOp::Expire(ttl).is_read());
        // Blind writes are not sent again after an unknown outcome (see `is_repeatable`).
        assert!(
            !MapOp::SetWithTtl(b("x"), ttl).is_repeatable() && !MapOp::Set(b("x")).is_repeatable()
        );
        assert!(!MapOp::Put(b("x")).is_repeatable() && !MapOp::Expire(ttl).is_repeatable());
        // An early refresh lands only on the version it replaces.
        let refresh = |version| MapOp::RefreshTo {
            value: b("new"),
            version,
        };
        assert_eq!(
            refresh(1).decide(Some(&a)).1,
            Change::Upsert(b("new"), Expiry::MapDefault)
        );
        assert_eq!(refresh(2).decide(Some(&a)).1, Change::None);
        assert_eq!(refresh(1).decide(None).1, Change::None);
        assert_eq!(MapOp::Get.decide(Some(&a)).0.version, 1);
        // Expiry itself is judged against the record's deadline.
        let expiring = Record {
            expires_at_ms: 1_000,
            ..rec("a")
        };
        assert!(!expiring.is_expired(999) && expiring.is_expired(1_000));
        assert!(!a.is_expired(u64::MAX), "0 means never");
    }
}
