//! peergrid against what a user would pick instead, in one run: a 3-member peergrid cluster in
//! 3 OS processes (the load generated inside the member processes, as an embedding application
//! would), Redis driven from this process by the `redis` crate, the bare member-to-member gRPC
//! echo (the network floor), and an in-process `DashMap` (the memory floor).
//!
//! ```sh
//! scripts/compare.sh                                   # installs and starts Redis, full run
//! cargo run --release --example compare -- --redis 127.0.0.1:6390 --out BENCHMARKS.md
//! cargo run --release --example compare -- quick      # a few seconds, peergrid only (CI)
//! cargo run --release --example compare -- --only mixed --rounds 1 --millis 10000  # to profile
//! ```
//!
//! Every workload runs every system in the same round, one after the other, for several rounds;
//! the report gives the median over rounds and the spread (lowest and highest round). 100-byte
//! values, 100k keys, 64 concurrent tasks in total per system (split over the three member
//! processes for peergrid). Nothing here asserts on time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use peergrid::{Grid, GridConfig, Map, MapConfig, NearCacheConfig, Queue};
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::Distribution;
use tokio::time::Instant;

const VALUE: [u8; 100] = [7; 100];
const TASKS: usize = 64;
const HOT_KEYS: usize = 100;
/// Latency samples kept per run and process (reservoir).
const SAMPLES: usize = 20_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dist {
    Uniform,
    Zipf,
}

/// Picks keys `0..n` uniformly or Zipf-skewed (exponent 0.99, as YCSB).
struct KeyPicker {
    n: usize,
    zipf: Option<rand_distr::Zipf<f64>>,
}

impl KeyPicker {
    fn new(n: usize, dist: Dist) -> Self {
        let zipf = (dist == Dist::Zipf).then(|| rand_distr::Zipf::new(n as f64, 0.99).unwrap());
        KeyPicker { n, zipf }
    }

    fn pick(&self, rng: &mut impl Rng) -> usize {
        match &self.zipf {
            Some(zipf) => (zipf.sample(rng) as usize)
                .saturating_sub(1)
                .min(self.n - 1),
            None => rng.random_range(0..self.n),
        }
    }
}

fn key(i: usize) -> String {
    format!("key:{i}")
}

/// Operations done and a sample of their latencies (ns).
#[derive(Default)]
struct Tally {
    ops: u64,
    errors: u64,
    samples: Vec<u32>,
    seen: u64,
}

