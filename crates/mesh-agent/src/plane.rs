//! The network plane of the node agent: the VXLAN overlay (`mesh-overlay`) programmed
//! from endpoint records gossiped per network (`mesh-gossip`), with the overlay namespaces held
//! by the executor's holder processes so they survive a daemon restart; the embedded DNS
//! (`mesh-dns`), the service-VIP balancer (`mesh-lb`: eBPF socket-LB, or nftables in each
//! task's namespace) and the routing mesh (`mesh-ingress`), all derived from the same records.
//!
//! Each running local task publishes one record per network it is attached to (table
//! `endpoints`, key = task ID): its address, MAC, VTEP, names, its service's VIP and, on the
//! ingress network, the ports it publishes (flagged `starting` while the task is in its start
//! gate: an address to program, no name or VIP yet). Each node's ingress sandbox publishes one record
//! on the ingress network too. Gossip delivers a network's records only to the hosts on it
//! (every host is on the ingress network); every change (and a periodic pass) makes the
//! overlay's ARP/FDB entries, the DNS records, the VIP backends and the published ports match
//! the records, and removes the namespaces of networks without a local endpoint. The overlay
//! goes first, so a new remote endpoint is reachable before a balancer or a name leads to it.
//!
//! Per task namespace the plane keeps the DNS sockets, the VIPs of the task's networks as /32
//! addresses on `lo` (a ping to a service name answers, and a VIP without backends refuses at
//! once) and, with the nftables backend, the task's `mesh_lb` table. A restarted daemon
//! re-plumbs the tasks it adopts from the running set the agent gives it.
//!
//! **A VIP outlives its name.** When a service's last endpoint is withdrawn (a stop-first
//! update, a scale to zero, a removal), DNS stops answering the name at once, but the VIP stays
//! in the balancer and on the tasks' `lo`, empty, for the TTL of a VIP answer
//! ([`emptied_vip_linger`]): a client that resolved the name just before, or keeps the answer
//! for its TTL, is refused at once. Dropped with the name, the VIP was neither translated nor
//! local any more, so such a connect went out to the overlay, where nothing answers, and hung
//! until its timeout (`update_order.rs`).
//!
//! **Nothing is taken away on partial tables.** Gossip fills a network's tables only with its
//! first push-pull with a member of the network (`Gossip::synced`); before that, a restarted
//! daemon (or one that just joined a network) sees little more than its own records, while
//! the kernel still holds what the previous daemon programmed from the whole picture. Until
//! a network is synced, a pass therefore adds but does not remove: the overlay's ARP/FDB
//! entries of that network are added for what the tables list and none is deleted (a task
//! just started on a network new to this node is in the others' VIPs at once, and its
//! replies need a way back), its VIPs keep the backends they had, the routing
//! mesh keeps the ports (and backends) in force while the ingress network is unsynced, and
//! an adopted task gets its DNS sockets and balancer table only once all its networks are
//! synced (until then its queries are refused, as while the daemon was down, rather than
//! answered from a partial record set; its `mesh_lb` table, left by the previous daemon,
//! keeps balancing). The event that a network is synced triggers a pass, like any change.
//!
//! **Gossip is sealed, and the underlay closed to strangers.** Gossip seals every packet with
//! the cluster keys the leader hands out with the node's assignments (`gossipkeys` in
//! `mesh-manager`): it starts sending, and joins its peers, once the first keys arrive (a
//! restarted daemon gets them again with its first answer, a restarted manager from its own
//! store at once; they are never written here).
//! The member addresses from the same answer feed the host's underlay filter
//! (`mesh_overlay::filter`): VXLAN and gossip packets from any other address are dropped.
//! The filter goes with the swarm (`stop`), and a daemon that starts outside a swarm removes
//! one left behind; a restarted daemon keeps the previous run's until its first answer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::latest::Latest;
use crate::runtime::{GossipKey, NetworkPlane, PlaneError, PlaneIdentity};
use mesh_api::{NetworkAttachment, PortConfig, Protocol, PublishMode, Task};
use mesh_gossip::{Config as GossipConfig, Event, Gossip};
use mesh_lb::VipBalancer;
use mesh_netlink::{Handle, Netns};
pub use mesh_overlay::DEFAULT_VXLAN_PORT;
use mesh_overlay::{Attachment, HolderError, Holders, NetworkDesc, Overlay, OverlayConfig, Remote};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// The gossip table of endpoint records.
pub const ENDPOINTS: &str = "endpoints";
/// The holder name of this host's ingress sandbox namespace.
pub const INGRESS_SANDBOX: &str = "ingress_sbox";
/// Where the node's ingress attachment is kept across restarts (under `--exec-root`).
const INGRESS_STATE: &str = "ingress.json";
/// The routing mesh's eBPF fast path: the IDs of its maps, for a restarted daemon.
const NODEPORT_STATE: &str = "ingress-fastpath.json";
/// The networks (ID and VNI) this daemon announced endpoints on, kept for the next run: a
/// restarted daemon rejoins them in gossip, even those it has no task on any more, to learn
/// and retract what its previous run announced there (`Gossip::retract_earlier_runs`).
const GOSSIP_NETWORKS: &str = "gossip-networks.json";
/// The sandbox's interface on the ingress overlay.
const SANDBOX_IF: &str = "eth0";
/// How long a VIP whose service has no endpoint left stays in the balancer, empty (refusing),
/// after DNS stopped answering it: the TTL of a VIP answer, so a client that keeps the answer
/// that long is refused rather than sent nowhere (module docs).
fn emptied_vip_linger() -> Duration {
    Duration::from_secs(u64::from(mesh_dns::Ttls::default().vip))
}
/// How long a withdrawn endpoint's ARP/FDB entries outlive its record. DNS and the
/// balancers drop it at once, so no new connection goes there; connections set up just
/// before still need the path while the task drains (the agent's 1 s) and stops.
const LINGER: Duration = Duration::from_secs(3);

/// How often a gossip join no peer took is tried again.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// What a host publishes about a local task (or its ingress sandbox) on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
    pub vni: u32,
    pub task_name: String,
    /// Empty for an ingress sandbox (not a service endpoint).
    pub service_name: String,
    pub service_id: String,
    /// The service's virtual IP on this network (none in dnsrr mode).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// On the ingress network: the ports the service publishes in ingress mode.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// The service's other names on this network (network aliases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The task is in its start gate, its command not run yet: the other nodes program its
    /// address in their overlays (so the first packet it sends can be answered) but no name,
    /// VIP or published port leads to it until the record without this flag replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub starting: bool,
}

/// The executor's holder processes behind the overlay's `Holders` seam.
pub struct ExecutorHolders(pub Arc<mesh_executor::Executor>);

impl Holders for ExecutorHolders {
    fn ensure(&self, name: &str) -> Result<u32, HolderError> {
        Ok(self.0.netns_ensure(name)?)
    }
    fn list(&self) -> Vec<(String, u32)> {
        self.0.netns_list()
    }
    fn remove(&self, name: &str) -> Result<(), HolderError> {
        Ok(self.0.netns_remove(name)?)
    }
}

/// Which VIP balancer a node uses (`meshd --lb-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbBackend {
    /// eBPF socket-LB when the kernel takes it, else nftables.
    Auto,
    /// eBPF socket-LB on the cgroup hooks (fails to start without it).
    Ebpf,
    /// nftables DNAT in each task's namespace.
    Nftables,
}

/// The routing mesh's data path (`meshd --ingress-datapath`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressDatapath {
    /// The eBPF fast path when the kernel takes it, else nftables only.
    Auto,
    /// The eBPF fast path (the routing mesh does not start without it).
    Ebpf,
    /// nftables only.
    Nftables,
}

/// Ports and settings from meshd's flags.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    /// Where the gateway bridge keeps its address leases.
    pub exec_root: PathBuf,
    pub gossip_port: u16,
    pub vxlan_port: u16,
    pub mtu: Option<u32>,
    pub lb_backend: LbBackend,
    pub ingress_datapath: IngressDatapath,
}

struct Running {
    gossip: Gossip,
    overlay: Arc<Overlay>,
    vtep: Ipv4Addr,
    /// Records this host published: (network ID, key) -> record.
    published: BTreeMap<(String, String), EndpointRecord>,
    /// The networks with a local endpoint: network ID -> description.
    networks: BTreeMap<String, NetworkDesc>,
    /// The routing mesh, once this node has an ingress address.
    ingress: Option<mesh_ingress::Ingress>,
    /// The routing mesh's eBPF fast path, once set up (`--ingress-datapath`).
    nodeport: Option<mesh_lb::nodeport::NodePort>,
    /// Set when the fast path could not be set up (`auto`: not tried again).
    nodeport_failed: bool,
    /// Remote endpoints programmed by the last pass, and withdrawn ones kept for [`LINGER`].
    last_remotes: BTreeMap<u32, BTreeSet<Remote>>,
    lingering: BTreeMap<(u32, Ipv4Addr), (Remote, std::time::Instant)>,
    /// Whether this run has published its endpoints once (the running set the agent gave):
    /// only then can what an earlier run published and this one did not be retracted.
    local_published: bool,
    stop: watch::Sender<bool>,
}

/// What the plane wants of one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VipInfo {
    network_id: String,
    service: String,
    /// Sorted.
    backends: Vec<Ipv4Addr>,
}

/// The plane's plumbing inside one task's network namespace.
struct TaskNs {
    pid: u32,
    /// IDs of the task's networks (the ingress network excluded: no discovery there).
    nets: BTreeSet<String>,
    /// VNIs of all its networks: their namespaces stay while the process lives (a task
    /// draining after its endpoint was withdrawn must stay reachable until it stops).
    vnis: BTreeSet<u32>,
    _dns: Option<mesh_dns::Registration>,
    /// Its own balancer table, with a per-task backend (nftables).
    lb_table: Option<Box<dyn mesh_lb::TaskBalancer>>,
    /// What `lb_table` was last synced to (for the metrics: a pass syncs every table).
    lb_synced: Option<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>>,
    /// VIPs put on the task's `lo`.
    lo_vips: BTreeSet<Ipv4Addr>,
    /// The routing mesh's way back, for a task that publishes ports in ingress mode
    /// (`mesh_ingress::return_path`).
    ingress_return: Option<IngressReturn>,
}

/// A task's return path to the ingress sandboxes, as programmed.
struct IngressReturn {
    /// The task's interface on the ingress network.
    ifname: String,
    /// Sandboxes with a rule and route in the task (only ever added: module docs of
    /// `mesh_ingress::return_path`).
    sandboxes: BTreeSet<Ipv4Addr>,
    /// UDP target ports whose rules are still to be added (then empty).
    udp_pending: Vec<u16>,
    /// Where the fast path hands the task VXLAN it decapsulates on this node (its gateway
    /// interface, when it has one), as set up in its table.
    shortcut: Option<mesh_ingress::return_path::Shortcut>,
}

