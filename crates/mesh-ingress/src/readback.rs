//! What our tables hold in the kernel: read back with `nft -j list table ip mesh_ingress`
//! (`mesh_netlink::nft::read_table_in`, so that a restarted daemon adopts what its predecessor programmed instead of starting from
//! nothing, which would close every published port until the first full sync), and the rule
//! handles `nft -e -a` echoes (so that later changes can delete the rules they replace).
//!
//! - Sandbox: every chain named `p_<proto>_<port>` is a published port. Its rules are kept
//!   with their handles, head first: the head is the one in force; the rules after it are
//!   shadows (see the `script` module). A rule gives the backends (the `numgen` map's
//!   addresses, in index order) and the target port (the rule's comment `target N`, else the
//!   `dnat` port). The verdict map's elements say which ports lead to which chain.
//! - Host: the elements of set `published` and of map `host_ports`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mesh_netlink::nft::json::{self, Listing, Rule, Verdict};
use serde_json::Value;

use crate::script::{HOST_MAP, HOST_SET, PORT_CHAIN_PREFIX, SANDBOX_MAP, TABLE};
use crate::{HostPorts, Key, Proto, Target};

/// A port chain of the sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortChain {
    /// Its rules, head first: (handle, what the rule says, `None` if not understood).
    pub rules: Vec<(u64, Option<Target>)>,
}

impl PortChain {
    /// What the head rule says: where the port goes now.
    pub fn current(&self) -> Option<&Target> {
        self.rules.first().and_then(|(_, t)| t.as_ref())
    }
}

/// What the sandbox table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxState {
    /// Every chain named `p_...`, understood or not.
    pub chains: BTreeMap<String, PortChain>,
    /// The verdict map: port -> the chain it jumps to.
    pub ports: BTreeMap<Key, String>,
}

impl SandboxState {
    /// The published ports: the port chains with a well-formed name and a head rule that is
    /// understood.
    pub fn published(&self) -> BTreeMap<Key, Target> {
        self.chains
            .iter()
            .filter_map(|(name, pc)| Some((parse_port_chain(name)?, pc.current()?.clone())))
            .collect()
    }
}

/// What the host table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// Set `published`.
    pub published: BTreeSet<Key>,
    /// Map `host_ports`.
    pub host_ports: HostPorts,
}

/// Parses `p_tcp_30080`.
pub fn parse_port_chain(name: &str) -> Option<Key> {
    let rest = name.strip_prefix(PORT_CHAIN_PREFIX)?;
    let (proto, digits) = rest.split_once('_')?;
    let port: u16 = digits.parse().ok()?;
    // One spelling per port: `p_tcp_080` is not ours.
    if port == 0 || port.to_string() != digits {
        return None;
    }
    Some((proto.parse().ok()?, port))
}

fn proto_of(v: &Value) -> Option<Proto> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => match n.as_u64()? {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        },
        _ => None,
    }
}

