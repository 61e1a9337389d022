//! [`Grid`]: a running member. [`Grid::join`] starts every background task; [`Grid::leave`] stops
//! them in order; dropping the last handle stops them at once, which peers see as a crash.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::GridConfig;
use crate::error::{Error, Result};
use crate::events::EventStream;
use crate::map::Map;
use crate::membership::driver::{Command, Driver, DriverConfig};
use crate::membership::frame;
use crate::membership::identity::Identity;
use crate::membership::{
    DatagramStats, Member, MemberId, MembershipEvent, MembershipEvents, MembershipState,
};
use crate::node::Node;
use crate::partition::coordinator;
use crate::partition::table::TableHolder;
use crate::partition::{PartitionEvent, PartitionStats};
use crate::rpc::client::{ClientSecurity, RpcClients};
use crate::rpc::proto::MemberInfoRequest;
use crate::rpc::server::{self, PeerGridService, ServerSecurity};
use crate::security::Keyring;
use crate::store::Store;
use crate::store::replication::{Deps, Replication};

/// A running member of a peergrid cluster.
///
/// Cloning is cheap (a reference count) and every clone is the same member. The member runs until
/// [`Grid::leave`] is called or the last clone is dropped. Dropping without `leave` stops every
/// task at once and tells no one, so peers see a crash and detect it with the failure detector.
#[derive(Clone)]
pub struct Grid {
    inner: Arc<Inner>,
}

struct Inner {
    config: GridConfig,
    node: Arc<Node>,
    membership: Arc<MembershipState>,
    rpc: Arc<RpcClients>,
    commands: mpsc::Sender<Command>,
    /// Fired on leave or drop; every task watches it.
    cancel: CancellationToken,
    /// Background tasks, taken by `leave` to await them. A std mutex: never held across `.await`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    left: AtomicBool,
    /// Where `/metrics` and `/health` are served, if they are.
    metrics_addr: Option<SocketAddr>,
}

/// A member as the parts of it that must not keep it alive see it (the rpc server, for the
/// calls of tools outside the cluster): filled once the member is built, empty after it is gone.
#[derive(Clone, Default)]
pub(crate) struct GridSlot(Arc<std::sync::OnceLock<std::sync::Weak<Inner>>>);

