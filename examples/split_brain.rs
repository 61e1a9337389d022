//! Split-brain benchmark: how fast a healed network split becomes one safe cluster again.
//!
//! ```sh
//! cargo run --release --example split_brain              # 100,000 entries of 100 B
//! cargo run --release --example split_brain -- 20000     # another entry count
//! cargo run --release --example split_brain -- quick     # 5,000 entries (CI smoke test)
//! ```
//!
//! Five members in this process over real loopback sockets (backup count 1) are loaded with
//! acknowledged `put_all` batches, then split 2 | 3 with the fault switch; the minority holds
//! the oldest member (the coordinator before the split). Each side writes 1% more entries of
//! its own. Then the split heals, and reported are the times from the heal until:
//!
//! 1. every member sees all five (one cluster);
//! 2. the minority merged: its members rejoined and handed their entries to the majority's
//!    primaries through the merge policy (`PutIfAbsent`);
//! 3. `is_safe()`: one table, no migration left, every backup in sync.
//!
//! The baseline, in the same run: two fresh members joining a three-member cluster with the
//! same data, until `is_safe()` (the migrations a merge cannot avoid). Every entry acknowledged
//! on either side is then read back. Nothing here asserts on time.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use peergrid::{FaultSwitch, Grid, GridConfig, Map};
use tokio::time::Instant;

const VALUE_SIZE: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Quiet unless RUST_LOG says otherwise: each side of the split reports the partitions it
    // has no replica of, as it should.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let entries: usize = match std::env::args().nth(1).as_deref() {
        Some("quick") => 5_000,
        Some(n) => n.parse()?,
        None => 100_000,
    };
    println!(
        "peergrid split-brain benchmark: 5 members split 2 | 3, {entries} entries of {VALUE_SIZE} B, backup count 1\n"
    );

    // Baseline: 3 members with the data, then 2 fresh members join.
    let (mut baseline_grids, base) = start(3, "baseline").await?;
    load(&baseline_grids[0], "data", 0, entries).await?;
    baseline_grids[0]
        .wait_safe(Duration::from_secs(120))
        .await?;
    let joined = Instant::now();
    let seed = baseline_grids[0].local_member().gossip_addr;
    for _ in 0..2 {
        baseline_grids.push(
            Grid::join(GridConfig {
                seeds: vec![seed],
                ..base.clone()
            })
            .await?,
        );
    }
    baseline_grids[0]
        .wait_safe(Duration::from_secs(300))
        .await?;
    let baseline = joined.elapsed();
    for grid in baseline_grids {
        grid.leave().await?;
    }

    // The split.
    let (grids, base) = start(5, "split").await?;
    load(&grids[2], "data", 0, entries).await?;
    grids[0].wait_safe(Duration::from_secs(120)).await?;
    let addr = |i: usize| grids[i].local_member().gossip_addr;
    let minority = [addr(0), addr(1)];
    let majority = [addr(2), addr(3), addr(4)];
    let switch = base.fault_switch.clone().expect("the cluster has a switch");
    let cut = Instant::now();
    switch.split(&minority, &majority);
    wait(
        "each side to see only itself",
        Duration::from_secs(60),
        || {
            grids[..2].iter().all(|g| g.members().len() == 2)
                && grids[2..].iter().all(|g| g.members().len() == 3)
        },
    )
    .await;
    let detected = cut.elapsed();
    let extra = (entries / 100).max(10);
    // Each side writes entries of its own (retried while it promotes its backups).
    load(&grids[0], "minority", 0, extra).await?;
    load(&grids[3], "majority", 0, extra).await?;
    grids[3].wait_safe(Duration::from_secs(120)).await?;

    let healed = Instant::now();
    switch.heal_all();
    wait("one cluster of 5", Duration::from_secs(120), || {
        grids.iter().all(|g| g.members().len() == 5)
    })
    .await;
    let one_cluster = healed.elapsed();
    wait(
        "the minority to hand over",
        Duration::from_secs(300),
        || {
            grids[..2].iter().all(|g| {
                let s = g.split_brain_stats();
                s.merges >= 1 && s.pending == 0
            })
        },
    )
    .await;
    let merged = healed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let tables: Vec<_> = grids.iter().map(|g| g.partition_table()).collect();
        if tables.windows(2).all(|w| w[0] == w[1]) && grids[2].is_safe().await.unwrap_or(false) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the healed cluster did not become safe".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let safe = healed.elapsed();
    let handed: u64 = grids[..2]
        .iter()
        .map(|g| g.split_brain_stats().entries_merged)
        .sum();

    // Every acknowledged entry, read through a member of the former minority.
    let mut missing = 0;
    for (map, count) in [("data", entries), ("minority", extra), ("majority", extra)] {
        let handle: Map<String, Bytes> = grids[1].map(map);
        for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|i| format!("k{i}")).collect();
            let got = handle.get_all(&keys).await?;
            missing += keys.len() - got.len();
        }
    }

    println!(
        "split detected by both sides      {:>9.2} s",
        detected.as_secs_f64()
    );
    println!(
        "heal -> one cluster of 5          {:>9.2} s",
        one_cluster.as_secs_f64()
    );
    println!(
        "heal -> minority merged           {:>9.2} s  ({handed} entries handed over)",
        merged.as_secs_f64()
    );
    println!(
        "heal -> is_safe                   {:>9.2} s",
        safe.as_secs_f64()
    );
    println!(
        "baseline: 2 members join -> safe  {:>9.2} s",
        baseline.as_secs_f64()
    );
    println!(
        "ratio heal->safe / join->safe     {:>9.2}",
        safe.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "acknowledged entries missing      {missing:>9} of {}",
        entries + 2 * extra
    );
    for grid in grids {
        grid.leave().await?;
    }
    if missing > 0 {
        return Err(format!("{missing} acknowledged entries missing").into());
    }
    Ok(())
}

async fn start(
    n: usize,
    label: &str,
) -> Result<(Vec<Grid>, GridConfig), Box<dyn std::error::Error>> {
    let base = GridConfig {
        cluster_name: format!("split-brain-{label}-{}", std::process::id()),
        backup_count: 1,
        fault_switch: Some(FaultSwitch::new()),
        ..GridConfig::ephemeral()
    };
    let mut grids = vec![Grid::join(base.clone()).await?];
    let seed = grids[0].local_member().gossip_addr;
    for _ in 1..n {
        grids.push(
            Grid::join(GridConfig {
                seeds: vec![seed],
                ..base.clone()
            })
            .await?,
        );
    }
    wait("the members to converge", Duration::from_secs(60), || {
        grids.iter().all(|g| g.members().len() == n)
    })
    .await;
    Ok((grids, base))
}

/// Writes entries `from..from + count` in batches of 1,000; a batch that fails (a side just
/// split still promoting its backups, or a backup that did not confirm a write while partitions
/// move) is sent again, for up to a minute: the same values, so a batch applied twice is no
/// different.
async fn load(grid: &Grid, map: &str, from: usize, count: usize) -> peergrid::Result<()> {
    let handle: Map<String, Bytes> = grid.map(map);
    let value = Bytes::from(vec![7u8; VALUE_SIZE]);
    for chunk in (from..from + count).collect::<Vec<_>>().chunks(1000) {
        let batch: HashMap<String, Bytes> = chunk
            .iter()
            .map(|i| (format!("k{i}"), value.clone()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match handle.put_all(batch.clone()).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}

async fn wait(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
