//! The control plane's Prometheus metrics (served by `meshd --metrics-addr`).
//!
//! Two kinds:
//!
//! - [`Metrics`]: live instruments that must see every event, shared by the daemon's members
//!   over their lives: `mesh_raft_propose_seconds` (a histogram, from a leader's proposal of a
//!   command to its application, observed in `Member::write`, the one place the leader
//!   writes commands) and `mesh_raft_leader_changes_total` (the (term, leader) pairs this
//!   manager saw, counted by a watcher of openraft's metrics started with each Raft
//!   instance).
//! - [`Snapshot`]: gauges computed at scrape time, so nothing has to be kept in sync: the
//!   Raft figures of this manager ([`RaftFigures`], from openraft's metrics) and, on the
//!   leader only, the cluster's figures from its store ([`ClusterSummary`]: nodes by state
//!   and role, tasks by state, each service's desired and running replicas). Only the
//!   leader exports the cluster's figures, so that summing over all scraped managers never
//!   counts a task twice; a follower's store may lag anyway.
//!
//! Per-service gauges carry one label, the service's name: one series per service and
//! metric, which grows with the services an operator creates, never with tasks or nodes. A
//! scrape of a store with 1,000 services costs well under a millisecond (`cargo xtask bench
//! metrics`, `docs/benchmarks.md`).
//!
//! **Architecture Invariant**: no I/O here; `meshd` serves what this module encodes.

use std::collections::HashMap;

use mesh_api::{NodeRole, NodeState, ServiceMode, TaskState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::state::StoreState;

/// Live instruments of the control plane; cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Seconds from proposing a command on the leader to its application.
    pub propose: Histogram,
    /// Leaders this manager saw take office (a new term or a new leader).
    pub leader_changes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 0.5 ms to ~4 s (the commit timeout).
            propose: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            leader_changes: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers the instruments (names relative to the registry's `mesh` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "raft_propose",
            "Time from proposing a command on the leader to its application",
            Unit::Seconds,
            self.propose.clone(),
        );
        registry.register(
            "raft_leader_changes",
            "Leader elections this manager saw (a new term or a new leader)",
            self.leader_changes.clone(),
        );
    }
}

/// Counts leader changes from a Raft instance's metrics until it stops.
pub(crate) async fn watch_leader_changes(
    mut rx: tokio::sync::watch::Receiver<crate::raft_types::RaftMetrics>,
    counter: Counter,
) {
    let mut seen: Option<(u64, u64)> = None;
    loop {
        let now = {
            let m = rx.borrow_and_update();
            m.current_leader.map(|l| (m.current_term, l))
        };
        if now.is_some() && now != seen {
            counter.inc();
            seen = now;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// This manager's Raft figures, from openraft's metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftFigures {
    pub term: u64,
    pub is_leader: bool,
    /// The last log index appended here.
    pub last_log_index: u64,
    /// The last log index applied to the state machine here.
    pub applied_index: u64,
    /// The last log index in the snapshot.
    pub snapshot_index: u64,
    /// Entries in the log (appended, not purged after a snapshot).
    pub log_entries: u64,
    /// Voters in the membership.
    pub voters: u64,
}

impl RaftFigures {
    pub(crate) fn of(m: &crate::raft_types::RaftMetrics) -> RaftFigures {
        let last = m.last_log_index.unwrap_or(0);
        let purged = m.purged.map(|l| l.index);
        RaftFigures {
            term: m.current_term,
            is_leader: m.state == openraft::ServerState::Leader,
            last_log_index: last,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            log_entries: match (m.last_log_index, purged) {
                (None, _) => 0,
                (Some(l), None) => l,
                (Some(l), Some(p)) => l.saturating_sub(p),
            },
            voters: m.membership_config.voter_ids().count() as u64,
        }
    }
}

/// One service's replicas, as `service ls` counts them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceReplicas {
    pub name: String,
    pub desired: u64,
    pub running: u64,
}

/// The cluster's figures from a store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSummary {
    /// Nodes by (state, role), every combination present (zeros included).
    pub nodes: Vec<((NodeState, NodeRole), u64)>,
    /// Tasks in the store (task history included) by observed state, every state present.
    pub tasks: Vec<(TaskState, u64)>,
    /// Services by name.
    pub services: Vec<ServiceReplicas>,
}

