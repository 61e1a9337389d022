//! What the multi-process demos share: starting this same binary as a worker process with its
//! output forwarded line by line, and waiting on conditions with a deadline.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The error type of the demos.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Output lines of every worker: (worker index, line).
pub type Lines = mpsc::UnboundedReceiver<(usize, String)>;

/// Starts this binary with `args` as worker `index` of `cluster`, on ephemeral loopback ports,
/// seeded with `seed` (none: it starts the cluster). Its standard output goes to `lines`; its
/// standard input stays open until the demo drops it.
pub fn spawn_worker(
    index: usize,
    args: &[String],
    cluster: &str,
    seed: Option<&str>,
    lines: &mpsc::UnboundedSender<(usize, String)>,
) -> Result<Child, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
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
    forward_lines(child.stdout.take().ok_or("no stdout")?, index, lines);
    Ok(child)
}

/// Sends each line of a child's standard output to `lines`, tagged with `index`.
pub fn forward_lines(
    stdout: tokio::process::ChildStdout,
    index: usize,
    lines: &mpsc::UnboundedSender<(usize, String)>,
) {
    let tx = lines.clone();
    tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            if tx.send((index, line)).is_err() {
                break;
            }
        }
    });
}

/// Runs `op` from `tasks` concurrent tasks for `duration` and returns operations per second.
/// Each task starts from its own clone of `state`, which `op` takes and hands back with its
/// result, so an operation clones nothing. Task `t` passes `t`, `t + tasks`, `t + 2 * tasks`,
/// ... as the operation number.
pub async fn ops_per_sec<S, F, Fut>(
    tasks: usize,
    duration: Duration,
    state: S,
    op: F,
) -> peergrid::Result<f64>
where
    S: Clone + Send + 'static,
    F: Fn(S, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (S, peergrid::Result<()>)> + Send,
{
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (op, mut state) = (op.clone(), state.clone());
            tokio::spawn(async move {
                let (mut done, mut i) = (0u64, t);
                while start.elapsed() < duration {
                    let (back, result) = op(state, i).await;
                    state = back;
                    result?;
                    done += 1;
                    i += tasks;
                }
                Ok::<u64, peergrid::Error>(done)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.expect("load task panicked")?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// [`ops_per_sec`] of gets of `keys` (operation `i` reads key `i` modulo their number).
pub async fn gets_per_sec<V>(
    tasks: usize,
    duration: Duration,
    map: &peergrid::Map<String, V>,
    keys: &std::sync::Arc<Vec<String>>,
) -> peergrid::Result<f64>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let state = (map.clone(), keys.clone());
    ops_per_sec(tasks, duration, state, |(map, keys), i| async move {
        let result = map.get(&keys[i % keys.len()]).await.map(|_| ());
        ((map, keys), result)
    })
    .await
}

/// The median of `values` (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The next line of any worker, or an error after two minutes of silence.
pub async fn next(lines: &mut Lines) -> Result<(usize, String), BoxError> {
    tokio::time::timeout(Duration::from_secs(120), lines.recv())
        .await
        .map_err(|_| "timed out waiting for the processes")?
        .ok_or_else(|| "every process exited".into())
}

/// Waits for the first worker's `joined ADDR` line and returns the address.
pub async fn first_seed(lines: &mut Lines) -> Result<String, BoxError> {
    loop {
        let (_, line) = next(lines).await?;
        if let Some(addr) = line.strip_prefix("joined ") {
            return Ok(addr.to_string());
        }
    }
}

/// Joins with `config`, prints `joined GOSSIP_ADDR` (the first worker's line is the others'
/// seed), and waits until `members` members see each other and the cluster is safe.
pub async fn join(
    config: peergrid::GridConfig,
    members: usize,
) -> Result<peergrid::Grid, BoxError> {
    let grid = peergrid::Grid::join(config).await?;
    println!("joined {}", grid.local_member().gossip_addr);
    wait(Duration::from_secs(30), "every member", || {
        let grid = grid.clone();
        async move { grid.members().len() >= members }
    })
    .await?;
    grid.wait_safe(Duration::from_secs(30)).await?;
    Ok(grid)
}

/// Polls `check` every 20 ms until it holds, or fails after `deadline`.
pub async fn wait<F, Fut>(deadline: Duration, what: &str, check: F) -> Result<(), BoxError>
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

/// Closes every worker's standard input (they leave gracefully) and waits for them to exit.
pub async fn finish(children: &mut [Child]) {
    for child in children.iter_mut() {
        drop(child.stdin.take());
    }
    for child in children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
}

/// Blocks until the demo closes this worker's standard input.
pub async fn until_stdin_closes() {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
}

/// `ok` or `FAILED`.
pub fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}
