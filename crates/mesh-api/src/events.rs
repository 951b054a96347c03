//! The cluster's changes as Docker's events name them, for `mesh events` and the Engine
//! API's `GET /events` alike: services, nodes, networks, secrets and configs created,
//! updated and removed. A node's update names what changed as Docker does (`state.old=ready`,
//! `state.new=down`, and likewise `availability` and `role`); a service's its `replicas`,
//! `image` and `updatestate` when they changed.
//!
//! Every manager derives them from the store as it applies the Raft log (mesh-manager's
//! `history`): the objects a committed command touches are compared before and after it, with
//! [`Seen`] and [`change`]. So nothing is missed (a node down and up again within a moment
//! shows twice), and an event's [`Event::seq`] is the same on every manager.
//!
//! [`Follow`] is the stream both readers run, without its I/O: given each answer to
//! `Request::Events` ([`batch_of`]), it says which events to print, where to ask from next
//! and when to stop.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::filter::Filters;
use crate::ErrorKind;

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its place in the cluster's history: the Raft log index of the command that made it,
    /// times [`PER_ENTRY`], plus its rank among that command's events. Increasing, and the
    /// same on every manager, so a reader can go on from any of them.
    pub seq: u64,
    /// `service`, `node`, `network`, `secret` or `config`.
    pub kind: String,
    /// `create`, `update` or `remove`.
    pub action: String,
    pub id: String,
    /// `name`, and for updates what changed (`state.old`, `state.new`, ...).
    pub attributes: BTreeMap<String, String>,
    /// When the manager that answered applied it, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

/// How many events one log entry may give (its seq numbers: `index * PER_ENTRY + rank`).
pub const PER_ENTRY: u64 = 1 << 20;

impl Event {
    /// Docker's event message (`GET /events`, `docker events --format json`).
    pub fn docker_json(&self) -> serde_json::Value {
        serde_json::json!({
            "Type": self.kind,
            "Action": self.action,
            "Actor": {"ID": self.id, "Attributes": self.attributes},
            "scope": "swarm",
            "time": self.time_ns / 1_000_000_000,
            "timeNano": self.time_ns,
        })
    }
}

/// How many events a manager keeps: the newest ones.
pub const KEPT: usize = 1024;

/// `Request::Events`' answer: the kept events after the cursor asked for (or since a time),
/// and where to go on from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<Event>,
    /// The seq of the newest event the manager has seen (0: none yet): ask for what comes
    /// after it next.
    pub cursor: u64,
    /// Events asked for that the manager no longer keeps (none from a manager that does not
    /// say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<Missed>,
}

/// Events a reader asked for and will never get: the manager dropped them (it keeps the
/// newest [`KEPT`]) before they were read, as when more changes are made between two reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// The seq the reader asked for the events after; `None`: it asked for those made since a
    /// time.
    pub after: Option<u64>,
    /// The seq of the newest event dropped: every event after `after` (or made since the time
    /// asked for) up to this one is lost.
    pub through: u64,
}

impl std::fmt::Display for Missed {
    /// Which events are lost, by seq and log entry, and why.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.through / PER_ENTRY;
        match self.after {
            Some(a) => write!(
                f,
                "events lost: those after seq {a} up to seq {} (log entries {} to {last}) were \
                 dropped before they were read: more changes were made between two reads than \
                 the managers keep ({KEPT})",
                self.through,
                a / PER_ENTRY,
            ),
            None => write!(
                f,
                "events lost: those made since the time asked for up to seq {} (log entry \
                 {last}) were dropped: the managers keep the newest {KEPT} only",
                self.through,
            ),
        }
    }
}

/// What one object's events are derived from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    kind: &'static str,
    name: String,
    /// A fingerprint of what an update changes (the stored object's parts, serialized).
    state: String,
    /// The fields an update names when they change, Docker's names.
    fields: BTreeMap<&'static str, String>,
}

