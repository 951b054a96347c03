//! The cluster's changes as Docker's events name them, for `mesh events` and the Engine
//! API's `GET /events` alike: services, nodes and networks created, updated and removed,
//! found by comparing two snapshots of the leader's objects. A node's update names what
//! changed as Docker does (`state.old=ready`, `state.new=down`, and likewise `availability`
//! and `role`); a service's its replicas and image when they changed.
//!
//! A comparison sees what differs between two moments: an object created and removed
//! between them is not seen, nor a node down and up again.

use std::collections::BTreeMap;

use crate::filter::Filters;
use crate::objects::ClusterObjects;

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `service`, `node` or `network`.
    pub kind: &'static str,
    /// `create`, `update` or `remove`.
    pub action: &'static str,
    pub id: String,
    /// `name`, and for updates what changed (`state.old`, `state.new`, ...).
    pub attributes: BTreeMap<String, String>,
    /// When it was seen, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

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

/// One object's identity and what a change of it is compared on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: String,
    /// A fingerprint of what an update changes (the stored object, serialized).
    state: String,
    /// The fields an update names when they change, Docker's names.
    fields: BTreeMap<&'static str, String>,
}

/// The objects of one moment, by kind and ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<&'static str, BTreeMap<String, Seen>>);

impl Snapshot {
    pub fn of(o: &ClusterObjects) -> Snapshot {
        let mut s = BTreeMap::new();
        s.insert(
            "service",
            o.services
                .iter()
                .map(|x| {
                    let replicas = match &x.spec.mode {
                        crate::service::ServiceMode::Replicated { replicas } => {
                            replicas.to_string()
                        }
                        _ => String::new(),
                    };
                    let mut fields = BTreeMap::new();
                    if !replicas.is_empty() {
                        fields.insert("replicas", replicas);
                    }
                    if !x.spec.image.is_empty() {
                        fields.insert("image", x.spec.image.clone());
                    }
                    (
                        x.id.clone(),
                        Seen {
                            name: x.spec.name.clone(),
                            state: fp(&(&x.spec, &x.update_status)),
                            fields,
                        },
                    )
                })
                .collect(),
        );
        s.insert(
            "node",
            o.nodes
                .iter()
                .map(|n| {
                    let fields = BTreeMap::from([
                        ("state", word(&n.node.state)),
                        ("availability", word(&n.node.availability)),
                        ("role", word(&n.node.role)),
                    ]);
                    (
                        n.node.id.clone(),
                        Seen {
                            name: n.node.hostname.clone(),
                            state: fp(&(
                                &n.node.role,
                                &n.node.availability,
                                &n.node.state,
                                &n.node.labels,
                                &n.manager_status,
                            )),
                            fields,
                        },
                    )
                })
                .collect(),
        );
        s.insert(
            "network",
            o.networks
                .iter()
                .map(|n| {
                    (
                        n.id.clone(),
                        Seen {
                            name: n.spec.name.clone(),
                            state: fp(&n.spec),
                            fields: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
        );
        Snapshot(s)
    }

    /// The events from `self` to `new`, seen at `now_ns`: per kind (network, node,
    /// service), creations and updates, then removals.
    pub fn changes(&self, new: &Snapshot, now_ns: u64) -> Vec<Event> {
        let mut out = Vec::new();
        for (kind, objs) in &new.0 {
            let before = self.0.get(kind);
            for (id, seen) in objs {
                let mut attributes = BTreeMap::from([("name".to_string(), seen.name.clone())]);
                let action = match before.and_then(|b| b.get(id)) {
                    None => "create",
                    Some(prev) if prev.state != seen.state => {
                        for (field, now) in &seen.fields {
                            match prev.fields.get(field) {
                                Some(old) if old != now => {
                                    attributes.insert(format!("{field}.old"), old.clone());
                                    attributes.insert(format!("{field}.new"), now.clone());
                                }
                                _ => {}
                            }
                        }
                        "update"
                    }
                    Some(_) => continue,
                };
                out.push(Event {
                    kind,
                    action,
                    id: id.clone(),
                    attributes,
                    time_ns: now_ns,
                });
            }
            for (id, seen) in before.into_iter().flatten() {
                if !objs.contains_key(id) {
                    out.push(Event {
                        kind,
                        action: "remove",
                        id: id.clone(),
                        attributes: BTreeMap::from([("name".to_string(), seen.name.clone())]),
                        time_ns: now_ns,
                    });
                }
            }
        }
        out
    }
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

/// The filter keys events take (Docker's, for the kinds mesh has).
pub const FILTER_KEYS: &[&str] = &["type", "event", "scope", "service", "node", "network"];

/// Whether `ev` passes `f`: `type`, `event`, `scope` (swarm), and `service=`, `node=`,
/// `network=` by ID or name.
pub fn matches(f: &Filters, ev: &Event) -> bool {
    let name = ev.attributes.get("name").map_or("", String::as_str);
    f.any("type", |v| v == ev.kind)
        && f.any("event", |v| v == ev.action)
        && f.any("scope", |v| v == "swarm")
        && f.any(ev.kind, |v| v == ev.id || v == name)
        && ["service", "node", "network"]
            .iter()
            .all(|k| *k == ev.kind || f.values(k).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Availability, NodeState, NodeView};

    fn net(name: &str, attachable: bool) -> crate::Network {
        crate::Network {
            id: format!("id-{name}"),
            spec: crate::NetworkSpec {
                name: name.into(),
                driver: "overlay".into(),
                subnet: None,
                attachable,
                ingress: false,
                labels: Default::default(),
            },
            subnet: "10.0.1.0/24".into(),
            gateway: "10.0.1.1".into(),
            vni: 4097,
            created_at: 0,
        }
    }

    #[test]
    fn snapshots_give_create_update_remove() {
        let a = ClusterObjects {
            networks: vec![net("x", false), net("y", false)],
            ..Default::default()
        };
        let mut b = a.clone();
        b.networks = vec![net("x", true), net("z", false)];
        let evs = Snapshot::of(&a).changes(&Snapshot::of(&b), 5);
        let got: Vec<(&str, &str)> = evs
            .iter()
            .map(|e| (e.action, e.attributes["name"].as_str()))
            .collect();
        assert_eq!(got, [("update", "x"), ("create", "z"), ("remove", "y")]);
        let f = Filters::parse_args(&["type=network", "event=create"]).unwrap();
        assert!(matches(&f, &evs[1]) && !matches(&f, &evs[0]));
        let f = Filters::parse_args(&["network=z"]).unwrap();
        assert!(matches(&f, &evs[1]) && !matches(&f, &evs[2]));
        let f = Filters::parse_args(&["service=z"]).unwrap();
        assert!(!matches(&f, &evs[1]));
    }

    #[test]
    fn a_node_update_names_what_changed() {
        let node = |state: NodeState, availability: Availability| NodeView {
            node: crate::objects::Node {
                id: "n1".into(),
                hostname: "h1".into(),
                role: crate::objects::NodeRole::Worker,
                availability,
                state,
                addr: "10.0.0.1:2377".into(),
                raft_id: 0,
                labels: Default::default(),
                resources: Default::default(),
                ingress_addr: None,
                created_at: 0,
                updated_at: 0,
            },
            manager_status: String::new(),
        };
        let a = ClusterObjects {
            nodes: vec![node(NodeState::Ready, Availability::Active)],
            ..Default::default()
        };
        let mut b = a.clone();
        b.nodes = vec![node(NodeState::Down, Availability::Active)];
        let evs = Snapshot::of(&a).changes(&Snapshot::of(&b), 5);
        assert_eq!(evs.len(), 1);
        let at = &evs[0].attributes;
        assert_eq!(
            (at["state.old"].as_str(), at["state.new"].as_str()),
            ("ready", "down")
        );
        assert!(!at.contains_key("availability.old"));
    }
}
