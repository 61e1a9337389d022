//! Measures membership: join time, failure-detection time, leave propagation, and false
//! suspicions in an idle cluster. Members run in this process over real sockets on 127.0.0.1.
//!
//! ```sh
//! cargo run --release --example membership_bench            # 12 detection runs, 60 s idle run
//! cargo run --release --example membership_bench -- 5 10     # 5 detection runs, 10 s idle run
//! ```
//!
//! It prints figures; it asserts nothing about time.

use std::time::Duration;

use peergrid::{Grid, GridConfig, MembershipEvent};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs go to stderr when RUST_LOG is set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let runs = args.first().copied().unwrap_or(12) as usize;
    let idle_secs = args.get(1).copied().unwrap_or(60);
    let swim = GridConfig::default().swim;
    println!(
        "peergrid membership figures (probe period {:?}, probe rtt {:?}, suspect->down {:?})\n",
        swim.probe_period, swim.probe_rtt, swim.suspect_to_down_after
    );

    for n in [3usize, 5] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let (grids, took) = start_cluster(n).await?;
            times.push(took);
            drop(grids);
        }
        println!(
            "join, {n} members (first join -> all converged): {}",
            summary(&mut times)
        );
    }

    let mut detect = Vec::new();
    let mut leave = Vec::new();
    for _ in 0..runs {
        let (mut grids, _) = start_cluster(3).await?;
        let mut events: Vec<_> = grids[..2].iter().map(|g| g.membership_events()).collect();
        let victim = grids.pop().expect("3 members").local_member().id;
        let crashed_at = Instant::now();
        // grids[2] was dropped by pop(): a crash.
        for stream in &mut events {
            tokio::time::timeout(DEADLINE, async {
                while let Some(event) = stream.recv().await {
                    if matches!(&event, MembershipEvent::Down(m) if m.id == victim) {
                        return;
                    }
                }
            })
            .await?;
        }
        detect.push(crashed_at.elapsed());

        let mut watcher = grids[0].membership_events();
        let leaver = grids.pop().expect("2 members");
        let id = leaver.local_member().id;
        let left_at = Instant::now();
        leaver.leave().await?;
        tokio::time::timeout(DEADLINE, async {
            while let Some(event) = watcher.recv().await {
                if matches!(&event, MembershipEvent::Left(m) if m.id == id) {
                    return;
                }
            }
        })
        .await?;
        leave.push(left_at.elapsed());
    }
    println!(
        "failure detection, 3 members (crash -> both survivors see Down), {runs} runs: {}",
        summary(&mut detect)
    );
    println!(
        "graceful leave (leave() called -> peer sees Left), {runs} runs: {}",
        summary(&mut leave)
    );

    if idle_secs > 0 {
        let (grids, _) = start_cluster(5).await?;
        let mut streams: Vec<_> = grids.iter().map(|g| g.membership_events()).collect();
        let end = tokio::time::sleep(Duration::from_secs(idle_secs));
        tokio::pin!(end);
        let mut false_downs = 0;
        loop {
            let next = futures::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv())));
            tokio::select! {
                _ = &mut end => break,
                (event, _, _) = next => {
                    if matches!(event, Some(MembershipEvent::Down(_) | MembershipEvent::Left(_))) {
                        false_downs += 1;
                    }
                }
            }
        }
        let sent: u64 = grids.iter().map(|g| g.datagram_stats().sent).sum();
        println!(
            "idle 5-member cluster for {idle_secs} s: {false_downs} false down events, \
             {:.0} datagrams/s per member",
            sent as f64 / idle_secs as f64 / 5.0
        );
    }
    Ok(())
}

/// Starts `n` members seeded with the first and returns them with the time until all converged.
async fn start_cluster(n: usize) -> Result<(Vec<Grid>, Duration), Box<dyn std::error::Error>> {
    let cluster_name = format!("bench-{}", rand_suffix());
    let started = Instant::now();
    let first = Grid::join(GridConfig {
        cluster_name: cluster_name.clone(),
        ..GridConfig::ephemeral()
    })
    .await?;
    let seed = first.local_member().gossip_addr;
    let mut grids = vec![first];
    for _ in 1..n {
        grids.push(
            Grid::join(GridConfig {
                cluster_name: cluster_name.clone(),
                seeds: vec![seed],
                ..GridConfig::ephemeral()
            })
            .await?,
        );
    }
    let deadline = Instant::now() + DEADLINE;
    while !grids.iter().all(|g| g.members().len() == n) {
        if Instant::now() > deadline {
            return Err("cluster did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((grids, started.elapsed()))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 20 | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// "median X ms (min A, p90 B, max C)".
fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.1} ms (min {:.1}, p90 {:.1}, max {:.1})",
        ms(at(0.5)),
        ms(samples[0]),
        ms(at(0.9)),
        ms(samples[samples.len() - 1])
    )
}
