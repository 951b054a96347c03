//! The record set the engine answers from: per network, the services (VIP, endpoint mode,
//! running tasks) and indexes by task name/hostname and by IP (for PTR).
//!
//! [`Records`] is plain data with cheap patch operations ([`Records::upsert_task`],
//! [`Records::remove_task`], [`Records::upsert_service`], ...) that keep the indexes in step,
//! so meshd can apply gossip events one by one instead of rebuilding. Networks and services
//! sit behind `Arc`s: the engine publishes a new snapshot with copy-on-write
//! ([`crate::Dns::update`]), and a patch copies only the network and service it touches, and
//! only when a reader still holds the previous snapshot.
//!
//! Names are case-insensitive: keys are ASCII-lowercased, the spelling given is kept for
//! display and PTR targets. Records holds only what should be answered: meshd puts RUNNING
//! tasks in and takes them out as soon as they stop.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One running task on one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's full name, `SERVICE.SLOT.TASKID` (e.g. `web.1.3k2j...`); for global
    /// services `SERVICE.NODEID.TASKID`.
    pub name: String,
    /// The task's hostname (by default the 12-character task ID prefix). May be empty.
    pub hostname: String,
    /// The task's address on this network.
    pub ip: Ipv4Addr,
}

impl TaskRecord {
    /// A task record.
    pub fn new(name: impl Into<String>, hostname: impl Into<String>, ip: Ipv4Addr) -> Self {
        Self {
            name: name.into(),
            hostname: hostname.into(),
            ip,
        }
    }
}

/// A service as seen on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service name (what `SERVICE` and `tasks.SERVICE` resolve).
    pub name: String,
    /// The service's virtual IP on this network (`--endpoint-mode vip`).
    pub vip: Option<Ipv4Addr>,
    /// `--endpoint-mode dnsrr`: `SERVICE` answers the task IPs instead of a VIP. A service
    /// without a VIP behaves the same way (there is nothing else to answer).
    pub dnsrr: bool,
    /// The running tasks on this network.
    pub tasks: Vec<TaskRecord>,
}

impl ServiceRecord {
    /// A service with a VIP (`dnsrr == false`) or in DNS round-robin mode.
    pub fn new(name: impl Into<String>, vip: Option<Ipv4Addr>, dnsrr: bool) -> Self {
        Self {
            name: name.into(),
            vip,
            dnsrr,
            tasks: Vec::new(),
        }
    }

    /// Whether `SERVICE` answers the VIP (else the task IPs).
    pub fn answers_vip(&self) -> Option<Ipv4Addr> {
        if self.dnsrr {
            None
        } else {
            self.vip
        }
    }
}

/// Who put an index entry there, so that removing one owner never removes another's entry
/// (an IP can be reused by a new task before the old one's removal arrives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// A task, by lowercased full name.
    Task(Arc<str>),
    /// A service's VIP, by lowercased service name.
    Service(Arc<str>),
}

/// An entry of the name index (task full name or hostname -> IP).
#[derive(Debug, Clone)]
pub(crate) struct HostEntry {
    pub(crate) ip: Ipv4Addr,
    pub(crate) owner: Arc<str>,
}

/// An entry of the reverse index (IP -> name).
#[derive(Debug, Clone)]
pub(crate) struct PtrEntry {
    pub(crate) target: Arc<str>,
    pub(crate) owner: Owner,
}

/// What one network holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetworkRecords {
    /// Lowercased service name -> service.
    services: HashMap<String, Arc<ServiceRecord>>,
    /// Lowercased task name or hostname -> addresses (usually one).
    hosts: HashMap<String, Vec<HostEntry>>,
    /// Address -> names (usually one).
    ptr: HashMap<Ipv4Addr, Vec<PtrEntry>>,
}

impl NetworkRecords {
    fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub(crate) fn service(&self, key: &str) -> Option<&ServiceRecord> {
        self.services.get(key).map(|s| &**s)
    }

    pub(crate) fn hosts(&self, key: &str) -> &[HostEntry] {
        self.hosts.get(key).map_or(&[], |v| v.as_slice())
    }

    pub(crate) fn ptr(&self, ip: Ipv4Addr) -> &[PtrEntry] {
        self.ptr.get(&ip).map_or(&[], |v| v.as_slice())
    }

