//! The way back for connections the routing mesh brings to a task with the client's address
//! kept: in the task's namespace, replies go to the ingress sandbox that balanced the
//! connection, not out of the task's default route.
//!
//! The sandbox DNATs a published port to the task without SNAT (module docs of the crate), so
//! the task sees `client -> task:target`. Its default route (the gateway bridge) would send
//! the reply out of its own host, past the conntrack entry in the sandbox that must un-NAT it:
//! the client would get an answer from the wrong address, or none. So, in the task:
//!
//! ```text
//! table ip mesh_ingress_return {
//!   chain prerouting { type filter hook prerouting priority mangle;
//!                      iifname "eth0" ct state new ct mark set @ll,64,32
//!                      iifname "eth0" meta mark set ct mark }
//!   chain output     { type route hook output priority mangle;
//!                      ct mark != 0 meta mark set ct mark }
//! }
//! ip rule  fwmark 0x200000a lookup 33554442 (priority 100)    # one per sandbox (x86)
//! ip route default via 10.0.0.2 dev eth0 table 33554442
//! ```
//!
//! A connection entering from the ingress overlay is marked with the sandbox that sent it:
//! overlay MAC addresses are `02:42` followed by the endpoint's IPv4 address (Docker's
//! scheme, `mesh_netlink::mac_for_ip`), so bits 64..96 of the link-layer header (the last four
//! bytes of the source MAC) *are* the sandbox's ingress address, with no per-sandbox rule in
//! the table. Packets the task sends on that connection take the mark (a `route` chain, so the
//! kernel routes them again with it), and the rule of that mark sends them to the sandbox's
//! table, whose default route is the sandbox. Mark and table number are the sandbox's address
//! read as a native-endian `u32` (nftables copies the MAC's bytes as they are: see
//! [`sandbox_mark`]); never 0, 253, 254 or 255 for an overlay address, so no clash with the
//! kernel's own tables. Connections the task opens itself carry no mark and use its
//! ordinary routes.
//!
//! `tcp_fwmark_accept` is on in the task's namespace: a socket accepted from a marked SYN
//! takes its mark, so its SYN-ACK and everything after are routed by the mark from the first
//! lookup on. Packets from the sandbox carry the mark too, and `src_valid_mark` is on for the ingress
//! interface: the reverse-path check (`rp_filter`, strict or loose) then looks the client's
//! address up with the mark, finds the sandbox's table and its interface, and lets the packet
//! in (without the mark it would find the gateway bridge, or no route at all, and drop it).
//!
//! UDP replies need one more rule per served port (see [`add_routes`]).
//!
//! **The fast path's shortcut** ([`Shortcut`]): on the task's node, the routing mesh's eBPF
//! fast path hands VXLAN from other nodes' sandboxes into the task through its
//! gateway-bridge interface, decapsulated, the sandbox's MAC as source, past the VXLAN
//! device and the overlay's bridge (`mesh_lb::nodeport`, `np_local`). Such packets are the
//! only ones addressed to the task's ingress address on that interface, so the same two
//! rules, matching that interface and address, mark them; their replies leave through the
//! ingress interface as all others. `src_valid_mark` stays off on the gateway interface: its
//! reverse-path check finds the client through the task's default route, which is that
//! interface.
//!
//! **No TIME_WAIT in the task** (`tcp_max_tw_buckets` 0 in its namespace). With the client's
//! address kept, one client reaching a task through two nodes' addresses uses two TCP
//! timestamp offsets (Linux picks one per source and destination address pair), and the
//! task sees both on the same 4-tuple space. A server that closes first keeps the 4-tuple in
//! TIME_WAIT for 60 s; a SYN reusing the client's port through the other node then carries
//! an older timestamp and is dropped by PAWS (`TcpExtPAWSTimewait`): the task answers with
//! an ACK of the old connection, the client resets and sends its SYN again, about 15 ms
//! lost per connection here. `cargo xtask bench ingress` (4 clients reusing ports, the
//! server closing each connection) made a tenth of the direct path's connections/s that way.
//! The sandbox's masquerade hid this (each route had its own source address). A server socket
//! that closes first now goes straight to CLOSED: a delayed duplicate of an old connection
//! could then reach a new one with the same 4-tuple (it must also fall in its window), and
//! the task's own outgoing connections lose TIME_WAIT too; that is the price of the client's
//! address through every node.
//!
//! Rules and routes of a sandbox are only ever added while the task lives (a sandbox gone is
//! a node gone; its rule matches nothing any more, and an address given again to another
//! node's sandbox leads to that sandbox, which is right). The task's namespace goes with the
//! task, and everything in it.

