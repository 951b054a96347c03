//! The orchestrator: compares services with their tasks and plans the commands that make
//! reality match: tasks for empty slots, restarts under the restart policy, replacements for
//! tasks on Down or drained nodes, scale down, rolling updates with their order and failure
//! action, history trimming, cleanup of removed services, allocation (New -> Pending) and
//! scheduling (Pending -> Assigned).
//!
//! Update order: stop-first stops a batch of old tasks, then starts their replacements.
//! Start-first starts the replacement of a slot beside its old task and stops the old one once
//! the new one is Running and has kept running for the update's monitor period. Swarmkit stops
//! it at Running. A task with a health check is Running only once healthy (the agent reports
//! it Starting until then, and it is no backend before), so an update waits for health before
//! its next batch; a task without a check joins its VIP when its process starts, before it
//! listens, so the monitor period is its time to become ready (`--update-monitor 0` gives
//! swarmkit's behaviour). A new task that fails meanwhile leaves the old one serving.
//!
//! [`Orchestrator::plan`] is a pure function of the store state and the time (plus a little
//! memory of when the last update batch started), so it is unit-tested without Raft; the
//! leader runs it after every change and on a short tick and commits its plan as one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mesh_api::{
    Availability, Node, NodeState, RestartCondition, Service, ServiceMode, Task, TaskState,
    TaskStatus, UpdateOrder, UpdateState, UpdateStatus,
};
use mesh_scheduler::{parse_constraints, Scheduler};

use crate::allocator::{self, Used};
use crate::state::{Assignment, Command, StoreState};

/// Terminal tasks kept per slot, as `service ps` shows them, until `swarm update
/// --task-history-limit` says otherwise (Docker keeps 5).
pub const HISTORY_PER_SLOT: usize = 5;

/// A replica on a drained node keeps running until its replacement elsewhere runs, so a
/// drain interrupts no service (Swarm stops it at once: a single replica's service is down
/// until the new one starts); it is stopped anyway this long after the replacement was
/// created (a replacement no node can take, say).
pub const DRAIN_HANDOVER_MS: u64 = 30_000;

/// A scale-down keeps the running replicas of the slots it removes serving while slots it
/// keeps have no running task yet (their task still starting, or waiting for its restart), one
/// for each such slot, so a scale-down never leaves a service with fewer tasks serving than it
/// keeps (Swarm stops them at once: a scale-down during a stop-first update, or while a kept
/// task restarts, can leave none); at most this long after the service last changed.
pub const SCALE_DOWN_HANDOVER_MS: u64 = 30_000;

/// A slot: the slot number of a replicated service, or the node of a global one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    Slot(u64),
    Node(String),
}

fn key_of(t: &Task) -> Key {
    if t.slot > 0 {
        Key::Slot(t.slot)
    } else {
        Key::Node(t.node_id.clone())
    }
}

fn status(state: TaskState, now_ms: u64, message: &str) -> TaskStatus {
    TaskStatus {
        state,
        timestamp_ms: now_ms,
        message: message.to_string(),
        err: String::new(),
        exit_code: None,
    }
}

/// Plans the changes; remembers update batches across calls.
#[derive(Default)]
pub struct Orchestrator {
    last_batch_ms: HashMap<String, u64>,
    /// Creates task IDs; swapped in tests for determinism.
    pub new_id: Option<Box<dyn FnMut() -> String + Send>>,
    /// Ended tasks kept per slot: the cluster's `--task-history-limit`, read at each pass.
    history_limit: usize,
}

/// How many outdated tasks a rolling update may begin to replace now, and in what order.
struct Budget {
    replace: usize,
    /// Whether outdated tasks that do not run (starting, or stuck before running) may be
    /// replaced beyond `replace`: they are down already, so replacing them takes nothing
    /// more down, and an update that fixes what keeps them from running must not wait for
    /// them.
    replace_down: bool,
    order: UpdateOrder,
    /// How long a started-first task runs before the tasks it replaces are stopped.
    monitor_ms: u64,
}

/// What one service's reconciliation decided.
#[derive(Default)]
struct Plan {
    create: Vec<Task>,
    shutdown: BTreeSet<String>,
    statuses: Vec<(String, TaskStatus)>,
    delete: Vec<String>,
    other: Vec<Command>,
}

impl Orchestrator {
    fn id(&mut self) -> String {
        match &mut self.new_id {
            Some(f) => f(),
            None => mesh_ca::new_secret(),
        }
    }

    /// The commands that move the store toward the desired state (empty when converged).
    pub fn plan(&mut self, s: &StoreState, now_ms: u64) -> Vec<Command> {
        self.history_limit = s
            .cluster
            .as_ref()
            .map_or(HISTORY_PER_SLOT, |c| c.settings.task_history_limit as usize);
        let mut p = Plan::default();
        let node_ok = |id: &str| s.nodes.get(id).is_some_and(|n| n.state == NodeState::Ready);

        // Tasks of removed services go once they stopped, or at once if their node is gone.
        for t in s.tasks.values() {
            if !s.services.contains_key(&t.service_id)
                && (t.status.state.is_terminal() || t.node_id.is_empty() || !node_ok(&t.node_id))
            {
                p.delete.push(t.id.clone());
            }
        }

        let placed = Scheduler::new(s.nodes.values(), s.tasks.values());
        for svc in s.services.values() {
            self.reconcile_service(s, svc, &placed, now_ms, &mut p);
        }

        let mut cmds = Vec::new();
        if !p.create.is_empty() {
            cmds.push(Command::CreateTasks { tasks: p.create });
        }
        if !p.shutdown.is_empty() {
            cmds.push(Command::SetDesiredState {
                ids: p.shutdown.into_iter().collect(),
                desired: TaskState::Shutdown,
            });
        }
        if !p.statuses.is_empty() {
            cmds.push(Command::UpdateTaskStatus {
                updates: p.statuses,
            });
        }
        if !p.delete.is_empty() {
            cmds.push(Command::DeleteTasks { ids: p.delete });
        }
        cmds.extend(p.other);
        // Ingress addresses and task addresses are proposed from one view of what is held,
        // so the plan does not hand out an address twice (and `apply` settles them).
        let mut used = Used::of(s);
        cmds.extend(
            allocator::propose_ingress_addrs(s, &mut used)
                .into_iter()
                .map(|(id, addr)| Command::SetNodeIngress { id, addr }),
        );
        let assign = self.allocate_and_schedule(s, now_ms, &mut used);
        if !assign.is_empty() {
            cmds.push(Command::AssignTasks {
                assignments: assign,
            });
        }
        cmds
    }

    fn new_task(&mut self, svc: &Service, key: &Key, now_ms: u64) -> Task {
        let (slot, node_id) = match key {
            Key::Slot(n) => (*n, String::new()),
            Key::Node(n) => (0, n.clone()),
        };
        Task {
            id: self.id(),
            service_id: svc.id.clone(),
            service_name: svc.spec.name.clone(),
            slot,
            node_id,
            version: svc.version,
            spec: svc.spec.clone(),
            desired_state: TaskState::Running,
            status: status(TaskState::New, now_ms, "created"),
            created_at: now_ms / 1000,
            networks: Vec::new(),
        }
    }

