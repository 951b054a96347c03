//! The underlay member filter: only the given addresses reach this host's VXLAN port and
//! gossip port (UDP and TCP), and the encryption tunnel's port (`crypt`); the encrypted
//! networks' VXLAN port takes only packets out of the tunnel device. Without it any host on
//! the underlay could send VXLAN frames with a network's VNI straight into an overlay, or
//! talk to the gossip port.
//!
//! One nftables table in the host namespace (where the VXLAN and gossip sockets live),
//! `ip mesh_underlay`: a set `members` of IPv4 addresses and an input chain (priority
//! `filter - 10`, policy accept) that drops packets to those ports from any other source,
//! counted in the named counters `vxlan_dropped` and `gossip_dropped`. Every change is one
//! `nft -f` transaction that declares the table, set, counters and chain (`add` is
//! idempotent), flushes the chain and the set and fills them again, so there is no moment
//! without the filter and a table a previous daemon left is taken over as it is; the
//! counters survive changes. [`MemberFilter::remove`] deletes the table (leaving the
//! swarm, or a daemon starting outside any swarm).
//!
//! It knows addresses and ports only: the caller says who the members are.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use mesh_netlink::{nft, Netns};

/// The table's name (family `ip`).
pub const TABLE: &str = "mesh_underlay";

/// See the module docs.
pub struct MemberFilter {
    ns: Arc<Netns>,
    vxlan_port: u16,
    gossip_port: u16,
}

impl MemberFilter {
    /// A filter of `vxlan_port` (UDP) and `gossip_port` (UDP and TCP) in `ns`.
    pub fn new(ns: Arc<Netns>, vxlan_port: u16, gossip_port: u16) -> MemberFilter {
        MemberFilter {
            ns,
            vxlan_port,
            gossip_port,
        }
    }

    /// The transaction that lets `members` (and nobody else) reach the ports.
    pub fn script(&self, members: &BTreeSet<Ipv4Addr>) -> String {
        let (v, g) = (self.vxlan_port, self.gossip_port);
        let mut s = format!(
            "add table ip {TABLE}\n\
             add set ip {TABLE} members {{ type ipv4_addr; }}\n\
             add counter ip {TABLE} vxlan_dropped\n\
             add counter ip {TABLE} gossip_dropped\n\
             add chain ip {TABLE} input {{ type filter hook input priority filter - 10; policy accept; }}\n\
             flush chain ip {TABLE} input\n\
             flush set ip {TABLE} members\n"
        );
        if !members.is_empty() {
            let list: Vec<String> = members.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                s,
                "add element ip {TABLE} members {{ {} }}",
                list.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "add rule ip {TABLE} input udp dport {v} ip saddr != @members counter name vxlan_dropped drop"
        );
        // Encrypted overlays (`crypt`): the tunnel answers members only, and the encrypted
        // networks' VXLAN port takes only what comes out of the tunnel device.
        let (t, e) = (
            crate::crypt::tunnel_port(v),
            crate::crypt::encrypted_vxlan_port(v),
        );
        let _ = writeln!(
            s,
            "add rule ip {TABLE} input udp dport {t} ip saddr != @members counter name vxlan_dropped drop"
        );
        let _ = writeln!(
            s,
            "add rule ip {TABLE} input udp dport {e} iifname != \"{}\" counter name vxlan_dropped drop",
            crate::crypt::TUN_NAME
        );
        let _ = writeln!(
            s,
            "add rule ip {TABLE} input meta l4proto {{ tcp, udp }} th dport {g} ip saddr != @members counter name gossip_dropped drop"
        );
        s
    }

    /// Makes the filter let exactly `members` through (blocking). An empty set would close
    /// the ports to everyone, the node itself included: it is refused.
    pub fn apply(&self, members: &BTreeSet<Ipv4Addr>) -> Result<(), String> {
        if members.is_empty() {
            return Err("no member addresses for the underlay filter".into());
        }
        nft::apply_in(&self.ns, &self.script(members)).map_err(|e| e.to_string())
    }

    /// Deletes the table if it is there (blocking).
    pub fn remove(&self) -> Result<(), String> {
        // `destroy` (nft >= 1.0.8) would be one step; `add` then `delete` in one
        // transaction works with every version and never fails on a missing table.
        nft::apply_in(
            &self.ns,
            &format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"),
        )
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_the_ports_and_only_the_members() {
        let f = MemberFilter::new(Arc::new(Netns::current().unwrap()), 4789, 7946);
        let members: BTreeSet<Ipv4Addr> = ["10.99.0.12", "10.99.0.11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let s = f.script(&members);
        assert!(s.contains("add element ip mesh_underlay members { 10.99.0.11, 10.99.0.12 }"));
        assert!(s.contains("udp dport 4789 ip saddr != @members"));
        assert!(s.contains("th dport 7946 ip saddr != @members"));
        assert!(s.contains("udp dport 4791 ip saddr != @members"));
        assert!(s.contains("udp dport 4790 iifname != \"mesh-crypt\""));
        // Flushed and filled in one transaction: the chain before the rules, the set
        // before its elements.
        assert!(s.find("flush chain").unwrap() < s.find("add rule").unwrap());
        assert!(s.find("flush set").unwrap() < s.find("add element").unwrap());
        assert!(
            f.apply(&BTreeSet::new()).is_err(),
            "an empty set closes the node"
        );
    }
}