impl TaskNs {
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The plane: a cheap handle on shared state.
pub struct Plane(Arc<Inner>);

/// Lock order: `local_seq`, then `running`, then the std mutexes. A std guard is never held
/// across an `.await`, nor while `local_seq` or `running` is taken, and no lock is taken twice
/// (`set_local_async` drops `running` before `sync_remotes` takes it again). The std mutexes
/// are taken one at a time, except (outer -> inner) `local` -> `tasks` (`plumb_adopted`),
/// `attaching` -> `tasks` (`set_local_async`), `lb_vips` -> `emptied` (`keep_emptied_vips`)
/// and `lb_vips` -> the eBPF balancer (`program_lb`); every other one is a leaf. Under a
/// guard, call nothing that takes the same mutex or one earlier in this order. (`tasks` is
/// held while the nftables tables are synced and while a `TaskNs` drops, `filter_state` while
/// the underlay filter is updated: slow, but neither calls back in.)
struct Inner {
    cfg: PlaneConfig,
    /// The embedded DNS engine: a socket pair at 127.0.0.11:53 in every task with a network.
    dns: mesh_dns::Dns,
    lb: Box<dyn VipBalancer>,
    /// What the balancer was last given: VIP -> network, service, backends.
    lb_vips: Mutex<BTreeMap<Ipv4Addr, VipInfo>>,
    /// VIPs whose service lost its last endpoint, kept empty (see [`emptied_vip_linger`]):
    /// VIP -> what it was, since when.
    emptied: Mutex<BTreeMap<Ipv4Addr, (VipInfo, std::time::Instant)>>,
    /// Per task ID, its namespace's plumbing (dropped once the process is gone).
    tasks: Mutex<BTreeMap<String, TaskNs>>,
    /// The local running set last given (applied when the plane starts, if given before;
    /// read for host-mode ports and the drained-task pass).
    /// `None` until the agent first said what runs here: nothing is garbage-collected before.
    local: Mutex<Option<Vec<(Task, u32)>>>,
    /// This node's ingress attachment, from the leader.
    ingress_att: Mutex<Option<NetworkAttachment>>,
    /// Names of the networks with a local task, by ID (for `mesh dns query`).
    net_names: Mutex<BTreeMap<String, String>>,
    /// Whether withdrawn endpoints linger (the events loop then wakes up sooner).
    lingering: std::sync::atomic::AtomicBool,
    /// Overlay namespaces the last pass kept only because a task not counted here (a
    /// restarted daemon's adopted task, withdrawn and draining) is still plugged in: the
    /// events loop passes again until they can go (`Overlay::gc_unplugged`).
    overlay_plugged: std::sync::atomic::AtomicBool,
    /// The agent's word that a task process runs here that the running set leaves out
    /// (`NetworkPlane::set_draining`): namespaces a task is plugged into are kept then.
    draining: std::sync::atomic::AtomicBool,
    /// The local tasks whose records the last pass published (`NetworkPlane::announced`),
    /// and whom to tell when it announced one more.
    announced: Mutex<BTreeSet<String>>,
    announce_wake: Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// Tasks in their start gate, not yet in the running set, with their networks: the
    /// garbage collection of namespaces and gateway ports must not take them away, and the
    /// networks stay joined in gossip.
    attaching: Mutex<BTreeMap<String, Attaching>>,
    rt: tokio::runtime::Handle,
    /// A single-threaded runtime on a thread of its own serving the DNS sockets: a query
    /// flood stays off the Raft and gossip workers, and one thread answers more queries per
    /// CPU-second than two workers waking each other (`cargo xtask bench dns`).
    dns_rt: tokio::runtime::Handle,
    holders: Arc<ExecutorHolders>,
    running: tokio::sync::Mutex<Option<Running>>,
    ready: watch::Sender<bool>,
    /// Serializes `set_local` passes in order.
    local_seq: tokio::sync::Mutex<()>,
    /// Networks a previous run announced endpoints on whose earlier entries this run has not
    /// retracted yet (ID -> VNI, from [`GOSSIP_NETWORKS`]): joined in gossip, and their
    /// overlay namespaces kept (a task being stopped there is still reachable while the
    /// other nodes drop it), until the network is synced and its earlier entries retracted.
    earlier: Mutex<BTreeMap<String, u32>>,
    /// What [`GOSSIP_NETWORKS`] holds now.
    saved_networks: Mutex<BTreeMap<String, u32>>,
    /// The gossip keys from the leader (empty until the first answer).
    keys: watch::Sender<Vec<mesh_gossip::Key>>,
    /// The running gossip node, for `mesh info` (a clone of `Running::gossip`); given the
    /// `keys` under its lock (`crate::latest`).
    gossip: Latest<Gossip>,
    /// The encryption tunnel of encrypted networks (`mesh_overlay::crypt`), while the plane
    /// runs; it seals with the gossip keys and talks to the members only (both given under
    /// its lock).
    tunnel: Latest<mesh_overlay::crypt::Tunnel>,
    /// The members' addresses last given (the tunnel's peers).
    members: Mutex<BTreeSet<Ipv4Addr>>,
    /// The ingress sandboxes of the cluster (their addresses on the ingress network), from
    /// the ingress network's records: the tasks' return paths lead to them.
    sandboxes: Mutex<BTreeSet<Ipv4Addr>>,
    /// The underlay member filter and what it was last given (`None`: not in force, and
    /// not to be set: the plane is stopped).
    filter: mesh_overlay::filter::MemberFilter,
    filter_state: Mutex<FilterState>,
    metrics: crate::metrics::PlaneMetrics,
}

/// The underlay filter's state.
#[derive(Default)]
struct FilterState {
    /// In a swarm: member lists are applied (set by `start`, cleared by `stop`).
    active: bool,
    /// What the table holds (`None`: not set by this run).
    members: Option<BTreeSet<Ipv4Addr>>,
    /// The member list last given (applied again by the periodic pass until it took).
    wanted: Option<BTreeSet<Ipv4Addr>>,
}

/// A task in its start gate (see `Inner::attaching`).
struct Attaching {
    since: std::time::Instant,
    /// The task's process: once it is gone (its start failed, it was killed), the entry
    /// holds nothing any more.
    pid: u32,
    vnis: BTreeSet<u32>,
    networks: BTreeMap<String, NetworkDesc>,
    /// Its records, flagged starting, by (network ID, task ID).
    records: BTreeMap<(String, String), EndpointRecord>,
}

impl Attaching {
    /// Whether the task may still come to run: its process is there, and its start began
    /// less than a minute ago (a start that never completes is forgotten).
    fn pending(&self) -> bool {
        self.since.elapsed() < Duration::from_secs(60)
            && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// How long a task's start waits for its node's tables of a network new to the node to be
/// synced (a push-pull with a member: milliseconds, unless the members it tries are down).
const ATTACH_SYNC: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tunnel's keys: the gossip keys (it derives its own from them).
fn tunnel_keys(keys: &[mesh_gossip::Key]) -> Vec<mesh_overlay::crypt::TunnelKey> {
    keys.iter()
        .map(|k| mesh_overlay::crypt::TunnelKey {
            id: k.id,
            secret: k.secret.to_vec(),
        })
        .collect()
}

fn attachment_desc(a: &NetworkAttachment) -> (Ipv4Addr, NetworkDesc) {
    (
        a.addr.ip,
        NetworkDesc {
            vni: a.vni,
            gateway: a.gateway,
            prefix: a.addr.prefix,
            encrypted: a.encrypted,
        },
    )
}

fn proc_ns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

fn ingress_proto(p: Protocol) -> mesh_ingress::Proto {
    match p {
        Protocol::Tcp => mesh_ingress::Proto::Tcp,
        Protocol::Udp => mesh_ingress::Proto::Udp,
    }
}

/// Whether a task needs the gateway bridge (a default route out, and the address host-mode
/// ports are sent to).
fn needs_gateway(t: &Task) -> bool {
    !t.networks.is_empty() || t.spec.ports.iter().any(|p| p.mode == PublishMode::Host)
}

impl Plane {
    pub fn new(
        cfg: PlaneConfig,
        rt: tokio::runtime::Handle,
        exec: Arc<mesh_executor::Executor>,
    ) -> Result<Plane, PlaneError> {
        let (ready, _) = watch::channel(false);
        let upstreams = match mesh_dns::ResolvConf::read_host() {
            Ok(r) => r.nameservers,
            Err(e) => {
                warn!("no upstream resolvers for the embedded DNS: {e}");
                Vec::new()
            }
        };
        let lb = choose_lb(cfg.lb_backend, &exec)?;
        let dns_rt = dns_runtime()?;
        // The ingress address from before a restart: the sandbox's network is kept from the
        // first pass on, before the leader's answer arrives.
        let ingress_att = std::fs::read(cfg.exec_root.join(INGRESS_STATE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let earlier: BTreeMap<String, u32> = std::fs::read(cfg.exec_root.join(GOSSIP_NETWORKS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let host_ns = mesh_netlink::Netns::current()
            .map_err(|e| PlaneError::context("cannot open the host namespace", e))?;
        let filter = mesh_overlay::filter::MemberFilter::new(
            Arc::new(host_ns),
            cfg.vxlan_port,
            cfg.gossip_port,
        );
        Ok(Plane(Arc::new(Inner {
            keys: watch::channel(Vec::new()).0,
            gossip: Latest::default(),
            tunnel: Latest::default(),
            members: Mutex::new(BTreeSet::new()),
            filter,
            filter_state: Mutex::new(FilterState::default()),
            earlier: Mutex::new(earlier.clone()),
            saved_networks: Mutex::new(earlier),
            cfg,
            dns: mesh_dns::Dns::new(upstreams),
            lb,
            lb_vips: Mutex::new(BTreeMap::new()),
            emptied: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(BTreeMap::new()),
            local: Mutex::new(None),
            sandboxes: Mutex::new(BTreeSet::new()),
            ingress_att: Mutex::new(ingress_att),
            net_names: Mutex::new(BTreeMap::new()),
            attaching: Mutex::new(BTreeMap::new()),
            lingering: std::sync::atomic::AtomicBool::new(false),
            overlay_plugged: std::sync::atomic::AtomicBool::new(false),
            announced: Mutex::new(BTreeSet::new()),
            announce_wake: Mutex::new(None),
            draining: std::sync::atomic::AtomicBool::new(false),
            rt,
            dns_rt,
            holders: Arc::new(ExecutorHolders(exec)),
            running: tokio::sync::Mutex::new(None),
            ready,
            local_seq: tokio::sync::Mutex::new(()),
            metrics: crate::metrics::PlaneMetrics::default(),
        })))
    }

    /// Registers the data plane's metrics: the embedded DNS's, the plane's own, and a
    /// collector reading the balancer's VIPs and the gossip node's counters at scrape time.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.0.dns.register_metrics(registry);
        self.0.metrics.register(registry);
        registry.register_collector(Box::new(PlaneCollector(self.0.clone())));
    }
}

/// What a scrape reads from the plane's state.
struct PlaneCollector(Arc<Inner>);

impl std::fmt::Debug for PlaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlaneCollector")
    }
}

impl prometheus_client::collector::Collector for PlaneCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let (vips, backends) = {
            let v = lock(&self.0.lb_vips);
            (v.len(), v.values().map(|i| i.backends.len()).sum::<usize>())
        };
        let tasks = lock(&self.0.tasks).len();
        for (name, help, n) in [
            ("vips", "Service VIPs the balancer holds on this node", vips),
            (
                "vip_backends",
                "Backends of the service VIPs the balancer holds on this node",
                backends,
            ),
            (
                "plane_tasks",
                "Local tasks whose network namespace the data plane serves",
                tasks,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(n as i64).encode(m)?;
        }
        let gossip = self.0.gossip.get();
        if let Some(g) = gossip {
            mesh_gossip::metrics::encode(&g.stats(), &mut encoder)?;
        }
        Ok(())
    }
}

/// Starts the DNS thread and returns its runtime's handle (the thread lives as long as the
/// process).
fn dns_runtime() -> Result<tokio::runtime::Handle, PlaneError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mesh-dns".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(PlaneError::context("cannot start the DNS runtime", e)));
                }
            }
        })
        .map_err(|e| PlaneError::context("cannot start the DNS thread", e))?;
    rx.recv()
        .map_err(|_| PlaneError::failed("the DNS thread died"))?
}

/// Picks the VIP balancer: eBPF socket-LB on the daemon's v2 cgroup (which holds every task)
/// when asked for or possible, else nftables.
fn choose_lb(
    want: LbBackend,
    exec: &mesh_executor::Executor,
) -> Result<Box<dyn VipBalancer>, PlaneError> {
    if want != LbBackend::Nftables {
        match load_ebpf(exec) {
            Ok(lb) => {
                info!("VIP balancer: eBPF socket-LB");
                return Ok(Box::new(mesh_lb::EbpfBalancer::new(lb)));
            }
            Err(e) if want == LbBackend::Ebpf => {
                return Err(PlaneError::context("--lb-backend ebpf", e));
            }
            Err(e) => warn!("eBPF socket-LB unavailable ({e}); using nftables"),
        }
    }
    mesh_netlink::nft::output(&["--version"])
        .map_err(|e| PlaneError::context("no VIP balancer: the nftables backend needs nft", e))?;
    info!("VIP balancer: nftables in each task namespace");
    Ok(Box::new(mesh_lb::NftBalancer))
}

fn load_ebpf(exec: &mesh_executor::Executor) -> Result<mesh_lb::SockLb, PlaneError> {
    let dir = exec
        .layout()
        .v2_task_path(exec.cgroup_parent(), "_")
        .parent()
        .ok_or_else(|| PlaneError::failed("no cgroup v2 directory for tasks"))?
        .to_path_buf();
    let mut lb = mesh_lb::SockLb::load().map_err(|e| PlaneError::context("cannot load", e))?;
    lb.attach(&dir)
        .map_err(|e| PlaneError::context(format!("cannot attach to {}", dir.display()), e))?;
    info!(cgroup = %dir.display(), "eBPF socket balancer attached");
    Ok(lb)
}

