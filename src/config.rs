//! Member configuration: [`GridConfig`] and its SWIM timings, [`SwimConfig`].
//!
//! `GridConfig::default()` is the embedded case on one machine: bind 127.0.0.1, take the first
//! free port from 5701 upward for both gossip (UDP) and rpc (TCP), and use 127.0.0.1:5701-5705 as
//! seeds, so processes started with no settings at all find each other, as Hazelcast's do.
//! [`GridConfig::from_env`] starts from the defaults and applies `PEERGRID_*` variables.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::error::ConfigError;
use crate::fault::FaultSwitch;
use crate::split_brain::MergePolicy;

/// The first port of the default port range (Hazelcast's, too).
pub const DEFAULT_PORT: u16 = 5701;

/// Configuration of one member. Build it with struct update syntax from `GridConfig::default()`,
/// or with [`GridConfig::from_env`].
///
/// ```
/// use peergrid::GridConfig;
/// let config = GridConfig {
///     cluster_name: "orders".into(),
///     ..GridConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct GridConfig {
    /// Name of the cluster. Members only talk to members with the same name: every datagram carries
    /// a hash of it and every rpc call carries it. 1 to 64 bytes. Default `"peergrid"`.
    /// Environment: `PEERGRID_CLUSTER_NAME`.
    pub cluster_name: String,

    /// Human-readable name of this member, shown by `members()` and in logs. At most 64 bytes.
    /// Default: `None`, which names the member after its advertised gossip address.
    /// Environment: `PEERGRID_MEMBER_NAME`.
    pub member_name: Option<String>,

    /// Where the gossip (SWIM, UDP) socket binds. Port 0 picks an ephemeral port (tests do this).
    /// Default `127.0.0.1:5701`. Environment: `PEERGRID_GOSSIP_BIND` (or `PEERGRID_BIND` for a host
    /// used by both sockets).
    pub gossip_bind: SocketAddr,

    /// Where the rpc (gRPC, TCP) listener binds. Port 0 picks an ephemeral port. Default
    /// `127.0.0.1:5701` (TCP and UDP ports are separate, so both sockets share the number).
    /// Environment: `PEERGRID_RPC_BIND`.
    pub rpc_bind: SocketAddr,

    /// The gossip address peers use to reach this member. Default `None`: the bound address, which
    /// must then not be a wildcard (0.0.0.0 or ::). Environment: `PEERGRID_GOSSIP_ADVERTISE`.
    pub gossip_advertise: Option<SocketAddr>,

    /// The rpc address peers use to reach this member. Default `None`: the bound address, which
    /// must then not be a wildcard. Environment: `PEERGRID_RPC_ADVERTISE`.
    pub rpc_advertise: Option<SocketAddr>,

    /// How many consecutive ports to try, from the configured bind port upward, when a port is taken
    /// (Hazelcast's port auto-increment). With the default bind port both sockets take the same
    /// number. 1 means "exactly the configured port". Ignored for port 0. Must not be zero.
    /// Default 100. Environment: `PEERGRID_PORT_COUNT`.
    pub port_count: u16,

    /// Gossip addresses of members to contact when joining. This member's own address is skipped.
    /// Default `127.0.0.1:5701` to `127.0.0.1:5705`. An empty list starts a new cluster at once.
    /// Environment: `PEERGRID_SEEDS`, comma-separated `host:port` (an empty value means no seeds).
    pub seeds: Vec<SocketAddr>,

    /// How long [`crate::Grid::join`] waits for a seed to answer before it starts alone (a
    /// one-member cluster is valid; it keeps probing the seeds in the background, and merges
    /// with the cluster it finds, the smaller into the larger, see [`MergePolicy`]). Default 2 s.
    /// Environment: `PEERGRID_JOIN_TIMEOUT_MS`.
    pub join_timeout: Duration,

    /// How often a member that sees no peers and holds no cluster's table yet announces itself
    /// to the seeds again. A member that holds a table (it started alone, or was cut off) finds
    /// other clusters by the coordinator's probes instead (see
    /// [`GridConfig::split_brain_probe_interval`]). Default 1 s. Must not be zero.
    pub seed_retry_interval: Duration,

    /// Number of partitions the key space is divided into. The same for every member of a
    /// cluster. 1 to [`Self::MAX_PARTITIONS`]. Default 271 (as Hazelcast and Olric).
    /// Environment: `PEERGRID_PARTITIONS`.
    pub partition_count: u32,

    /// Number of backup copies of each partition, besides the primary. At most
    /// [`Self::MAX_BACKUPS`]. Default 1. Environment: `PEERGRID_BACKUPS`.
    pub backup_count: u8,

    /// SWIM failure-detector timings. Default [`SwimConfig::default`], tuned for a LAN.
    pub swim: SwimConfig,

    /// Deadline of every member-to-member rpc call. Default 5 s. Must not be zero.
    /// Environment: `PEERGRID_RPC_TIMEOUT_MS`.
    pub rpc_timeout: Duration,

    /// Deadline for opening a TCP connection to a peer. Default 1 s. Must not be zero.
    pub rpc_connect_timeout: Duration,

    /// Largest gossip datagram produced or accepted, in bytes, headers included. Keep it below the
    /// network's MTU. 512 to 65,000. Default 1400.
    pub max_datagram_size: usize,

    /// A switch that cuts gossip and rpc traffic between chosen members, for failure tests. Members
    /// that share one switch obey it. Default `None` (no filtering, no cost).
    pub fault_switch: Option<FaultSwitch>,

    /// How long [`crate::Grid::leave`] waits for this member's partitions to be handed off to
    /// other members before it leaves anyway. Default 30 s. Must not be zero.
    pub leave_timeout: Duration,

    /// How many partitions may be migrating at once (copied to a new replica, or handed to a new
    /// primary). The coordinator moves the table toward its target in steps of at most this many
    /// partitions and starts the next step when every member finished the last. Like Hazelcast's
    /// `hazelcast.partition.max.parallel.migrations`. At least 1. Default 16.
    /// `PEERGRID_MAX_PARALLEL_MIGRATIONS`.
    pub max_parallel_migrations: usize,

    /// Target size of one chunk of a partition copy stream (migrations and backup snapshots), in
    /// bytes: neither side ever holds more than about one chunk of a transfer in a message. A
    /// chunk holds at least one entry. 1 KiB to 64 MiB. Default 1 MiB.
    /// `PEERGRID_SNAPSHOT_CHUNK_SIZE`.
    pub snapshot_chunk_size: usize,

    /// How often each primary compares every backup's copy of its partitions (sequence number
    /// plus digest) and sends a fresh snapshot to a backup that drifted. Must not be zero.
    /// Default 10 s. `PEERGRID_ANTI_ENTROPY_INTERVAL_MS`.
    pub anti_entropy_interval: Duration,

    /// Largest encoded map value, in bytes. Larger values are refused with
    /// [`crate::Error::TooLarge`] before anything is sent. 1 byte to 256 MiB. Default 16 MiB.
    pub max_value_size: usize,

    /// Largest encoded map key, in bytes. 1 byte to 1 MiB. Default 64 KiB.
    pub max_key_size: usize,

    /// Most keys one [`crate::Map::get_all`] or [`crate::Map::put_all`] call may carry. Larger
    /// calls are refused with [`crate::Error::TooManyKeys`] before anything is sent, and a member
    /// refuses a batch call from a peer that carries more. 1 to 1,000,000. Default 10,000.
    /// `PEERGRID_MAX_BATCH_KEYS`.
    pub max_batch_keys: usize,

    /// Largest gRPC message a member sends or accepts, in bytes. A larger message is refused by
    /// the receiver's transport, which answers with an error and keeps the connection. It must
    /// be at least [`GridConfig::min_rpc_message_size`]: an operation on a maximum-size key and
    /// two maximum-size values (a compare-and-set), and a copy chunk or replication batch topped
    /// by one such entry; a batch that would exceed it is split. Default 64 MiB.
    /// `PEERGRID_MAX_RPC_MESSAGE_SIZE`.
    pub max_rpc_message_size: usize,

    /// Where the HTTP listener for `/metrics` (Prometheus text) and `/health` (200 when the
    /// member is joined and the cluster safe, else 503) binds. Port 0 picks an ephemeral port
    /// ([`crate::Grid::metrics_addr`] tells which). Default `None`: no listener.
    /// `PEERGRID_METRICS_BIND`.
    pub metrics_bind: Option<SocketAddr>,

    /// Who may talk to this member: the cluster secret that authenticates gossip datagrams and
    /// rpc calls, and TLS for rpc. Default: no secret and no TLS, which is only safe while the
    /// member binds loopback (the default). See [`SecurityConfig`].
    pub security: SecurityConfig,

    /// How often the coordinator of a cluster probes the seeds and the members it saw go down
    /// (within `swim.remove_down_after`) for another cluster of the same name: the other side of
    /// a network split that healed. Two clusters that find each other merge, the smaller into
    /// the larger (see [`MergePolicy`]), two probe rounds after they met. Must
    /// not be zero. Default 1 s. `PEERGRID_SPLIT_BRAIN_PROBE_INTERVAL_MS`.
    pub split_brain_probe_interval: Duration,

    /// Per-map settings, by map name or a pattern with one `*` (`"session*"`); the first match
    /// wins, then a `"*"` entry, then [`MapConfig::default`]. Default empty.
    pub maps: Vec<(String, MapConfig)>,

    /// Per-queue settings, by queue name or a pattern with one `*`, matched like
    /// [`GridConfig::maps`]. Default empty.
    pub queues: Vec<(String, QueueConfig)>,

    /// Per-lock settings, by lock name or a pattern with one `*`, matched like
    /// [`GridConfig::maps`]. Per-key map locks take the `"*"` entry. Default empty.
    pub locks: Vec<(String, LockConfig)>,
}

