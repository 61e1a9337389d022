//! The partition table: the replica set of every partition, with a version.
//!
//! Tables are published by the coordinator (the oldest live member). A member applies a table
//! only if its `(version, publisher)` is greater than the one it has, so every member converges
//! on the same table even when two members briefly both believe they coordinate.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::membership::MemberId;
use crate::rpc::proto;

/// One version of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionTable {
    pub(crate) version: u64,
    pub(crate) publisher: MemberId,
    /// Per partition: primary first, then backups in order.
    pub(crate) replicas: Vec<Vec<MemberId>>,
    /// Per partition: the primary in the table this one replaced at the coordinator.
    pub(crate) previous: Vec<Option<MemberId>>,
    /// The members the coordinator saw live when it published the table (empty: not known).
    pub(crate) members: Vec<MemberId>,
    /// The generation of each of `members`, in the same order (empty: not known).
    pub(crate) generations: Vec<u64>,
}

impl PartitionTable {
    /// The table a member starts with: version 0, nobody owns anything.
    pub(crate) fn empty(partition_count: u32) -> Self {
        PartitionTable {
            version: 0,
            publisher: MemberId(0),
            replicas: vec![Vec::new(); partition_count as usize],
            previous: vec![None; partition_count as usize],
            members: Vec::new(),
            generations: Vec::new(),
        }
    }

    /// The table that replaces `self` with `replicas`, published by `publisher`, which sees
    /// `members` live (each with its generation).
    pub(crate) fn successor(
        &self,
        publisher: MemberId,
        members: Vec<(MemberId, u64)>,
        replicas: Vec<Vec<MemberId>>,
    ) -> Self {
        let (members, generations) = members.into_iter().unzip();
        PartitionTable {
            version: self.version.saturating_add(1),
            publisher,
            members,
            generations,
            previous: (0..replicas.len() as u32)
                .map(|p| self.primary(p))
                .collect(),
            replicas,
        }
    }

    /// The previous primary of `partition`, per the coordinator.
    pub(crate) fn previous_primary(&self, partition: u32) -> Option<MemberId> {
        self.previous.get(partition as usize).copied().flatten()
    }

    /// The generation the publisher saw `member` at, if the table records it.
    pub(crate) fn generation_of(&self, member: MemberId) -> Option<u64> {
        let i = self.members.iter().position(|&m| m == member)?;
        self.generations.get(i).copied()
    }

    /// Whether `self` supersedes `other`.
    pub(crate) fn newer_than(&self, other: &PartitionTable) -> bool {
        (self.version, self.publisher) > (other.version, other.publisher)
    }

    pub(crate) fn primary(&self, partition: u32) -> Option<MemberId> {
        self.replicas
            .get(partition as usize)
            .and_then(|r| r.first())
            .copied()
    }

