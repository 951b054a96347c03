//! The seam between the node agent and the kernel: what the agent needs from a task runtime.
//! `meshd` plugs in the real executor (`mesh-executor`: namespaces, cgroups, shims); tests can
//! plug in a fake.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to run for a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    pub resolv_conf: String,
}

/// A task process as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running {
        pid: u32,
        started_at_ms: u64,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        started_at_ms: u64,
        finished_at_ms: u64,
    },
}

/// The output of a command run inside a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs task processes. Blocking calls: the agent calls them from blocking threads.
pub trait Runtime: Send + Sync + 'static {
    fn start(&self, spec: &RunSpec) -> Result<RunState, String>;
    /// Like `start`, but calls `setup(task_pid)` once the task's namespaces exist and before
    /// its command runs (to plumb its network in).
    fn start_with(
        &self,
        spec: &RunSpec,
        setup: &mut dyn FnMut(u32) -> Result<(), String>,
    ) -> Result<RunState, String> {
        let _ = setup;
        self.start(spec)
    }
    fn status(&self, id: &str) -> Option<RunState>;
    fn list(&self) -> Vec<(String, RunState)>;
    fn stop(&self, id: &str, grace: Duration) -> Result<(), String>;
    fn remove(&self, id: &str) -> Result<(), String>;
    fn logs(&self, id: &str, max_bytes: usize) -> Result<(Vec<u8>, Vec<u8>), String>;
    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecResult, String>;
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

/// The data plane the agent drives: overlay plumbing and endpoint gossip. `meshd` plugs in the
/// real one; without it, tasks run with `lo` only.
pub trait NetworkPlane: Send + Sync + 'static {
    /// Joins the swarm's gossip as this node (called when the node enters a swarm or restarts).
    fn start(&self, me: PlaneIdentity) -> Result<(), String>;
    /// Leaves the gossip and forgets the swarm.
    fn stop(&self);
    /// Plumbs a task's network attachments into `/proc/<pid>/ns/net` (blocking; called before
    /// its command runs).
    fn attach(&self, task: &mesh_api::Task, pid: u32) -> Result<(), String>;
    /// The tasks that run here now, with their pids: their endpoints are published, others
    /// withdrawn, and networks without a local task lose their namespace.
    fn set_local(&self, running: Vec<(mesh_api::Task, u32)>);
    /// This node's address on the ingress network (its ingress sandbox), once the leader gave
    /// one: the routing mesh answers on every node from then on.
    fn set_ingress(&self, ingress: Option<mesh_api::NetworkAttachment>) {
        let _ = ingress;
    }
    /// The VIPs this node's balancer holds, with their backends (`mesh vip ls`). Blocking.
    fn vip_ls(&self) -> Result<serde_json::Value, String> {
        Err("this node has no VIP data plane".into())
    }
    /// What the embedded DNS answers for `name` on this node's networks, or only on `network`
    /// (`mesh dns query`). Blocking.
    fn dns_query(
        &self,
        network: Option<&str>,
        name: &str,
        qtype: &str,
    ) -> Result<serde_json::Value, String> {
        let _ = (network, name, qtype);
        Err("this node has no embedded DNS".into())
    }
}