    fn reconcile_service(
        &mut self,
        s: &StoreState,
        svc: &Service,
        placed: &Scheduler,
        now_ms: u64,
        p: &mut Plan,
    ) {
        let node = |id: &str| -> Option<&Node> { s.nodes.get(id) };
        let node_gone = |t: &Task| {
            !t.node_id.is_empty() && node(&t.node_id).is_none_or(|n| n.state != NodeState::Ready)
        };
        let drained =
            |t: &Task| node(&t.node_id).is_some_and(|n| n.availability == Availability::Drain);

        let mut slots: BTreeMap<Key, Vec<&Task>> = BTreeMap::new();
        for t in s.service_tasks(&svc.id) {
            slots.entry(key_of(t)).or_default().push(t);
        }
        // Oldest first. A slot's later tasks never run an older version, and the version comes
        // first because `created_at` is in seconds: a start-first update stops the old task
        // after its replacement was created, possibly within the same second. Within a version
        // and a second, a task meant to run is the newer one (a drained replica is stopped
        // after its replacement runs, so its status changes last).
        for hist in slots.values_mut() {
            hist.sort_by(|a, b| {
                (
                    a.version,
                    a.created_at,
                    a.desired_state <= TaskState::Running,
                    a.status.timestamp_ms,
                    &a.id,
                )
                    .cmp(&(
                        b.version,
                        b.created_at,
                        b.desired_state <= TaskState::Running,
                        b.status.timestamp_ms,
                        &b.id,
                    ))
            });
        }
        let wanted: BTreeSet<Key> = match svc.spec.mode {
            ServiceMode::Replicated { replicas } => (1..=replicas).map(Key::Slot).collect(),
            ServiceMode::Global => {
                let constraints = parse_constraints(&svc.spec.constraints).unwrap_or_default();
                placed
                    .eligible_nodes(&constraints, &svc.spec.resources)
                    .into_iter()
                    .map(Key::Node)
                    .collect()
            }
        };
        let healthy = |t: &Task| {
            t.status.state == TaskState::Running
                && now_ms.saturating_sub(t.status.timestamp_ms) >= svc.spec.update.monitor_ms
        };
        // A task that ended while it was meant to run.
        let ended_by_itself =
            |t: &Task| t.desired_state <= TaskState::Running && t.status.state.is_terminal();

        // Rolling update bookkeeping. A rollback replaces tasks in the restored spec's rollback
        // order (as swarmkit: the spec after a rollback is the previous one, with its settings).
        let updating = matches!(
            svc.update_status.as_ref().map(|u| u.state),
            Some(UpdateState::Updating | UpdateState::RollbackStarted)
        );
        let order = match svc.update_status.as_ref().map(|u| u.state) {
            Some(UpdateState::RollbackStarted | UpdateState::RollbackPaused) => {
                svc.spec.rollback.order
            }
            _ => svc.spec.update.order,
        };
        let mut may_replace = 0usize;
        let mut replace_down = false;
        if updating {
            let mut in_flight = 0usize;
            let mut outdated = 0usize;
            let mut failed: Option<&Task> = None;
            for (k, hist) in &slots {
                let Some(l) = hist.last() else { continue };
                if !wanted.contains(k) {
                    continue;
                }
                let current =
                    l.desired_state <= TaskState::Running && !l.status.state.is_terminal();
                if l.version == svc.version {
                    if current && !healthy(l) {
                        in_flight += 1;
                    }
                    if ended_by_itself(l) && l.status.state != TaskState::Shutdown {
                        failed = failed.or(Some(l));
                    }
                } else if current {
                    outdated += 1;
                    // Down as much as a slot being replaced: an outdated task that does
                    // not run (a previous update's replacement still starting, a restart
                    // after a failure) counts against the parallelism, or the update would
                    // stop a running slot beside it.
                    if l.status.state != TaskState::Running {
                        in_flight += 1;
                    }
                } else if !l.status.state.is_terminal() || l.status.state == TaskState::Shutdown {
                    // Being stopped, or stopped and about to be replaced.
                    in_flight += 1;
                }
            }
            let u = svc.spec.update.clone();
            let rollback = svc
                .update_status
                .as_ref()
                .is_some_and(|u| u.state == UpdateState::RollbackStarted);
            if let (Some(f), false) = (
                failed,
                u.failure_action == mesh_api::FailureAction::Continue,
            ) {
                let msg = format!(
                    "update paused due to failure or early termination of task {}",
                    f.id
                );
                if u.failure_action == mesh_api::FailureAction::Rollback
                    && !rollback
                    && svc.previous_spec.is_some()
                {
                    let mut next = svc.clone();
                    next.spec = svc
                        .previous_spec
                        .clone()
                        .unwrap_or_else(|| svc.spec.clone());
                    next.previous_spec = Some(svc.spec.clone());
                    next.version += 1;
                    next.updated_at = now_ms / 1000;
                    next.update_status = Some(UpdateStatus {
                        state: UpdateState::RollbackStarted,
                        started_at: now_ms / 1000,
                        message: format!("rollback started after failure of task {}", f.id),
                    });
                    p.other.push(Command::UpdateService { service: next });
                } else {
                    let state = if rollback {
                        UpdateState::RollbackPaused
                    } else {
                        UpdateState::Paused
                    };
                    p.other.push(Command::SetUpdateStatus {
                        service_id: svc.id.clone(),
                        status: Some(UpdateStatus {
                            state,
                            started_at: now_ms / 1000,
                            message: msg,
                        }),
                    });
                }
                let budget = Budget {
                    replace: 0,
                    replace_down: false,
                    order,
                    monitor_ms: svc.spec.update.monitor_ms,
                };
                self.reconcile_slots(
                    svc, &slots, &wanted, now_ms, budget, p, &node_gone, &drained,
                );
                return;
            }
            if outdated == 0 && in_flight == 0 {
                let state = if rollback {
                    UpdateState::RollbackCompleted
                } else {
                    UpdateState::Completed
                };
                let message = if rollback {
                    "rollback completed"
                } else {
                    "update completed"
                };
                p.other.push(Command::SetUpdateStatus {
                    service_id: svc.id.clone(),
                    status: Some(UpdateStatus {
                        state,
                        started_at: now_ms / 1000,
                        message: message.into(),
                    }),
                });
            } else {
                let parallelism = if u.parallelism == 0 {
                    usize::MAX
                } else {
                    u.parallelism as usize
                };
                let last = self.last_batch_ms.get(&svc.id).copied().unwrap_or(0);
                if now_ms >= last + u.delay_ms {
                    may_replace = parallelism.saturating_sub(in_flight);
                    replace_down = true;
                }
            }
        }
        let budget = Budget {
            replace: may_replace,
            replace_down,
            order,
            monitor_ms: svc.spec.update.monitor_ms,
        };
        let replaced = self.reconcile_slots(
            svc, &slots, &wanted, now_ms, budget, p, &node_gone, &drained,
        );
        if replaced > 0 {
            self.last_batch_ms.insert(svc.id.clone(), now_ms);
        }
    }