    fn index_task(&mut self, task: &TaskRecord) {
        let owner: Arc<str> = Arc::from(task.name.to_ascii_lowercase());
        for key in [&task.name, &task.hostname] {
            if key.is_empty() {
                continue;
            }
            let entries = self.hosts.entry(key.to_ascii_lowercase()).or_default();
            if !entries.iter().any(|e| e.owner == owner && e.ip == task.ip) {
                entries.push(HostEntry {
                    ip: task.ip,
                    owner: owner.clone(),
                });
            }
        }
        self.ptr.entry(task.ip).or_default().push(PtrEntry {
            target: Arc::from(task.name.as_str()),
            owner: Owner::Task(owner),
        });
    }

    fn unindex_task(&mut self, task: &TaskRecord) {
        let owner = task.name.to_ascii_lowercase();
        for key in [&task.name, &task.hostname] {
            if key.is_empty() {
                continue;
            }
            let key = key.to_ascii_lowercase();
            if let Some(entries) = self.hosts.get_mut(&key) {
                entries.retain(|e| !(*e.owner == *owner && e.ip == task.ip));
                if entries.is_empty() {
                    self.hosts.remove(&key);
                }
            }
        }
        self.remove_ptr(task.ip, |o| matches!(o, Owner::Task(t) if **t == *owner));
    }

    fn index_vip(&mut self, name: &str, vip: Option<Ipv4Addr>) {
        if let Some(vip) = vip {
            self.ptr.entry(vip).or_default().push(PtrEntry {
                target: Arc::from(name),
                owner: Owner::Service(Arc::from(name.to_ascii_lowercase())),
            });
        }
    }

    fn unindex_vip(&mut self, name: &str, vip: Option<Ipv4Addr>) {
        if let Some(vip) = vip {
            let key = name.to_ascii_lowercase();
            self.remove_ptr(vip, |o| matches!(o, Owner::Service(s) if **s == *key));
        }
    }

    fn remove_ptr(&mut self, ip: Ipv4Addr, is_owner: impl Fn(&Owner) -> bool) {
        if let Some(entries) = self.ptr.get_mut(&ip) {
            // Remove one matching entry: the same owner may have indexed the IP twice only
            // through a bug elsewhere, and then each removal undoes one insertion.
            if let Some(pos) = entries.iter().position(|e| is_owner(&e.owner)) {
                entries.remove(pos);
            }
            if entries.is_empty() {
                self.ptr.remove(&ip);
            }
        }
    }

    /// The service entry for `name`, created (no VIP, no tasks) if absent.
    fn service_mut(&mut self, name: &str) -> &mut ServiceRecord {
        let svc = self
            .services
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Arc::new(ServiceRecord::new(name, None, false)));
        Arc::make_mut(svc)
    }
}

/// The whole record set: per network id, its services and tasks.
#[derive(Debug, Clone, Default)]
pub struct Records {
    networks: HashMap<String, Arc<NetworkRecords>>,
}