/// Split-brain protection of one structure, like Hazelcast's split-brain protection
/// (`quorum`): below `min_cluster_size` live members, the guarded operations fail at once with
/// [`crate::Error::QuorumNotPresent`] instead of serving a side of a network split that may
/// later be merged away.
///
/// The check counts the members it recently heard from, itself included, like Hazelcast's
/// recently-active split-brain protection: with any protection configured, every member sends
/// each peer a heartbeat every [`SwimConfig::heartbeat_interval`], and a peer in the view counts
/// while its last heartbeat is younger than [`SwimConfig::heartbeat_tolerance`]. The caller's
/// member checks before it sends, and the structure's primary checks again before it acts.
///
/// Counting the view alone would leave a window: failure detection takes at least
/// `swim.probe_period + swim.suspect_to_down_after` to declare the other side down, and until
/// then a minority would still count the members it lost and serve, while the majority, once
/// it declares the minority's members down, promotes backups and serves the same partitions.
/// The tolerance is half the shortest detection time, so the minority stops serving before the
/// majority takes over (as a lease does, this assumes no member stalls longer than the margin
/// between the two; a stalled member's heartbeats stop too, and it counts nobody when it
/// wakes). A member that starts alone is below any minimum above 1 until enough members joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitBrainProtection {
    /// Fewest live members for the guarded operations to run. At least 2 (1 would guard
    /// nothing).
    pub min_cluster_size: usize,
    /// Which operations are guarded. Default [`QuorumOn::ReadWrite`].
    pub on: QuorumOn,
}

impl SplitBrainProtection {
    /// Guards reads and writes below `min_cluster_size` members.
    pub fn new(min_cluster_size: usize) -> Self {
        SplitBrainProtection {
            min_cluster_size,
            on: QuorumOn::ReadWrite,
        }
    }

    /// Guards only the given kind of operation.
    pub fn on(self, on: QuorumOn) -> Self {
        SplitBrainProtection { on, ..self }
    }

    /// Whether an operation (`write` or a read) is guarded.
    pub(crate) fn guards(&self, write: bool) -> bool {
        match self.on {
            QuorumOn::Read => !write,
            QuorumOn::Write => write,
            QuorumOn::ReadWrite => true,
        }
    }
}

/// Which operations [`SplitBrainProtection`] guards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QuorumOn {
    /// Reads only: a map's `get`, `contains_key`, `size`, `get_all`; a queue's `peek` and `len`;
    /// a lock's `is_locked` and `holder`.
    Read,
    /// Writes only: everything that changes the structure, including a queue's `poll`, a lock's
    /// `lock` and `unlock`, and the store step of `get_or_load`.
    Write,
    /// Both.
    #[default]
    ReadWrite,
}

/// Settings of one lock (or of the locks a pattern matches), in [`GridConfig::locks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    /// How many times one holder may hold the lock at once (reentry); one more acquire fails
    /// with [`crate::Error::ReentryLimit`]. At least 1. Default 64.
    pub reentry_limit: u32,
    /// Split-brain protection: below its minimum the lock is neither granted nor released
    /// (a lock on a minority side never hands out a token). Default `None`.
    pub split_brain_protection: Option<SplitBrainProtection>,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            reentry_limit: 64,
            split_brain_protection: None,
        }
    }
}

/// Settings of one queue (or of the queues a pattern matches), in [`GridConfig::queues`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most items the queue holds; `offer` fails (returns `false`) and `put` waits beyond it.
    /// 0: unbounded. Default 0.
    pub capacity: u64,
    /// How many backups an operation waits for: at most [`GridConfig::backup_count`]. Default
    /// `None`: all of them.
    pub backup_count: Option<u8>,
    /// Split-brain protection. Default `None`.
    pub split_brain_protection: Option<SplitBrainProtection>,
}

