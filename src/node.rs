//! The member's data-path core, shared by the typed handles, the rpc server and the background
//! tasks: the partition table, the store, replication, and the owner side of map operations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::EvictionPolicy;
use crate::config::GridConfig;
use crate::error::{Error, Result};
use crate::lock::state::HolderId;
use crate::map::listen::{EntryEventKind, RawEntryEvent};
use crate::map::ops::{Change, Expiry, LoadOutcome, MapOp, OpResult};
use crate::map::stats::MapCounters;
use crate::membership::{MemberId, MembershipState};
use crate::partition::PartitionEvent;
use crate::partition::table::{PartitionTable, TableHolder};
use crate::rpc::client::RpcClients;
use crate::rpc::proto;
use crate::store::replication::{Ack, Item, Replication};
use crate::store::snapshot::{Staging, maybe_broken};
use crate::store::{Entries, Record, Store};

/// The answer of the owner side: done, or "not the primary here".
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    Done(T),
    NotOwner {
        version: u64,
        owner: Option<MemberId>,
    },
    /// This member is the primary but is still taking the partition over; try again once it is
    /// ready.
    Pending,
    /// A write to a key that another holder has locked waited its time here; ask again.
    Locked,
}

/// Entries an eviction compares.
const EVICTION_SAMPLE: usize = 16;

/// Most entries one write evicts.
const MAX_EVICTIONS_PER_WRITE: usize = 64;

/// The entry to evict from `entries` under `policy`, among a sample that starts at a random
/// place in the map, never `keep` (the entry being written).
fn pick_victim(entries: &Entries, keep: &Bytes, policy: EvictionPolicy) -> Option<Bytes> {
    use rand::RngExt;
    let len = entries.len();
    if len <= 1 {
        return None;
    }
    let skip = rand::rng().random_range(0..len);
    let rank = |s: &crate::store::entries::Stored| match policy {
        EvictionPolicy::Lfu => (u64::from(s.hits()), s.last_access_ms()),
        _ => (s.last_access_ms(), 0),
    };
    // One pass at a time: its read lock is gone before the next starts.
    let sampled = |skip: usize, take: usize| entries.sample(skip, take, keep, rank);
    let mut sample = sampled(skip, EVICTION_SAMPLE);
    if sample.len() < EVICTION_SAMPLE {
        sample.extend(sampled(0, EVICTION_SAMPLE - sample.len()));
    }
    sample
        .into_iter()
        .min_by_key(|(_, rank)| *rank)
        .map(|(key, _)| key)
}

/// The value of `key` in a per-name registry, made by `make` if missing (cloned out: no map
/// guard is kept).
pub(crate) fn get_or_make<V: Clone>(
    registry: &dashmap::DashMap<Arc<str>, V>,
    key: &str,
    make: impl FnOnce() -> V,
) -> V {
    if let Some(value) = registry.get(key) {
        return value.value().clone();
    }
    registry
        .entry(Arc::from(key))
        .or_insert_with(make)
        .value()
        .clone()
}

/// How a takeover's pull ended.
#[derive(Debug)]
enum Pulled {
    /// From the previous primary: this member now holds its last state.
    FromPrevious,
    /// From another former replica.
    FromReplica,
    /// No source answered.
    Nothing,
    /// This member is no longer the primary.
    Superseded,
}

/// Why a member would not hand a partition over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchRefused {
    /// It holds no copy, or the pull is stale: the caller tries its next source.
    NoCopy,
    /// It is still the partition's primary in its own table: the caller retries.
    StillPrimary,
}

/// One fetch's answer.
enum Fetched {
    /// The source holds no copy, or the pull is stale.
    Refused,
    /// The source's sequence number and digest.
    Header(proto::SnapshotHeader),
    /// The whole partition.
    Whole(crate::store::snapshot::Staged),
}

/// An applied mutation's pending backup acknowledgements.
pub(crate) type Acks = Vec<(u32, oneshot::Receiver<Ack>)>;

/// Members the coordinator's tables list that this member saw go down (see
/// [`Node::notice_members_listed_but_down`]).
#[derive(Debug, Default)]
pub(crate) struct ListedButDown {
    /// Each such member, and since when it is listed.
    since: std::collections::BTreeMap<MemberId, std::time::Instant>,
    /// When this member last merged back because of one.
    merged_back_at: Option<std::time::Instant>,
}

pub(crate) struct Node {
    pub(crate) config: GridConfig,
    pub(crate) me: MemberId,
    pub(crate) membership: Arc<MembershipState>,
    pub(crate) rpc: Arc<RpcClients>,
    pub(crate) table: Arc<TableHolder>,
    pub(crate) store: Arc<Store>,
    pub(crate) replication: Replication,
    pub(crate) cancel: CancellationToken,
    /// Serializes table application: comparing, marking takeovers and installing must be one
    /// step, or an older table's failed install could release a newer takeover. Never held
    /// across an `.await`.
    pub(crate) table_lock: std::sync::Mutex<()>,
    /// A coordinator whose tables leave out members this member hears from, and since when
    /// (see [`Node::leaves_out_live_members`]).
    pub(crate) disagreement: std::sync::Mutex<Option<(MemberId, std::time::Instant)>>,
    /// What [`Node::notice_members_listed_but_down`] keeps between tables.
    pub(crate) listed_but_down: std::sync::Mutex<ListedButDown>,
    /// Members that announced a graceful leave; the coordinator assigns them nothing.
    pub(crate) leaving: std::sync::Mutex<std::collections::BTreeSet<MemberId>>,
    /// Takeovers started, finished, and partitions lost, for [`crate::Grid::partition_events`].
    pub(crate) partition_events: tokio::sync::broadcast::Sender<PartitionEvent>,
    /// Counters behind [`crate::Grid::partition_stats`].
    pub(crate) stats: MigrationCounters,
    /// Per-map operation counters behind [`crate::Map::local_stats`].
    pub(crate) map_counters: dashmap::DashMap<Arc<str>, Arc<MapCounters>>,
    /// `get_or_load` loads in flight for keys this member leads, by map and key.
    pub(crate) loads: dashmap::DashMap<(Arc<str>, Bytes), LoadState>,
    /// Changes this member applied as primary, for entry listeners and near caches.
    pub(crate) entry_events: tokio::sync::broadcast::Sender<Arc<RawEntryEvent>>,
    /// The partitions this member leads, for the table version it was counted in (see
    /// `partitions_led`).
    pub(crate) led_cache: AtomicU64,
    /// The index of each queue this member leads, by internal map name (see `queue::owner`).
    pub(crate) queue_indexes:
        dashmap::DashMap<Arc<str>, Arc<std::sync::Mutex<crate::queue::owner::QueueIndex>>>,
    /// Woken when a queue this member leads gains or loses an item, by internal map name.
    pub(crate) queue_signals: dashmap::DashMap<Arc<str>, Arc<tokio::sync::Notify>>,
    /// This member's near caches, by map name (created with the map's first handle).
    pub(crate) near_caches: dashmap::DashMap<Arc<str>, Arc<crate::map::near::NearCache>>,
    /// Per partition: notified whenever one of its locks changes (see `lock::owner`).
    pub(crate) lock_signals: Vec<tokio::sync::Notify>,
    /// When this member started (its membership view is complete an rpc timeout later).
    pub(crate) started: std::time::Instant,
    /// Latency of the map operations called on this member.
    pub(crate) latency: crate::metrics::OpLatency,
    /// Whether any structure has split-brain protection (else the check costs nothing).
    pub(crate) quorum_guarded: bool,
    /// This member's merges after network splits.
    pub(crate) merge: crate::split_brain::merge::MergeState,
}

/// A partition this member leads, write-locked: its data, its sequence number (the lock) and the
/// table it is led under.
pub(crate) type Leading<'a> = (
    &'a crate::store::PartitionData,
    std::sync::MutexGuard<'a, u64>,
    Arc<PartitionTable>,
);

/// How long a `get_or_load` loader may hold a key before another caller may load it (sooner if
/// the loader's member is declared down).
pub(crate) const LOAD_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a read at `now_ms` of an entry expiring at `expires_at_ms` should reload it early:
/// never before the last `window` of its life, then with a probability that grows linearly from
/// 0 to 1 across the window (so under steady reads one of the first reads in the window does).
fn refresh_early(now_ms: u64, expires_at_ms: u64, window: std::time::Duration) -> bool {
    use rand::RngExt;
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if expires_at_ms == 0 || window == 0 || now_ms >= expires_at_ms {
        return false;
    }
    let remaining = expires_at_ms - now_ms;
    remaining < window && rand::rng().random_range(0..window) >= remaining
}

/// A load in flight on the key's primary.
pub(crate) struct LoadState {
    member: MemberId,
    claim: u64,
    lease_until: tokio::time::Instant,
    done: tokio::sync::watch::Sender<Option<LoadOutcome>>,
    /// For an early refresh: the version of the entry it replaces (stored only if unchanged).
    refresh_of: Option<u64>,
}

impl LoadState {
    fn new(member: MemberId, claim: u64) -> Self {
        LoadState {
            member,
            claim,
            lease_until: tokio::time::Instant::now() + LOAD_LEASE,
            done: tokio::sync::watch::channel(None).0,
            refresh_of: None,
        }
    }

    /// An early refresh of the entry at `version`, leased no longer than the entry lives: if its
    /// caller gives up, a load after the expiry does not wait for it.
    fn refresh(member: MemberId, claim: u64, version: u64, lives_for: std::time::Duration) -> Self {
        LoadState {
            lease_until: tokio::time::Instant::now() + LOAD_LEASE.min(lives_for),
            refresh_of: Some(version),
            ..LoadState::new(member, claim)
        }
    }
}

