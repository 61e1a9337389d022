//! Split-brain handling: finding the other side of a healed network split, deciding which side
//! merges into which, and merging the smaller side's data into the larger one.
//!
//! - [`discovery`]: the cluster view members exchange in probe datagrams, and the pure decision
//!   whether two views are two clusters and which one joins the other.
//! - [`merge`]: the merging member's side: capture what it leads, leave its old cluster, join
//!   the other, and hand its entries, queue items and lock fences to the new primaries.
//!
//! The protocol is described on [`MergePolicy`], the public face of it.

pub(crate) mod discovery;
pub(crate) mod merge;
mod quorum;

use std::sync::Arc;

use bytes::Bytes;

/// An entry as a [`MergeFunction`] sees it: the encoded value and its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MergingEntry<'a> {
    /// The encoded value (decode it with [`MergingEntry::decode`]).
    pub value: &'a [u8],
    /// When the entry was last written, in milliseconds since the Unix epoch, by the clock of
    /// the primary that wrote it.
    pub updated_ms: u64,
    /// How often the entry was read on its primary since it was written (counted only for maps
    /// with eviction, `max_idle` or the [`MergePolicy::HigherHits`] policy; at most 65 535).
    pub hits: u32,
    /// When the entry expires, in milliseconds since the Unix epoch (0: never).
    pub expires_at_ms: u64,
}

impl MergingEntry<'_> {
    /// The value decoded as the map's value type.
    pub fn decode<V: serde::de::DeserializeOwned>(&self) -> crate::Result<V> {
        crate::codec::decode(self.value)
    }
}

/// What a merge keeps for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergeOutcome {
    /// The larger side's entry stays as it is (or the key stays absent).
    KeepExisting,
    /// The smaller side's entry replaces it, with its value and expiry.
    TakeMerging,
    /// This encoded value is stored (see [`MergeOutcome::value`] to encode one), with the
    /// merging entry's expiry.
    Value(Bytes),
    /// The key is removed.
    Remove,
}

impl MergeOutcome {
    /// An outcome that stores `value`, encoded as the map encodes values.
    pub fn value<V: serde::Serialize + ?Sized>(value: &V) -> crate::Result<Self> {
        crate::codec::encode(value).map(MergeOutcome::Value)
    }
}

/// A user-defined merge policy (see [`MergePolicy::Custom`]). It runs on the key's primary in the
/// larger side, once per merging entry, under the partition's write lock: keep it quick and
/// free of I/O. Every member must configure the same policy for the map.
pub trait MergeFunction: Send + Sync + 'static {
    /// Decides what `key` of `map` holds after the merge. `existing` is the larger side's entry
    /// (`None` if it has none), `merging` the smaller side's.
    fn merge(
        &self,
        map: &str,
        key: &[u8],
        existing: Option<&MergingEntry<'_>>,
        merging: &MergingEntry<'_>,
    ) -> MergeOutcome;
}

/// How a map's entries from the smaller side of a healed split are merged (in
/// [`crate::MapConfig::merge_policy`]), like Hazelcast's merge policies. Only keys the smaller
/// side holds are looked at; keys only the larger side holds stay as they are.
///
/// # What happens when a split heals
///
/// While split, each side declares the other down and goes on as a cluster of its own (AP, like
/// Hazelcast), unless a structure has [`crate::SplitBrainProtection`]. SWIM does not reconnect
/// the sides by itself: a member ignores the members it saw declared down until the merge
/// protocol says otherwise. Instead, the coordinator (oldest member) of each side sends a probe,
/// every [`crate::GridConfig::split_brain_probe_interval`], to the configured seeds and to the
/// members it saw go down in the last `swim.remove_down_after`, and any member answers a probe
/// with its view: its coordinator, its size and its members. Two views with different
/// coordinators whose senders do not see each other are two clusters. If they have no member in
/// common, the smaller one (fewer members; on a tie, the one whose coordinator is younger)
/// merges into the larger one; if some members appear in both (they still see both sides, as a
/// heal that comes while failure detection ends leaves them), sizes count those members twice
/// and each side differently, so the side with fewer members of its own (listed by it alone)
/// merges, and on a tie the side whose coordinator is younger: decisions both sides reach
/// alike. The verdict must hold, for the same coordinator, for a probe interval.
///
/// The merging side's coordinator orders each of its members to merge, then merges itself. A
/// merging member:
/// 1. stops leading anything (its table is emptied, so every operation on it is re-routed), and
///    captures the entries, queue items and lock fences of every partition copy it holds, the
///    ones it led and its backups' (the tables of a cluster that merges away need not agree on
///    who leads what: a partition whose new primary missed its promotion was captured by
///    nobody);
/// 2. drops every partition copy, renews its identity (a new generation, so it is the youngest
///    member and never the coordinator of the merged cluster) and joins the larger side through
///    the members that answered its probe, ignoring its old side from then on;
/// 3. once it has the larger side's table, hands what it captured to the new primaries: each
///    map entry through the map's [`MergePolicy`], decided by the key's primary (in batches per
///    partition and map; a key handed over from several copies of a partition is applied
///    once, by its newest version, or at one version the primary's copy); each queue
///    item appended to its queue (deduplicated by its offer token, so a retry appends once);
///    each lock's fence, so the merged lock's next token is above every token either side
///    handed out. Locks held on the merging side are dropped: their holders' `unlock` answers
///    [`crate::Error::LockLost`].
///
/// Nothing the merging side acknowledged is dropped silently: what a policy keeps out is its
/// decision, and entries that could not be handed over are retried until the member stops.
/// Limits: while a member hands over (about a second for a hundred thousand entries), its
/// entries are not visible in the merged cluster yet; a merging member that crashes before it
/// handed everything over loses the rest (it was the only copy left of its side); and entries
/// the smaller side deleted during the split come back if the larger side still has them.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum MergePolicy {
    /// The smaller side's entry is added only where the larger side has none. The default: no
    /// write acknowledged by the larger side is overwritten.
    #[default]
    PutIfAbsent,
    /// The entry written last wins (by `updated_ms`, from the writers' clocks; a tie keeps the
    /// larger side's). Clock skew between members decides close races.
    LatestUpdate,
    /// The entry read more often on its primary wins (a tie keeps the larger side's). Turns on
    /// read counting for the map.
    HigherHits,
    /// The smaller side's entry always wins.
    PassThrough,
    /// The smaller side's entries are dropped.
    Discard,
    /// A policy of your own.
    Custom(Arc<dyn MergeFunction>),
}

