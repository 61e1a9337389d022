//! Primary-to-backup replication.
//!
//! The primary queues each mutation for each backup while it holds the partition's write lock, so
//! a backup's queue is in sequence order. One task per backup member drains its queue in batches
//! (up to [`MAX_BATCH_BYTES`]) into one `Replicate` call, retrying with backoff until the call
//! succeeds, the member is gone, or the grid stops. A backup that finds a gap answers with the
//! partition, and the task installs a fresh snapshot of it; a queued `Snapshot` item (a new backup
//! after a table change) does the same. Writers of synchronous maps wait for their mutation's
//! acknowledgement; when a backup member is declared down its queue is dropped, which releases
//! them with [`Ack::BackupGone`]: their writes fail as not backed up (outcome unknown), since the
//! member that declared the backup down may itself be the one cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Store;
use crate::error::{Error, Result};
use crate::membership::{MemberId, MembershipState};
use crate::partition::table::TableHolder;
use crate::rpc::client::RpcClients;
use crate::rpc::proto;

/// Upper bound of one `Replicate` call's payload (one mutation may exceed it alone).
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;

/// How a backup answered for one mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// The backup applied it (or installed a snapshot that contains it).
    Stored,
    /// The backup was declared down, or is no longer a live member, before it acknowledged: the
    /// write is not backed up.
    BackupGone,
    /// The backup would not take it: the partition moved to another primary meanwhile.
    NotTaken,
}

/// One entry of a backup's queue.
pub(crate) enum Item {
    /// A mutation, with the writer's acknowledgement channel for synchronous maps.
    Mutation {
        partition: u32,
        mutation: proto::Mutation,
        ack: Option<oneshot::Sender<Ack>>,
    },
    /// Install a snapshot of the partition, taken when the item is sent, with a channel for
    /// whether the backup installed it.
    Snapshot {
        partition: u32,
        ack: Option<oneshot::Sender<Ack>>,
    },
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Mutation { mutation, .. } => {
                // The encoded size, with room for the field tags and lengths.
                mutation.map.len()
                    + mutation.key.len()
                    + match &mutation.change {
                        Some(proto::mutation::Change::Upsert(r)) => r.value.len(),
                        _ => 0,
                    }
                    + 64
            }
            Item::Snapshot { .. } => 64,
        }
    }
}

/// What replicator tasks need.
pub(crate) struct Deps {
    /// This member.
    pub(crate) me: MemberId,
    pub(crate) store: Arc<Store>,
    pub(crate) rpc: Arc<RpcClients>,
    pub(crate) membership: Arc<MembershipState>,
    pub(crate) table: Arc<TableHolder>,
    pub(crate) cancel: CancellationToken,
    /// How long a backup that is missing from the membership view is waited for.
    pub(crate) give_up_after: Duration,
    /// Snapshot items queued or in flight, over every backup.
    pub(crate) snapshot_backlog: AtomicU64,
    /// Key and value bytes of the snapshots installed on backups.
    pub(crate) snapshot_bytes_sent: AtomicU64,
    /// [`crate::GridConfig::snapshot_chunk_size`].
    pub(crate) chunk_size: usize,
    /// [`crate::GridConfig::fault_switch`], which may break snapshot streams.
    pub(crate) fault_switch: Option<crate::FaultSwitch>,
}

struct Replicator {
    queue: mpsc::UnboundedSender<Item>,
    stop: CancellationToken,
    progress: Arc<Progress>,
}

/// How far a replicator got: items queued, and items answered (delivered, refused or released).
#[derive(Default)]
struct Progress {
    queued: AtomicU64,
    answered: AtomicU64,
    changed: tokio::sync::Notify,
}

/// The replication queues of this member, one per backup member.
pub(crate) struct Replication {
    deps: Arc<Deps>,
    replicators: DashMap<MemberId, Replicator>,
}

impl Replication {
    pub(crate) fn new(deps: Deps) -> Self {
        Replication {
            deps: Arc::new(deps),
            replicators: DashMap::new(),
        }
    }

