//! The routing mesh of one host (Docker's `ingress_sbox`, libnetwork `service_linux.go`),
//! with nftables instead of iptables + IPVS: a port published by a service answers on every
//! address of every host, and each new connection goes to one of the service's tasks
//! anywhere in the cluster, over the `ingress` overlay.
//!
//! [`Ingress`] programs, on one host, everything but the sandbox's leg on the overlay (the
//! caller attaches the sandbox namespace to the `ingress` network with its own ingress
//! address, interface [`IngressConfig::ingress_if`]):
//!
//! - a veth pair between the host namespace ([`IngressConfig::host_if`], `mesh_ingr0`,
//!   169.254.77.1/30) and the sandbox ([`IngressConfig::sandbox_if`], `mi0`, 169.254.77.2/30),
//!   the sandbox's default route via the host end (it replaces any other: replies to clients
//!   must go back through the host), IPv4 forwarding in both namespaces, `rp_filter` loose
//!   on both ends (strict would pass today's traffic too; loose keeps a future return path
//!   for client addresses from being dropped), `route_localnet` on the host end (below);
//! - nftables table `ip mesh_ingress` in both namespaces (see the `script` module for the
//!   rulesets).
//!
//! IPv4 only, TCP and UDP.
//!
//! # Packet path (ingress-published port, TCP 30080 -> target 80)
//!
//! ```text
//!  client 192.168.77.100:C ---> any local address of the host, e.g. 192.168.77.10:30080
//!  +-- host namespace ---------------------------------------------------------------+
//!  | nat prerouting (nat output for the host's own connections):                     |
//!  |   fib daddr type local, tcp . 30080 in @published -> dnat to 169.254.77.2       |
//!  |   (port unchanged)                                                              |
//!  | filter forward: to/from mesh_ingr0 accepted                                     |
//!  |   mesh_ingr0 169.254.77.1/30                                                    |
//!  +------|--------------------------------------------------------------------------+
//!         | veth
//!  +------|-- ingress sandbox namespace ---------------------------------------------+
//!  |   mi0 169.254.77.2/30, default route via 169.254.77.1                           |
//!  | nat prerouting: iifname mi0, tcp . 30080 vmap @ports -> goto p_tcp_30080        |
//!  |   p_tcp_30080: dnat to numgen random mod 3 map { 0:.5, 1:.6, 2:.7 } : 80        |
//!  |               (no backend: reject with tcp reset / icmp port-unreachable)       |
//!  |   (no SNAT: the client's address is kept, but from the gateway bridge subnet)   |
//!  |   eth0 10.0.0.2/24 (the sandbox's address on the ingress overlay)               |
//!  +------|--------------------------------------------------------------------------+
//!         | ingress overlay (br0 in ov-4096, VXLAN to the other hosts)
//!         v
//!  task 10.0.0.6:80 sees 192.168.77.100:C -> 10.0.0.6:80, on this host or another one
//! ```
//!
//! Replies retrace the path through the two conntrack entries: the task's return path
//! routes its answer to the client via 10.0.0.2 (the sandbox that sent the connection), the
//! sandbox un-NATs to `169.254.77.2:30080 -> client` and routes it to the host, the host
//! un-NATs to `192.168.77.10:30080 -> client`.
//!
//! **Host-mode ports** (`mode=host`) skip the sandbox: the host DNATs `proto . port` straight
//! to a local task's address and target port (map `host_ports`), without SNAT, so the task
//! sees the client's address and answers through its default route (the gateway bridge),
//! that is through this host's conntrack again:
//!
//! ```text
//!  client ---> host:8080  nat prerouting: tcp . 8080 : 172.18.0.5 . 80 ---> task 172.18.0.5:80
//! ```
//!
//! # Why the client's address is kept
//!
//! The sandbox DNATs without SNAT: the task sees the client's own address (moby #25526, one
//! of Swarm's most requested issues: Docker's routing mesh masquerades, so backends only
//! ever see the sandbox). A task answers the source address of the packets it gets, and its
//! default route (its gateway bridge, out of its own host) would take the reply past the
//! sandbox that holds the DNAT state. So each task publishing ports in ingress mode gets a
//! return path (the [`return_path`] module): connections arriving from the ingress overlay
//! are marked with the sandbox they came from (read from the source MAC, which carries the
//! sandbox's address), and what the task sends on them is routed back to that sandbox by
//! policy routing on the mark. The sandbox un-NATs the reply and hands it to the host as
//! before. Only one masquerade is left: clients from the host's gateway bridge subnet
//! ([`IngressConfig::masquerade_from`]) are local tasks, and a task balanced to itself would
//! drop a packet from its own address. `ct status dnat` limits it to connections the sandbox
//! balanced.
//!
//! # The host's own connections
//!
//! Connections from the host to one of its own addresses go through the nat *output* chain
//! (same rules). From a routable source address (e.g. `192.168.77.10` to itself) nothing more
//! is needed: the sandbox replies to that address via its default route. From a loopback
//! source (`127.0.0.1:30080`) the kernel refuses to route a `127/8` source out of a real
//! interface unless `route_localnet` is set on it, and the sandbox could not answer `127.0.0.1`
//! anyway: so `route_localnet=1` on `mesh_ingr0` and the host masquerades `127/8` leaving
//! through it (Docker does the same on `docker_gwbridge`). Host-mode ports are not reachable
//! through `127.0.0.1` (that would need the same on the gateway bridge).
//!
//! # Updates
//!
//! Every change is at most one `nft -f` transaction per step, built from the difference
//! between what the kernel holds and the desired state (nothing is rebuilt whole):
//!
//! 1. sandbox: a new port is its chain, its rule and one verdict-map element; new backends
//!    for a port are one rule *inserted in front of* the rule in force, and the rule behind
//!    that one (left by the change before) is deleted (why: see the `script` module;
//!    replacing the rule outright refused about one new connection per few hundred changes
//!    under load);
//! 2. host: elements of the `published` set and the `host_ports` map;
//! 3. sandbox: the elements and chains of ports that go.
//!
//! Adding goes sandbox first, removing host first. While a port is missing from the sandbox
//! but still DNATed by the host, its packets reach the sandbox's own stack, where nothing
//! listens: a refusal, the same answer as a closed port. Established connections keep their
//! conntrack entries and are not cut by a change: a connection to a removed backend lasts as
//! long as that backend answers. The handles of the rules in force are known from `nft -e -a`
//! (so a change needs no listing first).
//!
//! A failed transaction changes nothing (nft commits all or nothing), but a change of several
//! steps can stop halfway: the [`Ingress`] then reads both tables back and reconciles them to
//! the desired state at once, and, if that fails too, before the next change.
//!
//! **Restart.** [`Ingress::setup`] reads the tables back (`nft -j`), adopts what they hold
//! (see the `readback` module) and reconciles: tables, base chains and base rules are
//! (re)written in one transaction per namespace, port chains that are right are not touched.
//! Idempotent, gapless, nothing duplicated. The caller then applies its desired state, which
//! costs only the differences.
//!
//! # Conntrack
//!
//! No timeout is shortened: the kernel's defaults apply (TCP established 5 days, UDP 30 s, or
//! 120 s once a flow has seen replies). Docker's IPVS cut connections idle for 900 s (moby
//! #31208, #37822); here an idle connection lives as long as the endpoints keep it.
//!
//! The flip side: a flow keeps its backend for as long as its conntrack entry lives. So when
//! backends leave a port, the sandbox's entries they would strand (every UDP flow toward
//! them, TCP ones never answered) are deleted a second later
//! ([`mesh_netlink::conntrack::forget_backends_later`], as kube-proxy does; a backend that
//! comes back meanwhile keeps its flows): a UDP client that keeps sending from one port moves
//! to another backend at once instead of after a pause of the UDP timeout
//! (`udp_flow_leaves_a_removed_backend`). Established TCP connections are left alone: the
//! backend's death ends them.
//!
//! # Sync and async
//!
//! [`Ingress::setup`] and [`Ingress::teardown`] are `async` (netlink through
//! [`mesh_netlink::Handle`]: they need a tokio runtime with I/O and time enabled). The
//! per-change calls ([`Ingress::set_published`], [`Ingress::sync`], ...) are synchronous and
//! block for one `nft` run per step (10 to 20 ms each on a 2-core test machine: a thread,
//! `setns`, fork and exec of `nft`, and the kernel's commit): from async code, call them
//! through `tokio::task::spawn_blocking` (an [`Ingress`] is `Send`).
//!
//! **Architecture Invariant**: knows ports, addresses and namespaces; nothing of services,
//! tasks, gossip or Raft (the caller turns them into backends).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::str::FromStr;

