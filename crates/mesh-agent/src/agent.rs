//! The node agent: every node (managers too) long-polls the leader for the tasks assigned to
//! it, makes its task runtime match (start, stop, adopt after a restart), and reports task
//! states back. Reports are queued and retried until the leader takes them, so a status is
//! never lost to a leader change.
//!
//! A task on a network is reported Running only once the network plane has announced its
//! endpoints ([`NetworkPlane::announced`]): the leader answers that report by stopping what
//! the task replaces (a start-first update's old task, a drained node's replica), and the old
//! endpoint's withdrawal must not reach the other nodes before the new endpoint does.
//!
//! A task running here that the leader no longer assigns to this node (it was replaced while
//! this node was partitioned, or its service was removed) is stopped: the cluster never runs
//! more copies than asked for.
//!
//! An ended task keeps its state directory (logs, exit record) while the store keeps it in its
//! service's task history, as Docker keeps the containers of a service's task history: the
//! leader's answer also lists this node's ended tasks still in the store. Once the store has
//! deleted one (its service was removed, or the history trimmed), the agent removes it at once,
//! unless its final report is still waiting to be sent.
//!
//! Health checks (the pure part in [`crate::health`]): a task whose service or image has a
//! check is reported Starting until a probe passes, then Running, and is given to the network
//! plane as a backend only while healthy. One prober per task process runs the check in the
//! task every interval (bounded by its timeout); when the task turns unhealthy it is withdrawn
//! from the plane at once, stopped after [`DRAIN`], and reported Failed with Docker's error,
//! so the orchestrator replaces it per its restart policy. A restarted daemon resolves the
//! checks of the tasks it adopts and probes them again (one the store knew healthy stays a
//! backend unless its probes fail).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_api::{ApiError, ErrorKind, Task, TaskState, TaskStatus};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::health::{self, Health, Monitor};
use crate::runtime::{
    image_argv, image_env, ImageRun, Images, NetworkPlane, RunFile, RunRootfs, RunSpec, RunState,
    Runtime, RuntimeError,
};
use mesh_manager::member::now_ms;
use mesh_manager::node_agent::{BoxFuture, LeaderLink, MemberLink, NodeAgent};
use mesh_manager::peer::{PeerRequest, PeerResponse, TaskLog};

/// How long a stopped task gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a task on a network keeps running after its endpoint was withdrawn, before it is
/// stopped: every node's DNS and VIP balancer drop it first (gossip removes an endpoint
/// everywhere in well under 100 ms here, p99 ~0.5 s with 1% loss), so no new connection is
/// sent to a process that is going away. Docker waits a fixed 2 s for the same reason.
pub const DRAIN: Duration = Duration::from_secs(1);
/// How long the Running report of a task on a network waits for the plane to announce its
/// endpoints (a pass takes milliseconds; a plane that cannot announce them must not keep
/// the task from ever being reported).
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(5);

/// The most text of one task's log a `service logs` answer carries (the newest lines): a
/// task's log files hold 30 MB by default.
pub const LOG_BYTES: usize = 8 << 20;
/// Exited tasks that are no longer assigned keep their logs this long when the leader's
/// answer did not say which ended tasks the store still has (only a fallback: the leader
/// normally lists them, see [`ended_on`]).
const KEEP_EXITED_MS: u64 = 10 * 60 * 1000;

#[derive(Default)]
struct AgentState {
    /// Latest assignment set from the leader, with its digest.
    assigned: Option<(u64, HashMap<String, Task>)>,
    /// This node's ended tasks the store still has, from the same answer (`None`: the answer
    /// did not say, so exited tasks are kept [`KEEP_EXITED_MS`]).
    ended: Option<HashSet<String>>,
    /// Statuses waiting to be reported, by task.
    outbox: BTreeMap<String, TaskStatus>,
    /// When each status in the outbox was queued.
    queued_at: HashMap<String, Instant>,
    /// Highest state reported (or queued) per task, so each is sent once.
    reported: HashMap<String, TaskState>,
    /// Tasks with a start or stop in progress.
    busy: HashSet<String>,
    /// The data of the secrets and configs of the assigned tasks, by ID, from the same
    /// answer: in memory only, never written to this node's disk.
    blobs: BTreeMap<String, Vec<u8>>,
    /// Registry credentials by service ID, from the same answer (in memory only).
    registry_auths: BTreeMap<String, mesh_api::RegistryCredentials>,
    /// The health of the local task processes whose check is resolved, by task.
    health: HashMap<String, HealthEntry>,
    /// Adopted tasks whose check is being resolved.
    resolving: HashSet<String>,
}

/// The health of one task process.
struct HealthEntry {
    pid: u32,
    /// `None`: the task has no check.
    monitor: Option<Monitor>,
}

impl AgentState {
    /// Whether a running task (process `pid`) is a backend of its VIPs, names and ports: it
    /// has no check or is healthy. A process whose check is not resolved yet (adopted) is
    /// one if the store knew it Running.
    fn serving(&self, t: &Task, pid: u32) -> bool {
        match self.health.get(&t.id) {
            Some(e) if e.pid == pid => e
                .monitor
                .as_ref()
                .is_none_or(|m| m.status == Health::Healthy),
            _ => t.status.state == TaskState::Running,
        }
    }
}

/// The agent of one node.
pub struct Agent {
    runtime: Arc<dyn Runtime>,
    plane: Option<Arc<dyn NetworkPlane>>,
    /// The node's image store (`None`: image tasks are rejected).
    images: Option<Arc<dyn Images>>,
    /// Digest of the running set last given to the plane.
    plane_digest: Mutex<Option<u64>>,
    /// The runtime's tasks as the last reconcile pass listed them.
    last_local: Mutex<HashMap<String, RunState>>,
    /// The ingress attachment last given to the plane.
    ingress: Mutex<Option<mesh_api::NetworkAttachment>>,
    /// The gossip keys and member addresses last given to the plane.
    gossip: Mutex<(
        Vec<crate::runtime::GossipKey>,
        Option<Vec<std::net::Ipv4Addr>>,
    )>,
    node_name: String,
    state: Mutex<AgentState>,
    wake: Arc<Notify>,
    /// Whether tasks may still be started (false once [`Agent::close`] ran). A start holds it
    /// read while the runtime starts the task, so `close` returns only once every start in
    /// flight has its task in the runtime, where the caller can remove it.
    starts: tokio::sync::RwLock<bool>,
}

