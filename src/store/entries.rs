//! One map's entries in one partition, stored compactly.
//!
//! Each entry is one heap allocation holding its metadata, key and value, and the table holds
//! a 4-byte position per slot (see `examples/memory.rs` for the figures: a map of `Bytes` keys
//! to records paid 155 bytes of overhead per entry for a 16-byte key and a 100-byte value). Reads copy the value out; writes build a new allocation. The table is
//! behind one read-write lock (a std lock, held only for a lookup or an update, never across an
//! `.await`); partitions are the shards.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hashbrown::HashTable;

use super::Record;

/// Estimated memory of one entry beyond its key and value bytes: the allocation's metadata and
/// header, and the table slot (measured by `examples/memory.rs`).
pub(crate) const ENTRY_OVERHEAD: u64 = 77;

/// The estimated memory of an entry with this key and value.
pub(crate) fn entry_size(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + ENTRY_OVERHEAD
}

/// Access times are stored as milliseconds since this instant (2020-01-01 UTC) in 5 bytes:
/// enough until 2054.
const ACCESS_EPOCH_MS: u64 = 1_577_836_800_000;
const ACCESS_MAX: u64 = (1 << 40) - 1;
/// `[last access: 5 bytes][hits: u16]`, then varints.
const FIXED: usize = 7;

/// One stored entry, one allocation: `[last access, 5 bytes LE][hits u16 LE][key length varint]
/// [version varint][expires_at_ms varint][last update varint: ms since 2020, 0 unknown][key]
/// [value]`. Varints keep the common case small: for a 16-byte key and a 100-byte value with a
/// time to live the whole entry is 137 bytes, which the allocator serves from its 144-byte size
/// class.
pub(crate) struct Stored(Box<[u8]>);

/// Where the parts of a stored entry are.
struct Layout {
    version: u64,
    expires_at_ms: u64,
    updated_ms: u64,
    key: std::ops::Range<usize>,
}

impl Stored {
    fn new(key: &[u8], record: &Record) -> Self {
        use prost::encoding::encoded_len_varint;
        let len = FIXED
            + encoded_len_varint(key.len() as u64)
            + encoded_len_varint(record.version)
            + encoded_len_varint(record.expires_at_ms)
            + encoded_len_varint(record.updated_ms.saturating_sub(ACCESS_EPOCH_MS))
            + key.len()
            + record.value.len();
        let mut data = Vec::with_capacity(len);
        let access = record
            .last_access_ms
            .saturating_sub(ACCESS_EPOCH_MS)
            .min(ACCESS_MAX);
        data.extend_from_slice(&access.to_le_bytes()[..5]);
        data.extend_from_slice(&u16::try_from(record.hits).unwrap_or(u16::MAX).to_le_bytes());
        prost::encoding::encode_varint(key.len() as u64, &mut data);
        prost::encoding::encode_varint(record.version, &mut data);
        prost::encoding::encode_varint(record.expires_at_ms, &mut data);
        prost::encoding::encode_varint(
            record.updated_ms.saturating_sub(ACCESS_EPOCH_MS),
            &mut data,
        );
        data.extend_from_slice(key);
        data.extend_from_slice(&record.value);
        Stored(data.into_boxed_slice())
    }

    fn layout(&self) -> Layout {
        let mut rest = &self.0[FIXED..];
        let total = rest.len();
        // Written by `new`: the varints are well formed.
        let mut varint = || prost::encoding::decode_varint(&mut rest).unwrap_or(0);
        let key_len = varint() as usize;
        let version = varint();
        let expires_at_ms = varint();
        let updated = varint();
        let start = FIXED + total - rest.len();
        Layout {
            version,
            expires_at_ms,
            updated_ms: if updated == 0 {
                0
            } else {
                updated + ACCESS_EPOCH_MS
            },
            key: start..start + key_len,
        }
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.0[self.layout().key]
    }

    pub(crate) fn value(&self) -> &[u8] {
        &self.0[self.layout().key.end..]
    }

    pub(crate) fn version(&self) -> u64 {
        self.layout().version
    }

    pub(crate) fn expires_at_ms(&self) -> u64 {
        self.layout().expires_at_ms
    }

