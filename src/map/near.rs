//! The near cache (L1): a member's in-process copy of entries it read from other members.
//!
//! A `get` of a key whose primary is another member keeps the answer; later reads of the key on
//! this member are served from process memory, with no network, until the entry is invalidated,
//! expires (its own time to live, or the near cache's), idles out, or is evicted. Keys this
//! member leads are never cached: they are read from the store, already in process.
//!
//! # Invalidation
//!
//! Every change a primary applies (update, removal, expiry, eviction, clear) gets a number per
//! (map, partition) on that primary (`MapCounters::next_invalidation`) and goes to every member
//! with a near cache for the map, over one `Invalidations` stream per (member, map), in batches
//! of whatever accumulated while the previous batch was on the way. The stream opens with a
//! handshake carrying the primary's current number of every partition; afterwards the numbers of
//! a partition arrive consecutively, so a lost batch shows as a gap at the next invalidation of
//! the same partition, and the near cache drops that partition's entries.
//!
//! A lost invalidation with no later one is found by the repair round: every `repair_interval`
//! the near cache asks each member for its numbers (`InvalidationState`); a partition whose last
//! received number is still below what the member reported one round earlier lost an
//! invalidation, and its entries are dropped.
//!
//! An entry is cached only if the stream from the key's primary was open (its handshake received)
//! before the read was sent, and is still the same stream, under the same table, when the answer
//! arrives; an invalidation that arrives while the read is in flight cancels the caching. An
//! entry is served only while the member it came from is still the key's primary in this
//! member's table. When a stream ends (the member left, crashed, or the stream broke), every
//! entry from that member is dropped; a member that becomes primary of a partition again tells
//! the near caches to drop the partition (entries from its earlier tenure may have missed the
//! writes of the primaries between).
//!
//! # Staleness bound
//!
//! A remote update is seen once its invalidation arrives: one stream hop after the write is
//! applied on the primary (well under a millisecond on a LAN), before the writer's call returns
//! in most cases but not guaranteed to be. If the invalidation is lost, the entry is dropped at the
//! next invalidation of its partition, or at most two `repair_interval`s (plus one rpc timeout,
//! if the primary does not answer) after the write. This member's own writes invalidate its near
//! cache at once, before and after the write, so it reads its own writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::{EvictionPolicy, NearCacheConfig};
use crate::map::ops::OpResult;
use crate::membership::MemberId;
use crate::membership::identity::Identity;
use crate::node::Node;
use crate::rpc::proto;
use crate::store::now_ms;

/// Most invalidations in one batch.
const MAX_BATCH: usize = 1024;

/// How often the near cache checks for members to open a stream to, or whose stream ended.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

/// One key's slot.
enum Slot {
    /// A read is in flight; its answer is cached only if the slot is still this one.
    Reserved {
        id: u64,
        partition: u32,
        from: MemberId,
    },
    Cached(Cached),
}

struct Cached {
    value: Bytes,
    partition: u32,
    /// The member that answered, the key's primary then.
    from: MemberId,
    /// When the entry stops being served, in milliseconds since the Unix epoch (0: never).
    expires_at_ms: u64,
    last_access_ms: AtomicU64,
    hits: AtomicU32,
}

impl Slot {
    fn partition_and_source(&self) -> (u32, MemberId) {
        match self {
            Slot::Reserved {
                partition, from, ..
            } => (*partition, *from),
            Slot::Cached(c) => (c.partition, c.from),
        }
    }
}

/// An open invalidation stream from one member.
struct StreamState {
    /// Distinguishes this stream from an earlier or later one to the same member.
    generation: u64,
    /// Per partition, the last invalidation number received.
    last: Box<[AtomicU64]>,
    /// The member's numbers at the previous repair round.
    reported: std::sync::Mutex<Option<Vec<u64>>>,
}

/// The near cache's own counters.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    invalidations: AtomicU64,
    partitions_dropped: AtomicU64,
}