impl std::fmt::Debug for MergePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MergePolicy::PutIfAbsent => "PutIfAbsent",
            MergePolicy::LatestUpdate => "LatestUpdate",
            MergePolicy::HigherHits => "HigherHits",
            MergePolicy::PassThrough => "PassThrough",
            MergePolicy::Discard => "Discard",
            MergePolicy::Custom(_) => "Custom(..)",
        })
    }
}

impl PartialEq for MergePolicy {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (MergePolicy::Custom(a), MergePolicy::Custom(b)) => Arc::ptr_eq(a, b),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl MergePolicy {
    /// What `key` holds after merging `merging` into `existing`.
    pub(crate) fn decide(
        &self,
        map: &str,
        key: &[u8],
        existing: Option<&MergingEntry<'_>>,
        merging: &MergingEntry<'_>,
    ) -> MergeOutcome {
        let Some(existing) = existing else {
            return match self {
                MergePolicy::Discard => MergeOutcome::KeepExisting,
                MergePolicy::Custom(f) => f.merge(map, key, None, merging),
                _ => MergeOutcome::TakeMerging,
            };
        };
        let take_if = |take: bool| {
            if take {
                MergeOutcome::TakeMerging
            } else {
                MergeOutcome::KeepExisting
            }
        };
        match self {
            MergePolicy::PutIfAbsent | MergePolicy::Discard => MergeOutcome::KeepExisting,
            MergePolicy::LatestUpdate => take_if(merging.updated_ms > existing.updated_ms),
            MergePolicy::HigherHits => take_if(merging.hits > existing.hits),
            MergePolicy::PassThrough => MergeOutcome::TakeMerging,
            MergePolicy::Custom(f) => f.merge(map, key, Some(existing), merging),
        }
    }

    /// Whether the policy needs reads counted on the primary.
    pub(crate) fn counts_hits(&self) -> bool {
        matches!(self, MergePolicy::HigherHits | MergePolicy::Custom(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &[u8], updated_ms: u64, hits: u32) -> MergingEntry<'_> {
        MergingEntry {
            value,
            updated_ms,
            hits,
            expires_at_ms: 0,
        }
    }

    struct Concat;
    impl MergeFunction for Concat {
        fn merge(
            &self,
            _map: &str,
            _key: &[u8],
            existing: Option<&MergingEntry<'_>>,
            merging: &MergingEntry<'_>,
        ) -> MergeOutcome {
            let mut both = existing.map_or_else(Vec::new, |e| e.value.to_vec());
            both.extend_from_slice(merging.value);
            MergeOutcome::Value(Bytes::from(both))
        }
    }

    #[test]
    fn each_policy_decides_as_documented() {
        let old = entry(b"big", 100, 5);
        let newer_less_read = entry(b"small", 200, 1);
        let older_more_read = entry(b"small", 50, 9);
        let tie = entry(b"tie", 100, 0);
        use MergeOutcome::*;
        let cases: Vec<(
            MergePolicy,
            Option<&MergingEntry>,
            &MergingEntry,
            MergeOutcome,
        )> = vec![
            (
                MergePolicy::PutIfAbsent,
                None,
                &newer_less_read,
                TakeMerging,
            ),
            (
                MergePolicy::PutIfAbsent,
                Some(&old),
                &newer_less_read,
                KeepExisting,
            ),
            (
                MergePolicy::LatestUpdate,
                Some(&old),
                &newer_less_read,
                TakeMerging,
            ),
            (
                MergePolicy::LatestUpdate,
                Some(&old),
                &older_more_read,
                KeepExisting,
            ),
            (MergePolicy::LatestUpdate, Some(&old), &tie, KeepExisting),
            (
                MergePolicy::HigherHits,
                Some(&old),
                &older_more_read,
                TakeMerging,
            ),
            (
                MergePolicy::HigherHits,
                Some(&old),
                &newer_less_read,
                KeepExisting,
            ),
            (MergePolicy::HigherHits, None, &newer_less_read, TakeMerging),
            (
                MergePolicy::PassThrough,
                Some(&old),
                &older_more_read,
                TakeMerging,
            ),
            (MergePolicy::Discard, None, &newer_less_read, KeepExisting),
            (
                MergePolicy::Discard,
                Some(&old),
                &newer_less_read,
                KeepExisting,
            ),
            (
                MergePolicy::Custom(Arc::new(Concat)),
                Some(&old),
                &newer_less_read,
                Value(Bytes::from_static(b"bigsmall")),
            ),
            (
                MergePolicy::Custom(Arc::new(Concat)),
                None,
                &newer_less_read,
                Value(Bytes::from_static(b"small")),
            ),
        ];
        for (policy, existing, merging, expected) in cases {
            assert_eq!(
                policy.decide("m", b"k", existing, merging),
                expected,
                "{policy:?} {existing:?} {merging:?}"
            );
        }
    }
}