impl Seen {
    pub fn service(x: &crate::Service) -> Seen {
        let mut fields = BTreeMap::new();
        if let crate::service::ServiceMode::Replicated { replicas } = &x.spec.mode {
            fields.insert("replicas", replicas.to_string());
        }
        if !x.spec.image.is_empty() {
            fields.insert("image", x.spec.image.clone());
        }
        if let Some(u) = &x.update_status {
            fields.insert("updatestate", word(&u.state));
        }
        Seen {
            kind: "service",
            name: x.spec.name.clone(),
            state: fp(&(&x.spec, &x.update_status)),
            fields,
        }
    }

    pub fn node(n: &crate::Node) -> Seen {
        Seen {
            kind: "node",
            name: n.hostname.clone(),
            state: fp(&(&n.role, &n.availability, &n.state, &n.labels, &n.addr)),
            fields: BTreeMap::from([
                ("state", word(&n.state)),
                ("availability", word(&n.availability)),
                ("role", word(&n.role)),
            ]),
        }
    }

    pub fn network(n: &crate::Network) -> Seen {
        Seen {
            kind: "network",
            name: n.spec.name.clone(),
            state: fp(&n.spec),
            fields: BTreeMap::new(),
        }
    }

    pub fn blob(b: &crate::Blob) -> Seen {
        Seen {
            kind: b.kind.word(),
            name: b.spec.name.clone(),
            state: fp(&(&b.spec.labels, b.version)),
            fields: BTreeMap::new(),
        }
    }
}

/// The event of object `id` going from `before` to `after` (`None`: absent), if any: a
/// creation, a removal, or an update naming the fields that changed (Docker names
/// `updatestate.new` alone when a service had no update status before).
pub fn change(
    id: &str,
    before: Option<&Seen>,
    after: Option<&Seen>,
    seq: u64,
    time_ns: u64,
) -> Option<Event> {
    let (action, seen, attributes) = match (before, after) {
        (None, None) => return None,
        (None, Some(now)) => ("create", now, BTreeMap::new()),
        (Some(old), None) => ("remove", old, BTreeMap::new()),
        (Some(old), Some(now)) if old.state == now.state => return None,
        (Some(old), Some(now)) => {
            let mut attributes = BTreeMap::new();
            for (field, new) in &now.fields {
                match old.fields.get(field) {
                    Some(was) if was != new => {
                        attributes.insert(format!("{field}.old"), was.clone());
                        attributes.insert(format!("{field}.new"), new.clone());
                    }
                    None if *field == "updatestate" => {
                        attributes.insert(format!("{field}.new"), new.clone());
                    }
                    _ => {}
                }
            }
            ("update", now, attributes)
        }
    };
    let mut attributes = attributes;
    attributes.insert("name".into(), seen.name.clone());
    Some(Event {
        seq,
        kind: seen.kind.into(),
        action: action.into(),
        id: id.into(),
        attributes,
        time_ns,
    })
}

/// What an object's update is compared on: it, serialized.
fn fp<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// An enum's word as its JSON has it (`"ready"`, `"drain"`, `"manager"`), lower case.
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.to_ascii_lowercase()))
        .unwrap_or_default()
}

/// The kinds events are about, which are also filter keys (`service=web`).
const KINDS: &[&str] = &["service", "node", "network", "secret", "config"];

/// The filter keys events take (Docker's, for the kinds mesh has).
pub const FILTER_KEYS: &[&str] = &[
    "type", "event", "scope", "service", "node", "network", "secret", "config",
];

/// Whether `ev` passes `f`: `type`, `event`, `scope` (swarm), and `service=`, `node=`,
/// `network=`, `secret=`, `config=` by name or ID prefix (Docker's fuzzy match).
pub fn matches(f: &Filters, ev: &Event) -> bool {
    let name = ev.attributes.get("name").map_or("", String::as_str);
    f.any("type", |v| v == ev.kind)
        && f.any("event", |v| v == ev.action)
        && f.any("scope", |v| v == "swarm")
        && f.any(&ev.kind, |v| ev.id.starts_with(v) || v == name)
        && KINDS.iter().all(|k| *k == ev.kind || f.values(k).is_none())
}

