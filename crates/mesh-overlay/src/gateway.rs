//! The gateway bridge (Docker's `docker_gwbridge`): every task gets, besides its overlay
//! interfaces, one more interface on a host-local bridge [`GW_BRIDGE`] in the host namespace,
//! with an address from a host-local subnet (172.18.0.0/16 unless configured) and its default
//! route via the bridge's address. Traffic leaving the host from that subnet is masqueraded.
//!
//! - **Addresses** are allocated by the host alone (not cluster-wide), round robin over the
//!   subnet, and kept in `<state_dir>/gwbridge.json` (written atomically), so that a restarted
//!   meshd does not hand out the address of a task still running. The file is read and written
//!   on every change (a few hundred bytes), so two instances on the same directory agree.
//! - **Isolation**: each task's port on the bridge is isolated (`IFLA_BRPORT_ISOLATED`), so
//!   tasks cannot reach each other through the bridge (Docker's `icc=false`); the forward chain
//!   also drops traffic routed from the bridge back onto it.
//! - **NAT**: IPv4 forwarding is enabled in the host namespace and nftables table
//!   `ip mesh_gw` is (re)installed as one `nft -f -` transaction (flush and re-add: idempotent).
//!   The table is owned by this module alone, which is why it is not the generic `ip mesh`:
//!   a flush would wipe rules other components put there.
//! - **MTU**: the underlay's (no VXLAN overhead).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_netlink::{Handle, Netns};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{proc_ns, Overlay, OverlayError};

/// The gateway bridge, in the host namespace.
pub const GW_BRIDGE: &str = "mesh_gwbridge";
/// The gateway bridge's subnet unless configured (Docker's `docker_gwbridge` default).
pub const DEFAULT_GW_SUBNET: &str = "172.18.0.0/16";
/// The nftables table (family `ip`) holding the gateway's NAT and forward rules.
pub const NFT_TABLE: &str = "mesh_gw";
/// The allocation file, under [`GatewayConfig::state_dir`].
pub const STATE_FILE: &str = "gwbridge.json";
/// How long [`Overlay::gc_gateway`] spares a task this instance attached and has not yet seen
/// running (it is still in its start gate).
pub const START_GRACE: Duration = Duration::from_secs(120);

/// Settings of the gateway bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The bridge's subnet, e.g. `172.18.0.0/16`; the bridge takes its first address.
    pub subnet: String,
    /// Where the allocation file lives (meshd's exec root).
    pub state_dir: PathBuf,
}

impl GatewayConfig {
    /// The default subnet, state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> GatewayConfig {
        GatewayConfig {
            subnet: DEFAULT_GW_SUBNET.to_string(),
            state_dir: state_dir.into(),
        }
    }
}

/// An IPv4 subnet with room for a gateway and at least one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Subnet {
    pub(crate) net: Ipv4Addr,
    pub(crate) prefix: u8,
}

impl Subnet {
    pub(crate) fn parse(s: &str) -> Result<Subnet, OverlayError> {
        let bad = || OverlayError::Addr(format!("{s:?}: want an IPv4 subnet a.b.c.d/N, N <= 30"));
        let (ip, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 30 {
            return Err(bad());
        }
        let net = Ipv4Addr::from(u32::from(ip) & mask(prefix));
        if net != ip {
            return Err(OverlayError::Addr(format!(
                "{s:?}: host bits set (the subnet is {net}/{prefix})"
            )));
        }
        Ok(Subnet { net, prefix })
    }

    fn base(&self) -> u32 {
        u32::from(self.net)
    }

    /// The bridge's address: the first of the subnet.
    pub(crate) fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    fn first_host(&self) -> u32 {
        self.base() + 2
    }

    fn last_host(&self) -> u32 {
        (self.base() | !mask(self.prefix)) - 1
    }

    fn is_host(&self, ip: Ipv4Addr) -> bool {
        (self.first_host()..=self.last_host()).contains(&u32::from(ip))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p)),
    }
}

/// One task's place on the gateway bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub(crate) ip: Ipv4Addr,
    /// The host-side veth.
    pub(crate) veth: String,
}

