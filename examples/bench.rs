//! Map benchmark: local and remote get/put against the bare rpc round trip, in one run.
//!
//! ```sh
//! cargo run --release --example bench            # full run
//! cargo run --release --example bench -- quick   # a few seconds (CI smoke test)
//! ```
//!
//! Two members in this process over real loopback sockets, backup count 1, 100-byte values; member
//! a also keeps a near cache of a copy of the remote keys. A copy of the remote keys is also in a
//! map with split-brain protection on reads, whose reads wait for writes in flight to the
//! backups: measured alone, and with 8 tasks writing to the same keys meanwhile.
//! Every figure is measured in rounds that interleave the systems under test, and the report
//! gives the median over rounds. The echo is the member-to-member gRPC path with no map work:
//! the floor a remote operation cannot beat. Nothing here asserts on time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peergrid::{Grid, GridConfig, Map, MapConfig, NearCacheConfig, SplitBrainProtection};
use support::median;
use tokio::time::Instant;

const VALUE: [u8; 100] = [7; 100];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, sequential, concurrent_for) = if quick {
        (1, 300, Duration::from_millis(300))
    } else {
        (5, 4000, Duration::from_secs(2))
    };
    let name = format!("bench-{}", std::process::id());
    // Member a keeps a near cache of "bench-near" (the same data as "bench").
    let near = MapConfig {
        near_cache: Some(NearCacheConfig::default()),
        ..MapConfig::default()
    };
    // "bench-guarded": split-brain protection (2 members) on both members.
    let guarded = (
        "bench-guarded".to_string(),
        MapConfig {
            split_brain_protection: Some(SplitBrainProtection::new(2)),
            ..MapConfig::default()
        },
    );
    let a = Grid::join(GridConfig {
        cluster_name: name.clone(),
        maps: vec![("bench-near".to_string(), near), guarded.clone()],
        ..GridConfig::ephemeral()
    })
    .await?;
    let b = Grid::join(GridConfig {
        cluster_name: name,
        seeds: vec![a.local_member().gossip_addr],
        maps: vec![guarded],
        ..GridConfig::ephemeral()
    })
    .await?;
    let (ida, idb) = (a.local_member().id, b.local_member().id);
    wait_settled(&a, &b).await;
    // Every migration done: keys stay where they are classified below.
    a.wait_safe(Duration::from_secs(60)).await?;

    let map: Map<String, Bytes> = a.map("bench");
    let value = Bytes::from_static(&VALUE);
    let table = a.partition_table();
    let primary = |key: &str| {
        let p = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % table.replicas.len() as u64;
        table.replicas[p as usize][0]
    };
    let keys: Vec<String> = (0..20_000).map(|i| format!("key:{i}")).collect();
    let local: Arc<Vec<String>> = Arc::new(
        keys.iter()
            .filter(|k| primary(k) == ida)
            .take(2000)
            .cloned()
            .collect(),
    );
    let remote: Arc<Vec<String>> = Arc::new(
        keys.iter()
            .filter(|k| primary(k) == idb)
            .take(2000)
            .cloned()
            .collect(),
    );
    map.put_all(
        local
            .iter()
            .chain(remote.iter())
            .map(|k| (k.clone(), value.clone())),
    )
    .await?;
    let guarded_map: Map<String, Bytes> = a.map("bench-guarded");
    // Protection counts a member once its heartbeats say it follows the same coordinator.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = guarded_map
        .put_all(remote.iter().map(|k| (k.clone(), value.clone())))
        .await
    {
        if !matches!(e, peergrid::Error::QuorumNotPresent { .. }) || Instant::now() > deadline {
            return Err(e.into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let near_map: Map<String, Bytes> = a.map("bench-near");
    near_map
        .put_all(remote.iter().map(|k| (k.clone(), value.clone())))
        .await?;
    // Read until every remote key is a near-cache hit (the invalidation streams open first).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = near_map.local_stats().near_cache_hits;
        for k in remote.iter() {
            near_map.get(k).await?;
        }
        if near_map.local_stats().near_cache_hits - before == remote.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the near cache did not fill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut rows: Vec<(&str, Vec<Stats>)> = vec![
        ("local get", vec![]),
        ("local set (1 sync backup)", vec![]),
        ("remote get", vec![]),
        ("remote set (1 sync backup)", vec![]),
        ("echo (bare rpc round trip)", vec![]),
        ("near-cache get (remote key, cached)", vec![]),
    ];
    let mut throughput: Vec<(&str, Vec<f64>)> = vec![
        ("remote get, 64 tasks", vec![]),
        ("echo, 64 tasks", vec![]),
        ("local get, 64 tasks", vec![]),
        ("remote get, 64 tasks, guarded map", vec![]),
        ("remote get, 64 tasks, 8 tasks writing", vec![]),
        ("remote get, 64 tasks, 8 tasks writing, guarded map", vec![]),
    ];
    for _ in 0..rounds {
        rows[0].1.push(
            sequential_run(sequential, &local, |k| {
                let m = map.clone();
                async move { m.get(&k).await.map(|_| ()) }
            })
            .await?,
        );
        rows[1].1.push(
            sequential_run(sequential, &local, |k| {
                let (m, v) = (map.clone(), value.clone());
                async move { m.set(&k, &v).await }
            })
            .await?,
        );
        rows[2].1.push(
            sequential_run(sequential, &remote, |k| {
                let m = map.clone();
                async move { m.get(&k).await.map(|_| ()) }
            })
            .await?,
        );
        rows[3].1.push(
            sequential_run(sequential, &remote, |k| {
                let (m, v) = (map.clone(), value.clone());
                async move { m.set(&k, &v).await }
            })
            .await?,
        );
        rows[4].1.push(
            sequential_run(sequential, &remote, |_| {
                let (g, v) = (a.clone(), value.clone());
                async move { g.echo(idb, v).await.map(|_| ()) }
            })
            .await?,
        );
        rows[5].1.push(
            sequential_run(sequential, &remote, |k| {
                let m = near_map.clone();
                async move { m.get(&k).await.map(|_| ()) }
            })
            .await?,
        );
        throughput[0]
            .1
            .push(support::gets_per_sec(64, concurrent_for, &map, &remote).await?);
        let echo = (a.clone(), value.clone());
        throughput[1].1.push(
            support::ops_per_sec(
                64,
                concurrent_for,
                echo,
                move |(grid, payload), _| async move {
                    let result = grid.echo(idb, payload.clone()).await.map(|_| ());
                    ((grid, payload), result)
                },
            )
            .await?,
        );
        throughput[2]
            .1
            .push(support::gets_per_sec(64, concurrent_for, &map, &local).await?);
        throughput[3]
            .1
            .push(support::gets_per_sec(64, concurrent_for, &guarded_map, &remote).await?);
        for (row, target) in [(4, &map), (5, &guarded_map)] {
            let writers = writing(target, &remote, &value, 8);
            throughput[row]
                .1
                .push(support::gets_per_sec(64, concurrent_for, target, &remote).await?);
            writers.cancel();
        }
    }

    println!(
        "peergrid map benchmark: 2 members in one process, loopback, 100-byte values, backup count 1"
    );
    println!("median of {rounds} interleaved round(s), {sequential} sequential ops per figure\n");
    println!("| operation | ops/s | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    // Sub-microsecond figures need two decimals.
    let mut medians = Vec::new();
    for (label, runs) in &rows {
        let m = Stats::median(runs);
        println!(
            "| {label} | {:.0} | {:.2} | {:.2} |",
            m.ops_per_sec, m.p50_us, m.p99_us
        );
        medians.push(m);
    }
    println!("\n| concurrent workload | ops/s |");
    println!("|---|---:|");
    let mut tput = Vec::new();
    for (label, runs) in &throughput {
        let m = median(runs);
        println!("| {label} | {m:.0} |");
        tput.push(m);
    }
    println!("\nratios");
    println!(
        "  remote get p50 / echo p50:         {:.2}  (target at most 1.20)",
        medians[2].p50_us / medians[4].p50_us
    );
    println!(
        "  remote set p50 / echo p50:         {:.2}",
        medians[3].p50_us / medians[4].p50_us
    );
    println!(
        "  remote get ops/s / echo ops/s (64): {:.2}",
        tput[0] / tput[1]
    );
    println!(
        "  local get ops/s / remote get ops/s: {:.1}",
        medians[0].ops_per_sec / medians[2].ops_per_sec
    );
    println!(
        "  remote get p50 / near-cache hit p50: {:.0}  (target at least 50)",
        medians[2].p50_us / medians[5].p50_us
    );
    println!(
        "  guarded / unguarded remote get ops/s (64):          {:.2}",
        tput[3] / tput[0]
    );
    println!(
        "  the same while 8 tasks write (reads wait for them): {:.2}",
        tput[5] / tput[4]
    );
    let near_stats = near_map.local_stats();
    println!(
        "  near-cache hit ratio over the run:  {:.3} ({} hits, {} misses)",
        near_stats.near_cache_hit_ratio().unwrap_or(0.0),
        near_stats.near_cache_hits,
        near_stats.near_cache_misses
    );
    Ok(())
}

/// Starts `tasks` tasks setting `keys` of `map` in turn until the returned token is cancelled.
fn writing(
    map: &Map<String, Bytes>,
    keys: &Arc<Vec<String>>,
    value: &Bytes,
    tasks: usize,
) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    for t in 0..tasks {
        let (map, keys, value, stop) = (map.clone(), keys.clone(), value.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = t;
            while !stop.is_cancelled() {
                let _ = map.set(&keys[i % keys.len()], &value).await;
                i += tasks;
            }
        });
    }
    stop
}

async fn wait_settled(a: &Grid, b: &Grid) {
    let (ida, idb) = (a.local_member().id, b.local_member().id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ta, tb) = (a.partition_table(), b.partition_table());
        if ta == tb
            && [ida, idb]
                .iter()
                .all(|m| ta.replicas.iter().any(|r| r[0] == *m))
        {
            return;
        }
        assert!(Instant::now() < deadline, "cluster did not settle");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Clone, Copy, Default)]
struct Stats {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Stats {
    fn median(runs: &[Stats]) -> Stats {
        Stats {
            ops_per_sec: median(&runs.iter().map(|s| s.ops_per_sec).collect::<Vec<_>>()),
            p50_us: median(&runs.iter().map(|s| s.p50_us).collect::<Vec<_>>()),
            p99_us: median(&runs.iter().map(|s| s.p99_us).collect::<Vec<_>>()),
        }
    }
}

async fn sequential_run<F, Fut>(ops: usize, keys: &[String], op: F) -> peergrid::Result<Stats>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = peergrid::Result<()>>,
{
    let mut latencies = Vec::with_capacity(ops);
    let start = Instant::now();
    for i in 0..ops {
        let key = keys[i % keys.len()].clone();
        let t = Instant::now();
        op(key).await?;
        latencies.push(t.elapsed());
    }
    let total = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok(Stats {
        ops_per_sec: ops as f64 / total.as_secs_f64(),
        p50_us: at(0.5),
        p99_us: at(0.99),
    })
}