    pub(crate) fn last_access_ms(&self) -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..5].copy_from_slice(&self.0[..5]);
        u64::from_le_bytes(bytes) + ACCESS_EPOCH_MS
    }

    pub(crate) fn hits(&self) -> u32 {
        u32::from(u16::from_le_bytes([self.0[5], self.0[6]]))
    }

    /// See [`Record::is_dead`].
    pub(crate) fn is_dead(&self, now_ms: u64, max_idle_ms: u64) -> bool {
        let expires = self.expires_at_ms();
        (expires != 0 && expires <= now_ms)
            || (max_idle_ms != 0 && self.last_access_ms().saturating_add(max_idle_ms) <= now_ms)
    }

    /// The entry as an owned record (the value copied out).
    pub(crate) fn record(&self) -> Record {
        let layout = self.layout();
        Record {
            value: Bytes::copy_from_slice(&self.0[layout.key.end..]),
            version: layout.version,
            expires_at_ms: layout.expires_at_ms,
            last_access_ms: self.last_access_ms(),
            hits: self.hits(),
            updated_ms: layout.updated_ms,
        }
    }

    fn touch(&mut self, now_ms: u64) {
        let access = now_ms.saturating_sub(ACCESS_EPOCH_MS).min(ACCESS_MAX);
        let hits = u16::try_from(self.hits())
            .unwrap_or(u16::MAX)
            .saturating_add(1);
        self.0[..5].copy_from_slice(&access.to_le_bytes()[..5]);
        self.0[5..7].copy_from_slice(&hits.to_le_bytes());
    }

    fn size(&self) -> u64 {
        let key = self.layout().key;
        entry_size(&self.0[key.clone()], &self.0[key.end..])
    }
}

/// The index's hash: seeded per process, so keys that collide cannot be computed in advance (the
/// index never leaves the process; partitions use the fixed key hash).
fn hash(key: &[u8]) -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    xxhash_rust::xxh3::xxh3_64_with_seed(key, *SEED.get_or_init(rand::random))
}

/// The entries and their index: the hash table holds 4-byte positions into `slots` (a slot of 5
/// bytes with its control byte, where a boxed slice would take 17), and `slots` holds the entries
/// densely (removal moves the last one into the hole).
#[derive(Default)]
struct Table {
    index: HashTable<u32>,
    slots: Vec<Stored>,
}

impl Table {
    fn position(&self, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash(key), |&i| slots[i as usize].key() == key)
            .map(|&i| i as usize)
    }
}

/// One map's entries in one partition, with their estimated memory kept up to date by every
/// insertion and removal.
#[derive(Default)]
pub(crate) struct Entries {
    table: RwLock<Table>,
    bytes: AtomicU64,
}

