//! Network-scoped tables of versioned records and their merge rules (pure, synchronous).
//!
//! A record is identified by `(network, table, key)`. Its version is a Lamport timestamp plus
//! the owner's name as tie-breaker: the newer `(version, owner)` wins, and on a complete tie a
//! tombstone beats a live value, so a delete always wins over the put it deletes and over any
//! older put that arrives late. Deletes are kept as tombstones (with their version) until they
//! are reaped, so that a late copy of an older put cannot resurrect the entry.
//!
//! The Lamport clock is bumped on every local write and moved to `max(local, seen) + 1` on
//! every received version. It is seeded from the wall clock (microseconds) when the node
//! starts, so that a restarted node, which lost its counter, still writes versions above
//! anything its previous run wrote, without persistent state.
//!
//! A node holds tables only for the networks it declared: [`Store::leave_network`] drops a
//! network's records and [`Store::merge`] refuses records of other networks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::event::{Entry, Event};

/// Errors of local writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("no such network on this node: {0}")]
    NotInNetwork(String),
    #[error("entry {key} of {network}/{table} is owned by node {owner}")]
    NotOwner {
        network: String,
        table: String,
        key: String,
        owner: String,
    },
}

/// One version of an entry, live or deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Lamport timestamp of the write.
    pub version: u64,
    /// The node that wrote this version.
    pub owner: Arc<str>,
    /// The owner's generation when it wrote this version.
    pub owner_gen: u64,
    /// Local time this tombstone was stored (for reaping); `None` for live records.
    pub deleted_at: Option<Duration>,
    /// When the owner wrote this version, by its wall clock (ms since the Unix epoch; 0:
    /// unknown): what a receiver measures convergence lag from.
    pub born_ms: u64,
}

impl Record {
    /// Whether this is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Total order of versions: `(version, owner, owner_gen, tombstone)`.
    fn order(&self) -> (u64, &str, u64, bool) {
        (
            self.version,
            &self.owner,
            self.owner_gen,
            self.is_tombstone(),
        )
    }

    /// Whether this version replaces `other`.
    pub fn supersedes(&self, other: &Record) -> bool {
        self.order() > other.order()
    }
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Stored; the event to report, if the live view changed.
    Applied(Option<Event>),
    /// An equal or newer version is already stored.
    Stale,
    /// This node does not have the network.
    OutOfScope,
}

/// `(table, key)` inside a network.
type Key = (String, String);

/// All tables of the networks this node has, and the Lamport clock.
#[derive(Debug, Clone)]
pub struct Store {
    me: Arc<str>,
    my_gen: u64,
    clock: u64,
    /// The wall clock of the local write being made (ms since the epoch): its `born_ms`.
    wall_ms: u64,
    nets: BTreeMap<String, BTreeMap<Key, Record>>,
}

impl Store {
    /// An empty store for node `me` (generation `my_gen`), its clock seeded at `clock_seed`.
    pub fn new(me: Arc<str>, my_gen: u64, clock_seed: u64) -> Store {
        Store {
            me,
            my_gen,
            clock: clock_seed,
            wall_ms: 0,
            nets: BTreeMap::new(),
        }
    }

    /// Sets the wall clock (ms since the epoch) the next local writes are stamped with.
    pub fn set_wall_ms(&mut self, wall_ms: u64) {
        self.wall_ms = wall_ms;
    }

    /// The current Lamport clock.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// A new local timestamp (bumps the clock).
    pub fn tick(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }

    /// Lamport receive rule: the clock moves past every version seen.
    pub fn observe(&mut self, version: u64) {
        self.clock = self.clock.max(version).saturating_add(1);
    }

    /// The networks this store holds.
    pub fn networks(&self) -> BTreeSet<String> {
        self.nets.keys().cloned().collect()
    }

    /// Whether this node has `network`.
    pub fn has_network(&self, network: &str) -> bool {
        self.nets.contains_key(network)
    }

