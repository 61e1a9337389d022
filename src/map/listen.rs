//! Entry listeners: a stream of a map's changes, from the primaries that make them.
//!
//! Each primary publishes every change it applies (added, updated, removed, expired, evicted)
//! to a local channel, in its sequence order. [`crate::Map::listen`] subscribes to that channel on
//! this member and opens a `Listen` stream to every other member, and to each member that joins
//! later; events are decoded at the edge, like every value.
//!
//! Delivery is at most once: events a slow listener falls behind on are dropped (the stream
//! skips them), and the events of a primary that crashes before they reach the listener are
//! lost. Per key, events arrive in the order the key's primary applied the changes, except
//! across a change of primary (a failover or a migration), where the new primary's events may
//! overtake the last ones of the old. A `clear` produces no per-entry events.

use std::sync::Arc;

use bytes::Bytes;

use crate::rpc::proto;

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryEventKind {
    /// A key without an entry got one.
    Added,
    /// An entry's value was replaced.
    Updated,
    /// An entry was removed (`remove`, `delete`).
    Removed,
    /// An entry's time to live or idle limit ran out.
    Expired,
    /// An entry was evicted to keep the map within its size limit.
    Evicted,
}

/// One change of one entry, from [`crate::Map::listen`].
#[derive(Debug, Clone, PartialEq)]
pub struct EntryEvent<K, V> {
    /// What happened.
    pub kind: EntryEventKind,
    /// The entry's key.
    pub key: K,
    /// The new value (added, updated) or the last one (removed, expired, evicted), if the
    /// listener asked for values.
    pub value: Option<V>,
}

/// A change as a primary publishes it, before decoding.
#[derive(Debug, Clone)]
pub(crate) struct RawEntryEvent {
    pub(crate) map: Arc<str>,
    pub(crate) kind: EntryEventKind,
    pub(crate) key: Bytes,
    pub(crate) value: Option<Bytes>,
    pub(crate) partition: u32,
    pub(crate) seq: u64,
    /// The primary's near-cache invalidation number of (map, partition).
    pub(crate) map_seq: u64,
    /// The whole partition of the map was cleared (no listener event; near caches drop it).
    pub(crate) clear: bool,
}

impl RawEntryEvent {
    pub(crate) fn to_proto(&self, include_values: bool) -> proto::EntryEvent {
        let value = self.value.clone().filter(|_| include_values);
        proto::EntryEvent {
            kind: kind_to_proto(self.kind) as i32,
            key: self.key.clone(),
            has_value: value.is_some(),
            value: value.unwrap_or_default(),
            partition: self.partition,
            seq: self.seq,
        }
    }

    pub(crate) fn from_proto(map: &Arc<str>, event: proto::EntryEvent) -> Option<Self> {
        let kind = match proto::EntryEventKind::try_from(event.kind).ok()? {
            proto::EntryEventKind::Added => EntryEventKind::Added,
            proto::EntryEventKind::Updated => EntryEventKind::Updated,
            proto::EntryEventKind::Removed => EntryEventKind::Removed,
            proto::EntryEventKind::Expired => EntryEventKind::Expired,
            proto::EntryEventKind::Evicted => EntryEventKind::Evicted,
            proto::EntryEventKind::Lost => return None,
        };
        Some(RawEntryEvent {
            map: map.clone(),
            kind,
            key: event.key,
            value: event.has_value.then_some(event.value),
            partition: event.partition,
            seq: event.seq,
            map_seq: 0,
            clear: false,
        })
    }
}

fn kind_to_proto(kind: EntryEventKind) -> proto::EntryEventKind {
    match kind {
        EntryEventKind::Added => proto::EntryEventKind::Added,
        EntryEventKind::Updated => proto::EntryEventKind::Updated,
        EntryEventKind::Removed => proto::EntryEventKind::Removed,
        EntryEventKind::Expired => proto::EntryEventKind::Expired,
        EntryEventKind::Evicted => proto::EntryEventKind::Evicted,
    }
}

/// Raw events a listener buffers between its sources and its decoder; more are dropped.
const BUFFER: usize = 8192;

