//! Cluster objects: nodes and the cluster record, as stored in the Raft state machine and
//! shown by `mesh node inspect`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's role in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Worker,
    Manager,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::Worker => "worker",
            NodeRole::Manager => "manager",
        })
    }
}

impl FromStr for NodeRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "worker" => Ok(NodeRole::Worker),
            "manager" => Ok(NodeRole::Manager),
            other => Err(format!(
                "invalid role: {other} (expected worker or manager)"
            )),
        }
    }
}

/// What the scheduler may do with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Availability::Active => "Active",
            Availability::Pause => "Pause",
            Availability::Drain => "Drain",
        })
    }
}

impl FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            _ => Err(format!(
                "invalid availability: {s} (expected active, pause or drain)"
            )),
        }
    }
}

/// Whether the managers hear from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeats arrive.
    Ready,
    /// No heartbeat within the grace period.
    Down,
    /// The node left the swarm (`swarm leave`).
    Left,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "Ready",
            NodeState::Down => "Down",
            NodeState::Left => "Down",
        })
    }
}

/// A node of the cluster, as replicated through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// 25-character base36 ID, as Swarm's.
    pub id: String,
    /// The node name (`--node-name`).
    pub hostname: String,
    pub role: NodeRole,
    pub availability: Availability,
    pub state: NodeState,
    /// Address (`IP:PORT`) of the node's control endpoint, as advertised.
    pub addr: String,
    /// Raft member ID, used while the node is a manager.
    pub raft_id: u64,
    pub labels: BTreeMap<String, String>,
    /// What the node offers to tasks (`nano_cpus` = CPUs × 1e9, `memory_bytes`); 0: unknown.
    #[serde(default)]
    pub resources: crate::service::Resources,
    /// The node's address on the `ingress` network (its ingress sandbox), `A.B.C.D/N`, given
    /// by the leader's allocator.
    #[serde(default)]
    pub ingress_addr: Option<crate::IfAddr>,
    /// Unix time (seconds) of creation and of the last change.
    pub created_at: u64,
    pub updated_at: u64,
}

impl Node {
    /// A node as it joins: `Ready` and `Active`, no Raft ID, no labels, resources unknown,
    /// created and changed at Unix time 0 (callers set what they know with struct update
    /// syntax).
    pub fn new(
        id: impl Into<String>,
        hostname: impl Into<String>,
        role: NodeRole,
        addr: impl Into<String>,
    ) -> Node {
        Node {
            id: id.into(),
            hostname: hostname.into(),
            role,
            availability: Availability::Active,
            state: NodeState::Ready,
            addr: addr.into(),
            raft_id: 0,
            labels: BTreeMap::new(),
            resources: Default::default(),
            ingress_addr: None,
            created_at: 0,
            updated_at: 0,
        }
    }
}

/// The cluster-wide record written at `swarm init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: String,
    pub created_at: u64,
    /// Root CA certificate and key (PEM). The key lives only on managers.
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// Join-token secrets per role; rotating one invalidates the old token.
    pub worker_secret: String,
    pub manager_secret: String,
    /// With autolock on, the unlock key (32 bytes, base64) that wraps each manager's data key
    /// on its disk. It is only in the Raft store, itself sealed with the data key.
    #[serde(default)]
    pub unlock_key: Option<String>,
    /// `swarm update` settings.
    #[serde(default)]
    pub settings: ClusterSettings,
    /// The intermediates presented with the certificates of the current root: after a root
    /// rotation, the current root cross-signed by the previous one (PEM; empty before any).
    #[serde(default)]
    pub ca_chain_pem: String,
    /// A root rotation in progress (`swarm ca --rotate`).
    #[serde(default)]
    pub ca_rotation: Option<CaRotation>,
}

/// A root CA rotation in progress: the new root and its key, and the new root cross-signed
/// by the current one. Node certificates are issued from the new root (presented with the
/// cross-signed one, so that nodes trusting the current root accept them) until every node
/// has one; then the new root becomes the current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    pub cert_pem: String,
    pub key_pem: String,
    pub cross_pem: String,
}

/// The cluster settings `swarm update` changes (Docker's `SwarmSpec` parts mesh honours).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSettings {
    /// Ended tasks kept per slot (`--task-history-limit`).
    pub task_history_limit: u32,
    /// Validity of node certificates (`--cert-expiry`), seconds.
    pub cert_expiry_secs: u64,
    /// How often nodes report to the leader (`--dispatcher-heartbeat`), milliseconds.
    pub dispatcher_heartbeat_ms: u64,
    /// How many root rotations were asked for (Docker's `CAConfig.ForceRotate`: a client
    /// asks for one by sending it one higher).
    pub force_rotate: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            task_history_limit: 5,
            cert_expiry_secs: 90 * 24 * 3600,
            dispatcher_heartbeat_ms: 500,
            force_rotate: 0,
        }
    }
}

/// The unlock key as Docker prints it: `SWMKEY-1-` and the key in base64 without padding.
pub fn human_unlock_key(key_b64: &str) -> String {
    format!("SWMKEY-1-{}", key_b64.trim_end_matches('='))
}

