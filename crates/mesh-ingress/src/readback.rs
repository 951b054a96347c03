//! What our tables hold in the kernel: read back with `nft -j list table ip mesh_ingress`
//! (so that a restarted daemon adopts what its predecessor programmed instead of starting from
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

fn objects(json: &str) -> Result<Vec<Value>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("bad json: {e}"))?;
    match v.get("nftables") {
        Some(Value::Array(a)) => Ok(a.clone()),
        _ => Err("no \"nftables\" array".to_string()),
    }
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

fn ip_of(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()?.parse().ok()
}

/// `{"concat": [proto, port]}`.
fn key_of(v: &Value) -> Option<Key> {
    let c = v.get("concat")?.as_array()?;
    Some((proto_of(c.first()?)?, port_of(c.get(1)?)?))
}

/// Target and backends of a port chain's rule.
fn parse_port_rule(rule: &Value) -> Option<Target> {
    let comment_target = rule
        .get("comment")
        .and_then(Value::as_str)
        .and_then(|c| c.strip_prefix("target "))
        .and_then(|p| p.trim().parse::<u16>().ok());
    let exprs = rule.get("expr")?.as_array()?;
    for e in exprs {
        if let Some(dnat) = e.get("dnat") {
            let target = comment_target.or_else(|| dnat.get("port").and_then(port_of))?;
            let addr = dnat.get("addr")?;
            let backends = if let Some(ip) = ip_of(addr) {
                vec![ip]
            } else {
                let set = addr.get("map")?.get("data")?.get("set")?.as_array()?;
                let mut pairs = Vec::new();
                for pair in set {
                    let pair = pair.as_array()?;
                    let idx = pair.first()?.as_u64()?;
                    let ip = ip_of(pair.get(1)?)?;
                    pairs.push((idx, ip));
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

/// Reads the sandbox table from `nft -j list table ip mesh_ingress`.
pub fn parse_sandbox(json: &str) -> Result<SandboxState, String> {
    let mut st = SandboxState::default();
    let mut rules: Vec<(String, u64, Option<Target>)> = Vec::new();
    for o in objects(json)? {
        if let Some(c) = o.get("chain") {
            if c.get("table").and_then(Value::as_str) != Some(TABLE) {
                continue;
            }
            if let Some(name) = c.get("name").and_then(Value::as_str) {
                if name.starts_with(PORT_CHAIN_PREFIX) {
                    st.chains.insert(name.to_string(), PortChain::default());
                }
            }
        } else if let Some(r) = o.get("rule") {
            let (Some(chain), Some(handle)) = (
                r.get("chain").and_then(Value::as_str),
                r.get("handle").and_then(Value::as_u64),
            ) else {
                continue;
            };
            if chain.starts_with(PORT_CHAIN_PREFIX) {
                rules.push((chain.to_string(), handle, parse_port_rule(r)));
            }
        } else if let Some(m) = o.get("map") {
            if m.get("name").and_then(Value::as_str) != Some(SANDBOX_MAP) {
                continue;
            }
            for e in m
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let bad = || format!("unexpected {SANDBOX_MAP} element {e}");
                let pair = e.as_array().ok_or_else(bad)?;
                let key = pair.first().and_then(key_of).ok_or_else(bad)?;
                let chain = pair
                    .get(1)
                    .and_then(|v| v.get("goto").or_else(|| v.get("jump")))
                    .and_then(|v| v.get("target"))
                    .and_then(Value::as_str)
                    .ok_or_else(bad)?;
                st.ports.insert(key, chain.to_string());
            }
        }
    }
    // The listing gives a chain's rules in order, head first.
    for (chain, handle, target) in rules {
        st.chains
            .entry(chain)
            .or_default()
            .rules
            .push((handle, target));
    }
    Ok(st)
}

/// Reads the host table from `nft -j list table ip mesh_ingress`.
pub fn parse_host(json: &str) -> Result<HostState, String> {
    let mut st = HostState::default();
    for o in objects(json)? {
        if let Some(s) = o.get("set") {
            if s.get("name").and_then(Value::as_str) != Some(HOST_SET) {
                continue;
            }
            for e in s
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = key_of(e).ok_or_else(|| format!("unexpected {HOST_SET} element {e}"))?;
                st.published.insert(key);
            }
        } else if let Some(m) = o.get("map") {
            if m.get("name").and_then(Value::as_str) != Some(HOST_MAP) {
                continue;
            }
            for e in m
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let bad = || format!("unexpected {HOST_MAP} element {e}");
                let pair = e.as_array().ok_or_else(bad)?;
                let key = pair.first().and_then(key_of).ok_or_else(bad)?;
                let val = pair
                    .get(1)
                    .and_then(|k| k.get("concat"))
                    .and_then(Value::as_array)
                    .ok_or_else(bad)?;
                let ip = val.first().and_then(ip_of).ok_or_else(bad)?;
                let target = val.get(1).and_then(port_of).ok_or_else(bad)?;
                st.host_ports.insert(key, (ip, target));
            }
        }
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
        let st = parse_sandbox(SANDBOX).unwrap();
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
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"set": {"family": "ip", "name": "published", "table": "mesh_ingress", "type": ["inet_proto", "inet_service"], "handle": 6,
                   "elem": [{"concat": ["tcp", 30080]}, {"concat": ["udp", 30053]}]}},
          {"map": {"family": "ip", "name": "host_ports", "table": "mesh_ingress", "type": ["inet_proto", "inet_service"], "handle": 7, "map": "ipv4_addr . inet_service",
                   "elem": [[{"concat": ["tcp", 30081]}, {"concat": ["172.18.77.5", 8080]}], [{"concat": [17, 53]}, {"concat": ["172.18.77.6", 5353]}]]}}]}"#;
        let st = parse_host(json).unwrap();
        assert_eq!(
            st.published,
            [(Proto::Tcp, 30080), (Proto::Udp, 30053)].into()
        );
        let mut want = BTreeMap::new();
        want.insert((Proto::Tcp, 30081), (ip("172.18.77.5"), 8080));
        want.insert((Proto::Udp, 53), (ip("172.18.77.6"), 5353));
        assert_eq!(st.host_ports, want);
        // Empty sets and maps have no "elem".
        let empty = r#"{"nftables": [{"map": {"name": "host_ports", "table": "mesh_ingress"}},
                                      {"set": {"name": "published", "table": "mesh_ingress"}}]}"#;
        assert_eq!(parse_host(empty).unwrap(), HostState::default());
        assert!(parse_host("{}").is_err());
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
