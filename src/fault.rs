//! A network fault switch for failure tests: cut and heal the links between chosen members.
//!
//! Hazelcast's own tests firewall connections between members; openraft's test router has
//! `set_unreachable`. [`FaultSwitch`] does the same for peergrid: members that share one switch
//! (through [`crate::GridConfig::fault_switch`]) drop gossip datagrams to and from a cut peer, and
//! their rpc client refuses calls to it with [`crate::Error::Unreachable`]. Members are named by
//! their advertised gossip address, which is unique in a cluster.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Cuts and heals traffic between pairs of members. Cheap to clone; clones share the same cuts.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch {
    /// Cut links, each stored once with the smaller address first.
    cuts: Arc<RwLock<HashSet<(SocketAddr, SocketAddr)>>>,
    /// Partition copy streams still to break, and how many were broken.
    stream_breaks: Arc<(AtomicU64, AtomicU64)>,
    /// Near-cache invalidation batches still to drop, and how many were dropped.
    invalidation_drops: Arc<(AtomicU64, AtomicU64)>,
    /// False suspicions still to act on: (the member that suspects, the member it declares down).
    suspicions: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    /// How long each item a merging member hands over waits first, in milliseconds.
    merge_hand_over_delay_ms: Arc<AtomicU64>,
    /// Whether members withhold tables that make them primary of a partition another member
    /// leads, and how many tables they withheld.
    withheld_promotions: Arc<(std::sync::atomic::AtomicBool, AtomicU64)>,
}

fn link(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl FaultSwitch {
    /// A switch with every link up.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts gossip and rpc traffic between the members at gossip addresses `a` and `b`, both ways.
    pub fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.write().insert(link(a, b));
    }

    /// Cuts every link between the two groups (a network split).
    pub fn split(&self, side_a: &[SocketAddr], side_b: &[SocketAddr]) {
        let mut cuts = self.write();
        for &a in side_a {
            for &b in side_b {
                cuts.insert(link(a, b));
            }
        }
    }

    /// Restores traffic between `a` and `b`.
    pub fn heal(&self, a: SocketAddr, b: SocketAddr) {
        self.write().remove(&link(a, b));
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        self.write().clear();
    }

    /// Whether traffic between `a` and `b` is cut.
    pub fn is_cut(&self, a: SocketAddr, b: SocketAddr) -> bool {
        let cuts = self
            .cuts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        !cuts.is_empty() && cuts.contains(&link(a, b))
    }

    /// Breaks the next `n` partition copy streams (migrations and backup snapshots) sent by the
    /// members sharing this switch, each after its first chunk of contents, as a connection lost
    /// halfway through a transfer would.
    pub fn break_snapshot_streams(&self, n: u64) {
        self.stream_breaks.0.store(n, Ordering::SeqCst);
    }

    /// How many partition copy streams this switch broke so far.
    pub fn broken_snapshot_streams(&self) -> u64 {
        self.stream_breaks.1.load(Ordering::SeqCst)
    }

    /// Whether the stream about to be sent is to break (counted as broken if so).
    pub(crate) fn take_stream_break(&self) -> bool {
        take(&self.stream_breaks)
    }

    /// Drops the next `n` near-cache invalidation batches sent by the members sharing this
    /// switch (their sequence numbers are spent, as a batch lost on the way would be).
    pub fn drop_invalidation_batches(&self, n: u64) {
        self.invalidation_drops.0.store(n, Ordering::SeqCst);
    }

    /// How many invalidation batches this switch dropped so far.
    pub fn dropped_invalidation_batches(&self) -> u64 {
        self.invalidation_drops.1.load(Ordering::SeqCst)
    }

    /// Whether the invalidation batch about to be sent is to be dropped (counted if so).
    pub(crate) fn take_invalidation_drop(&self) -> bool {
        take(&self.invalidation_drops)
    }

    /// Makes the member at gossip address `at` declare the member at `of` down, as a failure
    /// detector that suspected it wrongly would (a starved process, acks lost on the way): at
    /// the next datagram it handles, if it sees `of` alive then. Links stay up, so the rest of
    /// the cluster keeps seeing both.
    pub fn false_suspicion(&self, at: SocketAddr, of: SocketAddr) {
        self.suspicions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((at, of));
    }

    /// Makes every item (entry, queue, lock fence) a merging member sharing this switch hands
    /// over wait `delay` first, as a hand-over of a large share over a slow network would: long
    /// enough for the cluster to change under it. Zero (the default) turns the delay off.
    pub fn slow_merge_hand_over(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.merge_hand_over_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// How long each merged item waits before it is handed over (see
    /// [`Self::slow_merge_hand_over`]).
    pub(crate) fn merge_hand_over_delay(&self) -> Duration {
        Duration::from_millis(self.merge_hand_over_delay_ms.load(Ordering::SeqCst))
    }

    /// While `on`, each member sharing this switch refuses every table published by another
    /// member that makes it the primary of a partition its own table gives to another member,
    /// as a member whose copy of that publication was lost would: its coordinator and the
    /// partition's old primary take it to lead the partition, and it does not know. Tables
    /// that only add it as a backup are taken as usual.
    pub fn withhold_promotions(&self, on: bool) {
        self.withheld_promotions.0.store(on, Ordering::SeqCst);
    }

    /// How many tables members refused while [`Self::withhold_promotions`] was on.
    pub fn withheld_promotions(&self) -> u64 {
        self.withheld_promotions.1.load(Ordering::SeqCst)
    }

    /// Whether a table promoting this member is to be refused (counted if so).
    pub(crate) fn take_promotion_withheld(&self) -> bool {
        let on = self.withheld_promotions.0.load(Ordering::SeqCst);
        if on {
            self.withheld_promotions.1.fetch_add(1, Ordering::SeqCst);
        }
        on
    }

    /// The members the member at `at` is to declare down (see [`Self::false_suspicion`]).
    pub(crate) fn take_false_suspicions(&self, at: SocketAddr) -> Vec<SocketAddr> {
        let mut suspicions = self
            .suspicions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if suspicions.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        suspicions.retain(|&(by, of)| {
            if by == at {
                taken.push(of);
            }
            by != at
        });
        taken
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<(SocketAddr, SocketAddr)>> {
        self.cuts
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Takes one from a (still to do, done) pair of counters, if any is left.
fn take(counters: &(AtomicU64, AtomicU64)) -> bool {
    let taken = counters
        .0
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if taken {
        counters.1.fetch_add(1, Ordering::SeqCst);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_symmetric_and_heal() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let switch = FaultSwitch::new();
        switch.cut(b, a);
        assert!(switch.is_cut(a, b) && switch.is_cut(b, a));
        assert!(!switch.is_cut(a, c));
        switch.split(&[a], &[b, c]);
        assert!(switch.is_cut(c, a));
        switch.heal(a, b);
        assert!(!switch.is_cut(a, b) && switch.is_cut(a, c));
        switch.heal_all();
        assert!(!switch.is_cut(a, c));
    }

    #[test]
    fn false_suspicions_are_taken_once_by_the_member_that_suspects() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let switch = FaultSwitch::new();
        switch.false_suspicion(a, b);
        switch.false_suspicion(c, b);
        switch.false_suspicion(a, c);
        assert!(switch.take_false_suspicions(b).is_empty());
        assert_eq!(switch.take_false_suspicions(a), vec![b, c]);
        assert!(switch.take_false_suspicions(a).is_empty());
        assert_eq!(switch.clone().take_false_suspicions(c), vec![b]);
    }
}
