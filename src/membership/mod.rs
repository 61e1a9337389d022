//! Membership: who is in the cluster, learned by SWIM gossip (foca) over UDP.
//!
//! - [`identity`]: the identity foca gossips (member id, addresses, generation, name).
//! - [`frame`]: the header in front of every datagram (magic, version, kind, cluster hash).
//! - [`timers`]: the single ordered timer queue foca's timers go through.
//! - [`driver`]: the one task that owns the `Foca` value, the socket and the timer queue.
//!
//! The driver publishes what it learns into [`MembershipState`], which the rest of the crate reads
//! without talking to the task: the live peers, this member's identity, counters, and a broadcast
//! of [`MembershipEvent`]s.

pub(crate) mod driver;
pub(crate) mod frame;
pub(crate) mod identity;
pub(crate) mod timers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use identity::Identity;

/// A member's id: random, 64 bits, fixed for the life of its process. A process that restarts is a
/// new member with a new id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId(pub(crate) u64);

impl MemberId {
    /// A fresh random, non-zero id.
    pub(crate) fn random() -> Self {
        loop {
            let id: u64 = rand::random();
            if id != 0 {
                return MemberId(id);
            }
        }
    }

    /// The id as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::fmt::Debug for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemberId({self})")
    }
}

/// A member of the cluster as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// The member's id.
    pub id: MemberId,
    /// Its name (configured, or derived from its gossip address).
    pub name: String,
    /// Where it gossips (UDP).
    pub gossip_addr: SocketAddr,
    /// Where it serves rpc (TCP).
    pub rpc_addr: SocketAddr,
    /// The generation of its identity: the process start time in microseconds, plus one for every
    /// rejoin after it was declared down.
    pub generation: u64,
    /// Whether this is the local member.
    pub is_local: bool,
}

impl Member {
    fn from_identity(identity: &Identity, is_local: bool) -> Self {
        Member {
            id: identity.id,
            name: identity.name.to_string(),
            gossip_addr: identity.gossip,
            rpc_addr: identity.rpc,
            generation: identity.generation,
            is_local,
        }
    }
}

/// A change in the membership view.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// A member joined, or rejoined with a new generation.
    Up(Member),
    /// A member was declared down by the failure detector (or replaced by a newer generation of
    /// itself at the same address).
    Down(Member),
    /// A member left gracefully.
    Left(Member),
}

impl MembershipEvent {
    /// The member the event is about.
    pub fn member(&self) -> &Member {
        match self {
            MembershipEvent::Up(m) | MembershipEvent::Down(m) | MembershipEvent::Left(m) => m,
        }
    }
}

/// A stream of [`MembershipEvent`]s, from [`crate::Grid::membership_events`].
pub type MembershipEvents = crate::events::EventStream<MembershipEvent>;

/// Counters of the gossip socket, from [`crate::Grid::datagram_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatagramStats {
    /// Datagrams received and accepted.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Dropped: not a peergrid datagram (too short, wrong magic, version or kind).
    pub dropped_malformed: u64,
    /// Dropped: a peergrid datagram of another cluster.
    pub dropped_foreign_cluster: u64,
    /// Dropped: larger than `max_datagram_size`.
    pub dropped_oversized: u64,
    /// Dropped: the header was fine but the SWIM payload or leave notice was not.
    pub dropped_invalid_payload: u64,
    /// Dropped or not sent because the fault switch cuts the link.
    pub dropped_by_fault_switch: u64,
    /// Dropped: no valid authentication tag (no secret, another secret, or tampered with).
    pub dropped_unauthenticated: u64,
    /// Dropped: accepted before (a replay), or stamped outside the replay window.
    pub dropped_replayed: u64,
    /// Sends that failed at the socket.
    pub send_errors: u64,
}

