//! Per-partition record stores and the replication log.
//!
//! Every partition holds its maps as concurrent hash maps: reads look an entry up without any
//! partition-wide lock. Mutations take the partition's sequencing lock (a std mutex, held only
//! while an entry changes and its mutation is numbered and queued for the backups, never across
//! an `.await`), so every replica applies a partition's mutations in one order.
//!
//! - [`anti_entropy`]: the periodic primary-to-backup comparison that repairs drift.
//! - [`expiry`]: the bounded background sweep that removes expired entries nobody reads.
//! - [`replication`]: the primary-to-backup stream of sequenced mutations and snapshots.
//! - [`snapshot`]: consistent partition copies, streamed in chunks: the one path by which every
//!   kind of partition state moves between members.

pub(crate) mod anti_entropy;
pub(crate) mod entries;
pub(crate) mod expiry;
pub(crate) mod replication;
pub(crate) mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::rpc::proto;

/// A stored entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) value: Bytes,
    /// Bumped on every update of the entry; replicated with it.
    pub(crate) version: u64,
    /// When the entry expires, in milliseconds since the Unix epoch (0: never). Decided by the
    /// primary and replicated with the entry.
    pub(crate) expires_at_ms: u64,
    /// When the primary last read or wrote the entry, in milliseconds since the Unix epoch (for
    /// LRU eviction). Local to the member: not replicated, not part of the digest.
    pub(crate) last_access_ms: u64,
    /// Reads of the entry on this member since it was written (for LFU eviction). Local.
    pub(crate) hits: u32,
    /// When the entry was last written, in milliseconds since the Unix epoch, by the clock of
    /// the primary that wrote it (for the `LatestUpdate` merge policy). Replicated.
    pub(crate) updated_ms: u64,
}

impl Record {
    /// Whether the entry's time to live has run out at `now_ms`.
    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= now_ms
    }

    /// Whether the entry is gone at `now_ms`: its time to live ran out, or it was not accessed
    /// on this member for `max_idle_ms` (0: no idle limit).
    pub(crate) fn is_dead(&self, now_ms: u64, max_idle_ms: u64) -> bool {
        self.is_expired(now_ms)
            || (max_idle_ms != 0 && self.last_access_ms.saturating_add(max_idle_ms) <= now_ms)
    }
}

impl From<&proto::Record> for Record {
    fn from(record: &proto::Record) -> Self {
        Record {
            value: record.value.clone(),
            version: record.version,
            expires_at_ms: record.expires_at_ms,
            last_access_ms: now_ms(),
            hits: 0,
            updated_ms: record.updated_ms,
        }
    }
}

impl From<&Record> for proto::Record {
    fn from(record: &Record) -> Self {
        proto::Record {
            value: record.value.clone(),
            version: record.version,
            expires_at_ms: record.expires_at_ms,
            updated_ms: record.updated_ms,
        }
    }
}

/// Milliseconds since the Unix epoch on this member's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) use entries::Entries;

/// One partition's data on this member.
pub(crate) struct PartitionData {
    maps: DashMap<Arc<str>, Arc<Entries>>,
    /// The sequence number of the last mutation applied (primary: assigned). Locking it is the
    /// partition's write lock.
    seq: Mutex<u64>,
    /// Takeovers in progress (this member, newly primary, pulling the partition from a previous
    /// replica); operations wait until there are none. A count, so an older takeover that ends
    /// cannot release a newer one.
    pending: AtomicU32,
    /// Bumped whenever the contents change other than by this member's own operations as
    /// primary (a snapshot installed, replicated mutations applied, the copy dropped, a takeover
    /// started or ended): state derived from the contents (a queue's index) is rebuilt when it
    /// was built under another epoch.
    epoch: std::sync::atomic::AtomicU64,
    ready: Notify,
    /// Whether this member holds a copy of the partition: set when data arrives (a snapshot, or
    /// replicated mutations from sequence 1) or when it starts the partition as its first owner;
    /// cleared when it drops its copy. A member without one must not serve the partition to a new
    /// primary (an empty snapshot would replace real data), nor keep it as a promoted backup.
    has_copy: AtomicBool,
    /// The lineage of this copy: drawn when the partition starts empty (a cluster's first
    /// table, or every replica lost) and carried by every copy made from it (snapshots,
    /// promotions). Two copies of one lineage hold the same history up to where they diverged;
    /// a merge uses it to tell a partition the larger side kept from one it started afresh.
    lineage: std::sync::atomic::AtomicU64,
    /// Synchronous mutations a backup did not store (declared down, or the partition moved):
    /// a read barrier compares it before and after a read (see [`crate::node::Node`]).
    unconfirmed: std::sync::atomic::AtomicU64,
    /// The `unconfirmed` count up to which a snapshot reached every backup since.
    confirmed: std::sync::atomic::AtomicU64,
}