/// Settings of one map (or of the maps a pattern matches), in [`GridConfig::maps`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapConfig {
    /// How many backups a write waits for: at most [`GridConfig::backup_count`], which is how many
    /// copies exist. Default `None`: all of them.
    pub backup_count: Option<u8>,
    /// Whether writes return before the backups acknowledge (faster; a write can be lost if the
    /// primary crashes right after it). Default `false`: writes wait for the backups.
    pub async_backups: bool,
    /// Time to live of entries written without one of their own (`put`, `set`, `put_all`,
    /// `put_if_absent`, `replace`): the entry expires this long after its last write. Default
    /// `None`: entries never expire unless written with a time to live.
    pub ttl: Option<std::time::Duration>,
    /// How the map stays within a size limit. Default: no limit.
    pub eviction: EvictionConfig,
    /// Entries not read or written for this long expire. Access is tracked by the key's
    /// primary only, so after a failover an entry's idle time starts again on the new primary.
    /// Default `None`: no idle limit.
    pub max_idle: Option<std::time::Duration>,
    /// Probabilistic early refresh for [`crate::Map::get_or_load`]: in the last `early_refresh`
    /// of an entry's time to live, each `get_or_load` of it may be chosen (with a probability
    /// growing from 0 to 1 across the window) to run its loader and store the new value, while
    /// every other caller keeps getting the current value; one refresh per key at a time in the
    /// whole cluster. Hot keys are then replaced before they expire, and nobody waits for their
    /// reload. Default `None`: entries are reloaded only once they expired.
    pub early_refresh: Option<std::time::Duration>,
    /// A near cache (L1) of this map on this member: recently read entries of remote partitions
    /// kept in process, invalidated by their primaries. Default `None`: no near cache.
    pub near_cache: Option<NearCacheConfig>,
    /// Split-brain protection of the map and of its per-key locks. Default `None`.
    pub split_brain_protection: Option<SplitBrainProtection>,
    /// How this map's entries from the smaller side of a healed network split are merged into
    /// the larger side's. Default [`MergePolicy::PutIfAbsent`].
    pub merge_policy: MergePolicy,
}

/// A map's near cache on one member (in [`MapConfig::near_cache`]), like Hazelcast's.
///
/// A `get` of a key whose primary is another member keeps the value it got; later reads of that
/// key are answered from process memory until the entry is invalidated, expires or is evicted.
/// The key's primary pushes invalidations (batched) on every update, removal, expiry, eviction
/// and clear. Invalidations carry per-partition sequence numbers; a lost one is found at the
/// next invalidation of its partition or by the repair round, and the partition's cached entries
/// are dropped. See `map::near` for the staleness bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearCacheConfig {
    /// Most entries the near cache holds. Default 10 000.
    pub max_entries: usize,
    /// Which entry goes when the near cache is full. [`EvictionPolicy::None`]: nothing is evicted
    /// and new entries are not cached while it is full. Default [`EvictionPolicy::Lru`].
    pub eviction: EvictionPolicy,
    /// Entries are dropped this long after they were cached (and never kept beyond the entry's
    /// own expiry). Default `None`.
    pub ttl: Option<std::time::Duration>,
    /// Entries not read for this long are dropped. Default `None`.
    pub max_idle: Option<std::time::Duration>,
    /// How often the near cache compares the invalidations it received with each member's
    /// sequence numbers to find lost ones: a lost invalidation is found within two intervals.
    /// Must not be zero. Default 1 s.
    pub repair_interval: std::time::Duration,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        NearCacheConfig {
            max_entries: 10_000,
            eviction: EvictionPolicy::Lru,
            ttl: None,
            max_idle: None,
            repair_interval: std::time::Duration::from_secs(1),
        }
    }
}

impl MapConfig {
    /// [`MapConfig::max_idle`] in milliseconds, 0 for none.
    pub(crate) fn max_idle_ms(&self) -> u64 {
        self.max_idle.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        })
    }
}

/// A map's size limit and the policy that keeps it (in [`MapConfig::eviction`]).
///
/// The limits are per member, over the entries it leads (as Hazelcast's `PER_NODE` and
/// `USED_HEAP_SIZE`), and are enforced per partition: a partition may hold the member's limit
/// divided by the number of partitions the member leads (at least one entry). A write that takes
/// a partition beyond either limit evicts the entries the policy picks, each among a random
/// sample of the partition's entries, never the entry being written; evictions are replicated to
/// the backups like removals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionConfig {
    /// Which entries go first. Default [`EvictionPolicy::None`]: nothing is evicted.
    pub policy: EvictionPolicy,
    /// Most entries one member leads for this map. `None`: no limit.
    pub max_entries_per_member: Option<u64>,
    /// Most estimated memory of the entries one member leads for this map, in bytes: each entry
    /// counts its key and value bytes plus a fixed estimate of its overhead (77 bytes, measured
    /// by the memory benchmark). `None`: no limit.
    pub max_bytes_per_member: Option<u64>,
}

/// Which entry an eviction removes, among a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EvictionPolicy {
    /// No eviction: the limit is not enforced.
    #[default]
    None,
    /// Least recently used (read or written) first.
    Lru,
    /// Least frequently read first (ties: least recently used).
    Lfu,
}

impl GridConfig {
    /// Largest allowed backup count.
    pub const MAX_BACKUPS: u8 = 6;
    /// Largest allowed partition count.
    pub const MAX_PARTITIONS: u32 = 65_536;
    /// How many ports of the default range serve as default seeds.
    pub const DEFAULT_SEED_COUNT: u16 = 5;

