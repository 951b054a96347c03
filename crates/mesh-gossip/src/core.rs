//! The node state machine, free of I/O and clocks: the tokio runtime ([`crate::Gossip`]) and
//! the simulator ([`crate::sim`]) drive the same code.
//!
//! Inputs are received packets, push-pull states, API calls and the passage of time (every
//! call takes `now`, the time since the node started). Outputs ([`Output`]) are UDP packets
//! to send, push-pull exchanges to start and events. The core owns foca (membership and
//! failure detection), the `(node, network)` records, the tables and their dissemination:
//!
//! 1. **Eager push**: a local write is sent at once, batched, to every live member of its
//!    network (one hop; up to [`EAGER_MAX`] members, a random subset above that). A node's
//!    own `(node, network)` records are pushed the same way to every live node when they
//!    change and after the join push-pull, besides riding foca's messages as custom
//!    broadcasts.
//! 2. **Table gossip**: every node that learns a new version queues it; every
//!    `gossip_interval` it sends its queue to `gossip_fanout` random members of the network,
//!    for `ceil(log10(members + 1)) + 1` rounds. This repairs lost eager packets within a round
//!    or two.
//! 3. **Push-pull** (anti-entropy, TCP): full exchange of shared tables, all `(node,
//!    network)` records and foca's membership with a random member every
//!    `push_pull_interval`, on join, after joining a network (and again a second later) and
//!    when a member comes back.
//!
//! A network this node joins is **synced** once it has merged a full copy of the network's
//! tables from a member (a push-pull that carried the network, either way), or, once this
//! node has exchanged state with the cluster (or was given nobody to join), when the network
//! has no other live member: until then its tables hold only what happened to arrive, and a
//! consumer must not take them for the whole picture (a restarted node's first view of a
//! network is its own records). A network whose exchanges keep failing counts as synced
//! [`SYNC_GIVE_UP`] after it was joined, so stale state is bounded. Each network becomes
//! synced once per join ([`Event::Synced`], [`Core::synced`]).
//!
//! Only members that declared a network are sent its records; records of networks this node
//! does not have are dropped. When foca declares a node down, or it leaves a network, its
//! entries are removed here, and [`Core`] refuses late copies of them; a node that comes
//! back re-announces its entries with newer versions. When a node restarts (a newer
//! generation shows up), late copies of its earlier entries are refused at once, but the
//! entries held stay until its new run re-announces them or [`RESTART_GRACE`] has passed. A
//! node that declares *every* member down was most likely the one cut off: it starts foca
//! over rather than spread those verdicts when the partition heals.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::error::GossipError;
use crate::event::{Entry, Event, Member};
use crate::id::NodeId;
use crate::membership::{Handler, NetRecord, Shared};
use crate::stats::{add, Counters};
use crate::table::{Merge, Store};
use crate::wire::{self, BatchWriter, Kind, Reject, SyncState, WireUpdate, MAX_UDP};

/// Eager push goes to at most this many members of a network (a random subset above it).
pub const EAGER_MAX: usize = 1024;
/// At most this many table packets per target per gossip round.
const MAX_PACKETS_PER_ROUND: usize = 8;
/// At most this many peers per periodic push-pull pass.
const MAX_SYNC_PEERS: usize = 4;
/// Re-announce to the join peers this often while no member is alive.
const SEED_RETRY: Duration = Duration::from_secs(1);
/// At most one push-pull with a returning member this often.
const HEAL_EVERY: Duration = Duration::from_millis(500);
/// Second push-pull after joining a network, to catch writes made while the others did not
/// know yet that this node had joined.
const FOLLOW_UP: Duration = Duration::from_secs(1);
/// A node down this long is forgotten (its networks too); it re-announces if it returns.
const FORGET_DOWN_AFTER: Duration = Duration::from_secs(3600);
/// Housekeeping (reaping) period.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// A restarted node's entries from before the restart are kept this long after its new
/// generation shows up (or until it re-announces them, its new copies replacing the old):
/// its tasks most likely kept running, and dropping their records at once would empty its
/// services' VIPs and names cluster-wide until the re-announcement arrives. What it does not
/// re-announce by then goes. A node declared down loses its entries at once, as before.
pub const RESTART_GRACE: Duration = Duration::from_secs(5);
/// A network joined this long ago counts as synced even if no exchange covering it
/// completed (push-pulls failing while UDP works): its tables then rest on eager push and
/// table gossip alone. Several push-pulls are tried before (the one on joining, the
/// follow-up a second later, the periodic ones).
pub const SYNC_GIVE_UP: Duration = Duration::from_secs(15);

type Swim = Foca<NodeId, PostcardCodec, SmallRng, Handler>;

/// Something for the driver to do.
#[derive(Debug)]
pub enum Output {
    /// Send a UDP packet.
    Udp { to: SocketAddr, data: Vec<u8> },
    /// Open a push-pull exchange with `to`, send `request`, and hand the answer to
    /// [`Core::handle_sync_response`].
    Sync { to: SocketAddr, request: SyncState },
    /// Report an event.
    Event(Event),
}

/// What this node knows about another.
#[derive(Debug, Clone)]
struct NodeInfo {
    id: NodeId,
    alive: bool,
    down_at: Option<Duration>,
}

/// A foca timer due at `at`.
struct TimerSlot {
    at: Duration,
    seq: u64,
    timer: Timer<NodeId>,
}

impl PartialEq for TimerSlot {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    // Reversed: the earliest timer is the heap's maximum.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The node state machine.
pub struct Core {
    cfg: Config,
    tag: u64,
    me: NodeId,
    foca: Swim,
    rt: AccumulatingRuntime<NodeId>,
    shared: Shared,
    store: Store,
    nodes: BTreeMap<Arc<str>, NodeInfo>,
    nodes_epoch: u64,
    peer_cache: HashMap<String, (u64, u64, Vec<SocketAddr>)>,
    /// Table gossip queue: rounds left per `(table, key)`, per network.
    queues: BTreeMap<String, HashMap<(String, String), u32>>,
    /// Updates to push to every member right away.
    eager: BTreeMap<String, Vec<WireUpdate>>,
    timers: BinaryHeap<TimerSlot>,
    timer_seq: u64,
    next_tick: Duration,
    next_push_pull: Duration,
    next_reap: Duration,
    next_seed_announce: Duration,
    next_heal: Duration,
    seeds: Vec<SocketAddr>,
    heal: Vec<Arc<str>>,
    follow_ups: Vec<(Duration, String)>,
    foca_size: usize,
    /// Push this node's membership records to every live node after the next push-pull
    /// answer (set by [`Core::join`]).
    announce_after_sync: bool,
    /// Restarted nodes whose entries of earlier generations go at the given time:
    /// `(node, new generation, when)` (see [`RESTART_GRACE`]).
    retiring: Vec<(Arc<str>, u64, Duration)>,
    /// Live entries an earlier run of this node wrote, seen in peers' copies and not held
    /// by this run: network -> (table, key) -> highest version seen.
    earlier_runs: BTreeMap<String, BTreeMap<(String, String), u64>>,
    /// Networks joined whose tables are not synced yet, with when they were joined.
    unsynced: BTreeMap<String, Duration>,
    /// Whether a push-pull answer from another node was merged: this node has seen the
    /// cluster's `(node, network)` records, so a network without a live member really has
    /// nobody to sync with.
    exchanged: bool,
    rng: SmallRng,
    counters: Arc<Counters>,
    out: Vec<Output>,
    left: bool,
    /// The wall clock (ms since the epoch) at `now` zero; 0 in the simulator, where every
    /// node shares the simulated time.
    wall_origin_ms: u64,
}

impl Core {
    /// A node that knows nobody yet. `seed` seeds its random choices.
    pub fn new(cfg: Config, counters: Arc<Counters>, now: Duration, seed: u64) -> Core {
        let gen = cfg.generation.unwrap_or_else(crate::id::wall_micros);
        let me = NodeId::new(cfg.node_id.as_str(), cfg.advertise, gen);
        let shared = Shared::new(me.name.clone());
        let foca = Foca::with_custom_broadcast(
            me.clone(),
            cfg.foca(1),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            Handler {
                shared: shared.clone(),
            },
        );
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x005e_ed0f_c0de);
        let first_pp = cfg.push_pull_interval.mul_f64(rng.random_range(0.5..1.0));
        let mut seeds: Vec<SocketAddr> = Vec::new();
        for s in cfg.seeds.iter().filter(|s| **s != me.addr) {
            if !seeds.contains(s) {
                seeds.push(*s);
            }
        }
        Core {
            tag: wire::cluster_tag(&cfg.cluster_key),
            store: Store::new(me.name.clone(), gen, gen),
            me,
            foca,
            rt: AccumulatingRuntime::new(),
            shared,
            nodes: BTreeMap::new(),
            nodes_epoch: 0,
            peer_cache: HashMap::new(),
            queues: BTreeMap::new(),
            eager: BTreeMap::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            next_tick: now + cfg.gossip_interval.mul_f64(rng.random_range(0.0..1.0)),
            next_push_pull: now + first_pp,
            next_reap: now + REAP_EVERY,
            next_seed_announce: now,
            next_heal: now,
            seeds,
            heal: Vec::new(),
            follow_ups: Vec::new(),
            foca_size: 1,
            announce_after_sync: false,
            retiring: Vec::new(),
            earlier_runs: BTreeMap::new(),
            unsynced: BTreeMap::new(),
            exchanged: false,
            rng,
            counters,
            out: Vec::new(),
            left: false,
            wall_origin_ms: 0,
            cfg,
        }
    }

