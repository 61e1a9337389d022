//! Migration planning: pure functions from the current table to the next one.
//!
//! The coordinator never jumps to the target table. It first [`repair`]s the current table (at
//! once, whenever a member is gone), then [`advance`]s it toward the target in steps of at most
//! `max_parallel_migrations` partitions, publishing each step as a table version and waiting for
//! it to settle before the next.
//!
//! A partition moves in two steps, so its data is copied while it keeps serving:
//!
//! 1. **Copy**: the members the target adds join the replica set as extra backups, after the
//!    current ones: `[A, B]` toward `[D, B]` becomes `[A, B, D]`. The primary streams D a snapshot,
//!    then every mutation after it; writes keep going to A (and wait for D's acknowledgement too).
//! 2. **Commit**: once the step settled (every copy installed), the set becomes the target:
//!    `[D, B]`. D takes over from A: A stops writing, flushes its last mutations to D, and the two
//!    compare sequence number and digest, so nothing is copied again. A answers `NotOwner` and
//!    drops its copy one table later.
//!
//! A table version is atomic, so a coordinator that dies mid-migration leaves a table that is
//! either before or after each step; the next coordinator continues from it toward its own
//! target, which completes the move or rolls it back (drops the extra replica).

use std::collections::BTreeSet;

use crate::membership::MemberId;

/// The replica sets with every member not in `live` removed: a partition whose primary is gone
/// is led by its first live backup at once, which holds the data already (no copy). A partition
/// with no live replica left gets its `target` set at once; its new primary finds no replica to
/// take it over from and reports the loss.
pub(crate) fn repair(
    current: &[Vec<MemberId>],
    live: &BTreeSet<MemberId>,
    target: &[Vec<MemberId>],
) -> Vec<Vec<MemberId>> {
    current
        .iter()
        .zip(target)
        .map(|(set, target)| {
            if set.is_empty() {
                return set.clone();
            }
            let kept: Vec<MemberId> = set.iter().copied().filter(|m| live.contains(m)).collect();
            if kept.is_empty() {
                target.clone()
            } else {
                kept
            }
        })
        .collect()
}

/// The next step from `current` toward `target`: at most `max` partitions that hold data change
/// (partitions with no replica take their target at once, as there is nothing to copy). Partitions
/// short of replicas go first, then commits (which finish moves and free memory), then new copies;
/// ties go by partition id.
pub(crate) fn advance(
    current: &[Vec<MemberId>],
    target: &[Vec<MemberId>],
    max: usize,
) -> Vec<Vec<MemberId>> {
    let mut next = current.to_vec();
    let mut candidates: Vec<(u8, usize, Vec<MemberId>)> = Vec::new();
    for (p, (cur, tgt)) in current.iter().zip(target).enumerate() {
        if cur == tgt {
            continue;
        }
        if cur.is_empty() {
            next[p] = tgt.clone();
            continue;
        }
        let missing: Vec<MemberId> = tgt.iter().copied().filter(|m| !cur.contains(m)).collect();
        let (rank, step) = if missing.is_empty() {
            (1, tgt.clone())
        } else {
            let rank = if cur.len() < tgt.len() { 0 } else { 2 };
            (rank, cur.iter().copied().chain(missing).collect())
        };
        candidates.push((rank, p, step));
    }
    candidates.sort_by_key(|(rank, p, _)| (*rank, *p));
    for (_, p, step) in candidates.into_iter().take(max) {
        next[p] = step;
    }
    next
}

/// How many partitions differ between two tables (a step's size, or the moves left).
pub(crate) fn differing(a: &[Vec<MemberId>], b: &[Vec<MemberId>]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::assignment::assign;

    fn m(n: u64) -> MemberId {
        MemberId(n)
    }

    #[test]
    fn repair_promotes_the_first_live_backup_without_a_copy() {
        let current = vec![vec![m(1), m(2), m(3)], vec![m(2), m(1)], vec![m(1)]];
        let live: BTreeSet<_> = [m(2), m(3)].into();
        let target = vec![vec![m(3), m(2)]; 3];
        assert_eq!(
            repair(&current, &live, &target),
            vec![vec![m(2), m(3)], vec![m(2)], vec![m(3), m(2)]]
        );
    }

    #[test]
    fn a_move_copies_first_then_commits() {
        let current = vec![vec![m(1), m(2)]];
        let target = vec![vec![m(3), m(2)]];
        let copy = advance(&current, &target, 10);
        assert_eq!(copy, vec![vec![m(1), m(2), m(3)]]);
        let commit = advance(&copy, &target, 10);
        assert_eq!(commit, target);
        assert_eq!(advance(&commit, &target, 10), target);
    }

    #[test]
    fn steps_are_bounded_and_reach_the_target() {
        let three: Vec<MemberId> = (1..=3).map(m).collect();
        let five: Vec<MemberId> = (1..=5).map(m).collect();
        let mut table = assign(&three, 271, 1);
        let target = assign(&five, 271, 1);
        let mut steps = 0;
        while table != target {
            let next = advance(&table, &target, 16);
            assert!(differing(&table, &next) <= 16);
            // Every step keeps the current replicas of each partition until the commit, and a
            // commit only promotes a member that was already a replica.
            for (before, after) in table.iter().zip(&next) {
                if before != after {
                    assert!(
                        after.first().is_some_and(|p| before.contains(p))
                            || after.len() > before.len()
                    );
                }
            }
            table = next;
            steps += 1;
            assert!(steps < 100, "no progress");
        }
        assert!(steps >= 2);
    }

    #[test]
    fn empty_partitions_take_their_target_at_once_and_short_ones_go_first() {
        let current = vec![vec![], vec![m(1), m(2)], vec![m(1)]];
        let target = vec![vec![m(1), m(2)], vec![m(2), m(1)], vec![m(1), m(2)]];
        let next = advance(&current, &target, 1);
        assert_eq!(
            next,
            vec![vec![m(1), m(2)], vec![m(1), m(2)], vec![m(1), m(2)]]
        );
    }
}
