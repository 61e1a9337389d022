//! The cluster view exchanged in probe datagrams, and the pure decision on two views.
//!
//! A probe carries the sender's view of its cluster; the answer carries the receiver's. Two
//! views with different coordinators, neither of which lists the other's sender, are two
//! clusters (the sides of a split that healed, or two clusters started apart with the same
//! name), even when some members appear in both: after a split that healed as failure detection
//! ended, members that renewed their identity can be seen by both sides while the two sides
//! still do not see each other, and each side's coordinator keeps publishing its own tables.
//! [`decide`] says which of them merges into the other: the one with fewer members (when the
//! views share members, whose sizes then count them on both sides: fewer members of its own);
//! on a tie, the one whose coordinator is younger, so the older coordinator keeps coordinating.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::membership::identity::Identity;

/// At most this many member addresses are listed in a view (the size is always exact): the
/// view must fit in one datagram.
pub(crate) const MAX_LISTED: usize = 64;

/// One member's view of its cluster, as a probe or its answer carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClusterView {
    /// Who sends it.
    pub(crate) sender: Identity,
    /// The sender's coordinator: its generation and id (the oldest member it sees).
    pub(crate) coordinator: (u64, u64),
    /// How many members the sender sees, itself included.
    pub(crate) size: u32,
    /// Their gossip addresses (up to [`MAX_LISTED`]).
    pub(crate) members: Vec<SocketAddr>,
}

/// What to do about another cluster's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// One cluster (the same coordinator, or the two senders see each other), nothing to do.
    Same,
    /// Two clusters, and ours merges into theirs.
    WeMerge,
    /// Two clusters, and theirs merges into ours.
    TheyMerge,
}

/// Whether `mine` and `theirs` are two clusters, and which merges.
pub(crate) fn decide(mine: &ClusterView, theirs: &ClusterView) -> Verdict {
    if mine.coordinator == theirs.coordinator
        || mine.members.contains(&theirs.sender.gossip)
        || theirs.members.contains(&mine.sender.gossip)
    {
        return Verdict::Same;
    }
    // Views that share members (members that still see both sides) have sizes that count
    // those members twice, and each side may count them differently: by size, both sides could
    // decide to merge into the other at once (a Jepsen run had a 3 | 2 split's two sides each
    // merge into the other after a heal, and dropped a partition on the way). The members only
    // one side lists, though, are the same for both sides (from the same two views), so they
    // decide: the side with fewer of its own merges. When a list is cut short (a view too large
    // for a datagram), the coordinators decide, which are the same two for both sides.
    //
    // Not the coordinators' age alone: after an isolated member that had been the oldest came
    // back before the others declared it down, and one member had renewed into its cluster
    // (so the views shared that member's address), a side of four, with the quorum, merged
    // into the side of the isolated member. A merge leaves out the merging side's entries and
    // items of guarded structures where the larger side kept the same copy (see
    // `merge::superseded_by_same_lineage`), on the ground that the merging side had no quorum:
    // the four members' acknowledged offers were lost, and the items they had polled were
    // polled again from the isolated member's older copy (a Jepsen process split run).
    let overlap = mine.members.iter().any(|m| theirs.members.contains(m));
    let complete = |v: &ClusterView| v.members.len() == v.size as usize;
    let own = |a: &ClusterView, b: &ClusterView| {
        a.members.iter().filter(|m| !b.members.contains(m)).count()
    };
    let by_size = if !overlap {
        mine.size.cmp(&theirs.size)
    } else if complete(mine) && complete(theirs) {
        own(mine, theirs).cmp(&own(theirs, mine))
    } else {
        std::cmp::Ordering::Equal
    };
    match by_size {
        std::cmp::Ordering::Less => Verdict::WeMerge,
        std::cmp::Ordering::Greater => Verdict::TheyMerge,
        // The older coordinator (smaller generation, then id) keeps coordinating.
        std::cmp::Ordering::Equal if mine.coordinator < theirs.coordinator => Verdict::TheyMerge,
        std::cmp::Ordering::Equal => Verdict::WeMerge,
    }
}

