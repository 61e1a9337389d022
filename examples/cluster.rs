//! Members finding, losing and regaining each other, in real OS processes.
//!
//! `cargo run --example cluster` starts three member processes (this same binary with the
//! `member` argument), each configured by nothing but the defaults: they bind the first free ports
//! from 5701 and find each other through the default seeds. The demo waits until every member
//! sees three, kills one with SIGKILL, waits until the survivors declare it down, starts a
//! replacement, makes one member leave gracefully, and prints a summary with the timings.
//!
//! `cargo run --example cluster -- member` runs one member that prints one line per event on
//! stdout (`joined`, `members N`, `up`, `down`, `left`) and leaves gracefully when its standard
//! input closes or reads `leave`. Settings come from `PEERGRID_*` environment variables.

mod support;

use std::process::Stdio;
use std::time::Duration;

use peergrid::{Grid, GridConfig, MembershipEvent};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("member") => run_member().await,
        None => run_demo().await,
        Some(other) => {
            Err(format!("unknown argument {other:?}; use no argument or `member`").into())
        }
    }
}

/// One member: join with the defaults (plus `PEERGRID_*`), print events, leave on stdin EOF.
async fn run_member() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEERGRID_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = GridConfig::from_env()?;
    let grid = Grid::join(config).await?;
    let mut events = grid.membership_events();
    let me = grid.local_member();
    // Reports when the cluster becomes safe (every partition placed and backed up), and when it
    // stops being so.
    let watcher = grid.clone();
    tokio::spawn(async move {
        let mut was_safe = false;
        loop {
            let safe = watcher.is_safe().await.unwrap_or(false);
            if safe != was_safe {
                if safe {
                    println!("safe {}", watcher.members().len());
                } else {
                    println!("unsafe");
                }
                was_safe = safe;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    println!("joined {} {} {}", me.id, me.gossip_addr, me.rpc_addr);
    println!("members {}", grid.members().len());
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(line)) if line.trim() != "leave" => continue,
                _ => break,
            },
            event = events.recv() => {
                let Some(event) = event else { break };
                let (kind, m) = match &event {
                    MembershipEvent::Up(m) => ("up", m),
                    MembershipEvent::Down(m) => ("down", m),
                    MembershipEvent::Left(m) => ("left", m),
                    _ => ("other", event.member()),
                };
                println!("{kind} {} {}", m.id, m.gossip_addr);
                println!("members {}", grid.members().len());
            }
        }
    }
    grid.leave().await?;
    println!("bye");
    Ok(())
}

/// A member process the demo drives.
struct Proc {
    child: Child,
    id: String,
    gossip: String,
    members: usize,
    /// The member count when this member last found the cluster safe (0: not safe).
    safe_with: usize,
}

use support::Lines;

async fn spawn_member(
    index: usize,
    cluster: &str,
    lines: &mpsc::UnboundedSender<(usize, String)>,
) -> Result<Proc, Box<dyn std::error::Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("member")
        .env("PEERGRID_CLUSTER_NAME", cluster)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    support::forward_lines(child.stdout.take().ok_or("no stdout")?, index, lines);
    Ok(Proc {
        child,
        id: String::new(),
        gossip: String::new(),
        members: 0,
        safe_with: 0,
    })
}

/// Reads member output until `done` holds, with a deadline.
async fn until(
    procs: &mut [Proc],
    lines: &mut Lines,
    what: &str,
    done: impl Fn(&[Proc]) -> bool,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    while !done(procs) {
        let (i, line) = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .map_err(|_| format!("timed out waiting for {what}"))?
            .ok_or("member output closed")?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("joined") => {
                procs[i].id = words.next().unwrap_or_default().to_string();
                procs[i].gossip = words.next().unwrap_or_default().to_string();
            }
            Some("members") => {
                procs[i].members = words.next().and_then(|n| n.parse().ok()).unwrap_or(0)
            }
            Some("safe") => {
                procs[i].safe_with = words.next().and_then(|n| n.parse().ok()).unwrap_or(0)
            }
            Some("unsafe") => procs[i].safe_with = 0,
            Some(kind @ ("up" | "down" | "left")) => {
                println!(
                    "  [{:>6.0} ms] member {} ({}) sees {kind:<4} {}",
                    start.elapsed().as_secs_f64() * 1000.0,
                    i,
                    procs[i].gossip,
                    words.nth(1).unwrap_or_default()
                );
            }
            _ => {}
        }
    }
    Ok(start.elapsed())
}

async fn run_demo() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = format!("demo-{}", std::process::id());
    let (tx, mut lines) = mpsc::unbounded_channel();
    println!("peergrid cluster demo: 3 member processes, default configuration (ports 5701+)\n");

    println!("1. starting 3 members");
    let start = Instant::now();
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(spawn_member(i, &cluster, &tx).await?);
    }
    until(&mut procs, &mut lines, "3 members to converge", |p| {
        p.iter().all(|p| p.members == 3)
    })
    .await?;
    let join_time = start.elapsed();
    for (i, p) in procs.iter().enumerate() {
        println!("  member {i}: id {} gossip {}", p.id, p.gossip);
    }
    println!("  every member sees 3 members after {join_time:.2?}");
    let safe = until(
        &mut procs,
        &mut lines,
        "the partitions to be spread and backed up",
        |p| p.iter().any(|p| p.safe_with == 3),
    )
    .await?;
    println!(
        "  partitions spread over the 3 and backed up (cluster safe) after another {safe:.2?}\n"
    );

    println!("2. killing member 2 with SIGKILL");
    procs[2].child.start_kill()?;
    procs[2].members = 0;
    let detect = until(&mut procs, &mut lines, "the crash to be detected", |p| {
        p[0].members == 2 && p[1].members == 2
    })
    .await?;
    println!("  both survivors declared it down after {detect:.2?}\n");

    println!("3. starting a replacement process");
    procs[2] = spawn_member(2, &cluster, &tx).await?;
    let rejoin = until(&mut procs, &mut lines, "the replacement to join", |p| {
        p.iter().all(|p| p.members == 3)
    })
    .await?;
    println!(
        "  replacement {} at {} seen by everyone after {rejoin:.2?}\n",
        procs[2].id, procs[2].gossip
    );

    println!("4. member 1 leaves gracefully");
    if let Some(mut stdin) = procs[1].child.stdin.take() {
        stdin.write_all(b"leave\n").await?;
    }
    procs[1].members = 0;
    let leave = until(&mut procs, &mut lines, "the leave to be seen", |p| {
        p[0].members == 2 && p[2].members == 2
    })
    .await?;
    println!("  the others saw it leave after {leave:.2?}\n");

    // The rest leave one at a time, each handing its partitions to those that stay.
    for p in procs.iter_mut().rev() {
        drop(p.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
    }
    println!("summary");
    println!("  join (3 processes, all converged): {join_time:>8.2?}");
    println!("  crash detection (SIGKILL -> down): {detect:>8.2?}");
    println!("  restart rejoin:                    {rejoin:>8.2?}");
    println!("  graceful leave seen:               {leave:>8.2?}");
    Ok(())
}
