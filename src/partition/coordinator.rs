//! The coordinator: the oldest live member computes the partition table and publishes it.
//!
//! Every member runs this task; only the member that is oldest in its own view acts. On every
//! membership change, every [`REPUBLISH_EVERY`] while idle and every 25 ms while a migration is
//! under way, the coordinator pushes its current table to every peer and reads back what each
//! holds. Then, in order:
//!
//! 1. A peer that reports a different table at the same or a higher version (two members both
//!    coordinated for a moment, or one was cut off) makes it republish above it, so the cluster
//!    converges.
//! 2. If a member of the table is gone, it publishes the [`migration::repair`]ed table at once:
//!    each partition that lost its primary is led by its first live backup (no copy).
//! 3. Otherwise, once the current table has settled (every peer holds it, no takeover is running
//!    and no snapshot is still on its way to a backup), it publishes the next
//!    [`migration::advance`] step toward the target that [`assign`] computes over the live
//!    members less those leaving: at most `max_parallel_migrations` partitions per step.
//!
//! Members refuse tables from a live member that is not the coordinator in their view, and
//! members that are not coordinator fetch the table once when they have none yet.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::membership::MemberId;
use crate::node::Node;
use crate::partition::assignment::assign;
use crate::partition::migration;
use crate::partition::table::PartitionTable;
use crate::rpc::proto;

/// How often the coordinator pushes its table even when nothing changed.
pub(crate) const REPUBLISH_EVERY: Duration = Duration::from_millis(250);

/// How often the coordinator checks whether a migration step settled, while one is under way.
const MIGRATION_POLL: Duration = Duration::from_millis(25);

/// Runs until the member stops.
pub(crate) async fn run(node: Arc<Node>) {
    let mut membership = node.membership.subscribe_changes();
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(delay) => {}
        }
        delay = if step(&node).await {
            MIGRATION_POLL
        } else {
            REPUBLISH_EVERY
        };
    }
}

