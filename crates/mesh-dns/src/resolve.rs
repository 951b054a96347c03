//! Name resolution over [`Records`] as seen from one task: which cluster names exist, what
//! they answer, and which names are not ours (and so are forwarded).
//!
//! A task sees the networks it is attached to, in the order it was registered with (the
//! first network that has an answer wins, as in libnetwork). For a lowercased query name
//! without the trailing dot, on each network in turn:
//!
//! 1. `SERVICE` -> the service's VIP, or, in dnsrr mode (or without a VIP), its task IPs;
//! 2. `tasks.SERVICE` -> the task IPs;
//! 3. a task's full name (`web.1.<id>`) or hostname -> that task's IP;
//!
//! then the same with a `.NETWORK` suffix stripped, looking only in that network; then all
//! of it again with each search domain stripped (a client that appends its search domain,
//! `web.example.com`, still gets `web`). A name that exists but has no address right now
//! (a service scaled to zero) answers NOERROR with no records, never NXDOMAIN: a negative
//! answer would be cached and outlive the service's next task (moby #53141). Reverse names
//! (`d.c.b.a.in-addr.arpa`) of task IPs answer the task's full name, of VIPs the service
//! name. Everything else is not ours and goes upstream.
//!
//! # TTLs
//!
//! Docker answers with TTL 600, so clients and caching stubs keep dead task IPs for ten
//! minutes after a scale-down or update (moby #29529, #26772, #42833). This engine sits on
//! the same host as the client and answers from memory in microseconds, so caching buys
//! nothing and staleness costs connections to dead tasks. Defaults ([`Ttls::default`]):
//!
//! - `tasks.SERVICE` and dnsrr `SERVICE` answers: **0 s**. The set changes with every task
//!   start/stop and the per-answer shuffle is the load balancing; any caching defeats both.
//! - task names and hostnames: **5 s**. A task's IP is fixed for its life, and the name
//!   disappears with it; 5 s bounds how long a stopped task can still be reached by name.
//! - `SERVICE` answering a VIP: **10 s**. A VIP lives as long as the service and outlives
//!   every task, so it is the one answer worth a little caching; 10 s still lets a removed
//!   and re-created service be found quickly.
//! - PTR: **5 s**, as for task names.
//!
//! Empty (NODATA) answers carry no SOA, so RFC 2308 resolvers do not cache them at all.

use std::net::Ipv4Addr;
use std::sync::Arc;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::records::Records;

/// TTLs (seconds) of the answers the engine makes itself. See the module docs for why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ttls {
    /// `SERVICE` answered with its VIP.
    pub vip: u32,
    /// `tasks.SERVICE`, and `SERVICE` in dnsrr mode: the shuffled task IPs.
    pub tasks: u32,
    /// A task's full name or hostname.
    pub host: u32,
    /// Reverse (PTR) answers.
    pub ptr: u32,
}

impl Default for Ttls {
    fn default() -> Self {
        Self {
            vip: 10,
            tasks: 0,
            host: 5,
            ptr: 5,
        }
    }
}

/// A network as one task sees it: its id (the key into [`Records`]) and its lowercased name
/// (for `NAME.NETWORK`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetRef {
    pub(crate) id: String,
    pub(crate) name: String,
}

impl NetRef {
    pub(crate) fn list(networks: &[(String, String)]) -> Arc<[NetRef]> {
        networks
            .iter()
            .map(|(id, name)| NetRef {
                id: id.clone(),
                name: name.trim_end_matches('.').to_ascii_lowercase(),
            })
            .collect()
    }
}

/// What kind of record a query asks for, as far as resolution cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// A (or ANY).
    A,
    /// PTR (or ANY).
    Ptr,
    /// ANY: whatever the name has.
    Any,
    /// Anything else (AAAA, MX, TXT, ...): the engine has none of these.
    Other,
}