    /// Queues `item` for `backup`. Never blocks: callers hold a partition's write lock.
    pub(crate) fn send(&self, backup: MemberId, item: Item) {
        if self.deps.membership.is_gone(backup) {
            // Declared down here already (the table naming it is not replaced yet): the write
            // is not backed up there, and its writer learns so now rather than after waiting
            // out a member that will not answer.
            resolve(
                &self.deps.store,
                &mut vec![item],
                &BTreeSet::new(),
                Ack::BackupGone,
            );
            return;
        }
        let mut replicator = self
            .replicators
            .entry(backup)
            .or_insert_with(|| self.start(backup));
        if replicator.stop.is_cancelled() && !self.deps.cancel.is_cancelled() {
            // Forgotten (declared down) and back since, under a new generation: the stopped
            // replicator releases what it held on its own.
            *replicator = self.start(backup);
        }
        replicator.progress.queued.fetch_add(1, Ordering::AcqRel);
        let snapshots = u64::from(matches!(item, Item::Snapshot { .. }));
        self.deps
            .snapshot_backlog
            .fetch_add(snapshots, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(item)) = replicator.queue.send(item) {
            self.deps
                .snapshot_backlog
                .fetch_sub(snapshots, Ordering::Relaxed);
            // The task ended (the member was given up on): the write is not backed up there.
            drop(replicator);
            self.replicators.remove(&backup);
            resolve(
                &self.deps.store,
                &mut vec![item],
                &BTreeSet::new(),
                Ack::BackupGone,
            );
        }
    }

    /// A replicator for `backup`, its task started.
    fn start(&self, backup: MemberId) -> Replicator {
        let (queue, rx) = mpsc::unbounded_channel();
        let stop = self.deps.cancel.child_token();
        let progress = Arc::new(Progress::default());
        tokio::spawn(run(
            self.deps.clone(),
            backup,
            rx,
            stop.clone(),
            progress.clone(),
        ));
        Replicator {
            queue,
            stop,
            progress,
        }
    }

    /// Waits until everything queued for `member` so far has been answered, or `timeout` passed;
    /// returns whether it was.
    pub(crate) async fn flush(&self, member: MemberId, timeout: Duration) -> bool {
        // Cloned out of the map: no guard is held across the wait.
        let Some(progress) = self.replicators.get(&member).map(|r| r.progress.clone()) else {
            return true;
        };
        let target = progress.queued.load(Ordering::Acquire);
        tokio::time::timeout(timeout, async {
            loop {
                let changed = progress.changed.notified();
                if progress.answered.load(Ordering::Acquire) >= target {
                    return;
                }
                changed.await;
            }
        })
        .await
        .is_ok()
    }

    /// Items queued for backups and not yet answered, over every backup.
    pub(crate) fn lag(&self) -> u64 {
        self.replicators
            .iter()
            .map(|r| {
                r.progress
                    .queued
                    .load(Ordering::Acquire)
                    .saturating_sub(r.progress.answered.load(Ordering::Acquire))
            })
            .sum()
    }

    /// Whether everything queued for `member` has been answered.
    pub(crate) fn idle(&self, member: MemberId) -> bool {
        self.replicators.get(&member).is_none_or(|r| {
            r.progress.answered.load(Ordering::Acquire) >= r.progress.queued.load(Ordering::Acquire)
        })
    }

    /// Key and value bytes of the snapshots installed on backups so far.
    pub(crate) fn snapshot_bytes_sent(&self) -> u64 {
        self.deps.snapshot_bytes_sent.load(Ordering::Relaxed)
    }

    /// Snapshots queued or in flight to backups.
    pub(crate) fn snapshot_backlog(&self) -> u64 {
        self.deps.snapshot_backlog.load(Ordering::Relaxed)
    }

    /// Stops replicating to a member that is gone; its pending acknowledgements are released.
    ///
    /// The stopped replicator stays until its task has released what it held: a read barrier
    /// takes a backup without one as idle, and must not before the released writes count as
    /// not backed up (see `run`). Replicators stopped earlier and fully released go now.
    pub(crate) fn forget(&self, member: MemberId) {
        if let Some(replicator) = self.replicators.get(&member) {
            replicator.stop.cancel();
        }
        self.replicators.retain(|_, r| {
            !(r.stop.is_cancelled()
                && r.progress.answered.load(Ordering::Acquire)
                    >= r.progress.queued.load(Ordering::Acquire))
        });
    }
}