    /// Reconciles every slot; returns how many outdated tasks it began to replace for the
    /// update.
    #[allow(clippy::too_many_arguments)]
    fn reconcile_slots(
        &mut self,
        svc: &Service,
        slots: &BTreeMap<Key, Vec<&Task>>,
        wanted: &BTreeSet<Key>,
        now_ms: u64,
        mut budget: Budget,
        p: &mut Plan,
        node_gone: &dyn Fn(&Task) -> bool,
        drained: &dyn Fn(&Task) -> bool,
    ) -> usize {
        let mut replaced = 0;
        let keys: BTreeSet<&Key> = slots.keys().chain(wanted.iter()).collect();
        let orphan = |t: &Task, p: &mut Plan| {
            p.shutdown.insert(t.id.clone());
            if !t.status.state.is_terminal() {
                p.statuses.push((
                    t.id.clone(),
                    status(TaskState::Orphaned, now_ms, "node is down"),
                ));
            }
        };
        // Tasks of removed slots that keep serving for kept slots without a running task
        // (`SCALE_DOWN_HANDOVER_MS`), counted when the first removed slot comes: kept slots
        // come first (lower numbers), so what this pass stops there counts.
        let serving = |t: &Task, p: &Plan| {
            t.desired_state <= TaskState::Running
                && t.status.state == TaskState::Running
                && !node_gone(t)
                && !p.shutdown.contains(&t.id)
        };
        let handover = now_ms < svc.updated_at * 1000 + SCALE_DOWN_HANDOVER_MS;
        let mut stand_ins: Option<usize> = None;
        for key in keys {
            let empty = Vec::new();
            let hist = slots.get(key).unwrap_or(&empty);
            let latest = hist.last().copied();
            // A newer task meant to run that has not run for the monitor period yet (starting,
            // just started, or failed and about to be restarted): it was started first, beside
            // the older ones.
            let started_first = latest.filter(|l| {
                let settled = l.status.state == TaskState::Running
                    && now_ms.saturating_sub(l.status.timestamp_ms) >= budget.monitor_ms;
                l.desired_state <= TaskState::Running && !settled
            });
            // Older tasks still meant to run are stopped (e.g. after a partition), except those a
            // start-first update keeps serving until their replacement has settled, and those
            // on a drained node, kept until their replacement runs (`DRAIN_HANDOVER` at most).
            for t in hist.iter().rev().skip(1) {
                if t.desired_state > TaskState::Running {
                    continue;
                }
                let serving = t.status.state == TaskState::Running && !node_gone(t);
                let kept = serving
                    && started_first.is_some_and(|l| {
                        if drained(t) {
                            l.status.state < TaskState::Running
                                && now_ms.saturating_sub(l.created_at * 1000) < DRAIN_HANDOVER_MS
                        } else {
                            l.version > t.version
                        }
                    });
                if !kept {
                    p.shutdown.insert(t.id.clone());
                }
            }
            if !wanted.contains(key) {
                let mut stand_in = None;
                if handover && matches!(key, Key::Slot(_)) {
                    let left = stand_ins.get_or_insert_with(|| {
                        wanted
                            .iter()
                            .filter(|k| {
                                !slots
                                    .get(*k)
                                    .is_some_and(|h| h.iter().any(|t| serving(t, p)))
                            })
                            .count()
                    });
                    if *left > 0 {
                        stand_in = hist.iter().rev().find(|t| serving(t, p) && !drained(t));
                        if stand_in.is_some() {
                            *left -= 1;
                        }
                    }
                }
                for t in hist {
                    if t.desired_state <= TaskState::Running
                        && stand_in.is_none_or(|s| s.id != t.id)
                    {
                        p.shutdown.insert(t.id.clone());
                    }
                }
                self.trim_history(svc, hist, 0, p);
                continue;
            }
            let created_before = p.create.len();
            let Some(l) = latest else {
                p.create.push(self.new_task(svc, key, now_ms));
                continue;
            };
            let terminal = l.status.state.is_terminal();
            if l.desired_state <= TaskState::Running && !terminal {
                // The current task of the slot.
                if node_gone(l) {
                    orphan(l, p);
                    p.create.push(self.new_task(svc, key, now_ms));
                } else if !l.node_id.is_empty() && drained(l) {
                    // A replica is started elsewhere first; this one serves until that runs
                    // (above). A global task has no elsewhere.
                    if matches!(key, Key::Slot(_)) {
                        p.create.push(self.new_task(svc, key, now_ms));
                    } else {
                        p.shutdown.insert(l.id.clone());
                    }
                } else if l.version < svc.version
                    && (budget.replace > 0
                        || (budget.replace_down && l.status.state != TaskState::Running))
                {
                    match budget.order {
                        // Its replacement is created once it has stopped (below).
                        UpdateOrder::StopFirst => {
                            p.shutdown.insert(l.id.clone());
                        }
                        // It keeps running until its replacement has settled (above).
                        UpdateOrder::StartFirst => {
                            p.create.push(self.new_task(svc, key, now_ms));
                        }
                    }
                    if l.status.state == TaskState::Running {
                        budget.replace -= 1;
                    }
                    replaced += 1;
                }
            } else if l.desired_state <= TaskState::Running {
                // Ended by itself: the restart policy decides.
                let r = &svc.spec.restart;
                let failed = l.status.state != TaskState::Complete;
                let allowed = match r.condition {
                    RestartCondition::Any => true,
                    RestartCondition::OnFailure => failed,
                    RestartCondition::None => false,
                };
                let attempts = hist
                    .iter()
                    .filter(|t| {
                        t.version == svc.version
                            && t.status.state.is_terminal()
                            && t.status.state != TaskState::Shutdown
                    })
                    .count() as u64;
                let exhausted =
                    svc.spec.restart.max_attempts > 0 && attempts > svc.spec.restart.max_attempts;
                if !allowed || exhausted {
                    p.shutdown.insert(l.id.clone());
                } else if now_ms >= l.status.timestamp_ms + svc.spec.restart.delay_ms {
                    p.shutdown.insert(l.id.clone());
                    p.create.push(self.new_task(svc, key, now_ms));
                }
            } else if terminal {
                // Stopped on purpose: replace it, unless it had already ended by itself and
                // the restart policy gave up on it.
                if matches!(
                    l.status.state,
                    TaskState::Shutdown | TaskState::Orphaned | TaskState::Remove
                ) {
                    p.create.push(self.new_task(svc, key, now_ms));
                }
            } else if node_gone(l) {
                // Being stopped on a node that is gone: replace it now.
                orphan(l, p);
                p.create.push(self.new_task(svc, key, now_ms));
            } else if l.node_id.is_empty() {
                // Never placed: nothing runs, so it is done.
                p.statuses.push((
                    l.id.clone(),
                    status(TaskState::Shutdown, now_ms, "shut down before placement"),
                ));
            }
            // After the slot's new task, if any: the history counts it.
            self.trim_history(svc, hist, p.create.len() - created_before, p);
        }
        replaced
    }