/// One map's near cache on this member.
pub(crate) struct NearCache {
    map: Arc<str>,
    config: NearCacheConfig,
    partition_count: u32,
    entries: DashMap<Bytes, Slot>,
    /// Open invalidation streams, by member.
    streams: DashMap<MemberId, Arc<StreamState>>,
    next_id: AtomicU64,
    /// Bumped whenever partitions are dropped: a read in flight across a drop is not cached.
    epoch: AtomicU64,
    counters: Counters,
}

/// A read whose answer may be cached (see [`NearCache::reserve`]). Dropping it without
/// [`NearCache::fill`] frees the slot.
pub(crate) struct Ticket {
    near: Arc<NearCache>,
    key: Bytes,
    id: u64,
    partition: u32,
    from: MemberId,
    generation: u64,
    table_version: u64,
    epoch: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.near.entries.remove_if(
            &self.key,
            |_, slot| matches!(slot, Slot::Reserved { id, .. } if *id == self.id),
        );
    }
}

/// The near cache's figures, for [`crate::MapStats`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NearStats {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) entries: u64,
    pub(crate) evictions: u64,
    pub(crate) expirations: u64,
    pub(crate) invalidations: u64,
    pub(crate) partitions_dropped: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl NearCache {
    /// A near cache for `map`, with its background task (streams and repair) running until the
    /// member stops.
    pub(crate) fn start(node: &Arc<Node>, map: Arc<str>, config: NearCacheConfig) -> Arc<Self> {
        let near = Arc::new(Self::new(map, config, node.config.partition_count));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(supervise(node.clone(), near.clone()));
            }
            // No stream will open: nothing is ever cached (reserve needs one).
            Err(_) => tracing::warn!(
                map = %near.map,
                "map handle created outside a tokio runtime: its near cache stays empty"
            ),
        }
        near
    }

    fn new(map: Arc<str>, config: NearCacheConfig, partition_count: u32) -> Self {
        NearCache {
            map,
            config,
            partition_count,
            entries: DashMap::new(),
            streams: DashMap::new(),
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The cached value of `key`, if it is cached, live, and came from `primary`, the key's
    /// primary in the current table. Counts a hit or a miss.
    pub(crate) fn lookup(&self, key: &[u8], primary: MemberId) -> Option<Bytes> {
        let now = now_ms();
        let mut drop_entry = false;
        if let Some(slot) = self.entries.get(key)
            && let Slot::Cached(c) = slot.value()
        {
            let idle = self.config.max_idle.is_some_and(|d| {
                c.last_access_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(millis(d))
                    <= now
            });
            if c.from != primary {
                drop_entry = true;
            } else if (c.expires_at_ms != 0 && c.expires_at_ms <= now) || idle {
                drop_entry = true;
                self.counters.expirations.fetch_add(1, Ordering::Relaxed);
            } else {
                c.last_access_ms.store(now, Ordering::Relaxed);
                c.hits.fetch_add(1, Ordering::Relaxed);
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Some(c.value.clone());
            }
        }
        if drop_entry {
            self.entries
                .remove_if(key, |_, slot| matches!(slot, Slot::Cached(_)));
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Marks `key` as being read from `primary` under table `table_version`, if an answer could
    /// be cached: the stream from `primary` is open and the cache has room (or may evict).
    pub(crate) fn reserve(
        self: &Arc<Self>,
        key: &Bytes,
        partition: u32,
        primary: MemberId,
        table_version: u64,
    ) -> Option<Ticket> {
        let generation = self.streams.get(&primary)?.generation;
        if self.config.eviction == EvictionPolicy::None
            && self.entries.len() >= self.config.max_entries
        {
            return None;
        }
        let id = self.next_id();
        let epoch = self.epoch.load(Ordering::Acquire);
        self.entries.insert(
            key.clone(),
            Slot::Reserved {
                id,
                partition,
                from: primary,
            },
        );
        Some(Ticket {
            near: self.clone(),
            key: key.clone(),
            id,
            partition,
            from: primary,
            generation,
            table_version,
            epoch,
        })
    }

    /// Caches a read's answer if nothing invalidated the key meanwhile, the stream is the one
    /// the reservation saw, and the table has not changed.
    pub(crate) fn fill(&self, ticket: Ticket, answer: &OpResult, table_version: u64) {
        let Some(value) = answer.value.clone().filter(|_| answer.found) else {
            return;
        };
        let same_stream = self
            .streams
            .get(&ticket.from)
            .is_some_and(|s| s.generation == ticket.generation);
        if !same_stream
            || table_version != ticket.table_version
            || self.epoch.load(Ordering::Acquire) != ticket.epoch
        {
            return;
        }
        let now = now_ms();
        let own = self.config.ttl.map_or(0, |t| now.saturating_add(millis(t)));
        let expires_at_ms = match (answer.expires_at_ms, own) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        if let Some(mut slot) = self.entries.get_mut(&ticket.key)
            && matches!(slot.value(), Slot::Reserved { id, .. } if *id == ticket.id)
        {
            *slot = Slot::Cached(Cached {
                value,
                partition: ticket.partition,
                from: ticket.from,
                expires_at_ms,
                last_access_ms: AtomicU64::new(now),
                hits: AtomicU32::new(0),
            });
        }
        // The ticket's drop finds a cached slot and leaves it.
        drop(ticket);
        self.evict_to_limit();
    }

    /// Drops `key` (a write by this member, or an invalidation from its primary).
    pub(crate) fn invalidate(&self, key: &[u8]) {
        if self.entries.remove(key).is_some() {
            self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops every entry and read in flight.
    pub(crate) fn invalidate_all(&self) {
        self.entries.clear();
    }

    /// Drops the entries (and reads in flight) of `partitions`, in one pass.
    pub(crate) fn drop_partitions(&self, partitions: &HashSet<u32>) {
        if partitions.is_empty() {
            return;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.counters
            .partitions_dropped
            .fetch_add(partitions.len() as u64, Ordering::Relaxed);
        self.entries
            .retain(|_, slot| !partitions.contains(&slot.partition_and_source().0));
    }

    /// Drops the entries (and reads in flight) that came from `member`.
    fn drop_member(&self, member: MemberId) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries
            .retain(|_, slot| slot.partition_and_source().1 != member);
    }

    /// Evicts entries once the cache is over its size limit: in one pass, the lowest-ranked
    /// entries down to 99% of the limit (at least one), so the pass costs O(entries) once per
    /// 1% of the limit of insertions rather than on each one.
    fn evict_to_limit(&self) {
        let max = self.config.max_entries;
        let len = self.entries.len();
        if len <= max {
            return;
        }
        let target = max - max / 100;
        let lfu = self.config.eviction == EvictionPolicy::Lfu;
        let mut ranked: Vec<((u64, u64), Bytes)> = self
            .entries
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Cached(c) => {
                    let access = c.last_access_ms.load(Ordering::Relaxed);
                    let rank = if lfu {
                        (u64::from(c.hits.load(Ordering::Relaxed)), access)
                    } else {
                        (access, 0)
                    };
                    Some((rank, e.key().clone()))
                }
                Slot::Reserved { .. } => None,
            })
            .collect();
        let excess = len.saturating_sub(target).min(ranked.len());
        if excess == 0 {
            return;
        }
        if excess < ranked.len() {
            ranked.select_nth_unstable_by_key(excess - 1, |(rank, _)| *rank);
        }
        for (_, key) in ranked.into_iter().take(excess) {
            if self
                .entries
                .remove_if(&key, |_, slot| matches!(slot, Slot::Cached(_)))
                .is_some()
            {
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies one batch from a stream: keys are dropped one by one, partitions (gaps and
    /// clears) together at the end.
    fn apply_batch(&self, stream: &StreamState, batch: proto::InvalidationBatch) {
        let mut dropped = HashSet::new();
        for item in batch.items {
            let Some(last) = stream.last.get(item.partition as usize) else {
                continue;
            };
            if item.seq != 0 {
                let before = last.load(Ordering::Acquire);
                if item.seq > before.saturating_add(1) {
                    // A gap: invalidations of this partition were lost.
                    dropped.insert(item.partition);
                }
                last.fetch_max(item.seq, Ordering::AcqRel);
            }
            if item.clear {
                dropped.insert(item.partition);
            } else {
                self.invalidate(&item.key);
            }
        }
        self.drop_partitions(&dropped);
    }

    /// Compares `member`'s reported numbers with what its stream delivered; drops the partitions
    /// that lost an invalidation.
    fn reconcile(&self, stream: &StreamState, reported: Vec<u64>) {
        let mut dropped = HashSet::new();
        {
            let mut previous = stream.reported.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(previous) = previous.as_ref() {
                for (p, (&was, last)) in previous.iter().zip(stream.last.iter()).enumerate() {
                    if last.load(Ordering::Acquire) < was {
                        dropped.insert(p as u32);
                        last.fetch_max(was, Ordering::AcqRel);
                    }
                }
            }
            *previous = Some(reported);
        }
        self.drop_partitions(&dropped);
    }

    /// This near cache's figures.
    pub(crate) fn stats(&self) -> NearStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NearStats {
            hits: get(&self.counters.hits),
            misses: get(&self.counters.misses),
            entries: self
                .entries
                .iter()
                .filter(|e| matches!(e.value(), Slot::Cached(_)))
                .count() as u64,
            evictions: get(&self.counters.evictions),
            expirations: get(&self.counters.expirations),
            invalidations: get(&self.counters.invalidations),
            partitions_dropped: get(&self.counters.partitions_dropped),
        }
    }
}

/// Keeps a stream open to every other member, closes those of members that left, and runs the
/// repair rounds, until the member stops.
async fn supervise(node: Arc<Node>, near: Arc<NearCache>) {
    let mut followers: std::collections::HashMap<MemberId, tokio::task::JoinHandle<()>> =
        std::collections::HashMap::new();
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    let mut repair = tokio::time::interval(near.config.repair_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => break,
            _ = tick.tick() => {
                let peers = node.membership.peer_identities();
                followers.retain(|member, task| {
                    let live = peers.iter().any(|p| p.id == *member);
                    if !live {
                        task.abort();
                        near.streams.remove(member);
                        near.drop_member(*member);
                    }
                    live && !task.is_finished()
                });
                for peer in peers {
                    if peer.id != node.me && !followers.contains_key(&peer.id) {
                        let task = tokio::spawn(follow(node.clone(), near.clone(), peer.clone()));
                        followers.insert(peer.id, task);
                    }
                }
            }
            _ = repair.tick() => {
                for member in repair_round(&node, &near).await {
                    // No answer: the stream may be stuck; drop its entries and open it again.
                    if let Some(task) = followers.remove(&member) {
                        task.abort();
                    }
                    near.streams.remove(&member);
                    near.drop_member(member);
                }
            }
        }
    }
    for task in followers.values() {
        task.abort();
    }
}

/// One repair round over every open stream; returns the members that did not answer.
async fn repair_round(node: &Arc<Node>, near: &Arc<NearCache>) -> Vec<MemberId> {
    let streams: Vec<(MemberId, Arc<StreamState>)> = near
        .streams
        .iter()
        .map(|s| (*s.key(), s.value().clone()))
        .collect();
    let calls = streams.into_iter().map(|(member, stream)| async move {
        let answer = async {
            let mut call = node.peer_client(member).ok()?;
            let response = call
                .client
                .invalidation_state(node.rpc.request(proto::InvalidationsRequest {
                    map: near.map.to_string(),
                }))
                .await
                .ok()?
                .into_inner();
            Some(response.seqs)
        }
        .await;
        match answer {
            Some(seqs) if seqs.len() == near.partition_count as usize => {
                near.reconcile(&stream, seqs);
                None
            }
            _ => Some(member),
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Follows `peer`'s invalidation stream until it ends; then drops the entries that came from it.
async fn follow(node: Arc<Node>, near: Arc<NearCache>, peer: Identity) {
    let Ok(mut call) = node.rpc.get_bulk(&peer) else {
        return;
    };
    let request = node.rpc.request_untimed(proto::InvalidationsRequest {
        map: near.map.to_string(),
    });
    let Ok(response) = call.client.invalidations(request).await else {
        tracing::debug!(peer = %peer.id, "could not open an invalidation stream");
        tokio::time::sleep(SUPERVISE_EVERY).await;
        return;
    };
    let mut stream = response.into_inner();
    let handshake = tokio::time::timeout(node.config.rpc_timeout, stream.message()).await;
    let Ok(Ok(Some(handshake))) = handshake else {
        return;
    };
    if handshake.seqs.len() != near.partition_count as usize {
        return;
    }
    let state = Arc::new(StreamState {
        generation: near.next_id(),
        last: handshake.seqs.into_iter().map(AtomicU64::new).collect(),
        reported: std::sync::Mutex::new(None),
    });
    // Closes the stream when this task ends in any way, aborted included.
    let _open = OpenStream {
        near: near.clone(),
        member: peer.id,
        generation: state.generation,
    };
    near.streams.insert(peer.id, state.clone());
    while let Ok(Some(batch)) = stream.message().await {
        near.apply_batch(&state, batch);
    }
}

/// A registered stream: when it ends (or its task is aborted), it is unregistered and the entries
/// read from its member are dropped.
struct OpenStream {
    near: Arc<NearCache>,
    member: MemberId,
    generation: u64,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.near
            .streams
            .remove_if(&self.member, |_, s| s.generation == self.generation);
        self.near.drop_member(self.member);
    }
}

/// The owner side of an `Invalidations` stream: a handshake with this member's numbers for
/// `map`, then batches of its changes to `map` (and "became primary" clears), until the caller
/// hangs up. Falling behind the change feed ends the stream: the near cache drops this member's
/// entries and opens a new one.
pub(crate) fn serve_invalidations(
    node: &Arc<Node>,
    map: Arc<str>,
) -> mpsc::Receiver<Result<proto::InvalidationBatch, Status>> {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let (tx, rx) = mpsc::channel(4);
    // Subscribed before the numbers are read: nothing numbered after them is missed.
    let mut events = node.entry_events.subscribe();
    let seqs = node.invalidation_state(&map);
    let node = node.clone();
    tokio::spawn(async move {
        let handshake = proto::InvalidationBatch {
            seqs,
            items: Vec::new(),
        };
        if tx.send(Ok(handshake)).await.is_err() {
            return;
        }
        let wanted = |event: &crate::map::listen::RawEntryEvent| {
            (event.map == map || (event.clear && event.map.is_empty())).then(|| {
                proto::Invalidation {
                    partition: event.partition,
                    seq: event.map_seq,
                    key: event.key.clone(),
                    clear: event.clear,
                }
            })
        };
        loop {
            let first = tokio::select! {
                _ = node.cancel.cancelled() => return,
                _ = tx.closed() => return,
                event = events.recv() => event,
            };
            let mut items = Vec::new();
            match first {
                Ok(event) => items.extend(wanted(&event)),
                Err(RecvError::Lagged(_) | RecvError::Closed) => return,
            }
            while items.len() < MAX_BATCH {
                match events.try_recv() {
                    Ok(event) => items.extend(wanted(&event)),
                    Err(TryRecvError::Empty) => break,
                    Err(_) => return,
                }
            }
            if items.is_empty() {
                continue;
            }
            if node
                .config
                .fault_switch
                .as_ref()
                .is_some_and(|f| f.take_invalidation_drop())
            {
                continue;
            }
            let batch = proto::InvalidationBatch {
                seqs: Vec::new(),
                items,
            };
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MemberId = MemberId(1);
    const B: MemberId = MemberId(2);

    fn near(max_entries: usize) -> Arc<NearCache> {
        let config = NearCacheConfig {
            max_entries,
            ..NearCacheConfig::default()
        };
        Arc::new(NearCache::new(Arc::from("m"), config, 4))
    }

    fn open_stream(near: &NearCache, member: MemberId, seqs: [u64; 4]) -> Arc<StreamState> {
        let state = Arc::new(StreamState {
            generation: near.next_id(),
            last: seqs.into_iter().map(AtomicU64::new).collect(),
            reported: std::sync::Mutex::new(None),
        });
        near.streams.insert(member, state.clone());
        state
    }

    fn found(value: &'static str) -> OpResult {
        OpResult {
            found: true,
            value: Some(Bytes::from_static(value.as_bytes())),
            ..OpResult::default()
        }
    }

    fn key(k: &'static str) -> Bytes {
        Bytes::from_static(k.as_bytes())
    }

    fn cache(near: &Arc<NearCache>, k: &'static str, partition: u32, from: MemberId) {
        let ticket = near
            .reserve(&key(k), partition, from, 7)
            .expect("a stream is open");
        near.fill(ticket, &found("v"), 7);
    }

    fn item(partition: u32, seq: u64, k: &'static str) -> proto::Invalidation {
        proto::Invalidation {
            partition,
            seq,
            key: key(k),
            clear: false,
        }
    }

    #[test]
    fn reads_are_cached_only_with_a_stream_and_served_only_from_the_current_primary() {
        let near = near(100);
        assert!(near.reserve(&key("k"), 0, A, 7).is_none(), "no stream yet");
        open_stream(&near, A, [0; 4]);
        cache(&near, "k", 0, A);
        assert_eq!(near.lookup(b"k", A).as_deref(), Some(&b"v"[..]));
        // The key moved to another primary: the entry is not served, and is dropped.
        assert_eq!(near.lookup(b"k", B), None);
        assert_eq!(near.lookup(b"k", A), None);
        let stats = near.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 0));
    }

    #[test]
    fn an_invalidation_or_a_new_stream_during_a_read_cancels_its_caching() {
        let near = near(100);
        open_stream(&near, A, [0; 4]);
        let ticket = near.reserve(&key("k"), 0, A, 7).unwrap();
        near.invalidate(b"k");
        near.fill(ticket, &found("old"), 7);
        assert_eq!(near.lookup(b"k", A), None, "invalidated while in flight");
        let ticket = near.reserve(&key("k"), 0, A, 7).unwrap();
        open_stream(&near, A, [0; 4]);
        near.fill(ticket, &found("old"), 7);
        assert_eq!(near.lookup(b"k", A), None, "the stream changed");
        let ticket = near.reserve(&key("k"), 0, A, 7).unwrap();
        near.fill(ticket, &found("old"), 8);
        assert_eq!(near.lookup(b"k", A), None, "the table changed");
        let ticket = near.reserve(&key("k"), 0, A, 7).unwrap();
        near.drop_partitions(&HashSet::from([3]));
        near.fill(ticket, &found("old"), 7);
        assert_eq!(
            near.lookup(b"k", A),
            None,
            "partitions were dropped meanwhile"
        );
        let ticket = near.reserve(&key("k"), 0, A, 7).unwrap();
        drop(ticket);
        assert!(near.entries.is_empty(), "an abandoned read frees its slot");
    }

    #[test]
    fn a_gap_in_a_partition_sequence_drops_that_partition_only() {
        let near = near(100);
        let stream = open_stream(&near, A, [5, 0, 0, 0]);
        cache(&near, "p0-a", 0, A);
        cache(&near, "p0-b", 0, A);
        cache(&near, "p1", 1, A);
        let batch = |items| proto::InvalidationBatch {
            seqs: Vec::new(),
            items,
        };
        // In sequence: only the key goes.
        near.apply_batch(&stream, batch(vec![item(0, 6, "p0-a")]));
        assert_eq!(near.lookup(b"p0-a", A), None);
        assert!(near.lookup(b"p0-b", A).is_some());
        // 7 was lost: 8 shows the gap, and partition 0 is dropped, partition 1 kept.
        near.apply_batch(&stream, batch(vec![item(0, 8, "other")]));
        assert_eq!(near.lookup(b"p0-b", A), None);
        assert!(near.lookup(b"p1", A).is_some());
        // An old number (sent before the handshake's) only drops its key.
        cache(&near, "p0-c", 0, A);
        near.apply_batch(&stream, batch(vec![item(0, 3, "p0-x")]));
        assert!(near.lookup(b"p0-c", A).is_some());
        // A clear drops the partition.
        near.apply_batch(
            &stream,
            batch(vec![proto::Invalidation {
                partition: 1,
                seq: 0,
                key: Bytes::new(),
                clear: true,
            }]),
        );
        assert_eq!(near.lookup(b"p1", A), None);
        // Out-of-range partitions are ignored.
        near.apply_batch(&stream, batch(vec![item(99, 1, "x")]));
        assert!(near.lookup(b"p0-c", A).is_some());
    }

    #[test]
    fn the_repair_round_finds_an_invalidation_lost_with_nothing_after_it() {
        let near = near(100);
        let stream = open_stream(&near, A, [0; 4]);
        cache(&near, "k", 2, A);
        // The member reports 1 for partition 2; the stream delivered nothing (the batch was lost).
        near.reconcile(&stream, vec![0, 0, 1, 0]);
        assert!(
            near.lookup(b"k", A).is_some(),
            "one round may just be early"
        );
        near.reconcile(&stream, vec![0, 0, 1, 0]);
        assert_eq!(
            near.lookup(b"k", A),
            None,
            "still behind after a full round"
        );
        // Delivered in time: nothing is dropped.
        cache(&near, "k", 2, A);
        near.reconcile(&stream, vec![0, 0, 2, 0]);
        near.apply_batch(
            &stream,
            proto::InvalidationBatch {
                seqs: Vec::new(),
                items: vec![item(2, 2, "other")],
            },
        );
        near.reconcile(&stream, vec![0, 0, 2, 0]);
        assert!(near.lookup(b"k", A).is_some());
    }

    #[test]
    fn the_size_limit_holds_and_lru_keeps_the_hot_entry() {
        let near = near(10);
        open_stream(&near, A, [0; 4]);
        cache(&near, "hot", 0, A);
        for i in 0..200 {
            let k: &'static str = Box::leak(format!("k{i}").into_boxed_str());
            std::thread::sleep(Duration::from_millis(2));
            assert!(
                near.lookup(b"hot", A).is_some(),
                "the hot entry was evicted at {i}"
            );
            cache(&near, k, 1, A);
            assert!(near.entries.len() <= 10);
        }
        assert!(near.stats().evictions >= 190);
        // A stream that ends takes its member's entries with it, whoever ends it.
        let generation = near.streams.get(&A).unwrap().generation;
        drop(OpenStream {
            near: near.clone(),
            member: B,
            generation,
        });
        assert!(
            near.streams.contains_key(&A),
            "another member's stream stays"
        );
        let member_gone = near.stats().entries;
        near.drop_member(A);
        assert!(member_gone > 0 && near.stats().entries == 0);
    }
}