use mesh_netlink::nft::json::Listing;
use mesh_netlink::{nft, Handle, Netns};
use tracing::{debug, info, warn};

mod error;
mod readback;
pub mod return_path;
mod script;

use readback::{HostState, PortChain, SandboxState};

pub use error::IngressError;
pub use script::TABLE;

/// A transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`, as nftables spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

/// Where the routing mesh plugs in on one host. The defaults are the ones described in the
/// module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressConfig {
    /// The veth end in the host namespace (`mesh_ingr0`).
    pub host_if: String,
    /// The veth end in the sandbox (`mi0`).
    pub sandbox_if: String,
    /// The host end's address (`169.254.77.1`), the sandbox's default gateway.
    pub host_addr: Ipv4Addr,
    /// The sandbox end's address (`169.254.77.2`): the host DNATs published ports to it.
    pub sandbox_addr: Ipv4Addr,
    /// Prefix length of the veth link (`30`).
    pub prefix: u8,
    /// The sandbox's interface on the ingress overlay (`eth0`), set up by the caller.
    pub ingress_if: String,
    /// Client addresses the sandbox masquerades (to its ingress address) rather than keep:
    /// the host's gateway bridge subnet, whose addresses are local tasks' own (a task
    /// balanced to itself would drop a packet from its own address as a martian). Others
    /// reach the task as they are (see "Why the client's address is kept").
    pub masquerade_from: Vec<(Ipv4Addr, u8)>,
}

