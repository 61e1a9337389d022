//! The merging member's side of a merge after a split, and the primary's side of a merged
//! entry. See the module docs of [`crate::split_brain`] for the protocol.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{MergeOutcome, MergingEntry};
use crate::error::{Error, Result};
use crate::lock::owner::{KEYED, NAMED};
use crate::lock::state::LockState;
use crate::map::listen::EntryEventKind;
use crate::map::ops::{MapOp, MergeEntry, OpResult};
use crate::map::stats::MapCounters;
use crate::membership::driver::Command;
use crate::node::{Acks, Node, Outcome};
use crate::rpc::proto;
use crate::store::Record;

/// Whether a merging entry (or queue item) from a copy of lineage `merging` is left out on a
/// primary whose copy has lineage `here`, for a structure `guarded` by split-brain protection.
///
/// A guarded structure on the smaller side of a split refused every operation once it stopped
/// hearing from enough members, and it could not acknowledge a write its backups on the other
/// side did not have. So where the larger side's copy descends from the same copy (same
/// lineage: it promoted a backup, or kept its primary), the smaller side has nothing the larger
/// side lacks; handing its copy over would only bring back what the larger side changed since:
/// queue items it polled, register values it overwrote or keys it removed (a Jepsen run polled
/// 80 queue items twice that way). Where the larger side started the partition afresh (no copy
/// of it was on its side), the smaller side's copy is the only one, and it is merged as usual.
/// Unguarded structures always merge: both sides served them during the split.
///
/// This assumes the smaller side never held the quorum after the sides parted. Views that
/// overlap after a heal broke that: a member that saw both sides made the side that later
/// merged away a quorum for a while (split-brain protection now counts only members with the
/// same view, and a member declared down stops counting at once). `tests/split_brain.rs`'s
/// overlapping-views test covers it. Table versions are counters, not terms, so a table a
/// quorum side served under can in principle still be replaced by one not derived from it
/// (the README's "Open" list).
pub(crate) fn superseded_by_same_lineage(merging: u64, here: u64, guarded: bool) -> bool {
    guarded && merging != 0 && merging == here
}

/// The internal map of merge tokens applied recently, per partition.
pub(crate) const MERGED: &str = "\u{0}merged";

/// How long a merge token is remembered.
const MERGE_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// How many captured items (entry batches, queues, lock fences) are handed over at once.
const IN_FLIGHT: usize = 8;

/// Most entries in one merge batch.
const MERGE_BATCH: usize = 256;

/// Bytes of keys and values after which a merge batch takes no more entries.
const MERGE_BATCH_BYTES: usize = 1 << 20;

/// How long a merging member waits for the larger cluster's table (at least; four rpc
/// timeouts if that is longer).
const JOIN_WITHIN: Duration = Duration::from_secs(10);

/// One thing a merging member captured from a partition copy it held.
#[derive(Debug, Clone)]
pub(crate) enum Captured {
    /// Map entries of one map in one partition copy (a batch: at most [`MERGE_BATCH`]
    /// entries, and about [`MERGE_BATCH_BYTES`]).
    Entries {
        partition: u32,
        map: Arc<str>,
        /// Each with its [`merge_identity`] as token: the hand-over applies once however often,
        /// and from however many copies, it is sent.
        entries: Vec<MergeEntry>,
        /// The lineage of the partition copy they come from.
        lineage: u64,
        /// Whether that copy was the partition's primary (else a backup's).
        from_primary: bool,
    },
    /// The waiting items of one queue, in queue order: (offer token, payload).
    Queue {
        partition: u32,
        map: Arc<str>,
        items: Vec<(u64, Bytes)>,
        /// The lineage of the partition copy they come from.
        lineage: u64,
    },
    /// A lock's fence counter.
    LockFence {
        partition: u32,
        map: &'static str,
        key: Bytes,
        fence: u64,
    },
}

impl Captured {
    /// How many entries, queue items or lock fences it holds.
    fn size(&self) -> u64 {
        match self {
            Captured::Entries { entries, .. } => entries.len() as u64,
            Captured::Queue { items, .. } => items.len() as u64,
            Captured::LockFence { .. } => 1,
        }
    }
}

