//! The nftables scripts, as pure functions of the configuration, the desired state and what
//! the kernel holds (so they are unit-tested without a kernel). Every script is given to
//! `nft -f -` whole: one atomic transaction, all of it or nothing.
//!
//! [`plan`] turns (desired, kernel) into at most three scripts, run in this order: sandbox
//! additions and updates, host, sandbox removals. Each holds only what differs: a new port is
//! a chain, a rule and a map element; new backends are one rule inserted at the head of the
//! port's chain; a removed port is an element and a chain deleted. Nothing is rebuilt whole:
//! a change costs what changed. With `base`, the scripts also (re)create the tables, sets and
//! base chains (`add` does not fail on existing objects) and rewrite the base chains' rules
//! (flush and re-add in the same transaction): that is setup, after a restart too.
//!
//! # Why a new rule goes in front of the old one (shadow rules)
//!
//! A transaction is atomic for the rules a packet walks (the kernel picks the rule blob of
//! one generation when the packet enters a base chain), but a set lookup reads the generation
//! again when it runs. Replacing a port's rule (flush + add) deletes the old rule's anonymous
//! `numgen` map with it: a packet that started on the old rule just before the commit can then
//! look up that map just after it, find nothing, fall through, get no DNAT and be refused by
//! the sandbox's own stack. That happened about once per few hundred changes under load.
//! So a change *inserts* the new rule at the head of the chain and deletes only the rules
//! behind the old head (the shadows): the old head, with its map, stays until the next change.
//! A packet on the old blob reaches the old head, whose map is still live; a packet on the new
//! blob reaches the new head. Both rules end in `dnat` or `reject`, so a shadow is never
//! reached. Base chain rules have no anonymous sets (hence two host-mode rules, one per
//! protocol, rather than `meta l4proto { tcp, udp }`), so rewriting them is safe.
//!
//! Both tables are `ip mesh_ingress` (one in the host namespace, one in the sandbox).
//!
//! Host table:
//!
//! ```text
//! table ip mesh_ingress {
//!   set published  { type inet_proto . inet_service }                            # ingress ports
//!   map host_ports { type inet_proto . inet_service : ipv4_addr . inet_service } # host mode
//!   chain prerouting  { type nat hook prerouting priority dstnat;  fib daddr type local jump ingress }
//!   chain output      { type nat hook output priority -100;        fib daddr type local jump ingress }
//!   chain ingress {
//!     meta l4proto . th dport @published dnat to 169.254.77.2
//!     meta l4proto tcp dnat ip addr . port to meta l4proto . th dport map @host_ports
//!     meta l4proto udp dnat ip addr . port to meta l4proto . th dport map @host_ports
//!   }
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!                       oifname "mesh_ingr0" ip saddr 127.0.0.0/8 masquerade }
//!   chain forward     { type filter hook forward priority filter;
//!                       iifname "mesh_ingr0" accept; oifname "mesh_ingr0" accept }
//! }
//! ```
//!
//! Sandbox table:
//!
//! ```text
//! table ip mesh_ingress {
//!   map ports { type inet_proto . inet_service : verdict }        # tcp . 30080 : goto p_tcp_30080
//!   chain prerouting  { type nat hook prerouting priority dstnat;
//!                       iifname "mi0" meta l4proto . th dport vmap @ports }
//!   chain p_tcp_30080 { meta l4proto tcp dnat to numgen random mod 3
//!                         map { 0 : 10.0.0.5, 1 : 10.0.0.6, 2 : 10.0.0.7 } : 80 comment "target 80"
//!                       meta l4proto tcp dnat to numgen random mod 2 ... # shadow, never reached }
//!   chain p_udp_30053 { meta l4proto udp reject comment "target 53" }   # no backend
//!   chain postrouting { type nat hook postrouting priority srcnat;      # masquerade_from
//!                       oifname "eth0" ct status dnat ip saddr 172.18.0.0/16 masquerade }
//!   chain forward     { type filter hook forward priority mangle;
//!                       oifname "eth0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu }
//! }
//! ```
//!
//! The comment `target N` keeps a port's target port readable when it has no backend (the
//! reject rule has no port); the `readback` module reads the backends from the rule itself.
//! The forward rule clamps the MSS of connections entering the overlay to its MTU, so that
//! clients with a 1500-byte path do not depend on ICMP "fragmentation needed" getting back.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::readback::{HostState, SandboxState};
use crate::{HostPorts, IngressConfig, Key, Proto, Target};