impl Entries {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of entries (dead ones included until they are removed).
    pub(crate) fn len(&self) -> usize {
        self.read().slots.len()
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The estimated memory of the entries: key and value bytes plus [`ENTRY_OVERHEAD`] each.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The entry of `key`, copied out.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Record> {
        let table = self.read();
        table.position(key).map(|i| table.slots[i].record())
    }

    /// The entry of `key`, copied out, counting a read of it (last access and hits) unless it is
    /// dead at `now_ms`.
    pub(crate) fn get_tracked(&self, key: &[u8], now_ms: u64, max_idle_ms: u64) -> Option<Record> {
        let mut table = self.write();
        let i = table.position(key)?;
        let stored = &mut table.slots[i];
        if !stored.is_dead(now_ms, max_idle_ms) {
            stored.touch(now_ms);
        }
        Some(stored.record())
    }

    /// Stores `record` under `key`, replacing any entry.
    pub(crate) fn insert(&self, key: &[u8], record: &Record) {
        let stored = Stored::new(key, record);
        let added = stored.size();
        let mut table = self.write();
        let removed = match table.position(key) {
            Some(i) => std::mem::replace(&mut table.slots[i], stored).size(),
            None => {
                let Table { index, slots } = &mut *table;
                let Ok(position) = u32::try_from(slots.len()) else {
                    // Four billion entries in one partition: refuse rather than corrupt.
                    tracing::error!("a partition map is full (u32::MAX entries)");
                    return;
                };
                slots.push(stored);
                index.insert_unique(hash(key), position, |&i| hash(slots[i as usize].key()));
                0
            }
        };
        drop(table);
        self.adjust(added, removed);
    }

    /// Removes `key`; returns its entry.
    pub(crate) fn remove(&self, key: &[u8]) -> Option<Record> {
        let removed = {
            let mut table = self.write();
            let Table { index, slots } = &mut *table;
            let entry = index
                .find_entry(hash(key), |&i| slots[i as usize].key() == key)
                .ok()?;
            let (position, _) = entry.remove();
            let removed = slots.swap_remove(position as usize);
            // The last entry moved into the hole: point its index slot there.
            if let Some(moved) = slots.get(position as usize) {
                let last = slots.len() as u32;
                if let Some(slot) = index.find_mut(hash(moved.key()), |&i| i == last) {
                    *slot = position;
                }
            }
            if slots.capacity() > 64 && slots.len() < slots.capacity() / 4 {
                slots.shrink_to(slots.len() * 2);
                index.shrink_to(slots.len() * 2, |&i| hash(slots[i as usize].key()));
            }
            removed
        };
        self.adjust(0, removed.size());
        Some(removed.record())
    }

    fn adjust(&self, added: u64, removed: u64) {
        if added >= removed {
            self.bytes.fetch_add(added - removed, Ordering::Relaxed);
        } else {
            let less = removed - added;
            let _ = self
                .bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(less))
                });
        }
    }

    /// Calls `f` with every entry, under the read lock: `f` must not use these entries.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Stored)) {
        for stored in &self.read().slots {
            f(stored);
        }
    }

    /// Up to `take` entries other than `keep`, starting at position `skip`, with their rank.
    pub(crate) fn sample<R: Ord>(
        &self,
        skip: usize,
        take: usize,
        keep: &[u8],
        rank: impl Fn(&Stored) -> R,
    ) -> Vec<(Bytes, R)> {
        let table = self.read();
        table
            .slots
            .get(skip..)
            .unwrap_or_default()
            .iter()
            .filter(|s| s.key() != keep)
            .take(take)
            .map(|s| (Bytes::copy_from_slice(s.key()), rank(s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &'static str, version: u64) -> Record {
        Record {
            value: Bytes::from_static(value.as_bytes()),
            version,
            expires_at_ms: 77,
            last_access_ms: ACCESS_EPOCH_MS + 5,
            hits: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn entries_store_replace_and_remove_whole_records_and_count_their_bytes() {
        let entries = Entries::new();
        assert!(entries.is_empty() && entries.get(b"k").is_none());
        entries.insert(b"k", &record("one", 1));
        entries.insert(b"other", &record("", 1));
        assert_eq!(entries.get(b"k"), Some(record("one", 1)));
        assert_eq!(entries.bytes(), 1 + 3 + 5 + 2 * ENTRY_OVERHEAD);
        entries.insert(b"k", &record("three", 2));
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries.get(b"k").unwrap().value,
            Bytes::from_static(b"three")
        );
        assert_eq!(entries.bytes(), 1 + 5 + 5 + 2 * ENTRY_OVERHEAD);
        // A tracked read counts, unless the entry is dead.
        let read = entries.get_tracked(b"k", 50, 0).unwrap();
        assert_eq!((read.last_access_ms, read.hits), (ACCESS_EPOCH_MS, 1));
        let dead = entries.get_tracked(b"k", 100, 0).unwrap();
        assert_eq!(dead.hits, 1, "expired at 77");
        let t = ACCESS_EPOCH_MS + 123_456_789;
        entries.insert(
            b"t",
            &Record {
                last_access_ms: t,
                hits: 70_000,
                ..record("x", 300)
            },
        );
        let stored = entries.get(b"t").unwrap();
        assert_eq!(
            (stored.last_access_ms, stored.hits, stored.version),
            (t, 65_535, 300)
        );
        assert_eq!(stored.expires_at_ms, 77);
        entries.remove(b"t");
        assert_eq!(entries.remove(b"k").unwrap().version, 2);
        assert!(entries.remove(b"k").is_none());
        assert_eq!(entries.bytes(), 5 + ENTRY_OVERHEAD);
        let mut keys = Vec::new();
        entries.for_each(|s| keys.push(s.key().to_vec()));
        assert_eq!(keys, vec![b"other".to_vec()]);
        assert!(entries.sample(0, 16, b"other", |s| s.version()).is_empty());
    }

    #[test]
    fn removals_keep_the_index_consistent_with_the_moved_entries() {
        let entries = Entries::new();
        let key = |i: u32| format!("key-{i}").into_bytes();
        for i in 0..1000 {
            entries.insert(&key(i), &record("v", u64::from(i)));
        }
        // Remove in an order that moves entries around, and shrinks the storage.
        for i in (0..1000)
            .filter(|i| i % 3 != 0)
            .chain((0..1000).filter(|i| i % 3 == 0 && i % 2 == 0))
        {
            assert_eq!(
                entries.remove(&key(i)).map(|r| r.version),
                Some(u64::from(i))
            );
        }
        let left: Vec<u32> = (0..1000).filter(|i| i % 3 == 0 && i % 2 != 0).collect();
        assert_eq!(entries.len(), left.len());
        for i in 0..1000 {
            assert_eq!(
                entries.get(&key(i)).map(|r| r.version),
                left.contains(&i).then_some(u64::from(i)),
                "key {i}"
            );
        }
        let expected: u64 = left.iter().map(|&i| entry_size(&key(i), b"v")).sum();
        assert_eq!(entries.bytes(), expected);
    }
}