    /// A configuration for tests and for processes that pick their own ports: binds 127.0.0.1 with
    /// ephemeral ports (port 0) and has no seeds.
    pub fn ephemeral() -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        GridConfig {
            gossip_bind: any,
            rpc_bind: any,
            seeds: Vec::new(),
            ..GridConfig::default()
        }
    }

    /// Checks every field and returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster_name.is_empty() || self.cluster_name.len() > 64 {
            return Err(ConfigError::ClusterName(self.cluster_name.len()));
        }
        if let Some(name) = &self.member_name
            && name.len() > 64
        {
            return Err(ConfigError::MemberName(name.len()));
        }
        if self.partition_count == 0 || self.partition_count > Self::MAX_PARTITIONS {
            return Err(ConfigError::PartitionCount {
                got: self.partition_count,
                max: Self::MAX_PARTITIONS,
            });
        }
        if self.backup_count > Self::MAX_BACKUPS {
            return Err(ConfigError::BackupCount {
                got: self.backup_count,
                max: Self::MAX_BACKUPS,
            });
        }
        check_bind("gossip_bind", self.gossip_bind, self.gossip_advertise)?;
        check_bind("rpc_bind", self.rpc_bind, self.rpc_advertise)?;
        for (field, addr) in [
            ("gossip_advertise", self.gossip_advertise),
            ("rpc_advertise", self.rpc_advertise),
        ] {
            if let Some(addr) = addr {
                if addr.ip().is_unspecified() {
                    return Err(ConfigError::Address {
                        field,
                        addr,
                        reason: "a wildcard address cannot be advertised",
                    });
                }
                if addr.port() == 0 {
                    return Err(ConfigError::Address {
                        field,
                        addr,
                        reason: "an advertised address needs a port",
                    });
                }
            }
        }
        for seed in &self.seeds {
            if seed.ip().is_unspecified() || seed.port() == 0 {
                return Err(ConfigError::Address {
                    field: "seeds",
                    addr: *seed,
                    reason: "a seed needs a concrete address and port",
                });
            }
        }
        if self.port_count == 0 {
            return Err(ConfigError::Range {
                field: "port_count",
                reason: "must not be zero",
            });
        }
        for (field, value) in [
            ("join_timeout", self.join_timeout),
            ("seed_retry_interval", self.seed_retry_interval),
            ("rpc_timeout", self.rpc_timeout),
            ("rpc_connect_timeout", self.rpc_connect_timeout),
            ("leave_timeout", self.leave_timeout),
            ("anti_entropy_interval", self.anti_entropy_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Range {
                    field,
                    reason: "must not be zero",
                });
            }
        }
        if !(1 << 10..=64 << 20).contains(&self.snapshot_chunk_size) {
            return Err(ConfigError::Range {
                field: "snapshot_chunk_size",
                reason: "must be 1 KiB to 64 MiB",
            });
        }
        if self.max_parallel_migrations == 0 {
            return Err(ConfigError::Range {
                field: "max_parallel_migrations",
                reason: "must be at least 1",
            });
        }
        if !(512..=65_000).contains(&self.max_datagram_size) {
            return Err(ConfigError::Range {
                field: "max_datagram_size",
                reason: "must be 512 to 65000 bytes",
            });
        }
        if !(1..=256 << 20).contains(&self.max_value_size) {
            return Err(ConfigError::Range {
                field: "max_value_size",
                reason: "must be 1 byte to 256 MiB",
            });
        }
        if !(1..=1 << 20).contains(&self.max_key_size) {
            return Err(ConfigError::Range {
                field: "max_key_size",
                reason: "must be 1 byte to 1 MiB",
            });
        }
        if !(1..=1_000_000).contains(&self.max_batch_keys) {
            return Err(ConfigError::Range {
                field: "max_batch_keys",
                reason: "must be 1 to 1,000,000",
            });
        }
        if self.max_rpc_message_size < self.min_rpc_message_size()
            || self.max_rpc_message_size > 1 << 30
        {
            return Err(ConfigError::Range {
                field: "max_rpc_message_size",
                reason: "must be at most 1 GiB and at least GridConfig::min_rpc_message_size() \
                         (two maximum-size values and a key; a copy chunk or replication batch \
                         with one more entry)",
            });
        }
        self.security.validate()?;
        if self.security.secret.is_none() && !self.security.allow_unauthenticated {
            for (field, addr) in [
                ("gossip_bind", self.gossip_bind),
                ("rpc_bind", self.rpc_bind),
            ] {
                if !addr.ip().is_loopback() {
                    return Err(ConfigError::Address {
                        field,
                        addr,
                        reason: "binding beyond loopback needs a cluster secret \
                                 (security.secret, PEERGRID_SECRET), or \
                                 security.allow_unauthenticated",
                    });
                }
            }
        }
        for (_, queue) in &self.queues {
            if queue.backup_count.is_some_and(|n| n > self.backup_count) {
                return Err(ConfigError::Range {
                    field: "queues.backup_count",
                    reason: "must not exceed the grid's backup_count",
                });
            }
        }
        for (_, map) in &self.maps {
            if map.backup_count.is_some_and(|n| n > self.backup_count) {
                return Err(ConfigError::Range {
                    field: "maps.backup_count",
                    reason: "must not exceed the grid's backup_count",
                });
            }
            if let Some(near) = &map.near_cache {
                if near.max_entries == 0 {
                    return Err(ConfigError::Range {
                        field: "maps.near_cache.max_entries",
                        reason: "must be at least 1",
                    });
                }
                if near.repair_interval.is_zero() {
                    return Err(ConfigError::Range {
                        field: "maps.near_cache.repair_interval",
                        reason: "must not be zero",
                    });
                }
            }
        }
        if self.split_brain_probe_interval.is_zero() {
            return Err(ConfigError::Range {
                field: "split_brain_probe_interval",
                reason: "must not be zero",
            });
        }
        let protections = self
            .maps
            .iter()
            .map(|(_, m)| m.split_brain_protection)
            .chain(self.queues.iter().map(|(_, q)| q.split_brain_protection))
            .chain(self.locks.iter().map(|(_, l)| l.split_brain_protection));
        for protection in protections.flatten() {
            if protection.min_cluster_size < 2 {
                return Err(ConfigError::Range {
                    field: "split_brain_protection.min_cluster_size",
                    reason: "must be at least 2",
                });
            }
        }
        if self.locks.iter().any(|(_, lock)| lock.reentry_limit == 0) {
            return Err(ConfigError::Range {
                field: "locks.reentry_limit",
                reason: "must be at least 1",
            });
        }
        self.swim.validate()
    }

    /// The settings of queue `name`: the first entry of [`Self::queues`] whose name or pattern
    /// matches, else the `"*"` entry, else the defaults.
    pub fn queue_config(&self, name: &str) -> QueueConfig {
        self.queues
            .iter()
            .find(|(pattern, _)| pattern != "*" && matches_pattern(pattern, name))
            .or_else(|| self.queues.iter().find(|(pattern, _)| pattern == "*"))
            .map(|(_, config)| *config)
            .unwrap_or_default()
    }

    /// The settings of lock `name`: the first entry of [`Self::locks`] whose name or pattern
    /// matches, else the `"*"` entry, else the defaults.
    pub fn lock_config(&self, name: &str) -> LockConfig {
        self.locks
            .iter()
            .find(|(pattern, _)| pattern != "*" && matches_pattern(pattern, name))
            .or_else(|| self.locks.iter().find(|(pattern, _)| pattern == "*"))
            .map(|(_, config)| *config)
            .unwrap_or_default()
    }

    /// The settings of map `name`: the first entry of [`Self::maps`] whose name or pattern
    /// matches, else the `"*"` entry, else the defaults. A queue's internal map takes its
    /// queue's backup count and nothing else (no time to live, no eviction, no near cache).
    pub fn map_config(&self, name: &str) -> MapConfig {
        if name == crate::lock::owner::NAMED
            || name == crate::lock::owner::KEYED
            || name == crate::split_brain::merge::MERGED
        {
            // Lock states and merge tokens: every backup waited for (a fence must never be
            // handed out twice), and never evicted, whatever the "*" entry says.
            return MapConfig::default();
        }
        if let Some(queue) = crate::queue::queue_of(name) {
            return MapConfig {
                backup_count: self.queue_config(queue).backup_count,
                ..MapConfig::default()
            };
        }
        self.maps
            .iter()
            .find(|(pattern, _)| pattern != "*" && matches_pattern(pattern, name))
            .or_else(|| self.maps.iter().find(|(pattern, _)| pattern == "*"))
            .map(|(_, config)| config.clone())
            .unwrap_or_default()
    }

    /// Whether any map, queue or lock has split-brain protection.
    pub(crate) fn has_split_brain_protection(&self) -> bool {
        self.maps
            .iter()
            .any(|(_, m)| m.split_brain_protection.is_some())
            || self
                .queues
                .iter()
                .any(|(_, q)| q.split_brain_protection.is_some())
            || self
                .locks
                .iter()
                .any(|(_, l)| l.split_brain_protection.is_some())
    }

    /// Largest gRPC message between members ([`GridConfig::max_rpc_message_size`]).
    pub(crate) fn max_message_size(&self) -> usize {
        self.max_rpc_message_size
    }

    /// The smallest `max_rpc_message_size` that carries every message the other limits allow:
    /// a compare-and-set of a maximum-size key with two maximum-size values, a copy chunk or a
    /// replication batch (up to 4 MiB) topped by one maximum-size entry, plus room for the
    /// message's other fields.
    pub fn min_rpc_message_size(&self) -> usize {
        let entry = self.max_key_size + self.max_value_size;
        let stream = self
            .snapshot_chunk_size
            .max(crate::store::replication::MAX_BATCH_BYTES);
        (entry + self.max_value_size).max(stream + entry) + (64 << 10)
    }

    /// The default configuration with `PEERGRID_*` environment variables applied. See each field
    /// for its variable. Fails with [`ConfigError::Env`] on a value that does not parse; does not
    /// call [`Self::validate`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::default().with_env_vars(peergrid_env_vars()?)
    }

    /// Applies `PEERGRID_*` variables from `vars` to this configuration. Unknown `PEERGRID_*`
    /// names are rejected, so a typo does not pass silently.
    pub fn with_env_vars(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with("PEERGRID_"))
            .collect();
        // PEERGRID_BIND first, so the specific *_BIND variables override it.
        vars.sort_by_key(|(name, _)| name != "PEERGRID_BIND");
        for (name, value) in vars {
            let secret = name.contains("SECRET");
            let bad = |reason: String| ConfigError::Env {
                name: name.clone(),
                value: if secret {
                    "<redacted>".to_string()
                } else {
                    value.clone()
                },
                reason,
            };
            let v = value.trim();
            match name.as_str() {
                "PEERGRID_CLUSTER_NAME" => self.cluster_name = v.to_string(),
                "PEERGRID_MEMBER_NAME" => self.member_name = (!v.is_empty()).then(|| v.to_string()),
                "PEERGRID_BIND" => {
                    let ip: IpAddr = v.parse().map_err(|e| bad(format!("{e}")))?;
                    self.gossip_bind.set_ip(ip);
                    self.rpc_bind.set_ip(ip);
                }
                "PEERGRID_GOSSIP_BIND" => self.gossip_bind = parse_addr(v).map_err(bad)?,
                "PEERGRID_RPC_BIND" => self.rpc_bind = parse_addr(v).map_err(bad)?,
                "PEERGRID_GOSSIP_ADVERTISE" => {
                    self.gossip_advertise = Some(parse_addr(v).map_err(bad)?)
                }
                "PEERGRID_RPC_ADVERTISE" => self.rpc_advertise = Some(parse_addr(v).map_err(bad)?),
                "PEERGRID_PORT_COUNT" => self.port_count = parse_num(v).map_err(bad)?,
                "PEERGRID_SEEDS" => {
                    self.seeds = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(parse_addr)
                        .collect::<Result<_, _>>()
                        .map_err(bad)?
                }
                "PEERGRID_JOIN_TIMEOUT_MS" => {
                    self.join_timeout = Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "PEERGRID_RPC_TIMEOUT_MS" => {
                    self.rpc_timeout = Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "PEERGRID_PARTITIONS" => self.partition_count = parse_num(v).map_err(bad)?,
                "PEERGRID_BACKUPS" => self.backup_count = parse_num(v).map_err(bad)?,
                "PEERGRID_SNAPSHOT_CHUNK_SIZE" => {
                    self.snapshot_chunk_size = parse_num(v).map_err(bad)?
                }
                "PEERGRID_MAX_PARALLEL_MIGRATIONS" => {
                    self.max_parallel_migrations = parse_num(v).map_err(bad)?
                }
                "PEERGRID_SPLIT_BRAIN_PROBE_INTERVAL_MS" => {
                    self.split_brain_probe_interval =
                        Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "PEERGRID_ANTI_ENTROPY_INTERVAL_MS" => {
                    self.anti_entropy_interval = Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "PEERGRID_MAX_VALUE_SIZE" => self.max_value_size = parse_num(v).map_err(bad)?,
                "PEERGRID_MAX_KEY_SIZE" => self.max_key_size = parse_num(v).map_err(bad)?,
                "PEERGRID_MAX_BATCH_KEYS" => self.max_batch_keys = parse_num(v).map_err(bad)?,
                "PEERGRID_MAX_RPC_MESSAGE_SIZE" => {
                    self.max_rpc_message_size = parse_num(v).map_err(bad)?
                }
                "PEERGRID_MAX_DATAGRAM_SIZE" => {
                    self.max_datagram_size = parse_num(v).map_err(bad)?
                }
                "PEERGRID_METRICS_BIND" => {
                    self.metrics_bind = (!v.is_empty())
                        .then(|| parse_addr(v))
                        .transpose()
                        .map_err(bad)?
                }
                "PEERGRID_SECRET" => {
                    self.security.secret = (!v.is_empty()).then(|| Secret::new(v));
                }
                "PEERGRID_ACCEPTED_SECRETS" => {
                    self.security.accepted_secrets = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(Secret::new)
                        .collect();
                }
                "PEERGRID_REPLAY_WINDOW_MS" => {
                    self.security.replay_window = Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "PEERGRID_TLS_CERT" | "PEERGRID_TLS_KEY" | "PEERGRID_TLS_CA" => {
                    let tls = self.security.tls.get_or_insert_with(TlsConfig::default);
                    let path = std::path::PathBuf::from(v);
                    match name.as_str() {
                        "PEERGRID_TLS_CERT" => tls.cert = path,
                        "PEERGRID_TLS_KEY" => tls.key = path,
                        _ => tls.ca = path,
                    }
                }
                "PEERGRID_TLS_MUTUAL" => {
                    self.security
                        .tls
                        .get_or_insert_with(TlsConfig::default)
                        .mutual = parse_bool(v).map_err(bad)?
                }
                "PEERGRID_TLS_SERVER_NAME" => {
                    self.security
                        .tls
                        .get_or_insert_with(TlsConfig::default)
                        .server_name = (!v.is_empty()).then(|| v.to_string())
                }
                // Reserved for the logging setup of binaries, not the member itself.
                "PEERGRID_LOG" => {}
                _ => return Err(bad("unknown PEERGRID_ variable".to_string())),
            }
        }
        Ok(self)
    }

    /// The default seed list: the first [`Self::DEFAULT_SEED_COUNT`] ports of the default range on
    /// 127.0.0.1.
    pub fn default_seeds() -> Vec<SocketAddr> {
        (0..Self::DEFAULT_SEED_COUNT)
            .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT + i))
            .collect()
    }
}

impl Default for GridConfig {
    fn default() -> Self {
        let base = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT);
        GridConfig {
            cluster_name: "peergrid".to_string(),
            member_name: None,
            gossip_bind: base,
            rpc_bind: base,
            gossip_advertise: None,
            rpc_advertise: None,
            port_count: 100,
            seeds: Self::default_seeds(),
            join_timeout: Duration::from_secs(2),
            seed_retry_interval: Duration::from_secs(1),
            partition_count: 271,
            backup_count: 1,
            swim: SwimConfig::default(),
            rpc_timeout: Duration::from_secs(5),
            rpc_connect_timeout: Duration::from_secs(1),
            max_datagram_size: 1400,
            fault_switch: None,
            leave_timeout: Duration::from_secs(30),
            max_parallel_migrations: 16,
            snapshot_chunk_size: 1 << 20,
            anti_entropy_interval: Duration::from_secs(10),
            split_brain_probe_interval: Duration::from_secs(1),
            max_value_size: 16 << 20,
            max_key_size: 64 << 10,
            max_batch_keys: 10_000,
            max_rpc_message_size: 64 << 20,
            security: SecurityConfig::default(),
            metrics_bind: None,
            maps: Vec::new(),
            queues: Vec::new(),
            locks: Vec::new(),
        }
    }
}

