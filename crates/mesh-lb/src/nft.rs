//! Service-VIP load balancing with nftables, for hosts where the socket programs cannot be
//! attached (no cgroup v2, no BPF): kube-proxy's nftables mode, scaled down to what a VIP
//! needs here (every port of the VIP goes to one backend address, the port is kept).
//!
//! # Where it runs, and why there
//!
//! One table `ip mesh_lb` in **each task's network namespace**, with a NAT chain on the
//! `output` hook: a connection the task opens to `VIP:port` is DNATed, on its first packet,
//! to `backend:port`, chosen at random per new connection (`numgen random`). Everything
//! happens in the client's namespace, as with the socket programs (but per packet, through
//! conntrack, where those rewrite the socket once):
//!
//! - conntrack sees both directions there, so replies are un-NATed symmetrically and the
//!   client sees the VIP as its peer (TCP and UDP alike);
//! - the backend sees the task's own address as the source (see "source address" below), so
//!   servers log real clients and need no return route through a balancer;
//! - nothing is translated on the server side, no shared balancer namespace holds state for
//!   every flow of the host, and a task only pays for its own connections.
//!
//! # The table
//!
//! ```text
//! table ip mesh_lb {
//!     map vips     { type ipv4_addr : verdict; }                             # VIP -> goto lb_N | accept
//!     map backends { typeof ip daddr . numgen random mod 1 : ip daddr; }     # VIP . slot -> backend
//!     chain output {
//!         type nat hook output priority -100; policy accept;
//!         meta l4proto { tcp, udp } ip daddr vmap @vips
//!     }
//!     chain postrouting {
//!         type nat hook postrouting priority 100; policy accept;
//!         ct status dnat fib saddr . oif type != local masquerade
//!     }
//!     chain lb_3 { dnat to ip daddr . numgen random mod 3 map @backends }    # one per backend count in use
//! }
//! ```
//!
//! A service with `N` backends is the element `VIP : goto lb_N` in `vips` and the `N`
//! elements `VIP . 0 .. VIP . N-1` in `backends`; `lb_N` looks the backend up by the
//! packet's own destination and a random slot below `N`. A service with no backend is
//! `VIP : accept`: no translation, the packet reaches the VIP the caller put on `lo`, which
//! refuses at once (RST / ICMP port unreachable). Only TCP and UDP are balanced: a ping to
//! the VIP is answered locally by `lo`.
//!
//! This departs from the first sketch (a chain `svc_<vip>` per VIP holding
//! `dnat to numgen random mod N map { 0 : a, ... }`) because of what was measured on Linux
//! 6.18 / nft 1.0.6: each such rule carries an *anonymous* map, and the kernel names a new
//! anonymous set by scanning every set of the table (`nf_tables_set_alloc_name`), so loading
//! 10,000 of them took 11.7 s (quadratic: 0.14 s for 1,000, 1.8 s for 4,000) and one change
//! 120 ms. With two named maps, a backend change is element updates only, the number of
//! chains is the number of distinct backend counts, and the full load is a bulk element
//! insert (numbers in `docs/benchmarks.md`, section `lb`).
//!
//! # Source address
//!
//! The caller puts each VIP on the task's `lo` (`/32`). A socket connecting to a local
//! address gets that address as its source, so the DNATed packet would leave with the VIP
//! as source, which the backend cannot answer. The `postrouting` chain masquerades exactly
//! those connections: DNATed, and whose source is not an address of the interface they
//! leave by (`fib saddr . oif type != local`; the VIP's local route is on `lo`). They get
//! the address of that interface, which is the task's own address on that network, and
//! conntrack undoes both translations on the replies. A connection that already has the
//! task's address as source is left alone; so is one that loops back through `lo` (a
//! backend that is the client task itself), where the VIP is a valid source. Docker Swarm's
//! IPVS does the same with an SNAT rule in the container's namespace. The condition needs no
//! per-VIP state: the `vips` map cannot serve as a source set there anyway, since a map
//! whose verdicts reach a `dnat` cannot be referenced from a `postrouting` chain.
//!
//! # Changes
//!
//! Every change is one nftables transaction. A backend replaced is `delete element` + `add
//! element` of its slot; backends that stay keep their slots; a new backend count also
//! replaces the `vips` element. [`NftLb::sync`] and [`NftLb::apply_batch`] put all the
//! differences in one transaction.
//!
//! A transaction is atomic for each lookup, but **not for a packet as a whole**: the
//! packet path reads the rule generation once, when it enters the base chain, while every
//! map lookup uses the generation current at that instant (`nft_do_chain` and the set
//! backends' `lookup`, Linux 6.x). A packet crossing a commit can therefore take the verdict
//! `goto lb_3` of the old generation and look up its slot `VIP . 2` in the new one, or take
//! a new verdict `goto lb_2` and run the *old* generation's rules of `lb_2`. Deleting
//! `VIP . 2` in the transaction that lowers the count from 3, or pointing a VIP at a chain
//! created in the same transaction, made such a packet miss: no DNAT, the connection
//! reached the VIP on `lo` and was refused (about one connect in a few thousand changes,
//! found by `changes_under_load_lose_nothing`). Two rules close the window:
//!
//! - **a slot is never deleted by the transaction that lowers its VIP's count** (or removes
//!   the VIP): it *lingers*, still pointing at its old backend (which drains before it
//!   stops), and the next transaction deletes it, when no verdict of the generation before
//!   can index it any more (or rewrites it, if the count grew back);
//! - **`lb_N` is created in a transaction of its own**, before the one that first points a
//!   VIP at it; the kernel gives the chain's rules to both generations at the following
//!   commit.
//!
//! A slot replaced in place (delete + add of one key in one transaction) is safe: the old
//! generation finds the old element, the new one the new element.
//!
//! Small transactions go through one long-lived `nft -i` process per [`NftLb`]
//! ([`mesh_netlink::nft::Session`], the same runner the routing mesh and the overlay use for
//! their scripts), started in the namespace on first use: spawning `nft -f -` costs ~16 ms
//! per change, a line written to a running `nft -i` ~0.12 ms (median; 0.3 ms p99;
//! `mesh-bench lb`). Any trouble with that process (exit, timeout, garbled output) kills
//! it, the table is re-read from the kernel and the change is retried once with `nft -f -`.
//! Big transactions (over 64 KiB of script) always use `nft -f -`, and so does everything
//! if `nft -i` fails before its first answer (an `nft` built without it). The process is
//! replaced every 4096 commands (its line-editing history only grows).
//!
//! # Lost backends
//!
//! conntrack keeps a connection's backend for the entry's life. A backend that leaves the
//! table because it is gone (its node was cut off or killed) would keep the entries of
//! connects in progress toward it: the client's retransmitted SYNs follow the entry to the
//! dead address until `connect` gives up, and a UDP flow's next datagrams likewise (each
//! one renews the entry). After every change that removes backends, the entries they
//! strand are deleted over ctnetlink ([`mesh_netlink::conntrack::stranded`]: TCP without a
//! reply yet, and UDP), so the next packet is translated afresh. They are deleted a second
//! later ([`mesh_netlink::conntrack::STRANDED_AFTER`]), not at once: a backend withdrawn
//! gracefully is still serving, and a reply in flight from it must find its entry (deleting
//! at once lost UDP replies in `count_changes_under_load_lose_nothing`); by then its
//! flows are answered, and only those of a backend really gone are still stranded.
//! Answered TCP connections are kept: they end by themselves.
//!
//! # Adoption
//!
//! [`NftLb::new`] reads an existing table (`nft -j list table ip mesh_lb`, e.g. left by a
//! daemon that restarted) and adopts it without writing anything when it has exactly the
//! shape above. Anything else (a foreign rule or object, an element without its slots, a
//! different nft version printing differently) is repaired by rewriting the whole table in
//! one transaction (`add table; delete table; <table>`), keeping every complete service:
//! gapless, since the transaction is atomic. A failed transaction likewise re-reads the
//! table before its one retry, so a table changed behind our back heals.
//!
//! **Architecture Invariant**: knows VIPs and backend addresses, nothing of services, tasks
//! or Raft; it is given the desired state.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use mesh_netlink::nft::json::{self, Listing, Verdict};
use mesh_netlink::nft::{self, condense, Session, SessionError};
use mesh_netlink::{conntrack, Netns};
use serde_json::{json, Value};

