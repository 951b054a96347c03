//! The cluster's recent changes, as Docker's events (`mesh events`, `GET /events`). Every
//! manager derives them from its store as it applies the Raft log: before a committed command
//! is applied, the services, nodes, networks, secrets and configs it touches are looked at
//! ([`Pending::before`]), and after it each is compared with what it became
//! ([`History::record`], `mesh_api::events::change`). The newest [`KEPT`] are kept in memory,
//! as Docker keeps its last events; `--since` reads them. A reader asking for events this
//! manager has dropped (more than [`KEPT`] made since its last read) is told which
//! ([`EventBatch::missed`]).
//!
//! An event's seq comes from the log index, so it is the same on every manager and a reader
//! goes on after a leader change where it was. Its time is when this manager applied the
//! entry. Entries re-applied at start (already applied before the restart) give no events,
//! and a manager that catches up by installing a snapshot gives one event per object that
//! differs, all with the snapshot's index.

use std::collections::VecDeque;
use std::sync::Mutex;

pub use mesh_api::events::KEPT;
use mesh_api::events::{change, Event, EventBatch, Missed, Seen, PER_ENTRY};

use crate::state::{Command, StoreState};

/// A kind of object events are about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    Node,
    Network,
    Blob,
}

/// The objects `cmd` may change, in the order it names them.
fn touched(cmd: &Command, out: &mut Vec<(Kind, String)>) {
    let mut add = |k: Kind, id: &str| {
        if !out.iter().any(|(k2, id2)| *k2 == k && id2 == id) {
            out.push((k, id.to_string()));
        }
    };
    match cmd {
        Command::InitCluster { node, .. } | Command::AddNode { node } => add(Kind::Node, &node.id),
        Command::SetNodeState { id, .. }
        | Command::UpdateNode { id, .. }
        | Command::SetNodeRole { id, .. }
        | Command::RemoveNode { id }
        | Command::SetNodeIngress { id, .. } => add(Kind::Node, id),
        Command::CreateService { service } | Command::UpdateService { service } => {
            add(Kind::Service, &service.id)
        }
        Command::RemoveService { id } => add(Kind::Service, id),
        Command::SetUpdateStatus { service_id, .. } => add(Kind::Service, service_id),
        Command::CreateNetwork { network } => add(Kind::Network, &network.id),
        Command::RemoveNetwork { id } => add(Kind::Network, id),
        Command::CreateBlob { blob } => add(Kind::Blob, &blob.id),
        Command::SetBlobLabels { id, .. } | Command::RemoveBlob { id } => add(Kind::Blob, id),
        Command::Batch { commands } => {
            for c in commands {
                touched(c, out);
            }
        }
        Command::RotateSecret { .. }
        | Command::UpdateCluster { .. }
        | Command::StartCaRotation { .. }
        | Command::FinishCaRotation { .. }
        | Command::CreateTasks { .. }
        | Command::AssignTasks { .. }
        | Command::SetDesiredState { .. }
        | Command::UpdateTaskStatus { .. }
        | Command::DeleteTasks { .. }
        | Command::AddGossipKey { .. } => {}
    }
}

fn seen(state: &StoreState, kind: Kind, id: &str) -> Option<Seen> {
    match kind {
        Kind::Service => state.services.get(id).map(Seen::service),
        Kind::Node => state.nodes.get(id).map(Seen::node),
        Kind::Network => state.networks.get(id).map(Seen::network),
        Kind::Blob => state.blobs.get(id).map(Seen::blob),
    }
}

/// Every object of `state`, by kind and ID.
fn all(state: &StoreState) -> Vec<(Kind, String)> {
    let ids = |k: Kind, it: &mut dyn Iterator<Item = &String>| -> Vec<(Kind, String)> {
        it.map(|id| (k, id.clone())).collect()
    };
    [
        ids(Kind::Network, &mut state.networks.keys()),
        ids(Kind::Node, &mut state.nodes.keys()),
        ids(Kind::Service, &mut state.services.keys()),
        ids(Kind::Blob, &mut state.blobs.keys()),
    ]
    .concat()
}

/// The objects a command touches, as they were before it was applied.
pub struct Pending(Vec<(Kind, String, Option<Seen>)>);

impl Pending {
    pub fn before(state: &StoreState, cmd: &Command) -> Pending {
        let mut objs = Vec::new();
        touched(cmd, &mut objs);
        Pending(
            objs.into_iter()
                .map(|(k, id)| {
                    let s = seen(state, k, &id);
                    (k, id, s)
                })
                .collect(),
        )
    }
}

/// The kept events, oldest first, and the seq of the newest.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    ring: VecDeque<Event>,
    cursor: u64,
    /// The seq and time of the newest event dropped from the ring (`None`: none yet).
    dropped: Option<(u64, u64)>,
}

impl History {
    /// Records what the command at log `index` changed: `pending` compared with `state`, now
    /// that it is applied.
    pub fn record(&self, pending: Pending, state: &StoreState, index: u64, time_ns: u64) {
        let events = pending.0.iter().filter_map(|(k, id, before)| {
            change(
                id,
                before.as_ref(),
                seen(state, *k, id).as_ref(),
                0,
                time_ns,
            )
        });
        self.push(events, index);
    }