impl Inner {
    async fn start_async(self: Arc<Self>, me: PlaneIdentity) -> Result<(), PlaneError> {
        let overlay = Overlay::new(
            OverlayConfig {
                vtep: me.addr,
                vxlan_port: self.cfg.vxlan_port,
                mtu: self.cfg.mtu,
                gateway: Some(mesh_overlay::GatewayConfig::new(self.cfg.exec_root.clone())),
            },
            self.holders.clone(),
        )
        .await
        .map_err(PlaneError::failed)?;
        let addr = SocketAddr::from((me.addr, self.cfg.gossip_port));
        let peers: Vec<SocketAddr> = me
            .peers
            .iter()
            .filter(|p| **p != me.addr)
            .map(|p| SocketAddr::from((*p, self.cfg.gossip_port)))
            .collect();
        let mut gcfg = GossipConfig::new(me.node_id.clone(), addr, me.cluster_id.clone());
        gcfg.encrypt = true;
        // The networks of the tasks a restarted daemon adopts are declared before the join
        // below (and the agent may declare more meanwhile): told whom it will join, gossip
        // does not take them for networks nobody else has before their tables arrived.
        gcfg.seeds = peers.clone();
        let gossip = Gossip::start(gcfg)
            .await
            .map_err(|e| PlaneError::context(format!("cannot start gossip on {addr}"), e))?;
        // Given the keys stored last, read under the slot's lock as `set_gossip_keys` does.
        self.gossip
            .publish(gossip.clone(), |g| g.set_keys(&self.keys.borrow()));
        self.start_tunnel(&overlay, me.addr).await;
        // Subscribed before anything can change: the push-pulls that fill the tables land
        // while the first pass runs, and their events must still trigger a pass.
        let events = gossip.subscribe();
        let (stop, stop_rx) = watch::channel(false);
        let overlay = Arc::new(overlay);
        *self.running.lock().await = Some(Running {
            gossip: gossip.clone(),
            overlay,
            vtep: me.addr,
            published: BTreeMap::new(),
            networks: BTreeMap::new(),
            ingress: None,
            nodeport: None,
            nodeport_failed: false,
            last_remotes: BTreeMap::new(),
            lingering: BTreeMap::new(),
            local_published: false,
            stop,
        });
        self.ready.send_replace(true);
        // The agent may have told us what runs here before we were up.
        // (Nothing is collected before the agent said what runs here: a restarted daemon
        // must not remove the namespaces of the tasks it is about to adopt.)
        // Read under `local_seq`, as every pass reads it: a set read before the lock could be
        // older than one a pass applied meanwhile, and would undo it.
        {
            let _seq = self.local_seq.lock().await;
            let given = lock(&self.local).clone();
            if let Some(running) = given {
                if let Err(e) = self.set_local_async(running).await {
                    warn!("network plane: {e}");
                }
            }
        }
        // Joined once this node's networks and endpoints are set (above, when the agent
        // already said what runs here, as after a restart): the join's push-pull then
        // carries them, and brings back the networks' tables at once (synced), with what
        // an earlier run announced, so that is retracted without waiting. And once the
        // leader's first answer brought the keys: nothing can be sealed before.
        let mut keys = self.keys.subscribe();
        let mut stopped = stop_rx.clone();
        tokio::select! {
            r = keys.wait_for(|k| !k.is_empty()) => {
                if r.is_err() {
                    return Ok(());
                }
            }
            _ = stopped.wait_for(|s| *s) => return Ok(()),
        }
        if !peers.is_empty() {
            if let Err(e) = gossip.join(&peers).await {
                // Tried again until a peer takes it: the peers' keys and member filters may
                // lag behind this node's for a moment after it joined the cluster.
                warn!("gossip join: {e}; trying again every {JOIN_RETRY:?}");
                let mut stopped = stop_rx.clone();
                let joining = gossip.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        r = joining.join_retrying(&peers, JOIN_RETRY) => {
                            if let Err(e) = r {
                                warn!("gossip join: {e}");
                            }
                        }
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        }
        tokio::spawn(self.clone().events_loop(events, stop_rx));
        info!(gossip = %addr, "network plane started");
        Ok(())
    }

    /// Programs the data plane after every gossip change (a network's tables becoming
    /// synced included), and every few seconds to heal.
    async fn events_loop(
        self: Arc<Self>,
        mut events: tokio::sync::broadcast::Receiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            // Whether this pass also reapplies the running set (`set_local_async`): what it
            // keeps (namespaces, networks joined) depends on more than the tables, so it runs
            // when that may have changed (a network synced: a previous run's networks are let
            // go) and on every timer tick, so nothing is kept longer than a tick for want of
            // a change from the agent.
            let mut full = false;
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(Event::Synced { .. }) => full = true,
                    Ok(
                        Event::Upsert { .. }
                        | Event::Delete { .. }
                        | Event::NodeDown { .. },
                    ) => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                _ = tokio::time::sleep(if self.lingering.load(std::sync::atomic::Ordering::Relaxed) {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(5)
                }) => full = true,
                _ = stop.changed() => return,
            }
            // Coalesce a burst of events into one pass.
            while let Ok(Ok(ev)) =
                tokio::time::timeout(Duration::from_millis(5), events.recv()).await
            {
                full |= matches!(ev, Event::Synced { .. });
            }
            // Namespaces of tasks that finished draining go once their process is gone.
            let drained = full
                || lock(&self.tasks).values().any(|ns| !ns.alive())
                || self
                    .overlay_plugged
                    .load(std::sync::atomic::Ordering::Relaxed);
            let res = if drained {
                let _seq = self.local_seq.lock().await;
                let local = lock(&self.local).clone();
                match local {
                    Some(running) => self.set_local_async(running).await,
                    None => self.sync_remotes().await,
                }
            } else {
                self.sync_remotes().await
            };
            if let Err(e) = res {
                warn!("data plane sync: {e}");
            }
            // A member list the filter could not take is tried again.
            let retry = {
                let st = lock(&self.filter_state);
                st.active && st.wanted.is_some() && st.wanted != st.members
            };
            if retry {
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.apply_filter()).await;
            }
        }
    }

    /// Starts the encryption tunnel with the keys and members known so far. Without it the
    /// encrypted networks' traffic is dropped (their routing table's blackhole), never sent
    /// in the clear.
    async fn start_tunnel(&self, overlay: &Overlay, vtep: Ipv4Addr) {
        let cfg = mesh_overlay::crypt::TunnelConfig {
            vtep,
            vxlan_port: self.cfg.vxlan_port,
            underlay_mtu: overlay.underlay_mtu(),
        };
        match mesh_overlay::crypt::Tunnel::start(overlay.host_ns(), overlay.host(), cfg).await {
            Ok(t) => {
                // Given the keys and members stored last, read under the slot's lock (as
                // for gossip above).
                self.tunnel.publish(t, |t| {
                    t.set_keys(&tunnel_keys(&self.keys.borrow()));
                    t.set_peers(lock(&self.members).clone());
                });
            }
            Err(e) => warn!("encrypted networks will not carry traffic: {e}"),
        }
    }

    /// Makes the underlay filter hold the member list last given, if it does not yet
    /// (blocking). Under the lock: a `stop` meanwhile removes the table after this.
    fn apply_filter(&self) {
        let mut st = lock(&self.filter_state);
        let Some(want) = st.wanted.clone() else {
            return;
        };
        if !st.active || st.members.as_ref() == Some(&want) {
            return;
        }
        match self.filter.apply(&want) {
            Ok(()) => {
                info!(members = want.len(), "underlay filter updated");
                st.members = Some(want);
            }
            Err(e) => warn!("underlay filter: {e}"),
        }
    }

    fn ingress_net_id(&self) -> Option<String> {
        lock(&self.ingress_att)
            .as_ref()
            .map(|a| a.network_id.clone())
    }

    /// One reconcile pass (if the plane runs), counted and timed in the metrics.
    async fn sync_remotes(&self) -> Result<(), PlaneError> {
        let mut guard = self.running.lock().await;
        let Some(r) = guard.as_mut() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let res = self.reconcile(r).await;
        let m = &self.metrics;
        m.reconcile.inc();
        m.reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if res.is_err() {
            m.reconcile_errors.inc();
        }
        res
    }

    /// Makes the overlay, DNS, balancer and routing mesh match the gossip tables.
    async fn reconcile(&self, r: &mut Running) -> Result<(), PlaneError> {
        let ingress_id = self.ingress_net_id();
        // Read before the tables: what is read after includes the whole of a network synced
        // by now. The others may hold only this node's own records (a restarted daemon, a
        // network just joined): what they do not list is not taken away (module docs).
        let synced = r.gossip.synced().await;
        if r.local_published {
            self.retract_earlier_runs(r, synced.clone()).await;
        }
        // The records of each network, decoded (a bad one is skipped).
        let mut tables: BTreeMap<String, Vec<(String, EndpointRecord)>> = BTreeMap::new();
        for id in r.networks.keys() {
            let mut recs = Vec::new();
            for e in r.gossip.entries(id, ENDPOINTS).await {
                match serde_json::from_slice::<EndpointRecord>(&e.value) {
                    Ok(rec) => recs.push((e.key, rec)),
                    Err(err) => debug!("bad endpoint record {}: {err}", e.key),
                }
            }
            tables.insert(id.clone(), recs);
        }
        let Desired {
            by_vni,
            remotes,
            add_only,
            records,
            mut lb,
            published,
            mut sandboxes,
            ingress_vteps,
        } = desired(&r.networks, &tables, &synced, ingress_id.as_deref(), r.vtep);
        // The overlay first: a remote endpoint's ARP and FDB entries are in place before the
        // balancer, the routing mesh or DNS can send a connection to it. (With learning off,
        // proxy ARP answers from these entries only: a SYN sent before waits a second for
        // the task's ARP retry, or is lost if the task is gone by then.) Removing here is
        // safe too: a withdrawn endpoint keeps its entries for `LINGER`, well after the
        // balancer and DNS (below) dropped it. An error is returned once the rest is done.
        let remotes = linger(r, remotes);
        self.lingering.store(
            !r.lingering.is_empty(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let overlay = r
            .overlay
            .sync_remotes(&by_vni, &remotes, &add_only)
            .await
            .map_err(PlaneError::failed);
        // The VIPs of unsynced networks keep the backends they had (a task namespace adopted
        // after a restart keeps its table until its networks are synced: `plumb_adopted`).
        {
            let have = lock(&self.lb_vips);
            for (vip, old) in have.iter().filter(|(_, i)| {
                !synced.contains(&i.network_id) && r.networks.contains_key(&i.network_id)
            }) {
                let info = lb.entry(*vip).or_insert_with(|| old.clone());
                if info.network_id == old.network_id {
                    info.backends.extend(old.backends.iter().copied());
                    info.backends.sort();
                    info.backends.dedup();
                }
            }
        }
        // A VIP whose service has no endpoint left stays, empty, after its name is gone.
        self.keep_emptied_vips(&mut lb, &r.networks);
        // The tasks' return paths lead to every sandbox seen (and this node's own, also
        // before its record is in the table).
        if let Some(att) = lock(&self.ingress_att).as_ref() {
            sandboxes.insert(att.addr.ip);
        }
        lock(&self.sandboxes).extend(sandboxes);
        // Balancers first, then DNS: a name never points at a VIP the balancer does not know
        // yet, a removed task leaves the VIP before (or as) it leaves DNS, and a VIP leaves
        // the balancer only well after it left DNS (above).
        self.program_lb(&lb);
        self.sync_task_namespaces().await;
        self.dns.replace(records);
        // Tasks a restarted daemon adopted get their DNS sockets and balancer once their
        // networks are synced: answering from a partial record set would deny names that
        // exist, and their tables (left by the previous daemon) would lose VIPs.
        if self.plumb_adopted(&synced) {
            self.sync_task_namespaces().await;
        }
        if let Some(ing) = r.ingress.as_mut() {
            let host_ports = self.host_ports(&r.overlay);
            let mut entries: BTreeMap<(mesh_ingress::Proto, u16), mesh_ingress::PublishedEntry> =
                published
                    .into_iter()
                    .map(|((proto, port), (target, mut backends))| {
                        backends.sort();
                        backends.dedup();
                        let proto = ingress_proto(proto);
                        (
                            (proto, port),
                            mesh_ingress::PublishedEntry {
                                proto,
                                port,
                                target,
                                backends,
                            },
                        )
                    })
                    .collect();
            // Until the ingress network is synced, the ports (and backends) in force, adopted
            // from a previous daemon, stay: the tables may not list them yet.
            if ingress_id.as_ref().is_some_and(|id| !synced.contains(id)) {
                for old in ing.published() {
                    let key = (old.proto, old.port);
                    if host_ports.iter().any(|h| (h.proto, h.port) == key) {
                        continue;
                    }
                    let e = entries.entry(key).or_insert_with(|| old.clone());
                    if e.target == old.target {
                        e.backends.extend(old.backends.iter().copied());
                        e.backends.sort();
                        e.backends.dedup();
                    }
                }
            }
            let entries: Vec<mesh_ingress::PublishedEntry> = entries.into_values().collect();
            let res = tokio::task::block_in_place(|| ing.sync(&entries, &host_ports));
            if let Err(e) = res {
                warn!("routing mesh: {e}");
            }
            // The fast path after the nftables path: a port it passes on is always there.
            // Until the ingress network is synced, it keeps what it holds (a restarted
            // daemon's flows keep their tasks; the records do not list every VTEP yet).
            if ingress_id.as_ref().is_none_or(|id| synced.contains(id)) {
                self.sync_nodeport(r, &entries, &ingress_vteps).await;
            }
            let ports = entries.len() + host_ports.len();
            let backends: usize = entries.iter().map(|e| e.backends.len()).sum();
            self.metrics.ingress_ports.set(ports as i64);
            self.metrics.ingress_backends.set(backends as i64);
        }
        overlay
    }

    /// Host-mode ports of the local running tasks: straight to the task's gateway-bridge
    /// address.
    fn host_ports(&self, overlay: &Overlay) -> Vec<mesh_ingress::HostPort> {
        let local = lock(&self.local);
        let publishing: Vec<&Task> = local
            .iter()
            .flatten()
            .map(|(t, _)| t)
            .filter(|t| t.spec.ports.iter().any(|p| p.mode == PublishMode::Host))
            .collect();
        if publishing.is_empty() {
            // The common case on every gossip event: no lease file to read.
            return Vec::new();
        }
        let leases = overlay.gateway_leases().unwrap_or_default();
        let mut out = Vec::new();
        for t in publishing {
            let Some(dest) = leases.get(&t.id) else {
                continue;
            };
            for p in t.spec.ports.iter().filter(|p| p.mode == PublishMode::Host) {
                out.push(mesh_ingress::HostPort {
                    proto: ingress_proto(p.protocol),
                    port: p.published,
                    dest: *dest,
                    target: p.target,
                });
            }
        }
        out.sort();
        out.dedup_by_key(|h| (h.proto, h.port));
        out
    }

    /// Adds to `lb` the VIPs the balancer has whose service has no endpoint left, empty, for
    /// a while (see [`keep_emptied`]).
    fn keep_emptied_vips(
        &self,
        lb: &mut BTreeMap<Ipv4Addr, VipInfo>,
        networks: &BTreeMap<String, NetworkDesc>,
    ) {
        let have = lock(&self.lb_vips);
        let mut emptied = lock(&self.emptied);
        let now = std::time::Instant::now();
        for (vip, info) in keep_emptied(&have, &mut emptied, lb, networks, now) {
            info!(%vip, service = info.service, "VIP left without backends: refusing for {:?}", emptied_vip_linger());
        }
    }

    /// Makes the eBPF maps hold exactly `want` (each VIP, on every port, TCP and UDP, goes
    /// to one of its running tasks), touching only the VIPs that changed; records `want` for
    /// the per-namespace plumbing.
    fn program_lb(&self, want: &BTreeMap<Ipv4Addr, VipInfo>) {
        let mut have = lock(&self.lb_vips);
        let changed = want
            .iter()
            .filter(|(vip, info)| {
                have.get(vip)
                    .is_none_or(|old| old.backends != info.backends)
            })
            .count()
            + have.keys().filter(|v| !want.contains_key(v)).count();
        self.metrics.lb_updates.inc_by(changed as u64);
        // A per-task backend gets the VIPs with the task namespaces' pass.
        if !self.lb.per_task() {
            for (vip, info) in want {
                if have
                    .get(vip)
                    .is_some_and(|old| old.backends == info.backends)
                {
                    continue;
                }
                info!(%vip, service = info.service, backends = info.backends.len(), "VIP backends changed");
                let started = std::time::Instant::now();
                if let Err(e) = self.lb.set_vip(*vip, &info.backends) {
                    self.metrics.lb_update_errors.inc();
                    warn!(%vip, "programming the balancer: {e}");
                }
                self.metrics
                    .lb_update_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            for vip in have.keys().filter(|v| !want.contains_key(v)) {
                if let Err(e) = self.lb.remove_vip(*vip) {
                    debug!(%vip, "removing a VIP from the balancer: {e}");
                }
            }
        }
        *have = want.clone();
    }

    /// Brings every task namespace in line with the VIPs of its networks: `lo` addresses
    /// and, with nftables, its `mesh_lb` table. Namespaces whose process is gone are dropped.
    async fn sync_task_namespaces(&self) {
        let vips = lock(&self.lb_vips).clone();
        let sandboxes = lock(&self.sandboxes).clone();
        let mut jobs: Vec<(String, u32, Vec<Ipv4Addr>, Vec<Ipv4Addr>)> = Vec::new();
        // (task, pid, ingress interface, sandboxes to add, UDP ports to add)
        type ReturnJob = (String, u32, String, Vec<Ipv4Addr>, Vec<u16>);
        let mut returns: Vec<ReturnJob> = Vec::new();
        {
            let mut tasks = lock(&self.tasks);
            // Gone processes are dropped by the next `set_local` pass (see `events_loop`).
            for (id, ns) in tasks.iter_mut().filter(|(_, ns)| ns.alive()) {
                if let Some(ret) = &ns.ingress_return {
                    let add: Vec<Ipv4Addr> =
                        sandboxes.difference(&ret.sandboxes).copied().collect();
                    if !add.is_empty() || !ret.udp_pending.is_empty() {
                        returns.push((
                            id.clone(),
                            ns.pid,
                            ret.ifname.clone(),
                            add,
                            ret.udp_pending.clone(),
                        ));
                    }
                }
                let want: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> = vips
                    .iter()
                    .filter(|(_, i)| ns.nets.contains(&i.network_id))
                    .map(|(v, i)| (*v, i.backends.clone()))
                    .collect();
                if let Some(table) = ns.lb_table.as_mut() {
                    let started = std::time::Instant::now();
                    let res = tokio::task::block_in_place(|| table.sync(&want));
                    // Timed when it had something to write (the pass syncs every table).
                    if ns.lb_synced.as_ref() != Some(&want) {
                        self.metrics
                            .lb_update_duration
                            .observe(started.elapsed().as_secs_f64());
                    }
                    match res {
                        Ok(()) => ns.lb_synced = Some(want.clone()),
                        Err(e) => {
                            self.metrics.lb_update_errors.inc();
                            ns.lb_synced = None;
                            warn!(task = id, "{} balancer: {e}", self.lb.name());
                        }
                    }
                }
                let keys: BTreeSet<Ipv4Addr> = want.keys().copied().collect();
                let add: Vec<Ipv4Addr> = keys.difference(&ns.lo_vips).copied().collect();
                let del: Vec<Ipv4Addr> = ns.lo_vips.difference(&keys).copied().collect();
                if !add.is_empty() || !del.is_empty() {
                    jobs.push((id.clone(), ns.pid, add, del));
                }
            }
        }
        for (id, pid, add, del) in jobs {
            match set_lo_vips(pid, &add, &del).await {
                Ok(()) => {
                    if let Some(ns) = lock(&self.tasks).get_mut(&id) {
                        ns.lo_vips.extend(add);
                        for v in del {
                            ns.lo_vips.remove(&v);
                        }
                    }
                }
                Err(e) => debug!(task = id, "VIPs on lo: {e}"),
            }
        }
        for (id, pid, ifname, add, udp) in returns {
            let res = async {
                let ns = Netns::open(&proc_ns(pid)).map_err(PlaneError::failed)?;
                mesh_ingress::return_path::add_routes(&ns, &ifname, &add, &udp)
                    .await
                    .map_err(PlaneError::failed)
            }
            .await;
            match res {
                Ok(()) => {
                    if let Some(ret) = lock(&self.tasks)
                        .get_mut(&id)
                        .and_then(|ns| ns.ingress_return.as_mut())
                    {
                        ret.sandboxes.extend(add);
                        ret.udp_pending.clear();
                    }
                }
                Err(e) => debug!(task = id, "routing mesh return path: {e}"),
            }
        }
    }

    /// Plumbs the plane's side of a task's namespace: DNS sockets at 127.0.0.11:53, and the
    /// nftables balancer table with that backend. Called in the task's start gate, and for
    /// a task a restarted daemon adopts.
    fn plumb_task(&self, task: &Task, pid: u32) -> Result<(), PlaneError> {
        let ingress_id = self.ingress_net_id();
        let nets: Vec<(String, String)> = task
            .networks
            .iter()
            .filter(|a| Some(&a.network_id) != ingress_id.as_ref())
            .map(|a| (a.network_id.clone(), a.network_name.clone()))
            .collect();
        let ns = proc_ns(pid);
        let reg = if nets.is_empty() {
            None
        } else {
            let (udp, tcp) =
                mesh_dns::bind_in_netns(&ns).map_err(|e| PlaneError::context("embedded DNS", e))?;
            let _rt = self.dns_rt.enter();
            Some(
                self.dns
                    .register(&task.id, nets.clone(), udp, tcp)
                    .map_err(|e| PlaneError::context("embedded DNS", e))?,
            )
        };
        let lb_table = if self.lb.per_task() && !nets.is_empty() {
            let netns = Netns::open(&ns).map_err(PlaneError::failed)?;
            self.lb
                .for_task(netns)
                .map_err(|e| PlaneError::context(format!("{} balancer", self.lb.name()), e))?
        } else {
            None
        };
        let ingress_return = match ingress_return_of(task, ingress_id.as_deref()) {
            Some((ifname, addr, udp_pending)) => {
                let netns = Netns::open(&ns).map_err(PlaneError::failed)?;
                let shortcut = needs_gateway(task).then(|| mesh_ingress::return_path::Shortcut {
                    ifname: format!("eth{}", task.networks.len()),
                    addr,
                });
                mesh_ingress::return_path::setup_table(&netns, &ifname, shortcut.as_ref())
                    .map_err(|e| PlaneError::context("routing mesh return path", e))?;
                Some(IngressReturn {
                    ifname,
                    sandboxes: BTreeSet::new(),
                    udp_pending,
                    shortcut,
                })
            }
            None => None,
        };
        lock(&self.tasks).insert(
            task.id.clone(),
            TaskNs {
                pid,
                nets: nets.into_iter().map(|(id, _)| id).collect(),
                vnis: task.networks.iter().map(|a| a.vni).collect(),
                _dns: reg,
                lb_table,
                lb_synced: None,
                lo_vips: BTreeSet::new(),
                ingress_return,
            },
        );
        Ok(())
    }

    /// Publishes the starting records of task `id`, in its start gate (see `attach`), unless
    /// a pass did already.
    async fn announce_starting(&self, id: &str) {
        let records = match lock(&self.attaching).get(id) {
            Some(a) => a.records.clone(),
            None => return,
        };
        let mut guard = self.running.lock().await;
        let Some(r) = guard.as_mut() else {
            return;
        };
        for ((net, key), rec) in records {
            let k = (net, key);
            if r.published.contains_key(&k) {
                continue;
            }
            let v = match serde_json::to_vec(&rec) {
                Ok(v) => v,
                Err(e) => {
                    warn!("encoding endpoint {}: {e}", k.1);
                    continue;
                }
            };
            match r.gossip.put(&k.0, ENDPOINTS, &k.1, v).await {
                Ok(()) => {
                    r.published.insert(k, rec);
                }
                Err(e) => warn!("publishing endpoint {} on {}: {e}", k.1, k.0),
            }
        }
    }

    /// Retracts in the synced networks what a previous run of this daemon announced and this
    /// one did not (see `Gossip::retract_earlier_runs`); a previous run's network synced so
    /// is no longer kept for it.
    async fn retract_earlier_runs(&self, r: &Running, synced: BTreeSet<String>) {
        let n = r.gossip.retract_earlier_runs(synced.clone()).await;
        if n > 0 {
            info!(
                endpoints = n,
                "retracted endpoints a previous run announced and this one did not"
            );
        }
        lock(&self.earlier).retain(|id, _| !synced.contains(id));
    }

    /// Records the networks this run announces endpoints on (see [`GOSSIP_NETWORKS`]).
    fn save_networks(&self, nets: BTreeMap<String, u32>) {
        let mut saved = lock(&self.saved_networks);
        if *saved == nets {
            return;
        }
        let path = self.cfg.exec_root.join(GOSSIP_NETWORKS);
        let res = serde_json::to_vec(&nets)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, b)?;
                std::fs::rename(&tmp, &path)
            });
        match res {
            Ok(()) => *saved = nets,
            Err(e) => warn!(
                "cannot record the networks announced in {}: {e}",
                path.display()
            ),
        }
    }

    /// Plumbs the running tasks that have no plumbing yet (adopted by a restarted daemon)
    /// and whose networks are all synced; `true` if it plumbed any.
    fn plumb_adopted(&self, synced: &BTreeSet<String>) -> bool {
        let ingress_id = self.ingress_net_id();
        let missing: Vec<(Task, u32)> = {
            let local = lock(&self.local);
            let tasks = lock(&self.tasks);
            local
                .iter()
                .flatten()
                .filter(|(t, pid)| tasks.get(&t.id).is_none_or(|ns| ns.pid != *pid))
                .filter(|(t, _)| {
                    t.networks
                        .iter()
                        .filter(|a| Some(&a.network_id) != ingress_id.as_ref())
                        .all(|a| synced.contains(&a.network_id))
                })
                .cloned()
                .collect()
        };
        for (t, pid) in &missing {
            if let Err(e) = tokio::task::block_in_place(|| self.plumb_task(t, *pid)) {
                warn!(task = t.id, "re-plumbing an adopted task: {e}");
            }
        }
        !missing.is_empty()
    }

    /// Creates (or, after a restart, finds) the ingress sandbox, plugs it into the ingress
    /// overlay with this node's ingress address, and sets up the routing mesh.
    async fn ensure_ingress(&self, r: &mut Running) -> Result<(), PlaneError> {
        let Some(att) = lock(&self.ingress_att).clone() else {
            return Ok(());
        };
        if r.ingress.is_some() {
            return Ok(());
        }
        let (ip, desc) = attachment_desc(&att);
        let (pid, sandbox) = self.ingress_sandbox().await?;
        let h = Handle::new(&sandbox).await.map_err(PlaneError::failed)?;
        let plumbed = match h.link(SANDBOX_IF).await.map_err(PlaneError::failed)? {
            Some(_) => {
                let addrs = h.addresses(SANDBOX_IF).await.map_err(PlaneError::failed)?;
                if addrs.contains(&(ip, desc.prefix)) {
                    true
                } else {
                    h.del_link(SANDBOX_IF).await.map_err(PlaneError::failed)?;
                    false
                }
            }
            None => false,
        };
        if !plumbed {
            r.overlay
                .attach(
                    pid,
                    &Attachment {
                        network: desc,
                        ip,
                        ifname: SANDBOX_IF.into(),
                    },
                )
                .await
                .map_err(|e| PlaneError::context("ingress sandbox", e))?;
        }
        // Clients from the gateway bridge are this node's own tasks: masqueraded (a task
        // balanced to itself would drop its own address).
        let gw = mesh_overlay::DEFAULT_GW_SUBNET
            .split_once('/')
            .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)))
            .ok_or_else(|| PlaneError::failed("bad gateway subnet"))?;
        let cfg = mesh_ingress::IngressConfig {
            ingress_if: SANDBOX_IF.into(),
            masquerade_from: vec![gw],
            ..Default::default()
        };
        let host = Netns::current().map_err(PlaneError::failed)?;
        let ing = mesh_ingress::Ingress::setup(host, sandbox, cfg)
            .await
            .map_err(|e| PlaneError::context("routing mesh", e))?;
        info!(%ip, "ingress sandbox ready");
        r.ingress = Some(ing);
        Ok(())
    }

    /// Sets the routing mesh's eBPF fast path up (once) and gives it `entries`' backends on
    /// other nodes (their VTEPs from `vteps`).
    async fn sync_nodeport(
        &self,
        r: &mut Running,
        entries: &[mesh_ingress::PublishedEntry],
        vteps: &BTreeMap<Ipv4Addr, Ipv4Addr>,
    ) {
        if r.nodeport_failed {
            return;
        }
        if self.cfg.ingress_datapath == IngressDatapath::Nftables {
            // A previous daemon's fast path would keep taking connections: remove it once.
            r.nodeport_failed = true;
            match self.nodeport_plumbing(r).await {
                Ok(p) => {
                    let state = self.cfg.exec_root.join(NODEPORT_STATE);
                    tokio::task::block_in_place(|| {
                        mesh_lb::nodeport::NodePort::remove_leftover(&p, &state)
                    });
                }
                Err(e) => debug!("routing mesh: no leftover fast path to look for: {e}"),
            }
            return;
        }
        if r.nodeport.is_none() {
            match self.setup_nodeport(r).await {
                Ok(np) => r.nodeport = Some(np),
                Err(e) => {
                    r.nodeport_failed = true;
                    if self.cfg.ingress_datapath == IngressDatapath::Ebpf {
                        error!("routing mesh: --ingress-datapath ebpf: {e}");
                    } else {
                        warn!("routing mesh: eBPF fast path unavailable ({e}); nftables only");
                    }
                    return;
                }
            }
        }
        if r.nodeport.is_none() {
            return;
        }
        // The tasks VXLAN skips the overlay to reach: their ingress address -> the host's
        // end of their gateway veth (`mesh_ingress::return_path::Shortcut`). Without it
        // (say the gateway veths cannot be listed), none: VXLAN takes the VXLAN device.
        let local: BTreeMap<Ipv4Addr, u32> = match r.overlay.gateway_ports().await {
            Ok(gw_ports) => lock(&self.tasks)
                .iter()
                .filter(|(_, ns)| ns.alive())
                .filter_map(|(id, ns)| {
                    let sc = ns.ingress_return.as_ref()?.shortcut.as_ref()?;
                    Some((sc.addr, *gw_ports.get(id)?))
                })
                .collect(),
            Err(e) => {
                warn!("routing mesh: gateway veths: {e}");
                BTreeMap::new()
            }
        };
        let Some(np) = r.nodeport.as_mut() else {
            return;
        };
        let res = tokio::task::block_in_place(|| {
            // The ports do not wait on it: they are the fast path; this, a shortcut.
            if let Err(e) = np.set_local(&local) {
                warn!("{e}");
            }
            let mut want = BTreeSet::new();
            for e in entries {
                let proto = match e.proto {
                    mesh_ingress::Proto::Tcp => mesh_lb::Proto::Tcp,
                    mesh_ingress::Proto::Udp => mesh_lb::Proto::Udp,
                };
                let backends: Vec<mesh_lb::nodeport::NodePortBackend> = e
                    .backends
                    .iter()
                    .filter_map(|ip| {
                        Some(mesh_lb::nodeport::NodePortBackend {
                            ip: *ip,
                            port: e.target,
                            vtep: *vteps.get(ip)?,
                        })
                    })
                    .collect();
                want.insert((proto, e.port));
                np.set_port(proto, e.port, &backends)?;
            }
            for (proto, port) in np.ports() {
                if !want.contains(&(proto, port)) {
                    np.remove_port(proto, port)?;
                }
            }
            Ok::<(), mesh_lb::nodeport::NodePortError>(())
        });
        if let Err(e) = res {
            warn!("{e}");
        }
    }

    async fn setup_nodeport(&self, r: &Running) -> Result<mesh_lb::nodeport::NodePort, PlaneError> {
        let plumbing = self.nodeport_plumbing(r).await?;
        mesh_lb::nodeport::NodePort::ensure(plumbing, &self.cfg.exec_root.join(NODEPORT_STATE))
            .await
            .map_err(PlaneError::failed)
    }

    /// The ingress sandbox's holder (made if missing): its pid and network namespace.
    async fn ingress_sandbox(&self) -> Result<(u32, Netns), PlaneError> {
        let holders = self.holders.clone();
        let pid = tokio::task::spawn_blocking(move || holders.ensure(INGRESS_SANDBOX))
            .await
            .map_err(PlaneError::failed)?
            .map_err(PlaneError::failed)?;
        let sandbox = Netns::open(&proc_ns(pid)).map_err(PlaneError::failed)?;
        Ok((pid, sandbox))
    }

    /// Where the fast path plugs in on this node.
    async fn nodeport_plumbing(
        &self,
        r: &Running,
    ) -> Result<mesh_lb::nodeport::Plumbing, PlaneError> {
        let Some(att) = lock(&self.ingress_att).clone() else {
            return Err(PlaneError::failed("no ingress address"));
        };
        let (_, desc) = attachment_desc(&att);
        let (_, sandbox) = self.ingress_sandbox().await?;
        let host = Handle::new(&Netns::current().map_err(PlaneError::failed)?)
            .await
            .map_err(PlaneError::failed)?;
        let mut underlay = None;
        for l in host.links().await.map_err(PlaneError::failed)? {
            let addrs = host.addresses(&l.name).await.map_err(PlaneError::failed)?;
            if addrs.iter().any(|(a, _)| *a == r.vtep) {
                underlay = Some(l.name);
                break;
            }
        }
        let underlay =
            underlay.ok_or_else(|| PlaneError::failed(format!("no interface holds {}", r.vtep)))?;
        let ing = mesh_ingress::IngressConfig::default();
        Ok(mesh_lb::nodeport::Plumbing {
            node_ip: r.vtep,
            underlay_if: underlay,
            host_veth: ing.host_if,
            sandbox,
            sandbox_veth: ing.sandbox_if,
            sandbox_leg: SANDBOX_IF.into(),
            vni: desc.vni,
            vxlan_port: self.cfg.vxlan_port,
        })
    }

    /// Applies `running`, the newest running set (`local`, read under `local_seq` by the
    /// caller, which holds it).
    async fn set_local_async(&self, running: Vec<(Task, u32)>) -> Result<(), PlaneError> {
        let mut guard = self.running.lock().await;
        let Some(r) = guard.as_mut() else {
            // Not started yet (gossip still binding): `start_async` applies `local`.
            return Ok(());
        };
        // (Tasks a restarted daemon adopted are re-plumbed by `sync_remotes`, once their
        // networks are synced.)
        if let Err(e) = self.ensure_ingress(r).await {
            warn!("{e}");
        }
        let ingress_att = lock(&self.ingress_att).clone();
        let mut want: BTreeMap<(String, String), EndpointRecord> = BTreeMap::new();
        let mut networks = BTreeMap::new();
        for (t, _) in &running {
            for a in &t.networks {
                lock(&self.net_names).insert(a.network_id.clone(), a.network_name.clone());
                networks.insert(a.network_id.clone(), attachment_desc(a).1);
            }
            want.extend(task_records(t, ingress_att.as_ref(), r.vtep));
        }
        // A task in its start gate is announced as starting (see `attach`).
        let running_ids: BTreeSet<&str> = running.iter().map(|(t, _)| t.id.as_str()).collect();
        for (id, a) in lock(&self.attaching).iter() {
            if a.pending() && !running_ids.contains(id.as_str()) {
                for (k, rec) in &a.records {
                    want.entry(k.clone()).or_insert_with(|| rec.clone());
                }
            }
        }
        // The ingress sandbox is an endpoint of the ingress network on every node.
        if let (Some(att), Some(_)) = (&ingress_att, &r.ingress) {
            let (ip, desc) = attachment_desc(att);
            networks.insert(att.network_id.clone(), desc.clone());
            want.insert(
                (att.network_id.clone(), format!("ingress-sbox-{}", r.vtep)),
                EndpointRecord {
                    ip,
                    prefix: desc.prefix,
                    mac: mesh_netlink::mac_for_ip(ip),
                    vtep: r.vtep,
                    vni: desc.vni,
                    task_name: format!("ingress-sbox-{}", r.vtep),
                    service_name: String::new(),
                    service_id: String::new(),
                    vip: None,
                    ports: Vec::new(),
                    aliases: Vec::new(),
                    starting: false,
                },
            );
        }
        // A task withdrawn but still alive (draining before its stop) keeps its networks
        // joined: its own DNS lookups and VIP connections must keep working until it exits,
        // also when it was the node's last task on a network (the events loop's pass for
        // drained tasks leaves them once the process is gone).
        {
            let tasks = lock(&self.tasks);
            for ns in tasks.values().filter(|ns| ns.alive()) {
                for id in &ns.nets {
                    if !networks.contains_key(id) {
                        if let Some(d) = r.networks.get(id) {
                            networks.insert(id.clone(), d.clone());
                        }
                    }
                }
            }
        }
        // A task in its start gate keeps its networks joined (see `attach`).
        for a in lock(&self.attaching).values().filter(|a| a.pending()) {
            for (id, d) in &a.networks {
                networks.entry(id.clone()).or_insert_with(|| d.clone());
            }
        }
        // A previous run's networks stay joined until its entries there are retracted.
        let earlier = lock(&self.earlier).clone();
        let mut ids: BTreeSet<String> = networks.keys().cloned().collect();
        ids.extend(earlier.keys().cloned());
        r.gossip.set_networks(ids.clone()).await;
        let mut announced: BTreeMap<String, u32> =
            networks.iter().map(|(id, d)| (id.clone(), d.vni)).collect();
        announced.extend(earlier.iter().map(|(id, v)| (id.clone(), *v)));
        self.save_networks(announced);
        for ((net, key), rec) in &want {
            if r.published.get(&(net.clone(), key.clone())) != Some(rec) {
                let v = serde_json::to_vec(rec).map_err(PlaneError::failed)?;
                if let Err(e) = r.gossip.put(net, ENDPOINTS, key, v).await {
                    warn!("publishing endpoint {key} on {net}: {e}");
                }
            }
        }
        // Withdrawn wherever gossip still has the network: also one kept joined only for a
        // previous run's records (`earlier`), where a task the leader stopped before the
        // network synced would otherwise stay announced under this run's generation, and
        // reach every node once the network syncs (a network left takes this node's
        // records with it).
        for (net, key) in r.published.keys() {
            if !want.contains_key(&(net.clone(), key.clone())) && ids.contains(net) {
                if let Err(e) = r.gossip.delete(net, ENDPOINTS, key).await {
                    debug!("withdrawing endpoint {key} on {net}: {e}");
                }
            }
        }
        // Announced: the agent may now report these tasks Running (and the leader stop
        // what they replace).
        let now: BTreeSet<String> = want
            .iter()
            .filter(|(_, rec)| !rec.starting)
            .map(|((_, key), _)| key.clone())
            .collect();
        let more = !now.is_subset(&lock(&self.announced));
        *lock(&self.announced) = now;
        if more {
            if let Some(wake) = lock(&self.announce_wake).as_ref() {
                wake.notify_one();
            }
        }
        r.published = want;
        r.local_published = true;
        // What an earlier run of this daemon announced and this one did not again is gone
        // (a task stopped while it was away): retracted now rather than after the others'
        // grace (`mesh_gossip::core::RESTART_GRACE`).
        let synced = r.gossip.synced().await;
        self.retract_earlier_runs(r, synced).await;
        let mut keep: BTreeSet<u32> = networks.values().map(|d| d.vni).collect();
        keep.extend(earlier.values());
        let mut ids: BTreeSet<String> = running.iter().map(|(t, _)| t.id.clone()).collect();
        {
            // A task still in its start gate keeps its networks and gateway port (bounded:
            // a start whose process is gone, or that never completes, is forgotten).
            let mut attaching = lock(&self.attaching);
            attaching.retain(|id, a| !ids.contains(id) && a.pending());
            for (id, a) in attaching.iter() {
                keep.extend(&a.vnis);
                ids.insert(id.clone());
            }
            // Tasks withdrawn but still draining keep their plumbing until they exit.
            let mut tasks = lock(&self.tasks);
            tasks.retain(|_, ns| ns.alive());
            for (id, ns) in tasks.iter() {
                keep.extend(&ns.vnis);
                ids.insert(id.clone());
            }
        }
        r.networks = networks;
        // Only while the agent says an uncounted task runs: a task plugged in that is gone
        // (its namespace torn down by the kernel later, under load seconds later) holds
        // nothing.
        let plugged = if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            r.overlay
                .gc_unplugged(&keep)
                .await
                .map_err(PlaneError::failed)?
        } else {
            r.overlay.gc(&keep).await.map_err(PlaneError::failed)?;
            BTreeSet::new()
        };
        self.overlay_plugged
            .store(!plugged.is_empty(), std::sync::atomic::Ordering::Relaxed);
        r.overlay
            .gc_gateway(&ids)
            .await
            .map_err(PlaneError::failed)?;
        drop(guard);
        self.sync_remotes().await
    }
}