fn check_bind(
    field: &'static str,
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    if bind.ip().is_multicast() {
        return Err(ConfigError::Address {
            field,
            addr: bind,
            reason: "cannot bind a multicast address",
        });
    }
    if bind.ip().is_unspecified() && advertise.is_none() {
        return Err(ConfigError::Address {
            field,
            addr: bind,
            reason: "binding a wildcard address needs an advertised address",
        });
    }
    Ok(())
}

/// Whether `name` matches `pattern`: equal, or with one `*` standing for any run of characters.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, suffix)) => {
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
        }
    }
}

/// The process's `PEERGRID_*` variables. Other variables are not looked at, so one that is not
/// UTF-8 does no harm; a `PEERGRID_*` one that is not is an error.
pub fn peergrid_env_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with("PEERGRID_")) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Env {
            name: name.to_string(),
            value: "<not UTF-8>".to_string(),
            reason: "not valid UTF-8".to_string(),
        })?;
        vars.push((name.to_string(), value));
    }
    Ok(vars)
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("not a host:port address: {e}"))?
        .next()
        .ok_or_else(|| "host name resolves to no address".to_string())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

fn parse_num<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

/// Who may talk to a member (in [`GridConfig::security`]). See the README's "Security" section
/// for what each defence covers.
///
/// With a [`Secret`], every gossip datagram carries an HMAC-SHA256 tag (truncated to 128 bits)
/// over its header and payload, under a key derived from the secret and the cluster name, plus
/// the key's id, the sender's instance number, a counter and a timestamp. Datagrams without a
/// valid tag, replayed, or older than [`SecurityConfig::replay_window`] are dropped and
/// counted ([`crate::DatagramStats`]). Every rpc call carries a credential derived the same way,
/// and a call without a valid one is refused with `UNAUTHENTICATED` before its body is read.
///
/// With [`TlsConfig`], rpc runs over TLS (rustls), and with `mutual` only peers that present a
/// certificate signed by the configured CA are served.
///
/// ```
/// use peergrid::{GridConfig, Secret, SecurityConfig};
/// let config = GridConfig {
///     security: SecurityConfig {
///         secret: Some(Secret::new("a long random string nobody guesses")),
///         ..SecurityConfig::default()
///     },
///     ..GridConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// The cluster secret: datagrams and rpc calls are signed with it, and it is accepted.
    /// At least 16 bytes. Default `None`. `PEERGRID_SECRET`.
    pub secret: Option<Secret>,

    /// Further secrets that are accepted but not used to sign, for a rotation without downtime:
    /// (1) add the new secret here on every member, one member at a time; (2) make it `secret`
    /// and the old one accepted, one member at a time; (3) drop the old one. Each datagram names
    /// the key that signed it, so members of both steps understand each other. Needs `secret`.
    /// Default empty. `PEERGRID_ACCEPTED_SECRETS`, comma-separated.
    pub accepted_secrets: Vec<Secret>,

    /// How far a datagram's timestamp may be from the receiver's clock before it is dropped as
    /// a replay; within the window, each datagram is accepted once. The members' clocks must
    /// agree to within this. 1 s to 1 hour. Default 60 s. `PEERGRID_REPLAY_WINDOW_MS`.
    pub replay_window: Duration,

    /// TLS for rpc. Default `None` (plain TCP). `PEERGRID_TLS_CERT`, `PEERGRID_TLS_KEY`,
    /// `PEERGRID_TLS_CA`, `PEERGRID_TLS_MUTUAL`, `PEERGRID_TLS_SERVER_NAME`.
    pub tls: Option<TlsConfig>,

    /// Allows binding beyond loopback without a secret, where every process that reaches the
    /// ports can join the cluster and read and write all its data. [`GridConfig::validate`]
    /// refuses that unless this is set (as Redis' protected mode). Default `false`.
    pub allow_unauthenticated: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            secret: None,
            accepted_secrets: Vec::new(),
            replay_window: Duration::from_secs(60),
            tls: None,
            allow_unauthenticated: false,
        }
    }
}