    /// Deletes a slot's oldest ended tasks beyond the history limit, counting the `created`
    /// tasks this pass adds to it, so the slot never holds more than the limit.
    fn trim_history(&self, svc: &Service, hist: &[&Task], created: usize, p: &mut Plan) {
        let keep = self
            .history_limit
            .max(svc.spec.restart.max_attempts as usize + 1);
        if hist.len() + created <= keep {
            return;
        }
        let excess = hist.len() + created - keep;
        for t in hist
            .iter()
            .filter(|t| t.status.state.is_terminal() && t.desired_state >= TaskState::Shutdown)
            .take(excess)
        {
            p.delete.push(t.id.clone());
        }
    }

    /// New -> Pending with the task's network addresses, then Pending -> Assigned by the
    /// scheduler.
    fn allocate_and_schedule(
        &mut self,
        s: &StoreState,
        now_ms: u64,
        used: &mut Used,
    ) -> Vec<Assignment> {
        let mut out = Vec::new();
        let mut sched = Scheduler::new(s.nodes.values(), s.tasks.values());
        let mut pending: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
        for t in s.tasks.values() {
            if t.desired_state > TaskState::Running || !s.services.contains_key(&t.service_id) {
                continue;
            }
            match t.status.state {
                TaskState::New => match allocator::propose_task(s, t, used) {
                    Ok(networks) => out.push(Assignment {
                        task_id: t.id.clone(),
                        node_id: None,
                        status: status(TaskState::Pending, now_ms, "pending task scheduling"),
                        networks: Some(networks),
                    }),
                    Err(e) if t.status.err != e.to_string() => {
                        let mut st = status(TaskState::New, now_ms, "allocation failed");
                        st.err = e.to_string();
                        out.push(Assignment {
                            task_id: t.id.clone(),
                            node_id: None,
                            status: st,
                            networks: None,
                        });
                    }
                    Err(_) => {}
                },
                TaskState::Pending => pending.entry(&t.service_id).or_default().push(t),
                _ => {}
            }
        }
        for (svc_id, tasks) in pending {
            let svc = &s.services[svc_id];
            let constraints = match parse_constraints(&svc.spec.constraints) {
                Ok(c) => c,
                Err(e) => {
                    for t in tasks {
                        out.push(self.unplaced(t, now_ms, &e.to_string()));
                    }
                    continue;
                }
            };
            let (global, replicated): (Vec<&Task>, Vec<&Task>) =
                tasks.into_iter().partition(|t| t.slot == 0);
            if !global.is_empty() {
                let ok: BTreeSet<String> = sched
                    .eligible_nodes(&constraints, &svc.spec.resources)
                    .into_iter()
                    .collect();
                for t in global {
                    if ok.contains(&t.node_id) {
                        out.push(Assignment {
                            task_id: t.id.clone(),
                            node_id: Some(t.node_id.clone()),
                            status: status(TaskState::Assigned, now_ms, "assigned"),
                            networks: None,
                        });
                    }
                }
            }
            let mut replicated = replicated;
            replicated.sort_by_key(|t| (t.slot, t.created_at));
            // A host-mode port can be bound once per node.
            let host_ports = svc
                .spec
                .ports
                .iter()
                .any(|p| p.mode == mesh_api::PublishMode::Host);
            let picks = sched.place_with(
                svc_id,
                &constraints,
                &svc.spec.resources,
                replicated.len(),
                host_ports,
            );
            for (t, pick) in replicated.into_iter().zip(picks) {
                match pick {
                    Ok(node) => out.push(Assignment {
                        task_id: t.id.clone(),
                        node_id: Some(node),
                        status: status(TaskState::Assigned, now_ms, "assigned"),
                        networks: None,
                    }),
                    Err(reason) => {
                        if t.status.err != reason {
                            out.push(self.unplaced(t, now_ms, &reason));
                        }
                    }
                }
            }
        }
        out
    }

    fn unplaced(&self, t: &Task, now_ms: u64, reason: &str) -> Assignment {
        let mut st = status(TaskState::Pending, now_ms, "pending task scheduling");
        st.err = reason.to_string();
        Assignment {
            task_id: t.id.clone(),
            node_id: None,
            status: st,
            networks: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{
        FailureAction, NodeRole, RestartPolicy, ServiceSpec, UpdateConfig, UpdateOrder,
    };

    use super::*;
    use crate::state::CommandResult;

    fn cluster() -> StoreState {
        let mut s = StoreState::default();
        s.cluster = Some(crate::state::test_cluster());
        for i in 1..=3 {
            let id = format!("n{i}");
            s.nodes.insert(
                id.clone(),
                Node {
                    raft_id: i,
                    ..Node::new(id.clone(), format!("h{i}"), NodeRole::Worker, "")
                },
            );
        }
        s
    }

    fn spec(mode: ServiceMode) -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            mode,
            command: vec!["sleep".into(), "1000".into()],
            env: vec![],
            networks: vec![],
            ports: vec![],
            endpoint_mode: Default::default(),
            constraints: vec![],
            restart: RestartPolicy {
                delay_ms: 0,
                ..Default::default()
            },
            update: UpdateConfig {
                monitor_ms: 0,
                ..Default::default()
            },
            rollback: Default::default(),
            resources: Default::default(),
            labels: Default::default(),
            ..Default::default()
        }
    }

    struct World {
        s: StoreState,
        o: Orchestrator,
        now: u64,
        /// Tasks of this service version stay Starting (a health check that has not passed).
        starting_version: Option<u64>,
        /// Tasks of this (slot, version) stay Starting.
        hold: Option<(u64, u64)>,
    }

    impl World {
        fn new(mode: ServiceMode) -> World {
            let mut s = cluster();
            let svc = Service {
                id: "svc".into(),
                spec: spec(mode),
                previous_spec: None,
                version: 1,
                created_at: 0,
                updated_at: 0,
                update_status: None,
                vips: Vec::new(),
                registry_auth: Vec::new(),
            };
            assert_eq!(
                s.apply(&Command::CreateService { service: svc }),
                CommandResult::Ok
            );
            let mut n = 0;
            let o = Orchestrator {
                new_id: Some(Box::new(move || {
                    n += 1;
                    format!("t{n:03}")
                })),
                ..Default::default()
            };
            World {
                s,
                o,
                now: 1_000_000,
                starting_version: None,
                hold: None,
            }
        }

        /// One orchestrator pass plus one pass of every node agent; true if anything changed.
        fn step(&mut self) -> bool {
            self.now += 100;
            let cmds = self.o.plan(&self.s, self.now);
            let changed = !cmds.is_empty();
            for c in &cmds {
                self.s.apply(c);
            }
            let mut updates = Vec::new();
            for t in self.s.tasks.values() {
                let down = self
                    .s
                    .nodes
                    .get(&t.node_id)
                    .is_none_or(|n| n.state != NodeState::Ready);
                if t.node_id.is_empty()
                    || down
                    || t.status.state.is_terminal()
                    || t.status.state < TaskState::Assigned
                {
                    continue;
                }
                let next = if t.desired_state > TaskState::Running {
                    TaskState::Shutdown
                } else if self.starting_version == Some(t.version)
                    || self
                        .hold
                        .is_some_and(|(n, v)| key_of(t) == Key::Slot(n) && t.version == v)
                {
                    TaskState::Starting
                } else {
                    TaskState::Running
                };
                if next != t.status.state {
                    updates.push((t.id.clone(), status(next, self.now, "agent")));
                }
            }
            let agents = !updates.is_empty();
            self.s.apply(&Command::UpdateTaskStatus { updates });
            changed || agents
        }