const NODE_STATES: [NodeState; 3] = [NodeState::Ready, NodeState::Down, NodeState::Left];
const NODE_ROLES: [NodeRole; 2] = [NodeRole::Manager, NodeRole::Worker];
const TASK_STATES: [TaskState; 14] = [
    TaskState::New,
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Accepted,
    TaskState::Preparing,
    TaskState::Ready,
    TaskState::Starting,
    TaskState::Running,
    TaskState::Complete,
    TaskState::Shutdown,
    TaskState::Failed,
    TaskState::Rejected,
    TaskState::Remove,
    TaskState::Orphaned,
];

/// A task state's label value: its name in the API (`running`, `failed`, ...).
pub fn task_state_label(s: TaskState) -> &'static str {
    match s {
        TaskState::New => "new",
        TaskState::Pending => "pending",
        TaskState::Assigned => "assigned",
        TaskState::Accepted => "accepted",
        TaskState::Preparing => "preparing",
        TaskState::Ready => "ready",
        TaskState::Starting => "starting",
        TaskState::Running => "running",
        TaskState::Complete => "complete",
        TaskState::Shutdown => "shutdown",
        TaskState::Failed => "failed",
        TaskState::Rejected => "rejected",
        TaskState::Remove => "remove",
        TaskState::Orphaned => "orphaned",
    }
}

fn node_state_label(s: NodeState) -> &'static str {
    match s {
        NodeState::Ready => "ready",
        NodeState::Down => "down",
        NodeState::Left => "left",
    }
}

fn role_label(r: NodeRole) -> &'static str {
    match r {
        NodeRole::Manager => "manager",
        NodeRole::Worker => "worker",
    }
}

