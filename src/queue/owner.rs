//! The owner side of a queue: its items are entries of an internal map in the queue's
//! partition, so they are sequenced, replicated to the backups, copied by migrations and checked
//! by anti-entropy exactly like map entries.
//!
//! Each item is one entry keyed by its 8-byte big-endian position, valued `[state u8][offer
//! token u64][poll token u64][payload]`. A poll does not remove the item: it rewrites it as
//! taken, with the poll's token, to expire after [`DEDUP_WINDOW`]; so a retried offer (same
//! token) is not enqueued twice, and a retried poll (same token) gets the same items again, even
//! after a failover. Every operation is one mutation per item, applied and replicated under the
//! partition's write lock. The primary keeps an index of the queue (positions in order, tokens)
//! rebuilt from the entries whenever the partition's contents changed by other means (it took
//! the partition over, or installed a copy).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::Result;
use crate::map::listen::EntryEventKind;
use crate::map::ops::{MapOp, OpResult};
use crate::node::{Acks, Node, Outcome};
use crate::rpc::proto;
use crate::store::{Entries, Record};

/// How long a taken item is remembered, so a retried poll or offer is answered as the first
/// one was.
pub(crate) const DEDUP_WINDOW: Duration = Duration::from_secs(60);

const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const HEADER: usize = 17;

/// One decoded item entry.
pub(crate) struct Item {
    taken: bool,
    offer_token: u64,
    poll_token: u64,
}

fn encode(taken: bool, offer_token: u64, poll_token: u64, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + payload.len());
    out.put_u8(if taken { TAKEN } else { WAITING });
    out.put_u64_le(offer_token);
    out.put_u64_le(poll_token);
    out.put_slice(payload);
    out.freeze()
}

