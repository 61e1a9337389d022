//! Partitions: which partition a key is in, and which members hold each partition.
//!
//! - [`key`]: key bytes to partition id (XXH3-64 with Redis-style hash tags).
//! - [`assignment`]: the pure member-set-to-replica-sets function (bounded-load consistent
//!   hashing over the `hashring` crate).
//! - [`table`]: a versioned table of replica sets and the holder every component reads it from.
//! - [`coordinator`]: the task by which the oldest member computes and publishes tables.

pub(crate) mod assignment;
pub(crate) mod coordinator;
pub(crate) mod key;
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
