//! The membership task: the only owner of the `Foca` value, the gossip socket and the timer queue.
//!
//! It loops over four inputs (a datagram, a due timer, a command, the seed-retry tick), feeds each
//! to foca, then carries out what foca asked for: datagrams to send, timers to schedule, and
//! notifications that change the [`MembershipState`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Foca, Member, NoCustomBroadcast, OwnedNotification, PostcardCodec,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frame::{self, FrameError, Kind};
use super::identity::Identity;
use super::timers::TimerQueue;
use super::{Counters, Heartbeat, MemberId, MembershipState};
use crate::fault::FaultSwitch;
use crate::security::{Keyring, ReplayGuard, TAG_LEN};
use crate::split_brain::discovery::{self, ClusterView, Verdict};

/// Ends the member's event streams when dropped.
struct CloseOnDrop(Arc<MembershipState>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

pub(crate) type SwimNode = Foca<Identity, PostcardCodec, SmallRng, NoCustomBroadcast>;

/// Requests to the membership task.
pub(crate) enum Command {
    /// Announce the leave, gossip it, and stop; the sender is answered once the datagrams are out.
    Leave(oneshot::Sender<()>),
    /// Leave this cluster without a word and join the one at `targets` under a renewed identity
    /// (a merge after a split); answered with the new identity.
    Rejoin {
        targets: Vec<SocketAddr>,
        done: oneshot::Sender<Identity>,
    },
}

/// Everything the task needs; built by [`crate::Grid::join`].
pub(crate) struct DriverConfig {
    pub(crate) identity: Identity,
    pub(crate) swim: foca::Config,
    pub(crate) cluster_hash: u64,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) seed_retry_interval: Duration,
    pub(crate) max_datagram_size: usize,
    pub(crate) fault_switch: Option<FaultSwitch>,
    /// How often a coordinator probes for the other side of a split.
    pub(crate) probe_interval: Duration,
    /// How long members seen going down are probed.
    pub(crate) remember_down: Duration,
    /// The cluster secret's keys: datagrams are sealed and checked with them.
    pub(crate) keys: Arc<Keyring>,
    /// How far a datagram's timestamp may be from this member's clock.
    pub(crate) replay_window: Duration,
    /// How often to send every peer a heartbeat (members with split-brain protection count the
    /// peers they recently heard from); `None`: no heartbeats.
    pub(crate) heartbeat_interval: Option<Duration>,
}

/// What [`Driver::screen`] made of a SWIM datagram.
enum Screened {
    /// Handed to foca as it is.
    Unchanged,
    /// Handed to foca without the down updates it ignores.
    Rewritten(Vec<u8>),
    /// Handled here: foca does not see it.
    Consumed,
}

pub(crate) struct Driver {
    foca: SwimNode,
    runtime: AccumulatingRuntime<Identity>,
    socket: UdpSocket,
    timers: TimerQueue<foca::Timer<Identity>>,
    state: Arc<MembershipState>,
    cluster_hash: u64,
    seeds: Vec<SocketAddr>,
    seed_retry_interval: Duration,
    max_datagram_size: usize,
    fault_switch: Option<FaultSwitch>,
    /// Identities (id, generation) that sent a leave notice, so their coming Down reads as Left.
    leaving: HashSet<(MemberId, u64)>,
    /// Set once this member starts leaving: foca then declares it down, which is expected.
    self_leaving: bool,
    /// The renewed identity after this member learned it was declared down: foca is rebuilt
    /// with it (see [`Driver::restart_foca`]), with the members it still considers active, or
    /// with none when this member hands its data over through a merge (`false`).
    restart_as: Option<(Identity, bool)>,
    /// Down verdicts ignored per sender address: (first, last) time seen.
    ignored_verdicts: std::collections::HashMap<SocketAddr, (Instant, Instant)>,
    swim: foca::Config,
    send_buf: Vec<u8>,
    probe_interval: Duration,
    remember_down: Duration,
    /// Identities of the cluster this member left to merge into another: their datagrams are
    /// ignored (they come back, if ever, under renewed identities).
    excluded: HashSet<(MemberId, u64)>,
    /// Verdicts that this member's cluster merges into another, waiting for confirmation: when
    /// each was first seen, by the other cluster's coordinator.
    verdicts: std::collections::HashMap<(u64, u64), Instant>,
    /// Set once this member ordered or got a merge order, until it rejoined.
    merge_ordered: bool,
    /// Framed datagrams other than foca's, sent at the next flush.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// The members of the cluster this member last merged into.
    rejoin_targets: Vec<SocketAddr>,
    keys: Arc<Keyring>,
    replay: ReplayGuard,
    /// This driver's instance number, stamped on every datagram with a counter.
    instance: u64,
    counter: u64,
    /// How often to send every peer a heartbeat; `None`: never (no split-brain protection).
    heartbeat_interval: Option<Duration>,
    /// Set while this member drains datagrams that waited in the socket while it was stalled:
    /// heartbeats among them are old news, not signs of life.
    stale_heartbeats: bool,
    /// Set when the view changed: heartbeats go out at the next flush.
    beat_now: bool,
}

impl Driver {
    pub(crate) fn new(
        config: DriverConfig,
        socket: UdpSocket,
        state: Arc<MembershipState>,
    ) -> Self {
        let rng = SmallRng::seed_from_u64(config.identity.id.0 ^ config.identity.generation);
        let own_gossip = config.identity.gossip;
        Driver {
            foca: Foca::new(config.identity, config.swim.clone(), rng, PostcardCodec),
            swim: config.swim,
            restart_as: None,
            ignored_verdicts: std::collections::HashMap::new(),
            runtime: AccumulatingRuntime::new(),
            socket,
            timers: TimerQueue::new(),
            state,
            cluster_hash: config.cluster_hash,
            seeds: config
                .seeds
                .into_iter()
                .filter(|s| *s != own_gossip)
                .collect(),
            seed_retry_interval: config.seed_retry_interval,
            max_datagram_size: config.max_datagram_size,
            fault_switch: config.fault_switch,
            leaving: HashSet::new(),
            self_leaving: false,
            send_buf: Vec::with_capacity(config.max_datagram_size),
            probe_interval: config.probe_interval,
            remember_down: config.remember_down,
            excluded: HashSet::new(),
            verdicts: std::collections::HashMap::new(),
            merge_ordered: false,
            outbox: Vec::new(),
            rejoin_targets: Vec::new(),
            keys: config.keys,
            replay: ReplayGuard::new(config.replay_window),
            instance: rand::random(),
            counter: 0,
            heartbeat_interval: config.heartbeat_interval,
            stale_heartbeats: false,
            beat_now: false,
        }
    }

