//! The background expiry sweep: primaries remove expired entries nobody reads.
//!
//! Reads already treat an expired entry as absent and remove it (lazy expiry). This task catches
//! the rest: every [`SWEEP_EVERY`], each member walks the partitions it leads, round robin from
//! where the last pass stopped, looking at no more than [`SWEEP_BUDGET`] entries per pass, and
//! removes each expired one through the ordinary write path, so the removal is sequenced and
//! replicated to the backups like any other.

use std::sync::Arc;
use std::time::Duration;

use crate::map::ops::MapOp;
use crate::node::Node;

/// How often a sweep pass runs.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Entries a pass looks at, at most: bounds the work per pass whatever the data size.
pub(crate) const SWEEP_BUDGET: usize = 20_000;

/// Runs until the member stops.
pub(crate) async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0u32;
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        next = pass(&node, next, SWEEP_BUDGET).0;
        node.drop_abandoned_loads();
    }
}

/// One pass from partition `start`; returns where the next pass starts and how many entries it
/// expired.
pub(crate) fn pass(node: &Arc<Node>, start: u32, budget: usize) -> (u32, usize) {
    let table = node.table.current();
    let count = table.partition_count();
    if count == 0 {
        return (0, 0);
    }
    let now = crate::store::now_ms();
    let mut looked = 0usize;
    let mut expired = 0usize;
    for i in 0..count {
        let partition = (start + i) % count;
        if looked >= budget {
            return (partition, expired);
        }
        if table.primary(partition) != Some(node.me) {
            continue;
        }
        let Some(data) = node.store.partition(partition) else {
            continue;
        };
        if data.is_pending() {
            continue;
        }
        for (map, entries) in data.maps() {
            let max_idle = node.config.map_config(&map).max_idle_ms();
            // Keys are collected first: no map guard is held while an entry is removed.
            let mut due: Vec<bytes::Bytes> = Vec::new();
            entries.for_each(|e| {
                looked += 1;
                if e.is_dead(now, max_idle) {
                    due.push(bytes::Bytes::copy_from_slice(e.key()));
                }
            });
            for key in due {
                // Removed through the write path, which replicates the removal; nobody waits for
                // the backups' acknowledgements.
                if node
                    .apply(partition, &map, key, &MapOp::RemoveIfExpired, None)
                    .is_ok()
                {
                    expired += 1;
                }
            }
        }
    }
    (start, expired)
}
