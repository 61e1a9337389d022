//! A Jepsen-style safety suite: concurrent clients record every operation (client, operation,
//! invoke and complete times, outcome ok / fail / unknown) while a seeded schedule injects
//! faults; checkers then read the histories:
//!
//! - set: every acknowledged insert of a unique key is in the final read, nothing else is;
//! - register: each key's reads, writes and compare-and-sets are linearizable (Wing and Gong's
//!   search with memoization, `jepsen/checker.rs`);
//! - queue: every acknowledged offer is polled exactly once (run plus final drain), none is
//!   invented;
//! - lock: tokens strictly increase in real-time order, no token is handed out twice, and a
//!   resource that checks tokens never has two holders inside with accepted tokens.
//!
//! Faults: a member killed (every task stopped at once, its links cut, as SIGKILL does) and
//! restarted at its addresses; a member isolated; a majority / minority split; a member joining
//! and one leaving; in the process run, member processes (`peergrid node`) SIGKILLed and
//! restarted, and paused with SIGSTOP then resumed with SIGCONT. After each fault the schedule
//! heals and waits for a safe cluster before the next.
//!
//! The process run puts each member process, and this process's members, in network
//! namespaces of their own when it can (root, iproute2: `jepsen/netns.rs`); splits there drop
//! packets between namespaces. Without them it runs no splits, and says so.
//!
//! CI runs the short schedules below. Longer runs and other seeds:
//! `PEERGRID_JEPSEN_SECS=1800 PEERGRID_JEPSEN_SEED=7 cargo test --release --test jepsen -- --nocapture`.

#[path = "jepsen/checker.rs"]
mod checker;
mod common;
#[path = "jepsen/harness.rs"]
mod harness;
#[path = "jepsen/netns.rs"]
mod netns;

use harness::{Mode, RunConfig};

fn run_config(mode: Mode, default_secs: u64, faults: &[&'static str]) -> RunConfig {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let chosen: Vec<&'static str> = match std::env::var("PEERGRID_JEPSEN_FAULTS") {
        Ok(list) => ["kill", "pause", "isolate", "split", "join-leave"]
            .into_iter()
            .filter(|k| list.split(',').any(|f| f.trim() == *k))
            .collect(),
        Err(_) => faults.to_vec(),
    };
    RunConfig {
        mode,
        faults: chosen,
        seed: env("PEERGRID_JEPSEN_SEED").unwrap_or(0x5EED),
        duration: std::time::Duration::from_secs(
            env("PEERGRID_JEPSEN_SECS").unwrap_or(default_secs),
        ),
    }
}

#[test]
fn in_process_members_killed_restarted_joining_and_leaving_keep_every_guarantee() {
    let summary = harness::run_blocking(run_config(Mode::InProcess, 30, &["kill", "join-leave"]));
    summary.assert_no_anomalies();
}

#[test]
fn member_processes_sigkilled_sigstopped_joining_and_leaving_keep_every_guarantee() {
    let summary = harness::run_blocking(run_config(
        Mode::Processes,
        30,
        &["kill", "pause", "join-leave"],
    ));
    summary.assert_no_anomalies();
}

/// Splits: one member isolated, and a majority / minority split, each held 2 to 6 seconds:
/// some heal before failure detection ends, some as it ends (one side has declared the other
/// down, the other has not yet), some after both sides formed clusters of their own.
#[test]
fn in_process_members_split_and_healed_keep_every_guarantee() {
    let summary = harness::run_blocking(run_config(Mode::InProcess, 30, &["isolate", "split"]));
    summary.assert_no_anomalies();
}

/// The same splits between member processes, cut for real: each process in a network
/// namespace of its own, packets between the sides dropped (needs root and iproute2).
#[test]
fn member_processes_split_by_network_namespaces_keep_every_guarantee() {
    let summary = harness::run_blocking(run_config(Mode::Processes, 30, &["isolate", "split"]));
    summary.assert_no_anomalies();
}
