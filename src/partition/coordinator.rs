//! The coordinator: the oldest live member computes the partition table and publishes it.
//!
//! Every member runs this task; only the member that is oldest in its own view acts. On every
//! membership change, and every [`REPUBLISH_EVERY`] besides, the coordinator computes the target
//! table with [`assign`] over the live members. If it differs from the current table it applies a
//! new version locally, then it pushes its current table to every peer (a late or lossy peer
//! catches up at the next push). A peer that reports a different table at the same or a higher
//! version (two members both coordinated for a moment) makes the coordinator republish above it,
//! so the cluster converges. Members that are not coordinator fetch the table once when they have
//! none yet.

use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;
use crate::partition::assignment::assign;
use crate::partition::table::PartitionTable;
use crate::rpc::proto;

/// How often the coordinator pushes its table even when nothing changed.
pub(crate) const REPUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Runs until the member stops.
pub(crate) async fn run(node: Arc<Node>) {
    let mut membership = node.membership.subscribe_changes();
    let mut tick = tokio::time::interval(REPUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        step(&node).await;
    }
}

/// One round: coordinate if this member is the oldest, otherwise make sure it has a table.
pub(crate) async fn step(node: &Arc<Node>) {
    let Some(coordinator) = node.coordinator() else {
        return;
    };
    if coordinator != node.me {
        if node.table.current().version == 0 {
            node.refresh_table(Some(coordinator)).await;
        }
        return;
    }
    let members: Vec<_> = node.membership.members().iter().map(|m| m.id).collect();
    let target = assign(
        &members,
        node.config.partition_count,
        node.config.backup_count,
    );
    let current = node.table.current();
    if current.replicas != target || current.publisher != node.me {
        node.apply_table(PartitionTable {
            version: current.version + 1,
            publisher: node.me,
            replicas: target,
        });
    }
    let highest_seen = publish(node).await;
    let current = node.table.current();
    if let Some((version, publisher)) = highest_seen
        && (version, publisher) != (current.version, current.publisher.as_u64())
        && version >= current.version
    {
        tracing::info!(
            version,
            "a peer holds a competing table; republishing above it"
        );
        node.apply_table(PartitionTable {
            version: version + 1,
            publisher: node.me,
            replicas: current.replicas.clone(),
        });
        publish(node).await;
    }
}

/// Pushes the current table to every peer; returns the highest competing table version a peer
/// reported, if any.
async fn publish(node: &Arc<Node>) -> Option<(u64, u64)> {
    let table = node.table.current();
    let message = table.to_proto();
    let calls = node.membership.peer_identities().into_iter().map(|peer| {
        let message = message.clone();
        async move {
            let mut call = node.rpc.get(&peer).ok()?;
            let response = call
                .client
                .publish_table(node.rpc.request(message))
                .await
                .ok()?
                .into_inner();
            Some((response.version, response.publisher))
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .filter(|&(version, publisher)| {
            (version, publisher) != (table.version, table.publisher.as_u64())
        })
        .max()
}

/// Handles a pushed table: applies it if newer and reports what this member now has.
pub(crate) fn on_publish(node: &Arc<Node>, table: &proto::Table) -> proto::PublishTableResponse {
    if let Some(table) = PartitionTable::from_proto(table, node.config.partition_count) {
        node.apply_table(table);
    }
    let current = node.table.current();
    proto::PublishTableResponse {
        version: current.version,
        publisher: current.publisher.as_u64(),
    }
}
