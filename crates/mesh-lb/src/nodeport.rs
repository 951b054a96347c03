//! The routing mesh's eBPF fast path (`ebpf/nodeport.c`): a published port answered by a task on
//! another node, or on this one through the task's gateway veth ([`NodePort::set_local`]),
//! skips conntrack, the NAT rules and the ingress sandbox's stack on the node that took the
//! connection, and keeps the client's address (see the C file for its four programs).
//!
//! [`NodePort::ensure`] loads the programs and attaches them as tc filters (netlink, fixed
//! priority and handle) to the underlay interface and the host end of the sandbox's veth (host
//! namespace), and to the sandbox's end of that veth and its leg on the ingress overlay (sandbox
//! namespace). Netlink filters outlive the daemon: a daemon killed and restarted finds the maps
//! of the programs still attached by the IDs it wrote to its state file, and keeps them, so no
//! flow of the previous daemon loses its task. When anything differs (an interface recreated, a
//! map gone, another node address, a daemon built with other programs), it loads afresh,
//! copies the old maps' ports, backends and flows into the new ones (when their layouts match,
//! `NP_MAPS_VERSION`), and replaces the filters in place: an upgrade breaks no connection.
//! [`NodePort::set_port`] reconciles one published port to its backends with the same
//! hole-free slot protocol as the socket balancer (`plan`); [`NodePort::detach`] removes the
//! filters, which frees programs and maps.
//!
//! **Architecture Invariant**: knows ports, addresses, interfaces and namespaces, nothing of
//! services or tasks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::links::Link;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use mesh_netlink::Netns;

use crate::consts::{
    NP_ALIVE_KEY_SIZE, NP_BACKEND_KEY_SIZE, NP_BACKEND_VAL_SIZE, NP_CONFIG_SIZE, NP_FWD_KEY_SIZE,
    NP_LOCAL_KERNEL, NP_LOCAL_VAL_SIZE, NP_MAPS_VERSION, NP_PORT_KEY_SIZE, NP_PORT_VAL_SIZE,
    NP_REV_KEY_SIZE, NP_REV_VAL_SIZE,
};
use crate::plan::{plan, Op};
use crate::{chain, is_enoent, objects, Proto};

const MAP_CONFIG: &str = "np_config";
const MAP_PORTS: &str = "np_ports";
const MAP_BACKENDS: &str = "np_backends";
const MAP_ALIVE: &str = "np_alive";
const MAP_FWD: &str = "np_fwd";
const MAP_REV: &str = "np_rev";
const MAP_LOCAL: &str = "np_local";
const MAPS: [&str; 7] = [
    MAP_CONFIG,
    MAP_PORTS,
    MAP_BACKENDS,
    MAP_ALIVE,
    MAP_FWD,
    MAP_REV,
    MAP_LOCAL,
];
const PROG_UNDERLAY: &str = "np_underlay_in";
const PROG_SBOX: &str = "np_sbox_in";
const PROG_HOST_VETH: &str = "np_host_veth_in";
const PROG_SBOX_VETH: &str = "np_sbox_veth_in";
/// The filters' priority and handle ("me"), the same on every interface.
const PRIORITY: u16 = 0x6d65;
const HANDLE: u16 = 0x6d65;

/// Why the fast path could not be set up or changed.
#[derive(Debug, thiserror::Error)]
#[error("routing mesh fast path: {0}")]
pub struct NodePortError(String);

fn err(what: impl std::fmt::Display, e: impl std::error::Error) -> NodePortError {
    NodePortError(format!("{what}: {}", chain(&e)))
}

/// Where the fast path plugs in on one node.
#[derive(Debug)]
pub struct Plumbing {
    /// The node's underlay address: published ports on it take the fast path.
    pub node_ip: Ipv4Addr,
    /// The host-namespace interface holding `node_ip`.
    pub underlay_if: String,
    /// The host end of the sandbox's veth (`mesh_ingr0`).
    pub host_veth: String,
    /// The sandbox's namespace.
    pub sandbox: Netns,
    /// The sandbox end of the veth (`mi0`).
    pub sandbox_veth: String,
    /// The sandbox's interface on the ingress overlay (`eth0`).
    pub sandbox_leg: String,
    /// The ingress overlay's VNI and VXLAN UDP port.
    pub vni: u32,
    /// The VXLAN UDP port.
    pub vxlan_port: u16,
}