impl GridSlot {
    /// The member, while it runs.
    pub(crate) fn get(&self) -> Option<Grid> {
        let inner = self.0.get()?.upgrade()?;
        Some(Grid { inner })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Grid {
    /// Starts a member: binds the gossip and rpc sockets, starts the rpc server and the membership
    /// task, and contacts the seeds. Returns once a seed answered, or after
    /// [`GridConfig::join_timeout`] with this member alone (it keeps contacting the seeds in the
    /// background, so late seeds still merge). With no seeds it returns at once.
    ///
    /// Must be called within a tokio runtime.
    pub async fn join(config: GridConfig) -> Result<Grid> {
        config.validate()?;
        let keys = Arc::new(Keyring::new(&config.cluster_name, &config.security));
        let tls = crate::security::load_configured_tls(&config.security)?;
        let (udp, tcp) = bind(&config).await?;
        let gossip_addr = match config.gossip_advertise {
            Some(addr) => addr,
            None => local_addr(&udp.local_addr(), config.gossip_bind, "gossip (udp)")?,
        };
        let rpc_addr = match config.rpc_advertise {
            Some(addr) => addr,
            None => local_addr(&tcp.local_addr(), config.rpc_bind, "rpc (tcp)")?,
        };
        let id = MemberId::random();
        let name = config
            .member_name
            .clone()
            .unwrap_or_else(|| format!("member-{gossip_addr}"));
        let identity = Identity::new(id, gossip_addr, rpc_addr, Arc::from(name.as_str()));
        let membership = Arc::new(MembershipState::new(
            identity.clone(),
            config.swim.heartbeat_tolerance(),
        ));
        let cluster_hash = frame::cluster_hash(&config.cluster_name);
        let cancel = CancellationToken::new();

        let rpc = Arc::new(RpcClients::new(
            cluster_hash,
            Some(&identity),
            config.rpc_timeout,
            config.rpc_connect_timeout,
            config.fault_switch.clone(),
            config.max_message_size(),
            ClientSecurity {
                credential: keys.rpc_credential().map(str::to_string),
                tls: tls.as_ref().map(|t| t.client.clone()),
            },
        ));
        let table = Arc::new(TableHolder::new(config.partition_count));
        let store = Arc::new(Store::new(config.partition_count));
        let node = Arc::new(Node {
            config: config.clone(),
            me: id,
            membership: membership.clone(),
            rpc: rpc.clone(),
            table: table.clone(),
            store: store.clone(),
            replication: Replication::new(Deps {
                me: id,
                store,
                rpc: rpc.clone(),
                membership: membership.clone(),
                table,
                cancel: cancel.clone(),
                give_up_after: config.rpc_timeout,
                snapshot_backlog: Default::default(),
                snapshot_bytes_sent: Default::default(),
                chunk_size: config.snapshot_chunk_size,
                fault_switch: config.fault_switch.clone(),
            }),
            cancel: cancel.clone(),
            table_lock: std::sync::Mutex::new(()),
            disagreement: std::sync::Mutex::new(None),
            listed_but_down: Default::default(),
            leaving: std::sync::Mutex::new(Default::default()),
            partition_events: tokio::sync::broadcast::channel(1024).0,
            stats: Default::default(),
            map_counters: Default::default(),
            loads: Default::default(),
            entry_events: tokio::sync::broadcast::channel(8192).0,
            near_caches: Default::default(),
            queue_indexes: Default::default(),
            queue_signals: Default::default(),
            led_cache: AtomicU64::new(0),
            lock_signals: (0..config.partition_count)
                .map(|_| tokio::sync::Notify::new())
                .collect(),
            started: std::time::Instant::now(),
            latency: crate::metrics::OpLatency::new(),
            quorum_guarded: config.has_split_brain_protection(),
            merge: Default::default(),
        });
        let slot = GridSlot::default();
        let server_task = server::spawn(
            tcp,
            PeerGridService {
                grid: slot.clone(),
                membership: membership.clone(),
                node: node.clone(),
                cluster_name: Arc::from(config.cluster_name.as_str()),
                cluster_hash,
                partition_count: config.partition_count,
                closed: cancel.clone(),
            },
            cancel.clone(),
            config.max_message_size(),
            ServerSecurity {
                keys: keys.clone(),
                tls: tls.map(|t| t.server),
            },
        );

        let (commands, command_rx) = mpsc::channel(8);
        let driver = Driver::new(
            DriverConfig {
                identity,
                swim: config
                    .swim
                    .to_foca(config.max_datagram_size - frame::OVERHEAD),
                cluster_hash,
                seeds: config.seeds.clone(),
                seed_retry_interval: config.seed_retry_interval,
                max_datagram_size: config.max_datagram_size,
                fault_switch: config.fault_switch.clone(),
                probe_interval: config.split_brain_probe_interval,
                remember_down: config.swim.remove_down_after,
                keys,
                replay_window: config.security.replay_window,
                heartbeat_interval: config
                    .has_split_brain_protection()
                    .then(|| config.swim.heartbeat_interval()),
            },
            udp,
            membership.clone(),
        );
        // The member's long-lived tasks log inside a span naming it: several members in one
        // process (tests, demos) stay told apart.
        let span = tracing::info_span!("member", id = %id);
        let driver_task = tokio::spawn(
            driver
                .run(command_rx, cancel.clone())
                .instrument(span.clone()),
        );
        let cleanup_task = tokio::spawn(
            forget_gone_peers(membership.subscribe(), node.clone(), cancel.clone())
                .instrument(span.clone()),
        );

        let has_seeds = config.seeds.iter().any(|s| *s != gossip_addr);
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind {
                        what: "metrics (http)",
                        tried: addr,
                        attempts: 1,
                        source,
                    })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let grid = Grid {
            inner: Arc::new(Inner {
                membership: membership.clone(),
                rpc,
                commands,
                cancel,
                tasks: Mutex::new(vec![driver_task, server_task, cleanup_task]),
                left: AtomicBool::new(false),
                node: node.clone(),
                config,
                metrics_addr,
            }),
        };
        let _ = slot.0.set(Arc::downgrade(&grid.inner));
        if let Some(listener) = metrics_listener {
            let task = tokio::spawn(serve_metrics(
                listener,
                Arc::downgrade(&grid.inner),
                grid.inner.cancel.clone(),
            ));
            grid.inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        tracing::info!(member = %id, %gossip_addr, %rpc_addr, "member started");
        if has_seeds {
            let mut connected = membership.subscribe_connected();
            let joined =
                tokio::time::timeout(grid.inner.config.join_timeout, connected.wait_for(|c| *c))
                    .await;
            if joined.is_err() {
                tracing::info!("no seed answered; starting alone");
            }
        }
        // Only now, with the seeds' answers in the view, may this member decide whether it is the
        // oldest and so the coordinator. Have a table before returning, so the first operation
        // does not wait for one.
        coordinator::step(&node).await;
        let coordinator_task =
            tokio::spawn(coordinator::run(node.clone()).instrument(span.clone()));
        let anti_entropy_task =
            tokio::spawn(crate::store::anti_entropy::run(node.clone()).instrument(span.clone()));
        let expiry_task =
            tokio::spawn(crate::store::expiry::run(node.clone()).instrument(span.clone()));
        let lock_task =
            tokio::spawn(crate::lock::owner::run(node.clone()).instrument(span.clone()));
        let merge_task = tokio::spawn(
            crate::split_brain::merge::run(node.clone(), grid.inner.commands.clone())
                .instrument(span),
        );
        grid.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([
                coordinator_task,
                anti_entropy_task,
                expiry_task,
                lock_task,
                merge_task,
            ]);
        Ok(grid)
    }

    /// This member.
    pub fn local_member(&self) -> Member {
        self.inner.membership.local_member()
    }

    /// Every live member as this member sees it, itself first.
    pub fn members(&self) -> Vec<Member> {
        self.inner.membership.members()
    }

    /// A stream of membership changes from now on.
    pub fn membership_events(&self) -> MembershipEvents {
        self.inner.membership.subscribe()
    }

    /// Counters of the gossip socket: datagrams sent, received, and dropped by reason.
    pub fn datagram_stats(&self) -> DatagramStats {
        self.inner.membership.stats()
    }

    /// Counters of this member's migrations, partition losses and repairs since it started
    /// (the partition-lost counter is the metric behind [`PartitionEvent::Lost`]).
    pub fn partition_stats(&self) -> PartitionStats {
        use std::sync::atomic::Ordering::Relaxed;
        let node = &self.inner.node;
        let c = &node.stats;
        PartitionStats {
            migrations_started: c.migrations_started.load(Relaxed),
            migrations_finished: c.migrations_finished.load(Relaxed),
            partitions_lost: c.partitions_lost.load(Relaxed),
            migration_bytes_received: c.migration_bytes_received.load(Relaxed),
            migration_bytes_sent: c.migration_bytes_sent.load(Relaxed),
            backup_snapshot_bytes_sent: node.replication.snapshot_bytes_sent(),
            anti_entropy_repairs: c.anti_entropy_repairs.load(Relaxed),
        }
    }

    /// Counters of this member's merges after network splits (see [`crate::MergePolicy`] for
    /// what a merge does): how often it merged its cluster into a larger one, and what it
    /// handed over.
    pub fn split_brain_stats(&self) -> crate::SplitBrainStats {
        self.inner.node.merge.stats()
    }

    /// A snapshot of this member's figures: members, partitions led and backed up, migrations,
    /// per-map statistics (hits, misses, entries, bytes, near cache), replication lag, map
    /// operation latency and gossip drops. Served as Prometheus text on `/metrics` when
    /// [`GridConfig::metrics_bind`] is set. Counting each map's entries scans them: meant for a
    /// scrape every few seconds, not a hot path.
    pub fn metrics(&self) -> crate::Metrics {
        let node = &self.inner.node;
        let table = node.table.current();
        let (mut owned, mut backed_up) = (0, 0);
        for p in 0..table.partition_count() {
            if table.primary(p) == Some(node.me) {
                owned += 1;
            } else if table.replicas(p).contains(&node.me) {
                backed_up += 1;
            }
        }
        let mut names: Vec<std::sync::Arc<str>> = node
            .map_counters
            .iter()
            .map(|e| e.key().clone())
            .chain(node.near_caches.iter().map(|e| e.key().clone()))
            .filter(|name| !name.starts_with('\0'))
            .collect();
        names.sort();
        names.dedup();
        let maps = names
            .into_iter()
            .map(|name| {
                let mut stats = node.map_stats(&name);
                // Clone the cache out; no map guard outlives this statement.
                let near = node.near_caches.get(&name).map(|n| n.value().clone());
                if let Some(near) = near {
                    stats.add_near_cache(&near.stats());
                }
                (name.to_string(), stats)
            })
            .collect();
        crate::Metrics {
            members: self.inner.membership.members().len(),
            partition_count: table.partition_count(),
            partitions_owned: owned,
            partitions_backed_up: backed_up,
            migrations: self.partition_stats(),
            maps,
            replication_lag: node.replication.lag(),
            read_latency: crate::metrics::OpLatency::summary(&node.latency.reads),
            write_latency: crate::metrics::OpLatency::summary(&node.latency.writes),
            datagrams: self.datagram_stats(),
        }
    }

    /// Where `/metrics` and `/health` are served ([`GridConfig::metrics_bind`]), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.inner.metrics_addr
    }

    /// Whether this member is ready to serve: running, joined (it holds a partition table), and
    /// the cluster safe ([`Grid::is_safe`]: every partition led and backed up, backups in
    /// sync). What `/health` answers.
    pub async fn is_ready(&self) -> bool {
        !self.inner.left.load(Ordering::SeqCst)
            && self.inner.membership.is_established()
            && self.is_safe().await.unwrap_or(false)
    }

    /// The configuration this member runs with.
    pub fn config(&self) -> &GridConfig {
        &self.inner.config
    }

    /// A handle to the distributed map `name`. Cheap: no call is made until the first operation.
    /// Handles with the same name on any member reach the same entries.
    pub fn map<K, V>(&self, name: &str) -> Map<K, V>
    where
        K: serde::Serialize,
        V: serde::Serialize + serde::de::DeserializeOwned,
    {
        Map::new(self.inner.node.clone(), name)
    }

    /// A handle to the distributed queue `name`. Cheap: no call is made until the first
    /// operation. Handles with the same name on any member reach the same queue.
    pub fn queue<T>(&self, name: &str) -> crate::Queue<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        crate::Queue::new(self.inner.node.clone(), name)
    }

