//! The replicated state machine: the cluster record and the nodes, changed only by applying
//! [`Command`]s committed through Raft. Applying is deterministic and never fails the log:
//! a command that does not fit the state yields [`CommandResult::Err`] and changes nothing.

use std::collections::BTreeMap;

use mesh_api::{
    ApiError, Availability, Cluster, ErrorKind, Node, NodeRole, NodeState, Service, Task,
    TaskState, TaskStatus, UpdateStatus,
};
use serde::{Deserialize, Serialize};

use crate::allocator::{self, Holder, Used};

/// A change to the cluster state, proposed by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Written once, by `swarm init`.
    InitCluster {
        cluster: Cluster,
        node: Node,
    },
    /// A node that joined (or re-joined under the same ID).
    AddNode {
        node: Node,
    },
    SetNodeState {
        id: String,
        state: NodeState,
        at: u64,
    },
    UpdateNode {
        id: String,
        availability: Option<Availability>,
        label_add: BTreeMap<String, String>,
        label_rm: Vec<String>,
        at: u64,
    },
    SetNodeRole {
        id: String,
        role: NodeRole,
        at: u64,
    },
    RemoveNode {
        id: String,
    },
    /// The node's address on the ingress network, for its ingress sandbox.
    SetNodeIngress {
        id: String,
        addr: mesh_api::IfAddr,
    },
    RotateSecret {
        role: NodeRole,
        secret: String,
    },
    /// `swarm update` / `unlock-key --rotate`: the unlock key (base64; `None`: autolock off)
    /// and the settings, as a whole.
    UpdateCluster {
        unlock_key: Option<String>,
        settings: mesh_api::ClusterSettings,
    },
    /// `swarm ca --rotate`: node certificates are issued from `rotation`'s root from now on
    /// (a rotation already in progress is replaced).
    StartCaRotation {
        rotation: mesh_api::CaRotation,
    },
    /// Every node has a certificate from the rotation's new root (`cert_pem`, so that a
    /// rotation started meanwhile is not ended by its predecessor's end): it becomes the
    /// root, presented with its cross-signed copy.
    FinishCaRotation {
        cert_pem: String,
    },
    /// A new service (its name must be unused).
    CreateService {
        service: Service,
    },
    /// Replaces a service's spec, version and update status.
    UpdateService {
        service: Service,
    },
    /// Deletes a service; its tasks are asked to go away (desired state Remove).
    RemoveService {
        id: String,
    },
    SetUpdateStatus {
        service_id: String,
        status: Option<UpdateStatus>,
    },
    CreateTasks {
        tasks: Vec<Task>,
    },
    /// Scheduler decisions: a node for each task (state Assigned), or why none fits.
    AssignTasks {
        assignments: Vec<Assignment>,
    },
    /// Desired states only move forward; a lower one is ignored.
    SetDesiredState {
        ids: Vec<String>,
        desired: TaskState,
    },
    /// Observed states only move forward; an update to an earlier state is ignored.
    UpdateTaskStatus {
        updates: Vec<(String, TaskStatus)>,
    },
    DeleteTasks {
        ids: Vec<String>,
    },
    CreateNetwork {
        network: mesh_api::Network,
    },
    RemoveNetwork {
        id: String,
    },
    /// A new secret or config (its name must be unused among its kind).
    CreateBlob {
        blob: mesh_api::Blob,
    },
    /// New labels for a secret or config (nothing else of one changes).
    SetBlobLabels {
        id: String,
        labels: BTreeMap<String, String>,
        at: u64,
    },
    /// Deletes a secret or config; refused while a service uses it.
    RemoveBlob {
        id: String,
    },
    /// A new gossip key (see `gossipkeys`): its secret sealed with the data key. It gets the
    /// next ID; the newest [`crate::gossipkeys::KEPT`] are kept, or this one alone with
    /// `retire` (a node was removed: the keys it knew go at once).
    AddGossipKey {
        sealed: Vec<u8>,
        at: u64,
        retire: bool,
    },
    /// Several commands in one log entry, applied in order (the orchestrator's plan).
    Batch {
        commands: Vec<Command>,
    },
}

/// One scheduling decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: String,
    /// The chosen node, or `None` when no node fits (the task stays Pending with `status`).
    pub node_id: Option<String>,
    pub status: TaskStatus,
    /// Network addresses given by the allocator, set with the move to Pending.
    #[serde(default)]
    pub networks: Option<Vec<mesh_api::NetworkAttachment>>,
}

