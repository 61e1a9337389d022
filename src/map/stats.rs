//! Per-map statistics of one member, like Hazelcast's local map statistics: what this member
//! served as the primary of the map's keys, and what it holds.

use std::sync::atomic::{AtomicU64, Ordering};

/// One map's statistics on one member, from [`crate::Map::local_stats`].
///
/// Operation counts are of the operations this member executed as the primary of their key
/// (whichever member the caller was on), since this member started. Entry counts and sizes are
/// of what it holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapStats {
    /// Reads (`get`, `contains_key`, and the reads of `get_all`).
    pub gets: u64,
    /// Reads that found a live entry.
    pub hits: u64,
    /// Reads that found none (or an expired one).
    pub misses: u64,
    /// Writes that stored a value.
    pub puts: u64,
    /// Removals of an entry by `remove` or `delete`.
    pub removes: u64,
    /// Entries removed because they expired (found by an operation or by the sweep).
    pub expirations: u64,
    /// Entries evicted to keep the map within its size limit.
    pub evictions: u64,
    /// Live entries in the partitions this member leads.
    pub owned_entries: u64,
    /// Entries in the partitions this member backs up.
    pub backup_entries: u64,
    /// Key and value bytes of the owned entries (payload only, no overhead).
    pub owned_bytes: u64,
}

impl MapStats {
    /// Hits over gets; `None` before the first get.
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.gets > 0).then(|| self.hits as f64 / self.gets as f64)
    }
}

/// The counters behind [`MapStats`], one set per map name.
#[derive(Default)]
pub(crate) struct MapCounters {
    pub(crate) gets: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) puts: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) expirations: AtomicU64,
    pub(crate) evictions: AtomicU64,
}

impl MapCounters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> MapStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MapStats {
            gets: get(&self.gets),
            hits: get(&self.hits),
            misses: get(&self.misses),
            puts: get(&self.puts),
            removes: get(&self.removes),
            expirations: get(&self.expirations),
            evictions: get(&self.evictions),
            ..MapStats::default()
        }
    }
}