    /// A handle to the distributed lock `name`: a new holder (see [`crate::Lock`]). Cheap: no
    /// call is made until the first operation. Handles with the same name on any member reach
    /// the same lock.
    pub fn lock(&self, name: &str) -> crate::Lock {
        crate::Lock::new(self.inner.node.clone(), name)
    }

    /// The partition table this member currently routes by.
    pub fn partition_table(&self) -> PartitionTableView {
        let table = self.inner.node.table.current();
        PartitionTableView {
            version: table.version,
            replicas: table.replicas.clone(),
        }
    }

    /// What this member holds of `partition` (as primary or backup): the sequence number of the
    /// last mutation applied, the number of entries, and an order-independent digest of every
    /// map, key, value and version. Two replicas with equal sequence and digest hold the same
    /// data. `None` for a partition id out of range.
    pub fn local_replica(&self, partition: u32) -> Option<ReplicaState> {
        let (seq, entries, digest) = self.inner.node.store.replica_state(partition)?;
        Some(ReplicaState {
            seq,
            entries,
            digest,
        })
    }

    /// A stream of this member's partition events: takeovers started and finished, and
    /// partitions whose every replica was lost.
    pub fn partition_events(&self) -> EventStream<PartitionEvent> {
        EventStream::new(self.inner.node.partition_events.subscribe())
    }