    /// Sets the wall clock (ms since the Unix epoch) at `now` zero, so that records carry
    /// their birth time and received ones their convergence lag (`Counters::observe_lag`).
    pub fn set_wall_origin(&mut self, ms: u64) {
        self.wall_origin_ms = ms;
    }

    /// The wall clock at `now`, in ms since the epoch.
    fn wall_ms(&self, now: Duration) -> u64 {
        self.wall_origin_ms
            .saturating_add(u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
    }

    /// This node's current identity.
    pub fn id(&self) -> &NodeId {
        &self.me
    }

    /// The cluster tag in every header.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Whether [`Core::leave`] was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Takes the pending outputs.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// When [`Core::poll`] must be called next.
    pub fn next_deadline(&self) -> Duration {
        match self.timers.peek() {
            Some(t) => t.at.min(self.next_tick),
            None => self.next_tick,
        }
    }

    // ----- API -------------------------------------------------------------------------

    /// Announces this node to `seeds` (and keeps re-announcing while alone). The driver
    /// also runs a push-pull with one of them ([`Core::sync_request`]).
    pub fn join(&mut self, seeds: &[SocketAddr], now: Duration) {
        for s in seeds {
            if *s != self.me.addr && !self.seeds.contains(s) {
                self.seeds.push(*s);
            }
        }
        self.shared.lock().now = now;
        self.announce_after_sync = true;
        for s in seeds.iter().filter(|s| **s != self.me.addr) {
            if let Err(e) = self.foca.announce(NodeId::placeholder(*s), &mut self.rt) {
                tracing::debug!(peer = %s, error = %e, "announce failed");
            }
        }
        self.finish(now);
    }

    /// Declares the networks this node has: drops the tables of the networks it left and
    /// starts syncing the ones it joined.
    pub fn set_networks(&mut self, networks: &BTreeSet<String>, now: Duration) {
        if self.left {
            return;
        }
        self.shared.lock().now = now;
        let current = self.store.networks();
        for n in current.difference(networks) {
            for ev in self.store.leave_network(n) {
                self.out.push(Output::Event(ev));
            }
            self.unsynced.remove(n);
            self.earlier_runs.remove(n);
            self.queues.remove(n);
            self.eager.remove(n);
            self.follow_ups.retain(|(_, f)| f != n);
            self.announce_membership(n, false);
        }
        for n in networks.difference(&current) {
            self.store.join_network(n);
            self.unsynced.insert(n.clone(), now);
            self.announce_membership(n, true);
            if let Some(peer) = self.random_peer(n) {
                self.start_sync(peer);
            }
            self.follow_ups.push((now + FOLLOW_UP, n.clone()));
        }
        if let Err(e) = self.foca.broadcast(&mut self.rt) {
            tracing::debug!(error = %e, "broadcast failed");
        }
        let changed: BTreeSet<String> = current.symmetric_difference(networks).cloned().collect();
        if !changed.is_empty() {
            self.push_own_memberships(Some(&changed));
        }
        self.check_synced(now);
        self.finish(now);
    }

    /// Writes an entry owned by this node.
    pub fn put(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        value: Vec<u8>,
        now: Duration,
    ) -> Result<(), GossipError> {
        if self.left {
            return Err(GossipError::Stopped);
        }
        // Worst case on the wire: largest varints for version and generation.
        let probe = WireUpdate {
            table: table.to_string(),
            key: key.to_string(),
            value: Some(value.clone()),
            version: u64::MAX,
            owner: self.me.name.clone(),
            owner_gen: u64::MAX,
            born_ms: u64::MAX,
        };
        let size = wire::encode(&probe).len();
        let max = BatchWriter::new(self.tag, network).room();
        if size > max {
            return Err(GossipError::TooLarge {
                network: network.to_string(),
                table: table.to_string(),
                key: key.to_string(),
                size,
                max,
            });
        }
        self.store.set_wall_ms(self.wall_ms(now));
        let (_, ev) = self.store.put_local(network, table, key, value)?;
        self.out.push(Output::Event(ev));
        self.publish(network, table, key);
        self.finish(now);
        Ok(())
    }

    /// Deletes an entry owned by this node (no-op if there is none).
    pub fn delete(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        now: Duration,
    ) -> Result<(), GossipError> {
        if self.left {
            return Err(GossipError::Stopped);
        }
        self.store.set_wall_ms(self.wall_ms(now));
        if let Some((_, ev)) = self.store.delete_local(network, table, key, now)? {
            self.out.push(Output::Event(ev));
            self.publish(network, table, key);
            self.finish(now);
        }
        Ok(())
    }

    /// Retracts, in `networks`, the entries an earlier run of this node wrote that this run
    /// does not hold (seen in peers' copies since the restart): a tombstone each, so the
    /// other nodes drop them now rather than after [`RESTART_GRACE`]. The consumer calls it
    /// once it has re-announced everything it keeps (a key it puts later is simply written
    /// again). Returns how many were retracted.
    pub fn retract_earlier_runs(&mut self, networks: &BTreeSet<String>, now: Duration) -> usize {
        let mut n = 0;
        self.store.set_wall_ms(self.wall_ms(now));
        for net in networks {
            let Some(keys) = self.earlier_runs.remove(net) else {
                continue;
            };
            for ((table, key), seen) in keys {
                if self
                    .store
                    .retract_earlier_run(net, &table, &key, seen, now)
                    .is_some()
                {
                    tracing::debug!(network = %net, table, key, "retracted an earlier run's entry");
                    self.publish(net, &table, &key);
                    n += 1;
                }
            }
        }
        self.finish(now);
        n
    }

    /// Updates waiting in the table gossip queues (all networks).
    pub fn queued(&self) -> usize {
        self.queues.values().map(HashMap::len).sum()
    }

    /// The networks this node has.
    pub fn networks(&self) -> BTreeSet<String> {
        self.store.networks()
    }

    /// The networks this node has whose tables are synced (see the module docs): what a
    /// consumer reads of the others may be partial, and must not be taken as the whole.
    pub fn synced(&self) -> BTreeSet<String> {
        let mut n = self.store.networks();
        n.retain(|n| !self.unsynced.contains_key(n));
        n
    }

    /// Live entries of a table.
    pub fn entries(&self, network: &str, table: &str) -> Vec<Entry> {
        self.store.live(network, table)
    }

    /// The stored record of a key, tombstones included (for tests and the simulator).
    pub fn record(&self, network: &str, table: &str, key: &str) -> Option<&crate::table::Record> {
        self.store.get(network, table, key)
    }

    /// Every node this one knows, itself first.
    pub fn members(&self) -> Vec<Member> {
        let m = self.shared.lock();
        let mut out = vec![Member {
            id: self.me.name.to_string(),
            addr: self.me.addr,
            networks: self.store.networks(),
            alive: !self.left,
        }];
        let mut others: Vec<&NodeInfo> = self.nodes.values().collect();
        others.sort_by(|a, b| a.id.name.cmp(&b.id.name));
        out.extend(others.into_iter().map(|n| Member {
            id: n.id.name.to_string(),
            addr: n.id.addr,
            networks: m.networks_of(&n.id.name),
            alive: n.alive,
        }));
        out
    }

    /// How many other nodes are alive in this node's view.
    pub fn alive_count(&self) -> usize {
        self.nodes.values().filter(|n| n.alive).count()
    }

    /// How many `(node, network)` joined records this node holds.
    pub fn membership_count(&self) -> usize {
        self.shared.lock().joined_count()
    }

    /// Names of the nodes currently alive (not this one).
    pub fn alive_names(&self) -> Vec<Arc<str>> {
        self.nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| n.id.name.clone())
            .collect()
    }

