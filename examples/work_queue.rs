//! A work queue across OS processes: producers offer jobs to one distributed queue, consumers
//! poll them, and every job is done exactly once.
//!
//! ```sh
//! cargo run --example work_queue            # 2 producers x 1000 jobs, 3 consumers
//! cargo run --example work_queue -- quick   # 1 producer x 200 jobs, 2 consumers (CI)
//! ```
//!
//! Each process embeds a member. Producers print `offered JOB` per job, consumers `done JOB`;
//! the demo checks that every offered job was done once, none twice and none lost, and exits
//! non-zero otherwise.
//!
//! `cargo run --example work_queue -- produce MEMBERS JOBS` and `-- consume MEMBERS` are the
//! worker processes (seeded by `PEERGRID_SEEDS`); they leave when their standard input closes.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use peergrid::{Grid, GridConfig};
use support::{BoxError, mark, next, spawn_worker};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> Result<u64, BoxError> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "produce MEMBERS JOBS | consume MEMBERS".into())
    };
    match args.first().map(String::as_str) {
        Some("produce") => produce(num(1)? as usize, num(2)?).await,
        Some("consume") => consume(num(1)? as usize).await,
        Some("quick") => demo(1, 200, 2).await,
        None => demo(2, 1000, 3).await,
        Some(other) => Err(format!(
            "unknown argument {other:?}: use nothing, quick, produce or consume"
        )
        .into()),
    }
}

async fn join(members: usize) -> Result<Grid, BoxError> {
    support::join(GridConfig::from_env()?, members).await
}

async fn produce(members: usize, jobs: u64) -> Result<(), BoxError> {
    let grid = join(members).await?;
    let queue = grid.queue::<String>("jobs");
    let me = grid.local_member().id;
    for j in 0..jobs {
        let job = format!("{me}-{j}");
        queue.offer(&job).await?;
        println!("offered {job}");
    }
    support::until_stdin_closes().await;
    grid.leave().await?;
    Ok(())
}

async fn consume(members: usize) -> Result<(), BoxError> {
    let grid = join(members).await?;
    let queue = grid.queue::<String>("jobs");
    // Polls are never cancelled halfway (a job taken by a cancelled poll would be lost to this
    // process): the loop checks between polls whether the demo said stop.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        support::until_stdin_closes().await;
        flag.store(true, Ordering::SeqCst);
    });
    while !stop.load(Ordering::SeqCst) {
        if let Some(job) = queue.poll_timeout(Duration::from_millis(200)).await? {
            println!("done {job}");
        }
    }
    grid.leave().await?;
    Ok(())
}

async fn demo(producers: usize, jobs: u64, consumers: usize) -> Result<(), BoxError> {
    let members = producers + consumers;
    println!("work queue: {producers} producer(s) x {jobs} jobs, {consumers} consumers, one queue");
    let cluster = format!("work-queue-{}", std::process::id());
    let (tx, mut lines) = mpsc::unbounded_channel::<(usize, String)>();
    let start = Instant::now();
    let roles: Vec<Vec<String>> = (0..members)
        .map(|i| {
            if i < producers {
                vec!["produce".into(), members.to_string(), jobs.to_string()]
            } else {
                vec!["consume".into(), members.to_string()]
            }
        })
        .collect();
    let mut children = vec![spawn_worker(0, &roles[0], &cluster, None, &tx)?];
    let seed = support::first_seed(&mut lines).await?;
    for (i, args) in roles.iter().enumerate().skip(1) {
        children.push(spawn_worker(i, args, &cluster, Some(&seed), &tx)?);
    }
    let total = producers as u64 * jobs;
    let mut offered = 0u64;
    let mut done: HashMap<String, Vec<usize>> = HashMap::new();
    let mut done_lines = 0u64;
    while offered < total || done_lines < total {
        let (i, line) = next(&mut lines).await?;
        match line.split_once(' ') {
            Some(("offered", _)) => offered += 1,
            Some(("done", job)) => {
                done.entry(job.to_string()).or_default().push(i);
                done_lines += 1;
            }
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    support::finish(&mut children).await;
    // Lines that arrived while the processes left: a job done twice would show here.
    while let Ok((i, line)) = lines.try_recv() {
        if let Some(("done", job)) = line.split_once(' ') {
            done.entry(job.to_string()).or_default().push(i);
        }
    }

    let twice = done.values().filter(|by| by.len() > 1).count();
    let once = done.values().filter(|by| by.len() == 1).count() as u64;
    let missing = total - once - twice as u64;
    println!();
    println!("summary");
    println!("  jobs offered:   {offered} (acknowledged by the queue)");
    println!("  done once:      {once} {}", mark(once == total));
    println!("  done twice:     {twice} {}", mark(twice == 0));
    println!("  never done:     {missing} {}", mark(missing == 0));
    let per_consumer: Vec<String> = (producers..members)
        .map(|i| {
            done.values()
                .filter(|by| by.contains(&i))
                .count()
                .to_string()
        })
        .collect();
    println!("  per consumer:   {}", per_consumer.join(" + "));
    println!("  time:           {:.2} s", elapsed.as_secs_f64());
    if once == total && twice == 0 {
        Ok(())
    } else {
        Err("a job was lost or done twice".into())
    }
}
