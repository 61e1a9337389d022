//! The near cache on a real cluster: reads of cached keys stay in process, remote writes,
//! removals, expiry and clears invalidate them, a lost invalidation batch is found within the
//! documented bound, and a crashed primary's entries are not served.

mod common;

use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{EvictionPolicy, Grid, Map, MapConfig, MemberId, NearCacheConfig};

const REPAIR: Duration = Duration::from_millis(300);

fn near_map(max_entries: usize) -> MapConfig {
    MapConfig {
        near_cache: Some(NearCacheConfig {
            max_entries,
            repair_interval: REPAIR,
            ..NearCacheConfig::default()
        }),
        ..MapConfig::default()
    }
}

fn id(grid: &Grid) -> MemberId {
    grid.local_member().id
}

/// `n` keys that `reader` does not lead (those are the ones it caches).
fn remote_keys(reader: &Map<String, String>, me: MemberId, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| reader.owner(k).unwrap().is_some_and(|o| o != me))
        .take(n)
        .collect()
}

/// Reads `keys` through `reader` until every one is a near-cache hit with `value(key)`.
async fn warm(reader: &Map<String, String>, keys: &[String], value: impl Fn(&str) -> String) {
    wait_for(
        "the reader's near cache to hold every key",
        DEADLINE,
        || {
            let reader = reader.clone();
            let expected: Vec<(String, String)> =
                keys.iter().map(|k| (k.clone(), value(k))).collect();
            async move {
                let before = reader.local_stats().near_cache_hits;
                for (k, v) in &expected {
                    assert_eq!(reader.get(k).await.unwrap().as_ref(), Some(v));
                }
                let hits = reader.local_stats().near_cache_hits - before;
                (hits == expected.len() as u64).then_some(())
            }
        },
    )
    .await;
}