impl Records {
    /// An empty record set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no network holds any service.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.networks.clear();
    }

    /// The ids of the networks that hold at least one service.
    pub fn network_ids(&self) -> impl Iterator<Item = &str> {
        self.networks.keys().map(String::as_str)
    }

    /// The services of a network (in no particular order).
    pub fn services(&self, network_id: &str) -> impl Iterator<Item = &ServiceRecord> {
        self.networks
            .get(network_id)
            .into_iter()
            .flat_map(|n| n.services.values().map(|s| &**s))
    }

    /// One service on one network (name case-insensitive).
    pub fn service(&self, network_id: &str, name: &str) -> Option<&ServiceRecord> {
        self.networks
            .get(network_id)?
            .service(&name.to_ascii_lowercase())
    }

    pub(crate) fn network(&self, network_id: &str) -> Option<&NetworkRecords> {
        self.networks.get(network_id).map(|n| &**n)
    }

    fn network_mut(&mut self, network_id: &str) -> &mut NetworkRecords {
        let net = self.networks.entry(network_id.to_string()).or_default();
        Arc::make_mut(net)
    }

    /// Drops a network's entry if it holds nothing any more.
    fn prune(&mut self, network_id: &str) {
        if self.networks.get(network_id).is_some_and(|n| n.is_empty()) {
            self.networks.remove(network_id);
        }
    }

    /// Creates or updates a service's VIP and endpoint mode on a network, keeping its tasks.
    pub fn upsert_service(
        &mut self,
        network_id: &str,
        name: &str,
        vip: Option<Ipv4Addr>,
        dnsrr: bool,
    ) {
        let net = self.network_mut(network_id);
        let svc = net.service_mut(name);
        let (old_name, old_vip) = (std::mem::replace(&mut svc.name, name.to_string()), svc.vip);
        svc.vip = vip;
        svc.dnsrr = dnsrr;
        net.unindex_vip(&old_name, old_vip);
        net.index_vip(name, vip);
    }

    /// Replaces a whole service entry (VIP, mode and tasks) on a network.
    pub fn put_service(&mut self, network_id: &str, service: ServiceRecord) {
        let ServiceRecord {
            name,
            vip,
            dnsrr,
            tasks,
        } = service;
        self.upsert_service(network_id, &name, vip, dnsrr);
        self.set_tasks(network_id, &name, tasks);
    }

    /// Removes a service (its VIP, tasks and their names) from a network. Returns whether it
    /// was there.
    pub fn remove_service(&mut self, network_id: &str, name: &str) -> bool {
        let key = name.to_ascii_lowercase();
        let Some(net) = self.networks.get_mut(network_id) else {
            return false;
        };
        if !net.services.contains_key(&key) {
            return false;
        }
        let net = Arc::make_mut(net);
        if let Some(svc) = net.services.remove(&key) {
            net.unindex_vip(&svc.name, svc.vip);
            for t in &svc.tasks {
                net.unindex_task(t);
            }
        }
        self.prune(network_id);
        true
    }

    /// Replaces the running tasks of a service on a network (creating the service entry,
    /// without a VIP, if it is not known yet). Tasks with the same name (case-insensitive)
    /// are deduplicated, the last one wins.
    pub fn set_tasks(&mut self, network_id: &str, service: &str, tasks: Vec<TaskRecord>) {
        let mut deduped: Vec<TaskRecord> = Vec::with_capacity(tasks.len());
        for t in tasks {
            match deduped
                .iter_mut()
                .find(|d| d.name.eq_ignore_ascii_case(&t.name))
            {
                Some(d) => *d = t,
                None => deduped.push(t),
            }
        }
        let net = self.network_mut(network_id);
        let old = std::mem::take(&mut net.service_mut(service).tasks);
        for t in &old {
            net.unindex_task(t);
        }
        for t in &deduped {
            net.index_task(t);
        }
        net.service_mut(service).tasks = deduped;
    }

    /// Adds a running task to a service on a network, or replaces the task of the same name.
    pub fn upsert_task(&mut self, network_id: &str, service: &str, task: TaskRecord) {
        let net = self.network_mut(network_id);
        let svc = net.service_mut(service);
        let old = svc
            .tasks
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(&task.name))
            .map(|pos| svc.tasks.remove(pos));
        svc.tasks.push(task.clone());
        if let Some(old) = old {
            net.unindex_task(&old);
        }
        net.index_task(&task);
    }

    /// Removes a task (by full name, case-insensitive) from a service on a network. Returns
    /// whether it was there. The service entry stays (with its VIP), even without tasks.
    pub fn remove_task(&mut self, network_id: &str, service: &str, task_name: &str) -> bool {
        let key = service.to_ascii_lowercase();
        let present = self
            .networks
            .get(network_id)
            .and_then(|n| n.services.get(&key))
            .is_some_and(|s| {
                s.tasks
                    .iter()
                    .any(|t| t.name.eq_ignore_ascii_case(task_name))
            });
        if !present {
            return false;
        }
        let net = self.network_mut(network_id);
        let svc = net.service_mut(service);
        let mut removed = Vec::new();
        svc.tasks.retain(|t| {
            if t.name.eq_ignore_ascii_case(task_name) {
                removed.push(t.clone());
                false
            } else {
                true
            }
        });
        for t in &removed {
            net.unindex_task(t);
        }
        true
    }

    /// Removes a network and everything on it. Returns whether it held anything.
    pub fn remove_network(&mut self, network_id: &str) -> bool {
        self.networks.remove(network_id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn hosts(r: &Records, net: &str, key: &str) -> Vec<Ipv4Addr> {
        r.network(net)
            .map(|n| n.hosts(key).iter().map(|e| e.ip).collect())
            .unwrap_or_default()
    }

    fn ptr(r: &Records, net: &str, a: &str) -> Vec<String> {
        r.network(net)
            .map(|n| n.ptr(ip(a)).iter().map(|e| e.target.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn indexes_follow_patches() {
        let mut r = Records::new();
        r.upsert_service("n1", "Web", Some(ip("10.0.0.2")), false);
        r.upsert_task(
            "n1",
            "web",
            TaskRecord::new("web.1.abc", "abcdef012345", ip("10.0.0.5")),
        );
        assert_eq!(hosts(&r, "n1", "web.1.abc"), vec![ip("10.0.0.5")]);
        assert_eq!(hosts(&r, "n1", "abcdef012345"), vec![ip("10.0.0.5")]);
        assert_eq!(ptr(&r, "n1", "10.0.0.5"), vec!["web.1.abc"]);
        assert_eq!(ptr(&r, "n1", "10.0.0.2"), vec!["Web"]);

        // Moving the VIP re-indexes it; the tasks stay.
        r.upsert_service("n1", "WEB", Some(ip("10.0.0.3")), false);
        assert!(ptr(&r, "n1", "10.0.0.2").is_empty());
        assert_eq!(ptr(&r, "n1", "10.0.0.3"), vec!["WEB"]);
        assert_eq!(r.service("n1", "web").map(|s| s.tasks.len()), Some(1));

        // Replacing a task with a new IP.
        r.upsert_task(
            "n1",
            "web",
            TaskRecord::new("WEB.1.ABC", "abcdef012345", ip("10.0.0.6")),
        );
        assert_eq!(hosts(&r, "n1", "web.1.abc"), vec![ip("10.0.0.6")]);
        assert!(ptr(&r, "n1", "10.0.0.5").is_empty());

        assert!(r.remove_task("n1", "web", "web.1.abc"));
        assert!(!r.remove_task("n1", "web", "web.1.abc"));
        assert!(hosts(&r, "n1", "abcdef012345").is_empty());
        assert!(ptr(&r, "n1", "10.0.0.6").is_empty());
        assert!(r.service("n1", "web").is_some());

        assert!(r.remove_service("n1", "web"));
        assert!(ptr(&r, "n1", "10.0.0.3").is_empty());
        assert!(r.is_empty());
    }

    #[test]
    fn ip_reuse_does_not_lose_the_new_owner() {
        let mut r = Records::new();
        r.upsert_task("n", "a", TaskRecord::new("a.1.x", "x", ip("10.0.0.9")));
        // The IP is handed to a new task before the old one's removal arrives.
        r.upsert_task("n", "b", TaskRecord::new("b.1.y", "y", ip("10.0.0.9")));
        assert!(r.remove_task("n", "a", "a.1.x"));
        assert_eq!(ptr(&r, "n", "10.0.0.9"), vec!["b.1.y"]);
        assert_eq!(hosts(&r, "n", "y"), vec![ip("10.0.0.9")]);
    }

    #[test]
    fn set_tasks_replaces_and_dedups() {
        let mut r = Records::new();
        r.set_tasks(
            "n",
            "s",
            vec![
                TaskRecord::new("s.1.a", "a", ip("10.0.0.1")),
                TaskRecord::new("s.2.b", "b", ip("10.0.0.2")),
                TaskRecord::new("S.2.B", "b", ip("10.0.0.3")),
            ],
        );
        let svc = r.service("n", "s").unwrap();
        assert_eq!(svc.tasks.len(), 2);
        assert_eq!(hosts(&r, "n", "b"), vec![ip("10.0.0.3")]);
        r.set_tasks(
            "n",
            "s",
            vec![TaskRecord::new("s.3.c", "c", ip("10.0.0.4"))],
        );
        assert!(hosts(&r, "n", "a").is_empty());
        assert!(hosts(&r, "n", "b").is_empty());
        assert!(ptr(&r, "n", "10.0.0.3").is_empty());
        assert_eq!(hosts(&r, "n", "s.3.c"), vec![ip("10.0.0.4")]);
    }

    #[test]
    fn snapshots_are_copy_on_write() {
        let mut r = Records::new();
        r.put_service(
            "n",
            ServiceRecord {
                name: "s".into(),
                vip: Some(ip("10.0.0.2")),
                dnsrr: false,
                tasks: vec![TaskRecord::new("s.1.a", "a", ip("10.0.0.1"))],
            },
        );
        let snapshot = r.clone();
        r.remove_task("n", "s", "s.1.a");
        assert_eq!(snapshot.service("n", "s").unwrap().tasks.len(), 1);
        assert_eq!(hosts(&snapshot, "n", "a"), vec![ip("10.0.0.1")]);
        assert!(hosts(&r, "n", "a").is_empty());
    }
}