pub(crate) fn decode(value: &[u8]) -> Option<Item> {
    if value.len() < HEADER {
        return None;
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&value[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    Some(Item {
        taken: value[0] == TAKEN,
        offer_token: word(1),
        poll_token: word(9),
    })
}

/// The payload of an item entry (`None` for an entry too short to be one).
fn payload(value: &Bytes) -> Option<Bytes> {
    (value.len() >= HEADER).then(|| value.slice(HEADER..))
}

/// A waiting (not taken) item entry: its position, offer token and payload.
pub(crate) fn waiting_item(key: &[u8], value: &[u8]) -> Option<(u64, u64, Bytes)> {
    let item = decode(value)?;
    (!item.taken).then(|| {
        Some((
            position_of(key)?,
            item.offer_token,
            Bytes::copy_from_slice(&value[HEADER..]),
        ))
    })?
}

fn position_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn key_of(position: u64) -> Bytes {
    Bytes::copy_from_slice(&position.to_be_bytes())
}

/// The primary's view of one queue, derived from its entries.
#[derive(Default)]
pub(crate) struct QueueIndex {
    /// The partition epoch it was built under.
    epoch: Option<u64>,
    /// Positions of the waiting items, in order.
    waiting: VecDeque<u64>,
    /// Offer tokens seen (items waiting or taken within the window), by token.
    offers: HashMap<u64, u64>,
    /// Items taken by each poll token (within the window).
    polls: HashMap<u64, Vec<u64>>,
    next: u64,
    /// How many offer tokens the last rebuild found.
    tokens_at_rebuild: usize,
}

impl QueueIndex {
    fn rebuild(&mut self, entries: &Entries, epoch: u64) {
        let mut waiting = Vec::new();
        let mut offers = HashMap::new();
        let mut polls: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut next = 1;
        entries.for_each(|entry| {
            let (Some(position), Some(item)) = (position_of(entry.key()), decode(entry.value()))
            else {
                return;
            };
            next = next.max(position + 1);
            offers.insert(item.offer_token, position);
            if item.taken {
                polls.entry(item.poll_token).or_default().push(position);
            } else {
                waiting.push(position);
            }
        });
        waiting.sort_unstable();
        for taken in polls.values_mut() {
            taken.sort_unstable();
        }
        *self = QueueIndex {
            epoch: Some(epoch),
            waiting: waiting.into(),
            tokens_at_rebuild: offers.len(),
            offers,
            polls,
            next,
        };
    }
}

/// A change to one item entry.
enum Change {
    Upsert(u64, Record),
    ClearAll,
}

impl Node {
    /// Runs a queue operation on this member as the queue's primary, waiting up to the
    /// operation's `wait` (at most half an rpc timeout; the caller asks again) for an item or
    /// room.
    pub(crate) async fn queue_execute(
        self: &Arc<Self>,
        partition: u32,
        map: &str,
        op: MapOp,
    ) -> Result<Outcome<OpResult>> {
        let wait = match &op {
            MapOp::QueueOffer { wait, .. } | MapOp::QueuePoll { wait, .. } => *wait,
            _ => Duration::ZERO,
        };
        let signals = self.queue_signals(map);
        self.apply_waiting(
            partition,
            &signals,
            wait,
            || self.queue_apply(partition, map, &op),
            |result| match &op {
                MapOp::QueueOffer { .. } => result.applied,
                MapOp::QueuePoll { .. } => !result.items.is_empty(),
                _ => true,
            },
        )
        .await
    }

    /// The signal of `map`'s queue: notified whenever an item is added or taken.
    fn queue_signals(&self, map: &str) -> Arc<tokio::sync::Notify> {
        crate::node::get_or_make(&self.queue_signals, map, Default::default)
    }

    /// The synchronous part of a queue operation: ownership checks, the decision from the
    /// queue's index, and the mutations, applied, numbered and queued for the backups.
    fn queue_apply(
        &self,
        partition: u32,
        map: &str,
        op: &MapOp,
    ) -> Result<(Outcome<OpResult>, Acks)> {
        let (data, mut seq, table) = match self.lock_leading(partition)? {
            Ok(locked) => locked,
            Err(outcome) => return Ok((outcome, Vec::new())),
        };
        if let MapOp::QueueOffer { lineage, .. } = op {
            let guarded = crate::queue::queue_of(map)
                .is_some_and(|q| self.config.queue_config(q).split_brain_protection.is_some());
            if crate::split_brain::merge::superseded_by_same_lineage(
                *lineage,
                data.lineage(),
                guarded,
            ) {
                self.merge
                    .superseded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let result = OpResult {
                    applied: true,
                    ..OpResult::default()
                };
                return Ok((Outcome::Done(result), Vec::new()));
            }
        }
        let mut acks = Vec::new();
        let entries = data.entries_or_create(map);
        let index = self.queue_index(map);
        let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = data.epoch();
        if index.epoch != Some(epoch) {
            index.rebuild(&entries, epoch);
        }
        let now = crate::store::now_ms();
        let mut result = OpResult::default();
        let mut changes = Vec::new();
        // A retry whose first attempt is known writes this entry again, unchanged but numbered:
        // the backups apply in order, so acknowledging it acknowledges the first attempt too
        // (which may not be on the backups yet).
        let touch = |position: u64, changes: &mut Vec<Change>| {
            if let Some(record) = entries.get(&key_of(position)) {
                changes.push(Change::Upsert(
                    position,
                    Record {
                        version: record.version + 1,
                        ..record
                    },
                ));
            }
        };
        // Polls stop taking items once their answer would be this large.
        let answer_budget = self.config.max_message_size() / 2;
        match op {
            MapOp::QueueOffer {
                item,
                token,
                capacity,
                ..
            } => {
                if let Some(&position) = index.offers.get(token) {
                    result.applied = true;
                    touch(position, &mut changes);
                } else if *capacity == 0 || (index.waiting.len() as u64) < *capacity {
                    let position = index.next;
                    index.next += 1;
                    index.waiting.push_back(position);
                    index.offers.insert(*token, position);
                    result.applied = true;
                    changes.push(Change::Upsert(
                        position,
                        Record {
                            value: encode(false, *token, 0, item),
                            version: 1,
                            expires_at_ms: 0,
                            last_access_ms: now,
                            hits: 0,
                            updated_ms: now,
                        },
                    ));
                }
            }
            MapOp::QueuePoll { token, max, .. } => {
                if let Some(taken) = index.polls.get(token).cloned() {
                    // A retry: the same items again (while they are remembered).
                    for &position in &taken {
                        if let Some(item) = entries
                            .get(&key_of(position))
                            .and_then(|record| payload(&record.value))
                        {
                            result.items.push(item);
                        }
                    }
                    if let Some(&first) = taken.first() {
                        touch(first, &mut changes);
                    }
                }
                if result.items.is_empty() {
                    index.polls.remove(token);
                    let mut taken = Vec::new();
                    let mut bytes = 0;
                    while taken.len() < *max as usize && (taken.is_empty() || bytes < answer_budget)
                    {
                        let Some(position) = index.waiting.pop_front() else {
                            break;
                        };
                        let Some(record) = entries.get(&key_of(position)) else {
                            continue;
                        };
                        let (Some(item), Some(payload)) =
                            (decode(&record.value), payload(&record.value))
                        else {
                            continue;
                        };
                        bytes += payload.len();
                        result.items.push(payload.clone());
                        taken.push(position);
                        changes.push(Change::Upsert(
                            position,
                            Record {
                                value: encode(true, item.offer_token, *token, &payload),
                                version: record.version + 1,
                                expires_at_ms: now.saturating_add(DEDUP_WINDOW.as_millis() as u64),
                                last_access_ms: now,
                                hits: 0,
                                updated_ms: now,
                            },
                        ));
                    }
                    if !taken.is_empty() {
                        index.polls.insert(*token, taken);
                    }
                }
                result.applied = !result.items.is_empty();
            }
            MapOp::QueuePeek => {
                if let Some(item) = index
                    .waiting
                    .front()
                    .and_then(|&position| entries.get(&key_of(position)))
                    .and_then(|record| payload(&record.value))
                {
                    result.items.push(item);
                }
            }
            MapOp::QueueLen => result.count = index.waiting.len() as u64,
            MapOp::QueueClear => {
                result.count = index.waiting.len() as u64;
                index.waiting.clear();
                index.offers.clear();
                index.polls.clear();
                changes.push(Change::ClearAll);
            }
            _ => {}
        }
        let map_config = self.config.map_config(map);
        let counters = self.counters(map);
        for change in changes {
            *seq += 1;
            let (key, change, kind, payload) = match change {
                Change::Upsert(position, record) => {
                    let key = key_of(position);
                    let kind = if decode(&record.value).is_some_and(|i| i.taken) {
                        EntryEventKind::Removed
                    } else {
                        EntryEventKind::Added
                    };
                    entries.insert(&key, &record);
                    let payload = payload(&record.value).unwrap_or_default();
                    (
                        key,
                        proto::mutation::Change::Upsert(proto::Record::from(&record)),
                        Some(kind),
                        Some(payload),
                    )
                }
                Change::ClearAll => (
                    Bytes::new(),
                    proto::mutation::Change::Clear(true),
                    None,
                    None,
                ),
            };
            let mutation = proto::Mutation {
                seq: *seq,
                map: map.to_string(),
                key: key.clone(),
                change: Some(change),
            };
            if kind.is_none() {
                data.apply_change(&mutation);
            }
            self.emit(&counters, map, kind, &key, payload, partition, *seq);
            self.replicate(partition, &table, mutation, &map_config, &mut acks);
        }
        // The index now matches the contents under this epoch (own changes do not bump it),
        // unless it remembers twice as many tokens as at its last rebuild: taken items expire,
        // and the next operation rebuilds it without them (amortized over the doubling).
        index.epoch = Some(epoch);
        if index.offers.len() > 2 * index.tokens_at_rebuild + 4096 {
            index.epoch = None;
        }
        drop(index);
        drop(seq);
        if result.applied || matches!(op, MapOp::QueueClear) {
            self.queue_signals(map).notify_waiters();
        }
        Ok((Outcome::Done(result), acks))
    }

    fn queue_index(&self, map: &str) -> Arc<std::sync::Mutex<QueueIndex>> {
        crate::node::get_or_make(&self.queue_indexes, map, Default::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_encode_and_the_index_rebuilds_in_order() {
        let entries = Entries::new();
        let record = |value| Record {
            value,
            version: 1,
            ..Record::default()
        };
        entries.insert(&key_of(3), &record(encode(false, 30, 0, b"c")));
        entries.insert(&key_of(1), &record(encode(true, 10, 7, b"a")));
        entries.insert(&key_of(2), &record(encode(false, 20, 0, b"b")));
        entries.insert(b"junk", &record(Bytes::from_static(b"x")));
        let mut index = QueueIndex::default();
        index.rebuild(&entries, 5);
        assert_eq!(index.waiting, VecDeque::from([2, 3]));
        assert_eq!(index.next, 4);
        assert_eq!(index.polls[&7], vec![1]);
        assert_eq!(index.offers.len(), 3);
        assert_eq!(index.epoch, Some(5));
        let item = decode(&encode(true, 1, 2, b"payload")).unwrap();
        assert!(item.taken && item.offer_token == 1 && item.poll_token == 2);
        assert!(decode(b"short").is_none());
    }
}
