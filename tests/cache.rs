//! The map as a cache on a real cluster: entries with a time to live expire on the primary,
//! everywhere, after a failover, and without being read.

mod common;

use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{Map, MapConfig};

/// `n` members whose map (or pattern) `map` has `config`.
async fn with_map(n: usize, map: &str, config: MapConfig) -> Cluster {
    Cluster::start_with(n, |c| c.maps = vec![(map.to_string(), config.clone())]).await
}

/// Entries held by every member of `cluster` (primary and backup copies).
fn held(cluster: &Cluster) -> u64 {
    cluster
        .live()
        .map(|g| {
            (0..271u32)
                .filter_map(|p| g.local_replica(p))
                .map(|r| r.entries)
                .sum::<u64>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_with_a_ttl_expire_and_never_come_back() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("sessions");
    for i in 0..100u64 {
        map.set_with_ttl(&format!("short{i}"), &i, Duration::from_millis(300))
            .await
            .unwrap();
    }
    map.set("forever", &1).await.unwrap();
    map.set_with_ttl("zero-ttl", &2, Duration::ZERO)
        .await
        .unwrap();
    map.set("later", &3).await.unwrap();
    assert!(
        map.set_ttl("later", Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert!(
        !map.set_ttl("missing", Duration::from_secs(1))
            .await
            .unwrap()
    );
    // Every member answers for the entries, and then, once they expired, never returns them.
    let others: Vec<Map<String, u64>> = (1..3).map(|i| cluster.grid(i).map("sessions")).collect();
    wait_for("the short-lived entries to expire", DEADLINE, || {
        let (map, others) = (map.clone(), others.clone());
        async move {
            for m in std::iter::once(&map).chain(&others) {
                for i in 0..100u64 {
                    if m.get(&format!("short{i}")).await.unwrap().is_some() {
                        return None;
                    }
                }
                if m.get("later").await.unwrap().is_some() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    assert_eq!(map.get("forever").await.unwrap(), Some(1));
    assert_eq!(map.get("zero-ttl").await.unwrap(), Some(2));
    assert!(!map.contains_key("short1").await.unwrap());
    assert_eq!(map.put_if_absent("short1", &7).await.unwrap(), None);
    assert_eq!(map.get("short1").await.unwrap(), Some(7));
    assert_eq!(map.size().await.unwrap(), 3);
    // Primaries removed what the reads found expired, and their backups followed.
    cluster.grid(0).wait_safe(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_stays_expired_on_a_promoted_backup() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("sessions");
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let ttl = Duration::from_millis(200);
    for (i, key) in keys.iter().enumerate() {
        map.set_with_ttl(key, &(i as u64), ttl).await.unwrap();
    }
    // Every entry's deadline is at most `ttl` after the last write returned.
    let all_expired = tokio::time::Instant::now() + ttl;
    map.set("kept", &1).await.unwrap();
    // The entries expire on every replica's clock; nobody reads them. Then the member leading
    // a third of them crashes: the backups that take over hold the expiry time with the entry.
    tokio::time::sleep_until(all_expired).await;
    cluster.crash(2);
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    let got = map.get_all(&keys).await.unwrap();
    assert!(got.is_empty(), "{} expired entries came back", got.len());
    assert_eq!(map.get("kept").await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_expired_entries_nobody_reads_from_every_replica() {
    let cluster = with_map(
        3,
        "sessions",
        MapConfig {
            ttl: Some(Duration::from_secs(1)),
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(1).map("sessions");
    // One batch, well within the time to live: every replica holds every entry.
    map.put_all((0..500u64).map(|i| (format!("k{i}"), i)))
        .await
        .unwrap();
    assert_eq!(
        held(&cluster),
        1000,
        "primaries and backups hold the entries"
    );
    wait_for("the sweep to empty every replica", DEADLINE, || {
        let n = held(&cluster);
        async move { (n == 0).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maps_default_ttl_applies_to_writes_without_their_own() {
    let cluster = with_map(
        2,
        "cache*",
        MapConfig {
            ttl: Some(Duration::from_millis(200)),
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let cache: Map<String, u64> = cluster.grid(0).map("cache-users");
    let store: Map<String, u64> = cluster.grid(0).map("store");
    cache.set("a", &1).await.unwrap();
    cache.put_all([("b".to_string(), 2)]).await.unwrap();
    cache
        .set_with_ttl("pinned", &3, Duration::ZERO)
        .await
        .unwrap();
    store.set("a", &1).await.unwrap();
    wait_for(
        "the map's default ttl to expire its entries",
        DEADLINE,
        || {
            let cache = cache.clone();
            async move {
                let gone = cache.get("a").await.unwrap().is_none()
                    && cache.get("b").await.unwrap().is_none();
                gone.then_some(())
            }
        },
    )
    .await;
    assert_eq!(cache.get("pinned").await.unwrap(), Some(3));
    assert_eq!(
        store.get("a").await.unwrap(),
        Some(1),
        "other maps keep theirs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_member_counts_what_it_served_as_primary() {
    let cluster = Cluster::start(2).await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("stats");
    for i in 0..100u64 {
        map.set(&format!("k{i}"), &i).await.unwrap();
    }
    for i in 0..150u64 {
        map.get(&format!("k{i}")).await.unwrap(); // 100 hits, 50 misses
    }
    for i in 0..10u64 {
        map.remove(&format!("k{i}")).await.unwrap();
    }
    map.set_with_ttl("brief", &1, Duration::from_millis(50))
        .await
        .unwrap();
    wait_for("the brief entry to expire", DEADLINE, || {
        let map = map.clone();
        async move { map.get("brief").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let mut total = peergrid::MapStats::default();
    let per_member: Vec<_> = cluster
        .live()
        .map(|g| g.map::<String, u64>("stats").local_stats())
        .collect();
    for s in &per_member {
        assert!(s.gets > 0, "both members lead some keys: {s:?}");
        total.gets += s.gets;
        total.hits += s.hits;
        total.misses += s.misses;
        total.puts += s.puts;
        total.removes += s.removes;
        total.expirations += s.expirations;
        total.owned_entries += s.owned_entries;
        total.backup_entries += s.backup_entries;
        total.owned_bytes += s.owned_bytes;
    }
    // The polls of "brief" add gets: one hit-or-miss each, ending with the miss that expired it.
    assert_eq!(total.hits + total.misses, total.gets);
    assert!(total.gets >= 151 && total.hits >= 100 && total.misses >= 51);
    assert_eq!(total.puts, 101);
    assert_eq!(total.removes, 10);
    assert_eq!(total.expirations, 1);
    assert_eq!(total.owned_entries, 90);
    assert_eq!(total.backup_entries, 90, "one backup of each");
    assert!(total.owned_bytes >= 90 * 2);
    let ratio = total.hits as f64 / total.gets as f64;
    assert!(per_member[0].hit_ratio().is_some() && ratio > 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_each_member_under_its_limit_and_lru_keeps_the_hot_set() {
    let limit = 2000u64;
    let cluster = with_map(
        2,
        "lru",
        MapConfig {
            eviction: peergrid::EvictionConfig {
                policy: peergrid::EvictionPolicy::Lru,
                max_entries_per_member: Some(limit),
                ..Default::default()
            },
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("lru");
    let hot: Vec<String> = (0..50).map(|i| format!("hot{i}")).collect();
    map.put_all(hot.iter().map(|k| (k.clone(), 1)))
        .await
        .unwrap();
    for batch in 0..40u64 {
        map.put_all((0..250u64).map(|i| (format!("cold{batch}-{i}"), i)))
            .await
            .unwrap();
        // The hot set is read between batches, so it stays recently used.
        let got = map.get_all(&hot).await.unwrap();
        assert!(
            got.len() >= 45,
            "only {} hot keys left after batch {batch}",
            got.len()
        );
    }
    let stats: Vec<_> = cluster
        .live()
        .map(|g| g.map::<String, u64>("lru").local_stats())
        .collect();
    let (mut owned, mut backups, mut evictions) = (0, 0, 0);
    for s in &stats {
        assert!(
            s.owned_entries <= limit,
            "a member leads {} entries",
            s.owned_entries
        );
        owned += s.owned_entries;
        backups += s.backup_entries;
        evictions += s.evictions;
    }
    assert!(evictions >= 10_050 - 2 * limit, "{evictions} evictions");
    assert_eq!(
        owned + evictions,
        10_050,
        "every entry is either held or was evicted"
    );
    assert_eq!(backups, owned, "evictions are replicated to the backups");
    let got = map.get_all(&hot).await.unwrap();
    assert!(
        got.len() >= 45,
        "LRU keeps the hot set: {} of 50",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_each_member_under_its_byte_limit() {
    let limit = 256 * 1024u64;
    let cluster = with_map(
        2,
        "heavy",
        MapConfig {
            eviction: peergrid::EvictionConfig {
                policy: peergrid::EvictionPolicy::Lru,
                max_bytes_per_member: Some(limit),
                ..Default::default()
            },
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let map: Map<String, Vec<u8>> = cluster.grid(0).map("heavy");
    // About 1.2 MB of entries for 512 KB of room.
    for batch in 0..20u64 {
        map.put_all((0..100u64).map(|i| (format!("k{batch}-{i}"), vec![7u8; 500])))
            .await
            .unwrap();
    }
    // Growing values evict too.
    for i in 0..20u64 {
        map.set(&format!("big{i}"), &vec![1u8; 1_500])
            .await
            .unwrap();
    }
    let stats: Vec<_> = cluster
        .live()
        .map(|g| g.map::<String, Vec<u8>>("heavy").local_stats())
        .collect();
    let mut evictions = 0;
    for s in &stats {
        assert!(
            s.owned_memory_bytes <= limit,
            "a member leads {} bytes of entries",
            s.owned_memory_bytes
        );
        assert!(s.owned_bytes < s.owned_memory_bytes);
        evictions += s.evictions;
    }
    let owned: u64 = stats.iter().map(|s| s.owned_entries).sum();
    assert!(evictions > 1000, "{evictions} evictions");
    assert_eq!(
        owned + evictions,
        2_020,
        "every entry is held or was evicted"
    );
    assert_eq!(
        map.get("big19").await.unwrap().map(|v| v.len()),
        Some(1_500),
        "the entry being written is never the one evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_idle_longer_than_max_idle_expire_and_read_ones_stay() {
    let cluster = with_map(
        2,
        "idle",
        MapConfig {
            max_idle: Some(Duration::from_millis(400)),
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let map: Map<String, u64> = cluster.grid(0).map("idle");
    map.set("read", &1).await.unwrap();
    map.set("ignored", &2).await.unwrap();
    // "read" is read every 100 ms, well within its idle limit; "ignored" never is.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            map.get("read").await.unwrap(),
            Some(1),
            "a read entry stays"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only "read" is left, on its primary and its backup.
    wait_for(
        "the idle entry to be swept from every replica",
        DEADLINE,
        || {
            let n = held(&cluster);
            async move { (n == 2).then_some(()) }
        },
    )
    .await;
    assert_eq!(map.get("ignored").await.unwrap(), None);
    assert_eq!(map.get("read").await.unwrap(), Some(1));
}

/// A member of `cluster` that is not the primary of `key` in map "loads"'s partition, by index.
fn not_primary_of(cluster: &Cluster, key: &str) -> Vec<usize> {
    let table = cluster.grid(0).partition_table();
    let p = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % 271) as usize;
    let primary = table.replicas[p][0];
    (0..cluster.slots.len())
        .filter(|&i| cluster.slots[i].grid.is_some())
        .filter(|&i| cluster.grid(i).local_member().id != primary)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_get_or_loads_on_three_members_run_the_loader_once() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let loads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..1000 {
        let map: Map<String, u64> = cluster.grid(i % 3).map("loads");
        let loads = loads.clone();
        callers.push(tokio::spawn(async move {
            map.get_or_load("hot", || async move {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(42)
            })
            .await
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), 42);
    }
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Stored like a set: a plain read sees it, and the next get_or_load does not load.
    let map: Map<String, u64> = cluster.grid(1).map("loads");
    assert_eq!(map.get("hot").await.unwrap(), Some(42));
    let again = map
        .get_or_load("hot", || async { Err::<u64, _>("must not run") })
        .await
        .unwrap();
    assert_eq!(again, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_reloads_a_hot_key_before_it_expires() {
    let ttl = Duration::from_millis(1000);
    let cluster = with_map(
        3,
        "fresh",
        MapConfig {
            ttl: Some(ttl),
            early_refresh: Some(Duration::from_millis(800)),
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let loads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Callers on every member read the key steadily for several lifetimes of the entry; every
    // reload returns the next number.
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let map: Map<String, u64> = cluster.grid(i).map("fresh");
            let loads = loads.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut calls = 0u64;
                let mut last = 0;
                while started.elapsed() < ttl * 4 {
                    let loads = loads.clone();
                    let value = map
                        .get_or_load("hot", || async move {
                            Ok::<_, std::io::Error>(
                                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
                            )
                        })
                        .await
                        .unwrap();
                    assert!(value >= last, "values go back: {last} then {value}");
                    last = value;
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for reader in readers {
        calls += reader.await.unwrap();
    }
    let loads = loads.load(std::sync::atomic::Ordering::SeqCst);
    let expirations: u64 = cluster
        .live()
        .map(|g| g.map::<String, u64>("fresh").local_stats().expirations)
        .sum();
    // Refreshed several times, one load per refresh, and never expired under steady reads.
    assert!(loads >= 4, "{loads} loads in {calls} calls");
    assert!(loads * 10 < calls, "{loads} loads in {calls} calls");
    assert_eq!(expirations, 0, "the hot key expired ({loads} loads)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_reaches_every_waiter_and_is_not_cached() {
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let mut callers = Vec::new();
    for i in 0..60 {
        let map: Map<String, u64> = cluster.grid(i % 3).map("loads");
        callers.push(tokio::spawn(async move {
            map.get_or_load("flaky", || async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err::<u64, _>("backend down")
            })
            .await
        }));
    }
    for caller in callers {
        match caller.await.unwrap() {
            Err(peergrid::Error::LoadFailed { message }) => assert_eq!(message, "backend down"),
            other => panic!("expected the loader's failure, got {other:?}"),
        }
    }
    let map: Map<String, u64> = cluster.grid(0).map("loads");
    assert_eq!(
        map.get("flaky").await.unwrap(),
        None,
        "a failure is not cached"
    );
    let value = map
        .get_or_load("flaky", || async { Ok::<_, std::io::Error>(7) })
        .await
        .unwrap();
    assert_eq!(value, 7, "the next call loads again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_whose_member_crashes_does_not_wedge_the_key() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let key = "orphaned";
    // The loader runs on a member that is not the key's primary, and never finishes.
    let doomed = not_primary_of(&cluster, key)[0];
    let map: Map<String, u64> = cluster.grid(doomed).map("loads");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let stuck = tokio::spawn(async move {
        map.get_or_load(key, || async move {
            let _ = started_tx.send(());
            std::future::pending::<std::result::Result<u64, std::io::Error>>().await
        })
        .await
    });
    started_rx.await.expect("the doomed member got the load");
    // Callers on the other members wait for it...
    let mut waiters = Vec::new();
    for i in (0..3).filter(|&i| i != doomed) {
        let map: Map<String, u64> = cluster.grid(i).map("loads");
        waiters.push(tokio::spawn(async move {
            map.get_or_load(key, || async { Ok::<_, std::io::Error>(99) })
                .await
        }));
    }
    // Every get_or_load asks the primary first (a read there): wait until both waiters have.
    wait_for("both waiters to reach the primary", DEADLINE, || {
        let gets: u64 = cluster
            .live()
            .map(|g| g.map::<String, u64>("loads").local_stats().gets)
            .sum();
        async move { (gets >= 3).then_some(()) }
    })
    .await;
    // ...until its member crashes: one of them loads instead, and all get that value.
    cluster.crash(doomed);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), 99);
    }
    stuck.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_sees_every_change_in_order_per_key_from_every_primary() {
    use peergrid::EntryEventKind::{Added, Expired, Removed, Updated};
    let cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let mut events = cluster
        .grid(0)
        .map::<String, u64>("watched")
        .listen(true)
        .await;
    let map: Map<String, u64> = cluster.grid(1).map("watched");
    for i in 0..30u64 {
        let key = format!("k{i}");
        map.set(&key, &1).await.unwrap();
        map.set(&key, &2).await.unwrap();
        map.remove(&key).await.unwrap();
    }
    map.set_with_ttl("brief", &5, Duration::from_millis(50))
        .await
        .unwrap();
    // Another map's changes are not this listener's.
    cluster
        .grid(2)
        .map::<String, u64>("other")
        .set("k0", &9)
        .await
        .unwrap();
    let mut seen: std::collections::HashMap<String, Vec<(peergrid::EntryEventKind, Option<u64>)>> =
        std::collections::HashMap::new();
    let expected_events = 30 * 3 + 2;
    let mut count = 0;
    tokio::time::timeout(DEADLINE, async {
        while count < expected_events {
            if count == 90 + 1 {
                // "brief" was added; reading it once it expired removes it.
                while map.get("brief").await.unwrap().is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let event = events.recv().await.expect("stream open");
            seen.entry(event.key.clone())
                .or_default()
                .push((event.kind, event.value));
            count += 1;
        }
    })
    .await
    .expect("every event arrives");
    for i in 0..30u64 {
        assert_eq!(
            seen[&format!("k{i}")],
            vec![(Added, Some(1)), (Updated, Some(2)), (Removed, Some(2))],
            "key k{i}"
        );
    }
    assert_eq!(seen["brief"], vec![(Added, Some(5)), (Expired, Some(5))]);
    assert_eq!(seen.len(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_sees_evictions() {
    use peergrid::EntryEventKind::{Added, Evicted};
    let cluster = with_map(
        2,
        "tiny",
        MapConfig {
            eviction: peergrid::EvictionConfig {
                policy: peergrid::EvictionPolicy::Lru,
                max_entries_per_member: Some(1),
                ..Default::default()
            },
            ..MapConfig::default()
        },
    )
    .await;
    cluster.wait_table_settled().await;
    let mut events = cluster
        .grid(1)
        .map::<String, u64>("tiny")
        .listen(false)
        .await;
    let map: Map<String, u64> = cluster.grid(0).map("tiny");
    // One partition (a hash tag) may hold one entry: the second write evicts the first.
    map.set("{t}a", &1).await.unwrap();
    map.set("{t}b", &2).await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < 3 {
            let event = events.recv().await.expect("stream open");
            seen.push((event.kind, event.key, event.value));
        }
    })
    .await
    .expect("every event arrives");
    assert_eq!(
        seen,
        vec![
            (Added, "{t}a".to_string(), None),
            (Added, "{t}b".to_string(), None),
            (Evicted, "{t}a".to_string(), None),
        ]
    );
    assert_eq!(map.get("{t}a").await.unwrap(), None);
    assert_eq!(
        map.local_stats().evictions
            + cluster
                .grid(1)
                .map::<String, u64>("tiny")
                .local_stats()
                .evictions,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_keeps_per_key_order_across_a_failover_and_hears_the_new_primary() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let mut events = cluster
        .grid(1)
        .map::<String, u64>("watched")
        .listen(true)
        .await;
    let victim = cluster.grid(0).local_member().id;
    let map: Map<String, u64> = cluster.grid(2).map("watched");
    let keys: Vec<String> = (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| map.owner(k).unwrap() == Some(victim))
        .take(10)
        .collect();
    // Rounds 1-10 on the first primary, then it crashes, then rounds 11-20 on the new one.
    let write_round = |round: u64| {
        let (map, keys) = (map.clone(), keys.clone());
        async move {
            for k in &keys {
                wait_for("a write to go through", DEADLINE, || {
                    let map = map.clone();
                    async move { map.set(k, &round).await.ok() }
                })
                .await;
            }
        }
    };
    for round in 1..=10 {
        write_round(round).await;
    }
    cluster.crash(0);
    for round in 11..=20 {
        write_round(round).await;
    }
    // Every key's events come in the order of its writes; events the crashed primary had not
    // delivered may be missing (at most once), but the new primary's all arrive.
    let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    tokio::time::timeout(DEADLINE, async {
        while last.len() < keys.len() || last.values().any(|&v| v < 20) {
            let event = events.recv().await.expect("stream open");
            let value = event.value.expect("values asked for");
            let previous = last.insert(event.key.clone(), value).unwrap_or(0);
            // Equal: a write retried after the failover, applied twice.
            assert!(value >= previous, "{}: {value} after {previous}", event.key);
        }
    })
    .await
    .expect("the new primary's events arrive");
}
