//! The in-process cluster harness: N members in one test process on 127.0.0.1 ephemeral ports,
//! a fault switch shared by all of them, and helpers to wait on conditions with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use peergrid::{FaultSwitch, Grid, GridConfig, Map, MemberId};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long any harness wait may take before the test fails. Generous: CI machines are slow and
/// run tests in parallel; a healthy cluster converges in well under a second.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A cluster name no other test in this process uses.
pub fn unique_cluster_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it returns `Some`, and fails the test with `what` once
/// `deadline` has passed.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One slot of the cluster: a running member, or the addresses of a crashed one.
pub struct Slot {
    pub grid: Option<Grid>,
    pub gossip: SocketAddr,
    pub rpc: SocketAddr,
}

/// N members of one cluster in this process.
pub struct Cluster {
    pub name: String,
    pub switch: FaultSwitch,
    pub slots: Vec<Slot>,
}

impl Cluster {
    /// Starts `n` members, one after the other, each seeded with the members already running, and
    /// waits until every member sees all of them.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` members whose configuration `tune` adjusts, and waits until they converge.
    pub async fn start_with(n: usize, tune: impl Fn(&mut GridConfig)) -> Cluster {
        init_tracing();
        let mut cluster = Cluster {
            name: unique_cluster_name(),
            switch: FaultSwitch::new(),
            slots: Vec::new(),
        };
        for _ in 0..n {
            let mut config = cluster.config();
            tune(&mut config);
            cluster.add_with(config).await;
        }
        cluster.wait_converged().await;
        cluster
    }

    /// The configuration of a new member: ephemeral ports, this cluster's name and fault switch,
    /// and the running members as seeds.
    pub fn config(&self) -> GridConfig {
        GridConfig {
            cluster_name: self.name.clone(),
            seeds: self.live().map(|g| g.local_member().gossip_addr).collect(),
            fault_switch: Some(self.switch.clone()),
            ..GridConfig::ephemeral()
        }
    }

    /// Starts one more member and returns its index.
    pub async fn add(&mut self) -> usize {
        let config = self.config();
        self.add_with(config).await
    }

    /// Starts one more member with `config` and returns its index.
    pub async fn add_with(&mut self, config: GridConfig) -> usize {
        let grid = Grid::join(config).await.expect("member joins");
        self.adopt(grid)
    }

    /// Takes a member started elsewhere (with [`Cluster::config`]) into the cluster; returns its
    /// index.
    pub fn adopt(&mut self, grid: Grid) -> usize {
        let me = grid.local_member();
        self.slots.push(Slot {
            grid: Some(grid),
            gossip: me.gossip_addr,
            rpc: me.rpc_addr,
        });
        self.slots.len() - 1
    }

    /// The running member at `i`.
    pub fn grid(&self, i: usize) -> &Grid {
        self.slots[i].grid.as_ref().expect("member is running")
    }

    /// Every running member.
    pub fn live(&self) -> impl Iterator<Item = &Grid> {
        self.slots.iter().filter_map(|s| s.grid.as_ref())
    }

    /// Ids of every running member, sorted.
    pub fn live_ids(&self) -> Vec<MemberId> {
        let mut ids: Vec<_> = self.live().map(|g| g.local_member().id).collect();
        ids.sort();
        ids
    }

    /// Drops member `i` without leaving: to its peers, a crash. Returns its id.
    pub fn crash(&mut self, i: usize) -> MemberId {
        let grid = self.slots[i].grid.take().expect("member is running");
        let id = grid.local_member().id;
        drop(grid);
        id
    }

