//! The errors of the public API.
//!
//! Every fallible call returns [`Error`], an enum a caller can match on. Configuration problems are
//! [`ConfigError`], wrapped in [`Error::Config`] when they surface through [`crate::Grid::join`].
//! Network failures are split the way a caller reacts to them: [`Error::Timeout`] (the peer may
//! have acted), [`Error::Unreachable`] (the request did not get through) and [`Error::Remote`] (the
//! peer answered with an error).

use std::net::SocketAddr;
use std::time::Duration;

use crate::membership::MemberId;

/// The result type of peergrid's public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a peergrid call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected by [`crate::GridConfig::validate`]. Nothing was started.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),

    /// No socket could be bound. `tried` names the first address of the range that was tried;
    /// `source` is the error of the last attempt. Nothing was started.
    #[error("could not bind {what} socket at {tried} (tried {attempts} port(s)): {source}")]
    Bind {
        /// Which socket: `"gossip (udp)"` or `"rpc (tcp)"`.
        what: &'static str,
        /// The first address tried.
        tried: SocketAddr,
        /// How many consecutive ports were tried.
        attempts: u16,
        /// The error of the last attempt.
        #[source]
        source: std::io::Error,
    },

    /// A call to a peer did not complete within its deadline. The peer may or may not have acted
    /// on it.
    #[error("{operation} on member {member} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// The member that was called.
        member: MemberId,
        /// The deadline that passed.
        after: Duration,
    },

    /// A peer could not be reached: the connection was refused or reset, or the fault switch cuts
    /// the link. The request was not processed.
    #[error("member {member} at {addr} is unreachable: {reason}")]
    Unreachable {
        /// The member that was called.
        member: MemberId,
        /// The rpc address that was tried.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },

    /// A peer answered the call with an error.
    #[error("member {member} answered {code:?}: {message}")]
    Remote {
        /// The member that answered.
        member: MemberId,
        /// The gRPC status code of the answer.
        code: tonic::Code,
        /// The peer's error message.
        message: String,
    },

    /// A [`crate::Client`] found no member to talk to: none of the addresses it tried answered
    /// (nothing listens there, the connection failed or timed out), or what answered was not a
    /// member of the configured cluster.
    #[error("no member answered at {}: {reason}", list_addrs(tried))]
    NoMemberAnswered {
        /// The rpc addresses tried, in order.
        tried: Vec<SocketAddr>,
        /// Why the last one failed.
        reason: String,
    },

    /// The member id is not in this member's current membership view (it never joined, or it was
    /// declared down or left).
    #[error("member {0} is not a live member of this cluster")]
    UnknownMember(MemberId),

    /// A key, value or rpc message is larger than the configured maximum
    /// ([`crate::GridConfig::max_key_size`], [`crate::GridConfig::max_value_size`],
    /// [`crate::GridConfig::max_rpc_message_size`]), here or on the member that owns the key.
    /// Nothing was stored.
    #[error("{what} of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// `"key"`, `"value"`, or `"rpc message"`.
        what: &'static str,
        /// Its encoded size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },

    /// A [`crate::Map::get_all`] or [`crate::Map::put_all`] call carries more keys than
    /// [`crate::GridConfig::max_batch_keys`] (or than the owning member accepts). Nothing was
    /// sent or stored.
    #[error("a batch of {count} keys exceeds the maximum of {max} keys")]
    TooManyKeys {
        /// The keys in the call.
        count: usize,
        /// The configured maximum.
        max: usize,
    },

    /// A peer refused this member's call for lack of a valid cluster credential: the members
    /// are configured with different secrets ([`crate::SecurityConfig`]). Nothing was processed.
    #[error("member {member} at {addr} refused the call: {reason}")]
    Unauthenticated {
        /// The member that was called.
        member: MemberId,
        /// Its rpc address.
        addr: SocketAddr,
        /// The peer's explanation.
        reason: String,
    },

    /// A key or value could not be encoded by its `Serialize` implementation.
    #[error("could not encode: {0}")]
    Encode(String),

    /// Stored bytes do not decode as the requested type (the map was written with another value
    /// type, or the bytes were not written by peergrid). The stored entry is unchanged.
    #[error("stored bytes do not decode as {type_name}: {reason}")]
    Decode {
        /// The type that was requested.
        type_name: &'static str,
        /// The decoder's complaint.
        reason: String,
    },

    /// The loader of a [`crate::Map::get_or_load`] failed (this caller's, or the one every caller
    /// waited for); nothing was stored, and the next call loads again.
    #[error("loading the value failed: {message}")]
    LoadFailed {
        /// The loader's error, as text.
        message: String,
    },

    /// A partition copy streamed from `member` was malformed or incomplete (a migration or
    /// backup transfer; it is retried, and the receiver's previous copy is left untouched).
    #[error("partition copy from {member} refused: {reason}")]
    BadSnapshot {
        /// The sender.
        member: MemberId,
        /// What was wrong with it.
        reason: String,
    },

    /// The called member does not own the partition in its table; the caller should refresh its
    /// table and retry at `owner`. The router does this by itself and returns this error only
    /// inside [`Error::RetriesExhausted`].
    #[error(
        "member is not the primary of partition {partition} (its table version {version}, owner {owner:?})"
    )]
    NotOwner {
        /// The partition.
        partition: u32,
        /// The answering member's table version.
        version: u64,
        /// The primary in the answering member's table, if it has one.
        owner: Option<MemberId>,
    },

    /// The write was applied on the partition's primary, but a backup would not take it (the
    /// partition moved to another primary meanwhile) or was declared down before it acknowledged
    /// it. Its outcome is unknown: the write may survive, or be lost if a member fails now.
    /// No write is retried on it by itself (a blind write sent again could undo a later write
    /// of another caller); retrying is the caller's choice.
    #[error(
        "write to partition {partition} was not backed up (the partition moved, or its backup \
         failed); outcome unknown"
    )]
    NotBackedUp {
        /// The partition.
        partition: u32,
    },

    /// No live member owns the partition (the cluster is still forming its first table, or every
    /// replica of the partition was lost).
    #[error("partition {partition} has no live owner")]
    NoOwner {
        /// The partition.
        partition: u32,
    },

    /// The operation was retried on refreshed tables within its budget and still failed; `last`
    /// is the last failure. An earlier attempt may have been applied (its outcome was unknown),
    /// which is why a definite refusal such as [`Error::QuorumNotPresent`] that ends such an
    /// operation comes wrapped in this error: one that comes alone means nothing was applied.
    #[error("gave up on partition {partition} after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// The partition.
        partition: u32,
        /// How many attempts were made.
        attempts: u32,
        /// The last error.
        last: Box<Error>,
    },

    /// This grid handle's member has left the cluster (or was dropped); start a new one with
    /// [`crate::Grid::join`].
    #[error("this member has left the cluster")]
    Shutdown,

    /// The map name is reserved: names starting with a NUL byte belong to queues' internal
    /// maps. Nothing was sent.
    #[error("map name {name:?} is reserved (names starting with NUL belong to queues)")]
    ReservedName {
        /// The name.
        name: String,
    },

    /// [`crate::Lock::try_lock`] (or a per-key [`crate::Map::try_lock`] with a zero timeout)
    /// found the lock held by another holder. Nothing changed.
    #[error("lock {name:?} is held by another holder")]
    LockBusy {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
    },

    /// A timed acquire waited its whole timeout without getting the lock; its place in the
    /// queue was given up.
    #[error("lock {name:?} was not acquired within {waited:?}")]
    LockTimeout {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
        /// How long it waited.
        waited: Duration,
    },

    /// An unlock by a holder that does not hold the lock (and did not lose it to a lease or a
    /// failure in the last minute).
    #[error("lock {name:?} is not held by this holder")]
    NotLockHolder {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
    },

    /// The holding ended when its lease ran out, before this unlock; another holder may have
    /// held the lock since. Anything done under it after the lease ended was unprotected; a
    /// resource that checks fencing tokens refused it once a larger token reached it.
    #[error("lock {name:?}: the lease of the holding with fence {fence} ran out before unlock")]
    LeaseExpired {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
        /// The fence of the holding that ended.
        fence: u64,
    },

    /// The holding ended without an unlock because the cluster declared the holder's member
    /// down (or a waiter's grant went unclaimed); another holder may have held the lock since.
    #[error(
        "lock {name:?}: the holding with fence {fence} was released because its holder was declared gone"
    )]
    LockLost {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
        /// The fence of the holding that ended.
        fence: u64,
    },

    /// The holder already holds the lock as many times as its
    /// [`crate::LockConfig::reentry_limit`] allows. Nothing changed.
    #[error("lock {name:?}: reentry limit of {limit} reached")]
    ReentryLimit {
        /// The lock's name (the map's name, for a per-key lock).
        name: String,
        /// The configured limit.
        limit: u32,
    },

    /// A write waited for a key that another holder locked (see [`crate::Map::lock`]) and the
    /// lock was not released within the operation's budget. The write was not applied.
    #[error("key in map {map:?} is locked by another holder")]
    KeyLocked {
        /// The map.
        map: String,
    },

    /// The structure has split-brain protection (`min_cluster_size`, see
    /// [`crate::SplitBrainProtection`]) and the member that checked recently heard from fewer
    /// members than that (itself included): this side of a network split is a minority, or the
    /// member was stalled. Nothing was applied or read; the call
    /// fails at once rather than waiting for the split to heal.
    #[error(
        "{structure} {name:?} needs {min} members and member {member} recently heard from {present}"
    )]
    QuorumNotPresent {
        /// `"map"`, `"queue"` or `"lock"`.
        structure: &'static str,
        /// The structure's name.
        name: String,
        /// The configured minimum cluster size.
        min: usize,
        /// How many members the checking member recently heard from (itself included).
        present: usize,
        /// The member that checked: the caller's own, or the structure's primary.
        member: MemberId,
    },
}

