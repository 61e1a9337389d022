//! The histories a Jepsen-style run records, and the checkers that read them. Pure: no
//! cluster, no clock; unit tests at the bottom feed hand-written histories.

use std::collections::{BTreeMap, HashMap, HashSet};

/// Microseconds since the run started, on the harness's one monotonic clock (every client runs
/// in the harness process, so invoke and complete times of all clients compare).
pub type Micros = u64;

/// How an operation ended, as Jepsen sees it: `Ok` (it happened, with this result), `Fail` (it
/// certainly did not happen), `Unknown` (it may or may not have happened: a timeout, a crash
/// of the member that ran it; the client that ran it is retired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Ok(T),
    Fail(String),
    Unknown(String),
}

impl<T> Outcome<T> {
    /// The same outcome with `f` applied to an ok result.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Ok(v) => Outcome::Ok(f(v)),
            Outcome::Fail(e) => Outcome::Fail(e),
            Outcome::Unknown(e) => Outcome::Unknown(e),
        }
    }
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Entry<Op, R> {
    pub client: u32,
    pub op: Op,
    pub invoke: Micros,
    pub complete: Micros,
    pub outcome: Outcome<R>,
}

/// Operations by outcome.
pub fn outcomes<Op, R>(history: &[Entry<Op, R>]) -> (usize, usize, usize) {
    let mut counts = (0, 0, 0);
    for e in history {
        match e.outcome {
            Outcome::Ok(_) => counts.0 += 1,
            Outcome::Fail(_) => counts.1 += 1,
            Outcome::Unknown(_) => counts.2 += 1,
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Set: no lost acknowledged write.

/// Adds a unique key with a known value to a map.
pub type SetEntry = Entry<(String, u64), ()>;

/// What the set checker found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetReport {
    pub acknowledged: usize,
    pub unknown: usize,
    /// Acknowledged adds missing from the final read (or read with another value).
    pub lost: Vec<String>,
    /// Unknown adds found in the final read.
    pub recovered: usize,
    /// Entries in the final read that no client ever tried to add.
    pub unexpected: Vec<String>,
}

impl SetReport {
    pub fn anomalies(&self) -> usize {
        self.lost.len() + self.unexpected.len()
    }
}

/// `final_read`: every entry of the map after the heal (key to value).
pub fn check_set(history: &[SetEntry], final_read: &HashMap<String, u64>) -> SetReport {
    let mut report = SetReport::default();
    let mut attempted = HashSet::new();
    for e in history {
        let (key, value) = &e.op;
        attempted.insert(key.as_str());
        match e.outcome {
            Outcome::Ok(()) => {
                report.acknowledged += 1;
                if final_read.get(key) != Some(value) {
                    report.lost.push(key.clone());
                }
            }
            Outcome::Unknown(_) => {
                report.unknown += 1;
                if final_read.get(key) == Some(value) {
                    report.recovered += 1;
                }
            }
            Outcome::Fail(_) => {}
        }
    }
    report.unexpected = final_read
        .keys()
        .filter(|k| !attempted.contains(k.as_str()))
        .cloned()
        .collect();
    report.lost.sort();
    report.unexpected.sort();
    report
}

// ---------------------------------------------------------------------------------------------
// Register: per-key linearizability (Wing and Gong's search, with Lowe's memoization).

/// An operation on one register (a map key holding a number, absent at first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    Read,
    Write(u64),
    /// Compare-and-set: `replace_if_equal(from, to)`.
    Cas(u64, u64),
}

/// A read's value, a write's nothing, a compare-and-set's success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterResult {
    Read(Option<u64>),
    Written,
    Cas(bool),
}

pub type RegisterEntry = Entry<RegisterOp, RegisterResult>;

/// The result of checking one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations explains the results; the history is kept for the report.
    NotLinearizable,
    /// The search gave up after its step budget: neither proven nor refuted.
    Undecided,
}