impl DatagramStats {
    /// The drop counters with the reason each stands for (`malformed`, `foreign_cluster`,
    /// `oversized`, `invalid_payload`, `fault_switch`, `unauthenticated`, `replayed`).
    pub fn dropped_by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("malformed", self.dropped_malformed),
            ("foreign_cluster", self.dropped_foreign_cluster),
            ("oversized", self.dropped_oversized),
            ("invalid_payload", self.dropped_invalid_payload),
            ("fault_switch", self.dropped_by_fault_switch),
            ("unauthenticated", self.dropped_unauthenticated),
            ("replayed", self.dropped_replayed),
        ]
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) dropped_malformed: AtomicU64,
    pub(crate) dropped_foreign_cluster: AtomicU64,
    pub(crate) dropped_oversized: AtomicU64,
    pub(crate) dropped_invalid_payload: AtomicU64,
    pub(crate) dropped_by_fault_switch: AtomicU64,
    pub(crate) dropped_unauthenticated: AtomicU64,
    pub(crate) dropped_replayed: AtomicU64,
    pub(crate) send_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DatagramStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DatagramStats {
            received: get(&self.received),
            sent: get(&self.sent),
            dropped_malformed: get(&self.dropped_malformed),
            dropped_foreign_cluster: get(&self.dropped_foreign_cluster),
            dropped_oversized: get(&self.dropped_oversized),
            dropped_invalid_payload: get(&self.dropped_invalid_payload),
            dropped_by_fault_switch: get(&self.dropped_by_fault_switch),
            dropped_unauthenticated: get(&self.dropped_unauthenticated),
            dropped_replayed: get(&self.dropped_replayed),
            send_errors: get(&self.send_errors),
        }
    }
}

/// What the membership task knows, shared with the rest of the member.
///
/// Written only by the driver task; read by anyone. The locks are std locks held for a map
/// operation, never across an `.await`.
pub(crate) struct MembershipState {
    local: RwLock<Identity>,
    peers: RwLock<BTreeMap<MemberId, Identity>>,
    /// Taken when the member stops, which ends every event stream.
    events: RwLock<Option<broadcast::Sender<MembershipEvent>>>,
    /// Bumped on every change of the live set, for internal subscribers that must not miss one.
    changes: watch::Sender<u64>,
    /// Whether this member sees at least one live peer.
    connected: watch::Sender<bool>,
    /// Members this member saw declared down or leave (and not back since), with the
    /// generation that went, its gossip address and when.
    gone: RwLock<BTreeMap<MemberId, Gone>>,
    /// Whether this member holds a partition table of a cluster (it coordinated one, or got
    /// one): it then reaches other clusters only by merging (see [`crate::split_brain`]), never
    /// by a plain announce to the seeds.
    established: std::sync::atomic::AtomicBool,
    /// Merge orders for the member's merge task: a sequence number and the gossip addresses of
    /// the cluster to join.
    merge_orders: watch::Sender<(u64, Vec<SocketAddr>)>,
    /// Members of the clusters this member merged away from (see [`Self::forget_peers`]).
    left_behind: RwLock<std::collections::HashSet<MemberId>>,
    /// When each peer (id, generation) was last heard from: any datagram but a down verdict, or
    /// joining the view.
    heard: RwLock<BTreeMap<MemberId, (u64, std::time::Instant)>>,
    /// Peers the rest of the member found to be on the other side of a split (see
    /// [`Self::declare_down`]); the membership task declares them down.
    down_requests: std::sync::Mutex<Vec<Identity>>,
    /// Whether the rest of the member asked the membership task to merge back into its cluster
    /// (see [`Self::request_merge_back`]).
    merge_back_requested: std::sync::atomic::AtomicBool,
    /// Wakes the membership task for `down_requests` and `merge_back_requested`.
    pub(crate) down_requested: tokio::sync::Notify,
    /// Each peer's last heartbeat: what split-brain protection counts.
    beats: RwLock<BTreeMap<MemberId, Beat>>,
    /// When the last heartbeat from any peer arrived (none yet: `None`).
    last_beat: RwLock<Option<std::time::Instant>>,
    /// This member's coordinator (see [`Self::coordinator_key`]), and from when others may
    /// count it for split-brain protection under that coordinator.
    stint: RwLock<Stint>,
    /// The heartbeat tolerance: how long a heartbeat counts, and how long a member that
    /// switched coordinators stays uncounted (see [`Self::quorum_present`]).
    tolerance: std::time::Duration,
    pub(crate) counters: Counters,
}