impl Default for IngressConfig {
    fn default() -> IngressConfig {
        IngressConfig {
            host_if: "mesh_ingr0".to_string(),
            sandbox_if: "mi0".to_string(),
            host_addr: Ipv4Addr::new(169, 254, 77, 1),
            sandbox_addr: Ipv4Addr::new(169, 254, 77, 2),
            prefix: 30,
            ingress_if: "eth0".to_string(),
            masquerade_from: vec![(Ipv4Addr::new(172, 18, 0, 0), 16)],
        }
    }
}

pub(crate) fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl IngressConfig {
    /// Checks names (they end up in nft scripts and sysctl paths) and addresses.
    pub fn validate(&self) -> Result<(), IngressError> {
        for (what, name) in [
            ("host_if", &self.host_if),
            ("sandbox_if", &self.sandbox_if),
            ("ingress_if", &self.ingress_if),
        ] {
            if !valid_ifname(name) {
                return Err(IngressError::Invalid(format!(
                    "{what} {name:?}: want 1 to 15 characters of [A-Za-z0-9_.-]"
                )));
            }
        }
        if self.sandbox_if == self.ingress_if {
            return Err(IngressError::Invalid(format!(
                "sandbox_if and ingress_if are both {:?}",
                self.sandbox_if
            )));
        }
        if let Some((a, l)) = self
            .masquerade_from
            .iter()
            .find(|(a, l)| *l > 32 || (*l < 32 && u32::from(*a) & (u32::MAX >> l) != 0))
        {
            return Err(IngressError::Invalid(format!(
                "masquerade_from {a}/{l}: not a network address and prefix length"
            )));
        }
        if !(1..=30).contains(&self.prefix) {
            return Err(IngressError::Invalid(format!(
                "prefix /{}: want 1 to 30",
                self.prefix
            )));
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let (h, s) = (u32::from(self.host_addr), u32::from(self.sandbox_addr));
        let net = h & mask;
        let bcast = net | !mask;
        if s & mask != net || h == s || [h, s].iter().any(|a| *a == net || *a == bcast) {
            return Err(IngressError::Invalid(format!(
                "host_addr {} and sandbox_addr {} must be two distinct host addresses of one /{}",
                self.host_addr, self.sandbox_addr, self.prefix
            )));
        }
        Ok(())
    }
}

/// `(proto, published port)`.
pub(crate) type Key = (Proto, u16);

/// Where a published port goes: a target port and the backends, sorted and deduplicated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) target: u16,
    pub(crate) backends: Vec<Ipv4Addr>,
}

/// The backends of `before` that no entry of `after` has any more.
fn lost_backends(before: &BTreeMap<Key, Target>, after: &BTreeMap<Key, Target>) -> Vec<Ipv4Addr> {
    let kept: std::collections::BTreeSet<Ipv4Addr> = after
        .values()
        .flat_map(|t| t.backends.iter().copied())
        .collect();
    let lost: std::collections::BTreeSet<Ipv4Addr> = before
        .values()
        .flat_map(|t| t.backends.iter().copied())
        .filter(|b| !kept.contains(b))
        .collect();
    lost.into_iter().collect()
}