    /// Leaves the cluster: tells a few members this node is down. Nothing works after.
    pub fn leave(&mut self, now: Duration) {
        if self.left {
            return;
        }
        self.shared.lock().now = now;
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave failed");
        }
        self.finish(now);
        self.left = true;
        self.timers.clear();
    }

    // ----- inputs ----------------------------------------------------------------------

    /// Handles a received UDP packet.
    pub fn handle_udp(&mut self, data: &[u8], now: Duration) {
        add(&self.counters.udp_in, 1);
        add(&self.counters.bytes_in, data.len() as u64);
        if self.left {
            return;
        }
        if data.len() > MAX_UDP {
            add(&self.counters.malformed, 1);
            return;
        }
        match wire::parse(data, self.tag) {
            Err(Reject::Foreign) => add(&self.counters.foreign, 1),
            Err(Reject::Malformed(why)) => {
                tracing::trace!(why, "malformed packet");
                add(&self.counters.malformed, 1);
            }
            Ok((Kind::Swim, body)) => {
                self.shared.lock().now = now;
                if let Err(e) = self.foca.handle_data(body, &mut self.rt) {
                    self.count_foca_error(&e);
                }
                self.finish(now);
            }
            Ok((Kind::Table, body)) => match wire::decode_table(body) {
                Err(_) => add(&self.counters.malformed, 1),
                Ok((network, updates)) => {
                    if !self.store.has_network(&network) {
                        add(&self.counters.out_of_scope, updates.len() as u64);
                        return;
                    }
                    for u in updates {
                        self.accept(&network, u, true, now);
                    }
                    self.finish(now);
                }
            },
            Ok((Kind::Membership, body)) => match wire::decode_memberships(body) {
                Err(_) => add(&self.counters.malformed, 1),
                Ok((from, records)) => {
                    // The sender is alive (as any foca message would say): learn it in
                    // one hop, without re-broadcasting.
                    if from.addr != self.me.addr {
                        self.shared.lock().now = now;
                        let alive = std::iter::once(foca::Member::alive(from));
                        if let Err(e) = self.foca.apply_many(alive, false, &mut self.rt) {
                            tracing::trace!(error = %e, "membership sender");
                        }
                        self.drain_foca(now);
                    }
                    {
                        let mut m = self.shared.lock();
                        m.now = now;
                        for r in records {
                            m.merge(r, true);
                        }
                    }
                    self.finish(now);
                }
            },
            Ok((Kind::Sync, _)) => add(&self.counters.malformed, 1),
        }
    }

    /// The state to open a push-pull with a peer whose identity is not known (a join peer).
    pub fn sync_request(&mut self) -> SyncState {
        self.build_sync(None)
    }

    /// Answers a push-pull: merges the peer's state, returns this node's.
    pub fn handle_sync_request(&mut self, req: SyncState, now: Duration) -> SyncState {
        let theirs: BTreeSet<String> = req.networks.iter().cloned().collect();
        self.merge_sync(req, now);
        let resp = self.build_sync(Some(&theirs));
        self.finish(now);
        resp
    }

    /// Merges the answer to a push-pull this node opened.
    pub fn handle_sync_response(&mut self, resp: SyncState, now: Duration) {
        self.merge_sync(resp, now);
        self.exchanged = true;
        if std::mem::take(&mut self.announce_after_sync) {
            self.push_own_memberships(None);
        }
        self.check_synced(now);
        self.finish(now);
    }

    /// Counts a push-pull that failed.
    pub fn sync_failed(&mut self) {
        add(&self.counters.sync_failures, 1);
    }

    /// Runs due timers and the periodic work.
    pub fn poll(&mut self, now: Duration) {
        if self.left {
            return;
        }
        self.shared.lock().now = now;
        while self.timers.peek().is_some_and(|t| t.at <= now) {
            let Some(slot) = self.timers.pop() else { break };
            if let Err(e) = self.foca.handle_timer(slot.timer, &mut self.rt) {
                tracing::trace!(error = %e, "foca timer");
            }
            self.drain_foca(now);
        }
        if now >= self.next_tick {
            self.next_tick = now + self.cfg.gossip_interval;
            self.tick(now);
        }
        self.finish(now);
    }

    // ----- internals -------------------------------------------------------------------

    fn count_foca_error(&self, e: &foca::Error) {
        match e {
            foca::Error::Decode(_)
            | foca::Error::MalformedPacket
            | foca::Error::DataTooBig
            | foca::Error::CustomBroadcast(_) => add(&self.counters.malformed, 1),
            other => tracing::trace!(error = %other, "foca"),
        }
    }

    /// Drains foca's outputs and pushes the eager updates.
    fn finish(&mut self, now: Duration) {
        self.drain_foca(now);
        self.flush_eager();
    }

    fn send_udp(&mut self, to: SocketAddr, data: Vec<u8>) {
        add(&self.counters.udp_out, 1);
        add(&self.counters.bytes_out, data.len() as u64);
        self.out.push(Output::Udp { to, data });
    }

    fn drain_foca(&mut self, now: Duration) {
        loop {
            while let Some((to, data)) = self.rt.to_send() {
                let mut p = Vec::with_capacity(wire::HEADER_LEN + data.len());
                p.extend_from_slice(&wire::header(Kind::Swim, self.tag));
                p.extend_from_slice(&data);
                self.send_udp(to.addr, p);
            }
            while let Some((after, timer)) = self.rt.to_schedule() {
                self.timer_seq += 1;
                self.timers.push(TimerSlot {
                    at: now + after,
                    seq: self.timer_seq,
                    timer,
                });
            }
            while let Some(n) = self.rt.to_notify() {
                self.on_notification(n, now);
            }
            self.apply_membership_changes();
            if self.rt.backlog() == 0 {
                break;
            }
        }
    }

    fn on_notification(&mut self, n: OwnedNotification<NodeId>, now: Duration) {
        match n {
            OwnedNotification::MemberUp(id) => self.member_up(id, now),
            OwnedNotification::MemberDown(id) => self.member_down(id, now),
            OwnedNotification::Rename(old, new) => {
                if old.name != new.name {
                    self.member_down(old, now);
                }
                if self.foca.iter_members().any(|m| m.id() == &new) {
                    self.member_up(new, now);
                }
            }
            OwnedNotification::Rejoin(new) => self.rejoined(new, now),
            OwnedNotification::Active => tracing::debug!(node = %self.me.name, "gossip active"),
            OwnedNotification::Idle => {
                tracing::info!(node = %self.me.name, "gossip idle: no live member, starting over");
                self.reset_swim(now);
            }
            OwnedNotification::Defunct => tracing::debug!(node = %self.me.name, "gossip defunct"),
        }
    }

    fn member_up(&mut self, id: NodeId, now: Duration) {
        if id.name == self.me.name {
            return;
        }
        let name = id.name.clone();
        // (known before, was alive, restarted: a newer generation)
        let (known, was_alive, restarted) = match self.nodes.get_mut(&name) {
            Some(info) if info.id.version() > id.version() => return, // stale identity
            Some(info) => {
                let r = (true, info.alive, id.gen > info.id.gen);
                info.id = id;
                info.alive = true;
                info.down_at = None;
                r
            }
            None => {
                self.nodes.insert(
                    name.clone(),
                    NodeInfo {
                        id,
                        alive: true,
                        down_at: None,
                    },
                );
                (false, false, true)
            }
        };
        self.nodes_epoch += 1;
        let (gen, addr) = (self.nodes[&name].id.gen, self.nodes[&name].id.addr);
        if restarted {
            // The previous run's networks are gone with it, and late copies of its entries
            // are refused; it re-announces. Its entries stay until then (a restarted daemon's
            // tasks kept running: see `RESTART_GRACE`).
            self.shared.lock().set_min_gen(&name, gen);
            self.retiring.retain(|(n, _, _)| *n != name);
            self.retiring.push((name.clone(), gen, now + RESTART_GRACE));
        } else if known && !was_alive {
            // Came back without restarting (a healed partition): exchange tables soon.
            self.heal.push(name.clone());
        }
        if !was_alive || restarted {
            self.out.push(Output::Event(Event::NodeUp {
                id: name.to_string(),
                addr,
            }));
        }
        self.retune();
    }

    fn member_down(&mut self, id: NodeId, now: Duration) {
        if id.name == self.me.name {
            return;
        }
        let name = id.name.clone();
        let gen = id.gen;
        // A run declared down because its successor showed up (foca reports the down, then
        // the rename, which `member_up`s the new run): the node restarted, it is not gone. Its
        // entries stay until the new run re-announces them or the grace ends.
        if self
            .foca
            .iter_members()
            .any(|m| m.id().name == name && m.id().gen > gen)
        {
            return;
        }
        let report = match self.nodes.get_mut(&name) {
            Some(info) if info.id.version() > id.version() => return, // an older identity
            Some(info) => {
                let was = info.alive;
                info.alive = false;
                info.down_at = Some(now);
                was
            }
            None => {
                self.nodes.insert(
                    name.clone(),
                    NodeInfo {
                        id,
                        alive: false,
                        down_at: Some(now),
                    },
                );
                false
            }
        };
        self.nodes_epoch += 1;
        self.heal.retain(|h| *h != name);
        if report {
            self.out.push(Output::Event(Event::NodeDown {
                id: name.to_string(),
            }));
        }
        // The owner is gone: its entries go too ([`Core::accept`] keeps late copies out).
        for ev in self.store.drop_owner(&name, None, |g| g <= gen) {
            self.out.push(Output::Event(ev));
        }
        self.retune();
    }

    /// foca renewed this node's identity after the cluster declared it down: re-announce
    /// networks and entries with newer versions, and resync.
    fn rejoined(&mut self, new: NodeId, now: Duration) {
        tracing::info!(node = %new.name, renewal = new.renewal, "gossip identity renewed, rejoining");
        self.me = new;
        for n in self.store.networks() {
            self.announce_membership(&n, true);
        }
        for (n, t, k) in self.store.restamp_own() {
            self.publish(&n, &t, &k);
        }
        self.push_own_memberships(None);
        self.next_push_pull = now;
    }

    /// Replaces foca with a fresh instance (same identity) after this node declared every
    /// member down, which most likely means that *it* was cut off. foca keeps those `Down`
    /// updates queued for dissemination and `Down` is terminal: sent after the partition
    /// heals they would make the whole cluster flap. A fresh instance forgets them; the node
    /// re-announces itself to its seeds and known nodes and relearns the cluster.
    fn reset_swim(&mut self, now: Duration) {
        self.foca = Foca::with_custom_broadcast(
            self.me.clone(),
            self.cfg.foca(1),
            SmallRng::seed_from_u64(self.rng.random()),
            PostcardCodec,
            Handler {
                shared: self.shared.clone(),
            },
        );
        self.foca_size = 1;
        self.timers.clear();
        self.next_seed_announce = now;
        for n in self.store.networks() {
            self.announce_membership(&n, true);
        }
    }

    /// Adjusts foca's cluster-size dependent settings.
    fn retune(&mut self) {
        let n = self.foca.num_members() + 1;
        let bucket = |n: usize| (n as f64).log10().floor() as u32;
        if bucket(n) != bucket(self.foca_size) {
            if let Err(e) = self.foca.set_config(self.cfg.foca(n)) {
                tracing::debug!(error = %e, "foca reconfig");
            }
        }
        self.foca_size = n;
    }

    /// Reacts to `(node, network)` records accepted since the last call: a node that left a
    /// network takes its entries there with it.
    fn apply_membership_changes(&mut self) {
        let changed = self.shared.lock().take_changed();
        for rec in changed {
            if rec.node == self.me.name || rec.joined {
                continue;
            }
            for ev in self
                .store
                .drop_owner(&rec.node, Some(&rec.network), |g| g <= rec.gen)
            {
                self.out.push(Output::Event(ev));
            }
        }
    }

    fn announce_membership(&mut self, network: &str, joined: bool) {
        let rec = NetRecord {
            node: self.me.name.clone(),
            gen: self.me.gen,
            network: network.to_string(),
            version: self.store.tick(),
            joined,
        };
        if let Err(e) = self.foca.add_broadcast(&wire::encode(&rec)) {
            tracing::debug!(error = %e, "membership broadcast");
        }
    }

    /// Sends this node's `(node, network)` records (all, or those of `only`) straight to
    /// every live node, besides foca's piggybacked dissemination: one hop, and not starved
    /// when foca's messages are full of membership updates (a mass join).
    fn push_own_memberships(&mut self, only: Option<&BTreeSet<String>>) {
        let records: Vec<NetRecord> = {
            let m = self.shared.lock();
            let mut nets: BTreeSet<String> = m.networks_of(&self.me.name);
            if let Some(o) = only {
                nets.extend(o.iter().cloned());
            }
            nets.iter()
                .filter(|n| only.is_none_or(|o| o.contains(*n)))
                .filter_map(|n| m.get(&self.me.name, n).cloned())
                .collect()
        };
        if records.is_empty() {
            return;
        }
        let mut w = BatchWriter::memberships(self.tag, &self.me);
        for r in &records {
            w.push(&wire::encode(r));
        }
        let packets = w.finish();
        let peers: Vec<SocketAddr> = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| n.id.addr)
            .collect();
        for p in &packets {
            for to in &peers {
                self.send_udp(*to, p.clone());
            }
        }
    }

    /// Merges a received record (and queues it for table gossip if new and `relay`), unless
    /// it is a late copy from an owner that is down, restarted since, or left the network
    /// after writing it: those entries were removed here and must stay out.
    fn accept(&mut self, network: &str, u: WireUpdate, relay: bool, now: Duration) {
        if u.owner == self.me.name {
            // This node is the authority on its own entries. A live one written by an
            // earlier run (before a restart) that this run does not hold is noted: the
            // consumer retracts it once it has re-announced what it keeps
            // (`retract_earlier_runs`), so the other nodes need not wait for the grace.
            if u.owner_gen < self.me.gen && u.value.is_some() && self.store.has_network(network) {
                let held = self
                    .store
                    .get(network, &u.table, &u.key)
                    .is_some_and(|r| r.owner_gen == self.me.gen);
                if !held {
                    let v = self
                        .earlier_runs
                        .entry(network.to_string())
                        .or_default()
                        .entry((u.table.clone(), u.key.clone()))
                        .or_insert(0);
                    *v = (*v).max(u.version);
                }
            }
            return;
        }
        if let Some(info) = self.nodes.get(&u.owner) {
            let g = info.id.gen;
            if u.owner_gen < g || (u.owner_gen == g && !info.alive) {
                return; // an older run of the owner, or an owner known to be down
            }
        }
        let left = self
            .shared
            .lock()
            .get(&u.owner, network)
            .is_some_and(|r| !r.joined && r.gen >= u.owner_gen && r.version > u.version);
        if left {
            return; // written before the owner left the network
        }
        let (table, key, rec) = u.into_parts();
        let born_ms = rec.born_ms;
        match self.store.merge(network, &table, &key, rec, now) {
            Merge::Applied(ev) => {
                // Broadcast is how a change is meant to spread; push-pull brings what it
                // missed and a joiner's catch-up, whose age is not a lag.
                if relay && born_ms > 0 {
                    self.counters
                        .observe_lag(self.wall_ms(now).saturating_sub(born_ms));
                }
                if let Some(ev) = ev {
                    self.out.push(Output::Event(ev));
                }
                if relay {
                    self.enqueue(network, table, key);
                }
            }
            Merge::Stale => {}
            Merge::OutOfScope => add(&self.counters.out_of_scope, 1),
        }
    }

    /// A local write: push it now and queue it for gossip.
    fn publish(&mut self, network: &str, table: &str, key: &str) {
        if let Some(r) = self.store.get(network, table, key) {
            let u = WireUpdate::from_record(table, key, r);
            self.eager.entry(network.to_string()).or_default().push(u);
        }
        self.enqueue(network, table.to_string(), key.to_string());
    }

    fn enqueue(&mut self, network: &str, table: String, key: String) {
        let members = self.network_peers(network).len() + 1;
        let rounds = self.cfg.gossip_rounds(members);
        self.queues
            .entry(network.to_string())
            .or_default()
            .insert((table, key), rounds);
    }

    /// Addresses of the live members of `network`, this node excluded.
    fn network_peers(&mut self, network: &str) -> Vec<SocketAddr> {
        let m_epoch = self.shared.lock().epoch;
        if let Some((a, b, v)) = self.peer_cache.get(network) {
            if *a == m_epoch && *b == self.nodes_epoch {
                return v.clone();
            }
        }
        let members = self.shared.lock().members_of(network);
        let mut addrs: Vec<SocketAddr> = members
            .iter()
            .filter(|(n, _)| *n != self.me.name)
            .filter_map(|(n, _)| self.nodes.get(n))
            .filter(|info| info.alive)
            .map(|info| info.id.addr)
            .collect();
        addrs.sort();
        self.peer_cache.insert(
            network.to_string(),
            (m_epoch, self.nodes_epoch, addrs.clone()),
        );
        addrs
    }

    fn random_peer(&mut self, network: &str) -> Option<SocketAddr> {
        let peers = self.network_peers(network);
        if peers.is_empty() {
            None
        } else {
            Some(peers[self.rng.random_range(0..peers.len())])
        }
    }

    fn name_of(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.nodes
            .values()
            .find(|n| n.id.addr == addr && n.alive)
            .map(|n| n.id.name.clone())
    }

    /// Sends the eager updates to every live member of their network.
    fn flush_eager(&mut self) {
        let eager = std::mem::take(&mut self.eager);
        for (network, updates) in eager {
            let mut peers = self.network_peers(&network);
            if peers.is_empty() {
                continue;
            }
            if peers.len() > EAGER_MAX {
                peers.shuffle(&mut self.rng);
                peers.truncate(EAGER_MAX);
            }
            let mut w = BatchWriter::new(self.tag, &network);
            for u in &updates {
                w.push(&wire::encode(u));
            }
            for p in w.finish() {
                for to in &peers {
                    self.send_udp(*to, p.clone());
                }
            }
        }
    }

    /// One gossip round: table queues, seed retries, heal and periodic push-pull, reaping.
    fn tick(&mut self, now: Duration) {
        if self.retiring.iter().any(|(_, _, at)| *at <= now) {
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
                .into_iter()
                .partition(|(_, _, at)| *at <= now);
            self.retiring = keep;
            for (name, gen, _) in due {
                for ev in self.store.drop_owner(&name, None, |g| g < gen) {
                    self.out.push(Output::Event(ev));
                }
            }
        }
        let networks: Vec<String> = self.queues.keys().cloned().collect();
        for network in networks {
            self.gossip_network(&network);
        }
        if self.foca.num_members() == 0
            && (!self.seeds.is_empty() || !self.nodes.is_empty())
            && now >= self.next_seed_announce
        {
            self.next_seed_announce = now + SEED_RETRY;
            let mut targets = self.seeds.clone();
            let mut known: Vec<SocketAddr> = self.nodes.values().map(|n| n.id.addr).collect();
            known.shuffle(&mut self.rng);
            targets.extend(
                known
                    .into_iter()
                    .filter(|a| !self.seeds.contains(a))
                    .take(3),
            );
            for s in targets {
                if let Err(e) = self.foca.announce(NodeId::placeholder(s), &mut self.rt) {
                    tracing::trace!(error = %e, "announce");
                }
            }
        }
        if !self.heal.is_empty() && now >= self.next_heal {
            self.next_heal = now + HEAL_EVERY;
            let heal = std::mem::take(&mut self.heal);
            let alive: Vec<SocketAddr> = heal
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .filter(|n| n.alive)
                .map(|n| n.id.addr)
                .collect();
            if !alive.is_empty() {
                let to = alive[self.rng.random_range(0..alive.len())];
                self.start_sync(to);
            }
        }
        let due: Vec<String> = self
            .follow_ups
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, n)| n.clone())
            .collect();
        if !due.is_empty() {
            self.follow_ups.retain(|(at, _)| *at > now);
            let mut peers = BTreeSet::new();
            for n in &due {
                if let Some(p) = self.random_peer(n) {
                    peers.insert(p);
                }
            }
            for p in peers {
                self.start_sync(p);
            }
        }
        if now >= self.next_push_pull {
            let every = self.cfg.push_pull_every(self.foca.num_members() + 1);
            self.next_push_pull = now + every.mul_f64(self.rng.random_range(0.9..1.1));
            self.periodic_sync();
        }
        if now >= self.next_reap {
            self.next_reap = now + REAP_EVERY;
            self.reap(now);
        }
        self.check_synced(now);
    }

    fn gossip_network(&mut self, network: &str) {
        let peers = self.network_peers(network);
        if peers.is_empty() || !self.store.has_network(network) {
            self.queues.remove(network);
            return;
        }
        let Some(queue) = self.queues.get_mut(network) else {
            return;
        };
        let mut items: Vec<((String, String), u32)> = queue.drain().collect();
        // Freshest first (most rounds left).
        items.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut w = BatchWriter::new(self.tag, network);
        let mut keep = HashMap::new();
        let mut packets_full = false;
        let mut size = 0usize;
        let room = w.room();
        for ((table, key), left) in items {
            let Some(r) = self.store.get(network, &table, &key) else {
                continue; // reaped
            };
            if packets_full {
                keep.insert((table, key), left);
                continue;
            }
            let enc = wire::encode(&WireUpdate::from_record(&table, &key, r));
            size += enc.len();
            if size > room * MAX_PACKETS_PER_ROUND {
                packets_full = true;
                keep.insert((table, key), left);
                continue;
            }
            w.push(&enc);
            if left > 1 {
                keep.insert((table, key), left - 1);
            }
        }
        if keep.is_empty() {
            self.queues.remove(network);
        } else {
            self.queues.insert(network.to_string(), keep);
        }
        let packets = w.finish();
        if packets.is_empty() {
            return;
        }
        let mut peers = peers;
        let fanout = self.cfg.gossip_fanout.min(peers.len());
        let (chosen, _) = peers.partial_shuffle(&mut self.rng, fanout);
        let chosen = chosen.to_vec();
        for to in chosen {
            for p in &packets {
                self.send_udp(to, p.clone());
            }
        }
    }

    /// One push-pull per network with a random member (at most [`MAX_SYNC_PEERS`] peers), or
    /// with any live node when this node has no network with live members.
    fn periodic_sync(&mut self) {
        let mut networks: Vec<String> = self.store.networks().into_iter().collect();
        networks.shuffle(&mut self.rng);
        let mut peers = BTreeSet::new();
        for n in &networks {
            if peers.len() >= MAX_SYNC_PEERS {
                break;
            }
            if let Some(p) = self.random_peer(n) {
                peers.insert(p);
            }
        }
        if peers.is_empty() {
            let alive: Vec<SocketAddr> = self
                .nodes
                .values()
                .filter(|n| n.alive)
                .map(|n| n.id.addr)
                .collect();
            if !alive.is_empty() {
                peers.insert(alive[self.rng.random_range(0..alive.len())]);
            }
        }
        for p in peers {
            self.start_sync(p);
        }
    }

    fn start_sync(&mut self, to: SocketAddr) {
        let peer = self.name_of(to);
        let nets = peer.map(|p| self.shared.lock().networks_of(&p));
        let request = self.build_sync(nets.as_ref());
        self.out.push(Output::Sync { to, request });
    }

    /// This node's state for a push-pull; tables only of `their_networks` (if known).
    fn build_sync(&mut self, their_networks: Option<&BTreeSet<String>>) -> SyncState {
        let mut members: Vec<foca::Member<NodeId>> =
            self.foca.iter_membership_state().cloned().collect();
        members.push(foca::Member::alive(self.me.clone()));
        let mut entries = Vec::new();
        if let Some(theirs) = their_networks {
            for n in self.store.networks() {
                if theirs.contains(&n) {
                    let updates: Vec<WireUpdate> = self
                        .store
                        .records(&n)
                        .map(|(t, k, r)| WireUpdate::from_record(t, k, r))
                        .collect();
                    entries.push((n, updates));
                }
            }
        }
        SyncState {
            from: self.me.clone(),
            networks: self.store.networks().into_iter().collect(),
            members,
            memberships: self.shared.lock().all(),
            entries,
        }
    }

    fn merge_sync(&mut self, state: SyncState, now: Duration) {
        if self.left {
            return;
        }
        add(&self.counters.syncs, 1);
        self.shared.lock().now = now;
        // Only what differs from foca's view: applying is a linear scan per member.
        let known: HashMap<SocketAddr, &foca::Member<NodeId>> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().addr, m))
            .collect();
        let news: Vec<foca::Member<NodeId>> = state
            .members
            .into_iter()
            .filter(|m| m.id().addr != self.me.addr || m.id().name == self.me.name)
            .filter(|m| known.get(&m.id().addr).is_none_or(|k| *k != m))
            .collect();
        drop(known);
        if let Err(e) = self.foca.apply_many(news.into_iter(), false, &mut self.rt) {
            tracing::debug!(error = %e, "applying push-pull members");
        }
        self.drain_foca(now);
        {
            let mut m = self.shared.lock();
            for rec in state.memberships {
                m.merge(rec, true);
            }
        }
        self.apply_membership_changes();
        for (network, updates) in state.entries {
            if !self.store.has_network(&network) {
                add(&self.counters.out_of_scope, updates.len() as u64);
                continue;
            }
            for u in updates {
                self.accept(&network, u, false, now);
            }
            // A member's whole table of the network (even empty): synced, after the events
            // of what it brought.
            self.mark_synced(&network, "exchange");
        }
    }

    /// Declares `network` synced (once per join) and reports it.
    fn mark_synced(&mut self, network: &str, how: &'static str) {
        if let Some(since) = self.unsynced.remove(network) {
            tracing::debug!(network, how, joined_at = ?since, "network synced");
            self.out.push(Output::Event(Event::Synced {
                network: network.to_string(),
            }));
        }
    }

    /// Declares synced the networks that have nobody to sync with (once this node knows the
    /// cluster, or was given nobody to join), and those whose exchanges failed for
    /// [`SYNC_GIVE_UP`].
    fn check_synced(&mut self, now: Duration) {
        if self.unsynced.is_empty() {
            return;
        }
        let knows_cluster = self.exchanged || self.seeds.is_empty();
        let pending: Vec<(String, Duration)> =
            self.unsynced.iter().map(|(n, t)| (n.clone(), *t)).collect();
        for (n, since) in pending {
            if knows_cluster && self.network_peers(&n).is_empty() {
                self.mark_synced(&n, "no other member");
            } else if now.saturating_sub(since) >= SYNC_GIVE_UP {
                tracing::warn!(network = %n, "no table exchange for this network completed in time; taking the tables as they are");
                self.mark_synced(&n, "gave up waiting");
            }
        }
    }

    fn reap(&mut self, now: Duration) {
        let nodes = self.foca.num_members() + 1;
        let ttl = self.cfg.tombstone_ttl_for(nodes);
        self.store.reap(now, ttl);
        let gone: Vec<Arc<str>> = self
            .nodes
            .values()
            .filter(|n| {
                !n.alive
                    && n.down_at
                        .is_some_and(|d| now.saturating_sub(d) >= FORGET_DOWN_AFTER)
            })
            .map(|n| n.id.name.clone())
            .collect();
        let mut m = self.shared.lock();
        m.reap(now, ttl);
        for g in gone {
            m.forget(&g);
            self.nodes.remove(&g);
            self.nodes_epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(name: &str, port: u16, gen: u64) -> Core {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cfg = Config::new(name, addr, "test");
        cfg.generation = Some(gen);
        Core::new(cfg, Arc::new(Counters::default()), Duration::ZERO, gen)
    }

    /// Delivers every UDP output of `from` addressed to `to`; returns the table packets.
    fn deliver(from: &mut Core, to: &mut Core, now: Duration) -> Vec<Vec<u8>> {
        let mut tables = Vec::new();
        for o in from.take_outputs() {
            if let Output::Udp { to: addr, data } = o {
                if addr == to.id().addr {
                    if data[3] == Kind::Table as u8 {
                        tables.push(data.clone());
                    }
                    to.handle_udp(&data, now);
                }
            }
        }
        tables
    }

    fn pair() -> (Core, Core) {
        let (mut a, mut b) = (core("a", 1, 1), core("b", 2, 2));
        let nets = BTreeSet::from(["net".to_string()]);
        let t = Duration::ZERO;
        a.set_networks(&nets, t);
        b.set_networks(&nets, t);
        b.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b.sync_request(), t);
        b.handle_sync_response(resp, t);
        deliver(&mut b, &mut a, t);
        deliver(&mut a, &mut b, t);
        assert_eq!(a.alive_count(), 1);
        assert_eq!(b.alive_count(), 1);
        (a, b)
    }

    fn down_state(of: &Core) -> SyncState {
        let mut s = of.clone_state();
        s.members = vec![foca::Member::down(of.id().clone())];
        s
    }

    impl Core {
        fn clone_state(&self) -> SyncState {
            SyncState {
                from: self.me.clone(),
                networks: Vec::new(),
                members: Vec::new(),
                memberships: Vec::new(),
                entries: Vec::new(),
            }
        }
    }

    #[test]
    fn entries_of_a_down_owner_go_and_late_copies_stay_out() {
        let (mut a, mut b) = pair();
        let t = Duration::from_secs(1);
        b.put("net", "t", "k", b"v".to_vec(), t).unwrap();
        let packets = deliver(&mut b, &mut a, t);
        assert_eq!(a.entries("net", "t").len(), 1);
        let _ = a.take_outputs();
        // Someone says b is down.
        a.handle_sync_response(down_state(&b), t);
        assert!(a.entries("net", "t").is_empty());
        let evs: Vec<Output> = a.take_outputs();
        assert!(evs
            .iter()
            .any(|o| matches!(o, Output::Event(Event::NodeDown { id }) if id == "b")));
        assert!(evs
            .iter()
            .any(|o| matches!(o, Output::Event(Event::Delete { key, .. }) if key == "k")));
        // A late copy of b's write is refused.
        for p in &packets {
            a.handle_udp(p, t);
        }
        assert!(a.entries("net", "t").is_empty());
        // b restarts (newer generation) and writes again: accepted.
        let mut b2 = core("b", 2, 3);
        b2.set_networks(&BTreeSet::from(["net".to_string()]), t);
        b2.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b2.sync_request(), t);
        b2.handle_sync_response(resp, t);
        b2.put("net", "t", "k2", b"new".to_vec(), t).unwrap();
        deliver(&mut b2, &mut a, t);
        let e = a.entries("net", "t");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].value, b"new");
        // ...and copies of the previous run's entries still are not.
        for p in &packets {
            a.handle_udp(p, t);
        }
        assert_eq!(a.entries("net", "t").len(), 1);
    }

    #[test]
    fn a_restarted_owner_s_entries_stay_until_it_re_announces_them_or_the_grace_ends() {
        // Seen in the churn soak: b's meshd is SIGKILLed and restarted within a second; its
        // tasks kept running, but the other nodes dropped its records the moment its new
        // generation showed up, so its services' VIPs and names were empty cluster-wide
        // until the re-announcement arrived (refused calls and failed lookups).
        let (mut a, mut b) = pair();
        let t = Duration::from_secs(1);
        b.put("net", "t", "kept", b"old".to_vec(), t).unwrap();
        b.put("net", "t", "gone", b"old".to_vec(), t).unwrap();
        deliver(&mut b, &mut a, t);
        assert_eq!(a.entries("net", "t").len(), 2);
        let _ = a.take_outputs();
        let mut b2 = core("b", 2, 3);
        b2.set_networks(&BTreeSet::from(["net".to_string()]), t);
        b2.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b2.sync_request(), t);
        b2.handle_sync_response(resp, t);
        deliver(&mut b2, &mut a, t);
        assert!(
            a.members().iter().any(|m| m.id == "b" && m.alive),
            "a knows b's new run"
        );
        let deleted = |outs: Vec<Output>| -> Vec<String> {
            outs.into_iter()
                .filter_map(|o| match o {
                    Output::Event(Event::Delete { key, .. }) => Some(key),
                    _ => None,
                })
                .collect()
        };
        assert!(deleted(a.take_outputs()).is_empty());
        assert_eq!(a.entries("net", "t").len(), 2, "kept while b re-announces");
        // b's new run re-announces one of them: its copy replaces the old one.
        b2.put("net", "t", "kept", b"new".to_vec(), t).unwrap();
        deliver(&mut b2, &mut a, t);
        let mut e = a.entries("net", "t");
        e.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[1].key.as_str(), e[1].value.as_slice()),
            ("kept", &b"new"[..])
        );
        a.poll(t + RESTART_GRACE / 2);
        assert!(deleted(a.take_outputs()).is_empty());
        // What it did not re-announce goes when the grace ends.
        a.poll(t + RESTART_GRACE + Duration::from_secs(1));
        assert_eq!(deleted(a.take_outputs()), vec!["gone".to_string()]);
        let e = a.entries("net", "t");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].value, b"new");
    }

    #[test]
    fn a_restarted_owner_s_entries_stay_also_when_its_previous_run_is_reported_down_first() {
        // Seen in restart_gap.rs (3 nodes): b's new run synced with a carrying a third node's
        // view, in which b's previous run (killed) was down, before its own identity; foca
        // reported that run down, then the rename, and the down dropped b's entries at once:
        // its VIP had no backend until the re-announcement.
        let (mut a, mut b) = pair();
        let t = Duration::from_secs(1);
        b.put("net", "t", "k", b"old".to_vec(), t).unwrap();
        deliver(&mut b, &mut a, t);
        assert_eq!(a.entries("net", "t").len(), 1);
        let b2 = core("b", 2, 3);
        let mut st = b2.clone_state();
        st.members = vec![
            foca::Member::down(b.id().clone()),
            foca::Member::alive(b2.id().clone()),
        ];
        a.handle_sync_response(st, t);
        assert!(
            a.members().iter().any(|m| m.id == "b" && m.alive),
            "a knows b's new run"
        );
        assert_eq!(a.entries("net", "t").len(), 1, "kept while b re-announces");
        // Not re-announced: it goes when the grace ends.
        a.poll(t + RESTART_GRACE + Duration::from_secs(1));
        assert!(a.entries("net", "t").is_empty());
    }

    #[test]
    fn a_restarted_node_retracts_what_its_earlier_run_wrote_and_it_did_not() {
        // Seen in the churn soak: b's task was stopped while b's daemon was away; the
        // restarted daemon never announced it again, so the others kept calling it (a dead
        // address) until the grace ended. The restarted node sees its earlier run's entries
        // in the push-pull and retracts those it did not write again.
        let (mut a, mut b) = pair();
        let t = Duration::from_secs(1);
        b.put("net", "t", "kept", b"old".to_vec(), t).unwrap();
        b.put("net", "t", "stopped", b"old".to_vec(), t).unwrap();
        deliver(&mut b, &mut a, t);
        assert_eq!(a.entries("net", "t").len(), 2);
        let mut b2 = core("b", 2, 3);
        b2.set_networks(&BTreeSet::from(["net".to_string()]), t);
        b2.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b2.sync_request(), t);
        b2.handle_sync_response(resp, t);
        deliver(&mut b2, &mut a, t);
        b2.put("net", "t", "kept", b"new".to_vec(), t).unwrap();
        // b's own entries never show in its tables, whichever run wrote them.
        assert_eq!(b2.entries("net", "t").len(), 1);
        deliver(&mut b2, &mut a, t);
        let _ = a.take_outputs();
        assert_eq!(
            b2.retract_earlier_runs(&BTreeSet::from(["net".to_string()]), t),
            1
        );
        deliver(&mut b2, &mut a, t);
        let e = a.entries("net", "t");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            (e[0].key.as_str(), e[0].value.as_slice()),
            ("kept", &b"new"[..])
        );
        // Nothing left to retract.
        assert_eq!(
            b2.retract_earlier_runs(&BTreeSet::from(["net".to_string()]), t),
            0
        );
    }

    #[test]
    fn entries_of_an_owner_that_left_the_network_go() {
        let (mut a, mut b) = pair();
        let t = Duration::from_secs(1);
        b.put("net", "t", "k", b"v".to_vec(), t).unwrap();
        let packets = deliver(&mut b, &mut a, t);
        assert_eq!(a.entries("net", "t").len(), 1);
        b.set_networks(&BTreeSet::new(), t);
        deliver(&mut b, &mut a, t);
        assert!(a.entries("net", "t").is_empty());
        assert!(a
            .members()
            .iter()
            .all(|m| m.networks.is_empty() || m.id == "a"));
        for p in &packets {
            a.handle_udp(p, t);
        }
        assert!(a.entries("net", "t").is_empty());
        // Nothing of net is sent to b any more.
        a.put("net", "t", "mine", b"x".to_vec(), t).unwrap();
        let to_b = a
            .take_outputs()
            .into_iter()
            .filter(|o| matches!(o, Output::Udp { to, data } if *to == b.id().addr && data[3] == Kind::Table as u8))
            .count();
        assert_eq!(to_b, 0);
    }

    /// The push-pull requests `c` wants to open.
    fn sync_requests(c: &mut Core) -> Vec<(SocketAddr, SyncState)> {
        c.take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Sync { to, request } => Some((to, request)),
                _ => None,
            })
            .collect()
    }

    fn nets(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_rejoined_network_is_synced_only_after_a_member_s_tables_are_merged() {
        // a has "net" with an entry; b (say, a restarted node) joins the cluster, then the
        // network: until the push-pull on "net" is answered, b holds none of a's entries and
        // must not call "net" synced.
        let t = Duration::ZERO;
        let mut a = core("a", 1, 1);
        a.set_networks(&nets(&["net"]), t);
        assert_eq!(a.synced(), nets(&["net"]), "alone and given nobody to join");
        a.put("net", "t", "ka", b"a".to_vec(), t).unwrap();
        let _ = a.take_outputs();
        let mut b = core("b", 2, 2);
        b.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b.sync_request(), t);
        b.handle_sync_response(resp, t);
        let _ = b.take_outputs();
        b.set_networks(&nets(&["net", "lonely"]), t);
        // Nobody else has "lonely": nothing to wait for. "net" waits for a.
        assert_eq!(b.synced(), nets(&["lonely"]));
        assert!(b.entries("net", "t").is_empty());
        let reqs = sync_requests(&mut b);
        let (to, req) = reqs
            .into_iter()
            .find(|(to, _)| *to == a.id().addr)
            .expect("a push-pull with a, the member of net");
        assert_eq!(to, a.id().addr);
        let resp = a.handle_sync_request(req, t);
        b.handle_sync_response(resp, t);
        assert_eq!(b.synced(), nets(&["lonely", "net"]));
        assert_eq!(b.entries("net", "t").len(), 1);
        // The entry is reported before the network is synced, and synced only once.
        let evs: Vec<Event> = b
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        let upsert = evs
            .iter()
            .position(|e| matches!(e, Event::Upsert { key, .. } if key == "ka"));
        let synced: Vec<usize> = evs
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Synced { network } if network == "net"))
            .map(|(i, _)| i)
            .collect();
        assert!(
            matches!((upsert, synced.as_slice()), (Some(u), [s]) if u < *s),
            "{evs:?}"
        );
        // Left and joined again: not synced until the next exchange.
        b.set_networks(&nets(&["lonely"]), t);
        b.set_networks(&nets(&["lonely", "net"]), t);
        assert_eq!(b.synced(), nets(&["lonely"]));
    }

    #[test]
    fn a_network_whose_exchanges_fail_is_synced_after_a_bound() {
        let t = Duration::ZERO;
        let mut a = core("a", 1, 1);
        a.set_networks(&nets(&["net"]), t);
        let mut b = core("b", 2, 2);
        b.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b.sync_request(), t);
        b.handle_sync_response(resp, t);
        b.set_networks(&nets(&["net"]), t);
        // Every push-pull is lost.
        let _ = b.take_outputs();
        b.poll(SYNC_GIVE_UP / 2);
        assert!(b.synced().is_empty());
        b.poll(SYNC_GIVE_UP + Duration::from_secs(1));
        assert_eq!(b.synced(), nets(&["net"]));
    }

    #[test]
    fn networks_declared_before_the_join_wait_for_a_member_s_tables() {
        // A restarted daemon declares the networks of the tasks it adopts as soon as its
        // gossip runs, possibly before it joins its peers: knowing it will join them, it must
        // not take its own few records for a network nobody else has (its DNS would answer
        // from them and its routing mesh drop the ports others publish).
        let t = Duration::ZERO;
        let mut a = core("a", 1, 1);
        a.set_networks(&nets(&["net"]), t);
        a.put("net", "t", "ka", b"a".to_vec(), t).unwrap();
        let _ = a.take_outputs();
        let addr: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut cfg = Config::new("b", addr, "test");
        cfg.generation = Some(2);
        cfg.seeds = vec![a.id().addr, addr];
        let mut b = Core::new(cfg, Arc::new(Counters::default()), t, 2);
        b.set_networks(&nets(&["net"]), t);
        b.poll(Duration::from_millis(100));
        assert!(b.synced().is_empty(), "synced before joining anyone");
        b.join(&[a.id().addr], t);
        let resp = a.handle_sync_request(b.sync_request(), t);
        b.handle_sync_response(resp, t);
        assert_eq!(b.synced(), nets(&["net"]));
        assert_eq!(b.entries("net", "t").len(), 1);
    }

    #[test]
    fn a_joining_node_that_never_heard_back_waits_for_its_peers_networks() {
        // b was given a peer to join but never heard from it: it cannot tell that a network
        // has no other member, so it waits (up to the bound).
        let t = Duration::ZERO;
        let mut b = core("b", 2, 2);
        b.join(&["127.0.0.1:1".parse().unwrap()], t);
        b.set_networks(&nets(&["net"]), t);
        b.poll(Duration::from_secs(1));
        assert!(b.synced().is_empty());
    }

    #[test]
    fn put_requires_the_network_and_bounds_size() {
        let mut a = core("a", 1, 1);
        assert!(matches!(
            a.put("net", "t", "k", vec![1], Duration::ZERO),
            Err(GossipError::Table(_))
        ));
        a.set_networks(&BTreeSet::from(["net".to_string()]), Duration::ZERO);
        a.put("net", "t", "k", vec![1], Duration::ZERO).unwrap();
        assert!(matches!(
            a.put("net", "t", "big", vec![0; 1400], Duration::ZERO),
            Err(GossipError::TooLarge { .. })
        ));
        assert_eq!(a.entries("net", "t").len(), 1);
    }
}
