//! The network plane `meshd` gives its agent: the VXLAN overlay (`mesh-overlay`) programmed
//! from endpoint records gossiped per network (`mesh-gossip`), with the overlay namespaces held
//! by the executor's holder processes so they survive a daemon restart.
//!
//! Each running local task publishes one record per network it is attached to (table
//! `endpoints`, key = task ID): its address, MAC, VTEP and names. Gossip delivers a network's
//! records only to the hosts that have a task on it; every change (and a periodic pass) makes
//! the overlay's ARP/FDB entries match the records, and removes the namespaces of networks
//! without a local task.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Task;
use mesh_gossip::{Config as GossipConfig, Event, Gossip};
use mesh_manager::runtime::{NetworkPlane, PlaneIdentity};
use mesh_overlay::{Attachment, Holders, NetworkDesc, Overlay, OverlayConfig, Remote};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The gossip table of endpoint records.
pub const ENDPOINTS: &str = "endpoints";

/// What a host publishes about a local task on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
    pub vni: u32,
    pub task_name: String,
    pub service_name: String,
    pub service_id: String,
    /// The service's virtual IP on this network (none in dnsrr mode).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
}

/// The executor's holder processes behind the overlay's `Holders` seam.
pub struct ExecutorHolders(pub Arc<mesh_executor::Executor>);

impl Holders for ExecutorHolders {
    fn ensure(&self, name: &str) -> Result<u32, String> {
        self.0.netns_ensure(name).map_err(|e| e.to_string())
    }
    fn list(&self) -> Vec<(String, u32)> {
        self.0.netns_list()
    }
    fn remove(&self, name: &str) -> Result<(), String> {
        self.0.netns_remove(name).map_err(|e| e.to_string())
    }
}

/// Ports and settings from meshd's flags.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    /// Where the gateway bridge keeps its address leases.
    pub exec_root: std::path::PathBuf,
    pub gossip_port: u16,
    pub vxlan_port: u16,
    pub mtu: Option<u32>,
}

struct Running {
    gossip: Gossip,
    overlay: Arc<Overlay>,
    vtep: Ipv4Addr,
    /// Records this host published: (network ID, task ID) -> record.
    published: BTreeMap<(String, String), EndpointRecord>,
    /// The networks with a local task: network ID -> description.
    networks: BTreeMap<String, NetworkDesc>,
    stop: watch::Sender<bool>,
}

/// The plane: a cheap handle on shared state.
pub struct Plane(Arc<Inner>);

struct Inner {
    cfg: PlaneConfig,
    /// The embedded DNS engine: a socket pair at 127.0.0.11:53 in every task with a network.
    dns: mesh_dns::Dns,
    /// Socket-level VIP balancing for every task below the daemon's cgroup (`None` when the
    /// kernel refused the eBPF programs: then VIPs do not answer, and a warning says why).
    lb: Option<std::sync::Mutex<mesh_lb::SockLb>>,
    /// The VIPs programmed into the balancer, with their service names.
    /// What the balancer was last given: VIP -> (service name, backend addresses, sorted).
    lb_vips: std::sync::Mutex<BTreeMap<Ipv4Addr, (String, Vec<Ipv4Addr>)>>,
    /// The running set given before the plane was up, applied once it is.
    pending_local: std::sync::Mutex<Option<Vec<Task>>>,
    /// Names of the networks with a local task, by ID (for `mesh dns query`).
    net_names: std::sync::Mutex<BTreeMap<String, String>>,
    /// DNS registrations by task ID, with the task's pid (dropped once the process is gone).
    dns_regs: std::sync::Mutex<BTreeMap<String, (u32, mesh_dns::Registration)>>,
    rt: tokio::runtime::Handle,
    holders: Arc<ExecutorHolders>,
    running: tokio::sync::Mutex<Option<Running>>,
    ready: watch::Sender<bool>,
    /// Serializes `set_local` passes in order.
    local_seq: tokio::sync::Mutex<()>,
}

fn attachment_desc(a: &mesh_api::NetworkAttachment) -> Option<(Ipv4Addr, NetworkDesc)> {
    let (ip, prefix) = a.addr.split_once('/')?;
    Some((
        ip.parse().ok()?,
        NetworkDesc {
            vni: a.vni,
            gateway: a.gateway.parse().ok()?,
            prefix: prefix.parse().ok()?,
        },
    ))
}