/// Adds to `lb` (the VIPs the tables list now) those of `have` (what the balancer holds) it
/// lacks, with no backend, for [`emptied_vip_linger`] from when they lost their last one
/// (`emptied` remembers when): DNS no longer answers them, but a client that resolved one just
/// before is refused at once rather than sent nowhere. Only while this node is on the VIP's
/// network (its tasks there are the only callers), and until a backend comes back. Returns
/// the VIPs emptied by this pass.
fn keep_emptied(
    have: &BTreeMap<Ipv4Addr, VipInfo>,
    emptied: &mut BTreeMap<Ipv4Addr, (VipInfo, std::time::Instant)>,
    lb: &mut BTreeMap<Ipv4Addr, VipInfo>,
    networks: &BTreeMap<String, NetworkDesc>,
    now: std::time::Instant,
) -> Vec<(Ipv4Addr, VipInfo)> {
    let mut new = Vec::new();
    for (vip, old) in have.iter().filter(|(vip, _)| !lb.contains_key(vip)) {
        emptied.entry(*vip).or_insert_with(|| {
            let info = VipInfo {
                backends: Vec::new(),
                ..old.clone()
            };
            new.push((*vip, info.clone()));
            (info, now)
        });
    }
    emptied.retain(|vip, (info, since)| {
        !lb.contains_key(vip)
            && networks.contains_key(&info.network_id)
            && now.duration_since(*since) < emptied_vip_linger()
    });
    for (vip, (info, _)) in emptied.iter() {
        lb.insert(*vip, info.clone());
    }
    new.retain(|(vip, _)| emptied.contains_key(vip));
    new
}