    /// Records what differs between `old` and `new`, a snapshot installed at log `index`.
    pub fn record_replaced(&self, old: &StoreState, new: &StoreState, index: u64, time_ns: u64) {
        let mut objs = all(old);
        for o in all(new) {
            if !objs.contains(&o) {
                objs.push(o);
            }
        }
        let events = objs.iter().filter_map(|(k, id)| {
            change(
                id,
                seen(old, *k, id).as_ref(),
                seen(new, *k, id).as_ref(),
                0,
                time_ns,
            )
        });
        self.push(events, index);
    }

    fn push(&self, events: impl Iterator<Item = Event>, index: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (rank, mut ev) in events.enumerate().take(PER_ENTRY as usize) {
            ev.seq = index * PER_ENTRY + rank as u64;
            if ev.seq <= inner.cursor {
                // Never twice under one seq (an entry applied again).
                continue;
            }
            inner.cursor = ev.seq;
            inner.ring.push_back(ev);
            if inner.ring.len() > KEPT {
                inner.dropped = inner.ring.pop_front().map(|e| (e.seq, e.time_ns));
            }
        }
    }

    /// The kept events after seq `after`; without it, those made at or after `since_ns`;
    /// with neither, none (only the cursor). Those asked for but dropped already are named
    /// in `missed`: the events after `after` up to the newest dropped one, or since
    /// `since_ns` if the newest dropped one was made then or later.
    pub fn read(&self, after: Option<u64>, since_ns: Option<u64>) -> EventBatch {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let missed = inner.dropped.and_then(|(seq, time_ns)| {
            let lost = match (after, since_ns) {
                (Some(a), _) => seq > a,
                (None, Some(t)) => time_ns >= t,
                (None, None) => false,
            };
            lost.then_some(Missed {
                after,
                through: seq,
            })
        });
        let events = match (after, since_ns) {
            (Some(a), _) => inner.ring.iter().filter(|e| e.seq > a).cloned().collect(),
            (None, Some(t)) => inner
                .ring
                .iter()
                .filter(|e| e.time_ns >= t)
                .cloned()
                .collect(),
            (None, None) => Vec::new(),
        };
        EventBatch {
            events,
            cursor: inner.cursor,
            missed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::{Availability, Node, NodeRole, NodeState};

    fn node(id: &str, name: &str) -> Node {
        Node::new(id, name, NodeRole::Worker, "10.0.0.2:2377")
    }

    /// A store with its cluster record (nodes may join it).
    fn store() -> StoreState {
        StoreState {
            cluster: Some(crate::state::test_cluster()),
            ..Default::default()
        }
    }

    /// Applies `cmd` at `index` as the state machine does, recording its events.
    fn apply(h: &History, s: &mut StoreState, cmd: Command, index: u64) {
        let p = Pending::before(s, &cmd);
        assert_eq!(s.apply(&cmd), crate::state::CommandResult::Ok, "{cmd:?}");
        h.record(p, s, index, index * 10);
    }

    fn lines(b: &EventBatch) -> Vec<String> {
        b.events
            .iter()
            .map(|e| {
                let mut l = format!("{} {} {}", e.kind, e.action, e.attributes["name"]);
                for (k, v) in &e.attributes {
                    if k != "name" {
                        l.push_str(&format!(" {k}={v}"));
                    }
                }
                l
            })
            .collect()
    }

    #[test]
    fn a_node_down_and_up_again_shows_twice_and_readers_go_on_from_a_seq() {
        let h = History::default();
        let mut s = store();
        apply(
            &h,
            &mut s,
            Command::AddNode {
                node: node("n1", "h1"),
            },
            3,
        );
        let down = |state, at| Command::SetNodeState {
            id: "n1".into(),
            state,
            at,
        };
        // Down, then up again: two entries, two events, however close in time.
        apply(&h, &mut s, down(NodeState::Down, 1), 4);
        apply(&h, &mut s, down(NodeState::Ready, 2), 5);
        // The same state again: no event.
        apply(&h, &mut s, down(NodeState::Ready, 3), 6);
        let all = h.read(None, Some(0));
        assert_eq!(
            lines(&all),
            [
                "node create h1",
                "node update h1 state.new=down state.old=ready",
                "node update h1 state.new=ready state.old=down",
            ]
        );
        let seqs: Vec<u64> = all.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3 * PER_ENTRY, 4 * PER_ENTRY, 5 * PER_ENTRY]);
        assert_eq!(all.cursor, 5 * PER_ENTRY);
        // After a seq: what follows it only; with neither: the cursor alone.
        assert_eq!(lines(&h.read(Some(seqs[0]), None)).len(), 2);
        assert!(h.read(Some(all.cursor), None).events.is_empty());
        let start = h.read(None, None);
        assert!(start.events.is_empty() && start.cursor == all.cursor);
        // Since a time: the events applied at or after it (times are index * 10 here).
        assert_eq!(lines(&h.read(None, Some(41))).len(), 1);
        // The entry applied again (a restart replaying the log) gives nothing new.
        h.record(
            Pending::before(&s, &down(NodeState::Down, 9)),
            &{
                let mut t = s.clone();
                t.apply(&down(NodeState::Down, 9));
                t
            },
            5,
            99,
        );
        assert_eq!(h.read(None, Some(0)).events.len(), 3);
    }

