//! The [`Scheduler`]: which nodes may run a new task (filters), and which of them gets it
//! (spread).
//!
//! # Filters
//!
//! A node is eligible for a task when, in this order (a node is counted under the first filter
//! it fails, for the "no suitable node" message):
//!
//! 1. it is available for new tasks: state `Ready` and availability `Active` (a `Down`/`Left`
//!    node, a paused or a drained one is not);
//! 2. it satisfies every [`Constraint`] of the service;
//! 3. it has the resources: for CPU and memory separately, when both the task's limit and the
//!    node's capacity ([`Node::resources`]) are known (non-zero), the limits of the tasks
//!    already on the node plus this task's limit must not exceed the capacity;
//! 4. for a service publishing a port in host mode ([`Scheduler::place_with`]), it does not
//!    run a task of that service yet: the port can be bound once per node (published ports
//!    are unique in the cluster, so only the service's own tasks can collide).
//!
//! The resource check is a simple reservation model: a task reserves its *limits*
//! ([`ServiceSpec::resources`](mesh_api::ServiceSpec)) on its node for as long as it is not in
//! a terminal state, whether or not it uses them; a limit of 0 reserves nothing of that
//! resource, and a node of unknown capacity (0) accepts any reservation. Nothing is
//! overcommitted: a task never lands where it would push the sum of limits past the capacity.
//!
//! # Spread
//!
//! Among the eligible nodes, each task goes to the one with the fewest tasks of the same
//! service, then the fewest tasks in total, then the lowest node ID, so the outcome depends on
//! nothing but the inputs. The counts include the tasks placed earlier by the same
//! [`Scheduler`] (the same batch or an earlier [`Scheduler::place`] call).
//!
//! # Cost
//!
//! [`Scheduler::new`] is O(nodes · log nodes + tasks). A [`Scheduler::place`] batch of `count`
//! tasks filters each node once, heapifies the eligible ones keyed by (service count, total
//! count, ID) and then pops and re-pushes one node per task: O(nodes · constraints + count ·
//! log nodes), never O(count · nodes).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use mesh_api::{Availability, Node, NodeState, Resources, Task};

use crate::constraint::Constraint;

/// Schedules tasks on a snapshot of the cluster: the nodes and the tasks that occupy them.
/// Each placement is recorded, so later placements (in the same batch or not) see it.
#[derive(Clone, Debug)]
pub struct Scheduler {
    /// Sorted by node ID, without duplicates: an index order is the ID order.
    nodes: Vec<Slot>,
    /// Node ID → index in `nodes`.
    index: HashMap<String, usize>,
    /// Service ID → node index → tasks of that service on that node (only non-zero counts).
    by_service: HashMap<String, HashMap<usize, usize>>,
}

/// One node and what occupies it.
#[derive(Clone, Debug)]
struct Slot {
    node: Node,
    /// Tasks (of any service) counted on the node.
    tasks: usize,
    /// Sum of the limits of those tasks.
    reserved: Resources,
}

/// Why a node was not eligible: the filter it failed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejection {
    Unavailable,
    Constraints,
    Resources,
    HostPort,
}

/// How many nodes each filter turned away, for the "no suitable node" message.
#[derive(Clone, Copy, Debug, Default)]
struct Rejections {
    unavailable: usize,
    constraints: usize,
    resources: usize,
    host_port: usize,
}

impl Rejections {
    fn add(&mut self, r: Rejection) {
        match r {
            Rejection::Unavailable => self.unavailable += 1,
            Rejection::Constraints => self.constraints += 1,
            Rejection::Resources => self.resources += 1,
            Rejection::HostPort => self.host_port += 1,
        }
    }

