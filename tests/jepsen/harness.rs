//! The cluster, the clients, the fault schedule and the summary of a Jepsen-style run.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peergrid::{Error, Grid, GridConfig, LockConfig, MapConfig, QueueConfig, SplitBrainProtection};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::checker::{
    self, Entry, Grant, Outcome, QueueOp, QueueResult, RegisterOp, RegisterResult,
};
use crate::common::{DEADLINE, unique_cluster_name, wait_for};
use crate::netns::Namespaces;

/// Where the members run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Five members in this process; faults: kill and restart, isolate one, majority /
    /// minority split, join, leave (the fault switch cuts links between members here).
    InProcess,
    /// Three `peergrid node` processes hold data beside two members in this process that run
    /// the clients; faults: SIGKILL and restart, SIGSTOP then SIGCONT, SIGTERM (leave), join;
    /// and, when network namespaces can be used (root, iproute2), real splits: a process
    /// isolated, or a majority and a minority (either two processes, or this process's two
    /// members) cut apart.
    Processes,
}

pub struct RunConfig {
    pub mode: Mode,
    /// The faults to draw from; empty: every fault the mode supports.
    pub faults: Vec<&'static str>,
    pub seed: u64,
    pub duration: Duration,
}

const PARTITIONS: u32 = 32;
/// The structures with split-brain protection: a side of fewer than 3 members refuses them.
const QUORUM: usize = 3;
/// Two backups: every partition has 3 copies, so on 5 members any side with a quorum of 3 holds
/// a copy of every partition (`BACKUPS + 1 > members - QUORUM`). With one backup a 2 | 3 split
/// can leave both copies of a partition on the minority, and the majority serves it started
/// afresh: the guarded structures in it lose their state for the split (see the README's
/// guarantees), which is what split-brain protection with too few backups gives, not a fault.
const BACKUPS: u8 = 2;
/// A client gives up on an operation after this long: the outcome is unknown, and the client
/// is retired.
const OP_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a healed cluster may take to be safe again before the run fails as stuck. A merge
/// late in a 30-minute run hands over hundreds of thousands of set entries while the clients
/// go on (180,533 took 90 s in one, two runs sharing the 2 cores): 90 s cut it short.
const RECOVERY: Duration = Duration::from_secs(180);
/// A client pauses this long after an operation that did not succeed (a refusal comes back at
/// once: without a pause a side without quorum would record millions of them).
const FAILED_PAUSE: Duration = Duration::from_millis(20);

fn member_config(cluster: &str) -> GridConfig {
    let guard = Some(SplitBrainProtection::new(QUORUM));
    GridConfig {
        cluster_name: cluster.to_string(),
        partition_count: PARTITIONS,
        backup_count: BACKUPS,
        rpc_timeout: Duration::from_secs(2),
        maps: vec![(
            "register".to_string(),
            MapConfig {
                split_brain_protection: guard,
                ..MapConfig::default()
            },
        )],
        queues: vec![(
            "queue".to_string(),
            QueueConfig {
                split_brain_protection: guard,
                ..QueueConfig::default()
            },
        )],
        locks: vec![(
            "lock".to_string(),
            LockConfig {
                split_brain_protection: guard,
                ..LockConfig::default()
            },
        )],
        ..GridConfig::ephemeral()
    }
}