    #[test]
    fn a_batch_gives_one_event_per_object_in_order_and_the_ring_is_bounded() {
        let h = History::default();
        let mut s = store();
        let batch = Command::Batch {
            commands: vec![
                Command::AddNode {
                    node: node("n1", "h1"),
                },
                Command::AddNode {
                    node: node("n2", "h2"),
                },
                Command::UpdateNode {
                    id: "n1".into(),
                    availability: Some(Availability::Drain),
                    label_add: Default::default(),
                    label_rm: vec![],
                    at: 1,
                },
            ],
        };
        apply(&h, &mut s, batch, 7);
        let b = h.read(None, Some(0));
        assert_eq!(lines(&b), ["node create h1", "node create h2"]);
        assert_eq!(b.events[1].seq, 7 * PER_ENTRY + 1);

        for i in 0..(KEPT as u64 + 10) {
            let a = if i % 2 == 0 {
                Availability::Active
            } else {
                Availability::Drain
            };
            let cmd = Command::UpdateNode {
                id: "n2".into(),
                availability: Some(a),
                label_add: Default::default(),
                label_rm: vec![],
                at: i,
            };
            apply(&h, &mut s, cmd, 8 + i);
        }
        let b = h.read(None, Some(0));
        assert_eq!(b.events.len(), KEPT);
        assert_eq!(b.events.last().map(|e| e.seq), Some(b.cursor));
    }

    /// Sets node n1's availability at `index`, one event each time (it alternates).
    fn flip(h: &History, s: &mut StoreState, index: u64) {
        let a = if index.is_multiple_of(2) {
            Availability::Drain
        } else {
            Availability::Active
        };
        let cmd = Command::UpdateNode {
            id: "n1".into(),
            availability: Some(a),
            label_add: Default::default(),
            label_rm: vec![],
            at: index,
        };
        apply(h, s, cmd, index);
    }

    #[test]
    fn a_reader_behind_the_kept_events_is_told_which_it_missed() {
        let h = History::default();
        let mut s = store();
        let add = Command::AddNode {
            node: node("n1", "h1"),
        };
        apply(&h, &mut s, add, 1);
        // The reader has read up to entry 1's event; KEPT more fill the ring exactly.
        let read = h.read(None, Some(0)).cursor;
        assert_eq!(read, PER_ENTRY);
        let mut index = 2;
        for _ in 0..KEPT {
            flip(&h, &mut s, index);
            index += 1;
        }
        // Entry 1's event is gone, but the reader has it: nothing missed.
        let b = h.read(Some(read), None);
        assert_eq!((b.events.len(), b.missed), (KEPT, None));
        assert_eq!(h.read(None, Some(0)).missed.map(|m| m.through), Some(read));
        // Three more: entries 2 to 4's events, after the reader's, are lost to it.
        for _ in 0..3 {
            flip(&h, &mut s, index);
            index += 1;
        }
        let b = h.read(Some(read), None);
        assert_eq!(b.events.len(), KEPT);
        assert_eq!(b.events[0].seq, 5 * PER_ENTRY);
        assert_eq!(
            b.missed,
            Some(Missed {
                after: Some(read),
                through: 4 * PER_ENTRY,
            })
        );
        // A reader that read entry 4's event missed none; one at entry 3's, entry 4's.
        assert_eq!(h.read(Some(4 * PER_ENTRY), None).missed, None);
        let at3 = h.read(Some(3 * PER_ENTRY), None).missed;
        assert_eq!(at3.map(|m| m.through), Some(4 * PER_ENTRY));
        // Since a time: lost if the newest dropped event was made then or later (times are
        // index * 10 here); with neither, nothing asked, nothing missed.
        assert_eq!(
            h.read(None, Some(40)).missed.map(|m| m.through),
            Some(4 * PER_ENTRY)
        );
        assert_eq!(h.read(None, Some(41)).missed, None);
        assert_eq!(h.read(None, None).missed, None);
    }

    #[test]
    fn an_installed_snapshot_gives_what_differs() {
        let h = History::default();
        let mut old = store();
        old.apply(&Command::AddNode {
            node: node("n1", "h1"),
        });
        old.apply(&Command::AddNode {
            node: node("n2", "h2"),
        });
        let mut new = store();
        new.apply(&Command::AddNode {
            node: node("n2", "h2"),
        });
        new.apply(&Command::AddNode {
            node: node("n3", "h3"),
        });
        h.record_replaced(&old, &new, 40, 1);
        assert_eq!(
            lines(&h.read(None, Some(0))),
            ["node remove h1", "node create h3"]
        );
    }
}