/// How often a stream asks for new events.
pub const EVERY: Duration = Duration::from_millis(250);

/// A stream of events as `mesh events` and `GET /events` follow it, without its I/O: the
/// first answer (`Request::Events` with `since_ns`, or with neither field) and then, every
/// [`EVERY`], an answer for the events after [`Follow::after`]. Only the events matching the
/// filters and made at or before `until` are printed; the stream ends once `until` has passed.
#[derive(Clone, Debug)]
pub struct Follow {
    filters: Filters,
    /// Nanoseconds since the Unix epoch.
    until: Option<u64>,
    /// The seq to ask after next; `None` before the first answer.
    cursor: Option<u64>,
}

impl Follow {
    pub fn new(filters: Filters, until: Option<u64>) -> Follow {
        Follow {
            filters,
            until,
            cursor: None,
        }
    }

    /// The seq to ask for the events after (`Request::Events { after }`): the newest one seen,
    /// or the first answer's cursor.
    pub fn after(&self) -> Option<u64> {
        self.cursor
    }

    /// Takes an answer: the events to print, in order, and those the manager said are lost
    /// (to be told, the stream going on). The first answer's cursor is where the stream goes
    /// on from (it gave the events since a time, or none); a later one gives the kept events
    /// after [`Follow::after`], and their seqs move it on.
    pub fn take(&mut self, batch: EventBatch) -> Taken {
        let mut cursor = match self.cursor {
            None => batch.cursor,
            Some(c) => c,
        };
        // Seqs the stream has already passed are no news.
        let missed = batch
            .missed
            .filter(|m| self.cursor.is_none_or(|c| m.through > c));
        if let Some(m) = missed {
            cursor = cursor.max(m.through);
        }
        let mut out = Vec::new();
        for ev in batch.events {
            cursor = cursor.max(ev.seq);
            if self.until.is_some_and(|u| ev.time_ns > u) || !matches(&self.filters, &ev) {
                continue;
            }
            out.push(ev);
        }
        self.cursor = Some(cursor);
        Taken {
            events: out,
            missed,
        }
    }

    /// How long to wait before asking again, `now_ns` being the time now; `None`: the stream
    /// ends (`until` has passed).
    pub fn wait(&self, now_ns: u64) -> Option<Duration> {
        match self.until {
            Some(u) if now_ns >= u => None,
            Some(u) => Some(EVERY.min(Duration::from_nanos(u - now_ns))),
            None => Some(EVERY),
        }
    }
}

/// An answer to `Request::Events` as a stream takes it: a batch; `None` when there is none
/// this time (the swarm has no leader, an election: ask again from the same place); or why the
/// stream cannot go on (another error, or an answer that is no batch), never passed over.
pub fn batch_of(answer: crate::Response) -> Result<Option<EventBatch>, String> {
    match answer {
        Ok(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| format!("an answer that is no event batch: {e}")),
        Err(e) if matches!(e.kind, ErrorKind::NoLeader | ErrorKind::Unavailable) => Ok(None),
        Err(e) => Err(e.message),
    }
}