    pub(crate) fn replicas(&self, partition: u32) -> &[MemberId] {
        self.replicas
            .get(partition as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub(crate) fn backups(&self, partition: u32) -> &[MemberId] {
        self.replicas(partition).get(1..).unwrap_or(&[])
    }

    pub(crate) fn partition_count(&self) -> u32 {
        self.replicas.len() as u32
    }

    pub(crate) fn to_proto(&self) -> proto::Table {
        proto::Table {
            version: self.version,
            publisher: self.publisher.0,
            partition_count: self.partition_count(),
            replica_counts: self.replicas.iter().map(|r| r.len() as u32).collect(),
            owners: self.replicas.iter().flatten().map(|m| m.0).collect(),
            previous_primaries: self.previous.iter().map(|m| m.map_or(0, |m| m.0)).collect(),
            members: self.members.iter().map(|m| m.0).collect(),
            generations: self.generations.clone(),
        }
    }

    /// Decodes a table from the wire; `None` if it is inconsistent or has another partition
    /// count than `partition_count`.
    pub(crate) fn from_proto(table: &proto::Table, partition_count: u32) -> Option<Self> {
        // The largest version is reserved: no table could ever supersede it.
        if table.partition_count != partition_count
            || table.replica_counts.len() != partition_count as usize
            || table.version == u64::MAX
        {
            return None;
        }
        let mut owners = table.owners.iter();
        let mut replicas = Vec::with_capacity(partition_count as usize);
        for &count in &table.replica_counts {
            // Up to 7 replicas, plus as many being added by a migration step.
            if count > 14 {
                return None;
            }
            let set: Vec<MemberId> = owners
                .by_ref()
                .take(count as usize)
                .map(|&m| MemberId(m))
                .collect();
            if set.len() != count as usize {
                return None;
            }
            replicas.push(set);
        }
        if owners.next().is_some() {
            return None;
        }
        let previous = if table.previous_primaries.is_empty() {
            vec![None; partition_count as usize]
        } else if table.previous_primaries.len() == partition_count as usize {
            table
                .previous_primaries
                .iter()
                .map(|&m| (m != 0).then_some(MemberId(m)))
                .collect()
        } else {
            return None;
        };
        if !table.generations.is_empty() && table.generations.len() != table.members.len() {
            return None;
        }
        Some(PartitionTable {
            version: table.version,
            publisher: MemberId(table.publisher),
            replicas,
            previous,
            members: table.members.iter().map(|&m| MemberId(m)).collect(),
            generations: table.generations.clone(),
        })
    }
}

/// The member's current table, shared by the router, the store and the rpc server.
pub(crate) struct TableHolder {
    current: RwLock<Arc<PartitionTable>>,
    /// Carries the version of every table applied, for tasks that react to changes.
    changes: watch::Sender<u64>,
}

impl TableHolder {
    pub(crate) fn new(partition_count: u32) -> Self {
        TableHolder {
            current: RwLock::new(Arc::new(PartitionTable::empty(partition_count))),
            changes: watch::channel(0).0,
        }
    }

    pub(crate) fn current(&self) -> Arc<PartitionTable> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs `table` if it is newer; returns the table it replaced.
    pub(crate) fn apply(&self, table: PartitionTable) -> Option<Arc<PartitionTable>> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !table.newer_than(&current) {
            return None;
        }
        let version = table.version;
        let previous = std::mem::replace(&mut *current, Arc::new(table));
        drop(current);
        self.changes.send_replace(version);
        Some(previous)
    }

    /// Forgets the table: back to version 0, nobody owns anything (a member leaving its cluster
    /// to merge into another, whose tables start anywhere).
    pub(crate) fn reset(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let count = current.partition_count();
        *current = Arc::new(PartitionTable::empty(count));
        drop(current);
        self.changes.send_replace(0);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_and_reject_inconsistent_input() {
        let table = PartitionTable {
            version: 3,
            publisher: MemberId(9),
            replicas: vec![vec![MemberId(1), MemberId(2)], vec![MemberId(2)], vec![]],
            previous: vec![Some(MemberId(2)), None, None],
            members: vec![MemberId(1), MemberId(2)],
            generations: vec![7, 8],
        };
        let wire = table.to_proto();
        assert_eq!(PartitionTable::from_proto(&wire, 3), Some(table.clone()));
        assert_eq!(PartitionTable::from_proto(&wire, 4), None);
        let mut short = wire.clone();
        short.owners.pop();
        assert_eq!(PartitionTable::from_proto(&short, 3), None);
        let mut long = wire.clone();
        long.owners.push(5);
        assert_eq!(PartitionTable::from_proto(&long, 3), None);
        assert_eq!(table.generation_of(MemberId(2)), Some(8));
        assert_eq!(table.generation_of(MemberId(3)), None);
        let mut unmatched = wire;
        unmatched.generations.pop();
        assert_eq!(PartitionTable::from_proto(&unmatched, 3), None);
    }

    #[test]
    fn only_newer_tables_apply() {
        let holder = TableHolder::new(2);
        let t = |version, publisher| PartitionTable {
            version,
            publisher: MemberId(publisher),
            replicas: vec![vec![MemberId(publisher)]; 2],
            previous: vec![None; 2],
            members: Vec::new(),
            generations: Vec::new(),
        };
        assert!(holder.apply(t(2, 5)).is_some());
        assert!(holder.apply(t(1, 9)).is_none());
        assert!(holder.apply(t(2, 4)).is_none());
        assert!(holder.apply(t(2, 6)).is_some());
        assert_eq!(holder.current().publisher, MemberId(6));
        assert_eq!(*holder.subscribe().borrow(), 2);
    }
}
