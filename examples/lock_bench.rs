//! Lock benchmark: uncontended lock+unlock pairs with the lock local and remote, and the
//! handoff latency between two members contending for one lock, against the bare rpc round
//! trip, in one run.
//!
//! ```sh
//! cargo run --release --example lock_bench            # full run
//! cargo run --release --example lock_bench -- quick   # a few seconds (CI smoke test)
//! ```
//!
//! Two members in this process over loopback, backup count 1 (every grant and release is on
//! the backup before it returns). Nothing here asserts on time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use peergrid::{Grid, GridConfig, Lock};
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "quick");
    let (pairs, handoffs) = if quick { (200, 50) } else { (5000, 2000) };
    let name = format!("lock-bench-{}", std::process::id());
    let a = Grid::join(GridConfig {
        cluster_name: name.clone(),
        ..GridConfig::ephemeral()
    })
    .await?;
    let b = Grid::join(GridConfig {
        cluster_name: name,
        seeds: vec![a.local_member().gossip_addr],
        ..GridConfig::ephemeral()
    })
    .await?;
    a.wait_safe(Duration::from_secs(60)).await?;
    let (ida, idb) = (a.local_member().id, b.local_member().id);
    // A lock each member leads.
    let led_by = |member| {
        (0..)
            .map(|i| format!("lock{i}"))
            .find(|n| a.lock(n).owner() == Some(member))
            .expect("some name")
    };
    let local = a.lock(&led_by(ida));
    let remote = a.lock(&led_by(idb));

    let mut rows = Vec::new();
    for (label, lock) in [("local", &local), ("remote", &remote)] {
        let started = Instant::now();
        for _ in 0..pairs {
            lock.lock().await?.unlock().await?;
        }
        rows.push((label, pairs as f64 / started.elapsed().as_secs_f64()));
    }
    let payload = Bytes::from_static(b"lock");
    let started = Instant::now();
    for _ in 0..pairs {
        a.echo(idb, payload.clone()).await?;
    }
    let echo_rate = pairs as f64 / started.elapsed().as_secs_f64();

    // Handoff under contention: one task on each member locks, holds briefly, unlocks, and
    // asks again; FIFO makes them alternate. A handoff is the time from the start of one
    // member's unlock to the grant on the other member. The lock is led by member a.
    let contended = led_by(ida);
    let last_unlock: Arc<Mutex<Option<(usize, Instant)>>> = Arc::new(Mutex::new(None));
    let samples: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (side, grid) in [a.clone(), b.clone()].into_iter().enumerate() {
        let lock: Lock = grid.lock(&contended);
        let last_unlock = last_unlock.clone();
        let samples = samples.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if samples.lock().unwrap().len() >= handoffs {
                    return Ok::<(), peergrid::Error>(());
                }
                let guard = lock.lock().await?;
                let granted = Instant::now();
                if let Some((from, at)) = *last_unlock.lock().unwrap()
                    && from != side
                {
                    samples
                        .lock()
                        .unwrap()
                        .push(granted.saturating_duration_since(at));
                }
                // Hold it briefly, so the other side is queued when it is released.
                tokio::time::sleep(Duration::from_micros(200)).await;
                *last_unlock.lock().unwrap() = Some((side, Instant::now()));
                guard.unlock().await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut latencies = samples.lock().unwrap().clone();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;

    println!(
        "peergrid lock benchmark: 2 members in one process, loopback, backup count 1, uncontended pairs from member a\n"
    );
    println!("| workload | rate |");
    println!("|---|---:|");
    for (label, rate) in &rows {
        println!("| lock+unlock pairs, lock {label} | {rate:.0} pairs/s |");
    }
    println!("| echo (bare rpc round trip) | {echo_rate:.0} calls/s |");
    println!(
        "\nhandoff between members under contention (lock led by a), {} handoffs: p50 {:.1} µs, p99 {:.1} µs",
        latencies.len(),
        at(0.5),
        at(0.99)
    );
    println!("\nratios");
    println!(
        "  local / remote lock+unlock pairs: {:.1}",
        rows[0].1 / rows[1].1
    );
    println!(
        "  remote pair / echo (2 round trips and 2 backup writes per pair): {:.2}",
        rows[1].1 / echo_rate
    );
    a.leave().await?;
    b.leave().await?;
    Ok(())
}
