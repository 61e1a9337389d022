//! The distributed queue on a real cluster: the API, capacity and timeouts, exactly-once FIFO
//! delivery with producers and consumers on every member, and no loss or duplicate when the
//! queue's primary crashes or a member joins mid-run.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{Grid, Queue, QueueConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_api_capacity_and_timeouts() {
    let cluster = Cluster::start_with(3, |c| {
        c.queues = vec![(
            "bounded".to_string(),
            QueueConfig {
                capacity: 3,
                ..QueueConfig::default()
            },
        )];
    })
    .await;
    cluster.wait_table_settled().await;
    let a: Queue<String> = cluster.grid(0).queue("plain");
    let b: Queue<String> = cluster.grid(1).queue("plain");
    assert!(a.is_empty().await.unwrap());
    assert_eq!(b.poll().await.unwrap(), None);
    assert_eq!(a.peek().await.unwrap(), None);
    for i in 0..5 {
        assert!(a.offer(&format!("item {i}")).await.unwrap());
    }
    assert_eq!(b.len().await.unwrap(), 5);
    assert_eq!(b.peek().await.unwrap().as_deref(), Some("item 0"));
    assert_eq!(b.poll().await.unwrap().as_deref(), Some("item 0"));
    assert_eq!(
        a.drain(3).await.unwrap(),
        vec!["item 1", "item 2", "item 3"]
    );
    assert_eq!(b.drain(10).await.unwrap(), vec!["item 4"]);
    assert!(a.drain(10).await.unwrap().is_empty());
    a.offer(&"x".to_string()).await.unwrap();
    // The queue's entries are out of reach of map handles.
    let sneaky: peergrid::Map<u64, String> = cluster.grid(0).map("\0queue:plain");
    assert!(matches!(
        sneaky.clear().await,
        Err(peergrid::Error::ReservedName { .. })
    ));
    assert!(matches!(
        sneaky.get(&1).await,
        Err(peergrid::Error::ReservedName { .. })
    ));
    assert_eq!(b.len().await.unwrap(), 1);
    b.clear().await.unwrap();
    assert!(a.is_empty().await.unwrap());

    // Capacity: offer says no, offer_timeout and put wait for room made on another member.
    let full: Queue<u32> = cluster.grid(0).queue("bounded");
    let other: Queue<u32> = cluster.grid(2).queue("bounded");
    for i in 0..3 {
        assert!(full.offer(&i).await.unwrap());
    }
    assert!(!full.offer(&3).await.unwrap());
    assert!(
        !full
            .offer_timeout(&3, Duration::from_millis(200))
            .await
            .unwrap()
    );
    let waiting = tokio::spawn({
        let full = full.clone();
        async move { full.offer_timeout(&3, Duration::from_secs(20)).await }
    });
    let putting = tokio::spawn({
        let full = full.clone();
        async move { full.put(&4).await }
    });
    assert_eq!(other.poll().await.unwrap(), Some(0));
    assert_eq!(other.poll().await.unwrap(), Some(1));
    assert!(waiting.await.unwrap().unwrap());
    putting.await.unwrap().unwrap();
    assert_eq!(other.drain(10).await.unwrap().len(), 3);

    // Waiting for an item: poll_timeout gives up, take gets one offered elsewhere.
    let empty: Queue<u32> = cluster.grid(1).queue("handoff");
    assert_eq!(
        empty
            .poll_timeout(Duration::from_millis(200))
            .await
            .unwrap(),
        None
    );
    let taker = tokio::spawn({
        let empty = empty.clone();
        async move { empty.take().await }
    });
    let polling = tokio::spawn({
        let empty = empty.clone();
        async move { empty.poll_timeout(Duration::from_secs(20)).await }
    });
    let producer: Queue<u32> = cluster.grid(2).queue("handoff");
    producer.offer(&7).await.unwrap();
    producer.offer(&8).await.unwrap();
    let mut got = vec![
        taker.await.unwrap().unwrap(),
        polling.await.unwrap().unwrap().unwrap(),
    ];
    got.sort();
    assert_eq!(got, vec![7, 8]);
}

/// An item: producer, sequence number.
type Item = (u32, u64);

/// Producers offer `per_producer` items each from every member (retrying an offer that failed
/// with an error until it succeeds, so each item is acknowledged once); consumers take until
/// told to stop and the queue is empty. Returns what each consumer took, in order, and the
/// items whose offer was acknowledged.
async fn run_producers_and_consumers(
    grids: Vec<Grid>,
    queue: &str,
    per_producer: u64,
    offered: Arc<std::sync::atomic::AtomicU64>,
    during: impl std::future::Future<Output = ()>,
) -> (Vec<Vec<Item>>, HashSet<Item>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for (p, grid) in grids.iter().enumerate() {
        let q: Queue<Item> = grid.queue(queue);
        let offered = offered.clone();
        producers.push(tokio::spawn(async move {
            let mut acked = HashSet::new();
            for n in 0..per_producer {
                let item = (p as u32, n);
                // An error leaves the outcome unknown: the item may or may not be in the queue,
                // and offering it again (with a new token) could enqueue it twice.
                match q.offer(&item).await {
                    Ok(true) => {
                        acked.insert(item);
                    }
                    Ok(false) => panic!("an unbounded queue refused an item"),
                    Err(e) => eprintln!("offer of {item:?}: outcome unknown: {e}"),
                }
                offered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            acked
        }));
    }
    let mut consumers = Vec::new();
    for grid in grids.iter() {
        let q: Queue<Item> = grid.queue(queue);
        let stop = stop.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match q.poll_timeout(Duration::from_millis(200)).await {
                    Ok(Some(item)) => got.push(item),
                    Ok(None) if stop.load(std::sync::atomic::Ordering::SeqCst) => return got,
                    Ok(None) => {}
                    Err(e) => eprintln!("poll failed: {e}"),
                }
            }
        }));
    }
    during.await;
    let mut acked = HashSet::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut taken = Vec::new();
    for c in consumers {
        taken.push(tokio::time::timeout(DEADLINE, c).await.unwrap().unwrap());
    }
    (taken, acked)
}