/// The outcome of resolving one name locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// Address records (already shuffled where that applies).
    A { ips: Vec<Ipv4Addr>, ttl: u32 },
    /// Reverse records: fully-qualified target names without the trailing dot.
    Ptr { names: Vec<String>, ttl: u32 },
    /// The name is ours but has no record of the asked type right now: NOERROR, empty.
    NoData,
    /// Not a cluster name: forward it.
    NotLocal,
}

/// A name match: the addresses (possibly none) and their TTL.
struct Found {
    ips: Vec<Ipv4Addr>,
    ttl: u32,
    shuffle: bool,
}

/// Resolves `key` (lowercased, no trailing dot) as seen from a task on `nets`.
pub(crate) fn resolve(
    records: &Records,
    nets: &[NetRef],
    search: &[String],
    key: &str,
    want: Want,
    ttls: &Ttls,
) -> Resolution {
    if let Some(ip) = parse_in_addr_arpa(key) {
        return match lookup_ptr(records, nets, ip) {
            None => Resolution::NotLocal,
            Some(names) => match want {
                Want::Ptr | Want::Any => Resolution::Ptr {
                    names,
                    ttl: ttls.ptr,
                },
                Want::A | Want::Other => Resolution::NoData,
            },
        };
    }
    let mut found = lookup(records, nets, key, ttls);
    if found.is_none() {
        for domain in search {
            let stripped = key
                .strip_suffix(domain.as_str())
                .and_then(|k| k.strip_suffix('.'))
                .filter(|k| !k.is_empty());
            if let Some(k) = stripped {
                found = lookup(records, nets, k, ttls);
                if found.is_some() {
                    break;
                }
            }
        }
    }
    let Some(mut found) = found else {
        return Resolution::NotLocal;
    };
    match want {
        Want::A | Want::Any if !found.ips.is_empty() => {
            if found.shuffle {
                found.ips.shuffle(&mut rand::thread_rng());
            }
            Resolution::A {
                ips: found.ips,
                ttl: found.ttl,
            }
        }
        _ => Resolution::NoData,
    }
}

/// The first network (exact name first, then `NAME.NETWORK`) with addresses for `key`; or,
/// when the name exists but has none anywhere, an empty match.
fn lookup(records: &Records, nets: &[NetRef], key: &str, ttls: &Ttls) -> Option<Found> {
    let mut empty: Option<Found> = None;
    let exact = nets.iter().map(|n| (n, key));
    let scoped = nets.iter().filter_map(|n| {
        key.strip_suffix(n.name.as_str())
            .and_then(|k| k.strip_suffix('.'))
            .filter(|k| !k.is_empty() && !n.name.is_empty())
            .map(|k| (n, k))
    });
    for (net, name) in exact.chain(scoped) {
        if let Some(f) = lookup_in(records, &net.id, name, ttls) {
            if !f.ips.is_empty() {
                return Some(f);
            }
            empty.get_or_insert(f);
        }
    }
    empty
}

/// `name` on one network.
fn lookup_in(records: &Records, net_id: &str, name: &str, ttls: &Ttls) -> Option<Found> {
    let net = records.network(net_id)?;
    let task_ips = |svc: &crate::records::ServiceRecord| Found {
        ips: svc.tasks.iter().map(|t| t.ip).collect(),
        ttl: ttls.tasks,
        shuffle: true,
    };
    if let Some(svc) = net.service(name) {
        return Some(match svc.answers_vip() {
            Some(vip) => Found {
                ips: vec![vip],
                ttl: ttls.vip,
                shuffle: false,
            },
            None => task_ips(svc),
        });
    }
    if let Some(svc) = name.strip_prefix("tasks.").and_then(|s| net.service(s)) {
        return Some(task_ips(svc));
    }
    let hosts = net.hosts(name);
    if hosts.is_empty() {
        return None;
    }
    let mut ips: Vec<Ipv4Addr> = Vec::with_capacity(hosts.len());
    for h in hosts {
        if !ips.contains(&h.ip) {
            ips.push(h.ip);
        }
    }
    Some(Found {
        ips,
        ttl: ttls.host,
        shuffle: true,
    })
}