/// The nftables table (family `ip`), in the host namespace and in the sandbox.
pub const TABLE: &str = "mesh_ingress";
/// Host: the set of ingress-published `proto . port`.
pub const HOST_SET: &str = "published";
/// Host: the host-mode map `proto . port : addr . port`.
pub const HOST_MAP: &str = "host_ports";
/// Sandbox: the verdict map `proto . port : goto p_<proto>_<port>`.
pub const SANDBOX_MAP: &str = "ports";
/// Prefix of the sandbox's per-port chains.
pub const PORT_CHAIN_PREFIX: &str = "p_";

/// The sandbox chain of a published port: `p_tcp_30080`.
pub fn port_chain(proto: Proto, port: u16) -> String {
    format!("{PORT_CHAIN_PREFIX}{proto}_{port}")
}

/// The head rule of a port chain: a random pick among the backends (`numgen random mod N`
/// into an anonymous map of addresses, the target port appended), or, without backends, a
/// reject (TCP reset, ICMP port unreachable for UDP) so that clients fail at once.
pub fn port_rule(proto: Proto, t: &Target) -> String {
    let verdict = if t.backends.is_empty() {
        match proto {
            Proto::Tcp => "reject with tcp reset".to_string(),
            Proto::Udp => "reject".to_string(),
        }
    } else {
        let mut map = String::new();
        for (i, ip) in t.backends.iter().enumerate() {
            if i > 0 {
                map.push_str(", ");
            }
            let _ = write!(map, "{i} : {ip}");
        }
        format!(
            "dnat to numgen random mod {} map {{ {map} }} : {}",
            t.backends.len(),
            t.target
        )
    };
    format!(
        "meta l4proto {proto} {verdict} comment \"target {}\"",
        t.target
    )
}

fn key_elem((proto, port): &Key) -> String {
    format!("{proto} . {port}")
}

/// The sandbox's table, map and base chains, with their rules rewritten.
fn sandbox_base(cfg: &IngressConfig) -> String {
    let t = TABLE;
    let mut s = format!(
        "add table ip {t}\n\
         add map ip {t} {SANDBOX_MAP} {{ type inet_proto . inet_service : verdict; }}\n\
         add chain ip {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add chain ip {t} forward {{ type filter hook forward priority mangle; policy accept; }}\n\
         flush chain ip {t} prerouting\n\
         flush chain ip {t} postrouting\n\
         flush chain ip {t} forward\n\
         add rule ip {t} prerouting iifname \"{sif}\" meta l4proto . th dport vmap @{SANDBOX_MAP}\n",
        sif = cfg.sandbox_if,
    );
    for (net, len) in &cfg.masquerade_from {
        let _ = writeln!(
            s,
            "add rule ip {t} postrouting oifname \"{iif}\" ct status dnat ip saddr {net}/{len} masquerade",
            iif = cfg.ingress_if,
        );
    }
    let _ = writeln!(
        s,
        "add rule ip {t} forward oifname \"{iif}\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu",
        iif = cfg.ingress_if,
    );
    s
}

/// The host's table, set, map and base chains, with their rules rewritten.
fn host_base(cfg: &IngressConfig) -> String {
    let t = TABLE;
    let mut s = format!(
        "add table ip {t}\n\
         add set ip {t} {HOST_SET} {{ type inet_proto . inet_service; }}\n\
         add map ip {t} {HOST_MAP} {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
         add chain ip {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain ip {t} output {{ type nat hook output priority -100; policy accept; }}\n\
         add chain ip {t} ingress\n\
         add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add chain ip {t} forward {{ type filter hook forward priority filter; policy accept; }}\n"
    );
    for chain in ["prerouting", "output", "ingress", "postrouting", "forward"] {
        let _ = writeln!(s, "flush chain ip {t} {chain}");
    }
    let _ = write!(
        s,
        "add rule ip {t} prerouting fib daddr type local jump ingress\n\
         add rule ip {t} output fib daddr type local jump ingress\n\
         add rule ip {t} ingress meta l4proto . th dport @{HOST_SET} dnat to {sbox}\n\
         add rule ip {t} ingress meta l4proto tcp dnat ip addr . port to meta l4proto . th dport map @{HOST_MAP}\n\
         add rule ip {t} ingress meta l4proto udp dnat ip addr . port to meta l4proto . th dport map @{HOST_MAP}\n\
         add rule ip {t} postrouting oifname \"{hif}\" ip saddr 127.0.0.0/8 masquerade\n\
         add rule ip {t} forward iifname \"{hif}\" accept\n\
         add rule ip {t} forward oifname \"{hif}\" accept\n",
        sbox = cfg.sandbox_addr,
        hif = cfg.host_if,
    );
    s
}

/// The scripts of one change, in the order they run; an empty one is skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sandbox: new ports, new head rules, map elements to add (run with `nft -e -a` to
    /// learn the new rules' handles).
    pub sandbox_up: String,
    /// Host: set and map elements.
    pub host: String,
    /// Sandbox: map elements and chains of ports that go.
    pub sandbox_rm: String,
}

