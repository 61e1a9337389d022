//! The SWIM identity of a member, as foca sees it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::MemberId;

/// Who a member is on the wire: id, addresses, generation and name.
///
/// The gossip address is foca's `Addr`: at most one identity per address is live. When two
/// identities claim one address, the higher `(generation, id)` wins. A process starts with the
/// current time in microseconds as its generation and [`foca::Identity::renew`] takes the time
/// again (at least one more), so both
/// a process restarted at the same address and a member that was wrongly declared down rejoin at
/// once, without waiting for the cluster to forget the old identity.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) id: MemberId,
    pub(crate) gossip: SocketAddr,
    pub(crate) rpc: SocketAddr,
    pub(crate) generation: u64,
    /// Shared so foca's many clones of an identity do not copy the name.
    pub(crate) name: Arc<str>,
}

impl Identity {
    /// A fresh identity for a starting process.
    pub(crate) fn new(id: MemberId, gossip: SocketAddr, rpc: SocketAddr, name: Arc<str>) -> Self {
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Identity {
            id,
            gossip,
            rpc,
            generation,
            name,
        }
    }

    /// A stand-in for a seed whose identity is not known yet. foca accepts an announce addressed to
    /// any identity with the receiver's gossip address, and the answer carries the real one.
    pub(crate) fn placeholder(gossip: SocketAddr) -> Self {
        Identity {
            id: MemberId(0),
            gossip,
            rpc: gossip,
            generation: 0,
            name: Arc::from(""),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}({}@{} g{})",
            self.name, self.id, self.gossip, self.generation
        )
    }
}

impl foca::Identity for Identity {
    type Addr = SocketAddr;

    /// The generation becomes the current time (at least one more than before): a member that
    /// was declared down rejoins as the youngest member, so it cannot become coordinator and
    /// push the tables it made while cut off before it holds the cluster's.
    fn renew(&self) -> Option<Self> {
        let now = Identity::new(self.id, self.gossip, self.rpc, self.name.clone()).generation;
        Some(Identity {
            generation: now.max(self.generation.wrapping_add(1)),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.id) > (adversary.generation, adversary.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    #[test]
    fn renewed_and_restarted_identities_win_the_address() {
        let addr = "127.0.0.1:5701".parse().unwrap();
        let old = Identity::new(MemberId(7), addr, addr, Arc::from("a"));
        let renewed = old.renew().unwrap();
        assert!(renewed.generation > old.generation);
        assert_eq!(renewed.id, old.id);
        assert!(renewed.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&renewed));
        let restarted = Identity {
            generation: renewed.generation + 10,
            ..Identity::new(MemberId(1), addr, addr, Arc::from("b"))
        };
        assert!(restarted.win_addr_conflict(&renewed));
        assert_eq!(Identity::placeholder(addr).addr(), addr);
    }
}
