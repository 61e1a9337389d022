//! The distributed queue: [`Queue`], the typed handle, and `owner`, the primary's side.
//!
//! A queue lives in the partition of its name, on its primary and backups, stored as the
//! entries of an internal map (see `owner`). Every method is a round trip to the primary (none
//! when this member is the primary); blocking waits are held by the primary for up to half an
//! rpc timeout at a time and asked again until the caller's deadline.
//!
//! # Delivery
//!
//! Items come out in the order the primary accepted them (FIFO across all members; one
//! producer's items in the order it offered them, since each offer returns before the next).
//! An acknowledged offer is on the backups (unless the grid has no backups) and survives the
//! primary's crash; an offer retried after a timeout carries the same token and is not enqueued
//! twice. An item is handed out once: a poll retried after a timeout or a failover carries the
//! same token and gets the same items again, for [`owner::DEDUP_WINDOW`]. Items taken by a poll
//! whose caller gives up (dropped future, crashed process) are not given to anyone else.

pub(crate) mod owner;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::codec;
use crate::error::{Error, Result};
use crate::map::ops::{MapOp, OpResult};
use crate::node::Node;
use crate::partition::key::partition_of;

/// The prefix of a queue's internal map name.
const PREFIX: &str = "\u{0}queue:";

/// The queue a map name belongs to, if it is a queue's internal map.
pub(crate) fn queue_of(map: &str) -> Option<&str> {
    map.strip_prefix(PREFIX)
}

/// `timeout` from now, or far in the future.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Whether a failed attempt may be made again with the same token before `deadline`: its
/// outcome is unknown or no member could take it yet (a failover in progress).
fn retry_within(error: &Error, deadline: Instant) -> bool {
    Instant::now() < deadline
        && (matches!(error, Error::RetriesExhausted { .. })
            || crate::routing::outcome_unknown(error))
}