use std::net::Ipv4Addr;

use mesh_netlink::{nft, Handle, Netns};

use crate::error::IngressError;

/// The table in the task's namespace.
pub const RETURN_TABLE: &str = "mesh_ingress_return";
/// Priority of the per-sandbox rules (before the main table's 32766); UDP port rules come
/// right after.
pub const RULE_PRIORITY: u32 = 100;
/// The table UDP replies of published ports are first looked up in (see [`add_routes`]):
/// below 253, and never a sandbox's mark (a host address is never `a.0.0.0`).
pub const UDP_TABLE: u32 = 250;

/// Where the routing mesh's fast path hands the task VXLAN it decapsulated on the task's node
/// (`mesh_lb::nodeport`, `np_local`): the task's gateway-bridge interface, and the task's
/// address on the ingress overlay, which only such packets carry there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortcut {
    /// The task's gateway-bridge interface.
    pub ifname: String,
    /// The task's address on the ingress overlay.
    pub addr: Ipv4Addr,
}

/// The task's table: marks connections from the ingress interface `ingress_if` (and those
/// the fast path hands in through `shortcut`) with their sandbox, and gives the mark to what
/// the task sends on them. Rewritten whole (idempotent).
pub fn script(ingress_if: &str, shortcut: Option<&Shortcut>) -> String {
    let t = RETURN_TABLE;
    let mut s = format!(
        "add table ip {t}\n\
         add chain ip {t} prerouting {{ type filter hook prerouting priority mangle; policy accept; }}\n\
         add chain ip {t} output {{ type route hook output priority mangle; policy accept; }}\n\
         flush chain ip {t} prerouting\n\
         flush chain ip {t} output\n"
    );
    let mut from = vec![format!("iifname \"{ingress_if}\"")];
    if let Some(sc) = shortcut {
        from.push(format!("iifname \"{}\" ip daddr {}", sc.ifname, sc.addr));
    }
    for f in &from {
        s.push_str(&format!(
            "add rule ip {t} prerouting {f} ct state new ct mark set @ll,64,32\n\
             add rule ip {t} prerouting {f} meta mark set ct mark\n"
        ));
    }
    s.push_str(&format!(
        "add rule ip {t} output ct mark != 0 meta mark set ct mark\n"
    ));
    s
}