/// One backend of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortBackend {
    /// The task's address on the ingress overlay.
    pub ip: Ipv4Addr,
    /// The task's port.
    pub port: u16,
    /// The underlay address of the task's node.
    pub vtep: Ipv4Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ConfigVal {
    node_ip: u32,
    underlay_ifindex: u32,
    sbox_veth_ifindex: u32,
    host_veth_ifindex: u32,
    sbox_leg_ifindex: u32,
    vni: u32,
    vxlan_port: u16,
    mtu: u16,
    sbox_mac: [u8; 6],
    underlay_mac: [u8; 6],
    enabled: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PortKey {
    port: u16,
    proto: u8,
    pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PortVal {
    count: u16,
    rev: u16,
    flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendKey {
    port: u16,
    proto: u8,
    pad: u8,
    slot: u16,
    pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendVal {
    ip: u32,
    vtep: u32,
    port: u16,
    local: u8,
    pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct AliveKey {
    ip: u32,
    port: u16,
    proto: u8,
    pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LocalVal {
    ifindex: u32,
    pad: u32,
}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<LocalVal>() == NP_LOCAL_VAL_SIZE as usize);
    assert!(size_of::<ConfigVal>() == NP_CONFIG_SIZE as usize);
    assert!(size_of::<PortKey>() == NP_PORT_KEY_SIZE as usize);
    assert!(size_of::<PortVal>() == NP_PORT_VAL_SIZE as usize);
    assert!(size_of::<BackendKey>() == NP_BACKEND_KEY_SIZE as usize);
    assert!(size_of::<BackendVal>() == NP_BACKEND_VAL_SIZE as usize);
    assert!(size_of::<AliveKey>() == NP_ALIVE_KEY_SIZE as usize);
    assert!(12 == NP_FWD_KEY_SIZE as usize);
    assert!(16 == NP_REV_KEY_SIZE as usize);
    assert!(12 == NP_REV_VAL_SIZE as usize);
};

// SAFETY: #[repr(C)] structs of integers and byte arrays with every padding byte spelled out
// as a field (the size asserts above prove there is no implicit padding).
unsafe impl aya::Pod for ConfigVal {}
// SAFETY: see above.
unsafe impl aya::Pod for PortKey {}
// SAFETY: see above.
unsafe impl aya::Pod for PortVal {}
// SAFETY: see above.
unsafe impl aya::Pod for BackendKey {}
// SAFETY: see above.
unsafe impl aya::Pod for BackendVal {}
// SAFETY: see above.
unsafe impl aya::Pod for AliveKey {}
// SAFETY: see above.
unsafe impl aya::Pod for LocalVal {}

fn be32(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl PortKey {
    fn new(proto: Proto, port: u16) -> PortKey {
        PortKey {
            port: port.to_be(),
            proto: proto.number(),
            pad: 0,
        }
    }
    fn slot(&self, slot: u16) -> BackendKey {
        BackendKey {
            port: self.port,
            proto: self.proto,
            pad: 0,
            slot,
            pad2: 0,
        }
    }
}

/// What a daemon leaves for its successor: the maps' IDs and what they were set up for.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct State {
    maps: BTreeMap<String, u32>,
    config: StateConfig,
    /// `NP_MAPS_VERSION` of the programs that use the maps (0: written before it existed).
    #[serde(default)]
    maps_version: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StateConfig {
    node_ip: Ipv4Addr,
    underlay_ifindex: u32,
    host_veth_ifindex: u32,
    sbox_veth_ifindex: u32,
    sbox_leg_ifindex: u32,
    vni: u32,
    vxlan_port: u16,
    /// A fingerprint of the eBPF object: a daemon built with other programs loads its own.
    object: u64,
}

impl StateConfig {
    /// The programs' config (`np_config`) for this setup, enabled.
    fn kernel(&self, mtu: u16, sbox_mac: [u8; 6], underlay_mac: [u8; 6]) -> ConfigVal {
        ConfigVal {
            node_ip: be32(self.node_ip),
            underlay_ifindex: self.underlay_ifindex,
            sbox_veth_ifindex: self.sbox_veth_ifindex,
            host_veth_ifindex: self.host_veth_ifindex,
            sbox_leg_ifindex: self.sbox_leg_ifindex,
            vni: self.vni,
            vxlan_port: self.vxlan_port.to_be(),
            mtu,
            sbox_mac,
            underlay_mac,
            enabled: 1,
            pad: 0,
        }
    }
}

/// FNV-1a of `bytes`: stable across builds and toolchains, unlike `DefaultHasher`.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The fast path of one node: its maps (see the module docs).
pub struct NodePort {
    config: Array<MapData, ConfigVal>,
    ports: HashMap<MapData, PortKey, PortVal>,
    backends: HashMap<MapData, BackendKey, BackendVal>,
    alive: HashMap<MapData, AliveKey, u32>,
    /// The alive map's counts, as written: (address, port, proto) -> ports using it.
    alive_counts: BTreeMap<AliveKey, u32>,
    /// This node's tasks reached past the overlay: address -> gateway veth's ifindex.
    local: HashMap<MapData, u32, LocalVal>,
    node_ip: Ipv4Addr,
    underlay_if: String,
    host_veth: String,
    sandbox: Netns,
    sandbox_veth: String,
    sandbox_leg: String,
    /// Whether the programs were found attached from a previous daemon.
    adopted: bool,
}

impl std::fmt::Debug for NodePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePort")
            .field("node_ip", &self.node_ip)
            .field("underlay_if", &self.underlay_if)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

struct Ifaces {
    underlay: mesh_netlink::LinkInfo,
    host_veth: u32,
    sbox_veth: u32,
    sbox_leg: u32,
    sbox_mac: [u8; 6],
}

async fn ifaces(p: &Plumbing) -> Result<Ifaces, NodePortError> {
    let host = mesh_netlink::Handle::new(&Netns::current().map_err(|e| err("netns", e))?)
        .await
        .map_err(|e| err("netlink", e))?;
    let sbox = mesh_netlink::Handle::new(&p.sandbox)
        .await
        .map_err(|e| err("netlink", e))?;
    let underlay = link(&host, &p.underlay_if).await?;
    let host_veth = link(&host, &p.host_veth).await?.index;
    let sbox_veth = link(&sbox, &p.sandbox_veth).await?.index;
    let leg = link(&sbox, &p.sandbox_leg).await?;
    Ok(Ifaces {
        underlay,
        host_veth,
        sbox_veth,
        sbox_leg: leg.index,
        sbox_mac: leg.mac.unwrap_or_default(),
    })
}

async fn link(
    h: &mesh_netlink::Handle,
    name: &str,
) -> Result<mesh_netlink::LinkInfo, NodePortError> {
    h.link(name)
        .await
        .map_err(|e| err(format!("interface {name}"), e))?
        .ok_or_else(|| NodePortError(format!("no interface {name}")))
}

impl NodePort {
    /// Sets the fast path up on `p`, adopting the one a previous daemon left when it matches
    /// (`state` is the file that records it). Runs its bpf and tc calls in
    /// `block_in_place`: call it on a multi-threaded runtime.
    pub async fn ensure(p: Plumbing, state: &Path) -> Result<NodePort, NodePortError> {
        let Some(object) = objects::NODEPORT else {
            return Err(NodePortError(
                "eBPF programs were not built (MESH_EBPF_SKIP)".into(),
            ));
        };
        let ifs = ifaces(&p).await?;
        let want = StateConfig {
            node_ip: p.node_ip,
            underlay_ifindex: ifs.underlay.index,
            host_veth_ifindex: ifs.host_veth,
            sbox_veth_ifindex: ifs.sbox_veth,
            sbox_leg_ifindex: ifs.sbox_leg,
            vni: p.vni,
            vxlan_port: p.vxlan_port,
            object: fingerprint(object),
        };
        let config = want.kernel(
            ifs.underlay.mtu.unwrap_or(1500).min(u32::from(u16::MAX)) as u16,
            ifs.sbox_mac,
            ifs.underlay.mac.unwrap_or_default(),
        );
        let (mut maps, adopted) = tokio::task::block_in_place(|| match adopt(state, &want) {
            Some(maps) => Ok::<_, NodePortError>((maps, true)),
            None => Ok((load_and_attach(&p, state, &want, config)?, false)),
        })?;
        let mut take = |name: &'static str| {
            maps.remove(name)
                .ok_or_else(|| NodePortError(format!("no map {name}")))
        };
        let mut cfg_map: Array<MapData, ConfigVal> =
            Array::try_from(take(MAP_CONFIG)?).map_err(|e| err(MAP_CONFIG, e))?;
        let ports = HashMap::try_from(take(MAP_PORTS)?).map_err(|e| err(MAP_PORTS, e))?;
        let backends = HashMap::try_from(take(MAP_BACKENDS)?).map_err(|e| err(MAP_BACKENDS, e))?;
        let alive: HashMap<MapData, AliveKey, u32> =
            HashMap::try_from(take(MAP_ALIVE)?).map_err(|e| err(MAP_ALIVE, e))?;
        let local = HashMap::try_from(take(MAP_LOCAL)?).map_err(|e| err(MAP_LOCAL, e))?;
        if cfg_map.get(&0, 0).ok() != Some(config) {
            cfg_map.set(0, config, 0).map_err(|e| err(MAP_CONFIG, e))?;
        }
        let alive_counts = alive
            .iter()
            .filter_map(Result::ok)
            .collect::<BTreeMap<_, _>>();
        tracing::info!(
            interface = %p.underlay_if,
            adopted,
            "routing mesh fast path attached"
        );
        Ok(NodePort {
            config: cfg_map,
            ports,
            backends,
            alive,
            alive_counts,
            local,
            node_ip: p.node_ip,
            underlay_if: p.underlay_if,
            host_veth: p.host_veth,
            sandbox: p.sandbox,
            sandbox_veth: p.sandbox_veth,
            sandbox_leg: p.sandbox_leg,
            adopted,
        })
    }

    /// Removes a fast path a previous daemon left on `p` (nothing if there is none).
    pub fn remove_leftover(p: &Plumbing, state: &Path) {
        let _ = std::fs::remove_file(state);
        detach_all(
            &p.underlay_if,
            &p.host_veth,
            &p.sandbox,
            [&p.sandbox_leg, &p.sandbox_veth],
        );
    }

    /// Whether the programs of a previous daemon were kept.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The published ports the maps hold.
    pub fn ports(&self) -> Vec<(Proto, u16)> {
        self.ports
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let proto = match k.proto {
                    6 => Proto::Tcp,
                    17 => Proto::Udp,
                    _ => return None,
                };
                Some((proto, u16::from_be(k.port)))
            })
            .collect()
    }

    /// Sets the backends of a published port (all of them, sorted or not; duplicates are
    /// ignored). A port with no backend is removed: the nftables path then answers it.
    pub fn set_port(
        &mut self,
        proto: Proto,
        port: u16,
        backends: &[NodePortBackend],
    ) -> Result<(), NodePortError> {
        if backends.is_empty() {
            return self.remove_port(proto, port);
        }
        let desired: Vec<BackendVal> = backends
            .iter()
            .map(|b| BackendVal {
                ip: be32(b.ip),
                vtep: be32(b.vtep),
                port: b.port.to_be(),
                // Local: the kernel's until the program finds the task in `np_local`.
                local: if b.vtep == self.node_ip {
                    NP_LOCAL_KERNEL as u8
                } else {
                    0
                },
                pad: 0,
            })
            .collect();
        if desired.iter().collect::<HashSet<_>>().len() > usize::from(u16::MAX) {
            return Err(NodePortError(format!("port {port}: too many backends")));
        }
        let key = PortKey::new(proto, port);
        let (old, current) = self.read_port(&key)?;
        let old_set: BTreeSet<AliveKey> = current
            .iter()
            .flatten()
            .map(|b| alive_key(b, key.proto))
            .collect();
        let new_set: BTreeSet<AliveKey> = desired.iter().map(|b| alive_key(b, key.proto)).collect();
        // Added backends are alive before a slot names them; removed ones die after.
        for k in new_set.difference(&old_set) {
            self.alive_add(*k)?;
        }
        let ops = plan(old.is_some().then_some(current.as_slice()), &desired);
        self.apply(&key, old.unwrap_or_default(), &ops)?;
        for k in old_set.difference(&new_set) {
            self.alive_remove(*k)?;
        }
        Ok(())
    }

    /// Removes a published port (no-op if absent).
    pub fn remove_port(&mut self, proto: Proto, port: u16) -> Result<(), NodePortError> {
        let key = PortKey::new(proto, port);
        let (old, current) = self.read_port(&key)?;
        let Some(old) = old else {
            return Ok(());
        };
        // The port first: a lookup that finds no port passes the packet.
        match self.ports.remove(&key) {
            Ok(()) => {}
            Err(e) if is_enoent(&e) => {}
            Err(e) => return Err(err(MAP_PORTS, e)),
        }
        for slot in 0..old.count {
            match self.backends.remove(&key.slot(slot)) {
                Ok(()) => {}
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(err(MAP_BACKENDS, e)),
            }
        }
        for b in current.iter().flatten() {
            self.alive_remove(alive_key(b, key.proto))?;
        }
        Ok(())
    }

    /// Removes the filters (the programs and maps go with them) and the state file.
    pub fn detach(self, state: &Path) {
        let _ = std::fs::remove_file(state);
        detach_all(
            &self.underlay_if,
            &self.host_veth,
            &self.sandbox,
            [&self.sandbox_leg, &self.sandbox_veth],
        );
    }

    fn read_port(
        &self,
        key: &PortKey,
    ) -> Result<(Option<PortVal>, Vec<Option<BackendVal>>), NodePortError> {
        let val = match self.ports.get(key, 0) {
            Ok(v) => v,
            Err(e) if is_enoent(&e) => return Ok((None, Vec::new())),
            Err(e) => return Err(err(MAP_PORTS, e)),
        };
        let mut slots = Vec::with_capacity(usize::from(val.count));
        for slot in 0..val.count {
            match self.backends.get(&key.slot(slot), 0) {
                Ok(b) => slots.push(Some(b)),
                Err(e) if is_enoent(&e) => slots.push(None),
                Err(e) => return Err(err(MAP_BACKENDS, e)),
            }
        }
        Ok((Some(val), slots))
    }

    fn apply(
        &mut self,
        key: &PortKey,
        old: PortVal,
        ops: &[Op<BackendVal>],
    ) -> Result<(), NodePortError> {
        for op in ops {
            match op {
                Op::Write { slot, backend } => self
                    .backends
                    .insert(key.slot(*slot), backend, 0)
                    .map_err(|e| err(MAP_BACKENDS, e))?,
                Op::SetCount { count } => self
                    .ports
                    .insert(
                        key,
                        PortVal {
                            count: *count,
                            rev: old.rev.wrapping_add(1),
                            flags: 0,
                        },
                        0,
                    )
                    .map_err(|e| err(MAP_PORTS, e))?,
                Op::Delete { slot } => match self.backends.remove(&key.slot(*slot)) {
                    Ok(()) => {}
                    Err(e) if is_enoent(&e) => {}
                    Err(e) => return Err(err(MAP_BACKENDS, e)),
                },
            }
        }
        Ok(())
    }

    fn alive_add(&mut self, k: AliveKey) -> Result<(), NodePortError> {
        let n = self.alive_counts.entry(k).or_insert(0);
        *n += 1;
        self.alive.insert(k, *n, 0).map_err(|e| err(MAP_ALIVE, e))
    }

    fn alive_remove(&mut self, k: AliveKey) -> Result<(), NodePortError> {
        let n = self.alive_counts.get(&k).copied().unwrap_or(1);
        if n > 1 {
            self.alive_counts.insert(k, n - 1);
            return self
                .alive
                .insert(k, n - 1, 0)
                .map_err(|e| err(MAP_ALIVE, e));
        }
        self.alive_counts.remove(&k);
        match self.alive.remove(&k) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(e) => Err(err(MAP_ALIVE, e)),
        }
    }

    /// Sets the tasks of this node that VXLAN for them skips the overlay to reach, and that the
    /// published ports of this node hand new connections straight to: each task's address on
    /// the ingress overlay -> the ifindex of the host's end of a veth whose other end is in the
    /// task's namespace (its gateway-bridge veth). Others are removed: VXLAN for them takes the
    /// VXLAN device again, and their new connections the nftables path.
    pub fn set_local(&mut self, want: &BTreeMap<Ipv4Addr, u32>) -> Result<(), NodePortError> {
        let have: BTreeMap<u32, LocalVal> = self.local.iter().filter_map(Result::ok).collect();
        let want: BTreeMap<u32, LocalVal> = want
            .iter()
            .map(|(ip, ifindex)| {
                let v = LocalVal {
                    ifindex: *ifindex,
                    pad: 0,
                };
                (be32(*ip), v)
            })
            .collect();
        for k in have.keys() {
            if !want.contains_key(k) {
                match self.local.remove(k) {
                    Ok(()) => {}
                    Err(e) if is_enoent(&e) => {}
                    Err(e) => return Err(err(MAP_LOCAL, e)),
                }
            }
        }
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                self.local.insert(k, v, 0).map_err(|e| err(MAP_LOCAL, e))?;
            }
        }
        Ok(())
    }

    /// Turns the programs off (every packet takes the nftables path) or on again.
    pub fn set_enabled(&mut self, on: bool) -> Result<(), NodePortError> {
        let mut v = self.config.get(&0, 0).map_err(|e| err(MAP_CONFIG, e))?;
        v.enabled = u32::from(on);
        self.config.set(0, v, 0).map_err(|e| err(MAP_CONFIG, e))
    }
}