use crate::{LbError, Proto, ServiceEntry};

/// The table, in family `ip`.
pub const TABLE: &str = "mesh_lb";

/// At most this many backends per VIP.
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Scripts up to this size go through the `nft -i` session, bigger ones through `nft -f -`.
const SESSION_MAX_SCRIPT: usize = 64 * 1024;

/// The session is replaced after this many commands (bounds its history's memory).
const SESSION_MAX_COMMANDS: u32 = 4096;

/// Elements per `add element` / `delete element` command (keeps error echoes readable).
const ELEMENTS_PER_COMMAND: usize = 256;

/// One change for [`NftLb::apply_batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// As [`NftLb::set_service`].
    Set {
        vip: Ipv4Addr,
        backends: Vec<Ipv4Addr>,
    },
    /// As [`NftLb::remove_service`].
    Remove { vip: Ipv4Addr },
}

/// The nftables balancer of one network namespace.
///
/// It holds what it believes the table holds: each VIP's backends in slot order (the order
/// [`NftLb::dump`] reports). It also holds the namespace (an fd, and the `nft -i` process
/// running in it), which therefore lives as long as the `NftLb`: drop it when the task goes.
/// Dropping it stops the process and leaves the table; [`NftLb::remove_table`] deletes it.
pub struct NftLb {
    ns: Netns,
    held: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    /// The `lb_N` chains that exist (N > 0).
    chains: BTreeSet<usize>,
    session: Option<Session>,
    /// False once a session broke before answering anything (an `nft` without `-i`):
    /// every transaction then uses `nft -f -`.
    use_session: bool,
    /// The kernel may differ from `held` (a command's outcome is unknown): re-read first.
    stale: bool,
    /// Backend slots the kernel still holds at or above their VIP's count, or of a removed
    /// VIP: the next transaction deletes them (see "Changes" in the module docs).
    lingering: BTreeSet<(Ipv4Addr, usize)>,
    /// The backends held, shared with the delayed deletion of stranded conntrack entries.
    holding: conntrack::Holding,
}

impl fmt::Debug for NftLb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NftLb")
            .field("ns", &self.ns.name())
            .field("services", &self.held.len())
            .field("chains", &self.chains)
            .field("session", &self.session.as_ref().map(Session::pid))
            .finish_non_exhaustive()
    }
}

impl NftLb {
    /// Opens the balancer of `ns` (`None`: the calling thread's namespace): creates the table
    /// if missing, adopts it if it is there (see the module docs: no write when it has the
    /// expected shape, else one gapless rewrite keeping every complete service).
    pub fn new(ns: Option<Netns>) -> Result<NftLb, LbError> {
        let ns = match ns {
            Some(ns) => ns,
            None => Netns::current().map_err(|e| LbError::Nft {
                ns: "host".to_string(),
                message: e.to_string(),
            })?,
        };
        let mut lb = NftLb {
            ns,
            held: BTreeMap::new(),
            chains: BTreeSet::new(),
            session: None,
            use_session: true,
            stale: true,
            lingering: BTreeSet::new(),
            holding: Default::default(),
        };
        lb.reload()?;
        Ok(lb)
    }

    /// Sets a VIP's backends (duplicates ignored): one transaction, nothing if the set is
    /// unchanged (order does not matter). An empty list keeps the VIP, not translated: its
    /// connections reach the VIP on `lo` and are refused.
    pub fn set_service(&mut self, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> Result<(), LbError> {
        self.apply(BTreeMap::from([(vip, Some(backends))]))
    }

    /// Forgets a VIP (its traffic is no longer translated). No-op if absent.
    pub fn remove_service(&mut self, vip: Ipv4Addr) -> Result<(), LbError> {
        self.apply(BTreeMap::from([(vip, None)]))
    }

    /// Applies several changes in one transaction (for one VIP, the last change wins).
    pub fn apply_batch(&mut self, changes: &[Change]) -> Result<(), LbError> {
        let mut map = BTreeMap::new();
        for c in changes {
            match c {
                Change::Set { vip, backends } => map.insert(*vip, Some(backends.as_slice())),
                Change::Remove { vip } => map.insert(*vip, None),
            };
        }
        self.apply(map)
    }

    /// Makes the table hold exactly `want`: VIPs missing from it are removed. All the
    /// differences go in one transaction; nothing is written if there are none.
    pub fn sync(&mut self, want: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), LbError> {
        if self.stale {
            self.reload()?;
        }
        let mut map: BTreeMap<Ipv4Addr, Option<&[Ipv4Addr]>> = want
            .iter()
            .map(|(vip, b)| (*vip, Some(b.as_slice())))
            .collect();
        for vip in self.held.keys() {
            map.entry(*vip).or_insert(None);
        }
        self.apply(map)
    }

    /// What the table holds, read from the kernel, sorted by VIP: for each VIP a `Tcp` and a
    /// `Udp` entry with port 0 (every port is balanced) and backends `(addr, 0)` (the port is
    /// kept) in slot order. `rev` is always 0: nftables keeps no revision. A VIP whose
    /// elements are incomplete (only possible if someone else edited the table) is left out.
    pub fn dump(&self) -> Result<Vec<ServiceEntry>, LbError> {
        let Some(obs) = self.read_kernel()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(obs.services.len() * 2);
        for (vip, backends) in obs.services {
            for proto in [Proto::Tcp, Proto::Udp] {
                out.push(ServiceEntry {
                    vip,
                    port: 0,
                    proto,
                    rev: 0,
                    backends: backends.iter().map(|b| (*b, 0)).collect(),
                });
            }
        }
        Ok(out)
    }

    /// What this balancer believes the table holds (each VIP's backends in slot order),
    /// without asking the kernel.
    pub fn services(&self) -> &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
        &self.held
    }