/// A heartbeat as a member sends it to every peer in its view (members with split-brain
/// protection only): who sends it, its coordinator, and for how long it has had that
/// coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Heartbeat {
    pub(crate) id: u64,
    pub(crate) generation: u64,
    /// The sender's coordinator: (generation, id) of the oldest member it sees.
    pub(crate) coordinator: (u64, u64),
    /// For how long the sender has been countable under that coordinator, in milliseconds
    /// (negative: it will be in that many).
    pub(crate) countable_ms: i64,
    /// The sender's view ([`MembershipState::view_key`]): it counts only for members that see
    /// the same members.
    pub(crate) view: u64,
    /// Sent to a member gone from the sender's view, for the tolerance and a quarter after
    /// ([`MembershipState::farewell_addresses`]): the receiver stops counting the sender at
    /// once. It matters for a member the sender declared down (to a member that left, or to
    /// the cluster a member merged away from, it names a generation they do not count and
    /// changes nothing). The receiver may still see the sender, and would count it under their
    /// old common view until its last heartbeat grew older than the tolerance, while the
    /// members of the sender's new view count it at once: it would count on two sides at the
    /// same time (a member back from a split declares members of the other side down while
    /// they still see it). Not a sign of life: the receiver does not count it as hearing from
    /// the sender.
    pub(crate) farewell: bool,
}

/// This member's time under one coordinator.
#[derive(Debug, Clone, Copy)]
struct Stint {
    coordinator: (u64, u64),
    /// From when this member may be counted under `coordinator`.
    countable_from: std::time::Instant,
    /// When this member last sent a heartbeat naming `coordinator` while it held a table (none
    /// sent: nobody could count it under `coordinator`).
    advertised: Option<std::time::Instant>,
    /// Until when this member may still be counted under an earlier coordinator.
    released: std::time::Instant,
}

/// How long from `from` to `now` in milliseconds, negative if `from` is later.
fn countable_ms(from: std::time::Instant, now: std::time::Instant) -> i64 {
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if from <= now {
        ms(now - from)
    } else {
        -ms(from - now)
    }
}

/// A peer's last heartbeat, as received.
#[derive(Debug, Clone, Copy)]
struct Beat {
    generation: u64,
    at: std::time::Instant,
    coordinator: (u64, u64),
    countable_ms: i64,
    view: u64,
}

/// A member seen going down or leaving.
#[derive(Debug, Clone, Copy)]
struct Gone {
    generation: u64,
    gossip: SocketAddr,
    at: std::time::Instant,
}

impl MembershipState {
    /// `tolerance`: the heartbeat tolerance ([`crate::SwimConfig::heartbeat_tolerance`]).
    pub(crate) fn new(local: Identity, tolerance: std::time::Duration) -> Self {
        let now = std::time::Instant::now();
        let stint = Stint {
            coordinator: (local.generation, local.id.0),
            countable_from: now,
            advertised: None,
            released: now,
        };
        MembershipState {
            local: RwLock::new(local),
            peers: RwLock::new(BTreeMap::new()),
            events: RwLock::new(Some(broadcast::channel(1024).0)),
            changes: watch::channel(0).0,
            connected: watch::channel(false).0,
            gone: RwLock::new(Default::default()),
            established: Default::default(),
            merge_orders: watch::channel((0, Vec::new())).0,
            left_behind: Default::default(),
            heard: Default::default(),
            beats: Default::default(),
            last_beat: Default::default(),
            down_requests: Default::default(),
            merge_back_requested: Default::default(),
            down_requested: tokio::sync::Notify::new(),
            stint: RwLock::new(stint),
            tolerance,
            counters: Counters::default(),
        }
    }

    pub(crate) fn local_identity(&self) -> Identity {
        read(&self.local).clone()
    }