/// The remotes to program: `current`, plus endpoints withdrawn less than [`LINGER`] ago whose
/// address no current endpoint took over.
fn linger(
    r: &mut Running,
    current: BTreeMap<u32, BTreeSet<Remote>>,
) -> BTreeMap<u32, BTreeSet<Remote>> {
    let now = std::time::Instant::now();
    let live: BTreeSet<(u32, Ipv4Addr)> = current
        .iter()
        .flat_map(|(vni, set)| set.iter().map(move |rm| (*vni, rm.ip)))
        .collect();
    for (vni, set) in &r.last_remotes {
        for rm in set {
            if !live.contains(&(*vni, rm.ip)) {
                r.lingering
                    .entry((*vni, rm.ip))
                    .or_insert((rm.clone(), now));
            }
        }
    }
    r.lingering
        .retain(|k, (_, since)| !live.contains(k) && now.duration_since(*since) < LINGER);
    r.last_remotes = current.clone();
    let mut out = current;
    for ((vni, _), (rm, _)) in &r.lingering {
        out.entry(*vni).or_default().insert(rm.clone());
    }
    out
}

/// What one plane pass derives from the endpoint records (see [`desired`]).
#[derive(Debug, Default)]
struct Desired {
    /// The networks with a local endpoint, by VNI.
    by_vni: BTreeMap<u32, NetworkDesc>,
    /// The remote endpoints of each network (by VNI): its ARP and FDB entries.
    remotes: BTreeMap<u32, BTreeSet<Remote>>,
    /// Networks whose tables are not synced yet: entries are added, none deleted.
    add_only: BTreeSet<u32>,
    /// The embedded DNS's names.
    records: mesh_dns::Records,
    /// The VIPs and their backends.
    lb: BTreeMap<Ipv4Addr, VipInfo>,
    /// The routing mesh: (protocol, published port) -> (target port, backends).
    published: BTreeMap<(Protocol, u16), (u16, Vec<Ipv4Addr>)>,
    /// The ingress sandboxes' addresses on the ingress network.
    sandboxes: BTreeSet<Ipv4Addr>,
    /// The ingress network's tasks: address -> their node's VTEP.
    ingress_vteps: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

/// Derives the overlay's remotes, the DNS names, the VIP backends and the routing mesh's
/// ports of this node (VTEP `vtep`) from the endpoint records of each of its `networks`
/// (`tables`: network ID -> (key, record)). Pure: no I/O, no lock.
fn desired(
    networks: &BTreeMap<String, NetworkDesc>,
    tables: &BTreeMap<String, Vec<(String, EndpointRecord)>>,
    synced: &BTreeSet<String>,
    ingress_id: Option<&str>,
    vtep: Ipv4Addr,
) -> Desired {
    let mut by_vni: BTreeMap<u32, NetworkDesc> = BTreeMap::new();
    let mut remotes: BTreeMap<u32, BTreeSet<Remote>> = BTreeMap::new();
    let mut records = mesh_dns::Records::new();
    let mut lb: BTreeMap<Ipv4Addr, VipInfo> = BTreeMap::new();
    let mut published: BTreeMap<(Protocol, u16), (u16, Vec<Ipv4Addr>)> = BTreeMap::new();
    // Unsynced networks get the ARP/FDB entries of what their tables list, and lose
    // none: a task just started on a network new to this node is in the others' VIPs
    // at once, and its replies need a way back before the first push-pull completes.
    let mut add_only: BTreeSet<u32> = BTreeSet::new();
    let mut sandboxes: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut ingress_vteps: BTreeMap<Ipv4Addr, Ipv4Addr> = BTreeMap::new();
    for (id, desc) in networks {
        by_vni.insert(desc.vni, desc.clone());
        if !synced.contains(id) {
            add_only.insert(desc.vni);
        }
        let mut set = BTreeSet::new();
        let is_ingress = ingress_id == Some(id.as_str());
        let mut services: BTreeMap<String, (Option<Ipv4Addr>, Vec<mesh_dns::TaskRecord>)> =
            BTreeMap::new();
        let mut aliases: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (key, rec) in tables.get(id).into_iter().flatten() {
            if rec.vtep != vtep {
                set.insert(Remote {
                    ip: rec.ip,
                    mac: rec.mac,
                    vtep: rec.vtep,
                });
            }
            if rec.starting {
                continue;
            }
            if rec.service_id.is_empty() {
                if is_ingress {
                    sandboxes.insert(rec.ip);
                }
                continue;
            }
            if is_ingress {
                // The routing mesh: each published port goes to every task publishing it.
                ingress_vteps.insert(rec.ip, rec.vtep);
                for p in rec.ports.iter().filter(|p| p.mode == PublishMode::Ingress) {
                    let e = published
                        .entry((p.protocol, p.published))
                        .or_insert((p.target, Vec::new()));
                    e.1.push(rec.ip);
                }
                continue;
            }
            if !rec.aliases.is_empty() {
                aliases
                    .entry(rec.service_name.clone())
                    .or_default()
                    .extend(rec.aliases.iter().cloned());
            }
            let entry = services.entry(rec.service_name.clone()).or_default();
            entry.0 = entry.0.or(rec.vip);
            entry.1.push(mesh_dns::TaskRecord {
                name: rec.task_name.clone(),
                hostname: key.chars().take(12).collect(),
                ip: rec.ip,
            });
        }
        for (name, (vip, tasks)) in services {
            if let Some(v) = vip {
                let mut backends: Vec<Ipv4Addr> = tasks.iter().map(|t| t.ip).collect();
                backends.sort();
                backends.dedup();
                lb.insert(
                    v,
                    VipInfo {
                        network_id: id.clone(),
                        service: name.clone(),
                        backends,
                    },
                );
            }
            // An alias answers as the service's name does (its VIP, `tasks.ALIAS`).
            for alias in aliases.get(&name).into_iter().flatten() {
                if alias != &name {
                    records.put_service(
                        id,
                        mesh_dns::ServiceRecord {
                            name: alias.clone(),
                            vip,
                            dnsrr: vip.is_none(),
                            tasks: tasks.clone(),
                        },
                    );
                }
            }
            let service = mesh_dns::ServiceRecord {
                name,
                vip,
                dnsrr: vip.is_none(),
                tasks,
            };
            records.put_service(id, service);
        }
        remotes.insert(desc.vni, set);
    }
    Desired {
        by_vni,
        remotes,
        add_only,
        records,
        lb,
        published,
        sandboxes,
        ingress_vteps,
    }
}

/// The records a local task publishes, by (network ID, task ID): one per network it is
/// attached to (with its ports on the ingress network, `ingress`).
fn task_records(
    t: &Task,
    ingress: Option<&NetworkAttachment>,
    vtep: Ipv4Addr,
) -> Vec<((String, String), EndpointRecord)> {
    let mut out = Vec::new();
    for a in &t.networks {
        let (ip, desc) = attachment_desc(a);
        let on_ingress = ingress.is_some_and(|i| i.network_id == a.network_id);
        let rec = EndpointRecord {
            ip,
            prefix: desc.prefix,
            mac: mesh_netlink::mac_for_ip(ip),
            vtep,
            vni: desc.vni,
            task_name: t.name(),
            service_name: t.service_name.clone(),
            service_id: t.service_id.clone(),
            vip: a.vip.map(|v| v.ip),
            ports: if on_ingress {
                t.spec
                    .ports
                    .iter()
                    .filter(|p| p.mode == PublishMode::Ingress)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            },
            aliases: t
                .spec
                .aliases
                .get(&a.network_name)
                .cloned()
                .unwrap_or_default(),
            starting: false,
        };
        out.push(((a.network_id.clone(), t.id.clone()), rec));
    }
    out
}

/// For a task on the ingress network that publishes ports in ingress mode: its interface on
/// that network (`ethN`, N its place among the task's attachments, as `attach` names them)
/// and the UDP target ports whose replies must leave from its ingress address. A UDP target
/// port the task also publishes in host mode is left out: its host-mode clients are answered
/// through the gateway bridge, and its replies to routing-mesh clients then are not (a
/// known limit: `mesh_ingress::return_path::add_routes`).
fn ingress_return_of(
    task: &Task,
    ingress_id: Option<&str>,
) -> Option<(String, Ipv4Addr, Vec<u16>)> {
    let i = task
        .networks
        .iter()
        .position(|a| Some(a.network_id.as_str()) == ingress_id)?;
    let addr = task.networks[i].addr.ip;
    let ingress: Vec<&PortConfig> = task
        .spec
        .ports
        .iter()
        .filter(|p| p.mode == PublishMode::Ingress)
        .collect();
    if ingress.is_empty() {
        return None;
    }
    let host_udp: BTreeSet<u16> = task
        .spec
        .ports
        .iter()
        .filter(|p| p.mode == PublishMode::Host && p.protocol == Protocol::Udp)
        .map(|p| p.target)
        .collect();
    let udp: BTreeSet<u16> = ingress
        .iter()
        .filter(|p| p.protocol == Protocol::Udp && !host_udp.contains(&p.target))
        .map(|p| p.target)
        .collect();
    Some((format!("eth{i}"), addr, udp.into_iter().collect()))
}

/// Adds and removes /32 VIPs on `lo` inside `/proc/<pid>/ns/net`.
async fn set_lo_vips(pid: u32, add: &[Ipv4Addr], del: &[Ipv4Addr]) -> Result<(), PlaneError> {
    let ns = Netns::open(&proc_ns(pid)).map_err(PlaneError::failed)?;
    let h = Handle::new(&ns).await.map_err(PlaneError::failed)?;
    for v in add {
        h.add_address("lo", *v, 32)
            .await
            .map_err(PlaneError::failed)?;
    }
    for v in del {
        h.del_address("lo", *v, 32)
            .await
            .map_err(PlaneError::failed)?;
    }
    Ok(())
}

impl NetworkPlane for Plane {
    fn start(&self, me: PlaneIdentity) -> Result<(), PlaneError> {
        if me.addr.is_unspecified() {
            return Err(PlaneError::Invalid(
                "no IPv4 advertise address: the overlay needs one".into(),
            ));
        }
        lock(&self.0.filter_state).active = true;
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            if let Err(e) = this.start_async(me).await {
                warn!("network plane: {e}");
            }
        });
        Ok(())
    }

    fn stop(&self) {
        lock(&self.0.filter_state).active = false;
        self.0.ready.send_replace(false);
        self.0.keys.send_replace(Vec::new());
        self.0.gossip.take();
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            let filter_gone = {
                let this = this.clone();
                tokio::task::spawn_blocking(move || {
                    let mut st = lock(&this.filter_state);
                    if st.active {
                        // Joined a swarm again meanwhile.
                        return Ok(());
                    }
                    st.members = None;
                    st.wanted = None;
                    this.filter.remove()
                })
            };
            match filter_gone.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("underlay filter removal: {e}"),
                Err(e) => warn!("underlay filter removal: {e}"),
            }
            if let Some(mut r) = this.running.lock().await.take() {
                r.stop.send_replace(true);
                r.gossip.leave().await;
                let tunnel = this.tunnel.take();
                if let Some(t) = tunnel {
                    if let Err(e) = t.stop(r.overlay.host()).await {
                        warn!("encryption tunnel teardown: {e}");
                    }
                }
                if let Some(np) = r.nodeport.take() {
                    let state = this.cfg.exec_root.join(NODEPORT_STATE);
                    let _ = tokio::task::spawn_blocking(move || np.detach(&state)).await;
                }
                if let Some(ing) = r.ingress.take() {
                    if let Err(e) = ing.teardown().await {
                        warn!("routing mesh teardown: {e}");
                    }
                }
                let holders = this.holders.clone();
                let _ = tokio::task::spawn_blocking(move || holders.remove(INGRESS_SANDBOX)).await;
                if let Err(e) = r.overlay.gc(&BTreeSet::new()).await {
                    warn!("overlay cleanup: {e}");
                }
            }
            *lock(&this.ingress_att) = None;
            let _ = std::fs::remove_file(this.cfg.exec_root.join(INGRESS_STATE));
            let _ = std::fs::remove_file(this.cfg.exec_root.join(GOSSIP_NETWORKS));
            lock(&this.saved_networks).clear();
            lock(&this.earlier).clear();
        });
    }

    fn set_gossip_keys(&self, keys: Vec<GossipKey>) {
        let keys: Vec<mesh_gossip::Key> = keys
            .into_iter()
            .filter_map(|k| {
                Some(mesh_gossip::Key {
                    id: k.id,
                    secret: k.secret.as_slice().try_into().ok()?,
                })
            })
            .collect();
        info!(ids = ?keys.iter().map(|k| k.id).collect::<Vec<_>>(), "gossip keys");
        // Stored first; each component reads the newest under its slot's lock.
        self.0.keys.send_replace(keys);
        self.0.gossip.update(|g| g.set_keys(&self.0.keys.borrow()));
        self.0
            .tunnel
            .update(|t| t.set_keys(&tunnel_keys(&self.0.keys.borrow())));
    }

    fn set_members(&self, addrs: Vec<Ipv4Addr>) {
        let this = self.0.clone();
        let want: BTreeSet<Ipv4Addr> = addrs.into_iter().collect();
        if want.is_empty() {
            return;
        }
        *lock(&self.0.members) = want.clone();
        self.0
            .tunnel
            .update(|t| t.set_peers(lock(&self.0.members).clone()));
        {
            let mut st = lock(&self.0.filter_state);
            if !st.active {
                return;
            }
            st.wanted = Some(want);
        }
        self.0.rt.spawn_blocking(move || this.apply_filter());
    }

    fn sync_members(&self) {
        self.0.apply_filter();
    }

    fn clean_leftovers(&self) {
        if let Err(e) = self.0.filter.remove() {
            warn!("removing a leftover underlay filter: {e}");
        }
        let port = self.0.cfg.vxlan_port;
        // Runs to the end before returning (the caller blocks): a swarm joined right after
        // must not lose what it sets up.
        let host = match Netns::current() {
            Ok(ns) => ns,
            Err(e) => {
                warn!("removing what a swarm left: {e}");
                return;
            }
        };
        let links = self.0.rt.block_on(async {
            let h = match Handle::new(&host).await {
                Ok(h) => h,
                Err(e) => {
                    warn!("removing what a swarm left: {e}");
                    return Vec::new();
                }
            };
            if let Err(e) = mesh_overlay::crypt::remove_routing(&h, port).await {
                warn!("removing a leftover encryption tunnel route: {e}");
            }
            h.links().await.unwrap_or_default()
        });
        // A fast path whose daemon was killed stays attached to the host's interfaces.
        let names: Vec<String> = links.into_iter().map(|l| l.name).collect();
        mesh_lb::nodeport::remove_leftovers(&names, &self.0.cfg.exec_root.join(NODEPORT_STATE));
        // The routing mesh's rules in the host namespace, then every namespace the swarm held
        // (the ingress sandbox with its veth and filters, the overlays with their VXLAN
        // devices): as `stop` removes them when the node leaves.
        if let Err(e) = mesh_ingress::remove_host_leftovers(&host) {
            warn!("removing the routing mesh's leftover rules: {e}");
        }
        for (name, _) in self.0.holders.list() {
            match self.0.holders.remove(&name) {
                Ok(()) => info!(name, "removed a network namespace the swarm left"),
                Err(e) => warn!(name, "removing a leftover network namespace: {e}"),
            }
        }
        for file in [INGRESS_STATE, GOSSIP_NETWORKS] {
            let _ = std::fs::remove_file(self.0.cfg.exec_root.join(file));
        }
    }

    fn gossip_info(&self) -> Option<mesh_api::GossipInfo> {
        let g = self.0.gossip.get()?;
        let s = g.stats();
        Some(mesh_api::GossipInfo {
            encrypted: g.encrypted(),
            key_ids: g.key_ids(),
            udp_in: s.udp_in,
            udp_out: s.udp_out,
            malformed: s.malformed,
            foreign: s.foreign,
            bad_tag: s.bad_tag,
            unknown_key: s.unknown_key,
            unsealed: s.unsealed,
            no_key: s.no_key,
            syncs: s.syncs,
            sync_failures: s.sync_failures,
            members: lock(&self.0.filter_state)
                .members
                .iter()
                .flatten()
                .map(|a| a.to_string())
                .collect(),
        })
    }

    fn attach(&self, task: &Task, pid: u32) -> Result<(), PlaneError> {
        let mut ready = self.0.ready.subscribe();
        let this = self.0.clone();
        self.0.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(15), ready.wait_for(|r| *r))
                .await
                .map_err(|_| PlaneError::NotReady)?
                .map_err(|_| PlaneError::Stopped)?;
            // Registered under the plane's lock, so no garbage collection pass that started
            // without this task can run between the registration and the plumbing.
            // The task's networks are joined in gossip now, so that its node's tables of a
            // network new to it are complete before the task's command runs (below).
            let (overlay, gossip, joined) = {
                let mut guard = this.running.lock().await;
                let r = guard.as_mut().ok_or(PlaneError::Stopped)?;
                let networks: BTreeMap<String, NetworkDesc> = task
                    .networks
                    .iter()
                    .map(|a| (a.network_id.clone(), attachment_desc(a).1))
                    .collect();
                let joined = networks.keys().any(|id| !r.networks.contains_key(id));
                for (id, d) in &networks {
                    r.networks.entry(id.clone()).or_insert_with(|| d.clone());
                }
                let ingress_att = lock(&this.ingress_att).clone();
                let records = task_records(task, ingress_att.as_ref(), r.vtep)
                    .into_iter()
                    .map(|(k, rec)| {
                        (
                            k,
                            EndpointRecord {
                                starting: true,
                                ..rec
                            },
                        )
                    })
                    .collect();
                lock(&this.attaching).insert(
                    task.id.clone(),
                    Attaching {
                        since: std::time::Instant::now(),
                        pid,
                        vnis: task.networks.iter().map(|a| a.vni).collect(),
                        networks,
                        records,
                    },
                );
                let mut ids: BTreeSet<String> = r.networks.keys().cloned().collect();
                ids.extend(lock(&this.earlier).keys().cloned());
                r.gossip.set_networks(ids).await;
                (r.overlay.clone(), r.gossip.clone(), joined)
            };
            // Announced as starting now, first, while the whole plumbing runs: the other
            // nodes then program the task's address before its command can send a first
            // packet (an answer to an address their overlays do not hold waits for the ARP
            // retry). No name or VIP leads here until the agent's running set does; a start
            // that fails drops the records with the next pass.
            this.announce_starting(&task.id).await;
            for (i, a) in task.networks.iter().enumerate() {
                let (ip, network) = attachment_desc(a);
                overlay
                    .attach(
                        pid,
                        &Attachment {
                            network,
                            ip,
                            ifname: format!("eth{i}"),
                        },
                    )
                    .await
                    .map_err(|e| PlaneError::context(format!("network {}", a.network_name), e))?;
            }
            // As Docker's docker_gwbridge: a task on an overlay (or publishing a host-mode
            // port) also gets a default route out through its host, masqueraded.
            if needs_gateway(task) {
                overlay
                    .attach_gateway(pid, &task.id, &format!("eth{}", task.networks.len()))
                    .await
                    .map_err(|e| PlaneError::context("gateway bridge", e))?;
            }
            // A network new to this node: its tables are filled by the first push-pull with
            // a member; until then the task's names would not resolve and its VIPs would
            // have no backends, so its command waits for that (bounded), and for a pass
            // that programs what the tables hold.
            let want: BTreeSet<&String> = task.networks.iter().map(|a| &a.network_id).collect();
            if joined {
                let t0 = std::time::Instant::now();
                loop {
                    let synced = gossip.synced().await;
                    if want.iter().all(|id| synced.contains(*id)) {
                        break;
                    }
                    if t0.elapsed() >= ATTACH_SYNC {
                        warn!(
                            task = task.id,
                            "the task's networks are not synced after {ATTACH_SYNC:?}; starting it anyway"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                debug!(task = task.id, waited = ?t0.elapsed(), "networks joined for a task");
                if let Err(e) = this.sync_remotes().await {
                    warn!("data plane sync: {e}");
                }
            }
            tokio::task::block_in_place(|| this.plumb_task(task, pid))?;
            // The task's VIPs on lo, and its balancer table, before its command runs.
            this.sync_task_namespaces().await;
            Ok(())
        })
    }

    fn set_local(&self, running: Vec<(Task, u32)>) {
        // Stored here, in the order the agent gives them; each pass then applies the newest
        // set under `local_seq`, whatever order the spawned passes run in. (A pass that
        // applied the set it was spawned with could run after a later one and bring back an
        // endpoint the later one withdrew: the churn soak saw a restarted manager's store
        // seed, `Agent::seed_plane`, applied after the leader's answer, and a stopped task
        // stay in every node's VIP for 20 s.)
        *lock(&self.0.local) = Some(running);
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            let _seq = this.local_seq.lock().await;
            let Some(running) = lock(&this.local).clone() else {
                return;
            };
            if let Err(e) = this.set_local_async(running).await {
                warn!("network plane: {e}");
            }
        });
    }

    fn set_draining(&self, draining: bool) {
        self.0
            .draining
            .store(draining, std::sync::atomic::Ordering::Relaxed);
    }

    fn announced(&self, task_id: &str) -> bool {
        lock(&self.0.announced).contains(task_id)
    }

    fn on_announced(&self, wake: Arc<tokio::sync::Notify>) {
        *lock(&self.0.announce_wake) = Some(wake);
    }

    fn set_ingress(&self, ingress: Option<NetworkAttachment>) {
        let path = self.0.cfg.exec_root.join(INGRESS_STATE);
        let saved = match &ingress {
            Some(a) => serde_json::to_vec(a)
                .map_err(std::io::Error::other)
                .and_then(|b| {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, b)?;
                    std::fs::rename(&tmp, &path)
                }),
            None => std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        if let Err(e) = saved {
            warn!(
                "cannot save the ingress attachment in {}: {e}",
                path.display()
            );
        }
        *lock(&self.0.ingress_att) = ingress;
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            let _seq = this.local_seq.lock().await;
            // Applied with the next running set if the agent has not given one yet.
            let Some(running) = lock(&this.local).clone() else {
                return;
            };
            if let Err(e) = this.set_local_async(running).await {
                warn!("network plane: {e}");
            }
        });
    }

    fn vip_ls(&self) -> Result<Vec<mesh_api::VipEntry>, PlaneError> {
        let names = lock(&self.0.lb_vips).clone();
        let lb = &self.0.lb;
        let entries: Vec<mesh_lb::ServiceEntry> = if lb.per_task() {
            // Every task namespace holds its networks' VIPs: show each VIP once.
            let mut seen = BTreeMap::new();
            let tasks = lock(&self.0.tasks);
            for ns in tasks.values() {
                if let Some(table) = &ns.lb_table {
                    for e in table.dump().map_err(PlaneError::failed)? {
                        seen.entry((e.vip, e.port, e.proto)).or_insert(e);
                    }
                }
            }
            seen.into_values().collect()
        } else {
            lb.dump().map_err(PlaneError::failed)?
        };
        let backend = lb.name();
        Ok(entries
            .into_iter()
            .map(|e| mesh_api::VipEntry {
                service: names
                    .get(&e.vip)
                    .map(|i| i.service.clone())
                    .unwrap_or_default(),
                vip: e.vip.to_string(),
                port: if e.port == 0 {
                    "*".to_string()
                } else {
                    e.port.to_string()
                },
                protocol: format!("{:?}", e.proto).to_lowercase(),
                backends: e.backends.iter().map(|(ip, _)| ip.to_string()).collect(),
                balancer: backend.to_string(),
            })
            .collect())
    }

    fn dns_query(
        &self,
        network: Option<&str>,
        name: &str,
        qtype: &str,
    ) -> Result<mesh_api::DnsAnswer, PlaneError> {
        let mut nets: Vec<(String, String)> = lock(&self.0.net_names)
            .iter()
            .map(|(id, n)| (id.clone(), n.clone()))
            .collect();
        if let Some(want) = network {
            nets.retain(|(id, n)| n == want || id == want);
            if nets.is_empty() {
                return Err(PlaneError::NotFound(format!(
                    "no task on network {want} runs on this node"
                )));
            }
        }
        let a = self
            .0
            .rt
            .block_on(self.0.dns.query(&nets, name, qtype))
            .map_err(|e| match e {
                mesh_dns::DnsError::InvalidName { .. } | mesh_dns::DnsError::InvalidType(_) => {
                    PlaneError::Invalid(e.to_string())
                }
                other => PlaneError::failed(other),
            })?;
        Ok(mesh_api::DnsAnswer {
            name: a.name,
            qtype: a.qtype,
            rcode: a.rcode,
            answers: a.answers,
            forwarded: a.forwarded,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn vip(net: &str, service: &str, backends: &[[u8; 4]]) -> VipInfo {
        VipInfo {
            network_id: net.into(),
            service: service.into(),
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
        }
    }

    fn nets(ids: &[&str]) -> BTreeMap<String, NetworkDesc> {
        ids.iter()
            .map(|id| {
                let desc = NetworkDesc {
                    vni: 4096,
                    gateway: Ipv4Addr::new(10, 0, 1, 1),
                    prefix: 24,
                    encrypted: false,
                };
                (id.to_string(), desc)
            })
            .collect()
    }

    const ME: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

    /// A record of task `key` of `service` (VIP `vip`) at `ip` on node `vtep`.
    fn rec(
        key: &str,
        service: &str,
        ip: [u8; 4],
        vtep: Ipv4Addr,
        vip: Option<[u8; 4]>,
    ) -> (String, EndpointRecord) {
        let ip = Ipv4Addr::from(ip);
        let record = EndpointRecord {
            ip,
            prefix: 24,
            mac: mesh_netlink::mac_for_ip(ip),
            vtep,
            vni: 4096,
            task_name: format!("{service}.1.{key}"),
            service_name: service.into(),
            service_id: if service.is_empty() {
                String::new()
            } else {
                format!("id-{service}")
            },
            vip: vip.map(Ipv4Addr::from),
            ports: Vec::new(),
            aliases: Vec::new(),
            starting: false,
        };
        (key.to_string(), record)
    }

    fn remote_ips(d: &Desired, vni: u32) -> Vec<Ipv4Addr> {
        d.remotes
            .get(&vni)
            .into_iter()
            .flatten()
            .map(|r| r.ip)
            .collect()
    }

    fn dns_ips(d: &Desired, net: &str, service: &str) -> Vec<Ipv4Addr> {
        d.records
            .service(net, service)
            .map(|s| s.tasks.iter().map(|t| t.ip).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_starting_endpoint_is_an_address_to_program_but_no_name_or_backend() {
        let networks = nets(&["n1"]);
        let vip = Ipv4Addr::new(10, 0, 1, 2);
        let (k, mut starting) = rec("t3", "web", [10, 0, 1, 7], PEER, Some([10, 0, 1, 2]));
        starting.starting = true;
        let tables = BTreeMap::from([(
            "n1".to_string(),
            vec![
                rec("t1", "web", [10, 0, 1, 5], PEER, Some([10, 0, 1, 2])),
                rec("t2", "web", [10, 0, 1, 6], ME, Some([10, 0, 1, 2])),
                (k, starting),
            ],
        )]);
        let synced = BTreeSet::from(["n1".to_string()]);
        let d = desired(&networks, &tables, &synced, None, ME);
        // Remote endpoints only (not this node's own), the starting one included.
        assert_eq!(
            remote_ips(&d, 4096),
            [Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 7)]
        );
        // Only running tasks behind the VIP and the name.
        let running = [Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 6)];
        assert_eq!(
            d.lb.get(&vip).map(|v| v.backends.clone()),
            Some(running.to_vec())
        );
        assert_eq!(dns_ips(&d, "n1", "web"), running);
        assert!(d.add_only.is_empty(), "{:?}", d.add_only);
        // A service whose only task is starting has no VIP and no name yet.
        let (k, mut alone) = rec("t9", "api", [10, 0, 1, 9], PEER, Some([10, 0, 1, 3]));
        alone.starting = true;
        let tables = BTreeMap::from([("n1".to_string(), vec![(k, alone)])]);
        let d = desired(&networks, &tables, &synced, None, ME);
        assert!(d.lb.is_empty() && d.records.service("n1", "api").is_none());
        assert_eq!(remote_ips(&d, 4096), [Ipv4Addr::new(10, 0, 1, 9)]);
    }

    #[test]
    fn ingress_records_give_ports_and_sandboxes_not_names() {
        let networks = nets(&["ing"]);
        let port = PortConfig {
            protocol: Protocol::Tcp,
            target: 80,
            published: 8080,
            mode: PublishMode::Ingress,
        };
        let (k1, mut web) = rec("t1", "web", [10, 0, 0, 5], PEER, Some([10, 0, 0, 2]));
        web.ports = vec![port.clone()];
        let (k2, mut starting) = rec("t2", "web", [10, 0, 0, 6], PEER, Some([10, 0, 0, 2]));
        starting.ports = vec![port];
        starting.starting = true;
        let tables = BTreeMap::from([(
            "ing".to_string(),
            vec![
                (k1, web),
                (k2, starting),
                rec("sbox", "", [10, 0, 0, 3], PEER, None),
            ],
        )]);
        let synced = BTreeSet::from(["ing".to_string()]);
        let d = desired(&networks, &tables, &synced, Some("ing"), ME);
        assert_eq!(
            d.published.get(&(Protocol::Tcp, 8080)),
            Some(&(80, vec![Ipv4Addr::new(10, 0, 0, 5)]))
        );
        assert_eq!(d.sandboxes, BTreeSet::from([Ipv4Addr::new(10, 0, 0, 3)]));
        assert!(d.lb.is_empty() && d.records.service("ing", "web").is_none());
        assert_eq!(remote_ips(&d, 4096).len(), 3);
    }

    #[test]
    fn an_unsynced_network_only_adds_and_aliases_answer_as_the_service() {
        let networks = nets(&["n1"]);
        let (k, mut r) = rec("t1", "db", [10, 0, 1, 5], PEER, None);
        r.aliases = vec!["database".into(), "db".into()];
        let tables = BTreeMap::from([("n1".to_string(), vec![(k, r)])]);
        let d = desired(&networks, &tables, &BTreeSet::new(), None, ME);
        assert_eq!(d.add_only, BTreeSet::from([4096]));
        assert_eq!(d.by_vni.keys().copied().collect::<Vec<_>>(), [4096]);
        // dnsrr (no VIP): the names answer the task, the balancer has nothing.
        assert!(d.lb.is_empty());
        for name in ["db", "database"] {
            let s = d.records.service("n1", name).expect(name);
            assert!(s.dnsrr && s.vip.is_none(), "{s:?}");
            assert_eq!(dns_ips(&d, "n1", name), [Ipv4Addr::new(10, 0, 1, 5)]);
        }
    }

    /// One pass: what the balancer is given after `have`, when the tables list `now_listed`.
    fn pass(
        have: &BTreeMap<Ipv4Addr, VipInfo>,
        emptied: &mut BTreeMap<Ipv4Addr, (VipInfo, Instant)>,
        now_listed: &[(Ipv4Addr, VipInfo)],
        networks: &BTreeMap<String, NetworkDesc>,
        at: Instant,
    ) -> BTreeMap<Ipv4Addr, VipInfo> {
        let mut lb: BTreeMap<Ipv4Addr, VipInfo> = now_listed.iter().cloned().collect();
        keep_emptied(have, emptied, &mut lb, networks, at);
        lb
    }

    #[test]
    fn a_vip_left_without_backends_refuses_for_its_dns_ttl_then_goes() {
        let v = Ipv4Addr::new(10, 0, 1, 2);
        let on = nets(&["n1"]);
        let t0 = Instant::now();
        let mut emptied = BTreeMap::new();
        let mut have = BTreeMap::from([(v, vip("n1", "web", &[[10, 0, 1, 5]]))]);
        // The last endpoint withdrawn: the VIP stays, with no backend (refusing).
        have = pass(&have, &mut emptied, &[], &on, t0);
        assert_eq!(have.get(&v), Some(&vip("n1", "web", &[])));
        // Still there a moment before the TTL of its DNS answer has passed...
        let almost = t0 + emptied_vip_linger() - Duration::from_millis(1);
        have = pass(&have, &mut emptied, &[], &on, almost);
        assert_eq!(have.get(&v), Some(&vip("n1", "web", &[])));
        // ...and gone after it.
        have = pass(&have, &mut emptied, &[], &on, t0 + emptied_vip_linger());
        assert!(
            have.is_empty() && emptied.is_empty(),
            "{have:?} {emptied:?}"
        );
        assert!(pass(&have, &mut emptied, &[], &on, t0 + emptied_vip_linger()).is_empty());
    }

    #[test]
    fn an_emptied_vip_takes_its_new_backends_and_a_later_emptying_starts_afresh() {
        let v = Ipv4Addr::new(10, 0, 1, 2);
        let on = nets(&["n1"]);
        let t0 = Instant::now();
        let mut emptied = BTreeMap::new();
        let mut have = BTreeMap::from([(v, vip("n1", "web", &[[10, 0, 1, 5]]))]);
        have = pass(&have, &mut emptied, &[], &on, t0);
        // The next task of a stop-first update joins.
        let back = vip("n1", "web", &[[10, 0, 1, 6]]);
        let t1 = t0 + Duration::from_secs(2);
        have = pass(&have, &mut emptied, &[(v, back.clone())], &on, t1);
        assert_eq!(have.get(&v), Some(&back));
        assert!(emptied.is_empty());
        // Emptied again much later: a full linger from then.
        let t2 = t0 + emptied_vip_linger() * 3;
        have = pass(&have, &mut emptied, &[], &on, t2);
        have = pass(&have, &mut emptied, &[], &on, t2 + Duration::from_secs(1));
        assert_eq!(have.get(&v), Some(&vip("n1", "web", &[])));
    }

    #[test]
    fn an_emptied_vip_goes_at_once_when_the_node_leaves_its_network() {
        let v = Ipv4Addr::new(10, 0, 1, 2);
        let w = Ipv4Addr::new(10, 0, 2, 2);
        let t0 = Instant::now();
        let mut emptied = BTreeMap::new();
        let have = BTreeMap::from([
            (v, vip("n1", "web", &[[10, 0, 1, 5]])),
            (w, vip("n2", "api", &[[10, 0, 2, 5]])),
        ]);
        // This node's last task on n2 is gone too: nothing here can call api's VIP.
        let lb = pass(&have, &mut emptied, &[], &nets(&["n1"]), t0);
        assert_eq!(lb.keys().copied().collect::<Vec<_>>(), vec![v], "{lb:?}");
    }
}
