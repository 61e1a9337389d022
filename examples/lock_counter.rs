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

use std::process::Stdio;
use std::time::Duration;

use peergrid::{Grid, GridConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    let grid = Grid::join(GridConfig::from_env()?).await?;
    println!("joined {}", grid.local_member().gossip_addr);
    wait(Duration::from_secs(30), "every member", || {
        let grid = grid.clone();
        async move { grid.members().len() >= members }
    })
    .await?;
    grid.wait_safe(Duration::from_secs(30)).await?;
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
    // Leave once the demo closes standard input.
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
    grid.leave().await?;
    Ok(())
}

async fn wait<F, Fut>(deadline: Duration, what: &str, check: F) -> Result<(), BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !check().await {
        if Instant::now() > until {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn demo(processes: usize, increments: u64) -> Result<(), BoxError> {
    println!("lock counter: {processes} processes x {increments} increments under one fenced lock");
    let cluster = format!("lock-counter-{}", std::process::id());
    let (tx, mut lines) = mpsc::unbounded_channel::<(usize, String)>();
    let start = Instant::now();
    // The first process on an ephemeral port; the others seeded with it.
    let mut children = vec![spawn(0, processes, increments, &cluster, None, &tx)?];
    let seed = loop {
        let (_, line) = next(&mut lines).await?;
        if let Some(addr) = line.strip_prefix("joined ") {
            break addr.to_string();
        }
    };
    for i in 1..processes {
        children.push(spawn(i, processes, increments, &cluster, Some(&seed), &tx)?);
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
    for child in &mut children {
        drop(child.stdin.take());
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }

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

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}

fn spawn(
    index: usize,
    processes: usize,
    increments: u64,
    cluster: &str,
    seed: Option<&str>,
    lines: &mpsc::UnboundedSender<(usize, String)>,
) -> Result<Child, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["worker", &processes.to_string(), &increments.to_string()])
        .env("PEERGRID_CLUSTER_NAME", cluster)
        .env("PEERGRID_GOSSIP_BIND", "127.0.0.1:0")
        .env("PEERGRID_RPC_BIND", "127.0.0.1:0")
        .env("PEERGRID_SEEDS", seed.unwrap_or(""))
        .env(
            "PEERGRID_JOIN_TIMEOUT_MS",
            if seed.is_some() { "5000" } else { "1" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let tx = lines.clone();
    tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            if tx.send((index, line)).is_err() {
                break;
            }
        }
    });
    Ok(child)
}

async fn next(
    lines: &mut mpsc::UnboundedReceiver<(usize, String)>,
) -> Result<(usize, String), BoxError> {
    tokio::time::timeout(Duration::from_secs(120), lines.recv())
        .await
        .map_err(|_| "timed out waiting for the processes")?
        .ok_or_else(|| "every process exited".into())
}
