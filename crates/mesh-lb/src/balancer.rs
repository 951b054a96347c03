//! One face for both VIP balancers, as the data plane drives them: [`VipBalancer`].
//!
//! The two backends keep their tables in different places. The eBPF socket balancer
//! ([`SockLb`]) has one table for the whole node: its maps, consulted by the programs on the
//! cgroup that holds every task. The nftables balancer ([`NftLb`]) has one table in each task's
//! network namespace. So the plane gives the node's VIPs to [`VipBalancer::set_vip`] (a no-op
//! for a per-task backend), and gives every task with networks the table
//! [`VipBalancer::for_task`] makes for it (none for a node-wide backend), which it then keeps
//! in line with that task's networks' VIPs ([`TaskBalancer::sync`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use mesh_netlink::Netns;

use crate::{LbError, NftLb, Proto, ServiceEntry, SockLb};

/// A node's VIP balancer, whichever backend (`meshd --lb-backend`).
pub trait VipBalancer: Send + Sync {
    /// `ebpf` or `nftables`, as `mesh vip ls` shows it.
    fn name(&self) -> &'static str;
    /// Whether the backend keeps a table per task ([`VipBalancer::for_task`]) rather than
    /// one for the node.
    fn per_task(&self) -> bool;
    /// Sets the backends of `vip` (every port, TCP and UDP) in the node's table.
    fn set_vip(&self, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> Result<(), LbError>;
    /// Removes `vip` from the node's table.
    fn remove_vip(&self, vip: Ipv4Addr) -> Result<(), LbError>;
    /// The table of a task whose network namespace is `netns`, if the backend keeps one per
    /// task: it adopts what the namespace holds already (a restarted daemon's task).
    fn for_task(&self, netns: Netns) -> Result<Option<Box<dyn TaskBalancer>>, LbError>;
    /// What the node's table holds (nothing for a per-task backend: ask the tasks' tables).
    fn dump(&self) -> Result<Vec<ServiceEntry>, LbError>;
}

/// The balancer table of one task.
pub trait TaskBalancer: Send {
    /// Brings the table in line with `want` (VIP -> backends): the VIPs of the task's
    /// networks.
    fn sync(&mut self, want: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), LbError>;
    /// What the table holds.
    fn dump(&self) -> Result<Vec<ServiceEntry>, LbError>;
}

/// The eBPF socket balancer as the node's [`VipBalancer`].
pub struct EbpfBalancer(Mutex<SockLb>);

impl EbpfBalancer {
    /// The balancer over `lb` (loaded and attached).
    pub fn new(lb: SockLb) -> EbpfBalancer {
        EbpfBalancer(Mutex::new(lb))
    }

    fn lb(&self) -> std::sync::MutexGuard<'_, SockLb> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VipBalancer for EbpfBalancer {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn per_task(&self) -> bool {
        false
    }

    fn set_vip(&self, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> Result<(), LbError> {
        let backends: Vec<(Ipv4Addr, u16)> = backends.iter().map(|ip| (*ip, 0)).collect();
        let mut lb = self.lb();
        // Both protocols, even when the first fails: the other still gets its backends.
        let tcp = lb.set_service(vip, 0, Proto::Tcp, &backends);
        let udp = lb.set_service(vip, 0, Proto::Udp, &backends);
        tcp.and(udp)
    }

    fn remove_vip(&self, vip: Ipv4Addr) -> Result<(), LbError> {
        let mut lb = self.lb();
        let tcp = lb.remove_service(vip, 0, Proto::Tcp);
        let udp = lb.remove_service(vip, 0, Proto::Udp);
        tcp.and(udp)
    }

    fn for_task(&self, _: Netns) -> Result<Option<Box<dyn TaskBalancer>>, LbError> {
        Ok(None)
    }

    fn dump(&self) -> Result<Vec<ServiceEntry>, LbError> {
        self.lb().dump()
    }
}

/// The nftables balancer as the node's [`VipBalancer`]: a `mesh_lb` table in each task's
/// namespace, nothing node-wide.
pub struct NftBalancer;

impl VipBalancer for NftBalancer {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn per_task(&self) -> bool {
        true
    }

    fn set_vip(&self, _: Ipv4Addr, _: &[Ipv4Addr]) -> Result<(), LbError> {
        Ok(())
    }

    fn remove_vip(&self, _: Ipv4Addr) -> Result<(), LbError> {
        Ok(())
    }

    fn for_task(&self, netns: Netns) -> Result<Option<Box<dyn TaskBalancer>>, LbError> {
        Ok(Some(Box::new(NftLb::new(Some(netns))?)))
    }

    fn dump(&self) -> Result<Vec<ServiceEntry>, LbError> {
        Ok(Vec::new())
    }
}

impl TaskBalancer for NftLb {
    fn sync(&mut self, want: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), LbError> {
        NftLb::sync(self, want)
    }

    fn dump(&self) -> Result<Vec<ServiceEntry>, LbError> {
        NftLb::dump(self)
    }
}