fn alive_key(b: &BackendVal, proto: u8) -> AliveKey {
    AliveKey {
        ip: b.ip,
        port: b.port,
        proto,
        pad: 0,
    }
}

/// The maps of the programs a previous daemon attached, if its state file matches `want` and
/// every map is still there.
fn adopt(state: &Path, want: &StateConfig) -> Option<BTreeMap<&'static str, Map>> {
    let text = std::fs::read(state).ok()?;
    let st: State = serde_json::from_slice(&text).ok()?;
    if &st.config != want {
        let what = if st.config.object != want.object {
            "this daemon's programs differ from the last daemon's"
        } else {
            "its interfaces or addresses changed since the last daemon"
        };
        tracing::info!("routing mesh fast path: {what}; loading afresh");
        return None;
    }
    let mut out = BTreeMap::new();
    for name in MAPS {
        out.insert(name, old_map(&st, name)?);
    }
    Some(out)
}

/// Map `name` of a previous daemon's programs, by the ID in its state `st`, if it still exists.
fn old_map(st: &State, name: &'static str) -> Option<Map> {
    let id = *st.maps.get(name)?;
    let data = MapData::from_id(id).ok()?;
    let info = data.info().ok()?;
    if info.name_as_str() != Some(name) {
        return None;
    }
    Some(match name {
        MAP_CONFIG => Map::Array(data),
        MAP_FWD | MAP_REV => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    })
}