    /// Starts holding `network` (empty until synced). No-op if already held.
    pub fn join_network(&mut self, network: &str) {
        self.nets.entry(network.to_string()).or_default();
    }

    /// Drops `network` and all its records; returns a delete event per live entry.
    pub fn leave_network(&mut self, network: &str) -> Vec<Event> {
        let Some(table) = self.nets.remove(network) else {
            return Vec::new();
        };
        table
            .into_iter()
            .filter(|(_, r)| !r.is_tombstone())
            .map(|((table, key), r)| Event::Delete {
                network: network.to_string(),
                table,
                key,
                owner: r.owner.to_string(),
            })
            .collect()
    }

    /// Sets this node's generation (after a renew): later local writes carry it.
    pub fn set_my_gen(&mut self, gen: u64) {
        self.my_gen = gen;
    }

    /// Writes a live entry owned by this node. Returns the stored record and its event.
    pub fn put_local(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(Record, Event), TableError> {
        if !self.nets.contains_key(network) {
            return Err(TableError::NotInNetwork(network.to_string()));
        }
        let record = Record {
            value: Some(value.clone()),
            version: self.tick(),
            owner: self.me.clone(),
            owner_gen: self.my_gen,
            deleted_at: None,
            born_ms: self.wall_ms,
        };
        let t = self.nets.entry(network.to_string()).or_default();
        t.insert((table.to_string(), key.to_string()), record.clone());
        let ev = Event::Upsert {
            network: network.to_string(),
            table: table.to_string(),
            key: key.to_string(),
            value,
            owner: self.me.to_string(),
        };
        Ok((record, ev))
    }

    /// Deletes a live entry owned by this node (a tombstone). `Ok(None)` if there is no live
    /// entry; an error if another node owns it.
    pub fn delete_local(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        now: Duration,
    ) -> Result<Option<(Record, Event)>, TableError> {
        let Some(t) = self.nets.get(network) else {
            return Err(TableError::NotInNetwork(network.to_string()));
        };
        let k = (table.to_string(), key.to_string());
        match t.get(&k) {
            None => return Ok(None),
            Some(r) if r.is_tombstone() => return Ok(None),
            Some(r) if r.owner != self.me => {
                return Err(TableError::NotOwner {
                    network: network.to_string(),
                    table: table.to_string(),
                    key: key.to_string(),
                    owner: r.owner.to_string(),
                })
            }
            Some(_) => {}
        }
        let record = Record {
            value: None,
            version: self.tick(),
            owner: self.me.clone(),
            owner_gen: self.my_gen,
            deleted_at: Some(now),
            born_ms: self.wall_ms,
        };
        if let Some(t) = self.nets.get_mut(network) {
            t.insert(k, record.clone());
        }
        let ev = Event::Delete {
            network: network.to_string(),
            table: table.to_string(),
            key: key.to_string(),
            owner: self.me.to_string(),
        };
        Ok(Some((record, ev)))
    }

    /// Retracts an entry an earlier run of this node wrote (seen at `seen_version` in a
    /// peer's copy) and this run does not hold: a tombstone of this run, newer than the copy.
    /// `None` (nothing written) if this run holds a live entry under the key.
    pub fn retract_earlier_run(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        seen_version: u64,
        now: Duration,
    ) -> Option<Record> {
        let k = (table.to_string(), key.to_string());
        if self
            .nets
            .get(network)?
            .get(&k)
            .is_some_and(|r| !r.is_tombstone())
        {
            return None;
        }
        self.observe(seen_version);
        let record = Record {
            value: None,
            version: self.tick(),
            owner: self.me.clone(),
            owner_gen: self.my_gen,
            deleted_at: Some(now),
            born_ms: self.wall_ms,
        };
        self.nets.get_mut(network)?.insert(k, record.clone());
        Some(record)
    }

    /// Merges a received record. Tombstones get `deleted_at = now`. A newer version with the
    /// same value and owner is stored without an event.
    pub fn merge(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        mut incoming: Record,
        now: Duration,
    ) -> Merge {
        let Some(t) = self.nets.get_mut(network) else {
            return Merge::OutOfScope;
        };
        self.clock = self.clock.max(incoming.version).saturating_add(1);
        incoming.deleted_at = incoming.is_tombstone().then_some(now);
        let k = (table.to_string(), key.to_string());
        let (was_live, same) = match t.get(&k) {
            Some(cur) if !incoming.supersedes(cur) => return Merge::Stale,
            Some(cur) => (
                !cur.is_tombstone(),
                cur.value == incoming.value && cur.owner == incoming.owner,
            ),
            None => (false, false),
        };
        let ev = match &incoming.value {
            // A re-announcement of the same value changes nothing for the consumer.
            Some(_) if same => None,
            Some(v) => Some(Event::Upsert {
                network: network.to_string(),
                table: table.to_string(),
                key: key.to_string(),
                value: v.clone(),
                owner: incoming.owner.to_string(),
            }),
            None if was_live => Some(Event::Delete {
                network: network.to_string(),
                table: table.to_string(),
                key: key.to_string(),
                owner: incoming.owner.to_string(),
            }),
            None => None,
        };
        t.insert(k, incoming);
        Merge::Applied(ev)
    }

    /// Removes the live entries of `owner` whose generation matches `gen_matches` (in
    /// `network` only, or in all networks), as when the owner is declared down, restarts or
    /// leaves the network. Its tombstones stay: they are its own deletes and must keep
    /// spreading. No tombstone is made for the removed entries: this is a local decision,
    /// not a delete by the owner, and must not override the owner's records elsewhere (the
    /// node core refuses late copies while the owner is down). Returns a delete event per
    /// removed entry.
    pub fn drop_owner(
        &mut self,
        owner: &str,
        network: Option<&str>,
        gen_matches: impl Fn(u64) -> bool,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for (net, t) in self.nets.iter_mut() {
            if network.is_some_and(|n| n != net) {
                continue;
            }
            t.retain(|(table, key), r| {
                let drop = !r.is_tombstone() && &*r.owner == owner && gen_matches(r.owner_gen);
                if drop {
                    out.push(Event::Delete {
                        network: net.clone(),
                        table: table.clone(),
                        key: key.clone(),
                        owner: owner.to_string(),
                    });
                }
                !drop
            });
        }
        out
    }

    /// Gives every live entry of this node a new version and the current generation (to
    /// re-announce them after a renew). Returns `(network, table, key)` of each.
    pub fn restamp_own(&mut self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let (me, gen) = (self.me.clone(), self.my_gen);
        let mut clock = self.clock;
        for (net, t) in self.nets.iter_mut() {
            for ((table, key), r) in t.iter_mut() {
                if r.is_tombstone() || r.owner != me {
                    continue;
                }
                clock = clock.saturating_add(1);
                r.version = clock;
                r.owner_gen = gen;
                out.push((net.clone(), table.clone(), key.clone()));
            }
        }
        self.clock = clock;
        out
    }

    /// Removes tombstones stored at least `ttl` ago. Returns how many.
    pub fn reap(&mut self, now: Duration, ttl: Duration) -> usize {
        let mut n = 0;
        for t in self.nets.values_mut() {
            t.retain(|_, r| {
                let keep = r.deleted_at.is_none_or(|at| now.saturating_sub(at) < ttl);
                n += usize::from(!keep);
                keep
            });
        }
        n
    }

    /// The stored record (live or tombstone).
    pub fn get(&self, network: &str, table: &str, key: &str) -> Option<&Record> {
        self.nets
            .get(network)?
            .get(&(table.to_string(), key.to_string()))
    }

    /// Live entries of one table, in key order.
    pub fn live(&self, network: &str, table: &str) -> Vec<Entry> {
        let Some(t) = self.nets.get(network) else {
            return Vec::new();
        };
        t.range((table.to_string(), String::new())..)
            .take_while(|((tb, _), _)| tb == table)
            .filter_map(|((_, key), r)| {
                r.value.as_ref().map(|v| Entry {
                    key: key.clone(),
                    value: v.clone(),
                    owner: r.owner.to_string(),
                })
            })
            .collect()
    }

    /// Every record (tombstones included) of a network: `(table, key, record)`.
    pub fn records(&self, network: &str) -> impl Iterator<Item = (&str, &str, &Record)> {
        self.nets
            .get(network)
            .into_iter()
            .flat_map(|t| t.iter().map(|((tb, k), r)| (tb.as_str(), k.as_str(), r)))
    }

    /// Number of records (live and tombstones) over all networks.
    pub fn len(&self) -> usize {
        self.nets.values().map(BTreeMap::len).sum()
    }

    /// Whether no network holds any record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rec(value: Option<&str>, version: u64, owner: &str) -> Record {
        Record {
            value: value.map(|v| v.as_bytes().to_vec()),
            version,
            owner: owner.into(),
            owner_gen: 1,
            deleted_at: None,
            born_ms: 0,
        }
    }

