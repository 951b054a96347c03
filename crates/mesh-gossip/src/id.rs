//! Node identity as foca sees it: the node's name, gossip address and generation.
//!
//! A fresh process takes the wall clock in microseconds as its *generation*, so a restarted
//! node is a new foca identity that wins over its previous one (same address, higher
//! generation) and rejoins at once. When the cluster declares a running node down (after a
//! partition, say), foca renews its identity ([`foca::Identity::renew`]): the *renewal*
//! counter goes up and the generation stays. Entries are tied to the generation: a restart
//! drops the previous run's entries everywhere, a renewal keeps them (the node re-announces
//! them).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One incarnation of a node: name (unique in the cluster), gossip address, generation.
///
/// Field order is the comparison and encoding order: the cheap fields come first.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    /// Generation (process start): higher wins an address conflict.
    pub gen: u64,
    /// Renewals within this generation: higher wins among equal generations.
    pub renewal: u32,
    /// Gossip address (UDP and TCP).
    pub addr: SocketAddr,
    /// The node's name (the swarm node ID).
    pub name: Arc<str>,
}

impl NodeId {
    /// A new identity.
    pub fn new(name: impl Into<Arc<str>>, addr: SocketAddr, gen: u64) -> NodeId {
        NodeId {
            gen,
            renewal: 0,
            addr,
            name: name.into(),
        }
    }

    /// `(generation, renewal)`: which of two identities of a node is newer.
    pub fn version(&self) -> (u64, u32) {
        (self.gen, self.renewal)
    }

    /// A placeholder for an address whose identity is not known yet (a seed to announce
    /// to): foca accepts an announce addressed to any identity with the receiver's address.
    pub(crate) fn placeholder(addr: SocketAddr) -> NodeId {
        NodeId::new("", addr, 0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}#{}.{}",
            self.name, self.addr, self.gen, self.renewal
        )
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            gen: self.gen,
            renewal: self.renewal.wrapping_add(1),
            addr: self.addr,
            name: self.name.clone(),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.gen, self.renewal, &*self.name) > (adversary.gen, adversary.renewal, &*adversary.name)
    }
}

/// The wall clock in microseconds since the Unix epoch (a fresh generation / clock seed).
pub(crate) fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn renewed_identity_wins_conflict() {
        let a = NodeId::new("n1", "127.0.0.1:7946".parse().unwrap(), 5);
        let b = a.renew().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.addr(), b.addr());
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
        assert_eq!(b.gen, a.gen);
        let restarted = NodeId::new("n1", a.addr, 6);
        assert!(restarted.win_addr_conflict(&b));
    }
}
