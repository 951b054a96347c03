//! The dispatcher, the leader's side of the nodes' agents: its heartbeat table (when the
//! leader last heard from each node; it lives in the leader's memory only, heartbeats are not
//! Raft writes, and what is replicated is the Ready/Down transition the monitor derives from
//! it), and what a node's assignments answer holds ([`assigned_to`], [`ended_on`], their
//! [`assignments_digest`], held up to [`POLL_HOLD`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_api::{Task, TaskState};

/// How often nodes send a heartbeat, until the cluster's `--dispatcher-heartbeat` says.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(500);
/// A node not heard from for this many heartbeat periods is marked Down.
pub const DOWN_AFTER_PERIODS: u32 = 4;
/// A node not heard from for this long is marked Down (with the default period).
pub const DOWN_AFTER: Duration = Duration::from_millis(2000);

/// How long the leader holds an assignments poll without changes.
pub const POLL_HOLD: Duration = Duration::from_secs(5);

/// The digest of a node's assignments answer: what a node must know to act. Any change of
/// the assigned tasks, of the ended tasks the store still has, or of the ingress address
/// changes it, and so wakes the node's poll.
pub fn assignments_digest(
    tasks: &[Task],
    ended: &[String],
    ingress: Option<&mesh_api::NetworkAttachment>,
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in tasks {
        (&t.id, t.desired_state, t.status.state, t.version).hash(&mut h);
    }
    ended.hash(&mut h);
    ingress.map(|a| (&a.network_id, &a.addr)).hash(&mut h);
    h.finish()
}

/// The tasks the leader assigns to `node_id`: placed there and not finished.
pub fn assigned_to<'a>(tasks: impl Iterator<Item = &'a Task>, node_id: &str) -> Vec<Task> {
    let mut out: Vec<Task> = tasks
        .filter(|t| {
            t.node_id == node_id
                && t.status.state >= TaskState::Assigned
                && !t.status.state.is_terminal()
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The IDs of the ended tasks placed on `node_id` that the store still has (its services' task
/// history), sorted: their node keeps their state directories; it removes the others.
pub fn ended_on<'a>(tasks: impl Iterator<Item = &'a Task>, node_id: &str) -> Vec<String> {
    let mut out: Vec<String> = tasks
        .filter(|t| t.node_id == node_id && t.status.state.is_terminal())
        .map(|t| t.id.clone())
        .collect();
    out.sort();
    out
}

/// Last heartbeat per node ID, and when this manager last became leader.
#[derive(Default)]
pub struct Dispatcher {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<String, Instant>,
    /// What each node's last heartbeat said of its certificate and trusted root.
    tls: HashMap<String, crate::peer::NodeTlsState>,
    leader_since: Option<Instant>,
    /// The heartbeat period the cluster asks for (`None`: [`HEARTBEAT_PERIOD`]).
    period: Option<Duration>,
}

impl Inner {
    fn down_after(&self) -> Duration {
        self.period.map_or(DOWN_AFTER, |p| p * DOWN_AFTER_PERIODS)
    }
}

/// What the monitor should write for a node.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    StillReady,
    NowDown,
    NowReady,
    StillDown,
}

impl Dispatcher {
    /// Sets the heartbeat period nodes are told to keep (the cluster's setting).
    pub fn set_period(&self, period: Duration) {
        self.lock().period = Some(period);
    }

    /// How long silence lasts before a node is Down: [`DOWN_AFTER_PERIODS`] periods.
    pub fn down_after(&self) -> Duration {
        self.lock().down_after()
    }

    pub fn beat(&self, node_id: &str) {
        self.lock().seen.insert(node_id.to_string(), Instant::now());
    }

    /// Keeps what a node's heartbeat said of its TLS state.
    pub fn note_tls(&self, node_id: &str, tls: crate::peer::NodeTlsState) {
        self.lock().tls.insert(node_id.to_string(), tls);
    }

    /// What the node's last heartbeat to this leader said of its TLS state.
    pub fn tls_of(&self, node_id: &str) -> Option<crate::peer::NodeTlsState> {
        self.lock().tls.get(node_id).cloned()
    }

    /// Called while this manager leads; returns when leadership started. A new leader gives
    /// every node a full grace period before calling it Down.
    pub fn leading(&self) -> Instant {
        *self.lock().leader_since.get_or_insert_with(Instant::now)
    }

    pub fn not_leading(&self) {
        let mut g = self.lock();
        g.leader_since = None;
        g.seen.clear();
        g.tls.clear();
    }

    /// Whether the node was heard from within [`Self::down_after`].
    pub fn fresh(&self, node_id: &str) -> bool {
        let g = self.lock();
        g.seen
            .get(node_id)
            .is_some_and(|t| t.elapsed() < g.down_after())
    }

    /// Like [`Self::fresh`], but a node not heard from yet counts as fresh during the grace
    /// period that follows an election.
    pub fn fresh_or_grace(&self, node_id: &str) -> bool {
        self.fresh(node_id) || {
            let g = self.lock();
            g.leader_since.is_some_and(|t| t.elapsed() < g.down_after())
        }
    }

    /// Decides a node's status from its last heartbeat, given its replicated readiness.
    pub fn verdict(&self, node_id: &str, ready: bool, now: Instant) -> Verdict {
        let g = self.lock();
        let seen = g.seen.get(node_id).copied();
        let since = g.leader_since.unwrap_or(now);
        let last = seen.unwrap_or(since);
        let fresh = now.saturating_duration_since(last) < g.down_after();
        match (ready, fresh, seen.is_some()) {
            (true, true, _) => Verdict::StillReady,
            (true, false, _) => Verdict::NowDown,
            (false, true, true) => Verdict::NowReady,
            (false, _, _) => Verdict::StillDown,
        }
    }

    pub fn forget(&self, node_id: &str) {
        let mut g = self.lock();
        g.seen.remove(node_id);
        g.tls.remove(node_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_then_down_then_ready() {
        let d = Dispatcher::default();
        let start = d.leading();
        // Within the grace period a node never heard from stays Ready.
        assert_eq!(d.verdict("a", true, start), Verdict::StillReady);
        // After it, it goes Down.
        assert_eq!(d.verdict("a", true, start + DOWN_AFTER), Verdict::NowDown);
        // A Down node is not made Ready by the grace period alone.
        assert_eq!(d.verdict("a", false, start), Verdict::StillDown);
        d.beat("a");
        assert_eq!(d.verdict("a", false, Instant::now()), Verdict::NowReady);
        assert!(d.fresh("a"));
        d.not_leading();
        assert!(!d.fresh("a"));
    }
}
