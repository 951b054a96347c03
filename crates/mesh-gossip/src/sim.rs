//! A deterministic in-process simulator of the gossip layer: N nodes running the same
//! [`Core`] (foca, tables, dissemination) as [`crate::Gossip`], over an in-memory network
//! with latency, jitter and loss, on a virtual clock. No sockets and no sleeping, so a
//! thousand nodes run in seconds; the same seed gives the same run.
//!
//! Model: a UDP packet arrives `latency ± jitter` (uniform) after it leaves, unless lost
//! (probability `loss`); a node sends its packets one after the other, `send_cost` apart (so
//! a write pushed to 999 members leaves over ~999 × `send_cost`). A push-pull exchange
//! (TCP) is never lost and takes two latencies each way (connect, then data); to a dead or
//! partitioned node it fails. Processing takes no virtual time.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::core::{Core, Output};
use crate::error::GossipError;
use crate::event::{Entry, Event, Member};
use crate::stats::{Counters, Stats};
use crate::wire::SyncState;

/// Simulation settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// One-way base latency.
    pub latency: Duration,
    /// Latency varies uniformly within `latency ± jitter`.
    pub jitter: Duration,
    /// Probability that a UDP packet is lost.
    pub loss: f64,
    /// Time a node takes to send one packet.
    pub send_cost: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Node settings (name, addresses and generation are set per node).
    pub node: Config,
}

impl SimConfig {
    /// `nodes` nodes, 1 ms ± 0.2 ms, no loss, 5 µs per packet, default node settings.
    pub fn new(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            latency: Duration::from_millis(1),
            jitter: Duration::from_micros(200),
            loss: 0.0,
            send_cost: Duration::from_micros(5),
            seed: 1,
            node: Config::new("sim", SocketAddr::from(([127, 0, 0, 1], 7946)), "sim"),
        }
    }
}

/// What a scheduled event does.
enum What {
    Udp {
        to: usize,
        data: Vec<u8>,
    },
    SyncReq {
        from: usize,
        to: usize,
        state: SyncState,
    },
    SyncResp {
        to: usize,
        state: SyncState,
    },
    SyncFail {
        to: usize,
    },
    Wake {
        node: usize,
    },
}

struct Scheduled {
    at: Duration,
    seq: u64,
    what: What,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    core: Core,
    counters: Arc<Counters>,
    alive: bool,
    partitioned: bool,
    wake: Option<Duration>,
    busy_until: Duration,
    gen: u64,
}

/// What a watch waits for on each node.
#[derive(Clone, Debug)]
enum Want {
    Value {
        network: String,
        table: String,
        key: String,
        value: Option<Vec<u8>>,
    },
    Down(String),
}

struct Watch {
    want: Want,
    pending: BTreeSet<usize>,
    last: Duration,
}

/// The simulated cluster.
pub struct Sim {
    cfg: SimConfig,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    now: Duration,
    rng: SmallRng,
    watch: Option<Watch>,
    events: Option<Vec<(usize, Event)>>,
    /// UDP packets delivered.
    pub delivered: u64,
    /// UDP packets lost (randomly, or to a dead or partitioned node).
    pub lost: u64,
    /// Table packets delivered.
    pub table_packets: u64,
}

/// splitmix64's finalizer: spreads bits so that nearby inputs give unrelated seeds.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The address of simulated node `i` (never bound: nothing leaves the process).
pub fn sim_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
    SocketAddr::from((ip, 7946))
}

/// The name of simulated node `i`.
pub fn sim_name(i: usize) -> String {
    format!("node-{i:04}")
}

