//! The gossip keys: what seals the nodes' gossip (`mesh-gossip`'s `seal`), made and rotated
//! by the leader, handed to nodes over the mutual-TLS control plane.
//!
//! - **Made and kept.** 32 random bytes each, stored in the replicated state
//!   (`StoreState::gossip_keys`) sealed with the managers' data key, as a secret's data is,
//!   with an ID that grows by one per key. The newest [`KEPT`] stay: the newest seals what
//!   a node sends, all of them open what it receives, so a node that has not heard of a new
//!   key yet still reads and is read (Docker keeps three network keys the same way).
//! - **Rotated.** The leader adds a key when there is none (a new swarm, or one made before
//!   gossip was sealed), when the newest is older than the rotation period (12 h, Docker's;
//!   [`set_rotation_period`] shortens it for tests through a hidden `meshd` flag), and at
//!   once, **retiring every older key**, when a node was removed since the newest was made:
//!   the removed node, which stops getting keys, can then neither read nor inject anything.
//!   (The few milliseconds until every node has the new key cost a packet or two.)
//! - **Handed out.** The answer to a node's assignments poll carries the keys, unsealed by
//!   the leader, to nodes the store has (not Left) and to no other, with the underlay
//!   addresses of every member ([`member_addrs`], for the node's filter of the VXLAN and
//!   gossip ports); both are in the answer's digest, so a rotation or a membership change
//!   wakes every node's poll at once. Nodes keep the keys in memory only: a restarted node
//!   gets them again with its first answer (and gossips from then on; a restarted manager
//!   takes them from its own store at once, `Member::gossip_from_store`), so they are never on
//!   a worker's disk.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_api::NodeState;

use crate::datakey::DataKey;
use crate::node_agent::GossipKey;
use crate::state::{Command, StoreState};

/// Keys kept (and accepted by nodes).
pub const KEPT: usize = 3;
/// How often a new key is made (Docker's 12 hours).
pub const ROTATION: Duration = Duration::from_secs(12 * 3600);

/// 0: [`ROTATION`].
static PERIOD_MS: AtomicU64 = AtomicU64::new(0);

/// Makes this process's leader rotate keys every `period` instead of [`ROTATION`] (tests).
pub fn set_rotation_period(period: Duration) {
    PERIOD_MS.store(period.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// The rotation period in force.
pub fn rotation_period() -> Duration {
    match PERIOD_MS.load(Ordering::Relaxed) {
        0 => ROTATION,
        ms => Duration::from_millis(ms),
    }
}

/// Whether the leader should add a key now, and whether it retires the others: `None`
/// when the newest is fresh.
pub fn due(state: &StoreState, now_ms: u64, period: Duration) -> Option<bool> {
    state.cluster.as_ref()?;
    let Some(newest) = state.gossip_keys.last() else {
        return Some(false);
    };
    if state.node_removals > newest.removals {
        return Some(true);
    }
    let age = now_ms.saturating_sub(newest.created_at);
    (u128::from(age) >= period.as_millis()).then_some(false)
}

/// The command that adds a new random key.
pub fn new_key(data_key: &DataKey, now_ms: u64, retire: bool) -> Result<Command, String> {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "no randomness for a gossip key".to_string())?;
    let sealed = data_key.seal(&secret).map_err(|e| e.message)?;
    Ok(Command::AddGossipKey {
        sealed,
        at: now_ms,
        retire,
    })
}

/// Whether `node_id` may have the keys: the store has it and it has not left.
pub fn entitled(state: &StoreState, node_id: &str) -> bool {
    state
        .nodes
        .get(node_id)
        .is_some_and(|n| n.state != NodeState::Left)
}

/// The keys, unsealed, for a node the store has (none for another, or without the data key).
pub fn for_node(state: &StoreState, node_id: &str, data_key: Option<&DataKey>) -> Vec<GossipKey> {
    let (true, Some(dk)) = (entitled(state, node_id), data_key) else {
        return Vec::new();
    };
    state
        .gossip_keys
        .iter()
        .filter_map(|k| {
            let secret = dk.unseal(&k.sealed).ok()?;
            Some(GossipKey { id: k.id, secret })
        })
        .collect()
}

/// The IDs of the keys in the store, oldest first.
pub fn ids(state: &StoreState) -> Vec<u32> {
    state.gossip_keys.iter().map(|k| k.id).collect()
}

/// The underlay addresses of the swarm's members (every node the store has that has not
/// left, Down ones included: they may come back), sorted.
pub fn member_addrs(state: &StoreState) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Left)
        .filter_map(
            |n| match n.addr.parse::<std::net::SocketAddr>().ok()?.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            },
        )
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CommandResult;
    use mesh_api::{Node, NodeRole};

    fn node(id: &str, addr: &str) -> Node {
        Node::new(id, id, NodeRole::Worker, addr)
    }

    fn state() -> StoreState {
        let mut s = StoreState::default();
        let mut m = node("m1", "10.0.0.1:2377");
        m.role = NodeRole::Manager;
        m.raft_id = 1;
        let cluster = crate::state::test_cluster();
        assert_eq!(
            s.apply(&Command::InitCluster { cluster, node: m }),
            CommandResult::Ok
        );
        assert_eq!(
            s.apply(&Command::AddNode {
                node: node("w1", "10.0.0.2:2377")
            }),
            CommandResult::Ok
        );
        s
    }

    #[test]
    fn keys_are_made_rotated_kept_three_and_retired_on_removal() {
        let dk = DataKey::generate().unwrap();
        let mut s = state();
        let hour = Duration::from_secs(3600);
        assert_eq!(due(&s, 0, hour), Some(false), "no key yet");
        for (i, at) in [0u64, 10, 20, 30].iter().enumerate() {
            let cmd = new_key(&dk, *at, false).unwrap();
            assert_eq!(s.apply(&cmd), CommandResult::Ok);
            assert_eq!(s.gossip_keys.last().unwrap().id, i as u32 + 1);
        }
        assert_eq!(ids(&s), vec![2, 3, 4], "the newest three");
        assert_eq!(due(&s, 30 + 3_599_999, hour), None);
        assert_eq!(due(&s, 30 + 3_600_000, hour), Some(false));
        let keys = for_node(&s, "w1", Some(&dk));
        assert_eq!(keys.iter().map(|k| k.id).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(keys.iter().all(|k| k.secret.len() == 32));
        assert_ne!(keys[0].secret, keys[1].secret);
        assert!(for_node(&s, "stranger", Some(&dk)).is_empty());
        assert!(for_node(&s, "w1", None).is_empty());
        assert_eq!(
            member_addrs(&s),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );

        // A node removed: a new key retires the others, and the node gets nothing more.
        assert_eq!(
            s.apply(&Command::RemoveNode { id: "w1".into() }),
            CommandResult::Ok
        );
        assert_eq!(due(&s, 40, hour), Some(true));
        assert_eq!(s.apply(&new_key(&dk, 40, true).unwrap()), CommandResult::Ok);
        assert_eq!(ids(&s), vec![5]);
        assert_eq!(due(&s, 41, hour), None);
        assert!(for_node(&s, "w1", Some(&dk)).is_empty());
        assert_eq!(member_addrs(&s), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    }
}