    /// `no suitable node (1 node not available for new tasks; 2 nodes not satisfying
    /// constraints; 1 node has insufficient resources)`, as swarmkit explains it.
    fn message(&self) -> String {
        let count = |n: usize, one: &str, many: &str| {
            if n == 1 {
                format!("1 node {one}")
            } else {
                format!("{n} nodes {many}")
            }
        };
        let mut parts = Vec::new();
        if self.unavailable > 0 {
            parts.push(count(
                self.unavailable,
                "not available for new tasks",
                "not available for new tasks",
            ));
        }
        if self.constraints > 0 {
            parts.push(count(
                self.constraints,
                "not satisfying constraints",
                "not satisfying constraints",
            ));
        }
        if self.resources > 0 {
            parts.push(count(
                self.resources,
                "has insufficient resources",
                "have insufficient resources",
            ));
        }
        if self.host_port > 0 {
            parts.push(count(
                self.host_port,
                "has the host-mode port in use",
                "have the host-mode port in use",
            ));
        }
        if parts.is_empty() {
            "no suitable node (no node in the swarm)".to_string()
        } else {
            format!("no suitable node ({})", parts.join("; "))
        }
    }
}

/// Whether one more `want` of a resource fits: unknown limit or capacity (0) always fits.
fn fits_one(capacity: u64, reserved: u64, want: u64) -> bool {
    want == 0 || capacity == 0 || reserved.saturating_add(want) <= capacity
}

impl Slot {
    /// Whether a task with these limits fits next to the tasks already on the node.
    fn fits(&self, want: &Resources) -> bool {
        let cap = &self.node.resources;
        fits_one(cap.nano_cpus, self.reserved.nano_cpus, want.nano_cpus)
            && fits_one(
                cap.memory_bytes,
                self.reserved.memory_bytes,
                want.memory_bytes,
            )
    }

    /// The filters, in order.
    fn check(&self, constraints: &[Constraint], want: &Resources) -> Result<(), Rejection> {
        if self.node.state != NodeState::Ready || self.node.availability != Availability::Active {
            Err(Rejection::Unavailable)
        } else if !constraints.iter().all(|c| c.matches(&self.node)) {
            Err(Rejection::Constraints)
        } else if !self.fits(want) {
            Err(Rejection::Resources)
        } else {
            Ok(())
        }
    }

    /// Records one more task with these limits on the node.
    fn reserve(&mut self, want: &Resources) {
        self.tasks += 1;
        self.reserved.nano_cpus = self.reserved.nano_cpus.saturating_add(want.nano_cpus);
        self.reserved.memory_bytes = self.reserved.memory_bytes.saturating_add(want.memory_bytes);
    }
}