    /// Runs until a leave command completes, the command channel closes, or `cancel` fires. A
    /// cancelled task stops at once without telling anyone: to peers that is a crash.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) {
        // However the task ends (leave, cancel, abort), event streams end with it.
        let _close = CloseOnDrop(self.state.clone());
        let mut buf = vec![0u8; 65_536];
        let mut seed_tick = tokio::time::interval(self.seed_retry_interval);
        seed_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_tick = tokio::time::interval(self.probe_interval);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeats = self.heartbeat_interval.is_some();
        let beat_every = self.heartbeat_interval.unwrap_or(Duration::from_secs(3600));
        let mut heartbeat_tick = tokio::time::interval(beat_every);
        heartbeat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = Instant::now();
        loop {
            let next_timer = self.timers.next_deadline();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                command = commands.recv() => match command {
                    Some(Command::Leave(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Rejoin { targets, done }) => {
                        let identity = self.rejoin_into(&targets);
                        let _ = done.send(identity);
                    }
                    None => return,
                },
                _ = async { tokio::time::sleep_until(next_timer.unwrap_or_else(Instant::now)).await },
                    if next_timer.is_some() => self.fire_due_timers(),
                // Before the socket: a tick far overdue means this member was stalled (paused,
                // starved), and the heartbeats waiting in the socket are old.
                _ = heartbeat_tick.tick(), if heartbeats => {
                    let now = Instant::now();
                    if now.duration_since(last_beat) > beat_every * 2 {
                        tracing::debug!(stalled = ?now.duration_since(last_beat), "membership task was stalled; heartbeats that waited are dropped");
                        self.drain_after_stall(&mut buf);
                    }
                    last_beat = now;
                    self.send_heartbeats();
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => self.on_datagram(&buf[..len], from),
                    // Linux reports an ICMP "port unreachable" for an earlier send on the next
                    // receive; a seed that is not up yet causes it. Nothing to do.
                    Err(e) => tracing::trace!(error = %e, "gossip socket receive error"),
                },
                _ = self.state.down_requested.notified() => {
                    for peer in self.state.take_down_requests() {
                        if self.foca.iter_members().any(|m| *m.id() == peer) {
                            tracing::warn!(peer = %peer.id, "declaring a member down: its tables leave out members this one hears from");
                            self.declare_down(peer);
                        }
                    }
                    if self.state.take_merge_back_request() {
                        let me = self.foca.identity().clone();
                        self.merge_back_after_declared_down(&me);
                    }
                }
                _ = seed_tick.tick() => self.announce_to_seeds_if_alone(),
                _ = probe_tick.tick() => self.probe_other_clusters().await,
            }
            self.flush().await;
        }
    }

    /// Rebuilds foca under `identity` after this member was declared down and renewed itself.
    ///
    /// foca keeps its buffer of membership updates across a renewal, and the new identity is
    /// trusted at once: a member that was cut off would then tell the healed cluster that every
    /// member it lost sight of is down, and those healthy members would be declared down in
    /// turn (foca's own source suggests recreating it). The rebuilt instance keeps the members
    /// this one still considers active, forgets every stale update, timer and pending datagram,
    /// and announces itself to the members it still considers active. Members it saw go down
    /// are not contacted: they may be the other side of a split, which is reached only through
    /// the merge protocol ([`crate::split_brain`]).
    ///
    /// With `keep_members` false the rebuilt instance knows nobody and announces to nobody: the
    /// member is handing its data over through a merge, whose rejoin builds foca anew.
    fn restart_foca(&mut self, identity: Identity, keep_members: bool) {
        let active: Vec<Member<Identity>> = if keep_members {
            self.foca.iter_members().cloned().collect()
        } else {
            Vec::new()
        };
        let mut known: Vec<SocketAddr> = active
            .iter()
            .map(|m| m.id().gossip)
            .filter(|a| *a != identity.gossip)
            .collect();
        known.sort();
        known.dedup();
        let rng = SmallRng::seed_from_u64(identity.id.0 ^ identity.generation);
        self.foca = Foca::new(identity, self.swim.clone(), rng, PostcardCodec);
        self.runtime = AccumulatingRuntime::new();
        self.timers = TimerQueue::new();
        if let Err(e) = self
            .foca
            .apply_many(active.into_iter(), true, &mut self.runtime)
        {
            tracing::debug!(error = %e, "could not restore members after a rejoin");
        }
        for addr in known {
            if let Err(e) = self
                .foca
                .announce(Identity::placeholder(addr), &mut self.runtime)
            {
                tracing::debug!(%addr, error = %e, "announce failed");
            }
        }
    }

    /// This member learned it was declared down. If it holds a cluster's table it may lead
    /// partitions the cluster already gave to others, with writes acknowledged since (alone on
    /// its side of a split, or while paused members were declared down by it): rejoining with
    /// its peers as they are would make it drop those copies when it takes the cluster's
    /// table. Instead it merges back, as the smaller side of a healed split does: its merge
    /// task captures what it leads, rejoins as a renewed member through the members it knows
    /// (live, recently gone, seeds) and hands everything over through the merge policies.
    /// Returns whether a merge was ordered. The rest of the member asks for the same when this
    /// member and one its coordinator lists each see the other down
    /// ([`crate::node::Node::notice_members_listed_but_down`]).
    ///
    /// A member that holds a table never renews in place, with its peers as they are: its
    /// new generation would make it younger than members of the side that declared it down,
    /// one of which could then coordinate the rejoined members and make them drop their copies
    /// for its tables (a Jepsen run lost 19,304 acknowledged inserts that way, when the larger
    /// side of a split renewed after the grace of [`Driver::is_stale_verdict`] and the
    /// smaller side's oldest member became everyone's coordinator). The larger side normally
    /// never gets here: it declares the senders of such verdicts down
    /// ([`Driver::screen`]), and the merge protocol folds the smaller side in first.
    fn merge_back_after_declared_down(&mut self, identity: &Identity) -> bool {
        if !self.state.is_established() || self.self_leaving || self.merge_ordered {
            return false;
        }
        let peers = self.state.peer_identities();
        let known = self
            .foca
            .iter_members()
            .map(|m| m.id().gossip)
            .chain(peers.iter().map(|p| p.gossip))
            .chain(self.state.recently_gone(self.remember_down))
            .chain(self.seeds.iter().copied());
        let targets = distinct_targets(known, &[identity.gossip]);
        if targets.is_empty() {
            return false;
        }
        tracing::warn!(
            targets = targets.len(),
            "declared down while holding partitions: merging back into the cluster"
        );
        self.merge_ordered = true;
        self.state.order_merge(targets);
        true
    }

    /// A member that holds no cluster's table yet and sees nobody announces itself to the
    /// seeds. One that holds a table reaches other clusters only by merging.
    fn announce_to_seeds_if_alone(&mut self) {
        if self.state.peer_count() > 0 || self.state.is_established() {
            return;
        }
        // A member on its way into another cluster keeps knocking there too.
        for seed in self
            .seeds
            .iter()
            .chain(&self.rejoin_targets)
            .copied()
            .collect::<Vec<_>>()
        {
            if let Err(e) = self
                .foca
                .announce(Identity::placeholder(seed), &mut self.runtime)
            {
                tracing::debug!(%seed, error = %e, "announce failed");
            }
        }
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(error = %e, "foca timer error");
            }
        }
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        self.act_on_false_suspicions();
        let state = self.state.clone();
        let counters = &state.counters;
        if datagram.len() > self.max_datagram_size {
            Counters::bump(&counters.dropped_oversized);
            return;
        }
        if self.is_cut(from) {
            Counters::bump(&counters.dropped_by_fault_switch);
            return;
        }
        let (kind, payload) = match frame::open(
            datagram,
            self.cluster_hash,
            &self.keys,
            &mut self.replay,
            unix_ms(),
            std::time::Instant::now(),
        ) {
            Ok(ok) => ok,
            Err(FrameError::Malformed) => {
                Counters::bump(&counters.dropped_malformed);
                tracing::trace!(%from, "dropped malformed datagram");
                return;
            }
            Err(FrameError::ForeignCluster) => {
                Counters::bump(&counters.dropped_foreign_cluster);
                tracing::trace!(%from, "dropped datagram of another cluster");
                return;
            }
            Err(FrameError::Unauthenticated(why)) => {
                Counters::bump(&counters.dropped_unauthenticated);
                tracing::debug!(%from, ?why, "dropped datagram without a valid tag");
                return;
            }
            Err(FrameError::Replayed(why)) => {
                Counters::bump(&counters.dropped_replayed);
                tracing::debug!(%from, ?why, "dropped replayed or stale datagram (clock skew?)");
                return;
            }
        };
        let accepted = match kind {
            Kind::Swim if self.is_excluded(payload) => {
                tracing::trace!(%from, "ignored a member of the cluster this one left");
                true
            }
            Kind::Swim if self.is_stale_verdict(payload, from) => {
                tracing::debug!(%from, "ignored a down verdict from a member this one considers down");
                true
            }
            Kind::Swim => match self.screen(payload) {
                Screened::Consumed => {
                    tracing::info!(%from, "declared down by a member this one sees alive: it is on the other side of a split");
                    true
                }
                screened => {
                    let data = match &screened {
                        Screened::Rewritten(data) => data.as_slice(),
                        _ => payload,
                    };
                    match self.foca.handle_data(data, &mut self.runtime) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::trace!(%from, error = %e, "foca rejected datagram");
                            false
                        }
                    }
                }
            },
            Kind::Leave => self.on_leave_notice(payload),
            Kind::Heartbeat => match postcard::from_bytes::<Heartbeat>(payload) {
                Ok(beat) => {
                    if beat.farewell {
                        self.state.farewell(&beat);
                    } else if !self.stale_heartbeats {
                        self.state.beat(beat);
                    }
                    true
                }
                Err(_) => false,
            },
            Kind::Probe | Kind::ProbeReply => match postcard::from_bytes::<ClusterView>(payload) {
                Ok(view) => {
                    if kind == Kind::Probe {
                        let mine = self.my_view();
                        self.queue_datagram(Kind::ProbeReply, &mine, from);
                    }
                    self.on_view(view);
                    true
                }
                Err(_) => false,
            },
            Kind::MergeOrder => {
                match postcard::from_bytes::<(Identity, Vec<SocketAddr>)>(payload) {
                    Ok((coordinator, targets)) => {
                        self.on_merge_order(coordinator, targets);
                        true
                    }
                    Err(_) => false,
                }
            }
        };
        Counters::bump(if accepted {
            &counters.received
        } else {
            &counters.dropped_invalid_payload
        });
    }

    /// Screens a SWIM datagram before foca sees it, against verdicts that come from the other
    /// side of a split. Records that its sender was heard from.
    ///
    /// - A "you are down" verdict (foca's `TurnUndead`, or a down update about this member's
    ///   current identity) from a sender this member still considers alive, while it holds a
    ///   cluster's table: the sender is declared down here instead of obeyed, and the datagram
    ///   is consumed. Such a sender was on the other side of a split whose failure detection
    ///   ended first there: its side promoted backups, started afresh the partitions it held no
    ///   copy of, and publishes tables without this member. Obeying (renewing, and staying with
    ///   every member as before) made this member take that side's tables, which leave it out,
    ///   and drop copies holding writes the other side never saw (a Jepsen run lost thousands
    ///   of acknowledged inserts that way when a 2 | 3 split healed after the minority's failure
    ///   detection ended and before the majority's did). Declaring the sender down makes the two
    ///   sides see each other as down, so they are two clusters, and the merge protocol
    ///   ([`crate::split_brain`]) folds the smaller into the larger, whichever detected first. A
    ///   member that was cut off alone ends up seeing nobody, and merges back.
    /// - A down update about another member this member heard from within the heartbeat
    ///   tolerance is dropped (the datagram is rewritten without it): that member is alive and
    ///   reachable from here, and the verdict comes from a member that lost sight of it, such
    ///   as one that was cut off and is back. SWIM takes down updates as final, so without this
    ///   one member back from isolation declared healthy members of the majority down
    ///   everywhere, and the majority fell apart.
    fn screen(&mut self, payload: &[u8]) -> Screened {
        use bytes::{Buf, BufMut};
        let mut data = payload;
        let Ok(header) = foca::Codec::<Identity>::decode_header(&mut PostcardCodec, &mut data)
        else {
            return Screened::Unchanged;
        };
        // Only a member that sees this one alive talks to it: one that declared it down sends it
        // nothing but that verdict, which must not count for split-brain protection.
        if !self.stale_heartbeats && header.message != foca::Message::TurnUndead {
            self.state.heard_from(header.src.id, header.src.generation);
        }
        let established = self.state.is_established() && !self.self_leaving;
        let sender_active = || self.foca.iter_members().any(|m| *m.id() == header.src);
        let me = self.foca.identity().clone();
        if header.message == foca::Message::TurnUndead {
            if header.dst == me && established && sender_active() {
                self.declare_down(header.src);
                return Screened::Consumed;
            }
            return Screened::Unchanged;
        }
        if data.remaining() < 2
            || matches!(
                header.message,
                foca::Message::Announce | foca::Message::Broadcast
            )
        {
            return Screened::Unchanged;
        }
        let count = data.get_u16();
        let mut updates = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            match foca::Codec::<Identity>::decode_member(&mut PostcardCodec, &mut data) {
                Ok(update) => updates.push(update),
                // foca rejects it as it is.
                Err(_) => return Screened::Unchanged,
            }
        }
        if established
            && sender_active()
            && updates
                .iter()
                .any(|u| u.state() == foca::State::Down && *u.id() == me)
        {
            self.declare_down(header.src);
            return Screened::Consumed;
        }
        let tolerance = (self.swim.probe_period + self.swim.suspect_to_down_after) / 2;
        let before = updates.len();
        updates.retain(|u| {
            let id = u.id();
            !(u.state() == foca::State::Down
                && *id != me
                && self.state.heard_within(id.id, id.generation, tolerance))
        });
        if updates.len() == before {
            return Screened::Unchanged;
        }
        tracing::debug!(
            dropped = before - updates.len(),
            "ignored down verdicts on members heard from just now"
        );
        let mut rewritten = Vec::with_capacity(payload.len());
        if foca::Codec::<Identity>::encode_header(&mut PostcardCodec, &header, &mut rewritten)
            .is_err()
        {
            return Screened::Unchanged;
        }
        rewritten.put_u16(updates.len() as u16);
        for update in &updates {
            if foca::Codec::<Identity>::encode_member(&mut PostcardCodec, update, &mut rewritten)
                .is_err()
            {
                return Screened::Unchanged;
            }
        }
        rewritten.extend_from_slice(data);
        Screened::Rewritten(rewritten)
    }

    /// Declares `member` down in this member's view (and so, through gossip, in its side's).
    fn declare_down(&mut self, member: Identity) {
        if let Err(e) = self.foca.apply_many(
            std::iter::once(Member::down(member)),
            true,
            &mut self.runtime,
        ) {
            tracing::debug!(error = %e, "could not declare a member down");
        }
    }

    /// Whether `payload` is a "you are down" message (foca's `TurnUndead`) from a sender this
    /// member itself considers down, to be ignored for now.
    ///
    /// foca obeys such a message even from a sender it distrusts, so that two members that each
    /// declared the other down do not stay apart. But the sender is usually the one that was cut
    /// off: it declared everyone down, and obeying would make a healthy member of the majority
    /// (the coordinator, say) renew itself and be declared down everywhere. So a member with
    /// live peers ignores such verdicts for a grace period (twice a probe period plus the
    /// suspicion timeout, plus four split-brain probe intervals) from a sender that keeps
    /// sending them: the member that was cut off, with no live peer, obeys the majority's
    /// verdict at once, merges back and its own verdicts stop. Two groups of several members
    /// each are normally merged by the merge protocol within the grace period; if it failed to
    /// find them, both keep receiving verdicts past it and obey them, so they still merge.
    fn is_stale_verdict(&mut self, payload: &[u8], from: SocketAddr) -> bool {
        let Ok(header) = foca::Codec::<Identity>::decode_header(&mut PostcardCodec, payload) else {
            return false;
        };
        if header.message != foca::Message::TurnUndead {
            return false;
        }
        // A verdict on the identity this member had before it renewed is old news, which foca
        // drops (it is not addressed to this identity). Answered with the renewed identity, which
        // the sender already trusts, it would make a healthy sender renew in turn.
        if header.dst != *self.foca.identity() {
            return false;
        }
        let has_peers = self.foca.iter_members().next().is_some();
        let sender_active = self.foca.iter_members().any(|m| *m.id() == header.src);
        if !has_peers || sender_active {
            return false;
        }
        // Long enough for the merge protocol to find the other side and fold the smaller one
        // in (a probe round, a confirming one, the merge): obeying makes a member that holds a
        // table merge back on its own.
        let grace = (self.swim.probe_period + self.swim.suspect_to_down_after) * 2
            + self.probe_interval * 4;
        // Verdicts come back with every announce to a down member; a longer silence starts a
        // new run.
        let run = grace
            + self
                .swim
                .periodic_announce_to_down_members
                .as_ref()
                .map_or(Duration::ZERO, |p| p.frequency * 2);
        let now = Instant::now();
        let seen = self.ignored_verdicts.entry(from).or_insert((now, now));
        if now.duration_since(seen.1) > run {
            *seen = (now, now);
        }
        let first_of_run = seen.0 == now;
        seen.1 = now;
        let ignore = now.duration_since(seen.0) < grace;
        self.ignored_verdicts
            .retain(|_, (_, last)| now.duration_since(*last) <= run);
        if !ignore {
            self.ignored_verdicts.remove(&from);
            return false;
        }
        // Tell the sender it is down, as foca would have, once per run: a member that was cut
        // off and has no live peer obeys at once, merges back, and its verdicts stop. Answering
        // every verdict kept two sides that each saw the other down answering each other's
        // answers until both obeyed past the grace period, the larger side included.
        if !first_of_run {
            return true;
        }
        let verdict = foca::Header {
            src: self.foca.identity().clone(),
            src_incarnation: Default::default(),
            dst: header.src.clone(),
            message: foca::Message::TurnUndead,
        };
        let mut bytes = Vec::new();
        if foca::Codec::<Identity>::encode_header(&mut PostcardCodec, &verdict, &mut bytes).is_ok()
        {
            foca::Runtime::send_to(&mut self.runtime, header.src, &bytes);
        }
        true
    }

    /// Takes `identity` off the identities ignored as the cluster's this member left: the
    /// cluster it joined counts it as a live member (only third parties can say so, as its own
    /// datagrams are ignored), so it is one of that cluster's.
    ///
    /// An identity the member being left had only just renewed to, by merging into the same
    /// larger cluster first, is one of them: the merge order names the larger cluster's members
    /// as they were before it joined. Ignoring its datagrams for good left the two members
    /// unable to settle on each other: this one never heard the other's acks nor its "you are
    /// down" answers, and kept seeing it alive through indirect probes, while the other once
    /// took a verdict from this one and saw it down from then on. A 30-minute Jepsen run stayed
    /// like that for 3 minutes, until it gave up, with one member seeing four and the others
    /// five.
    fn admit(&mut self, identity: &Identity) {
        if self.excluded.remove(&(identity.id, identity.generation)) {
            tracing::debug!(member = %identity.id, "a member of the cluster left behind is one of the joined cluster's");
        }
    }

    /// Whether a SWIM datagram comes from an identity of the cluster this member left.
    fn is_excluded(&mut self, payload: &[u8]) -> bool {
        if self.excluded.is_empty() {
            return false;
        }
        foca::Codec::<Identity>::decode_header(&mut PostcardCodec, payload)
            .is_ok_and(|h| self.excluded.contains(&(h.src.id, h.src.generation)))
    }

    /// Handles every datagram already waiting in the socket, ignoring the heartbeats among
    /// them (they were sent while this member was stalled; counting them would have a member
    /// that was paused past its peers' failure detection count them as present).
    fn drain_after_stall(&mut self, buf: &mut [u8]) {
        self.stale_heartbeats = true;
        // Bounded: a socket that keeps filling must not hold the task here.
        for _ in 0..100_000 {
            match self.socket.try_recv_from(buf) {
                Ok((len, from)) => self.on_datagram(&buf[..len], from),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // An ICMP error reported for an earlier send: the next datagram may follow.
                Err(_) => continue,
            }
        }
        self.stale_heartbeats = false;
    }

    /// Queues a heartbeat for every live peer, and a farewell one for the members gone from the
    /// view just now (see [`Heartbeat::farewell`]), sent at the next flush. A member that has
    /// left or is merging away sends none.
    fn send_heartbeats(&mut self) {
        if self.self_leaving || self.merge_ordered {
            return;
        }
        let me = self.foca.identity();
        let (coordinator, countable_ms) = self.state.heartbeat_countable();
        let beat = Heartbeat {
            id: me.id.0,
            generation: me.generation,
            coordinator,
            countable_ms,
            view: self.state.view_key(),
            farewell: false,
        };
        for peer in self.state.peer_identities() {
            self.queue_datagram(Kind::Heartbeat, &beat, peer.gossip);
        }
        let farewell = Heartbeat {
            farewell: true,
            ..beat
        };
        for gone in self.state.farewell_addresses() {
            self.queue_datagram(Kind::Heartbeat, &farewell, gone);
        }
    }

    /// Frames `payload` as `kind` for `to`, sent at the next flush.
    fn queue_datagram<T: serde::Serialize>(&mut self, kind: Kind, payload: &T, to: SocketAddr) {
        let mut datagram = Vec::new();
        frame::write_header(&mut datagram, kind, self.cluster_hash);
        match postcard::to_extend(payload, datagram) {
            Ok(datagram) if datagram.len() + TAG_LEN <= self.max_datagram_size => {
                self.outbox.push((to, datagram))
            }
            Ok(_) => tracing::debug!(?kind, "datagram too large; not sent"),
            Err(e) => tracing::debug!(?kind, error = %e, "could not encode datagram"),
        }
    }

    /// This member's view of its cluster.
    /// Lists as many members as fit in one datagram.
    fn my_view(&self) -> ClusterView {
        let members = self.state.members();
        let mut view = ClusterView {
            sender: self.foca.identity().clone(),
            coordinator: self.state.coordinator_key(),
            size: members.len() as u32,
            members: members
                .iter()
                .take(discovery::MAX_LISTED)
                .map(|m| m.gossip_addr)
                .collect(),
        };
        let room = self.max_datagram_size.saturating_sub(frame::OVERHEAD);
        while !view.members.is_empty()
            && postcard::experimental::serialized_size(&view).map_or(true, |n| n > room)
        {
            let keep = view.members.len() / 2;
            view.members.truncate(keep);
        }
        view
    }

    /// Whether this member coordinates its cluster, holds its table, and is not on its way out.
    fn coordinates(&self) -> bool {
        let me = self.foca.identity();
        self.state.coordinator_key() == (me.generation, me.id.0)
            && self.state.is_established()
            && !self.self_leaving
            && !self.merge_ordered
    }

    /// The coordinator's probe round: its view to the seeds and to the members seen going down
    /// recently that are not members now (at most 16 per round, the most recent first).
    async fn probe_other_clusters(&mut self) {
        if !self.coordinates() {
            self.verdicts.clear();
            return;
        }
        // Its own address is among the members'.
        let members: Vec<SocketAddr> = self.state.members().iter().map(|m| m.gossip_addr).collect();
        let known = self
            .state
            .recently_gone(self.remember_down)
            .into_iter()
            .chain(self.seeds.iter().copied());
        let targets = distinct_targets(known, &members);
        let view = self.my_view();
        for target in targets {
            self.queue_datagram(Kind::Probe, &view, target);
        }
    }

    /// Another cluster's view, from a probe or its answer: the coordinator decides whether its
    /// cluster merges into that one, once the same verdict held for a probe interval.
    fn on_view(&mut self, theirs: ClusterView) {
        if !self.coordinates() {
            return;
        }
        // A view whose coordinator or sender this member now sees under a newer generation was
        // sent before that member renewed and joined this cluster: it describes nothing any
        // more. Its members' addresses overlap this view's (the renewed members are here), and
        // by coordinator age it said this cluster merges (a Jepsen run: the majority's
        // coordinator merged into the minority that had just merged into it, and queue items
        // both sides handed over were polled twice).
        let members: Vec<(u64, u64)> = self
            .state
            .members()
            .iter()
            .map(|m| (m.generation, m.id.0))
            .collect();
        if discovery::outdated(&theirs, &members) {
            self.verdicts.remove(&theirs.coordinator);
            return;
        }
        let mine = self.my_view();
        if discovery::decide(&mine, &theirs) != Verdict::WeMerge {
            // The verdict must hold without a break: a contrary view from that cluster starts
            // it over (one reached while the views overlapped, kept through views that said
            // the other side merges, made both sides merge into each other).
            self.verdicts.remove(&theirs.coordinator);
            return;
        }
        let now = Instant::now();
        // The same verdict on the same coordinator for a probe interval confirms it; one older
        // than four intervals has gone stale and starts over. Verdicts are kept per
        // coordinator: answers from members that do not agree yet on their coordinator must not
        // keep resetting one another (one kept for a coordinator no answer names any more left
        // a 30-minute Jepsen run stuck, an isolated coordinator and the majority never merging).
        let stale = self.probe_interval * 4;
        self.verdicts
            .retain(|_, first| now.duration_since(*first) <= stale);
        let first_seen = *self.verdicts.entry(theirs.coordinator).or_insert_with(|| {
            tracing::info!(
                their_size = theirs.size,
                our_size = mine.size,
                their_coordinator = ?theirs.coordinator,
                "found another cluster of this name; merging into it if it persists"
            );
            now
        });
        if now.duration_since(first_seen) < self.probe_interval {
            return;
        }
        self.verdicts.clear();
        let mut targets = theirs.members.clone();
        if !targets.contains(&theirs.sender.gossip) {
            targets.push(theirs.sender.gossip);
        }
        tracing::warn!(
            their_size = theirs.size,
            our_size = mine.size,
            "split brain: this cluster merges into the larger one"
        );
        // Every member of this cluster, then this one; each order twice (datagrams get lost;
        // a member that missed both is left alone, coordinates itself, and merges in turn).
        let order = (self.foca.identity().clone(), targets.clone());
        for peer in self.state.peer_identities() {
            self.queue_datagram(Kind::MergeOrder, &order, peer.gossip);
            self.queue_datagram(Kind::MergeOrder, &order, peer.gossip);
        }
        self.merge_ordered = true;
        self.state.order_merge(targets);
    }

    /// A merge order: obeyed if it comes from this member's coordinator.
    fn on_merge_order(&mut self, coordinator: Identity, targets: Vec<SocketAddr>) {
        if self.merge_ordered
            || self.self_leaving
            || targets.is_empty()
            || self.state.peer(coordinator.id).as_ref() != Some(&coordinator)
            || self.state.coordinator_key() != (coordinator.generation, coordinator.id.0)
        {
            return;
        }
        tracing::warn!(coordinator = %coordinator.id, "ordered to merge into another cluster");
        self.merge_ordered = true;
        self.state.order_merge(targets);
    }

    /// Leaves this cluster without a word and joins the one at `targets` as a renewed
    /// identity. The old cluster's identities are ignored from now on; every peer is reported
    /// down.
    fn rejoin_into(&mut self, targets: &[SocketAddr]) -> Identity {
        use foca::Identity as _;
        let current = self.foca.identity().clone();
        let identity = current.renew().unwrap_or(current);
        // Only the members of the cluster being left: the ones it saw go down may be the other
        // side, which this member joins. Nor any member at an address of the cluster it joins:
        // a member that merges back alone may already have let some of them in again, and
        // ignoring them would leave it unable to join (it refuses the tables of a coordinator
        // it does not see, and so merged again and again, alone: a 30-minute Jepsen run).
        for member in self.foca.iter_members() {
            let id = member.id();
            if !targets.contains(&id.gossip) {
                self.excluded.insert((id.id, id.generation));
            }
        }
        self.state.set_local(identity.clone());
        self.state.forget_peers();
        self.state.set_connected(false);
        let rng = SmallRng::seed_from_u64(identity.id.0 ^ identity.generation);
        self.foca = Foca::new(identity.clone(), self.swim.clone(), rng, PostcardCodec);
        self.runtime = AccumulatingRuntime::new();
        self.timers = TimerQueue::new();
        self.outbox.clear();
        self.ignored_verdicts.clear();
        self.verdicts.clear();
        self.merge_ordered = false;
        self.rejoin_targets = targets
            .iter()
            .copied()
            .filter(|a| *a != identity.gossip)
            .take(16)
            .collect();
        for &addr in targets {
            if addr == identity.gossip {
                continue;
            }
            if let Err(e) = self
                .foca
                .announce(Identity::placeholder(addr), &mut self.runtime)
            {
                tracing::debug!(%addr, error = %e, "announce failed");
            }
        }
        tracing::info!(
            generation = identity.generation,
            "rejoining as a renewed member of the larger cluster"
        );
        identity
    }

    /// A peer says it leaves. Only a notice naming a live identity at the generation we know is
    /// believed; it is then declared down at once instead of after the failure detector's delay.
    fn on_leave_notice(&mut self, payload: &[u8]) -> bool {
        let Ok(identity) = postcard::from_bytes::<Identity>(payload) else {
            return false;
        };
        if self.state.peer(identity.id).as_ref() != Some(&identity) {
            // Unknown, or an older generation: nothing to do, but well-formed.
            return true;
        }
        self.leaving.insert((identity.id, identity.generation));
        if let Err(e) = self.foca.apply_many(
            std::iter::once(Member::down(identity)),
            true,
            &mut self.runtime,
        ) {
            tracing::debug!(error = %e, "could not apply leave notice");
        }
        true
    }

    async fn leave(&mut self) {
        self.self_leaving = true;
        let me = self.foca.identity().clone();
        match postcard::to_stdvec(&me) {
            Ok(notice) => {
                for peer in self.state.peer_identities() {
                    let mut datagram = std::mem::take(&mut self.send_buf);
                    frame::write_header(&mut datagram, Kind::Leave, self.cluster_hash);
                    datagram.extend_from_slice(&notice);
                    self.send(&mut datagram, peer.gossip).await;
                    self.send_buf = datagram;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode leave notice"),
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(error = %e, "foca leave error");
        }
        self.flush().await;
        tracing::info!(member = %me.id, "left the cluster");
    }

    /// Carries out what foca asked for: notifications, timers, then datagrams.
    async fn flush(&mut self) {
        loop {
            while let Some(notification) = self.runtime.to_notify() {
                self.on_notification(notification);
            }
            match self.restart_as.take() {
                Some((identity, keep_members)) => self.restart_foca(identity, keep_members),
                None => break,
            }
        }
        // The view changed: peers learn at once whom this member follows now, and a new peer
        // counts for split-brain protection without waiting for the next heartbeat round.
        if std::mem::take(&mut self.beat_now) && self.heartbeat_interval.is_some() {
            self.send_heartbeats();
        }
        for (to, mut datagram) in std::mem::take(&mut self.outbox) {
            self.send(&mut datagram, to).await;
        }
        let now = Instant::now();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timers.schedule(now, after, timer);
        }
        while let Some((to, data)) = self.runtime.to_send() {
            let mut datagram = std::mem::take(&mut self.send_buf);
            frame::write_header(&mut datagram, Kind::Swim, self.cluster_hash);
            datagram.extend_from_slice(&data);
            self.send(&mut datagram, to.gossip).await;
            self.send_buf = datagram;
        }
    }

    /// Stamps and seals `datagram` (header and payload) and sends it.
    async fn send(&mut self, datagram: &mut Vec<u8>, to: SocketAddr) {
        let counters = &self.state.counters;
        if self.is_cut(to) {
            Counters::bump(&counters.dropped_by_fault_switch);
            return;
        }
        self.counter += 1;
        let stamp = frame::Stamp {
            instance: self.instance,
            counter: self.counter,
            sent_ms: unix_ms(),
        };
        frame::seal(datagram, &self.keys, &stamp);
        match self.socket.send_to(datagram, to).await {
            Ok(_) => Counters::bump(&counters.sent),
            Err(e) => {
                Counters::bump(&counters.send_errors);
                tracing::trace!(%to, error = %e, "gossip send failed");
            }
        }
    }

    /// Declares down the members a test's fault switch says this one suspects wrongly (see
    /// [`FaultSwitch::false_suspicion`]).
    fn act_on_false_suspicions(&mut self) {
        let Some(switch) = &self.fault_switch else {
            return;
        };
        for of in switch.take_false_suspicions(self.foca.identity().gossip) {
            let suspected = self
                .foca
                .iter_members()
                .map(|m| m.id().clone())
                .find(|id| id.gossip == of);
            if let Some(member) = suspected {
                tracing::info!(peer = %member.id, "fault switch: declaring a live member down");
                self.declare_down(member);
            }
        }
    }

    fn is_cut(&self, peer: SocketAddr) -> bool {
        self.fault_switch
            .as_ref()
            .is_some_and(|s| s.is_cut(self.foca.identity().gossip, peer))
    }

    fn on_notification(&mut self, notification: OwnedNotification<Identity>) {
        match notification {
            OwnedNotification::MemberUp(identity) => {
                self.beat_now = true;
                self.leaving.remove(&(identity.id, identity.generation));
                self.admit(&identity);
                self.state.peer_up(identity);
            }
            OwnedNotification::MemberDown(identity) => {
                self.beat_now = true;
                let left = self.leaving.remove(&(identity.id, identity.generation));
                self.state.peer_gone(&identity, left);
            }
            OwnedNotification::Rename(old, new) => {
                self.beat_now = true;
                // The identity at an address was replaced (a restart, or a rejoin with a higher
                // generation). If the old one was live, the new one is live too and foca sends no
                // MemberUp for it. A new identity foca holds as down is not one the joined
                // cluster counts live: it stays ignored if it was.
                if self.foca.iter_members().any(|m| *m.id() == new) {
                    self.admit(&new);
                }
                if self.state.peer(old.id).as_ref() == Some(&old) {
                    self.state.peer_gone(&old, false);
                    self.state.peer_up(new);
                }
            }
            OwnedNotification::Active => self.state.set_connected(true),
            OwnedNotification::Idle => self.state.set_connected(false),
            OwnedNotification::Rejoin(identity) => {
                tracing::warn!(
                    generation = identity.generation,
                    "declared down by peers; rejoined with a new generation"
                );
                self.state.set_local(identity.clone());
                let merging = self.merge_back_after_declared_down(&identity);
                self.restart_as = Some((identity, !merging));
            }
            OwnedNotification::Defunct => {
                if !self.self_leaving {
                    tracing::warn!("declared down by peers and could not rejoin");
                }
                self.state.set_connected(false);
            }
        }
    }
}

