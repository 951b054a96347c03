//! `GET /events`: the cluster's changes as Docker's event stream (one JSON message per
//! change, `scope: "swarm"`), found by comparing snapshots of the leader's objects every
//! [`EVERY`]: services, nodes and networks created, updated and removed. Only from the moment
//! of the call: mesh keeps no event history, so `since` in the past is refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_api::ClusterObjects;
use serde_json::{json, Value};

use crate::query::Filters;

/// How often the objects are compared.
pub const EVERY: Duration = Duration::from_millis(500);

/// One object's identity and what a change of it is compared on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: String,
    /// A fingerprint of what an update changes (the stored object, serialized).
    state: String,
}

/// Per event type (`service`, `node`, `network`), the objects by ID.
type Snapshot = BTreeMap<&'static str, BTreeMap<String, Seen>>;

fn snapshot(o: &ClusterObjects) -> Snapshot {
    let mut s: Snapshot = BTreeMap::new();
    s.insert(
        "service",
        o.services
            .iter()
            .map(|x| {
                (
                    x.id.clone(),
                    Seen {
                        name: x.spec.name.clone(),
                        state: fp(&(&x.spec, &x.update_status)),
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
                    },
                )
            })
            .collect(),
    );
    s
}

/// What an object's update is compared on: it, serialized.
fn fp<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The events between two snapshots, in Docker's message shape.
fn changes(old: &Snapshot, new: &Snapshot, now_ns: u128) -> Vec<Value> {
    let mut out = Vec::new();
    for (kind, objs) in new {
        let before = old.get(kind);
        for (id, seen) in objs {
            let action = match before.and_then(|b| b.get(id)) {
                None => "create",
                Some(prev) if prev.state != seen.state => "update",
                Some(_) => continue,
            };
            out.push(message(kind, action, id, &seen.name, now_ns));
        }
        for (id, seen) in before.into_iter().flatten() {
            if !objs.contains_key(id) {
                out.push(message(kind, "remove", id, &seen.name, now_ns));
            }
        }
    }
    out
}

fn message(kind: &str, action: &str, id: &str, name: &str, now_ns: u128) -> Value {
    json!({
        "Type": kind,
        "Action": action,
        "Actor": {"ID": id, "Attributes": {"name": name}},
        "scope": "swarm",
        "time": (now_ns / 1_000_000_000) as u64,
        "timeNano": now_ns as u64,
    })
}

fn matches(f: &Filters, ev: &Value) -> bool {
    let s = |k: &str| ev[k].as_str().unwrap_or("").to_string();
    let kind = s("Type");
    let id = ev["Actor"]["ID"].as_str().unwrap_or("");
    let name = ev["Actor"]["Attributes"]["name"].as_str().unwrap_or("");
    f.any("type", |v| v == kind)
        && f.any("event", |v| v == s("Action"))
        && f.any("scope", |v| v == "swarm")
        && f.any(&kind, |v| v == id || v == name)
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Parses Docker's `since`/`until` (Unix seconds, with an optional fraction) to nanoseconds.
pub fn parse_time(v: &str) -> Result<u128, String> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u128 = secs
        .parse()
        .map_err(|_| format!("invalid time {v:?}: expected Unix seconds"))?;
    let mut nanos = 0u128;
    if !frac.is_empty() {
        let f: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = f
            .parse()
            .map_err(|_| format!("invalid time {v:?}: expected Unix seconds"))?;
    }
    Ok(secs * 1_000_000_000 + nanos)
}

/// Streams the events matching `filters` until `until` (ns) or the client goes away.
pub fn stream(
    backend: Arc<dyn crate::Backend>,
    first: ClusterObjects,
    filters: Filters,
    until: Option<u128>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    tokio::spawn(async move {
        let mut last = snapshot(&first);
        loop {
            let wait = match until {
                Some(u) => {
                    let now = now_ns();
                    if now >= u {
                        return;
                    }
                    EVERY.min(Duration::from_nanos((u - now).min(u64::MAX as u128) as u64))
                }
                None => EVERY,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            let Ok(v) = backend
                .call(mesh_api::Request::Objects { service: None })
                .await
            else {
                continue;
            };
            let Ok(o) = serde_json::from_value::<ClusterObjects>(v) else {
                continue;
            };
            let next = snapshot(&o);
            for ev in changes(&last, &next, now_ns()) {
                if !matches(&filters, &ev) {
                    continue;
                }
                let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            last = next;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_give_create_update_remove() {
        let mut a = ClusterObjects::default();
        let net = |name: &str, attachable: bool| mesh_api::Network {
            id: format!("id-{name}"),
            spec: mesh_api::NetworkSpec {
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
        };
        a.networks = vec![net("x", false), net("y", false)];
        let mut b = a.clone();
        b.networks = vec![net("x", true), net("z", false)];
        let evs = changes(&snapshot(&a), &snapshot(&b), 5);
        let got: Vec<(String, String)> = evs
            .iter()
            .map(|e| {
                (
                    e["Action"].as_str().unwrap().to_string(),
                    e["Actor"]["Attributes"]["name"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("update".into(), "x".into()),
                ("create".into(), "z".into()),
                ("remove".into(), "y".into())
            ]
        );
        let f =
            Filters::parse_json(r#"{"type":{"network":true},"event":{"create":true}}"#).unwrap();
        assert!(matches(&f, &evs[1]) && !matches(&f, &evs[0]));
        assert_eq!(parse_time("12.5").unwrap(), 12_500_000_000);
        assert!(parse_time("x").is_err());
    }
}