    /// The namespace this balancer works in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Deletes the table (no-op if it is gone already) and stops the `nft -i` process.
    pub fn remove_table(mut self) -> Result<(), LbError> {
        self.session = None;
        self.run_file(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))?;
        self.held.clear();
        self.chains.clear();
        self.lingering.clear();
        tracing::debug!(ns = self.ns.name(), "nft load balancer: table removed");
        Ok(())
    }

    // -----------------------------------------------------------------------------------

    fn apply(&mut self, changes: BTreeMap<Ipv4Addr, Option<&[Ipv4Addr]>>) -> Result<(), LbError> {
        if self.stale {
            self.reload()?;
        }
        let before = self.backends();
        match self.try_apply(&changes, false) {
            Ok(()) => {}
            Err(e @ LbError::TooManyBackends { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    ns = self.ns.name(),
                    error = %e,
                    "nft load balancer: transaction failed; re-reading the table and retrying once"
                );
                self.reload()?;
                self.try_apply(&changes, true)?;
            }
        }
        let after = self.backends();
        let lost: Vec<Ipv4Addr> = before.difference(&after).copied().collect();
        self.forget_flows_to(lost, after);
        Ok(())
    }

    /// Every backend of every VIP held.
    fn backends(&self) -> BTreeSet<Ipv4Addr> {
        self.held.values().flatten().copied().collect()
    }

    /// Asks for the deletion of the conntrack entries that backends no longer in the table
    /// would strand, [`mesh_netlink::conntrack::STRANDED_AFTER`] from now (see "Lost
    /// backends" in the module docs).
    fn forget_flows_to(&self, lost: Vec<Ipv4Addr>, now: BTreeSet<Ipv4Addr>) {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = now;
        if lost.is_empty() {
            return;
        }
        match self.ns.try_clone() {
            Ok(ns) => conntrack::forget_backends_later(ns, lost, self.holding.clone()),
            Err(e) => tracing::warn!(
                ns = self.ns.name(),
                error = %e,
                "nft load balancer: cannot forget flows toward removed backends"
            ),
        }
    }

    /// Plans and runs the change: the new `lb_N` chains first, in a transaction of their
    /// own, then the elements (see "Changes" in the module docs). `file`: through `nft -f`.
    fn try_apply(
        &mut self,
        changes: &BTreeMap<Ipv4Addr, Option<&[Ipv4Addr]>>,
        file: bool,
    ) -> Result<(), LbError> {
        let (mut tx, next) = plan(&self.held, &self.lingering, &self.chains, changes)?;
        if tx.is_empty() {
            return Ok(());
        }
        let chains = std::mem::take(&mut tx.chains);
        if !chains.is_empty() {
            let create = Tx {
                chains: chains.clone(),
                ..Tx::default()
            };
            self.run(&create, file)?;
            self.chains.extend(chains);
        }
        if !tx.is_empty() {
            self.run(&tx, file)?;
        }
        self.commit(tx, next);
        Ok(())
    }

    fn run(&mut self, tx: &Tx, file: bool) -> Result<(), LbError> {
        if file {
            self.run_file(&tx.script("\n"))
        } else {
            self.run_tx(tx)
        }
    }

    fn commit(&mut self, tx: Tx, next: Vec<(Ipv4Addr, Option<Vec<Ipv4Addr>>)>) {
        self.chains.extend(tx.chains);
        self.lingering = tx.lingering;
        for (vip, slots) in next {
            match slots {
                Some(s) => self.held.insert(vip, s),
                None => self.held.remove(&vip),
            };
        }
    }

    /// Runs a transaction: through the session if small, else `nft -f -`.
    fn run_tx(&mut self, tx: &Tx) -> Result<(), LbError> {
        let line = tx.script("; ");
        if line.len() > SESSION_MAX_SCRIPT || !self.use_session {
            return self.run_file(&tx.script("\n"));
        }
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.sent() >= SESSION_MAX_COMMANDS)
        {
            self.session = None;
        }
        if self.session.is_none() {
            match Session::spawn(&self.ns) {
                Ok(s) => self.session = Some(s),
                Err(e) => {
                    tracing::warn!(ns = self.ns.name(), error = %e, "nft load balancer: no nft -i session; using nft -f");
                    self.use_session = false;
                    return self.run_file(&tx.script("\n"));
                }
            }
        }
        let session = self.session.as_mut().expect("session just set");
        match session.exec(&line) {
            Ok(()) => Ok(()),
            Err(SessionError::Refused(message)) => Err(self.error(message)),
            Err(SessionError::Broken(message)) => {
                if session.answered() == 0 {
                    tracing::warn!(ns = self.ns.name(), error = %message, "nft load balancer: nft -i does not work here; using nft -f");
                    self.use_session = false;
                }
                self.session = None;
                self.stale = true;
                Err(self.error(format!("nft -i session: {message}")))
            }
        }
    }

    fn run_file(&self, script: &str) -> Result<(), LbError> {
        nft::apply_in(&self.ns, script).map_err(|e| self.error(condense(&e.to_string())))
    }

    fn error(&self, message: String) -> LbError {
        LbError::Nft {
            ns: self.ns.name().to_string(),
            message,
        }
    }

    /// Re-reads the table and makes `held` match it, creating or repairing the table.
    fn reload(&mut self) -> Result<(), LbError> {
        match self.read_kernel()? {
            None => {
                self.run_file(&base_script())?;
                self.held.clear();
                self.chains.clear();
                self.lingering.clear();
                tracing::debug!(ns = self.ns.name(), "nft load balancer: table created");
            }
            Some(obs) if obs.problems.is_empty() => {
                tracing::debug!(
                    ns = self.ns.name(),
                    services = obs.services.len(),
                    "nft load balancer: table adopted"
                );
                self.held = obs.services;
                self.chains = obs.chains;
                self.lingering = obs.lingering;
            }
            Some(obs) => {
                tracing::warn!(
                    ns = self.ns.name(),
                    problems = ?&obs.problems[..obs.problems.len().min(10)],
                    count = obs.problems.len(),
                    services = obs.services.len(),
                    "nft load balancer: table not as expected; rewriting it in one transaction"
                );
                let (script, chains) = rewrite_script(&obs.services);
                self.run_file(&script)?;
                self.held = obs.services;
                self.chains = chains;
                self.lingering.clear();
            }
        }
        self.stale = false;
        Ok(())
    }

    /// The table as the kernel has it, or `None` if there is no table.
    fn read_kernel(&self) -> Result<Option<Observed>, LbError> {
        let listing = nft::read_table_in(&self.ns, "ip", TABLE)
            .map_err(|e| self.error(condense(&e.to_string())))?;
        Ok(listing.as_ref().map(parse_table))
    }
}