        fn settle(&mut self) {
            for _ in 0..50 {
                if !self.step() {
                    return;
                }
            }
            panic!("did not converge: {:#?}", self.s.tasks);
        }

        fn running(&self) -> Vec<&Task> {
            self.s
                .tasks
                .values()
                .filter(|t| {
                    t.desired_state == TaskState::Running && t.status.state == TaskState::Running
                })
                .collect()
        }

        fn per_node(&self) -> BTreeMap<String, usize> {
            let mut m = BTreeMap::new();
            for t in self.running() {
                *m.entry(t.node_id.clone()).or_default() += 1;
            }
            m
        }

        /// `service scale` (a replicas-only change: no rollout).
        fn set_replicas(&mut self, r: u64) {
            let old = &self.s.services["svc"];
            let mut spec = old.spec.clone();
            spec.mode = ServiceMode::Replicated { replicas: r };
            let next = crate::services::updated(old, spec, false, self.now / 1000);
            assert_eq!(next.version, old.version, "a scale");
            self.s.apply(&Command::UpdateService { service: next });
        }

        /// Starts a rolling update to a new command (as `service update` does).
        fn update_to(&mut self, cmd: &str, edit: impl FnOnce(&mut ServiceSpec)) {
            let old = &self.s.services["svc"];
            let mut spec = old.spec.clone();
            spec.command = vec!["sleep".into(), cmd.into()];
            edit(&mut spec);
            let next = crate::services::updated(old, spec, false, self.now / 1000);
            assert_ne!(next.version, old.version, "a rollout");
            self.s.apply(&Command::UpdateService { service: next });
        }

        fn update_state(&self) -> Option<UpdateState> {
            self.s.services["svc"]
                .update_status
                .as_ref()
                .map(|u| u.state)
        }

        /// Wanted slots (or nodes, for a global service) with no task whose process runs.
        fn slots_without_running_task(&self) -> usize {
            let tasks: Vec<&Task> = self.s.service_tasks("svc").collect();
            let running = |k: &Key| {
                tasks
                    .iter()
                    .any(|t| &key_of(t) == k && t.status.state == TaskState::Running)
            };
            let wanted: Vec<Key> = match self.s.services["svc"].spec.mode {
                ServiceMode::Replicated { replicas } => (1..=replicas).map(Key::Slot).collect(),
                ServiceMode::Global => self.s.nodes.keys().cloned().map(Key::Node).collect(),
            };
            wanted.iter().filter(|k| !running(k)).count()
        }

        /// Steps until nothing changes; per step, the fewest tasks running as desired, the
        /// most tasks whose processes run, and the most slots without a running task.
        fn run_update(&mut self) -> (usize, usize, usize) {
            let (mut min_up, mut max_procs, mut max_gaps) = (usize::MAX, 0, 0);
            for _ in 0..100 {
                let changed = self.step();
                min_up = min_up.min(self.running().len());
                let procs = self
                    .s
                    .tasks
                    .values()
                    .filter(|t| t.status.state == TaskState::Running)
                    .count();
                max_procs = max_procs.max(procs);
                max_gaps = max_gaps.max(self.slots_without_running_task());
                if !changed {
                    return (min_up, max_procs, max_gaps);
                }
            }
            panic!("update did not converge: {:#?}", self.s.tasks);
        }

        fn fail(&mut self, id: &str, exit: i32) {
            let mut st = status(
                if exit == 0 {
                    TaskState::Complete
                } else {
                    TaskState::Failed
                },
                self.now,
                "exit",
            );
            st.exit_code = Some(exit);
            self.s.apply(&Command::UpdateTaskStatus {
                updates: vec![(id.to_string(), st)],
            });
        }
    }

    #[test]
    fn replicas_spread_over_nodes_and_scale() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        w.settle();
        assert_eq!(w.running().len(), 3);
        assert_eq!(
            w.per_node().values().copied().collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
        w.set_replicas(6);
        w.settle();
        assert_eq!(
            w.per_node().values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        w.set_replicas(2);
        w.settle();
        assert_eq!(w.running().len(), 2);
        let slots: Vec<u64> = w.running().iter().map(|t| t.slot).collect();
        assert_eq!(slots, vec![1, 2]);
        // Converged: nothing more to do.
        assert!(w.o.plan(&w.s, w.now + 100).is_empty());
    }

    #[test]
    fn a_scale_down_keeps_a_removed_replica_serving_until_a_kept_one_runs() {
        // Two replicas wait for their restart delay; the third serves. A scale to one keeps
        // slot 1, whose task has not restarted yet: slot 3's serves until it runs.
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        let mut svc = w.s.services["svc"].clone();
        svc.spec.restart.delay_ms = 5_000;
        w.s.apply(&Command::UpdateService { service: svc });
        w.settle();
        let in_slot = |w: &World, slot: u64| {
            w.running()
                .into_iter()
                .find(|t| t.slot == slot)
                .map(|t| t.id.clone())
        };
        let (one, two) = (in_slot(&w, 1).unwrap(), in_slot(&w, 2).unwrap());
        let three = in_slot(&w, 3).unwrap();
        w.fail(&one, 1);
        w.fail(&two, 1);
        w.set_replicas(1);
        let mut handed_over = false;
        for step in 0..100 {
            w.step();
            let running: Vec<String> = w.running().iter().map(|t| t.id.clone()).collect();
            // Never none; two for the pass between slot 1's running and slot 3's stop.
            assert!(
                (1..=2).contains(&running.len()),
                "step {step}: {:#?}",
                w.s.tasks
            );
            if !running.contains(&three) {
                handed_over = true;
                assert!(in_slot(&w, 1).is_some(), "step {step}");
            }
        }
        assert!(handed_over, "slot 1 restarted and slot 3 stopped");
        assert_eq!(w.s.tasks[&three].desired_state, TaskState::Shutdown);
        assert!(w.o.plan(&w.s, w.now + 100).is_empty(), "converged");

        // The soak's case: a stop-first update (parallelism 3 of 4) keeps slot 4's old task
        // serving while the new tasks of slots 1-3 start; a scale to 2 removes slot 4, whose
        // task serves on until slot 1's or 2's runs.
        let mut w = World::new(ServiceMode::Replicated { replicas: 4 });
        w.settle();
        w.starting_version = Some(2);
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StopFirst;
            s.update.parallelism = 3;
        });
        for _ in 0..20 {
            w.step();
        }
        let current = |w: &World| -> BTreeMap<u64, (u64, TaskState)> {
            w.s.tasks
                .values()
                .filter(|t| t.desired_state <= TaskState::Running)
                .map(|t| (t.slot, (t.version, t.status.state)))
                .collect()
        };
        assert_eq!(
            current(&w),
            BTreeMap::from([
                (1, (2, TaskState::Starting)),
                (2, (2, TaskState::Starting)),
                (3, (2, TaskState::Starting)),
                (4, (1, TaskState::Running)),
            ])
        );
        w.set_replicas(2);
        for _ in 0..20 {
            w.step();
        }
        assert_eq!(
            current(&w),
            BTreeMap::from([
                (1, (2, TaskState::Starting)),
                (2, (2, TaskState::Starting)),
                (4, (1, TaskState::Running)),
            ])
        );
        w.starting_version = None;
        for step in 0..20 {
            w.step();
            assert!(!w.running().is_empty(), "step {step}: {:#?}", w.s.tasks);
        }
        w.settle();
        assert_eq!(
            current(&w),
            BTreeMap::from([(1, (2, TaskState::Running)), (2, (2, TaskState::Running))])
        );
        assert_eq!(w.update_state(), Some(UpdateState::Completed));

