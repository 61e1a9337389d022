//! Failover on a real cluster: members crash (dropped without leaving) while clients write, and
//! every acknowledged write is still there afterwards.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Cluster, assert_all_present, collect, start_writers};
use peergrid::{Grid, Map};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_loses_no_acknowledged_write_with_one_backup() {
    let mut cluster = Cluster::start_with(3, |c| c.rpc_timeout = Duration::from_secs(2)).await;
    cluster.wait_table_settled().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&[cluster.grid(0), cluster.grid(1)], 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.crash(2);
    // Failure detection takes about 2 s; keep writing through it and the takeover.
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = collect(writers).await;
    eprintln!("{} acknowledged writes, {failed} failed calls", acked.len());
    assert!(acked.len() > 200, "writers made progress");
    assert_all_present(cluster.grid(0), &[cluster.grid(1)], &acked).await;
    assert_all_present(cluster.grid(1), &[cluster.grid(0)], &acked).await;
}

/// Every key of `keys` reads back with its value through `grid`.
async fn assert_readable(grid: &Grid, expected: &HashMap<String, u64>) {
    assert_all_present(grid, &[], expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_with_no_backups_hands_every_partition_off() {
    let cluster = Cluster::start_with(3, |c| c.backup_count = 0).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("failover");
    let expected: HashMap<String, u64> = (0..1000u64).map(|i| (format!("k{i}"), i)).collect();
    map.put_all(expected.clone()).await.unwrap();
    let leaver = cluster.grid(2).clone();
    let leaver_id = leaver.local_member().id;
    let owned = cluster
        .grid(0)
        .partition_table()
        .replicas
        .iter()
        .filter(|r| r[0] == leaver_id)
        .count();
    assert!(owned > 50, "the leaver owns {owned} partitions");
    leaver.leave().await.unwrap();
    // Nothing waits for failure detection: the handoff happened before the leave.
    for grid in [cluster.grid(0), cluster.grid(1)] {
        assert!(
            grid.partition_table()
                .replicas
                .iter()
                .all(|r| !r.contains(&leaver_id))
        );
        assert_readable(grid, &expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_can_leave_gracefully_too() {
    let cluster = Cluster::start_with(3, |c| c.backup_count = 0).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(1).map("failover");
    let expected: HashMap<String, u64> = (0..500u64).map(|i| (format!("k{i}"), i)).collect();
    map.put_all(expected.clone()).await.unwrap();
    // The first member is the oldest, so the coordinator.
    cluster.grid(0).leave().await.unwrap();
    for grid in [cluster.grid(1), cluster.grid(2)] {
        assert_readable(grid, &expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_leaving_at_once_does_not_wait_for_a_handoff() {
    let cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let (a, b) = (cluster.grid(0).clone(), cluster.grid(1).clone());
    let both = async { tokio::join!(a.leave(), b.leave()) };
    let (ra, rb) = tokio::time::timeout(common::DEADLINE, both)
        .await
        .expect("both leaves return well within the leave timeout");
    ra.unwrap();
    rb.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_five_crash_one_after_the_other_and_no_acknowledged_write_is_lost() {
    let mut cluster = Cluster::start_with(5, |c| c.rpc_timeout = Duration::from_secs(2)).await;
    cluster.wait_table_settled().await;
    cluster
        .grid(0)
        .wait_safe(common::DEADLINE)
        .await
        .expect("safe after start");
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(
        &[cluster.grid(0), cluster.grid(1), cluster.grid(2)],
        2,
        &stop,
    );
    for victim in [4, 3] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.crash(victim);
        // Until the crash is handled, a member in the view does not answer: not safe.
        assert!(!cluster.grid(0).is_safe().await.unwrap());
        cluster.wait_converged().await;
        cluster.wait_table_settled().await;
        // Backups restored before the next crash.
        cluster
            .grid(0)
            .wait_safe(common::DEADLINE)
            .await
            .expect("safe again after the crash");
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = collect(writers).await;
    eprintln!("{} acknowledged writes, {failed} failed calls", acked.len());
    assert!(acked.len() > 200, "writers made progress");
    for i in 0..3 {
        assert_readable(cluster.grid(i), &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_every_replica_crashed_is_reported_lost() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let survivor = cluster.grid(0).clone();
    let me = survivor.local_member().id;
    let table = survivor.partition_table();
    let doomed: Vec<u32> = (0..271u32)
        .filter(|&p| !table.replicas[p as usize].contains(&me))
        .collect();
    assert!(!doomed.is_empty());
    let mut events = survivor.partition_events();
    // Both other members crash at once: the partitions they alone held have no replica left.
    cluster.crash(1);
    cluster.crash(2);
    let mut lost = std::collections::BTreeSet::new();
    tokio::time::timeout(common::DEADLINE, async {
        while lost.len() < doomed.len() {
            match events.recv().await {
                Some(peergrid::PartitionEvent::Lost { partition }) => {
                    lost.insert(partition);
                }
                Some(_) => {}
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .expect("every lost partition is reported");
    assert_eq!(lost.into_iter().collect::<Vec<_>>(), doomed);
    // The survivor serves the whole key space again (the lost partitions start empty).
    let map: Map<String, u64> = survivor.map("after-loss");
    map.set("k", &1).await.unwrap();
    assert_eq!(map.get("k").await.unwrap(), Some(1));
    survivor.wait_safe(common::DEADLINE).await.unwrap();
}

/// One member crashes and, as soon as the others see it down, another leaves gracefully: the
/// leave must not wait for its timeout, and with `settled` (data written on a settled cluster) no
/// acknowledged write is lost.
async fn leave_right_after_a_crash(settled: bool) {
    let mut cluster = Cluster::start(3).await;
    let expected: HashMap<String, u64> = (0..300u64).map(|i| (format!("k{i}"), i)).collect();
    if settled {
        cluster.wait_table_settled().await;
        let map: Map<String, u64> = cluster.grid(0).map("failover");
        map.put_all(expected.clone()).await.unwrap();
    }
    let mut events = cluster.grid(0).membership_events();
    let crashed = cluster.crash(2);
    while !matches!(events.recv().await, Some(peergrid::MembershipEvent::Down(m)) if m.id == crashed)
    {
    }
    let leaver = cluster.grid(1).clone();
    tokio::time::timeout(Duration::from_secs(10), leaver.leave())
        .await
        .expect("the leave does not wait for its timeout")
        .unwrap();
    if settled {
        assert_readable(cluster.grid(0), &expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_right_after_a_crash_hands_off_promptly() {
    leave_right_after_a_crash(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_right_after_a_crash_of_an_unsettled_cluster_hands_off_promptly() {
    leave_right_after_a_crash(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_member_one_at_a_time_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start_with(3, |c| c.rpc_timeout = Duration::from_secs(2)).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("failover");
    let initial: HashMap<String, u64> = (0..300u64).map(|i| (format!("init-{i}"), i)).collect();
    map.put_all(initial.clone()).await.unwrap();
    let mut acked = initial;
    for victim in 0..3 {
        // Writers run on the members that stay up during this restart.
        let stop = Arc::new(AtomicBool::new(false));
        let others: Vec<&Grid> = (0..3)
            .filter(|&i| i != victim)
            .map(|i| cluster.grid(i))
            .collect();
        let writers = start_writers(&others, 2, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.crash(victim);
        cluster.wait_converged().await;
        cluster.wait_table_settled().await;
        let survivor = if victim == 0 { 1 } else { 0 };
        cluster
            .grid(survivor)
            .wait_safe(common::DEADLINE)
            .await
            .expect("safe after the crash");
        cluster.restart(victim).await;
        cluster.wait_converged().await;
        cluster.wait_table_settled().await;
        cluster
            .grid(victim)
            .wait_safe(common::DEADLINE)
            .await
            .expect("safe after the restart");
        stop.store(true, Ordering::Relaxed);
        // A writer key names its value (`g0-t1-7` holds 7), so rounds that reuse keys agree.
        let (round, _) = collect(writers).await;
        acked.extend(round);
    }
    for i in 0..3 {
        assert_readable(cluster.grid(i), &acked).await;
    }
}
