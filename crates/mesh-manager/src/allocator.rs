//! Network addresses in one place: which addresses of each network are held (service VIPs,
//! node ingress addresses, the tasks that may still run), the choices the leader proposes
//! (a new service's VIPs, a new task's addresses, a node's ingress address) and the check
//! that settles them when the command is applied.
//!
//! The leader chooses from a snapshot of the store, and two proposals can be chosen from the
//! same snapshot (a `service create` racing an orchestrator pass, a leader change mid-plan).
//! So the choice is only a proposal: [`StoreState::apply`](crate::state::StoreState::apply)
//! settles it against the state the command actually applies to, through [`Used`], and a
//! proposed address another holder has meanwhile taken is replaced by the next free one of
//! its network (deterministically: every manager applies the same log to the same state). No
//! address is ever held twice.
//!
//! Addresses are given serially, as Swarm's allocator does for overlay networks: the next
//! free address after the one given last on the network (`StoreState::ip_cursor`), wrapping
//! around at the end of the subnet. An address released by a stopped task is thus not given
//! to the next task at once: clients and nodes that still hold state for it (a conntrack
//! entry, an ARP or bridge entry for the same MAC on its old node) would send the new task's
//! traffic to the old place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mesh_api::{IfAddr, NetworkAttachment, TaskState, VirtualIp};

use crate::ipam::{self, Cidr};
use crate::state::{StateError, StoreState};

/// What holds an address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A service's virtual IP (service ID).
    Vip(String),
    /// A node's ingress sandbox (node ID).
    Node(String),
    /// A task that may still run (task ID).
    Task(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Vip(id) => write!(f, "the VIP of service {id}"),
            Holder::Node(id) => write!(f, "the ingress sandbox of node {id}"),
            Holder::Task(id) => write!(f, "task {id}"),
        }
    }
}

/// The addresses held, per network ID.
#[derive(Clone, Debug, Default)]
pub struct Used {
    nets: BTreeMap<String, BTreeMap<Ipv4Addr, Holder>>,
    /// The address given last, per network (see the module docs).
    cursor: BTreeMap<String, Ipv4Addr>,
}

/// Whether a task's addresses are still held: it may run (not finished), or it was orphaned
/// on a node that may come back.
fn holds_addresses(state: TaskState) -> bool {
    !state.is_terminal() || state == TaskState::Orphaned
}

impl Used {
    /// What `s` holds.
    pub fn of(s: &StoreState) -> Used {
        let mut u = Used {
            nets: BTreeMap::new(),
            cursor: s
                .ip_cursor
                .iter()
                .filter(|(id, _)| s.networks.contains_key(*id))
                .map(|(id, ip)| (id.clone(), *ip))
                .collect(),
        };
        for svc in s.services.values() {
            for v in &svc.vips {
                u.hold(&v.network_id, &v.addr, Holder::Vip(svc.id.clone()));
            }
        }
        if let Some(net) = s.networks.values().find(|n| n.spec.ingress) {
            for n in s.nodes.values() {
                if let Some(a) = &n.ingress_addr {
                    u.hold(&net.id, a, Holder::Node(n.id.clone()));
                }
            }
        }
        for t in s.tasks.values() {
            if holds_addresses(t.status.state) {
                for a in &t.networks {
                    u.hold(&a.network_id, &a.addr, Holder::Task(t.id.clone()));
                }
            }
        }
        u
    }

    fn hold(&mut self, network_id: &str, addr: &IfAddr, who: Holder) {
        self.nets
            .entry(network_id.to_string())
            .or_default()
            .entry(addr.ip)
            .or_insert(who);
    }

    /// Who holds `ip` on the network.
    pub fn holder(&self, network_id: &str, ip: Ipv4Addr) -> Option<&Holder> {
        self.nets.get(network_id)?.get(&ip)
    }