// ---------------------------------------------------------------------------------------
// Script generation

fn chain_name(n: usize) -> String {
    format!("lb_{n}")
}

fn verdict(n: usize) -> String {
    if n == 0 {
        "accept".to_string()
    } else {
        format!("goto {}", chain_name(n))
    }
}

/// The table's fixed part, as commands (for a table that does not exist).
fn base_commands() -> Vec<String> {
    vec![
        format!("add table ip {TABLE}"),
        format!("add map ip {TABLE} vips {{ type ipv4_addr : verdict; }}"),
        format!(
            "add map ip {TABLE} backends {{ typeof ip daddr . numgen random mod 1 : ip daddr; }}"
        ),
        format!(
            "add chain ip {TABLE} output {{ type nat hook output priority -100; policy accept; }}"
        ),
        format!("add rule ip {TABLE} output meta l4proto {{ tcp, udp }} ip daddr vmap @vips"),
        format!(
            "add chain ip {TABLE} postrouting {{ type nat hook postrouting priority 100; policy accept; }}"
        ),
        format!(
            "add rule ip {TABLE} postrouting ct status dnat fib saddr . oif type != local masquerade"
        ),
    ]
}

fn base_script() -> String {
    let mut s = base_commands().join("\n");
    s.push('\n');
    s
}

/// One transaction that replaces whatever table there is with `services`, and the `lb_N`
/// chains it creates.
fn rewrite_script(services: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> (String, BTreeSet<usize>) {
    let mut tx = Tx::default();
    for (vip, backends) in services {
        if !backends.is_empty() {
            tx.chains.insert(backends.len());
        }
        tx.add_vips.push((*vip, backends.len()));
        for (slot, b) in backends.iter().enumerate() {
            tx.add_backends.push((*vip, slot, *b));
        }
    }
    let mut commands = vec![
        format!("add table ip {TABLE}"),
        format!("delete table ip {TABLE}"),
    ];
    commands.extend(base_commands());
    commands.extend(tx.commands());
    let mut script = commands.join("\n");
    script.push('\n');
    (script, tx.chains)
}

/// The commands of one transaction. Applied atomically, so their order only has to be valid
/// for nft: chains before the elements that jump to them, deletions before the additions of
/// the same keys.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tx {
    /// `lb_N` chains to create (with their rule).
    chains: BTreeSet<usize>,
    del_backends: Vec<(Ipv4Addr, usize)>,
    del_vips: Vec<Ipv4Addr>,
    add_backends: Vec<(Ipv4Addr, usize, Ipv4Addr)>,
    /// VIP and its backend count (the verdict).
    add_vips: Vec<(Ipv4Addr, usize)>,
    /// The slots left lingering once this transaction is committed (not a command).
    lingering: BTreeSet<(Ipv4Addr, usize)>,
}

impl Tx {
    fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.del_backends.is_empty()
            && self.del_vips.is_empty()
            && self.add_backends.is_empty()
            && self.add_vips.is_empty()
    }

    fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in &self.chains {
            let c = chain_name(*n);
            out.push(format!("add chain ip {TABLE} {c}"));
            // Idempotent even if the chain exists with its rule.
            out.push(format!("flush chain ip {TABLE} {c}"));
            out.push(format!(
                "add rule ip {TABLE} {c} dnat to ip daddr . numgen random mod {n} map @backends"
            ));
        }
        elements(
            &mut out,
            "delete element",
            "backends",
            self.del_backends.iter().map(|(v, s)| format!("{v} . {s}")),
        );
        elements(
            &mut out,
            "delete element",
            "vips",
            self.del_vips.iter().map(|v| v.to_string()),
        );
        elements(
            &mut out,
            "add element",
            "backends",
            self.add_backends
                .iter()
                .map(|(v, s, b)| format!("{v} . {s} : {b}")),
        );
        elements(
            &mut out,
            "add element",
            "vips",
            self.add_vips
                .iter()
                .map(|(v, n)| format!("{v} : {}", verdict(*n))),
        );
        out
    }

    /// The commands joined by `sep` ("; " for one `nft -i` line, "\n" for `nft -f`).
    fn script(&self, sep: &str) -> String {
        let mut s = self.commands().join(sep);
        if sep == "\n" {
            s.push('\n');
        }
        s
    }
}

fn elements(out: &mut Vec<String>, verb: &str, map: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    for chunk in items.chunks(ELEMENTS_PER_COMMAND) {
        out.push(format!(
            "{verb} ip {TABLE} {map} {{ {} }}",
            chunk.join(", ")
        ));
    }
}

/// The backends without duplicates, first occurrence first.
fn dedup(backends: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut seen = HashSet::with_capacity(backends.len());
    backends
        .iter()
        .copied()
        .filter(|b| seen.insert(*b))
        .collect()
}