/// Every acknowledged item was taken exactly once, nothing was taken twice (an item whose offer
/// failed may be there or not), and each consumer saw each producer's items in the order they
/// were offered.
fn check_exactly_once_in_order(taken: &[Vec<Item>], acked: &HashSet<Item>) {
    let mut seen: HashMap<Item, usize> = HashMap::new();
    for consumer in taken {
        let mut last: HashMap<u32, u64> = HashMap::new();
        for &(producer, n) in consumer {
            *seen.entry((producer, n)).or_default() += 1;
            if let Some(&before) = last.get(&producer) {
                assert!(n > before, "producer {producer}: {n} after {before}");
            }
            last.insert(producer, n);
        }
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(duplicated.is_empty(), "taken twice: {duplicated:?}");
    let missing: Vec<_> = acked.iter().filter(|i| !seen.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged items lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_consumers_on_three_members_get_every_item_once_in_order() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let grids: Vec<Grid> = cluster.live().cloned().collect();
    let (taken, acked) =
        run_producers_and_consumers(grids, "jobs", 300, Default::default(), async {}).await;
    assert_eq!(acked.len(), 900);
    check_exactly_once_in_order(&taken, &acked);
}

/// The index and id of the member leading `queue`, and every other running member.
fn leader_and_others(cluster: &Cluster, queue: &str) -> (usize, peergrid::MemberId, Vec<Grid>) {
    let primary = cluster
        .grid(0)
        .queue::<Item>(queue)
        .owner()
        .expect("a settled table");
    let leader = (0..cluster.slots.len())
        .find(|&i| cluster.grid(i).local_member().id == primary)
        .expect("the leader is running");
    let others = (0..cluster.slots.len())
        .filter(|&i| i != leader)
        .map(|i| cluster.grid(i).clone())
        .collect();
    (leader, primary, others)
}

/// Waits until the producers had more than 100 offers answered.
async fn items_flowed(offered: &std::sync::atomic::AtomicU64) {
    wait_for("items to flow", DEADLINE, || {
        let n = offered.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n > 100).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_primary_crashing_mid_run_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start_with(4, |c| c.backup_count = 1).await;
    cluster.wait_table_settled().await;
    let (doomed, _, survivors) = leader_and_others(&cluster, "crashy");
    let offered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let crash = {
        let offered = offered.clone();
        async move {
            // Let items flow, then crash the primary.
            items_flowed(&offered).await;
            cluster.crash(doomed);
        }
    };
    let (taken, acked) =
        run_producers_and_consumers(survivors, "crashy", 200, offered, crash).await;
    assert_eq!(acked.len(), 600);
    check_exactly_once_in_order(&taken, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_mid_run_moves_the_queue_without_loss() {
    let mut cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let grids: Vec<Grid> = cluster.live().cloned().collect();
    let config = cluster.config();
    let joined = Arc::new(tokio::sync::Mutex::new(None));
    let offered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let join = {
        let (joined, offered) = (joined.clone(), offered.clone());
        async move {
            items_flowed(&offered).await;
            *joined.lock().await = Some(Grid::join(config).await.expect("joins"));
        }
    };
    let (taken, acked) = run_producers_and_consumers(grids, "moving", 300, offered, join).await;
    assert_eq!(acked.len(), 600);
    check_exactly_once_in_order(&taken, &acked);
    if let Some(grid) = joined.lock().await.take() {
        cluster.adopt(grid);
    }
    cluster.wait_table_settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_listener_sees_offers_and_takes_in_order() {
    use peergrid::ItemEvent::{Added, Removed};
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let mut events = cluster
        .grid(1)
        .queue::<String>("watched")
        .listen(true)
        .await;
    let q: Queue<String> = cluster.grid(2).queue("watched");
    q.offer(&"a".to_string()).await.unwrap();
    q.offer(&"b".to_string()).await.unwrap();
    assert_eq!(q.poll().await.unwrap().as_deref(), Some("a"));
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < 3 {
            seen.push(events.recv().await.expect("stream open"));
        }
    })
    .await
    .expect("every event arrives");
    assert_eq!(
        seen,
        vec![
            Added(Some("a".to_string())),
            Added(Some("b".to_string())),
            Removed(Some("a".to_string()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_primary_leaving_mid_run_hands_it_over_without_loss() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let (leaving, primary, stayers) = leader_and_others(&cluster, "handed");
    let offered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let leave = {
        let (offered, grid) = (offered.clone(), cluster.grid(leaving).clone());
        async move {
            items_flowed(&offered).await;
            grid.leave().await.expect("a graceful leave");
        }
    };
    let (taken, acked) =
        run_producers_and_consumers(stayers.clone(), "handed", 300, offered, leave).await;
    assert_eq!(acked.len(), 600);
    check_exactly_once_in_order(&taken, &acked);
    // The queue moved to a member that stayed.
    let owner = stayers[0].queue::<Item>("handed").owner();
    assert!(owner.is_some_and(|o| o != primary));
    cluster.crash(leaving);
}