/// The state of this member's merges, behind [`crate::Grid::split_brain_stats`].
#[derive(Default)]
pub(crate) struct MergeState {
    /// Bumped when this member merges into another cluster: lock holds taken before are gone.
    pub(crate) epoch: AtomicU64,
    /// Set from the capture until the larger cluster's table arrives: this member must not
    /// coordinate a cluster of its own meanwhile.
    pub(crate) joining: std::sync::atomic::AtomicBool,
    /// Set once a joining member left its old cluster (its peers are the new cluster's).
    pub(crate) rejoined: std::sync::atomic::AtomicBool,
    entries_merged: AtomicU64,
    queue_items_merged: AtomicU64,
    locks_merged: AtomicU64,
    /// Captured items not handed over yet.
    pub(crate) pending: AtomicU64,
    /// Entries and queue items of guarded structures a primary here left out of a merge: its
    /// copy descends from the one they came from (see [`superseded_by_same_lineage`]).
    pub(crate) superseded: AtomicU64,
    /// Hand-over attempts that failed and were retried.
    retries: AtomicU64,
    /// Hand-overs a new merge order interrupted.
    interrupted: AtomicU64,
}

/// Counters of this member's merges after network splits, from
/// [`crate::Grid::split_brain_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SplitBrainStats {
    /// How many times this member merged its cluster into another.
    pub merges: u64,
    /// Map entries handed to the other cluster's primaries (each decided by its map's merge
    /// policy there).
    pub entries_merged: u64,
    /// Queue items appended to the other cluster's queues.
    pub queue_items_merged: u64,
    /// Lock fence counters handed over.
    pub locks_merged: u64,
    /// Captured entries, queue items and lock fences still to hand over.
    pub pending: u64,
    /// Hand-over attempts that failed and were retried.
    pub retries: u64,
    /// Entries and queue items of structures with split-brain protection that a primary on
    /// this member left out of a merge, because its copy of the partition descends from the one
    /// they came from: the merging side could not have changed them (it had no quorum), and
    /// taking them would undo what this side did since (items polled, values overwritten).
    pub superseded: u64,
    /// Hand-overs a new merge order interrupted: what was not started yet went along with the
    /// new order (what was in flight finished first, so nothing is handed over twice).
    pub interrupted: u64,
}

impl MergeState {
    pub(crate) fn stats(&self) -> SplitBrainStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SplitBrainStats {
            merges: get(&self.epoch),
            entries_merged: get(&self.entries_merged),
            queue_items_merged: get(&self.queue_items_merged),
            locks_merged: get(&self.locks_merged),
            pending: get(&self.pending),
            retries: get(&self.retries),
            superseded: get(&self.superseded),
            interrupted: get(&self.interrupted),
        }
    }
}

/// The merge task: carries out each merge order, one at a time.
pub(crate) async fn run(node: Arc<Node>, commands: mpsc::Sender<Command>) {
    let mut orders = node.membership.subscribe_merge_orders();
    // What earlier merges could not hand over yet goes along with the next one.
    let mut carried: Vec<Captured> = Vec::new();
    let mut handled = 0;
    loop {
        // An order that interrupted the last hand-over is carried out at once.
        let (seq, targets) = orders.borrow_and_update().clone();
        if seq == handled || targets.is_empty() {
            tokio::select! {
                _ = node.cancel.cancelled() => return,
                changed = orders.changed() => if changed.is_err() { return },
            }
            continue;
        }
        handled = seq;
        // From the order on, no table is taken: the cluster being left may change its
        // coordinator and tables while this member waits for its takeovers, and a table taken
        // now could move away what it is about to capture.
        node.merge.joining.store(true, Ordering::Release);
        node.merge.rejoined.store(false, Ordering::Release);
        node.settle_takeovers().await;
        let mut captured = node.stop_leading_and_capture();
        captured.append(&mut carried);
        let items: u64 = captured.iter().map(Captured::size).sum();
        node.merge.pending.store(items, Ordering::Relaxed);
        node.merge.epoch.fetch_add(1, Ordering::Relaxed);
        let (done, joined) = oneshot::channel();
        if commands
            .send(Command::Rejoin { targets, done })
            .await
            .is_err()
        {
            return;
        }
        let Ok(identity) = joined.await else { return };
        node.merge.rejoined.store(true, Ordering::Release);
        tracing::info!(
            member = %node.me,
            generation = identity.generation,
            items,
            batches = captured.len(),
            "merging into the larger cluster"
        );
        carried = node.hand_over(captured, &mut orders).await;
    }
}

