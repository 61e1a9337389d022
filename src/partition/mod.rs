//! Partitions: which partition a key is in, and which members hold each partition.
//!
//! - [`key`]: key bytes to partition id (XXH3-64 with Redis-style hash tags).
//! - [`assignment`]: the pure member-set-to-replica-sets function (bounded-load consistent
//!   hashing over the `hashring` crate).

pub(crate) mod assignment;
pub(crate) mod key;
