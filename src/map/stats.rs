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
    /// Estimated memory of the owned entries: payload plus a fixed per-entry overhead estimate;
    /// what [`crate::EvictionConfig::max_bytes_per_member`] limits.
    pub owned_memory_bytes: u64,
    /// Reads this member's near cache answered (counted on the reading member, not in `gets`).
    pub near_cache_hits: u64,
    /// Reads of keys led by another member that the near cache could not answer.
    pub near_cache_misses: u64,
    /// Entries in this member's near cache.
    pub near_cache_entries: u64,
    /// Near-cache entries evicted to keep it within its size limit.
    pub near_cache_evictions: u64,
    /// Near-cache entries dropped because they (or their time in the near cache) expired.
    pub near_cache_expirations: u64,
    /// Near-cache entries dropped by an invalidation (a write here or on the key's primary).
    pub near_cache_invalidations: u64,
    /// Times the near cache dropped a whole partition: an invalidation was lost (a gap in the
    /// sequence, or found by the repair round), the partition was cleared, or it changed primary.
    pub near_cache_partitions_dropped: u64,
}

impl MapStats {
    /// Takes the near cache's figures.
    pub(crate) fn add_near_cache(&mut self, n: &crate::map::near::NearStats) {
        self.near_cache_hits = n.hits;
        self.near_cache_misses = n.misses;
        self.near_cache_entries = n.entries;
        self.near_cache_evictions = n.evictions;
        self.near_cache_expirations = n.expirations;
        self.near_cache_invalidations = n.invalidations;
        self.near_cache_partitions_dropped = n.partitions_dropped;
    }

    /// Adds `other`'s figures to these (a map's figures summed over members).
    pub(crate) fn add(&mut self, other: &MapStats) {
        let MapStats {
            gets,
            hits,
            misses,
            puts,
            removes,
            expirations,
            evictions,
            owned_entries,
            backup_entries,
            owned_bytes,
            owned_memory_bytes,
            near_cache_hits,
            near_cache_misses,
            near_cache_entries,
            near_cache_evictions,
            near_cache_expirations,
            near_cache_invalidations,
            near_cache_partitions_dropped,
        } = *other;
        self.gets = self.gets.saturating_add(gets);
        self.hits = self.hits.saturating_add(hits);
        self.misses = self.misses.saturating_add(misses);
        self.puts = self.puts.saturating_add(puts);
        self.removes = self.removes.saturating_add(removes);
        self.expirations = self.expirations.saturating_add(expirations);
        self.evictions = self.evictions.saturating_add(evictions);
        self.owned_entries = self.owned_entries.saturating_add(owned_entries);
        self.backup_entries = self.backup_entries.saturating_add(backup_entries);
        self.owned_bytes = self.owned_bytes.saturating_add(owned_bytes);
        self.owned_memory_bytes = self.owned_memory_bytes.saturating_add(owned_memory_bytes);
        self.near_cache_hits = self.near_cache_hits.saturating_add(near_cache_hits);
        self.near_cache_misses = self.near_cache_misses.saturating_add(near_cache_misses);
        self.near_cache_entries = self.near_cache_entries.saturating_add(near_cache_entries);
        self.near_cache_evictions = self
            .near_cache_evictions
            .saturating_add(near_cache_evictions);
        self.near_cache_expirations = self
            .near_cache_expirations
            .saturating_add(near_cache_expirations);
        self.near_cache_invalidations = self
            .near_cache_invalidations
            .saturating_add(near_cache_invalidations);
        self.near_cache_partitions_dropped = self
            .near_cache_partitions_dropped
            .saturating_add(near_cache_partitions_dropped);
    }

    /// Hits over gets; `None` before the first get.
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.gets > 0).then(|| self.hits as f64 / self.gets as f64)
    }

    /// Near-cache hits over near-cache lookups; `None` before the first lookup.
    pub fn near_cache_hit_ratio(&self) -> Option<f64> {
        let lookups = self.near_cache_hits + self.near_cache_misses;
        (lookups > 0).then(|| self.near_cache_hits as f64 / lookups as f64)
    }
}

/// The counters behind [`MapStats`], one set per map name.
pub(crate) struct MapCounters {
    /// Per partition: changes this member made as primary, numbered for near-cache invalidation
    /// (see `map::near`).
    pub(crate) invalidations: Box<[AtomicU64]>,
    pub(crate) gets: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) puts: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) expirations: AtomicU64,
    pub(crate) evictions: AtomicU64,
}

impl MapCounters {
    pub(crate) fn new(partition_count: u32) -> Self {
        MapCounters {
            invalidations: (0..partition_count).map(|_| AtomicU64::new(0)).collect(),
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The next invalidation number of `partition` (the caller holds its write lock).
    pub(crate) fn next_invalidation(&self, partition: u32) -> u64 {
        self.invalidations
            .get(partition as usize)
            .map_or(0, |c| c.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Every partition's last invalidation number.
    pub(crate) fn invalidation_state(&self) -> Vec<u64> {
        self.invalidations
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

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