impl Tally {
    fn record(&mut self, took: Duration, rng: &mut impl Rng) {
        self.ops += 1;
        self.seen += 1;
        let nanos = took.as_nanos().min(u32::MAX as u128) as u32;
        if self.samples.len() < SAMPLES {
            self.samples.push(nanos);
        } else {
            let at = rng.random_range(0..self.seen) as usize;
            if at < SAMPLES {
                self.samples[at] = nanos;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.seen += other.seen;
        self.samples.extend(other.samples);
    }
}

/// Runs `tasks` copies of `op`, each looping until the deadline it is given (`run_for` from
/// now); sums the tallies.
async fn drive<F, Fut>(tasks: usize, run_for: Duration, op: F) -> Tally
where
    F: Fn(usize, rand::rngs::SmallRng, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Tally> + Send + 'static,
{
    let end = Instant::now() + run_for;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let rng = rand::rngs::SmallRng::seed_from_u64(t as u64 * 7919 + 1);
            tokio::spawn(op(t, rng, end))
        })
        .collect();
    let mut total = Tally::default();
    for handle in handles {
        if let Ok(tally) = handle.await {
            total.merge(tally);
        }
    }
    total
}

// ------------------------------------------------------------------------------------------
// A member process.

async fn member_main(cluster: String, seed: Option<String>) -> Result<(), BoxError> {
    let near = MapConfig {
        near_cache: Some(NearCacheConfig::default()),
        ..MapConfig::default()
    };
    let grid = Grid::join(GridConfig {
        cluster_name: cluster,
        seeds: seed
            .into_iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?,
        maps: vec![("near".to_string(), near)],
        ..GridConfig::ephemeral()
    })
    .await?;
    let me = grid.local_member().id;
    println!("gossip {}", grid.local_member().gossip_addr);
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["wait", n] => {
                let n: usize = n.parse()?;
                let started = Instant::now();
                while grid.members().len() < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                grid.wait_safe(Duration::from_secs(300)).await?;
                println!("ok {}", started.elapsed().as_secs_f64());
            }
            ["load", n] => {
                let n: usize = n.parse()?;
                let value = Bytes::from_static(&VALUE);
                for name in ["data", "near"] {
                    let map: Map<String, Bytes> = grid.map(name);
                    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                        map.put_all(chunk.iter().map(|&i| (key(i), value.clone())))
                            .await?;
                    }
                }
                println!("ok");
            }
            ["stats"] => {
                let stats = grid.partition_stats();
                println!(
                    "ok {}",
                    stats.migration_bytes_sent + stats.backup_snapshot_bytes_sent
                );
            }
            ["run", workload, dist, tasks, millis, keys] => {
                let dist = if *dist == "zipf" {
                    Dist::Zipf
                } else {
                    Dist::Uniform
                };
                let tally = run_member_workload(
                    &grid,
                    me,
                    workload,
                    dist,
                    tasks.parse()?,
                    Duration::from_millis(millis.parse()?),
                    keys.parse()?,
                )
                .await;
                let samples: Vec<String> = tally.samples.iter().map(|s| s.to_string()).collect();
                println!(
                    "result {} {} {}",
                    tally.ops,
                    tally.errors,
                    samples.join(",")
                );
            }
            ["quit"] => break,
            _ => println!("error unknown command {line:?}"),
        }
        std::io::stdout().flush()?;
    }
    grid.leave().await?;
    Ok(())
}

async fn run_member_workload(
    grid: &Grid,
    me: peergrid::MemberId,
    workload: &str,
    dist: Dist,
    tasks: usize,
    run_for: Duration,
    keys: usize,
) -> Tally {
    let value = Bytes::from_static(&VALUE);
    let data: Map<String, Bytes> = grid.map("data");
    // Keys this member leads, and keys others lead.
    let (local, remote): (Vec<usize>, Vec<usize>) =
        (0..keys).partition(|&i| data.owner(&key(i)).ok().flatten() == Some(me));
    let (local, remote) = (Arc::new(local), Arc::new(remote));
    let others: Vec<_> = grid
        .members()
        .into_iter()
        .filter(|m| !m.is_local)
        .map(|m| m.id)
        .collect();
    let grid = grid.clone();
    let workload = workload.to_string();
    drive(tasks, run_for, move |task, mut rng, end| {
        let (grid, data, value, local, remote, others, workload) = (
            grid.clone(),
            data.clone(),
            value.clone(),
            local.clone(),
            remote.clone(),
            others.clone(),
            workload.clone(),
        );
        async move {
            let mut tally = Tally::default();
            let picker = KeyPicker::new(keys, dist);
            let near: Map<String, Bytes> = grid.map("near");
            let lock = grid.lock(&format!("lock-{}-{task}", grid.local_member().id));
            let queue: Queue<Bytes> =
                grid.queue(&format!("queue-{}-{task}", grid.local_member().id));
            while Instant::now() < end {
                let started = Instant::now();
                let ok = match workload.as_str() {
                    "mixed" => {
                        let k = key(picker.pick(&mut rng));
                        if rng.random_range(0..10) == 0 {
                            data.set(&k, &value).await.is_ok()
                        } else {
                            data.get(&k).await.is_ok()
                        }
                    }
                    "local" => {
                        let k = key(local[rng.random_range(0..local.len())]);
                        if rng.random_range(0..10) == 0 {
                            data.set(&k, &value).await.is_ok()
                        } else {
                            data.get(&k).await.is_ok()
                        }
                    }
                    "remote-get" => {
                        let k = key(remote[rng.random_range(0..remote.len())]);
                        data.get(&k).await.is_ok()
                    }
                    "echo" => {
                        let to = others[rng.random_range(0..others.len())];
                        grid.echo(to, value.clone()).await.is_ok()
                    }
                    "near" => {
                        let k = key(rng.random_range(0..HOT_KEYS));
                        near.get(&k).await.is_ok()
                    }
                    "lock" => match lock.lock().await {
                        Ok(guard) => guard.unlock().await.is_ok(),
                        Err(_) => false,
                    },
                    "queue" => {
                        queue.offer(&value).await.is_ok()
                            && queue.poll().await.is_ok_and(|item| item.is_some())
                    }
                    _ => false,
                };
                if ok {
                    tally.record(started.elapsed(), &mut rng);
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }
    })
    .await
}

// ------------------------------------------------------------------------------------------
// The driver.

struct Member {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Member {
    fn spawn(cluster: &str, seed: Option<&str>) -> Result<(Member, String), BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["member", cluster]);
        if let Some(seed) = seed {
            command.arg(seed);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut member = Member {
            child,
            stdin,
            stdout,
        };
        let line = member.read()?;
        let gossip = line
            .strip_prefix("gossip ")
            .ok_or_else(|| format!("member said {line:?}"))?
            .to_string();
        Ok((member, gossip))
    }

    fn send(&mut self, line: &str) -> Result<(), BoxError> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn read(&mut self) -> Result<String, BoxError> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("member process exited".into());
        }
        Ok(line.trim_end().to_string())
    }

    fn ask(&mut self, line: &str) -> Result<String, BoxError> {
        self.send(line)?;
        let answer = self.read()?;
        if answer.starts_with("error") {
            return Err(answer.into());
        }
        Ok(answer)
    }
}