/// The pause before asking again after a failed attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// A distributed FIFO queue of `T`, from [`crate::Grid::queue`]. Cloning is cheap.
pub struct Queue<T> {
    node: Arc<Node>,
    name: Arc<str>,
    map: Arc<str>,
    partition: u32,
    capacity: u64,
    _items: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            node: self.node.clone(),
            name: self.name.clone(),
            map: self.map.clone(),
            partition: self.partition,
            capacity: self.capacity,
            _items: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

impl<T> Queue<T>
where
    T: Serialize + DeserializeOwned,
{
    pub(crate) fn new(node: Arc<Node>, name: &str) -> Self {
        let partition = partition_of(name.as_bytes(), node.config.partition_count);
        let capacity = node.config.queue_config(name).capacity;
        Queue {
            node,
            name: Arc::from(name),
            map: Arc::from(format!("{PREFIX}{name}")),
            partition,
            capacity,
            _items: PhantomData,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member that leads the queue in this member's current partition table (`None` while
    /// no member does). The answer can change with the next table.
    pub fn owner(&self) -> Option<crate::MemberId> {
        self.node.table.current().primary(self.partition)
    }

    /// The error that ends an offer or poll after `attempts`: after a retried attempt whose
    /// outcome was unknown (`uncertain`), a definite refusal does not mean nothing was applied.
    fn settled(&self, error: Error, uncertain: bool, attempts: u32) -> Error {
        crate::routing::after_uncertain(error, uncertain, self.partition, attempts)
    }

    async fn run(&self, op: MapOp) -> Result<OpResult> {
        self.node
            .route(self.partition, &self.map, Bytes::new(), op)
            .await
    }

    fn encode(&self, item: &T) -> Result<Bytes> {
        let bytes = codec::encode(item)?;
        let max = self.node.config.max_value_size;
        if bytes.len() > max {
            return Err(Error::TooLarge {
                what: "queue item",
                size: bytes.len(),
                max,
            });
        }
        Ok(bytes)
    }

    /// Appends `item` if the queue has room; returns whether it did.
    pub async fn offer(&self, item: &T) -> Result<bool> {
        self.offer_within(item, Duration::ZERO).await
    }

    /// Appends `item`, waiting up to `timeout` for room; returns whether it did.
    pub async fn offer_timeout(&self, item: &T, timeout: Duration) -> Result<bool> {
        self.offer_within(item, timeout).await
    }

    /// Appends `item`, waiting as long as it takes for room.
    pub async fn put(&self, item: &T) -> Result<()> {
        loop {
            if self.offer_within(item, Duration::from_secs(3600)).await? {
                return Ok(());
            }
        }
    }

    async fn offer_within(&self, item: &T, timeout: Duration) -> Result<bool> {
        let item = self.encode(item)?;
        // One token for every attempt: the primary enqueues it once.
        let token: u64 = rand::random();
        let deadline = deadline_after(timeout);
        let mut attempts = 0;
        let mut uncertain = false;
        loop {
            attempts += 1;
            let wait = deadline.saturating_duration_since(Instant::now());
            let result = self
                .run(MapOp::QueueOffer {
                    item: item.clone(),
                    token,
                    capacity: self.capacity,
                    wait,
                    lineage: 0,
                })
                .await;
            match result {
                Ok(result) if result.applied || Instant::now() >= deadline => {
                    return Ok(result.applied);
                }
                Ok(_) => {}
                // Still within the caller's time: ask again with the same token.
                Err(e) if retry_within(&e, deadline) => {
                    uncertain = true;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(self.settled(e, uncertain, attempts)),
            }
        }
    }

    /// Takes the head item, if there is one.
    pub async fn poll(&self) -> Result<Option<T>> {
        Ok(self.take_within(1, Duration::ZERO).await?.pop())
    }

    /// Takes the head item, waiting up to `timeout` for one.
    pub async fn poll_timeout(&self, timeout: Duration) -> Result<Option<T>> {
        Ok(self.take_within(1, timeout).await?.pop())
    }

    /// Takes the head item, waiting as long as it takes for one.
    pub async fn take(&self) -> Result<T> {
        loop {
            if let Some(item) = self.take_within(1, Duration::from_secs(3600)).await?.pop() {
                return Ok(item);
            }
        }
    }

    /// Takes up to `max` items from the head, in order, without waiting.
    pub async fn drain(&self, max: usize) -> Result<Vec<T>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        self.take_within(max, Duration::ZERO).await
    }

    async fn take_within(&self, max: u32, timeout: Duration) -> Result<Vec<T>> {
        // One token for every attempt: a retry gets the items a lost answer carried.
        let token: u64 = rand::random();
        let deadline = deadline_after(timeout);
        let mut attempts = 0;
        let mut uncertain = false;
        loop {
            attempts += 1;
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.run(MapOp::QueuePoll { token, max, wait }).await {
                Ok(result) if !result.items.is_empty() || Instant::now() >= deadline => {
                    return result.items.iter().map(|b| codec::decode(b)).collect();
                }
                Ok(_) => {}
                // Still within the caller's time: ask again with the same token, which gets
                // the items a lost answer carried.
                Err(e) if retry_within(&e, deadline) => {
                    uncertain = true;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(self.settled(e, uncertain, attempts)),
            }
        }
    }

    /// The head item, without taking it.
    pub async fn peek(&self) -> Result<Option<T>> {
        match self.run(MapOp::QueuePeek).await?.items.first() {
            Some(bytes) => codec::decode(bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The number of items.
    pub async fn len(&self) -> Result<u64> {
        Ok(self.run(MapOp::QueueLen).await?.count)
    }

    /// Whether the queue has no items.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Removes every item.
    pub async fn clear(&self) -> Result<()> {
        self.run(MapOp::QueueClear).await.map(|_| ())
    }

    /// A stream of this queue's item events from now on: added (offered) and removed (taken),
    /// with the item when `include_items`. From the queue's primary wherever it is, with the
    /// delivery of entry listeners (at most once, in order, see [`crate::Map::listen`]); a
    /// `clear` produces no per-item events.
    pub async fn listen(&self, include_items: bool) -> crate::EventStream<ItemEvent<T>>
    where
        T: Clone + Send + Sync + 'static,
    {
        use crate::map::listen;
        let raw = listen::subscribe(&self.node, self.map.clone(), include_items).await;
        listen::forward(&self.node, raw, move |event| {
            let item = listen::decode_value::<T>(event, include_items)?;
            match event.kind {
                crate::EntryEventKind::Added => Some(ItemEvent::Added(item)),
                crate::EntryEventKind::Removed => Some(ItemEvent::Removed(item)),
                // Taken items expiring after the dedup window are not queue events.
                _ => None,
            }
        })
    }
}

/// One change of a queue, from [`Queue::listen`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ItemEvent<T> {
    /// An item was offered (with it, if the listener asked for items).
    Added(Option<T>),
    /// An item was taken by a poll (with it, if the listener asked for items).
    Removed(Option<T>),
}