impl PartitionData {
    fn new() -> Self {
        PartitionData {
            maps: DashMap::new(),
            seq: Mutex::new(0),
            pending: AtomicU32::new(0),
            epoch: std::sync::atomic::AtomicU64::new(0),
            ready: Notify::new(),
            has_copy: AtomicBool::new(false),
            lineage: std::sync::atomic::AtomicU64::new(0),
            unconfirmed: std::sync::atomic::AtomicU64::new(0),
            confirmed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many synchronous mutations of this partition a backup did not store so far.
    pub(crate) fn unconfirmed(&self) -> u64 {
        self.unconfirmed.load(Ordering::Acquire)
    }

    /// Counts a synchronous mutation a backup did not store.
    pub(crate) fn note_unconfirmed(&self) {
        self.unconfirmed.fetch_add(1, Ordering::AcqRel);
    }

    /// The `unconfirmed` count up to which every backup has since installed a snapshot: below
    /// [`Self::unconfirmed`], this copy may hold writes that are on this member alone.
    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    /// Records that every backup installed a snapshot taken after `unconfirmed` was counted.
    pub(crate) fn confirm(&self, unconfirmed: u64) {
        self.confirmed.fetch_max(unconfirmed, Ordering::AcqRel);
    }

    /// This copy's lineage (0: none yet).
    pub(crate) fn lineage(&self) -> u64 {
        self.lineage.load(Ordering::Acquire)
    }

    /// Takes `lineage` (a source's whose copy matches this one) if this copy has none yet.
    pub(crate) fn adopt_lineage(&self, lineage: u64) {
        let _ = self
            .lineage
            .compare_exchange(0, lineage, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Starts a new lineage: the partition starts empty here.
    pub(crate) fn start_lineage(&self) {
        let mut lineage = 0;
        while lineage == 0 {
            lineage = rand::random::<u64>();
        }
        self.lineage.store(lineage, Ordering::Release);
    }

    /// The entries of `map`, if the partition has any.
    pub(crate) fn entries(&self, map: &str) -> Option<Arc<Entries>> {
        self.maps.get(map).map(|e| e.value().clone())
    }

    /// Every map of the partition with its entries (cloned handles; no guard is kept).
    pub(crate) fn maps(&self) -> Vec<(Arc<str>, Arc<Entries>)> {
        self.maps
            .iter()
            .map(|m| (m.key().clone(), m.value().clone()))
            .collect()
    }

    /// The entries of `map`, created empty if missing.
    pub(crate) fn entries_or_create(&self, map: &str) -> Arc<Entries> {
        if let Some(entries) = self.entries(map) {
            return entries;
        }
        self.maps
            .entry(Arc::from(map))
            .or_insert_with(|| Arc::new(Entries::new()))
            .value()
            .clone()
    }

    /// Takes the write lock. The guard derefs to the last sequence number.
    pub(crate) fn lock(&self) -> MutexGuard<'_, u64> {
        self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one replicated change (the caller holds the write lock).
    pub(crate) fn apply_change(&self, mutation: &proto::Mutation) {
        use proto::mutation::Change;
        match &mutation.change {
            Some(Change::Upsert(record)) => {
                self.entries_or_create(&mutation.map)
                    .insert(&mutation.key, &Record::from(record));
            }
            Some(Change::Remove(_)) => {
                if let Some(entries) = self.entries(&mutation.map) {
                    entries.remove(&mutation.key);
                }
            }
            Some(Change::Clear(_)) => {
                self.maps.remove(mutation.map.as_str());
            }
            None => {}
        }
    }

    /// Number of entries of `map`.
    #[cfg(test)]
    pub(crate) fn len(&self, map: &str) -> usize {
        self.entries(map).map_or(0, |e| e.len())
    }

    /// Number of entries of `map` that are not dead at `now_ms` (see [`Record::is_dead`]).
    pub(crate) fn live_len(&self, map: &str, now_ms: u64, max_idle_ms: u64) -> usize {
        self.entries(map).map_or(0, |e| {
            let mut live = 0;
            e.for_each(|r| live += usize::from(!r.is_dead(now_ms, max_idle_ms)));
            live
        })
    }

    /// Waits until the partition is not pending.
    pub(crate) async fn ready(&self) {
        loop {
            let notified = self.ready.notified();
            if !self.is_pending() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// A takeover starts: operations wait until it ends.
    /// See the field.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn begin_takeover(&self) {
        self.bump_epoch();
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// A takeover ends (pulled, or given up).
    pub(crate) fn end_takeover(&self) {
        self.bump_epoch();
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before <= 1 {
            self.ready.notify_waiters();
        }
    }

    /// Whether this member holds a copy of the partition (see the field).
    pub(crate) fn has_copy(&self) -> bool {
        self.has_copy.load(Ordering::Acquire)
    }

    /// Raises the sequence number to at least `floor`, for a partition lost and started afresh.
    pub(crate) fn raise_seq(&self, floor: u64) {
        let mut seq = self.lock();
        if *seq < floor {
            *seq = floor;
        }
    }

    /// Records that this member's (possibly empty) contents are the partition's: it is the first
    /// owner of a new partition, or the last hope of a lost one.
    pub(crate) fn claim_copy(&self) {
        self.has_copy.store(true, Ordering::Release);
    }

    /// The sequence number, entry count and digest of this copy (see
    /// [`Store::replica_state`]).
    pub(crate) fn state(&self) -> (u64, u64, u64) {
        let seq = self.lock();
        let mut digest = 0u64;
        let mut entries = 0u64;
        for map in self.maps.iter() {
            entries += map.value().len() as u64;
            map.value().for_each(|entry| {
                digest = digest.wrapping_add(snapshot::stored_digest(map.key(), entry));
            });
        }
        (*seq, entries, digest)
    }
}

/// Every partition's data on this member.
pub(crate) struct Store {
    partitions: Box<[PartitionData]>,
}

/// A replicated batch did not continue the partition's sequence.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Gap;

impl Store {
    pub(crate) fn new(partition_count: u32) -> Self {
        Store {
            partitions: (0..partition_count).map(|_| PartitionData::new()).collect(),
        }
    }

    /// The partition's data; `None` for an id out of range (from a peer with another count).
    pub(crate) fn partition(&self, partition: u32) -> Option<&PartitionData> {
        self.partitions.get(partition as usize)
    }

    /// A consistent copy of the partition with the sequence number it reflects.
    pub(crate) fn snapshot(&self, partition: u32) -> Option<snapshot::Snapshot> {
        let data = self.partition(partition)?;
        let seq = data.lock();
        let mut snapshot = snapshot::Snapshot::take(partition, *seq, &data.maps);
        snapshot.lineage = data.lineage();
        Some(snapshot)
    }

    /// Replaces the partition's contents with a received snapshot.
    pub(crate) fn install(&self, staged: snapshot::Staged) -> bool {
        let Some(data) = self.partition(staged.header.partition) else {
            return false;
        };
        let mut seq = data.lock();
        data.bump_epoch();
        data.maps.clear();
        for (name, entries) in staged.maps {
            data.maps.insert(Arc::from(name), Arc::new(entries));
        }
        data.has_copy.store(true, Ordering::Release);
        data.lineage.store(staged.header.lineage, Ordering::Release);
        *seq = staged.header.seq;
        true
    }

    /// Applies a primary's mutations in sequence order. Already applied ones are skipped; a
    /// mutation beyond the next expected number is a gap, and the partition needs a snapshot.
    ///
    /// `lineage` is the primary's copy's. A copy without one takes it: the copy follows that
    /// primary's history from its first mutation on (a backup of a partition that started
    /// empty never gets a snapshot). A copy of another lineage holds another history whose
    /// sequence numbers mean other mutations: that is a gap too.
    pub(crate) fn apply_replicated(
        &self,
        partition: u32,
        lineage: u64,
        mutations: &[proto::Mutation],
    ) -> Result<(), Gap> {
        let data = self.partition(partition).ok_or(Gap)?;
        let mut seq = data.lock();
        let here = data.lineage();
        if lineage != 0 && here != 0 && here != lineage {
            return Err(Gap);
        }
        data.bump_epoch();
        if lineage != 0 && here == 0 {
            data.lineage.store(lineage, Ordering::Release);
        }
        for mutation in mutations {
            if mutation.seq <= *seq {
                continue;
            }
            if mutation.seq != *seq + 1 {
                return Err(Gap);
            }
            data.has_copy.store(true, Ordering::Release);
            data.apply_change(mutation);
            *seq = mutation.seq;
        }
        Ok(())
    }

    /// How many partitions are pending (being taken over).
    pub(crate) fn pending_count(&self) -> usize {
        self.partitions.iter().filter(|p| p.is_pending()).count()
    }

    /// The partition's sequence number, entry count, and an order-independent digest of every
    /// map name, key, value and version: two replicas with equal answers hold the same data.
    pub(crate) fn replica_state(&self, partition: u32) -> Option<(u64, u64, u64)> {
        Some(self.partition(partition)?.state())
    }

    /// Forgets the partition (this member no longer holds a replica of it).
    pub(crate) fn drop_partition(&self, partition: u32) {
        if let Some(data) = self.partition(partition) {
            let mut seq = data.lock();
            data.bump_epoch();
            // Even an empty copy: served to a new primary, it would replace real data.
            data.has_copy.store(false, Ordering::Release);
            data.lineage.store(0, Ordering::Release);
            data.maps.clear();
            *seq = 0;
        }
    }

    /// The partition's last sequence number.
    #[cfg(test)]
    pub(crate) fn seq(&self, partition: u32) -> u64 {
        self.partition(partition).map_or(0, |d| *d.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::mutation::Change;

    fn upsert(seq: u64, key: &'static str, value: &'static str) -> proto::Mutation {
        proto::Mutation {
            seq,
            map: "m".into(),
            key: Bytes::from_static(key.as_bytes()),
            change: Some(Change::Upsert(proto::Record {
                expires_at_ms: 0,
                value: Bytes::from_static(value.as_bytes()),
                version: seq,
                updated_ms: 0,
            })),
        }
    }

    #[test]
    fn replicated_mutations_apply_in_order_and_gaps_are_reported() {
        let store = Store::new(4);
        assert_eq!(
            store.apply_replicated(1, 0, &[upsert(1, "a", "1"), upsert(2, "b", "2")]),
            Ok(())
        );
        // A duplicate is skipped; the next one applies.
        assert_eq!(
            store.apply_replicated(1, 0, &[upsert(2, "b", "x"), upsert(3, "a", "3")]),
            Ok(())
        );
        assert_eq!(store.seq(1), 3);
        let entries = store.partition(1).unwrap().entries("m").unwrap();
        assert_eq!(&entries.get(&b"b"[..]).unwrap().value[..], b"2");
        assert_eq!(&entries.get(&b"a"[..]).unwrap().value[..], b"3");
        assert_eq!(
            store.apply_replicated(1, 0, &[upsert(5, "c", "5")]),
            Err(Gap)
        );
        assert_eq!(store.seq(1), 3);
        assert_eq!(
            store.apply_replicated(99, 0, &[upsert(1, "c", "5")]),
            Err(Gap)
        );
    }

    #[test]
    fn a_backup_copy_takes_its_primarys_lineage_and_refuses_another() {
        let store = Store::new(2);
        let data = store.partition(0).unwrap();
        assert_eq!(data.lineage(), 0);
        assert_eq!(store.apply_replicated(0, 7, &[upsert(1, "a", "1")]), Ok(()));
        assert_eq!(data.lineage(), 7);
        // Another history: its sequence numbers mean other mutations.
        assert_eq!(
            store.apply_replicated(0, 8, &[upsert(2, "b", "2")]),
            Err(Gap)
        );
        assert_eq!(store.seq(0), 1);
        assert_eq!(store.apply_replicated(0, 7, &[upsert(2, "b", "2")]), Ok(()));
        store.drop_partition(0);
        assert_eq!(data.lineage(), 0);
    }

    #[test]
    fn snapshots_install_exactly() {
        let primary = Store::new(2);
        primary
            .apply_replicated(0, 0, &[upsert(1, "a", "1"), upsert(2, "b", "2")])
            .unwrap();
        let backup = Store::new(2);
        backup
            .apply_replicated(0, 0, &[upsert(1, "z", "stale")])
            .unwrap();
        let mut staging = snapshot::Staging::default();
        for chunk in primary.snapshot(0).unwrap().chunks(1, 1) {
            staging.push(chunk).unwrap();
        }
        assert!(backup.install(staging.finish().unwrap()));
        assert_eq!(backup.replica_state(0), primary.replica_state(0));
        assert_eq!(backup.partition(0).unwrap().len("m"), 2);
        assert!(backup.partition(0).unwrap().has_copy());
        assert_eq!(backup.seq(0), 2);
        backup.drop_partition(0);
        assert_eq!(backup.seq(0), 0);
        assert_eq!(backup.partition(0).unwrap().len("m"), 0);
        assert!(!backup.partition(0).unwrap().has_copy());
    }
}