/// Waits until `reader` returns `value(key)` for every key.
async fn wait_sees(
    what: &str,
    deadline: Duration,
    reader: &Map<String, String>,
    keys: &[String],
    value: impl Fn(&str) -> Option<String>,
) {
    wait_for(what, deadline, || {
        let reader = reader.clone();
        let expected: Vec<(String, Option<String>)> =
            keys.iter().map(|k| (k.clone(), value(k))).collect();
        async move {
            for (k, v) in &expected {
                if reader.get(k).await.unwrap() != *v {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_stay_local_and_remote_changes_invalidate_them() {
    let cluster = Cluster::start_with(3, |c| {
        c.maps = vec![("near*".to_string(), near_map(10_000))];
    })
    .await;
    cluster.wait_table_settled().await;
    let writer: Map<String, String> = cluster.grid(0).map("near-a");
    let reader: Map<String, String> = cluster.grid(1).map("near-a");
    let keys = remote_keys(&reader, id(cluster.grid(1)), 100);
    for k in &keys {
        writer.set(k, &format!("v1 {k}")).await.unwrap();
    }
    warm(&reader, &keys, |k| format!("v1 {k}")).await;

    // Cached reads never leave the process: the primaries serve no more reads.
    let primary_gets = || -> u64 {
        cluster
            .live()
            .map(|g| g.map::<String, String>("near-a").local_stats().gets)
            .sum()
    };
    let gets_before = primary_gets();
    let hits_before = reader.local_stats().near_cache_hits;
    for _ in 0..5 {
        for k in &keys {
            assert_eq!(reader.get(k).await.unwrap(), Some(format!("v1 {k}")));
        }
    }
    assert_eq!(primary_gets(), gets_before);
    let stats = reader.local_stats();
    assert_eq!(stats.near_cache_hits, hits_before + 500);
    assert_eq!(stats.near_cache_entries, 100);
    assert!(stats.near_cache_hit_ratio().unwrap() > 0.5);

    // Updates on another member reach the reader.
    for k in &keys {
        writer.set(k, &format!("v2 {k}")).await.unwrap();
    }
    wait_sees(
        "the reader to see every update",
        DEADLINE,
        &reader,
        &keys,
        |k| Some(format!("v2 {k}")),
    )
    .await;
    assert!(reader.local_stats().near_cache_invalidations >= 100);

    // The reader's own write is visible to its next read at once.
    reader.set(&keys[0], &"mine".to_string()).await.unwrap();
    assert_eq!(reader.get(&keys[0]).await.unwrap().as_deref(), Some("mine"));

    // Removal, expiry and clear invalidate too.
    warm(&reader, &keys[1..20], |k| format!("v2 {k}")).await;
    writer.remove(&keys[1]).await.unwrap();
    wait_sees("the removal", DEADLINE, &reader, &keys[1..2], |_| None).await;
    writer
        .set_with_ttl(&keys[2], &"short".to_string(), Duration::from_secs(2))
        .await
        .unwrap();
    warm(&reader, &keys[2..3], |_| "short".to_string()).await;
    wait_sees("the expiry", DEADLINE, &reader, &keys[2..3], |_| None).await;
    writer.clear().await.unwrap();
    wait_sees("the clear", DEADLINE, &reader, &keys, |_| None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_invalidation_batch_is_found_within_the_bound() {
    // Only the reader has a near cache, so each write sends exactly one batch: to it.
    let mut cluster = Cluster::start(2).await;
    let mut config = cluster.config();
    config.maps = vec![("lossy".to_string(), near_map(10_000))];
    let r = cluster.add_with(config).await;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    let writer: Map<String, String> = cluster.grid(0).map("lossy");
    let reader: Map<String, String> = cluster.grid(r).map("lossy");
    let keys = remote_keys(&reader, id(cluster.grid(r)), 20);
    for k in &keys {
        writer.set(k, &"v1".to_string()).await.unwrap();
    }
    warm(&reader, &keys, |_| "v1".to_string()).await;
    let dropped_before = reader.local_stats().near_cache_partitions_dropped;

    // The invalidation of this update never arrives; nothing else is written.
    cluster.switch.drop_invalidation_batches(1);
    writer.set(&keys[0], &"v2".to_string()).await.unwrap();
    wait_for("the batch to be dropped", DEADLINE, || {
        let dropped = cluster.switch.dropped_invalidation_batches();
        async move { (dropped == 1).then_some(()) }
    })
    .await;
    // Found by the repair round (two intervals), well within this deadline.
    let bound = REPAIR * 2 + Duration::from_secs(3);
    wait_sees("the lost update", bound, &reader, &keys[..1], |_| {
        Some("v2".to_string())
    })
    .await;
    assert!(reader.local_stats().near_cache_partitions_dropped > dropped_before);

    // A lost batch followed by another write to the same key: the gap is seen at once.
    warm(&reader, &keys[..1], |_| "v2".to_string()).await;
    cluster.switch.drop_invalidation_batches(1);
    writer.set(&keys[0], &"v3".to_string()).await.unwrap();
    writer.set(&keys[0], &"v4".to_string()).await.unwrap();
    wait_sees(
        "the update after the gap",
        bound,
        &reader,
        &keys[..1],
        |_| Some("v4".to_string()),
    )
    .await;
    assert_eq!(cluster.switch.dropped_invalidation_batches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_from_a_crashed_primary_are_not_served() {
    let mut cluster = Cluster::start_with(3, |c| {
        c.maps = vec![("failover".to_string(), near_map(10_000))];
        c.backup_count = 1;
    })
    .await;
    cluster.wait_table_settled().await;
    let reader: Map<String, String> = cluster.grid(1).map("failover");
    let victim = id(cluster.grid(0));
    // Keys the member about to crash leads.
    let keys: Vec<String> = (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| reader.owner(k).unwrap() == Some(victim))
        .take(30)
        .collect();
    let writer: Map<String, String> = cluster.grid(2).map("failover");
    for k in &keys {
        writer.set(k, &"before".to_string()).await.unwrap();
    }
    warm(&reader, &keys, |_| "before".to_string()).await;

    cluster.crash(0);
    wait_for(
        "the reader to drop the crashed member's entries",
        DEADLINE,
        || {
            let entries = reader.local_stats().near_cache_entries;
            async move { (entries == 0).then_some(()) }
        },
    )
    .await;
    cluster.wait_converged().await;
    for k in &keys {
        writer.set(k, &"after".to_string()).await.unwrap();
    }
    wait_sees(
        "the new primaries' values",
        DEADLINE,
        &reader,
        &keys,
        |_| Some("after".to_string()),
    )
    .await;
    // And they are cached again, from the new primaries (or read locally where the reader took
    // the keys over).
    warm(
        &reader,
        &keys
            .iter()
            .filter(|k| reader.owner(*k).unwrap() != Some(id(cluster.grid(1))))
            .cloned()
            .collect::<Vec<_>>(),
        |_| "after".to_string(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_keeps_its_size_limit() {
    let cluster = Cluster::start_with(2, |c| {
        let mut map = near_map(20);
        if let Some(near) = map.near_cache.as_mut() {
            near.eviction = EvictionPolicy::Lfu;
        }
        c.maps = vec![("small".to_string(), map)];
    })
    .await;
    cluster.wait_table_settled().await;
    let reader: Map<String, String> = cluster.grid(1).map("small");
    let keys = remote_keys(&reader, id(cluster.grid(1)), 100);
    for k in &keys {
        reader.set(k, &format!("v {k}")).await.unwrap();
    }
    // The hot key is read between all others: LFU keeps it.
    warm(&reader, &keys[..1], |k| format!("v {k}")).await;
    for round in 0..3 {
        for k in &keys[1..] {
            assert_eq!(reader.get(k).await.unwrap(), Some(format!("v {k}")));
            let before = reader.local_stats().near_cache_hits;
            assert_eq!(
                reader.get(&keys[0]).await.unwrap(),
                Some(format!("v {}", keys[0]))
            );
            assert_eq!(
                reader.local_stats().near_cache_hits,
                before + 1,
                "the hot key was evicted (round {round}, after {k})"
            );
            assert!(reader.local_stats().near_cache_entries <= 20);
        }
    }
    assert!(reader.local_stats().near_cache_evictions >= 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_never_outlives_the_entrys_idle_limit_on_its_primary() {
    let cluster = Cluster::start_with(2, |c| {
        let mut map = near_map(1000);
        map.max_idle = Some(Duration::from_millis(800));
        c.maps = vec![("idle".to_string(), map)];
    })
    .await;
    cluster.wait_table_settled().await;
    let reader: Map<String, String> = cluster.grid(1).map("idle");
    let keys = remote_keys(&reader, id(cluster.grid(1)), 5);
    for k in &keys {
        reader.set(k, &"v".to_string()).await.unwrap();
    }
    warm(&reader, &keys, |_| "v".to_string()).await;
    // Near-cache hits are not reads on the primary: the entries idle out there, and the near
    // cache stops serving them by then.
    wait_sees("the idle entries to go", DEADLINE, &reader, &keys, |_| None).await;
    let other: Map<String, String> = cluster.grid(0).map("idle");
    for k in &keys {
        assert_eq!(other.get(k).await.unwrap(), None, "{k} is gone everywhere");
    }
}
