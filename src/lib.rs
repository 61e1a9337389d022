//! peergrid: an embeddable, peer-to-peer, in-memory data grid.
//!
//! An application calls [`Grid::join`] and its process becomes an equal member of a cluster:
//! members find each other by SWIM gossip over UDP, talk gRPC to each other, and each holds a
//! share of the partitions of the distributed maps (primary and backup copies).
//!
//! ```no_run
//! # async fn demo() -> peergrid::Result<()> {
//! use peergrid::{Grid, GridConfig};
//!
//! // With the defaults, processes on one machine find each other on ports 5701 and up.
//! let grid = Grid::join(GridConfig::default()).await?;
//! for member in grid.members() {
//!     println!("{} {} local={}", member.id, member.name, member.is_local);
//! }
//! grid.leave().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! In the order a map operation flows, then the parts underneath:
//!
//! - `grid`: [`Grid`], which binds the sockets, owns every background task, and hands out the
//!   typed handles. `config` holds [`GridConfig`], [`MapConfig`] and [`SwimConfig`].
//! - `map`: [`Map`], the typed handle (keys and values encoded at the edge by `codec`: strings and
//!   bytes raw, everything else postcard), and `map::ops`, the owner-side operations, each a
//!   value decided purely from the entry's current record. `map::near` is the near cache (L1)
//!   with its invalidation streams and repair round, `map::listen` the entry listeners, and
//!   `map::stats` the per-map counters.
//! - `lock`: [`Lock`] and [`LockGuard`], the fenced lock, and the per-key locks of
//!   [`Map::lock`]: `lock::state`, the pure state machine (holds, fence, lease, FIFO waiters), and
//!   `lock::owner`, the primary's side, which keeps each lock's state as an entry of an internal
//!   map (replicated and migrated like any entry) and sweeps leases and gone holders.
//! - `routing`: key to partition to primary from the current table; the local fast path or a
//!   gRPC call; `NotOwner` refresh and bounded retry.
//! - `partition`: `partition::key` (XXH3-64 of the key's bytes with Redis-style hash tags),
//!   `partition::assignment` (the pure member-set-to-table function: bounded-load consistent
//!   hashing over the `hashring` crate), `partition::migration` (the pure planning of each step
//!   from the current table toward the target: promotion of first live backups after a crash,
//!   copy-then-commit moves, a bound on parallel migrations), `partition::table` (versioned
//!   tables and their holder), `partition::coordinator` (the oldest member publishes each step
//!   once the last one settled, and leaves departing members out), [`PartitionEvent`] and
//!   [`PartitionStats`].
//! - `node`: the owner side of the data path: ownership checks, sequencing, replication hand-off,
//!   and the takeover of partitions when the table changes.
//! - `store`: per-partition record stores (reads take no partition lock), each map's entries in
//!   `store::entries` (one allocation per entry in a dense slab behind a hash index);
//!   `store::expiry`, the bounded sweep of expired entries;
//!   `store::replication`, the ordered primary-to-backup stream with gap resync;
//!   `store::snapshot`, consistent partition copies streamed in chunks and staged before they
//!   replace anything (the one path every kind of partition state migrates by); and
//!   `store::anti_entropy`, the periodic primary-to-backup comparison that repairs drift.
//! - `split_brain`: network splits. `split_brain::quorum` checks [`SplitBrainProtection`]
//!   (`Error::QuorumNotPresent`); `split_brain::discovery` is the cluster view coordinators
//!   exchange in probe datagrams and the pure decision of which cluster merges into which;
//!   `split_brain::merge` is the merging member's capture, rejoin and hand-over, and the
//!   primary's side of a merged entry under the map's [`MergePolicy`].
//! - `membership`: SWIM membership with foca. `membership::driver` is the one task that owns
//!   the `Foca` value, the UDP socket and the ordered timer queue (`membership::timers`);
//!   `membership::frame` is the datagram header (magic, version, cluster hash, key id, sender
//!   instance, counter, clock) and its sealing and opening;
//!   `membership::identity` is what foca gossips about a member.
//! - `rpc`: member-to-member gRPC from `proto/peergrid.proto`: `rpc::server` and `rpc::client`
//!   (one lazily connected channel per peer, deadlines, size limits, and the mapping of failures
//!   onto [`Error`]). Every call passes an interceptor that checks the cluster credential; TLS
//!   and mutual TLS come from [`TlsConfig`].
//! - `security`: the cluster [`Secret`] at work ([`SecurityConfig`]): HKDF-derived key ids,
//!   gossip keys and rpc credentials, datagram tags, the replay window, and loading TLS files.
//! - `fuzzing` (feature `fuzzing` and tests only): every decoder of network input, for the
//!   cargo-fuzz targets in `fuzz/` and the property test CI runs.
//! - `client`: [`Client`], a connection to a cluster from outside it (cluster status and map
//!   operations on raw bytes through any member's `Status` and `ClientMap` rpcs), what the
//!   `peergrid` command in `src/bin/peergrid/` uses; `metrics` has [`Metrics`] and the
//!   `/metrics` and `/health` listener.
//! - `events`: [`EventStream`], the stream type of membership and partition events.
//! - `fault`: [`FaultSwitch`], which cuts gossip and rpc links between chosen members for
//!   failure tests. `error`: [`Error`] and [`ConfigError`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod codec;
mod config;
mod error;
mod events;
mod fault;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod grid;
mod lock;
mod map;
mod membership;
mod metrics;
mod node;
mod partition;
mod queue;
mod routing;
mod rpc;
mod security;
mod split_brain;
mod store;

pub use client::{Client, ClientConfig, ClusterStatus, MemberStatus};
pub use config::{
    DEFAULT_PORT, EvictionConfig, EvictionPolicy, GridConfig, LockConfig, MapConfig,
    NearCacheConfig, QueueConfig, QuorumOn, Secret, SecurityConfig, SplitBrainProtection,
    SwimConfig, TlsConfig, peergrid_env_vars,
};
pub use error::{ConfigError, Error, Result};
pub use events::EventStream;
pub use fault::FaultSwitch;
pub use grid::{Grid, PartitionTableView, ReplicaState};
pub use lock::{Lock, LockGuard, LockHolder};
pub use map::Map;
pub use map::listen::{EntryEvent, EntryEventKind};
pub use map::stats::MapStats;
pub use membership::{DatagramStats, Member, MemberId, MembershipEvent, MembershipEvents};
pub use metrics::{Latency, Metrics};
pub use partition::{PartitionEvent, PartitionStats};
pub use queue::{ItemEvent, Queue};
pub use split_brain::merge::SplitBrainStats;
pub use split_brain::{MergeFunction, MergeOutcome, MergePolicy, MergingEntry};

/// Compiles the README's code blocks as doc tests, so the embedding example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
