//! The interface between a node's membership and its agent, both ways: the member holds its
//! node's agent as a [`NodeAgent`], and the agent reaches the leader only through a
//! [`LeaderLink`] (the member gives it a [`MemberLink`]). Neither names the other's type, so
//! the agent can live in a crate of its own, above the control plane.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;

use mesh_api::{LocalTask, Task};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::member::Member;
use crate::peer::{PeerRequest, PeerResponse, TaskLog};
use serde::{Deserialize, Serialize};

/// A boxed future, as a trait object's async method returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A node's agent, as its member drives it (`agent::Agent` implements it).
pub trait NodeAgent: Send + Sync + 'static {
    /// Whether the node has a network data plane (without one, tasks get no network but `lo`).
    fn has_plane(&self) -> bool;
    /// Starts the node's network plane as `me` (a failure is the agent's to log: the member
    /// goes on without a plane, as Docker's daemon without its overlay driver).
    fn start_plane(&self, me: PlaneIdentity);
    /// Starts no task from now on; returns once the starts in flight ended (their tasks are
    /// in the runtime): the node leaves the swarm or shuts down.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// Stops the network plane: this node leaves the swarm or shuts down.
    fn stop_plane(&self);
    /// Gossip keys for the plane, and the members' underlay addresses when known.
    fn give_gossip(&self, keys: Vec<GossipKey>, members: Option<Vec<Ipv4Addr>>);
    /// Lets `members` through the node's underlay filter; returns once it does.
    fn admit_members(&self, members: Vec<Ipv4Addr>) -> BoxFuture<'_, ()>;
    /// On a restarted manager, until the leader answers: tells the plane which tasks run
    /// here by the manager's own store.
    fn seed_plane(self: Arc<Self>, from_store: Vec<Task>) -> BoxFuture<'static, ()>;
    /// Starts the agent's loops (the assignments long poll, the reconciler) reaching the
    /// leader through `leader`, until `shutdown`.
    fn run(
        self: Arc<Self>,
        leader: MemberLink,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>>;
    /// The logs of local tasks (see `agent::Agent::logs`).
    fn logs(
        &self,
        task_ids: Vec<String>,
        since_ns: Option<u64>,
        tail: Option<usize>,
        after: BTreeMap<String, u64>,
    ) -> BoxFuture<'_, Vec<TaskLog>>;
    /// The tasks the leader last assigned here.
    fn assigned_tasks(&self) -> Vec<Task>;
    /// The tasks that run here, as `mesh ps` on this node lists them.
    fn local_tasks<'a>(&'a self, node_name: &'a str) -> BoxFuture<'a, Vec<LocalTask>>;
    /// The images this node's tasks use (kept by `image rm` and `prune`).
    fn images_in_use(&self) -> Vec<String>;
}

/// How the agent reaches the leader: the one thing it needs of its node's membership
/// ([`MemberLink`] implements it; tests plug in a fake). The agent knows nothing else of Raft
/// or of the other managers.
pub trait LeaderLink: Send + Sync + 'static {
    /// This node's ID.
    fn node_id(&self) -> String;
    /// Sends `req` to the leader (through whichever manager knows it) and returns its answer;
    /// `PeerResponse::Error` when no leader could be reached.
    fn to_leader(&self, req: PeerRequest)
        -> impl std::future::Future<Output = PeerResponse> + Send;
    /// As [`LeaderLink::to_leader`], for a long poll: over `client`, a connection kept
    /// between polls.
    fn to_leader_polling(
        &self,
        req: PeerRequest,
        client: &mut Option<mesh_rpc::Client>,
    ) -> impl std::future::Future<Output = PeerResponse> + Send;
}

/// The way to the leader a member gives its node's agent.
#[derive(Clone)]
pub struct MemberLink(pub(crate) Arc<Member>);

impl LeaderLink for MemberLink {
    fn node_id(&self) -> String {
        self.0.local().node_id
    }

    fn to_leader(&self, req: PeerRequest) -> impl Future<Output = PeerResponse> + Send {
        self.0.to_leader(req)
    }

    fn to_leader_polling(
        &self,
        req: PeerRequest,
        client: &mut Option<mesh_rpc::Client>,
    ) -> impl Future<Output = PeerResponse> + Send {
        self.0.to_leader_polling(req, client)
    }
}

/// Who this node is in the swarm, for the network plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaneIdentity {
    pub node_id: String,
    pub cluster_id: String,
    /// This node's advertised address: its VTEP and gossip address.
    pub addr: std::net::Ipv4Addr,
    /// Other nodes to gossip with at first (the managers).
    pub peers: Vec<std::net::Ipv4Addr>,
}

/// A gossip key as the leader hands it to a node (see `gossipkeys`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    pub id: u32,
    /// 32 bytes.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No key material in logs.
        write!(f, "GossipKey({})", self.id)
    }
}
