//! Anti-entropy: each primary periodically checks that its backups hold what it holds.
//!
//! Every [`crate::GridConfig::anti_entropy_interval`], the primary asks each backup member for
//! the sequence number and digest of the partitions it leads and that member backs up, in one
//! call per member, and compares them with its own ([`drifted`]). A backup that drifted (same
//! sequence number but other data, ahead of its primary, missing the copy, or behind while
//! nothing is in flight to it) gets a fresh snapshot through the ordinary replication queue, so
//! the repair is ordered with the mutations around it. Replication keeps backups in sync on its
//! own; this pass catches what it cannot see: a bug, a lost message that no later mutation
//! exposed as a gap, or memory corrupted under the process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::membership::MemberId;
use crate::node::Node;
use crate::rpc::proto;
use crate::store::replication::Item;

/// A replica's position: sequence number and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) seq: u64,
    pub(crate) digest: u64,
}

/// Whether a backup drifted from its primary.
///
/// `before` is the primary's position when the backup was asked, `after` its sequence number
/// once the answer came; `quiet` says nothing was in flight to the backup before the question
/// and after the answer. With no write in between and nothing in flight, the backup must match
/// exactly; otherwise only what no delay explains counts: the same sequence number with other
/// data, or a backup ahead of its primary.
pub(crate) fn drifted(before: Position, after: u64, backup: Option<Position>, quiet: bool) -> bool {
    let Some(backup) = backup else {
        // It does not think it holds the partition: its table differs, or it dropped the copy.
        return quiet && before.seq == after;
    };
    if backup.seq > after {
        return true;
    }
    if before.seq == after && quiet {
        return backup != before;
    }
    backup.seq == before.seq && backup.digest != before.digest
}

/// Runs until the member stops.
pub(crate) async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config.anti_entropy_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        pass(&node).await;
    }
}

/// One pass over every backup member; returns how many partitions were repaired.
pub(crate) async fn pass(node: &Arc<Node>) -> usize {
    let table = node.table.current();
    let mut by_backup: BTreeMap<MemberId, Vec<u32>> = BTreeMap::new();
    for p in 0..table.partition_count() {
        if table.primary(p) != Some(node.me) {
            continue;
        }
        for &backup in table.backups(p) {
            by_backup.entry(backup).or_default().push(p);
        }
    }
    let checks = by_backup.into_iter().map(|(backup, partitions)| {
        check(node, (table.version, table.publisher), backup, partitions)
    });
    futures::future::join_all(checks).await.into_iter().sum()
}

async fn check(
    node: &Arc<Node>,
    table: (u64, MemberId),
    backup: MemberId,
    partitions: Vec<u32>,
) -> usize {
    let ready: Vec<u32> = partitions
        .into_iter()
        .filter(|&p| node.store.partition(p).is_some_and(|d| !d.is_pending()))
        .collect();
    if ready.is_empty() {
        return 0;
    }
    // Positions first, then idleness: a write between the two then shows as a moved sequence
    // number, not as a backup that looks stuck.
    let before: BTreeMap<u32, Position> = ready
        .iter()
        .filter_map(|&p| {
            let (seq, _, digest) = node.store.replica_state(p)?;
            Some((p, Position { seq, digest }))
        })
        .collect();
    let quiet_before = node.replication.idle(backup);
    let Ok(mut call) = node.peer_client(backup) else {
        return 0;
    };
    let request = node.rpc.request(proto::ReplicaStatesRequest {
        partitions: ready.clone(),
    });
    let Ok(answer) = call.client.replica_states(request).await else {
        return 0;
    };
    let answer = answer.into_inner();
    let quiet = quiet_before && node.replication.idle(backup);
    // Compared only under one table: under another, the backup may rightly hold something else.
    let current = node.table.current();
    if (answer.table_version, answer.table_publisher) != (table.0, table.1.as_u64())
        || (current.version, current.publisher) != table
    {
        return 0;
    }
    let held: BTreeMap<u32, Position> = answer
        .partitions
        .iter()
        .map(|s| {
            (
                s.partition,
                Position {
                    seq: s.seq,
                    digest: s.digest,
                },
            )
        })
        .collect();
    let mut repaired = 0;
    for (p, before) in before {
        let after = node.store.partition(p).map_or(0, |d| *d.lock());
        if drifted(before, after, held.get(&p).copied(), quiet) {
            tracing::warn!(
                member = %node.me,
                %backup,
                partition = p,
                primary = ?before,
                backup_state = ?held.get(&p),
                "anti-entropy: backup drifted from its primary; sending a fresh snapshot"
            );
            node.replication.send(
                backup,
                Item::Snapshot {
                    partition: p,
                    ack: None,
                },
            );
            node.stats
                .anti_entropy_repairs
                .fetch_add(1, Ordering::Relaxed);
            repaired += 1;
        }
    }
    repaired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, digest: u64) -> Position {
        Position { seq, digest }
    }

    #[test]
    fn drift_is_what_no_delay_explains() {
        // In sync.
        assert!(!drifted(at(5, 1), 5, Some(at(5, 1)), true));
        // Same sequence, other data: drift, quiet or not.
        assert!(drifted(at(5, 1), 5, Some(at(5, 2)), true));
        assert!(drifted(at(5, 1), 9, Some(at(5, 2)), false));
        // Ahead of its primary.
        assert!(drifted(at(5, 1), 5, Some(at(6, 1)), false));
        // Behind with writes in flight: lag, not drift.
        assert!(!drifted(at(5, 1), 7, Some(at(3, 9)), false));
        assert!(!drifted(at(5, 1), 5, Some(at(3, 9)), false));
        // Behind with nothing in flight and no write meanwhile: stuck, so drift.
        assert!(drifted(at(5, 1), 5, Some(at(3, 9)), true));
        // No copy at all: drift only when nothing explains it.
        assert!(drifted(at(5, 1), 5, None, true));
        assert!(!drifted(at(5, 1), 6, None, true));
    }
}