/// What applying a command returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Ok,
    Err(StateError),
}

/// Why the state refused a command, or why a lookup in it failed: the kind the API answers
/// with, and Docker's words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    /// `no such service: web`.
    #[error("{0}")]
    NotFound(String),
    /// `service web already exists`: also what the loser of two racing creates of one name
    /// gets, whichever manager it asked.
    #[error("{0}")]
    AlreadyExists(String),
    /// Anything else that does not fit the state: an ambiguous prefix, a port, address or
    /// VNI another holds, an update out of sequence, no cluster yet.
    #[error("{0}")]
    Invalid(String),
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        match e {
            StateError::NotFound(m) => ApiError::not_found(m),
            StateError::AlreadyExists(m) => ApiError::new(ErrorKind::AlreadyExists, m),
            StateError::Invalid(m) => ApiError::invalid(m),
        }
    }
}

/// The whole replicated state. Snapshots are this struct as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    pub cluster: Option<Cluster>,
    pub nodes: BTreeMap<String, Node>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub tasks: BTreeMap<String, Task>,
    #[serde(default)]
    pub networks: BTreeMap<String, mesh_api::Network>,
    /// Per network ID, the address given last: the next one is the first free after it
    /// (see `allocator`), so a released address is not reused at once.
    #[serde(default)]
    pub ip_cursor: BTreeMap<String, std::net::Ipv4Addr>,
    /// Secrets and configs by ID (a secret's data sealed, see `blobs`).
    #[serde(default)]
    pub blobs: BTreeMap<String, mesh_api::Blob>,
    /// The gossip keys, oldest first (see `gossipkeys`).
    #[serde(default)]
    pub gossip_keys: Vec<GossipKey>,
    /// How many nodes were ever removed: a key made before the last removal is retired.
    #[serde(default)]
    pub node_removals: u64,
}

/// A gossip key in the store: its secret sealed with the data key, as a secret's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    pub id: u32,
    pub sealed: Vec<u8>,
    /// When the leader made it (ms since the epoch, its clock).
    pub created_at: u64,
    /// [`StoreState::node_removals`] when it was made.
    pub removals: u64,
}

