//! Partitions: which partition a key is in, and which members hold each partition.
//!
//! - [`key`]: key bytes to partition id (XXH3-64 with Redis-style hash tags).
//! - [`assignment`]: the pure member-set-to-replica-sets function (bounded-load consistent
//!   hashing over the `hashring` crate).
//! - [`migration`]: pure planning of the steps from the current table to the target (promotion
//!   after a crash, copy-then-commit moves, a bound on parallel migrations).
//! - [`table`]: a versioned table of replica sets and the holder every component reads it from.
//! - [`coordinator`]: the task by which the oldest member computes and publishes tables.

pub(crate) mod assignment;
pub(crate) mod coordinator;
pub(crate) mod key;
pub(crate) mod migration;
pub(crate) mod table;

use crate::membership::MemberId;

/// A change in where a partition's data lives, as seen by this member, from
/// [`crate::Grid::partition_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartitionEvent {
    /// This member became the partition's primary and started taking it over from `from`, the
    /// previous primary (operations on the partition wait until it finishes).
    MigrationStarted {
        /// The partition.
        partition: u32,
        /// Its previous primary, if known.
        from: Option<MemberId>,
    },
    /// The takeover finished; this member serves the partition.
    MigrationFinished {
        /// The partition.
        partition: u32,
    },
    /// Every previous replica of the partition is gone: its data is lost and it starts empty on
    /// this member. Also logged at error level.
    Lost {
        /// The partition.
        partition: u32,
    },
}

/// Counters of this member's part in migrations and repairs since it started, from
/// [`crate::Grid::partition_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// Takeovers this member started (it became a partition's primary after another member).
    pub migrations_started: u64,
    /// Takeovers this member finished.
    pub migrations_finished: u64,
    /// Partitions this member took over whose every replica was gone (see
    /// [`PartitionEvent::Lost`]).
    pub partitions_lost: u64,
    /// Key and value bytes this member pulled from previous primaries (whole-partition copies;
    /// a takeover that found its copy current pulls nothing).
    pub migration_bytes_received: u64,
    /// Key and value bytes this member streamed to new primaries.
    pub migration_bytes_sent: u64,
    /// Key and value bytes of the snapshots this member, as primary, installed on backups (new
    /// replicas, resyncs after a gap, repairs).
    pub backup_snapshot_bytes_sent: u64,
    /// Backups that anti-entropy found drifted from this member's copy and repaired.
    pub anti_entropy_repairs: u64,
}