/// Applies `op` with result `result` to `state`; `None` if the result is impossible there. An
/// unknown result (`None`) is whatever the operation would return.
fn step(state: Option<u64>, op: RegisterOp, result: Option<RegisterResult>) -> Option<Option<u64>> {
    match (op, result) {
        (RegisterOp::Read, Some(RegisterResult::Read(v))) => (v == state).then_some(state),
        (RegisterOp::Read, None) => Some(state),
        (RegisterOp::Write(v), Some(RegisterResult::Written) | None) => Some(Some(v)),
        (RegisterOp::Cas(from, to), Some(RegisterResult::Cas(true))) => {
            (state == Some(from)).then_some(Some(to))
        }
        (RegisterOp::Cas(from, _), Some(RegisterResult::Cas(false))) => {
            (state != Some(from)).then_some(state)
        }
        (RegisterOp::Cas(from, to), None) => {
            Some(if state == Some(from) { Some(to) } else { state })
        }
        _ => None,
    }
}

/// Checks one key's history. Failed operations did not happen and are left out; unknown ones
/// may take effect at any time after their invocation, or never; reads of unknown outcome
/// change nothing and are left out. `budget` bounds the search steps.
pub fn check_register(history: &[RegisterEntry], budget: u64) -> Verdict {
    struct Op {
        invoke: Micros,
        /// `Micros::MAX` for an unknown outcome: it may take effect any time later.
        complete: Micros,
        op: RegisterOp,
        result: Option<RegisterResult>,
    }
    let mut ops: Vec<Op> = history
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Ok(r) => Some(Op {
                invoke: e.invoke,
                complete: e.complete,
                op: e.op,
                result: Some(*r),
            }),
            Outcome::Unknown(_) if e.op != RegisterOp::Read => Some(Op {
                invoke: e.invoke,
                complete: Micros::MAX,
                op: e.op,
                result: None,
            }),
            _ => None,
        })
        .collect();
    ops.sort_by_key(|o| o.invoke);
    let n = ops.len();
    let must = ops.iter().filter(|o| o.result.is_some()).count();
    if must == 0 {
        return Verdict::Linearizable;
    }
    let words = n.div_ceil(64);
    // Depth-first over (linearized set, state); a configuration seen before is not explored
    // again (Lowe's memoization).
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<u64>, usize)> = vec![(vec![0; words], None, 0)];
    let mut steps = 0u64;
    while let Some((done, state, done_must)) = stack.pop() {
        if done_must == must {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Undecided;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // An operation can go next only if it was invoked before every remaining operation
        // completed.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .map(|i| ops[i].complete)
            .min()
            .unwrap_or(Micros::MAX);
        for i in (0..n).filter(|&i| !is_done(i)) {
            if ops[i].invoke > horizon {
                break;
            }
            let Some(next) = step(state, ops[i].op, ops[i].result) else {
                continue;
            };
            let mut after = done.clone();
            after[i / 64] |= 1 << (i % 64);
            if seen.insert((after.clone(), next)) {
                let counted = done_must + usize::from(ops[i].result.is_some());
                stack.push((after, next, counted));
            }
        }
    }
    Verdict::NotLinearizable
}

/// What the register checker found over every key.
#[derive(Debug, Default)]
pub struct RegisterReport {
    pub keys: usize,
    pub linearizable: usize,
    pub not_linearizable: Vec<String>,
    pub undecided: Vec<String>,
    /// The first key that is not linearizable, and its history, for the report.
    pub first_failure: Option<(String, Vec<RegisterEntry>)>,
}