    /// The addresses held on the network.
    pub fn addrs(&self, network_id: &str) -> BTreeSet<Ipv4Addr> {
        self.nets
            .get(network_id)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets what `who` holds (a task given new addresses).
    pub fn release(&mut self, who: &Holder) {
        for m in self.nets.values_mut() {
            m.retain(|_, h| h != who);
        }
    }

    /// The addresses given last, per network (to keep in the state).
    pub fn into_cursor(self) -> BTreeMap<String, Ipv4Addr> {
        self.cursor
    }

    /// The first free address of `subnet` on the network after the one given last.
    fn next(&self, network_id: &str, subnet: &Cidr) -> Option<Ipv4Addr> {
        ipam::next_addr_after(
            subnet,
            &self.addrs(network_id),
            self.cursor.get(network_id).copied(),
        )
    }

    /// Takes the next free address of network `network_id` for `who`.
    pub fn take_next(&mut self, network_id: &str, subnet: &Cidr, who: Holder) -> Option<Ipv4Addr> {
        let ip = self.next(network_id, subnet)?;
        self.give(network_id, ip, who);
        Some(ip)
    }

    fn give(&mut self, network_id: &str, ip: Ipv4Addr, who: Holder) {
        self.nets
            .entry(network_id.to_string())
            .or_default()
            .insert(ip, who);
        self.cursor.insert(network_id.to_string(), ip);
    }

    /// Settles a proposed address for `who`: kept if it lies in `subnet` and is free (or
    /// already `who`'s), else the next free one. `None` when the network is full.
    fn settle(
        &mut self,
        network_id: &str,
        subnet: &Cidr,
        proposed: &IfAddr,
        who: &Holder,
    ) -> Option<Ipv4Addr> {
        let ip = Some(proposed.ip).filter(|ip| {
            subnet.contains(*ip)
                && u32::from(*ip) > subnet.first() + 1
                && u32::from(*ip) < subnet.last()
                && self.holder(network_id, *ip).is_none_or(|h| h == who)
        });
        match ip {
            Some(ip) => {
                self.give(network_id, ip, who.clone());
                Some(ip)
            }
            None => self.take_next(network_id, subnet, who.clone()),
        }
    }
}

/// Settles the addresses proposed for `who` (a new service's VIPs, a task's attachments
/// given as network and address, a node's ingress address) against `s`, the state the
/// command applies to: each keeps its address if it lies in its network and is free (or
/// already `who`'s), else gets the next free one (see the module docs). An error, with
/// nothing taken, when a network is gone or full.
pub fn settle(
    s: &StoreState,
    used: &mut Used,
    who: Holder,
    addrs: &mut [VirtualIp],
) -> Result<(), StateError> {
    let before = used.clone();
    let res = addrs.iter_mut().try_for_each(|v| {
        let n = s
            .networks
            .get(&v.network_id)
            .ok_or_else(|| StateError::NotFound(format!("no such network: {}", v.network_id)))?;
        let subnet = Cidr::parse(&n.subnet).map_err(StateError::Invalid)?;
        let ip = used
            .settle(&n.id, &subnet, &v.addr, &who)
            .ok_or_else(|| full(n))?;
        v.addr = IfAddr::new(ip, subnet.len);
        Ok(())
    });
    if res.is_err() {
        *used = before;
    }
    res
}

/// `no IP address left in network NAME`.
fn full(n: &mesh_api::Network) -> StateError {
    StateError::Invalid(format!("no IP address left in network {}", n.spec.name))
}

/// One virtual IP per network of a new service in VIP mode, proposed from `s`: the next
/// address nothing holds.
pub fn propose_vips(
    s: &StoreState,
    spec: &mesh_api::ServiceSpec,
) -> Result<Vec<VirtualIp>, StateError> {
    if spec.endpoint_mode == mesh_api::EndpointMode::Dnsrr {
        return Ok(Vec::new());
    }
    let mut used = Used::of(s);
    let mut out = Vec::new();
    for name in &spec.networks {
        let n = s.find_network(name)?;
        let subnet = Cidr::parse(&n.subnet).map_err(StateError::Invalid)?;
        let ip = used
            .take_next(&n.id, &subnet, Holder::Vip(String::new()))
            .ok_or_else(|| full(n))?;
        out.push(VirtualIp {
            network_id: n.id.clone(),
            addr: IfAddr::new(ip, subnet.len),
        });
    }
    Ok(out)
}

/// Proposes a task's addresses: one on each of its service's networks, plus the ingress
/// network when it publishes a port in ingress mode (after its own, as Docker's). `used`
/// carries what earlier proposals of the same plan took.
pub fn propose_task(
    s: &StoreState,
    t: &mesh_api::Task,
    used: &mut Used,
) -> Result<Vec<NetworkAttachment>, StateError> {
    let ingress = t
        .spec
        .ports
        .iter()
        .any(|p| p.mode == mesh_api::PublishMode::Ingress)
        .then(|| s.networks.values().find(|n| n.spec.ingress))
        .flatten()
        .map(|n| n.id.clone());
    let mut out = Vec::new();
    for name in t.spec.networks.iter().chain(ingress.as_ref()) {
        let n = s.find_network(name)?;
        let subnet = Cidr::parse(&n.subnet).map_err(StateError::Invalid)?;
        let ip = used
            .take_next(&n.id, &subnet, Holder::Task(t.id.clone()))
            .ok_or_else(|| full(n))?;
        out.push(NetworkAttachment {
            network_id: n.id.clone(),
            network_name: n.spec.name.clone(),
            addr: IfAddr::new(ip, subnet.len),
            vni: n.vni,
            gateway: n.gateway,
            vip: s
                .services
                .get(&t.service_id)
                .and_then(|svc| svc.vips.iter().find(|v| v.network_id == n.id))
                .map(|v| v.addr),
            encrypted: n.spec.encrypted,
        });
    }
    Ok(out)
}

/// Every node without one gets an address on the ingress network for its ingress sandbox
/// (the routing mesh answers on every node, with or without tasks), the next free one.
/// Proposed into `used`, so the same plan's task addresses do not take them again.
pub fn propose_ingress_addrs(s: &StoreState, used: &mut Used) -> Vec<(String, IfAddr)> {
    let Some(net) = s.networks.values().find(|n| n.spec.ingress) else {
        return Vec::new();
    };
    let Ok(subnet) = Cidr::parse(&net.subnet) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for n in s.nodes.values().filter(|n| n.ingress_addr.is_none()) {
        let Some(ip) = used.take_next(&net.id, &subnet, Holder::Node(n.id.clone())) else {
            break;
        };
        out.push((n.id.clone(), IfAddr::new(ip, subnet.len)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{
        Node, NodeRole, PortConfig, Protocol, PublishMode, RestartPolicy, Service, ServiceMode,
        ServiceSpec, UpdateConfig,
    };

    use super::*;
    use crate::orchestrator::Orchestrator;
    use crate::state::{Command, CommandResult};

    fn node(i: u64) -> Node {
        Node {
            raft_id: i,
            ..Node::new(format!("n{i}"), format!("h{i}"), NodeRole::Worker, "")
        }
    }

    fn spec(name: String, replicas: u64, published: Option<u16>) -> ServiceSpec {
        ServiceSpec {
            name,
            mode: ServiceMode::Replicated { replicas },
            command: vec!["sleep".into(), "1000".into()],
            env: vec![],
            networks: vec!["appnet".into()],
            ports: published
                .map(|p| PortConfig {
                    protocol: Protocol::Tcp,
                    target: 80,
                    published: p,
                    mode: PublishMode::Ingress,
                })
                .into_iter()
                .collect(),
            endpoint_mode: Default::default(),
            constraints: vec![],
            restart: RestartPolicy::default(),
            update: UpdateConfig::default(),
            rollback: Default::default(),
            resources: Default::default(),
            labels: Default::default(),
            ..Default::default()
        }
    }

    /// Every address held, with its holders: none may have two.
    fn duplicates(s: &StoreState) -> Vec<String> {
        let mut seen: BTreeMap<(String, Ipv4Addr), Vec<String>> = BTreeMap::new();
        let mut add = |net: &str, addr: &IfAddr, who: String| {
            seen.entry((net.to_string(), addr.ip))
                .or_default()
                .push(who);
        };
        for svc in s.services.values() {
            for v in &svc.vips {
                add(&v.network_id, &v.addr, format!("vip {}", svc.spec.name));
            }
        }
        let ingress = s.networks.values().find(|n| n.spec.ingress).unwrap();
        for n in s.nodes.values() {
            if let Some(a) = &n.ingress_addr {
                add(&ingress.id, a, format!("node {}", n.id));
            }
        }
        for t in s.tasks.values() {
            if holds_addresses(t.status.state) {
                for a in &t.networks {
                    add(&a.network_id, &a.addr, format!("task {}", t.id));
                }
            }
        }
        seen.into_iter()
            .filter(|(_, w)| w.len() > 1)
            .map(|((_, ip), w)| format!("{ip}: {}", w.join(", ")))
            .collect()
    }

    /// Two creates of one name that both passed the API's check (two managers, or two
    /// clients at once): the one applied second is refused as AlreadyExists, not as an
    /// invalid argument, and takes no address.
    #[test]
    fn a_racing_duplicate_name_is_already_exists() {
        let mut s = cluster_with_appnet();
        let stale = s.clone();
        let service = |id: &str| {
            let spec = spec("web".into(), 1, None);
            Service {
                id: id.into(),
                vips: propose_vips(&stale, &spec).unwrap(),
                registry_auth: Vec::new(),
                spec,
                previous_spec: None,
                version: 1,
                created_at: 0,
                updated_at: 0,
                update_status: None,
            }
        };
        let first = Command::CreateService {
            service: service("svc1"),
        };
        let second = Command::CreateService {
            service: service("svc2"),
        };
        assert_eq!(s.apply(&first), CommandResult::Ok);
        let r = s.apply(&second);
        let CommandResult::Err(e) = r else {
            panic!("the second create was applied: {r:?}");
        };
        assert_eq!(
            e,
            StateError::AlreadyExists("service web already exists".into())
        );
        let api: mesh_api::ApiError = e.into();
        assert_eq!(api.kind, mesh_api::ErrorKind::AlreadyExists);
        assert_eq!(s.services.len(), 1);
        assert!(duplicates(&s).is_empty());
        // Lookups say what they found: nothing, or too much.
        assert!(matches!(
            s.find_service("nope"),
            Err(StateError::NotFound(_))
        ));
        assert!(matches!(s.find_network("x"), Err(StateError::NotFound(_))));
    }

    /// A service removed and another created: the new one's addresses are not the ones just
    /// released (given serially, see the module docs).
    #[test]
    fn a_released_address_is_not_given_again_at_once() {
        let mut s = cluster_with_appnet();
        let mut orch = Orchestrator::default();
        let appnet = s.find_network("appnet").unwrap().id.clone();
        let mut now = 1_000_000;
        let mut run = |s: &mut StoreState, now: &mut u64| {
            for _ in 0..20 {
                *now += 100;
                for c in orch.plan(s, *now) {
                    let _ = s.apply(&c);
                }
            }
        };
        let held = |s: &StoreState| -> BTreeSet<Ipv4Addr> { Used::of(s).addrs(&appnet) };
        let create = |s: &mut StoreState, name: &str| {
            let spec = spec(name.into(), 2, None);
            let r = s.apply(&Command::CreateService {
                service: Service {
                    id: name.into(),
                    vips: propose_vips(s, &spec).unwrap(),
                    registry_auth: Vec::new(),
                    spec,
                    previous_spec: None,
                    version: 1,
                    created_at: 0,
                    updated_at: 0,
                    update_status: None,
                },
            });
            assert_eq!(r, CommandResult::Ok);
        };
        create(&mut s, "one");
        run(&mut s, &mut now);
        let first = held(&s);
        assert_eq!(first.len(), 3, "a VIP and two tasks: {first:?}");
        assert_eq!(
            s.apply(&Command::RemoveService { id: "one".into() }),
            CommandResult::Ok
        );
        run(&mut s, &mut now);
        create(&mut s, "two");
        run(&mut s, &mut now);
        // The new service's own addresses (the old tasks, never reported stopped here, still
        // hold theirs; its VIP is released).
        let mut second: BTreeSet<Ipv4Addr> =
            s.services["two"].vips.iter().map(|v| v.addr.ip).collect();
        for t in s.tasks.values().filter(|t| t.service_id == "two") {
            second.extend(t.networks.iter().map(|a| a.addr.ip));
        }
        assert_eq!(second.len(), 3, "{second:?}");
        assert!(
            first.is_disjoint(&second),
            "released addresses given again at once: {first:?} then {second:?}"
        );
    }

    /// Service creates, node joins and orchestrator passes are all planned from the same
    /// (stale) snapshot, as a `service create` racing an orchestrator tick is, and committed in
    /// a varying order; services are removed now and then so addresses are reused. No address
    /// may ever be held twice, across more than 1,000 allocated tasks.
    /// A cluster of one node with the ingress network and `appnet` (10.0.16.0/21).
    fn cluster_with_appnet() -> StoreState {
        let mut s = StoreState::default();
        let cluster = crate::state::test_cluster();
        let ok = |r| assert_eq!(r, CommandResult::Ok);
        ok(s.apply(&Command::InitCluster {
            cluster,
            node: node(1),
        }));
        let ingress = crate::networks::ingress(0);
        ok(s.apply(&Command::CreateNetwork { network: ingress }));
        let appnet = crate::networks::new_network(
            &s,
            mesh_api::NetworkSpec {
                name: "appnet".into(),
                driver: "overlay".into(),
                subnet: Some("10.0.16.0/21".into()),
                encrypted: false,
                attachable: false,
                ingress: false,
                labels: Default::default(),
            },
            0,
        )
        .unwrap();
        ok(s.apply(&Command::CreateNetwork { network: appnet }));
        s
    }

    #[test]
    fn creates_racing_the_orchestrator_never_duplicate_an_address() {
        let mut s = cluster_with_appnet();
        let mut orch = Orchestrator::default();
        let mut seed = 20261203u64;
        let mut rand = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut allocated = BTreeSet::new();
        let mut nodes = 1;
        let mut services = 0u16;
        let mut now = 1_000_000;
        for round in 0..2_000 {
            if allocated.len() > 1_000 {
                break;
            }
            now += 100;
            let stale = s.clone();
            let mut cmds: Vec<Command> = orch.plan(&stale, now);
            if rand(2) == 0 {
                services += 1;
                let published = (rand(3) == 0).then_some(20_000 + services);
                let spec = spec(format!("s{services}"), 1 + rand(4), published);
                cmds.push(Command::CreateService {
                    service: Service {
                        id: format!("svc{services}"),
                        registry_auth: Vec::new(),
                        vips: propose_vips(&stale, &spec).unwrap(),
                        spec,
                        previous_spec: None,
                        version: 1,
                        created_at: now,
                        updated_at: now,
                        update_status: None,
                    },
                });
            }
            if rand(10) == 0 && nodes < 6 {
                nodes += 1;
                cmds.push(Command::AddNode { node: node(nodes) });
            }
            if rand(6) == 0 {
                if let Some(id) = stale
                    .services
                    .keys()
                    .nth(rand(stale.services.len().max(1) as u64) as usize)
                {
                    cmds.push(Command::RemoveService { id: id.clone() });
                }
            }
            // The commands land in any order.
            for i in (1..cmds.len()).rev() {
                cmds.swap(i, rand(i as u64 + 1) as usize);
            }
            for c in &cmds {
                let _ = s.apply(c);
            }
            // Agents: what is assigned runs, what is told to stop stops.
            for t in s.tasks.values_mut() {
                if t.status.state == TaskState::Assigned && t.desired_state == TaskState::Running {
                    t.status.state = TaskState::Running;
                } else if t.desired_state > TaskState::Running && !t.status.state.is_terminal() {
                    t.status.state = TaskState::Shutdown;
                }
                if !t.networks.is_empty() {
                    allocated.insert(t.id.clone());
                }
            }
            let dups = duplicates(&s);
            assert!(dups.is_empty(), "round {round}: {dups:?}");
        }
        assert!(
            allocated.len() > 1_000,
            "{} tasks allocated",
            allocated.len()
        );
    }
}