impl Plane {
    pub fn new(
        cfg: PlaneConfig,
        rt: tokio::runtime::Handle,
        exec: Arc<mesh_executor::Executor>,
    ) -> Plane {
        let (ready, _) = watch::channel(false);
        let upstreams = match mesh_dns::ResolvConf::read_host() {
            Ok(r) => r.nameservers,
            Err(e) => {
                warn!("no upstream resolvers for the embedded DNS: {e}");
                Vec::new()
            }
        };
        Plane(Arc::new(Inner {
            cfg,
            dns: mesh_dns::Dns::new(upstreams),
            lb: load_lb(&exec),
            lb_vips: std::sync::Mutex::new(BTreeMap::new()),
            net_names: std::sync::Mutex::new(BTreeMap::new()),
            pending_local: std::sync::Mutex::new(None),
            dns_regs: std::sync::Mutex::new(BTreeMap::new()),
            rt,
            holders: Arc::new(ExecutorHolders(exec)),
            running: tokio::sync::Mutex::new(None),
            ready,
            local_seq: tokio::sync::Mutex::new(()),
        }))
    }
}

impl Inner {
    async fn start_async(self: Arc<Self>, me: PlaneIdentity) -> Result<(), String> {
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
        .map_err(|e| e.to_string())?;
        let addr = SocketAddr::from((me.addr, self.cfg.gossip_port));
        let gossip = Gossip::start(GossipConfig::new(
            me.node_id.clone(),
            addr,
            me.cluster_id.clone(),
        ))
        .await
        .map_err(|e| format!("cannot start gossip on {addr}: {e}"))?;
        let peers: Vec<SocketAddr> = me
            .peers
            .iter()
            .filter(|p| **p != me.addr)
            .map(|p| SocketAddr::from((*p, self.cfg.gossip_port)))
            .collect();
        if !peers.is_empty() {
            if let Err(e) = gossip.join(&peers).await {
                warn!("gossip join: {e}");
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let overlay = Arc::new(overlay);
        *self.running.lock().await = Some(Running {
            gossip: gossip.clone(),
            overlay,
            vtep: me.addr,
            published: BTreeMap::new(),
            networks: BTreeMap::new(),
            stop,
        });
        self.ready.send_replace(true);
        // The agent may have told us what runs here before we were up.
        let pending = self
            .pending_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(running) = pending {
            let _seq = self.local_seq.lock().await;
            if let Err(e) = self.set_local_async(running).await {
                warn!("network plane: {e}");
            }
        }
        tokio::spawn(self.clone().events_loop(gossip, stop_rx));
        info!(gossip = %addr, "network plane started");
        Ok(())
    }

    /// Programs the overlay after every gossip change, and every few seconds to heal.
    async fn events_loop(self: Arc<Self>, gossip: Gossip, mut stop: watch::Receiver<bool>) {
        let mut events = gossip.subscribe();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(Event::Upsert { .. } | Event::Delete { .. } | Event::NodeDown { .. }) => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.changed() => return,
            }
            // Coalesce a burst of events into one pass.
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(5), events.recv()).await
            {}
            if let Err(e) = self.sync_remotes().await {
                debug!("overlay sync: {e}");
            }
        }
    }

    async fn sync_remotes(&self) -> Result<(), String> {
        let guard = self.running.lock().await;
        let Some(r) = guard.as_ref() else {
            return Ok(());
        };
        let mut by_vni: BTreeMap<u32, NetworkDesc> = BTreeMap::new();
        let mut remotes: BTreeMap<u32, BTreeSet<Remote>> = BTreeMap::new();
        let mut records = mesh_dns::Records::new();
        let mut lb: BTreeMap<Ipv4Addr, (String, Vec<Ipv4Addr>)> = BTreeMap::new();
        for (id, desc) in &r.networks {
            by_vni.insert(desc.vni, desc.clone());
            let set = remotes.entry(desc.vni).or_default();
            let mut services: BTreeMap<String, (Option<Ipv4Addr>, Vec<mesh_dns::TaskRecord>)> =
                BTreeMap::new();
            for e in r.gossip.entries(id, ENDPOINTS).await {
                match serde_json::from_slice::<EndpointRecord>(&e.value) {
                    Ok(rec) => {
                        if rec.vtep != r.vtep {
                            set.insert(Remote {
                                ip: rec.ip,
                                mac: rec.mac,
                                vtep: rec.vtep,
                            });
                        }
                        let entry = services.entry(rec.service_name.clone()).or_default();
                        entry.0 = entry.0.or(rec.vip);
                        entry.1.push(mesh_dns::TaskRecord {
                            name: rec.task_name.clone(),
                            hostname: e.key.chars().take(12).collect(),
                            ip: rec.ip,
                        });
                    }
                    Err(err) => debug!("bad endpoint record {}: {err}", e.key),
                }
            }
            for (name, (vip, tasks)) in services {
                if let Some(v) = vip {
                    lb.insert(v, (name.clone(), tasks.iter().map(|t| t.ip).collect()));
                }
                let service = mesh_dns::ServiceRecord {
                    name,
                    vip,
                    dnsrr: vip.is_none(),
                    tasks,
                };
                records.put_service(id, service);
            }
        }
        self.dns.replace(records);
        self.program_lb(&lb);
        r.overlay
            .sync_remotes(&by_vni, &remotes)
            .await
            .map_err(|e| e.to_string())
    }

    async fn set_local_async(&self, running: Vec<Task>) -> Result<(), String> {
        // Stop serving DNS to tasks whose process is gone (a task still in its start gate is
        // not in `running` yet, so liveness, not membership, decides).
        self.dns_regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (pid, _)| std::path::Path::new(&format!("/proc/{pid}")).exists());
        {
            let mut guard = self.running.lock().await;
            let Some(r) = guard.as_mut() else {
                // Not started yet (gossip still binding): apply it once started.
                *self.pending_local.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
                return Ok(());
            };
            let mut want: BTreeMap<(String, String), EndpointRecord> = BTreeMap::new();
            let mut networks = BTreeMap::new();
            for t in &running {
                for a in &t.networks {
                    self.net_names
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(a.network_id.clone(), a.network_name.clone());
                    let Some((ip, desc)) = attachment_desc(a) else {
                        continue;
                    };
                    networks.insert(a.network_id.clone(), desc.clone());
                    want.insert(
                        (a.network_id.clone(), t.id.clone()),
                        EndpointRecord {
                            ip,
                            prefix: desc.prefix,
                            mac: mesh_netlink::mac_for_ip(ip),
                            vtep: r.vtep,
                            vni: desc.vni,
                            task_name: t.name(),
                            service_name: t.service_name.clone(),
                            service_id: t.service_id.clone(),
                            vip: a
                                .vip
                                .as_deref()
                                .and_then(|v| v.split('/').next()?.parse().ok()),
                        },
                    );
                }
            }
            let ids: BTreeSet<String> = networks.keys().cloned().collect();
            r.gossip.set_networks(ids).await;
            for ((net, task), rec) in &want {
                if r.published.get(&(net.clone(), task.clone())) != Some(rec) {
                    let v = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
                    if let Err(e) = r.gossip.put(net, ENDPOINTS, task, v).await {
                        warn!("publishing endpoint {task} on {net}: {e}");
                    }
                }
            }
            for (net, task) in r.published.keys() {
                if !want.contains_key(&(net.clone(), task.clone())) && networks.contains_key(net) {
                    if let Err(e) = r.gossip.delete(net, ENDPOINTS, task).await {
                        debug!("withdrawing endpoint {task} on {net}: {e}");
                    }
                }
            }
            r.published = want;
            let keep: BTreeSet<u32> = networks.values().map(|d| d.vni).collect();
            r.networks = networks;
            r.overlay.gc(&keep).await.map_err(|e| e.to_string())?;
            let ids: BTreeSet<String> = running.iter().map(|t| t.id.clone()).collect();
            r.overlay
                .gc_gateway(&ids)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.sync_remotes().await
    }
}