/// Copies into `new`, the maps just loaded, the ports, backends, flows and local tasks of the
/// maps a previous daemon's programs still use (`old`, its state): the new programs then take
/// over every connection where the old ones left it (a flow handed to a local task finds its
/// task's veth before the daemon's first pass). Only when both use the same layouts
/// (`NP_MAPS_VERSION`). Returns the flows and local tasks carried over, or `None` if nothing
/// was (other layouts, or the old maps are gone).
fn carry_over(old: &State, new: &mut BTreeMap<&'static str, Map>) -> Option<(usize, usize)> {
    if old.maps_version != NP_MAPS_VERSION {
        tracing::info!(
            old = old.maps_version,
            new = NP_MAPS_VERSION,
            "routing mesh fast path: the maps' layouts changed; open flows are re-balanced"
        );
        return None;
    }
    const PK: usize = NP_PORT_KEY_SIZE as usize;
    const PV: usize = NP_PORT_VAL_SIZE as usize;
    const BK: usize = NP_BACKEND_KEY_SIZE as usize;
    const BV: usize = NP_BACKEND_VAL_SIZE as usize;
    const AK: usize = NP_ALIVE_KEY_SIZE as usize;
    const FK: usize = NP_FWD_KEY_SIZE as usize;
    const RK: usize = NP_REV_KEY_SIZE as usize;
    const RV: usize = NP_REV_VAL_SIZE as usize;
    const AV: usize = std::mem::size_of::<u32>();
    const LK: usize = std::mem::size_of::<u32>();
    const LV: usize = NP_LOCAL_VAL_SIZE as usize;
    let (mut flows, mut local) = (None, 0);
    for name in [
        MAP_PORTS,
        MAP_BACKENDS,
        MAP_ALIVE,
        MAP_FWD,
        MAP_REV,
        MAP_LOCAL,
    ] {
        let (Some(from), Some(to)) = (old_map(old, name), new.get_mut(name)) else {
            continue;
        };
        let copied = match name {
            MAP_PORTS => copy_entries::<PK, PV>(from, to),
            MAP_BACKENDS => copy_entries::<BK, BV>(from, to),
            MAP_ALIVE => copy_entries::<AK, AV>(from, to),
            MAP_FWD => copy_entries::<FK, BV>(from, to),
            MAP_LOCAL => copy_entries::<LK, LV>(from, to),
            _ => copy_entries::<RK, RV>(from, to),
        };
        match copied {
            Ok(n) if name == MAP_FWD => flows = Some(n),
            Ok(n) if name == MAP_LOCAL => local = n,
            Ok(_) => {}
            Err(e) => tracing::warn!(map = name, "routing mesh fast path: carrying over: {e}"),
        }
    }
    flows.map(|f| (f, local))
}