/// The key bytes of a `SWMKEY-1-...` string.
pub fn parse_unlock_key(s: &str) -> Option<Vec<u8>> {
    unlock_key_bytes(s.trim().strip_prefix("SWMKEY-1-")?)
}

/// The key bytes of an unlock key in base64 (padded or not), if it is 32 bytes.
pub fn unlock_key_bytes(b64: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64.trim_end_matches('='))
        .ok()?;
    (b.len() == 32).then_some(b)
}

/// One line of `mesh node ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub availability: String,
    /// `Leader`, `Reachable`, `Unreachable`, or empty for workers.
    pub manager_status: String,
    /// Whether this is the node whose daemon answered.
    pub is_self: bool,
    /// Docker's `TLSStatus` (see [`NodeView::tls_status`]).
    #[serde(default)]
    pub tls_status: String,
}

/// What `mesh info` shows of the local daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalInfo {
    pub node_name: String,
    /// `inactive`, `active`, `locked`, ...
    pub swarm: String,
    pub node_id: Option<String>,
    pub cluster_id: Option<String>,
    pub role: Option<NodeRole>,
    pub node_addr: Option<String>,
    /// Control addresses of the managers this node knows of.
    pub managers: Vec<String>,
    /// Node ID of the Raft leader, when known.
    pub leader: Option<String>,
    pub raft: Option<RaftInfo>,
    /// What this machine offers (CPUs × 1e9, memory bytes).
    #[serde(default)]
    pub resources: crate::service::Resources,
    /// This node's gossip: keys, counters and the member filter (swarm members with a
    /// network plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipInfo>,
}

/// A node's gossip as `mesh info` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipInfo {
    /// Whether packets are sealed.
    pub encrypted: bool,
    /// The IDs of the keys held, oldest first; the last one seals.
    pub key_ids: Vec<u32>,
    pub udp_in: u64,
    pub udp_out: u64,
    pub malformed: u64,
    pub foreign: u64,
    /// Sealed packets whose tag did not verify (dropped).
    pub bad_tag: u64,
    /// Sealed under a key this node does not hold (dropped).
    pub unknown_key: u64,
    /// Plain packets refused while keys are required.
    pub unsealed: u64,
    /// Packets not sent for want of a key.
    pub no_key: u64,
    pub syncs: u64,
    pub sync_failures: u64,
    /// The underlay addresses allowed to reach the VXLAN and gossip ports (empty: no
    /// filter yet).
    pub members: Vec<String>,
}

/// Raft status of a manager, from its own metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftInfo {
    pub raft_id: u64,
    pub term: u64,
    pub state: String,
    pub leader_raft_id: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub voters: Vec<u64>,
    /// The state machine's applied index and a digest of its state at that index (equal on
    /// managers that agree).
    #[serde(default)]
    pub state_applied: Option<u64>,
    #[serde(default)]
    pub state_digest: Option<String>,
}

/// A node with what only the leader knows of it, in [`ClusterObjects`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: Node,
    /// `Leader`, `Reachable`, `Unreachable`, or empty for workers.
    pub manager_status: String,
    /// The node's TLS state as the leader last heard it (`None`: not heard since it leads).
    #[serde(default)]
    pub tls_info: Option<TlsInfo>,
    /// Docker's `TLSStatus`: `Ready` when the node's certificate is from the root the swarm
    /// wants and it trusts that root, `Needs Rotation` when not, `Unknown` when the leader
    /// has not heard it since it began leading.
    #[serde(default)]
    pub tls_status: String,
}

/// The cluster record without its secrets, in [`ClusterObjects`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: String,
    pub created_at: u64,
    /// The join tokens as `swarm join-token` prints them.
    pub worker_token: String,
    pub manager_token: String,
    /// The root CA certificate (PEM).
    pub ca_cert_pem: String,
    #[serde(default)]
    pub autolock: bool,
    #[serde(default)]
    pub settings: ClusterSettings,
    /// A root rotation has started and not every node has a certificate from the new root.
    #[serde(default)]
    pub root_rotation_in_progress: bool,
    /// What the swarm wants of every node: the desired root (the new one during a rotation)
    /// as trust root and as issuer.
    #[serde(default)]
    pub tls_info: TlsInfo,
}

/// Docker's `TLSInfo`: a root to trust and the issuer of a certificate (its subject and
/// public key, DER in standard base64, as Go encodes bytes). Empty fields: not known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub trust_root: String,
    pub cert_issuer_subject: String,
    pub cert_issuer_public_key: String,
}

/// Every object of the cluster as the leader's store holds it (`Request::Objects`): what the
/// Engine API shows and filters, from the same state the mesh CLI reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterObjects {
    pub cluster: ClusterView,
    pub nodes: Vec<NodeView>,
    pub services: Vec<crate::service::Service>,
    pub tasks: Vec<crate::service::Task>,
    pub networks: Vec<crate::network::Network>,
}
