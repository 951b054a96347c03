//! Which node has which network: versioned `(node, network)` records, gossiped to every node
//! as foca custom broadcasts (and exchanged in full by push-pull).
//!
//! A record says that `node` joined or left `network`, stamped with the node's generation
//! and a Lamport version; the newer `(generation, version)` wins and a leave wins a tie.
//! Records of a node's older generations are dropped once a newer generation is known (a
//! restarted node re-announces its networks). The table lives behind a mutex because foca
//! owns the [`BroadcastHandler`] that merges received records, while the node core reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foca::{BroadcastHandler, Invalidates};
use serde::{Deserialize, Serialize};

use crate::id::NodeId;

/// `node` joined (or left) `network`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    pub node: Arc<str>,
    pub gen: u64,
    pub network: String,
    pub version: u64,
    pub joined: bool,
}

impl NetRecord {
    /// Newer wins; on a tie a leave wins.
    fn order(&self) -> (u64, u64, bool) {
        (self.gen, self.version, !self.joined)
    }
}

/// A stored record and the local time it was stored.
#[derive(Clone, Debug)]
struct Stored {
    rec: NetRecord,
    at: Duration,
}

/// All known `(node, network)` records.
#[derive(Debug, Default)]
pub struct Memberships {
    by_net: BTreeMap<String, BTreeMap<Arc<str>, Stored>>,
    /// Records of a node below this generation are refused.
    min_gen: BTreeMap<Arc<str>, u64>,
    /// Records accepted since the last [`Memberships::take_changed`].
    changed: Vec<NetRecord>,
    /// Local time, set by the core before it calls into foca.
    pub now: Duration,
    /// This node's name: remote claims about it are ignored.
    me: Arc<str>,
    /// Bumped on every accepted change (lets the core cache member lists).
    pub epoch: u64,
}

impl Memberships {
    /// An empty table for node `me`.
    pub fn new(me: Arc<str>) -> Memberships {
        Memberships {
            me,
            ..Memberships::default()
        }
    }

    /// Merges a record; `true` if it is new information. `remote` records about this node
    /// itself are ignored (it is the authority on its own networks).
    pub fn merge(&mut self, rec: NetRecord, remote: bool) -> bool {
        if remote && rec.node == self.me {
            return false;
        }
        if self.min_gen.get(&rec.node).is_some_and(|&g| rec.gen < g) {
            return false;
        }
        if !self.by_net.contains_key(&rec.network) {
            self.by_net.insert(rec.network.clone(), BTreeMap::new());
        }
        let Some(slot) = self.by_net.get_mut(&rec.network) else {
            return false;
        };
        if let Some(cur) = slot.get(&rec.node) {
            if rec.order() <= cur.rec.order() {
                return false;
            }
        }
        slot.insert(
            rec.node.clone(),
            Stored {
                rec: rec.clone(),
                at: self.now,
            },
        );
        self.changed.push(rec);
        self.epoch += 1;
        true
    }

    /// A newer generation of `node` is known: drop (and refuse) its older records.
    pub fn set_min_gen(&mut self, node: &Arc<str>, gen: u64) {
        let cur = self.min_gen.entry(node.clone()).or_insert(0);
        if gen <= *cur {
            return;
        }
        *cur = gen;
        for slot in self.by_net.values_mut() {
            if slot.get(node).is_some_and(|s| s.rec.gen < gen) {
                slot.remove(node);
                self.epoch += 1;
            }
        }
        self.by_net.retain(|_, s| !s.is_empty());
    }

    /// Forgets everything about `node` (reaped after being down for long).
    pub fn forget(&mut self, node: &str) {
        for slot in self.by_net.values_mut() {
            if slot.remove(node).is_some() {
                self.epoch += 1;
            }
        }
        self.by_net.retain(|_, s| !s.is_empty());
        self.min_gen.remove(node);
    }

    /// Records accepted since the last call.
    pub fn take_changed(&mut self) -> Vec<NetRecord> {
        std::mem::take(&mut self.changed)
    }

