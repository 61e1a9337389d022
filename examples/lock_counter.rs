//! A counter shared by several OS processes, incremented under peergrid's fenced lock.
//!
//! ```sh
//! cargo run --example lock_counter            # 4 processes x 200 increments
//! cargo run --example lock_counter -- quick   # 3 processes x 20 (CI)
//! ```
//!
//! Each process embeds a member. Under the lock `counter`, each reads the map entry `counter`,
//! writes it back plus one, and notes the lock's fence; the demo then checks the two promises:
//! no increment is lost (the final value is processes x increments) and fences only grow (in
//! the order the increments happened, across all processes, every fence is larger than the one
//! before). It exits non-zero when either fails.
//!
//! `cargo run --example lock_counter -- worker N M` is one process: it joins (seeded by
//! `PEERGRID_SEEDS`), waits for N members, makes M increments, printing `op VALUE FENCE` for
//! each, waits until the counter reaches its final value, prints `final VALUE`, and leaves
//! when its standard input closes.

mod support;

use std::time::Duration;

use peergrid::GridConfig;
use support::{BoxError, mark, next, spawn_worker, wait};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("worker") => {
            let n = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .ok_or("worker N M")?;
            let m = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .ok_or("worker N M")?;
            worker(n, m).await
        }
        Some("quick") => demo(3, 20).await,
        None => demo(4, 200).await,
        Some(other) => {
            Err(format!("unknown argument {other:?}: use nothing, quick or worker").into())
        }
    }
}

async fn worker(members: usize, increments: u64) -> Result<(), BoxError> {
    let grid = support::join(GridConfig::from_env()?, members).await?;
    let lock = grid.lock("counter");
    let map = grid.map::<String, u64>("counter");
    for _ in 0..increments {
        let guard = lock.lock().await?;
        let value = map.get("counter").await?.unwrap_or(0) + 1;
        map.set("counter", &value).await?;
        let fence = guard.fence();
        guard.unlock().await?;
        println!("op {value} {fence}");
    }
    let expected = members as u64 * increments;
    wait(Duration::from_secs(60), "the other processes", || {
        let map = map.clone();
        async move { map.get("counter").await.ok().flatten() == Some(expected) }
    })
    .await?;
    println!("final {}", map.get("counter").await?.unwrap_or(0));
    support::until_stdin_closes().await;
    grid.leave().await?;
    Ok(())
}

async fn demo(processes: usize, increments: u64) -> Result<(), BoxError> {
    println!("lock counter: {processes} processes x {increments} increments under one fenced lock");
    let cluster = format!("lock-counter-{}", std::process::id());
    let (tx, mut lines) = mpsc::unbounded_channel::<(usize, String)>();
    let start = Instant::now();
    // The first process on an ephemeral port; the others seeded with it.
    let args = [
        "worker".to_string(),
        processes.to_string(),
        increments.to_string(),
    ];
    let mut children = vec![spawn_worker(0, &args, &cluster, None, &tx)?];
    let seed = support::first_seed(&mut lines).await?;
    for i in 1..processes {
        children.push(spawn_worker(i, &args, &cluster, Some(&seed), &tx)?);
    }
    let mut ops: Vec<(u64, u64, usize)> = Vec::new();
    let mut finals = Vec::new();
    while finals.len() < processes {
        let (i, line) = next(&mut lines).await?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("op") => {
                let value = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or("bad op line")?;
                let fence = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or("bad op line")?;
                ops.push((value, fence, i));
            }
            Some("final") => finals.push(
                words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or("bad final line")?,
            ),
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    // Closing standard input makes every process leave.
    support::finish(&mut children).await;

    let expected = processes as u64 * increments;
    ops.sort();
    let values_distinct = ops.windows(2).all(|w| w[0].0 < w[1].0);
    let fences_grow = ops.windows(2).all(|w| w[0].1 < w[1].1);
    let all_final = finals.iter().all(|v| *v == expected);
    println!();
    println!("summary");
    println!(
        "  final counter:  {} (expected {expected}) {}",
        finals.first().copied().unwrap_or(0),
        mark(all_final && ops.len() as u64 == expected && values_distinct)
    );
    println!(
        "  increments:     {} acknowledged, each value written once {}",
        ops.len(),
        mark(values_distinct)
    );
    println!(
        "  fences:         {} to {}, strictly growing in the order of the increments {}",
        ops.first().map_or(0, |o| o.1),
        ops.last().map_or(0, |o| o.1),
        mark(fences_grow)
    );
    println!(
        "  per process:    {}",
        (0..processes)
            .map(|i| format!("{}", ops.iter().filter(|o| o.2 == i).count()))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    println!("  time:           {:.2} s", elapsed.as_secs_f64());
    if all_final && values_distinct && fences_grow && ops.len() as u64 == expected {
        Ok(())
    } else {
        Err("the lock counter lost an increment or a fence went backwards".into())
    }
}
