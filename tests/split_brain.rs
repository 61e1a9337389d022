//! Split-brain protection and merging after a split heals, on real in-process clusters of 5
//! members split 2 | 3 by the fault switch. The minority holds the oldest member (the
//! coordinator before the split), so the larger side wins by size, not by age.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{
    Error, Grid, GridConfig, LockConfig, MapConfig, MergeFunction, MergeOutcome, MergePolicy,
    MergingEntry, QueueConfig, QuorumOn, SplitBrainProtection,
};
use tokio::sync::Semaphore;

/// Split tests run a few at a time: each runs five members through failure detection twice.
static SPLITS: Semaphore = Semaphore::const_new(2);

const MINORITY: [usize; 2] = [0, 1];
const MAJORITY: [usize; 3] = [2, 3, 4];

fn tune(c: &mut GridConfig) {
    c.partition_count = 61;
    c.split_brain_probe_interval = Duration::from_millis(500);
}

/// Cuts the minority from the majority and waits until each side sees only itself.
async fn split(cluster: &Cluster) {
    let minority: Vec<_> = MINORITY.iter().map(|&i| cluster.slots[i].gossip).collect();
    let majority: Vec<_> = MAJORITY.iter().map(|&i| cluster.slots[i].gossip).collect();
    cluster.switch.split(&minority, &majority);
    wait_for("each side to see only itself", DEADLINE, || {
        let split = MINORITY
            .iter()
            .all(|&i| cluster.grid(i).members().len() == 2)
            && MAJORITY
                .iter()
                .all(|&i| cluster.grid(i).members().len() == 3);
        async move { split.then_some(()) }
    })
    .await;
    // And each side settled (backups promoted, partitions rebalanced over its members), so
    // what the tests write and read on a side stays where it was served (a migration carries
    // entries, but not the reads counted on the old primary after its snapshot).
    wait_for("each side to settle", DEADLINE, || {
        let same = |side: &[usize]| {
            let tables: Vec<_> = side
                .iter()
                .map(|&i| cluster.grid(i).partition_table())
                .collect();
            tables.windows(2).all(|w| w[0] == w[1])
        };
        let sides = same(&MINORITY) && same(&MAJORITY);
        let (a, b) = (
            cluster.grid(MINORITY[0]).clone(),
            cluster.grid(MAJORITY[0]).clone(),
        );
        async move {
            let safe = a.is_safe().await.unwrap_or(false) && b.is_safe().await.unwrap_or(false);
            (sides && safe).then_some(())
        }
    })
    .await;
}

/// Heals the split and waits for one cluster: every member sees all five, routes by one
/// settled table, the cluster is safe, and the minority members handed over what they had.
async fn heal(cluster: &Cluster) -> Duration {
    let healed = tokio::time::Instant::now();
    cluster.switch.heal_all();
    cluster.wait_converged().await;
    wait_for("the minority to merge and hand over", DEADLINE, || {
        let done = MINORITY.iter().all(|&i| {
            let s = cluster.grid(i).split_brain_stats();
            s.merges >= 1 && s.pending == 0
        });
        async move { done.then_some(()) }
    })
    .await;
    cluster.wait_table_settled().await;
    for &i in &MAJORITY {
        assert_eq!(
            cluster.grid(i).split_brain_stats().merges,
            0,
            "the larger side never merges"
        );
    }
    healed.elapsed()
}

/// `f` until it succeeds (a side just split may still be promoting backups).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = peergrid::Result<T>>,
{
    wait_for(what, DEADLINE, || {
        let attempt = f();
        async move { attempt.await.ok() }
    })
    .await
}

/// Sets `key` to `value`, retrying while the side is still promoting its backups.
async fn set_eventually(map: &peergrid::Map<String, String>, key: &String, value: &str) {
    let value = value.to_string();
    eventually("a write", || map.set(key, &value)).await;
}