/// Whether `theirs` was sent before its coordinator or its sender renewed: `members` (this
/// member's view, as (generation, id)) holds that member under a newer generation, so it has
/// merged into this cluster since, and the view describes a cluster that is gone.
pub(crate) fn outdated(theirs: &ClusterView, members: &[(u64, u64)]) -> bool {
    let renewed =
        |(generation, id): (u64, u64)| members.iter().any(|&(g, i)| i == id && g > generation);
    renewed(theirs.coordinator) || renewed((theirs.sender.generation, theirs.sender.id.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberId;
    use std::sync::Arc;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn view(ports: &[u16], coordinator: (u64, u64)) -> ClusterView {
        ClusterView {
            sender: Identity {
                id: MemberId(u64::from(ports[0])),
                gossip: addr(ports[0]),
                rpc: addr(ports[0] + 1000),
                generation: 1,
                name: Arc::from("m"),
            },
            coordinator,
            size: ports.len() as u32,
            members: ports.iter().map(|&p| addr(p)).collect(),
        }
    }

    #[test]
    fn the_smaller_side_merges_and_a_tie_goes_to_the_older_coordinator() {
        let three = view(&[1, 2, 3], (10, 1));
        let two = view(&[4, 5], (5, 4));
        assert_eq!(decide(&two, &three), Verdict::WeMerge);
        assert_eq!(decide(&three, &two), Verdict::TheyMerge);
        let other_two = view(&[6, 7], (7, 6));
        assert_eq!(decide(&two, &other_two), Verdict::TheyMerge);
        assert_eq!(decide(&other_two, &two), Verdict::WeMerge);
        // Same generation: the smaller id is older.
        let same_gen = view(&[8, 9], (5, 9));
        assert_eq!(decide(&same_gen, &two), Verdict::WeMerge);
    }

    #[test]
    fn views_that_share_members_but_not_each_other_are_two_clusters() {
        // Members 3 and 4 are seen by both sides; the senders 1 and 5 do not see each other.
        let mine = view(&[1, 3, 4], (10, 1));
        let theirs = view(&[5, 6, 3, 4], (12, 5));
        // The side with fewer members of its own merges (1 against 5 and 6), though its
        // coordinator is the older, whichever side decides.
        assert_eq!(decide(&mine, &theirs), Verdict::WeMerge);
        assert_eq!(decide(&theirs, &mine), Verdict::TheyMerge);
        // As many of their own on each side: the younger coordinator's side merges.
        let even = view(&[5, 3, 4], (12, 5));
        assert_eq!(decide(&mine, &even), Verdict::TheyMerge);
        assert_eq!(decide(&even, &mine), Verdict::WeMerge);
    }

    #[test]
    fn an_oldest_member_back_from_isolation_merges_into_the_side_that_kept_the_quorum() {
        // Member 1, the oldest, was cut off; 2 renewed and joined it; 3, 4 and 5 still list
        // 2's address. By coordinator age, the side of four would merge into member 1's.
        let isolated = view(&[1, 2], (1, 1));
        let quorum = view(&[3, 4, 5, 2], (7, 3));
        assert_eq!(decide(&isolated, &quorum), Verdict::WeMerge);
        assert_eq!(decide(&quorum, &isolated), Verdict::TheyMerge);
    }

    #[test]
    fn both_sides_reach_opposite_verdicts_whatever_their_sizes_say() {
        // Each side counts a shared member (3) as its own; by size each would merge into the
        // other.
        let a = view(&[1, 2, 3], (10, 1));
        let b = view(&[5, 6, 3], (12, 5));
        let b_seen_by_a = ClusterView {
            size: 4,
            ..b.clone()
        };
        let a_seen_by_b = ClusterView {
            size: 4,
            ..a.clone()
        };
        let verdicts = (decide(&a, &b_seen_by_a), decide(&b, &a_seen_by_b));
        assert_eq!(verdicts, (Verdict::TheyMerge, Verdict::WeMerge));
    }

    #[test]
    fn overlapping_views_are_one_cluster() {
        let a = view(&[1, 2, 3], (10, 1));
        assert_eq!(decide(&a, &view(&[3, 4], (2, 4))), Verdict::Same);
        assert_eq!(decide(&a, &view(&[5], (10, 1))), Verdict::Same);
        assert_eq!(decide(&a, &a.clone()), Verdict::Same);
    }

    #[test]
    fn a_view_from_before_its_coordinator_renewed_and_joined_is_outdated() {
        // Their coordinator (generation 5, id 4) and their sender (port 5, generation 1).
        let theirs = view(&[5, 4], (5, 4));
        assert!(!outdated(&theirs, &[(10, 1), (5, 4)]));
        // The coordinator merged into this cluster: it is here under a newer generation.
        assert!(outdated(&theirs, &[(10, 1), (11, 4)]));
        // The sender merged.
        assert!(outdated(&theirs, &[(10, 1), (12, 5)]));
        // And its view still overlaps this one and would, by coordinator age, say this cluster
        // merges into it: without the check, both sides merged into each other.
        let mine = view(&[1, 4], (10, 1));
        assert_eq!(decide(&mine, &theirs), Verdict::WeMerge);
    }
}
