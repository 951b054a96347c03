//! The overlay data plane of one host, as libnetwork's overlay driver lays it out: for each
//! network with a local endpoint, a namespace `ov-<vni>` holding bridge `br0` (the gateway
//! address) and VXLAN device `vx-<vni>` (created in the host namespace so its UDP socket lives
//! there, then moved in; learning off, ARP proxy on); a veth per local endpoint, one end on
//! `br0`, the other `ethN` in the task; and a permanent ARP entry plus a VXLAN FDB entry for
//! every remote endpoint, programmed statically from gossip.
//!
//! [`Overlay`] is a reconciler: [`Overlay::sync_remotes`] and [`Overlay::gc`] make the kernel
//! match a desired state, idempotently, so a restart or a missed event heals on the next pass.
//! Namespaces are held by processes ([`Holders`]) rather than bind mounts, so that a restarted
//! daemon (in a new mount namespace under `ip netns exec`) still finds them.
//!
//! **Release order.** A VXLAN device stays in the VNI table of the namespace that created it
//! (the host's) until it is unregistered, and the kernel destroys a released network namespace
//! asynchronously (`cleanup_net`), so `vx-<vni>` left inside `ov-<vni>` would keep its VNI and
//! port taken for a while after the holder is gone: a task of the same network arriving then
//! would fail with `File exists`. So a namespace is never let go with its VXLAN device inside:
//! [`Overlay::gc`] deletes `vx-<vni>` in it (`RTM_DELLINK`, synchronous) before it releases the
//! holder, and the reconciler keeps an open handle on each namespace it set up, so that one
//! whose holder died on its own stays reachable until its device is deleted (by `gc`, or by
//! the next setup of that network, which then makes a new namespace).
//!
//! [`filter::MemberFilter`] closes the VXLAN and gossip ports to every underlay address but
//! the ones it is given (the swarm's members).
//!
//! With a [`GatewayConfig`], tasks also get an interface on the host-local gateway bridge
//! (Docker's `docker_gwbridge`) for their default route out of the host: see [`gateway`].
//!
//! **Architecture Invariant**: knows links, addresses and neighbours; nothing of services,
//! Raft or gossip (the caller turns gossip records into [`Remote`]s).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_netlink::{BridgeFdbEntry, Handle, NetlinkError, Netns};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

pub mod crypt;
pub mod filter;
pub mod gateway;

pub use gateway::{GatewayConfig, DEFAULT_GW_SUBNET, GW_BRIDGE};

/// VXLAN UDP port, as Swarm.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// VXLAN's overhead on IPv4.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The name prefix of a task's veth end on a network's bridge (`ve` + 8 hex digits).
const TASK_VETH_PREFIX: &str = "ve";

/// Errors of the overlay reconciler.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("namespace holder for {name}: {source}")]
    Holder { name: String, source: HolderError },
    #[error("invalid address {0}")]
    Addr(String),
    #[error("gateway bridge: {0}")]
    Gateway(String),
    #[error("no gateway bridge configured")]
    NoGateway,
    #[error(
        "vni {vni} (udp port {port}) is taken by a VXLAN device of the host namespace living in \
         another namespace: an earlier namespace of this network that the kernel is still \
         destroying, or a device this overlay did not make"
    )]
    VniInUse { vni: u32, port: u16 },
    #[error("overlay encryption tunnel: {0}")]
    Tunnel(String),
    #[error("cannot set {path} in the task's namespace: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

/// ARP in a task's overlay interface: a request never leaves the host (the VXLAN device's
/// proxy answers from the entries [`Overlay::sync_remotes`] programs), so a retry costs
/// nothing on the wire. The kernel's default waits a second before it asks again, which is
/// what a reply to an address whose record is a few milliseconds late would cost (the
/// record of a task that started on another node just now). Asked every 100 ms instead,
/// 13 times (`ucast_solicit` 3 + `mcast_solicit` 10: 1.3 s before the entry fails, longer
/// than the default's first retry), such a reply waits at most until the next tick after
/// the record is programmed.
const NEIGH_SYSCTLS: [(&str, &str); 2] = [("retrans_time_ms", "100"), ("mcast_solicit", "10")];

/// What a [`Holders`] implementation reports (the executor's own error, its chain kept).
pub type HolderError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Keeps network namespaces alive across daemon restarts (implemented by the executor's
/// holder processes). The overlay empties a namespace of its VXLAN device before `remove`.
pub trait Holders: Send + Sync + 'static {
    /// Creates or finds the namespace `name`; returns the pid whose `/proc/<pid>/ns/net` it is.
    fn ensure(&self, name: &str) -> Result<u32, HolderError>;
    /// Live namespaces: (name, pid).
    fn list(&self) -> Vec<(String, u32)>;
    fn remove(&self, name: &str) -> Result<(), HolderError>;
}