/// Feeds every raw event of `map` (from this member's primaries, and from a `Listen` stream to
/// every other member, now and as members join) into one channel. Returns once the streams to
/// the current members are open, so changes made after it returns are seen.
pub(crate) async fn subscribe(
    node: &Arc<crate::node::Node>,
    map: Arc<str>,
    include_values: bool,
) -> tokio::sync::mpsc::Receiver<Arc<RawEntryEvent>> {
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    // This member's own primaries.
    let mut local = node.entry_events.subscribe();
    let (local_tx, local_map, local_node) = (tx.clone(), map.clone(), node.clone());
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = local_node.cancel.cancelled() => return,
                _ = local_tx.closed() => return,
                event = local.recv() => event,
            };
            match event {
                Ok(event) if event.map == local_map && !event.clear => {
                    let _ = local_tx.try_send(event);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    // Every other member, and those that join later.
    let mut joins = node.membership.subscribe();
    for peer in node.membership.peer_identities() {
        open_remote(node, peer, map.clone(), include_values, tx.clone()).await;
    }
    let (node, watch_tx) = (node.clone(), tx);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = node.cancel.cancelled() => return,
                _ = watch_tx.closed() => return,
                event = joins.recv() => event,
            };
            match event {
                Some(crate::MembershipEvent::Up(member)) => {
                    if let Some(peer) = node.membership.peer(member.id) {
                        open_remote(&node, peer, map.clone(), include_values, watch_tx.clone())
                            .await;
                    }
                }
                Some(_) => {}
                None => return,
            }
        }
    });
    rx
}

/// Opens a `Listen` stream to `peer` and forwards its events until it ends (the peer is gone)
/// or the listener is dropped.
async fn open_remote(
    node: &Arc<crate::node::Node>,
    peer: crate::membership::identity::Identity,
    map: Arc<str>,
    include_values: bool,
    tx: tokio::sync::mpsc::Sender<Arc<RawEntryEvent>>,
) {
    let Ok(mut call) = node.rpc.get_bulk(&peer) else {
        return;
    };
    let request = node.rpc.request_untimed(proto::ListenRequest {
        map: map.to_string(),
        include_values,
    });
    let Ok(response) = call.client.listen(request).await else {
        tracing::debug!(peer = %peer.id, "could not open an entry listener stream");
        return;
    };
    let mut stream = response.into_inner();
    let cancel = node.cancel.clone();
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                message = stream.message() => message,
            };
            match message {
                Ok(Some(event)) => {
                    if let Some(event) = RawEntryEvent::from_proto(&map, event) {
                        let _ = tx.try_send(Arc::new(event));
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
}

/// The typed stream of a listener: decodes `raw` events with `decode` (`None`: skip the event)
/// on a task of their own, until the member stops, the sources end or every receiver is gone.
pub(crate) fn forward<T: Clone + Send + 'static>(
    node: &crate::node::Node,
    mut raw: tokio::sync::mpsc::Receiver<Arc<RawEntryEvent>>,
    decode: impl Fn(&RawEntryEvent) -> Option<T> + Send + 'static,
) -> crate::EventStream<T> {
    let (tx, rx) = tokio::sync::broadcast::channel(4096);
    let cancel = node.cancel.clone();
    tokio::spawn(async move {
        let mut check = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = check.tick() => if tx.receiver_count() == 0 { return } else { continue },
                event = raw.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            if let Some(typed) = decode(&event)
                && tx.send(typed).is_err()
            {
                return;
            }
        }
    });
    crate::EventStream::new(rx)
}

/// The value an event carries, decoded, when the listener asked for values: `Some(None)` when
/// it did not, `None` (skip the event) when the bytes are not a `V`. (This member's own
/// primaries publish values whatever the listener asked for.)
pub(crate) fn decode_value<V: serde::de::DeserializeOwned>(
    event: &RawEntryEvent,
    include_values: bool,
) -> Option<Option<V>> {
    match event.value.as_ref().filter(|_| include_values) {
        Some(bytes) => crate::codec::decode::<V>(bytes).ok().map(Some),
        None => Some(None),
    }
}