/// The wall clock in Unix milliseconds, stamped on datagrams for the replay window.
/// At most 16 distinct addresses from `known`, in order, none of them in `except`: whom a
/// probe or a merge back reaches.
fn distinct_targets(
    known: impl Iterator<Item = SocketAddr>,
    except: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = Vec::new();
    for addr in known {
        if targets.len() == 16 {
            break;
        }
        if !except.contains(&addr) && !targets.contains(&addr) {
            targets.push(addr);
        }
    }
    targets
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::super::tests::identity;
    use super::*;
    use rand::RngExt;

    fn node(id: u64, port: u16) -> SwimNode {
        Foca::new(
            identity(id, port, 1),
            crate::SwimConfig::default().to_foca(1388),
            SmallRng::seed_from_u64(id),
            PostcardCodec,
        )
    }

    /// Runs three nodes against each other for a while (timers fired at once) and returns every
    /// datagram payload they exchanged: announces, feeds, pings, acks, indirect probes, gossip.
    fn real_traffic() -> Vec<Vec<u8>> {
        let mut nodes = [node(1, 1), node(2, 2), node(3, 3)];
        let mut runtimes: [AccumulatingRuntime<Identity>; 3] = Default::default();
        let addr_of = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
        nodes[1]
            .announce(Identity::placeholder(addr_of(1)), &mut runtimes[1])
            .unwrap();
        nodes[2]
            .announce(Identity::placeholder(addr_of(1)), &mut runtimes[2])
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..200 {
            for from in 0..3 {
                while let Some((to, data)) = runtimes[from].to_send() {
                    seen.push(data.to_vec());
                    let target = usize::from(to.gossip.port()) - 1;
                    let _ = nodes[target].handle_data(&data, &mut runtimes[target]);
                }
                while let Some((_, timer)) = runtimes[from].to_schedule() {
                    let _ = nodes[from].handle_timer(timer, &mut runtimes[from]);
                }
                while runtimes[from].to_notify().is_some() {}
            }
        }
        seen
    }

    /// A driver for `me` on a real (unused) socket.
    async fn driver(me: Identity) -> Driver {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(MembershipState::new(me.clone(), Duration::from_secs(1)));
        let config = DriverConfig {
            identity: me,
            swim: crate::SwimConfig::default().to_foca(1388),
            cluster_hash: 7,
            seeds: Vec::new(),
            seed_retry_interval: Duration::from_secs(1),
            max_datagram_size: 1400,
            fault_switch: None,
            probe_interval: Duration::from_secs(1),
            remember_down: Duration::from_secs(60),
            keys: Arc::new(Keyring::new("c", &crate::SecurityConfig::default())),
            replay_window: Duration::from_secs(30),
            heartbeat_interval: None,
        };
        Driver::new(config, socket, state)
    }

    /// Hands every notification foca raised to the driver.
    fn notify(driver: &mut Driver) {
        while let Some(notification) = driver.runtime.to_notify() {
            driver.on_notification(notification);
        }
    }

    /// A ping from `from` to `to`, as foca encodes it.
    fn ping(from: &Identity, to: &Identity) -> Vec<u8> {
        let header = foca::Header {
            src: from.clone(),
            src_incarnation: Default::default(),
            dst: to.clone(),
            message: foca::Message::Ping(1),
        };
        let mut bytes = Vec::new();
        foca::Codec::<Identity>::encode_header(&mut PostcardCodec, &header, &mut bytes).unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_member_of_the_cluster_left_behind_is_heard_once_the_joined_cluster_counts_it() {
        let (a, b, c) = (identity(1, 1, 1), identity(2, 2, 5), identity(3, 3, 1));
        let mut driver = driver_with_peers(a, &[b.clone(), c.clone()]).await;
        assert_eq!(driver.state.peer_identities().len(), 2);
        // The merge order names the larger cluster as it was before b (having renewed itself to
        // generation 5 by merging into it first) joined it: only c.
        let renewed = driver.rejoin_into(&[c.gossip]);
        assert!(driver.is_excluded(&ping(&b, &renewed)));
        assert!(!driver.is_excluded(&ping(&c, &renewed)));
        // c's feed says b is one of the larger cluster's live members.
        driver
            .foca
            .apply_many(
                [Member::alive(c.clone()), Member::alive(b.clone())].into_iter(),
                true,
                &mut driver.runtime,
            )
            .unwrap();
        notify(&mut driver);
        assert!(driver.state.peer(b.id).is_some());
        assert!(
            !driver.is_excluded(&ping(&b, &renewed)),
            "b's acks and verdicts must be heard"
        );
        // An identity of the cluster left behind that the joined cluster does not count stays
        // ignored.
        let mut driver = driver_with_peers(identity(1, 1, 1), &[b.clone(), c.clone()]).await;
        let renewed = driver.rejoin_into(&[c.gossip]);
        driver
            .foca
            .apply_many(
                std::iter::once(Member::alive(c.clone())),
                true,
                &mut driver.runtime,
            )
            .unwrap();
        notify(&mut driver);
        assert!(driver.is_excluded(&ping(&b, &renewed)));
    }

    /// Seals the datagrams `from` queued for `to` and hands them to `to` as received; returns
    /// the heartbeats among them.
    fn deliver(from: &mut Driver, to: &mut Driver) -> Vec<Heartbeat> {
        let target = to.foca.identity().gossip;
        let mut beats = Vec::new();
        for (addr, mut datagram) in std::mem::take(&mut from.outbox) {
            if addr != target {
                continue;
            }
            beats.push(postcard::from_bytes(&datagram[frame::HEADER_LEN..]).unwrap());
            from.counter += 1;
            let stamp = frame::Stamp {
                instance: from.instance,
                counter: from.counter,
                sent_ms: unix_ms(),
            };
            frame::seal(&mut datagram, &from.keys, &stamp);
            to.on_datagram(&datagram, from.foca.identity().gossip);
        }
        beats
    }

    #[tokio::test]
    async fn a_member_declared_down_stops_counting_the_member_that_declared_it() {
        // x coordinates (oldest); a and c are its peers, and a counts x in their common view.
        let (x, a, c) = (identity(1, 1, 1), identity(2, 2, 1), identity(3, 3, 1));
        let mut at_x = driver_with_peers(x.clone(), &[a.clone(), c.clone()]).await;
        let mut at_a = driver_with_peers(a.clone(), &[x.clone(), c.clone()]).await;
        at_x.state.set_established(true);
        assert_eq!(at_a.state.view_key(), at_x.state.view_key());
        at_x.send_heartbeats();
        let beats = deliver(&mut at_x, &mut at_a);
        assert!(beats.len() == 1 && !beats[0].farewell, "{beats:?}");
        assert_eq!(at_a.state.quorum_present(), 2, "a counts x");
        // x declares a down (a verdict gossiped by the other side of a split that healed) while
        // a still sees x: x's next heartbeats still go to a, as farewells, and only to a.
        at_x.declare_down(a.clone());
        notify(&mut at_x);
        assert!(at_x.state.peer(a.id).is_none());
        at_x.send_heartbeats();
        let to_c = at_x
            .outbox
            .iter()
            .filter(|(to, _)| *to == c.gossip)
            .map(|(_, d)| postcard::from_bytes::<Heartbeat>(&d[frame::HEADER_LEN..]).unwrap())
            .collect::<Vec<_>>();
        assert!(to_c.len() == 1 && !to_c[0].farewell, "{to_c:?}");
        let beats = deliver(&mut at_x, &mut at_a);
        assert!(beats.len() == 1 && beats[0].farewell, "{beats:?}");
        assert!(at_a.state.peer(x.id).is_some(), "a still sees x");
        assert_eq!(at_a.state.quorum_present(), 1, "a no longer counts x");
        // Once a is back under a renewed identity, x sends it heartbeats again, not farewells.
        at_x.state.peer_up(identity(2, 2, 2));
        assert!(at_x.state.farewell_addresses().is_empty());
    }

    /// A driver for `me` that sees `peers` alive.
    async fn driver_with_peers(me: Identity, peers: &[Identity]) -> Driver {
        let mut driver = driver(me).await;
        driver
            .foca
            .apply_many(
                peers.iter().cloned().map(Member::alive),
                true,
                &mut driver.runtime,
            )
            .unwrap();
        notify(&mut driver);
        driver
    }

    #[test]
    fn mutated_real_datagrams_never_panic_foca_or_the_leave_decoder() {
        let corpus = real_traffic();
        assert!(corpus.len() > 50, "got {} datagrams", corpus.len());
        let mut target = node(9, 9);
        let mut runtime = AccumulatingRuntime::new();
        // Make the target a connected member so mutated messages reach deep handling.
        target
            .apply_many(
                std::iter::once(Member::alive(Identity {
                    generation: 1,
                    name: Arc::from("n1"),
                    ..Identity::placeholder("127.0.0.1:1".parse().unwrap())
                })),
                false,
                &mut runtime,
            )
            .unwrap();
        let mut rng = SmallRng::seed_from_u64(0xF0CA);
        let mut accepted = 0;
        for _ in 0..30_000 {
            let mut bytes = corpus[rng.random_range(0..corpus.len())].clone();
            for _ in 0..rng.random_range(1..5) {
                let len = bytes.len();
                match rng.random_range(0..5) {
                    0 if len > 0 => bytes[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                    1 if len > 0 => bytes[rng.random_range(0..len)] = rng.random(),
                    2 => bytes.truncate(rng.random_range(0..=len)),
                    3 => bytes.insert(rng.random_range(0..=len), rng.random()),
                    _ => bytes.extend_from_slice(&corpus[rng.random_range(0..corpus.len())]),
                }
            }
            if target.handle_data(&bytes, &mut runtime).is_ok() {
                accepted += 1;
            }
            let _ = postcard::from_bytes::<Identity>(&bytes);
            while runtime.to_send().is_some() {}
            while runtime.to_schedule().is_some() {}
            while runtime.to_notify().is_some() {}
        }
        // Some mutations leave valid messages; most are rejected. Neither panics.
        assert!(accepted > 0);
    }
}