async fn run(
    deps: Arc<Deps>,
    member: MemberId,
    mut queue: mpsc::UnboundedReceiver<Item>,
    stop: CancellationToken,
    progress: Arc<Progress>,
) {
    let answered = |n: usize| {
        progress.answered.fetch_add(n as u64, Ordering::AcqRel);
        progress.changed.notify_waiters();
    };
    let mut batch: Vec<Item> = Vec::new();
    // When the backup is forgotten (declared down), its pending writes stand without it; when
    // this member stops, the acknowledgements are dropped and the writers answer `Shutdown`.
    let release = |batch: &mut Vec<Item>, queue: &mut mpsc::UnboundedReceiver<Item>| {
        if deps.cancel.is_cancelled() {
            return;
        }
        queue.close();
        while let Ok(item) = queue.try_recv() {
            batch.push(item);
        }
        deps.snapshot_backlog
            .fetch_sub(count_snapshots(batch), Ordering::Relaxed);
        // Resolved (each write counted as not backed up on its partition) before the items
        // count as answered: a read barrier that waits for them looks at those counts as soon
        // as they are answered, and must not find them as they were (a guarded read on a
        // member that had just declared its backups down returned a write they never got).
        let n = batch.len();
        resolve(&deps.store, batch, &BTreeSet::new(), Ack::BackupGone);
        answered(n);
    };
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return release(&mut batch, &mut queue),
            item = queue.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        let mut bytes = first.bytes();
        batch.push(first);
        while bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(item) => {
                    bytes += item.bytes();
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(20);
        let mut missing_since: Option<Instant> = None;
        loop {
            match send_batch(&deps, member, &batch).await {
                Ok(not_taken) => {
                    deps.snapshot_backlog
                        .fetch_sub(count_snapshots(&batch), Ordering::Relaxed);
                    let n = batch.len();
                    resolve(&deps.store, &mut batch, &not_taken, Ack::Stored);
                    answered(n);
                    break;
                }
                Err(e) => {
                    if let Error::UnknownMember(_) = e {
                        let since = *missing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > deps.give_up_after {
                            tracing::warn!(%member, "backup is not a live member; dropping its replication queue");
                            return release(&mut batch, &mut queue);
                        }
                    } else {
                        tracing::debug!(%member, error = %e, "replication failed; retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return release(&mut batch, &mut queue),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    // Capped well below the acknowledgement deadline (twice the rpc timeout), so a
                    // healed link is retried before waiting writers give up.
                    let cap = (deps.give_up_after / 4)
                        .clamp(Duration::from_millis(20), Duration::from_secs(1));
                    backoff = (backoff * 2).min(cap);
                }
            }
        }
    }
}

fn count_snapshots(batch: &[Item]) -> u64 {
    batch
        .iter()
        .filter(|item| matches!(item, Item::Snapshot { .. }))
        .count() as u64
}

/// Answers every mutation of `batch` (and empties it): `NotTaken` for the partitions in
/// `not_taken`, `answer` for the rest.
/// Every answer but `Stored` is counted on the partition's copy (read barriers look at it).
fn resolve(store: &Store, batch: &mut Vec<Item>, not_taken: &BTreeSet<u32>, answer: Ack) {
    for item in batch.drain(..) {
        if let Item::Snapshot {
            partition,
            ack: Some(ack),
        } = item
        {
            let _ = ack.send(if not_taken.contains(&partition) {
                Ack::NotTaken
            } else {
                answer
            });
            continue;
        }
        if let Item::Mutation {
            partition,
            ack: Some(ack),
            ..
        } = item
        {
            let answer = if not_taken.contains(&partition) {
                Ack::NotTaken
            } else {
                answer
            };
            if answer != Ack::Stored
                && let Some(data) = store.partition(partition)
            {
                data.note_unconfirmed();
            }
            let _ = ack.send(answer);
        }
    }
}

/// Sends one batch: snapshots first (they cover every queued mutation of their partition), then
/// the mutations, then snapshots for any partition the backup reports a gap in. Returns the
/// partitions whose mutations the backup did not take (this member no longer leads them, or the
/// backup's table names another primary).
async fn send_batch(deps: &Deps, member: MemberId, batch: &[Item]) -> Result<BTreeSet<u32>> {
    let peer = deps
        .membership
        .peer(member)
        .ok_or(Error::UnknownMember(member))?;
    // Snapshots of partitions this member no longer leads are stale: the new primary serves the
    // backup now, and a late snapshot from here would overwrite its newer copy. Mutations still
    // go out while this member is the partition's previous primary: they are the tail of the
    // history the new primary takes over, and the backups (and the new primary, while it takes
    // over) accept them in sequence order.
    let table = deps.table.current();
    let leads = |partition: u32| table.primary(partition) == Some(deps.me);
    let hands_over =
        |partition: u32| leads(partition) || table.previous_primary(partition) == Some(deps.me);
    let mut not_taken: BTreeSet<u32> = batch
        .iter()
        .filter_map(|item| match item {
            Item::Mutation { partition, .. } if !hands_over(*partition) => Some(*partition),
            _ => None,
        })
        .collect();
    let snapshots: BTreeSet<u32> = batch
        .iter()
        .filter_map(|item| match item {
            Item::Snapshot { partition, .. } if leads(*partition) => Some(*partition),
            _ => None,
        })
        .collect();
    for &partition in &snapshots {
        if !install_snapshot(deps, &peer, partition).await? {
            not_taken.insert(partition);
        }
    }
    let mut by_partition: BTreeMap<u32, Vec<proto::Mutation>> = BTreeMap::new();
    for item in batch {
        if let Item::Mutation {
            partition,
            mutation,
            ..
        } = item
            && !snapshots.contains(partition)
            && hands_over(*partition)
        {
            by_partition
                .entry(*partition)
                .or_default()
                .push(mutation.clone());
        }
    }
    if by_partition.is_empty() {
        return Ok(not_taken);
    }
    let request = proto::ReplicateRequest {
        table_version: deps.table.current().version,
        partitions: by_partition
            .into_iter()
            .map(|(partition, mutations)| proto::PartitionMutations {
                partition,
                mutations,
                lineage: deps
                    .store
                    .partition(partition)
                    .map_or(0, |data| data.lineage()),
            })
            .collect(),
    };
    let mut call = deps.rpc.get(&peer)?;
    let response = call
        .client
        .replicate(deps.rpc.request(request))
        .await
        .map_err(|status| call.error("replicate", status))?
        .into_inner();
    if !response.rejected.is_empty() {
        tracing::debug!(%member, partitions = ?response.rejected, "backup does not take these partitions from this member");
    }
    not_taken.extend(response.rejected);
    for partition in response.resync {
        tracing::debug!(%member, partition, "backup reported a gap; sending a snapshot");
        if !install_snapshot(deps, &peer, partition).await? {
            not_taken.insert(partition);
        }
    }
    Ok(not_taken)
}

/// Installs a snapshot of `partition` on `peer`, streamed in chunks; `false` if the peer would
/// not take it.
#[tracing::instrument(name = "backup_snapshot", level = "debug", skip_all, fields(partition = partition, peer = %peer.id))]
async fn install_snapshot(
    deps: &Deps,
    peer: &crate::membership::identity::Identity,
    partition: u32,
) -> Result<bool> {
    // A partition this member is still pulling has nothing trustworthy to send yet.
    if let Some(data) = deps.store.partition(partition) {
        data.ready().await;
    }
    let Some(snapshot) = deps.store.snapshot(partition) else {
        return Ok(false);
    };
    let bytes = snapshot.bytes;
    let chunks = snapshot.chunks(deps.table.current().version, deps.chunk_size);
    let (chunks, _) = super::snapshot::maybe_broken(chunks, deps.fault_switch.as_ref());
    let mut call = deps.rpc.get_bulk(peer)?;
    let request = deps.rpc.bulk_request(futures::stream::iter(chunks), bytes);
    let answer = call
        .client
        .install_snapshot(request)
        .await
        .map_err(|status| call.error("install_snapshot", status))?;
    deps.snapshot_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    Ok(answer.into_inner().installed)
}