impl StoreState {
    /// Applies one command. Deterministic: the same log gives the same state on every manager.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match self.try_apply(cmd) {
            Ok(()) => CommandResult::Ok,
            Err(e) => CommandResult::Err(e),
        }
    }

    fn try_apply(&mut self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::InitCluster { cluster, node } => {
                if self.cluster.is_some() {
                    return Err(StateError::Invalid("cluster already initialized".into()));
                }
                self.cluster = Some(cluster.clone());
                self.nodes.insert(node.id.clone(), node.clone());
            }
            Command::AddNode { node } => {
                self.cluster()?;
                if let Some(other) = self.nodes.values().find(|n| {
                    n.id != node.id && n.role == NodeRole::Manager && n.raft_id == node.raft_id
                }) {
                    return Err(StateError::Invalid(format!(
                        "raft id {} already used by {}",
                        node.raft_id, other.id
                    )));
                }
                self.nodes.insert(node.id.clone(), node.clone());
            }
            Command::SetNodeIngress { id, addr } => {
                self.node_mut(id)?;
                let addr = match self.networks.values().find(|n| n.spec.ingress) {
                    // Settled like every address (see `allocator`): taken meanwhile, the
                    // node gets the next free one.
                    Some(net) => {
                        let mut a = [mesh_api::VirtualIp {
                            network_id: net.id.clone(),
                            addr: *addr,
                        }];
                        let mut used = Used::of(self);
                        allocator::settle(self, &mut used, Holder::Node(id.clone()), &mut a)?;
                        self.ip_cursor = used.into_cursor();
                        let [a] = a;
                        a.addr
                    }
                    None => {
                        if let Some(other) = self
                            .nodes
                            .values()
                            .find(|n| n.id != *id && n.ingress_addr == Some(*addr))
                        {
                            return Err(StateError::Invalid(format!(
                                "ingress address {addr} is held by node {}",
                                other.id
                            )));
                        }
                        *addr
                    }
                };
                self.node_mut(id)?.ingress_addr = Some(addr);
            }
            Command::SetNodeState { id, state, at } => {
                let n = self.node_mut(id)?;
                n.state = *state;
                n.updated_at = *at;
            }
            Command::UpdateNode {
                id,
                availability,
                label_add,
                label_rm,
                at,
            } => {
                let n = self.node_mut(id)?;
                if let Some(a) = availability {
                    n.availability = *a;
                }
                for k in label_rm {
                    n.labels.remove(k);
                }
                for (k, v) in label_add {
                    n.labels.insert(k.clone(), v.clone());
                }
                n.updated_at = *at;
            }
            Command::SetNodeRole { id, role, at } => {
                let n = self.node_mut(id)?;
                n.role = *role;
                n.updated_at = *at;
            }
            Command::RemoveNode { id } => {
                self.nodes
                    .remove(id)
                    .ok_or_else(|| StateError::NotFound(format!("no such node: {id}")))?;
                self.node_removals += 1;
            }
            Command::AddGossipKey { sealed, at, retire } => {
                self.cluster()?;
                let id = self.gossip_keys.last().map_or(1, |k| k.id.wrapping_add(1));
                if *retire {
                    self.gossip_keys.clear();
                }
                self.gossip_keys.push(GossipKey {
                    id,
                    sealed: sealed.clone(),
                    created_at: *at,
                    removals: self.node_removals,
                });
                let extra = self
                    .gossip_keys
                    .len()
                    .saturating_sub(crate::gossipkeys::KEPT);
                self.gossip_keys.drain(..extra);
            }
            Command::RotateSecret { role, secret } => {
                let c = self.cluster.as_mut().ok_or_else(not_initialized)?;
                match role {
                    NodeRole::Worker => c.worker_secret = secret.clone(),
                    NodeRole::Manager => c.manager_secret = secret.clone(),
                }
            }
            Command::UpdateCluster {
                unlock_key,
                settings,
            } => {
                let c = self.cluster.as_mut().ok_or_else(not_initialized)?;
                c.unlock_key = unlock_key.clone();
                c.settings = settings.clone();
            }
            Command::StartCaRotation { rotation } => {
                let c = self.cluster.as_mut().ok_or_else(not_initialized)?;
                c.ca_rotation = Some(rotation.clone());
                c.settings.force_rotate += 1;
            }
            Command::FinishCaRotation { cert_pem } => {
                let c = self.cluster.as_mut().ok_or_else(not_initialized)?;
                let r = c
                    .ca_rotation
                    .take_if(|r| r.cert_pem == *cert_pem)
                    .ok_or_else(|| {
                        StateError::Invalid("no such root CA rotation in progress".into())
                    })?;
                c.ca_cert_pem = r.cert_pem;
                c.ca_key_pem = r.key_pem;
                c.ca_chain_pem = r.cross_pem;
            }
            Command::CreateBlob { blob } => {
                self.cluster()?;
                if let Some(b) = self
                    .blobs
                    .values()
                    .find(|b| b.kind == blob.kind && b.spec.name == blob.spec.name)
                {
                    return Err(StateError::AlreadyExists(format!(
                        "{} {} already exists",
                        b.kind, b.spec.name
                    )));
                }
                if self.blobs.contains_key(&blob.id) {
                    return Err(StateError::AlreadyExists(format!(
                        "{} id {} already exists",
                        blob.kind, blob.id
                    )));
                }
                self.blobs.insert(blob.id.clone(), blob.clone());
            }
            Command::SetBlobLabels { id, labels, at } => {
                let b = self.blobs.get_mut(id).ok_or_else(|| {
                    StateError::NotFound(format!("no such secret or config: {id}"))
                })?;
                b.spec.labels = labels.clone();
                b.version += 1;
                b.updated_at = *at;
            }
            Command::RemoveBlob { id } => {
                let b = self.blobs.get(id).ok_or_else(|| {
                    StateError::NotFound(format!("no such secret or config: {id}"))
                })?;
                crate::blobs::check_unused(self, b).map_err(StateError::Invalid)?;
                self.blobs.remove(id);
            }
            Command::CreateService { service } => {
                self.cluster()?;
                crate::blobs::check_references(self, &service.spec).map_err(StateError::Invalid)?;
                if self
                    .services
                    .values()
                    .any(|s| s.spec.name == service.spec.name)
                {
                    return Err(StateError::AlreadyExists(format!(
                        "service {} already exists",
                        service.spec.name
                    )));
                }
                if self.services.contains_key(&service.id) {
                    return Err(StateError::AlreadyExists(format!(
                        "service id {} already exists",
                        service.id
                    )));
                }
                self.check_ports(service)?;
                let mut service = service.clone();
                let mut used = Used::of(self);
                allocator::settle(
                    self,
                    &mut used,
                    Holder::Vip(service.id.clone()),
                    &mut service.vips,
                )?;
                self.ip_cursor = used.into_cursor();
                self.services.insert(service.id.clone(), service);
            }
            Command::UpdateService { service } => {
                let cur = self.services.get(&service.id).ok_or_else(|| {
                    StateError::NotFound(format!("no such service: {}", service.id))
                })?;
                if service.version < cur.version {
                    return Err(StateError::Invalid(format!(
                        "update out of sequence for service {}",
                        cur.spec.name
                    )));
                }
                self.check_ports(service)?;
                crate::blobs::check_references(self, &service.spec).map_err(StateError::Invalid)?;
                let mut service = service.clone();
                if service.vips != cur.vips {
                    let mut used = Used::of(self);
                    allocator::settle(
                        self,
                        &mut used,
                        Holder::Vip(service.id.clone()),
                        &mut service.vips,
                    )?;
                    self.ip_cursor = used.into_cursor();
                }
                let cur = self.services.get_mut(&service.id).ok_or_else(|| {
                    StateError::NotFound(format!("no such service: {}", service.id))
                })?;
                *cur = service;
            }
            Command::RemoveService { id } => {
                self.services
                    .remove(id)
                    .ok_or_else(|| StateError::NotFound(format!("no such service: {id}")))?;
                for t in self.tasks.values_mut().filter(|t| t.service_id == *id) {
                    t.desired_state = t.desired_state.max(TaskState::Remove);
                }
            }
            Command::SetUpdateStatus { service_id, status } => {
                let s = self.services.get_mut(service_id).ok_or_else(|| {
                    StateError::NotFound(format!("no such service: {service_id}"))
                })?;
                s.update_status = status.clone();
            }
            Command::CreateTasks { tasks } => {
                for t in tasks {
                    if !self.services.contains_key(&t.service_id) {
                        return Err(StateError::NotFound(format!(
                            "no such service: {}",
                            t.service_id
                        )));
                    }
                }
                for t in tasks {
                    self.tasks.entry(t.id.clone()).or_insert_with(|| t.clone());
                }
            }
            Command::AssignTasks { assignments } => {
                // What is held, once per command and kept current as addresses are settled.
                let mut used: Option<Used> = None;
                for a in assignments {
                    let Some(t) = self.tasks.get(&a.task_id) else {
                        continue;
                    };
                    if t.status.state > TaskState::Pending {
                        continue;
                    }
                    // The proposed addresses are settled against this state (see
                    // `allocator`): one taken meanwhile is replaced by a free one.
                    let mut nets = a.networks.clone();
                    let mut failed = None;
                    if let Some(nets) = nets.as_mut() {
                        let used = used.get_or_insert_with(|| Used::of(self));
                        let holder = Holder::Task(a.task_id.clone());
                        let mut as_vips: Vec<mesh_api::VirtualIp> = nets
                            .iter()
                            .map(|n| mesh_api::VirtualIp {
                                network_id: n.network_id.clone(),
                                addr: n.addr,
                            })
                            .collect();
                        used.release(&holder);
                        match allocator::settle(self, used, holder, &mut as_vips) {
                            Ok(()) => {
                                for (n, v) in nets.iter_mut().zip(as_vips) {
                                    n.addr = v.addr;
                                }
                            }
                            Err(e) => failed = Some(e.to_string()),
                        }
                    }
                    let Some(t) = self.tasks.get_mut(&a.task_id) else {
                        continue;
                    };
                    if let Some(e) = failed {
                        // No address to give: the task stays unallocated, as when the
                        // orchestrator finds its network full.
                        if t.status.state == TaskState::New && t.status.err != e {
                            t.status.message = "allocation failed".into();
                            t.status.err = e;
                            t.status.timestamp_ms = a.status.timestamp_ms;
                        }
                        continue;
                    }
                    if let Some(n) = &a.node_id {
                        t.node_id = n.clone();
                    }
                    if let Some(nets) = nets {
                        t.networks = nets;
                    }
                    if a.status.state >= t.status.state {
                        t.status = a.status.clone();
                    }
                }
                if let Some(u) = used {
                    self.ip_cursor = u.into_cursor();
                }
            }
            Command::SetDesiredState { ids, desired } => {
                for id in ids {
                    if let Some(t) = self.tasks.get_mut(id) {
                        t.desired_state = t.desired_state.max(*desired);
                    }
                }
            }
            Command::UpdateTaskStatus { updates } => {
                for (id, st) in updates {
                    if let Some(t) = self.tasks.get_mut(id) {
                        if st.state > t.status.state {
                            t.status = st.clone();
                        }
                    }
                }
            }
            Command::DeleteTasks { ids } => {
                for id in ids {
                    self.tasks.remove(id);
                }
            }
            Command::CreateNetwork { network } => {
                self.cluster()?;
                let new = crate::ipam::Cidr::parse(&network.subnet).map_err(StateError::Invalid)?;
                for n in self.networks.values() {
                    if n.spec.name == network.spec.name {
                        return Err(StateError::AlreadyExists(format!(
                            "network with name {} already exists",
                            n.spec.name
                        )));
                    }
                    if n.vni == network.vni {
                        return Err(StateError::Invalid(format!(
                            "vni {} already used by network {}",
                            n.vni, n.spec.name
                        )));
                    }
                    if crate::ipam::Cidr::parse(&n.subnet).is_ok_and(|c| c.overlaps(&new)) {
                        return Err(StateError::Invalid(format!(
                            "subnet {} overlaps with network {} ({})",
                            network.subnet, n.spec.name, n.subnet
                        )));
                    }
                }
                self.networks.insert(network.id.clone(), network.clone());
            }
            Command::RemoveNetwork { id } => {
                self.networks
                    .remove(id)
                    .ok_or_else(|| StateError::NotFound(format!("no such network: {id}")))?;
            }
            Command::Batch { commands } => {
                let mut first_err = None;
                for c in commands {
                    if let Err(e) = self.try_apply(c) {
                        first_err.get_or_insert(e);
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Finds a service by ID, unique ID prefix or name.
    pub fn find_service(&self, key: &str) -> Result<&Service, StateError> {
        if let Some(s) = self.services.get(key) {
            return Ok(s);
        }
        if let Some(s) = self.services.values().find(|s| s.spec.name == key) {
            return Ok(s);
        }
        let by_prefix: Vec<&Service> = self
            .services
            .values()
            .filter(|s| !key.is_empty() && s.id.starts_with(key))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(StateError::NotFound(format!("no such service: {key}"))),
            n => Err(StateError::Invalid(format!(
                "service {key} is ambiguous ({n} matches)"
            ))),
        }
    }

    /// The tasks of a service.
    pub fn service_tasks<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| t.service_id == service_id)
    }

    fn cluster(&self) -> Result<&Cluster, StateError> {
        self.cluster.as_ref().ok_or_else(not_initialized)
    }

    fn node_mut(&mut self, id: &str) -> Result<&mut Node, StateError> {
        self.nodes
            .get_mut(id)
            .ok_or_else(|| StateError::NotFound(format!("no such node: {id}")))
    }

    /// Finds a node by full ID, unique ID prefix, or name, as the Docker CLI does.
    pub fn find_node(&self, key: &str) -> Result<&Node, StateError> {
        if let Some(n) = self.nodes.get(key) {
            return Ok(n);
        }
        let by_name: Vec<&Node> = self.nodes.values().filter(|n| n.hostname == key).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0]);
        }
        if by_name.len() > 1 {
            return Err(StateError::Invalid(format!(
                "node name {key} is ambiguous ({} matches): use the node ID",
                by_name.len()
            )));
        }
        let by_prefix: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| !key.is_empty() && n.id.starts_with(key))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(StateError::NotFound(format!("no such node: {key}"))),
            n => Err(StateError::Invalid(format!(
                "node {key} is ambiguous ({n} matches)"
            ))),
        }
    }

    /// The managers, by Raft ID.
    pub fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.role == NodeRole::Manager)
    }
}