/// New slots for `want` (deduplicated) given the `old` slots: a backend that stays keeps
/// its slot if that is below the new count; new ones (and those moved down from above the
/// new count) fill the holes in `want`'s order.
fn assign(old: &[Ipv4Addr], want: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let wanted: HashSet<Ipv4Addr> = want.iter().copied().collect();
    let mut slots: Vec<Option<Ipv4Addr>> = vec![None; want.len()];
    let mut placed = HashSet::with_capacity(want.len());
    for (slot, b) in old.iter().enumerate().take(want.len()) {
        if wanted.contains(b) && placed.insert(*b) {
            slots[slot] = Some(*b);
        }
    }
    let mut rest = want.iter().filter(|b| !placed.contains(*b));
    slots
        .into_iter()
        .map(|s| {
            s.or_else(|| rest.next().copied())
                .expect("as many holes as unplaced backends")
        })
        .collect()
}

type Next = Vec<(Ipv4Addr, Option<Vec<Ipv4Addr>>)>;

/// The transaction from `held` to `held` with `changes` applied (`None`: remove the VIP),
/// and the VIPs' new slots. Slots above a lowered count (and those of a removed VIP) are
/// not deleted but left lingering; the ones lingering from before are deleted, or rewritten
/// if a count grew back over them (see "Changes" in the module docs).
fn plan(
    held: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    lingering: &BTreeSet<(Ipv4Addr, usize)>,
    chains: &BTreeSet<usize>,
    changes: &BTreeMap<Ipv4Addr, Option<&[Ipv4Addr]>>,
) -> Result<(Tx, Next), LbError> {
    let mut tx = Tx::default();
    let mut next = Vec::new();
    // Slots this transaction writes (delete + add where the kernel has the key).
    let mut written: BTreeSet<(Ipv4Addr, usize)> = BTreeSet::new();
    for (vip, want) in changes {
        let vip = *vip;
        let old = held.get(&vip);
        let Some(want) = want else {
            if let Some(old) = old {
                tx.del_vips.push(vip);
                tx.lingering.extend((0..old.len()).map(|s| (vip, s)));
                next.push((vip, None));
            }
            continue;
        };
        if old.is_some_and(|o| o.as_slice() == *want) {
            continue;
        }
        let want = dedup(want);
        if want.len() > MAX_BACKENDS {
            return Err(LbError::TooManyBackends {
                service: vip.to_string(),
                count: want.len(),
            });
        }
        let old_slots: &[Ipv4Addr] = old.map(Vec::as_slice).unwrap_or(&[]);
        if old.is_some() && old_slots.len() == want.len() {
            let have: HashSet<&Ipv4Addr> = old_slots.iter().collect();
            if want.iter().all(|b| have.contains(b)) {
                continue; // same set, other order
            }
        }
        let slots = assign(old_slots, &want);
        for (slot, b) in slots.iter().enumerate() {
            match old_slots.get(slot) {
                Some(o) if o == b => continue,
                Some(_) => tx.del_backends.push((vip, slot)),
                None if lingering.contains(&(vip, slot)) => tx.del_backends.push((vip, slot)),
                None => {}
            }
            tx.add_backends.push((vip, slot, *b));
            written.insert((vip, slot));
        }
        tx.lingering
            .extend((slots.len()..old_slots.len()).map(|s| (vip, s)));
        match old {
            None => tx.add_vips.push((vip, slots.len())),
            Some(o) if o.len() != slots.len() => {
                tx.del_vips.push(vip);
                tx.add_vips.push((vip, slots.len()));
            }
            Some(_) => {}
        }
        if !slots.is_empty() && !chains.contains(&slots.len()) {
            tx.chains.insert(slots.len());
        }
        next.push((vip, Some(slots)));
    }
    for key in lingering {
        if !written.contains(key) && !tx.lingering.contains(key) {
            tx.del_backends.push(*key);
        }
    }
    Ok((tx, next))
}

// ---------------------------------------------------------------------------------------
// Reading the table back (`nft -j list table ip mesh_lb`)

/// What the kernel's table holds.
#[derive(Debug, Default, PartialEq, Eq)]
struct Observed {
    /// Every VIP with a valid verdict and all its slots.
    services: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    /// The `lb_N` chains with exactly their rule.
    chains: BTreeSet<usize>,
    /// Backend slots at or above their VIP's count, or of no VIP: lingering after a count
    /// was lowered (deleted by the next transaction).
    lingering: BTreeSet<(Ipv4Addr, usize)>,
    /// What differs from the expected shape (empty: adopt as is).
    problems: Vec<String>,
}

fn expected_output_rule() -> Value {
    json!([
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
        {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@vips"}}
    ])
}

fn expected_postrouting_rule() -> Value {
    json!([
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["saddr", "oif"]}}, "right": "local"}},
        {"masquerade": null}
    ])
}

fn expected_lb_rule(n: usize) -> Value {
    json!([
        {"dnat": {"addr": {"map": {
            "key": {"concat": [
                {"payload": {"protocol": "ip", "field": "daddr"}},
                {"numgen": {"mode": "random", "mod": n, "offset": 0}}
            ]},
            "data": "@backends"
        }}}}
    ])
}

