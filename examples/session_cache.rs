//! A session cache shared by several OS processes, one of them killed with SIGKILL halfway.
//!
//! ```sh
//! cargo run --example session_cache            # 3 processes x 2000 sessions
//! cargo run --example session_cache -- quick   # 3 processes x 300 sessions (CI)
//! ```
//!
//! Each process embeds a member and stores sessions in the map `sessions`, which has a near
//! cache, reading back recent sessions four times per write (as a web tier re-reads the session
//! of each request). When every process has stored half of its sessions, the demo kills one
//! with SIGKILL. The survivors finish; one of them then reads every session any process stored
//! with an acknowledgement, the killed one's included. The summary shows that none was lost and
//! the near cache's hit ratio; the demo exits non-zero if a session is missing.
//!
//! `cargo run --example session_cache -- worker MEMBERS SESSIONS` is one process. It prints
//! `ack N` for each session it stored, `written` when done, answers a `verify W:N,...` line on
//! standard input (check sessions 0..N of each worker W) with `verified PRESENT MISSING` and
//! `stats HITS MISSES`, and leaves when its standard input closes.

mod support;

use std::time::Duration;

use peergrid::{GridConfig, MapConfig, NearCacheConfig};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use support::{BoxError, mark, next, spawn_worker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a web tier keeps per session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    user: u64,
    csrf: String,
    cart: Vec<u32>,
}

fn session_key(worker: usize, n: u64) -> String {
    format!("session:{worker}:{n}")
}

fn session_of(worker: usize, n: u64) -> Session {
    Session {
        user: worker as u64 * 1_000_000 + n,
        csrf: format!("{:016x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        cart: vec![n as u32, 7, 42],
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("worker") => {
            let num = |i: usize| -> Result<u64, BoxError> {
                args.get(i)
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| "worker INDEX MEMBERS SESSIONS".into())
            };
            worker(num(1)? as usize, num(2)? as usize, num(3)?).await
        }
        Some("quick") => demo(3, 300).await,
        None => demo(3, 2000).await,
        Some(other) => {
            Err(format!("unknown argument {other:?}: use nothing, quick or worker").into())
        }
    }
}

