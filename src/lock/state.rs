//! The lock state machine: one lock's holder, holds, fencing counter, lease and FIFO waiters,
//! and every decision about them, as pure functions of the state, the request and the time. The
//! owner side (`lock::owner`) stores the state as an entry of an internal map in the lock's
//! partition, so it is sequenced, replicated to the backups and migrated like any entry.
//!
//! # Decisions
//!
//! - **Holder**: a member (id and generation) plus a holder id drawn per handle. A member that
//!   restarts or rejoins has a new generation, so it never inherits its previous incarnation's
//!   locks.
//! - **Holds**: every successful acquire of the holder adds a hold, named by the caller's
//!   random token; a retried acquire with the same token is the same hold. Reentry adds holds up
//!   to a limit and returns the same fence.
//! - **Fence**: each grant to a new holder gets `max(last fence + 1, floor)`, where the owner
//!   passes the partition's next mutation sequence number as `floor`. Both only grow, across
//!   failovers and migrations, so a fence is never handed out twice even for a lock whose state
//!   was deleted (idle per-key locks are).
//! - **Waiters**: FIFO. A waiter stays queued while it keeps asking (each ask extends its place
//!   until `expires_ms`). When the lock frees, the first live waiter is granted at once, with the
//!   lease it asked for; its next ask (normally the one waiting on the primary) claims the grant.
//!   A grant not claimed by the waiter's expiry is released again (`Abandoned`).
//! - **Releases** other than an unlock (lease expiry, holder's member down, abandoned grant) are
//!   remembered for [`RECENT_FOR_MS`], so the late unlock of such a holder gets a precise error.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How long a release is remembered for the holder's late unlock.
pub(crate) const RECENT_FOR_MS: u64 = 60_000;

/// Releases remembered at most.
const RECENT_MAX: usize = 16;

/// Extends a waiter's place to `until`, but only once less than half of what it would get is
/// left: every change is a replicated write that wakes the partition's other waiters, so most
/// asks must write nothing, and the place must never lapse between asks (which come at least
/// twice per keep time).
fn extend(waiter: &mut Waiter, until: u64, now_ms: u64) {
    let left = waiter.expires_ms.saturating_sub(now_ms);
    let offered = until.saturating_sub(now_ms);
    if until > waiter.expires_ms && left < offered / 2 {
        waiter.expires_ms = until;
    }
}

/// Who holds or waits for a lock: a member incarnation and a holder on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct HolderId {
    pub(crate) member: u64,
    pub(crate) generation: u64,
    pub(crate) id: u64,
}

/// The current holder's holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holding {
    pub(crate) holder: HolderId,
    pub(crate) fence: u64,
    /// One token per hold, oldest first (the reentry count is their number).
    pub(crate) tokens: Vec<u64>,
    /// When the lease runs out, in ms since the Unix epoch (0: no lease).
    pub(crate) lease_until_ms: u64,
    /// A grant to a waiter not yet claimed: released if not claimed by then (0: claimed).
    pub(crate) claim_by_ms: u64,
}

/// A holder queued for the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiter {
    pub(crate) holder: HolderId,
    pub(crate) token: u64,
    /// Dropped from the queue at this time unless it asks again.
    pub(crate) expires_ms: u64,
    /// The lease it asked for, in ms (0: none), started when it is granted.
    pub(crate) lease_ms: u64,
}

/// Why a holder lost the lock other than by unlocking it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Reason {
    Unlocked,
    LeaseExpired,
    MemberDown,
    Abandoned,
    /// A waiting acquire withdrawn by its caller (a late copy of it must not be granted).
    Withdrawn,
}

/// A release, remembered for the holder's late unlock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Released {
    pub(crate) holder: HolderId,
    pub(crate) fence: u64,
    pub(crate) reason: Reason,
    /// The holds (or the waiting acquire) it ended.
    pub(crate) tokens: Vec<u64>,
    pub(crate) at_ms: u64,
}

/// One lock's whole state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockState {
    /// The last fence handed out.
    pub(crate) fence: u64,
    pub(crate) holding: Option<Holding>,
    pub(crate) waiters: VecDeque<Waiter>,
    pub(crate) recent: VecDeque<Released>,
}

/// What an acquire gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// Held, with this fence and this many holds.
    Granted { fence: u64, count: u32 },
    /// Held by another holder; this one is queued at `position` (0: first).
    Queued { position: u32 },
    /// Held by another holder, and the caller would not wait.
    Busy,
    /// The holder already holds it `limit` times.
    ReentryLimit,
}