/// Reads the listing of the table: what is unexpected in it is a problem to repair.
fn parse_table(listing: &Listing) -> Observed {
    let mut problems = Vec::new();
    let mut vips_elems: &[Value] = &[];
    let mut backend_elems: &[Value] = &[];
    let mut have_vips = false;
    let mut have_backends = false;
    let mut base_chains = BTreeSet::new();
    let mut lb_chains = BTreeSet::new();
    let mut rules: BTreeMap<&str, Vec<&Vec<Value>>> = BTreeMap::new();

    for set in &listing.sets {
        let plain = set.flags.is_none() && set.timeout.is_none();
        match set.name.as_str() {
            "vips" => {
                if !(plain && set.key_type == "ipv4_addr" && set.map == Some(json!("verdict"))) {
                    problems.push(format!("map vips: unexpected definition {set:?}"));
                }
                have_vips = true;
                vips_elems = &set.elem;
            }
            "backends" => {
                let fields_ok = plain
                    && set.key_type == json!(["ipv4_addr", "integer"])
                    && set.map == Some(json!("ipv4_addr"));
                if !fields_ok {
                    problems.push(format!("map backends: unexpected definition {set:?}"));
                }
                have_backends = true;
                backend_elems = &set.elem;
            }
            name => problems.push(format!("unexpected set or map {name}")),
        }
    }
    for chain in &listing.chains {
        let hooked = |hook: &str, prio: i64| {
            chain.kind.as_deref() == Some("nat")
                && chain.hook.as_deref() == Some(hook)
                && chain.prio == Some(prio)
                && chain.policy.as_deref() == Some("accept")
        };
        match chain.name.as_str() {
            "output" if hooked("output", -100) => {
                base_chains.insert("output");
            }
            "postrouting" if hooked("postrouting", 100) => {
                base_chains.insert("postrouting");
            }
            name => match lb_chain_number(name) {
                Some(n) if !chain.is_base() => {
                    lb_chains.insert(n);
                }
                _ => problems.push(format!("unexpected chain {name}")),
            },
        }
    }
    for rule in &listing.rules {
        rules.entry(&rule.chain).or_default().push(&rule.expr);
    }
    for (kind, _) in &listing.other {
        problems.push(format!("unexpected {kind}"));
    }

    let rules_are = |chain: &str, want: Value| -> bool {
        matches!(rules.get(chain).map(Vec::as_slice), Some([one]) if Some(*one) == want.as_array())
    };
    if !have_vips {
        problems.push("map vips missing".to_string());
    }
    if !have_backends {
        problems.push("map backends missing".to_string());
    }
    if !base_chains.contains("output") || !rules_are("output", expected_output_rule()) {
        problems.push("chain output missing or not as expected".to_string());
    }
    if !base_chains.contains("postrouting")
        || !rules_are("postrouting", expected_postrouting_rule())
    {
        problems.push("chain postrouting missing or not as expected".to_string());
    }
    let mut chains = BTreeSet::new();
    for n in lb_chains {
        if rules_are(&chain_name(n), expected_lb_rule(n)) {
            chains.insert(n);
        } else {
            problems.push(format!("chain {} not as expected", chain_name(n)));
        }
    }
    for chain in rules.keys() {
        let known =
            *chain == "output" || *chain == "postrouting" || lb_chain_number(chain).is_some();
        if !known {
            problems.push(format!("rules in unexpected chain {chain}"));
        }
    }

    let mut slots: BTreeMap<(Ipv4Addr, u64), Ipv4Addr> = BTreeMap::new();
    for e in backend_elems {
        let parsed = (|| {
            let (key, backend) = json::pair(e)?;
            let [vip, slot] = json::concat(key)? else {
                return None;
            };
            Some(((json::ipv4(vip)?, slot.as_u64()?), json::ipv4(backend)?))
        })();
        match parsed {
            Some((key, b)) => {
                slots.insert(key, b);
            }
            None => problems.push(format!("backends: unexpected element {e}")),
        }
    }

    let mut services = BTreeMap::new();
    for e in vips_elems {
        let parsed = (|| {
            let (vip, v) = json::pair(e)?;
            let vip = json::ipv4(vip)?;
            match json::verdict(v)? {
                Verdict::Accept => Some((vip, 0)),
                Verdict::Goto(target) => {
                    let n = lb_chain_number(target)?;
                    chains.contains(&n).then_some((vip, n))
                }
                _ => None,
            }
        })();
        let Some((vip, n)) = parsed else {
            problems.push(format!("vips: unexpected element {e}"));
            continue;
        };
        let backends: Option<Vec<Ipv4Addr>> =
            (0..n as u64).map(|s| slots.remove(&(vip, s))).collect();
        match backends {
            Some(b) => {
                services.insert(vip, b);
            }
            None => problems.push(format!("vips: {vip} lacks some of its {n} backend slots")),
        }
    }
    let mut lingering = BTreeSet::new();
    for (vip, slot) in slots.keys() {
        match usize::try_from(*slot) {
            Ok(slot) if slot < MAX_BACKENDS => {
                lingering.insert((*vip, slot));
            }
            _ => problems.push(format!("backends: stray element {vip} . {slot}")),
        }
    }
    Observed {
        services,
        chains,
        lingering,
        problems,
    }
}