        // The handover is bounded: kept slots that never run do not keep a removed task.
        let mut w = World::new(ServiceMode::Replicated { replicas: 2 });
        w.settle();
        w.starting_version = Some(2);
        w.update_to("2000", |s| s.update.order = UpdateOrder::StopFirst);
        for _ in 0..20 {
            w.step();
        }
        w.set_replicas(1);
        w.step();
        let old = in_slot(&w, 2).expect("slot 2 serves for slot 1");
        w.now += SCALE_DOWN_HANDOVER_MS;
        w.step();
        assert_eq!(w.s.tasks[&old].desired_state, TaskState::Shutdown);
    }

    #[test]
    fn failed_task_restarts_under_policy() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        w.settle();
        let first = w.running()[0].id.clone();
        w.fail(&first, 137);
        w.settle();
        let now = w.running();
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].id, first);
        assert_eq!(now[0].slot, 1);
        assert_eq!(w.s.tasks[&first].desired_state, TaskState::Shutdown);

        // on-failure: a clean exit is not restarted; none: nothing is.
        let mut svc = w.s.services["svc"].clone();
        svc.spec.restart.condition = RestartCondition::OnFailure;
        w.s.apply(&Command::UpdateService { service: svc });
        let cur = w.running()[0].id.clone();
        w.fail(&cur, 0);
        w.settle();
        assert!(w.running().is_empty());
    }

    #[test]
    fn restart_delay_and_max_attempts() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        let mut svc = w.s.services["svc"].clone();
        svc.spec.restart = RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: 1000,
            max_attempts: 2,
        };
        w.s.apply(&Command::UpdateService { service: svc });
        w.settle();
        for attempt in 0..3 {
            let id = w.running()[0].id.clone();
            w.fail(&id, 1);
            // Within the delay nothing happens.
            w.step();
            assert!(w.running().is_empty(), "attempt {attempt}");
            w.now += 1000;
            w.settle();
            if attempt < 2 {
                assert_eq!(w.running().len(), 1, "attempt {attempt}");
            }
        }
        assert!(w.running().is_empty(), "gave up after max attempts");
    }

    #[test]
    fn down_and_drained_nodes_lose_their_tasks() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        w.settle();
        w.s.nodes.get_mut("n1").unwrap().state = NodeState::Down;
        w.settle();
        assert_eq!(w.running().len(), 3);
        assert!(!w.per_node().contains_key("n1"));
        let orphaned =
            w.s.tasks
                .values()
                .filter(|t| t.status.state == TaskState::Orphaned)
                .count();
        assert_eq!(orphaned, 1);
        w.s.nodes.get_mut("n2").unwrap().availability = Availability::Drain;
        w.settle();
        assert_eq!(
            w.per_node().keys().cloned().collect::<Vec<_>>(),
            vec!["n3".to_string()]
        );
        assert_eq!(w.running().len(), 3);
    }

    #[test]
    fn a_drained_replica_serves_until_its_replacement_runs() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        w.settle();
        let old = w.running()[0].clone();
        w.s.nodes.get_mut(&old.node_id).unwrap().availability = Availability::Drain;
        let mut steps = 0;
        loop {
            let changed = w.step();
            steps += 1;
            assert!(
                !w.running().is_empty(),
                "no task of the service running at step {steps}: {:#?}",
                w.s.tasks
            );
            if !changed || steps > 50 {
                break;
            }
        }
        let now: Vec<&Task> = w.running();
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].node_id, old.node_id, "moved off the drained node");
        assert!(w.s.tasks[&old.id].desired_state > TaskState::Running);
    }

    #[test]
    fn rolling_update_respects_parallelism_and_completes() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 4 });
        w.settle();
        let mut svc = w.s.services["svc"].clone();
        svc.previous_spec = Some(svc.spec.clone());
        svc.spec.command = vec!["sleep".into(), "2000".into()];
        svc.spec.update.parallelism = 2;
        svc.version = 2;
        svc.update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            started_at: 0,
            message: String::new(),
        });
        w.s.apply(&Command::UpdateService { service: svc });
        let mut max_down = 0;
        for _ in 0..60 {
            let changed = w.step();
            max_down = max_down.max(4 - w.running().len());
            if !changed {
                break;
            }
        }
        assert!(
            max_down <= 2,
            "at most parallelism tasks down at once, saw {max_down}"
        );
        assert!(w
            .running()
            .iter()
            .all(|t| t.version == 2 && t.spec.command[1] == "2000"));
        assert_eq!(
            w.s.services["svc"].update_status.as_ref().unwrap().state,
            UpdateState::Completed
        );
    }

    #[test]
    fn a_rolling_update_waits_for_the_new_task_to_be_healthy() {
        for order in [UpdateOrder::StopFirst, UpdateOrder::StartFirst] {
            let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
            w.settle();
            // The new version's tasks stay Starting: their check does not pass.
            w.starting_version = Some(2);
            w.update_to("2000", |s| {
                s.update.parallelism = 1;
                s.update.order = order;
            });
            for _ in 0..40 {
                w.step();
            }
            let new: Vec<&Task> =
                w.s.service_tasks("svc")
                    .filter(|t| t.version == 2)
                    .collect();
            assert_eq!(new.len(), 1, "{order:?}: one batch only: {new:#?}");
            assert_eq!(new[0].status.state, TaskState::Starting);
            let old = w.running().iter().filter(|t| t.version == 1).count();
            assert_eq!(
                old,
                if order == UpdateOrder::StartFirst {
                    3
                } else {
                    2
                }
            );
            assert_eq!(w.update_state(), Some(UpdateState::Updating));
            // Healthy: the update goes on and completes.
            w.starting_version = None;
            w.run_update();
            assert!(w.running().iter().all(|t| t.version == 2));
            assert_eq!(w.running().len(), 3);
            assert_eq!(w.update_state(), Some(UpdateState::Completed));
        }
    }

    #[test]
    fn failing_update_pauses_or_rolls_back() {
        for action in [FailureAction::Pause, FailureAction::Rollback] {
            let mut w = World::new(ServiceMode::Replicated { replicas: 2 });
            w.settle();
            let mut svc = w.s.services["svc"].clone();
            svc.previous_spec = Some(svc.spec.clone());
            svc.spec.command = vec!["false".into()];
            svc.spec.update.failure_action = action;
            svc.spec.restart.delay_ms = 60_000;
            svc.version = 2;
            svc.update_status = Some(UpdateStatus {
                state: UpdateState::Updating,
                started_at: 0,
                message: String::new(),
            });
            w.s.apply(&Command::UpdateService { service: svc });
            // Run until the first new task exists and runs, then make it fail.
            for _ in 0..20 {
                w.step();
                if let Some(t) = w.running().into_iter().find(|t| t.version == 2) {
                    let id = t.id.clone();
                    w.fail(&id, 1);
                    break;
                }
            }
            for _ in 0..40 {
                w.step();
            }
            let st = w.s.services["svc"].update_status.clone().unwrap();
            match action {
                FailureAction::Pause => {
                    assert_eq!(st.state, UpdateState::Paused, "{st:?}");
                    // One slot still runs the old version: the update stopped there.
                    assert!(w.running().iter().any(|t| t.version == 1));
                }
                _ => {
                    assert_eq!(st.state, UpdateState::RollbackCompleted, "{st:?}");
                    let svc = &w.s.services["svc"];
                    assert_eq!(svc.spec.command[0], "sleep");
                    assert_eq!(w.running().len(), 2);
                    assert!(w
                        .running()
                        .iter()
                        .all(|t| t.version == 3 && t.spec.command[0] == "sleep"));
                }
            }
        }
    }

    #[test]
    fn start_first_never_runs_fewer_than_the_replicas() {
        for (replicas, parallelism) in [(1, 1), (3, 1), (3, 2), (4, 0)] {
            let mut w = World::new(ServiceMode::Replicated { replicas });
            w.settle();
            w.update_to("2000", |s| {
                s.update.order = UpdateOrder::StartFirst;
                s.update.parallelism = parallelism;
            });
            let (min_up, max_procs, gaps) = w.run_update();
            let case = format!("replicas {replicas}, parallelism {parallelism}");
            assert!(min_up >= replicas as usize, "{case}: {min_up} running");
            assert_eq!(gaps, 0, "{case}: a slot had no running task");
            // A batch of `parallelism` new tasks runs beside the old ones, no more.
            let surge = if parallelism == 0 {
                replicas
            } else {
                parallelism
            };
            assert_eq!(max_procs, (replicas + surge) as usize, "{case}");
            assert_eq!(w.update_state(), Some(UpdateState::Completed), "{case}");
            let running = w.running();
            assert_eq!(running.len(), replicas as usize, "{case}");
            assert!(running.iter().all(|t| t.version == 2), "{case}");
            // Every old task was stopped, and each slot shows its new task first.
            assert!(
                w.s.tasks
                    .values()
                    .filter(|t| t.version == 1)
                    .all(|t| t.status.state == TaskState::Shutdown),
                "{case}"
            );
            let svc = &w.s.services["svc"];
            let ps = crate::services::ps(&w.s, svc, &Default::default());
            assert!(ps
                .iter()
                .filter(|(row, _)| !row.is_history)
                .all(|(row, _)| running.iter().any(|t| t.id == row.id)));
        }
    }

    #[test]
    fn stop_first_respects_parallelism_and_never_surges() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 4 });
        w.settle();
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StopFirst;
            s.update.parallelism = 2;
        });
        let (min_up, max_procs, gaps) = w.run_update();
        assert_eq!(min_up, 2, "batches of 2 stopped at a time");
        assert_eq!(max_procs, 4, "no task runs beside the one it replaces");
        assert_eq!(gaps, 2);
        assert_eq!(w.update_state(), Some(UpdateState::Completed));
        assert!(w.running().iter().all(|t| t.version == 2));
    }

    #[test]
    fn an_update_counts_an_outdated_task_that_is_not_running_as_down() {
        // The soak's case (seed 20261205): slot 2's task was starting (replaced by an
        // earlier update, here restarted after a failure) when a stop-first update
        // (parallelism 1 of 2) came. Outdated, it was not counted as down, so the update
        // stopped slot 1 too and the service had no running task.
        let mut w = World::new(ServiceMode::Replicated { replicas: 2 });
        w.settle();
        let slot2 =
            w.s.service_tasks("svc")
                .find(|t| key_of(t) == Key::Slot(2))
                .map(|t| t.id.clone())
                .unwrap();
        w.hold = Some((2, 1));
        w.fail(&slot2, 1);
        for _ in 0..20 {
            w.step();
            if w.s.tasks.values().any(|t| {
                key_of(t) == Key::Slot(2) && t.id != slot2 && t.status.state == TaskState::Starting
            }) {
                break;
            }
        }
        assert_eq!(w.slots_without_running_task(), 1, "{:#?}", w.s.tasks);
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StopFirst;
            s.update.parallelism = 1;
        });
        let (_, _, gaps) = w.run_update();
        assert_eq!(gaps, 1, "one slot down at a time: {:#?}", w.s.tasks);
        assert_eq!(w.update_state(), Some(UpdateState::Completed));
        assert!(w.running().iter().all(|t| t.version == 2));
        assert_eq!(w.running().len(), 2);
    }

    #[test]
    fn an_update_replaces_outdated_tasks_that_cannot_run_without_waiting_for_them() {
        // An update that fixes what kept tasks from running (here: stuck starting) must not
        // wait for those tasks to run first: they are down already, and replaced at once.
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        w.starting_version = Some(1);
        for _ in 0..5 {
            w.step();
        }
        assert_eq!(w.running().len(), 0);
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StopFirst;
            s.update.parallelism = 1;
        });
        w.settle();
        assert_eq!(w.update_state(), Some(UpdateState::Completed));
        assert_eq!(w.running().len(), 3);
        assert!(w.running().iter().all(|t| t.version == 2));
    }

    #[test]
    fn start_first_on_a_global_service_runs_the_new_task_beside_the_old() {
        let mut w = World::new(ServiceMode::Global);
        w.settle();
        w.update_to("2000", |s| s.update.order = UpdateOrder::StartFirst);
        let mut most_on_a_node = 0;
        for _ in 0..100 {
            let changed = w.step();
            assert_eq!(w.slots_without_running_task(), 0, "{:#?}", w.s.tasks);
            let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
            for t in w.s.tasks.values() {
                if t.status.state == TaskState::Running {
                    *per_node.entry(t.node_id.as_str()).or_default() += 1;
                }
            }
            most_on_a_node = most_on_a_node.max(per_node.values().copied().max().unwrap_or(0));
            if !changed {
                break;
            }
        }
        assert_eq!(most_on_a_node, 2, "the new task ran beside the old one");
        assert_eq!(w.update_state(), Some(UpdateState::Completed));
        assert_eq!(w.per_node().len(), 3);
        assert!(w.running().iter().all(|t| t.version == 2));
    }

    #[test]
    fn start_first_stops_the_old_task_once_the_new_one_ran_for_the_monitor_period() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        w.settle();
        let old = w.running()[0].id.clone();
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StartFirst;
            s.update.monitor_ms = 1000;
        });
        let mut new_running_at = None;
        for _ in 0..40 {
            w.step();
            let new =
                w.s.tasks
                    .values()
                    .find(|t| t.version == 2 && t.status.state == TaskState::Running);
            if let (None, Some(t)) = (new_running_at, new) {
                new_running_at = Some(t.status.timestamp_ms);
            }
            let old_stopped = w.s.tasks[&old].desired_state > TaskState::Running;
            match new_running_at {
                Some(at) if w.now >= at + 1000 => {}
                _ => assert!(!old_stopped, "old task stopped too early at {}", w.now),
            }
            if old_stopped {
                break;
            }
        }
        let at = new_running_at.expect("the new task ran");
        assert_eq!(w.s.tasks[&old].desired_state, TaskState::Shutdown);
        w.settle();
        assert!(w.now >= at + 1000);
        assert_eq!(w.update_state(), Some(UpdateState::Completed));
        assert_eq!(w.running().len(), 1);
    }

    #[test]
    fn start_first_keeps_the_old_task_when_the_new_one_fails() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        w.settle();
        let old = w.running()[0].id.clone();
        w.update_to("2000", |s| {
            s.update.order = UpdateOrder::StartFirst;
            s.restart.delay_ms = 60_000;
        });
        // The new task fails before the orchestrator has seen it run.
        for _ in 0..10 {
            w.step();
            let new =
                w.s.tasks
                    .values()
                    .find(|t| t.version == 2 && t.status.state == TaskState::Running);
            if let Some(id) = new.map(|t| t.id.clone()) {
                w.fail(&id, 1);
                break;
            }
        }
        for _ in 0..20 {
            w.step();
            assert_eq!(w.slots_without_running_task(), 0);
        }
        assert_eq!(w.update_state(), Some(UpdateState::Paused));
        let running = w.running();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id, old, "the old task still serves");
    }

    #[test]
    fn rollback_uses_the_rollback_order() {
        for (update, rollback) in [
            (UpdateOrder::StopFirst, UpdateOrder::StartFirst),
            (UpdateOrder::StartFirst, UpdateOrder::StopFirst),
        ] {
            let case = format!("update {update}, rollback {rollback}");
            let mut w = World::new(ServiceMode::Replicated { replicas: 2 });
            let mut svc = w.s.services["svc"].clone();
            svc.spec.update.order = update;
            svc.spec.rollback.order = rollback;
            w.s.apply(&Command::UpdateService { service: svc });
            w.settle();
            w.update_to("2000", |_| {});
            let (_, max_procs, gaps) = w.run_update();
            assert_eq!(w.update_state(), Some(UpdateState::Completed), "{case}");
            assert_eq!(
                (gaps == 0, max_procs > 2),
                (
                    update == UpdateOrder::StartFirst,
                    update == UpdateOrder::StartFirst
                ),
                "{case}: update"
            );
            // `service rollback`.
            let back = crate::services::rolled_back(&w.s.services["svc"], w.now / 1000).unwrap();
            w.s.apply(&Command::UpdateService { service: back });
            let (min_up, max_procs, gaps) = w.run_update();
            assert_eq!(
                w.update_state(),
                Some(UpdateState::RollbackCompleted),
                "{case}"
            );
            let start_first = rollback == UpdateOrder::StartFirst;
            assert_eq!(
                (gaps == 0, max_procs > 2, min_up >= 2),
                (start_first, start_first, start_first),
                "{case}: rollback"
            );
            assert!(w
                .running()
                .iter()
                .all(|t| t.version == 3 && t.spec.command[1] == "1000"));
        }

        // The failure action: the update is stop-first, the rollback start-first.
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        let mut svc = w.s.services["svc"].clone();
        svc.spec.rollback.order = UpdateOrder::StartFirst;
        w.s.apply(&Command::UpdateService { service: svc });
        w.settle();
        w.update_to("2000", |s| {
            s.update.failure_action = FailureAction::Rollback;
            s.update.order = UpdateOrder::StopFirst;
        });
        for _ in 0..20 {
            w.step();
            if let Some(t) = w.running().into_iter().find(|t| t.version == 2) {
                let id = t.id.clone();
                w.fail(&id, 1);
                break;
            }
        }
        w.step();
        assert_eq!(w.update_state(), Some(UpdateState::RollbackStarted));
        let (_, max_procs, gaps) = w.run_update();
        assert_eq!(w.update_state(), Some(UpdateState::RollbackCompleted));
        // Only the failed slot lacked a running task; the others were rolled back start-first.
        assert!(gaps <= 1, "{gaps} slots without a running task");
        assert_eq!(max_procs, 4, "a rolled-back task ran beside an old one");
        assert!(w.running().len() == 3 && w.running().iter().all(|t| t.spec.command[1] == "1000"));
    }

    #[test]
    fn global_service_runs_once_per_eligible_node() {
        let mut w = World::new(ServiceMode::Global);
        w.settle();
        assert_eq!(w.per_node().len(), 3);
        // A node that joins later gets one too.
        let mut n4 = w.s.nodes["n1"].clone();
        n4.id = "n4".into();
        n4.hostname = "h4".into();
        w.s.nodes.insert("n4".into(), n4);
        w.settle();
        assert_eq!(w.per_node().len(), 4);
        // A constraint that excludes a node stops its task.
        let mut svc = w.s.services["svc"].clone();
        svc.spec.constraints = vec!["node.hostname!=h2".into()];
        w.s.apply(&Command::UpdateService { service: svc });
        w.settle();
        assert!(!w.per_node().contains_key("n2"));
        assert_eq!(w.running().len(), 3);
    }

    #[test]
    fn returning_node_does_not_keep_replaced_tasks() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 3 });
        w.settle();
        let on_n1: Vec<String> = w
            .running()
            .iter()
            .filter(|t| t.node_id == "n1")
            .map(|t| t.id.clone())
            .collect();
        w.s.nodes.get_mut("n1").unwrap().state = NodeState::Down;
        w.settle();
        w.s.nodes.get_mut("n1").unwrap().state = NodeState::Ready;
        w.settle();
        // The replaced task is not assigned to n1 any more, so its agent stops it.
        let assigned = crate::dispatcher::assigned_to(w.s.tasks.values(), "n1");
        assert!(on_n1.iter().all(|id| !assigned.iter().any(|t| &t.id == id)));
        assert_eq!(w.running().len(), 3);
    }

    #[test]
    fn removed_service_tasks_are_deleted_once_stopped() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 2 });
        w.settle();
        w.s.apply(&Command::RemoveService { id: "svc".into() });
        w.settle();
        assert!(w.s.tasks.is_empty());
    }

    #[test]
    fn history_is_trimmed_per_slot() {
        let mut w = World::new(ServiceMode::Replicated { replicas: 1 });
        w.settle();
        for _ in 0..10 {
            let id = w.running()[0].id.clone();
            w.fail(&id, 1);
            w.settle();
        }
        assert!(
            w.s.tasks.len() <= HISTORY_PER_SLOT,
            "{} tasks kept",
            w.s.tasks.len()
        );
    }
}