/// What a release gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseOutcome {
    /// Released one hold; this many remain.
    Released { remaining: u32 },
    /// The token was a waiter's (or a grant not yet claimed): withdrawn.
    Withdrawn,
    /// The caller does not hold the lock.
    NotHolder,
    /// The caller's holding ended when its lease ran out.
    LeaseExpired { fence: u64 },
    /// The caller's holding ended because its member was declared down or it never claimed it.
    Lost { fence: u64 },
}

impl LockState {
    /// Decodes a stored state; `None` for bytes that are not one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<LockState> {
        postcard::from_bytes(bytes).ok()
    }

    /// The stored form.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Plain data: postcard cannot fail on it.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Nothing held, nobody waiting, nothing to remember: the state may be deleted (its fence
    /// is covered by the floor).
    pub(crate) fn is_idle(&self) -> bool {
        self.holding.is_none() && self.waiters.is_empty() && self.recent.is_empty()
    }

    /// Whether a write by `writer` (a per-key lock's map write) must wait: another live holder
    /// holds the lock.
    pub(crate) fn blocks(&self, writer: Option<&HolderId>, now_ms: u64) -> bool {
        self.holding.as_ref().is_some_and(|h| {
            Some(&h.holder) != writer && (h.lease_until_ms == 0 || h.lease_until_ms > now_ms)
        })
    }

    /// An acquire by `holder` for the hold named `token`. `queue_until_ms` is how long it may
    /// wait in the queue (0: it will not wait); `floor` is the least fence a new grant may get.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn acquire(
        &mut self,
        holder: HolderId,
        token: u64,
        lease_ms: u64,
        queue_until_ms: u64,
        limit: u32,
        now_ms: u64,
        floor: u64,
    ) -> Acquired {
        if self
            .recent
            .iter()
            .any(|r| r.reason == Reason::Withdrawn && r.tokens.contains(&token))
        {
            // A late copy of an acquire its caller gave up: nobody waits for the answer.
            return Acquired::Busy;
        }
        if let Some(holding) = &mut self.holding {
            if holding.holder == holder && holding.tokens.contains(&token) {
                // The same hold asked again: a retry, or a waiter claiming its grant.
                holding.claim_by_ms = 0;
                return Acquired::Granted {
                    fence: holding.fence,
                    count: holding.tokens.len() as u32,
                };
            }
            if holding.holder == holder {
                if holding.tokens.len() >= limit.max(1) as usize {
                    return Acquired::ReentryLimit;
                }
                // The holder may have queued this acquire before it got the lock through
                // another one (tasks sharing a handle): it is a hold now, not a waiter.
                self.waiters.retain(|w| w.token != token);
                holding.tokens.push(token);
                holding.claim_by_ms = 0;
                if lease_ms != 0 {
                    holding.lease_until_ms = now_ms.saturating_add(lease_ms);
                }
                return Acquired::Granted {
                    fence: holding.fence,
                    count: holding.tokens.len() as u32,
                };
            }
            if queue_until_ms <= now_ms {
                self.waiters.retain(|w| w.token != token);
                return Acquired::Busy;
            }
            let position = match self.waiters.iter().position(|w| w.token == token) {
                Some(at) => {
                    extend(&mut self.waiters[at], queue_until_ms, now_ms);
                    at
                }
                None => {
                    self.waiters.push_back(Waiter {
                        holder,
                        token,
                        expires_ms: queue_until_ms,
                        lease_ms,
                    });
                    self.waiters.len() - 1
                }
            };
            return Acquired::Queued {
                position: position as u32,
            };
        }
        // Free: a queue left behind (its grants all lapsed) is served first.
        self.waiters.retain(|w| w.expires_ms > now_ms);
        if let Some(at) = self.waiters.iter().position(|w| w.token == token)
            && at > 0
        {
            extend(&mut self.waiters[at], queue_until_ms, now_ms);
            return Acquired::Queued {
                position: at as u32,
            };
        }
        if !self.waiters.is_empty() && self.waiters[0].token != token {
            return self.acquire_behind_queue(holder, token, lease_ms, queue_until_ms, now_ms);
        }
        self.waiters.retain(|w| w.token != token);
        let fence = self.next_fence(floor);
        self.holding = Some(Holding {
            holder,
            fence,
            tokens: vec![token],
            lease_until_ms: if lease_ms == 0 {
                0
            } else {
                now_ms.saturating_add(lease_ms)
            },
            claim_by_ms: 0,
        });
        Acquired::Granted { fence, count: 1 }
    }

    fn acquire_behind_queue(
        &mut self,
        holder: HolderId,
        token: u64,
        lease_ms: u64,
        queue_until_ms: u64,
        now_ms: u64,
    ) -> Acquired {
        if queue_until_ms <= now_ms {
            return Acquired::Busy;
        }
        self.waiters.push_back(Waiter {
            holder,
            token,
            expires_ms: queue_until_ms,
            lease_ms,
        });
        Acquired::Queued {
            position: (self.waiters.len() - 1) as u32,
        }
    }

    fn next_fence(&mut self, floor: u64) -> u64 {
        self.fence = self.fence.saturating_add(1).max(floor);
        self.fence
    }

    /// Remembers a release for the holder's late unlock.
    fn remember(&mut self, released: Released) {
        let now_ms = released.at_ms;
        self.recent
            .retain(|r| now_ms < r.at_ms.saturating_add(RECENT_FOR_MS));
        self.recent.push_back(released);
        while self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
    }

    /// An unlock by `holder` of the hold named `token` (0: its latest hold), or the withdrawal
    /// of its waiting acquire `token`. A retried unlock is answered as the first one was.
    pub(crate) fn release(
        &mut self,
        holder: HolderId,
        token: u64,
        now_ms: u64,
        floor: u64,
        alive: &dyn Fn(&HolderId) -> bool,
    ) -> ReleaseOutcome {
        // One of the current holds.
        if let Some(holding) = &mut self.holding
            && holding.holder == holder
            && (token == 0 || holding.tokens.contains(&token))
        {
            let unclaimed = holding.claim_by_ms != 0;
            let released = match holding.tokens.iter().position(|t| *t == token) {
                Some(at) => holding.tokens.remove(at),
                None => holding.tokens.pop().unwrap_or(token),
            };
            let remaining = holding.tokens.len() as u32;
            let fence = holding.fence;
            if remaining == 0 {
                self.end_holding(Reason::Unlocked, vec![released], now_ms, floor, alive);
            } else {
                self.remember(Released {
                    holder,
                    fence,
                    reason: Reason::Unlocked,
                    tokens: vec![released],
                    at_ms: now_ms,
                });
            }
            return if unclaimed {
                ReleaseOutcome::Withdrawn
            } else {
                ReleaseOutcome::Released { remaining }
            };
        }
        // A waiting acquire.
        if token != 0
            && let Some(at) = self
                .waiters
                .iter()
                .position(|w| w.token == token && w.holder == holder)
        {
            self.waiters.remove(at);
            self.remember(Released {
                holder,
                fence: 0,
                reason: Reason::Withdrawn,
                tokens: vec![token],
                at_ms: now_ms,
            });
            return ReleaseOutcome::Withdrawn;
        }
        // A holding that already ended: by this very unlock (a retry), or otherwise.
        let holds_now = self
            .holding
            .as_ref()
            .filter(|h| h.holder == holder)
            .map_or(0, |h| h.tokens.len() as u32);
        let ended = self.recent.iter().rev().find(|r| {
            r.holder == holder
                && now_ms < r.at_ms.saturating_add(RECENT_FOR_MS)
                && if token == 0 {
                    !matches!(r.reason, Reason::Unlocked | Reason::Withdrawn)
                } else {
                    r.tokens.contains(&token)
                }
        });
        match ended.map(|r| (r.reason, r.fence)) {
            Some((Reason::Unlocked, _)) => ReleaseOutcome::Released {
                remaining: holds_now,
            },
            Some((Reason::Withdrawn, _)) => ReleaseOutcome::Withdrawn,
            Some((Reason::LeaseExpired, fence)) => ReleaseOutcome::LeaseExpired { fence },
            Some((Reason::MemberDown | Reason::Abandoned, fence)) => ReleaseOutcome::Lost { fence },
            None => ReleaseOutcome::NotHolder,
        }
    }

    /// Ends the current holding for `reason` and grants the lock to the first live waiter.
    fn end_holding(
        &mut self,
        reason: Reason,
        unlocked: Vec<u64>,
        now_ms: u64,
        floor: u64,
        alive: &dyn Fn(&HolderId) -> bool,
    ) {
        let Some(ended) = self.holding.take() else {
            return;
        };
        let mut tokens = ended.tokens;
        tokens.extend(unlocked);
        self.remember(Released {
            holder: ended.holder,
            fence: ended.fence,
            reason,
            tokens,
            at_ms: now_ms,
        });
        self.grant_next(now_ms, floor, alive);
    }

    /// Grants a free lock to the first waiter still queued and alive.
    fn grant_next(&mut self, now_ms: u64, floor: u64, alive: &dyn Fn(&HolderId) -> bool) {
        if self.holding.is_some() {
            return;
        }
        while let Some(waiter) = self.waiters.pop_front() {
            if waiter.expires_ms <= now_ms || !alive(&waiter.holder) {
                continue;
            }
            let fence = self.next_fence(floor);
            self.holding = Some(Holding {
                holder: waiter.holder,
                fence,
                tokens: vec![waiter.token],
                lease_until_ms: if waiter.lease_ms == 0 {
                    0
                } else {
                    now_ms.saturating_add(waiter.lease_ms)
                },
                claim_by_ms: waiter.expires_ms.max(now_ms + 1),
            });
            return;
        }
    }

    /// Applies time and membership: ends a holding whose lease ran out, whose member is down
    /// or whose grant went unclaimed; drops waiters that stopped asking or whose member is
    /// down; forgets old releases. Returns whether anything changed.
    pub(crate) fn sweep(
        &mut self,
        now_ms: u64,
        floor: u64,
        alive: &dyn Fn(&HolderId) -> bool,
    ) -> bool {
        let before = self.clone();
        if let Some(holding) = &self.holding {
            let reason = if holding.lease_until_ms != 0 && holding.lease_until_ms <= now_ms {
                Some(Reason::LeaseExpired)
            } else if !alive(&holding.holder) {
                Some(Reason::MemberDown)
            } else if holding.claim_by_ms != 0 && holding.claim_by_ms <= now_ms {
                Some(Reason::Abandoned)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.end_holding(reason, Vec::new(), now_ms, floor, alive);
            }
        }
        self.waiters
            .retain(|w| w.expires_ms > now_ms && alive(&w.holder));
        self.grant_next(now_ms, floor, alive);
        self.recent
            .retain(|r| now_ms < r.at_ms.saturating_add(RECENT_FOR_MS));
        *self != before
    }

    /// Whether [`LockState::sweep`] would change anything now.
    pub(crate) fn needs_sweep(&self, now_ms: u64, alive: &dyn Fn(&HolderId) -> bool) -> bool {
        let holding_due = self.holding.as_ref().is_some_and(|h| {
            (h.lease_until_ms != 0 && h.lease_until_ms <= now_ms)
                || (h.claim_by_ms != 0 && h.claim_by_ms <= now_ms)
                || !alive(&h.holder)
        });
        holding_due
            || (self.holding.is_none() && !self.waiters.is_empty())
            || self
                .waiters
                .iter()
                .any(|w| w.expires_ms <= now_ms || !alive(&w.holder))
            || self
                .recent
                .front()
                .is_some_and(|r| now_ms >= r.at_ms.saturating_add(RECENT_FOR_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u32 = 3;

    fn h(id: u64) -> HolderId {
        HolderId {
            member: id,
            generation: 1,
            id,
        }
    }

    fn all_alive(_: &HolderId) -> bool {
        true
    }

    #[test]
    fn grants_reenters_with_the_same_fence_and_releases_in_fifo_order() {
        let mut s = LockState::default();
        assert_eq!(
            s.acquire(h(1), 10, 0, 0, LIMIT, 100, 5),
            Acquired::Granted { fence: 5, count: 1 }
        );
        // The same token again is the same hold.
        assert_eq!(
            s.acquire(h(1), 10, 0, 0, LIMIT, 100, 9),
            Acquired::Granted { fence: 5, count: 1 }
        );
        assert_eq!(
            s.acquire(h(1), 11, 0, 0, LIMIT, 100, 9),
            Acquired::Granted { fence: 5, count: 2 }
        );
        assert_eq!(
            s.acquire(h(1), 12, 0, 0, LIMIT, 100, 9),
            Acquired::Granted { fence: 5, count: 3 }
        );
        assert_eq!(
            s.acquire(h(1), 13, 0, 0, LIMIT, 100, 9),
            Acquired::ReentryLimit
        );
        // Others: a try fails, waiters queue in order.
        assert_eq!(s.acquire(h(2), 20, 0, 0, LIMIT, 100, 9), Acquired::Busy);
        assert_eq!(
            s.acquire(h(2), 20, 0, 1_000, LIMIT, 100, 9),
            Acquired::Queued { position: 0 }
        );
        assert_eq!(
            s.acquire(h(3), 30, 0, 1_000, LIMIT, 100, 9),
            Acquired::Queued { position: 1 }
        );
        let before = s.clone();
        assert_eq!(
            s.acquire(h(2), 20, 0, 1_500, LIMIT, 110, 9),
            Acquired::Queued { position: 0 }
        );
        assert_eq!(
            s, before,
            "an ask while half its place is left writes nothing"
        );
        s.acquire(h(2), 20, 0, 2_000, LIMIT, 600, 9);
        assert_eq!(s.waiters[0].expires_ms, 2_000);
        // Unlocking the holds one by one; a retried unlock changes nothing.
        assert_eq!(
            s.release(h(1), 12, 120, 9, &all_alive),
            ReleaseOutcome::Released { remaining: 2 }
        );
        assert_eq!(
            s.release(h(1), 12, 120, 9, &all_alive),
            ReleaseOutcome::Released { remaining: 2 }
        );
        assert_eq!(
            s.release(h(1), 0, 120, 9, &all_alive),
            ReleaseOutcome::Released { remaining: 1 }
        );
        assert_eq!(
            s.release(h(1), 10, 130, 40, &all_alive),
            ReleaseOutcome::Released { remaining: 0 }
        );
        assert_eq!(
            s.release(h(1), 10, 131, 41, &all_alive),
            ReleaseOutcome::Released { remaining: 0 },
            "a retried last unlock"
        );
        // The first waiter got it, with a larger fence, to be claimed by its expiry.
        let holding = s.holding.clone().unwrap();
        assert_eq!((holding.holder, holding.fence), (h(2), 40));
        assert_eq!(holding.claim_by_ms, 2_000);
        assert!(s.blocks(Some(&h(3)), 140) && !s.blocks(Some(&h(2)), 140));
        assert_eq!(
            s.acquire(h(2), 20, 0, 2_000, LIMIT, 140, 50),
            Acquired::Granted {
                fence: 40,
                count: 1
            }
        );
        assert_eq!(s.holding.as_ref().unwrap().claim_by_ms, 0);
        // A non-holder's unlock.
        assert_eq!(
            s.release(h(4), 0, 150, 60, &all_alive),
            ReleaseOutcome::NotHolder
        );
        assert_eq!(
            s.release(h(2), 20, 150, 60, &all_alive),
            ReleaseOutcome::Released { remaining: 0 }
        );
        assert_eq!(s.holding.as_ref().unwrap().holder, h(3));
        assert_eq!(s.holding.as_ref().unwrap().fence, 60);
    }

    #[test]
    fn leases_dead_members_and_unclaimed_grants_release_the_lock() {
        let mut s = LockState::default();
        s.acquire(h(1), 10, 50, 0, LIMIT, 100, 1);
        s.acquire(h(2), 20, 0, 10_000, LIMIT, 100, 1);
        assert!(!s.needs_sweep(149, &all_alive));
        assert!(!s.sweep(149, 2, &all_alive));
        assert!(s.needs_sweep(150, &all_alive));
        assert!(s.sweep(150, 7, &all_alive));
        assert_eq!(s.holding.as_ref().unwrap().holder, h(2));
        assert_eq!(s.holding.as_ref().unwrap().fence, 7);
        assert_eq!(
            s.release(h(1), 10, 160, 8, &all_alive),
            ReleaseOutcome::LeaseExpired { fence: 1 }
        );
        // Holder 2's member goes down: released, its late unlock learns why.
        let two_down = |x: &HolderId| x.member != 2;
        s.acquire(h(2), 20, 0, 0, LIMIT, 170, 8);
        s.acquire(h(3), 30, 0, 10_000, LIMIT, 170, 8);
        assert!(s.sweep(180, 9, &two_down));
        assert_eq!(s.holding.as_ref().unwrap().holder, h(3));
        assert_eq!(s.holding.as_ref().unwrap().fence, 9);
        assert_eq!(
            s.release(h(2), 20, 190, 10, &two_down),
            ReleaseOutcome::Lost { fence: 7 }
        );
        // Holder 3 never claims its grant before its expiry: released, nobody waits.
        assert!(s.sweep(10_000, 11, &all_alive));
        assert!(s.holding.is_none());
        assert!(
            s.sweep(200_000, 11, &all_alive),
            "old releases are forgotten"
        );
        assert!(s.is_idle());
        // The fence never goes back, even from an idle state.
        assert_eq!(
            s.acquire(h(4), 40, 0, 0, LIMIT, 200_000, 3),
            Acquired::Granted {
                fence: 10,
                count: 1
            }
        );
    }

    #[test]
    fn one_holder_with_two_acquires_in_flight_keeps_holds_and_queue_apart() {
        // Two tasks sharing one handle are one holder: both queue behind holder 1.
        let mut s = LockState::default();
        s.acquire(h(1), 10, 0, 0, LIMIT, 100, 1);
        s.acquire(h(2), 20, 0, 10_000, LIMIT, 100, 1);
        s.acquire(h(2), 21, 0, 10_000, LIMIT, 100, 1);
        s.release(h(1), 10, 110, 2, &all_alive);
        assert_eq!(s.holding.as_ref().unwrap().tokens, vec![20]);
        // The second acquire is a reentry now, and leaves the queue.
        assert_eq!(
            s.acquire(h(2), 21, 0, 10_000, LIMIT, 120, 3),
            Acquired::Granted { fence: 2, count: 2 }
        );
        assert!(s.waiters.is_empty());
        assert_eq!(
            s.release(h(2), 21, 130, 4, &all_alive),
            ReleaseOutcome::Released { remaining: 1 }
        );
        assert_eq!(
            s.release(h(2), 21, 131, 4, &all_alive),
            ReleaseOutcome::Released { remaining: 1 },
            "a retried partial unlock"
        );
        assert_eq!(
            s.release(h(2), 20, 140, 5, &all_alive),
            ReleaseOutcome::Released { remaining: 0 },
        );
        assert!(s.holding.is_none());
    }

    #[test]
    fn a_late_unlock_is_answered_by_its_own_token() {
        let mut s = LockState::default();
        s.acquire(h(1), 10, 50, 0, LIMIT, 100, 1);
        assert!(s.sweep(150, 2, &all_alive));
        // The same holder holds it again with another hold.
        s.acquire(h(1), 11, 0, 0, LIMIT, 160, 3);
        assert_eq!(
            s.release(h(1), 10, 170, 4, &all_alive),
            ReleaseOutcome::LeaseExpired { fence: 1 }
        );
        assert_eq!(
            s.release(h(1), 11, 180, 4, &all_alive),
            ReleaseOutcome::Released { remaining: 0 }
        );
        assert_eq!(
            s.release(h(1), 10, 190, 5, &all_alive),
            ReleaseOutcome::LeaseExpired { fence: 1 }
        );
        // A withdrawn acquire that arrives late is not granted.
        s.acquire(h(2), 20, 0, 0, LIMIT, 200, 6);
        s.acquire(h(3), 30, 0, 10_000, LIMIT, 200, 6);
        assert_eq!(
            s.release(h(3), 30, 210, 7, &all_alive),
            ReleaseOutcome::Withdrawn
        );
        s.release(h(2), 20, 220, 8, &all_alive);
        assert_eq!(
            s.acquire(h(3), 30, 0, 10_000, LIMIT, 230, 9),
            Acquired::Busy
        );
        assert!(s.holding.is_none());
    }

    #[test]
    fn waiters_withdraw_and_dead_waiters_are_skipped() {
        let mut s = LockState::default();
        s.acquire(h(1), 10, 0, 0, LIMIT, 100, 1);
        s.acquire(h(2), 20, 0, 10_000, LIMIT, 100, 1);
        s.acquire(h(3), 30, 0, 10_000, LIMIT, 100, 1);
        s.acquire(h(4), 40, 0, 10_000, LIMIT, 100, 1);
        assert_eq!(
            s.release(h(3), 30, 110, 2, &all_alive),
            ReleaseOutcome::Withdrawn
        );
        let two_down = |x: &HolderId| x.member != 2;
        s.release(h(1), 10, 120, 3, &two_down);
        assert_eq!(s.holding.as_ref().unwrap().holder, h(4));
        // A granted but unclaimed waiter that withdraws frees the lock again.
        assert_eq!(
            s.release(h(4), 40, 130, 4, &all_alive),
            ReleaseOutcome::Withdrawn
        );
        assert!(s.holding.is_none());
        // A decode of anything else fails cleanly.
        let bytes = s.encode();
        assert_eq!(LockState::decode(&bytes), Some(s));
        assert_eq!(LockState::decode(&[0xff, 0xff, 0xff]), None);
    }
}