/// The same settings as a `peergrid node` file.
fn node_file(cluster: &str, seed: SocketAddr, bind: Ipv4Addr) -> String {
    format!(
        "cluster_name = \"{cluster}\"\npartitions = {PARTITIONS}\nbackups = {BACKUPS}\nrpc_timeout_ms = 2000\n\
         gossip_bind = \"{bind}:0\"\nrpc_bind = \"{bind}:0\"\nseeds = [\"{seed}\"]\n\
         [maps.register]\nmin_cluster_size = {QUORUM}\n[queues.queue]\nmin_cluster_size = {QUORUM}\n\
         [locks.lock]\nmin_cluster_size = {QUORUM}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Members.

/// A member the clients may call, and the token that ends their calls when it is killed.
#[derive(Clone)]
struct Endpoint {
    grid: Grid,
    killed: CancellationToken,
}

enum Member {
    Local {
        grid: Option<Grid>,
        killed: CancellationToken,
        gossip: SocketAddr,
        rpc: SocketAddr,
    },
    Process {
        child: Option<tokio::process::Child>,
        paused: bool,
        gossip: SocketAddr,
        /// Its network namespace (an index into `Cluster::net`; 0 without namespaces).
        space: usize,
    },
}

impl Member {
    fn gossip(&self) -> SocketAddr {
        match self {
            Member::Local { gossip, .. } | Member::Process { gossip, .. } => *gossip,
        }
    }

    fn is_up(&self) -> bool {
        match self {
            Member::Local { grid, .. } => grid.is_some(),
            Member::Process { child, paused, .. } => child.is_some() && !paused,
        }
    }
}

struct Cluster {
    mode: Mode,
    name: String,
    switch: peergrid::FaultSwitch,
    members: Vec<Member>,
    /// Indexes into `members` of the in-process members clients call.
    endpoints: Arc<Mutex<Vec<Option<Endpoint>>>>,
    /// Which `members` index each endpoint is (in-process members only).
    endpoint_of: Vec<usize>,
    dir: std::path::PathBuf,
    /// Network namespaces for real splits between processes, when they can be used.
    net: Option<Namespaces>,
}

impl Cluster {
    async fn start(mode: Mode, net: Option<Namespaces>) -> Cluster {
        crate::common::init_tracing();
        let name = unique_cluster_name();
        let dir = std::env::temp_dir().join(format!("{name}-jepsen"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Cluster {
            mode,
            name,
            switch: peergrid::FaultSwitch::new(),
            members: Vec::new(),
            endpoints: Arc::new(Mutex::new(Vec::new())),
            endpoint_of: Vec::new(),
            dir,
            net,
        };
        let (local, processes) = match mode {
            Mode::InProcess => (5, 0),
            Mode::Processes => (2, 3),
        };
        for _ in 0..local {
            cluster.add_local(None).await;
        }
        for _ in 0..processes {
            cluster.add_process().await;
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn config(&self) -> GridConfig {
        let bind = self.bind_address();
        GridConfig {
            gossip_bind: SocketAddr::new(IpAddr::V4(bind), 0),
            rpc_bind: SocketAddr::new(IpAddr::V4(bind), 0),
            seeds: self
                .members
                .iter()
                .filter(|m| m.is_up())
                .map(Member::gossip)
                .collect(),
            fault_switch: Some(self.switch.clone()),
            ..member_config(&self.name)
        }
    }

    /// The address this process's members bind.
    fn bind_address(&self) -> Ipv4Addr {
        match &self.net {
            Some(net) => net.address(0),
            None => Ipv4Addr::LOCALHOST,
        }
    }

    /// Starts an in-process member (at `at`'s addresses for a restart).
    async fn add_local(&mut self, at: Option<usize>) {
        let mut config = self.config();
        if let Some(i) = at
            && let Member::Local { gossip, rpc, .. } = &self.members[i]
        {
            config.gossip_bind = *gossip;
            config.rpc_bind = *rpc;
            config.port_count = 1;
        }
        let grid = wait_for("the old sockets to be released", DEADLINE, || {
            let config = config.clone();
            async move {
                match Grid::join(config).await {
                    Ok(grid) => Some(grid),
                    Err(Error::Bind { .. }) => None,
                    Err(e) => panic!("member start failed: {e}"),
                }
            }
        })
        .await;
        let me = grid.local_member();
        let killed = CancellationToken::new();
        let endpoint = Endpoint {
            grid: grid.clone(),
            killed: killed.clone(),
        };
        let member = Member::Local {
            grid: Some(grid),
            killed,
            gossip: me.gossip_addr,
            rpc: me.rpc_addr,
        };
        let mut endpoints = self.endpoints.lock().unwrap();
        match at {
            Some(i) => {
                self.members[i] = member;
                let e = self.endpoint_of.iter().position(|m| *m == i).unwrap();
                endpoints[e] = Some(endpoint);
            }
            None => {
                self.members.push(member);
                self.endpoint_of.push(self.members.len() - 1);
                endpoints.push(Some(endpoint));
            }
        }
    }

    /// Starts a `peergrid node` process (at slot `at` for a restart).
    async fn add_process(&mut self) -> usize {
        self.start_process(None).await
    }

    async fn start_process(&mut self, at: Option<usize>) -> usize {
        let seed = self
            .members
            .iter()
            .find(|m| matches!(m, Member::Local { grid: Some(_), .. }))
            .map(Member::gossip)
            .expect("an in-process member to seed from");
        // A restarted process keeps its namespace; a new one gets its own.
        let space = match (at.map(|i| &self.members[i]), &mut self.net) {
            (Some(Member::Process { space, .. }), _) => *space,
            (_, Some(net)) => net.add_space().expect("a namespace for a new member"),
            (_, None) => 0,
        };
        let (netns, bind) = match &self.net {
            Some(net) => (Some(net.name(space).to_string()), net.address(space)),
            None => (None, Ipv4Addr::LOCALHOST),
        };
        let file = self.dir.join(format!("node-{space}.toml"));
        std::fs::write(&file, node_file(&self.name, seed, bind)).unwrap();
        // Each slot's log, kept (with the run's directory) when the run fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .join(format!("node-{}.log", at.unwrap_or(self.members.len()))),
            )
            .ok();
        let (child, mut lines, first) = crate::common::start_node_in(
            netns.as_deref(),
            &[std::ffi::OsStr::new("--config"), file.as_os_str()],
            log,
        )
        .await;
        // Keep reading, so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let gossip = crate::common::addr_after(&first, "gossip");
        let member = Member::Process {
            child: Some(child),
            paused: false,
            gossip,
            space,
        };
        match at {
            Some(i) => {
                self.members[i] = member;
                i
            }
            None => {
                self.members.push(member);
                self.members.len() - 1
            }
        }
    }

    /// A member that clients never call and that a fault may hit.
    fn faultable(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].is_up())
            .filter(|&i| match self.mode {
                Mode::InProcess => true,
                Mode::Processes => matches!(self.members[i], Member::Process { .. }),
            })
            .collect()
    }

    fn up_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_up()).count()
    }

    /// Some member this process runs, to ask about the cluster.
    fn observer(&self) -> Grid {
        self.endpoints
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .next()
            .expect("a live in-process member")
            .grid
            .clone()
    }

    /// Waits until every member that is up sees exactly as many members, and the cluster is
    /// safe.
    async fn wait_healthy(&self) {
        let expected = self.up_count();
        let grids: Vec<Grid> = self
            .endpoints
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|e| e.grid.clone())
            .collect();
        let until = Instant::now() + RECOVERY;
        loop {
            let seen: Vec<usize> = grids.iter().map(|g| g.members().len()).collect();
            let converged = seen.iter().all(|n| *n == expected);
            let safe = grids[0].is_safe().await;
            if converged && matches!(safe, Ok(true)) {
                return;
            }
            if Instant::now() >= until {
                // What each member of this process holds: its id, table version, and view.
                let views: Vec<String> = grids
                    .iter()
                    .map(|g| {
                        let mut view: Vec<String> = g
                            .members()
                            .iter()
                            .map(|m| format!("{}@{}", m.id, m.generation % 100_000_000))
                            .collect();
                        view.sort();
                        format!(
                            "{} table v{} sees {view:?}",
                            g.local_member().id,
                            g.partition_table().version
                        )
                    })
                    .collect();
                // Replicas out of step with their primary (among members of this process).
                let table = grids[0].partition_table();
                let by_id: HashMap<peergrid::MemberId, &Grid> =
                    grids.iter().map(|g| (g.local_member().id, g)).collect();
                let mut off = Vec::new();
                for (p, replicas) in table.replicas.iter().enumerate() {
                    let held: Vec<String> = replicas
                        .iter()
                        .map(|m| match by_id.get(m) {
                            Some(g) => format!("{m}: {:?}", g.local_replica(p as u32)),
                            None => format!("{m}: not here"),
                        })
                        .collect();
                    let states: Vec<_> = replicas
                        .iter()
                        .filter_map(|m| by_id.get(m).map(|g| g.local_replica(p as u32)))
                        .collect();
                    if states.windows(2).any(|w| w[0] != w[1]) {
                        off.push(format!("partition {p}: {held:?}"));
                    }
                }
                panic!(
                    "not healthy after {RECOVERY:?}: {expected} members up, in-process members see {seen:?}, is_safe {safe:?}\n  {}\n  replicas out of step: {}\n  member process logs: {}",
                    views.join("\n  "),
                    off.join("\n  "),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i`: an in-process member stops every task at once and the clients'
    /// calls on it end (as its process dying would end them); a process gets SIGKILL.
    async fn kill(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Local { grid, killed, .. } => {
                let e = self.endpoint_of.iter().position(|m| *m == i).unwrap();
                self.endpoints.lock().unwrap()[e] = None;
                killed.cancel();
                drop(grid.take());
            }
            Member::Process { child, .. } => {
                if let Some(mut child) = child.take() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
    }

    async fn restart(&mut self, i: usize) {
        match self.members[i] {
            Member::Local { .. } => self.add_local(Some(i)).await,
            Member::Process { .. } => {
                self.start_process(Some(i)).await;
            }
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Member::Process {
            child: Some(child), ..
        } = &self.members[i]
            && let Some(pid) = child.id()
        {
            let status = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {pid}");
        }
    }

    fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        if let Member::Process { paused, .. } = &mut self.members[i] {
            *paused = true;
        }
    }

    fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        if let Member::Process { paused, .. } = &mut self.members[i] {
            *paused = false;
        }
    }

    /// Member `i` leaves gracefully and is gone for good.
    async fn leave(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Local { grid, killed, .. } => {
                let e = self.endpoint_of.iter().position(|m| *m == i).unwrap();
                self.endpoints.lock().unwrap()[e] = None;
                if let Some(grid) = grid.take() {
                    grid.leave().await.expect("leave");
                }
                killed.cancel();
            }
            Member::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    if let Some(pid) = c.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                    let _ = tokio::time::timeout(RECOVERY, c.wait()).await;
                }
            }
        }
    }

    /// Cuts the members in `side` off from the other members that are up: through network
    /// namespaces when the run has them (`side` must then hold whole namespaces), else through
    /// the fault switch.
    fn split(&mut self, side: &[usize]) {
        if let Some(net) = &mut self.net {
            let space = |m: &Member| match m {
                Member::Process { space, .. } => *space,
                Member::Local { .. } => 0,
            };
            let mut a = Vec::new();
            let mut b = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.is_up() {
                    let (to, other) = if side.contains(&i) {
                        (&mut a, &b)
                    } else {
                        (&mut b, &a)
                    };
                    assert!(!other.contains(&space(m)), "a namespace on both sides");
                    if !to.contains(&space(m)) {
                        to.push(space(m));
                    }
                }
            }
            net.cut(&a, &b);
            return;
        }
        let (a, b): (Vec<SocketAddr>, Vec<SocketAddr>) = {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.is_up() {
                    if side.contains(&i) {
                        a.push(m.gossip());
                    } else {
                        b.push(m.gossip());
                    }
                }
            }
            (a, b)
        };
        self.switch.split(&a, &b);
    }

    /// Ends every split.
    fn heal(&mut self) {
        self.switch.heal_all();
        if let Some(net) = &mut self.net {
            net.heal();
        }
    }

    /// The minority side of a majority / minority split that `target` is in.
    fn minority(&self, target: usize, rng: &mut SmallRng) -> Vec<usize> {
        let up: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_up())
            .collect();
        let size = (up.len() - 1) / 2;
        // This process's members share a namespace, so with namespaces they go together:
        // sometimes they are the minority (and clients see its side), else processes are.
        let candidates: Vec<usize> = match self.net {
            Some(_) => {
                let local: Vec<usize> = up
                    .iter()
                    .copied()
                    .filter(|&i| matches!(self.members[i], Member::Local { .. }))
                    .collect();
                if local.len() <= size && rng.random_bool(0.5) {
                    return local;
                }
                self.faultable()
            }
            None => up,
        };
        let mut minority = vec![target];
        for i in candidates {
            if minority.len() < size && i != target {
                minority.push(i);
            }
        }
        minority
    }

    /// Stops every member; the run's directory (member process logs) is removed unless
    /// `keep_logs`.
    async fn stop(mut self, keep_logs: bool) {
        for i in 0..self.members.len() {
            if let Member::Process { paused: true, .. } = self.members[i] {
                self.resume(i);
            }
        }
        for m in &mut self.members {
            if let Member::Process { child: Some(c), .. } = m {
                let _ = c.start_kill();
            }
        }
        self.endpoints.lock().unwrap().clear();
        if !keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // Every member process is gone before its namespace is deleted.
        for m in &mut self.members {
            if let Member::Process { child: Some(c), .. } = m {
                let _ = c.wait().await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Everything the clients recorded, and the fenced resource the lock clients used.
#[derive(Default)]
struct Histories {
    set: Vec<checker::SetEntry>,
    register: Vec<(String, checker::RegisterEntry)>,
    queue: Vec<checker::QueueEntry>,
    grants: Vec<Grant>,
    lock_ops: (usize, usize, usize),
    resource: checker::FencedResource,
}

struct Shared {
    start: Instant,
    endpoints: Arc<Mutex<Vec<Option<Endpoint>>>>,
    histories: Mutex<Histories>,
    next_client: AtomicU32,
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// A live endpoint, and its slot (which member of this process serves the call).
    fn pick(&self, rng: &mut SmallRng) -> Option<(usize, Endpoint)> {
        let endpoints = self.endpoints.lock().unwrap();
        let live: Vec<(usize, &Endpoint)> = endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
            .collect();
        (!live.is_empty()).then(|| {
            let (slot, endpoint) = live[rng.random_range(0..live.len())];
            (slot, endpoint.clone())
        })
    }

    fn new_client(&self) -> u32 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// A client whose operation ended unknown is retired, as Jepsen does: `client` becomes a
    /// new one.
    /// The history entry of an operation `client` ran; a client whose outcome is unknown is
    /// retired (the next operation runs as a new client).
    fn record<O, R>(
        &self,
        client: &mut u32,
        op: O,
        invoke: u64,
        complete: u64,
        outcome: Outcome<R>,
    ) -> Entry<O, R> {
        let ran_by = *client;
        if matches!(outcome, Outcome::Unknown(_)) {
            *client = self.new_client();
        }
        Entry {
            client: ran_by,
            op,
            invoke,
            complete,
            outcome,
        }
    }
}

/// A client's pause before its next operation: [`FAILED_PAUSE`] after one that did not succeed.
async fn pace(succeeded: bool) {
    if !succeeded {
        tokio::time::sleep(FAILED_PAUSE).await;
    }
}

/// Runs `op` on `endpoint` within [`OP_TIMEOUT`]; a kill of the member ends it as unknown.
async fn call<T>(
    endpoint: &Endpoint,
    op: impl std::future::Future<Output = peergrid::Result<T>>,
) -> Outcome<T> {
    tokio::select! {
        _ = endpoint.killed.cancelled() => Outcome::Unknown("the member was killed".into()),
        r = tokio::time::timeout(OP_TIMEOUT, op) => match r {
            Err(_) => Outcome::Unknown("client timeout".into()),
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => classify(e),
        },
    }
}

/// Errors that certainly mean "not done" are failures; any other may hide a done operation.
fn classify<T>(e: Error) -> Outcome<T> {
    match e {
        // A refusal for want of a quorum comes alone only when no attempt may have been
        // applied (otherwise inside RetriesExhausted, which stays unknown).
        Error::LockTimeout { .. } | Error::LockBusy { .. } | Error::QuorumNotPresent { .. } => {
            Outcome::Fail(e.to_string())
        }
        e => Outcome::Unknown(e.to_string()),
    }
}

async fn set_client(shared: Arc<Shared>, worker: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ worker);
    let mut client = shared.new_client();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((slot, endpoint)) = shared.pick(&mut rng) else {
            tokio::time::sleep(FAILED_PAUSE).await;
            continue;
        };
        n += 1;
        // The key names the member slot that served it, so lost writes can be traced.
        let key = format!("set-{client}-{n}@{slot}");
        let map = endpoint.grid.map::<String, u64>("set");
        let invoke = shared.now();
        let outcome = call(&endpoint, map.set(&key, &n)).await;
        let complete = shared.now();
        let entry = shared.record(&mut client, (key, n), invoke, complete, outcome);
        let succeeded = matches!(entry.outcome, Outcome::Ok(_));
        shared.histories.lock().unwrap().set.push(entry);
        pace(succeeded).await;
    }
}

async fn register_client(shared: Arc<Shared>, worker: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (worker << 8));
    let mut client = shared.new_client();
    let mut last_seen: HashMap<String, u64> = HashMap::new();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((_, endpoint)) = shared.pick(&mut rng) else {
            tokio::time::sleep(FAILED_PAUSE).await;
            continue;
        };
        // Each key lives 4 s, so each key's history stays short enough to check exactly.
        let generation = shared.start.elapsed().as_secs() / 4;
        let key = format!("r-{generation}-{}", rng.random_range(0..3));
        n += 1;
        let value = u64::from(client) * 1_000_000 + n;
        let map = endpoint.grid.map::<String, u64>("register");
        let op = match rng.random_range(0..10) {
            0..4 => RegisterOp::Read,
            4..7 => RegisterOp::Write(value),
            _ => RegisterOp::Cas(last_seen.get(&key).copied().unwrap_or(0), value),
        };
        let invoke = shared.now();
        let outcome = match op {
            RegisterOp::Read => call(&endpoint, map.get(&key))
                .await
                .map(RegisterResult::Read),
            RegisterOp::Write(v) => call(&endpoint, map.set(&key, &v))
                .await
                .map(|()| RegisterResult::Written),
            RegisterOp::Cas(from, to) => call(&endpoint, map.replace_if_equal(&key, &from, &to))
                .await
                .map(RegisterResult::Cas),
        };
        let complete = shared.now();
        match (&op, &outcome) {
            (_, Outcome::Ok(RegisterResult::Read(Some(v)))) => {
                last_seen.insert(key.clone(), *v);
            }
            (RegisterOp::Write(v), Outcome::Ok(_))
            | (RegisterOp::Cas(_, v), Outcome::Ok(RegisterResult::Cas(true))) => {
                last_seen.insert(key.clone(), *v);
            }
            _ => {}
        }
        let entry = shared.record(&mut client, op, invoke, complete, outcome);
        let succeeded = matches!(entry.outcome, Outcome::Ok(_));
        shared.histories.lock().unwrap().register.push((key, entry));
        pace(succeeded).await;
    }
}

async fn queue_client(shared: Arc<Shared>, worker: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (worker << 16));
    let mut client = shared.new_client();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((_, endpoint)) = shared.pick(&mut rng) else {
            tokio::time::sleep(FAILED_PAUSE).await;
            continue;
        };
        let queue = endpoint.grid.queue::<u64>("queue");
        let op = if rng.random_bool(0.5) {
            n += 1;
            QueueOp::Offer(u64::from(client) * 1_000_000 + n)
        } else {
            QueueOp::Poll
        };
        let invoke = shared.now();
        let outcome = match op {
            QueueOp::Offer(item) => call(&endpoint, queue.offer(&item))
                .await
                .map(QueueResult::Offered),
            QueueOp::Poll => call(&endpoint, queue.poll()).await.map(QueueResult::Polled),
        };
        let complete = shared.now();
        let entry = shared.record(&mut client, op, invoke, complete, outcome);
        let succeeded = matches!(entry.outcome, Outcome::Ok(_));
        shared.histories.lock().unwrap().queue.push(entry);
        pace(succeeded).await;
    }
}

async fn lock_client(shared: Arc<Shared>, worker: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (worker << 24));
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((_, endpoint)) = shared.pick(&mut rng) else {
            tokio::time::sleep(FAILED_PAUSE).await;
            continue;
        };
        // A fresh holder per acquisition: each grant is a new client of the lock.
        let client = shared.new_client();
        let lock = endpoint.grid.lock("lock");
        let invoke = shared.now();
        let outcome = call(&endpoint, lock.try_lock_for(Duration::from_secs(2))).await;
        let complete = shared.now();
        let guard = {
            let mut h = shared.histories.lock().unwrap();
            match outcome {
                Outcome::Ok(guard) => {
                    h.lock_ops.0 += 1;
                    h.grants.push(Grant {
                        client,
                        fence: guard.fence(),
                        invoke,
                        complete,
                    });
                    Some(guard)
                }
                Outcome::Fail(_) => {
                    h.lock_ops.1 += 1;
                    None
                }
                Outcome::Unknown(_) => {
                    h.lock_ops.2 += 1;
                    None
                }
            }
        };
        let Some(guard) = guard else {
            pace(false).await;
            continue;
        };
        let fence = guard.fence();
        let entered = shared
            .histories
            .lock()
            .unwrap()
            .resource
            .enter(client, fence);
        if entered {
            // The work under the lock, then a write the resource checks.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
            let mut h = shared.histories.lock().unwrap();
            h.resource.write(fence);
            h.resource.leave(client, fence);
        }
        let _ = call(&endpoint, guard.unlock()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRestart,
    Pause,
    IsolateOne,
    MajorityMinority,
    JoinLeave,
}

impl Fault {
    /// The name `PEERGRID_JEPSEN_FAULTS` uses.
    fn key(self) -> &'static str {
        match self {
            Fault::KillRestart => "kill",
            Fault::Pause => "pause",
            Fault::IsolateOne => "isolate",
            Fault::MajorityMinority => "split",
            Fault::JoinLeave => "join-leave",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::KillRestart => "kill and restart",
            Fault::Pause => "pause (SIGSTOP) and resume",
            Fault::IsolateOne => "isolate one member, heal",
            Fault::MajorityMinority => "majority/minority split, heal",
            Fault::JoinLeave => "join one, leave one",
        }
    }
}

/// `op` until it succeeds, retried while it fails for a missing quorum (which changes nothing):
/// as a client would. A member that healed counts its peers for split-brain protection only
/// after their heartbeats, and one that declared members down while it heard none only three
/// tolerances after, so a cluster that converged and is safe may still refuse guarded
/// operations for a moment. Any other error, or a quorum missing for [`RECOVERY`], fails the run.
async fn until_quorate<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = peergrid::Result<T>>,
{
    let until = Instant::now() + RECOVERY;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(Error::QuorumNotPresent { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

/// What a run did and found.
pub struct Summary {
    mode: Mode,
    /// Whether splits cut real links between network namespaces.
    namespaces: bool,
    seed: u64,
    duration: Duration,
    faults: BTreeMap<Fault, u32>,
    /// Each fault: what, on which member, from and to (µs since the start).
    timeline: Vec<(Fault, usize, u64, u64)>,
    /// Invoke times of the lost set writes.
    lost_times: Vec<u64>,
    /// How many lost set writes each partition held.
    lost_partitions: BTreeMap<u32, usize>,
    set_ops: (usize, usize, usize),
    set: checker::SetReport,
    register_ops: (usize, usize, usize),
    register: checker::RegisterReport,
    queue_ops: (usize, usize, usize),
    queue: checker::QueueReport,
    /// What the history says of the first lost queue items.
    queue_detail: Vec<String>,
    lock_ops: (usize, usize, usize),
    lock: checker::LockReport,
    resource: checker::FencedResource,
    grants: Vec<Grant>,
}

impl Summary {
    fn anomalies(&self) -> usize {
        self.set.anomalies()
            + self.register.not_linearizable.len()
            + self.queue.anomalies()
            + self.lock.anomalies(&self.resource)
    }

    pub fn assert_no_anomalies(&self) {
        println!("{self}");
        assert_eq!(self.anomalies(), 0, "anomalies found:\n{self}");
        assert!(self.set.acknowledged > 0 && self.queue.offered > 0 && self.lock.grants > 0);
        assert!(self.register.linearizable > 0);
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops = |(ok, fail, unknown): (usize, usize, usize)| {
            format!("{ok} ok, {fail} failed, {unknown} unknown")
        };
        writeln!(
            f,
            "jepsen run: {:?}{}, seed {}, {:.0} s of operations",
            self.mode,
            if self.namespaces {
                " (splits: network namespaces)"
            } else {
                ""
            },
            self.seed,
            self.duration.as_secs_f64()
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{} x{n}", k.name()))
            .collect();
        writeln!(f, "  faults: {}", faults.join(", "))?;
        for (fault, target, from, to) in &self.timeline {
            writeln!(
                f,
                "    {:>9}..{:<9} {} on member {target}",
                from,
                to,
                fault.name()
            )?;
        }
        if let (Some(first), Some(last)) =
            (self.lost_times.iter().min(), self.lost_times.iter().max())
        {
            let mut slots: BTreeMap<&str, usize> = BTreeMap::new();
            for key in &self.set.lost {
                *slots
                    .entry(key.rsplit_once('@').map_or("?", |(_, slot)| slot))
                    .or_default() += 1;
            }
            writeln!(
                f,
                "  lost set writes were invoked from {first} to {last}; by serving slot {slots:?}; by partition {:?}",
                self.lost_partitions
            )?;
        }
        writeln!(f, "  set:      {}", ops(self.set_ops))?;
        writeln!(
            f,
            "            acknowledged {} all present: lost {}, unexpected {}; unknown {} of which present {}",
            self.set.acknowledged,
            self.set.lost.len(),
            self.set.unexpected.len(),
            self.set.unknown,
            self.set.recovered
        )?;
        writeln!(f, "  register: {}", ops(self.register_ops))?;
        writeln!(
            f,
            "            {} keys: {} linearizable, {} NOT linearizable {:?}, {} undecided",
            self.register.keys,
            self.register.linearizable,
            self.register.not_linearizable.len(),
            self.register.not_linearizable,
            self.register.undecided.len()
        )?;
        if let Some((key, entries)) = &self.register.first_failure {
            writeln!(
                f,
                "            where {key} stops being linearizable (µs since start):"
            )?;
            for e in entries {
                writeln!(
                    f,
                    "              client {:>5} {:>10}..{:<10} {:?} -> {:?}",
                    e.client, e.invoke, e.complete, e.op, e.outcome
                )?;
            }
        }
        writeln!(f, "  queue:    {}", ops(self.queue_ops))?;
        writeln!(
            f,
            "            offered {} (unknown {}), polled {} (unknown polls {}): duplicated {}, invented {}, missing {} (lost beyond unknown polls: {})",
            self.queue.offered,
            self.queue.offers_unknown,
            self.queue.polled,
            self.queue.polls_unknown,
            self.queue.duplicated.len(),
            self.queue.invented.len(),
            self.queue.missing.len(),
            self.queue.lost()
        )?;
        if !self.queue.duplicated.is_empty() {
            let shown = &self.queue.duplicated[..self.queue.duplicated.len().min(10)];
            writeln!(f, "              polled twice: {shown:?}")?;
        }
        for line in &self.queue_detail {
            writeln!(f, "              {line}")?;
        }
        writeln!(f, "  lock:     {}", ops(self.lock_ops))?;
        writeln!(
            f,
            "            {} grants: tokens reused {}, decreasing {}; resource: {} accepted, {} stale refused, {} fenced takeovers, {} overlaps",
            self.lock.grants,
            self.lock.reused_tokens.len(),
            self.lock.decreasing.len(),
            self.resource.accepted,
            self.resource.refused_stale,
            self.resource.takeovers,
            self.resource.overlaps.len()
        )?;
        if let Some(fence) = self.lock.reused_tokens.first() {
            writeln!(
                f,
                "            grants with token {fence}: {:?}",
                self.grants
                    .iter()
                    .filter(|g| g.fence == *fence)
                    .collect::<Vec<_>>()
            )?;
        }
        if let Some((_, fence)) = self.lock.decreasing.first() {
            writeln!(
                f,
                "            grants with token {fence}: {:?}",
                self.grants
                    .iter()
                    .filter(|g| g.fence == *fence)
                    .collect::<Vec<_>>()
            )?;
        }
        write!(f, "  anomalies: {}", self.anomalies())
    }
}

/// Runs `config` on a runtime of its own. A process run uses network namespaces when it can
/// (the runtime's threads then live in this process's namespace), and says so when it cannot.
///
/// A process run that asks only for splits, where network namespaces cannot be made, falls
/// back to in-process members split through the fault switch (and says so).
pub fn run_blocking(mut config: RunConfig) -> Summary {
    let net = match config.mode {
        Mode::InProcess => None,
        Mode::Processes => match Namespaces::create() {
            Ok(net) => Some(net),
            Err(why)
                if config
                    .faults
                    .iter()
                    .all(|f| ["isolate", "split"].contains(f)) =>
            {
                println!(
                    "network namespaces cannot be used ({why}): splitting in-process members \
                     through the fault switch instead"
                );
                config.mode = Mode::InProcess;
                None
            }
            Err(why) => {
                println!(
                    "network namespaces cannot be used ({why}): this run has no splits; the \
                     in-process run splits members through the fault switch"
                );
                None
            }
        },
    };
    let space = net.as_ref().map(|n| n.name(0).to_string());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(4).enable_all();
    if let Some(space) = space.clone() {
        builder.on_thread_start(move || {
            crate::netns::enter(&space).expect("a runtime thread enters the namespace")
        });
    }
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Some(space) = &space {
                    crate::netns::enter(space).expect("the run's thread enters the namespace");
                }
                let runtime = builder.build().expect("a runtime");
                runtime.block_on(run(config, net))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn run(config: RunConfig, net: Option<Namespaces>) -> Summary {
    let namespaces = net.is_some();
    let mut cluster = Cluster::start(config.mode, net).await;
    let shared = Arc::new(Shared {
        start: Instant::now(),
        endpoints: cluster.endpoints.clone(),
        histories: Mutex::new(Histories::default()),
        next_client: AtomicU32::new(1),
        stop: AtomicBool::new(false),
    });
    let mut clients = Vec::new();
    for worker in 0..3 {
        clients.push(tokio::spawn(set_client(
            shared.clone(),
            worker,
            config.seed,
        )));
        clients.push(tokio::spawn(register_client(
            shared.clone(),
            worker,
            config.seed,
        )));
        clients.push(tokio::spawn(queue_client(
            shared.clone(),
            worker,
            config.seed,
        )));
    }
    for worker in 0..2 {
        clients.push(tokio::spawn(lock_client(
            shared.clone(),
            worker,
            config.seed,
        )));
    }

    let mut rng = SmallRng::seed_from_u64(config.seed);
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut timeline = Vec::new();
    let kinds: &[Fault] = match config.mode {
        Mode::InProcess => &[
            Fault::KillRestart,
            Fault::IsolateOne,
            Fault::MajorityMinority,
            Fault::JoinLeave,
        ],
        Mode::Processes if namespaces => &[
            Fault::KillRestart,
            Fault::Pause,
            Fault::IsolateOne,
            Fault::MajorityMinority,
            Fault::JoinLeave,
        ],
        Mode::Processes => &[Fault::KillRestart, Fault::Pause, Fault::JoinLeave],
    };
    let kinds: Vec<Fault> = kinds
        .iter()
        .copied()
        .filter(|k| config.faults.is_empty() || config.faults.contains(&k.key()))
        .collect();
    assert!(
        !kinds.is_empty(),
        "no fault of {:?} applies to {:?}",
        config.faults,
        config.mode
    );
    let first = rng.random_range(0..kinds.len());
    let mut round = 0;
    let until = Instant::now() + config.duration;
    while Instant::now() < until {
        // Quiet time between faults.
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        // Every kind in turn, from a seeded starting point, so a short run sees each.
        let fault = kinds[(round + first) % kinds.len()];
        round += 1;
        let targets = cluster.faultable();
        if targets.is_empty() {
            continue;
        }
        let target = targets[rng.random_range(0..targets.len())];
        let hold = Duration::from_millis(rng.random_range(2000..6000));
        tracing::info!(?fault, target, "fault");
        let fault_start = shared.now();
        match fault {
            Fault::KillRestart => {
                cluster.kill(target).await;
                tokio::time::sleep(hold).await;
                cluster.restart(target).await;
            }
            Fault::Pause => {
                cluster.pause(target);
                tokio::time::sleep(hold).await;
                cluster.resume(target);
            }
            Fault::IsolateOne => {
                cluster.split(&[target]);
                tokio::time::sleep(hold).await;
                cluster.heal();
            }
            Fault::MajorityMinority => {
                let minority = cluster.minority(target, &mut rng);
                tracing::info!(?minority, "split");
                cluster.split(&minority);
                tokio::time::sleep(hold).await;
                cluster.heal();
            }
            Fault::JoinLeave => {
                match config.mode {
                    Mode::InProcess => cluster.add_local(None).await,
                    Mode::Processes => {
                        cluster.add_process().await;
                    }
                }
                cluster.wait_healthy().await;
                tokio::time::sleep(hold / 2).await;
                cluster.leave(target).await;
            }
        }
        *faults.entry(fault).or_default() += 1;
        timeline.push((fault, target, fault_start, shared.now()));
        cluster.wait_healthy().await;
    }
    let elapsed = shared.start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    cluster.heal();
    cluster.wait_healthy().await;

    // Final reads, through a member of this process, once the cluster is safe.
    let grid = cluster.observer();
    let histories = std::mem::take(&mut *shared.histories.lock().unwrap());
    let keys: Vec<String> = histories.set.iter().map(|e| e.op.0.clone()).collect();
    let map = grid.map::<String, u64>("set");
    let mut final_read = HashMap::new();
    for chunk in keys.chunks(1000) {
        final_read.extend(until_quorate("final read", || map.get_all(chunk)).await);
    }
    let size = until_quorate("final size", || map.size()).await;
    let mut set = checker::check_set(&histories.set, &final_read);
    if size > final_read.len() as u64 {
        set.unexpected.push(format!(
            "{} entries no client added",
            size - final_read.len() as u64
        ));
    }
    let queue = grid.queue::<u64>("queue");
    let mut drained = Vec::new();
    loop {
        let batch = until_quorate("final drain", || queue.drain(1000)).await;
        if batch.is_empty() {
            break;
        }
        drained.extend(batch);
    }
    let queue = checker::check_queue(&histories.queue, &drained);
    let summary = Summary {
        mode: config.mode,
        namespaces,
        seed: config.seed,
        duration: elapsed,
        faults,
        timeline,
        lost_partitions: {
            let mut by = BTreeMap::new();
            for key in &set.lost {
                if let Ok(p) = map.partition_of(key) {
                    *by.entry(p).or_default() += 1;
                }
            }
            by
        },
        lost_times: {
            let lost: std::collections::HashSet<&String> = set.lost.iter().collect();
            histories
                .set
                .iter()
                .filter(|e| lost.contains(&e.op.0))
                .map(|e| e.invoke)
                .collect()
        },
        set_ops: checker::outcomes(&histories.set),
        set,
        register_ops: {
            let entries: Vec<_> = histories.register.iter().map(|(_, e)| e.clone()).collect();
            checker::outcomes(&entries)
        },
        register: checker::check_registers(&histories.register, 2_000_000),
        queue_ops: checker::outcomes(&histories.queue),
        queue_detail: {
            // Each lost item's offer, and the polls of unknown outcome after it was offered.
            let mut detail = Vec::new();
            for item in queue.missing.iter().take(5) {
                let offer = histories
                    .queue
                    .iter()
                    .find(|e| e.op == QueueOp::Offer(*item));
                detail.push(format!("missing {item}: offered {offer:?}"));
                if let Some(offer) = offer {
                    let unknown = histories.queue.iter().filter(|e| {
                        e.op == QueueOp::Poll
                            && e.complete >= offer.invoke
                            && matches!(e.outcome, Outcome::Unknown(_))
                    });
                    for e in unknown.take(5) {
                        detail.push(format!("  poll with unknown outcome after it: {e:?}"));
                    }
                }
            }
            // Each item polled twice: the polls that returned it (and whether the final drain
            // did).
            for item in queue.duplicated.iter().take(5) {
                let polls: Vec<_> = histories
                    .queue
                    .iter()
                    .filter(|e| e.outcome == Outcome::Ok(QueueResult::Polled(Some(*item))))
                    .map(|e| (e.client, e.invoke, e.complete))
                    .collect();
                let drained = drained.contains(item);
                detail.push(format!(
                    "polled twice {item}: polls (client, invoke, complete) {polls:?}, in the final drain {drained}"
                ));
            }
            detail
        },
        queue,
        lock_ops: histories.lock_ops,
        lock: checker::check_lock(&histories.grants),
        grants: histories.grants.clone(),
        resource: histories.resource,
    };
    let keep_logs = summary.anomalies() > 0;
    if keep_logs {
        println!("member process logs kept in {}", cluster.dir.display());
    }
    cluster.stop(keep_logs).await;
    summary
}