    /// Whether the cluster is safe, like Hazelcast's `isClusterSafe`: every member routes by the
    /// same table and answers, no partition is being taken over, no member is still handing
    /// over what it captured in a split-brain merge, no backup is waiting for a
    /// snapshot (a new backup, or one that fell behind), every partition has its full backup set
    /// on live members, and every backup is in sync with its primary: it trails it at most by
    /// mutations in flight, and at an equal sequence number holds the same data (equal digest).
    /// A member that does not answer makes it unsafe. Costs two calls per member and scans of
    /// the data; meant for operations and tests, not a hot path.
    ///
    /// The members are asked twice, and each backup's first answer is compared with its
    /// primary's second: answers to one round arrive at different moments, and under writes a
    /// backup asked after its primary rightly shows mutations the primary's answer predates.
    pub async fn is_safe(&self) -> Result<bool> {
        self.ensure_running()?;
        let members = self.inner.membership.members();
        let Some(backups_seen) = self.replica_states_of(&members).await else {
            return Ok(false);
        };
        let Some(states) = self.replica_states_of(&members).await else {
            return Ok(false);
        };
        let node = &self.inner.node;
        let moved = backups_seen.iter().any(|(id, s)| {
            states.get(id).is_none_or(|t| {
                (s.table_version, s.table_publisher) != (t.table_version, t.table_publisher)
            })
        });
        if moved {
            tracing::debug!("not safe: the table moved while the members were asked");
            return Ok(false);
        }
        let table = node.table.current();
        let expected_replicas =
            (usize::from(self.inner.config.backup_count) + 1).min(members.len());
        let same_table = states.values().all(|s| {
            (s.table_version, s.table_publisher) == (table.version, table.publisher.as_u64())
        });
        let quiet = states
            .values()
            .all(|s| s.pending == 0 && s.snapshot_backlog == 0);
        if table.version == 0 || !same_table || !quiet {
            tracing::debug!(
                version = table.version,
                same_table,
                quiet,
                "not safe: tables differ or a migration is under way"
            );
            return Ok(false);
        }
        // No migration left: the table is the target for the live members (less those leaving).
        let leaving = node
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let staying: Vec<MemberId> = members
            .iter()
            .map(|m| m.id)
            .filter(|m| !leaving.contains(m))
            .collect();
        if !staying.is_empty()
            && table.replicas
                != crate::partition::assignment::assign(
                    &staying,
                    self.inner.config.partition_count,
                    self.inner.config.backup_count,
                )
        {
            tracing::debug!(
                version = table.version,
                "not safe: the table is not at its target yet"
            );
            return Ok(false);
        }
        let positions = |states: &std::collections::HashMap<
            MemberId,
            crate::rpc::proto::ReplicaStatesResponse,
        >| {
            states
                .iter()
                .flat_map(|(id, s)| {
                    s.partitions
                        .iter()
                        .map(move |p| ((*id, p.partition), (p.seq, p.digest)))
                })
                .collect::<std::collections::HashMap<(MemberId, u32), (u64, u64)>>()
        };
        let held = positions(&states);
        let held_before = positions(&backups_seen);
        let in_sync = (0..table.partition_count()).all(|p| {
            let replicas = table.replicas(p);
            let Some(&first) = replicas.first() else {
                return false;
            };
            let primary = held.get(&(first, p));
            // A backup may trail its primary by mutations in flight (a synchronous write is
            // acknowledged only once they arrive), never lead it, and at the same sequence
            // number it holds the same data.
            let backup_ok = |m: &MemberId| match (held_before.get(&(*m, p)), primary) {
                (Some(b), Some(p)) => b.0 < p.0 || b == p,
                _ => false,
            };
            let ok = replicas.len() == expected_replicas
                && replicas.iter().all(|m| states.contains_key(m))
                && replicas[1..].iter().all(backup_ok);
            if !ok {
                tracing::debug!(
                    partition = p,
                    ?replicas,
                    primary = ?primary,
                    backups = ?replicas[1..].iter().map(|m| held_before.get(&(*m, p))).collect::<Vec<_>>(),
                    "not safe: a partition's backups are not in step"
                );
            }
            ok
        });
        Ok(in_sync)
    }