    /// Starts a new process-equivalent at the addresses member `i` had (it must be crashed or
    /// left). Retries while the old sockets are still being released.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.slots[i].grid.is_none(), "member {i} is still running");
        let config = GridConfig {
            gossip_bind: self.slots[i].gossip,
            rpc_bind: self.slots[i].rpc,
            port_count: 1,
            ..self.config()
        };
        let grid = wait_for("the old sockets to be released", DEADLINE, || {
            let config = config.clone();
            async move {
                match Grid::join(config).await {
                    Ok(grid) => Some(grid),
                    Err(peergrid::Error::Bind { .. }) => None,
                    Err(e) => panic!("restart failed: {e}"),
                }
            }
        })
        .await;
        self.slots[i].grid = Some(grid);
    }

    /// Waits until every running member routes by the same table, in which every running member
    /// is a primary and every owner is running.
    pub async fn wait_table_settled(&self) {
        let live = self.live_ids();
        wait_for(
            "every member to route by one settled table",
            DEADLINE,
            || {
                let tables: Vec<_> = self.live().map(|g| g.partition_table()).collect();
                let same = tables.windows(2).all(|w| w[0] == w[1]);
                let owners_live = tables[0]
                    .replicas
                    .iter()
                    .all(|r| !r.is_empty() && r.iter().all(|m| live.contains(m)));
                let everyone_owns = live
                    .iter()
                    .all(|m| tables[0].replicas.iter().any(|r| r.first() == Some(m)));
                let grid = self.live().next().expect("a live member").clone();
                async move {
                    // And no migration left: the table is the target, every copy in sync.
                    let safe = same && grid.is_safe().await.unwrap_or(false);
                    (safe && owners_live && everyone_owns).then_some(())
                }
            },
        )
        .await;
    }

    /// Writes to `map` that the running members executed as primaries so far.
    pub fn puts(&self, map: &str) -> u64 {
        self.live()
            .map(|g| g.map::<String, u64>(map).local_stats().puts)
            .sum()
    }

    /// Waits until the running members executed `n` more writes to `map` than `since`.
    pub async fn wait_for_writes(&self, map: &str, since: u64, n: u64) {
        wait_for(&format!("{n} writes to {map}"), DEADLINE, || {
            let done = self.puts(map) >= since + n;
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Waits until every running member sees exactly the running members.
    pub async fn wait_converged(&self) {
        let expected = self.live_ids();
        wait_for(
            &format!("{} members to converge", expected.len()),
            DEADLINE,
            || {
                let ok = self.live().all(|g| {
                    let mut seen: Vec<_> = g.members().iter().map(|m| m.id).collect();
                    seen.sort();
                    seen == expected
                });
                async move { ok.then_some(()) }
            },
        )
        .await;
    }
}

/// The path of an example binary next to the test binaries, built (or found up to date) first:
/// `cargo test --test NAME` does not rebuild examples, and a stale binary would test old code.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building example {name} failed");
    dir.join("examples").join(name)
}

/// Writers that each write unique keys through `grid` until stopped; each returns the writes
/// that were acknowledged and how many calls failed (outcome unknown, so not checked).
pub fn start_writers(
    grids: &[&Grid],
    per_grid: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<(HashMap<String, u64>, u64)>> {
    let mut writers = Vec::new();
    for (g, grid) in grids.iter().enumerate() {
        for t in 0..per_grid {
            let map: Map<String, u64> = grid.map("failover");
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let (mut acked, mut failed) = (HashMap::new(), 0);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("g{g}-t{t}-{i}");
                    match map.set(&key, &i).await {
                        Ok(()) => {
                            acked.insert(key, i);
                        }
                        Err(_) => failed += 1,
                    }
                    i += 1;
                }
                (acked, failed)
            }));
        }
    }
    writers
}

pub async fn collect(
    writers: Vec<JoinHandle<(HashMap<String, u64>, u64)>>,
) -> (HashMap<String, u64>, u64) {
    let mut all = HashMap::new();
    let mut failed = 0;
    for w in writers {
        let (acked, f) = w.await.expect("writer");
        all.extend(acked);
        failed += f;
    }
    (all, failed)
}

pub async fn assert_all_present(grid: &Grid, others: &[&Grid], expected: &HashMap<String, u64>) {
    let map: Map<String, u64> = grid.map("failover");
    let keys: Vec<String> = expected.keys().cloned().collect();
    // In chunks: a release build writes more keys than one `get_all` takes.
    let mut got = HashMap::new();
    for chunk in keys.chunks(1000) {
        got.extend(map.get_all(chunk).await.expect("final read"));
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(5)
        .collect();
    for (key, _) in &missing {
        let p = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % 271) as u32;
        let same: Vec<_> = expected
            .keys()
            .filter(|k| xxhash_rust::xxh3::xxh3_64(k.as_bytes()) % 271 == u64::from(p))
            .map(|k| (k.clone(), got.contains_key(k)))
            .collect();
        eprintln!(
            "missing {key}: partition {p}, replicas {:?}, here {:?} {:?}, others {:?}, acked keys of the partition (present?) {same:?}",
            grid.partition_table().replicas[p as usize],
            grid.local_member().id,
            grid.local_replica(p),
            others
                .iter()
                .map(|g| (g.local_member().id, g.local_replica(p)))
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {missing:?}",
        expected
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .count(),
        expected.len()
    );
}

/// A `peergrid` command of this crate, with none of this process's `PEERGRID_*` variables (a
/// test sets what it means to).
pub fn peergrid_command() -> tokio::process::Command {
    peergrid_command_in(None)
}

/// `peergrid_command`, run inside the named network namespace when one is given (through
/// `ip netns exec`, which execs the command: the process is still the `peergrid` one).
pub fn peergrid_command_in(netns: Option<&str>) -> tokio::process::Command {
    let mut command = match netns {
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_peergrid")),
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_peergrid")]);
            c
        }
    };
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("PEERGRID_")) {
            command.env_remove(name);
        }
    }
    command.kill_on_drop(true);
    command
}

/// Starts `peergrid node ARGS`; returns the process, the rest of its stdout, and its first line
/// (which names its addresses).
pub async fn start_node(
    args: &[&std::ffi::OsStr],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    start_node_in(None, args, None).await
}

/// `start_node` inside the named network namespace, its log (stderr) going to `log` if given.
pub async fn start_node_in(
    netns: Option<&str>,
    args: &[&std::ffi::OsStr],
    log: Option<std::fs::File>,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    use tokio::io::AsyncBufReadExt;
    let mut command = peergrid_command_in(netns);
    command
        .arg("node")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(log.map_or_else(std::process::Stdio::null, std::process::Stdio::from));
    let mut child = command.spawn().expect("peergrid node starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the node reports its addresses")
        .expect("stdout readable")
        .expect("a first line");
    (child, lines, first)
}

/// The address after `word` in a node's first line (`gossip` or `rpc`).
pub fn addr_after(line: &str, word: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != word)
        .nth(1)
        .and_then(|w| w.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("an address after {word} in {line:?}"))
}
