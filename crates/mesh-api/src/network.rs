//! Overlay networks and task attachments, as the replicated store keeps them and
//! `network inspect` shows them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An interface address with its prefix length, `A.B.C.D/N`: a task's address on a network,
/// a VIP, a node's ingress address. Written as that string in JSON (the store, the API, the
/// Engine API's `IPAMConfig`), so the form on disk and on the wire is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfAddr {
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl IfAddr {
    pub fn new(ip: Ipv4Addr, prefix: u8) -> IfAddr {
        IfAddr { ip, prefix }
    }
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// A malformed [`IfAddr`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid address: {0:?} (expected A.B.C.D/N)")]
pub struct IfAddrError(pub String);

impl FromStr for IfAddr {
    type Err = IfAddrError;

    fn from_str(s: &str) -> Result<IfAddr, IfAddrError> {
        let bad = || IfAddrError(s.to_string());
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(IfAddr { ip, prefix })
    }
}

impl Serialize for IfAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IfAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IfAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a user asks for in `network create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// Only `overlay` exists.
    pub driver: String,
    /// `A.B.C.D/N`, or `None` to take the next free /24 of 10.0.0.0/8.
    pub subnet: Option<String>,
    pub attachable: bool,
    /// Task traffic between hosts encrypted (`--opt encrypted`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The routing-mesh network made at `swarm init`.
    #[serde(default)]
    pub ingress: bool,
    /// User metadata (`--label`; stacks put `com.docker.stack.namespace` here).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The overlay driver's options (`--opt`, the Engine API's `Options`, compose's
/// `driver_opts`): `encrypted` (whatever its value, as Docker) is the only one; whether it is
/// there.
pub fn overlay_driver_options<'a>(opts: impl IntoIterator<Item = &'a str>) -> Result<bool, String> {
    let mut encrypted = false;
    for key in opts {
        match key {
            "encrypted" => encrypted = true,
            other => {
                return Err(format!(
                    "invalid option {other:?}: the overlay driver of mesh takes \"encrypted\" only"
                ))
            }
        }
    }
    Ok(encrypted)
}

/// A network as stored: its spec and what the allocator gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub spec: NetworkSpec,
    /// `A.B.C.D/N`.
    pub subnet: String,
    /// The first usable address: the bridge's address on every host.
    pub gateway: Ipv4Addr,
    /// VXLAN network identifier, from 4096.
    pub vni: u32,
    pub created_at: u64,
}

/// A task's place on a network: its address there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    pub network_id: String,
    pub network_name: String,
    pub addr: IfAddr,
    pub vni: u32,
    pub gateway: Ipv4Addr,
    /// The service's virtual IP on this network, if it has one.
    #[serde(default)]
    pub vip: Option<IfAddr>,
    /// The network is encrypted (`--opt encrypted`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// One line of `mesh network ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
}

/// One VIP of a node's balancer, as `mesh vip ls` shows it (`--format json`: these keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VipEntry {
    /// The service's name (empty if the VIP is no longer any service's).
    pub service: String,
    /// The address.
    #[serde(rename = "VIP")]
    pub vip: String,
    /// The port, `*` for every port.
    pub port: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The backends' addresses.
    pub backends: Vec<String>,
    /// `ebpf` or `nftables`.
    pub balancer: String,
}

/// What a node's embedded DNS answers for one name (`mesh dns query`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAnswer {
    /// The name asked.
    pub name: String,
    /// The type asked (`A`, `SRV`, ...).
    #[serde(rename = "type")]
    pub qtype: String,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...
    pub rcode: String,
    /// The data of the answer records of the asked type, in the order served.
    pub answers: Vec<String>,
    /// Whether the name went to the upstream resolvers.
    pub forwarded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_address_reads_and_writes_a_b_c_d_slash_n() {
        let a: IfAddr = "10.0.1.5/24".parse().unwrap();
        assert_eq!(a, IfAddr::new(Ipv4Addr::new(10, 0, 1, 5), 24));
        assert_eq!(a.to_string(), "10.0.1.5/24");
        for bad in [
            "10.0.1.5",
            "10.0.1.5/33",
            "10.0.1/24",
            "10.0.1.5/x",
            "/24",
            "",
        ] {
            let e = bad.parse::<IfAddr>().unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("invalid address: {bad:?} (expected A.B.C.D/N)")
            );
        }
    }

    /// The JSON stays the strings the store, the API and the Engine API always had, so a
    /// store written before reads back, and a malformed address is refused with its reason.
    #[test]
    fn an_attachment_s_json_keeps_its_strings() {
        let json = r#"{"network_id":"n1","network_name":"appnet","addr":"10.0.1.5/24","vni":4097,"gateway":"10.0.1.1","vip":"10.0.1.2/24"}"#;
        let a: NetworkAttachment = serde_json::from_str(json).unwrap();
        assert_eq!(a.addr.ip, Ipv4Addr::new(10, 0, 1, 5));
        assert_eq!(a.gateway, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(a.vip.map(|v| v.prefix), Some(24));
        assert_eq!(serde_json::to_string(&a).unwrap(), json);
        let bad = json.replace("10.0.1.5/24", "10.0.1.5");
        let e = serde_json::from_str::<NetworkAttachment>(&bad).unwrap_err();
        assert!(e.to_string().contains("invalid address"), "{e}");
    }
}