impl ClusterSummary {
    /// Counts a store in one pass over its tasks (the same counts as
    /// [`crate::services::replica_counts`] per service, which would pass over every task
    /// once per service).
    pub fn of(state: &StoreState) -> ClusterSummary {
        let mut nodes: Vec<((NodeState, NodeRole), u64)> = NODE_STATES
            .iter()
            .flat_map(|s| NODE_ROLES.iter().map(move |r| ((*s, *r), 0)))
            .collect();
        for n in state.nodes.values() {
            if let Some(slot) = nodes.iter_mut().find(|(k, _)| *k == (n.state, n.role)) {
                slot.1 += 1;
            }
        }
        let mut tasks: Vec<(TaskState, u64)> = TASK_STATES.iter().map(|s| (*s, 0)).collect();
        // Per service ID: (running, not ended and meant to run).
        let mut per_service: HashMap<&str, (u64, u64)> =
            HashMap::with_capacity(state.services.len());
        for t in state.tasks.values() {
            if let Some(slot) = tasks.iter_mut().find(|(s, _)| *s == t.status.state) {
                slot.1 += 1;
            }
            if t.desired_state != TaskState::Running {
                continue;
            }
            let e = per_service.entry(t.service_id.as_str()).or_default();
            if t.status.state == TaskState::Running {
                e.0 += 1;
            }
            if !t.status.state.is_terminal() {
                e.1 += 1;
            }
        }
        let mut services: Vec<ServiceReplicas> = state
            .services
            .values()
            .map(|svc| {
                let (running, live) = per_service.get(svc.id.as_str()).copied().unwrap_or((0, 0));
                let desired = match svc.spec.mode {
                    ServiceMode::Replicated { replicas } => replicas,
                    ServiceMode::Global => live,
                };
                ServiceReplicas {
                    name: svc.spec.name.clone(),
                    desired,
                    running,
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterSummary {
            nodes,
            tasks,
            services,
        }
    }
}

/// What a scrape shows of the control plane: nothing outside a swarm, the Raft figures on
/// a manager, and the cluster's figures on the leader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub raft: Option<RaftFigures>,
    pub cluster: Option<ClusterSummary>,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    g.encode(m)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(r) = &self.raft {
            let e = &mut encoder;
            gauge(e, "raft_term", "The current Raft term", int(r.term))?;
            gauge(
                e,
                "raft_is_leader",
                "1 if this manager is the Raft leader, else 0",
                i64::from(r.is_leader),
            )?;
            gauge(
                e,
                "raft_last_log_index",
                "The last log index appended on this manager",
                int(r.last_log_index),
            )?;
            gauge(
                e,
                "raft_applied_index",
                "The last log index applied to this manager's store",
                int(r.applied_index),
            )?;
            gauge(
                e,
                "raft_snapshot_index",
                "The last log index in this manager's snapshot",
                int(r.snapshot_index),
            )?;
            gauge(
                e,
                "raft_log_entries",
                "Entries in this manager's Raft log (not yet purged after a snapshot)",
                int(r.log_entries),
            )?;
            gauge(
                e,
                "raft_voters",
                "Voters in the Raft membership",
                int(r.voters),
            )?;
        }
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        {
            let mut m = encoder.encode_descriptor(
                "nodes",
                "Nodes in the cluster by state and role (exported by the leader)",
                None,
                MetricType::Gauge,
            )?;
            for ((state, role), n) in &c.nodes {
                let labels = [
                    ("state", node_state_label(*state)),
                    ("role", role_label(*role)),
                ];
                ConstGauge::new(int(*n)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "tasks",
                "Tasks in the store (history included) by observed state (exported by the leader)",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in &c.tasks {
                let labels = [("state", task_state_label(*state))];
                ConstGauge::new(int(*n)).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut encoder,
            "services",
            "Services in the cluster (exported by the leader)",
            c.services.len() as i64,
        )?;
        for (name, help, get) in [
            (
                "service_replicas_desired",
                "Tasks a service wants (exported by the leader)",
                (|s: &ServiceReplicas| s.desired) as fn(&ServiceReplicas) -> u64,
            ),
            (
                "service_replicas_running",
                "A service's tasks running (exported by the leader)",
                |s: &ServiceReplicas| s.running,
            ),
        ] {
            if c.services.is_empty() {
                continue;
            }
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &c.services {
                let labels = [("service", s.name.as_str())];
                ConstGauge::new(int(get(s))).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::{Node, Service, ServiceSpec, Task, TaskStatus};

    fn node(id: &str, role: NodeRole, state: NodeState) -> Node {
        Node {
            state,
            ..Node::new(id, id, role, "")
        }
    }

    fn service(id: &str, name: &str, mode: ServiceMode) -> Service {
        Service {
            id: id.into(),
            spec: ServiceSpec {
                name: name.into(),
                mode,
                ..Default::default()
            },
            previous_spec: None,
            version: 1,
            created_at: 0,
            updated_at: 0,
            update_status: None,
            vips: Vec::new(),
            registry_auth: Vec::new(),
        }
    }

    fn task(id: &str, service: &str, desired: TaskState, state: TaskState) -> Task {
        Task {
            id: id.into(),
            service_id: service.into(),
            service_name: String::new(),
            slot: 1,
            node_id: String::new(),
            version: 1,
            spec: ServiceSpec::default(),
            desired_state: desired,
            status: TaskStatus {
                state,
                timestamp_ms: 0,
                message: String::new(),
                err: String::new(),
                exit_code: None,
            },
            created_at: 0,
            networks: Vec::new(),
        }
    }

    fn store() -> StoreState {
        let mut s = StoreState::default();
        for n in [
            node("m1", NodeRole::Manager, NodeState::Ready),
            node("w1", NodeRole::Worker, NodeState::Ready),
            node("w2", NodeRole::Worker, NodeState::Down),
        ] {
            s.nodes.insert(n.id.clone(), n);
        }
        for svc in [
            service("s1", "web", ServiceMode::Replicated { replicas: 3 }),
            service("s2", "agent", ServiceMode::Global),
            service("s3", "idle", ServiceMode::Replicated { replicas: 0 }),
        ] {
            s.services.insert(svc.id.clone(), svc);
        }
        use TaskState::*;
        for t in [
            task("t1", "s1", Running, Running),
            task("t2", "s1", Running, Starting),
            task("t3", "s1", Shutdown, Running),
            task("t4", "s1", Shutdown, Failed),
            task("t5", "s2", Running, Running),
            task("t6", "s2", Running, Failed),
            task("t7", "s2", Running, Preparing),
        ] {
            s.tasks.insert(t.id.clone(), t);
        }
        s
    }

    #[test]
    fn summary_counts_as_service_ls_does() {
        let s = store();
        let c = ClusterSummary::of(&s);
        for svc in s.services.values() {
            let (running, desired) = crate::services::replica_counts(&s, svc);
            let got = c.services.iter().find(|r| r.name == svc.spec.name).unwrap();
            assert_eq!(
                (got.running, got.desired),
                (running, desired),
                "{}",
                svc.spec.name
            );
        }
        let names: Vec<_> = c.services.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["agent", "idle", "web"]);
        let count = |st| c.tasks.iter().find(|(s, _)| *s == st).unwrap().1;
        assert_eq!(count(TaskState::Running), 3);
        assert_eq!(count(TaskState::Failed), 2);
        assert_eq!(count(TaskState::Orphaned), 0);
        assert_eq!(c.tasks.len(), TASK_STATES.len());
        let nodes = |st, r| c.nodes.iter().find(|(k, _)| *k == (st, r)).unwrap().1;
        assert_eq!(nodes(NodeState::Ready, NodeRole::Worker), 1);
        assert_eq!(nodes(NodeState::Down, NodeRole::Worker), 1);
        assert_eq!(nodes(NodeState::Left, NodeRole::Manager), 0);
        assert_eq!(c.nodes.len(), 6);
    }

    #[test]
    fn task_state_labels_are_the_api_names() {
        for s in TASK_STATES {
            let api = serde_json::to_value(s).unwrap();
            assert_eq!(api.as_str(), Some(task_state_label(s)));
        }
    }

    #[test]
    fn a_snapshot_encodes_as_openmetrics_text() {
        let snap = Snapshot {
            raft: Some(RaftFigures {
                term: 3,
                is_leader: true,
                last_log_index: 42,
                applied_index: 41,
                snapshot_index: 0,
                log_entries: 42,
                voters: 1,
            }),
            cluster: Some(ClusterSummary::of(&store())),
        };
        let mut registry = Registry::with_prefix("mesh");
        registry.register_collector(Box::new(snap));
        Metrics::default().register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for line in [
            "# TYPE mesh_raft_term gauge",
            "mesh_raft_term 3",
            "mesh_raft_is_leader 1",
            "mesh_raft_last_log_index 42",
            "mesh_nodes{state=\"ready\",role=\"worker\"} 1",
            "mesh_tasks{state=\"running\"} 3",
            "mesh_services 3",
            "mesh_service_replicas_desired{service=\"web\"} 3",
            "mesh_service_replicas_running{service=\"web\"} 1",
            "mesh_service_replicas_desired{service=\"agent\"} 2",
            "# TYPE mesh_raft_propose_seconds histogram",
            "mesh_raft_propose_seconds_count 0",
            "# TYPE mesh_raft_leader_changes counter",
            "mesh_raft_leader_changes_total 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn outside_a_swarm_a_snapshot_shows_nothing() {
        let mut registry = Registry::with_prefix("mesh");
        registry.register_collector(Box::new(Snapshot::default()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert_eq!(out, "# EOF\n");
    }
}
