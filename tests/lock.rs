//! The fenced lock on a real cluster: mutual exclusion across members with fences in grant
//! order, reentry, leases, timeouts, FIFO waiters, a crashed holder, a crashed primary, a
//! migration, and per-key map locks that other writers wait for.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{Error, Grid, Lock, LockConfig, Map};

/// The index of the member that leads lock `name`, and every other running index.
fn owner_and_others(cluster: &Cluster, name: &str) -> (usize, Vec<usize>) {
    let owner = cluster
        .grid(0)
        .lock(name)
        .owner()
        .expect("the lock has an owner");
    let running: Vec<usize> = (0..cluster.slots.len())
        .filter(|&i| cluster.slots[i].grid.is_some())
        .collect();
    let leader = *running
        .iter()
        .find(|&&i| cluster.grid(i).local_member().id == owner)
        .expect("the owner is running");
    (
        leader,
        running.into_iter().filter(|&i| i != leader).collect(),
    )
}

async fn wait_unlocked(lock: &Lock) {
    wait_for("the lock to be free", DEADLINE, || async {
        (!lock.is_locked().await.unwrap_or(true)).then_some(())
    })
    .await;
}

async fn wait_waiting(lock: &Lock, n: usize) {
    wait_for(&format!("{n} waiters"), DEADLINE, || async {
        (lock.waiting().await.ok() == Some(n)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_three_members_increment_a_counter_under_the_lock() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    const TASKS_PER_MEMBER: usize = 2;
    const INCREMENTS: u64 = 25;
    // The protected resource checks fences, as a storage service would: it refuses a fence
    // smaller than the largest it has seen. It also records the fences in grant order.
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        for _ in 0..TASKS_PER_MEMBER {
            let grid: Grid = cluster.grid(i).clone();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                let lock = grid.lock("counter");
                let counter: Map<String, u64> = grid.map("counters");
                for _ in 0..INCREMENTS {
                    let guard = lock.lock().await.expect("lock");
                    {
                        let mut seen = seen.lock().unwrap();
                        assert!(
                            seen.last().is_none_or(|&last| guard.fence() > last),
                            "fence {} after {:?}",
                            guard.fence(),
                            seen.last()
                        );
                        seen.push(guard.fence());
                    }
                    let value = counter.get("c").await.expect("get").unwrap_or(0);
                    counter.set("c", &(value + 1)).await.expect("set");
                    guard.unlock().await.expect("unlock");
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("task");
    }
    let total = 3 * TASKS_PER_MEMBER as u64 * INCREMENTS;
    let counter: Map<String, u64> = cluster.grid(1).map("counters");
    assert_eq!(counter.get("c").await.unwrap(), Some(total));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, total);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "fences grow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentry_limits_and_unlocks_by_non_holders() {
    let cluster = Cluster::start_with(2, |c| {
        c.locks = vec![(
            "reentrant".to_string(),
            LockConfig {
                reentry_limit: 3,
                ..LockConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    let a = cluster.grid(0).lock("reentrant");
    let b = cluster.grid(1).lock("reentrant");
    let first = a.lock().await.unwrap();
    let second = a.lock().await.unwrap();
    let third = a.try_lock().await.unwrap();
    assert_eq!(first.fence(), second.fence());
    assert_eq!(first.fence(), third.fence());
    assert!(matches!(
        a.try_lock().await,
        Err(Error::ReentryLimit { limit: 3, .. })
    ));
    let holder = b.holder().await.unwrap().expect("held");
    assert_eq!(holder.member, cluster.grid(0).local_member().id);
    assert_eq!((holder.holds, holder.fence), (3, first.fence()));
    // Another holder: on another member, or a clone on the same one.
    assert!(matches!(b.try_lock().await, Err(Error::LockBusy { .. })));
    assert!(matches!(b.unlock().await, Err(Error::NotLockHolder { .. })));
    let clone = a.clone();
    assert!(matches!(
        clone.try_lock().await,
        Err(Error::LockBusy { .. })
    ));
    assert!(matches!(
        clone.unlock().await,
        Err(Error::NotLockHolder { .. })
    ));
    third.unlock().await.unwrap();
    second.unlock().await.unwrap();
    assert!(b.is_locked().await.unwrap());
    let first_fence = first.fence();
    first.unlock().await.unwrap();
    assert!(!b.is_locked().await.unwrap());
    let next = b.try_lock().await.unwrap();
    assert!(next.fence() > first_fence);
    // Unlock without a guard releases the holder's latest hold.
    let again = b.lock().await.unwrap();
    b.unlock().await.unwrap();
    assert!(a.is_locked().await.unwrap());
    drop(again);
    // The guard released by its drop was already unlocked: nothing left, and a dropped guard
    // of a live hold releases it in the background.
    next.unlock().await.unwrap();
    assert!(!a.is_locked().await.unwrap());
    {
        let _dropped = a.lock().await.unwrap();
    }
    wait_unlocked(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_runs_out_releases_the_lock() {
    let cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let a = cluster.grid(0).lock("leased");
    let b = cluster.grid(1).lock("leased");
    let guard = a.lock_with_lease(Duration::from_secs(1)).await.unwrap();
    if let Some(holder) = b.holder().await.unwrap() {
        assert!(
            holder
                .lease_remaining
                .is_some_and(|l| l <= Duration::from_secs(1))
        );
    }
    // A waiter on the other member gets it when the lease runs out.
    let next = tokio::time::timeout(DEADLINE, b.lock())
        .await
        .expect("granted after the lease")
        .unwrap();
    assert!(next.fence() > guard.fence());
    let fence = guard.fence();
    match guard.unlock().await {
        Err(Error::LeaseExpired { fence: f, .. }) => assert_eq!(f, fence),
        other => panic!("expected LeaseExpired, got {other:?}"),
    }
    assert_eq!(
        a.holder().await.unwrap().expect("still held").fence,
        next.fence()
    );
    next.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_for_times_out_and_gives_up_its_place() {
    let cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let a = cluster.grid(0).lock("contended");
    let b = cluster.grid(1).lock("contended");
    let held = a.lock().await.unwrap();
    let started = std::time::Instant::now();
    match b.try_lock_for(Duration::from_millis(300)).await {
        Err(Error::LockTimeout { waited, .. }) => assert!(waited >= Duration::from_millis(300)),
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(a.waiting().await.unwrap(), 0, "the timed-out waiter left");
    // A waiting future that is dropped gives its place back too.
    let c = cluster.grid(1).lock("contended");
    let dropped = tokio::spawn(async move { c.lock().await.map(|g| g.fence()) });
    wait_waiting(&a, 1).await;
    dropped.abort();
    wait_waiting(&a, 0).await;
    held.unlock().await.unwrap();
    assert!(!a.is_locked().await.unwrap(), "nobody was granted it");
    let later = b.try_lock_for(Duration::from_secs(5)).await.unwrap();
    later.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_fifo_order_across_members() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let first = cluster.grid(0).lock("fifo");
    let held = first.lock().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for n in 0..6 {
        let lock = cluster.grid((n + 1) % 3).lock("fifo");
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = lock.lock().await.expect("lock");
            order.lock().unwrap().push((n, guard.fence()));
            guard.unlock().await.expect("unlock");
        }));
        // The next waiter queues only once this one is queued.
        wait_waiting(&first, n + 1).await;
    }
    let first_fence = held.fence();
    held.unlock().await.unwrap();
    for waiter in waiters {
        tokio::time::timeout(DEADLINE, waiter)
            .await
            .expect("every waiter is served")
            .unwrap();
    }
    let order = order.lock().unwrap();
    assert_eq!(
        order.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1));
    assert!(order[0].1 > first_fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_lock_goes_to_the_next_holder_with_a_larger_fence() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let (leader, others) = owner_and_others(&cluster, "orphaned");
    let (doomed, survivor) = (others[0], others[1]);
    let held = cluster.grid(doomed).lock("orphaned").lock().await.unwrap();
    let fence = held.fence();
    let waiter = cluster.grid(survivor).lock("orphaned");
    let waiting = tokio::spawn(async move { waiter.lock().await.map(|g| (g.fence(), g)) });
    wait_waiting(&cluster.grid(leader).lock("orphaned"), 1).await;
    // The guard would release in the background once dropped: keep it alive past the crash.
    std::mem::forget(held);
    cluster.crash(doomed);
    let (next, guard) = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("granted after failure detection")
        .unwrap()
        .unwrap();
    assert!(next > fence, "fence {next} after {fence}");
    let holder = cluster
        .grid(leader)
        .lock("orphaned")
        .holder()
        .await
        .unwrap()
        .expect("held");
    assert_eq!(holder.member, cluster.grid(survivor).local_member().id);
    guard.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_survives_its_primary_crashing_while_held() {
    let mut cluster = Cluster::start(4).await;
    cluster.wait_table_settled().await;
    let (leader, others) = owner_and_others(&cluster, "durable");
    let (holding, queued) = (others[0], others[1]);
    let holder = cluster.grid(holding).lock("durable");
    let held = holder.lock().await.unwrap();
    let fence = held.fence();
    let waiter = cluster.grid(queued).lock("durable");
    let waiting = tokio::spawn(async move { waiter.lock().await.map(|g| (g.fence(), g)) });
    wait_waiting(&holder, 1).await;
    cluster.crash(leader);
    // The promoted backup has the state: the holder still holds it, the waiter still waits.
    let info = holder.holder().await.unwrap().expect("still held");
    assert_eq!(info.member, cluster.grid(holding).local_member().id);
    assert_eq!(info.fence, fence);
    assert_ne!(holder.owner(), None);
    held.unlock()
        .await
        .expect("the holder's unlock works after the failover");
    let (next, guard) = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiter is granted")
        .unwrap()
        .unwrap();
    assert!(next > fence, "a promoted primary never reissues a fence");
    guard.unlock().await.unwrap();
    let after = holder.lock().await.unwrap();
    assert!(after.fence() > next);
    after.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_move_with_their_partitions_when_a_member_joins() {
    let mut cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let names: Vec<String> = (0..40).map(|i| format!("moving-{i}")).collect();
    let locks: Vec<Lock> = names.iter().map(|n| cluster.grid(1).lock(n)).collect();
    let mut guards = Vec::new();
    for lock in &locks {
        guards.push(lock.lock().await.unwrap());
    }
    let joined = cluster.add().await;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    let newcomer = cluster.grid(joined).local_member().id;
    let moved = locks.iter().filter(|l| l.owner() == Some(newcomer)).count();
    assert!(moved > 0, "some lock moved to the new member");
    let me = cluster.grid(1).local_member().id;
    for (lock, guard) in locks.iter().zip(&guards) {
        let info = lock.holder().await.unwrap().expect("still held");
        assert_eq!((info.member, info.fence), (me, guard.fence()));
    }
    // The holder's unlocks work on the new primaries, and the next grants have larger fences.
    for ((name, lock), guard) in names.iter().zip(&locks).zip(guards) {
        let fence = guard.fence();
        guard.unlock().await.unwrap();
        assert!(!lock.is_locked().await.unwrap());
        let next = cluster.grid(joined).lock(name).try_lock().await.unwrap();
        assert!(next.fence() > fence);
        next.unlock().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_map_locks_make_other_writers_wait() {
    let cluster = Cluster::start_with(2, |c| c.rpc_timeout = Duration::from_secs(2)).await;
    cluster.wait_table_settled().await;
    let holder: Map<String, u64> = cluster.grid(0).map("accounts");
    let other: Map<String, u64> = cluster.grid(1).map("accounts");
    let fence = holder.lock("alice").await.unwrap();
    assert!(other.is_locked("alice").await.unwrap());
    assert!(!other.is_locked("bob").await.unwrap());
    // The holder writes; other keys are free to everyone.
    holder.set("alice", &1).await.unwrap();
    other.set("bob", &7).await.unwrap();
    assert!(matches!(
        other.try_lock("alice", Duration::ZERO).await,
        Err(Error::LockBusy { .. })
    ));
    assert!(matches!(
        other.try_lock("alice", Duration::from_millis(200)).await,
        Err(Error::LockTimeout { .. })
    ));
    assert!(matches!(
        other.unlock("alice").await,
        Err(Error::NotLockHolder { .. })
    ));
    // A write that waits longer than its budget fails, unapplied.
    assert!(matches!(
        other.set("alice", &99).await,
        Err(Error::KeyLocked { .. })
    ));
    // Another writer waits for the unlock: while it waits, the holder never sees its value.
    let writer = other.clone();
    let waiting = tokio::spawn(async move { writer.set("alice", &2).await });
    for round in 2..12u64 {
        assert_eq!(holder.get("alice").await.unwrap(), Some(round - 1));
        holder.set("alice", &round).await.unwrap();
    }
    assert!(!waiting.is_finished());
    // Reentry and a second unlock.
    assert_eq!(holder.lock("alice").await.unwrap(), fence);
    holder.unlock("alice").await.unwrap();
    holder.unlock("alice").await.unwrap();
    tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the writer goes on after the unlock")
        .unwrap()
        .unwrap();
    assert_eq!(holder.get("alice").await.unwrap(), Some(2));
    let next = other.lock("alice").await.unwrap();
    assert!(next > fence);
    other.unlock("alice").await.unwrap();
    assert!(!holder.is_locked("alice").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_one_handle_are_one_holder_and_leave_nothing_held() {
    // A "*" map setting that would expire idle entries must not touch lock states.
    let cluster = Cluster::start_with(2, |c| {
        c.maps = vec![(
            "*".to_string(),
            peergrid::MapConfig {
                max_idle: Some(Duration::from_millis(300)),
                ..peergrid::MapConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    let other = cluster.grid(0).lock("shared");
    let held = other.lock().await.unwrap();
    let shared = Arc::new(cluster.grid(1).lock("shared"));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let guard = shared.lock().await.expect("lock");
            let fence = guard.fence();
            guard.unlock().await.expect("unlock");
            fence
        }));
    }
    wait_waiting(&other, 2).await;
    held.unlock().await.unwrap();
    let mut fences = Vec::new();
    for task in tasks {
        fences.push(tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap());
    }
    wait_unlocked(&other).await;
    assert_eq!(other.waiting().await.unwrap(), 0);
    assert!(fences.iter().all(|f| *f > 0));
    // Held across the idle limit: still held, and still this holder's.
    let long = other.lock().await.unwrap();
    let idle_map: Map<String, u64> = cluster.grid(0).map("idle");
    idle_map.set("k", &1).await.unwrap();
    // (Counting does not touch the entry, so it idles.)
    wait_for("the idle entry to expire", DEADLINE, || async {
        (idle_map.size().await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(matches!(
        shared.try_lock().await,
        Err(Error::LockBusy { .. })
    ));
    long.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_loads_and_refreshes_a_key_it_locked() {
    let cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let holder: Map<String, u64> = cluster.grid(0).map("loaded");
    holder.lock("k").await.unwrap();
    let value = holder
        .get_or_load("k", || async { Ok::<_, std::io::Error>(5) })
        .await
        .unwrap();
    assert_eq!(value, 5);
    holder.unlock("k").await.unwrap();
}

/// Fences keep increasing when the lock's state is lost with every replica of its partition
/// (here both replicas crash; after a split the lost copy is on the other side): the partition
/// starts afresh above any sequence number, the fences' floor, that its lost copies handed out.
/// Before, the fresh partition counted from 0 and handed out fence 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_keep_increasing_after_the_locks_partition_is_lost() {
    let mut cluster = Cluster::start(4).await;
    cluster.wait_table_settled().await;
    let me = cluster.grid(0).local_member().id;
    let table = cluster.grid(0).partition_table();
    let name = (0..)
        .map(|n| format!("lost-fence-{n}"))
        .find(|name| {
            let p = cluster.grid(0).lock(name).partition();
            !table.replicas[p as usize].contains(&me)
        })
        .expect("a lock that member 0 holds no replica of");
    let lock = cluster.grid(0).lock(&name);
    let mut last = 0;
    for _ in 0..3 {
        let guard = lock.lock().await.unwrap();
        assert!(guard.fence() > last);
        last = guard.fence();
        guard.unlock().await.unwrap();
    }
    let replicas = table.replicas[lock.partition() as usize].clone();
    for i in 1..cluster.slots.len() {
        if replicas.contains(&cluster.grid(i).local_member().id) {
            cluster.crash(i);
        }
    }
    wait_for("the survivors to see each other only", DEADLINE, || {
        let alone = cluster.live().all(|g| g.members().len() == 2);
        async move { alone.then_some(()) }
    })
    .await;
    cluster.wait_table_settled().await;
    assert!(
        cluster
            .live()
            .any(|g| g.partition_stats().partitions_lost > 0),
        "the lock's partition was lost"
    );
    let guard = wait_for("a grant after the loss", DEADLINE, || {
        let lock = lock.clone();
        async move { lock.try_lock().await.ok() }
    })
    .await;
    assert!(
        guard.fence() > last,
        "fence {} after the loss, {last} before",
        guard.fence()
    );
    guard.unlock().await.unwrap();
}
