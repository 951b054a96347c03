//! Docker's listing filters, in one place for both front doors: the `mesh` CLI's
//! `--filter KEY=VALUE` (sent in the listing requests and applied by the leader) and the
//! Engine API's `filters` query parameter.
//!
//! Semantics, as dockerd and swarmkit apply them: the values of one key are OR'ed, different
//! keys AND'ed; `id` and `name` match a prefix (a network's `name` any part, as `docker
//! network ls`); `label` is `KEY` (present) or `KEY=VALUE`, and every label given must match;
//! a key the listing does not know is refused with dockerd's `invalid filter 'KEY'`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::blob::Blob;
use crate::network::Network;
use crate::objects::Node;
use crate::service::{Service, ServiceMode, Task, TaskState};

/// The keys each listing accepts, as dockerd's.
pub mod keys {
    /// `node ls`.
    pub const NODE: &[&str] = &["id", "label", "node.label", "membership", "name", "role"];
    /// `service ls`.
    pub const SERVICE: &[&str] = &["id", "label", "mode", "name"];
    /// `service ps`, `node ps`, `stack ps` (the Engine API's `/tasks`).
    pub const TASK: &[&str] = &[
        "id",
        "name",
        "service",
        "node",
        "label",
        "desired-state",
        "_up-to-date",
    ];
    /// `network ls`.
    pub const NETWORK: &[&str] = &["driver", "id", "label", "name", "scope", "type", "dangling"];
    /// `secret ls`, `config ls`.
    pub const BLOB: &[&str] = &["id", "label", "name", "names"];
}

/// Filters: each key with its set of values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Filters(BTreeMap<String, BTreeSet<String>>);