/// Copies every entry of hash map `from` into `to` (both of K-byte keys and V-byte values).
fn copy_entries<const K: usize, const V: usize>(
    from: Map,
    to: &mut Map,
) -> Result<usize, aya::maps::MapError> {
    let from: HashMap<MapData, [u8; K], [u8; V]> = HashMap::try_from(from)?;
    let mut to: HashMap<&mut MapData, [u8; K], [u8; V]> = HashMap::try_from(to)?;
    let mut n = 0;
    for kv in from.iter() {
        let (k, v) = kv?;
        to.insert(k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

fn load_and_attach(
    p: &Plumbing,
    state: &Path,
    want: &StateConfig,
    config: ConfigVal,
) -> Result<BTreeMap<&'static str, Map>, NodePortError> {
    let previous: Option<State> = std::fs::read(state)
        .ok()
        .and_then(|text| serde_json::from_slice(&text).ok());
    let object = objects::NODEPORT.ok_or_else(|| NodePortError("not built".into()))?;
    let mut ebpf: Ebpf = EbpfLoader::new()
        .load(object)
        .map_err(|e| err("loading the eBPF object", e))?;
    for name in [PROG_UNDERLAY, PROG_SBOX, PROG_HOST_VETH, PROG_SBOX_VETH] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| NodePortError(format!("no program {name}")))?
            .try_into()
            .map_err(|e| err(name, e))?;
        prog.load().map_err(|e| match e {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => NodePortError(format!(
                "kernel refused {name}: {io_error}\nverifier log:\n{verifier_log}"
            )),
            e => err(name, e),
        })?;
    }
    let mut maps = BTreeMap::new();
    let mut ids = BTreeMap::new();
    for name in MAPS {
        let map = ebpf
            .take_map(name)
            .ok_or_else(|| NodePortError(format!("no map {name}")))?;
        let id = match &map {
            Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) => {
                d.info().map_err(|e| err(name, e))?.id()
            }
            _ => return Err(NodePortError(format!("map {name}: unexpected type"))),
        };
        ids.insert(name.to_string(), id);
        maps.insert(name, map);
    }
    // The programs pass every packet until their config is set (`enabled`): carry the old
    // maps' entries over and set it before they are attached, so they take over at once.
    if let Some((flows, local_tasks)) = previous.as_ref().and_then(|old| carry_over(old, &mut maps))
    {
        tracing::info!(
            flows,
            local_tasks,
            "routing mesh fast path: took over the previous programs' ports and flows"
        );
    }
    let cfg = maps
        .get_mut(MAP_CONFIG)
        .ok_or_else(|| NodePortError(format!("no map {MAP_CONFIG}")))?;
    Array::<&mut MapData, ConfigVal>::try_from(cfg)
        .and_then(|mut a| a.set(0, config, 0))
        .map_err(|e| err(MAP_CONFIG, e))?;
    attach(&mut ebpf, PROG_HOST_VETH, &p.host_veth, None)?;
    attach(&mut ebpf, PROG_SBOX, &p.sandbox_leg, Some(&p.sandbox))?;
    attach(&mut ebpf, PROG_SBOX_VETH, &p.sandbox_veth, Some(&p.sandbox))?;
    attach(&mut ebpf, PROG_UNDERLAY, &p.underlay_if, None)?;
    let st = State {
        maps: ids,
        config: *want,
        maps_version: NP_MAPS_VERSION,
    };
    let tmp = state.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&st).expect("serializable"))
        .and_then(|()| std::fs::rename(&tmp, state))
        .map_err(|e| err(format!("writing {}", state.display()), e))?;
    // The programs stay attached when `ebpf` is dropped: their links were taken and
    // forgotten in `attach`.
    drop(ebpf);
    Ok(maps)
}