/// A port published through the routing mesh, as programmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishedEntry {
    /// The protocol.
    pub proto: Proto,
    /// The published port, on every address of the host.
    pub port: u16,
    /// The tasks' port.
    pub target: u16,
    /// The tasks' ingress addresses, sorted; empty: connections are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// A host-mode port, as programmed: `proto . port` on the host's addresses goes straight to
/// `dest:target`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// The protocol.
    pub proto: Proto,
    /// The published port, on every address of the host.
    pub port: u16,
    /// The local task's address (reachable from the host, e.g. its gateway-bridge address).
    pub dest: Ipv4Addr,
    /// The task's port.
    pub target: u16,
}

pub(crate) type HostPorts = BTreeMap<Key, (Ipv4Addr, u16)>;

/// The routing mesh of one host: owns the two namespaces' handles and the programmed state.
/// See the module docs.
#[derive(Debug)]
pub struct Ingress {
    host: Netns,
    sandbox: Netns,
    cfg: IngressConfig,
    /// What is programmed (the desired state of the last successful change).
    published: BTreeMap<Key, Target>,
    host_ports: HostPorts,
    /// What the kernel holds, with the sandbox's rule handles.
    sbox: SandboxState,
    hst: HostState,
    /// A change failed midway: the two fields above may be wrong, so the next change reads
    /// the tables back first.
    dirty: bool,
    /// The backends published, shared with the delayed deletion of stranded conntrack
    /// entries.
    holding: mesh_netlink::conntrack::Holding,
}

/// Runs blocking work (nft, /proc writes in a namespace) off the async runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IngressError> + Send + 'static,
) -> Result<T, IngressError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IngressError::Task(e.to_string()))?
}

fn nft_apply(ns: &Netns, script: &str) -> Result<(), IngressError> {
    debug!(ns = ns.name(), script, "nft transaction");
    nft::apply_in(ns, script).map_err(|source| IngressError::Nft {
        ns: ns.name().to_string(),
        source,
    })
}

/// As [`nft_apply`], with `nft -e -a`: returns what nft echoes (the new objects, with the
/// handles of new rules).
fn nft_apply_echo(ns: &Netns, script: &str) -> Result<String, IngressError> {
    debug!(ns = ns.name(), script, "nft transaction");
    let nft_err = |source| IngressError::Nft {
        ns: ns.name().to_string(),
        source,
    };
    nft::apply_echo_in(ns, script).map_err(nft_err)
}

/// `nft -j list table ip mesh_ingress`, or `None` if the table does not exist.
fn nft_read_table(ns: &Netns) -> Result<Option<Listing>, IngressError> {
    nft::read_table_in(ns, "ip", TABLE).map_err(|source| IngressError::Nft {
        ns: ns.name().to_string(),
        source,
    })
}

fn read_sandbox(ns: &Netns) -> Result<SandboxState, IngressError> {
    match nft_read_table(ns)? {
        Some(listing) => readback::parse_sandbox(&listing).map_err(|msg| IngressError::Readback {
            ns: ns.name().to_string(),
            table: TABLE,
            msg,
        }),
        None => Ok(SandboxState::default()),
    }
}

fn read_host(ns: &Netns) -> Result<HostState, IngressError> {
    match nft_read_table(ns)? {
        Some(listing) => readback::parse_host(&listing).map_err(|msg| IngressError::Readback {
            ns: ns.name().to_string(),
            table: TABLE,
            msg,
        }),
        None => Ok(HostState::default()),
    }
}