/// The names of `ip` on the first of `nets` that knows it.
fn lookup_ptr(records: &Records, nets: &[NetRef], ip: Ipv4Addr) -> Option<Vec<String>> {
    for net in nets {
        let Some(n) = records.network(&net.id) else {
            continue;
        };
        let entries = n.ptr(ip);
        if entries.is_empty() {
            continue;
        }
        let mut names: Vec<String> = Vec::with_capacity(entries.len());
        for e in entries {
            if !names.iter().any(|x| x.eq_ignore_ascii_case(&e.target)) {
                names.push(e.target.to_string());
            }
        }
        return Some(names);
    }
    None
}

/// `d.c.b.a.in-addr.arpa` -> `a.b.c.d` (only full four-label IPv4 reverse names).
pub(crate) fn parse_in_addr_arpa(key: &str) -> Option<Ipv4Addr> {
    let rest = key.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut labels = rest.split('.');
    for slot in octets.iter_mut().rev() {
        let label = labels.next()?;
        if label.is_empty() || label.len() > 3 || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = label.parse().ok()?;
    }
    if labels.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// The lookup key of a wire name: labels lowercased and joined with dots, no trailing dot.
/// `None` for names that cannot be a cluster name (non-UTF-8 or a dot inside a label);
/// those are forwarded untouched.
pub(crate) fn name_key<'a>(labels: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    let mut key = String::new();
    for (i, label) in labels.enumerate() {
        let s = std::str::from_utf8(label).ok()?;
        if s.contains('.') {
            return None;
        }
        if i > 0 {
            key.push('.');
        }
        key.push_str(&s.to_ascii_lowercase());
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::TaskRecord;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Two networks: `front` (id n1) has web (VIP) and api (dnsrr); `back` (id n2) has web
    /// with another VIP and db (VIP, no tasks); `other` (id n3) has secret.
    fn records() -> Records {
        let mut r = Records::new();
        r.upsert_service("n1", "web", Some(ip("10.0.1.2")), false);
        r.set_tasks(
            "n1",
            "web",
            vec![
                TaskRecord::new("web.1.aaaaaaaaaaaaxyz", "aaaaaaaaaaaa", ip("10.0.1.10")),
                TaskRecord::new("web.2.bbbbbbbbbbbbxyz", "bbbbbbbbbbbb", ip("10.0.1.11")),
                TaskRecord::new("web.3.ccccccccccccxyz", "cccccccccccc", ip("10.0.1.12")),
            ],
        );
        r.upsert_service("n1", "Api", None, true);
        r.set_tasks(
            "n1",
            "api",
            vec![
                TaskRecord::new("api.1.dddd", "dddd", ip("10.0.1.20")),
                TaskRecord::new("api.2.eeee", "eeee", ip("10.0.1.21")),
            ],
        );
        r.upsert_service("n2", "web", Some(ip("10.0.2.2")), false);
        r.set_tasks(
            "n2",
            "web",
            vec![TaskRecord::new(
                "web.1.aaaaaaaaaaaaxyz",
                "aaaaaaaaaaaa",
                ip("10.0.2.10"),
            )],
        );
        r.upsert_service("n2", "db", Some(ip("10.0.2.3")), false);
        r.upsert_service("n2", "cache", None, true);
        r.upsert_service("n3", "secret", Some(ip("10.0.3.2")), false);
        r
    }

    fn nets(list: &[(&str, &str)]) -> Arc<[NetRef]> {
        let v: Vec<(String, String)> = list
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        NetRef::list(&v)
    }

    fn both() -> Arc<[NetRef]> {
        nets(&[("n1", "front"), ("n2", "Back")])
    }

    fn a(r: &Records, n: &[NetRef], key: &str) -> Resolution {
        resolve(r, n, &[], key, Want::A, &Ttls::default())
    }

    fn sorted_ips(res: Resolution) -> (Vec<Ipv4Addr>, u32) {
        match res {
            Resolution::A { mut ips, ttl } => {
                ips.sort();
                (ips, ttl)
            }
            other => panic!("expected A, got {other:?}"),
        }
    }

    #[test]
    fn service_answers_vip() {
        let r = records();
        assert_eq!(
            a(&r, &both(), "web"),
            Resolution::A {
                ips: vec![ip("10.0.1.2")],
                ttl: 10
            }
        );
        // Network order decides: seen from back first, web is back's VIP.
        let back_first = nets(&[("n2", "back"), ("n1", "front")]);
        assert_eq!(
            a(&r, &back_first, "web"),
            Resolution::A {
                ips: vec![ip("10.0.2.2")],
                ttl: 10
            }
        );
    }

    #[test]
    fn dnsrr_and_tasks_answer_task_ips() {
        let r = records();
        let (ips, ttl) = sorted_ips(a(&r, &both(), "api"));
        assert_eq!(ips, vec![ip("10.0.1.20"), ip("10.0.1.21")]);
        assert_eq!(ttl, 0);
        let (ips, ttl) = sorted_ips(a(&r, &both(), "tasks.web"));
        assert_eq!(ips, vec![ip("10.0.1.10"), ip("10.0.1.11"), ip("10.0.1.12")]);
        assert_eq!(ttl, 0);
        let (ips, _) = sorted_ips(a(&r, &both(), "tasks.api"));
        assert_eq!(ips.len(), 2);
    }

    #[test]
    fn tasks_answers_are_shuffled() {
        let r = records();
        let mut orders = std::collections::HashSet::new();
        for _ in 0..200 {
            if let Resolution::A { ips, .. } = a(&r, &both(), "tasks.web") {
                orders.insert(ips);
            }
        }
        // 3! = 6 orders; 200 draws see more than one with overwhelming probability.
        assert!(orders.len() > 1, "never shuffled: {orders:?}");
    }

    #[test]
    fn task_names_and_hostnames() {
        let r = records();
        assert_eq!(
            a(&r, &both(), "web.2.bbbbbbbbbbbbxyz"),
            Resolution::A {
                ips: vec![ip("10.0.1.11")],
                ttl: 5
            }
        );
        assert_eq!(
            a(&r, &both(), "cccccccccccc"),
            Resolution::A {
                ips: vec![ip("10.0.1.12")],
                ttl: 5
            }
        );
    }

    #[test]
    fn network_suffix_restricts() {
        let r = records();
        assert_eq!(
            a(&r, &both(), "web.back"),
            Resolution::A {
                ips: vec![ip("10.0.2.2")],
                ttl: 10
            }
        );
        assert_eq!(
            a(&r, &both(), "web.front"),
            Resolution::A {
                ips: vec![ip("10.0.1.2")],
                ttl: 10
            }
        );
        let (ips, _) = sorted_ips(a(&r, &both(), "tasks.web.back"));
        assert_eq!(ips, vec![ip("10.0.2.10")]);
        assert_eq!(
            a(&r, &both(), "aaaaaaaaaaaa.back"),
            Resolution::A {
                ips: vec![ip("10.0.2.10")],
                ttl: 5
            }
        );
        // api is not on back.
        assert_eq!(a(&r, &both(), "api.back"), Resolution::NotLocal);
    }

    #[test]
    fn scoping_hides_other_networks() {
        let r = records();
        assert_eq!(a(&r, &both(), "secret"), Resolution::NotLocal);
        assert_eq!(a(&r, &both(), "secret.other"), Resolution::NotLocal);
        let only_front = nets(&[("n1", "front")]);
        assert_eq!(a(&r, &only_front, "db"), Resolution::NotLocal);
        assert_eq!(a(&r, &[], "web"), Resolution::NotLocal);
    }

    #[test]
    fn existing_names_without_addresses_are_nodata() {
        let r = records();
        // cache is dnsrr with no running task; tasks.db has none either.
        assert_eq!(a(&r, &both(), "cache"), Resolution::NoData);
        assert_eq!(a(&r, &both(), "tasks.db"), Resolution::NoData);
    }

    #[test]
    fn other_types_of_existing_names_are_nodata() {
        let r = records();
        for key in [
            "web",
            "tasks.web",
            "api",
            "web.1.aaaaaaaaaaaaxyz",
            "web.back",
        ] {
            assert_eq!(
                resolve(&r, &both(), &[], key, Want::Other, &Ttls::default()),
                Resolution::NoData,
                "{key}"
            );
        }
        assert_eq!(
            resolve(&r, &both(), &[], "nope", Want::Other, &Ttls::default()),
            Resolution::NotLocal
        );
        assert!(matches!(
            resolve(&r, &both(), &[], "web", Want::Any, &Ttls::default()),
            Resolution::A { .. }
        ));
    }

    #[test]
    fn search_domains_are_stripped() {
        let r = records();
        let search = vec!["corp.example".to_string()];
        assert_eq!(
            resolve(
                &r,
                &both(),
                &search,
                "web.corp.example",
                Want::A,
                &Ttls::default()
            ),
            Resolution::A {
                ips: vec![ip("10.0.1.2")],
                ttl: 10
            }
        );
        assert_eq!(
            resolve(
                &r,
                &both(),
                &search,
                "www.corp.example",
                Want::A,
                &Ttls::default()
            ),
            Resolution::NotLocal
        );
        assert_eq!(
            resolve(
                &r,
                &both(),
                &search,
                "corp.example",
                Want::A,
                &Ttls::default()
            ),
            Resolution::NotLocal
        );
    }

    #[test]
    fn ptr_for_tasks_and_vips() {
        let r = records();
        let ptr = |key: &str| resolve(&r, &both(), &[], key, Want::Ptr, &Ttls::default());
        assert_eq!(
            ptr("11.1.0.10.in-addr.arpa"),
            Resolution::Ptr {
                names: vec!["web.2.bbbbbbbbbbbbxyz".into()],
                ttl: 5
            }
        );
        assert_eq!(
            ptr("2.1.0.10.in-addr.arpa"),
            Resolution::Ptr {
                names: vec!["web".into()],
                ttl: 5
            }
        );
        assert_eq!(
            ptr("20.1.0.10.in-addr.arpa"),
            Resolution::Ptr {
                names: vec!["api.1.dddd".into()],
                ttl: 5
            }
        );
        // Other networks' and unknown IPs go upstream.
        assert_eq!(ptr("2.3.0.10.in-addr.arpa"), Resolution::NotLocal);
        assert_eq!(ptr("8.8.8.8.in-addr.arpa"), Resolution::NotLocal);
        // A known reverse name asked for A: exists, no data.
        assert_eq!(
            resolve(
                &r,
                &both(),
                &[],
                "2.1.0.10.in-addr.arpa",
                Want::A,
                &Ttls::default()
            ),
            Resolution::NoData
        );
    }

    #[test]
    fn arpa_parsing() {
        assert_eq!(
            parse_in_addr_arpa("4.3.2.10.in-addr.arpa"),
            Some(ip("10.2.3.4"))
        );
        assert_eq!(parse_in_addr_arpa("3.2.10.in-addr.arpa"), None);
        assert_eq!(parse_in_addr_arpa("5.4.3.2.10.in-addr.arpa"), None);
        assert_eq!(parse_in_addr_arpa("256.3.2.10.in-addr.arpa"), None);
        assert_eq!(parse_in_addr_arpa("+4.3.2.10.in-addr.arpa"), None);
        assert_eq!(parse_in_addr_arpa("in-addr.arpa"), None);
    }

    #[test]
    fn name_keys() {
        let labels: Vec<&[u8]> = vec![b"Tasks", b"WEB"];
        assert_eq!(name_key(labels.into_iter()).as_deref(), Some("tasks.web"));
        let bad: Vec<&[u8]> = vec![b"a.b", b"c"];
        assert_eq!(name_key(bad.into_iter()), None);
        let bin: Vec<&[u8]> = vec![&[0xff, 0xfe]];
        assert_eq!(name_key(bin.into_iter()), None);
    }
}