/// Attaches program `name` to tc ingress of `iface` (in `ns`, or the current namespace), in
/// place of a filter of ours already there.
fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    ns: Option<&Netns>,
) -> Result<(), NodePortError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| NodePortError(format!("no program {name}")))?
        .try_into()
        .map_err(|e| err(name, e))?;
    let iface = iface.to_string();
    let mut run = move || -> Result<(), NodePortError> {
        if let Err(e) = tc::qdisc_add_clsact(&iface) {
            if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(err(format!("clsact qdisc on {iface}"), e));
            }
        }
        let handle = TcHandle::new(0, HANDLE);
        let link =
            SchedClassifierLink::attached(&iface, TcAttachType::Ingress, PRIORITY, handle, None)
                .map_err(|e| err(format!("interface {iface}"), e))?;
        let id = match prog.attach_to_link(link) {
            Ok(id) => id,
            Err(_) => prog
                .attach_with_options(
                    &iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: PRIORITY,
                        handle,
                        classid: None,
                    }),
                )
                .map_err(|e| err(format!("attaching {name} to {iface}"), e))?,
        };
        // Netlink filters outlive the daemon; keep this one when `prog` is dropped.
        let link = prog.take_link(id).map_err(|e| err(name, e))?;
        std::mem::forget(link);
        Ok(())
    };
    match ns {
        Some(ns) => ns.run(run).map_err(|e| err("sandbox namespace", e))?,
        None => run(),
    }
}

/// Removes our filter from tc ingress of each of `ifaces` of the current namespace, and the
/// state file: what a daemon that was killed and then left the swarm leaves (the sandbox
/// namespace goes with its holder).
pub fn remove_leftovers(ifaces: &[String], state: &Path) {
    let _ = std::fs::remove_file(state);
    for iface in ifaces {
        detach_one(iface);
    }
}

fn detach_one(iface: &str) {
    if let Ok(link) = SchedClassifierLink::attached(
        iface,
        TcAttachType::Ingress,
        PRIORITY,
        TcHandle::new(0, HANDLE),
        None,
    ) {
        if let Err(e) = link.detach() {
            tracing::trace!(iface, "routing mesh fast path: detaching: {}", chain(&e));
        }
    }
}

/// Removes our filter from each interface (errors ignored: an interface may be gone).
fn detach_all(underlay: &str, host_veth: &str, sandbox: &Netns, in_sandbox: [&str; 2]) {
    detach_one(underlay);
    detach_one(host_veth);
    let in_sandbox = in_sandbox.map(str::to_string);
    let _ = sandbox.run(move || in_sandbox.iter().for_each(|i| detach_one(i)));
}
