//! Split-brain protection: the check that a structure's minimum cluster size is present.

use crate::config::SplitBrainProtection;
use crate::error::{Error, Result};
use crate::map::ops::MapOp;
use crate::node::Node;

impl Node {
    /// Fails with [`Error::QuorumNotPresent`] if `op` on the structure behind internal map `map`
    /// (and `key`, for lock states) is guarded and this member recently heard from fewer members
    /// than the structure's minimum (see [`SplitBrainProtection`]). Internal operations (expiry,
    /// lock sweeps, merges) are never guarded.
    pub(crate) fn check_quorum(&self, map: &str, key: &[u8], op: &MapOp) -> Result<()> {
        if !self.quorum_guarded {
            return Ok(());
        }
        let Some(write) = op.quorum_write() else {
            return Ok(());
        };
        let (structure, name, protection) = self.protection_of(map, key);
        self.check_protection(structure, name, protection, write)
    }

    /// Whether `op` on `map` is a single-key read that split-brain protection guards: such a
    /// read passes a read barrier (see [`Node::read_barrier`]).
    pub(crate) fn guarded_read(&self, map: &str, key: &[u8], op: &MapOp) -> bool {
        op.is_read() && self.guarded_answers(map, key)
    }

    /// Whether what the primary answers about `map`'s entries (a read's value, or a
    /// conditional write that found another value than it expected) passes a read barrier:
    /// split-brain protection guards reads of the structure, and its backups are synchronous.
    pub(crate) fn guarded_answers(&self, map: &str, key: &[u8]) -> bool {
        if !self.quorum_guarded {
            return false;
        }
        let (_, _, protection) = self.protection_of(map, key);
        protection.is_some_and(|p| p.guards(false)) && !self.config.map_config(map).async_backups
    }

    /// [`Node::check_quorum`] for a whole-map operation (`size`, `clear`, batches).
    pub(crate) fn check_map_quorum(&self, map: &str, write: bool) -> Result<()> {
        if !self.quorum_guarded {
            return Ok(());
        }
        let protection = self.config.map_config(map).split_brain_protection;
        self.check_protection("map", map.to_string(), protection, write)
    }

    fn check_protection(
        &self,
        structure: &'static str,
        name: String,
        protection: Option<SplitBrainProtection>,
        write: bool,
    ) -> Result<()> {
        let Some(protection) = protection.filter(|p| p.guards(write)) else {
            return Ok(());
        };
        let present = self.membership.quorum_present();
        if present >= protection.min_cluster_size {
            return Ok(());
        }
        Err(Error::QuorumNotPresent {
            structure,
            name,
            min: protection.min_cluster_size,
            present,
            member: self.me,
        })
    }

    /// The kind, name and protection of the structure behind internal map `map`.
    fn protection_of(
        &self,
        map: &str,
        key: &[u8],
    ) -> (&'static str, String, Option<SplitBrainProtection>) {
        use crate::lock::owner::{KEYED, NAMED, map_of_key_lock};
        if map == NAMED {
            let name = String::from_utf8_lossy(key).into_owned();
            let protection = self.config.lock_config(&name).split_brain_protection;
            return ("lock", name, protection);
        }
        if map == KEYED {
            let name = map_of_key_lock(key).unwrap_or_default().to_string();
            let protection = self.config.map_config(&name).split_brain_protection;
            return ("map", name, protection);
        }
        if let Some(queue) = crate::queue::queue_of(map) {
            let protection = self.config.queue_config(queue).split_brain_protection;
            return ("queue", queue.to_string(), protection);
        }
        let protection = self.config.map_config(map).split_brain_protection;
        ("map", map.to_string(), protection)
    }
}

impl MapOp {
    /// Whether split-brain protection counts the operation as a write (`Some(true)`), a read
    /// (`Some(false)`), or leaves it alone (`None`: internal operations).
    pub(crate) fn quorum_write(&self) -> Option<bool> {
        match self {
            MapOp::RemoveIfExpired
            | MapOp::RefreshTo { .. }
            | MapOp::LockSweep
            | MapOp::LockMerge { .. }
            | MapOp::Merge { .. } => None,
            MapOp::Get
            | MapOp::ContainsKey
            | MapOp::LoadBegin { .. }
            | MapOp::QueuePeek
            | MapOp::QueueLen
            | MapOp::LockInfo => Some(false),
            _ => Some(true),
        }
    }
}
