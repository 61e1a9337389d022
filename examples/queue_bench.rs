//! Queue benchmark: offer+poll with the queue local and remote, and the blocking handoff
//! (a `take` waiting on one member, an `offer` from another), against the bare rpc round trip,
//! in one run.
//!
//! ```sh
//! cargo run --release --example queue_bench            # full run
//! cargo run --release --example queue_bench -- quick   # a few seconds (CI smoke test)
//! ```
//!
//! Two members in this process over loopback, backup count 1, 100-byte items. Nothing here
//! asserts on time.

use std::time::Duration;

use bytes::Bytes;
use peergrid::{Grid, GridConfig, Queue};
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "quick");
    let (pairs, handoffs) = if quick { (200, 50) } else { (5000, 1000) };
    let name = format!("queue-bench-{}", std::process::id());
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
    // A queue each member leads.
    let led_by = |member| {
        (0..)
            .map(|i| format!("q{i}"))
            .find(|n| a.queue::<Bytes>(n).owner() == Some(member))
            .expect("some name")
    };
    let local: Queue<Bytes> = a.queue(&led_by(ida));
    let remote: Queue<Bytes> = a.queue(&led_by(idb));
    let item = Bytes::from(vec![7u8; 100]);

    let mut rows = Vec::new();
    for (label, queue) in [("local", &local), ("remote", &remote)] {
        let started = Instant::now();
        for _ in 0..pairs {
            queue.offer(&item).await?;
            queue.poll().await?.expect("an item");
        }
        let elapsed = started.elapsed();
        rows.push((label, pairs as f64 / elapsed.as_secs_f64()));
    }
    let started = Instant::now();
    for _ in 0..pairs {
        a.echo(idb, item.clone()).await?;
    }
    let echo_rate = pairs as f64 / started.elapsed().as_secs_f64();

    // Handoff: a take waiting on member a for a queue b leads; b offers; the time from the
    // offer's start to the take's return.
    let handoff_queue = led_by(idb);
    let taker: Queue<Bytes> = a.queue(&handoff_queue);
    let giver: Queue<Bytes> = b.queue(&handoff_queue);
    let mut latencies = Vec::with_capacity(handoffs);
    for _ in 0..handoffs {
        let taker = taker.clone();
        let waiting = tokio::spawn(async move { taker.take().await.map(|_| Instant::now()) });
        // Give the take time to reach the primary and wait there.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let offered = Instant::now();
        giver.offer(&item).await?;
        let taken = waiting.await??;
        latencies.push(taken.saturating_duration_since(offered));
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;

    println!(
        "peergrid queue benchmark: 2 members in one process, loopback, 100-byte items, backup count 1\n"
    );
    println!("| workload | rate |");
    println!("|---|---:|");
    for (label, rate) in &rows {
        println!("| offer+poll pairs, queue {label} | {rate:.0} pairs/s |");
    }
    println!("| echo (bare rpc round trip) | {echo_rate:.0} calls/s |");
    println!(
        "\nblocking handoff (take waiting on a, offer on b, queue led by b), {handoffs} handoffs: p50 {:.1} µs, p99 {:.1} µs",
        at(0.5),
        at(0.99)
    );
    println!("\nratios");
    println!(
        "  local / remote offer+poll pairs:   {:.1}",
        rows[0].1 / rows[1].1
    );
    println!(
        "  remote pair / echo (2 round trips and 2 backup writes per pair): {:.2}",
        rows[1].1 / echo_rate
    );
    Ok(())
}
