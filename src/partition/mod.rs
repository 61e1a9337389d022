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