/// One system's figures for one workload in one round.
#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

fn figures(mut tally: Tally, run_for: Duration) -> Figures {
    tally.samples.sort_unstable();
    let at = |q: f64| {
        if tally.samples.is_empty() {
            return f64::NAN;
        }
        tally.samples[((tally.samples.len() - 1) as f64 * q) as usize] as f64 / 1000.0
    };
    Figures {
        rate: tally.ops as f64 / run_for.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        errors: tally.errors,
    }
}

fn peergrid_run(
    members: &mut [Member],
    workload: &str,
    dist: Dist,
    run_for: Duration,
    keys: usize,
) -> Result<Tally, BoxError> {
    let n = members.len();
    let dist = if dist == Dist::Zipf {
        "zipf"
    } else {
        "uniform"
    };
    for (i, member) in members.iter_mut().enumerate() {
        let tasks = TASKS / n + usize::from(i < TASKS % n);
        member.send(&format!(
            "run {workload} {dist} {tasks} {} {keys}",
            run_for.as_millis()
        ))?;
    }
    let mut total = Tally::default();
    for member in members.iter_mut() {
        let line = member.read()?;
        let mut parts = line.splitn(4, ' ');
        if parts.next() != Some("result") {
            return Err(format!("member said {line:?}").into());
        }
        let ops: u64 = parts.next().unwrap_or("0").parse()?;
        let errors: u64 = parts.next().unwrap_or("0").parse()?;
        let samples = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>())
            .collect::<Result<Vec<_>, _>>()?;
        total.merge(Tally {
            ops,
            errors,
            seen: ops,
            samples,
        });
    }
    Ok(total)
}