impl Agent {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        plane: Option<Arc<dyn NetworkPlane>>,
        images: Option<Arc<dyn Images>>,
        node_name: String,
    ) -> Arc<Agent> {
        let wake = Arc::new(Notify::new());
        if let Some(p) = &plane {
            p.on_announced(wake.clone());
        }
        Arc::new(Agent {
            runtime,
            plane,
            images,
            plane_digest: Mutex::new(None),
            last_local: Mutex::new(HashMap::new()),
            ingress: Mutex::new(None),
            gossip: Mutex::new((Vec::new(), None)),
            node_name,
            state: Mutex::new(AgentState::default()),
            wake,
            starts: tokio::sync::RwLock::new(true),
        })
    }

    /// Starts no task from now on, and returns once the starts in flight are done (their
    /// tasks are in the runtime then): the node leaves its swarm or stops, and what runs
    /// here after this is what the caller removes or leaves running.
    pub async fn close(&self) {
        *self.starts.write().await = false;
    }

    /// The images of the tasks assigned to this node (for `image prune`: kept).
    pub fn images_in_use(&self) -> Vec<String> {
        let st = self.lock();
        let mut out: Vec<String> = st
            .assigned
            .iter()
            .flat_map(|(_, tasks)| tasks.values())
            .map(|t| t.spec.image.clone())
            .filter(|i| !i.is_empty())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The tasks assigned to this node with their processes' state (`Request::LocalTasks`).
    pub async fn local_tasks(&self, node_name: &str) -> Vec<mesh_api::LocalTask> {
        let assigned: Vec<Task> = {
            let st = self.lock();
            st.assigned
                .iter()
                .flat_map(|(_, tasks)| tasks.values().cloned())
                .collect()
        };
        let rt = self.runtime.clone();
        let local: HashMap<String, RunState> = tokio::task::spawn_blocking(move || rt.list())
            .await
            .map(|l| l.into_iter().collect())
            .unwrap_or_default();
        let mut out: Vec<mesh_api::LocalTask> = assigned
            .into_iter()
            .filter_map(|task| {
                let rs = local.get(&task.id)?;
                let (running, pid, started_at_ms, finished_at_ms, exit_code) = match rs {
                    RunState::Running { pid, started_at_ms } => {
                        (true, Some(*pid), *started_at_ms, 0, None)
                    }
                    RunState::Exited {
                        code,
                        signal,
                        started_at_ms,
                        finished_at_ms,
                    } => (
                        false,
                        None,
                        *started_at_ms,
                        *finished_at_ms,
                        code.or(signal.map(|s| 128 + s)),
                    ),
                };
                Some(mesh_api::LocalTask {
                    task,
                    node_name: node_name.to_string(),
                    running,
                    pid,
                    started_at_ms,
                    finished_at_ms,
                    exit_code,
                })
            })
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.started_at_ms));
        out
    }

    pub fn plane(&self) -> Option<&Arc<dyn NetworkPlane>> {
        self.plane.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// The tasks currently assigned here (for `mesh exec` name lookups).
    pub fn assigned_tasks(&self) -> Vec<Task> {
        self.lock()
            .assigned
            .as_ref()
            .map(|(_, m)| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Gives the plane the gossip keys and member addresses, when they changed. No keys (a
    /// leader without the data key) leave the keys held; no members, the members held.
    /// From the leader's answers, and, on a manager, from its own store at start
    /// (`Member::start`): it gossips at once, without waiting for an election.
    pub(crate) fn give_gossip(
        &self,
        keys: Vec<crate::runtime::GossipKey>,
        members: Option<Vec<std::net::Ipv4Addr>>,
    ) {
        let Some(plane) = &self.plane else {
            return;
        };
        let mut last = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.is_empty() && last.0 != keys {
            plane.set_gossip_keys(keys.clone());
            last.0 = keys;
        }
        if let Some(m) = members.filter(|m| last.1.as_ref() != Some(m)) {
            plane.set_members(m.clone());
            last.1 = Some(m);
        }
    }

    /// Gives the underlay filter `members` (the store's, just after a node joined) and
    /// returns once it lets them through: a leader admits a joining node before answering
    /// it. The node gossips with the managers (the leader first) as soon as it has its keys,
    /// and the leader's own list (from its next answer to itself) could come a moment
    /// later: the packets dropped meanwhile, a push-pull's TCP SYN above all, held the
    /// node's gossip join, and every pass of its plane, for the 1 s, 3 s, ... of TCP's SYN
    /// backoff.
    pub(crate) async fn admit_members(&self, members: Vec<std::net::Ipv4Addr>) {
        let Some(plane) = self.plane.clone() else {
            return;
        };
        if members.is_empty() {
            return;
        }
        {
            let mut last = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
            // Given under the lock, in order with `give_gossip`: a newer list wins. The
            // leader's answer to itself may have given the list already, its filter
            // change still on the way: waited for all the same.
            if last.1.as_ref() != Some(&members) {
                plane.set_members(members.clone());
                last.1 = Some(members);
            }
        }
        let _ = tokio::task::spawn_blocking(move || plane.sync_members()).await;
    }

    /// Long-polls the leader for assignments until shutdown.
    pub(crate) async fn poll_loop(
        self: Arc<Self>,
        leader: impl LeaderLink,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut client: Option<mesh_rpc::Client> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let known = self.lock().assigned.as_ref().map(|(d, _)| *d).unwrap_or(0);
            let node_id = leader.node_id();
            let req = PeerRequest::Assignments { node_id, known };
            let resp = tokio::select! {
                r = leader.to_leader_polling(req, &mut client) => r,
                _ = shutdown.changed() => return,
            };
            match resp {
                PeerResponse::Assignments {
                    digest,
                    tasks,
                    ended,
                    ingress,
                    blobs,
                    registry_auths,
                    gossip_keys,
                    members,
                } => {
                    self.give_gossip(gossip_keys, members);
                    if let Some(plane) = &self.plane {
                        let mut last = self.ingress.lock().unwrap_or_else(|p| p.into_inner());
                        if *last != ingress {
                            plane.set_ingress(ingress.clone());
                            *last = ingress;
                        }
                    }
                    let changed = {
                        let mut st = self.lock();
                        let changed = st.assigned.as_ref().map(|(d, _)| *d) != Some(digest);
                        st.assigned = Some((
                            digest,
                            tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
                        ));
                        st.ended = ended.map(|e| e.into_iter().collect());
                        st.blobs = blobs;
                        st.registry_auths = registry_auths;
                        changed
                    };
                    if changed {
                        self.wake.notify_one();
                    }
                }
                other => {
                    debug!("assignments: {other:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Reconciles the runtime with the assignments and reports states, until shutdown.
    pub(crate) async fn reconcile_loop(
        self: Arc<Self>,
        leader: impl LeaderLink,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => return,
            }
            self.clone().reconcile().await;
            self.flush(&leader).await;
        }
    }

    fn queue(&self, st: &mut AgentState, id: &str, status: TaskStatus) {
        if st.reported.get(id).is_some_and(|s| *s >= status.state) {
            return;
        }
        st.reported.insert(id.to_string(), status.state);
        st.outbox.insert(id.to_string(), status);
        st.queued_at.insert(id.to_string(), Instant::now());
    }

    /// The queued statuses to send now: all but the Running report of a task on a network
    /// whose endpoints the plane has not announced yet ([`NetworkPlane::announced`]), held
    /// back for [`ANNOUNCE_WAIT`] at most (the plane's next pass wakes the agent).
    fn sendable(&self) -> Vec<(String, TaskStatus)> {
        let st = self.lock();
        st.outbox
            .iter()
            .filter(|(id, s)| {
                let Some(plane) = &self.plane else {
                    return true;
                };
                let networked = st
                    .assigned
                    .as_ref()
                    .and_then(|(_, m)| m.get(*id))
                    .is_some_and(|t| !t.networks.is_empty());
                if s.state != TaskState::Running || !networked || plane.announced(id) {
                    return true;
                }
                let waited = st.queued_at.get(*id).map_or(Duration::MAX, |t| t.elapsed());
                if waited >= ANNOUNCE_WAIT {
                    warn!(
                        task = id.as_str(),
                        "reported Running though its endpoints are not announced after {ANNOUNCE_WAIT:?}"
                    );
                    return true;
                }
                false
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    async fn reconcile(self: Arc<Self>) {
        // The tasks being started or stopped before the runtime is listed: one whose start
        // ends while the list is taken is absent from it but no longer busy, and would be
        // started again (a second pull, a stale Starting report). It waits for the next pass.
        let busy_before: HashSet<String> = self.lock().busy.clone();
        let rt = self.runtime.clone();
        let local: HashMap<String, RunState> =
            match tokio::task::spawn_blocking(move || rt.list()).await {
                Ok(l) => l.into_iter().collect(),
                Err(_) => return,
            };
        let (assigned, ended) = {
            let st = self.lock();
            let Some(assigned) = st.assigned.as_ref().map(|(_, m)| m.clone()) else {
                // No word from the leader since this daemon started: change nothing.
                return;
            };
            (assigned, st.ended.clone())
        };
        let now = now_ms();
        let mut to_start = Vec::new();
        let mut to_stop = Vec::new();
        let mut to_remove = Vec::new();
        let mut to_resolve = Vec::new();
        {
            let mut st = self.lock();
            for t in assigned.values() {
                if st.busy.contains(&t.id) || busy_before.contains(&t.id) {
                    continue;
                }
                let local_state = local.get(&t.id);
                if t.desired_state <= TaskState::Running {
                    match local_state {
                        None if t.status.state < TaskState::Running => {
                            st.busy.insert(t.id.clone());
                            to_start.push(t.clone());
                        }
                        None => {
                            let s = failed(now, "task not found on its node", None);
                            self.queue(&mut st, &t.id, s);
                        }
                        Some(RunState::Running { pid, started_at_ms }) => {
                            // Running once healthy, if it has a check.
                            let since = match st.health.get(&t.id) {
                                Some(e) if e.pid == *pid => match &e.monitor {
                                    None => Some(*started_at_ms),
                                    Some(m) if m.status == Health::Healthy => {
                                        Some(m.healthy_since_ms)
                                    }
                                    Some(_) => None,
                                },
                                // Adopted: its check is resolved first.
                                _ => {
                                    if st.resolving.insert(t.id.clone()) {
                                        to_resolve.push((t.clone(), *pid, *started_at_ms));
                                    }
                                    None
                                }
                            };
                            if let Some(at) = since {
                                self.queue(&mut st, &t.id, running(at));
                            }
                        }
                        Some(RunState::Exited {
                            code,
                            signal,
                            finished_at_ms,
                            ..
                        }) => {
                            let s = exited(*code, *signal, *finished_at_ms);
                            self.queue(&mut st, &t.id, s);
                        }
                    }
                } else {
                    match local_state {
                        Some(RunState::Running { .. }) => {
                            st.busy.insert(t.id.clone());
                            to_stop.push((
                                t.id.clone(),
                                true,
                                !t.networks.is_empty(),
                                stop_signal(&t.spec),
                                t.spec
                                    .stop_grace_period_ms
                                    .map_or(STOP_GRACE, Duration::from_millis),
                            ));
                        }
                        _ => {
                            let s = TaskStatus {
                                state: TaskState::Shutdown,
                                timestamp_ms: now,
                                message: "shutdown".into(),
                                err: String::new(),
                                exit_code: None,
                            };
                            self.queue(&mut st, &t.id, s);
                        }
                    }
                }
            }
            for (id, rs) in &local {
                if assigned.contains_key(id) || st.busy.contains(id) {
                    continue;
                }
                match rs {
                    RunState::Running { .. } => {
                        info!(
                            task = id,
                            "stopping a task the leader no longer assigns here"
                        );
                        st.busy.insert(id.clone());
                        // Drained like any stopping task: its endpoints are not in the
                        // plane's running set (a restarted daemon's plane retracts what its
                        // previous run announced), and the other nodes need the moment to
                        // stop sending it calls.
                        to_stop.push((id.clone(), false, true, SIGTERM, STOP_GRACE));
                    }
                    // Its final report is still to be sent: kept until the leader has it.
                    RunState::Exited { .. } if st.outbox.contains_key(id) => {}
                    RunState::Exited { finished_at_ms, .. } => {
                        let gone = match &ended {
                            // The store deleted it: nothing will ask for its logs any more.
                            Some(ended) => !ended.contains(id),
                            None => now.saturating_sub(*finished_at_ms) > KEEP_EXITED_MS,
                        };
                        if gone {
                            st.busy.insert(id.clone());
                            to_remove.push(id.clone());
                        }
                    }
                }
            }
            // Forget what is neither assigned nor queued.
            let outbox: HashSet<String> = st.outbox.keys().cloned().collect();
            st.reported
                .retain(|id, _| assigned.contains_key(id) || outbox.contains(id));
            // The health of processes that are gone (a task just started is assigned, and
            // may be missing from a listing made before its start).
            st.health.retain(|id, e| match local.get(id) {
                Some(RunState::Running { pid, .. }) => *pid == e.pid,
                Some(RunState::Exited { .. }) => false,
                None => assigned.contains_key(id),
            });
        }
        for (t, pid, started_at_ms) in to_resolve {
            let me = self.clone();
            tokio::spawn(async move {
                me.resolve_adopted(t, pid, started_at_ms).await;
            });
        }
        let node_name = self.node_name.clone();
        for t in to_start {
            let me = self.clone();
            let node_name = node_name.clone();
            tokio::spawn(async move {
                me.start_task(t, node_name).await;
            });
        }
        // The plane withdraws the endpoints of tasks about to stop (below) before they stop.
        for (id, report, drain, signal, grace) in to_stop {
            let me = self.clone();
            tokio::spawn(async move {
                if drain && me.plane.is_some() {
                    tokio::time::sleep(DRAIN).await;
                }
                let rt = me.runtime.clone();
                let id2 = id.clone();
                let r = tokio::task::spawn_blocking(move || rt.stop(&id2, signal, grace)).await;
                if let Ok(Err(e)) = &r {
                    warn!(task = id, "stop: {e}");
                }
                let mut st = me.lock();
                st.busy.remove(&id);
                if report {
                    let s = TaskStatus {
                        state: TaskState::Shutdown,
                        timestamp_ms: now_ms(),
                        message: "shutdown".into(),
                        err: String::new(),
                        exit_code: None,
                    };
                    me.queue(&mut st, &id, s);
                }
                drop(st);
                me.wake.notify_one();
            });
        }
        for id in to_remove {
            let rt = self.runtime.clone();
            let id2 = id.clone();
            match tokio::task::spawn_blocking(move || rt.remove(&id2)).await {
                Ok(Err(e)) => warn!(task = id, "remove: {e}"),
                Ok(Ok(())) => debug!(task = id, "removed an ended task the store deleted"),
                Err(_) => {}
            }
            self.lock().busy.remove(&id);
        }
        *self.last_local.lock().unwrap_or_else(|p| p.into_inner()) = local.clone();
        self.update_plane(&assigned, &local);
    }

    /// [`Self::update_plane`] with the last assignments and runtime listing (a health change).
    fn refresh_plane(&self) {
        let Some(assigned) = self.lock().assigned.as_ref().map(|(_, m)| m.clone()) else {
            return;
        };
        let local = self
            .last_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.update_plane(&assigned, &local);
    }

    /// Tells the network plane which tasks run here and serve (no check, or healthy), when
    /// that changed.
    fn update_plane(&self, assigned: &HashMap<String, Task>, local: &HashMap<String, RunState>) {
        let Some(plane) = &self.plane else { return };
        let (running, d) = self.serving(assigned, local);
        let draining = draining(&running, local);
        let d = d ^ u64::from(draining);
        let mut last = self.plane_digest.lock().unwrap_or_else(|p| p.into_inner());
        if *last != Some(d) {
            *last = Some(d);
            plane.set_draining(draining);
            plane.set_local(running);
        }
    }

    /// On a restarted manager, until the leader's first answer: tells the plane which tasks
    /// run here and serve, by what the manager's own store assigns here (`Member::start`).
    /// Its gossip then re-announces them at once, rather than after an election (seconds,
    /// or never without quorum) while the other nodes' grace for a restarted node runs out
    /// and they drop its tasks, which kept running, from their VIPs and DNS. Only the plane
    /// is told: nothing is started or stopped on a store that may lag the leader's.
    pub(crate) async fn seed_plane(self: Arc<Self>, from_store: Vec<Task>) {
        let Some(plane) = &self.plane else { return };
        let rt = self.runtime.clone();
        let Ok(list) = tokio::task::spawn_blocking(move || rt.list()).await else {
            return;
        };
        let local: HashMap<String, RunState> = list.into_iter().collect();
        let assigned: HashMap<String, Task> =
            from_store.into_iter().map(|t| (t.id.clone(), t)).collect();
        // Lock order: the plane digest, then the state (`update_plane` holds one at a time).
        let mut last = self.plane_digest.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some() || self.lock().assigned.is_some() {
            return; // the leader answered first
        }
        let (running, d) = self.serving(&assigned, &local);
        info!(
            tasks = running.len(),
            "network plane: this node's tasks as its own store has them, until the leader answers"
        );
        let draining = draining(&running, &local);
        *last = Some(d ^ u64::from(draining));
        plane.set_draining(draining);
        plane.set_local(running);
    }

    /// The assigned tasks that run here and serve (no check, or healthy), sorted, with a
    /// digest of the set.
    fn serving(
        &self,
        assigned: &HashMap<String, Task>,
        local: &HashMap<String, RunState>,
    ) -> (Vec<(Task, u32)>, u64) {
        let mut running: Vec<(Task, u32)> = {
            let st = self.lock();
            assigned
                .values()
                .filter(|t| t.desired_state <= TaskState::Running)
                .filter_map(|t| match local.get(&t.id) {
                    Some(RunState::Running { pid, .. }) if st.serving(t, *pid) => {
                        Some((t.clone(), *pid))
                    }
                    _ => None,
                })
                .collect()
        };
        running.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (t, pid) in &running {
            (&t.id, t.version, pid).hash(&mut h);
        }
        (running, h.finish())
    }

    /// Resolves the check of a task a restarted daemon adopted (its image's part from the
    /// image store), and probes it again.
    async fn resolve_adopted(self: Arc<Self>, t: Task, pid: u32, started_at_ms: u64) {
        let image_check = match (&self.images, t.spec.image.is_empty()) {
            (Some(images), false) => {
                let images = images.clone();
                let reference = t.spec.image.clone();
                let auth = self.lock().registry_auths.get(&t.service_id).cloned();
                match tokio::task::spawn_blocking(move || images.pull(&reference, auth.as_ref()))
                    .await
                {
                    Ok(Ok(i)) => i.healthcheck,
                    Ok(Err(e)) => {
                        warn!(task = t.id, "reading the image's health check: {e}");
                        None
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let probe = health::resolve(t.spec.healthcheck.as_ref(), image_check.as_ref());
        let checked = probe.is_some();
        {
            let mut st = self.lock();
            st.resolving.remove(&t.id);
            if st.health.get(&t.id).is_some_and(|e| e.pid == pid) {
                return;
            }
            let monitor = probe.map(|p| {
                if t.status.state == TaskState::Running {
                    Monitor::adopted_healthy(p, started_at_ms, now_ms())
                } else {
                    Monitor::new(p, started_at_ms)
                }
            });
            st.health.insert(t.id.clone(), HealthEntry { pid, monitor });
        }
        debug!(task = t.id, checked, "adopted task's health check resolved");
        if checked {
            let me = self.clone();
            tokio::spawn(async move { me.probe_loop(t.id, pid).await });
        }
        self.wake.notify_one();
    }

    /// Probes task `id` (process `pid`) every interval while it runs here and is meant to,
    /// and acts on its health changes.
    async fn probe_loop(self: Arc<Self>, id: String, pid: u32) {
        loop {
            let probe = {
                let st = self.lock();
                match st.health.get(&id) {
                    Some(HealthEntry {
                        pid: p,
                        monitor: Some(m),
                    }) if *p == pid => m.probe.clone(),
                    _ => return,
                }
            };
            tokio::time::sleep(Duration::from_millis(probe.interval_ms)).await;
            {
                let st = self.lock();
                let wanted = st
                    .assigned
                    .as_ref()
                    .and_then(|(_, m)| m.get(&id))
                    .is_some_and(|t| t.desired_state <= TaskState::Running);
                let current = st.health.get(&id).is_some_and(|e| e.pid == pid);
                if !wanted || !current || st.busy.contains(&id) {
                    return;
                }
            }
            let at = now_ms();
            let rt = self.runtime.clone();
            let (id2, argv) = (id.clone(), probe.argv.clone());
            let timeout = Duration::from_millis(probe.timeout_ms);
            let passed =
                match tokio::task::spawn_blocking(move || rt.exec(&id2, &argv, timeout)).await {
                    Ok(Ok(r)) if r.status == 0 => true,
                    Ok(Ok(r)) => {
                        debug!(task = id, status = r.status, "health check failed");
                        false
                    }
                    Ok(Err(e)) => {
                        debug!(task = id, "health check failed: {e}");
                        false
                    }
                    Err(_) => false,
                };
            let change = {
                let mut st = self.lock();
                match st.health.get_mut(&id) {
                    Some(HealthEntry {
                        pid: p,
                        monitor: Some(m),
                    }) if *p == pid => m.record(at, passed),
                    _ => return,
                }
            };
            match change {
                Some(Health::Healthy) => {
                    info!(task = id, "healthy");
                    {
                        let mut st = self.lock();
                        self.queue(&mut st, &id, running(now_ms()));
                    }
                    self.refresh_plane();
                    self.wake.notify_one();
                }
                Some(Health::Unhealthy) => {
                    warn!(task = id, "unhealthy: withdrawn and stopped");
                    self.stop_unhealthy(id).await;
                    return;
                }
                Some(Health::Starting) | None => {}
            }
        }
    }

    /// Withdraws an unhealthy task from the plane at once, stops it after [`DRAIN`], and
    /// reports it Failed with Docker's error.
    async fn stop_unhealthy(self: Arc<Self>, id: String) {
        let task = {
            let mut st = self.lock();
            if !st.busy.insert(id.clone()) {
                return; // being stopped already
            }
            st.assigned.as_ref().and_then(|(_, m)| m.get(&id).cloned())
        };
        self.refresh_plane();
        if self.plane.is_some() {
            tokio::time::sleep(DRAIN).await;
        }
        let (signal, grace) = task.as_ref().map_or((SIGTERM, STOP_GRACE), |t| {
            (
                stop_signal(&t.spec),
                t.spec
                    .stop_grace_period_ms
                    .map_or(STOP_GRACE, Duration::from_millis),
            )
        });
        let rt = self.runtime.clone();
        let id2 = id.clone();
        let r = tokio::task::spawn_blocking(move || rt.stop(&id2, signal, grace)).await;
        if let Ok(Err(e)) = &r {
            warn!(task = id, "stop: {e}");
        }
        let status = failed(
            now_ms(),
            health::UNHEALTHY_ERR,
            Some(health::UNHEALTHY_EXIT),
        );
        self.start_ended(&id, status);
    }

    /// Reports `status` for `task`, and ends its start (it is no longer busy).
    fn start_ended(&self, task: &str, status: TaskStatus) {
        let mut st = self.lock();
        st.busy.remove(task);
        self.queue(&mut st, task, status);
        drop(st);
        self.wake.notify_one();
    }

    /// An image task's image: from the store at once when it holds the pinned digest, else
    /// pulled while the task is Preparing (reported only then, as a report costs the leader a
    /// Raft write and delays the task's next one).
    async fn prepare_image(&self, t: &Task) -> Result<ImageRun, ApiError> {
        let images = self
            .images
            .clone()
            .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, "this node cannot run images"))?;
        if let Some(image) = images.local(&t.spec.image) {
            return Ok(image);
        }
        let auth = {
            let mut st = self.lock();
            let s = TaskStatus {
                state: TaskState::Preparing,
                timestamp_ms: now_ms(),
                message: "preparing".into(),
                err: String::new(),
                exit_code: None,
            };
            self.queue(&mut st, &t.id, s);
            st.registry_auths.get(&t.service_id).cloned()
        };
        self.wake.notify_one();
        let reference = t.spec.image.clone();
        match tokio::task::spawn_blocking(move || images.pull(&reference, auth.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(ApiError::internal(format!("image pull panicked: {e}"))),
        }
    }

    async fn start_task(self: Arc<Self>, t: Task, node_name: String) {
        let name = t.name();
        let image = if t.spec.image.is_empty() {
            None
        } else {
            match self.prepare_image(&t).await {
                Ok(i) => Some(i),
                Err(e) => {
                    warn!(task = name, image = t.spec.image, "pull failed: {e}");
                    let status = TaskStatus {
                        state: TaskState::Rejected,
                        timestamp_ms: now_ms(),
                        message: "preparing".into(),
                        err: e.message,
                        exit_code: None,
                    };
                    self.start_ended(&t.id, status);
                    return;
                }
            }
        };
        {
            let mut st = self.lock();
            let s = TaskStatus {
                state: TaskState::Starting,
                timestamp_ms: now_ms(),
                message: "starting".into(),
                err: String::new(),
                exit_code: None,
            };
            self.queue(&mut st, &t.id, s);
        }
        let mut env: Vec<(String, String)> = t
            .spec
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect();
        env.push(("MESH_SERVICE_NAME".into(), t.service_name.clone()));
        env.push(("MESH_TASK_NAME".into(), name.clone()));
        env.push(("MESH_TASK_SLOT".into(), t.slot.to_string()));
        env.push(("MESH_NODE_NAME".into(), node_name));
        let hostname = if t.spec.hostname.is_empty() {
            t.id.chars().take(12).collect()
        } else {
            t.spec.hostname.clone()
        };
        let (argv, env, rootfs) = match &image {
            None => (t.spec.command.clone(), env, None),
            Some(image) => {
                let argv = image_argv(&t.spec.entrypoint, &t.spec.command, image);
                if argv.is_empty() {
                    let status = TaskStatus {
                        state: TaskState::Rejected,
                        timestamp_ms: now_ms(),
                        message: "starting".into(),
                        err: "no command specified".into(),
                        exit_code: None,
                    };
                    self.start_ended(&t.id, status);
                    return;
                }
                let rootfs = RunRootfs {
                    layers: image.layers.clone(),
                    readonly: t.spec.read_only,
                    mounts: t.spec.mounts.clone(),
                    user: if t.spec.user.is_empty() {
                        image.user.clone()
                    } else {
                        t.spec.user.clone()
                    },
                    workdir: if t.spec.workdir.is_empty() {
                        image.working_dir.clone()
                    } else {
                        t.spec.workdir.clone()
                    },
                    init: t.spec.init,
                    hosts: etc_hosts(&t, &hostname),
                    files: match self.task_files(&t) {
                        Ok(f) => f,
                        Err(e) => {
                            let status = TaskStatus {
                                state: TaskState::Rejected,
                                timestamp_ms: now_ms(),
                                message: "starting".into(),
                                err: e,
                                exit_code: None,
                            };
                            self.start_ended(&t.id, status);
                            return;
                        }
                    },
                };
                (argv, image_env(&image.env, &env), Some(rootfs))
            }
        };
        let spec = RunSpec {
            id: t.id.clone(),
            name: name.clone(),
            hostname,
            argv,
            env,
            nano_cpus: t.spec.resources.nano_cpus,
            memory_bytes: t.spec.resources.memory_bytes,
            resolv_conf: "nameserver 127.0.0.11\noptions ndots:0\n".into(),
            rootfs,
        };
        // Held until the runtime has the task: `close` waits for this start to end.
        let open = self.starts.read().await;
        if !*open {
            debug!(task = name, "not started: the agent is closed");
            return;
        }
        let rt = self.runtime.clone();
        let plane = self.plane.clone();
        let task = t.clone();
        let r = tokio::task::spawn_blocking(move || {
            // Tasks with no network and no host-mode port have `lo` only: nothing to plumb.
            let host_ports = task
                .spec
                .ports
                .iter()
                .any(|p| p.mode == mesh_api::PublishMode::Host);
            if task.networks.is_empty() && !host_ports {
                return rt.start(&spec);
            }
            let Some(plane) = plane else {
                return Err(RuntimeError::Failed(
                    "this node has no network data plane".into(),
                ));
            };
            rt.start_with(&spec, &mut |pid| plane.attach(&task, pid))
        })
        .await;
        drop(open);
        let status = match r {
            Ok(Ok(RunState::Running { pid, started_at_ms })) => {
                info!(task = name, "started");
                let probe = health::resolve(
                    t.spec.healthcheck.as_ref(),
                    image.as_ref().and_then(|i| i.healthcheck.as_ref()),
                );
                let checked = probe.is_some();
                self.lock().health.insert(
                    t.id.clone(),
                    HealthEntry {
                        pid,
                        monitor: probe.map(|p| Monitor::new(p, started_at_ms)),
                    },
                );
                if checked {
                    // Starting until its first passing probe.
                    let me = self.clone();
                    let id = t.id.clone();
                    tokio::spawn(async move { me.probe_loop(id, pid).await });
                    let mut st = self.lock();
                    st.busy.remove(&t.id);
                    drop(st);
                    self.wake.notify_one();
                    return;
                }
                running(started_at_ms)
            }
            Ok(Ok(RunState::Exited {
                code,
                signal,
                finished_at_ms,
                ..
            })) => exited(code, signal, finished_at_ms),
            Ok(Err(e)) => {
                warn!(task = name, "start failed: {e}");
                TaskStatus {
                    state: TaskState::Rejected,
                    timestamp_ms: now_ms(),
                    message: "start failed".into(),
                    err: e.to_string(),
                    exit_code: None,
                }
            }
            Err(e) => failed(now_ms(), &format!("start panicked: {e}"), None),
        };
        self.start_ended(&t.id, status);
    }

    /// The task's secret and config files, with the data the leader sent for them.
    fn task_files(&self, t: &Task) -> Result<Vec<RunFile>, String> {
        let st = self.lock();
        let kinds = [
            (mesh_api::BlobKind::Secret, &t.spec.secrets),
            (mesh_api::BlobKind::Config, &t.spec.configs),
        ];
        let mut out = Vec::new();
        for (kind, refs) in kinds {
            for r in refs {
                let data = st
                    .blobs
                    .get(&r.id)
                    .ok_or_else(|| format!("{kind} {} was not sent to this node", r.source))?;
                let id = |what: &str, v: &str| {
                    v.parse::<u32>()
                        .map_err(|_| format!("{kind} {}: invalid {what} {v:?}", r.source))
                };
                out.push(RunFile {
                    target: r.path(kind),
                    uid: id("uid", &r.uid)?,
                    gid: id("gid", &r.gid)?,
                    mode: r.mode,
                    data: data.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Sends queued reports to the leader; keeps them on failure.
    async fn flush(&self, leader: &impl LeaderLink) {
        let updates = self.sendable();
        if updates.is_empty() {
            return;
        }
        let req = PeerRequest::TaskStatus {
            node_id: leader.node_id(),
            updates: updates.clone(),
        };
        match leader.to_leader(req).await {
            PeerResponse::Done => {
                let mut st = self.lock();
                for (id, s) in updates {
                    if st.outbox.get(&id) == Some(&s) {
                        st.outbox.remove(&id);
                        st.queued_at.remove(&id);
                    }
                }
            }
            other => debug!("reporting task status: {other:?}"),
        }
    }

    /// Logs of local tasks, for `service logs`: per task, the lines after `after[task]`
    /// if given, else those after `since_ns` and then the last `tail`; the newest
    /// [`LOG_BYTES`] of text at most.
    pub async fn logs(
        &self,
        task_ids: Vec<String>,
        since_ns: Option<u64>,
        tail: Option<usize>,
        after: BTreeMap<String, u64>,
    ) -> Vec<TaskLog> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || {
            task_ids
                .into_iter()
                .map(|id| {
                    let r = match after.get(&id) {
                        Some(t) => rt.logs(&id, Some(*t), None),
                        None => rt.logs(&id, since_ns, tail),
                    };
                    match r {
                        Ok(mut lines) => {
                            let mut bytes = 0;
                            let keep = lines
                                .iter()
                                .rev()
                                .take_while(|l| {
                                    bytes += l.text.len() + 32;
                                    bytes <= LOG_BYTES
                                })
                                .count();
                            lines.drain(..lines.len() - keep);
                            TaskLog {
                                task_id: id,
                                lines,
                                error: None,
                            }
                        }
                        Err(e) => TaskLog {
                            task_id: id,
                            lines: vec![],
                            error: Some(e.to_string()),
                        },
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }
}

/// The member drives its node's agent through [`NodeAgent`].
impl NodeAgent for Agent {
    fn has_plane(&self) -> bool {
        self.plane.is_some()
    }

    fn start_plane(&self, me: crate::runtime::PlaneIdentity) {
        if let Some(plane) = &self.plane {
            if let Err(e) = plane.start(me) {
                warn!("network plane: {e}");
            }
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(Agent::close(self))
    }

    fn stop_plane(&self) {
        if let Some(plane) = &self.plane {
            plane.stop();
        }
    }

    fn give_gossip(
        &self,
        keys: Vec<crate::runtime::GossipKey>,
        members: Option<Vec<std::net::Ipv4Addr>>,
    ) {
        Agent::give_gossip(self, keys, members)
    }

    fn admit_members(&self, members: Vec<std::net::Ipv4Addr>) -> BoxFuture<'_, ()> {
        Box::pin(Agent::admit_members(self, members))
    }

    fn seed_plane(self: Arc<Self>, from_store: Vec<Task>) -> BoxFuture<'static, ()> {
        Box::pin(Agent::seed_plane(self, from_store))
    }

    fn run(
        self: Arc<Self>,
        leader: MemberLink,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let poll = tokio::spawn(self.clone().poll_loop(leader.clone(), shutdown.clone()));
        let rec = tokio::spawn(self.reconcile_loop(leader, shutdown));
        vec![poll, rec]
    }

    fn logs(
        &self,
        task_ids: Vec<String>,
        since_ns: Option<u64>,
        tail: Option<usize>,
        after: BTreeMap<String, u64>,
    ) -> BoxFuture<'_, Vec<TaskLog>> {
        Box::pin(Agent::logs(self, task_ids, since_ns, tail, after))
    }

    fn assigned_tasks(&self) -> Vec<Task> {
        Agent::assigned_tasks(self)
    }

    fn local_tasks<'a>(&'a self, node_name: &'a str) -> BoxFuture<'a, Vec<mesh_api::LocalTask>> {
        Box::pin(Agent::local_tasks(self, node_name))
    }

    fn images_in_use(&self) -> Vec<String> {
        Agent::images_in_use(self)
    }
}

/// Whether a task process runs here that `running` (what the plane is told) leaves out.
fn draining(running: &[(Task, u32)], local: &HashMap<String, RunState>) -> bool {
    local.iter().any(|(id, rs)| {
        matches!(rs, RunState::Running { .. }) && !running.iter().any(|(t, _)| t.id == *id)
    })
}

fn running(since_ms: u64) -> TaskStatus {
    TaskStatus {
        state: TaskState::Running,
        timestamp_ms: since_ms,
        message: "started".into(),
        err: String::new(),
        exit_code: None,
    }
}

fn failed(now: u64, err: &str, code: Option<i32>) -> TaskStatus {
    TaskStatus {
        state: TaskState::Failed,
        timestamp_ms: now,
        message: "failed".into(),
        err: err.into(),
        exit_code: code,
    }
}

fn exited(code: Option<i32>, signal: Option<i32>, at: u64) -> TaskStatus {
    match (code, signal) {
        (Some(0), _) => TaskStatus {
            state: TaskState::Complete,
            timestamp_ms: at,
            message: "finished".into(),
            err: String::new(),
            exit_code: Some(0),
        },
        (Some(c), _) => failed(at, &format!("task: non-zero exit ({c})"), Some(c)),
        (None, Some(s)) => failed(at, &format!("task: killed by signal {s}"), Some(128 + s)),
        (None, None) => failed(at, "task: exited", None),
    }
}

/// `SIGTERM`'s number on Linux.
const SIGTERM: i32 = 15;

/// The signal that stops a task of `spec` (`--stop-signal`, validated at create).
fn stop_signal(spec: &mesh_api::ServiceSpec) -> i32 {
    mesh_api::signal_number(&spec.stop_signal).unwrap_or(SIGTERM)
}

/// A task's `/etc/hosts`, as Docker writes a container's: localhost, then the task's
/// addresses on its networks under its hostname.
fn etc_hosts(t: &Task, hostname: &str) -> String {
    let mut out = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for a in &t.networks {
        out.push_str(&format!("{}\t{hostname}\n", a.addr.ip));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ExecResult, PlaneError};
    use mesh_manager::dispatcher::{assigned_to, assignments_digest, ended_on};

    /// A runtime that only lists the tasks it is given and records removals.
    #[derive(Default)]
    struct FakeRuntime {
        tasks: Mutex<HashMap<String, RunState>>,
        removed: Mutex<Vec<String>>,
    }

    impl Runtime for FakeRuntime {
        fn start(&self, _: &RunSpec) -> Result<RunState, RuntimeError> {
            Err(RuntimeError::Failed("not in this test".into()))
        }
        fn status(&self, id: &str) -> Option<RunState> {
            self.tasks.lock().unwrap().get(id).cloned()
        }
        fn list(&self) -> Vec<(String, RunState)> {
            let t = self.tasks.lock().unwrap();
            t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        fn stop(&self, _: &str, _: i32, _: Duration) -> Result<(), RuntimeError> {
            Ok(())
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.tasks.lock().unwrap().remove(id);
            self.removed.lock().unwrap().push(id.to_string());
            Ok(())
        }
        fn logs(
            &self,
            _: &str,
            _: Option<u64>,
            _: Option<usize>,
        ) -> Result<Vec<mesh_api::LogLine>, RuntimeError> {
            Ok(vec![])
        }
        fn exec(&self, _: &str, _: &[String], _: Duration) -> Result<ExecResult, RuntimeError> {
            Err(RuntimeError::Failed("not in this test".into()))
        }
    }

    fn exited_at(finished_at_ms: u64) -> RunState {
        RunState::Exited {
            code: Some(0),
            signal: None,
            started_at_ms: finished_at_ms.saturating_sub(1),
            finished_at_ms,
        }
    }

    /// An agent whose runtime holds these exited tasks, with an empty assignment set.
    fn agent_with(local: &[(&str, u64)]) -> (Arc<Agent>, Arc<FakeRuntime>) {
        let rt = Arc::new(FakeRuntime::default());
        for (id, at) in local {
            rt.tasks
                .lock()
                .unwrap()
                .insert(id.to_string(), exited_at(*at));
        }
        let agent = Agent::new(rt.clone(), None, None, "n1".into());
        agent.lock().assigned = Some((0, HashMap::new()));
        (agent, rt)
    }

    fn removed(rt: &FakeRuntime) -> Vec<String> {
        let mut r = rt.removed.lock().unwrap().clone();
        r.sort();
        r
    }

    #[tokio::test]
    async fn ended_tasks_go_as_soon_as_the_store_deleted_them() {
        let now = now_ms();
        let (agent, rt) = agent_with(&[("history", now), ("deleted", now), ("queued", now)]);
        {
            let mut st = agent.lock();
            st.ended = Some(["history".to_string()].into_iter().collect());
            // Its final report is not sent yet.
            st.outbox
                .insert("queued".into(), exited(Some(0), None, now));
        }
        agent.clone().reconcile().await;
        assert_eq!(removed(&rt), ["deleted"]);

        // Once the report is sent, a task the store does not have goes too.
        agent.lock().outbox.clear();
        agent.clone().reconcile().await;
        assert_eq!(removed(&rt), ["deleted", "queued"]);

        // A task trimmed from the history goes at the next answer.
        agent.lock().ended = Some(HashSet::new());
        agent.clone().reconcile().await;
        assert_eq!(removed(&rt), ["deleted", "history", "queued"]);
    }

    #[tokio::test]
    async fn without_word_on_ended_tasks_they_are_kept_a_while() {
        let now = now_ms();
        let old = now - KEEP_EXITED_MS - 1000;
        let (agent, rt) = agent_with(&[("recent", now), ("old", old)]);
        agent.clone().reconcile().await;
        assert_eq!(removed(&rt), ["old"]);

        // No answer from the leader since the start: nothing is touched.
        let (agent, rt) = agent_with(&[("recent", now), ("old", old)]);
        agent.lock().assigned = None;
        agent.clone().reconcile().await;
        assert!(removed(&rt).is_empty());
    }

    fn task(id: &str, node_id: &str, state: TaskState) -> Task {
        let status = TaskStatus {
            state,
            timestamp_ms: 1,
            message: String::new(),
            err: String::new(),
            exit_code: None,
        };
        serde_json::from_value(serde_json::json!({
            "id": id,
            "service_id": "s",
            "service_name": "web",
            "slot": 1,
            "node_id": node_id,
            "version": 1,
            "spec": {
                "name": "web",
                "mode": mesh_api::ServiceMode::Replicated { replicas: 1 },
                "command": ["true"],
            },
            "desired_state": TaskState::Running,
            "status": status,
            "created_at": 1,
        }))
        .unwrap()
    }

    /// A node leaving its swarm closes its agent, then removes every task the runtime has: a
    /// start in flight must have its task there by then, and none may start after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_waits_for_the_starts_in_flight_and_starts_nothing_after() {
        let rt = Arc::new(ProbedRuntime::default());
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (open, open_rx) = std::sync::mpsc::channel();
        *rt.start_gate.lock().unwrap() = Some((entered_tx, open_rx));
        let agent = Agent::new(rt.clone(), None, None, "n1".into());
        let starting = tokio::spawn(
            agent
                .clone()
                .start_task(task("t1", "n1", TaskState::Assigned), "n1".into()),
        );
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the start never reached the runtime");
        let closing = tokio::spawn({
            let agent = agent.clone();
            async move { agent.close().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!closing.is_finished(), "closed while a start was in flight");
        open.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), closing)
            .await
            .expect("close never returned")
            .unwrap();
        assert!(
            rt.status("t1").is_some(),
            "the task in flight is not in the runtime"
        );
        starting.await.unwrap();

        agent
            .clone()
            .start_task(task("t2", "n1", TaskState::Assigned), "n1".into())
            .await;
        assert!(rt.status("t2").is_none(), "a task started after close");
        assert_eq!(rt.specs.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_node_is_told_its_ended_tasks_still_in_the_store() {
        let tasks = [
            task("run", "n1", TaskState::Running),
            task("done", "n1", TaskState::Complete),
            task("failed", "n1", TaskState::Failed),
            task("orphaned", "n1", TaskState::Orphaned),
            task("elsewhere", "n2", TaskState::Shutdown),
            task("pending", "", TaskState::Pending),
        ];
        assert_eq!(ended_on(tasks.iter(), "n1"), ["done", "failed", "orphaned"]);
        let assigned: Vec<String> = assigned_to(tasks.iter(), "n1")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(assigned, ["run"]);
    }

    /// A runtime whose tasks run until stopped and whose `exec` exits with `probe`.
    #[derive(Default)]
    struct ProbedRuntime {
        tasks: Mutex<HashMap<String, RunState>>,
        probe: std::sync::atomic::AtomicI32,
        probes: std::sync::atomic::AtomicU32,
        /// What it was asked to start.
        specs: Mutex<Vec<RunSpec>>,
        /// If set, the next `list` says so on the first channel, then waits for the second.
        list_gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
        /// The same for the next `start`.
        start_gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    }

    impl Runtime for ProbedRuntime {
        fn start(&self, spec: &RunSpec) -> Result<RunState, RuntimeError> {
            self.specs.lock().unwrap().push(spec.clone());
            let gate = self.start_gate.lock().unwrap().take();
            if let Some((entered, open)) = gate {
                let _ = entered.send(());
                let _ = open.recv_timeout(Duration::from_secs(10));
            }
            let rs = RunState::Running {
                pid: 4242,
                started_at_ms: now_ms(),
            };
            self.tasks
                .lock()
                .unwrap()
                .insert(spec.id.clone(), rs.clone());
            Ok(rs)
        }
        fn status(&self, id: &str) -> Option<RunState> {
            self.tasks.lock().unwrap().get(id).cloned()
        }
        fn list(&self) -> Vec<(String, RunState)> {
            let listed: Vec<(String, RunState)> = {
                let t = self.tasks.lock().unwrap();
                t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            };
            let gate = self.list_gate.lock().unwrap().take();
            if let Some((entered, open)) = gate {
                let _ = entered.send(());
                let _ = open.recv_timeout(Duration::from_secs(10));
            }
            listed
        }
        fn stop(&self, id: &str, _: i32, _: Duration) -> Result<(), RuntimeError> {
            self.tasks
                .lock()
                .unwrap()
                .insert(id.to_string(), exited_at(now_ms()));
            Ok(())
        }
        fn remove(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        fn logs(
            &self,
            _: &str,
            _: Option<u64>,
            _: Option<usize>,
        ) -> Result<Vec<mesh_api::LogLine>, RuntimeError> {
            Ok(vec![])
        }
        fn exec(&self, _: &str, argv: &[String], _: Duration) -> Result<ExecResult, RuntimeError> {
            assert_eq!(argv, ["/bin/sh", "-c", "check"]);
            self.probes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(ExecResult {
                status: self.probe.load(std::sync::atomic::Ordering::SeqCst),
                stdout: vec![],
                stderr: vec![],
            })
        }
    }

    /// A plane that keeps the running set it was last given. It announces every task at
    /// once, unless `gated`: then only those a [`FakePlane::pass`] published.
    #[derive(Default)]
    struct FakePlane {
        local: Mutex<Vec<String>>,
        /// The last `set_draining`.
        draining: std::sync::atomic::AtomicBool,
        gated: bool,
        announced: Mutex<HashSet<String>>,
        wake: Mutex<Option<Arc<Notify>>>,
    }

    impl FakePlane {
        /// A pass published the running set last given.
        fn pass(&self) {
            let local = self.local.lock().unwrap().clone();
            self.announced.lock().unwrap().extend(local);
            if let Some(w) = self.wake.lock().unwrap().as_ref() {
                w.notify_one();
            }
        }
    }

    impl NetworkPlane for FakePlane {
        fn start(&self, _: crate::runtime::PlaneIdentity) -> Result<(), PlaneError> {
            Ok(())
        }
        fn stop(&self) {}
        fn attach(&self, _: &Task, _: u32) -> Result<(), PlaneError> {
            Ok(())
        }
        fn set_local(&self, running: Vec<(Task, u32)>) {
            *self.local.lock().unwrap() = running.into_iter().map(|(t, _)| t.id).collect();
        }
        fn set_draining(&self, draining: bool) {
            self.draining
                .store(draining, std::sync::atomic::Ordering::SeqCst);
        }
        fn announced(&self, task_id: &str) -> bool {
            !self.gated || self.announced.lock().unwrap().contains(task_id)
        }
        fn on_announced(&self, wake: Arc<Notify>) {
            *self.wake.lock().unwrap() = Some(wake);
        }
    }

    /// Two reconcile passes 100 ms apart.
    /// Reconciles every 20 ms until `done` holds, at most 5 s: the probes run on their own
    /// clock (every 30 ms here), so a test waits for what they lead to rather than a guess
    /// of how long they take on a loaded machine.
    async fn passes_until(agent: &Arc<Agent>, what: &str, done: impl Fn() -> bool) {
        let t0 = Instant::now();
        loop {
            agent.clone().reconcile().await;
            if done() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{what}: not within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_gates_backends_and_fails_an_unhealthy_task() {
        use std::sync::atomic::Ordering::SeqCst;
        let rt = Arc::new(ProbedRuntime::default());
        rt.probe.store(1, SeqCst);
        let plane = Arc::new(FakePlane::default());
        let agent = Agent::new(rt.clone(), Some(plane.clone()), None, "n1".into());
        let mut t = task("t1", "n1", TaskState::Assigned);
        t.spec.healthcheck = Some(mesh_api::HealthConfig {
            test: vec!["CMD-SHELL".into(), "check".into()],
            interval_ms: 30,
            retries: 2,
            start_period_ms: 60_000,
            ..Default::default()
        });
        agent.lock().assigned = Some((1, [(t.id.clone(), t.clone())].into_iter().collect()));
        let state = |a: &Agent| a.lock().reported.get("t1").copied();

        // Started, failing its probes in its start period: Starting, no backend.
        passes_until(&agent, "two probes", || rt.probes.load(SeqCst) >= 2).await;
        assert_eq!(state(&agent), Some(TaskState::Starting));
        assert!(plane.local.lock().unwrap().is_empty());

        // A passing probe: Running since then, and a backend.
        let passing_from = now_ms();
        rt.probe.store(0, SeqCst);
        passes_until(&agent, "Running and a backend", || {
            state(&agent) == Some(TaskState::Running) && *plane.local.lock().unwrap() == ["t1"]
        })
        .await;
        let running = agent.lock().outbox["t1"].clone();
        assert!(running.timestamp_ms >= passing_from);

        // Two failures in a row: withdrawn at once (before the drain), then Failed.
        rt.probe.store(1, SeqCst);
        passes_until(&agent, "withdrawn", || {
            plane.local.lock().unwrap().is_empty()
        })
        .await;
        assert!(matches!(rt.status("t1"), Some(RunState::Running { .. })));
        passes_until(&agent, "Failed after the drain", || {
            agent.lock().outbox["t1"].state == TaskState::Failed
        })
        .await;
        let failed = agent.lock().outbox["t1"].clone();
        assert_eq!(failed.state, TaskState::Failed);
        assert_eq!(failed.err, health::UNHEALTHY_ERR);
        assert_eq!(failed.exit_code, Some(137));
        assert!(matches!(rt.status("t1"), Some(RunState::Exited { .. })));
        // No more probes of a stopped task.
        let probes = rt.probes.load(SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rt.probes.load(SeqCst), probes);
    }

    /// The leader stops what a task replaces (the old task of a start-first update, a drained
    /// node's replica) once it is reported Running: a report sent before the node's plane
    /// announced the new endpoint let the old one's withdrawal reach every node first, and
    /// left the service with no address for a moment (the churn soak: `api` unresolvable on
    /// every node for 50 ms after a drain). Held until the plane's pass announced it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_on_a_network_is_reported_running_only_once_its_endpoints_are_announced() {
        let rt = Arc::new(ProbedRuntime::default());
        let plane = Arc::new(FakePlane {
            gated: true,
            ..Default::default()
        });
        let agent = Agent::new(rt.clone(), Some(plane.clone()), None, "n1".into());
        let mut t = task("t1", "n1", TaskState::Assigned);
        t.networks = vec![mesh_api::NetworkAttachment {
            network_id: "net".into(),
            network_name: "appnet".into(),
            addr: "10.0.1.5/24".parse().unwrap(),
            vni: 4097,
            gateway: "10.0.1.1".parse().unwrap(),
            vip: Some("10.0.1.2/24".parse().unwrap()),
            encrypted: false,
        }];
        // And one without a network: nothing to announce, reported at once.
        let mut u = task("u1", "n1", TaskState::Assigned);
        u.slot = 2;
        agent.lock().assigned = Some((
            1,
            [(t.id.clone(), t), (u.id.clone(), u)].into_iter().collect(),
        ));
        let t0 = std::time::Instant::now();
        while outbox_state(&agent) != Some(TaskState::Running)
            || *plane.local.lock().unwrap() != ["t1", "u1"]
        {
            assert!(t0.elapsed() < Duration::from_secs(5), "never Running");
            agent.clone().reconcile().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ids =
            |a: &Agent| -> Vec<String> { a.sendable().into_iter().map(|(id, _)| id).collect() };
        assert_eq!(ids(&agent), ["u1"], "t1 reported before it was announced");
        // The pass announces it, and wakes the agent.
        let woken = agent.wake.clone();
        let notified = tokio::spawn(async move { woken.notified().await });
        plane.pass();
        tokio::time::timeout(Duration::from_secs(5), notified)
            .await
            .expect("the plane's pass woke the agent")
            .unwrap();
        assert_eq!(ids(&agent), ["t1", "u1"]);
    }

    /// A leader that takes reports only when `up`, recording every report sent; `during`
    /// runs inside the next report's call (a state queued while it is on the way).
    #[derive(Default)]
    struct FakeLeader {
        up: std::sync::atomic::AtomicBool,
        reports: Mutex<Vec<Vec<(String, TaskStatus)>>>,
        during: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl LeaderLink for FakeLeader {
        fn node_id(&self) -> String {
            "n1".into()
        }
        fn to_leader(
            &self,
            req: PeerRequest,
        ) -> impl std::future::Future<Output = PeerResponse> + Send {
            let answer = match req {
                PeerRequest::TaskStatus { updates, .. } => {
                    self.reports.lock().unwrap().push(updates);
                    if let Some(f) = self.during.lock().unwrap().take() {
                        f();
                    }
                    if self.up.load(std::sync::atomic::Ordering::SeqCst) {
                        PeerResponse::Done
                    } else {
                        PeerResponse::Error(ApiError::no_leader())
                    }
                }
                other => panic!("not in this test: {other:?}"),
            };
            std::future::ready(answer)
        }
        fn to_leader_polling(
            &self,
            _: PeerRequest,
            _: &mut Option<mesh_rpc::Client>,
        ) -> impl std::future::Future<Output = PeerResponse> + Send {
            std::future::ready(PeerResponse::Error(ApiError::no_leader()))
        }
    }

    /// Reports the leader did not take (no leader: an election, a partition) stay queued and
    /// go again with the next flush; a state queued while a report was on its way is kept
    /// and sent next (not dropped with the older one the leader took); nothing is sent
    /// twice once taken.
    #[tokio::test]
    async fn reports_the_leader_did_not_take_are_sent_again() {
        let (agent, _rt) = agent_with(&[]);
        let leader = FakeLeader::default();
        let queue = |a: &Agent, s: TaskStatus| {
            let mut st = a.lock();
            a.queue(&mut st, "t1", s);
        };
        let sent = |l: &FakeLeader| -> Vec<Vec<TaskState>> {
            let reports = l.reports.lock().unwrap();
            reports
                .iter()
                .map(|r| r.iter().map(|(_, s)| s.state).collect())
                .collect()
        };
        queue(&agent, running(5));
        agent.flush(&leader).await;
        agent.flush(&leader).await;
        assert_eq!(sent(&leader), [[TaskState::Running], [TaskState::Running]]);
        assert_eq!(outbox_state(&agent), Some(TaskState::Running));

        // The leader is back, and the task fails while its Running report is on the way.
        leader.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let a = agent.clone();
        *leader.during.lock().unwrap() =
            Some(Box::new(move || queue(&a, failed(9, "exited", Some(1)))));
        agent.flush(&leader).await;
        assert_eq!(outbox_state(&agent), Some(TaskState::Failed));
        agent.flush(&leader).await;
        assert_eq!(outbox_state(&agent), None);
        agent.flush(&leader).await;
        assert_eq!(
            sent(&leader),
            [
                [TaskState::Running],
                [TaskState::Running],
                [TaskState::Running],
                [TaskState::Failed]
            ]
        );
    }

    fn on_appnet(mut t: Task) -> Task {
        t.networks = vec![mesh_api::NetworkAttachment {
            network_id: "net".into(),
            network_name: "appnet".into(),
            addr: "10.0.1.5/24".parse().unwrap(),
            vni: 4097,
            gateway: "10.0.1.1".parse().unwrap(),
            vip: Some("10.0.1.2/24".parse().unwrap()),
            encrypted: false,
        }];
        t
    }

    /// A task the leader stops (a scale-down, a drained node's replica) leaves the plane's
    /// running set at once, with the plane told a withdrawn task still runs (so its
    /// networks stay while the other nodes stop sending it calls); it is stopped only after
    /// [`DRAIN`], then reported Shutdown and the plane told nothing drains any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_task_is_withdrawn_first_and_stopped_after_the_drain() {
        use std::sync::atomic::Ordering::SeqCst;
        let rt = Arc::new(ProbedRuntime::default());
        let plane = Arc::new(FakePlane::default());
        let agent = Agent::new(rt.clone(), Some(plane.clone()), None, "n1".into());
        let t = on_appnet(task("t1", "n1", TaskState::Assigned));
        agent.lock().assigned = Some((1, [(t.id.clone(), t.clone())].into_iter().collect()));
        let t0 = std::time::Instant::now();
        while *plane.local.lock().unwrap() != ["t1"] {
            assert!(t0.elapsed() < Duration::from_secs(5), "never serving");
            agent.clone().reconcile().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!plane.draining.load(SeqCst));

        let mut stop = t;
        stop.desired_state = TaskState::Shutdown;
        agent.lock().assigned = Some((2, [(stop.id.clone(), stop)].into_iter().collect()));
        let asked = std::time::Instant::now();
        agent.clone().reconcile().await;
        assert!(plane.local.lock().unwrap().is_empty(), "still a backend");
        assert!(
            plane.draining.load(SeqCst),
            "the plane was not told it drains"
        );
        tokio::time::sleep(DRAIN / 2).await;
        assert!(
            matches!(rt.status("t1"), Some(RunState::Running { .. })),
            "stopped before the drain"
        );
        while outbox_state(&agent) != Some(TaskState::Shutdown) {
            assert!(asked.elapsed() < DRAIN * 5, "never reported stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(asked.elapsed() >= DRAIN);
        assert!(matches!(rt.status("t1"), Some(RunState::Exited { .. })));
        agent.clone().reconcile().await;
        assert!(!plane.draining.load(SeqCst), "still draining once stopped");
    }

    #[tokio::test]
    async fn a_restarted_manager_publishes_what_its_store_runs_here_until_the_leader_answers() {
        let rt = Arc::new(FakeRuntime::default());
        let running = RunState::Running {
            pid: 7,
            started_at_ms: 1,
        };
        for id in ["serving", "not-in-store"] {
            rt.tasks.lock().unwrap().insert(id.into(), running.clone());
        }
        let plane = Arc::new(FakePlane::default());
        let agent = Agent::new(rt.clone(), Some(plane.clone()), None, "n1".into());
        // The store: one task running here, one not reported running yet (its check may
        // not have passed), one gone from the runtime.
        let from_store = vec![
            task("serving", "n1", TaskState::Running),
            task("gone", "n1", TaskState::Running),
        ];
        let starting = task("starting", "n1", TaskState::Starting);
        rt.tasks
            .lock()
            .unwrap()
            .insert("starting".into(), running.clone());
        agent
            .clone()
            .seed_plane([from_store, vec![starting]].concat())
            .await;
        assert_eq!(*plane.local.lock().unwrap(), ["serving"]);
        // Nothing started or stopped on the store's word.
        assert!(rt.removed.lock().unwrap().is_empty());
        assert!(agent.lock().assigned.is_none());

        // Once the leader answered, the store's word is not taken again.
        *plane.local.lock().unwrap() = vec![];
        agent.lock().assigned = Some((1, HashMap::new()));
        agent
            .clone()
            .seed_plane(vec![task("serving", "n1", TaskState::Running)])
            .await;
        assert!(plane.local.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_adopted_running_task_stays_a_backend_and_is_probed_again() {
        use std::sync::atomic::Ordering::SeqCst;
        let rt = Arc::new(ProbedRuntime::default());
        rt.start(&RunSpec {
            id: "t1".into(),
            name: String::new(),
            hostname: String::new(),
            argv: vec![],
            env: vec![],
            nano_cpus: 0,
            memory_bytes: 0,
            resolv_conf: String::new(),
            rootfs: None,
        })
        .unwrap();
        let plane = Arc::new(FakePlane::default());
        let agent = Agent::new(rt.clone(), Some(plane.clone()), None, "n1".into());
        let mut t = task("t1", "n1", TaskState::Running);
        t.spec.healthcheck = Some(mesh_api::HealthConfig {
            test: vec!["CMD-SHELL".into(), "check".into()],
            interval_ms: 30,
            retries: 1,
            ..Default::default()
        });
        agent.lock().assigned = Some((1, [(t.id.clone(), t)].into_iter().collect()));
        agent.clone().reconcile().await;
        assert_eq!(*plane.local.lock().unwrap(), ["t1"]);
        passes_until(&agent, "a probe", || rt.probes.load(SeqCst) >= 1).await;
        assert_eq!(*plane.local.lock().unwrap(), ["t1"]);
        rt.probe.store(1, SeqCst);
        passes_until(&agent, "withdrawn", || {
            plane.local.lock().unwrap().is_empty()
        })
        .await;
    }

    #[test]
    fn the_digest_changes_with_the_ended_tasks() {
        let a = assignments_digest(&[], &["t1".to_string()], None);
        let b = assignments_digest(&[], &["t1".to_string(), "t2".to_string()], None);
        let c = assignments_digest(&[], &[], None);
        assert!(a != b && a != c && b != c);
    }

    /// An image store whose image is either here already or pulled when a gate opens, with
    /// the answer it is given.
    struct FakeImages {
        local: Option<ImageRun>,
        pulled: Result<ImageRun, ApiError>,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        pulls: std::sync::atomic::AtomicU32,
    }

    impl Images for FakeImages {
        fn normalise(&self, reference: &str) -> Result<String, ApiError> {
            Ok(reference.to_string())
        }
        fn pin(
            &self,
            _: &str,
            _: Option<&mesh_api::RegistryCredentials>,
        ) -> Result<String, ApiError> {
            Err(ApiError::internal("not in this test"))
        }
        fn local(&self, _: &str) -> Option<ImageRun> {
            self.local.clone()
        }
        fn pull(
            &self,
            _: &str,
            _: Option<&mesh_api::RegistryCredentials>,
        ) -> Result<ImageRun, ApiError> {
            self.pulls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(gate) = self.gate.lock().unwrap().take() {
                let _ = gate.recv_timeout(Duration::from_secs(10));
            }
            self.pulled.clone()
        }
        fn login(&self, _: &str, _: &mesh_api::RegistryCredentials) -> Result<String, ApiError> {
            Err(ApiError::internal("not in this test"))
        }
        fn logout(&self, _: &str) -> Result<bool, ApiError> {
            Ok(false)
        }
        fn node_login(&self, _: &str) -> Option<mesh_api::RegistryCredentials> {
            None
        }
        fn ls(&self) -> Result<Vec<mesh_api::ImageSummary>, ApiError> {
            Ok(vec![])
        }
        fn rm(&self, _: &str) -> Result<serde_json::Value, ApiError> {
            Err(ApiError::internal("not in this test"))
        }
        fn prune(&self, _: &[String]) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::Value::Null)
        }
        fn load(&self, _: &str) -> Result<Vec<String>, ApiError> {
            Ok(vec![])
        }
    }

    fn app_image() -> ImageRun {
        ImageRun {
            reference: "reg:5000/app:1@sha256:aa".into(),
            layers: vec!["/l/base".into(), "/l/top".into()],
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            working_dir: "/srv".into(),
            user: "app".into(),
            healthcheck: None,
        }
    }

    /// An image task of `images` assigned to an agent with a runtime that records its starts.
    fn image_agent(images: FakeImages) -> (Arc<Agent>, Arc<ProbedRuntime>, Arc<FakeImages>) {
        let rt = Arc::new(ProbedRuntime::default());
        let images = Arc::new(images);
        let agent = Agent::new(rt.clone(), None, Some(images.clone()), "n1".into());
        let mut t = task("t1", "n1", TaskState::Assigned);
        t.spec.image = "reg:5000/app:1@sha256:aa".into();
        t.spec.command = vec![];
        t.spec.env = vec!["MODE=service".into()];
        agent.lock().assigned = Some((1, [(t.id.clone(), t)].into_iter().collect()));
        (agent, rt, images)
    }

    fn outbox_state(a: &Agent) -> Option<TaskState> {
        a.lock().outbox.get("t1").map(|s| s.state)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_image_task_is_preparing_while_pulled_then_runs_the_images_command() {
        let (open, gate) = std::sync::mpsc::channel();
        let (agent, rt, images) = image_agent(FakeImages {
            local: None,
            pulled: Ok(app_image()),
            gate: Mutex::new(Some(gate)),
            pulls: Default::default(),
        });
        agent.clone().reconcile().await;
        let t0 = std::time::Instant::now();
        while outbox_state(&agent) != Some(TaskState::Preparing) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never Preparing");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            rt.specs.lock().unwrap().is_empty(),
            "started before its pull"
        );

        // A pass lists the runtime now (the task is not there yet) and is held there while
        // the start ends: it must not start the task again from that list.
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel();
        *rt.list_gate.lock().unwrap() = Some((entered_tx, held));
        let pass = tokio::spawn(agent.clone().reconcile());
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap()
            .expect("the pass listed the runtime");
        open.send(()).unwrap();
        let t0 = std::time::Instant::now();
        while outbox_state(&agent) != Some(TaskState::Running) || !agent.lock().busy.is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5), "never Running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release.send(()).unwrap();
        pass.await.unwrap();
        agent.clone().reconcile().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Once: a pass that listed the runtime while the start was ending does not start it
        // again (it did: the list lacked the task, and the busy mark was gone).
        assert_eq!(images.pulls.load(std::sync::atomic::Ordering::SeqCst), 1);
        let specs = rt.specs.lock().unwrap().clone();
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        // Docker's rules: the image's entrypoint and cmd (the service gave neither), its env
        // under the service's, its user and workdir, its layers as the root.
        assert_eq!(spec.argv, ["/bin/app", "--serve"]);
        let env: HashMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!((env["PATH"], env["MODE"]), ("/bin", "service"));
        let rootfs = spec.rootfs.as_ref().expect("an image task has a root");
        assert_eq!(rootfs.layers, app_image().layers);
        assert_eq!(
            (rootfs.user.as_str(), rootfs.workdir.as_str()),
            ("app", "/srv")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_pull_rejects_the_task_with_the_registrys_reason() {
        let (agent, rt, _) = image_agent(FakeImages {
            local: None,
            pulled: Err(ApiError::not_found("No such image: reg:5000/app:1")),
            gate: Mutex::new(None),
            pulls: Default::default(),
        });
        let t0 = std::time::Instant::now();
        while outbox_state(&agent) != Some(TaskState::Rejected) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never Rejected");
            agent.clone().reconcile().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = agent.lock().outbox["t1"].clone();
        assert_eq!(s.err, "No such image: reg:5000/app:1");
        assert!(rt.specs.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_image_in_the_store_starts_without_a_pull() {
        let (agent, rt, images) = image_agent(FakeImages {
            local: Some(app_image()),
            pulled: Err(ApiError::new(ErrorKind::Unavailable, "no registry here")),
            gate: Mutex::new(None),
            pulls: Default::default(),
        });
        let t0 = std::time::Instant::now();
        while outbox_state(&agent) != Some(TaskState::Running) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never Running");
            agent.clone().reconcile().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(images.pulls.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(rt.specs.lock().unwrap()[0].argv, ["/bin/app", "--serve"]);
    }
}