fn is_quorum_error<T: std::fmt::Debug>(result: &peergrid::Result<T>) -> bool {
    matches!(
        result,
        Err(Error::QuorumNotPresent {
            min: 3,
            present: 2,
            ..
        })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_refuses_guarded_operations_and_the_majority_keeps_everything_after_heal() {
    let _turn = SPLITS.acquire().await.unwrap();
    let cluster = Cluster::start_with(5, |c| {
        tune(c);
        let guard = SplitBrainProtection::new(3);
        c.maps = vec![
            (
                "guarded".to_string(),
                MapConfig {
                    split_brain_protection: Some(guard),
                    ..MapConfig::default()
                },
            ),
            (
                "guarded-writes".to_string(),
                MapConfig {
                    split_brain_protection: Some(guard.on(QuorumOn::Write)),
                    ..MapConfig::default()
                },
            ),
        ];
        c.locks = vec![(
            "guarded".to_string(),
            LockConfig {
                split_brain_protection: Some(guard),
                ..LockConfig::default()
            },
        )];
        c.queues = vec![(
            "guarded".to_string(),
            QueueConfig {
                split_brain_protection: Some(guard),
                ..QueueConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    let writer: peergrid::Map<String, u64> = cluster.grid(2).map("guarded");
    let mut acked = std::collections::HashMap::new();
    for i in 0..50u64 {
        writer.set(&format!("before{i}"), &i).await.unwrap();
        acked.insert(format!("before{i}"), i);
    }
    let before_fence = {
        let guard = cluster.grid(3).lock("guarded").lock().await.unwrap();
        let fence = guard.fence();
        guard.unlock().await.unwrap();
        fence
    };

    split(&cluster).await;
    let minority = cluster.grid(0);
    let map: peergrid::Map<String, u64> = minority.map("guarded");
    assert!(is_quorum_error(&map.set(&"x".to_string(), &1).await));
    assert!(is_quorum_error(&map.get(&"before1".to_string()).await));
    assert!(is_quorum_error(&map.size().await));
    assert!(is_quorum_error(
        &map.put_all([("y".to_string(), 2u64)]).await
    ));
    let writes_only: peergrid::Map<String, u64> = minority.map("guarded-writes");
    assert!(is_quorum_error(
        &writes_only.set(&"x".to_string(), &1).await
    ));
    // Reads of a map guarding only writes are served (once the side has promoted its backups).
    let x = "x".to_string();
    eventually("a read on the minority", || writes_only.get(&x)).await;
    assert!(is_quorum_error(&minority.lock("guarded").try_lock().await));
    assert!(is_quorum_error(
        &cluster.grid(1).lock("guarded").lock().await
    ));
    let queue = minority.queue::<u64>("guarded");
    assert!(is_quorum_error(&queue.offer(&1).await));
    assert!(is_quorum_error(&queue.len().await));
    // An unguarded structure on the minority still works (AP).
    let open: peergrid::Map<String, u64> = minority.map("open");
    let key = "minority".to_string();
    eventually("an unguarded write on the minority", || open.set(&key, &1)).await;

    // The majority serves everything.
    let majority = cluster.grid(4);
    let map: peergrid::Map<String, u64> = majority.map("guarded");
    for i in 0..50u64 {
        let key = format!("during{i}");
        eventually("a guarded write on the majority", || map.set(&key, &i)).await;
        acked.insert(key, i);
    }
    let during_fence = {
        let lock = majority.lock("guarded");
        let guard = eventually("the lock on the majority", || lock.try_lock()).await;
        let fence = guard.fence();
        guard.unlock().await.unwrap();
        fence
    };
    assert!(during_fence > before_fence);
    let queue = majority.queue::<u64>("guarded");
    eventually("an offer on the majority", || queue.offer(&7)).await;

    let took = heal(&cluster).await;
    eprintln!("healed into one safe cluster in {took:?}");
    for i in 0..5 {
        let map: peergrid::Map<String, u64> = cluster.grid(i).map("guarded");
        // A merged member follows a new coordinator: it is counted for split-brain protection
        // once the tolerance has passed since it was last counted on its old side.
        let first = "before1".to_string();
        eventually("a guarded read after the heal", || map.get(&first)).await;
        for (key, value) in &acked {
            assert_eq!(
                map.get(key).await.unwrap(),
                Some(*value),
                "{key} on member {i}"
            );
        }
        assert_eq!(cluster.grid(i).members().len(), 5);
    }
    assert_eq!(
        cluster
            .grid(0)
            .queue::<u64>("guarded")
            .poll()
            .await
            .unwrap(),
        Some(7)
    );
    let open: peergrid::Map<String, u64> = cluster.grid(3).map("open");
    assert_eq!(open.get(&"minority".to_string()).await.unwrap(), Some(1));
    let guard = cluster.grid(1).lock("guarded").lock().await.unwrap();
    assert!(guard.fence() > during_fence);
    guard.unlock().await.unwrap();
}

/// Values both sides wrote, and what each policy keeps.
struct Expected {
    /// Majority wrote first, the minority later and read it three times.
    both: &'static str,
    /// The minority wrote first (and never read it), the majority later.
    late: &'static str,
    /// Only the minority wrote it: kept unless the policy discards.
    only_minority: Option<&'static str>,
}

/// Splits, writes on both sides, heals, and checks map "m" under `policy`; also checks that
/// queue items of the minority are appended after the majority's, and that a lock the minority
/// held is lost with the merged lock's next fence above both sides' fences.
async fn merge_with(policy: MergePolicy, expected: Expected) {
    let _turn = SPLITS.acquire().await.unwrap();
    let cluster = Cluster::start_with(5, |c| {
        tune(c);
        c.maps = vec![(
            "m".to_string(),
            MapConfig {
                merge_policy: policy.clone(),
                ..MapConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    split(&cluster).await;
    let minority: peergrid::Map<String, String> = cluster.grid(1).map("m");
    let majority: peergrid::Map<String, String> = cluster.grid(3).map("m");
    const N: usize = 20;
    let key = |kind: &str, i: usize| format!("{kind}{i}");
    // "late": minority first.
    for i in 0..N {
        set_eventually(&minority, &key("late", i), "minority").await;
        set_eventually(&minority, &key("only-minority", i), "minority").await;
    }
    for i in 0..N {
        for kind in ["both", "late", "only-majority"] {
            set_eventually(&majority, &key(kind, i), "majority").await;
        }
    }
    // The minority's "both" writes come later by the clock, and are read more.
    let after = now_ms() + 5;
    wait_for("the clock to move on", DEADLINE, || async move {
        (now_ms() > after).then_some(())
    })
    .await;
    for i in 0..N {
        let k = key("both", i);
        set_eventually(&minority, &k, "minority").await;
        for _ in 0..3 {
            minority.get(&k).await.unwrap();
        }
    }
    // Queue items on both sides; a lock held on the minority, and used on the majority.
    let majority_queue = cluster.grid(2).queue::<String>("jobs");
    let minority_queue = cluster.grid(0).queue::<String>("jobs");
    for i in 0..5 {
        let item = format!("majority{i}");
        eventually("an offer on the majority", || majority_queue.offer(&item)).await;
        let item = format!("minority{i}");
        eventually("an offer on the minority", || minority_queue.offer(&item)).await;
    }
    let minority_lock = cluster.grid(0).lock("l");
    let held = eventually("the lock on the minority", || minority_lock.try_lock()).await;
    let minority_fence = held.fence();
    let majority_lock = cluster.grid(4).lock("l");
    let guard = eventually("the lock on the majority", || majority_lock.try_lock()).await;
    let majority_fence = guard.fence();
    guard.unlock().await.unwrap();

    heal(&cluster).await;

    let checker: peergrid::Map<String, String> = cluster.grid(4).map("m");
    for i in 0..N {
        let get = |kind: &'static str| {
            let checker = checker.clone();
            let k = key(kind, i);
            async move { checker.get(&k).await.unwrap() }
        };
        assert_eq!(get("both").await.as_deref(), Some(expected.both), "both{i}");
        assert_eq!(get("late").await.as_deref(), Some(expected.late), "late{i}");
        assert_eq!(
            get("only-minority").await.as_deref(),
            expected.only_minority,
            "only-minority{i}"
        );
        assert_eq!(
            get("only-majority").await.as_deref(),
            Some("majority"),
            "only-majority{i}"
        );
    }
    // Queue: the majority's items, then the minority's appended, each exactly once.
    let drained = cluster
        .grid(1)
        .queue::<String>("jobs")
        .drain(100)
        .await
        .unwrap();
    let (majority_items, minority_items): (Vec<_>, Vec<_>) =
        drained.iter().partition(|s| s.starts_with("majority"));
    assert_eq!(majority_items.len(), 5, "{drained:?}");
    assert_eq!(minority_items.len(), 5, "{drained:?}");
    assert!(
        drained[..5].iter().all(|s| s.starts_with("majority")),
        "{drained:?}"
    );
    // The minority's holding is gone, and the next token is above both sides' tokens.
    assert!(matches!(held.unlock().await, Err(Error::LockLost { .. })));
    let guard = cluster.grid(2).lock("l").lock().await.unwrap();
    assert!(guard.fence() > minority_fence.max(majority_fence));
    guard.unlock().await.unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_put_if_absent_keeps_the_larger_sides_entries() {
    merge_with(
        MergePolicy::PutIfAbsent,
        Expected {
            both: "majority",
            late: "majority",
            only_minority: Some("minority"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_latest_update_keeps_the_entry_written_last() {
    merge_with(
        MergePolicy::LatestUpdate,
        Expected {
            both: "minority",
            late: "majority",
            only_minority: Some("minority"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_higher_hits_keeps_the_entry_read_more() {
    merge_with(
        MergePolicy::HigherHits,
        Expected {
            both: "minority",
            late: "majority",
            only_minority: Some("minority"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_pass_through_takes_the_smaller_sides_entries() {
    merge_with(
        MergePolicy::PassThrough,
        Expected {
            both: "minority",
            late: "minority",
            only_minority: Some("minority"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_discard_drops_the_smaller_sides_entries() {
    merge_with(
        MergePolicy::Discard,
        Expected {
            both: "majority",
            late: "majority",
            only_minority: None,
        },
    )
    .await;
}

/// Joins both values, larger side first.
struct JoinValues;

impl MergeFunction for JoinValues {
    fn merge(
        &self,
        _map: &str,
        _key: &[u8],
        existing: Option<&MergingEntry<'_>>,
        merging: &MergingEntry<'_>,
    ) -> MergeOutcome {
        let merging: String = merging.decode().unwrap_or_default();
        match existing.map(|e| e.decode::<String>()) {
            Some(Ok(existing)) => MergeOutcome::value(&format!("{existing}|{merging}"))
                .unwrap_or(MergeOutcome::KeepExisting),
            _ => MergeOutcome::TakeMerging,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_with_a_user_policy() {
    merge_with(
        MergePolicy::Custom(Arc::new(JoinValues)),
        Expected {
            both: "majority|minority",
            late: "majority|minority",
            only_minority: Some("minority"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_alone_merges_back_with_what_it_wrote() {
    let _turn = SPLITS.acquire().await.unwrap();
    let cluster = Cluster::start_with(3, tune).await;
    cluster.wait_table_settled().await;
    let alone = cluster.grid(2);
    let others = [cluster.slots[0].gossip, cluster.slots[1].gossip];
    cluster.switch.split(&[cluster.slots[2].gossip], &others);
    wait_for("the member to be alone", DEADLINE, || {
        let alone = alone.members().len() == 1 && cluster.grid(0).members().len() == 2;
        async move { alone.then_some(()) }
    })
    .await;
    let map: peergrid::Map<String, u64> = alone.map("m");
    let key = "alone".to_string();
    eventually("a write while alone", || map.set(&key, &1)).await;
    cluster.switch.heal_all();
    cluster.wait_converged().await;
    wait_for("the lone member to merge", DEADLINE, || {
        let s = alone.split_brain_stats();
        async move { (s.merges >= 1 && s.pending == 0).then_some(()) }
    })
    .await;
    cluster.wait_table_settled().await;
    let check: peergrid::Map<String, u64> = cluster.grid(0).map("m");
    assert_eq!(check.get(&"alone".to_string()).await.unwrap(), Some(1));
    assert_eq!(cluster.grid(0).split_brain_stats().merges, 0);
    let _: &Grid = alone;
}

/// [`tune`], and map "guarded" with split-brain protection (a minimum of 3 members), which
/// makes members send each other heartbeats.
fn with_guarded_map(c: &mut GridConfig) {
    tune(c);
    c.maps = vec![(
        "guarded".to_string(),
        MapConfig {
            split_brain_protection: Some(SplitBrainProtection::new(3)),
            ..MapConfig::default()
        },
    )];
}

/// Five members [`with_guarded_map`], settled, and a key member `leader` leads.
async fn five_with_a_guarded_key_led_by(leader: usize) -> (Cluster, usize, String) {
    let cluster = Cluster::start_with(5, with_guarded_map).await;
    cluster.wait_table_settled().await;
    let leader_id = cluster.grid(leader).local_member().id;
    let map: peergrid::Map<String, u64> = cluster.grid(leader).map("guarded");
    let key = (0..)
        .map(|n| format!("key{n}"))
        .find(|k| map.owner(k).unwrap() == Some(leader_id))
        .expect("a key the member leads");
    (cluster, leader, key)
}

/// Cuts member `isolated` of five off from the other four.
fn cut_off(cluster: &Cluster, isolated: usize) {
    let others: Vec<_> = (0..5)
        .filter(|&i| i != isolated)
        .map(|i| cluster.slots[i].gossip)
        .collect();
    cluster
        .switch
        .split(&[cluster.slots[isolated].gossip], &others);
}

/// Sets `key` of map "guarded" to `value` on member `i`, in a task of its own.
fn spawn_set(
    cluster: &Cluster,
    i: usize,
    key: &str,
    value: u64,
) -> tokio::task::JoinHandle<peergrid::Result<()>> {
    let map: peergrid::Map<String, u64> = cluster.grid(i).map("guarded");
    let key = key.to_string();
    tokio::spawn(async move { map.set(&key, &value).await })
}

/// The failure-detection window, closed: split-brain protection counts the members a member
/// recently heard from (heartbeats), not its membership view. An isolated primary therefore
/// stops serving guarded reads within the heartbeat tolerance, before the rest declare it down
/// and promote its backup: no read it serves after the majority's new write returns the old
/// value. (Counting the view, the isolated member served reads for as long as failure
/// detection took, and read the old value after the majority had acknowledged the new one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_primary_stops_serving_before_the_majority_takes_its_partitions_over() {
    let _turn = SPLITS.acquire().await.unwrap();
    let (cluster, isolated, key) = five_with_a_guarded_key_led_by(2).await;
    let on_majority: peergrid::Map<String, u64> = cluster.grid(0).map("guarded");
    on_majority.set(&key, &1).await.unwrap();

    cut_off(&cluster, isolated);
    let split_at = tokio::time::Instant::now();
    // Reads on the isolated member until it refuses them.
    let reader = {
        let map: peergrid::Map<String, u64> = cluster.grid(isolated).map("guarded");
        let key = key.clone();
        tokio::spawn(async move {
            let mut reads = Vec::new();
            while split_at.elapsed() < DEADLINE {
                let started = tokio::time::Instant::now();
                let read = map.get(&key).await;
                let refused = matches!(read, Err(Error::QuorumNotPresent { .. }));
                reads.push((started, read));
                if refused {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };
    // The majority's write of 2, acknowledged once it took the partition over.
    eventually("the majority's write", || on_majority.set(&key, &2)).await;
    let acknowledged = tokio::time::Instant::now();
    let reads = reader.await.unwrap();
    let (_, last) = reads.last().expect("reads");
    assert!(
        matches!(last, Err(Error::QuorumNotPresent { .. })),
        "the isolated member refuses at last: {last:?}"
    );
    let stale: Vec<_> = reads
        .iter()
        .filter(|(started, read)| *started > acknowledged && matches!(read, Ok(Some(1))))
        .collect();
    assert!(
        stale.is_empty(),
        "{} reads on the isolated member, started after the majority acknowledged 2, returned 1",
        stale.len()
    );
    assert_eq!(on_majority.get(&key).await.unwrap(), Some(2));
}

/// A read on a primary sees a write as soon as it is applied there, before the backups
/// acknowledge it. A guarded read waits for them: on a primary cut off from its backups, a read
/// of a write they never got fails instead of returning a value the majority, which promotes a
/// backup, does not have. (Without the wait the isolated member read 2, and the majority then
/// read 1: a register read back in time, which a Jepsen run found.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_read_never_returns_a_write_the_backups_do_not_hold() {
    let _turn = SPLITS.acquire().await.unwrap();
    let (cluster, isolated, key) = five_with_a_guarded_key_led_by(2).await;
    let on_isolated: peergrid::Map<String, u64> = cluster.grid(isolated).map("guarded");
    on_isolated.set(&key, &1).await.unwrap();

    cut_off(&cluster, isolated);
    // A write on the isolated primary: applied there, its backups out of reach.
    let write = spawn_set(&cluster, isolated, &key, 2);
    // Reads there until it refuses them for lack of a quorum.
    let mut reads = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < until {
        let read = on_isolated.get(&key).await;
        let refused = matches!(read, Err(Error::QuorumNotPresent { .. }));
        reads.push(read);
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        matches!(reads.last(), Some(Err(Error::QuorumNotPresent { .. }))),
        "the isolated member refuses at last: {:?}",
        reads.last()
    );
    let write = write.await.unwrap();
    assert!(
        write.is_err(),
        "the isolated write is not acknowledged: {write:?}"
    );
    // The majority promoted a backup, which never had 2.
    let on_majority: peergrid::Map<String, u64> = cluster.grid(0).map("guarded");
    let value = eventually("a read on the majority", || on_majority.get(&key)).await;
    assert_eq!(
        value,
        Some(1),
        "the unacknowledged write is not on the majority"
    );
    let read_two = reads.iter().filter(|r| matches!(r, Ok(Some(2)))).count();
    assert_eq!(
        read_two,
        0,
        "{read_two} of {} reads on the isolated member returned the write its backups never got",
        reads.len()
    );
}

/// Two members that each see the other down while the coordinator and the rest see both (a
/// false suspicion answered with "you are down" leads there) form no second cluster for a
/// probe to find, and SWIM never takes a down identity back: the younger of the two merges
/// back under a renewed identity, and every member sees every other again, every entry kept.
/// (A 30-minute Jepsen run stayed with two members apart this way until the harness gave up.)
/// The coordinator sees the member renew without ever seeing it gone: it must still promote
/// the backups of what the member led (it kept the member as primary of partitions it had
/// emptied, and with a merge policy that discards, every key the member led was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_that_see_each_other_down_are_reunited() {
    let _turn = SPLITS.acquire().await.unwrap();
    // Heartbeats flow (a guarded map): the coordinator and the fourth member keep hearing from
    // both, and ignore the verdicts the two gossip about each other. Map "m" discards what a
    // merge hands over: what the merging member led must be on its backups, promoted.
    let cluster = Cluster::start_with(4, |c| {
        with_guarded_map(c);
        c.maps.push((
            "m".to_string(),
            MapConfig {
                merge_policy: MergePolicy::Discard,
                ..MapConfig::default()
            },
        ));
    })
    .await;
    cluster.wait_table_settled().await;
    let map: peergrid::Map<String, u64> = cluster.grid(0).map("m");
    for n in 0..500u64 {
        map.set(&format!("k{n}"), &n).await.unwrap();
    }
    // The two youngest members: neither is the coordinator.
    let mut by_age: Vec<usize> = (0..4).collect();
    by_age.sort_by_key(|&i| {
        let m = cluster.grid(i).local_member();
        (m.generation, m.id)
    });
    let (older, younger) = (by_age[2], by_age[3]);
    let (older_id, younger_id) = (
        cluster.grid(older).local_member().id,
        cluster.grid(younger).local_member().id,
    );
    cluster
        .switch
        .false_suspicion(cluster.slots[older].gossip, cluster.slots[younger].gossip);
    wait_for("the two to see each other down", DEADLINE, || {
        let sees = |i: usize, id| cluster.grid(i).members().iter().any(|m| m.id == id);
        let apart = !sees(older, younger_id) && !sees(younger, older_id);
        let others = [by_age[0], by_age[1]]
            .iter()
            .all(|&i| sees(i, older_id) && sees(i, younger_id));
        async move { (apart && others).then_some(()) }
    })
    .await;
    wait_for("every member to see all four again", DEADLINE * 3, || {
        let all = (0..4).all(|i| cluster.grid(i).members().len() == 4);
        async move { all.then_some(()) }
    })
    .await;
    cluster.wait_table_settled().await;
    assert!(cluster.grid(younger).split_brain_stats().merges >= 1);
    for i in [by_age[0], by_age[1], older] {
        assert_eq!(cluster.grid(i).split_brain_stats().merges, 0, "member {i}");
    }
    for i in 0..4 {
        let map: peergrid::Map<String, u64> = cluster.grid(i).map("m");
        for n in (0..500u64).step_by(7) {
            assert_eq!(
                map.get(&format!("k{n}")).await.unwrap(),
                Some(n),
                "k{n} on {i}"
            );
        }
    }
    assert_eq!(
        cluster
            .grid(0)
            .map::<String, u64>("m")
            .size()
            .await
            .unwrap(),
        500
    );
}

/// A merge order that comes while a hand-over is under way interrupts it: what was not started
/// yet goes along with the new order at once (it waited for the whole hand-over, which for a
/// member holding hundreds of thousands of entries kept two clusters apart for minutes), and
/// nothing is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_merge_order_interrupts_a_hand_over_and_takes_the_rest_along() {
    let _turn = SPLITS.acquire().await.unwrap();
    const ENTRIES: u64 = 768;
    let cluster = Cluster::start_with(3, tune).await;
    cluster.wait_table_settled().await;
    let alone = cluster.grid(2);
    let cut_alone = || {
        let others = [cluster.slots[0].gossip, cluster.slots[1].gossip];
        cluster.switch.split(&[cluster.slots[2].gossip], &others);
    };
    let is_alone = || {
        let alone = alone.members().len() == 1
            && cluster.grid(0).members().len() == 2
            && cluster.grid(1).members().len() == 2;
        async move { alone.then_some(()) }
    };
    cut_alone();
    wait_for("the member to be alone", DEADLINE, is_alone).await;
    let map: peergrid::Map<String, u64> = alone.map("m");
    for n in 0..ENTRIES {
        let key = format!("k{n}");
        eventually("a write while alone", || map.set(&key, &n)).await;
    }
    // Each item (a batch of one partition's entries) waits before it is handed over: 61
    // batches, 8 at a time, take 8 rounds of 3 s.
    cluster.switch.slow_merge_hand_over(Duration::from_secs(3));
    cluster.switch.heal_all();
    wait_for("the hand-over to be under way", DEADLINE, || {
        let s = alone.split_brain_stats();
        let under_way = s.merges == 1 && s.entries_merged >= 1 && s.pending > 0;
        async move { under_way.then_some(()) }
    })
    .await;
    cut_alone();
    wait_for("the member to be alone again", DEADLINE, is_alone).await;
    cluster.switch.heal_all();
    wait_for(
        "the new merge order to interrupt the hand-over",
        DEADLINE,
        || {
            let s = alone.split_brain_stats();
            async move { (s.interrupted >= 1).then_some(s) }
        },
    )
    .await;
    cluster.switch.slow_merge_hand_over(Duration::ZERO);
    cluster.wait_converged().await;
    wait_for(
        "the member to merge again and hand everything over",
        DEADLINE,
        || {
            let s = alone.split_brain_stats();
            async move { (s.merges >= 2 && s.pending == 0).then_some(()) }
        },
    )
    .await;
    cluster.wait_table_settled().await;
    for i in [0, 1] {
        let s = cluster.grid(i).split_brain_stats();
        assert_eq!((s.merges, s.interrupted), (0, 0), "member {i}");
    }
    let check: peergrid::Map<String, u64> = cluster.grid(0).map("m");
    for n in 0..ENTRIES {
        assert_eq!(check.get(&format!("k{n}")).await.unwrap(), Some(n), "k{n}");
    }
    assert_eq!(check.size().await.unwrap(), ENTRIES);
}

/// A partition whose new primary missed the table that promoted it is still handed over when
/// its side merges. Such a partition is led by nobody who knows it: its old primary's table
/// names the new one, and the new one's table names the old one. When each merging member
/// captured only what its own table said it led, nobody captured it and every copy was
/// dropped. A Jepsen run lost 617 acknowledged inserts that way, while a cluster that merged
/// away changed its tables under it. Here a lone member, cut off, writes entries. A newcomer
/// joins it and takes copies of its partitions, but withholds (fault switch) the tables that
/// make it primary of some. Then the split heals and both members merge into the larger side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_new_primary_missed_its_promotion_is_handed_over_in_a_merge() {
    let _turn = SPLITS.acquire().await.unwrap();
    const ENTRIES: u64 = 400;
    const LONE: usize = 3;
    let mut cluster = Cluster::start_with(4, tune).await;
    cluster.wait_table_settled().await;
    let larger: Vec<_> = (0..3).map(|i| cluster.slots[i].gossip).collect();
    cluster.switch.split(&[cluster.slots[LONE].gossip], &larger);
    wait_for("the member to be alone", DEADLINE, || {
        let alone = cluster.grid(LONE).members().len() == 1
            && (0..3).all(|i| cluster.grid(i).members().len() == 3);
        async move { alone.then_some(()) }
    })
    .await;
    let map: peergrid::Map<String, u64> = cluster.grid(LONE).map("m");
    for n in 0..ENTRIES {
        let key = format!("k{n}");
        eventually("a write while alone", || map.set(&key, &n)).await;
    }
    // The larger side settles first: it promotes nobody while promotions are withheld.
    wait_for("the larger side to settle", DEADLINE, || {
        let tables: Vec<_> = (0..3).map(|i| cluster.grid(i).partition_table()).collect();
        let same = tables.windows(2).all(|w| w[0] == w[1]);
        let grid = cluster.grid(0).clone();
        async move { (same && grid.is_safe().await.unwrap_or(false)).then_some(()) }
    })
    .await;
    cluster.switch.withhold_promotions(true);
    let mut config = cluster.config();
    tune(&mut config);
    config.seeds = vec![cluster.slots[LONE].gossip];
    let newcomer = cluster.add_with(config).await;
    cluster
        .switch
        .split(&[cluster.slots[newcomer].gossip], &larger);
    let lone_id = cluster.grid(LONE).local_member().id;
    let newcomer_id = cluster.grid(newcomer).local_member().id;
    let missed = wait_for(
        "the lone member to promote the newcomer, which withholds the table",
        DEADLINE,
        || {
            let lone = cluster.grid(LONE).partition_table();
            let new = cluster.grid(newcomer).partition_table();
            let missed: Vec<usize> = (0..lone.replicas.len())
                .filter(|&p| {
                    lone.replicas[p].first() == Some(&newcomer_id)
                        && new.replicas.get(p).and_then(|r| r.first()) == Some(&lone_id)
                })
                .collect();
            let withheld = cluster.switch.withheld_promotions() > 0;
            async move { (withheld && !missed.is_empty()).then_some(missed) }
        },
    )
    .await;
    let stranded = (0..ENTRIES)
        .filter(|n| {
            let p = map.partition_of(&format!("k{n}")).unwrap() as usize;
            missed.contains(&p)
        })
        .count();
    assert!(
        stranded > 0,
        "entries in partitions {missed:?}, led by nobody who knows it"
    );
    cluster.switch.heal_all();
    wait_for("both members to capture what they hold", DEADLINE, || {
        let captured = [LONE, newcomer]
            .iter()
            .all(|&i| cluster.grid(i).split_brain_stats().merges >= 1);
        async move { captured.then_some(()) }
    })
    .await;
    cluster.switch.withhold_promotions(false);
    cluster.wait_converged().await;
    wait_for("both members to hand everything over", DEADLINE, || {
        let done = [LONE, newcomer]
            .iter()
            .all(|&i| cluster.grid(i).split_brain_stats().pending == 0);
        async move { done.then_some(()) }
    })
    .await;
    cluster.wait_table_settled().await;
    let check: peergrid::Map<String, u64> = cluster.grid(0).map("m");
    let mut lost = Vec::new();
    for n in 0..ENTRIES {
        if check.get(&format!("k{n}")).await.unwrap() != Some(n) {
            lost.push(n);
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {ENTRIES} entries lost ({stranded} were in partitions {missed:?}): {lost:?}",
        lost.len()
    );
    assert_eq!(check.size().await.unwrap(), ENTRIES);
}

/// A compare-and-set that finds another value than it expected answers from the primary, like
/// a read, and passes the same barrier: on a primary cut off from its backups, it never fails
/// on a write they did not get. (A 30-minute Jepsen run had a compare-and-set fail on a write
/// whose call timed out; the backups never had it, and later reads returned the value the
/// compare-and-set had expected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_compare_and_set_never_fails_on_a_write_the_backups_do_not_hold() {
    let _turn = SPLITS.acquire().await.unwrap();
    let (cluster, isolated, key) = five_with_a_guarded_key_led_by(2).await;
    let on_isolated: peergrid::Map<String, u64> = cluster.grid(isolated).map("guarded");
    on_isolated.set(&key, &1).await.unwrap();

    cut_off(&cluster, isolated);
    // A write on the isolated primary: applied there (waited for), its backups out of reach.
    let partition = on_isolated.partition_of(&key).unwrap();
    let before = cluster.grid(isolated).local_replica(partition).unwrap().seq;
    let write = spawn_set(&cluster, isolated, &key, 2);
    wait_for(
        "the write to apply on the isolated primary",
        DEADLINE,
        || {
            let seq = cluster.grid(isolated).local_replica(partition).unwrap().seq;
            async move { (seq > before).then_some(()) }
        },
    )
    .await;
    // Compare-and-sets from 1 there until it refuses them for lack of a quorum. The backups
    // hold 1 and take nothing from the isolated member: none may succeed, and none may fail
    // on the value 2 (or 3) that only the isolated member holds.
    let mut answers = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < until {
        let answer = on_isolated.replace_if_equal(&key, &1, &3).await;
        let refused = matches!(answer, Err(Error::QuorumNotPresent { .. }));
        answers.push(answer);
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        matches!(answers.last(), Some(Err(Error::QuorumNotPresent { .. }))),
        "the isolated member refuses at last: {:?}",
        answers.last()
    );
    assert!(write.await.unwrap().is_err(), "the isolated write fails");
    let on_majority: peergrid::Map<String, u64> = cluster.grid(0).map("guarded");
    let value = eventually("a read on the majority", || on_majority.get(&key)).await;
    assert_eq!(value, Some(1), "the majority holds what the backups held");
    let answered = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(
        answered,
        0,
        "{answered} of {} compare-and-sets on the isolated member answered: {:?}",
        answers.len(),
        answers.iter().filter(|a| a.is_ok()).collect::<Vec<_>>()
    );
}

/// Five members, settled, with `backup_count` 2 (a copy of every partition on each side of a
/// 2 | 3 split) and queues "guarded-*" guarded by split-brain protection (a minimum of 3).
async fn five_with_guarded_queues() -> Cluster {
    let cluster = Cluster::start_with(5, |c| {
        tune(c);
        c.backup_count = 2;
        c.queues = vec![(
            "guarded-*".to_string(),
            QueueConfig {
                split_brain_protection: Some(SplitBrainProtection::new(3)),
                ..QueueConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    cluster
}

/// Queue items the larger side polled during a split are not polled again after it heals, from
/// whichever side's copies held them: the smaller side hands over its primaries' and backups'
/// copies, and the larger side leaves out the items it already had (same lineage: superseded;
/// within the dedup window, also by their offer tokens, which is why this test passed even
/// while backups' copies took no lineage from the mutations they were sent; the unit test
/// `a_backup_copy_takes_its_primarys_lineage_and_refuses_another` covers that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_items_the_majority_polled_during_a_split_are_not_polled_again_after_the_heal() {
    let _turn = SPLITS.acquire().await.unwrap();
    let cluster = five_with_guarded_queues().await;
    // One queue led by each member: the majority promotes a backup's copy of the minority's,
    // and the minority holds backups' copies of most of the majority's.
    let ids: Vec<_> = (0..5).map(|i| cluster.grid(i).local_member().id).collect();
    let mut names: Vec<String> = Vec::new();
    for id in ids {
        let name = (0..)
            .map(|n| format!("guarded-{n}"))
            .find(|n| cluster.grid(2).queue::<u64>(n).owner() == Some(id) && !names.contains(n))
            .expect("a queue the member leads");
        names.push(name);
    }
    const ITEMS: u64 = 20;
    for name in &names {
        let queue = cluster.grid(2).queue::<u64>(name);
        for item in 0..ITEMS {
            assert!(queue.offer(&item).await.unwrap());
        }
    }

    split(&cluster).await;
    for name in &names {
        let queue = cluster.grid(3).queue::<u64>(name);
        let len = eventually("a guarded read on the majority", || queue.len()).await;
        assert_eq!(len, ITEMS, "{name}");
        for item in 0..ITEMS {
            assert_eq!(queue.poll().await.unwrap(), Some(item), "{name}");
        }
    }

    heal(&cluster).await;
    for name in &names {
        let queue = cluster.grid(0).queue::<u64>(name);
        let len = eventually("a guarded read after the heal", || queue.len()).await;
        let mut back = Vec::new();
        while let Some(item) = queue.poll().await.unwrap() {
            back.push(item);
        }
        assert_eq!(
            (len, back),
            (0, Vec::new()),
            "{name}: items polled on the majority came back"
        );
    }
}

/// What a client of the overlapping-views test saw of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueOutcome {
    /// An offer acknowledged.
    Offered(u64),
    /// A poll that took this item.
    Polled(u64),
    /// A poll that found the queue empty, or an operation refused (nothing applied).
    Nothing,
    /// An offer whose outcome is not known (an error other than a refusal, or a timeout).
    UnknownOffer,
    /// A poll whose outcome is not known: it may have taken an item nobody saw.
    UnknownPoll,
}

/// Clients on every member offer unique items to a guarded queue and poll it, through short
/// splits 2 | 3 healed before or just as failure detection declares the other side down: the
/// declarations that arrive after the heal leave views that overlap (a member sees both sides
/// while each side has declared the other down). Every acknowledged offer must be polled
/// exactly once, in the test or in the final drain.
///
/// This failed in 5 of 8 runs of about 33 s (items polled twice and acknowledged offers lost by
/// the dozen, the anomaly of a 30-minute Jepsen run): the side that held the quorum through a
/// member in both views (counted under its coordinator) served guarded operations that member
/// acknowledged, then lost it to the other side and merged away as the smaller one. The larger
/// side's promoted copy descended from the same lineage but missed those operations, so the
/// merge left them out as superseded. Split-brain protection now counts only members that see
/// the same members (see `MembershipState::quorum_present`).
///
/// With that, 13 of 14 runs passed; one found 3 items polled twice. Two more holes were closed
/// since: a member declared down went on counting, under their old common view, the member that
/// declared it (it now gets farewell heartbeats), and a member that merged in ignored for good a
/// member that had merged into the same cluster just before it. Since then, 80 of 80 runs
/// passed, a third of them with two runs at once on 2 cores. A hole remains in principle (see
/// the README's "Open" list: table versions are counters, not terms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_views_after_short_splits_keep_every_acknowledged_queue_item_once() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let _turn = SPLITS.acquire().await.unwrap();
    let cluster = five_with_guarded_queues().await;
    let oldest = cluster.grid(MINORITY[0]).local_member().id;
    let name = (0..)
        .map(|n| format!("guarded-{n}"))
        .find(|n| cluster.grid(2).queue::<u64>(n).owner() == Some(oldest))
        .expect("a queue the oldest member leads");
    const BEFORE: u64 = 20;
    for item in 0..BEFORE {
        assert!(
            cluster
                .grid(2)
                .queue::<u64>(&name)
                .offer(&item)
                .await
                .unwrap()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..5u64)
        .map(|i| {
            let queue = cluster.grid(i as usize).queue::<u64>(&name);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let within = Duration::from_secs(3);
                for n in 1.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let item = (i + 1) * 1_000_000 + n;
                    seen.push(
                        match tokio::time::timeout(within, queue.offer(&item)).await {
                            Ok(Ok(true)) => QueueOutcome::Offered(item),
                            Ok(Ok(false)) | Ok(Err(Error::QuorumNotPresent { .. })) => {
                                QueueOutcome::Nothing
                            }
                            _ => QueueOutcome::UnknownOffer,
                        },
                    );
                    seen.push(match tokio::time::timeout(within, queue.poll()).await {
                        Ok(Ok(Some(item))) => QueueOutcome::Polled(item),
                        Ok(Ok(None)) | Ok(Err(Error::QuorumNotPresent { .. })) => {
                            QueueOutcome::Nothing
                        }
                        _ => QueueOutcome::UnknownPoll,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect();
    let minority: Vec<_> = MINORITY.iter().map(|&i| cluster.slots[i].gossip).collect();
    let majority: Vec<_> = MAJORITY.iter().map(|&i| cluster.slots[i].gossip).collect();
    for split_ms in [1500, 2000, 2500, 3000, 3500] {
        cluster.switch.split(&minority, &majority);
        // The fault itself: a split of a set length (no condition to wait for).
        tokio::time::sleep(Duration::from_millis(split_ms)).await;
        cluster.switch.heal_all();
        cluster.wait_converged().await;
        wait_for("merges to end", DEADLINE * 3, || {
            let done = (0..5).all(|i| cluster.grid(i).split_brain_stats().pending == 0);
            async move { done.then_some(()) }
        })
        .await;
        cluster.wait_table_settled().await;
        // The clients go on on the healed cluster for a while (part of the schedule).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }
    let queue = cluster.grid(4).queue::<u64>(&name);
    eventually("a guarded read after the last heal", || queue.len()).await;
    while let Some(item) = queue.poll().await.unwrap() {
        outcomes.push(QueueOutcome::Polled(item));
    }

    let mut polled = std::collections::HashMap::<u64, usize>::new();
    let mut acknowledged: Vec<u64> = (0..BEFORE).collect();
    let mut unknown_polls = 0;
    for outcome in &outcomes {
        match *outcome {
            QueueOutcome::Offered(item) => acknowledged.push(item),
            QueueOutcome::Polled(item) => *polled.entry(item).or_default() += 1,
            QueueOutcome::UnknownPoll => unknown_polls += 1,
            QueueOutcome::UnknownOffer | QueueOutcome::Nothing => {}
        }
    }
    let mut twice: Vec<_> = polled
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    twice.sort_unstable();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|item| !polled.contains_key(item))
        .collect();
    assert!(
        twice.is_empty() && lost.len() <= unknown_polls,
        "{} acknowledged: polled twice {twice:?}; never polled {lost:?} \
         ({unknown_polls} polls of unknown outcome)",
        acknowledged.len()
    );
}