/// A configuration value that cannot work, found by [`crate::GridConfig::validate`] or while
/// reading the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cluster name is empty or longer than 64 bytes.
    #[error("cluster name must be 1 to 64 bytes, got {0} bytes")]
    ClusterName(usize),

    /// The member name is longer than 64 bytes.
    #[error("member name must be at most 64 bytes, got {0} bytes")]
    MemberName(usize),

    /// The partition count is zero or above [`crate::GridConfig::MAX_PARTITIONS`].
    #[error("partition count must be 1 to {max}, got {got}")]
    PartitionCount {
        /// The configured count.
        got: u32,
        /// The largest allowed count.
        max: u32,
    },

    /// The backup count is above [`crate::GridConfig::MAX_BACKUPS`].
    #[error("backup count must be at most {max}, got {got}")]
    BackupCount {
        /// The configured count.
        got: u8,
        /// The largest allowed count.
        max: u8,
    },

    /// An address cannot be used as configured.
    #[error("{field} = {addr} is unusable: {reason}")]
    Address {
        /// The configuration field.
        field: &'static str,
        /// The offending address.
        addr: SocketAddr,
        /// Why it cannot be used.
        reason: &'static str,
    },

    /// A duration or count is out of its allowed range.
    #[error("{field} is out of range: {reason}")]
    Range {
        /// The configuration field.
        field: &'static str,
        /// The allowed range.
        reason: &'static str,
    },

    /// A TLS file cannot be read or does not hold what it should.
    #[error("TLS {field} at {path}: {reason}")]
    Tls {
        /// The configuration field.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// An environment variable holds a value that does not parse.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        /// The variable's name.
        name: String,
        /// Its value.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
}

fn list_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