    fn store(me: &str) -> Store {
        let mut s = Store::new(me.into(), 1, 100);
        s.join_network("net");
        s
    }

    fn value(s: &Store, key: &str) -> Option<String> {
        s.get("net", "t", key)
            .and_then(|r| r.value.clone())
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn late_older_update_never_overwrites_newer() {
        let mut s = store("a");
        assert!(matches!(
            s.merge("net", "t", "k", rec(Some("v2"), 200, "b"), S),
            Merge::Applied(Some(Event::Upsert { .. }))
        ));
        assert_eq!(
            s.merge("net", "t", "k", rec(Some("v1"), 150, "b"), S),
            Merge::Stale
        );
        assert_eq!(value(&s, "k").as_deref(), Some("v2"));
        // Same version again is stale too (idempotent redelivery).
        assert_eq!(
            s.merge("net", "t", "k", rec(Some("v2"), 200, "b"), S),
            Merge::Stale
        );
    }

    #[test]
    fn owner_breaks_version_ties() {
        let mut s = store("a");
        s.merge("net", "t", "k", rec(Some("from-b"), 7, "b"), S);
        s.merge("net", "t", "k", rec(Some("from-c"), 7, "c"), S);
        assert_eq!(value(&s, "k").as_deref(), Some("from-c"));
        // Order of arrival does not matter.
        let mut s2 = store("a");
        s2.merge("net", "t", "k", rec(Some("from-c"), 7, "c"), S);
        assert_eq!(
            s2.merge("net", "t", "k", rec(Some("from-b"), 7, "b"), S),
            Merge::Stale
        );
        assert_eq!(value(&s2, "k").as_deref(), Some("from-c"));
    }

    #[test]
    fn delete_wins_over_older_puts_and_ties() {
        let mut s = store("a");
        s.merge("net", "t", "k", rec(Some("v"), 10, "b"), S);
        let m = s.merge("net", "t", "k", rec(None, 11, "b"), S);
        assert!(matches!(m, Merge::Applied(Some(Event::Delete { .. }))));
        assert_eq!(value(&s, "k"), None);
        // A late put older than the delete does not resurrect it.
        assert_eq!(
            s.merge("net", "t", "k", rec(Some("v"), 10, "b"), S),
            Merge::Stale
        );
        assert_eq!(s.live("net", "t"), vec![]);
        // On a complete tie the tombstone wins, whichever arrives first.
        let mut s2 = store("a");
        s2.merge("net", "t", "k", rec(None, 5, "b"), S);
        assert_eq!(
            s2.merge("net", "t", "k", rec(Some("v"), 5, "b"), S),
            Merge::Stale
        );
        let mut s3 = store("a");
        s3.merge("net", "t", "k", rec(Some("v"), 5, "b"), S);
        assert!(matches!(
            s3.merge("net", "t", "k", rec(None, 5, "b"), S),
            Merge::Applied(Some(Event::Delete { .. }))
        ));
        // A tombstone for an unknown key is stored (to block late puts) without an event.
        assert_eq!(
            s3.merge("net", "t", "x", rec(None, 9, "b"), S),
            Merge::Applied(None)
        );
        assert_eq!(
            s3.merge("net", "t", "x", rec(Some("old"), 8, "b"), S),
            Merge::Stale
        );
    }

    #[test]
    fn tombstones_are_reaped_after_ttl_and_key_can_be_put_again() {
        let mut s = store("a");
        s.merge("net", "t", "k", rec(Some("v"), 10, "b"), Duration::ZERO);
        s.merge("net", "t", "k", rec(None, 11, "b"), Duration::from_secs(5));
        let ttl = Duration::from_secs(60);
        assert_eq!(s.reap(Duration::from_secs(64), ttl), 0);
        assert!(s.get("net", "t", "k").is_some());
        assert_eq!(s.reap(Duration::from_secs(65), ttl), 1);
        assert!(s.get("net", "t", "k").is_none());
        // A newer put of the same key is accepted after the reap...
        assert!(matches!(
            s.merge(
                "net",
                "t",
                "k",
                rec(Some("v2"), 12, "b"),
                Duration::from_secs(66)
            ),
            Merge::Applied(Some(Event::Upsert { .. }))
        ));
        assert_eq!(value(&s, "k").as_deref(), Some("v2"));
        // ...and live records are never reaped.
        assert_eq!(s.reap(Duration::from_secs(10_000), ttl), 0);
    }

    #[test]
    fn local_writes_bump_the_lamport_clock_past_what_was_seen() {
        let mut s = store("a");
        assert_eq!(s.clock(), 100);
        s.merge("net", "t", "k", rec(Some("remote"), 500, "b"), S);
        assert_eq!(s.clock(), 501);
        let (r, _) = s.put_local("net", "t", "k", b"mine".to_vec()).unwrap();
        assert_eq!(r.version, 502);
        assert_eq!(&*r.owner, "a");
        assert_eq!(value(&s, "k").as_deref(), Some("mine"));
        let (r2, _) = s.put_local("net", "t", "k2", b"x".to_vec()).unwrap();
        assert!(r2.version > r.version);
        // A stale remote write of an older version loses against ours.
        assert_eq!(
            s.merge("net", "t", "k", rec(Some("old"), 400, "b"), S),
            Merge::Stale
        );
    }

    #[test]
    fn only_the_owner_deletes_and_deletes_are_idempotent() {
        let mut s = store("a");
        s.merge("net", "t", "theirs", rec(Some("v"), 10, "b"), S);
        assert!(matches!(
            s.delete_local("net", "t", "theirs", S),
            Err(TableError::NotOwner { .. })
        ));
        s.put_local("net", "t", "mine", b"v".to_vec()).unwrap();
        let (r, ev) = s.delete_local("net", "t", "mine", S).unwrap().unwrap();
        assert!(r.is_tombstone());
        assert!(matches!(ev, Event::Delete { .. }));
        assert_eq!(s.delete_local("net", "t", "mine", S).unwrap(), None);
        assert_eq!(s.delete_local("net", "t", "never", S).unwrap(), None);
        assert_eq!(
            s.put_local("other", "t", "k", vec![]).unwrap_err(),
            TableError::NotInNetwork("other".into())
        );
    }

    #[test]
    fn leaving_a_network_drops_its_entries_and_refuses_new_ones() {
        let mut s = store("a");
        s.join_network("other");
        s.merge("net", "t", "k1", rec(Some("v"), 10, "b"), S);
        s.merge("net", "t", "k2", rec(None, 11, "b"), S);
        s.put_local("net", "u", "k3", b"v".to_vec()).unwrap();
        s.merge("other", "t", "k", rec(Some("v"), 10, "b"), S);
        let evs = s.leave_network("net");
        // Two live entries (k1, k3) are reported deleted; the tombstone silently goes.
        assert_eq!(evs.len(), 2);
        assert!(evs
            .iter()
            .all(|e| matches!(e, Event::Delete { network, .. } if network == "net")));
        assert!(!s.has_network("net"));
        assert_eq!(s.records("net").count(), 0);
        assert_eq!(
            s.merge("net", "t", "k1", rec(Some("v"), 99, "b"), S),
            Merge::OutOfScope
        );
        assert_eq!(s.live("other", "t").len(), 1);
        assert_eq!(s.networks(), BTreeSet::from(["other".to_string()]));
    }

    #[test]
    fn entries_of_a_down_node_are_removed() {
        let mut s = store("a");
        s.join_network("other");
        s.merge("net", "t", "k1", rec(Some("v"), 10, "b"), S);
        s.merge("other", "t", "k2", rec(Some("v"), 11, "b"), S);
        s.merge("net", "t", "k3", rec(Some("v"), 12, "c"), S);
        s.merge("net", "t", "gone", rec(None, 13, "b"), S);
        let evs = s.drop_owner("b", None, |g| g <= 1);
        assert_eq!(evs.len(), 2);
        assert!(evs
            .iter()
            .all(|e| matches!(e, Event::Delete { owner, .. } if owner == "b")));
        assert_eq!(s.live("net", "t").len(), 1);
        assert_eq!(s.live("other", "t").len(), 0);
        // b's own delete (a tombstone) stays, to keep blocking its older puts.
        assert!(s.get("net", "t", "gone").is_some_and(Record::is_tombstone));
        assert_eq!(
            s.merge("net", "t", "gone", rec(Some("v"), 12, "b"), S),
            Merge::Stale
        );
        // The owner's re-announcement brings the entry back.
        let mut back = rec(Some("v"), 20, "b");
        back.owner_gen = 2;
        assert!(matches!(
            s.merge("net", "t", "k1", back, S),
            Merge::Applied(Some(Event::Upsert { .. }))
        ));
        // Other generations and other networks are left alone when asked.
        assert!(s.drop_owner("b", None, |g| g < 2).is_empty());
        assert!(s.drop_owner("c", Some("other"), |_| true).is_empty());
        assert_eq!(s.live("net", "t").len(), 2);
    }

    #[test]
    fn restamping_own_entries_gives_newer_versions() {
        let mut s = store("a");
        let (r, _) = s.put_local("net", "t", "k", b"v".to_vec()).unwrap();
        s.merge("net", "t", "theirs", rec(Some("v"), 5, "b"), S);
        s.set_my_gen(9);
        let keys = s.restamp_own();
        assert_eq!(keys, vec![("net".into(), "t".into(), "k".into())]);
        let now = s.get("net", "t", "k").unwrap();
        assert!(now.version > r.version);
        assert_eq!(now.owner_gen, 9);
        assert_eq!(s.get("net", "t", "theirs").unwrap().version, 5);
    }

    #[test]
    fn live_lists_one_table_only() {
        let mut s = store("a");
        s.put_local("net", "a", "1", b"x".to_vec()).unwrap();
        s.put_local("net", "b", "1", b"y".to_vec()).unwrap();
        s.put_local("net", "b", "2", b"z".to_vec()).unwrap();
        s.put_local("net", "c", "1", b"w".to_vec()).unwrap();
        let keys: Vec<String> = s.live("net", "b").into_iter().map(|e| e.key).collect();
        assert_eq!(keys, vec!["1", "2"]);
        assert_eq!(s.live("nope", "b"), vec![]);
    }
}