impl NetworkPlane for Plane {
    fn start(&self, me: PlaneIdentity) -> Result<(), String> {
        if me.addr.is_unspecified() {
            return Err("no IPv4 advertise address: the overlay needs one".into());
        }
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            if let Err(e) = this.start_async(me).await {
                warn!("network plane: {e}");
            }
        });
        Ok(())
    }

    fn stop(&self) {
        self.0.ready.send_replace(false);
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            if let Some(r) = this.running.lock().await.take() {
                r.stop.send_replace(true);
                r.gossip.leave().await;
            }
        });
    }

    fn attach(&self, task: &Task, pid: u32) -> Result<(), String> {
        let mut ready = self.0.ready.subscribe();
        let this = self.0.clone();
        self.0.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(15), ready.wait_for(|r| *r))
                .await
                .map_err(|_| "the network plane is not ready".to_string())?
                .map_err(|_| "the network plane stopped".to_string())?;
            let overlay = this
                .running
                .lock()
                .await
                .as_ref()
                .map(|r| r.overlay.clone())
                .ok_or("the network plane stopped")?;
            for (i, a) in task.networks.iter().enumerate() {
                let (ip, network) =
                    attachment_desc(a).ok_or_else(|| format!("bad attachment {a:?}"))?;
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
                    .map_err(|e| format!("network {}: {e}", a.network_name))?;
            }
            // As Docker's docker_gwbridge: a task on an overlay also gets a default route out
            // through its host, masqueraded.
            if !task.networks.is_empty() {
                overlay
                    .attach_gateway(pid, &task.id, &format!("eth{}", task.networks.len()))
                    .await
                    .map_err(|e| format!("gateway bridge: {e}"))?;
                // The embedded DNS answers at 127.0.0.11:53 inside the task.
                let ns = format!("/proc/{pid}/ns/net");
                let (udp, tcp) = mesh_dns::bind_in_netns(std::path::Path::new(&ns))
                    .map_err(|e| format!("embedded DNS: {e}"))?;
                let nets: Vec<(String, String)> = task
                    .networks
                    .iter()
                    .map(|a| (a.network_id.clone(), a.network_name.clone()))
                    .collect();
                let reg = this
                    .dns
                    .register(&task.id, nets, udp, tcp)
                    .map_err(|e| format!("embedded DNS: {e}"))?;
                this.dns_regs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(task.id.clone(), (pid, reg));
            }
            Ok(())
        })
    }

    fn set_local(&self, running: Vec<Task>) {
        let this = self.0.clone();
        self.0.rt.spawn(async move {
            let _seq = this.local_seq.lock().await;
            if let Err(e) = this.set_local_async(running).await {
                warn!("network plane: {e}");
            }
        });
    }

    fn vip_ls(&self) -> Result<serde_json::Value, String> {
        let Some(lb) = &self.0.lb else {
            return Err(
                "service VIPs are disabled on this node (the eBPF balancer did not load)".into(),
            );
        };
        let entries = lb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dump()
            .map_err(|e| e.to_string())?;
        let names = self
            .0
            .lb_vips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rows: Vec<serde_json::Value> = entries
            .into_iter()
            .map(|e| {
                let ports = if e.port == 0 {
                    "*".to_string()
                } else {
                    e.port.to_string()
                };
                serde_json::json!({
                    "Service": names.get(&e.vip).map(|(n, _)| n.clone()).unwrap_or_default(),
                    "VIP": e.vip.to_string(),
                    "Port": ports,
                    "Protocol": format!("{:?}", e.proto).to_lowercase(),
                    "Backends": e.backends.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(serde_json::Value::Array(rows))
    }

    fn dns_query(
        &self,
        network: Option<&str>,
        name: &str,
        qtype: &str,
    ) -> Result<serde_json::Value, String> {
        let mut nets: Vec<(String, String)> = self
            .0
            .net_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, n)| (id.clone(), n.clone()))
            .collect();
        if let Some(want) = network {
            nets.retain(|(id, n)| n == want || id == want);
            if nets.is_empty() {
                return Err(format!("no task on network {want} runs on this node"));
            }
        }
        let a = self
            .0
            .rt
            .block_on(self.0.dns.query(&nets, name, qtype))
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "name": a.name,
            "type": a.qtype,
            "rcode": a.rcode,
            "answers": a.answers,
            "forwarded": a.forwarded,
        }))
    }
}

