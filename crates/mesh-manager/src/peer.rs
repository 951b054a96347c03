//! The node-to-node protocol on the control port (2377/tcp, mutual TLS): joining, Raft
//! messages, heartbeats and management calls forwarded to the leader.
//!
//! **API Boundary**: every message between daemons is one of these; frames are JSON.

use mesh_api::{ApiError, NodeRole};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::raft_types::{RaftId, TypeConfig};

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// A node without a certificate asks to join (the only request allowed unauthenticated).
    Join(JoinRequest),
    /// A manager whose Raft instance is running asks the leader to become a voter.
    AddVoter {
        node_id: String,
    },
    Raft(RaftRequest),
    Heartbeat {
        node_id: String,
        /// The node's certificate and trusted root (`None`: not said).
        #[serde(default)]
        tls: Option<NodeTlsState>,
    },
    /// A node leaves the swarm.
    Leave {
        node_id: String,
    },
    /// A management call a follower forwards to the leader.
    Api(Box<mesh_api::Request>),
    /// A node's long poll for the tasks assigned to it (and its ended tasks still in the
    /// store): answered at once if the answer differs from `known` (a digest), else when it
    /// changes or after a few seconds.
    Assignments {
        node_id: String,
        known: u64,
    },
    /// A node reports the states of its tasks.
    TaskStatus {
        node_id: String,
        updates: Vec<(String, mesh_api::TaskStatus)>,
    },
    /// A manager asks a node for the logs of some of its tasks.
    TaskLogs {
        task_ids: Vec<String>,
        /// Lines after this time (Unix ns, exclusive), for tasks not in `after`.
        since_ns: Option<u64>,
        /// The last `tail` lines, for tasks not in `after`.
        tail: Option<usize>,
        /// Per task: lines after this time.
        after: std::collections::BTreeMap<String, u64>,
    },
    /// A manager without the data key asks another manager for it (answered to
    /// managers only).
    DataKey,
    /// A node asks the leader for a new certificate for the key of `csr_pem` (renewal, or
    /// a role change): signed only for the node the presenting certificate names, with its
    /// role in the store.
    RenewCert {
        node_id: String,
        csr_pem: String,
    },
    /// A request a manager forwards to the leader; never forwarded again.
    Forwarded(Box<PeerRequest>),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub csr_pem: String,
    pub hostname: String,
    /// The control address (`IP:PORT`) the node advertises.
    pub addr: String,
    /// What the node can give tasks.
    #[serde(default)]
    pub resources: mesh_api::Resources,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinAccept {
    pub node_id: String,
    pub cluster_id: String,
    pub role: NodeRole,
    pub raft_id: u64,
    pub cert_pem: String,
    pub ca_cert_pem: String,
    pub managers: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Which CA key signed a node's certificate and which root it trusts (key identifiers, hex),
/// as its heartbeat reports them: how the leader follows a root rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTlsState {
    pub trust_root: String,
    pub issuer: String,
}

/// What the leader tells a node in answer to its heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub role: NodeRole,
    /// Control addresses of all managers, leader first.
    pub managers: Vec<String>,
    /// Milliseconds until the next heartbeat is due.
    pub period_ms: u64,
    /// The cluster's `--cert-expiry` in seconds (0: not said): a node whose certificate
    /// outlives it renews at once.
    #[serde(default)]
    pub cert_expiry_secs: u64,
    /// The CA key the node's certificate should be from (key identifier, hex; `None`: not
    /// said): a node whose certificate is from another renews at once (a root rotation).
    #[serde(default)]
    pub issuer_key_id: Option<String>,
    /// The swarm's root, when the node said it trusts another (a root rotation ended).
    #[serde(default)]
    pub trust_root_pem: Option<String>,
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Joined(JoinAccept),
    AppendEntries(Result<AppendEntriesResponse<RaftId>, RaftError<RaftId>>),
    Vote(Result<VoteResponse<RaftId>, RaftError<RaftId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<RaftId>, RaftError<RaftId, InstallSnapshotError>>,
    ),
    Heartbeat(HeartbeatAck),
    Api(mesh_api::Response),
    Done,
    Assignments {
        digest: u64,
        tasks: Vec<mesh_api::Task>,
        /// The IDs of the node's ended tasks that the store still has (task history): the node
        /// keeps their state directories and removes those of its other ended tasks. `None`
        /// (not said): the node keeps an ended task's directory for a while.
        #[serde(default)]
        ended: Option<Vec<String>>,
        /// The node's ingress sandbox address on the ingress network.
        #[serde(default)]
        ingress: Option<mesh_api::NetworkAttachment>,
        /// The data of the secrets and configs its tasks to run use, by ID (secrets
        /// unsealed: this answer travels over mutual TLS to that node only).
        #[serde(default)]
        blobs: std::collections::BTreeMap<String, Vec<u8>>,
        /// Registry credentials by service ID, for the images of its tasks to run
        /// (`--with-registry-auth`).
        #[serde(default)]
        registry_auths: std::collections::BTreeMap<String, mesh_api::RegistryCredentials>,
        /// The gossip keys, oldest first (unsealed: mutual TLS, and only to a node the store
        /// has; see `gossipkeys`).
        #[serde(default)]
        gossip_keys: Vec<crate::node_agent::GossipKey>,
        /// The underlay addresses of the swarm's members (`None`: not said).
        #[serde(default)]
        members: Option<Vec<std::net::Ipv4Addr>>,
    },
    TaskLogs(Vec<TaskLog>),
    /// A node certificate (PEM), in answer to [`PeerRequest::RenewCert`].
    Cert {
        cert_pem: String,
    },
    /// The answering manager's data key, if it has one, and the cluster's unlock key when
    /// autolock is on (the asking manager wraps the data key with it at once).
    DataKey {
        key: Option<Vec<u8>>,
        #[serde(default)]
        unlock_key: Option<Vec<u8>>,
    },
    Error(ApiError),
}

/// The logs of one task, as its node keeps them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskLog {
    pub task_id: String,
    /// Oldest first; the newest [`crate::agent::LOG_BYTES`] of text at most.
    pub lines: Vec<mesh_api::LogLine>,
    pub error: Option<String>,
}