/// `lb_N` -> N.
fn lb_chain_number(name: &str) -> Option<usize> {
    name.strip_prefix("lb_")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn ips(v: &[&str]) -> Vec<Ipv4Addr> {
        v.iter().map(|s| ip(s)).collect()
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);

    fn plan1(
        held: &[(Ipv4Addr, Vec<Ipv4Addr>)],
        chains: &[usize],
        vip: Ipv4Addr,
        want: Option<&[Ipv4Addr]>,
    ) -> (Tx, Next) {
        let held: BTreeMap<_, _> = held.iter().cloned().collect();
        let chains: BTreeSet<usize> = chains.iter().copied().collect();
        plan(
            &held,
            &BTreeSet::new(),
            &chains,
            &BTreeMap::from([(vip, want)]),
        )
        .unwrap()
    }

    #[test]
    fn new_service_is_chain_slots_and_verdict() {
        let b = ips(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let (tx, next) = plan1(&[], &[], VIP, Some(&b));
        assert_eq!(
            tx.script("\n"),
            "add chain ip mesh_lb lb_3\n\
             flush chain ip mesh_lb lb_3\n\
             add rule ip mesh_lb lb_3 dnat to ip daddr . numgen random mod 3 map @backends\n\
             add element ip mesh_lb backends { 10.255.0.1 . 0 : 10.0.0.2, 10.255.0.1 . 1 : 10.0.0.3, 10.255.0.1 . 2 : 10.0.0.4 }\n\
             add element ip mesh_lb vips { 10.255.0.1 : goto lb_3 }\n"
        );
        assert_eq!(next, vec![(VIP, Some(b))]);
        // The chain exists already: elements only.
        let (tx, _) = plan1(
            &[],
            &[3],
            VIP,
            Some(&ips(&["10.0.0.2", "10.0.0.3", "10.0.0.4"])),
        );
        assert!(tx.chains.is_empty());
        assert_eq!(tx.commands().len(), 2);
    }

    #[test]
    fn replacing_one_backend_touches_one_slot() {
        let old = ips(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let want = ips(&["10.0.0.4", "10.0.0.9", "10.0.0.2"]);
        let (tx, next) = plan1(&[(VIP, old)], &[3], VIP, Some(&want));
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb backends { 10.255.0.1 . 1 }; \
             add element ip mesh_lb backends { 10.255.0.1 . 1 : 10.0.0.9 }"
        );
        assert_eq!(
            next,
            vec![(VIP, Some(ips(&["10.0.0.2", "10.0.0.9", "10.0.0.4"])))]
        );
    }

    #[test]
    fn unchanged_sets_are_no_ops() {
        let old = ips(&["10.0.0.2", "10.0.0.3"]);
        for want in [
            ips(&["10.0.0.2", "10.0.0.3"]),
            ips(&["10.0.0.3", "10.0.0.2"]),
            ips(&["10.0.0.3", "10.0.0.2", "10.0.0.3"]),
        ] {
            let (tx, next) = plan1(&[(VIP, old.clone())], &[2], VIP, Some(&want));
            assert!(tx.is_empty(), "{want:?}: {tx:?}");
            assert!(next.is_empty());
        }
        // Removing an absent VIP: nothing.
        let (tx, next) = plan1(&[], &[], VIP, None);
        assert!(tx.is_empty() && next.is_empty());
    }

    #[test]
    fn shrinking_moves_kept_backends_down_and_changes_the_verdict() {
        let old = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        // Drop .2 and .3: .4 moves down into slot 1.
        let (tx, next) = plan1(
            &[(VIP, old)],
            &[4],
            VIP,
            Some(&ips(&["10.0.0.4", "10.0.0.1"])),
        );
        assert_eq!(
            tx.script("\n"),
            "add chain ip mesh_lb lb_2\n\
             flush chain ip mesh_lb lb_2\n\
             add rule ip mesh_lb lb_2 dnat to ip daddr . numgen random mod 2 map @backends\n\
             delete element ip mesh_lb backends { 10.255.0.1 . 1 }\n\
             delete element ip mesh_lb vips { 10.255.0.1 }\n\
             add element ip mesh_lb backends { 10.255.0.1 . 1 : 10.0.0.4 }\n\
             add element ip mesh_lb vips { 10.255.0.1 : goto lb_2 }\n"
        );
        assert_eq!(next, vec![(VIP, Some(ips(&["10.0.0.1", "10.0.0.4"])))]);
        // Slots 2 and 3 linger: a packet of the generation before may still index them.
        assert_eq!(tx.lingering, BTreeSet::from([(VIP, 2), (VIP, 3)]));
    }

    #[test]
    fn lingering_slots_go_with_the_next_transaction_or_are_rewritten() {
        let other = ip("10.255.0.2");
        let held = BTreeMap::from([(VIP, ips(&["10.0.0.1"])), (other, ips(&["10.0.0.7"]))]);
        let lingering = BTreeSet::from([(VIP, 1), (VIP, 2)]);
        let chains = BTreeSet::from([1, 2]);
        // Any next change (here to another VIP) deletes them.
        let want = ips(&["10.0.0.8"]);
        let (tx, _) = plan(
            &held,
            &lingering,
            &chains,
            &BTreeMap::from([(other, Some(want.as_slice()))]),
        )
        .unwrap();
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb backends { 10.255.0.2 . 0, 10.255.0.1 . 1, 10.255.0.1 . 2 }; \
             add element ip mesh_lb backends { 10.255.0.2 . 0 : 10.0.0.8 }"
        );
        assert!(tx.lingering.is_empty());
        // Growing back over them rewrites slot 1 and deletes slot 2.
        let want = ips(&["10.0.0.1", "10.0.0.5"]);
        let (tx, _) = plan(
            &held,
            &lingering,
            &chains,
            &BTreeMap::from([(VIP, Some(want.as_slice()))]),
        )
        .unwrap();
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb backends { 10.255.0.1 . 1, 10.255.0.1 . 2 }; \
             delete element ip mesh_lb vips { 10.255.0.1 }; \
             add element ip mesh_lb backends { 10.255.0.1 . 1 : 10.0.0.5 }; \
             add element ip mesh_lb vips { 10.255.0.1 : goto lb_2 }"
        );
        assert!(tx.lingering.is_empty());
    }

    #[test]
    fn growing_adds_slots_at_the_end() {
        let old = ips(&["10.0.0.1"]);
        let (tx, _) = plan1(
            &[(VIP, old)],
            &[1, 2],
            VIP,
            Some(&ips(&["10.0.0.2", "10.0.0.1"])),
        );
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb vips { 10.255.0.1 }; \
             add element ip mesh_lb backends { 10.255.0.1 . 1 : 10.0.0.2 }; \
             add element ip mesh_lb vips { 10.255.0.1 : goto lb_2 }"
        );
    }

    #[test]
    fn zero_backends_accept_and_removal_leave_the_slots_lingering() {
        let old = ips(&["10.0.0.1", "10.0.0.2"]);
        let (tx, next) = plan1(&[(VIP, old.clone())], &[2], VIP, Some(&[]));
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb vips { 10.255.0.1 }; \
             add element ip mesh_lb vips { 10.255.0.1 : accept }"
        );
        assert_eq!(next, vec![(VIP, Some(vec![]))]);
        assert_eq!(tx.lingering, BTreeSet::from([(VIP, 0), (VIP, 1)]));
        let (tx, _) = plan1(&[], &[], VIP, Some(&[]));
        assert_eq!(
            tx.script("; "),
            "add element ip mesh_lb vips { 10.255.0.1 : accept }"
        );

        let (tx, next) = plan1(&[(VIP, old)], &[2], VIP, None);
        assert_eq!(
            tx.script("; "),
            "delete element ip mesh_lb vips { 10.255.0.1 }"
        );
        assert_eq!(next, vec![(VIP, None)]);
        assert_eq!(tx.lingering, BTreeSet::from([(VIP, 0), (VIP, 1)]));
    }

    #[test]
    fn too_many_backends_is_refused() {
        let many: Vec<Ipv4Addr> = (0..=MAX_BACKENDS as u32).map(Ipv4Addr::from).collect();
        let held = BTreeMap::new();
        let e = plan(
            &held,
            &BTreeSet::new(),
            &BTreeSet::new(),
            &BTreeMap::from([(VIP, Some(many.as_slice()))]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "service 10.255.0.1: too many backends (65536, at most 65535)"
        );
    }

    #[test]
    fn big_element_lists_are_split() {
        let many: Vec<Ipv4Addr> = (0..600u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let (tx, _) = plan1(&[], &[], VIP, Some(&many));
        let cmds = tx.commands();
        // 3 for the chain, 3 backend commands (256 + 256 + 88), 1 vips.
        assert_eq!(cmds.len(), 7, "{:?}", cmds.len());
        assert!(
            cmds[5].ends_with("10.255.0.1 . 599 : 10.0.2.87 }"),
            "{}",
            cmds[5]
        );
    }

    #[test]
    fn base_and_rewrite_scripts() {
        let base = base_script();
        assert!(base.starts_with("add table ip mesh_lb\n"));
        assert!(base.contains(
            "add rule ip mesh_lb output meta l4proto { tcp, udp } ip daddr vmap @vips\n"
        ));
        let services = BTreeMap::from([
            (VIP, ips(&["10.0.0.1", "10.0.0.2"])),
            (ip("10.255.0.2"), vec![]),
        ]);
        let (script, chains) = rewrite_script(&services);
        assert_eq!(chains, BTreeSet::from([2]));
        assert!(script.starts_with("add table ip mesh_lb\ndelete table ip mesh_lb\nadd table"));
        assert!(script.ends_with(
            "add element ip mesh_lb vips { 10.255.0.1 : goto lb_2, 10.255.0.2 : accept }\n"
        ));
    }

    /// `nft -j list table ip mesh_lb` of nft 1.0.6 for a table with two services.
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "mesh_lb", "handle": 1}}, {"map": {"family": "ip", "name": "vips", "table": "mesh_lb", "type": "ipv4_addr", "handle": 3, "map": "verdict", "elem": [["10.255.0.1", {"goto": {"target": "lb_2"}}], ["10.255.0.2", {"accept": null}]]}}, {"map": {"family": "ip", "name": "backends", "table": "mesh_lb", "type": ["ipv4_addr", "integer"], "handle": 4, "map": "ipv4_addr", "elem": [[{"concat": ["10.255.0.1", 0]}, "10.0.0.2"], [{"concat": ["10.255.0.1", 1]}, "10.0.0.9"]]}}, {"chain": {"family": "ip", "table": "mesh_lb", "name": "output", "handle": 1, "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}, {"chain": {"family": "ip", "table": "mesh_lb", "name": "postrouting", "handle": 2, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"chain": {"family": "ip", "table": "mesh_lb", "name": "lb_2", "handle": 5}}, {"rule": {"family": "ip", "table": "mesh_lb", "chain": "output", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@vips"}}]}}, {"rule": {"family": "ip", "table": "mesh_lb", "chain": "postrouting", "handle": 7, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["saddr", "oif"]}}, "right": "local"}}, {"masquerade": null}]}}, {"rule": {"family": "ip", "table": "mesh_lb", "chain": "lb_2", "handle": 8, "expr": [{"dnat": {"addr": {"map": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"numgen": {"mode": "random", "mod": 2, "offset": 0}}]}, "data": "@backends"}}}}]}}]}"#;

    #[test]
    fn listing_is_adopted() {
        let obs = parse_table(&listing(LISTING));
        assert_eq!(obs.problems, Vec::<String>::new());
        assert_eq!(obs.chains, BTreeSet::from([2]));
        assert_eq!(
            obs.services,
            BTreeMap::from([
                (VIP, ips(&["10.0.0.2", "10.0.0.9"])),
                (ip("10.255.0.2"), vec![]),
            ])
        );
        assert!(obs.lingering.is_empty());
        // A slot above the count (left by a lowered count) lingers: no problem, no rewrite.
        let extra = LISTING.replace(
            r#"[{"concat": ["10.255.0.1", 1]}, "10.0.0.9"]"#,
            r#"[{"concat": ["10.255.0.1", 1]}, "10.0.0.9"], [{"concat": ["10.255.0.1", 2]}, "10.0.0.3"], [{"concat": ["10.255.0.3", 0]}, "10.0.0.4"]"#,
        );
        let obs = parse_table(&listing(&extra));
        assert_eq!(obs.problems, Vec::<String>::new());
        assert_eq!(obs.services[&VIP], ips(&["10.0.0.2", "10.0.0.9"]));
        assert_eq!(
            obs.lingering,
            BTreeSet::from([(VIP, 2), (ip("10.255.0.3"), 0)])
        );
    }

    #[test]
    fn listing_problems_are_found() {
        // A missing slot: the VIP is dropped, the table is to be rewritten.
        let missing = LISTING.replace(r#"[{"concat": ["10.255.0.1", 1]}, "10.0.0.9"]"#, "");
        let missing = missing.replace(r#""10.0.0.2"], ]"#, r#""10.0.0.2"]]"#);
        let obs = parse_table(&listing(&missing));
        assert_eq!(
            obs.services.keys().collect::<Vec<_>>(),
            vec![&ip("10.255.0.2")]
        );
        assert_eq!(obs.problems.len(), 1, "{:?}", obs.problems);

        // A foreign rule in output.
        let foreign = LISTING.replace(
            r#"{"rule": {"family": "ip", "table": "mesh_lb", "chain": "lb_2""#,
            r#"{"rule": {"family": "ip", "table": "mesh_lb", "chain": "output", "handle": 9, "expr": [{"accept": null}]}}, {"rule": {"family": "ip", "table": "mesh_lb", "chain": "lb_2""#,
        );
        let obs = parse_table(&listing(&foreign));
        assert_eq!(obs.services.len(), 2);
        assert!(
            obs.problems[0].contains("chain output"),
            "{:?}",
            obs.problems
        );

        // A wrong modulus in lb_2: its VIP cannot be trusted.
        let wrong = LISTING.replace(r#""mod": 2"#, r#""mod": 3"#);
        let obs = parse_table(&listing(&wrong));
        assert_eq!(
            obs.services.keys().collect::<Vec<_>>(),
            vec![&ip("10.255.0.2")]
        );
        assert!(!obs.problems.is_empty());

        // An empty table.
        let obs = parse_table(&listing(
            r#"{"nftables": [{"table": {"family": "ip", "name": "mesh_lb"}}]}"#,
        ));
        assert!(obs.services.is_empty());
        assert_eq!(obs.problems.len(), 4, "{:?}", obs.problems);

        // Objects of other kinds, and sets we did not make.
        let more = LISTING.replace(
            r#"{"chain": {"family": "ip", "table": "mesh_lb", "name": "lb_2""#,
            r#"{"counter": {"name": "c"}}, {"set": {"name": "s", "type": "ipv4_addr"}}, {"chain": {"family": "ip", "table": "mesh_lb", "name": "lb_2""#,
        );
        let obs = parse_table(&listing(&more));
        assert_eq!(obs.services.len(), 2);
        assert_eq!(
            obs.problems,
            vec!["unexpected set or map s", "unexpected counter"]
        );
    }

    fn listing(text: &str) -> Listing {
        json::parse(text).unwrap()
    }

    #[test]
    fn nft_lb_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<NftLb>();
    }
}