/// What to run to move the kernel from (`sbox`, `host`) to the desired `published` and
/// `host_ports` (see the module docs). `base`: also (re)create the tables and base chains and
/// rewrite the base rules.
pub fn plan(
    cfg: &IngressConfig,
    base: bool,
    published: &BTreeMap<Key, Target>,
    host_ports: &HostPorts,
    sbox: &SandboxState,
    host: &HostState,
) -> Plan {
    let t = TABLE;
    let mut up = if base {
        sandbox_base(cfg)
    } else {
        String::new()
    };
    let mut elems_add = Vec::new();
    let mut elems_del = Vec::new();
    for (key @ (proto, port), target) in published {
        let chain = port_chain(*proto, *port);
        match sbox.chains.get(&chain) {
            None => {
                let _ = write!(
                    up,
                    "add chain ip {t} {chain}\nadd rule ip {t} {chain} {}\n",
                    port_rule(*proto, target)
                );
            }
            Some(pc) if pc.current() == Some(target) => {}
            Some(pc) => {
                let _ = writeln!(
                    up,
                    "insert rule ip {t} {chain} {}",
                    port_rule(*proto, target)
                );
                for (handle, _) in pc.rules.iter().skip(1) {
                    let _ = writeln!(up, "delete rule ip {t} {chain} handle {handle}");
                }
            }
        }
        match sbox.ports.get(key) {
            Some(c) if *c == chain => {}
            Some(_) => {
                elems_del.push(key_elem(key));
                elems_add.push(format!("{} : goto {chain}", key_elem(key)));
            }
            None => elems_add.push(format!("{} : goto {chain}", key_elem(key))),
        }
    }
    elements(&mut up, "delete", SANDBOX_MAP, &elems_del);
    elements(&mut up, "add", SANDBOX_MAP, &elems_add);

    let mut h = if base { host_base(cfg) } else { String::new() };
    let gone: Vec<String> = host
        .published
        .iter()
        .filter(|k| !published.contains_key(k))
        .map(key_elem)
        .collect();
    elements(&mut h, "delete", HOST_SET, &gone);
    let added: Vec<String> = published
        .keys()
        .filter(|k| !host.published.contains(k))
        .map(key_elem)
        .collect();
    elements(&mut h, "add", HOST_SET, &added);
    let hp_gone: Vec<String> = host
        .host_ports
        .iter()
        .filter(|(k, v)| host_ports.get(k) != Some(v))
        .map(|(k, _)| key_elem(k))
        .collect();
    elements(&mut h, "delete", HOST_MAP, &hp_gone);
    let hp_added: Vec<String> = host_ports
        .iter()
        .filter(|(k, v)| host.host_ports.get(k) != Some(v))
        .map(|(k, (ip, port))| format!("{} : {ip} . {port}", key_elem(k)))
        .collect();
    elements(&mut h, "add", HOST_MAP, &hp_added);

    let mut rm = String::new();
    let stale_elems: Vec<String> = sbox
        .ports
        .keys()
        .filter(|k| !published.contains_key(k))
        .map(key_elem)
        .collect();
    elements(&mut rm, "delete", SANDBOX_MAP, &stale_elems);
    for chain in sbox.chains.keys() {
        let wanted = published
            .keys()
            .any(|(proto, port)| port_chain(*proto, *port) == *chain);
        if !wanted {
            let _ = writeln!(rm, "delete chain ip {t} {chain}");
        }
    }
    Plan {
        sandbox_up: up,
        host: h,
        sandbox_rm: rm,
    }
}