/// One round: coordinate if this member is the oldest, otherwise make sure it has a table.
/// Returns whether a migration is under way (the table is not at its target yet).
///
/// The coordinator moves to a new table only from a settled one: every peer holds the current
/// table and has finished taking over its partitions. A member that is moved again while its
/// previous handover is still running could otherwise wait on a member that waits on it.
pub(crate) async fn step(node: &Arc<Node>) -> bool {
    // A member on its way into another cluster coordinates nothing.
    if node
        .merge
        .joining
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return false;
    }
    let Some(coordinator) = node.coordinator() else {
        return false;
    };
    if coordinator != node.me {
        if node.table.current().version == 0 {
            node.refresh_table(Some(coordinator)).await;
        }
        return false;
    }
    let current = node.table.current();
    let peers = node.membership.peer_count();
    let answers = publish(node).await;
    let mine = (current.version, current.publisher.as_u64());
    if let Some(&(version, publisher, _, _)) = answers
        .iter()
        .filter(|&&(v, p, _, _)| (v, p) != mine && v >= current.version)
        .max()
    {
        tracing::info!(
            member = %node.me,
            version,
            publisher,
            "a peer holds a competing table; republishing above it"
        );
        // Above the competitor, with the same replica sets; the previous primaries are the
        // current ones, so nothing is taken over again.
        let above = PartitionTable {
            version,
            ..(*current).clone()
        };
        node.apply_table(above.successor(node.me, view_ids(node), current.replicas.clone()));
        publish(node).await;
        return true;
    }

    let settled = node.store.pending_count() == 0
        && node.replication.snapshot_backlog() == 0
        && answers.len() == peers
        && answers
            .iter()
            .all(|&(v, p, pending, backlog)| (v, p) == mine && pending == 0 && backlog == 0);
    // Members that are leaving gracefully get nothing, so their partitions are pulled from them
    // while they are still here; the cluster never assigns to nobody, though.
    let leaving = node
        .leaving
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut members: Vec<_> = node
        .membership
        .members()
        .iter()
        .map(|m| m.id)
        .filter(|m| !leaving.contains(m))
        .collect();
    if members.is_empty() {
        members = node.membership.members().iter().map(|m| m.id).collect();
    }
    let target = assign(
        &members,
        node.config.partition_count,
        node.config.backup_count,
    );
    // A member is gone: its primaries pass to their first live backups at once, settled or not
    // (the promoted members hold the data; the repair moves nothing). So is a member that
    // renewed its identity since the table, though its id is live again: it merged back, and
    // dropped its copies to hand what it led over (a 30-minute Jepsen run: a member renewed while
    // the coordinator kept seeing it, kept leading its partitions with nothing in them, and
    // lock fences started over at 1).
    let view = node.membership.members();
    let renewed = |m: &crate::membership::Member| {
        current
            .generation_of(m.id)
            .is_some_and(|g| m.generation > g)
    };
    let live: BTreeSet<MemberId> = view.iter().filter(|m| !renewed(m)).map(|m| m.id).collect();
    let repaired = migration::repair(&current.replicas, &live, &target);
    // Members the table records that are gone or renewed, even if they held nothing: members
    // read the recorded ones as what the coordinator sees now (see
    // `Node::notice_members_listed_but_down`), and a renewed member takes no table that records
    // it under its earlier generation and gives it replicas.
    let recorded_outdated = current
        .members
        .iter()
        .any(|&id| view.iter().find(|m| m.id == id).is_none_or(&renewed));
    if current.version > 0 && (repaired != current.replicas || recorded_outdated) {
        let promoted = (0..current.partition_count())
            .filter(|&p| current.primary(p) != repaired[p as usize].first().copied())
            .count();
        tracing::info!(
            member = %node.me,
            version = current.version + 1,
            promoted,
            "members gone: promoting their backups"
        );
        node.apply_table(current.successor(node.me, view_ids(node), repaired));
        publish(node).await;
        return true;
    }
    // A table of another publisher (this member just became the oldest) is republished under
    // this member's name at once, with the same replica sets, settled or not: members refuse a
    // table whose publisher is live but not the coordinator in their view (a former coordinator
    // that was declared down and rejoined younger), so one that missed it would never take it
    // and the table would never settle.
    if current.version > 0 && current.publisher != node.me {
        tracing::info!(
            member = %node.me,
            version = current.version + 1,
            publisher = %current.publisher,
            "coordinating now: republishing the current table"
        );
        node.apply_table(current.successor(node.me, view_ids(node), current.replicas.clone()));
        publish(node).await;
        return true;
    }
    if current.replicas == target && current.publisher == node.me {
        return false;
    }
    let next = migration::advance(
        &current.replicas,
        &target,
        node.config.max_parallel_migrations,
    );
    if !settled && current.version > 0 {
        tracing::debug!(
            own_pending = node.store.pending_count(),
            peers,
            ?answers,
            version = current.version,
            "waiting for the current table to settle before the next one"
        );
        return true;
    }
    tracing::debug!(
        version = current.version + 1,
        changed = migration::differing(&current.replicas, &next),
        left = migration::differing(&next, &target),
        "migration step"
    );
    node.apply_table(current.successor(node.me, view_ids(node), next));
    publish(node).await;
    true
}

/// The members this member sees live, itself included, with their generations: what a table it
/// publishes records.
fn view_ids(node: &Node) -> Vec<(MemberId, u64)> {
    node.membership
        .members()
        .iter()
        .map(|m| (m.id, m.generation))
        .collect()
}

/// Pushes the current table to every peer; returns each answer: the table the peer holds after
/// the push, how many partitions it is still taking over, and how many snapshots it is still
/// sending to backups.
pub(crate) async fn publish(node: &Arc<Node>) -> Vec<(u64, u64, u32, u64)> {
    let message = node.table.current().to_proto();
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
            Some((
                response.version,
                response.publisher,
                response.pending,
                response.snapshot_backlog,
            ))
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Handles a pushed table: applies it if newer and reports what this member now has.
pub(crate) fn on_publish(node: &Arc<Node>, table: &proto::Table) -> proto::PublishTableResponse {
    if let Some(table) = PartitionTable::from_proto(table, node.config.partition_count) {
        node.notice_members_listed_but_down(&table);
        node.apply_table(table);
    }
    let current = node.table.current();
    proto::PublishTableResponse {
        version: current.version,
        publisher: current.publisher.as_u64(),
        pending: node.store.pending_count() as u32,
        snapshot_backlog: node.replication.snapshot_backlog(),
    }
}