/// Loads the socket balancer and attaches it to the daemon's v2 cgroup, which holds every task.
fn load_lb(exec: &mesh_executor::Executor) -> Option<std::sync::Mutex<mesh_lb::SockLb>> {
    let dir = exec
        .layout()
        .v2_task_path(exec.cgroup_parent(), "_")
        .parent()?
        .to_path_buf();
    let mut lb = match mesh_lb::SockLb::load() {
        Ok(lb) => lb,
        Err(e) => {
            warn!("service VIPs disabled: cannot load the eBPF balancer: {e}");
            return None;
        }
    };
    if let Err(e) = lb.attach(&dir) {
        warn!(
            "service VIPs disabled: cannot attach the eBPF balancer to {}: {e}",
            dir.display()
        );
        return None;
    }
    info!(cgroup = %dir.display(), "eBPF socket balancer attached");
    Some(std::sync::Mutex::new(lb))
}

impl Inner {
    /// Makes the balancer hold exactly `want`: each VIP, on every port, TCP and UDP, goes to
    /// one of its running tasks.
    fn program_lb(&self, want: &BTreeMap<Ipv4Addr, (String, Vec<Ipv4Addr>)>) {
        let Some(lb) = &self.lb else { return };
        let mut lb = lb.lock().unwrap_or_else(|p| p.into_inner());
        let mut have = self.lb_vips.lock().unwrap_or_else(|p| p.into_inner());
        for (vip, (name, ips)) in want {
            let mut ips = ips.clone();
            ips.sort();
            // Every gossip event comes here: only VIPs whose backends changed touch the maps.
            if have.get(vip).is_some_and(|(_, old)| *old == ips) {
                continue;
            }
            let backends: Vec<(Ipv4Addr, u16)> = ips.iter().map(|ip| (*ip, 0)).collect();
            for proto in [mesh_lb::Proto::Tcp, mesh_lb::Proto::Udp] {
                if let Err(e) = lb.set_service(*vip, 0, proto, &backends) {
                    warn!(%vip, "programming the balancer: {e}");
                }
            }
            have.insert(*vip, (name.clone(), ips));
        }
        let stale: Vec<Ipv4Addr> = have
            .keys()
            .filter(|v| !want.contains_key(v))
            .copied()
            .collect();
        for vip in stale {
            for proto in [mesh_lb::Proto::Tcp, mesh_lb::Proto::Udp] {
                let _ = lb.remove_service(vip, 0, proto);
            }
            have.remove(&vip);
        }
    }
}