impl Filters {
    /// The Engine API's `filters` parameter: JSON `{"key":{"value":true}}`, or the legacy
    /// `{"key":["value"]}`; empty means none.
    pub fn parse_json(raw: &str) -> Result<Filters, String> {
        if raw.trim().is_empty() {
            return Ok(Filters::default());
        }
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| format!("invalid filter: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| "invalid filter: expected a JSON object".to_string())?;
        let mut out = BTreeMap::new();
        for (k, vals) in obj {
            let set: BTreeSet<String> = match vals {
                serde_json::Value::Object(m) => m
                    .iter()
                    .filter(|(_, b)| b.as_bool() != Some(false))
                    .map(|(s, _)| s.clone())
                    .collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("invalid filter {k:?}: values must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("invalid filter {k:?}")),
            };
            out.insert(k.clone(), set);
        }
        Ok(Filters(out))
    }

    /// The CLI's repeated `--filter KEY=VALUE` (Docker's error for a value without `=`).
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Filters, String> {
        let mut f = Filters::default();
        for a in args {
            let a = a.as_ref();
            match a.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    f.add(k.trim().to_ascii_lowercase(), v.to_string())
                }
                _ => {
                    return Err(format!(
                        "invalid argument \"{a}\" for \"-f, --filter\" flag: bad format of filter (expected name=value)"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// Adds one value for `key`.
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.entry(key.into()).or_default().insert(value.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses keys outside `allowed`, as dockerd does.
    pub fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!("invalid filter '{k}'")),
            None => Ok(()),
        }
    }

    /// The values of `key`, if it has any.
    pub fn values(&self, key: &str) -> Option<&BTreeSet<String>> {
        self.0.get(key).filter(|s| !s.is_empty())
    }

    /// No values for `key`, or `f` holds for one of them.
    pub fn any(&self, key: &str, f: impl Fn(&str) -> bool) -> bool {
        self.values(key)
            .is_none_or(|vals| vals.iter().any(|v| f(v)))
    }

    /// `label` filters (`key` or `key=value`): every one must match `labels`.
    pub fn labels(&self, key: &str, labels: &BTreeMap<String, String>) -> bool {
        self.values(key).is_none_or(|vals| {
            vals.iter().all(|want| match want.split_once('=') {
                Some((k, v)) => labels.get(k).is_some_and(|have| have == v),
                None => labels.contains_key(want.as_str()),
            })
        })
    }

    /// Checks that every value of `key` is one of `allowed` (case-insensitive), with
    /// `error` building the message for the first that is not.
    fn check_values(
        &self,
        key: &str,
        allowed: &[&str],
        error: impl Fn(&str) -> String,
    ) -> Result<(), String> {
        for v in self.values(key).into_iter().flatten() {
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v)) {
                return Err(error(v));
            }
        }
        Ok(())
    }

    /// The keys and values `node ls` accepts.
    pub fn check_nodes(&self) -> Result<(), String> {
        self.only(keys::NODE)?;
        self.check_values("role", &["manager", "worker"], |v| {
            format!("Invalid role filter: '{v}'")
        })?;
        self.check_values("membership", &["accepted", "pending"], |v| {
            format!("Invalid membership filter: '{v}'")
        })
    }

    /// The keys and values `service ls` accepts.
    pub fn check_services(&self) -> Result<(), String> {
        self.only(keys::SERVICE)?;
        self.check_values(
            "mode",
            &["replicated", "global", "replicated-job", "global-job"],
            |v| format!("Invalid filter: 'mode'='{v}'"),
        )
    }

    /// The keys and values the task listings accept.
    pub fn check_tasks(&self) -> Result<(), String> {
        self.only(keys::TASK)?;
        self.check_values("desired-state", DESIRED_STATES, |v| {
            format!("Invalid task desired state: {v}")
        })
    }

    /// The keys and values `network ls` accepts.
    pub fn check_networks(&self) -> Result<(), String> {
        self.only(keys::NETWORK)?;
        self.check_values("type", &["custom", "builtin"], |v| {
            format!("invalid filter: 'type'='{v}'")
        })
    }

    /// The keys `secret ls` and `config ls` accept.
    pub fn check_blobs(&self) -> Result<(), String> {
        self.only(keys::BLOB)
    }
}

/// The desired states a task filter may name.
const DESIRED_STATES: &[&str] = &[
    "new",
    "pending",
    "assigned",
    "accepted",
    "preparing",
    "ready",
    "starting",
    "running",
    "complete",
    "shutdown",
    "failed",
    "rejected",
    "remove",
    "orphaned",
];

/// `node ls`: `id` (prefix), `name` (hostname prefix), `role`, `membership` (every stored
/// node is accepted), `node.label` (the node's labels) and `label`: Docker's means the
/// engine's labels, which a mesh node does not have, so it matches the node's labels too.
pub fn node(f: &Filters, n: &Node) -> bool {
    f.any("id", |v| n.id.starts_with(v))
        && f.any("name", |v| n.hostname.starts_with(v))
        && f.any("role", |v| v.eq_ignore_ascii_case(&n.role.to_string()))
        && f.any("membership", |v| v.eq_ignore_ascii_case("accepted"))
        && f.labels("label", &n.labels)
        && f.labels("node.label", &n.labels)
}

/// The mode's name as `service ls` shows it.
pub fn mode_name(s: &Service) -> &'static str {
    match s.spec.mode {
        ServiceMode::Replicated { .. } => "replicated",
        ServiceMode::Global => "global",
    }
}

/// `service ls`: `id` (prefix), `name` (prefix), `mode`, `label`.
pub fn service(f: &Filters, s: &Service) -> bool {
    f.any("id", |v| s.id.starts_with(v))
        && f.any("name", |v| s.spec.name.starts_with(v))
        && f.any("mode", |v| v.eq_ignore_ascii_case(mode_name(s)))
        && f.labels("label", &s.spec.labels)
}

/// A task's desired state as its listings filter it: `running` is a task meant to run
/// (not yet told to stop), `shutdown` one told to stop, `accepted` one just assigned.
fn desired_is(t: &Task, want: &str) -> bool {
    match want.to_ascii_lowercase().as_str() {
        "running" => t.desired_state <= TaskState::Running,
        "shutdown" => t.desired_state > TaskState::Running,
        "accepted" => t.desired_state == TaskState::Accepted,
        other => t.desired_state.to_string().eq_ignore_ascii_case(other),
    }
}

/// The task listings: `id` (prefix), `name` (prefix of `web.1` or `web.1.<id>`), `service`
/// (ID, name or ID prefix), `node` (ID, ID prefix or hostname: `hostname` is the task's
/// node's), `label` (the service's labels), `desired-state`, `_up-to-date` (runs the
/// service's current version).
pub fn task(f: &Filters, t: &Task, hostname: Option<&str>, svc: Option<&Service>) -> bool {
    let no_labels = BTreeMap::new();
    f.any("id", |v| t.id.starts_with(v))
        && f.any("name", |v| {
            t.short_name().starts_with(v) || t.name().starts_with(v)
        })
        && f.any("service", |v| {
            t.service_id.starts_with(v) || t.service_name == v
        })
        && f.any("node", |v| {
            !t.node_id.is_empty() && (t.node_id.starts_with(v) || hostname == Some(v))
        })
        && f.labels("label", svc.map(|s| &s.spec.labels).unwrap_or(&no_labels))
        && f.any("desired-state", |v| desired_is(t, v))
        && f.any("_up-to-date", |_| {
            svc.is_some_and(|s| s.version == t.version)
        })
}

/// `network ls`: `id` (prefix), `name` (any part), `driver`, `scope` (`swarm`), `type`
/// (every mesh network is `custom`), `label`, `dangling` (ignored).
pub fn network(f: &Filters, n: &Network) -> bool {
    f.any("id", |v| n.id.starts_with(v))
        && f.any("name", |v| n.spec.name.contains(v))
        && f.any("driver", |v| v == n.spec.driver)
        && f.any("scope", |v| v == "swarm")
        && f.any("type", |v| v.eq_ignore_ascii_case("custom"))
        && f.labels("label", &n.spec.labels)
}

/// `secret ls` / `config ls`: `id` (prefix), `name` (prefix), `names` (exact), `label`.
pub fn blob(f: &Filters, b: &Blob) -> bool {
    f.any("id", |v| b.id.starts_with(v))
        && f.any("name", |v| b.spec.name.starts_with(v))
        && f.any("names", |v| b.spec.name == v)
        && f.labels("label", &b.spec.labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::NodeRole;

    fn args(a: &[&str]) -> Filters {
        Filters::parse_args(a).unwrap()
    }

    #[test]
    fn both_wire_syntaxes_and_the_cli_s() {
        let f = Filters::parse_json(r#"{"name":{"web":true},"label":["a=b"]}"#).unwrap();
        assert_eq!(f, args(&["name=web", "label=a=b"]));
        assert!(f.any("name", |v| v == "web"));
        assert!(f.any("id", |_| false), "absent keys match everything");
        let mut l = BTreeMap::new();
        assert!(!f.labels("label", &l));
        l.insert("a".into(), "b".into());
        assert!(f.labels("label", &l));
        assert!(f.only(&["name", "label"]).is_ok());
        assert_eq!(f.only(&["name"]).unwrap_err(), "invalid filter 'label'");
        assert!(Filters::parse_json("[1]").is_err());
        assert!(Filters::parse_json(r#"{"a":3}"#).is_err());
        assert!(Filters::parse_json(" ").unwrap().is_empty());
        assert_eq!(
            Filters::parse_args(&["web"]).unwrap_err(),
            "invalid argument \"web\" for \"-f, --filter\" flag: bad format of filter (expected name=value)"
        );
        // A wire round trip keeps every value.
        let s = serde_json::to_string(&args(&["name=a", "name=b"])).unwrap();
        assert_eq!(s, r#"{"name":["a","b"]}"#);
        assert_eq!(
            serde_json::from_str::<Filters>(&s).unwrap().0["name"].len(),
            2
        );
    }

    fn node_of(id: &str, name: &str, role: NodeRole, labels: &[(&str, &str)]) -> Node {
        Node {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Node::new(id, name, role, "")
        }
    }

    #[test]
    fn nodes_same_key_or_ed_different_keys_and_ed() {
        let nodes = [
            node_of("abc1", "h1", NodeRole::Manager, &[("zone", "a")]),
            node_of(
                "abd2",
                "h2",
                NodeRole::Worker,
                &[("zone", "b"), ("ssd", "")],
            ),
            node_of("xyz3", "w3", NodeRole::Worker, &[]),
        ];
        let pick = |a: &[&str]| -> Vec<&str> {
            let f = args(a);
            nodes
                .iter()
                .filter(|n| node(&f, n))
                .map(|n| n.hostname.as_str())
                .collect()
        };
        assert_eq!(pick(&[]), ["h1", "h2", "w3"]);
        assert_eq!(pick(&["id=ab"]), ["h1", "h2"]);
        assert_eq!(pick(&["name=h"]), ["h1", "h2"]);
        assert_eq!(pick(&["name=h1", "name=w3"]), ["h1", "w3"]);
        assert_eq!(pick(&["role=worker"]), ["h2", "w3"]);
        assert_eq!(pick(&["role=worker", "name=h"]), ["h2"]);
        assert_eq!(pick(&["label=zone"]), ["h1", "h2"]);
        assert_eq!(pick(&["node.label=zone=b"]), ["h2"]);
        assert_eq!(pick(&["label=zone=b", "label=ssd"]), ["h2"]);
        assert_eq!(pick(&["label=zone=a", "label=ssd"]), Vec::<&str>::new());
        assert_eq!(pick(&["membership=accepted"]).len(), 3);
        assert!(pick(&["membership=pending"]).is_empty());
        assert_eq!(
            args(&["role=boss"]).check_nodes().unwrap_err(),
            "Invalid role filter: 'boss'"
        );
        assert_eq!(
            args(&["foo=bar"]).check_nodes().unwrap_err(),
            "invalid filter 'foo'"
        );
        assert!(args(&["role=Manager", "membership=pending"])
            .check_nodes()
            .is_ok());
    }

    fn service_of(id: &str, name: &str, mode: ServiceMode, labels: &[(&str, &str)]) -> Service {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "id": id, "version": 1, "created_at": 0, "updated_at": 0,
            "spec": crate::service::ServiceSpec { name: name.into(), ..Default::default() },
        }))
        .unwrap();
        s.spec.mode = mode;
        s.spec.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    #[test]
    fn services_by_id_name_mode_and_label() {
        let svcs = [
            service_of(
                "s1aaa",
                "web",
                ServiceMode::Replicated { replicas: 1 },
                &[("tier", "front")],
            ),
            service_of("s2bbb", "web-admin", ServiceMode::Global, &[]),
            service_of(
                "s3ccc",
                "db",
                ServiceMode::Replicated { replicas: 1 },
                &[("tier", "back")],
            ),
        ];
        let pick = |a: &[&str]| -> Vec<&str> {
            let f = args(a);
            svcs.iter()
                .filter(|s| service(&f, s))
                .map(|s| s.spec.name.as_str())
                .collect()
        };
        assert_eq!(pick(&["name=web"]), ["web", "web-admin"]);
        assert_eq!(pick(&["id=s3"]), ["db"]);
        assert_eq!(pick(&["mode=global"]), ["web-admin"]);
        assert_eq!(pick(&["mode=replicated", "label=tier=back"]), ["db"]);
        assert_eq!(pick(&["label=tier"]), ["web", "db"]);
        assert!(args(&["mode=sometimes"]).check_services().is_err());
        assert_eq!(
            args(&["desired-state=x"]).check_services().unwrap_err(),
            "invalid filter 'desired-state'"
        );
    }

    #[test]
    fn tasks_by_desired_state_node_name_and_service() {
        let svc = service_of(
            "s1aaa",
            "web",
            ServiceMode::Replicated { replicas: 2 },
            &[("a", "1")],
        );
        let task_of = |id: &str, slot: u64, node: &str, desired: TaskState| -> Task {
            serde_json::from_value(serde_json::json!({
                "id": id, "service_id": "s1aaa", "service_name": "web", "slot": slot,
                "node_id": node, "version": 1, "spec": svc.spec, "desired_state": desired,
                "status": { "state": desired, "timestamp_ms": 0, "err": "", "message": "" },
                "created_at": 0,
            }))
            .unwrap()
        };
        let tasks = [
            task_of("t1", 1, "n1", TaskState::Running),
            task_of("t2", 2, "n2", TaskState::Running),
            task_of("t3", 1, "n1", TaskState::Shutdown),
        ];
        let host = |t: &Task| if t.node_id == "n1" { "h1" } else { "h2" };
        let pick = |a: &[&str]| -> Vec<&str> {
            let f = args(a);
            tasks
                .iter()
                .filter(|t| task(&f, t, Some(host(t)), Some(&svc)))
                .map(|t| t.id.as_str())
                .collect()
        };
        assert_eq!(pick(&["desired-state=running"]), ["t1", "t2"]);
        assert_eq!(pick(&["desired-state=shutdown"]), ["t3"]);
        assert_eq!(
            pick(&["desired-state=shutdown", "desired-state=running"]).len(),
            3
        );
        assert_eq!(pick(&["node=h1"]), ["t1", "t3"]);
        assert_eq!(pick(&["node=n2"]), ["t2"]);
        assert_eq!(pick(&["name=web.2"]), ["t2"]);
        assert_eq!(pick(&["id=t3"]), ["t3"]);
        assert_eq!(pick(&["service=web", "label=a=1"]).len(), 3);
        assert!(pick(&["service=db"]).is_empty());
        assert_eq!(pick(&["node=h1", "desired-state=running"]), ["t1"]);
        assert_eq!(
            args(&["desired-state=sleeping"]).check_tasks().unwrap_err(),
            "Invalid task desired state: sleeping"
        );
    }

    #[test]
    fn networks_match_any_part_of_the_name() {
        let n: Network = serde_json::from_value(serde_json::json!({
            "id": "n1abc", "subnet": "10.0.1.0/24", "gateway": "10.0.1.1", "vni": 4097,
            "created_at": 0,
            "spec": { "name": "app_front", "driver": "overlay", "subnet": null, "attachable": false },
        }))
        .unwrap();
        assert!(network(&args(&["name=front"]), &n));
        assert!(network(
            &args(&["driver=overlay", "scope=swarm", "type=custom"]),
            &n
        ));
        assert!(!network(&args(&["driver=bridge"]), &n));
        assert!(!network(&args(&["type=builtin"]), &n));
        assert!(!network(&args(&["label=x"]), &n));
        assert!(args(&["type=other"]).check_networks().is_err());
    }
}