    /// The networks `node` declared (joined).
    pub fn networks_of(&self, node: &str) -> BTreeSet<String> {
        self.by_net
            .iter()
            .filter(|(_, s)| s.get(node).is_some_and(|s| s.rec.joined))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nodes that declared `network`, with the generation of their record.
    pub fn members_of(&self, network: &str) -> Vec<(Arc<str>, u64)> {
        self.by_net
            .get(network)
            .map(|s| {
                s.values()
                    .filter(|s| s.rec.joined)
                    .map(|s| (s.rec.node.clone(), s.rec.gen))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `node` declared `network`.
    pub fn has(&self, node: &str, network: &str) -> bool {
        self.by_net
            .get(network)
            .and_then(|s| s.get(node))
            .is_some_and(|s| s.rec.joined)
    }

    /// The current record of `(node, network)`.
    pub fn get(&self, node: &str, network: &str) -> Option<&NetRecord> {
        self.by_net.get(network)?.get(node).map(|s| &s.rec)
    }

    /// Number of `joined` records.
    pub fn joined_count(&self) -> usize {
        self.by_net
            .values()
            .map(|s| s.values().filter(|s| s.rec.joined).count())
            .sum()
    }

    /// Every record (for push-pull).
    pub fn all(&self) -> Vec<NetRecord> {
        self.by_net
            .values()
            .flat_map(|s| s.values().map(|s| s.rec.clone()))
            .collect()
    }

    /// Drops leave records stored at least `ttl` ago.
    pub fn reap(&mut self, now: Duration, ttl: Duration) {
        for slot in self.by_net.values_mut() {
            slot.retain(|_, s| s.rec.joined || now.saturating_sub(s.at) < ttl);
        }
        self.by_net.retain(|_, s| !s.is_empty());
    }
}

/// The membership table shared by the core and foca's broadcast handler.
#[derive(Clone, Debug, Default)]
pub struct Shared(Arc<Mutex<Memberships>>);

impl Shared {
    /// A new table for node `me`.
    pub fn new(me: Arc<str>) -> Shared {
        Shared(Arc::new(Mutex::new(Memberships::new(me))))
    }

    /// Locks the table (a poisoned lock is recovered: the data is plain values).
    pub fn lock(&self) -> MutexGuard<'_, Memberships> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Identifies a broadcast so that a newer record about the same `(node, network)` replaces
/// an older one still being disseminated.
#[derive(Debug, Clone)]
pub struct NetKey {
    node: Arc<str>,
    network: String,
    order: (u64, u64, bool),
}

impl Invalidates for NetKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.network == other.network && self.order >= other.order
    }
}

/// A custom broadcast that is not a valid membership record.
#[derive(Debug, thiserror::Error)]
#[error("malformed membership broadcast: {0}")]
pub struct BadBroadcast(postcard::Error);

/// foca's custom-broadcast handler: decodes membership records and keeps disseminating the
/// new ones.
pub struct Handler {
    pub shared: Shared,
}

impl BroadcastHandler<NodeId> for Handler {
    type Key = NetKey;
    type Error = BadBroadcast;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<NetKey>, BadBroadcast> {
        let rec: NetRecord = postcard::from_bytes(data).map_err(BadBroadcast)?;
        let key = NetKey {
            node: rec.node.clone(),
            network: rec.network.clone(),
            order: rec.order(),
        };
        Ok(self
            .shared
            .lock()
            .merge(rec, sender.is_some())
            .then_some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, gen: u64, net: &str, version: u64, joined: bool) -> NetRecord {
        NetRecord {
            node: node.into(),
            gen,
            network: net.into(),
            version,
            joined,
        }
    }

    #[test]
    fn newer_record_wins_and_leave_wins_ties() {
        let mut m = Memberships::new("me".into());
        assert!(m.merge(rec("b", 1, "n", 5, true), true));
        assert!(!m.merge(rec("b", 1, "n", 4, false), true));
        assert!(m.has("b", "n"));
        assert!(m.merge(rec("b", 1, "n", 5, false), true));
        assert!(!m.has("b", "n"));
        assert!(m.merge(rec("b", 1, "n", 6, true), true));
        assert_eq!(m.members_of("n").len(), 1);
        assert_eq!(m.take_changed().len(), 3);
        assert!(m.take_changed().is_empty());
    }

    #[test]
    fn newer_generation_drops_old_records() {
        let mut m = Memberships::new("me".into());
        m.merge(rec("b", 1, "n1", 5, true), true);
        m.merge(rec("b", 1, "n2", 5, true), true);
        m.set_min_gen(&"b".into(), 2);
        assert!(m.networks_of("b").is_empty());
        // Late records of the old generation are refused; the new one is accepted even with
        // a lower version.
        assert!(!m.merge(rec("b", 1, "n1", 9, true), true));
        assert!(m.merge(rec("b", 2, "n2", 1, true), true));
        assert_eq!(m.networks_of("b"), BTreeSet::from(["n2".to_string()]));
    }

    #[test]
    fn remote_claims_about_self_are_ignored() {
        let mut m = Memberships::new("me".into());
        assert!(!m.merge(rec("me", 1, "n", 5, true), true));
        assert!(m.merge(rec("me", 1, "n", 5, true), false));
    }

    #[test]
    fn leave_records_are_reaped() {
        let mut m = Memberships::new("me".into());
        m.now = Duration::from_secs(1);
        m.merge(rec("b", 1, "n", 5, false), true);
        m.merge(rec("c", 1, "n", 5, true), true);
        m.reap(Duration::from_secs(100), Duration::from_secs(60));
        assert!(m.get("b", "n").is_none());
        assert!(m.get("c", "n").is_some());
    }

    #[test]
    fn handler_decodes_and_dedups() {
        let shared = Shared::new("me".into());
        let mut h = Handler {
            shared: shared.clone(),
        };
        let data = postcard::to_allocvec(&rec("b", 1, "n", 5, true)).unwrap();
        let sender = NodeId::new("b", "127.0.0.1:1".parse().unwrap(), 1);
        assert!(h.receive_item(&data, Some(&sender)).unwrap().is_some());
        assert!(h.receive_item(&data, Some(&sender)).unwrap().is_none());
        assert!(h.receive_item(&[0xff, 0xff, 0xff], Some(&sender)).is_err());
        assert!(shared.lock().has("b", "n"));
        let old = NetKey {
            node: "b".into(),
            network: "n".into(),
            order: (1, 5, false),
        };
        let new = NetKey {
            order: (1, 6, false),
            ..old.clone()
        };
        assert!(new.invalidates(&old));
        assert!(!old.invalidates(&new));
    }
}