impl SecurityConfig {
    /// Shortest accepted secret, in bytes.
    pub const MIN_SECRET_LEN: usize = 16;

    fn validate(&self) -> Result<(), ConfigError> {
        for secret in self.secret.iter().chain(&self.accepted_secrets) {
            if secret.0.len() < Self::MIN_SECRET_LEN {
                return Err(ConfigError::Range {
                    field: "security.secret",
                    reason: "a secret must be at least 16 bytes",
                });
            }
        }
        if self.secret.is_none() && !self.accepted_secrets.is_empty() {
            return Err(ConfigError::Range {
                field: "security.accepted_secrets",
                reason: "accepted secrets need a signing secret (security.secret)",
            });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.replay_window) {
            return Err(ConfigError::Range {
                field: "security.replay_window",
                reason: "must be 1 s to 1 hour",
            });
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("security.tls.cert", &tls.cert),
                ("security.tls.key", &tls.key),
                ("security.tls.ca", &tls.ca),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(ConfigError::Range {
                        field,
                        reason: "TLS needs a certificate, its key and the CA, as PEM files",
                    });
                }
            }
        }
        Ok(())
    }
}

/// A cluster secret. Its bytes never appear in `Debug` output or error messages, and
/// comparisons take the same time wherever two secrets differ.
#[derive(Clone)]
pub struct Secret(std::sync::Arc<[u8]>);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl Eq for Secret {}