/// The allocation file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    /// Where the round robin resumes.
    #[serde(default)]
    pub(crate) next: Option<Ipv4Addr>,
    /// Task ID -> lease.
    #[serde(default)]
    pub(crate) tasks: BTreeMap<String, Lease>,
}

/// FNV-1a, 32 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Host-side veth names: `gw` + 8 hex digits (10 chars, within IFNAMSIZ).
pub(crate) fn is_veth_name(name: &str) -> bool {
    name.len() == 10
        && name.starts_with("gw")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The temporary name of the task-side end (created in the task, then renamed).
fn peer_name(veth: &str) -> String {
    format!("gq{}", &veth[2..])
}

impl State {
    /// The task's lease: its existing one (if in `subnet`), else the next free address after
    /// the round-robin cursor, with a host-side veth name unique among the leases.
    pub(crate) fn allocate(
        &mut self,
        subnet: &Subnet,
        task_id: &str,
    ) -> Result<Lease, OverlayError> {
        if let Some(l) = self.tasks.get(task_id) {
            if subnet.is_host(l.ip) {
                return Ok(l.clone());
            }
            // The subnet changed since: a new address.
            self.tasks.remove(task_id);
        }
        let used: BTreeSet<u32> = self.tasks.values().map(|l| u32::from(l.ip)).collect();
        let (first, last) = (subnet.first_host(), subnet.last_host());
        let start = self
            .next
            .map(u32::from)
            .filter(|n| (first..=last).contains(n))
            .unwrap_or(first);
        let size = last - first + 1;
        let ip = (0..size)
            .map(|i| first + (start - first + i) % size)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| OverlayError::Gateway(format!("no free address left in {subnet}")))?;
        let names: BTreeSet<&str> = self.tasks.values().map(|l| l.veth.as_str()).collect();
        let veth = (0u32..)
            .map(|i| {
                let h = match i {
                    0 => fnv1a(task_id.as_bytes()),
                    i => fnv1a(format!("{task_id}#{i}").as_bytes()),
                };
                format!("gw{h:08x}")
            })
            .find(|n| !names.contains(n.as_str()))
            .expect("an unused name among 2^32");
        let lease = Lease {
            ip: Ipv4Addr::from(ip),
            veth,
        };
        self.next = Some(Ipv4Addr::from(if ip == last { first } else { ip + 1 }));
        self.tasks.insert(task_id.to_string(), lease.clone());
        Ok(lease)
    }

    /// Reads the file; a missing file is an empty state. A file that cannot be parsed is an
    /// error, never silently reset (that would hand out addresses in use).
    pub(crate) fn load(path: &Path) -> Result<State, OverlayError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                OverlayError::Gateway(format!("cannot parse {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(OverlayError::Gateway(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Writes the file atomically: a temp file in the same directory, fsynced, renamed over.
    pub(crate) fn save(&self, path: &Path) -> Result<(), OverlayError> {
        let err = |what: &str, e: io::Error| {
            OverlayError::Gateway(format!("cannot {what} {}: {e}", path.display()))
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| err("create the directory of", e))?;
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| err("encode", e.into()))?;
        let mut f = fs::File::create(&tmp).map_err(|e| err("write", e))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(|e| err("write", e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| err("replace", e))?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The nftables transaction (flush and re-add the table: idempotent): masquerade the subnet
/// leaving through anything but the bridge; a forward chain, policy accept (no default drop
/// policy is assumed; an accept here does not override another table's drop), that accepts
/// replies and the bridge's egress and drops traffic routed from the bridge back onto it (no
/// task-to-task path through the host, even for a task routing via the gateway on purpose).
pub(crate) fn nft_ruleset(subnet: &Subnet) -> String {
    format!(
        "table ip {t}\n\
         flush table ip {t}\n\
         table ip {t} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{br}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"{br}\" oifname \"{br}\" drop\n\
         \t\tiifname \"{br}\" accept\n\
         \t}}\n\
         }}\n",
        t = NFT_TABLE,
        br = GW_BRIDGE,
    )
}

/// Writes `1` to `/proc/sys/net/ipv4/ip_forward` (of the calling thread's namespace) if needed.
fn enable_forwarding() -> Result<(), String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let cur = fs::read_to_string(PATH).map_err(|e| format!("cannot read {PATH}: {e}"))?;
    if cur.trim() != "1" {
        fs::write(PATH, "1").map_err(|e| format!("cannot write {PATH}: {e}"))?;
        info!("enabled IPv4 forwarding");
    }
    Ok(())
}

/// The parsed gateway settings an [`Overlay`] keeps.
pub(crate) struct Gateway {
    pub(crate) subnet: Subnet,
    pub(crate) state_file: PathBuf,
    /// Tasks attached by this instance and not yet seen running: task ID -> when.
    pub(crate) fresh: std::sync::Mutex<BTreeMap<String, Instant>>,
}

impl Gateway {
    pub(crate) fn new(cfg: &GatewayConfig) -> Result<Gateway, OverlayError> {
        Ok(Gateway {
            subnet: Subnet::parse(&cfg.subnet)?,
            state_file: cfg.state_dir.join(STATE_FILE),
            fresh: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Overlay {
    fn gateway(&self) -> Result<&Gateway, OverlayError> {
        self.gw.as_ref().ok_or(OverlayError::NoGateway)
    }

    /// Runs a blocking closure on a thread inside the host namespace.
    async fn in_host<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, OverlayError> {
        let ns = self.host_ns.clone();
        tokio::task::spawn_blocking(move || ns.run(f))
            .await
            .map_err(|e| OverlayError::Gateway(format!("host namespace task: {e}")))??
            .map_err(OverlayError::Gateway)
    }

    /// The bridge (address, MTU, up), forwarding and the nftables table: idempotent.
    async fn ensure_gateway_host(&self, gw: &Gateway) -> Result<(), OverlayError> {
        let h = &self.host;
        h.add_bridge(GW_BRIDGE, Some(self.underlay_mtu)).await?;
        h.add_address(GW_BRIDGE, gw.subnet.gateway(), gw.subnet.prefix)
            .await?;
        h.set_up(GW_BRIDGE).await?;
        let rules = nft_ruleset(&gw.subnet);
        self.in_host(move || {
            enable_forwarding()?;
            mesh_netlink::nft::apply(&rules).map_err(|e| e.to_string())
        })
        .await
    }

    /// Adds the gateway interface `ifname` to the task whose namespace is
    /// `/proc/<task_pid>/ns/net` (called in its start gate, after the overlay attachments):
    /// a veth from [`GW_BRIDGE`] (isolated port), the task's address, and its default route
    /// via the bridge. Sets up the bridge, forwarding and NAT as needed. Returns the task's
    /// address; the same task ID always gets the same one while its lease lives.
    pub async fn attach_gateway(
        &self,
        task_pid: u32,
        task_id: &str,
        ifname: &str,
    ) -> Result<Ipv4Addr, OverlayError> {
        let _g = self.lock.lock().await;
        let gw = self.gateway()?;
        self.ensure_gateway_host(gw).await?;
        let mut st = State::load(&gw.state_file)?;
        let before = st.clone();
        let lease = st.allocate(&gw.subnet, task_id)?;
        if st != before {
            st.save(&gw.state_file)?;
        }
        gw.fresh().insert(task_id.to_string(), Instant::now());

        let prefix = gw.subnet.prefix;
        let task_ns = Netns::open(&proc_ns(task_pid))?;
        let t = Handle::new(&task_ns).await?;
        let h = &self.host;
        let plumbed = h.link_index(&lease.veth).await?.is_some()
            && t.link_index(ifname).await?.is_some()
            && t.addresses(ifname).await?.contains(&(lease.ip, prefix));
        if !plumbed {
            let peer = peer_name(&lease.veth);
            h.del_link(&lease.veth).await?;
            h.add_veth(&lease.veth, &peer, Some(&task_ns), Some(self.underlay_mtu))
                .await?;
            t.rename(&peer, ifname).await?;
            t.set_mac(ifname, mesh_netlink::mac_for_ip(lease.ip))
                .await?;
            t.add_address(ifname, lease.ip, prefix).await?;
        }
        h.set_master(&lease.veth, GW_BRIDGE).await?;
        h.set_port_isolated(&lease.veth, true).await?;
        h.set_up(&lease.veth).await?;
        t.set_up(ifname).await?;
        t.add_default_route_dev(gw.subnet.gateway(), ifname).await?;
        debug!(task = task_id, ip = %lease.ip, veth = lease.veth, ifname, "gateway attached");
        Ok(lease.ip)
    }

    /// Frees the gateway addresses of tasks not in `running_task_ids`, deleting their
    /// host-side veth if it is left, and deletes gateway veths no lease knows of. A task this
    /// instance attached less than [`START_GRACE`] ago and has not seen running yet is spared
    /// while its veth exists (it is still starting). A no-op without a gateway.
    pub async fn gc_gateway(
        &self,
        running_task_ids: &BTreeSet<String>,
    ) -> Result<(), OverlayError> {
        let _g = self.lock.lock().await;
        let Some(gw) = self.gw.as_ref() else {
            return Ok(());
        };
        let mut st = State::load(&gw.state_file)?;
        let links: BTreeSet<String> = self
            .host
            .links()
            .await?
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("veth"))
            .map(|l| l.name)
            .collect();
        let starting: BTreeSet<String> = {
            let mut fresh = gw.fresh();
            fresh.retain(|id, at| !running_task_ids.contains(id) && at.elapsed() < START_GRACE);
            fresh.keys().cloned().collect()
        };
        let mut freed = Vec::new();
        for (id, lease) in &st.tasks {
            if running_task_ids.contains(id) {
                continue;
            }
            let present = links.contains(&lease.veth);
            if present && starting.contains(id) {
                continue;
            }
            if present {
                self.host.del_link(&lease.veth).await?;
            }
            info!(task = id, ip = %lease.ip, "freed gateway address");
            freed.push(id.clone());
        }
        for id in &freed {
            st.tasks.remove(id);
            gw.fresh().remove(id);
        }
        if !freed.is_empty() {
            st.save(&gw.state_file)?;
        }
        let known: BTreeSet<&str> = st.tasks.values().map(|l| l.veth.as_str()).collect();
        for name in links
            .iter()
            .filter(|n| is_veth_name(n) && !known.contains(n.as_str()))
        {
            warn!(link = name, "removing a gateway veth without a lease");
            self.host.del_link(name).await?;
        }
        Ok(())
    }

    /// Frees the gateway address of one task now (deleting its host-side veth if left).
    /// Idempotent; a no-op without a gateway.
    pub async fn release_gateway(&self, task_id: &str) -> Result<(), OverlayError> {
        let _g = self.lock.lock().await;
        let Some(gw) = self.gw.as_ref() else {
            return Ok(());
        };
        let mut st = State::load(&gw.state_file)?;
        gw.fresh().remove(task_id);
        let Some(lease) = st.tasks.remove(task_id) else {
            return Ok(());
        };
        self.host.del_link(&lease.veth).await?;
        st.save(&gw.state_file)?;
        info!(task = task_id, ip = %lease.ip, "released gateway address");
        Ok(())
    }

    /// The host's end of each task's gateway veth that exists: task ID -> its ifindex. Empty
    /// without a gateway.
    pub async fn gateway_ports(&self) -> Result<BTreeMap<String, u32>, OverlayError> {
        let Some(gw) = self.gw.as_ref() else {
            return Ok(BTreeMap::new());
        };
        let leases = State::load(&gw.state_file)?.tasks;
        let links: BTreeMap<String, u32> = self
            .host
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect();
        Ok(leases
            .into_iter()
            .filter_map(|(id, lease)| Some((id, *links.get(&lease.veth)?)))
            .collect())
    }

    /// The gateway addresses in use: task ID -> address (from the allocation file).
    pub fn gateway_leases(&self) -> Result<BTreeMap<String, Ipv4Addr>, OverlayError> {
        let gw = self.gateway()?;
        Ok(State::load(&gw.state_file)?
            .tasks
            .into_iter()
            .map(|(id, l)| (id, l.ip))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> Subnet {
        Subnet::parse(s).unwrap()
    }

    #[test]
    fn subnets() {
        let s = sub("172.18.0.0/16");
        assert_eq!(s.gateway(), Ipv4Addr::new(172, 18, 0, 1));
        assert_eq!(Ipv4Addr::from(s.first_host()), Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(
            Ipv4Addr::from(s.last_host()),
            Ipv4Addr::new(172, 18, 255, 254)
        );
        assert!(s.is_host(Ipv4Addr::new(172, 18, 3, 4)));
        assert!(!s.is_host(Ipv4Addr::new(172, 18, 0, 1)));
        assert!(!s.is_host(Ipv4Addr::new(172, 19, 0, 2)));
        assert_eq!(s.to_string(), "172.18.0.0/16");
        for bad in [
            "172.18.0.0",
            "172.18.0.1/16",
            "172.18.0.0/31",
            "x/16",
            "1.2.3.0/x",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allocation_is_round_robin_sticky_and_bounded() {
        // /29: .1 gateway, .2-.6 hosts, .7 broadcast.
        let s = sub("10.5.0.0/29");
        let mut st = State::default();
        let a = st.allocate(&s, "a").unwrap();
        let b = st.allocate(&s, "b").unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 5, 0, 2));
        assert_eq!(b.ip, Ipv4Addr::new(10, 5, 0, 3));
        assert_eq!(st.allocate(&s, "a").unwrap(), a, "sticky");
        assert!(is_veth_name(&a.veth) && a.veth != b.veth, "{a:?} {b:?}");
        // A freed address is not reused before the others.
        st.tasks.remove("a");
        assert_eq!(st.allocate(&s, "c").unwrap().ip, Ipv4Addr::new(10, 5, 0, 4));
        st.allocate(&s, "d").unwrap();
        st.allocate(&s, "e").unwrap();
        // Wraps around to the freed .2.
        assert_eq!(st.allocate(&s, "f").unwrap().ip, Ipv4Addr::new(10, 5, 0, 2));
        let err = st.allocate(&s, "g").unwrap_err();
        assert_eq!(
            err.to_string(),
            "gateway bridge: no free address left in 10.5.0.0/29"
        );
        // A lease outside a changed subnet is replaced.
        let s2 = sub("10.6.0.0/24");
        assert_eq!(
            st.allocate(&s2, "b").unwrap().ip,
            Ipv4Addr::new(10, 6, 0, 2)
        );
    }

    #[test]
    fn veth_names_are_unique_even_on_hash_clashes() {
        let s = sub("10.5.0.0/24");
        let mut st = State::default();
        let a = st.allocate(&s, "x").unwrap();
        // Pretend another task holds x's name: a fresh lease of "x" must pick another.
        let mut taken = st.clone();
        taken.tasks.insert(
            "other".into(),
            Lease {
                ip: Ipv4Addr::new(10, 5, 0, 9),
                veth: a.veth.clone(),
            },
        );
        taken.tasks.remove("x");
        let b = taken.allocate(&s, "x").unwrap();
        assert_ne!(a.veth, b.veth);
        assert!(is_veth_name(&b.veth));
        assert_eq!(peer_name(&b.veth).len(), 10);
        assert!(
            !is_veth_name("gwXYZ12345") && !is_veth_name("gw1234") && !is_veth_name("ve12345678")
        );
    }

    #[test]
    fn state_persists_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(STATE_FILE);
        assert_eq!(State::load(&path).unwrap(), State::default());
        let mut st = State::default();
        st.allocate(&sub("172.18.0.0/16"), "t1").unwrap();
        st.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), st);
        assert!(!path.with_extension("json.tmp").exists());
        fs::write(&path, "{not json").unwrap();
        assert!(State::load(&path)
            .unwrap_err()
            .to_string()
            .contains("cannot parse"));
    }

    #[test]
    fn ruleset_is_one_idempotent_transaction() {
        let r = nft_ruleset(&sub("172.18.0.0/16"));
        assert!(r.starts_with("table ip mesh_gw\nflush table ip mesh_gw\ntable ip mesh_gw {\n"));
        assert!(r.contains("ip saddr 172.18.0.0/16 oifname != \"mesh_gwbridge\" masquerade"));
        assert!(r.contains("iifname \"mesh_gwbridge\" oifname \"mesh_gwbridge\" drop"));
    }
}