/// Sets `/proc/sys/<key>` to `value` inside `ns` (only if it differs).
pub(crate) fn sysctls(ns: &Netns, settings: &[(String, &'static str)]) -> Result<(), IngressError> {
    let ns_name = ns.name().to_string();
    ns.run(move || {
        for (key, value) in settings {
            let path = format!("/proc/sys/{key}");
            let err = |msg: String| IngressError::Sysctl {
                ns: ns_name.clone(),
                path: path.clone(),
                msg,
            };
            let cur = fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
            if cur.trim() != *value {
                fs::write(&path, value).map_err(|e| err(e.to_string()))?;
                debug!(ns = ns_name, key, value, "sysctl set");
            }
        }
        Ok(())
    })?
}

impl Ingress {
    /// Plumbs the veth pair, addresses, the sandbox's default route, forwarding and
    /// `rp_filter`/`route_localnet`, then reads our nftables tables back (after a restart),
    /// adopts what they hold and makes sure the tables, base chains and base rules are there
    /// (one transaction per namespace; port chains that are already right are not touched).
    /// Idempotent: calling it again (a restarted daemon) duplicates nothing and opens no gap.
    ///
    /// `host` is the namespace the host's addresses live in (the daemon's own, usually
    /// [`Netns::current`]); `sandbox` the ingress sandbox, already (or later) attached to the
    /// ingress overlay as [`IngressConfig::ingress_if`].
    pub async fn setup(
        host: Netns,
        sandbox: Netns,
        cfg: IngressConfig,
    ) -> Result<Ingress, IngressError> {
        cfg.validate()?;
        let h = Handle::new(&host).await?;
        let s = Handle::new(&sandbox).await?;
        let host_end = h.link(&cfg.host_if).await?;
        let sbox_end = s.link(&cfg.sandbox_if).await?;
        let is_veth = |l: &Option<mesh_netlink::LinkInfo>| {
            l.as_ref().and_then(|l| l.kind.as_deref()) == Some("veth")
        };
        if !(is_veth(&host_end) && is_veth(&sbox_end)) {
            // Missing, half there, or not a veth: start over.
            h.del_link(&cfg.host_if).await?;
            s.del_link(&cfg.sandbox_if).await?;
            h.add_veth(&cfg.host_if, &cfg.sandbox_if, Some(&sandbox), None)
                .await?;
            info!(
                host_if = cfg.host_if,
                sandbox_if = cfg.sandbox_if,
                "created the ingress veth pair"
            );
        }
        h.add_address(&cfg.host_if, cfg.host_addr, cfg.prefix)
            .await?;
        s.add_address(&cfg.sandbox_if, cfg.sandbox_addr, cfg.prefix)
            .await?;
        h.set_up(&cfg.host_if).await?;
        s.set_up(&cfg.sandbox_if).await?;
        s.set_up("lo").await?;
        s.add_default_route_dev(cfg.host_addr, &cfg.sandbox_if)
            .await?;

        let mut ing = Ingress {
            host,
            sandbox,
            cfg,
            published: BTreeMap::new(),
            host_ports: BTreeMap::new(),
            sbox: SandboxState::default(),
            hst: HostState::default(),
            dirty: true,
            holding: Default::default(),
        };
        let ing = blocking(move || {
            let (hif, sif) = (&ing.cfg.host_if, &ing.cfg.sandbox_if);
            sysctls(
                &ing.host,
                &[
                    ("net/ipv4/ip_forward".to_string(), "1"),
                    (format!("net/ipv4/conf/{hif}/route_localnet"), "1"),
                    (format!("net/ipv4/conf/{hif}/rp_filter"), "2"),
                ],
            )?;
            sysctls(
                &ing.sandbox,
                &[
                    ("net/ipv4/ip_forward".to_string(), "1"),
                    (format!("net/ipv4/conf/{sif}/rp_filter"), "2"),
                ],
            )?;
            ing.adopt()?;
            Ok(ing)
        })
        .await?;
        info!(
            published = ing.published.len(),
            host_ports = ing.host_ports.len(),
            "routing mesh set up"
        );
        Ok(ing)
    }

    /// Reads both tables, takes what they hold as the programmed state, and reconciles the
    /// kernel to it (base objects and rules; drops what cannot be understood).
    fn adopt(&mut self) -> Result<(), IngressError> {
        self.sbox = read_sandbox(&self.sandbox)?;
        self.hst = read_host(&self.host)?;
        let published = self.sbox.published();
        let mut host_ports = self.hst.host_ports.clone();
        host_ports.retain(|k, _| {
            let clash = published.contains_key(k);
            if clash {
                warn!(proto = %k.0, port = k.1, "dropping a host-mode port that is also published through the ingress");
            }
            !clash
        });
        self.execute(&published, &host_ports, true)?;
        self.published = published;
        self.host_ports = host_ports;
        Ok(())
    }

    /// Reads both tables back and moves them to the desired state, base rules included.
    fn reconcile(
        &mut self,
        published: &BTreeMap<Key, Target>,
        host_ports: &HostPorts,
    ) -> Result<(), IngressError> {
        self.sbox = read_sandbox(&self.sandbox)?;
        self.hst = read_host(&self.host)?;
        self.execute(published, host_ports, true)
    }

    /// Runs the plan from the known kernel state to the desired one (sandbox additions and
    /// updates, host, sandbox removals: each one transaction, skipped when empty) and
    /// updates the known state. Leaves `dirty` set if anything fails.
    fn execute(
        &mut self,
        published: &BTreeMap<Key, Target>,
        host_ports: &HostPorts,
        base: bool,
    ) -> Result<(), IngressError> {
        let plan = script::plan(
            &self.cfg, base, published, host_ports, &self.sbox, &self.hst,
        );
        self.dirty = true;
        if !plan.sandbox_up.is_empty() {
            let echo = nft_apply_echo(&self.sandbox, &plan.sandbox_up)?;
            let handles = readback::parse_echo(&echo);
            for ((proto, port), target) in published {
                let chain = script::port_chain(*proto, *port);
                let old = self.sbox.chains.remove(&chain).unwrap_or_default();
                let pc = match handles.get(&chain) {
                    // The new head; the old head is its shadow now.
                    Some(h) => PortChain {
                        rules: std::iter::once((*h, Some(target.clone())))
                            .chain(old.rules.into_iter().take(1))
                            .collect(),
                    },
                    None if old.current() == Some(target) => old,
                    None => {
                        return Err(IngressError::Readback {
                            ns: self.sandbox.name().to_string(),
                            table: TABLE,
                            msg: format!("nft did not echo the handle of the new rule in {chain}"),
                        })
                    }
                };
                self.sbox.chains.insert(chain.clone(), pc);
                self.sbox.ports.insert((*proto, *port), chain);
            }
        }
        if !plan.host.is_empty() {
            nft_apply(&self.host, &plan.host)?;
            self.hst = HostState {
                published: published.keys().copied().collect(),
                host_ports: host_ports.clone(),
            };
        }
        if !plan.sandbox_rm.is_empty() {
            nft_apply(&self.sandbox, &plan.sandbox_rm)?;
            self.sbox.ports.retain(|k, _| published.contains_key(k));
            self.sbox.chains.retain(|c, _| {
                readback::parse_port_chain(c).is_some_and(|k| published.contains_key(&k))
            });
        }
        self.dirty = false;
        Ok(())
    }

    /// Moves the kernel from the programmed state to (`published`, `host_ports`). If that
    /// fails (or an earlier change did), reads the tables back and reconciles them instead.
    fn apply(
        &mut self,
        published: BTreeMap<Key, Target>,
        host_ports: HostPorts,
    ) -> Result<(), IngressError> {
        if !self.dirty && published == self.published && host_ports == self.host_ports {
            return Ok(());
        }
        let mut res = if self.dirty {
            self.reconcile(&published, &host_ports)
        } else {
            self.execute(&published, &host_ports, false)
        };
        if let Err(e) = &res {
            // `dirty` is set: the known state may be wrong. Read it back and retry once.
            warn!(error = %e, "ingress update failed: reading the tables back and retrying");
            match self.reconcile(&published, &host_ports) {
                Ok(()) => res = Ok(()),
                Err(e2) => {
                    warn!(error = %e2, "ingress reconcile failed: will retry at the next change")
                }
            }
        }
        res?;
        let lost = lost_backends(&self.published, &published);
        self.published = published;
        self.host_ports = host_ports;
        self.forget_flows_to(lost);
        Ok(())
    }

    /// Asks for the deletion of the sandbox's conntrack entries that backends no longer
    /// published would strand ([`mesh_netlink::conntrack::forget_backends_later`]): a
    /// connect in progress toward a task that is gone keeps retransmitting to it otherwise,
    /// until the client gives up.
    fn forget_flows_to(&self, lost: Vec<Ipv4Addr>) {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = self
            .published
            .values()
            .flat_map(|t| t.backends.iter().copied())
            .collect();
        if lost.is_empty() {
            return;
        }
        match self.sandbox.try_clone() {
            Ok(ns) => {
                mesh_netlink::conntrack::forget_backends_later(ns, lost, self.holding.clone())
            }
            Err(e) => warn!(error = %e, "ingress: cannot forget flows toward removed backends"),
        }
    }

    /// Publishes `proto/port` through the routing mesh to `target` on `backends` (any
    /// order, duplicates ignored; none: connections are refused at once). A no-op when
    /// unchanged. A port that is a host-mode port is a [`IngressError::Conflict`].
    pub fn set_published(
        &mut self,
        proto: Proto,
        port: u16,
        target: u16,
        backends: &[Ipv4Addr],
    ) -> Result<(), IngressError> {
        check_ports(port, target)?;
        if self.host_ports.contains_key(&(proto, port)) {
            return Err(IngressError::Conflict {
                proto,
                port,
                existing: "host",
            });
        }
        let mut published = self.published.clone();
        published.insert((proto, port), target_of(target, backends));
        let host_ports = self.host_ports.clone();
        self.apply(published, host_ports)
    }

    /// Unpublishes `proto/port`: new connections to it are refused (nothing listens on the
    /// host); established ones keep going. A no-op if it is not published.
    pub fn remove_published(&mut self, proto: Proto, port: u16) -> Result<(), IngressError> {
        if !self.published.contains_key(&(proto, port)) && !self.dirty {
            return Ok(());
        }
        let mut published = self.published.clone();
        published.remove(&(proto, port));
        let host_ports = self.host_ports.clone();
        self.apply(published, host_ports)
    }

    /// Publishes `proto/port` in host mode: DNATed by the host straight to `dest:target`. A
    /// no-op when unchanged. A port published through the ingress is a
    /// [`IngressError::Conflict`].
    pub fn set_host_port(
        &mut self,
        proto: Proto,
        port: u16,
        dest: Ipv4Addr,
        target: u16,
    ) -> Result<(), IngressError> {
        check_ports(port, target)?;
        if self.published.contains_key(&(proto, port)) {
            return Err(IngressError::Conflict {
                proto,
                port,
                existing: "ingress",
            });
        }
        let mut host_ports = self.host_ports.clone();
        host_ports.insert((proto, port), (dest, target));
        let published = self.published.clone();
        self.apply(published, host_ports)
    }

    /// Removes the host-mode port `proto/port`. A no-op if there is none.
    pub fn remove_host_port(&mut self, proto: Proto, port: u16) -> Result<(), IngressError> {
        if !self.host_ports.contains_key(&(proto, port)) && !self.dirty {
            return Ok(());
        }
        let mut host_ports = self.host_ports.clone();
        host_ports.remove(&(proto, port));
        let published = self.published.clone();
        self.apply(published, host_ports)
    }

    /// Makes the programmed state exactly `published` plus `host_ports` (what is not listed
    /// is removed), as at most three transactions (sandbox additions, host, sandbox
    /// removals), each only what differs. A port listed twice, or in both lists, is an error
    /// and changes nothing.
    pub fn sync(
        &mut self,
        published: &[PublishedEntry],
        host_ports: &[HostPort],
    ) -> Result<(), IngressError> {
        let mut p = BTreeMap::new();
        for e in published {
            check_ports(e.port, e.target)?;
            if p.insert((e.proto, e.port), target_of(e.target, &e.backends))
                .is_some()
            {
                return Err(IngressError::Invalid(format!(
                    "{}/{} published twice",
                    e.proto, e.port
                )));
            }
        }
        let mut hp = BTreeMap::new();
        for e in host_ports {
            check_ports(e.port, e.target)?;
            if p.contains_key(&(e.proto, e.port)) {
                return Err(IngressError::Conflict {
                    proto: e.proto,
                    port: e.port,
                    existing: "ingress",
                });
            }
            if hp.insert((e.proto, e.port), (e.dest, e.target)).is_some() {
                return Err(IngressError::Invalid(format!(
                    "{}/{} published twice in host mode",
                    e.proto, e.port
                )));
            }
        }
        self.apply(p, hp)
    }

    /// The ingress-published ports as programmed, by protocol then port.
    pub fn published(&self) -> Vec<PublishedEntry> {
        self.published
            .iter()
            .map(|((proto, port), t)| PublishedEntry {
                proto: *proto,
                port: *port,
                target: t.target,
                backends: t.backends.clone(),
            })
            .collect()
    }

    /// The host-mode ports as programmed, by protocol then port.
    pub fn host_ports(&self) -> Vec<HostPort> {
        self.host_ports
            .iter()
            .map(|((proto, port), (dest, target))| HostPort {
                proto: *proto,
                port: *port,
                dest: *dest,
                target: *target,
            })
            .collect()
    }

    /// The configuration in use.
    pub fn config(&self) -> &IngressConfig {
        &self.cfg
    }

    /// Removes both tables (host first: no new connection is sent to the sandbox) and the
    /// veth pair (with its addresses and the sandbox's default route). Leaves IPv4 forwarding
    /// on (the gateway bridge needs it too). Established connections through the mesh die.
    pub async fn teardown(self) -> Result<(), IngressError> {
        let h = Handle::new(&self.host).await?;
        let s = Handle::new(&self.sandbox).await?;
        let Ingress {
            host, sandbox, cfg, ..
        } = self;
        let (host, sandbox) = blocking(move || {
            for ns in [&host, &sandbox] {
                if nft_read_table(ns)?.is_some() {
                    nft_apply(ns, &script::delete_table())?;
                }
            }
            Ok((host, sandbox))
        })
        .await?;
        h.del_link(&cfg.host_if).await?;
        s.del_link(&cfg.sandbox_if).await?;
        drop((host, sandbox));
        info!("routing mesh torn down");
        Ok(())
    }
}

/// Removes the routing mesh's rules a killed daemon left in `host` (its table, if there is
/// one): what [`Ingress::teardown`] removes there, for a daemon that finds itself out of the
/// swarm. The sandbox's end goes with the sandbox's namespace. Blocking.
pub fn remove_host_leftovers(host: &Netns) -> Result<(), IngressError> {
    if nft_read_table(host)?.is_some() {
        nft_apply(host, &script::delete_table())?;
        info!("removed the routing mesh's rules a previous daemon left");
    }
    Ok(())
}

fn check_ports(port: u16, target: u16) -> Result<(), IngressError> {
    if port == 0 || target == 0 {
        return Err(IngressError::Invalid(format!(
            "port {port} -> {target}: ports must not be 0"
        )));
    }
    Ok(())
}

fn target_of(target: u16, backends: &[Ipv4Addr]) -> Target {
    let mut backends = backends.to_vec();
    backends.sort();
    backends.dedup();
    Target { target, backends }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let cfg = IngressConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.host_if, "mesh_ingr0");
        assert_eq!(cfg.sandbox_if, "mi0");
        assert_eq!(cfg.host_addr, Ipv4Addr::new(169, 254, 77, 1));
        assert_eq!(cfg.sandbox_addr, Ipv4Addr::new(169, 254, 77, 2));
        assert_eq!(cfg.prefix, 30);
        assert_eq!(cfg.ingress_if, "eth0");
    }

    #[test]
    fn bad_configs_are_refused() {
        let base = IngressConfig::default();
        let cases = [
            IngressConfig {
                host_if: "a\"; flush ruleset".into(),
                ..base.clone()
            },
            IngressConfig {
                sandbox_if: "".into(),
                ..base.clone()
            },
            IngressConfig {
                ingress_if: "sixteen-chars-xx".into(),
                ..base.clone()
            },
            IngressConfig {
                ingress_if: "mi0".into(),
                ..base.clone()
            },
            IngressConfig {
                prefix: 31,
                ..base.clone()
            },
            IngressConfig {
                sandbox_addr: Ipv4Addr::new(169, 254, 77, 3),
                ..base.clone()
            },
            IngressConfig {
                sandbox_addr: Ipv4Addr::new(169, 254, 78, 2),
                ..base.clone()
            },
            IngressConfig {
                sandbox_addr: base.host_addr,
                ..base.clone()
            },
        ];
        for cfg in cases {
            assert!(
                matches!(cfg.validate(), Err(IngressError::Invalid(_))),
                "{cfg:?}"
            );
        }
        IngressConfig {
            prefix: 24,
            sandbox_addr: Ipv4Addr::new(169, 254, 77, 200),
            ..base
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn protos() {
        assert_eq!("tcp".parse::<Proto>().unwrap(), Proto::Tcp);
        assert_eq!(Proto::Udp.to_string(), "udp");
        assert!("sctp".parse::<Proto>().is_err());
    }

    #[test]
    fn backends_are_normalised() {
        let ip = |d| Ipv4Addr::new(10, 0, 0, d);
        assert_eq!(
            target_of(80, &[ip(7), ip(5), ip(7), ip(6)]),
            Target {
                target: 80,
                backends: vec![ip(5), ip(6), ip(7)]
            }
        );
    }

    #[test]
    fn an_ingress_can_move_to_a_blocking_thread() {
        fn is_send<T: Send>() {}
        is_send::<Ingress>();
    }
}