/// The mark and routing table of the sandbox at `addr`: the four bytes of the address (as
/// they are in its MAC) read as a native-endian `u32`, which is what `ct mark set @ll,64,32`
/// stores (nftables copies the payload's bytes into the mark's register as they are).
pub fn sandbox_mark(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Sets up the table and `src_valid_mark` in a task's namespace `ns` whose interface on the
/// ingress overlay is `ingress_if` (then [`add_routes`] adds the routes), and the fast path's
/// `shortcut` into it, if any. Idempotent. Blocking (one `nft` run and a sysctl, each on a
/// thread in `ns`).
pub fn setup_table(
    ns: &Netns,
    ingress_if: &str,
    shortcut: Option<&Shortcut>,
) -> Result<(), IngressError> {
    for i in std::iter::once(ingress_if).chain(shortcut.map(|s| s.ifname.as_str())) {
        if !crate::valid_ifname(i) {
            return Err(IngressError::Invalid(format!(
                "interface {i:?}: want 1 to 15 characters of [A-Za-z0-9_.-]"
            )));
        }
    }
    crate::sysctls(
        ns,
        &[
            (format!("net/ipv4/conf/{ingress_if}/src_valid_mark"), "1"),
            ("net/ipv4/tcp_fwmark_accept".to_string(), "1"),
            ("net/ipv4/tcp_max_tw_buckets".to_string(), "0"),
        ],
    )?;
    nft::apply_in(ns, &script(ingress_if, shortcut)).map_err(|source| IngressError::Nft {
        ns: ns.name().to_string(),
        source,
    })
}

/// Adds, in the task's namespace (after [`setup_table`]), the rule and route of each sandbox
/// of `sandboxes`, and the rule of each UDP port of `udp_ports` the task serves published
/// ports on (one netlink connection for both). Idempotent.
///
/// The UDP rules: a UDP server on `0.0.0.0` answers from the address its route to the client
/// chooses; the task's default route (the gateway bridge) would choose the gateway address,
/// which is not the one the sandbox's conntrack entry expects, so the reply would not be
/// un-NATed (nor marked: it would be a new flow). The rule `ipproto udp sport PORT lookup
/// 250` sends the first lookup of such a reply to a table whose default route is the ingress
/// interface, so the reply gets the task's ingress address, matches the sandbox's flow, takes
/// its mark and is routed to the right sandbox. A datagram the task itself sends from that
/// port to an address that never called it leaves through the ingress interface too (and
/// goes nowhere): a server's own port is not a client's.
pub async fn add_routes(
    ns: &Netns,
    ingress_if: &str,
    sandboxes: &[Ipv4Addr],
    udp_ports: &[u16],
) -> Result<(), IngressError> {
    if sandboxes.is_empty() && udp_ports.is_empty() {
        return Ok(());
    }
    let h = Handle::new(ns).await?;
    for s in sandboxes {
        let mark = sandbox_mark(*s);
        h.set_table_default_route(mark, Some(*s), ingress_if)
            .await?;
        h.add_fwmark_rule(mark, mark, RULE_PRIORITY).await?;
    }
    if !udp_ports.is_empty() {
        h.set_table_default_route(UDP_TABLE, None, ingress_if)
            .await?;
        for p in udp_ports {
            h.add_udp_sport_rule(*p, UDP_TABLE, RULE_PRIORITY + 1)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_by_the_sandbox_s_mac() {
        assert_eq!(
            script("eth1", None),
            "add table ip mesh_ingress_return\n\
             add chain ip mesh_ingress_return prerouting { type filter hook prerouting priority mangle; policy accept; }\n\
             add chain ip mesh_ingress_return output { type route hook output priority mangle; policy accept; }\n\
             flush chain ip mesh_ingress_return prerouting\n\
             flush chain ip mesh_ingress_return output\n\
             add rule ip mesh_ingress_return prerouting iifname \"eth1\" ct state new ct mark set @ll,64,32\n\
             add rule ip mesh_ingress_return prerouting iifname \"eth1\" meta mark set ct mark\n\
             add rule ip mesh_ingress_return output ct mark != 0 meta mark set ct mark\n"
        );
        let sc = Shortcut {
            ifname: "eth2".into(),
            addr: Ipv4Addr::new(10, 255, 0, 7),
        };
        assert!(script("eth1", Some(&sc)).ends_with(
            "add rule ip mesh_ingress_return prerouting iifname \"eth1\" meta mark set ct mark\n\
             add rule ip mesh_ingress_return prerouting iifname \"eth2\" ip daddr 10.255.0.7 ct state new ct mark set @ll,64,32\n\
             add rule ip mesh_ingress_return prerouting iifname \"eth2\" ip daddr 10.255.0.7 meta mark set ct mark\n\
             add rule ip mesh_ingress_return output ct mark != 0 meta mark set ct mark\n"
        ));
        // The mark is the address, and the last four bytes of the sandbox's MAC.
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let mac = mesh_netlink::mac_for_ip(ip);
        assert_eq!(
            sandbox_mark(ip),
            u32::from_ne_bytes([mac[2], mac[3], mac[4], mac[5]])
        );
        assert_ne!(sandbox_mark(ip), 0);
    }
}