impl Node {
    /// Waits (up to an rpc timeout) for the takeovers of partitions this member is pulling to
    /// end, so what it captures is complete.
    async fn settle_takeovers(&self) {
        let deadline = tokio::time::Instant::now() + self.config.rpc_timeout;
        while self.store.pending_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops leading anything (the table is emptied, so every operation here is re-routed and
    /// no table of the old cluster is taken any more) and captures every partition copy this
    /// member holds as a replica in its table, primary's or backup's: map entries that are not
    /// expired, waiting queue items, and lock fences. Drops every partition copy and
    /// near-cached entry. Queue items and lock fences come first: they are few, and a queue's
    /// items handed over from two copies are told apart by their offer tokens only while the
    /// receiving queue remembers them.
    ///
    /// Not only what this member leads: the members of a cluster that merges away do not all
    /// hold the same table while it changes under them. A partition whose new primary missed
    /// the table that made it primary (or whose primary in this member's table is gone, or is
    /// already in the other cluster) would otherwise be captured by nobody, and every copy of
    /// it dropped: a Jepsen run lost 617 acknowledged inserts that way. The copies of one
    /// partition are handed over alike and told apart on the receiving primary (see
    /// [`merge_identity`]).
    fn stop_leading_and_capture(&self) -> Vec<Captured> {
        let _serial = self.table_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.merge.joining.store(true, Ordering::Release);
        self.merge.rejoined.store(false, Ordering::Release);
        let table = self.table.current();
        self.table.reset();
        self.membership.set_established(false);
        let now = crate::store::now_ms();
        let mut captured = Vec::new();
        let mut entries = Vec::new();
        for partition in 0..table.partition_count() {
            let Some(data) = self.store.partition(partition) else {
                continue;
            };
            let from_primary = table.primary(partition) == Some(self.me);
            // A backup's copy counts once it was installed (a new backup's may be partial).
            if from_primary || (table.replicas(partition).contains(&self.me) && data.has_copy()) {
                let _seq = data.lock();
                let lineage = data.lineage();
                for (map, contents) in data.maps() {
                    let copy = CopyOf {
                        partition,
                        lineage,
                        from_primary,
                    };
                    capture_map(copy, &map, &contents, now, &mut captured, &mut entries);
                }
            }
            self.store.drop_partition(partition);
        }
        // Entries of the copies this member led first: a backup's copy of a key that comes
        // after the primary's, while the receiving primary still remembers the first, is told
        // apart by its version (see `MergeRecord`).
        entries.sort_by_key(|c| {
            matches!(
                c,
                Captured::Entries {
                    from_primary: false,
                    ..
                }
            )
        });
        captured.append(&mut entries);
        let all: std::collections::HashSet<u32> = (0..table.partition_count()).collect();
        let nears: Vec<_> = self.near_caches.iter().map(|n| n.value().clone()).collect();
        for near in nears {
            near.drop_partitions(&all);
        }
        captured
    }

    /// Hands `captured` to the primaries of the cluster this member joined, once it has that
    /// cluster's table: entries and lock fences concurrently, each queue's items in order.
    /// Failed items are retried until they land, the member stops, or a new merge order comes
    /// (then they are returned, to go along with it).
    async fn hand_over(
        self: &Arc<Self>,
        captured: Vec<Captured>,
        orders: &mut tokio::sync::watch::Receiver<(u64, Vec<std::net::SocketAddr>)>,
    ) -> Vec<Captured> {
        let mut remaining = captured;
        let mut pause = Duration::from_millis(50);
        loop {
            // The larger cluster's table first.
            let mut tables = self.table.subscribe();
            let joined = tokio::time::timeout(
                JOIN_WITHIN.max(self.config.rpc_timeout * 4),
                tables.wait_for(|v| *v > 0),
            );
            tokio::select! {
                _ = self.cancel.cancelled() => return remaining,
                _ = orders.changed() => return remaining,
                joined = joined => if joined.is_err() {
                    // Nobody of the larger cluster answered: this member goes on alone (with
                    // what it captured) and its probes find the other cluster again.
                    tracing::warn!(member = %self.me, "the larger cluster did not take this member in; going on alone");
                    self.merge.joining.store(false, Ordering::Release);
                    continue;
                },
            }
            self.merge.joining.store(false, Ordering::Release);
            if remaining.is_empty() {
                return remaining;
            }
            // A new merge order stops new items from starting (they go along with the order,
            // unattempted); those in flight finish, so no queue item is handed over twice.
            let interrupted = Arc::new(AtomicBool::new(false));
            let node = self.clone();
            let stop = interrupted.clone();
            let attempts = futures::stream::iter(remaining)
                .map(|item| {
                    let node = node.clone();
                    let stop = stop.clone();
                    async move {
                        if stop.load(Ordering::Acquire) {
                            return (item, None);
                        }
                        let ok = node.hand_over_one(&item).await;
                        (item, Some(ok))
                    }
                })
                .buffer_unordered(IN_FLIGHT);
            tokio::pin!(attempts);
            let mut failed = Vec::new();
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => return failed,
                    changed = orders.changed(), if !interrupted.load(Ordering::Acquire) => {
                        if changed.is_ok() {
                            tracing::info!(member = %self.me, "a new merge order interrupts the hand-over");
                        }
                        interrupted.store(true, Ordering::Release);
                        self.merge.interrupted.fetch_add(1, Ordering::Relaxed);
                    }
                    next = attempts.next() => match next {
                        Some((item, Some(Ok(())))) => {
                            self.merge.pending.fetch_sub(item.size(), Ordering::Relaxed);
                        }
                        Some((item, Some(Err(e)))) => {
                            tracing::debug!(error = %e, "merge hand-over failed; retrying");
                            self.merge.retries.fetch_add(1, Ordering::Relaxed);
                            failed.push(item);
                        }
                        Some((item, None)) => failed.push(item),
                        None => break,
                    },
                }
            }
            if interrupted.load(Ordering::Acquire) {
                return failed;
            }
            if failed.is_empty() {
                tracing::info!(member = %self.me, stats = ?self.merge.stats(), "merge handed over");
                return failed;
            }
            remaining = failed;
            tokio::select! {
                _ = self.cancel.cancelled() => return remaining,
                _ = orders.changed() => return remaining,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn hand_over_one(self: &Arc<Self>, item: &Captured) -> Result<()> {
        if let Some(delay) = self
            .config
            .fault_switch
            .as_ref()
            .map(|switch| switch.merge_hand_over_delay())
            .filter(|delay| !delay.is_zero())
        {
            tokio::time::sleep(delay).await;
        }
        match item {
            Captured::Entries {
                partition,
                map,
                entries,
                lineage,
                from_primary,
            } => {
                let op = MapOp::Merge {
                    entries: entries.clone(),
                    from_primary: *from_primary,
                    lineage: *lineage,
                };
                self.route(*partition, map, Bytes::new(), op).await?;
                self.merge
                    .entries_merged
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
            Captured::Queue {
                partition,
                map,
                items,
                lineage,
            } => {
                for (token, payload) in items {
                    let op = MapOp::QueueOffer {
                        item: payload.clone(),
                        token: *token,
                        // Appended whatever the capacity: the items were acknowledged.
                        capacity: 0,
                        wait: Duration::ZERO,
                        lineage: *lineage,
                    };
                    self.route(*partition, map, Bytes::new(), op).await?;
                    self.merge
                        .queue_items_merged
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Captured::LockFence {
                partition,
                map,
                key,
                fence,
            } => {
                let op = MapOp::LockMerge { fence: *fence };
                self.route(*partition, map, key.clone(), op).await?;
                self.merge.locks_merged.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Merging entries on the partition's primary: the map's merge policy decides each, and
    /// the results are applied and replicated like writes.
    pub(crate) async fn merge_execute(
        &self,
        partition: u32,
        map: &str,
        op: MapOp,
    ) -> Result<Outcome<OpResult>> {
        // Nothing to wait for: applied once, as soon as the partition may be served.
        let never = tokio::sync::Notify::new();
        self.apply_waiting(
            partition,
            &never,
            Duration::ZERO,
            || self.merge_apply(partition, map, &op),
            |_| true,
        )
        .await
    }

    fn merge_apply(
        &self,
        partition: u32,
        map: &str,
        op: &MapOp,
    ) -> Result<(Outcome<OpResult>, Acks)> {
        let MapOp::Merge {
            entries,
            from_primary,
            lineage,
        } = op
        else {
            return Err(Error::Remote {
                member: self.me,
                code: tonic::Code::InvalidArgument,
                message: "not a merge".to_string(),
            });
        };
        let (data, mut seq, table) = match self.lock_leading(partition)? {
            Ok(locked) => locked,
            Err(outcome) => return Ok((outcome, Vec::new())),
        };
        let map_config = self.config.map_config(map);
        if superseded_by_same_lineage(
            *lineage,
            data.lineage(),
            map_config.split_brain_protection.is_some(),
        ) {
            self.merge
                .superseded
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            return Ok((Outcome::Done(OpResult::default()), Vec::new()));
        }
        let mut acks = Vec::new();
        let mut result = OpResult {
            applied: true,
            ..OpResult::default()
        };
        let target = MergeTarget {
            partition,
            map,
            data,
            table: &table,
            map_config: &map_config,
            now: crate::store::now_ms(),
        };
        for entry in entries {
            if self.merge_one(&target, entry, *from_primary, &mut seq, &mut acks) {
                result.count += 1;
            }
        }
        Ok((Outcome::Done(result), acks))
    }

    /// Merges one entry under the partition's write lock; whether it changed the entry here.
    fn merge_one(
        &self,
        target: &MergeTarget<'_>,
        entry: &MergeEntry,
        from_primary: bool,
        seq: &mut u64,
        acks: &mut Acks,
    ) -> bool {
        let MergeTarget {
            partition,
            map,
            data,
            table,
            map_config,
            now,
        } = *target;
        let key = &entry.key;
        let merged = data.entries_or_create(MERGED);
        let token_key = Bytes::copy_from_slice(&entry.token.to_be_bytes());
        let previous_token = merged.get(&token_key);
        // A merge of this identity applied before (its answer lost, or its backups unconfirmed;
        // or the same key handed over from another copy of the partition) is not applied again:
        // a user's policy need not be idempotent. Its record is written again, so the backups'
        // acknowledgement of this write covers the first one. Only a newer version of the key
        // in that copy's lineage (or, at one version, the primary's copy after a backup's) goes
        // on (see `MergeRecord::next`).
        let write_token = |seq: &mut u64, acks: &mut Acks, remembered: Bytes| {
            let record = Record {
                value: remembered,
                version: previous_token.as_ref().map_or(1, |r| r.version + 1),
                expires_at_ms: now.saturating_add(MERGE_DEDUP_WINDOW.as_millis() as u64),
                last_access_ms: now,
                updated_ms: now,
                ..Record::default()
            };
            merged.insert(&token_key, &record);
            *seq += 1;
            let change = proto::mutation::Change::Upsert(proto::Record::from(&record));
            let ctx = (partition, table, &self.config.map_config(MERGED));
            self.replicate_change(ctx, *seq, MERGED, token_key.clone(), change, acks);
        };
        let entries = data.entries_or_create(map);
        let stored = entries.get(key);
        let current = stored
            .as_ref()
            .filter(|r| !r.is_dead(now, map_config.max_idle_ms()));
        let next = previous_token.as_ref().map_or(Next::Decide, |r| {
            MergeRecord::decode(&r.value).map_or(Next::Skip, |earlier| {
                earlier.next(entry.version, from_primary, current.map(|r| r.version))
            })
        });
        if next == Next::Skip {
            let remembered = previous_token.as_ref().map(|r| r.value.clone());
            write_token(seq, acks, remembered.unwrap_or_default());
            return false;
        }
        let merging = MergingEntry {
            value: &entry.value,
            updated_ms: entry.updated_ms,
            hits: entry.hits,
            expires_at_ms: entry.expires_at_ms,
        };
        let existing = current.map(|r| MergingEntry {
            value: &r.value,
            updated_ms: r.updated_ms,
            hits: r.hits,
            expires_at_ms: r.expires_at_ms,
        });
        let decision = if next == Next::Replace {
            MergeOutcome::TakeMerging
        } else {
            map_config
                .merge_policy
                .decide(map, key, existing.as_ref(), &merging)
        };
        let version = current.map_or(1, |r| r.version + 1);
        let took = matches!(decision, MergeOutcome::TakeMerging);
        let record = match decision {
            MergeOutcome::KeepExisting => None,
            MergeOutcome::TakeMerging => Some(Record {
                value: entry.value.clone(),
                version,
                expires_at_ms: entry.expires_at_ms,
                last_access_ms: now,
                hits: entry.hits,
                updated_ms: entry.updated_ms,
            }),
            MergeOutcome::Value(value) => Some(Record {
                value,
                version,
                expires_at_ms: entry.expires_at_ms,
                last_access_ms: now,
                hits: 0,
                updated_ms: now,
            }),
            MergeOutcome::Remove => current.map(|_| Record::default()),
        };
        // A value beyond this member's limit (a policy's own, or a member configured apart)
        // is not stored; what was here stays.
        let record = record.filter(|r| {
            let fits = r.value.len() <= self.config.max_value_size;
            if !fits {
                tracing::warn!(
                    member = %self.me,
                    map,
                    size = r.value.len(),
                    max = self.config.max_value_size,
                    "a merged value is too large to store; the entry here stays"
                );
            }
            fits
        });
        let remembered = MergeRecord {
            version: entry.version,
            from_primary,
            outcome: match &record {
                None => Applied::Kept,
                Some(r) if took => Applied::Took(r.version),
                Some(_) => Applied::Decided,
            },
        };
        write_token(seq, acks, remembered.encode());
        let Some(record) = record else {
            return false;
        };
        let counters = self.counters(map);
        let removal = record.version == 0;
        let change = if removal {
            entries.remove(key);
            MapCounters::bump(&counters.removes);
            proto::mutation::Change::Remove(true)
        } else {
            entries.insert(key, &record);
            MapCounters::bump(&counters.puts);
            proto::mutation::Change::Upsert(proto::Record::from(&record))
        };
        *seq += 1;
        let kind = match (removal, current.is_some()) {
            (true, _) => EntryEventKind::Removed,
            (false, true) => EntryEventKind::Updated,
            (false, false) => EntryEventKind::Added,
        };
        let event_value = if removal {
            current.map(|r| r.value.clone())
        } else {
            Some(record.value.clone())
        };
        self.emit(
            &counters,
            map,
            Some(kind),
            key,
            event_value,
            partition,
            *seq,
        );
        let ctx = (partition, table, map_config);
        self.replicate_change(ctx, *seq, map, key.clone(), change, acks);
        true
    }
}

/// Where [`Node::merge_one`] merges: a partition this member leads, under its write lock.
#[derive(Clone, Copy)]
struct MergeTarget<'a> {
    partition: u32,
    map: &'a str,
    data: &'a crate::store::PartitionData,
    table: &'a crate::partition::table::PartitionTable,
    map_config: &'a crate::config::MapConfig,
    now: u64,
}

/// The partition copy a map is captured from.
#[derive(Debug, Clone, Copy)]
struct CopyOf {
    partition: u32,
    lineage: u64,
    /// Whether this member led the partition (else it held a backup's copy).
    from_primary: bool,
}

/// The identity of a merging entry: its key in one partition copy's lineage. The primary's
/// copy and its backups' copies of a key share it, so the receiving primary applies a key
/// handed over from several copies once, taking the newest version (and, at one version, the
/// primary's, whose reads are counted): see [`MergeRecord`].
pub(crate) fn merge_identity(partition: u32, lineage: u64, map: &str, key: &[u8]) -> u64 {
    let mut bytes = Vec::with_capacity(12 + 4 + map.len() + key.len());
    bytes.extend_from_slice(&partition.to_le_bytes());
    bytes.extend_from_slice(&lineage.to_le_bytes());
    bytes.extend_from_slice(&(map.len() as u32).to_le_bytes());
    bytes.extend_from_slice(map.as_bytes());
    bytes.extend_from_slice(key);
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// What a primary remembers of a merge it applied, under its identity in [`MERGED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MergeRecord {
    /// The merged entry's version in its copy.
    version: u64,
    /// Whether it came from the copy's primary.
    from_primary: bool,
    /// What the map's merge policy made of it.
    outcome: Applied,
}

/// What a merge did to the key, as [`MergeRecord`] remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The policy kept the entry that was here.
    Kept,
    /// The policy took the merging entry as it was; it was written here at this version.
    Took(u64),
    /// The policy made a value of its own, or removed the key.
    Decided,
}

impl MergeRecord {
    const LEN: usize = 18;

    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(u8::from(self.from_primary));
        let (kind, wrote) = match self.outcome {
            Applied::Kept => (0, 0),
            Applied::Took(version) => (1, version),
            Applied::Decided => (2, 0),
        };
        out.push(kind);
        out.extend_from_slice(&wrote.to_le_bytes());
        Bytes::from(out)
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let outcome = match bytes[9] {
            0 => Applied::Kept,
            1 => Applied::Took(word(10)),
            2 => Applied::Decided,
            _ => return None,
        };
        Some(Self {
            version: word(0),
            from_primary: bytes[8] != 0,
            outcome,
        })
    }

    /// What a merge of the same identity, of (`version`, `from_primary`), does given this
    /// earlier one and the version of the entry here now (if any). Only a newer one goes on: a
    /// later version, or the same one from the primary's copy after a backup's (which counted
    /// the reads). It takes the place of what the earlier one took, if nothing changed that
    /// since; it goes to the policy if the policy kept what was here, or if the entry changed
    /// since. A value of the policy's own making (or a removal) stays: the policy cannot be
    /// asked again about the entry that was here before it.
    fn next(&self, version: u64, from_primary: bool, current: Option<u64>) -> Next {
        if (version, from_primary) <= (self.version, self.from_primary) {
            return Next::Skip;
        }
        match self.outcome {
            Applied::Took(wrote) if current == Some(wrote) => Next::Replace,
            Applied::Took(_) | Applied::Kept => Next::Decide,
            Applied::Decided => Next::Skip,
        }
    }
}

/// What [`MergeRecord::next`] decides for a later merge of one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Applied already (or superseded): only the record is written again.
    Skip,
    /// Takes the place of the entry the earlier merge wrote.
    Replace,
    /// The map's merge policy decides, as for a first merge.
    Decide,
}

/// Captures one map of a partition copy: queue items and lock fences into `captured`, map
/// entries into `entries`.
fn capture_map(
    copy: CopyOf,
    map: &Arc<str>,
    contents: &crate::store::Entries,
    now: u64,
    captured: &mut Vec<Captured>,
    entries: &mut Vec<Captured>,
) {
    let CopyOf {
        partition, lineage, ..
    } = copy;
    if crate::queue::queue_of(map).is_some() {
        let mut items: BTreeMap<u64, (u64, Bytes)> = BTreeMap::new();
        contents.for_each(|stored| {
            if let Some((position, token, payload)) =
                crate::queue::owner::waiting_item(stored.key(), stored.value())
            {
                items.insert(position, (token, payload));
            }
        });
        if !items.is_empty() {
            captured.push(Captured::Queue {
                partition,
                map: map.clone(),
                items: items.into_values().collect(),
                lineage,
            });
        }
        return;
    }
    if &**map == NAMED || &**map == KEYED {
        let map = if &**map == NAMED { NAMED } else { KEYED };
        contents.for_each(|stored| {
            if let Some(state) = LockState::decode(stored.value()) {
                let fence = state
                    .holding
                    .as_ref()
                    .map_or(state.fence, |h| h.fence.max(state.fence));
                if fence > 0 {
                    captured.push(Captured::LockFence {
                        partition,
                        map,
                        key: Bytes::copy_from_slice(stored.key()),
                        fence,
                    });
                }
            }
        });
        return;
    }
    if map.starts_with('\u{0}') {
        // No other internal map carries state of its own.
        return;
    }
    let mut batch: Vec<MergeEntry> = Vec::new();
    let mut bytes = 0;
    let flush = |batch: &mut Vec<MergeEntry>, entries: &mut Vec<Captured>| {
        if !batch.is_empty() {
            entries.push(Captured::Entries {
                partition,
                map: map.clone(),
                entries: std::mem::take(batch),
                lineage,
                from_primary: copy.from_primary,
            });
        }
    };
    contents.for_each(|stored| {
        if stored.is_dead(now, 0) {
            return;
        }
        let record = stored.record();
        bytes += stored.key().len() + record.value.len();
        batch.push(MergeEntry {
            key: Bytes::copy_from_slice(stored.key()),
            token: merge_identity(partition, lineage, map, stored.key()),
            version: record.version,
            value: record.value,
            updated_ms: record.updated_ms,
            hits: record.hits,
            expires_at_ms: record.expires_at_ms,
        });
        if batch.len() >= MERGE_BATCH || bytes >= MERGE_BATCH_BYTES {
            flush(&mut batch, entries);
            bytes = 0;
        }
    });
    flush(&mut batch, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_records_round_trip() {
        for outcome in [Applied::Kept, Applied::Took(7), Applied::Decided] {
            let record = MergeRecord {
                version: 42,
                from_primary: true,
                outcome,
            };
            assert_eq!(MergeRecord::decode(&record.encode()), Some(record));
        }
        assert_eq!(MergeRecord::decode(b""), None);
        let mut bad = MergeRecord {
            version: 1,
            from_primary: false,
            outcome: Applied::Kept,
        }
        .encode()
        .to_vec();
        bad[9] = 9;
        assert_eq!(MergeRecord::decode(&bad), None);
    }

    #[test]
    fn only_a_newer_copy_of_a_merged_key_goes_on() {
        let took = MergeRecord {
            version: 5,
            from_primary: false,
            outcome: Applied::Took(3),
        };
        // The same version from a backup again, or an older one: applied already.
        assert_eq!(took.next(5, false, Some(3)), Next::Skip);
        assert_eq!(took.next(4, true, Some(3)), Next::Skip);
        // The primary's copy at the same version, or a later version: replaces it, if
        // unchanged since; else the policy decides.
        assert_eq!(took.next(5, true, Some(3)), Next::Replace);
        assert_eq!(took.next(6, false, Some(3)), Next::Replace);
        assert_eq!(took.next(6, false, Some(4)), Next::Decide);
        assert_eq!(took.next(6, false, None), Next::Decide);
        let kept = MergeRecord {
            outcome: Applied::Kept,
            ..took
        };
        assert_eq!(kept.next(6, false, Some(3)), Next::Decide);
        let decided = MergeRecord {
            outcome: Applied::Decided,
            ..took
        };
        assert_eq!(decided.next(6, true, Some(3)), Next::Skip);
    }

    #[test]
    fn the_copies_of_a_key_share_its_identity() {
        let id = merge_identity(3, 99, "m", b"k");
        assert_eq!(id, merge_identity(3, 99, "m", b"k"));
        assert_ne!(id, merge_identity(3, 98, "m", b"k"));
        assert_ne!(id, merge_identity(4, 99, "m", b"k"));
        // The map name's length is part of it: ("m", "xk") is not ("mx", "k").
        assert_ne!(
            merge_identity(3, 99, "m", b"xk"),
            merge_identity(3, 99, "mx", b"k")
        );
    }
}