impl StoreState {
    /// Refuses a service whose published ports another service holds (the leader checks
    /// first; this catches two creates racing on the same snapshot).
    fn check_ports(&self, service: &Service) -> Result<(), StateError> {
        for p in &service.spec.ports {
            if let Some(other) = self.services.values().find(|s| {
                s.id != service.id
                    && s.spec
                        .ports
                        .iter()
                        .any(|q| q.protocol == p.protocol && q.published == p.published)
            }) {
                return Err(StateError::Invalid(format!(
                    "port {}/{} is already in use by service {} ({})",
                    p.published, p.protocol, other.spec.name, other.id
                )));
            }
        }
        Ok(())
    }

    /// Finds a network by ID, unique ID prefix or name.
    pub fn find_network(&self, key: &str) -> Result<&mesh_api::Network, StateError> {
        if let Some(n) = self.networks.get(key) {
            return Ok(n);
        }
        if let Some(n) = self.networks.values().find(|n| n.spec.name == key) {
            return Ok(n);
        }
        let by_prefix: Vec<_> = self
            .networks
            .values()
            .filter(|n| !key.is_empty() && n.id.starts_with(key))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(StateError::NotFound(format!("no such network: {key}"))),
            n => Err(StateError::Invalid(format!(
                "network {key} is ambiguous ({n} matches)"
            ))),
        }
    }
}