async fn worker(index: usize, members: usize, sessions: u64) -> Result<(), BoxError> {
    let config = GridConfig {
        maps: vec![(
            "sessions".to_string(),
            MapConfig {
                near_cache: Some(NearCacheConfig::default()),
                ..MapConfig::default()
            },
        )],
        ..GridConfig::from_env()?
    };
    let grid = support::join(config, members).await?;
    let map = grid.map::<String, Session>("sessions");
    let mut rng = rand::rng();
    for n in 0..sessions {
        // A write that fails (its owner just died) is retried; only an acknowledged one counts.
        let key = session_key(index, n);
        loop {
            match map.set(&key, &session_of(index, n)).await {
                Ok(()) => break,
                Err(e) => {
                    eprintln!("retrying {key}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        println!("ack {n}");
        for _ in 0..4 {
            let recent = n.saturating_sub(rng.random_range(0..20));
            let _ = map.get(&session_key(index, recent)).await;
        }
    }
    println!("written");
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = input.next_line().await? {
        let Some(spec) = line.strip_prefix("verify ") else {
            continue;
        };
        let (mut present, mut missing) = (0u64, 0u64);
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (w, count) = part.split_once(':').ok_or("bad verify line")?;
            let (w, count): (usize, u64) = (w.parse()?, count.parse()?);
            for n in 0..count {
                match map.get(&session_key(w, n)).await? {
                    Some(s) if s == session_of(w, n) => present += 1,
                    _ => missing += 1,
                }
            }
        }
        let stats = map.local_stats();
        println!("verified {present} {missing}");
        println!(
            "stats {} {}",
            stats.near_cache_hits, stats.near_cache_misses
        );
    }
    grid.leave().await?;
    Ok(())
}

async fn demo(processes: usize, sessions: u64) -> Result<(), BoxError> {
    println!(
        "session cache: {processes} processes x {sessions} sessions, near cache on; one process is killed (SIGKILL) halfway"
    );
    let cluster = format!("session-cache-{}", std::process::id());
    let (tx, mut lines) = mpsc::unbounded_channel::<(usize, String)>();
    let args = |i: usize| {
        vec![
            "worker".to_string(),
            i.to_string(),
            processes.to_string(),
            sessions.to_string(),
        ]
    };
    let start = Instant::now();
    let mut children = vec![spawn_worker(0, &args(0), &cluster, None, &tx)?];
    let seed = support::first_seed(&mut lines).await?;
    for i in 1..processes {
        children.push(spawn_worker(i, &args(i), &cluster, Some(&seed), &tx)?);
    }
    let victim = processes - 1;
    let mut acked = vec![0u64; processes];
    let mut written = vec![false; processes];
    let mut killed_at = None;
    while (0..processes).any(|i| i != victim && !written[i]) {
        let (i, line) = next(&mut lines).await?;
        if let Some(n) = line
            .strip_prefix("ack ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            acked[i] = acked[i].max(n + 1);
        } else if line == "written" {
            written[i] = true;
        }
        if killed_at.is_none() && acked.iter().all(|a| *a >= sessions / 2) {
            // SIGKILL: no goodbye, no hand-off; its sessions live on in their backups.
            children[victim].start_kill()?;
            killed_at = Some((start.elapsed(), acked[victim]));
            println!(
                "  killed process {victim} (SIGKILL) after {:.2} s, with {} of its sessions acknowledged",
                start.elapsed().as_secs_f64(),
                acked[victim]
            );
        }
    }
    // Acknowledgements the victim printed before it died and that are still in the pipe count.
    while let Ok((i, line)) = lines.try_recv() {
        if let Some(n) = line
            .strip_prefix("ack ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            acked[i] = acked[i].max(n + 1);
        }
    }
    let spec: Vec<String> = acked
        .iter()
        .enumerate()
        .map(|(w, n)| format!("{w}:{n}"))
        .collect();
    let stdin = children[0].stdin.as_mut().ok_or("no stdin")?;
    stdin
        .write_all(format!("verify {}\n", spec.join(",")).as_bytes())
        .await?;
    let (mut present, mut missing, mut hits, mut lookups) = (0, 0, 0, 0);
    let mut answered = (false, false);
    while !(answered.0 && answered.1) {
        let (i, line) = next(&mut lines).await?;
        let words: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| w.parse().ok())
            .collect();
        match (i, line.split_whitespace().next(), words.as_slice()) {
            (0, Some("verified"), [p, m]) => {
                (present, missing) = (*p, *m);
                answered.0 = true;
            }
            (0, Some("stats"), [h, m]) => {
                (hits, lookups) = (*h, h + m);
                answered.1 = true;
            }
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    support::finish(&mut children).await;

    let total: u64 = acked.iter().sum();
    println!();
    println!("summary");
    println!(
        "  sessions acknowledged:  {total} ({})",
        acked
            .iter()
            .enumerate()
            .map(|(w, n)| format!("process {w}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((at, victim_acked)) = killed_at {
        println!(
            "  killed:                 process {victim} at {:.2} s, after {victim_acked} acknowledged sessions",
            at.as_secs_f64()
        );
    }
    println!(
        "  read back after the kill: {present} present, {missing} missing {}",
        mark(missing == 0 && present == total)
    );
    println!(
        "  near cache (process 0): hit ratio {:.3} ({hits} hits of {lookups} reads of keys another member leads)",
        if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        }
    );
    println!("  time:                   {:.2} s", elapsed.as_secs_f64());
    if missing == 0 && present == total && killed_at.is_some() {
        Ok(())
    } else {
        Err("an acknowledged session was lost".into())
    }
}