    pub(crate) fn local_member(&self) -> Member {
        Member::from_identity(&read(&self.local), true)
    }

    /// The local member first, then the live peers by id.
    pub(crate) fn members(&self) -> Vec<Member> {
        let mut all = vec![self.local_member()];
        all.extend(
            read(&self.peers)
                .values()
                .map(|p| Member::from_identity(p, false)),
        );
        all
    }

    /// Whether this member saw `id` declared down or leave, and it has not come back since (a
    /// member merely missing from the view, such as one that joined but was not heard of yet,
    /// is not gone).
    pub(crate) fn is_gone(&self, id: MemberId) -> bool {
        read(&self.gone).contains_key(&id)
    }

    /// The generation of `id` this member saw declared down or leave, if it has not come back
    /// since.
    pub(crate) fn gone_generation(&self, id: MemberId) -> Option<u64> {
        read(&self.gone).get(&id).map(|g| g.generation)
    }

    /// The gossip addresses of the members seen going down or leaving within `window`, most
    /// recent first, that no live member uses now.
    pub(crate) fn recently_gone(&self, window: std::time::Duration) -> Vec<SocketAddr> {
        let live: Vec<SocketAddr> = self.members().iter().map(|m| m.gossip_addr).collect();
        let mut gone: Vec<Gone> = read(&self.gone)
            .values()
            .filter(|g| g.at.elapsed() <= window && !live.contains(&g.gossip))
            .copied()
            .collect();
        gone.sort_by_key(|g| std::cmp::Reverse(g.at));
        let mut addrs: Vec<SocketAddr> = gone.into_iter().map(|g| g.gossip).collect();
        addrs.dedup();
        addrs
    }

    /// The gossip addresses of the members gone from the view within the last tolerance and a
    /// quarter (and not back under a renewed identity): farewell heartbeats go to them for
    /// that long (see [`Heartbeat::farewell`]).
    pub(crate) fn farewell_addresses(&self) -> Vec<SocketAddr> {
        self.recently_gone(self.tolerance + self.tolerance / 4)
    }

    /// Whether this member holds a cluster's partition table.
    pub(crate) fn is_established(&self) -> bool {
        self.established.load(Ordering::Relaxed)
    }

    pub(crate) fn set_established(&self, established: bool) {
        self.established.store(established, Ordering::Relaxed);
    }

    /// Orders the member's merge task to join the cluster at `targets`.
    pub(crate) fn order_merge(&self, targets: Vec<SocketAddr>) {
        self.merge_orders.send_modify(|(seq, t)| {
            *seq += 1;
            *t = targets;
        });
    }

    pub(crate) fn subscribe_merge_orders(&self) -> watch::Receiver<(u64, Vec<SocketAddr>)> {
        self.merge_orders.subscribe()
    }

    /// Forgets every peer at once (this member leaves its cluster to merge into another), each
    /// reported down and remembered as left behind.
    pub(crate) fn forget_peers(&self) {
        for peer in self.peer_identities() {
            write(&self.left_behind).insert(peer.id);
            self.peer_gone(&peer, false);
        }
    }

    /// Whether `id` was a member of a cluster this member merged away from.
    pub(crate) fn is_left_behind(&self, id: MemberId) -> bool {
        read(&self.left_behind).contains(&id)
    }

    /// The coordinator of this member's view: the oldest member (smallest generation, then id).
    pub(crate) fn coordinator_key(&self) -> (u64, u64) {
        let local = read(&self.local);
        let mut oldest = (local.generation, local.id.0);
        for peer in read(&self.peers).values() {
            oldest = oldest.min((peer.generation, peer.id.0));
        }
        oldest
    }