async fn redis_run(
    redis: &redis::aio::MultiplexedConnection,
    workload: &str,
    dist: Dist,
    run_for: Duration,
    keys: usize,
) -> Tally {
    let redis = redis.clone();
    let workload = workload.to_string();
    let unlock = Arc::new(redis::Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
    ));
    drive(TASKS, run_for, move |task, mut rng, end| {
        let (mut redis, workload, unlock) = (redis.clone(), workload.clone(), unlock.clone());
        async move {
            let mut tally = Tally::default();
            let picker = KeyPicker::new(keys, dist);
            let value = VALUE.to_vec();
            while Instant::now() < end {
                let started = Instant::now();
                let ok = match workload.as_str() {
                    "mixed" | "local" => {
                        let k = key(picker.pick(&mut rng));
                        if rng.random_range(0..10) == 0 {
                            redis::cmd("SET")
                                .arg(&k)
                                .arg(&value)
                                .query_async::<()>(&mut redis)
                                .await
                                .is_ok()
                        } else {
                            redis::cmd("GET")
                                .arg(&k)
                                .query_async::<Option<Vec<u8>>>(&mut redis)
                                .await
                                .is_ok()
                        }
                    }
                    "near" | "remote-get" => {
                        let k = key(if workload == "near" {
                            rng.random_range(0..HOT_KEYS)
                        } else {
                            picker.pick(&mut rng)
                        });
                        redis::cmd("GET")
                            .arg(&k)
                            .query_async::<Option<Vec<u8>>>(&mut redis)
                            .await
                            .is_ok()
                    }
                    "lock" => {
                        // The single-instance Redis lock: SET NX PX, and a compare-and-delete.
                        let name = format!("lock:{task}");
                        let token: u64 = rng.random();
                        let got = redis::cmd("SET")
                            .arg(&name)
                            .arg(token)
                            .arg("NX")
                            .arg("PX")
                            .arg(30_000)
                            .query_async::<Option<String>>(&mut redis)
                            .await;
                        matches!(got, Ok(Some(_)))
                            && unlock
                                .key(&name)
                                .arg(token)
                                .invoke_async::<i64>(&mut redis)
                                .await
                                .is_ok()
                    }
                    "queue" => {
                        let name = format!("queue:{task}");
                        redis::cmd("LPUSH")
                            .arg(&name)
                            .arg(&value)
                            .query_async::<i64>(&mut redis)
                            .await
                            .is_ok()
                            && redis::cmd("RPOP")
                                .arg(&name)
                                .query_async::<Option<Vec<u8>>>(&mut redis)
                                .await
                                .is_ok_and(|item| item.is_some())
                    }
                    _ => false,
                };
                if ok {
                    tally.record(started.elapsed(), &mut rng);
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }
    })
    .await
}

async fn dashmap_run(
    map: &Arc<DashMap<Bytes, Bytes>>,
    dist: Dist,
    run_for: Duration,
    keys: usize,
) -> Tally {
    let map = map.clone();
    drive(TASKS, run_for, move |_, mut rng, end| {
        let map = map.clone();
        async move {
            let mut tally = Tally::default();
            let picker = KeyPicker::new(keys, dist);
            let value = Bytes::from_static(&VALUE);
            let mut done = 0u32;
            while Instant::now() < end {
                let started = Instant::now();
                let k = Bytes::from(key(picker.pick(&mut rng)));
                if rng.random_range(0..10) == 0 {
                    map.insert(k, value.clone());
                } else {
                    std::hint::black_box(map.get(&k).map(|v| v.value().clone()));
                }
                tally.record(started.elapsed(), &mut rng);
                // Yield now and then, as an async application's tasks would.
                done += 1;
                if done.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            tally
        }
    })
    .await
}

struct Options {
    quick: bool,
    redis: Option<String>,
    rounds: usize,
    run_for: Duration,
    keys: usize,
    out: Option<String>,
    /// Run only this workload (for profiling).
    only: Option<String>,
}

fn options() -> Result<Options, BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let value_of = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    Ok(Options {
        quick,
        redis: value_of("--redis"),
        rounds: match value_of("--rounds") {
            Some(n) => n.parse()?,
            None if quick => 1,
            None => 5,
        },
        run_for: Duration::from_millis(match value_of("--millis") {
            Some(n) => n.parse()?,
            None if quick => 300,
            None => 2000,
        }),
        keys: if quick { 10_000 } else { 100_000 },
        out: value_of("--out"),
        only: value_of("--only"),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(|| "?".to_string(), |kb| format!("{} GiB", kb / 1024 / 1024));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory} RAM, Linux {kernel}")
}

/// A workload's name in the report.
fn label(workload: &str, dist: Dist) -> String {
    match dist {
        Dist::Zipf => format!("{workload} (zipf)"),
        Dist::Uniform => workload.to_string(),
    }
}

/// Partition-copy bytes the members have sent so far (migrations and new backups).
fn bytes_sent(members: &mut [Member]) -> u64 {
    members
        .iter_mut()
        .map(|m| {
            m.ask("stats")
                .ok()
                .and_then(|a| a.strip_prefix("ok ").and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0)
        })
        .sum()
}

async fn driver_main() -> Result<(), BoxError> {
    let options = options()?;
    let cluster = format!("compare-{}", std::process::id());
    eprintln!("starting 3 member processes");
    let (first, seed) = Member::spawn(&cluster, None)?;
    let mut members = vec![first];
    for _ in 0..2 {
        members.push(Member::spawn(&cluster, Some(&seed))?.0);
    }
    for member in &mut members {
        member.ask("wait 3")?;
    }
    eprintln!("loading {} keys", options.keys);
    members[0].ask(&format!("load {}", options.keys))?;
    for member in &mut members {
        member.ask("wait 3")?;
    }
    let redis = match &options.redis {
        Some(addr) => {
            let client = redis::Client::open(format!("redis://{addr}/"))?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut connection)
                .await?;
            for chunk in (0..options.keys).collect::<Vec<_>>().chunks(1000) {
                let mut mset = redis::cmd("MSET");
                for &i in chunk {
                    mset.arg(key(i)).arg(&VALUE[..]);
                }
                mset.query_async::<()>(&mut connection).await?;
            }
            Some(connection)
        }
        None => None,
    };
    let dash: Arc<DashMap<Bytes, Bytes>> = Arc::new(DashMap::new());
    for i in 0..options.keys {
        dash.insert(Bytes::from(key(i)), Bytes::from_static(&VALUE));
    }

    // (workload, distribution, systems)
    let plan: Vec<(&str, Dist, &[&str])> = vec![
        ("mixed", Dist::Uniform, &["peergrid", "redis", "dashmap"]),
        ("mixed", Dist::Zipf, &["peergrid", "redis", "dashmap"]),
        ("remote-get", Dist::Uniform, &["peergrid", "redis"]),
        ("echo", Dist::Uniform, &["peergrid"]),
        ("local", Dist::Uniform, &["peergrid", "dashmap"]),
        ("near", Dist::Uniform, &["peergrid", "redis"]),
        ("lock", Dist::Uniform, &["peergrid", "redis"]),
        ("queue", Dist::Uniform, &["peergrid", "redis"]),
    ];
    let mut results: HashMap<(String, &str), Vec<Figures>> = HashMap::new();
    for round in 0..options.rounds {
        eprintln!("round {} of {}", round + 1, options.rounds);
        for (workload, dist, systems) in &plan {
            if options
                .only
                .as_deref()
                .is_some_and(|only| only != *workload)
            {
                continue;
            }
            // Near-cache reads are warmed first, so the run measures hits.
            if *workload == "near" {
                peergrid_run(
                    &mut members,
                    "near",
                    *dist,
                    Duration::from_millis(200),
                    options.keys,
                )?;
            }
            let label = label(workload, *dist);
            for system in *systems {
                let tally = match *system {
                    "peergrid" => {
                        peergrid_run(&mut members, workload, *dist, options.run_for, options.keys)?
                    }
                    "redis" => match &redis {
                        Some(redis) => {
                            redis_run(redis, workload, *dist, options.run_for, options.keys).await
                        }
                        None => continue,
                    },
                    _ => dashmap_run(&dash, *dist, options.run_for, options.keys).await,
                };
                results
                    .entry((label.clone(), system))
                    .or_default()
                    .push(figures(tally, options.run_for));
            }
        }
    }

    // Rebalance: a fourth member joins; bytes copied over the time to a safe cluster.
    let sent_before = bytes_sent(&mut members);
    let joined_at = Instant::now();
    let (mut fourth, _) = Member::spawn(&cluster, Some(&seed))?;
    fourth.ask("wait 4")?;
    for member in &mut members {
        member.ask("wait 4")?;
    }
    let rebalance_secs = joined_at.elapsed().as_secs_f64();
    members.push(fourth);
    let sent_after = bytes_sent(&mut members);
    let copied_mb = sent_after.saturating_sub(sent_before) as f64 / 1e6;

    let mut report = String::new();
    report.push_str(&format!(
        "Machine: {}. Values 100 bytes, {} keys, {TASKS} concurrent tasks per system, {} rounds of {:.1} s per system and workload, interleaved; median over rounds, spread = lowest..highest round.\n\n",
        machine(),
        options.keys,
        options.rounds,
        options.run_for.as_secs_f64()
    ));
    report.push_str("| workload | system | ops/s (median) | spread | p50 µs | p99 µs | errors |\n");
    report.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    let mut medians: HashMap<(String, &str), (f64, f64, f64)> = HashMap::new();
    for (workload, dist, systems) in &plan {
        let label = label(workload, *dist);
        for system in *systems {
            let Some(runs) = results.get(&(label.clone(), system)) else {
                continue;
            };
            let mut rates: Vec<f64> = runs.iter().map(|f| f.rate).collect();
            let mut p50s: Vec<f64> = runs.iter().map(|f| f.p50).collect();
            let mut p99s: Vec<f64> = runs.iter().map(|f| f.p99).collect();
            let errors: u64 = runs.iter().map(|f| f.errors).sum();
            let (low, high) = rates
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
            let m = (median(&mut rates), median(&mut p50s), median(&mut p99s));
            medians.insert((label.clone(), system), m);
            report.push_str(&format!(
                "| {label} | {system} | {:.0} | {:.0}..{:.0} | {:.1} | {:.1} | {errors} |\n",
                m.0, low, high, m.1, m.2
            ));
        }
    }
    report.push_str(&format!(
        "\nRebalance: a 4th member joined the loaded cluster; {copied_mb:.1} MB copied (migrations and new backups) in {rebalance_secs:.2} s from its start to a safe cluster: {:.1} MB/s.\n",
        copied_mb / rebalance_secs
    ));
    let get = |w: &str, s: &str| medians.get(&(w.to_string(), s)).copied();
    report.push_str("\nTargets:\n\n");
    if let (Some(remote), Some(echo)) = (get("remote-get", "peergrid"), get("echo", "peergrid")) {
        report.push_str(&format!(
            "- remote get p50 / echo p50: {:.2} (target at most 1.2)\n",
            remote.1 / echo.1
        ));
    }
    for w in ["mixed", "mixed (zipf)"] {
        if let (Some(p), Some(r)) = (get(w, "peergrid"), get(w, "redis")) {
            report.push_str(&format!(
                "- {w}: peergrid / Redis throughput: {:.2} (target at least 1)\n",
                p.0 / r.0
            ));
        }
    }
    if let (Some(near), Some(redis)) = (get("near", "peergrid"), get("near", "redis")) {
        report.push_str(&format!(
            "- near-cache hit p50 vs Redis GET p50: {:.0}x faster (target at least 50x; p50 {:.2} µs vs {:.1} µs)\n",
            redis.1 / near.1,
            near.1,
            redis.1
        ));
    }
    if let (Some(local), Some(dash)) = (get("local", "peergrid"), get("local", "dashmap")) {
        report.push_str(&format!(
            "- locally owned operations / DashMap rate: {:.2} (target at least 0.5)\n",
            local.0 / dash.0
        ));
    }
    println!("{report}");
    if let Some(out) = &options.out {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        std::fs::write(
            out,
            format!(
                "# Benchmarks\n\nProduced by `scripts/compare.sh` (`{command}`). Regenerate with the same command; figures from another machine will differ, ratios less so.\n\n{report}"
            ),
        )?;
        eprintln!("wrote {out}");
    }
    for member in &mut members {
        let _ = member.send("quit");
    }
    for mut member in members {
        let _ = member.child.wait();
    }
    if options.quick {
        eprintln!("quick run done");
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Runtime::new()?;
    if args.get(1).map(String::as_str) == Some("member") {
        let cluster = args.get(2).cloned().ok_or("member needs a cluster name")?;
        return runtime.block_on(member_main(cluster, args.get(3).cloned()));
    }
    runtime.block_on(driver_main())
}