    /// Every member's replica states, or `None` if one does not answer.
    async fn replica_states_of(
        &self,
        members: &[Member],
    ) -> Option<std::collections::HashMap<MemberId, crate::rpc::proto::ReplicaStatesResponse>> {
        let node = &self.inner.node;
        let calls = members.iter().map(|m| async move {
            if m.id == node.me {
                return Some((m.id, node.replica_states(&[])));
            }
            let mut call = node.peer_client(m.id).ok()?;
            let request = self
                .inner
                .rpc
                .request(crate::rpc::proto::ReplicaStatesRequest::default());
            let response = call.client.replica_states(request).await.ok()?;
            Some((m.id, response.into_inner()))
        });
        let mut states = std::collections::HashMap::new();
        for (answer, member) in futures::future::join_all(calls)
            .await
            .into_iter()
            .zip(members)
        {
            let Some((id, state)) = answer else {
                tracing::debug!(member = %member.id, "not safe: a member did not report its replicas");
                return None;
            };
            states.insert(id, state);
        }
        Some(states)
    }

    /// Waits until [`Grid::is_safe`] holds, checking every 50 ms; [`Error::Timeout`] if it does
    /// not within `timeout`.
    pub async fn wait_safe(&self, timeout: std::time::Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_safe().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: "wait_safe",
                    member: self.inner.node.me,
                    after: timeout,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Sends `payload` to member `id` and returns it as echoed: one round trip through the
    /// member-to-member rpc path with no other work (a diagnostic like Redis' `PING`, and the
    /// floor that benchmarks compare remote operations with).
    pub async fn echo(&self, id: MemberId, payload: bytes::Bytes) -> Result<bytes::Bytes> {
        self.ensure_running()?;
        let mut call = self.inner.node.peer_client(id)?;
        let request = self
            .inner
            .rpc
            .request(crate::rpc::proto::EchoMessage { payload });
        Ok(call
            .client
            .echo(request)
            .await
            .map_err(|status| call.error("echo", status))?
            .into_inner()
            .payload)
    }

    /// Asks member `id` over rpc to describe itself (this member answers for itself directly).
    ///
    /// Errors: [`Error::UnknownMember`] if `id` is not live in this member's view,
    /// [`Error::Unreachable`] or [`Error::Timeout`] if the call fails, [`Error::Shutdown`] after
    /// [`Grid::leave`].
    pub async fn member_info(&self, id: MemberId) -> Result<Member> {
        self.ensure_running()?;
        let local = self.inner.membership.local_member();
        if id == local.id {
            return Ok(local);
        }
        let mut call = self.inner.node.peer_client(id)?;
        let request = self.inner.rpc.request(MemberInfoRequest {});
        let response = call
            .client
            .member_info(request)
            .await
            .map_err(|status| call.error("member_info", status))?
            .into_inner();
        let parse = |s: &str| -> Result<SocketAddr> {
            s.parse().map_err(|_| Error::Remote {
                member: id,
                code: tonic::Code::Internal,
                message: format!("peer sent a bad address {s:?}"),
            })
        };
        Ok(Member {
            id: MemberId(response.member_id),
            name: response.name,
            gossip_addr: parse(&response.gossip_addr)?,
            rpc_addr: parse(&response.rpc_addr)?,
            generation: response.generation,
            is_local: false,
        })
    }

    /// Leaves the cluster gracefully: first hands every partition off (the coordinator assigns
    /// this member nothing, and the new owners pull its data while it is still here; bounded by
    /// [`GridConfig::leave_timeout`]), then tells the peers (they see [`MembershipEvent::Left`]
    /// within moments), stops every background task and returns once all have stopped. With
    /// backups configured nothing depends on the handoff; with backup count 0 it is what keeps
    /// the data. Calling it again, from any clone, returns `Ok(())` at once.
    pub async fn leave(&self) -> Result<()> {
        if self.inner.left.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.hand_off().await;
        let (done, announced) = oneshot::channel();
        if self.inner.commands.send(Command::Leave(done)).await.is_ok() {
            // The driver answers once the leave datagrams are sent; if it is gone, so are we.
            let _ = announced.await;
        }
        self.inner.cancel.cancel();
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }

    /// Announces the leave to the coordinator and waits until every partition is off this
    /// member, or until `leave_timeout`.
    async fn hand_off(&self) {
        let node = &self.inner.node;
        if self.inner.membership.peer_count() == 0 {
            return;
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.inner.config.leave_timeout;
        while tokio::time::Instant::now() < deadline {
            if node.handed_off().await {
                tracing::info!(took = ?started.elapsed(), "partitions handed off");
                return;
            }
            let someone_stays = match node.coordinator() {
                Some(c) if c == node.me => {
                    let stays = node.mark_leaving(node.me);
                    coordinator::step(node).await;
                    stays
                }
                Some(c) => match node.peer_client(c) {
                    Ok(mut call) => {
                        let request = self.inner.rpc.request(crate::rpc::proto::LeavingRequest {
                            member: node.me.as_u64(),
                        });
                        call.client
                            .leaving(request)
                            .await
                            .map_or(true, |r| r.into_inner().someone_stays)
                    }
                    Err(_) => true,
                },
                None => false,
            };
            if !someone_stays {
                tracing::info!("every member is leaving; nothing to hand off to");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::warn!("leave timeout passed before every partition was handed off");
    }

    fn ensure_running(&self) -> Result<()> {
        if self.inner.left.load(Ordering::SeqCst) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }
}

/// A copy of a partition table, from [`Grid::partition_table`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionTableView {
    /// The table's version; every new table the coordinator publishes has a higher one.
    pub version: u64,
    /// Per partition: the primary first, then the backups. Empty before the first table.
    pub replicas: Vec<Vec<MemberId>>,
}

/// What a member holds of one partition, from [`Grid::local_replica`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaState {
    /// Sequence number of the last mutation applied.
    pub seq: u64,
    /// Number of entries, over all maps.
    pub entries: u64,
    /// Order-independent digest of every map name, key, value and version.
    pub digest: u64,
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let me = self.local_member();
        f.debug_struct("Grid")
            .field("member", &me.id)
            .field("gossip", &me.gossip_addr)
            .field("members", &self.inner.membership.peer_count())
            .finish()
    }
}

/// Drops the rpc channels and replication queues of members that went down or left.
async fn forget_gone_peers(
    mut events: MembershipEvents,
    node: Arc<Node>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            event = events.recv() => match event {
                Some(MembershipEvent::Down(m) | MembershipEvent::Left(m)) => {
                    node.replication.forget(m.id);
                    node.rpc.forget(m.id);
                    node.leaving
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&m.id);
                }
                Some(_) => {}
                None => return,
            },
        }
    }
}