impl Secret {
    /// A secret from a string or bytes. Use at least 16 random bytes (for instance
    /// `openssl rand -base64 32`).
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Secret(secret.as_ref().into())
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// TLS for rpc between members (in [`SecurityConfig::tls`]): each member serves with `cert`
/// and `key`, and verifies the peers it calls against `ca`. PEM files, read when the member
/// joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// This member's certificate chain (PEM). It must name the address peers call (an IP
    /// address SAN) or [`TlsConfig::server_name`].
    pub cert: std::path::PathBuf,
    /// The certificate's private key (PEM).
    pub key: std::path::PathBuf,
    /// The CA certificate(s) that sign the members' certificates (PEM).
    pub ca: std::path::PathBuf,
    /// Mutual TLS: the member serves only peers that present a certificate signed by `ca`, and
    /// presents its own when it calls. Default `true`.
    pub mutual: bool,
    /// The name a member's certificate is checked against when it is called, instead of its
    /// address: give every member a certificate for one name (say `peergrid.internal`) and set
    /// it here. Default `None` (the address).
    pub server_name: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: Default::default(),
            key: Default::default(),
            ca: Default::default(),
            mutual: true,
            server_name: None,
        }
    }
}

/// SWIM failure-detector timings, passed to foca.
///
/// The defaults detect a crashed member on loopback in about 2 s (foca's LAN preset takes about
/// 6 s): a member is probed every `probe_period`, suspected when neither the direct nor the
/// indirect probes are answered within it, and declared down `suspect_to_down_after` later unless
/// it refutes. Raise the timings on a slow or lossy network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwimConfig {
    /// How often this member probes one random peer. Default 500 ms. Must exceed `probe_rtt`.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking other members to probe indirectly.
    /// Default 200 ms. Must not be zero.
    pub probe_rtt: Duration,
    /// How many members are asked to probe indirectly. 1 to 16. Default 3.
    pub num_indirect_probes: usize,
    /// How long a suspected member has to refute before it is declared down. Default 1.5 s.
    /// Must not be zero.
    pub suspect_to_down_after: Duration,
    /// How often membership updates are gossiped to `gossip_fanout` random members, besides the
    /// probe messages that carry them anyway. Default 200 ms. Must not be zero.
    pub gossip_interval: Duration,
    /// How many members each periodic gossip goes to. 1 to 16. Default 3.
    pub gossip_fanout: usize,
    /// How many times one membership update is piggybacked before it is dropped. 1 to 255.
    /// Default 8.
    pub max_transmissions: u8,
    /// How often this member announces itself to one random member, to learn members it missed.
    /// Default 10 s. Must not be zero.
    pub announce_interval: Duration,
    /// How long a down member's address is remembered, and probed for the other side of a split
    /// (see [`GridConfig::split_brain_probe_interval`]). A process restarted at the same address
    /// rejoins at once regardless, because its identity carries a higher generation. Default 1 h.
    pub remove_down_after: Duration,
}

impl Default for SwimConfig {
    fn default() -> Self {
        SwimConfig {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_millis(1500),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            max_transmissions: 8,
            announce_interval: Duration::from_secs(10),
            remove_down_after: Duration::from_secs(3600),
        }
    }
}

