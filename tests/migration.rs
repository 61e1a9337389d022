//! Migrations on a real cluster: members join, the coordinator dies mid-move, copy streams break
//! halfway, a member rejoins under a new generation; writers on every member keep writing, and
//! every acknowledged write is still there afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Cluster, assert_all_present, collect, start_writers};
use peergrid::{Map, PartitionEvent};

/// Every live member reads every acknowledged write back.
async fn assert_everywhere(cluster: &Cluster, acked: &std::collections::HashMap<String, u64>) {
    let grids: Vec<_> = cluster.live().collect();
    for (i, grid) in grids.iter().enumerate() {
        let others: Vec<_> = grids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, g)| *g)
            .collect();
        assert_all_present(grid, &others, acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_two_members_to_three_under_writes_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let preload: Map<String, u64> = cluster.grid(0).map("failover");
    let before: std::collections::HashMap<String, u64> =
        (0..2000u64).map(|i| (format!("pre{i}"), i)).collect();
    preload.put_all(before.clone()).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let puts_before = cluster.puts("failover");
    let writers = start_writers(
        &[cluster.grid(0), cluster.grid(1), cluster.grid(2)],
        2,
        &stop,
    );
    cluster.wait_for_writes("failover", puts_before, 100).await;
    // Two members join at once.
    let (config_a, config_b) = (cluster.config(), cluster.config());
    let (a, b) = tokio::join!(
        peergrid::Grid::join(config_a),
        peergrid::Grid::join(config_b)
    );
    cluster.adopt(a.unwrap());
    cluster.adopt(b.unwrap());
    cluster.wait_converged().await;
    // Writers on the new members too, while the partitions move.
    let late = start_writers(&[cluster.grid(3), cluster.grid(4)], 2, &stop);
    cluster.wait_table_settled().await;
    stop.store(true, Ordering::Relaxed);
    let (mut acked, failed) = collect(writers).await;
    let (late_acked, late_failed) = collect(late).await;
    acked.extend(late_acked);
    eprintln!(
        "{} acknowledged writes, {} failed calls",
        acked.len(),
        failed + late_failed
    );
    assert!(acked.len() > 200, "writers made progress");
    acked.extend(before);
    assert_everywhere(&cluster, &acked).await;
    // The new members own their share.
    let table = cluster.grid(0).partition_table();
    for new in [cluster.grid(3), cluster.grid(4)] {
        let id = new.local_member().id;
        let owned = table.replicas.iter().filter(|r| r[0] == id).count();
        assert!(owned >= 40, "a new member leads {owned} partitions");
    }
    cluster.grid(0).wait_safe(common::DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_crashing_mid_migration_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start_with(3, |c| c.max_parallel_migrations = 4).await;
    cluster.wait_table_settled().await;
    let stop = Arc::new(AtomicBool::new(false));
    let puts_before = cluster.puts("failover");
    let writers = start_writers(&[cluster.grid(1), cluster.grid(2)], 3, &stop);
    cluster.wait_for_writes("failover", puts_before, 100).await;
    let joiner = cluster.add().await;
    // Crash the coordinator (the oldest member) once the joiner started taking partitions over,
    // with most moves still to come (4 at a time).
    let mut events = cluster.grid(joiner).partition_events();
    tokio::time::timeout(common::DEADLINE, async {
        loop {
            if let Some(PartitionEvent::MigrationStarted { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("the joiner starts taking partitions over");
    let moves_left = {
        let table = cluster.grid(1).partition_table();
        let id = cluster.grid(joiner).local_member().id;
        67usize.saturating_sub(table.replicas.iter().filter(|r| r[0] == id).count())
    };
    assert!(moves_left > 0, "the crash comes mid-migration");
    cluster.crash(0);
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    // The writers keep going on the cluster the crash left.
    let puts_after = cluster.puts("failover");
    cluster.wait_for_writes("failover", puts_after, 100).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = collect(writers).await;
    eprintln!("{} acknowledged writes, {failed} failed calls", acked.len());
    assert!(acked.len() > 200, "writers made progress");
    assert_everywhere(&cluster, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_streams_broken_halfway_are_retried_and_lose_nothing() {
    // Small chunks, so every partition copy is a stream of several chunks.
    let mut cluster = Cluster::start_with(3, |c| c.snapshot_chunk_size = 1024).await;
    cluster.wait_table_settled().await;
    let map: Map<String, Vec<u8>> = cluster.grid(0).map("failover-bytes");
    let expected: std::collections::HashMap<String, Vec<u8>> = (0..4000u32)
        .map(|i| (format!("k{i}"), vec![(i % 251) as u8; 200]))
        .collect();
    map.put_all(expected.clone()).await.unwrap();
    let switch = cluster.switch.clone();
    switch.break_snapshot_streams(40);

    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&[cluster.grid(0), cluster.grid(1)], 2, &stop);
    cluster.add().await;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    stop.store(true, Ordering::Relaxed);
    let (acked, _) = collect(writers).await;
    assert!(
        switch.broken_snapshot_streams() >= 10,
        "only {} streams were broken",
        switch.broken_snapshot_streams()
    );
    assert_everywhere(&cluster, &acked).await;
    for grid in cluster.live() {
        let map: Map<String, Vec<u8>> = grid.map("failover-bytes");
        let keys: Vec<String> = expected.keys().cloned().collect();
        let got = map.get_all(&keys).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(expected.iter().all(|(k, v)| got.get(k) == Some(v)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rejoining_with_a_new_generation_mid_migration_gets_only_the_current_table() {
    let cluster = Cluster::start_with(4, |c| c.max_parallel_migrations = 4).await;
    cluster.wait_table_settled().await;
    let stop = Arc::new(AtomicBool::new(false));
    let puts_before = cluster.puts("failover");
    let writers = start_writers(&[cluster.grid(0), cluster.grid(1)], 3, &stop);
    cluster.wait_for_writes("failover", puts_before, 100).await;
    // Member 3 is cut off from everyone: declared down, its partitions promoted and re-backed up.
    let isolated = cluster.grid(3).clone();
    let old = isolated.local_member();
    let others: Vec<_> = (0..3).map(|i| cluster.slots[i].gossip).collect();
    cluster.switch.split(&[old.gossip_addr], &others);
    common::wait_for(
        "the others to declare the cut member down",
        common::DEADLINE,
        || {
            let gone = (0..3).all(|i| !cluster.grid(i).members().iter().any(|m| m.id == old.id));
            async move { gone.then_some(()) }
        },
    )
    .await;
    // And the coordinator to promote its backups: a member that rejoined before that would still
    // be in the table, and there would be no newer table to get.
    common::wait_for(
        "the coordinator to publish a table without the cut member",
        common::DEADLINE,
        || {
            let promoted = !cluster
                .grid(0)
                .partition_table()
                .replicas
                .iter()
                .any(|r| r.contains(&old.id));
            async move { promoted.then_some(()) }
        },
    )
    .await;
    // Heal while the coordinator is still restoring backups: the member rejoins under a new
    // generation, with a table the others have long replaced.
    let stale_version = isolated.partition_table().version;
    cluster.switch.heal_all();
    common::wait_for("the member to rejoin", common::DEADLINE, || {
        let back = cluster
            .grid(0)
            .members()
            .iter()
            .find(|m| m.id == old.id)
            .map(|m| m.generation);
        async move { back.filter(|g| *g > old.generation).map(|_| ()) }
    })
    .await;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = collect(writers).await;
    eprintln!("{} acknowledged writes, {failed} failed calls", acked.len());
    let current = cluster.grid(0).partition_table();
    assert!(current.version > stale_version);
    assert_eq!(
        isolated.partition_table(),
        current,
        "the rejoined member routes by the current table"
    );
    assert_everywhere(&cluster, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_coordinator_rejoining_does_not_wipe_what_the_majority_wrote() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let coordinator = cluster.grid(0).local_member();
    let map: Map<String, u64> = cluster.grid(1).map("failover");
    for i in 0..200u64 {
        map.set(&format!("k{i}"), &i).await.unwrap();
    }
    // The oldest member is cut off: it coordinates a cluster of its own, holding every partition,
    // while the majority promotes, restores its backups and overwrites every entry.
    let others = [cluster.slots[1].gossip, cluster.slots[2].gossip];
    cluster.switch.split(&[coordinator.gossip_addr], &others);
    common::wait_for("both sides to see the split", common::DEADLINE, || {
        let split = cluster.grid(0).members().len() == 1
            && (1..3).all(|i| cluster.grid(i).members().len() == 2);
        async move { split.then_some(()) }
    })
    .await;
    cluster.grid(1).wait_safe(common::DEADLINE).await.unwrap();
    let expected: std::collections::HashMap<String, u64> =
        (0..200u64).map(|i| (format!("k{i}"), i + 1000)).collect();
    map.put_all(expected.clone()).await.unwrap();
    // It rejoins as the youngest member, so the majority's coordinator keeps coordinating and
    // its tables, not the ones made alone, win.
    cluster.switch.heal_all();
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    let rejoined = cluster.grid(0).local_member();
    assert!(
        rejoined.generation > coordinator.generation,
        "it rejoined renewed"
    );
    assert_everywhere(&cluster, &expected).await;
}