fn local_addr(
    bound: &std::io::Result<SocketAddr>,
    configured: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr> {
    match bound {
        Ok(addr) => Ok(*addr),
        Err(e) => Err(Error::Bind {
            what,
            tried: configured,
            attempts: 1,
            source: std::io::Error::new(e.kind(), e.to_string()),
        }),
    }
}

/// Binds the gossip and rpc sockets. A non-zero port that is taken moves both sockets up one port
/// at a time, up to `port_count` attempts, so they keep the same offset (the same number with the
/// default settings). A zero port is ephemeral and tried once.
async fn bind(config: &GridConfig) -> Result<(UdpSocket, TcpListener)> {
    let attempts = if config.gossip_bind.port() == 0 && config.rpc_bind.port() == 0 {
        1
    } else {
        config.port_count
    };
    let at = |base: SocketAddr, offset: u16| -> Option<SocketAddr> {
        if base.port() == 0 {
            return Some(base);
        }
        let port = base.port().checked_add(offset)?;
        Some(SocketAddr::new(base.ip(), port))
    };
    let mut last_error = None;
    for offset in 0..attempts {
        let (Some(gossip), Some(rpc)) =
            (at(config.gossip_bind, offset), at(config.rpc_bind, offset))
        else {
            break;
        };
        let udp = match UdpSocket::bind(gossip).await {
            Ok(udp) => udp,
            Err(e) => {
                last_error = Some(("gossip (udp)", config.gossip_bind, e));
                continue;
            }
        };
        match TcpListener::bind(rpc).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last_error = Some(("rpc (tcp)", config.rpc_bind, e)),
        }
    }
    let (what, tried, source) = last_error.unwrap_or_else(|| {
        (
            "gossip (udp)",
            config.gossip_bind,
            std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "port range exhausted"),
        )
    });
    Err(Error::Bind {
        what,
        tried,
        attempts,
        source,
    })
}

#[cfg(test)]
impl Grid {
    /// The data-path core, for tests that drive table changes directly.
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }
}

/// Serves `/metrics` and `/health` until the member stops. Holds the member weakly: dropping
/// the last [`Grid`] still stops it.
async fn serve_metrics(
    listener: TcpListener,
    grid: std::sync::Weak<Inner>,
    cancel: CancellationToken,
) {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let upgrade = |grid: &std::sync::Weak<Inner>| grid.upgrade().map(|inner| Grid { inner });
    let for_metrics = grid.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let grid = upgrade(&for_metrics);
                async move {
                    let Some(grid) = grid else {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(header::CONTENT_TYPE, "text/plain")],
                            String::new(),
                        );
                    };
                    let span = tracing::debug_span!("metrics_scrape");
                    let _entered = span.enter();
                    let ready = grid.is_ready().await;
                    let text =
                        crate::metrics::render(&grid.metrics(), &grid.inner.node.latency, ready);
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        text,
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let grid = upgrade(&grid);
                async move {
                    match grid {
                        Some(grid) if grid.is_ready().await => (StatusCode::OK, "ready\n"),
                        Some(_) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: joining, or the cluster is not safe\n",
                        ),
                        None => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}