/// A network as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDesc {
    pub vni: u32,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// Its traffic between hosts goes through the encryption tunnel (`crypt`).
    #[serde(default)]
    pub encrypted: bool,
}

/// An endpoint on another host, from gossip.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Remote {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
}

/// A local task's place on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkDesc,
    pub ip: Ipv4Addr,
    /// Interface name inside the task (`eth0`, `eth1`, ...).
    pub ifname: String,
}

/// Host-wide settings.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// This host's underlay address: the VTEP.
    pub vtep: Ipv4Addr,
    pub vxlan_port: u16,
    /// Overlay MTU; `None` derives it from the underlay (its MTU - 50).
    pub mtu: Option<u32>,
    /// The gateway bridge; `None`: tasks get overlay interfaces only.
    pub gateway: Option<GatewayConfig>,
}

/// The reconciler of one host.
pub struct Overlay {
    cfg: OverlayConfig,
    holders: Arc<dyn Holders>,
    host: Handle,
    /// The host namespace (for sysctls and `nft`, which act on the caller's namespace).
    host_ns: Arc<Netns>,
    mtu: u32,
    /// The underlay's MTU: the gateway bridge's.
    underlay_mtu: u32,
    gw: Option<gateway::Gateway>,
    /// Serializes changes to the kernel, and holds an open handle on each network namespace set
    /// up by this reconciler, by VNI: one whose holder dies stays reachable until its VXLAN
    /// device is deleted (see the module docs).
    lock: Mutex<BTreeMap<u32, Netns>>,
}

/// Namespace name of a network.
pub fn ns_name(vni: u32) -> String {
    format!("ov-{vni}")
}

fn vx_name(vni: u32) -> String {
    format!("vx-{vni}")
}

fn proc_ns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

impl Overlay {
    /// Creates the reconciler in the calling thread's namespace (the host's).
    pub async fn new(
        cfg: OverlayConfig,
        holders: Arc<dyn Holders>,
    ) -> Result<Overlay, OverlayError> {
        Overlay::new_in(cfg, holders, Netns::current()?).await
    }