impl SwimConfig {
    /// Checks the timings; see each field for its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |field, reason| Err(ConfigError::Range { field, reason });
        for (field, value) in [
            ("swim.probe_rtt", self.probe_rtt),
            ("swim.suspect_to_down_after", self.suspect_to_down_after),
            ("swim.gossip_interval", self.gossip_interval),
            ("swim.announce_interval", self.announce_interval),
            ("swim.remove_down_after", self.remove_down_after),
        ] {
            if value.is_zero() {
                return range(field, "must not be zero");
            }
        }
        if self.probe_period <= self.probe_rtt {
            return range("swim.probe_period", "must be larger than swim.probe_rtt");
        }
        if !(1..=16).contains(&self.num_indirect_probes) {
            return range("swim.num_indirect_probes", "must be 1 to 16");
        }
        if !(1..=16).contains(&self.gossip_fanout) {
            return range("swim.gossip_fanout", "must be 1 to 16");
        }
        if self.max_transmissions == 0 {
            return range("swim.max_transmissions", "must not be zero");
        }
        Ok(())
    }

    /// How long split-brain protection counts a peer it has not heard from (half the shortest
    /// time failure detection takes to declare a member down, `probe_period +
    /// suspect_to_down_after`: 1 s by default). After a split the smaller side stops counting
    /// the members it lost within this time, before the larger side declares them down and takes
    /// their partitions over.
    pub fn heartbeat_tolerance(&self) -> Duration {
        (self.probe_period + self.suspect_to_down_after) / 2
    }

    /// How often a member with split-brain protection sends each peer a heartbeat: a quarter of
    /// [`SwimConfig::heartbeat_tolerance`] (250 ms by default).
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_tolerance() / 4
    }

    /// The foca configuration these timings stand for. `max_packet_size` is foca's share of a
    /// datagram (the peergrid header is added outside it).
    pub(crate) fn to_foca(&self, max_packet_size: usize) -> foca::Config {
        use std::num::{NonZeroU8, NonZeroUsize};
        let nz = |n: usize| NonZeroUsize::new(n.max(1)).expect("max(1) is non-zero");
        foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: nz(self.num_indirect_probes),
            max_transmissions: NonZeroU8::new(self.max_transmissions.max(1))
                .expect("max(1) is non-zero"),
            suspect_to_down_after: self.suspect_to_down_after,
            remove_down_after: Some(self.remove_down_after),
            max_packet_size: nz(max_packet_size),
            notify_down_members: true,
            periodic_announce: Some(foca::PeriodicParams {
                frequency: self.announce_interval,
                num_members: nz(1),
            }),
            // The sides of a healed split find each other through the merge protocol
            // (`split_brain`), which decides who merges into whom; announcing to down members
            // would join them at the gossip level with no such decision.
            periodic_announce_to_down_members: None,
            periodic_gossip: Some(foca::PeriodicParams {
                frequency: self.gossip_interval,
                num_members: nz(self.gossip_fanout),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_config_is_valid_and_seeds_the_default_port_range() {
        let c = GridConfig::default();
        c.validate().unwrap();
        assert_eq!(c.partition_count, 271);
        assert_eq!(c.backup_count, 1);
        assert_eq!(c.gossip_bind.port(), 5701);
        assert_eq!(c.seeds.len(), 5);
        assert_eq!(c.seeds[4], "127.0.0.1:5705".parse().unwrap());
        GridConfig::ephemeral().validate().unwrap();
    }

    #[test]
    fn validate_rejects_each_bad_setting_with_a_typed_error() {
        let bad = |f: fn(&mut GridConfig)| {
            let mut c = GridConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(
            bad(|c| c.partition_count = 0),
            ConfigError::PartitionCount {
                got: 0,
                max: GridConfig::MAX_PARTITIONS
            }
        );
        assert_eq!(
            bad(|c| c.backup_count = 7),
            ConfigError::BackupCount { got: 7, max: 6 }
        );
        assert!(matches!(
            bad(|c| c.gossip_bind = "0.0.0.0:5701".parse().unwrap()),
            ConfigError::Address {
                field: "gossip_bind",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.rpc_bind = "224.0.0.1:5701".parse().unwrap()),
            ConfigError::Address {
                field: "rpc_bind",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.rpc_advertise = Some("0.0.0.0:1".parse().unwrap())),
            ConfigError::Address {
                field: "rpc_advertise",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.seeds = vec!["127.0.0.1:0".parse().unwrap()]),
            ConfigError::Address { field: "seeds", .. }
        ));
        assert_eq!(bad(|c| c.cluster_name.clear()), ConfigError::ClusterName(0));
        assert!(matches!(
            bad(|c| c.swim.probe_rtt = c.swim.probe_period),
            ConfigError::Range {
                field: "swim.probe_period",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.max_datagram_size = 100),
            ConfigError::Range {
                field: "max_datagram_size",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.port_count = 0),
            ConfigError::Range {
                field: "port_count",
                ..
            }
        ));
    }

    #[test]
    fn wildcard_bind_is_fine_with_an_advertised_address_and_a_secret() {
        let mut c = GridConfig {
            gossip_bind: "0.0.0.0:5701".parse().unwrap(),
            gossip_advertise: Some("10.1.2.3:5701".parse().unwrap()),
            ..GridConfig::default()
        };
        // Beyond loopback, a secret is needed (or an explicit opt-out).
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Address {
                field: "gossip_bind",
                ..
            })
        ));
        c.security.secret = Some(Secret::new("sixteen bytes or more"));
        c.validate().unwrap();
    }

    #[test]
    fn security_settings_come_from_the_environment_and_secrets_stay_hidden() {
        let c = GridConfig::default()
            .with_env_vars(env(&[
                ("PEERGRID_SECRET", "sixteen bytes or more"),
                (
                    "PEERGRID_ACCEPTED_SECRETS",
                    "the previous secret 1, the previous secret 2",
                ),
                ("PEERGRID_REPLAY_WINDOW_MS", "30000"),
                ("PEERGRID_TLS_CERT", "/etc/peergrid/member.pem"),
                ("PEERGRID_TLS_KEY", "/etc/peergrid/member.key"),
                ("PEERGRID_TLS_CA", "/etc/peergrid/ca.pem"),
                ("PEERGRID_TLS_MUTUAL", "false"),
                ("PEERGRID_MAX_BATCH_KEYS", "500"),
                ("PEERGRID_MAX_VALUE_SIZE", "1048576"),
            ]))
            .unwrap();
        assert_eq!(
            c.security.secret,
            Some(Secret::new("sixteen bytes or more"))
        );
        assert_eq!(c.security.accepted_secrets.len(), 2);
        assert_eq!(c.security.replay_window, Duration::from_secs(30));
        let tls = c.security.tls.as_ref().unwrap();
        assert_eq!(tls.ca, std::path::PathBuf::from("/etc/peergrid/ca.pem"));
        assert!(!tls.mutual);
        assert_eq!((c.max_batch_keys, c.max_value_size), (500, 1 << 20));
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("sixteen"));
        let err = GridConfig::default()
            .with_env_vars(env(&[("PEERGRID_REPLAY_WINDOW_MS", "soon")]))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Env { .. }));
        let err = GridConfig::default()
            .with_env_vars(env(&[("PEERGRID_TLS_MUTUAL", "sixteen bytes secret")]))
            .unwrap_err();
        assert!(err.to_string().contains("sixteen"), "not a secret: shown");
        // Accepted secrets alone, short secrets, and a message limit below what values need.
        let mut bad = GridConfig::default();
        bad.security.accepted_secrets = vec![Secret::new("sixteen bytes or more")];
        assert!(bad.validate().is_err());
        let mut bad = GridConfig::default();
        bad.max_rpc_message_size = bad.max_value_size;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Range {
                field: "max_rpc_message_size",
                ..
            })
        ));
    }

    #[test]
    fn environment_variables_override_defaults() {
        let c = GridConfig::default()
            .with_env_vars(env(&[
                ("PEERGRID_CLUSTER_NAME", "orders"),
                ("PEERGRID_SEEDS", "127.0.0.1:7000, 127.0.0.1:7001"),
                ("PEERGRID_GOSSIP_BIND", "127.0.0.1:7100"),
                ("PEERGRID_BIND", "127.0.0.2"),
                ("PEERGRID_PARTITIONS", "1024"),
                ("PEERGRID_BACKUPS", "2"),
                ("PEERGRID_JOIN_TIMEOUT_MS", "250"),
                ("HOME", "/root"),
            ]))
            .unwrap();
        assert_eq!(c.cluster_name, "orders");
        assert_eq!(c.seeds.len(), 2);
        assert_eq!(c.gossip_bind, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(c.rpc_bind, "127.0.0.2:5701".parse().unwrap());
        assert_eq!(c.partition_count, 1024);
        assert_eq!(c.backup_count, 2);
        assert_eq!(c.join_timeout, Duration::from_millis(250));
        let none = GridConfig::default()
            .with_env_vars(env(&[("PEERGRID_SEEDS", "")]))
            .unwrap();
        assert!(none.seeds.is_empty());
    }

    #[test]
    fn bad_environment_values_are_reported_by_name() {
        for (name, value) in [
            ("PEERGRID_PARTITIONS", "many"),
            ("PEERGRID_SEEDS", "not an address"),
            ("PEERGRID_BIND", "localhost:1"),
            ("PEERGRID_BACKUPS", "300"),
            ("PEERGRID_TYPO", "1"),
        ] {
            let err = GridConfig::default()
                .with_env_vars(env(&[(name, value)]))
                .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Env { name: n, .. } if n == name),
                "{err}"
            );
        }
    }

    #[test]
    fn map_settings_match_by_name_then_pattern_then_wildcard() {
        let sync = MapConfig::default();
        let fast = MapConfig {
            async_backups: true,
            ..MapConfig::default()
        };
        let one = MapConfig {
            backup_count: Some(1),
            ..MapConfig::default()
        };
        let c = GridConfig {
            maps: vec![
                ("*".into(), one.clone()),
                ("session*".into(), fast.clone()),
                ("orders".into(), sync.clone()),
            ],
            ..GridConfig::default()
        };
        assert_eq!(c.map_config("sessions"), fast);
        assert_eq!(c.map_config("orders"), sync);
        assert_eq!(c.map_config("other"), one);
        assert_eq!(GridConfig::default().map_config("x"), MapConfig::default());
        let bad = GridConfig {
            maps: vec![(
                "x".into(),
                MapConfig {
                    backup_count: Some(2),
                    ..MapConfig::default()
                },
            )],
            ..GridConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Range {
                field: "maps.backup_count",
                ..
            })
        ));
    }

    #[test]
    fn swim_timings_map_onto_foca() {
        let f = SwimConfig::default().to_foca(1388);
        assert_eq!(f.probe_period, Duration::from_millis(500));
        assert_eq!(f.max_packet_size.get(), 1388);
        assert!(f.periodic_gossip.is_some());
        assert!(f.notify_down_members);
    }
}