/// The last 40 operations of the shortest prefix (in invocation order) of a non-linearizable
/// register history that is not linearizable either, found by bisection: where the anomaly is.
///
/// An operation of the prefix still running when the first operation left out was invoked may
/// have seen that operation's effect (a read returning a write invoked after it), so its
/// outcome counts as unknown in the prefix: otherwise a prefix could look wrong only because
/// it was cut.
fn failing_tail(entries: &[RegisterEntry], budget: u64) -> Vec<RegisterEntry> {
    let mut sorted: Vec<&RegisterEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.invoke);
    let prefix = |n: usize| -> Vec<RegisterEntry> {
        let cut = sorted.get(n).map_or(Micros::MAX, |e| e.invoke);
        sorted[..n]
            .iter()
            .map(|e| {
                let mut e = (*e).clone();
                if e.complete > cut && !matches!(e.outcome, Outcome::Fail(_)) {
                    e.outcome = Outcome::Unknown("running when the prefix was cut".into());
                }
                e
            })
            .collect()
    };
    let (mut good, mut bad) = (0, sorted.len());
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if check_register(&prefix(mid), budget) == Verdict::NotLinearizable {
            bad = mid;
        } else {
            good = mid;
        }
    }
    sorted[bad.saturating_sub(40)..bad]
        .iter()
        .map(|e| (*e).clone())
        .collect()
}