/// Deletes the table (teardown). `nft` refuses to delete a missing table, so the caller
/// checks first.
pub fn delete_table() -> String {
    format!("delete table ip {TABLE}\n")
}

/// Appends `VERB element ip mesh_ingress SET { items }` to `out`, unless `items` is empty.
fn elements(out: &mut String, verb: &str, set: &str, items: &[String]) {
    if !items.is_empty() {
        let _ = writeln!(
            out,
            "{verb} element ip {TABLE} {set} {{ {} }}",
            items.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::readback::PortChain;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn target(port: u16, backends: &[&str]) -> Target {
        Target {
            target: port,
            backends: backends.iter().map(|b| ip(b)).collect(),
        }
    }

    #[test]
    fn port_rules() {
        assert_eq!(port_chain(Proto::Tcp, 30080), "p_tcp_30080");
        assert_eq!(
            port_rule(
                Proto::Tcp,
                &target(80, &["10.0.0.5", "10.0.0.6", "10.0.0.7"])
            ),
            "meta l4proto tcp dnat to numgen random mod 3 map \
             { 0 : 10.0.0.5, 1 : 10.0.0.6, 2 : 10.0.0.7 } : 80 comment \"target 80\""
        );
        assert_eq!(
            port_rule(Proto::Udp, &target(53, &["10.0.0.5"])),
            "meta l4proto udp dnat to numgen random mod 1 map { 0 : 10.0.0.5 } : 53 \
             comment \"target 53\""
        );
        assert_eq!(
            port_rule(Proto::Tcp, &target(80, &[])),
            "meta l4proto tcp reject with tcp reset comment \"target 80\""
        );
        assert_eq!(
            port_rule(Proto::Udp, &target(53, &[])),
            "meta l4proto udp reject comment \"target 53\""
        );
    }

    #[test]
    fn setup_from_nothing() {
        let cfg = IngressConfig::default();
        let mut published = BTreeMap::new();
        published.insert((Proto::Tcp, 30080), target(80, &["10.0.0.5", "10.0.0.6"]));
        published.insert((Proto::Udp, 30053), target(53, &[]));
        let mut hp = BTreeMap::new();
        hp.insert((Proto::Tcp, 8080), (ip("172.18.0.5"), 80));
        let p = plan(
            &cfg,
            true,
            &published,
            &hp,
            &SandboxState::default(),
            &HostState::default(),
        );
        assert_eq!(
            p.sandbox_up,
            "add table ip mesh_ingress\n\
             add map ip mesh_ingress ports { type inet_proto . inet_service : verdict; }\n\
             add chain ip mesh_ingress prerouting { type nat hook prerouting priority dstnat; policy accept; }\n\
             add chain ip mesh_ingress postrouting { type nat hook postrouting priority srcnat; policy accept; }\n\
             add chain ip mesh_ingress forward { type filter hook forward priority mangle; policy accept; }\n\
             flush chain ip mesh_ingress prerouting\n\
             flush chain ip mesh_ingress postrouting\n\
             flush chain ip mesh_ingress forward\n\
             add rule ip mesh_ingress prerouting iifname \"mi0\" meta l4proto . th dport vmap @ports\n\
             add rule ip mesh_ingress postrouting oifname \"eth0\" ct status dnat ip saddr 172.18.0.0/16 masquerade\n\
             add rule ip mesh_ingress forward oifname \"eth0\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n\
             add chain ip mesh_ingress p_tcp_30080\n\
             add rule ip mesh_ingress p_tcp_30080 meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.0.0.5, 1 : 10.0.0.6 } : 80 comment \"target 80\"\n\
             add chain ip mesh_ingress p_udp_30053\n\
             add rule ip mesh_ingress p_udp_30053 meta l4proto udp reject comment \"target 53\"\n\
             add element ip mesh_ingress ports { tcp . 30080 : goto p_tcp_30080, udp . 30053 : goto p_udp_30053 }\n"
        );
        assert_eq!(
            p.host,
            "add table ip mesh_ingress\n\
             add set ip mesh_ingress published { type inet_proto . inet_service; }\n\
             add map ip mesh_ingress host_ports { type inet_proto . inet_service : ipv4_addr . inet_service; }\n\
             add chain ip mesh_ingress prerouting { type nat hook prerouting priority dstnat; policy accept; }\n\
             add chain ip mesh_ingress output { type nat hook output priority -100; policy accept; }\n\
             add chain ip mesh_ingress ingress\n\
             add chain ip mesh_ingress postrouting { type nat hook postrouting priority srcnat; policy accept; }\n\
             add chain ip mesh_ingress forward { type filter hook forward priority filter; policy accept; }\n\
             flush chain ip mesh_ingress prerouting\n\
             flush chain ip mesh_ingress output\n\
             flush chain ip mesh_ingress ingress\n\
             flush chain ip mesh_ingress postrouting\n\
             flush chain ip mesh_ingress forward\n\
             add rule ip mesh_ingress prerouting fib daddr type local jump ingress\n\
             add rule ip mesh_ingress output fib daddr type local jump ingress\n\
             add rule ip mesh_ingress ingress meta l4proto . th dport @published dnat to 169.254.77.2\n\
             add rule ip mesh_ingress ingress meta l4proto tcp dnat ip addr . port to meta l4proto . th dport map @host_ports\n\
             add rule ip mesh_ingress ingress meta l4proto udp dnat ip addr . port to meta l4proto . th dport map @host_ports\n\
             add rule ip mesh_ingress postrouting oifname \"mesh_ingr0\" ip saddr 127.0.0.0/8 masquerade\n\
             add rule ip mesh_ingress forward iifname \"mesh_ingr0\" accept\n\
             add rule ip mesh_ingress forward oifname \"mesh_ingr0\" accept\n\
             add element ip mesh_ingress published { tcp . 30080, udp . 30053 }\n\
             add element ip mesh_ingress host_ports { tcp . 8080 : 172.18.0.5 . 80 }\n"
        );
        assert_eq!(p.sandbox_rm, "");
    }

    /// A kernel state with p_tcp_1 (head 11, shadow 10), p_tcp_2 (head 20), p_udp_3
    /// (head 30), an unreadable p_tcp_4, and the matching elements.
    fn kernel() -> (BTreeMap<Key, Target>, SandboxState, HostState) {
        let mut published = BTreeMap::new();
        published.insert((Proto::Tcp, 1), target(80, &["10.0.0.5"]));
        published.insert((Proto::Tcp, 2), target(80, &["10.0.0.5"]));
        published.insert((Proto::Udp, 3), target(53, &["10.0.0.5"]));
        let mut sbox = SandboxState::default();
        let rules = |hs: &[u64], t: &Target| PortChain {
            rules: hs.iter().map(|h| (*h, Some(t.clone()))).collect(),
        };
        for ((proto, port), t) in &published {
            let hs: &[u64] = match port {
                1 => &[11, 10],
                2 => &[20],
                _ => &[30],
            };
            sbox.chains.insert(port_chain(*proto, *port), rules(hs, t));
            sbox.ports
                .insert((*proto, *port), port_chain(*proto, *port));
        }
        sbox.chains.insert(
            "p_tcp_4".into(),
            PortChain {
                rules: vec![(40, None)],
            },
        );
        let host = HostState {
            published: published.keys().copied().collect(),
            host_ports: BTreeMap::new(),
        };
        (published, sbox, host)
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let (mut published, sbox, host) = kernel();
        // p_tcp_4 is in the kernel only: without it the plan is empty but for its removal.
        let p = plan(
            &IngressConfig::default(),
            false,
            &published,
            &BTreeMap::new(),
            &sbox,
            &host,
        );
        assert_eq!(p.sandbox_up, "");
        assert_eq!(p.host, "");
        assert_eq!(p.sandbox_rm, "delete chain ip mesh_ingress p_tcp_4\n");
        // Wanting p_tcp_4 (whose rule is not understood) replaces its rule.
        published.insert((Proto::Tcp, 4), target(80, &[]));
        let p = plan(
            &IngressConfig::default(),
            false,
            &published,
            &BTreeMap::new(),
            &sbox,
            &host,
        );
        assert_eq!(
            p.sandbox_up,
            "insert rule ip mesh_ingress p_tcp_4 meta l4proto tcp reject with tcp reset comment \"target 80\"\n\
             add element ip mesh_ingress ports { tcp . 4 : goto p_tcp_4 }\n"
        );
        assert_eq!(
            p.host,
            "add element ip mesh_ingress published { tcp . 4 }\n"
        );
        assert_eq!(p.sandbox_rm, "");
    }

    #[test]
    fn changes_insert_a_head_and_drop_old_shadows() {
        let (old, sbox, host) = kernel();
        let mut new = old.clone();
        new.insert((Proto::Tcp, 1), target(80, &["10.0.0.6"]));
        new.insert((Proto::Tcp, 2), target(80, &["10.0.0.5", "10.0.0.6"]));
        new.remove(&(Proto::Udp, 3));
        new.insert((Proto::Udp, 5), target(53, &[]));
        let p = plan(
            &IngressConfig::default(),
            false,
            &new,
            &BTreeMap::new(),
            &sbox,
            &host,
        );
        assert_eq!(
            p.sandbox_up,
            "insert rule ip mesh_ingress p_tcp_1 meta l4proto tcp dnat to numgen random mod 1 map { 0 : 10.0.0.6 } : 80 comment \"target 80\"\n\
             delete rule ip mesh_ingress p_tcp_1 handle 10\n\
             insert rule ip mesh_ingress p_tcp_2 meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.0.0.5, 1 : 10.0.0.6 } : 80 comment \"target 80\"\n\
             add chain ip mesh_ingress p_udp_5\n\
             add rule ip mesh_ingress p_udp_5 meta l4proto udp reject comment \"target 53\"\n\
             add element ip mesh_ingress ports { udp . 5 : goto p_udp_5 }\n"
        );
        assert_eq!(
            p.host,
            "delete element ip mesh_ingress published { udp . 3 }\n\
             add element ip mesh_ingress published { udp . 5 }\n"
        );
        assert_eq!(
            p.sandbox_rm,
            "delete element ip mesh_ingress ports { udp . 3 }\n\
             delete chain ip mesh_ingress p_tcp_4\n\
             delete chain ip mesh_ingress p_udp_3\n"
        );
    }

    #[test]
    fn a_map_element_pointing_elsewhere_is_replaced() {
        let (published, mut sbox, host) = kernel();
        sbox.ports.insert((Proto::Tcp, 2), "p_tcp_4".into());
        sbox.chains.remove("p_tcp_4");
        let p = plan(
            &IngressConfig::default(),
            false,
            &published,
            &BTreeMap::new(),
            &sbox,
            &host,
        );
        assert_eq!(
            p.sandbox_up,
            "delete element ip mesh_ingress ports { tcp . 2 }\n\
             add element ip mesh_ingress ports { tcp . 2 : goto p_tcp_2 }\n"
        );
    }

    #[test]
    fn host_port_diffs() {
        let (published, sbox, mut host) = kernel();
        host.host_ports
            .insert((Proto::Tcp, 8080), (ip("172.18.0.5"), 80));
        host.host_ports
            .insert((Proto::Tcp, 8081), (ip("172.18.0.5"), 81));
        host.host_ports
            .insert((Proto::Udp, 8082), (ip("172.18.0.5"), 82));
        let mut want = host.host_ports.clone();
        want.insert((Proto::Tcp, 8080), (ip("172.18.0.6"), 80));
        want.remove(&(Proto::Udp, 8082));
        want.insert((Proto::Udp, 8083), (ip("172.18.0.7"), 83));
        let mut published = published;
        published.remove(&(Proto::Tcp, 1));
        let p = plan(
            &IngressConfig::default(),
            false,
            &published,
            &want,
            &sbox,
            &host,
        );
        assert_eq!(
            p.host,
            "delete element ip mesh_ingress published { tcp . 1 }\n\
             delete element ip mesh_ingress host_ports { tcp . 8080, udp . 8082 }\n\
             add element ip mesh_ingress host_ports { tcp . 8080 : 172.18.0.6 . 80, udp . 8083 : 172.18.0.7 . 83 }\n"
        );
        let keys: BTreeSet<&String> = sbox.chains.keys().collect();
        assert!(keys.contains(&"p_tcp_1".to_string()));
        assert_eq!(
            p.sandbox_rm,
            "delete element ip mesh_ingress ports { tcp . 1 }\n\
             delete chain ip mesh_ingress p_tcp_1\n\
             delete chain ip mesh_ingress p_tcp_4\n"
        );
    }
}
