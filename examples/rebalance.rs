//! Rebalance and failover benchmark: how fast and how cheaply the grid moves data.
//!
//! ```sh
//! cargo run --release --example rebalance               # 1,000,000 entries of 100 B
//! cargo run --release --example rebalance -- 200000     # another entry count
//! cargo run --release --example rebalance -- quick      # 20,000 entries (CI smoke test)
//! ```
//!
//! Three members in this process over real loopback sockets (backup count 1) are loaded with
//! acknowledged `put_all` batches. Then:
//!
//! 1. A fourth member joins. Reported: the time until the cluster is safe again (every move done,
//!    every backup in sync), the bytes copied and the rate, the partitions and entries that moved
//!    against the ideal 1/N, and the process's peak resident memory during the move against its
//!    size after the load.
//! 2. A member crashes (dropped without leaving). Reported: the time until every partition has a
//!    live primary again, and until the full backup count is restored.
//! 3. Every entry is read back.
//!
//! Every member lives in this one process, so memory figures are for all of them together. The
//! baselines are in the same run: the load's own rate, and the memory after the load. Nothing
//! here asserts on time.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use peergrid::{Grid, GridConfig, Map, MemberId, PartitionStats};
use tokio::time::Instant;

const VALUE_SIZE: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let arg = std::env::args().nth(1);
    let entries: usize = match arg.as_deref() {
        Some("quick") => 20_000,
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let name = format!("rebalance-{}", std::process::id());
    let config = |seeds: Vec<std::net::SocketAddr>| GridConfig {
        cluster_name: name.clone(),
        seeds,
        backup_count: 1,
        ..GridConfig::ephemeral()
    };
    let mut grids = vec![Grid::join(config(vec![])).await?];
    let seed = grids[0].local_member().gossip_addr;
    for _ in 0..2 {
        grids.push(Grid::join(config(vec![seed])).await?);
    }
    grids[0].wait_safe(Duration::from_secs(60)).await?;
    println!(
        "peergrid rebalance benchmark: {entries} entries of {VALUE_SIZE} B, 3 members + 1, backup count 1\n"
    );

    // Load.
    let rss_empty = memory().0;
    let started = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let map: Map<String, Bytes> = grids[w % 3].map("bench");
            tokio::spawn(async move {
                let value = Bytes::from(vec![b'v'; VALUE_SIZE]);
                let mut i = w;
                while i < entries {
                    let batch: Vec<(String, Bytes)> = (i..entries)
                        .step_by(8)
                        .take(500)
                        .map(|k| (key(k), value.clone()))
                        .collect();
                    i += 8 * batch.len();
                    map.put_all(batch).await?;
                }
                Ok::<_, peergrid::Error>(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    let load_time = started.elapsed();
    grids[0].wait_safe(Duration::from_secs(120)).await?;
    let payload = entries as f64 * (VALUE_SIZE + key(entries).len()) as f64;
    let load_rate = payload / load_time.as_secs_f64();
    let (rss_loaded, _) = memory();
    println!("load (8 writers, put_all of 500)");
    println!(
        "  {:.2} s, {:.0} entries/s, {:.1} MB/s of keys and values (the baseline rate)",
        load_time.as_secs_f64(),
        entries as f64 / load_time.as_secs_f64(),
        load_rate / 1e6
    );
    println!(
        "  resident memory: {:.0} MB empty, {:.0} MB loaded ({:.0} MB of keys and values, 2 replicas each)\n",
        rss_empty / 1e6,
        rss_loaded / 1e6,
        2.0 * payload / 1e6
    );

    // A fourth member joins.
    let before = grids[0].partition_table();
    let stats_before = totals(&grids);
    let hwm_reset = reset_peak_memory();
    let started = Instant::now();
    let sampled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn(sample_peak(sampled.clone()));
    grids.push(Grid::join(config(vec![seed])).await?);
    grids[0].wait_safe(Duration::from_secs(300)).await?;
    let rebalance_time = started.elapsed();
    sampler.abort();
    let sampled = sampled.load(std::sync::atomic::Ordering::Relaxed) as f64;
    // The kernel's high-water mark when it could be reset, else the highest 10 ms sample.
    let peak = if hwm_reset {
        memory().1.max(sampled)
    } else {
        sampled
    };
    let after = grids[0].partition_table();
    let moved = totals(&grids).since(&stats_before);
    let partitions = before.replicas.len();
    let primaries_moved = (0..partitions)
        .filter(|&p| before.replicas[p][0] != after.replicas[p][0])
        .count();
    let mut replicas_added = 0usize;
    let mut entries_copied = 0u64;
    for p in 0..partitions {
        let added = after.replicas[p]
            .iter()
            .filter(|m| !before.replicas[p].contains(m))
            .count();
        if added > 0 {
            let held = grids
                .iter()
                .find(|g| g.local_member().id == after.replicas[p][0])
                .and_then(|g| g.local_replica(p as u32))
                .map_or(0, |r| r.entries);
            replicas_added += added;
            entries_copied += held * added as u64;
        }
    }
    let copied = (moved.migration_bytes_received + moved.backup_snapshot_bytes_sent) as f64;
    println!("a 4th member joins (until safe: every move done, every backup in sync)");
    println!(
        "  {:.2} s; {:.1} MB copied at {:.1} MB/s ({:.2}x the load rate)",
        rebalance_time.as_secs_f64(),
        copied / 1e6,
        copied / rebalance_time.as_secs_f64() / 1e6,
        copied / rebalance_time.as_secs_f64() / load_rate
    );
    println!(
        "  primaries moved: {primaries_moved} of {partitions} = {:.3} (ideal 1/4 = 0.250)",
        primaries_moved as f64 / partitions as f64
    );
    println!(
        "  replicas copied: {replicas_added} of {} = {:.3}; entries copied: {entries_copied} of {} replicated = {:.3} (ideal 1/4 = 0.250)",
        2 * partitions,
        replicas_added as f64 / (2 * partitions) as f64,
        2 * entries,
        entries_copied as f64 / (2 * entries) as f64
    );
    println!(
        "  takeovers {}; of them pulled whole {:.1} MB (the rest found their copy current)",
        moved.migrations_finished,
        moved.migration_bytes_received as f64 / 1e6
    );
    println!(
        "  peak resident memory during the move: {:.0} MB ({:.2}x the {:.0} MB after the load)\n",
        peak / 1e6,
        peak / rss_loaded,
        rss_loaded / 1e6
    );

    // A member crashes.
    let victim = grids.remove(1);
    let victim_id = victim.local_member().id;
    let started = Instant::now();
    drop(victim);
    let survivors: BTreeSet<MemberId> = grids.iter().map(|g| g.local_member().id).collect();
    let mut detected = None;
    loop {
        if detected.is_none()
            && grids
                .iter()
                .all(|g| !g.members().iter().any(|m| m.id == victim_id))
        {
            detected = Some(started.elapsed());
        }
        let table = grids[0].partition_table();
        let all_led = grids.iter().all(|g| g.partition_table() == table)
            && table
                .replicas
                .iter()
                .all(|r| r.first().is_some_and(|m| survivors.contains(m)));
        if all_led {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let primaries_back = started.elapsed();
    grids[0].wait_safe(Duration::from_secs(300)).await?;
    let backups_back = started.elapsed();
    println!("a member crashes (no leave)");
    println!(
        "  declared down after {:.2} s (failure detection)",
        detected.unwrap_or(primaries_back).as_secs_f64()
    );
    println!(
        "  every partition led by a live member after {:.2} s ({:.0} ms after detection)",
        primaries_back.as_secs_f64(),
        (primaries_back - detected.unwrap_or(primaries_back)).as_secs_f64() * 1e3
    );
    println!(
        "  full backup count restored after {:.2} s\n",
        backups_back.as_secs_f64()
    );

    // Every entry is still there.
    let map: Map<String, Bytes> = grids[0].map("bench");
    let mut present = 0usize;
    for chunk in (0..entries).collect::<Vec<_>>().chunks(2000) {
        let keys: Vec<String> = chunk.iter().map(|&i| key(i)).collect();
        present += map.get_all(&keys).await?.len();
    }
    println!("read back: {present} of {entries} entries present");
    for grid in grids {
        grid.leave().await?;
    }
    if present != entries {
        return Err(format!("{} entries lost", entries - present).into());
    }
    Ok(())
}

fn key(i: usize) -> String {
    format!("key:{i:08}")
}

/// Migration counters summed over members.
#[derive(Default)]
struct Totals {
    migrations_finished: u64,
    migration_bytes_received: u64,
    backup_snapshot_bytes_sent: u64,
}

impl Totals {
    fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            migrations_finished: self.migrations_finished - earlier.migrations_finished,
            migration_bytes_received: self.migration_bytes_received
                - earlier.migration_bytes_received,
            backup_snapshot_bytes_sent: self.backup_snapshot_bytes_sent
                - earlier.backup_snapshot_bytes_sent,
        }
    }
}

fn totals(grids: &[Grid]) -> Totals {
    let mut t = Totals::default();
    for g in grids {
        let s: PartitionStats = g.partition_stats();
        t.migrations_finished += s.migrations_finished;
        t.migration_bytes_received += s.migration_bytes_received;
        t.backup_snapshot_bytes_sent += s.backup_snapshot_bytes_sent;
    }
    t
}

/// (VmRSS, VmHWM) of this process in bytes, from /proc (zeros elsewhere).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb * 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets VmHWM to the current size (Linux: `5` into clear_refs); whether it could.
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Records the highest resident size seen every 10 ms into `peak`.
async fn sample_peak(peak: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    loop {
        peak.fetch_max(memory().0 as u64, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