impl Sim {
    /// `cfg.nodes` nodes that know nobody yet.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut sim = Sim {
            nodes: Vec::with_capacity(cfg.nodes),
            by_addr: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: Duration::ZERO,
            rng: SmallRng::seed_from_u64(cfg.seed),
            watch: None,
            events: None,
            delivered: 0,
            lost: 0,
            table_packets: 0,
            cfg,
        };
        for i in 0..sim.cfg.nodes {
            let node = sim.make_node(i, 1_000_000 + i as u64);
            sim.by_addr.insert(sim_addr(i), i);
            sim.nodes.push(node);
        }
        sim
    }

    fn make_node(&mut self, i: usize, gen: u64) -> SimNode {
        let mut c = self.cfg.node.clone();
        c.node_id = sim_name(i);
        c.bind = sim_addr(i);
        c.advertise = sim_addr(i);
        c.generation = Some(gen);
        let counters = Arc::new(Counters::default());
        let seed = mix(mix(self.cfg.seed) ^ mix(i as u64) ^ gen);
        SimNode {
            core: Core::new(c, counters.clone(), self.now, seed),
            counters,
            alive: true,
            partitioned: false,
            wake: None,
            busy_until: self.now,
            gen,
        }
    }

    /// The settings.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Changes the UDP loss probability from now on.
    pub fn set_loss(&mut self, loss: f64) {
        self.cfg.loss = loss.clamp(0.0, 1.0);
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes (dead ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Starts recording every event of every node (see [`Sim::take_events`]).
    pub fn record_events(&mut self) {
        self.events = Some(Vec::new());
    }

    /// Events recorded since the last call, as `(node, event)`.
    pub fn take_events(&mut self) -> Vec<(usize, Event)> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn push(&mut self, at: Duration, what: What) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            what,
        });
    }

    fn delay(&mut self) -> Duration {
        let j = self.cfg.jitter.as_secs_f64();
        let d = self.cfg.latency.as_secs_f64()
            + if j > 0.0 {
                self.rng.random_range(-j..j)
            } else {
                0.0
            };
        Duration::from_secs_f64(d.max(0.0))
    }

    fn reachable(&self, i: usize) -> bool {
        self.nodes[i].alive && !self.nodes[i].partitioned
    }

    /// Handles node `i`'s outputs and reschedules its wake-up.
    fn dispatch(&mut self, i: usize) {
        let outputs = self.nodes[i].core.take_outputs();
        let mut send_at = self.now.max(self.nodes[i].busy_until);
        for o in outputs {
            match o {
                Output::Udp { to, data } => {
                    send_at += self.cfg.send_cost;
                    let Some(&j) = self.by_addr.get(&to) else {
                        self.lost += 1;
                        continue;
                    };
                    if !self.reachable(i)
                        || (self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss))
                    {
                        self.lost += 1;
                        continue;
                    }
                    let at = send_at + self.delay();
                    self.push(at, What::Udp { to: j, data });
                }
                Output::Sync { to, request } => {
                    let at = self.now + self.cfg.latency * 2;
                    match self.by_addr.get(&to) {
                        Some(&j) if self.reachable(i) => self.push(
                            at,
                            What::SyncReq {
                                from: i,
                                to: j,
                                state: request,
                            },
                        ),
                        _ => self.push(at, What::SyncFail { to: i }),
                    }
                }
                Output::Event(e) => self.observe(i, e),
            }
        }
        self.nodes[i].busy_until = send_at;
        self.reschedule(i);
    }

    fn reschedule(&mut self, i: usize) {
        if !self.nodes[i].alive || self.nodes[i].core.has_left() {
            return;
        }
        let d = self.nodes[i].core.next_deadline().max(self.now);
        if self.nodes[i].wake.is_none_or(|w| d < w) {
            self.nodes[i].wake = Some(d);
            self.push(d, What::Wake { node: i });
        }
    }

    fn observe(&mut self, i: usize, e: Event) {
        if let Some(w) = self.watch.as_mut() {
            if w.pending.contains(&i) {
                let hit = match (&w.want, &e) {
                    (
                        Want::Value {
                            network,
                            table,
                            key,
                            value: Some(v),
                        },
                        Event::Upsert {
                            network: n,
                            table: t,
                            key: k,
                            value: got,
                            ..
                        },
                    ) => n == network && t == table && k == key && got == v,
                    (
                        Want::Value {
                            network,
                            table,
                            key,
                            value: None,
                        },
                        Event::Delete {
                            network: n,
                            table: t,
                            key: k,
                            ..
                        },
                    ) => n == network && t == table && k == key,
                    (Want::Down(name), Event::NodeDown { id }) => id == name,
                    _ => false,
                };
                if hit {
                    w.pending.remove(&i);
                    w.last = self.now;
                }
            }
        }
        if let Some(ev) = self.events.as_mut() {
            ev.push((i, e));
        }
    }

    fn step(&mut self) -> bool {
        let Some(s) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(s.at);
        match s.what {
            What::Wake { node } => {
                if self.nodes[node].wake == Some(s.at) {
                    self.nodes[node].wake = None;
                    if self.nodes[node].alive {
                        let now = self.now;
                        self.nodes[node].core.poll(now);
                        self.dispatch(node);
                    }
                }
            }
            What::Udp { to, data } => {
                if self.reachable(to) {
                    self.delivered += 1;
                    if data.get(3) == Some(&2) {
                        self.table_packets += 1;
                    }
                    let now = self.now;
                    self.nodes[to].core.handle_udp(&data, now);
                    self.dispatch(to);
                } else {
                    self.lost += 1;
                }
            }
            What::SyncReq { from, to, state } => {
                if self.reachable(to) {
                    let now = self.now;
                    let resp = self.nodes[to].core.handle_sync_request(state, now);
                    self.dispatch(to);
                    let at = self.now + self.cfg.latency * 2;
                    self.push(
                        at,
                        What::SyncResp {
                            to: from,
                            state: resp,
                        },
                    );
                } else {
                    let at = self.now;
                    self.push(at, What::SyncFail { to: from });
                }
            }
            What::SyncResp { to, state } => {
                if self.reachable(to) {
                    let now = self.now;
                    self.nodes[to].core.handle_sync_response(state, now);
                    self.dispatch(to);
                }
            }
            What::SyncFail { to } => {
                if self.nodes[to].alive {
                    self.nodes[to].core.sync_failed();
                }
            }
        }
        true
    }

    /// Runs until virtual time `t`.
    pub fn run_until(&mut self, t: Duration) {
        while self.queue.peek().is_some_and(|s| s.at <= t) {
            self.step();
        }
        self.now = self.now.max(t);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    /// Runs until `done` holds (checked every `every`) or `timeout` passes; returns the time
    /// it took, or `None` on timeout.
    pub fn run_until_true(
        &mut self,
        timeout: Duration,
        every: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        loop {
            if done(self) {
                return Some(self.now - start);
            }
            if self.now - start >= timeout {
                return None;
            }
            self.run_for(every);
        }
    }

    /// Node `i` announces itself to `seeds` and runs a push-pull with the first one.
    pub fn join(&mut self, i: usize, seeds: &[usize]) {
        let addrs: Vec<SocketAddr> = seeds.iter().map(|&s| sim_addr(s)).collect();
        let now = self.now;
        self.nodes[i].core.join(&addrs, now);
        if let Some(&s) = seeds.first() {
            let request = self.nodes[i].core.sync_request();
            let at = self.now + self.cfg.latency * 2;
            self.push(
                at,
                What::SyncReq {
                    from: i,
                    to: s,
                    state: request,
                },
            );
        }
        self.dispatch(i);
    }

    /// Sets node `i`'s networks.
    pub fn set_networks(&mut self, i: usize, networks: &[&str]) {
        let set: BTreeSet<String> = networks.iter().map(|s| s.to_string()).collect();
        let now = self.now;
        self.nodes[i].core.set_networks(&set, now);
        self.dispatch(i);
    }

    /// Writes an entry on node `i`.
    pub fn put(
        &mut self,
        i: usize,
        network: &str,
        table: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), GossipError> {
        let now = self.now;
        let r = self.nodes[i].core.put(network, table, key, value, now);
        self.dispatch(i);
        r
    }

    /// Deletes an entry on node `i`.
    pub fn delete(
        &mut self,
        i: usize,
        network: &str,
        table: &str,
        key: &str,
    ) -> Result<(), GossipError> {
        let now = self.now;
        let r = self.nodes[i].core.delete(network, table, key, now);
        self.dispatch(i);
        r
    }

    /// Live entries of a table on node `i`.
    pub fn entries(&self, i: usize, network: &str, table: &str) -> Vec<Entry> {
        self.nodes[i].core.entries(network, table)
    }

    /// Node `i`'s view of the cluster.
    pub fn members(&self, i: usize) -> Vec<Member> {
        self.nodes[i].core.members()
    }

    /// How many other nodes node `i` sees alive.
    pub fn alive_seen_by(&self, i: usize) -> usize {
        self.nodes[i].core.alive_count()
    }

    /// Updates waiting in node `i`'s table gossip queues.
    pub fn queued(&self, i: usize) -> usize {
        self.nodes[i].core.queued()
    }

    /// How many `(node, network)` joined records node `i` holds.
    pub fn memberships_seen_by(&self, i: usize) -> usize {
        self.nodes[i].core.membership_count()
    }

    /// Node `i`'s counters.
    pub fn stats(&self, i: usize) -> Stats {
        self.nodes[i].counters.snapshot()
    }

    /// Whether node `i` runs.
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Stops node `i` abruptly (no leave): it neither sends nor receives any more.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.nodes[i].wake = None;
    }

    /// Node `i` leaves gracefully, then stops.
    pub fn leave(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].core.leave(now);
        self.dispatch(i);
        self.nodes[i].alive = false;
    }

    /// Restarts node `i` as a fresh process (same name and address, newer generation, empty
    /// tables); it joins `seeds`.
    pub fn restart(&mut self, i: usize, seeds: &[usize]) {
        let gen = self.nodes[i].gen + 1_000_000 + self.now.as_micros() as u64;
        let node = self.make_node(i, gen);
        self.nodes[i] = node;
        self.join(i, seeds);
    }

    /// Cuts node `i` off (every packet to or from it is lost) or heals it.
    pub fn set_partitioned(&mut self, i: usize, on: bool) {
        self.nodes[i].partitioned = on;
    }

    /// Every node declares `networks` and (from 1 on) joins node 0, `spacing` apart; then
    /// runs until every node sees every other alive and knows every node's networks. Returns the virtual time it took, or `None` after `timeout`.
    pub fn bootstrap(
        &mut self,
        networks: &[&str],
        spacing: Duration,
        timeout: Duration,
    ) -> Option<Duration> {
        let start = self.now;
        for i in 0..self.nodes.len() {
            self.set_networks(i, networks);
        }
        for i in 1..self.nodes.len() {
            self.join(i, &[0]);
            self.run_for(spacing);
        }
        let n = self.nodes.len();
        let records = n * networks.len();
        let left = timeout.saturating_sub(self.now - start);
        self.run_until_true(left, Duration::from_millis(250), |s| {
            (0..n).all(|i| s.alive_seen_by(i) == n - 1 && s.memberships_seen_by(i) >= records)
        })?;
        Some(self.now - start)
    }

    fn watch_and_run(
        &mut self,
        want: Want,
        except: Option<usize>,
        timeout: Duration,
    ) -> Option<Duration> {
        let network = match &want {
            Want::Value { network, .. } => Some(network.clone()),
            Want::Down(_) => None,
        };
        let pending: BTreeSet<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && Some(i) != except)
            .filter(|&i| {
                network
                    .as_ref()
                    .is_none_or(|n| self.nodes[i].core.networks().contains(n))
            })
            .collect();
        let start = self.now;
        self.watch = Some(Watch {
            want,
            pending,
            last: start,
        });
        let deadline = start + timeout;
        loop {
            let done = self.watch.as_ref().is_some_and(|w| w.pending.is_empty());
            if done {
                break;
            }
            if self.queue.peek().is_none_or(|s| s.at > deadline) {
                self.now = deadline;
                self.watch = None;
                return None;
            }
            self.step();
        }
        let w = self.watch.take()?;
        Some(w.last - start)
    }

    /// Puts an entry on `origin` and runs until every live node that has the network has
    /// it. Returns the time from the put until the last node had it.
    pub fn measure_put(
        &mut self,
        origin: usize,
        network: &str,
        table: &str,
        key: &str,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Option<Duration> {
        let want = Want::Value {
            network: network.into(),
            table: table.into(),
            key: key.into(),
            value: Some(value.clone()),
        };
        self.put(origin, network, table, key, value).ok()?;
        self.watch_and_run(want, Some(origin), timeout)
    }

    /// Deletes an entry on `origin` and runs until every live node that has the network has
    /// dropped it.
    pub fn measure_delete(
        &mut self,
        origin: usize,
        network: &str,
        table: &str,
        key: &str,
        timeout: Duration,
    ) -> Option<Duration> {
        self.delete(origin, network, table, key).ok()?;
        let want = Want::Value {
            network: network.into(),
            table: table.into(),
            key: key.into(),
            value: None,
        };
        self.watch_and_run(want, Some(origin), timeout)
    }

    /// Kills `victim` and runs until every other live node has reported it down.
    pub fn measure_failure_detection(
        &mut self,
        victim: usize,
        timeout: Duration,
    ) -> Option<Duration> {
        self.kill(victim);
        self.watch_and_run(Want::Down(sim_name(victim)), Some(victim), timeout)
    }
}