    /// Creates the reconciler with `host` as the host namespace (where VXLAN sockets, the
    /// gateway bridge, forwarding and NAT live), whatever the calling thread's namespace.
    pub async fn new_in(
        cfg: OverlayConfig,
        holders: Arc<dyn Holders>,
        host: Netns,
    ) -> Result<Overlay, OverlayError> {
        let gw = cfg
            .gateway
            .as_ref()
            .map(gateway::Gateway::new)
            .transpose()?;
        let host_ns = Arc::new(host);
        let host = Handle::new(&host_ns).await?;
        let underlay_mtu = host.route_mtu(cfg.vtep).await?.unwrap_or(1500);
        let mtu = cfg
            .mtu
            .unwrap_or(underlay_mtu.saturating_sub(VXLAN_OVERHEAD));
        info!(vtep = %cfg.vtep, mtu, "overlay data plane ready");
        Ok(Overlay {
            cfg,
            holders,
            host,
            host_ns,
            mtu,
            underlay_mtu,
            gw,
            lock: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The underlay's MTU (the gateway bridge's).
    pub fn underlay_mtu(&self) -> u32 {
        self.underlay_mtu
    }

    /// The MTU of a network: the overlay's, less the tunnel's overhead when it is encrypted.
    pub fn network_mtu(&self, net: &NetworkDesc) -> u32 {
        if net.encrypted {
            self.mtu.saturating_sub(crypt::OVERHEAD)
        } else {
            self.mtu
        }
    }

    /// The host namespace, where the VXLAN sockets (and the encryption tunnel) live.
    pub fn host_ns(&self) -> &Netns {
        &self.host_ns
    }

    /// A netlink handle in the host namespace.
    pub fn host(&self) -> &Handle {
        &self.host
    }

    /// A netlink handle inside the network's namespace, creating the namespace, its bridge and
    /// its VXLAN device as needed. `held` is the map under `self.lock`.
    async fn network_ns(
        &self,
        held: &mut BTreeMap<u32, Netns>,
        net: &NetworkDesc,
    ) -> Result<(Netns, Handle), OverlayError> {
        let name = ns_name(net.vni);
        let pid = self
            .holders
            .ensure(&name)
            .map_err(|source| OverlayError::Holder {
                name: name.clone(),
                source,
            })?;
        let ns = Netns::open(&proc_ns(pid))?;
        if let Some(old) = held.get(&net.vni) {
            if old.inode()? != ns.inode()? {
                // The holder of the namespace set up earlier died and `ensure` made a new one:
                // the old namespace, kept alive by our handle, must let go of the VNI first.
                warn!(
                    vni = net.vni,
                    "the holder of the overlay network namespace died: replacing the namespace"
                );
                self.delete_vxlan_in(net.vni, old).await?;
                held.remove(&net.vni);
            }
        }
        if let std::collections::btree_map::Entry::Vacant(e) = held.entry(net.vni) {
            e.insert(ns.try_clone()?);
        }
        let h = Handle::new(&ns).await?;
        let mtu = self.network_mtu(net);
        let port = if net.encrypted {
            crypt::encrypted_vxlan_port(self.cfg.vxlan_port)
        } else {
            self.cfg.vxlan_port
        };
        if h.link_index("br0").await?.is_none() {
            h.add_bridge("br0", Some(mtu)).await?;
        }
        h.add_address("br0", net.gateway, net.prefix).await?;
        h.set_up("br0").await?;
        let vx = vx_name(net.vni);
        if h.link_index(&vx).await?.is_none() {
            // Made in the host namespace so its UDP socket lives there, then moved in.
            self.host.del_link(&vx).await?;
            self.host
                .add_vxlan(&vx, net.vni, port, self.cfg.vtep, None, Some(mtu))
                .await
                .map_err(|e| {
                    // No `vx-<vni>` here (that case is accepted or named by `add_vxlan`): the
                    // VNI is registered by a device of the host namespace living elsewhere.
                    if e.is_exists() && !matches!(e, NetlinkError::LinkMismatch { .. }) {
                        OverlayError::VniInUse { vni: net.vni, port }
                    } else {
                        e.into()
                    }
                })?;
            self.host.move_to_ns(&vx, &ns).await?;
            info!(vni = net.vni, "overlay network namespace ready");
        }
        h.set_master(&vx, "br0").await?;
        h.set_up(&vx).await?;
        Ok((ns, h))
    }

    /// Plumbs a task into a network: a veth from `br0` to `ifname` in the task's namespace
    /// (`/proc/<task_pid>/ns/net`), with the task's address and MAC, up. Called before the
    /// task's command runs.
    pub async fn attach(&self, task_pid: u32, a: &Attachment) -> Result<(), OverlayError> {
        let mut held = self.lock.lock().await;
        let (_ns, h) = self.network_ns(&mut held, &a.network).await?;
        let task_ns = Netns::open(&proc_ns(task_pid))?;
        let mac = mesh_netlink::mac_for_ip(a.ip);
        let tag = format!("{:08x}", u32::from(a.ip) ^ task_pid.rotate_left(16));
        let (outer, inner) = (format!("{TASK_VETH_PREFIX}{tag}"), format!("vp{tag}"));
        h.del_link(&outer).await?;
        h.add_veth(
            &outer,
            &inner,
            Some(&task_ns),
            Some(self.network_mtu(&a.network)),
        )
        .await?;
        h.set_master(&outer, "br0").await?;
        // The bridge knows the task's port before the task sends a frame: a remote endpoint
        // of the same address that `sync_remotes` still lists (its task just left) loses its
        // entry to it, and frames from that endpoint, still arriving over VXLAN, cannot take
        // it back (sticky).
        h.set_bridge_fdb(&outer, mac, true).await?;
        h.set_up(&outer).await?;
        let t = Handle::new(&task_ns).await?;
        t.rename(&inner, &a.ifname).await?;
        t.set_mac(&a.ifname, mac).await?;
        t.add_address(&a.ifname, a.ip, a.network.prefix).await?;
        t.set_up(&a.ifname).await?;
        let ifname = a.ifname.clone();
        tokio::task::spawn_blocking(move || {
            task_ns.run(|| {
                for (name, value) in NEIGH_SYSCTLS {
                    let path = format!("/proc/sys/net/ipv4/neigh/{ifname}/{name}");
                    std::fs::write(&path, value)
                        .map_err(|source| OverlayError::Sysctl { path, source })?;
                }
                Ok::<(), OverlayError>(())
            })
        })
        .await
        .map_err(|e| OverlayError::Sysctl {
            path: "/proc/sys/net/ipv4/neigh".into(),
            source: std::io::Error::other(e.to_string()),
        })???;
        debug!(ip = %a.ip, ifname = a.ifname, "task attached");
        Ok(())
    }

    /// Makes the ARP and FDB entries of every network match `remotes` (by VNI): adds what is
    /// missing, replaces what changed, deletes what is gone, except in the networks of
    /// `add_only` (whose list may be partial), where nothing is deleted. Networks not given
    /// are untouched.
    pub async fn sync_remotes(
        &self,
        networks: &BTreeMap<u32, NetworkDesc>,
        remotes: &BTreeMap<u32, BTreeSet<Remote>>,
        add_only: &BTreeSet<u32>,
    ) -> Result<(), OverlayError> {
        let mut held = self.lock.lock().await;
        let live: BTreeMap<String, u32> = self.holders.list().into_iter().collect();
        // One network failing does not keep the others stale: the first error is returned
        // once all were tried.
        let mut first_err = None;
        for (vni, net) in networks {
            // Only networks this host has a namespace for (a local endpoint).
            if !live.contains_key(&ns_name(*vni)) {
                continue;
            }
            let add_only = add_only.contains(vni);
            if let Err(e) = self
                .sync_network(&mut held, *vni, net, remotes, add_only)
                .await
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn sync_network(
        &self,
        held: &mut BTreeMap<u32, Netns>,
        vni: u32,
        net: &NetworkDesc,
        remotes: &BTreeMap<u32, BTreeSet<Remote>>,
        add_only: bool,
    ) -> Result<(), OverlayError> {
        let vni = &vni;
        {
            let (_ns, h) = self.network_ns(held, net).await?;
            let vx = vx_name(*vni);
            let want: BTreeMap<Ipv4Addr, &Remote> = remotes
                .get(vni)
                .map(|s| {
                    s.iter()
                        .filter(|r| r.vtep != self.cfg.vtep)
                        .map(|r| (r.ip, r))
                        .collect()
                })
                .unwrap_or_default();
            let have_arp: BTreeMap<Ipv4Addr, [u8; 6]> =
                h.neighbours(&vx).await?.into_iter().collect();
            // The bridge's entries: a remote endpoint's MAC is a static one on `vx`. The
            // bridge would learn it only from a frame that came in over VXLAN, and the
            // routing mesh's fast path sends replies past it, so without this every frame
            // to that endpoint was flooded to each local port too.
            let (vx_fdb, br_fdb) = h.fdb_and_bridge_fdb(&vx, "br0").await?;
            let have_fdb: BTreeSet<([u8; 6], Ipv4Addr)> = vx_fdb.into_iter().collect();
            let have_br: BTreeMap<[u8; 6], BridgeFdbEntry> =
                br_fdb.into_iter().map(|e| (e.mac, e)).collect();
            let vx_port = h.link_index(&vx).await?;
            for (ip, r) in &want {
                if have_arp.get(ip) != Some(&r.mac) {
                    h.set_neighbour(&vx, *ip, r.mac).await?;
                }
                if !have_fdb.contains(&(r.mac, r.vtep)) {
                    h.set_fdb(&vx, r.mac, r.vtep).await?;
                }
                match have_br.get(&r.mac) {
                    Some(e) if e.is_static && Some(e.port) == vx_port => {}
                    // On a local port: a local endpoint has the address now (`attach`), and
                    // the remote record is a stale one.
                    Some(e) if Some(e.port) != vx_port => {}
                    _ => h.set_bridge_fdb(&vx, r.mac, false).await?,
                }
            }
            if add_only {
                return Ok(());
            }
            let want_macs: BTreeSet<[u8; 6]> = want.values().map(|r| r.mac).collect();
            for e in have_br.values() {
                if e.is_static && Some(e.port) == vx_port && !want_macs.contains(&e.mac) {
                    h.del_bridge_fdb(&vx, e.mac).await?;
                }
            }
            let want_fdb: BTreeSet<([u8; 6], Ipv4Addr)> =
                want.values().map(|r| (r.mac, r.vtep)).collect();
            for ip in have_arp.keys().filter(|ip| !want.contains_key(ip)) {
                h.del_neighbour(&vx, *ip).await?;
            }
            for (mac, dst) in have_fdb.iter().filter(|e| !want_fdb.contains(e)) {
                if *mac != [0; 6] {
                    h.del_fdb(&vx, *mac, *dst).await?;
                }
            }
        }
        Ok(())
    }

    /// Deletes `vx-<vni>` inside `ns` (idempotent). The kernel unregisters it before it answers,
    /// which frees its VNI and port in the host namespace at once.
    async fn delete_vxlan_in(&self, vni: u32, ns: &Netns) -> Result<(), OverlayError> {
        Handle::new(ns).await?.del_link(&vx_name(vni)).await?;
        Ok(())
    }

    /// Lets go of the namespace of network `vni`: its VXLAN device first (in the namespace held
    /// here, which may be one whose holder died, and in the live holder's `pid`), then the
    /// holder, then the handle. On error nothing is released: the next pass tries again.
    async fn release(
        &self,
        held: &mut BTreeMap<u32, Netns>,
        vni: u32,
        pid: Option<u32>,
    ) -> Result<(), OverlayError> {
        let live = pid.map(|pid| Netns::open(&proc_ns(pid))).transpose()?;
        let mut done = None;
        if let Some(ns) = held.get(&vni) {
            self.delete_vxlan_in(vni, ns).await?;
            done = Some(ns.inode()?);
        }
        if let Some(ns) = live {
            if done != Some(ns.inode()?) {
                self.delete_vxlan_in(vni, &ns).await?;
            }
            let name = ns_name(vni);
            self.holders
                .remove(&name)
                .map_err(|source| OverlayError::Holder { name, source })?;
        }
        held.remove(&vni);
        Ok(())
    }

    /// Removes the namespaces of networks this host no longer has endpoints on (each emptied of
    /// its VXLAN device before its holder is released), and VXLAN devices left in the host
    /// namespace by a crash between create and move.
    pub async fn gc(&self, keep_vnis: &BTreeSet<u32>) -> Result<(), OverlayError> {
        self.collect(keep_vnis, false).await.map(|_| ())
    }

    /// Like [`Overlay::gc`], but a network whose bridge still has a task plugged in (a veth
    /// [`Overlay::attach`] made, whose other end lives as long as the task's namespace) is
    /// kept, whatever `keep_vnis` says: a task its caller no longer counts may still be
    /// alive, as one a restarted daemon found running and is draining before its stop, and
    /// its calls in flight need the network until it exits. Returns the networks kept so;
    /// the caller collects again once their tasks are gone.
    pub async fn gc_unplugged(
        &self,
        keep_vnis: &BTreeSet<u32>,
    ) -> Result<BTreeSet<u32>, OverlayError> {
        self.collect(keep_vnis, true).await
    }

    /// Whether a task is plugged into the bridge of the namespace held by `pid`.
    async fn has_task_ports(&self, pid: u32) -> Result<bool, OverlayError> {
        let ns = Netns::open(&proc_ns(pid))?;
        let h = Handle::new(&ns).await?;
        Ok(h.links()
            .await?
            .iter()
            .any(|l| l.name.starts_with(TASK_VETH_PREFIX) && l.kind.as_deref() == Some("veth")))
    }

    async fn collect(
        &self,
        keep_vnis: &BTreeSet<u32>,
        keep_plugged: bool,
    ) -> Result<BTreeSet<u32>, OverlayError> {
        let mut plugged = BTreeSet::new();
        let mut held = self.lock.lock().await;
        let mut live: BTreeMap<u32, u32> = BTreeMap::new();
        for (name, pid) in self.holders.list() {
            if let Some(vni) = name.strip_prefix("ov-").and_then(|v| v.parse::<u32>().ok()) {
                live.insert(vni, pid);
            }
        }
        // Networks with a live holder, and namespaces held here whose holder died.
        let gone: BTreeSet<u32> = live
            .keys()
            .chain(held.keys())
            .filter(|vni| !keep_vnis.contains(vni))
            .copied()
            .collect();
        for vni in gone {
            let pid = live.get(&vni).copied();
            if let (Some(pid), true) = (pid, keep_plugged) {
                match self.has_task_ports(pid).await {
                    Ok(false) => {}
                    Ok(true) => {
                        debug!(
                            vni,
                            "overlay network namespace kept: a task is still plugged in"
                        );
                        plugged.insert(vni);
                        continue;
                    }
                    Err(e) => {
                        warn!(
                            vni,
                            "cannot list the overlay network namespace's links: {e}"
                        );
                        plugged.insert(vni);
                        continue;
                    }
                }
            }
            if pid.is_some() {
                info!(
                    vni,
                    "removing overlay network namespace: no local endpoint left"
                );
            }
            if let Err(e) = self.release(&mut held, vni, pid).await {
                warn!(vni, "cannot release the overlay network namespace: {e}");
            }
        }
        for l in self.host.links().await? {
            if l.name.starts_with("vx-") && l.kind.as_deref() == Some("vxlan") {
                warn!(
                    link = l.name,
                    "removing a VXLAN device left in the host namespace"
                );
                self.host.del_link(&l.name).await?;
            }
        }
        Ok(plugged)
    }
}