pub fn check_registers(history: &[(String, RegisterEntry)], budget: u64) -> RegisterReport {
    let mut by_key: BTreeMap<&str, Vec<RegisterEntry>> = BTreeMap::new();
    for (key, e) in history {
        by_key.entry(key).or_default().push(e.clone());
    }
    let mut report = RegisterReport {
        keys: by_key.len(),
        ..Default::default()
    };
    for (key, entries) in by_key {
        match check_register(&entries, budget) {
            Verdict::Linearizable => report.linearizable += 1,
            Verdict::NotLinearizable => {
                report.not_linearizable.push(key.to_string());
                if report.first_failure.is_none() {
                    report.first_failure = Some((key.to_string(), failing_tail(&entries, budget)));
                }
            }
            Verdict::Undecided => report.undecided.push(key.to_string()),
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Queue: every acknowledged offer polled exactly once, none invented.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOp {
    Offer(u64),
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueResult {
    Offered(bool),
    Polled(Option<u64>),
}

pub type QueueEntry = Entry<QueueOp, QueueResult>;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueueReport {
    pub offered: usize,
    pub offers_unknown: usize,
    pub polled: usize,
    pub polls_unknown: usize,
    /// Items polled more than once.
    pub duplicated: Vec<u64>,
    /// Items polled that no client offered.
    pub invented: Vec<u64>,
    /// Acknowledged offers never polled (in the run or the final drain).
    pub missing: Vec<u64>,
}

impl QueueReport {
    /// Missing items beyond what the unknown polls may have taken: an item a poll took whose
    /// caller then gave up (a timeout, a crash) is given to no one else, by design.
    pub fn lost(&self) -> usize {
        self.missing.len().saturating_sub(self.polls_unknown)
    }

    pub fn anomalies(&self) -> usize {
        self.duplicated.len() + self.invented.len() + self.lost()
    }
}

/// `drained`: the items the final drain took, after the heal.
pub fn check_queue(history: &[QueueEntry], drained: &[u64]) -> QueueReport {
    let mut report = QueueReport::default();
    let mut acknowledged = HashSet::new();
    let mut attempted = HashSet::new();
    let mut taken: HashMap<u64, usize> = HashMap::new();
    for e in history {
        match (e.op, &e.outcome) {
            (QueueOp::Offer(item), outcome) => {
                attempted.insert(item);
                match outcome {
                    Outcome::Ok(QueueResult::Offered(true)) => {
                        report.offered += 1;
                        acknowledged.insert(item);
                    }
                    Outcome::Unknown(_) => report.offers_unknown += 1,
                    _ => {}
                }
            }
            (QueueOp::Poll, Outcome::Ok(QueueResult::Polled(Some(item)))) => {
                report.polled += 1;
                *taken.entry(*item).or_default() += 1;
            }
            (QueueOp::Poll, Outcome::Unknown(_)) => report.polls_unknown += 1,
            _ => {}
        }
    }
    for item in drained {
        report.polled += 1;
        *taken.entry(*item).or_default() += 1;
    }
    report.duplicated = taken
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    report.invented = taken
        .keys()
        .filter(|i| !attempted.contains(*i))
        .copied()
        .collect();
    report.missing = acknowledged
        .iter()
        .filter(|i| !taken.contains_key(*i))
        .copied()
        .collect();
    report.duplicated.sort_unstable();
    report.invented.sort_unstable();
    report.missing.sort_unstable();
    report
}

// ---------------------------------------------------------------------------------------------
// Lock: fencing tokens strictly increase; no two holders at once at a fenced resource.

/// One grant of the lock: who, with which token, when the acquire was invoked and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub client: u32,
    pub fence: u64,
    pub invoke: Micros,
    pub complete: Micros,
}

/// A resource that checks fencing tokens, as the lock's users are told to build: it refuses a
/// token smaller than the largest it has seen. Records what it accepted, to check that no two
/// holders were inside at once with tokens it accepted.
#[derive(Debug, Default)]
pub struct FencedResource {
    max_fence: u64,
    /// The holder inside now, by the token it entered with.
    inside: Option<(u32, u64)>,
    pub accepted: u64,
    pub refused_stale: u64,
    /// Two holders inside at once, both with accepted tokens: the anomaly fencing must prevent.
    pub overlaps: Vec<(u32, u64, u32, u64)>,
    /// A later holder took over (a larger token) while an earlier one had not left: the lock
    /// was not exclusive in time (a lease ran out, a holder's member was declared down), and
    /// the token kept the earlier holder out from then on.
    pub takeovers: u64,
}

impl FencedResource {
    /// A holder enters with `fence`; false if the token is stale.
    pub fn enter(&mut self, client: u32, fence: u64) -> bool {
        if fence < self.max_fence {
            self.refused_stale += 1;
            return false;
        }
        if let Some((other, other_fence)) = self.inside
            && other != client
        {
            if other_fence == fence {
                self.overlaps.push((other, other_fence, client, fence));
            } else {
                self.takeovers += 1;
            }
        }
        self.max_fence = fence;
        self.inside = Some((client, fence));
        self.accepted += 1;
        true
    }

    /// A write by a holder inside; false (refused) if a larger token was seen since it entered.
    pub fn write(&mut self, fence: u64) -> bool {
        if fence < self.max_fence {
            self.refused_stale += 1;
            false
        } else {
            self.accepted += 1;
            true
        }
    }

    /// The holder leaves (if it is still the one inside).
    pub fn leave(&mut self, client: u32, fence: u64) {
        if self.inside == Some((client, fence)) {
            self.inside = None;
        }
    }
}

#[derive(Debug, Default)]
pub struct LockReport {
    pub grants: usize,
    /// Tokens handed to two grants.
    pub reused_tokens: Vec<u64>,
    /// Pairs of grants in real-time order (the first answered before the second was asked
    /// for) whose tokens did not increase.
    pub decreasing: Vec<(u64, u64)>,
}

impl LockReport {
    pub fn anomalies(&self, resource: &FencedResource) -> usize {
        self.reused_tokens.len() + self.decreasing.len() + resource.overlaps.len()
    }
}

pub fn check_lock(grants: &[Grant]) -> LockReport {
    let mut report = LockReport {
        grants: grants.len(),
        ..Default::default()
    };
    let mut by_fence: HashMap<u64, usize> = HashMap::new();
    for g in grants {
        *by_fence.entry(g.fence).or_default() += 1;
    }
    report.reused_tokens = by_fence
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(f, _)| f)
        .collect();
    report.reused_tokens.sort_unstable();
    // Grants ordered by when they were answered; every grant asked for after an earlier one
    // was answered must carry a larger token than it. Checking against the largest token
    // answered before each invocation covers every such pair.
    let mut answered: Vec<&Grant> = grants.iter().collect();
    answered.sort_by_key(|g| g.complete);
    let mut invoked: Vec<&Grant> = grants.iter().collect();
    invoked.sort_by_key(|g| g.invoke);
    let mut max_before = 0u64;
    let mut a = 0;
    for g in invoked {
        while a < answered.len() && answered[a].complete < g.invoke {
            max_before = max_before.max(answered[a].fence);
            a += 1;
        }
        if g.fence <= max_before && max_before != 0 {
            report.decreasing.push((max_before, g.fence));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(
        client: u32,
        op: RegisterOp,
        invoke: u64,
        complete: u64,
        r: Option<RegisterResult>,
    ) -> RegisterEntry {
        Entry {
            client,
            op,
            invoke,
            complete,
            outcome: match r {
                Some(r) => Outcome::Ok(r),
                None => Outcome::Unknown("timeout".into()),
            },
        }
    }
    use RegisterOp::*;
    use RegisterResult as R;

    #[test]
    fn sequential_and_concurrent_register_histories_are_linearizable() {
        let h = vec![
            reg(1, Read, 0, 1, Some(R::Read(None))),
            reg(1, Write(3), 2, 3, Some(R::Written)),
            reg(2, Read, 4, 5, Some(R::Read(Some(3)))),
            reg(1, Cas(3, 4), 6, 7, Some(R::Cas(true))),
            reg(2, Cas(3, 5), 8, 9, Some(R::Cas(false))),
            reg(2, Read, 10, 11, Some(R::Read(Some(4)))),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::Linearizable);
        // Concurrent write and reads: the reads may see either side of the write.
        let h = vec![
            reg(1, Write(1), 0, 100, Some(R::Written)),
            reg(2, Read, 10, 20, Some(R::Read(Some(1)))),
            reg(3, Read, 30, 40, Some(R::Read(Some(1)))),
            reg(4, Read, 5, 50, Some(R::Read(None))),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_and_a_lost_write_are_not_linearizable() {
        // Read of the old value after a newer write completed.
        let h = vec![
            reg(1, Write(1), 0, 1, Some(R::Written)),
            reg(1, Write(2), 2, 3, Some(R::Written)),
            reg(2, Read, 4, 5, Some(R::Read(Some(1)))),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::NotLinearizable);
        // Two successful compare-and-sets from the same value, one after the other.
        let h = vec![
            reg(1, Write(1), 0, 1, Some(R::Written)),
            reg(1, Cas(1, 2), 2, 3, Some(R::Cas(true))),
            reg(2, Cas(1, 3), 4, 5, Some(R::Cas(true))),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::NotLinearizable);
        // A value nobody wrote.
        let h = vec![reg(2, Read, 4, 5, Some(R::Read(Some(9))))];
        assert_eq!(check_register(&h, 1_000_000), Verdict::NotLinearizable);
    }

    #[test]
    fn unknown_writes_may_take_effect_late_or_never() {
        let h = vec![
            reg(1, Write(1), 0, 1, Some(R::Written)),
            reg(2, Write(7), 2, 3, None),
            reg(3, Read, 4, 5, Some(R::Read(Some(1)))),
            reg(3, Read, 100, 101, Some(R::Read(Some(7)))),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::Linearizable);
        // But not before they were invoked.
        let h = vec![
            reg(3, Read, 0, 1, Some(R::Read(Some(7)))),
            reg(2, Write(7), 2, 3, None),
        ];
        assert_eq!(check_register(&h, 1_000_000), Verdict::NotLinearizable);
    }

    #[test]
    fn a_large_concurrent_history_is_decided_within_the_budget() {
        // 8 clients, 50 rounds of overlapping writes and reads that each see the latest round.
        let mut h = Vec::new();
        for round in 0..50u64 {
            let t = round * 100;
            for c in 0..4u32 {
                h.push(reg(
                    c,
                    Write(round * 10 + u64::from(c)),
                    t,
                    t + 50,
                    Some(R::Written),
                ));
            }
            for c in 4..8u32 {
                h.push(reg(
                    c,
                    Read,
                    t + 60,
                    t + 70,
                    Some(R::Read(Some(round * 10 + 3))),
                ));
            }
        }
        assert_eq!(check_register(&h, 5_000_000), Verdict::Linearizable);
    }

    #[test]
    fn the_set_checker_finds_lost_and_unexpected_entries() {
        let e = |k: &str, v: u64, ok: bool| SetEntry {
            client: 1,
            op: (k.to_string(), v),
            invoke: 0,
            complete: 1,
            outcome: if ok {
                Outcome::Ok(())
            } else {
                Outcome::Unknown("t".into())
            },
        };
        let h = vec![
            e("a", 1, true),
            e("b", 2, true),
            e("c", 3, false),
            e("d", 4, false),
        ];
        let read: HashMap<String, u64> = [
            ("a".to_string(), 1),
            ("c".to_string(), 3),
            ("z".to_string(), 9),
        ]
        .into();
        let r = check_set(&h, &read);
        assert_eq!(r.acknowledged, 2);
        assert_eq!(r.lost, vec!["b".to_string()]);
        assert_eq!(r.recovered, 1);
        assert_eq!(r.unexpected, vec!["z".to_string()]);
        assert_eq!(r.anomalies(), 2);
    }

    #[test]
    fn the_queue_checker_finds_duplicates_inventions_and_losses() {
        let e = |op: QueueOp, outcome: Outcome<QueueResult>| QueueEntry {
            client: 1,
            op,
            invoke: 0,
            complete: 1,
            outcome,
        };
        let h = vec![
            e(QueueOp::Offer(1), Outcome::Ok(QueueResult::Offered(true))),
            e(QueueOp::Offer(2), Outcome::Ok(QueueResult::Offered(true))),
            e(QueueOp::Offer(3), Outcome::Ok(QueueResult::Offered(true))),
            e(QueueOp::Offer(4), Outcome::Unknown("t".into())),
            e(QueueOp::Poll, Outcome::Ok(QueueResult::Polled(Some(1)))),
            e(QueueOp::Poll, Outcome::Ok(QueueResult::Polled(Some(1)))),
            e(QueueOp::Poll, Outcome::Ok(QueueResult::Polled(Some(8)))),
            e(QueueOp::Poll, Outcome::Unknown("t".into())),
        ];
        let r = check_queue(&h, &[4]);
        assert_eq!(r.duplicated, vec![1]);
        assert_eq!(r.invented, vec![8]);
        assert_eq!(r.missing, vec![2, 3]);
        // One of the two may have been taken by the unknown poll.
        assert_eq!(r.lost(), 1);
        assert_eq!(r.anomalies(), 3);
    }

    #[test]
    fn the_lock_checker_and_the_resource_find_reused_and_decreasing_tokens() {
        let g = |client, fence, invoke, complete| Grant {
            client,
            fence,
            invoke,
            complete,
        };
        let ok = check_lock(&[g(1, 5, 0, 1), g(2, 9, 2, 3), g(3, 7, 1, 10)]);
        // Grant 3 was asked for before grant 1 was answered... but after it: 7 > 5, fine; it
        // overlapped grant 2 in time, so their order is free.
        assert!(
            ok.reused_tokens.is_empty() && ok.decreasing.is_empty(),
            "{ok:?}"
        );
        let bad = check_lock(&[g(1, 5, 0, 1), g(2, 5, 2, 3), g(3, 4, 4, 5)]);
        assert_eq!(bad.reused_tokens, vec![5]);
        assert_eq!(bad.decreasing, vec![(5, 5), (5, 4)]);

        let mut resource = FencedResource::default();
        assert!(resource.enter(1, 5));
        assert!(resource.write(5));
        // The next holder takes over before the first left: the first is fenced out.
        assert!(resource.enter(2, 6));
        assert!(!resource.write(5));
        assert!(!resource.enter(3, 4));
        resource.leave(2, 6);
        assert_eq!(resource.takeovers, 1);
        assert!(resource.overlaps.is_empty());
        assert!(resource.enter(4, 7));
        assert!(resource.enter(5, 7));
        assert_eq!(resource.overlaps, vec![(4, 7, 5, 7)]);
    }
}