impl Scheduler {
    /// A scheduler over `nodes` (the last one wins if an ID repeats), occupied by the tasks of
    /// `placed` that have a node and are not in a terminal state; each of those counts for its
    /// service and reserves its limits on its node. Tasks on nodes not in `nodes` are ignored.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        placed: impl IntoIterator<Item = &'a Task>,
    ) -> Scheduler {
        let unique: BTreeMap<&str, &Node> = nodes.into_iter().map(|n| (n.id.as_str(), n)).collect();
        let nodes: Vec<Slot> = unique
            .into_values()
            .map(|n| Slot {
                node: n.clone(),
                tasks: 0,
                reserved: Resources::default(),
            })
            .collect();
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, s)| (s.node.id.clone(), i))
            .collect();
        let mut s = Scheduler {
            nodes,
            index,
            by_service: HashMap::new(),
        };
        for task in placed {
            if task.node_id.is_empty() || task.status.state.is_terminal() {
                continue;
            }
            let Some(&i) = s.index.get(&task.node_id) else {
                continue;
            };
            s.nodes[i].reserve(&task.spec.resources);
            *s.by_service
                .entry(task.service_id.clone())
                .or_default()
                .entry(i)
                .or_insert(0) += 1;
        }
        s
    }

    /// Places `count` tasks of service `service_id` with these constraints and limits, one
    /// after the other, and records them. Returns, per task, `Ok(node ID)` or `Err(reason)`
    /// when no node is left, e.g. `no suitable node (1 node not available for new tasks;
    /// 2 nodes not satisfying constraints; 1 node has insufficient resources)` (nodes that
    /// filled up during the batch count as having insufficient resources). Once a task fails,
    /// all the following ones fail with the same reason.
    pub fn place(
        &mut self,
        service_id: &str,
        constraints: &[Constraint],
        resources: &Resources,
        count: usize,
    ) -> Vec<Result<String, String>> {
        self.place_with(service_id, constraints, resources, count, false)
    }

    /// [`Scheduler::place`], and with `one_per_node` (a service publishing a port in host
    /// mode) a node that runs a task of the service already is not eligible.
    pub fn place_with(
        &mut self,
        service_id: &str,
        constraints: &[Constraint],
        resources: &Resources,
        count: usize,
        one_per_node: bool,
    ) -> Vec<Result<String, String>> {
        let mut out = Vec::with_capacity(count);
        if count == 0 {
            return out;
        }
        let mut why = Rejections::default();
        let mut service = self.by_service.remove(service_id).unwrap_or_default();
        let mut eligible = Vec::with_capacity(self.nodes.len());
        for (i, slot) in self.nodes.iter().enumerate() {
            let same = service.get(&i).copied().unwrap_or(0);
            match slot.check(constraints, resources) {
                Ok(()) if one_per_node && same > 0 => why.add(Rejection::HostPort),
                Ok(()) => eligible.push(Reverse((same, slot.tasks, i))),
                Err(r) => why.add(r),
            }
        }
        // A min-heap on (tasks of the service, tasks in total, index = ID order).
        let mut heap = BinaryHeap::from(eligible);
        while out.len() < count {
            let Some(Reverse((same, total, i))) = heap.pop() else {
                break;
            };
            let slot = &mut self.nodes[i];
            slot.reserve(resources);
            *service.entry(i).or_insert(0) += 1;
            out.push(Ok(slot.node.id.clone()));
            if one_per_node {
                why.host_port += 1;
            } else if slot.fits(resources) {
                heap.push(Reverse((same + 1, total + 1, i)));
            } else {
                why.resources += 1;
            }
        }
        if out.len() < count {
            out.resize(count, Err(why.message()));
        }
        if !service.is_empty() {
            self.by_service.insert(service_id.to_string(), service);
        }
        out
    }

    /// For a global service: the IDs (in order) of the nodes eligible for one task of it with
    /// these constraints and limits, each checked on its own. Nothing is recorded, and nodes
    /// that already run a task of the service are included: skipping those is the caller's.
    pub fn eligible_nodes(&self, constraints: &[Constraint], resources: &Resources) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|s| s.check(constraints, resources).is_ok())
            .map(|s| s.node.id.clone())
            .collect()
    }

    /// Why no node is eligible for a task with these constraints and limits (the message
    /// [`Scheduler::place`] fails with), or `None` if some node is.
    pub fn explain(&self, constraints: &[Constraint], resources: &Resources) -> Option<String> {
        let mut why = Rejections::default();
        for slot in &self.nodes {
            match slot.check(constraints, resources) {
                Ok(()) => return None,
                Err(r) => why.add(r),
            }
        }
        Some(why.message())
    }

    /// Tasks counted on a node (`None` for an unknown node).
    pub fn tasks_on(&self, node_id: &str) -> Option<usize> {
        self.index.get(node_id).map(|&i| self.nodes[i].tasks)
    }

    /// Tasks of a service counted on a node (0 for an unknown node or service).
    pub fn service_tasks_on(&self, service_id: &str, node_id: &str) -> usize {
        match (self.by_service.get(service_id), self.index.get(node_id)) {
            (Some(counts), Some(i)) => counts.get(i).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// The sum of the limits of the tasks counted on a node (`None` for an unknown node).
    pub fn reserved_on(&self, node_id: &str) -> Option<Resources> {
        self.index.get(node_id).map(|&i| self.nodes[i].reserved)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{NodeRole, ServiceMode, ServiceSpec, TaskState, TaskStatus};

    use super::*;
    use crate::constraint::parse_constraint;

    const GIB: u64 = 1 << 30;
    const CPU: u64 = 1_000_000_000;

    fn node(id: &str) -> Node {
        Node::new(id, format!("host-{id}"), NodeRole::Worker, "10.0.0.1:2377")
    }

    fn with_label(mut n: Node, k: &str, v: &str) -> Node {
        n.labels.insert(k.into(), v.into());
        n
    }

    fn with_capacity(mut n: Node, cpus: u64, mem: u64) -> Node {
        n.resources = Resources {
            nano_cpus: cpus,
            memory_bytes: mem,
        };
        n
    }

    fn task(service: &str, node_id: &str, state: TaskState, resources: Resources) -> Task {
        Task {
            id: format!("t-{service}-{node_id}"),
            service_id: service.into(),
            service_name: service.into(),
            slot: 1,
            node_id: node_id.into(),
            version: 1,
            spec: ServiceSpec {
                name: service.into(),
                mode: ServiceMode::Replicated { replicas: 1 },
                command: vec!["sleep".into(), "1000".into()],
                env: vec![],
                networks: vec![],
                ports: vec![],
                endpoint_mode: Default::default(),
                constraints: vec![],
                restart: Default::default(),
                update: Default::default(),
                rollback: Default::default(),
                resources,
                labels: BTreeMap::new(),
                ..Default::default()
            },
            desired_state: TaskState::Running,
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

    fn running(service: &str, node_id: &str) -> Task {
        task(service, node_id, TaskState::Running, Resources::default())
    }

    fn nodes(ids: &[&str]) -> Vec<Node> {
        ids.iter().map(|id| node(id)).collect()
    }

    fn none() -> Resources {
        Resources::default()
    }

    fn cons(specs: &[&str]) -> Vec<Constraint> {
        specs.iter().map(|s| parse_constraint(s).unwrap()).collect()
    }

    fn ok(results: &[Result<String, String>]) -> Vec<&str> {
        results
            .iter()
            .map(|r| r.as_deref().unwrap_or_else(|e| panic!("not placed: {e}")))
            .collect()
    }

    #[test]
    fn host_mode_ports_take_one_node_each() {
        let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| node(n)).collect();
        let mut s = Scheduler::new(nodes.iter(), std::iter::empty());
        let got = s.place_with("web", &[], &Resources::default(), 4, true);
        let ok: Vec<&String> = got.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok, vec!["a", "b", "c"]);
        assert_eq!(
            got[3].as_ref().unwrap_err(),
            "no suitable node (3 nodes have the host-mode port in use)"
        );
        // Without host ports, a fourth task simply doubles up.
        let mut s = Scheduler::new(nodes.iter(), std::iter::empty());
        assert!(s
            .place("web", &[], &Resources::default(), 4)
            .iter()
            .all(|r| r.is_ok()));
    }

    #[test]
    fn spreads_three_tasks_over_three_nodes() {
        let ns = nodes(&["c", "a", "b"]);
        let mut s = Scheduler::new(&ns, []);
        assert_eq!(ok(&s.place("web", &[], &none(), 3)), ["a", "b", "c"]);
        assert_eq!(ok(&s.place("web", &[], &none(), 4)), ["a", "b", "c", "a"]);
        assert_eq!(s.tasks_on("a"), Some(3));
        assert_eq!(s.service_tasks_on("web", "b"), 2);
        assert_eq!(s.tasks_on("zz"), None);
        assert!(s.place("web", &[], &none(), 0).is_empty());
    }

    #[test]
    fn counts_existing_tasks_but_not_terminal_or_unassigned_ones() {
        let ns = nodes(&["a", "b", "c"]);
        let placed = vec![
            running("web", "a"),
            running("web", "a"),
            running("web", "b"),
            task("web", "c", TaskState::Failed, none()),
            task("web", "c", TaskState::Shutdown, none()),
            task("web", "", TaskState::Pending, none()),
            running("web", "gone"),
        ];
        let mut s = Scheduler::new(&ns, &placed);
        assert_eq!(s.tasks_on("a"), Some(2));
        assert_eq!(s.tasks_on("c"), Some(0));
        // c (0), then b and c (1 each: b first), then a, b, c (2 each).
        assert_eq!(
            ok(&s.place("web", &[], &none(), 6)),
            ["c", "b", "c", "a", "b", "c"]
        );
    }

    #[test]
    fn ties_on_the_service_are_broken_by_total_then_id() {
        let ns = nodes(&["a", "b", "c"]);
        // a: 2 other tasks, b: 1, c: 0 (of other services); "web" has none anywhere.
        let placed = vec![
            running("db", "a"),
            running("cache", "a"),
            running("db", "b"),
        ];
        let mut s = Scheduler::new(&ns, &placed);
        assert_eq!(ok(&s.place("web", &[], &none(), 3)), ["c", "b", "a"]);
        // The service count comes first: "db" prefers c (0 db) over b (1 db, fewer total
        // than a), then b (1 db, 2 total) over a (1 db, 3 total).
        assert_eq!(ok(&s.place("db", &[], &none(), 2)), ["c", "b"]);
        // A new service: totals are a 3, b 3, c 2 → c, then a before b by ID.
        assert_eq!(ok(&s.place("x", &[], &none(), 3)), ["c", "a", "b"]);
        // Totals a 4, b 4, c 3: c, then all at 4 → by ID.
        assert_eq!(ok(&s.place("y", &[], &none(), 4)), ["c", "a", "b", "c"]);
    }

    #[test]
    fn skips_unavailable_nodes() {
        let mut down = node("a");
        down.state = NodeState::Down;
        let mut left = node("b");
        left.state = NodeState::Left;
        let mut drain = node("c");
        drain.availability = Availability::Drain;
        let mut pause = node("d");
        pause.availability = Availability::Pause;
        let ns = vec![down, left, drain, pause, node("e")];
        let mut s = Scheduler::new(&ns, []);
        assert_eq!(ok(&s.place("web", &[], &none(), 2)), ["e", "e"]);
        assert_eq!(s.eligible_nodes(&[], &none()), ["e"]);
        let ns = &ns[..4];
        let mut s = Scheduler::new(ns, []);
        assert_eq!(
            s.place("web", &[], &none(), 2),
            vec![Err("no suitable node (4 nodes not available for new tasks)".to_string()); 2]
        );
    }

    #[test]
    fn applies_constraints() {
        let ns = vec![
            with_label(node("a"), "zone", "a"),
            with_label(node("b"), "zone", "b"),
            with_label(node("c"), "zone", "a"),
            node("d"),
        ];
        let mut s = Scheduler::new(&ns, []);
        let zone_a = cons(&["node.labels.zone==a"]);
        assert_eq!(ok(&s.place("web", &zone_a, &none(), 3)), ["a", "c", "a"]);
        assert_eq!(s.eligible_nodes(&zone_a, &none()), ["a", "c"]);
        assert_eq!(
            s.eligible_nodes(&cons(&["node.labels.zone!=a"]), &none()),
            ["b", "d"]
        );
        assert_eq!(
            s.eligible_nodes(
                &cons(&["node.labels.zone!=a", "node.hostname!=host-d"]),
                &none()
            ),
            ["b"]
        );
        assert_eq!(s.eligible_nodes(&cons(&["node.id==c"]), &none()), ["c"]);
        assert!(s
            .eligible_nodes(&cons(&["node.role==manager"]), &none())
            .is_empty());
        assert_eq!(
            s.place("web", &cons(&["node.labels.zone==z"]), &none(), 1),
            [Err(
                "no suitable node (4 nodes not satisfying constraints)".to_string()
            )]
        );
    }

    #[test]
    fn filters_on_resources_and_reservations() {
        let ns = vec![
            with_capacity(node("a"), 2 * CPU, 4 * GIB),
            with_capacity(node("b"), 8 * CPU, 0), // memory unknown
            node("c"),                            // capacity unknown
        ];
        // Too big for a (CPU) and a/b... b has 8 CPUs: fits b and c.
        let big = Resources {
            nano_cpus: 4 * CPU,
            memory_bytes: GIB,
        };
        let s = Scheduler::new(&ns, []);
        assert_eq!(s.eligible_nodes(&[], &big), ["b", "c"]);
        // Memory beyond a's capacity; b's memory is unknown.
        let fat = Resources {
            nano_cpus: 0,
            memory_bytes: 5 * GIB,
        };
        assert_eq!(s.eligible_nodes(&[], &fat), ["b", "c"]);
        // No limits: everything fits.
        assert_eq!(s.eligible_nodes(&[], &none()), ["a", "b", "c"]);

        // Reservations: a already runs 1.5 CPUs' worth of limits.
        let placed = vec![task(
            "db",
            "a",
            TaskState::Running,
            Resources {
                nano_cpus: CPU * 3 / 2,
                memory_bytes: GIB,
            },
        )];
        let half = Resources {
            nano_cpus: CPU / 2,
            memory_bytes: 0,
        };
        let s = Scheduler::new(&ns[..1], &placed);
        assert_eq!(
            s.reserved_on("a"),
            Some(Resources {
                nano_cpus: CPU * 3 / 2,
                memory_bytes: GIB
            })
        );
        assert_eq!(s.eligible_nodes(&[], &half), ["a"]);
        let mut s2 = s.clone();
        // Exactly one more half CPU fits; then a is full.
        let r = s2.place("web", &[], &half, 3);
        assert_eq!(r[0], Ok("a".to_string()));
        let full = "no suitable node (1 node has insufficient resources)".to_string();
        assert_eq!(r[1..], [Err(full.clone()), Err(full.clone())]);
        assert!(s2.eligible_nodes(&[], &half).is_empty());
        assert_eq!(s2.explain(&[], &half), Some(full));
        assert_eq!(s2.explain(&[], &none()), None);
        // Tasks without limits still go there.
        assert_eq!(ok(&s2.place("web", &[], &none(), 1)), ["a"]);
        // A terminal task reserves nothing.
        let placed = vec![task(
            "db",
            "a",
            TaskState::Complete,
            Resources {
                nano_cpus: 2 * CPU,
                memory_bytes: 0,
            },
        )];
        let s = Scheduler::new(&ns[..1], &placed);
        assert_eq!(
            s.eligible_nodes(
                &[],
                &Resources {
                    nano_cpus: 2 * CPU,
                    memory_bytes: 0
                }
            ),
            ["a"]
        );
    }

    #[test]
    fn fills_nodes_up_to_their_capacity_within_a_batch() {
        let ns = vec![
            with_capacity(node("a"), 2 * CPU, 16 * GIB),
            with_capacity(node("b"), 4 * CPU, 16 * GIB),
        ];
        let one = Resources {
            nano_cpus: CPU,
            memory_bytes: GIB,
        };
        let mut s = Scheduler::new(&ns, []);
        let r = s.place("web", &[], &one, 7);
        assert_eq!(ok(&r[..6]), ["a", "b", "a", "b", "b", "b"]);
        assert_eq!(
            r[6],
            Err("no suitable node (2 nodes have insufficient resources)".into())
        );
    }

    #[test]
    fn explains_every_reason_at_once() {
        let mut down = with_label(node("a"), "zone", "a");
        down.state = NodeState::Down;
        let ns = vec![
            down,
            node("b"),
            with_label(node("c"), "zone", "b"),
            with_capacity(with_label(node("d"), "zone", "a"), CPU, GIB),
        ];
        let mut s = Scheduler::new(&ns, []);
        let two = Resources {
            nano_cpus: 2 * CPU,
            memory_bytes: 0,
        };
        let zone_a = cons(&["node.labels.zone==a"]);
        let want = "no suitable node (1 node not available for new tasks; 2 nodes not satisfying \
                    constraints; 1 node has insufficient resources)";
        assert_eq!(s.place("web", &zone_a, &two, 1), [Err(want.to_string())]);
        assert_eq!(s.explain(&zone_a, &two).as_deref(), Some(want));
        let empty: Vec<Node> = vec![];
        let mut s = Scheduler::new(&empty, []);
        assert_eq!(
            s.place("web", &[], &none(), 1),
            [Err("no suitable node (no node in the swarm)".into())]
        );
        assert!(s.eligible_nodes(&[], &none()).is_empty());
    }

    #[test]
    fn is_deterministic_whatever_the_input_order() {
        let mut ns: Vec<Node> = (0..20).map(|i| node(&format!("n{i:02}"))).collect();
        let placed: Vec<Task> = (0..30)
            .map(|i| running(&format!("s{}", i % 3), &format!("n{:02}", i * 7 % 20)))
            .collect();
        let run = |ns: &[Node], placed: &[Task]| {
            let mut s = Scheduler::new(ns, placed);
            let mut out = s.place("s0", &[], &none(), 25);
            out.extend(s.place("s1", &[], &none(), 13));
            out.extend(s.place("new", &[], &none(), 40));
            out
        };
        let first = run(&ns, &placed);
        ns.reverse();
        let mut rev = placed.clone();
        rev.reverse();
        assert_eq!(run(&ns, &rev), first);
        assert_eq!(run(&ns, &placed), first);
    }

    #[test]
    fn duplicate_node_ids_keep_the_last() {
        let mut drained = node("a");
        drained.availability = Availability::Drain;
        let ns = vec![node("a"), drained];
        let s = Scheduler::new(&ns, []);
        assert!(s.eligible_nodes(&[], &none()).is_empty());
    }

    /// After N tasks of one service on M eligible nodes (with other services' tasks around),
    /// the service's per-node counts differ by at most 1.
    #[test]
    fn property_a_service_is_balanced_within_one() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let m = 1 + rand(40) as usize;
            let ineligible = rand(5) as usize;
            let mut ns: Vec<Node> = (0..m)
                .map(|i| with_label(node(&format!("e{i}")), "ok", "yes"))
                .collect();
            ns.extend((0..ineligible).map(|i| node(&format!("x{i}"))));
            // Other services' tasks, unevenly spread, change totals but not the balance.
            let placed: Vec<Task> = (0..rand(100))
                .map(|i| {
                    running(
                        &format!("other{}", i % 4),
                        &ns[rand(ns.len() as u64) as usize].id,
                    )
                })
                .collect();
            let mut s = Scheduler::new(&ns, &placed);
            let c = cons(&["node.labels.ok==yes"]);
            let n = rand(500) as usize;
            // In one batch or several.
            let mut placed_ids = Vec::new();
            let mut left = n;
            while left > 0 {
                let k = 1 + rand(left as u64) as usize;
                placed_ids.extend(s.place("svc", &c, &none(), k));
                left -= k;
            }
            assert_eq!(placed_ids.len(), n);
            let mut counts: BTreeMap<&str, usize> =
                ns[..m].iter().map(|n| (n.id.as_str(), 0)).collect();
            for r in &placed_ids {
                let id = r.as_deref().expect("placed");
                *counts
                    .get_mut(id)
                    .unwrap_or_else(|| panic!("round {round}: placed on {id}")) += 1;
            }
            let min = counts.values().min().copied().unwrap_or(0);
            let max = counts.values().max().copied().unwrap_or(0);
            assert!(
                max - min <= 1,
                "round {round}: {m} nodes, {n} tasks: {counts:?}"
            );
            for (id, c) in &counts {
                assert_eq!(s.service_tasks_on("svc", id), *c);
            }
        }
    }

    #[test]
    fn places_a_hundred_thousand_tasks_quickly() {
        let ns: Vec<Node> = (0..1000)
            .map(|i| with_capacity(node(&format!("n{i:04}")), 8 * CPU, 16 * GIB))
            .collect();
        let mut s = Scheduler::new(&ns, []);
        let r = s.place("web", &[], &none(), 100_000);
        assert!(r.iter().all(Result::is_ok));
        assert!(ns.iter().all(|n| s.tasks_on(&n.id) == Some(100)));
    }
}