    /// A digest of this member's view: every member it sees, itself included, with their
    /// generations. Two members with the same key see the same members.
    pub(crate) fn view_key(&self) -> u64 {
        let local = read(&self.local);
        let peers = read(&self.peers);
        let mut members: Vec<(u64, u64)> = peers
            .values()
            .map(|p| (p.id.0, p.generation))
            .chain(std::iter::once((local.id.0, local.generation)))
            .collect();
        members.sort_unstable();
        let mut bytes = Vec::with_capacity(members.len() * 16);
        for (id, generation) in members {
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&generation.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// This member's current generation (without cloning its identity).
    pub(crate) fn local_generation(&self) -> u64 {
        read(&self.local).generation
    }

    pub(crate) fn peer(&self, id: MemberId) -> Option<Identity> {
        read(&self.peers).get(&id).cloned()
    }

    pub(crate) fn peer_identities(&self) -> Vec<Identity> {
        read(&self.peers).values().cloned().collect()
    }

    pub(crate) fn peer_count(&self) -> usize {
        read(&self.peers).len()
    }

    /// Asks the membership task to declare `peer` down: it is on the other side of a split.
    pub(crate) fn declare_down(&self, peer: Identity) {
        self.down_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(peer);
        self.down_requested.notify_one();
    }

    /// The peers [`Self::declare_down`] asked for since the last call.
    pub(crate) fn take_down_requests(&self) -> Vec<Identity> {
        std::mem::take(&mut *self.down_requests.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Asks the membership task to merge this member back into its cluster under a renewed
    /// identity, as a member declared down does.
    pub(crate) fn request_merge_back(&self) {
        self.merge_back_requested.store(true, Ordering::Release);
        self.down_requested.notify_one();
    }

    /// Whether [`Self::request_merge_back`] was called since the last call.
    pub(crate) fn take_merge_back_request(&self) -> bool {
        self.merge_back_requested.swap(false, Ordering::AcqRel)
    }

    /// Records a datagram (a heartbeat, a SWIM message) from member `id` at `generation`.
    pub(crate) fn heard_from(&self, id: MemberId, generation: u64) {
        write(&self.heard).insert(id, (generation, std::time::Instant::now()));
    }

    /// Whether this member heard from `id` at `generation` (a heartbeat or a SWIM datagram)
    /// within `within`.
    pub(crate) fn heard_within(
        &self,
        id: MemberId,
        generation: u64,
        within: std::time::Duration,
    ) -> bool {
        read(&self.heard)
            .get(&id)
            .is_some_and(|(g, at)| *g == generation && at.elapsed() <= within)
    }

    /// A farewell heartbeat ([`Heartbeat::farewell`]): the sender is counted no more.
    pub(crate) fn farewell(&self, beat: &Heartbeat) {
        let mut beats = write(&self.beats);
        if beats
            .get(&MemberId(beat.id))
            .is_some_and(|b| b.generation == beat.generation)
        {
            beats.remove(&MemberId(beat.id));
        }
    }

    /// Records a peer's heartbeat.
    pub(crate) fn beat(&self, beat: Heartbeat) {
        let id = MemberId(beat.id);
        self.heard_from(id, beat.generation);
        *write(&self.last_beat) = Some(std::time::Instant::now());
        write(&self.beats).insert(
            id,
            Beat {
                generation: beat.generation,
                at: std::time::Instant::now(),
                coordinator: beat.coordinator,
                countable_ms: beat.countable_ms,
                view: beat.view,
            },
        );
    }

    /// This member's coordinator, and for how long it has been countable under it in
    /// milliseconds (negative: it will be in that many), as its next heartbeat says. A member
    /// without a table yet serves nothing and is never counted (`i64::MIN`).
    ///
    /// A member that heard no heartbeat for the tolerance and declared members down since was
    /// cut off, and lost them while it was: it counts again only three tolerances after it
    /// hears from its peers again. Back from an isolation too short for the others to declare
    /// it down, it may still coordinate them with tables built from its isolated view; they
    /// refuse those, and declare it down after twice the tolerance ([`crate::node::Node`]'s
    /// table check). Until then it must not serve guarded operations from the partitions it
    /// took over alone. A member that only heard nobody for a while (a stall under load, its
    /// heartbeats dropped) counts again at its next heartbeat: it changed nothing meanwhile.
    pub(crate) fn heartbeat_countable(&self) -> ((u64, u64), i64) {
        self.note_coordinator();
        let now = std::time::Instant::now();
        let cut_off = read(&self.last_beat).is_some_and(|last| {
            now.duration_since(last) > self.tolerance
                && read(&self.gone)
                    .values()
                    .any(|g| g.at > last + self.tolerance)
        });
        let mut stint = write(&self.stint);
        if cut_off {
            stint.countable_from = stint.countable_from.max(now + self.tolerance * 3);
        }
        if !self.is_established() {
            return (stint.coordinator, i64::MIN);
        }
        stint.advertised = Some(now);
        (stint.coordinator, countable_ms(stint.countable_from, now))
    }

    /// Notes a change of the view: the coordinator may have changed. A member that others
    /// may have counted under its old coordinator becomes countable under the new one only
    /// once they stopped counting it: the tolerance (plus a quarter, for heartbeats on their
    /// way) after its last heartbeat naming the old one.
    fn note_coordinator(&self) {
        let key = self.coordinator_key();
        let now = std::time::Instant::now();
        let mut stint = write(&self.stint);
        if stint.coordinator == key {
            return;
        }
        if let Some(last) = stint.advertised {
            stint.released = stint
                .released
                .max(last + self.tolerance + self.tolerance / 4);
        }
        *stint = Stint {
            coordinator: key,
            countable_from: stint.released.max(now),
            advertised: None,
            released: stint.released,
        };
    }

    /// How many members split-brain protection counts as present, this one included: the live
    /// peers (in the view) whose heartbeat arrived within the tolerance and that are countable
    /// under the same coordinator as this member (which must be countable itself).
    ///
    /// Members drop out within `tolerance` of a split, well before failure detection takes them
    /// out of the view on the other side, so a minority stops serving before the majority can
    /// take its partitions over. Counting only members that agree on the coordinator keeps two
    /// overlapping views (after a heal, before the sides see each other as down, a member can
    /// see both sides alive and follow either side's tables) from both reaching the minimum: a
    /// member is counted in one coordinator's group at a time, and only once it has been there
    /// for the tolerance, so by the time a member switching sides counts on the new one, the old
    /// one stopped counting it. A member that saw nobody under its old coordinator (a member
    /// that just started, or was alone) was counted by nobody, and counts at once.
    ///
    /// And only members that see the same members as this one ([`Self::view_key`] in their
    /// last heartbeat). Agreeing on the coordinator was not enough: after short splits, the
    /// declarations that arrive after the heal leave each side's view without the other while a
    /// member still sees both and follows the oldest member's side. That side counted it, held
    /// the quorum, and served guarded operations it acknowledged as a backup; then it lost the
    /// member to the other side, whose tables (built from another view) had promoted copies
    /// without those operations, and merged away as the smaller side, its operations left out
    /// as superseded (a Jepsen run polled 46 queue items twice and lost 56 acknowledged
    /// offers). Members whose views agree also agree on the coordinator and, once it has
    /// published, on the table. A change of view costs the quorum until the heartbeats that
    /// carry it arrive: members send one as soon as their view changes.
    pub(crate) fn quorum_present(&self) -> usize {
        self.note_coordinator();
        let stint = *read(&self.stint);
        let coordinator = stint.coordinator;
        if stint.countable_from > std::time::Instant::now() {
            return 1;
        }
        let tolerance = self.tolerance;
        let view = self.view_key();
        let peers = read(&self.peers);
        let beats = read(&self.beats);
        1 + peers
            .values()
            .filter(|p| {
                beats.get(&p.id).is_some_and(|b| {
                    let age = b.at.elapsed();
                    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                    b.generation == p.generation
                        && age <= tolerance
                        && b.coordinator == coordinator
                        && b.view == view
                        && b.countable_ms.saturating_add(age_ms) >= 0
                })
            })
            .count()
    }

    /// Events from now on; a stream that ends at once if the member has stopped.
    pub(crate) fn subscribe(&self) -> MembershipEvents {
        let receiver = match &*read(&self.events) {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        };
        MembershipEvents::new(receiver)
    }

    /// Ends every event stream: called when the membership task stops.
    pub(crate) fn close(&self) {
        write(&self.events).take();
    }

    /// A receiver that changes whenever the live member set does.
    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn subscribe_connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    pub(crate) fn stats(&self) -> DatagramStats {
        self.counters.snapshot()
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.send_replace(connected);
    }

    pub(crate) fn set_local(&self, identity: Identity) {
        *write(&self.local) = identity;
        self.note_coordinator();
    }

    /// A peer is alive. Replaces an older generation of the same member, which counts as down.
    pub(crate) fn peer_up(&self, identity: Identity) {
        write(&self.gone).remove(&identity.id);
        // Joining the view is news of it.
        self.heard_from(identity.id, identity.generation);
        let previous = {
            let mut peers = write(&self.peers);
            match peers.get(&identity.id) {
                Some(known) if known == &identity => return,
                _ => peers.insert(identity.id, identity.clone()),
            }
        };
        self.note_coordinator();
        if let Some(previous) = previous {
            self.emit(MembershipEvent::Down(Member::from_identity(
                &previous, false,
            )));
        }
        self.emit(MembershipEvent::Up(Member::from_identity(&identity, false)));
    }

    /// A peer is gone: declared down, or left when `left` is true. Ignored unless `identity` is the
    /// generation in the view.
    pub(crate) fn peer_gone(&self, identity: &Identity, left: bool) {
        {
            let mut peers = write(&self.peers);
            match peers.get(&identity.id) {
                Some(known) if known == identity => peers.remove(&identity.id),
                _ => return,
            };
        }
        write(&self.heard).remove(&identity.id);
        write(&self.beats).remove(&identity.id);
        self.note_coordinator();
        write(&self.gone).insert(
            identity.id,
            Gone {
                generation: identity.generation,
                gossip: identity.gossip,
                at: std::time::Instant::now(),
            },
        );
        let member = Member::from_identity(identity, false);
        self.emit(if left {
            MembershipEvent::Left(member)
        } else {
            MembershipEvent::Down(member)
        });
    }

    fn emit(&self, event: MembershipEvent) {
        tracing::info!(member = %event.member().id, name = %event.member().name, ?event, "membership changed");
        if let Some(sender) = &*read(&self.events) {
            // No receiver is fine: nobody listens yet.
            let _ = sender.send(event);
        }
        self.changes.send_modify(|v| *v += 1);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A member's identity on loopback, with both addresses at `port`.
    pub(super) fn identity(id: u64, port: u16, generation: u64) -> Identity {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Identity {
            id: MemberId(id),
            gossip: addr,
            rpc: addr,
            generation,
            name: Arc::from(format!("m{id}")),
        }
    }

    #[test]
    fn view_tracks_up_down_left_and_new_generations() {
        let state = MembershipState::new(identity(1, 1, 1), std::time::Duration::from_secs(1));
        let mut events = state.events.read().unwrap().as_ref().unwrap().subscribe();
        state.peer_up(identity(2, 2, 1));
        state.peer_up(identity(2, 2, 1)); // duplicate: no event
        state.peer_up(identity(3, 3, 1));
        assert_eq!(state.members().len(), 3);
        assert!(state.members()[0].is_local);
        state.peer_up(identity(2, 2, 2)); // rejoined with a new generation
        state.peer_gone(&identity(3, 3, 1), true);
        state.peer_gone(&identity(2, 2, 1), false); // stale generation: ignored
        let got: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| match e {
                MembershipEvent::Up(m) => ("up", m.id.0, m.generation),
                MembershipEvent::Down(m) => ("down", m.id.0, m.generation),
                MembershipEvent::Left(m) => ("left", m.id.0, m.generation),
            })
            .collect();
        assert_eq!(
            got,
            [
                ("up", 2, 1),
                ("up", 3, 1),
                ("down", 2, 1),
                ("up", 2, 2),
                ("left", 3, 1)
            ]
        );
        assert_eq!(state.peer_count(), 1);
        assert_eq!(*state.changes.borrow(), 5);
    }
}