/// What [`Follow::take`] made of an answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// The events to print, in order.
    pub events: Vec<Event>,
    /// Events lost before they could be read, to be told.
    pub missed: Option<Missed>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Availability, NodeRole, NodeState};
    use crate::service::{ServiceMode, UpdateState, UpdateStatus};

    fn net(name: &str, attachable: bool) -> crate::Network {
        crate::Network {
            id: format!("id-{name}"),
            spec: crate::NetworkSpec {
                name: name.into(),
                driver: "overlay".into(),
                subnet: None,
                encrypted: false,
                attachable,
                ingress: false,
                labels: Default::default(),
            },
            subnet: "10.0.1.0/24".into(),
            gateway: "10.0.1.1".parse().unwrap(),
            vni: 4097,
            created_at: 0,
        }
    }

    fn node(state: NodeState, availability: Availability) -> crate::Node {
        crate::Node {
            availability,
            state,
            ..crate::Node::new("n1", "h1", NodeRole::Worker, "10.0.0.1:2377")
        }
    }

    fn service(replicas: u64, update: Option<UpdateState>) -> crate::Service {
        let mut s: crate::Service = serde_json::from_value(serde_json::json!({
            "id": "s1", "version": 1, "created_at": 0, "updated_at": 0,
            "spec": crate::ServiceSpec { name: "web".into(), ..Default::default() },
        }))
        .unwrap();
        s.spec.mode = ServiceMode::Replicated { replicas };
        s.update_status = update.map(|state| UpdateStatus {
            state,
            started_at: 0,
            message: String::new(),
        });
        s
    }

    fn attrs(ev: &Event) -> Vec<(&str, &str)> {
        ev.attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn create_update_remove_and_nothing_for_no_change() {
        let (x, y) = (
            Seen::network(&net("x", false)),
            Seen::network(&net("x", true)),
        );
        let ev = change("id-x", None, Some(&x), 7, 5).unwrap();
        assert_eq!(
            (ev.kind.as_str(), ev.action.as_str()),
            ("network", "create")
        );
        assert_eq!((ev.seq, ev.time_ns), (7, 5));
        assert_eq!(attrs(&ev), [("name", "x")]);
        assert_eq!(
            change("id-x", Some(&x), Some(&y), 8, 5).unwrap().action,
            "update"
        );
        assert_eq!(
            change("id-x", Some(&y), None, 9, 5).unwrap().action,
            "remove"
        );
        assert_eq!(change("id-x", Some(&x), Some(&x), 9, 5), None);
        assert_eq!(change("id-x", None, None, 9, 5), None);

        let f = Filters::parse_args(&["type=network", "event=create"]).unwrap();
        let created = change("id-x", None, Some(&x), 7, 5).unwrap();
        let removed = change("id-x", Some(&y), None, 9, 5).unwrap();
        assert!(matches(&f, &created) && !matches(&f, &removed));
        for yes in ["network=x", "network=id-", "network=id-x"] {
            let f = Filters::parse_args(&[yes]).unwrap();
            assert!(matches(&f, &created), "{yes}");
        }
        for no in ["network=y", "network=d-x", "service=x", "secret=x"] {
            let f = Filters::parse_args(&[no]).unwrap();
            assert!(!matches(&f, &created), "{no}");
        }
    }

    #[test]
    fn a_node_update_names_what_changed() {
        let a = Seen::node(&node(NodeState::Ready, Availability::Active));
        let b = Seen::node(&node(NodeState::Down, Availability::Active));
        let ev = change("n1", Some(&a), Some(&b), 1, 5).unwrap();
        assert_eq!(
            attrs(&ev),
            [
                ("name", "h1"),
                ("state.new", "down"),
                ("state.old", "ready")
            ]
        );
        let c = Seen::node(&node(NodeState::Down, Availability::Drain));
        let ev = change("n1", Some(&b), Some(&c), 2, 5).unwrap();
        assert_eq!(
            attrs(&ev),
            [
                ("availability.new", "drain"),
                ("availability.old", "active"),
                ("name", "h1")
            ]
        );
        // A change of the stamps alone is no event.
        let mut later = node(NodeState::Down, Availability::Drain);
        later.updated_at = 99;
        assert_eq!(
            change("n1", Some(&c), Some(&Seen::node(&later)), 3, 5),
            None
        );
    }

    #[test]
    fn a_service_update_names_replicas_and_update_state_as_docker() {
        let one = Seen::service(&service(1, None));
        let two = Seen::service(&service(2, None));
        let ev = change("s1", Some(&one), Some(&two), 1, 5).unwrap();
        assert_eq!(
            attrs(&ev),
            [
                ("name", "web"),
                ("replicas.new", "2"),
                ("replicas.old", "1")
            ]
        );
        let updating = Seen::service(&service(2, Some(UpdateState::Updating)));
        let ev = change("s1", Some(&two), Some(&updating), 2, 5).unwrap();
        assert_eq!(
            attrs(&ev),
            [("name", "web"), ("updatestate.new", "updating")]
        );
        let rolled = Seen::service(&service(2, Some(UpdateState::RollbackCompleted)));
        let ev = change("s1", Some(&updating), Some(&rolled), 3, 5).unwrap();
        assert_eq!(
            attrs(&ev),
            [
                ("name", "web"),
                ("updatestate.new", "rollback_completed"),
                ("updatestate.old", "updating")
            ]
        );
        let m = ev.docker_json();
        assert_eq!(m["Type"], "service");
        assert_eq!(m["scope"], "swarm");
    }

    fn ev(seq: u64, kind: &str, name: &str, time_ns: u64) -> Event {
        Event {
            seq,
            kind: kind.into(),
            action: "create".into(),
            id: format!("id-{name}"),
            attributes: BTreeMap::from([("name".to_string(), name.to_string())]),
            time_ns,
        }
    }

    fn names(evs: &[Event]) -> Vec<&str> {
        evs.iter().map(|e| e.attributes["name"].as_str()).collect()
    }

    #[test]
    fn a_stream_prints_what_matches_and_goes_on_from_the_newest_seq() {
        let f = Filters::parse_args(&["type=service"]).unwrap();
        let mut s = Follow::new(f, None);
        assert_eq!(s.after(), None);
        // The first answer: the kept events since a time, and the manager's cursor.
        let first = EventBatch {
            events: vec![ev(10, "service", "a", 1), ev(11, "node", "h1", 2)],
            cursor: 12,
            missed: None,
        };
        assert_eq!(names(&s.take(first).events), ["a"]);
        assert_eq!(s.after(), Some(12));
        // Later ones: filtered out or not, every event moves the cursor; no answer (an
        // election) leaves it.
        let next = EventBatch {
            events: vec![ev(13, "service", "b", 3), ev(20, "network", "x", 4)],
            cursor: 20,
            missed: None,
        };
        assert_eq!(names(&s.take(next).events), ["b"]);
        assert_eq!(s.after(), Some(20));
        assert_eq!(s.take(EventBatch::default()), Taken::default());
        assert_eq!(s.after(), Some(20));
        assert_eq!(s.wait(5), Some(EVERY));
    }

    #[test]
    fn until_drops_later_events_and_ends_the_stream() {
        let mut s = Follow::new(Filters::default(), Some(1_000_000_000));
        let b = EventBatch {
            events: vec![
                ev(1, "service", "a", 999_999_999),
                ev(2, "service", "b", 1_000_000_000),
                ev(3, "service", "c", 1_000_000_001),
            ],
            cursor: 3,
            missed: None,
        };
        assert_eq!(names(&s.take(b).events), ["a", "b"]);
        assert_eq!(s.after(), Some(3));
        // The wait is cut short at `until`, and the stream ends there.
        assert_eq!(s.wait(0), Some(EVERY));
        assert_eq!(s.wait(900_000_000), Some(Duration::from_millis(100)));
        assert_eq!(s.wait(1_000_000_000), None);
        assert_eq!(s.wait(2_000_000_000), None);
    }

    #[test]
    fn events_lost_between_two_reads_are_told_once_and_the_stream_goes_on() {
        let pe = PER_ENTRY;
        let mut s = Follow::new(Filters::parse_args(&["type=service"]).unwrap(), None);
        let first = EventBatch {
            events: vec![],
            cursor: 5 * pe,
            missed: None,
        };
        assert_eq!(s.take(first), Taken::default());
        // Entries 6 to 3000's events were dropped before this read: told, with the kept ones
        // after them, filtered as ever (the lost ones are told whatever their kind).
        let lost = Missed {
            after: Some(5 * pe),
            through: 3000 * pe + 1,
        };
        let gap = EventBatch {
            events: vec![
                ev(3001 * pe, "node", "h1", 1),
                ev(3002 * pe, "service", "a", 2),
            ],
            cursor: 3002 * pe,
            missed: Some(lost),
        };
        let t = s.take(gap);
        assert_eq!((names(&t.events), t.missed), (vec!["a"], Some(lost)));
        assert_eq!(s.after(), Some(3002 * pe));
        assert_eq!(
            lost.to_string(),
            format!(
                "events lost: those after seq {} up to seq {} (log entries 5 to 3000) were \
                 dropped before they were read: more changes were made between two reads than \
                 the managers keep (1024)",
                5 * pe,
                3000 * pe + 1
            )
        );
        // Seqs the stream has already passed are not told again; a new gap is.
        let stale = EventBatch {
            events: vec![],
            cursor: 3002 * pe,
            missed: Some(lost),
        };
        assert_eq!(s.take(stale), Taken::default());
        let again = Missed {
            after: Some(3002 * pe),
            through: 9000 * pe,
        };
        let later = EventBatch {
            events: vec![ev(9001 * pe, "service", "b", 3)],
            cursor: 9001 * pe,
            missed: Some(again),
        };
        assert_eq!(s.take(later).missed, Some(again));
        assert_eq!(s.after(), Some(9001 * pe));

        // The first answer (since a time) tells what it lost too, whatever its cursor.
        let mut s = Follow::new(Filters::default(), None);
        let since = Missed {
            after: None,
            through: 40 * pe,
        };
        let first = EventBatch {
            events: vec![ev(41 * pe, "service", "c", 4)],
            cursor: 41 * pe,
            missed: Some(since),
        };
        assert_eq!(s.take(first).missed, Some(since));
        assert!(since
            .to_string()
            .contains("up to seq 41943040 (log entry 40)"));
    }

    #[test]
    fn a_batch_from_a_manager_that_does_not_tell_what_it_missed_still_reads() {
        let b: EventBatch = serde_json::from_str(r#"{"events":[],"cursor":7}"#).unwrap();
        assert_eq!((b.cursor, b.missed), (7, None));
        // And none told is none written, as older readers expect.
        let v = serde_json::to_value(&b).unwrap();
        assert!(v.get("missed").is_none(), "{v}");
        let with = EventBatch {
            missed: Some(Missed {
                after: Some(1),
                through: 2,
            }),
            ..b
        };
        let back: EventBatch =
            serde_json::from_value(serde_json::to_value(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn an_answer_is_a_batch_none_for_now_or_the_end_of_the_stream() {
        let err = |kind, message: &str| {
            Err(crate::ApiError {
                kind,
                message: message.into(),
            })
        };
        let b = batch_of(Ok(serde_json::json!({"events": [], "cursor": 3}))).unwrap();
        assert_eq!(b.map(|b| b.cursor), Some(3));
        // An election: ask again.
        assert_eq!(batch_of(err(ErrorKind::NoLeader, "no leader")), Ok(None));
        assert_eq!(batch_of(err(ErrorKind::Unavailable, "later")), Ok(None));
        // Anything else ends the stream, saying why; so does an answer that is no batch.
        let e = batch_of(err(ErrorKind::NotManager, "not a manager")).unwrap_err();
        assert_eq!(e, "not a manager");
        let e = batch_of(Ok(serde_json::json!({"cursor": "soon"}))).unwrap_err();
        assert!(e.starts_with("an answer that is no event batch: "), "{e}");
    }
}
