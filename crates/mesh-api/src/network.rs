//! Overlay networks and task attachments, as the replicated store keeps them and
//! `network inspect` shows them.

use serde::{Deserialize, Serialize};

/// What a user asks for in `network create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// Only `overlay` exists.
    pub driver: String,
    /// `A.B.C.D/N`, or `None` to take the next free /24 of 10.0.0.0/8.
    pub subnet: Option<String>,
    pub attachable: bool,
    /// The routing-mesh network made at `swarm init`.
    #[serde(default)]
    pub ingress: bool,
    /// User metadata (`--label`; stacks put `com.docker.stack.namespace` here).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A network as stored: its spec and what the allocator gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub spec: NetworkSpec,
    /// `A.B.C.D/N`.
    pub subnet: String,
    /// The first usable address: the bridge's address on every host.
    pub gateway: String,
    /// VXLAN network identifier, from 4096.
    pub vni: u32,
    pub created_at: u64,
}

/// A task's place on a network: its address there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    pub network_id: String,
    pub network_name: String,
    /// `A.B.C.D/N`.
    pub addr: String,
    pub vni: u32,
    pub gateway: String,
    /// The service's virtual IP on this network (`A.B.C.D/N`), if it has one.
    #[serde(default)]
    pub vip: Option<String>,
}

/// One line of `mesh network ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
}

/// One VIP of a node's balancer, as `mesh vip ls` shows it (`--format json`: these keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VipEntry {
    /// The service's name (empty if the VIP is no longer any service's).
    pub service: String,
    /// The address.
    #[serde(rename = "VIP")]
    pub vip: String,
    /// The port, `*` for every port.
    pub port: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The backends' addresses.
    pub backends: Vec<String>,
    /// `ebpf` or `nftables`.
    pub balancer: String,
}

/// What a node's embedded DNS answers for one name (`mesh dns query`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAnswer {
    /// The name asked.
    pub name: String,
    /// The type asked (`A`, `SRV`, ...).
    #[serde(rename = "type")]
    pub qtype: String,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...
    pub rcode: String,
    /// The data of the answer records of the asked type, in the order served.
    pub answers: Vec<String>,
    /// Whether the name went to the upstream resolvers.
    pub forwarded: bool,
}