/// Counters of this member's takeovers and copies.
#[derive(Default)]
pub(crate) struct MigrationCounters {
    pub(crate) migrations_started: AtomicU64,
    pub(crate) migrations_finished: AtomicU64,
    pub(crate) partitions_lost: AtomicU64,
    pub(crate) migration_bytes_received: AtomicU64,
    pub(crate) migration_bytes_sent: AtomicU64,
    pub(crate) anti_entropy_repairs: AtomicU64,
}

impl Node {
    /// A client for one call to live member `member`: [`Error::UnknownMember`] if it is not in the
    /// membership view, [`Error::Unreachable`] if the fault switch cuts the link.
    pub(crate) fn peer_client(&self, member: MemberId) -> Result<crate::rpc::client::PeerClient> {
        let peer = self
            .membership
            .peer(member)
            .ok_or(Error::UnknownMember(member))?;
        self.rpc.get(&peer)
    }

    /// Numbers a change for near-cache invalidation and publishes it to this member's entry
    /// listeners and invalidation streams (the caller holds the partition's write lock, so a
    /// partition's events go out in sequence order). `kind` `None`: the map's partition was
    /// cleared.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &self,
        counters: &MapCounters,
        map: &str,
        kind: Option<EntryEventKind>,
        key: &Bytes,
        value: Option<Bytes>,
        partition: u32,
        seq: u64,
    ) {
        let map_seq = counters.next_invalidation(partition);
        if self.entry_events.receiver_count() == 0 {
            return;
        }
        let _ = self.entry_events.send(Arc::new(RawEntryEvent {
            map: Arc::from(map),
            kind: kind.unwrap_or(EntryEventKind::Removed),
            clear: kind.is_none(),
            key: key.clone(),
            value,
            partition,
            seq,
            map_seq,
        }));
    }

    /// The operation counters of `map` (the handle is cloned out; no map guard is kept).
    pub(crate) fn counters(&self, map: &str) -> Arc<MapCounters> {
        get_or_make(&self.map_counters, map, || {
            Arc::new(MapCounters::new(self.config.partition_count))
        })
    }

    /// The near cache of `map` on this member, started on first use, if the map has one.
    pub(crate) fn near_cache(
        self: &Arc<Self>,
        map: &str,
    ) -> Option<Arc<crate::map::near::NearCache>> {
        if let Some(near) = self.near_caches.get(map) {
            return Some(near.value().clone());
        }
        let config = self.config.map_config(map).near_cache?;
        Some(get_or_make(&self.near_caches, map, || {
            crate::map::near::NearCache::start(self, Arc::from(map), config)
        }))
    }

    /// Every partition's near-cache invalidation number of `map` on this member (zeros for a map
    /// it never changed; no counters are created for a name a peer sends).
    pub(crate) fn invalidation_state(&self, map: &str) -> Vec<u64> {
        match self.map_counters.get(map) {
            Some(counters) => counters.invalidation_state(),
            None => vec![0; self.config.partition_count as usize],
        }
    }

    /// Forgets `get_or_load` loads whose lease ran out or whose loader's member is gone, so keys
    /// nobody asks for again do not keep them (waiters see the load dropped and ask again).
    pub(crate) fn drop_abandoned_loads(&self) {
        let now = tokio::time::Instant::now();
        self.loads.retain(|_, load| {
            load.lease_until > now
                && (load.member == self.me || self.membership.peer(load.member).is_some())
        });
    }

    /// `map`'s statistics on this member: its counters, and what it holds now.
    pub(crate) fn map_stats(&self, map: &str) -> crate::map::stats::MapStats {
        let mut stats = self.counters(map).read();
        let table = self.table.current();
        let now = crate::store::now_ms();
        let max_idle = self.config.map_config(map).max_idle_ms();
        for p in 0..table.partition_count() {
            let Some(entries) = self.store.partition(p).and_then(|d| d.entries(map)) else {
                continue;
            };
            if table.primary(p) == Some(self.me) {
                stats.owned_memory_bytes += entries.bytes();
                entries.for_each(|e| {
                    if !e.is_dead(now, max_idle) {
                        stats.owned_entries += 1;
                        stats.owned_bytes += (e.key().len() + e.value().len()) as u64;
                    }
                });
            } else if table.replicas(p).contains(&self.me) {
                stats.backup_entries += entries.len() as u64;
            }
        }
        stats
    }

    /// The current table if this member leads `partition` and is not taking it over (checked
    /// under the partition's write lock by the writers); otherwise the answer to give.
    pub(crate) fn leading<T>(
        &self,
        data: &crate::store::PartitionData,
        partition: u32,
    ) -> std::result::Result<Arc<PartitionTable>, Outcome<T>> {
        let table = self.table.current();
        if table.primary(partition) != Some(self.me) {
            return Err(self.not_owner(&table, partition));
        }
        if data.is_pending() {
            return Err(Outcome::Pending);
        }
        Ok(table)
    }

    /// The partition's data, its write lock, and the current table, if this member leads the
    /// partition and is not taking it over; otherwise the answer to give. For owner-side writes.
    pub(crate) fn lock_leading<T>(
        &self,
        partition: u32,
    ) -> Result<std::result::Result<Leading<'_>, Outcome<T>>> {
        let data = self
            .store
            .partition(partition)
            .ok_or(Error::NoOwner { partition })?;
        let seq = data.lock();
        Ok(self
            .leading(data, partition)
            .map(|table| (data, seq, table)))
    }

    pub(crate) fn not_owner<T>(&self, table: &PartitionTable, partition: u32) -> Outcome<T> {
        Outcome::NotOwner {
            version: table.version,
            owner: table.primary(partition),
        }
    }

    /// Waits until the partition may be served: pulled if this member just became its primary.
    pub(crate) async fn partition_ready(&self, partition: u32) -> Result<()> {
        let data = self
            .store
            .partition(partition)
            .ok_or(Error::NoOwner { partition })?;
        if data.is_pending() {
            tokio::time::timeout(self.config.rpc_timeout, data.ready())
                .await
                // Nothing was applied: the router may retry.
                .map_err(|_| Error::NoOwner { partition })?;
        }
        Ok(())
    }

    /// Executes a single-key operation as the partition's primary. `caller_version` is the
    /// caller's table version; a newer one makes this member refresh its table first.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        partition: u32,
        map: &str,
        key: Bytes,
        op: MapOp,
        caller_version: u64,
        writer: Option<HolderId>,
    ) -> Result<Outcome<OpResult>> {
        // A local operation may complete without ever waiting: a caller looping over them
        // would hold its worker thread, and starve the membership task of it (a benchmark's
        // 64 tasks of local gets stalled it for 2 s, long enough to lose the quorum). Tokio's
        // task budget makes such a loop yield now and then.
        tokio::task::coop::consume_budget().await;
        self.catch_up(caller_version).await;
        self.check_quorum(map, &key, &op)?;
        match op {
            op @ MapOp::Merge { .. } => self.merge_execute(partition, map, op).await,
            MapOp::LoadBegin { member, claim } => {
                self.load_begin(partition, map, key, member, claim).await
            }
            MapOp::LoadEnd {
                claim,
                outcome,
                refresh_of,
            } => {
                self.load_end(
                    partition,
                    map,
                    key,
                    claim,
                    outcome,
                    refresh_of,
                    writer.as_ref(),
                )
                .await
            }
            op @ (MapOp::QueueOffer { .. }
            | MapOp::QueuePoll { .. }
            | MapOp::QueuePeek
            | MapOp::QueueLen
            | MapOp::QueueClear) => self.queue_execute(partition, map, op).await,
            op @ (MapOp::LockAcquire { .. }
            | MapOp::LockRelease { .. }
            | MapOp::LockInfo
            | MapOp::LockMerge { .. }
            | MapOp::LockSweep) => self.lock_execute(partition, map, key, op).await,
            op if self.guarded_read(map, &key, &op) => {
                let unconfirmed = self
                    .store
                    .partition(partition)
                    .map_or(0, |d| d.unconfirmed());
                let outcome = self
                    .execute_local_as(partition, map, key, &op, writer.as_ref())
                    .await?;
                self.read_barrier(partition, unconfirmed).await?;
                Ok(outcome)
            }
            op => {
                // A write that did not apply (a compare-and-set that found another value, a
                // put-if-absent that found one) answers from what this member holds, as a read
                // does: where reads are guarded, it passes the same barrier. (A 30-minute Jepsen
                // run had a compare-and-set fail on a value its writer's call timed out on,
                // which the backups never got: later reads returned the value before it.)
                let answers = self.guarded_answers(map, &key);
                let unconfirmed = if answers {
                    self.store
                        .partition(partition)
                        .map_or(0, |d| d.unconfirmed())
                } else {
                    0
                };
                let outcome = self
                    .execute_local_as(partition, map, key, &op, writer.as_ref())
                    .await?;
                if answers && matches!(&outcome, Outcome::Done(result) if !result.applied) {
                    self.read_barrier(partition, unconfirmed).await?;
                }
                Ok(outcome)
            }
        }
    }

    /// Holds a guarded read's answer until the backups hold what it saw. A read on the primary
    /// sees writes as soon as they are applied there, before the backups acknowledge them; if
    /// the primary was cut off just then (its backups unreachable, its quorum not yet run out),
    /// the read returned a write that the promoted backup never had, and a later read the value
    /// before it (a Jepsen run: a register read back in time). So the read waits until every
    /// item queued to the partition's backups so far is answered (nothing to wait for when
    /// they are idle), and fails as not backed up if a mutation of the partition was not
    /// stored since `unconfirmed` (the count before the read) was taken: the caller retries.
    ///
    /// A mutation a backup did not store earlier (its writer got `NotBackedUp`) may be on this
    /// member alone: until a snapshot taken since reached every backup, a guarded read sends
    /// one to each first (once; the partition is confirmed from then on), and fails as not
    /// backed up if one does not take it or there is no backup at all (a primary cut off
    /// alone, whose table lists none, serves nothing only it holds).
    pub(crate) async fn read_barrier(&self, partition: u32, unconfirmed: u64) -> Result<()> {
        // A write applies under the partition's write lock and queues its mutations for the
        // backups before it lets go: taking the lock once makes sure a write the read saw is
        // queued, so the wait below covers it. (Without it, a read that came between a write's
        // apply and its queueing found the backups idle and returned the write, which a backup
        // cut off just then never got: the guarded read test in `tests/split_brain.rs` failed
        // about once in ten runs of its file.)
        if let Some(data) = self.store.partition(partition) {
            drop(data.lock());
        }
        let backups = self.table.current().backups(partition).to_vec();
        let wait = self.config.rpc_timeout;
        for backup in backups {
            if !self.replication.idle(backup) && !self.replication.flush(backup, wait).await {
                return Err(Error::Timeout {
                    operation: "read barrier (backup acknowledgement)",
                    member: self.me,
                    after: wait,
                });
            }
        }
        let Some(data) = self.store.partition(partition) else {
            return Ok(());
        };
        let now = data.unconfirmed();
        if now != unconfirmed {
            return Err(Error::NotBackedUp { partition });
        }
        if data.confirmed() >= now {
            return Ok(());
        }
        let backups = self.table.current().backups(partition).to_vec();
        if backups.is_empty() {
            return Err(Error::NotBackedUp { partition });
        }
        // Acknowledged like a write's mutations: a backup that does not install it makes the
        // read not backed up.
        let mut acks: Acks = Vec::with_capacity(backups.len());
        for backup in backups {
            let (ack, answer) = oneshot::channel();
            self.replication.send(
                backup,
                Item::Snapshot {
                    partition,
                    ack: Some(ack),
                },
            );
            acks.push((partition, answer));
        }
        self.await_acks(acks).await?;
        // A snapshot of a partition this member no longer leads is not sent (and answers as
        // stored): the read is then asked again of the new primary.
        if self.table.current().primary(partition) != Some(self.me) {
            return Err(Error::NotBackedUp { partition });
        }
        tracing::debug!(member = %self.me, partition, "every backup holds this copy again; guarded reads pass");
        data.confirm(now);
        Ok(())
    }

    /// Runs an owner-side operation that may wait for a change (a queue's poll or offer, a
    /// queued lock acquire): applies it (waiting out a takeover) and waits for the backups;
    /// while `settled` says its result is not final yet, waits for `signal` and applies it
    /// again, for up to `wait` (at most half an rpc timeout; the caller asks again).
    pub(crate) async fn apply_waiting(
        &self,
        partition: u32,
        signal: &tokio::sync::Notify,
        wait: std::time::Duration,
        mut apply: impl FnMut() -> Result<(Outcome<OpResult>, Acks)>,
        settled: impl Fn(&OpResult) -> bool,
    ) -> Result<Outcome<OpResult>> {
        let deadline = tokio::time::Instant::now() + wait.min(self.config.rpc_timeout / 2);
        loop {
            // Registered before the attempt: a change right after it still wakes this wait.
            let changed = signal.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.partition_ready(partition).await?;
            let (outcome, acks) = apply()?;
            let Outcome::Done(result) = outcome else {
                if matches!(outcome, Outcome::Pending) {
                    continue;
                }
                return Ok(outcome);
            };
            self.await_acks(acks).await?;
            let now = tokio::time::Instant::now();
            if settled(&result) || now >= deadline {
                return Ok(Outcome::Done(result));
            }
            let _ = tokio::time::timeout(deadline - now, changed).await;
        }
    }

    /// Runs `op` here, waiting out a takeover of the partition.
    async fn execute_local(
        &self,
        partition: u32,
        map: &str,
        key: Bytes,
        op: &MapOp,
    ) -> Result<Outcome<OpResult>> {
        self.execute_local_as(partition, map, key, op, None).await
    }

    /// [`Node::execute_local`] for a write by `writer`, which passes a per-key lock it holds; a
    /// write to a key another holder locked waits here up to half an rpc timeout for the unlock,
    /// then answers [`Outcome::Locked`].
    async fn execute_local_as(
        &self,
        partition: u32,
        map: &str,
        key: Bytes,
        op: &MapOp,
        writer: Option<&HolderId>,
    ) -> Result<Outcome<OpResult>> {
        let deadline = tokio::time::Instant::now() + self.config.rpc_timeout / 2;
        loop {
            // Registered before the attempt: an unlock right after it still wakes the wait.
            let unlocked = self.lock_changed(partition);
            tokio::pin!(unlocked);
            unlocked.as_mut().enable();
            self.partition_ready(partition).await?;
            let (outcome, acks) = self.apply(partition, map, key.clone(), op, writer)?;
            match outcome {
                Outcome::Pending => continue,
                Outcome::Locked => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Ok(Outcome::Locked);
                    }
                    // A lease that ran out ends at the next sweep, which wakes this wait too.
                    let _ = tokio::time::timeout(deadline - now, unlocked).await;
                    continue;
                }
                _ => {}
            }
            self.await_acks(acks).await?;
            return Ok(outcome);
        }
    }

    /// `get_or_load`, first step, on the key's primary: the value if there is one; otherwise the
    /// right to load it if nobody holds it (or its holder's member is gone, or its lease ran
    /// out); otherwise, after waiting up to half an rpc timeout for the holder, its outcome, or
    /// "ask again". Results: `found` with the value; `applied`: load it; neither, with a value:
    /// the load failed with that message; neither, without: ask again.
    async fn load_begin(
        &self,
        partition: u32,
        map: &str,
        key: Bytes,
        member: MemberId,
        claim: u64,
    ) -> Result<Outcome<OpResult>> {
        let wait_until = tokio::time::Instant::now() + self.config.rpc_timeout / 2;
        loop {
            match self
                .execute_local(partition, map, key.clone(), &MapOp::Get)
                .await?
            {
                Outcome::Done(mut found) if found.found => {
                    // Early refresh: shortly before the entry expires, one caller at a time
                    // (the first to draw it) reloads it while the others keep its value.
                    let window = self.config.map_config(map).early_refresh;
                    if let Some(window) = window
                        && refresh_early(crate::store::now_ms(), found.expires_at_ms, window)
                        && let dashmap::Entry::Vacant(vacant) =
                            self.loads.entry((Arc::<str>::from(map), key.clone()))
                    {
                        let lives_for = std::time::Duration::from_millis(
                            found.expires_at_ms.saturating_sub(crate::store::now_ms()),
                        );
                        vacant.insert(LoadState::refresh(member, claim, found.version, lives_for));
                        found.applied = true;
                    }
                    return Ok(Outcome::Done(found));
                }
                Outcome::Done(_) => {}
                other => return Ok(other),
            }
            let slot = (Arc::<str>::from(map), key.clone());
            // The guard ends with this block, before any wait.
            let mut waiting = {
                let mut load = self
                    .loads
                    .entry(slot)
                    .or_insert_with(|| LoadState::new(member, claim));
                let holder_gone = load.lease_until <= tokio::time::Instant::now()
                    || (load.member != self.me && self.membership.peer(load.member).is_none());
                if load.claim != claim && holder_gone {
                    tracing::info!(partition, holder = %load.member, "get_or_load: the loader is gone; another caller loads");
                    // The old holder's waiters see its sender dropped and ask again.
                    *load = LoadState::new(member, claim);
                }
                if load.claim == claim {
                    return Ok(Outcome::Done(OpResult {
                        applied: true,
                        ..OpResult::default()
                    }));
                }
                load.done.subscribe()
            };
            let now = tokio::time::Instant::now();
            if now >= wait_until {
                return Ok(Outcome::Done(OpResult::default()));
            }
            let _ = tokio::time::timeout(wait_until - now, waiting.changed()).await;
            let outcome = waiting.borrow_and_update().clone();
            match outcome {
                Some(LoadOutcome::Loaded(value)) => {
                    return Ok(Outcome::Done(OpResult {
                        found: true,
                        value: Some(value),
                        applied: false,
                        expires_at_ms: 0,
                        version: 0,
                        items: Vec::new(),
                        count: 0,
                        lock: None,
                    }));
                }
                Some(LoadOutcome::Failed(message)) => {
                    return Ok(Outcome::Done(OpResult {
                        value: Some(Bytes::from(message)),
                        ..OpResult::default()
                    }));
                }
                // Timed out, or the holder was replaced: look again.
                None => {}
            }
        }
    }

    /// `get_or_load`, last step, on the key's primary: stores a loaded value (replicated like a
    /// `set`, as a write by `writer`; a failure is stored nowhere), then hands the outcome to
    /// every waiter.
    #[allow(clippy::too_many_arguments)]
    async fn load_end(
        &self,
        partition: u32,
        map: &str,
        key: Bytes,
        claim: u64,
        outcome: LoadOutcome,
        refresh_of: Option<u64>,
        writer: Option<&HolderId>,
    ) -> Result<Outcome<OpResult>> {
        let mut answer = OpResult {
            applied: true,
            ..OpResult::default()
        };
        if let LoadOutcome::Loaded(value) = &outcome {
            // The caller says whether its load was an early refresh: its load state may have
            // been taken over meanwhile, and a refresh must never overwrite a newer value.
            let refresh_of = refresh_of.or_else(|| {
                self.loads
                    .get(&(Arc::<str>::from(map), key.clone()))
                    .filter(|load| load.claim == claim)
                    .and_then(|load| load.refresh_of)
            });
            let store = match refresh_of {
                Some(version) => MapOp::RefreshTo {
                    value: value.clone(),
                    version,
                },
                None => MapOp::Set(value.clone()),
            };
            match self
                .execute_local_as(partition, map, key.clone(), &store, writer)
                .await?
            {
                // A refresh that lost to a newer value answers with that value.
                Outcome::Done(stored) if !stored.applied => answer = stored,
                Outcome::Done(_) => {}
                other => return Ok(other),
            }
        }
        let slot = (Arc::<str>::from(map), key);
        if let Some((_, load)) = self.loads.remove_if(&slot, |_, load| load.claim == claim) {
            load.done.send_replace(Some(outcome));
        }
        Ok(Outcome::Done(answer))
    }

    /// The synchronous part of an operation: ownership check, decision, change, sequencing and
    /// queueing for the backups. Reads take no lock.
    pub(crate) fn apply(
        &self,
        partition: u32,
        map: &str,
        key: Bytes,
        op: &MapOp,
        writer: Option<&HolderId>,
    ) -> Result<(Outcome<OpResult>, Acks)> {
        let data = self
            .store
            .partition(partition)
            .ok_or(Error::NoOwner { partition })?;
        let table = self.table.current();
        if table.primary(partition) != Some(self.me) {
            return Ok((self.not_owner(&table, partition), Vec::new()));
        }
        // Checked after the table: a handover marks the partition pending before it installs
        // the table that starts it, so seeing that table means seeing the mark.
        if data.is_pending() {
            return Ok((Outcome::Pending, Vec::new()));
        }
        let now = crate::store::now_ms();
        let map_config = self.config.map_config(map);
        let max_idle = map_config.max_idle_ms();
        let tracks_access = map_config.eviction.policy != EvictionPolicy::None
            || max_idle != 0
            || map_config.merge_policy.counts_hits();
        if op.is_read() {
            let current = data.entries(map).and_then(|entries| {
                if tracks_access {
                    // LRU and LFU need the entry's last access and read count (local to this
                    // member; a short shard write lock).
                    entries.get_tracked(&key, now, max_idle)
                } else {
                    entries.get(&key)
                }
            });
            // An expired entry is removed through the write path below, so its expiry is
            // replicated like any removal.
            if !current.as_ref().is_some_and(|r| r.is_dead(now, max_idle)) {
                let counters = self.counters(map);
                MapCounters::bump(&counters.gets);
                MapCounters::bump(if current.is_some() {
                    &counters.hits
                } else {
                    &counters.misses
                });
                let mut result = op.decide(current.as_ref()).0;
                if max_idle != 0 && current.is_some() {
                    // A near cache keeps the answer no longer than the entry may idle here: its
                    // hits do not count as reads on this member.
                    let idle_deadline = now.saturating_add(max_idle);
                    result.expires_at_ms = match result.expires_at_ms {
                        0 => idle_deadline,
                        at => at.min(idle_deadline),
                    };
                }
                return Ok((Outcome::Done(result), Vec::new()));
            }
        }
        let mut acks = Vec::new();
        let mut seq = data.lock();
        // Checked again under the write lock: a handover may have moved the partition away.
        let table = match self.leading(data, partition) {
            Ok(table) => table,
            Err(outcome) => return Ok((outcome, acks)),
        };
        if op.is_keyed_write() && self.key_locked(data, map, &key, writer, now) {
            return Ok((Outcome::Locked, acks));
        }
        let entries = data.entries_or_create(map);
        let stored = entries.get(&key);
        // The primary decides expiry: an expired entry is absent to every operation, and is
        // removed (and the removal replicated) when an operation finds it.
        let expired = stored.as_ref().is_some_and(|r| r.is_dead(now, max_idle));
        let current = stored.as_ref().filter(|_| !expired);
        let (result, change) = op.decide(current);
        let counters = self.counters(map);
        if op.is_read() {
            MapCounters::bump(&counters.gets);
            MapCounters::bump(if current.is_some() {
                &counters.hits
            } else {
                &counters.misses
            });
        }
        match &change {
            Change::Upsert(..) => MapCounters::bump(&counters.puts),
            Change::Remove => MapCounters::bump(&counters.removes),
            Change::None if expired => MapCounters::bump(&counters.expirations),
            Change::None => {}
        }
        let upserts = matches!(change, Change::Upsert(..));
        let change = match change {
            Change::None if expired => {
                entries.remove(&key);
                Some(proto::mutation::Change::Remove(true))
            }
            Change::None => None,
            Change::Upsert(value, expiry) => {
                let version = current.map_or(1, |r| r.version + 1);
                let ttl = match expiry {
                    Expiry::MapDefault => map_config.ttl,
                    Expiry::After(ttl) => Some(ttl),
                };
                let expires_at_ms = ttl
                    .filter(|t| !t.is_zero())
                    .map_or(0, |t| now.saturating_add(t.as_millis() as u64).max(1));
                let record = Record {
                    value,
                    version,
                    expires_at_ms,
                    last_access_ms: now,
                    hits: 0,
                    updated_ms: now,
                };
                let wire = proto::Record::from(&record);
                entries.insert(&key, &record);
                Some(proto::mutation::Change::Upsert(wire))
            }
            Change::Remove => {
                entries.remove(&key);
                Some(proto::mutation::Change::Remove(true))
            }
        };
        if let Some(change) = change {
            *seq += 1;
            let event = match &change {
                proto::mutation::Change::Upsert(record) => Some((
                    if current.is_some() {
                        EntryEventKind::Updated
                    } else {
                        EntryEventKind::Added
                    },
                    Some(record.value.clone()),
                )),
                proto::mutation::Change::Remove(_) if expired => Some((
                    EntryEventKind::Expired,
                    stored.as_ref().map(|r| r.value.clone()),
                )),
                proto::mutation::Change::Remove(_) => {
                    Some((EntryEventKind::Removed, current.map(|r| r.value.clone())))
                }
                proto::mutation::Change::Clear(_) => None,
            };
            if let Some((kind, value)) = event {
                self.emit(&counters, map, Some(kind), &key, value, partition, *seq);
            }
            let ctx = (partition, &*table, &map_config);
            self.replicate_change(ctx, *seq, map, key.clone(), change, &mut acks);
        }
        if upserts && let Some((limit, byte_limit)) = self.partition_limit(&map_config, &table) {
            // Evictions are removals like any other: sequenced, replicated, and waited for with
            // the write that caused them. At most MAX_EVICTIONS_PER_WRITE per write, so a limit
            // that shrank (fewer partitions led) is reached over several writes rather than in
            // one long one.
            let mut evicted_here = 0;
            while (entries.len() > limit || entries.bytes() > byte_limit)
                && evicted_here < MAX_EVICTIONS_PER_WRITE
            {
                evicted_here += 1;
                let Some(victim) = pick_victim(&entries, &key, map_config.eviction.policy) else {
                    break;
                };
                let evicted = entries.remove(&victim).map(|r| r.value);
                MapCounters::bump(&counters.evictions);
                *seq += 1;
                self.emit(
                    &counters,
                    map,
                    Some(EntryEventKind::Evicted),
                    &victim,
                    evicted,
                    partition,
                    *seq,
                );
                let removal = proto::mutation::Change::Remove(true);
                let ctx = (partition, &*table, &map_config);
                self.replicate_change(ctx, *seq, map, victim, removal, &mut acks);
            }
        }
        Ok((Outcome::Done(result), acks))
    }

    /// How many entries, and how many estimated bytes, of a map one partition this member leads
    /// may hold, if the map has a limit it enforces: the per-member limits over the partitions
    /// led (at least one entry).
    fn partition_limit(
        &self,
        map_config: &crate::config::MapConfig,
        table: &PartitionTable,
    ) -> Option<(usize, u64)> {
        let eviction = map_config.eviction;
        if eviction.policy == EvictionPolicy::None
            || (eviction.max_entries_per_member.is_none()
                && eviction.max_bytes_per_member.is_none())
        {
            return None;
        }
        let led = self.partitions_led(table);
        let entries = eviction.max_entries_per_member.map_or(usize::MAX, |limit| {
            usize::try_from((limit / led).max(1)).unwrap_or(usize::MAX)
        });
        let bytes = eviction
            .max_bytes_per_member
            .map_or(u64::MAX, |limit| limit / led);
        Some((entries, bytes))
    }

    /// How many partitions this member leads in `table` (at least 1), remembered per table
    /// version: every bounded write asks.
    fn partitions_led(&self, table: &PartitionTable) -> u64 {
        // (version << 17) | count: partition counts stay below 2^17.
        let cached = self.led_cache.load(Ordering::Relaxed);
        if cached != 0 && cached >> 17 == table.version {
            return cached & ((1 << 17) - 1);
        }
        let led = (0..table.partition_count())
            .filter(|&p| table.primary(p) == Some(self.me))
            .count()
            .max(1) as u64;
        self.led_cache
            .store((table.version << 17) | led, Ordering::Relaxed);
        led
    }

    /// [`Node::replicate`] of the mutation numbered `seq` that makes `change` to `map`'s `key`,
    /// in (partition, table, map settings) `ctx`.
    pub(crate) fn replicate_change(
        &self,
        ctx: (u32, &PartitionTable, &crate::config::MapConfig),
        seq: u64,
        map: &str,
        key: Bytes,
        change: proto::mutation::Change,
        acks: &mut Acks,
    ) {
        let (partition, table, map_config) = ctx;
        let mutation = proto::Mutation {
            seq,
            map: map.to_string(),
            key,
            change: Some(change),
        };
        self.replicate(partition, table, mutation, map_config, acks);
    }

    /// Queues `mutation` for the partition's backups (the caller holds the write lock).
    pub(crate) fn replicate(
        &self,
        partition: u32,
        table: &PartitionTable,
        mutation: proto::Mutation,
        map_config: &crate::config::MapConfig,
        acks: &mut Acks,
    ) {
        let backups = table.backups(partition);
        let regular = usize::from(self.config.backup_count);
        let waited = map_config
            .backup_count
            .map_or(regular, |n| usize::from(n).min(regular));
        // Every backup gets every mutation so its sequence has no gaps. The map's first
        // `backup_count` backups are waited for, and so are replicas a migration step added
        // beyond the configured count: one of them may be promoted at the next step.
        for (i, &backup) in backups.iter().enumerate() {
            let ack = if (i < waited || i >= regular) && !map_config.async_backups {
                let (tx, rx) = oneshot::channel();
                acks.push((partition, rx));
                Some(tx)
            } else {
                None
            };
            self.replication.send(
                backup,
                Item::Mutation {
                    partition,
                    mutation: mutation.clone(),
                    ack,
                },
            );
        }
    }

    /// Waits for the backups of synchronous writes.
    ///
    /// A backup that took the mutation acknowledges it. A backup that would not take it (the
    /// partition moved meanwhile), or that this member declared down before it acknowledged,
    /// makes the write [`Error::NotBackedUp`], and a member that is stopping answers
    /// [`Error::Shutdown`]: in each case the write may be on this member only, so it is not
    /// acknowledged. (A backup declared down is not proof that this member is the healthy one: a
    /// member cut off from the cluster declares its backups down too, while the majority
    /// promotes them without the write.)
    pub(crate) async fn await_acks(&self, acks: Acks) -> Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let wait = self.config.rpc_timeout * 2;
        let answers = tokio::time::timeout(
            wait,
            futures::future::join_all(
                acks.into_iter()
                    .map(|(partition, rx)| async move { (partition, rx.await) }),
            ),
        )
        .await
        .map_err(|_| Error::Timeout {
            operation: "backup acknowledgement",
            member: self.me,
            after: wait,
        })?;
        for (partition, answer) in answers {
            match answer {
                Ok(Ack::Stored) => {}
                Ok(Ack::NotTaken | Ack::BackupGone) => {
                    return Err(Error::NotBackedUp { partition });
                }
                Err(_) => return Err(Error::Shutdown),
            }
        }
        Ok(())
    }

    /// Counts (and optionally clears) `map` in the partitions this member is primary of.
    pub(crate) async fn scan(
        self: &Arc<Self>,
        map: &str,
        clear: bool,
        caller_version: u64,
    ) -> Result<(u64, Vec<u32>)> {
        self.catch_up(caller_version).await;
        self.check_map_quorum(map, clear)?;
        let table = self.table.current();
        let candidates: Vec<u32> = (0..table.partition_count())
            .filter(|&p| table.primary(p) == Some(self.me))
            .collect();
        let mut owned = Vec::with_capacity(candidates.len());
        let mut count = 0u64;
        let mut acks = Vec::new();
        let map_config = self.config.map_config(map);
        let counters = self.counters(map);
        for partition in candidates {
            self.partition_ready(partition).await?;
            let data = self
                .store
                .partition(partition)
                .ok_or(Error::NoOwner { partition })?;
            // Counted and cleared under the write lock, as the partition's primary and not mid
            // takeover; otherwise it is left out and the caller retries it elsewhere.
            let mut seq = data.lock();
            let table = self.table.current();
            if table.primary(partition) != Some(self.me) || data.is_pending() {
                continue;
            }
            count += data.live_len(map, crate::store::now_ms(), map_config.max_idle_ms()) as u64;
            owned.push(partition);
            if clear {
                *seq += 1;
                let mutation = proto::Mutation {
                    seq: *seq,
                    map: map.to_string(),
                    key: Bytes::new(),
                    change: Some(proto::mutation::Change::Clear(true)),
                };
                data.apply_change(&mutation);
                self.emit(&counters, map, None, &Bytes::new(), None, partition, *seq);
                self.replicate(partition, &table, mutation, &map_config, &mut acks);
            }
        }
        self.await_acks(acks).await?;
        Ok((count, owned))
    }

    /// Installs `table` if it is newer and reacts to the change.
    ///
    /// Partitions this member becomes primary of while another member was are marked pending
    /// before the table is installed, so no operation runs on them until the takeover is done.
    ///
    /// A table published by a live member that is not the coordinator in this member's view is
    /// refused: a member that was cut off and coordinated a cluster of its own meanwhile must not
    /// hand its tables (and the stale copies they name) to the members it rejoins. Tables of a
    /// publisher that is gone are taken (a coordinator that just died); the coordinator's next
    /// table replaces them anyway.
    pub(crate) fn apply_table(self: &Arc<Self>, table: PartitionTable) -> bool {
        let _serial = self.table_lock.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.table.current();
        if !table.newer_than(&before) {
            return false;
        }
        // A member on its way into another cluster takes no table until it left its old one
        // (then only the new cluster's members are peers). Otherwise a member takes tables only
        // from the members it sees: a publisher it declared down (the other side of a split
        // that just healed, whose links work again before either side's membership says so)
        // may hold a table in which it leads partitions it took over alone, and taking that
        // table would make the members here drop their copies for it. Neither does a member
        // that merged away from a cluster take a table of that cluster's members again (until
        // one of them is back as a member of its new cluster).
        let joining = self
            .merge
            .joining
            .load(std::sync::atomic::Ordering::Acquire);
        let rejoined = self
            .merge
            .rejoined
            .load(std::sync::atomic::Ordering::Acquire);
        let foreign = table.publisher != self.me && self.membership.peer(table.publisher).is_none();
        if (joining && (!rejoined || table.publisher == self.me)) || foreign {
            tracing::debug!(
                member = %self.me,
                version = table.version,
                publisher = %table.publisher,
                joining,
                "refusing a table: this member is merging, or does not see its publisher"
            );
            return false;
        }
        if table.publisher != self.me
            && self.membership.peer(table.publisher).is_some()
            && self.coordinator() != Some(table.publisher)
        {
            tracing::debug!(
                member = %self.me,
                version = table.version,
                publisher = %table.publisher,
                coordinator = ?self.coordinator(),
                "refusing a table from a member that is not the coordinator"
            );
            return false;
        }
        // A table that records this member under an earlier generation gives it what it held
        // before it renewed its identity and dropped its copies: its coordinator has not seen it
        // renew yet, and will publish a table that leaves it out. (One that gives it nothing is
        // harmless.)
        if table.publisher != self.me
            && table
                .generation_of(self.me)
                .is_some_and(|g| g < self.membership.local_generation())
            && table.replicas.iter().any(|r| r.contains(&self.me))
        {
            tracing::debug!(
                member = %self.me,
                version = table.version,
                publisher = %table.publisher,
                "refusing a table from before this member renewed"
            );
            return false;
        }
        if self.leaves_out_live_members(&table, &before) {
            return false;
        }
        if table.publisher != self.me
            && (0..table.partition_count()).any(|p| {
                table.primary(p) == Some(self.me) && before.primary(p).is_some_and(|m| m != self.me)
            })
            && self
                .config
                .fault_switch
                .as_ref()
                .is_some_and(|s| s.take_promotion_withheld())
        {
            tracing::debug!(member = %self.me, version = table.version, "withholding a table that promotes this member (fault switch)");
            return false;
        }
        // The previous primary as the coordinator knew it, or as this member did.
        let takeovers: Vec<u32> = (0..table.partition_count())
            .filter(|&p| {
                table.primary(p) == Some(self.me)
                    && (table.previous_primary(p).is_some_and(|m| m != self.me)
                        || before.primary(p).is_some_and(|m| m != self.me))
            })
            .collect();
        for &p in &takeovers {
            if let Some(data) = self.store.partition(p) {
                data.begin_takeover();
            }
        }
        // A partition that had no primary anywhere before starts here, empty.
        for p in 0..table.partition_count() {
            if table.primary(p) == Some(self.me)
                && table.previous_primary(p).is_none()
                && before.primary(p).is_none()
                && let Some(data) = self.store.partition(p)
            {
                data.start_lineage();
                data.claim_copy();
            }
        }
        let new_version = table.version;
        let publisher = table.publisher;
        // Near caches drop what they hold of partitions that change primary before the table is
        // visible: an entry is served only while its source leads the key, and a source that
        // leads it again may have missed the writes of the primaries between.
        let moved: std::collections::HashSet<u32> = (0..table.partition_count())
            .filter(|&p| table.primary(p) != before.primary(p))
            .collect();
        if !moved.is_empty() {
            let nears: Vec<_> = self.near_caches.iter().map(|n| n.value().clone()).collect();
            for near in nears {
                near.drop_partitions(&moved);
            }
        }
        let previous = self
            .table
            .apply(table)
            .expect("newer table under the table lock");
        self.membership.set_established(true);
        let current = self.table.current();
        tracing::debug!(
            member = %self.me,
            version = new_version,
            %publisher,
            takeovers = takeovers.len(),
            "partition table applied"
        );
        // Near caches drop what they hold of a partition this member leads again: entries from
        // its earlier tenure may have missed the writes of the primaries between.
        if self.entry_events.receiver_count() > 0 {
            for p in 0..current.partition_count() {
                if current.primary(p) == Some(self.me) && previous.primary(p) != Some(self.me) {
                    let _ = self.entry_events.send(Arc::new(RawEntryEvent {
                        map: Arc::from(""),
                        kind: EntryEventKind::Removed,
                        clear: true,
                        key: Bytes::new(),
                        value: None,
                        partition: p,
                        seq: 0,
                        map_seq: 0,
                    }));
                }
            }
        }
        self.on_table_changed(&previous, &current, &takeovers);
        // Queue waiters held here look again: a queue this member no longer leads sends them on
        // to its new primary at once rather than when their wait ends.
        for signal in self.queue_signals.iter() {
            signal.value().notify_waiters();
        }
        true
    }

    /// Watches the tables this member's coordinator pushes for members it lists that this
    /// member saw go down and does not see since: the two of them each declared the other down
    /// (a verdict from a member that was itself being declared down can do it), while the
    /// coordinator and the rest see both. Nothing else reunites them: they have one
    /// coordinator, so no probe finds two clusters, and SWIM never takes an identity back once
    /// down. The coordinator publishes a new table as soon as a member it records goes (see
    /// [`crate::partition::coordinator`]), so tables that keep listing the member mean the
    /// coordinator keeps seeing it. Once that lasts the grace the membership task gives a down
    /// verdict (long enough for the coordinator to see a member that really went down), and
    /// not within four graces of the last time, the younger of the two
    /// merges back as a member declared down does, with a renewed identity that both sides
    /// take in, and hands over what it holds (a 30-minute Jepsen run stayed with two members
    /// apart this way for three minutes, until the harness gave up).
    pub(crate) fn notice_members_listed_but_down(&self, table: &PartitionTable) {
        let mut state = self
            .listed_but_down
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let from_coordinator = table.publisher != self.me
            && self.membership.peer(table.publisher).is_some()
            && self.coordinator() == Some(table.publisher)
            && table.members.contains(&self.me);
        if !from_coordinator {
            state.since.clear();
            return;
        }
        let apart: Vec<(MemberId, u64)> = table
            .members
            .iter()
            .filter(|&&id| id != self.me && self.membership.peer(id).is_none())
            .filter_map(|&id| self.membership.gone_generation(id).map(|g| (id, g)))
            // Listed under the generation that went: a member that renewed is merely not seen
            // here yet.
            .filter(|&(id, g)| table.generation_of(id).is_none_or(|listed| listed == g))
            .collect();
        state
            .since
            .retain(|id, _| apart.iter().any(|(a, _)| a == id));
        let swim = &self.config.swim;
        let grace = (swim.probe_period + swim.suspect_to_down_after) * 2
            + self.config.split_brain_probe_interval * 4;
        let me = (self.membership.local_generation(), self.me.as_u64());
        let now = std::time::Instant::now();
        let mut younger_than = None;
        for (id, generation) in apart {
            let since = *state.since.entry(id).or_insert(now);
            if now.duration_since(since) > grace && (generation, id.as_u64()) < me {
                younger_than = Some(id);
            }
        }
        // Not again soon after a merge back: two members that cannot reach each other, but both
        // reach the coordinator, would otherwise have the younger merge back every grace.
        if state
            .merged_back_at
            .is_some_and(|at| now.duration_since(at) < grace * 4)
        {
            return;
        }
        if let Some(peer) = younger_than {
            state.since.clear();
            state.merged_back_at = Some(now);
            drop(state);
            tracing::warn!(
                member = %self.me,
                %peer,
                "this member and one the coordinator lists see each other down: merging back"
            );
            self.membership.request_merge_back();
        }
    }

    /// Whether `table` (another member's) leaves out a member this member sees, heard from within
    /// the heartbeat tolerance, and that holds replicas in the current table: its coordinator
    /// lost sight of a member the rest still reach, and its tables would take that member's
    /// partitions away from it. Such a table is refused.
    ///
    /// The coordinator is then the member that was cut off: back from an isolation too short
    /// for the others to declare it down, it still coordinates them, and promoted backups for
    /// the members it declared down while alone (a Jepsen run: its stale copies served, and
    /// acknowledged inserts were lost). If it goes on publishing such tables for twice the
    /// tolerance, this member declares it down: the members that see each other form the
    /// cluster, and the coordinator merges back.
    fn leaves_out_live_members(&self, table: &PartitionTable, before: &PartitionTable) -> bool {
        if table.publisher == self.me || table.members.is_empty() {
            self.disagreement
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return false;
        }
        let tolerance = self.config.swim.heartbeat_tolerance();
        let left_out: Vec<MemberId> = self
            .membership
            .peer_identities()
            .into_iter()
            .filter(|p| {
                !table.members.contains(&p.id)
                    && before.replicas.iter().any(|r| r.contains(&p.id))
                    // A member that renewed since holds nothing of what `before` gave it.
                    && before
                        .generation_of(p.id)
                        .is_none_or(|g| g == p.generation)
                    && self.membership.heard_within(p.id, p.generation, tolerance)
            })
            .map(|p| p.id)
            .collect();
        let mut disagreement = self.disagreement.lock().unwrap_or_else(|p| p.into_inner());
        if left_out.is_empty() {
            disagreement.take();
            return false;
        }
        let now = std::time::Instant::now();
        let since = match *disagreement {
            Some((publisher, since)) if publisher == table.publisher => since,
            _ => {
                *disagreement = Some((table.publisher, now));
                now
            }
        };
        tracing::debug!(
            member = %self.me,
            version = table.version,
            publisher = %table.publisher,
            ?left_out,
            "refusing a table that leaves out members this member hears from"
        );
        if now.duration_since(since) > tolerance * 2
            && let Some(publisher) = self.membership.peer(table.publisher)
        {
            disagreement.take();
            self.membership.declare_down(publisher);
        }
        true
    }

    /// For each partition: take over from the previous primary if this member became primary;
    /// give backups a snapshot where their copy may be behind; forget partitions this member no
    /// longer replicates.
    fn on_table_changed(
        self: &Arc<Self>,
        previous: &PartitionTable,
        current: &PartitionTable,
        takeovers: &[u32],
    ) {
        for &partition in takeovers {
            let node = self.clone();
            // Whom to pull from: the previous primary per the coordinator, then per this member;
            // a member that held no copy also tries the other replicas it knew of.
            // A replica without a copy (its snapshot never arrived) pulls like a newcomer.
            let was_replica = previous.replicas(partition).contains(&self.me)
                && self
                    .store
                    .partition(partition)
                    .is_some_and(|d| d.has_copy());
            let mut sources: Vec<MemberId> = Vec::new();
            let candidates = current
                .previous_primary(partition)
                .into_iter()
                .chain(previous.primary(partition))
                .chain(if was_replica {
                    Vec::new()
                } else {
                    previous.replicas(partition).to_vec()
                });
            for candidate in candidates {
                if candidate != self.me && !sources.contains(&candidate) {
                    sources.push(candidate);
                }
            }
            let table = current.to_proto();
            let previous_primary = current
                .previous_primary(partition)
                .or(previous.primary(partition));
            // The other replicas, old and new: a promoted backup compares its copy with theirs.
            let mut others: Vec<MemberId> = Vec::new();
            for &m in previous
                .replicas(partition)
                .iter()
                .chain(current.replicas(partition))
            {
                if m != self.me && !others.contains(&m) {
                    others.push(m);
                }
            }
            tokio::spawn(async move {
                node.take_over(
                    partition,
                    sources,
                    others,
                    previous_primary,
                    was_replica,
                    table,
                )
                .await
            });
        }
        for partition in 0..current.partition_count() {
            let was = previous.replicas(partition).contains(&self.me);
            let is = current.replicas(partition).contains(&self.me);
            if current.primary(partition) == Some(self.me) {
                // A new backup gets a snapshot, taken when it is sent (after any takeover), so
                // the mutations queued after it follow it in order. Continuing backups are dealt
                // with when the takeover ends.
                for &backup in current.backups(partition) {
                    if !previous.replicas(partition).contains(&backup) {
                        self.replication.send(
                            backup,
                            Item::Snapshot {
                                partition,
                                ack: None,
                            },
                        );
                    }
                }
            }
            // A member keeps a partition it just lost for one table version, so a new primary
            // can still pull it from here.
            if !was && !is {
                if self
                    .store
                    .partition(partition)
                    .is_some_and(|d| d.has_copy())
                {
                    tracing::debug!(member = %self.me, partition, "dropping this member's copy");
                }
                self.store.drop_partition(partition);
            }
        }
    }

    /// Takes a partition over from its previous primary.
    ///
    /// The previous primary applies the new table first, so it stops writing, and flushes the
    /// mutations it already sent toward this member. If this member held an up-to-date copy (a
    /// backup, or a replica added for the move), the two compare sequence number and digest and
    /// nothing is copied; otherwise the partition is streamed in chunks. A live source that fails
    /// is retried until it answers or is declared down; one that refuses (it holds no copy) is
    /// skipped. A former replica whose sources are all gone keeps its own copy (promotion of a
    /// backup after a crash); a member that held none reports the loss. Gives up only when this
    /// member is no longer the partition's primary.
    #[tracing::instrument(name = "migration", level = "debug", skip_all, fields(partition = partition, ?previous_primary, was_replica = was_replica))]
    async fn take_over(
        &self,
        partition: u32,
        sources: Vec<MemberId>,
        others: Vec<MemberId>,
        previous_primary: Option<MemberId>,
        was_replica: bool,
        table: proto::Table,
    ) {
        let _ = self
            .partition_events
            .send(PartitionEvent::MigrationStarted {
                partition,
                from: sources.first().copied(),
            });
        self.stats
            .migrations_started
            .fetch_add(1, Ordering::Relaxed);
        let Some(data) = self.store.partition(partition) else {
            return;
        };
        let version = table.version;
        let outcome = self.pull(partition, &sources, table.clone()).await;
        let continuing = |node: &Self| {
            let current = node.table.current();
            current.backups(partition).to_vec()
        };
        match outcome {
            Pulled::FromPrevious | Pulled::Superseded => {}
            Pulled::FromReplica => {
                // Not the previous primary's last state: every backup gets this member's.
                for backup in continuing(self) {
                    self.replication.send(
                        backup,
                        Item::Snapshot {
                            partition,
                            ack: None,
                        },
                    );
                }
            }
            Pulled::Nothing => {
                if !(was_replica && data.has_copy()) {
                    tracing::error!(
                        member = %self.me,
                        partition,
                        "partition lost: no replica of it answered; it continues from this \
                         member's copy, if any, else empty"
                    );
                    self.stats.partitions_lost.fetch_add(1, Ordering::Relaxed);
                    let _ = self
                        .partition_events
                        .send(PartitionEvent::Lost { partition });
                    // Sequence numbers are lock fences' floor and entry versions: the afresh
                    // copy's must stay above any the lost one handed out, which were taken under
                    // older tables (the lost copy may only be on the other side of a split).
                    data.raise_seq(version.saturating_mul(1 << 32));
                    data.start_lineage();
                } else if self.catch_up_from_replicas(partition, &others, table).await {
                    tracing::info!(member = %self.me, partition, "promoted with the freshest copy among the other replicas");
                }
                // Promoted: a continuing backup may hold mutations of the dead primary that this
                // member never saw, or miss some it did; they get this member's copy.
                data.claim_copy();
                for backup in continuing(self) {
                    self.replication.send(
                        backup,
                        Item::Snapshot {
                            partition,
                            ack: None,
                        },
                    );
                }
            }
        }
        tracing::debug!(member = %self.me, partition, ?outcome, ?previous_primary, "takeover ended");
        self.stats
            .migrations_finished
            .fetch_add(1, Ordering::Relaxed);
        data.end_takeover();
        let _ = self
            .partition_events
            .send(PartitionEvent::MigrationFinished { partition });
    }

    /// Pulls `partition` from the first of `sources` that answers.
    #[tracing::instrument(name = "migration_pull", level = "debug", skip_all, fields(partition = partition))]
    async fn pull(&self, partition: u32, sources: &[MemberId], table: proto::Table) -> Pulled {
        let data = self.store.partition(partition).expect("partition in range");
        for (i, &source) in sources.iter().enumerate() {
            let mut backoff = std::time::Duration::from_millis(20);
            // A copy to compare first, when this member has one.
            let mut full = !data.has_copy();
            loop {
                if self.cancel.is_cancelled()
                    || self.table.current().primary(partition) != Some(self.me)
                {
                    return Pulled::Superseded;
                }
                let Some(peer) = self.membership.peer(source) else {
                    break; // Gone from the view: try the next source.
                };
                let request = proto::FetchSnapshotRequest {
                    partition,
                    table: Some(table.clone()),
                    full,
                };
                match self.fetch_from(&peer, request, full).await {
                    Ok(Fetched::Refused) => break,
                    Ok(Fetched::Header(header)) => {
                        let (seq, _, digest) = data.state();
                        if (header.seq, header.digest) == (seq, digest) {
                            data.adopt_lineage(header.lineage);
                            return self.pulled(i);
                        }
                        tracing::debug!(partition, %source, "copy differs from the source's; pulling it whole");
                        full = true;
                        continue;
                    }
                    Ok(Fetched::Whole(staged)) if staged.header.partition != partition => {
                        tracing::warn!(partition, %source, got = staged.header.partition, "a pull answered with another partition");
                    }
                    Ok(Fetched::Whole(staged)) => {
                        let bytes = staged
                            .maps
                            .values()
                            .map(|m| {
                                let mut bytes = 0;
                                m.for_each(|e| bytes += e.key().len() + e.value().len());
                                bytes
                            })
                            .sum::<usize>() as u64;
                        let (seq, entries) = (staged.header.seq, staged.header.entries);
                        tracing::debug!(member = %self.me, partition, %source, seq, entries, "pulled a whole partition");
                        if self.store.install(staged) {
                            self.stats
                                .migration_bytes_received
                                .fetch_add(bytes, Ordering::Relaxed);
                            return self.pulled(i);
                        }
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(partition, %source, %error, "pull failed; retrying");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
        Pulled::Nothing
    }

    /// A backup promoted after its primary went: if another replica holds a later state of the
    /// same lineage, this member takes it before it serves. Returns whether it did.
    ///
    /// The backups of a primary that was cut off from some of them are not equal: one that was
    /// on the primary's side has the writes the primary made since (applied and seen by reads,
    /// though not acknowledged to their writers, for lack of the other backup's answer), one
    /// that was cut off does not. Promoting the stale one, and then sending its copy to the
    /// other, dropped writes that reads had returned (a Jepsen run: a member isolated, declared
    /// its primary down, and on the heal became the partition's primary with its stale copy).
    async fn catch_up_from_replicas(
        &self,
        partition: u32,
        others: &[MemberId],
        table: proto::Table,
    ) -> bool {
        let Some(data) = self.store.partition(partition) else {
            return false;
        };
        let (own_seq, _, _) = data.state();
        let lineage = data.lineage();
        let wait = self.config.rpc_timeout;
        let mut freshest: Option<(u64, crate::membership::identity::Identity)> = None;
        for &other in others {
            let Some(peer) = self.membership.peer(other) else {
                continue;
            };
            let request = proto::FetchSnapshotRequest {
                partition,
                table: Some(table.clone()),
                full: false,
            };
            if let Ok(Ok(Fetched::Header(header))) =
                tokio::time::timeout(wait, self.fetch_from(&peer, request, false)).await
                && header.seq > own_seq
                && (lineage == 0 || header.lineage == lineage)
                && freshest.as_ref().is_none_or(|(seq, _)| header.seq > *seq)
            {
                freshest = Some((header.seq, peer));
            }
        }
        let Some((seq, peer)) = freshest else {
            return false;
        };
        let request = proto::FetchSnapshotRequest {
            partition,
            table: Some(table),
            full: true,
        };
        match tokio::time::timeout(wait * 2, self.fetch_from(&peer, request, true)).await {
            Ok(Ok(Fetched::Whole(staged)))
                if staged.header.partition == partition && staged.header.seq >= seq =>
            {
                self.store.install(staged)
            }
            _ => false,
        }
    }

    fn pulled(&self, source_index: usize) -> Pulled {
        if source_index == 0 {
            Pulled::FromPrevious
        } else {
            Pulled::FromReplica
        }
    }

    /// One fetch call: the header only, or the whole partition.
    async fn fetch_from(
        &self,
        peer: &crate::membership::identity::Identity,
        request: proto::FetchSnapshotRequest,
        full: bool,
    ) -> Result<Fetched> {
        let mut call = self.rpc.get_bulk(peer)?;
        let per_message = self.rpc.timeout();
        let response = tokio::time::timeout(
            per_message * 2,
            call.client.fetch_snapshot(self.rpc.request(request)),
        )
        .await
        .map_err(|_| Error::Timeout {
            operation: "fetch_snapshot",
            member: call.member,
            after: per_message * 2,
        })?;
        let mut stream = match response {
            Ok(stream) => stream.into_inner(),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                return Ok(Fetched::Refused);
            }
            Err(status) => return Err(call.error("fetch_snapshot", status)),
        };
        let mut staging = Staging::default();
        loop {
            // Each chunk must come within the rpc timeout: a stalled stream ends, a large one
            // does not.
            let next = tokio::time::timeout(per_message, stream.message())
                .await
                .map_err(|_| Error::Timeout {
                    operation: "fetch_snapshot chunk",
                    member: call.member,
                    after: per_message,
                })?
                .map_err(|status| call.error("fetch_snapshot", status))?;
            let Some(chunk) = next else { break };
            staging.push(chunk).map_err(|e| Error::BadSnapshot {
                member: call.member,
                reason: e.to_string(),
            })?;
            if !full && staging.header().is_some() {
                break;
            }
        }
        if !full {
            let header = staging.header().cloned().ok_or(Error::BadSnapshot {
                member: call.member,
                reason: "the stream ended before its header".to_string(),
            })?;
            return Ok(Fetched::Header(header));
        }
        staging
            .finish()
            .map(Fetched::Whole)
            .map_err(|e| Error::BadSnapshot {
                member: call.member,
                reason: e.to_string(),
            })
    }

    /// Answers a new primary's pull: applies its table first (so this member stops writing to
    /// the partition), flushes the mutations already queued for the caller, then streams the
    /// header and (for a full fetch) the contents. Refuses (`None`) when this member holds no
    /// copy (it dropped it), or when the pull is stale: made under an older table than this
    /// member's, for a partition this member is itself taking over (answering would wait on a
    /// takeover that may be waiting on the caller). The copy is kept until a later table drops
    /// it, so a lost answer can be asked for again.
    pub(crate) async fn fetch_snapshot(
        self: &Arc<Self>,
        from: Option<MemberId>,
        partition: u32,
        table: Option<&proto::Table>,
        full: bool,
    ) -> Result<Box<dyn Iterator<Item = proto::SnapshotChunk> + Send>, FetchRefused> {
        let requested =
            table.and_then(|t| PartitionTable::from_proto(t, self.config.partition_count));
        let requested_version = requested.as_ref().map_or(0, |t| t.version);
        if let Some(table) = requested {
            let (version, publisher) = (table.version, table.publisher);
            if self.apply_table(table) {
                tracing::debug!(member = %self.me, version, %publisher, ?from, partition, "applied the table a pull came with");
            }
        }
        let data = self
            .store
            .partition(partition)
            .ok_or(FetchRefused::NoCopy)?;
        if !data.has_copy()
            || (data.is_pending() && requested_version < self.table.current().version)
        {
            return Err(FetchRefused::NoCopy);
        }
        // Never hand over a partition this member still leads (it did not take the caller's
        // table): writes it accepted after the copy would be lost. The caller retries.
        if self.table.current().primary(partition) == Some(self.me) {
            return Err(FetchRefused::StillPrimary);
        }
        data.ready().await;
        if let Some(from) = from {
            // Bounded: a caller that stops answering gets whatever it has, and compares.
            self.replication
                .flush(from, self.config.rpc_timeout / 2)
                .await;
        }
        let snapshot = self.store.snapshot(partition).ok_or(FetchRefused::NoCopy)?;
        let version = self.table.current().version;
        if full {
            self.stats
                .migration_bytes_sent
                .fetch_add(snapshot.bytes, Ordering::Relaxed);
            let chunks = snapshot.chunks(version, self.config.snapshot_chunk_size);
            let (chunks, broken) = maybe_broken(chunks, self.config.fault_switch.as_ref());
            if broken {
                tracing::info!(partition, "fault switch: breaking this migration stream");
            }
            Ok(Box::new(chunks))
        } else {
            let header = proto::SnapshotChunk {
                part: Some(proto::snapshot_chunk::Part::Header(
                    snapshot.header(version, false),
                )),
            };
            Ok(Box::new(std::iter::once(header)))
        }
    }

    /// Records that `member` is leaving; returns whether some member is staying.
    pub(crate) fn mark_leaving(&self, member: MemberId) -> bool {
        let mut leaving = self.leaving.lock().unwrap_or_else(|p| p.into_inner());
        leaving.insert(member);
        self.membership
            .members()
            .iter()
            .any(|m| !leaving.contains(&m.id))
    }

    /// This member's view for `is_safe`: its table, handover and replication state, and the
    /// (seq, digest) of every partition it holds a replica of.
    pub(crate) fn replica_states(&self, only: &[u32]) -> proto::ReplicaStatesResponse {
        let table = self.table.current();
        let only: std::collections::HashSet<u32> = only.iter().copied().collect();
        proto::ReplicaStatesResponse {
            table_version: table.version,
            table_publisher: table.publisher.as_u64(),
            // Takeovers under way, and what a split-brain merge captured here and has not
            // handed over yet (its only copy): either makes the cluster unsafe.
            pending: u32::try_from(
                self.store.pending_count() as u64
                    + self
                        .merge
                        .pending
                        .load(std::sync::atomic::Ordering::Relaxed),
            )
            .unwrap_or(u32::MAX),
            snapshot_backlog: self.replication.snapshot_backlog(),
            partitions: (0..table.partition_count())
                .filter(|&p| table.replicas(p).contains(&self.me))
                .filter(|p| only.is_empty() || only.contains(p))
                .filter_map(|p| {
                    let (seq, _, digest) = self.store.replica_state(p)?;
                    Some(proto::PartitionState {
                        partition: p,
                        seq,
                        digest,
                    })
                })
                .collect(),
        }
    }

    /// Whether every partition is off this member: the current table gives it nothing, and every
    /// peer holds that table with no takeover pending (each new primary has pulled from here, or
    /// from a replica it had). Asks the peers by pushing them the current table.
    pub(crate) async fn handed_off(self: &Arc<Self>) -> bool {
        let table = self.table.current();
        if table.version == 0 || table.replicas.iter().any(|r| r.contains(&self.me)) {
            return false;
        }
        let peers = self.membership.peer_count();
        let answers = crate::partition::coordinator::publish(self).await;
        answers.len() == peers
            && answers.iter().all(|&(version, publisher, pending, _)| {
                (version, publisher) == (table.version, table.publisher.as_u64()) && pending == 0
            })
    }

    /// If a caller has a newer table than this member, fetch the newest from the coordinator.
    pub(crate) async fn catch_up(self: &Arc<Self>, caller_version: u64) {
        if caller_version > self.table.current().version {
            self.refresh_table(None).await;
        }
    }

    /// Fetches the table from `from` (default: the coordinator) and applies it if newer.
    pub(crate) async fn refresh_table(self: &Arc<Self>, from: Option<MemberId>) {
        let source = from
            .or_else(|| self.coordinator())
            .filter(|m| *m != self.me);
        let Some(Ok(mut call)) = source.map(|m| self.peer_client(m)) else {
            return;
        };
        if let Ok(table) = call
            .client
            .get_table(self.rpc.request(proto::GetTableRequest {}))
            .await
            && let Some(table) =
                PartitionTable::from_proto(table.get_ref(), self.config.partition_count)
        {
            let (version, publisher) = (table.version, table.publisher);
            if self.apply_table(table) {
                tracing::debug!(member = %self.me, version, %publisher, ?source, "applied a fetched table");
            }
        }
    }

    /// The oldest live member (smallest generation, then id).
    pub(crate) fn coordinator(&self) -> Option<MemberId> {
        Some(MemberId(self.membership.coordinator_key().1))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::partition::table::PartitionTable;
    use crate::{Grid, GridConfig, Map};

    async fn settled(grids: &[&Grid]) {
        for _ in 0..400 {
            let tables: Vec<_> = grids.iter().map(|g| g.partition_table()).collect();
            let same = tables.windows(2).all(|w| w[0] == w[1]);
            let pending: usize = grids.iter().map(|g| g.node().store.pending_count()).sum();
            let everyone_owns = grids.iter().all(|g| {
                let me = g.local_member().id;
                tables[0].replicas.iter().any(|r| r.first() == Some(&me))
            });
            if same && pending == 0 && everyone_owns {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the cluster did not settle");
    }

    /// Two members of a fresh cluster named after `name`, configured by `tune`, settled.
    async fn pair(name: &str, tune: impl Fn(&mut GridConfig)) -> (Grid, Grid) {
        let config = |seeds| {
            let mut config = GridConfig {
                cluster_name: format!("{name}-{}", std::process::id()),
                seeds,
                ..GridConfig::ephemeral()
            };
            tune(&mut config);
            config
        };
        let a = Grid::join(config(vec![])).await.unwrap();
        let b = Grid::join(config(vec![a.local_member().gossip_addr]))
            .await
            .unwrap();
        settled(&[&a, &b]).await;
        (a, b)
    }

    async fn present(map: &Map<String, u64>) -> usize {
        let mut n = 0;
        for i in 0..300u64 {
            if map.get(&format!("k{i}")).await.unwrap() == Some(i) {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn early_refresh_only_in_the_window_and_more_likely_near_the_end() {
        let window = std::time::Duration::from_millis(1000);
        let share = |remaining: u64| {
            (0..10_000)
                .filter(|_| super::refresh_early(1_000_000, 1_000_000 + remaining, window))
                .count()
        };
        assert_eq!(share(1_000), 0, "not before the window");
        assert_eq!(share(5_000), 0);
        assert!(share(500) > 4_000 && share(500) < 6_000);
        assert!(share(1) > 9_900);
        assert!(!super::refresh_early(5, 0, window), "no expiry: never");
        assert!(
            !super::refresh_early(5, 5, window),
            "expired: loaded the usual way"
        );
    }

    #[test]
    fn eviction_picks_the_least_recently_or_least_frequently_used_never_the_new_entry() {
        use crate::config::EvictionPolicy;
        use crate::store::{Entries, Record};
        let entries = Entries::new();
        for (key, last_access_ms, hits) in [("a", 30, 1), ("b", 10, 9), ("c", 20, 0), ("new", 0, 0)]
        {
            entries.insert(
                key.as_bytes(),
                &Record {
                    // Stored access times start in 2020.
                    last_access_ms: 1_700_000_000_000 + last_access_ms,
                    hits,
                    ..Record::default()
                },
            );
        }
        let keep = bytes::Bytes::from_static(b"new");
        for _ in 0..20 {
            // Small enough that the sample is the whole map, wherever it starts.
            assert_eq!(
                super::pick_victim(&entries, &keep, EvictionPolicy::Lru).as_deref(),
                Some(&b"b"[..])
            );
            assert_eq!(
                super::pick_victim(&entries, &keep, EvictionPolicy::Lfu).as_deref(),
                Some(&b"c"[..])
            );
        }
        let single = Entries::new();
        single.insert(&keep, &Record::default());
        assert_eq!(
            super::pick_victim(&single, &keep, EvictionPolicy::Lru),
            None
        );
    }

    /// A backup whose copy drifted from its primary's (corrupted at the same sequence number, or
    /// dropped) is found by anti-entropy and repaired, with no write to expose it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anti_entropy_repairs_a_drifted_backup() {
        let (a, b) = pair("anti-entropy-test", |c| {
            c.backup_count = 1;
            c.anti_entropy_interval = Duration::from_millis(100);
        })
        .await;
        a.wait_safe(Duration::from_secs(20)).await.unwrap();
        let map: Map<String, u64> = a.map("m");
        for i in 0..300u64 {
            map.set(&format!("k{i}"), &i).await.unwrap();
        }
        let table = a.partition_table();
        let led_by_a: Vec<u32> = (0..271u32)
            .filter(|&p| {
                table.replicas[p as usize][0] == a.local_member().id
                    && a.local_replica(p).unwrap().entries > 0
            })
            .collect();
        assert!(led_by_a.len() >= 2);
        let (corrupted, dropped) = (led_by_a[0], led_by_a[1]);
        let backup = b.node();
        backup
            .store
            .partition(corrupted)
            .unwrap()
            .entries_or_create("m")
            .insert(
                b"intruder",
                &crate::store::Record {
                    value: bytes::Bytes::from_static(b"x"),
                    version: 1,
                    ..Default::default()
                },
            );
        backup.store.drop_partition(dropped);
        assert_ne!(b.local_replica(corrupted), a.local_replica(corrupted));
        assert_ne!(b.local_replica(dropped), a.local_replica(dropped));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while b.local_replica(corrupted) != a.local_replica(corrupted)
            || b.local_replica(dropped) != a.local_replica(dropped)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "anti-entropy did not repair the backup"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(a.partition_stats().anti_entropy_repairs >= 2);
        a.wait_safe(Duration::from_secs(20)).await.unwrap();
        assert_eq!(present(&map).await, 300);
    }

    /// A table that names, as previous primaries, members that already handed their partitions
    /// over and dropped them (what a republish with stale `previous` entries produced) must not
    /// make the current primaries replace their data with empty snapshots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_with_stale_previous_primaries_wipes_nothing() {
        let (a, b) = pair("node-test", |c| c.backup_count = 0).await;
        let map: Map<String, u64> = a.map("m");
        for i in 0..300u64 {
            map.set(&format!("k{i}"), &i).await.unwrap();
        }
        assert_eq!(present(&map).await, 300);
        let coordinator = if a.node().coordinator() == Some(a.local_member().id) {
            &a
        } else {
            &b
        };
        let node = coordinator.node();
        let current = node.table.current();
        // Same replica sets, previous primaries from the table before (stale).
        node.apply_table(PartitionTable {
            version: current.version + 1,
            publisher: node.me,
            replicas: current.replicas.clone(),
            previous: current.previous.clone(),
            members: Vec::new(),
            generations: Vec::new(),
        });
        settled(&[&a, &b]).await;
        // And the republish the coordinator really makes.
        let current = node.table.current();
        node.apply_table(current.successor(node.me, Vec::new(), current.replicas.clone()));
        settled(&[&a, &b]).await;
        assert_eq!(present(&map).await, 300, "acknowledged writes survive");
    }
}