/// A cluster record with no CA or secrets, for the unit tests of the crate.
/// `cluster not initialized`.
fn not_initialized() -> StateError {
    StateError::Invalid("cluster not initialized".into())
}

#[cfg(test)]
pub(crate) fn test_cluster() -> Cluster {
    Cluster {
        id: "c".into(),
        created_at: 0,
        ca_cert_pem: String::new(),
        ca_key_pem: String::new(),
        worker_secret: String::new(),
        manager_secret: String::new(),
        unlock_key: None,
        settings: Default::default(),
        ca_chain_pem: String::new(),
        ca_rotation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, name: &str, role: NodeRole, raft_id: u64) -> Node {
        Node {
            raft_id,
            created_at: 1,
            updated_at: 1,
            ..Node::new(id, name, role, "10.0.0.1:2377")
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            id: "c1".into(),
            created_at: 1,
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            worker_secret: "w".into(),
            manager_secret: "m".into(),
            unlock_key: None,
            settings: Default::default(),
            ca_chain_pem: String::new(),
            ca_rotation: None,
        }
    }

    fn initialized() -> StoreState {
        let mut s = StoreState::default();
        let r = s.apply(&Command::InitCluster {
            cluster: cluster(),
            node: node("aaa111", "h1", NodeRole::Manager, 1),
        });
        assert_eq!(r, CommandResult::Ok);
        s
    }

    #[test]
    fn init_only_once() {
        let mut s = initialized();
        let again = s.apply(&Command::InitCluster {
            cluster: cluster(),
            node: node("x", "x", NodeRole::Manager, 9),
        });
        assert_eq!(
            again,
            CommandResult::Err(StateError::Invalid("cluster already initialized".into()))
        );
        assert_eq!(s.nodes.len(), 1);
    }

    #[test]
    fn a_root_rotation_ends_only_as_the_rotation_in_progress() {
        let mut s = initialized();
        let rotation = |n: &str| mesh_api::CaRotation {
            cert_pem: format!("cert{n}"),
            key_pem: format!("key{n}"),
            cross_pem: format!("cross{n}"),
        };
        let finish = |n: &str| Command::FinishCaRotation {
            cert_pem: format!("cert{n}"),
        };
        assert!(matches!(s.apply(&finish("1")), CommandResult::Err(_)));
        for n in ["1", "2"] {
            let r = s.apply(&Command::StartCaRotation {
                rotation: rotation(n),
            });
            assert_eq!(r, CommandResult::Ok);
        }
        let c = s.cluster.clone().unwrap();
        assert_eq!(c.settings.force_rotate, 2);
        assert_eq!(
            c.ca_cert_pem, "cert",
            "the root stays until the rotation ends"
        );
        // The end of a replaced rotation changes nothing.
        assert!(matches!(s.apply(&finish("1")), CommandResult::Err(_)));
        assert_eq!(s.cluster.as_ref().unwrap(), &c);
        assert_eq!(s.apply(&finish("2")), CommandResult::Ok);
        let c = s.cluster.as_ref().unwrap();
        assert_eq!(
            (
                c.ca_cert_pem.as_str(),
                c.ca_key_pem.as_str(),
                c.ca_chain_pem.as_str()
            ),
            ("cert2", "key2", "cross2")
        );
        assert_eq!(c.ca_rotation, None);
    }

    #[test]
    fn commands_before_init_are_refused() {
        let mut s = StoreState::default();
        let r = s.apply(&Command::AddNode {
            node: node("b", "h2", NodeRole::Worker, 2),
        });
        assert!(matches!(r, CommandResult::Err(_)));
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn node_lifecycle() {
        let mut s = initialized();
        assert_eq!(
            s.apply(&Command::AddNode {
                node: node("bbb222", "h2", NodeRole::Worker, 2)
            }),
            CommandResult::Ok
        );
        s.apply(&Command::SetNodeState {
            id: "bbb222".into(),
            state: NodeState::Down,
            at: 5,
        });
        assert_eq!(s.nodes["bbb222"].state, NodeState::Down);
        let mut add = BTreeMap::new();
        add.insert("zone".to_string(), "a".to_string());
        s.apply(&Command::UpdateNode {
            id: "bbb222".into(),
            availability: Some(Availability::Drain),
            label_add: add,
            label_rm: vec![],
            at: 6,
        });
        assert_eq!(s.nodes["bbb222"].availability, Availability::Drain);
        assert_eq!(s.nodes["bbb222"].labels["zone"], "a");
        s.apply(&Command::UpdateNode {
            id: "bbb222".into(),
            availability: None,
            label_add: BTreeMap::new(),
            label_rm: vec!["zone".into()],
            at: 7,
        });
        assert!(s.nodes["bbb222"].labels.is_empty());
        s.apply(&Command::SetNodeRole {
            id: "bbb222".into(),
            role: NodeRole::Manager,
            at: 8,
        });
        assert_eq!(s.managers().count(), 2);
        assert_eq!(
            s.apply(&Command::RemoveNode {
                id: "bbb222".into()
            }),
            CommandResult::Ok
        );
        assert_eq!(
            s.apply(&Command::RemoveNode {
                id: "bbb222".into()
            }),
            CommandResult::Err(StateError::NotFound("no such node: bbb222".into()))
        );
    }

    #[test]
    fn raft_ids_are_unique_among_managers() {
        let mut s = initialized();
        let r = s.apply(&Command::AddNode {
            node: node("ccc", "h3", NodeRole::Manager, 1),
        });
        assert!(matches!(r, CommandResult::Err(_)));
    }

    #[test]
    fn rotate_secret_changes_only_that_role() {
        let mut s = initialized();
        s.apply(&Command::RotateSecret {
            role: NodeRole::Worker,
            secret: "w2".into(),
        });
        let c = s.cluster.as_ref().unwrap();
        assert_eq!(c.worker_secret, "w2");
        assert_eq!(c.manager_secret, "m");
    }

    #[test]
    fn find_node_by_id_name_prefix() {
        let mut s = initialized();
        s.apply(&Command::AddNode {
            node: node("aab999", "h2", NodeRole::Worker, 2),
        });
        assert_eq!(s.find_node("aaa111").unwrap().hostname, "h1");
        assert_eq!(s.find_node("h2").unwrap().id, "aab999");
        assert_eq!(s.find_node("aaa").unwrap().id, "aaa111");
        assert!(matches!(
            s.find_node("aa"),
            Err(StateError::Invalid(m)) if m.contains("ambiguous")
        ));
        assert_eq!(
            s.find_node("zzz").unwrap_err(),
            StateError::NotFound("no such node: zzz".into())
        );
    }

    #[test]
    fn same_log_same_state() {
        let cmds = vec![
            Command::AddNode {
                node: node("b", "h2", NodeRole::Worker, 2),
            },
            Command::SetNodeState {
                id: "b".into(),
                state: NodeState::Down,
                at: 3,
            },
            Command::RemoveNode { id: "nope".into() },
            Command::RotateSecret {
                role: NodeRole::Manager,
                secret: "m9".into(),
            },
        ];
        let (mut a, mut b) = (initialized(), initialized());
        for c in &cmds {
            a.apply(c);
        }
        for c in &cmds {
            b.apply(c);
        }
        assert_eq!(a, b);
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(serde_json::from_slice::<StoreState>(&json).unwrap(), a);
    }
}