fn port_of(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `{"concat": [proto, port]}`.
fn key_of(v: &Value) -> Option<Key> {
    let [proto, port] = json::concat(v)? else {
        return None;
    };
    Some((proto_of(proto)?, port_of(port)?))
}

/// Target and backends of a port chain's rule.
fn parse_port_rule(rule: &Rule) -> Option<Target> {
    let comment_target = rule
        .comment
        .as_deref()
        .and_then(|c| c.strip_prefix("target "))
        .and_then(|p| p.trim().parse::<u16>().ok());
    for e in &rule.expr {
        if let Some(dnat) = e.get("dnat") {
            let target = comment_target.or_else(|| dnat.get("port").and_then(port_of))?;
            let addr = dnat.get("addr")?;
            let backends = if let Some(ip) = json::ipv4(addr) {
                vec![ip]
            } else {
                let set = addr.get("map")?.get("data")?.get("set")?.as_array()?;
                let mut pairs = Vec::new();
                for pair in set {
                    let (idx, ip) = json::pair(pair)?;
                    pairs.push((idx.as_u64()?, json::ipv4(ip)?));
                }
                pairs.sort();
                let mut ips: Vec<Ipv4Addr> = pairs.into_iter().map(|(_, ip)| ip).collect();
                ips.sort();
                ips.dedup();
                ips
            };
            return Some(Target { target, backends });
        }
        if e.get("reject").is_some() {
            return Some(Target {
                target: comment_target?,
                backends: Vec::new(),
            });
        }
    }
    None
}

/// Reads the sandbox table (`nft -j list table ip mesh_ingress`).
pub fn parse_sandbox(listing: &Listing) -> Result<SandboxState, String> {
    let mut st = SandboxState::default();
    for c in &listing.chains {
        if c.table == TABLE && c.name.starts_with(PORT_CHAIN_PREFIX) {
            st.chains.insert(c.name.clone(), PortChain::default());
        }
    }
    // The listing gives a chain's rules in order, head first.
    for r in &listing.rules {
        let Some(handle) = r.handle else { continue };
        if r.chain.starts_with(PORT_CHAIN_PREFIX) {
            st.chains
                .entry(r.chain.clone())
                .or_default()
                .rules
                .push((handle, parse_port_rule(r)));
        }
    }
    for e in listing.set(SANDBOX_MAP).map_or(&[][..], |m| &m.elem) {
        let bad = || format!("unexpected {SANDBOX_MAP} element {e}");
        let (key, value) = json::pair(e).ok_or_else(bad)?;
        let key = key_of(key).ok_or_else(bad)?;
        let chain = match json::verdict(value) {
            Some(Verdict::Goto(chain) | Verdict::Jump(chain)) => chain,
            _ => return Err(bad()),
        };
        st.ports.insert(key, chain.to_string());
    }
    Ok(st)
}

/// Reads the host table (`nft -j list table ip mesh_ingress`).
pub fn parse_host(listing: &Listing) -> Result<HostState, String> {
    let mut st = HostState::default();
    for e in listing.set(HOST_SET).map_or(&[][..], |s| &s.elem) {
        let key = key_of(e).ok_or_else(|| format!("unexpected {HOST_SET} element {e}"))?;
        st.published.insert(key);
    }
    for e in listing.set(HOST_MAP).map_or(&[][..], |m| &m.elem) {
        let bad = || format!("unexpected {HOST_MAP} element {e}");
        let (key, value) = json::pair(e).ok_or_else(bad)?;
        let key = key_of(key).ok_or_else(bad)?;
        let [ip, target] = json::concat(value).ok_or_else(bad)? else {
            return Err(bad());
        };
        let ip = json::ipv4(ip).ok_or_else(bad)?;
        let target = port_of(target).ok_or_else(bad)?;
        st.host_ports.insert(key, (ip, target));
    }
    Ok(st)
}

/// The handles of the rules that `nft -e -a -f -` reports added to port chains: chain ->
/// handle (lines like `insert rule ip mesh_ingress p_tcp_30080 ... # handle 42`).
pub fn parse_echo(out: &str) -> BTreeMap<String, u64> {
    let mut handles = BTreeMap::new();
    for line in out.lines() {
        let rest = line
            .strip_prefix("add rule ip ")
            .or_else(|| line.strip_prefix("insert rule ip "));
        let Some(rest) = rest.and_then(|r| r.strip_prefix(TABLE)) else {
            continue;
        };
        let Some(chain) = rest.split_whitespace().next() else {
            continue;
        };
        if !chain.starts_with(PORT_CHAIN_PREFIX) {
            continue;
        }
        if let Some(h) = line
            .rsplit_once("# handle ")
            .and_then(|(_, h)| h.trim().parse::<u64>().ok())
        {
            handles.insert(chain.to_string(), h);
        }
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    // Captured from `nft -j list table ip mesh_ingress` (nft 1.0.6) in a sandbox, then
    // edited to add odd cases.
    const SANDBOX: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "mesh_ingress", "handle": 1}},
      {"map": {"family": "ip", "name": "ports", "table": "mesh_ingress", "type": ["inet_proto", "inet_service"], "handle": 7, "map": "verdict",
               "elem": [[{"concat": ["tcp", 30080]}, {"goto": {"target": "p_tcp_30080"}}], [{"concat": ["udp", 53]}, {"goto": {"target": "p_udp_53"}}]]}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_tcp_30080", "handle": 3}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_udp_53", "handle": 4}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_tcp_9", "handle": 5}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_tcp_junk", "handle": 6}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_udp_7", "handle": 8}},
      {"chain": {"family": "ip", "table": "mesh_ingress", "name": "p_udp_8", "handle": 9}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "prerouting", "handle": 8, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "mi0"}}, {"vmap": {"key": {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@ports"}}]}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "p_tcp_30080", "handle": 19, "comment": "target 80", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[1, "10.0.0.6"], [0, "10.0.0.5"]]}}}, "port": 80}}]}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "p_tcp_30080", "handle": 17, "comment": "target 80", "expr": [{"reject": {"type": "tcp reset"}}]}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "p_udp_53", "handle": 24, "comment": "target 5353", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"reject": {"type": "icmp", "expr": "port-unreachable"}}]}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "p_tcp_9", "handle": 26, "expr": [{"reject": {"type": "tcp reset"}}]}},
      {"rule": {"family": "ip", "table": "mesh_ingress", "chain": "p_udp_7", "handle": 27, "expr": [{"dnat": {"addr": "10.0.0.9", "port": 70}}]}}
    ]}"#;

    #[test]
    fn reads_port_chains_with_their_handles() {
        let st = parse_sandbox(&json::parse(SANDBOX).unwrap()).unwrap();
        let t80 = Target {
            target: 80,
            backends: vec![ip("10.0.0.5"), ip("10.0.0.6")],
        };
        assert_eq!(
            st.chains["p_tcp_30080"].rules,
            vec![
                (19, Some(t80.clone())),
                (
                    17,
                    Some(Target {
                        target: 80,
                        backends: vec![]
                    })
                )
            ]
        );
        assert_eq!(st.chains["p_tcp_9"].rules, vec![(26, None)]);
        assert_eq!(st.chains["p_tcp_junk"].rules, vec![]);
        assert_eq!(st.chains["p_udp_8"].rules, vec![]);
        assert_eq!(st.chains.len(), 6);
        let mut ports = BTreeMap::new();
        ports.insert((Proto::Tcp, 30080), "p_tcp_30080".to_string());
        ports.insert((Proto::Udp, 53), "p_udp_53".to_string());
        assert_eq!(st.ports, ports);

        // p_tcp_9 (a reject without its target), p_tcp_junk and the empty p_udp_8 are not
        // published ports.
        let mut want = BTreeMap::new();
        want.insert((Proto::Tcp, 30080), t80);
        want.insert(
            (Proto::Udp, 53),
            Target {
                target: 5353,
                backends: vec![],
            },
        );
        want.insert(
            (Proto::Udp, 7),
            Target {
                target: 70,
                backends: vec![ip("10.0.0.9")],
            },
        );
        assert_eq!(st.published(), want);
    }

    #[test]
    fn port_chain_names() {
        assert_eq!(parse_port_chain("p_tcp_30080"), Some((Proto::Tcp, 30080)));
        assert_eq!(parse_port_chain("p_udp_1"), Some((Proto::Udp, 1)));
        for bad in [
            "p_tcp_",
            "p_sctp_1",
            "p_tcp_01",
            "p_tcp_0",
            "p_tcp_70000",
            "x_tcp_1",
            "p_tcp_1_2",
        ] {
            assert_eq!(parse_port_chain(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_the_host_table() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"set": {"family": "ip", "name": "published", "table": "mesh_ingress", "type": ["inet_proto", "inet_service"], "handle": 6,
                   "elem": [{"concat": ["tcp", 30080]}, {"concat": ["udp", 30053]}]}},
          {"map": {"family": "ip", "name": "host_ports", "table": "mesh_ingress", "type": ["inet_proto", "inet_service"], "handle": 7, "map": "ipv4_addr . inet_service",
                   "elem": [[{"concat": ["tcp", 30081]}, {"concat": ["172.18.77.5", 8080]}], [{"concat": [17, 53]}, {"concat": ["172.18.77.6", 5353]}]]}}]}"#;
        let st = parse_host(&json::parse(text).unwrap()).unwrap();
        assert_eq!(
            st.published,
            [(Proto::Tcp, 30080), (Proto::Udp, 30053)].into()
        );
        let mut want = BTreeMap::new();
        want.insert((Proto::Tcp, 30081), (ip("172.18.77.5"), 8080));
        want.insert((Proto::Udp, 53), (ip("172.18.77.6"), 5353));
        assert_eq!(st.host_ports, want);
        // Empty sets and maps have no "elem".
        let empty = r#"{"nftables": [{"map": {"name": "host_ports", "table": "mesh_ingress", "map": "ipv4_addr . inet_service"}},
                                      {"set": {"name": "published", "table": "mesh_ingress"}}]}"#;
        assert_eq!(
            parse_host(&json::parse(empty).unwrap()).unwrap(),
            HostState::default()
        );
        let odd =
            r#"{"nftables": [{"set": {"name": "published", "elem": [{"concat": ["tcp"]}]}}]}"#;
        assert!(parse_host(&json::parse(odd).unwrap()).is_err());
    }

    #[test]
    fn reads_echoed_handles() {
        // Captured from `nft -e -a -f -` (nft 1.0.6).
        let out = "add chain ip mesh_ingress p_tcp_1 # handle 15\n\
                   add rule ip mesh_ingress p_tcp_1 meta l4proto tcp dnat to numgen random mod 1 map { 0 : 10.0.0.5 }:80 comment \"target 80\" # handle 17\n\
                   add element ip mesh_ingress ports { tcp . 1 : goto p_tcp_1 }\n\
                   insert rule ip mesh_ingress p_tcp_30080 reject with tcp reset comment \"target 80\" # handle 18\n\
                   add rule ip mesh_ingress prerouting iifname \"mi0\" meta l4proto . th dport vmap @ports # handle 3\n\
                   # new generation 3 by process 28751 (nft)\n";
        let mut want = BTreeMap::new();
        want.insert("p_tcp_1".to_string(), 17);
        want.insert("p_tcp_30080".to_string(), 18);
        assert_eq!(parse_echo(out), want);
    }
}
