//! Address management for overlay networks: subnets from the default pool 10.0.0.0/8 in /24s
//! (never overlapping), VNIs from 4096, gateways, and task addresses. Pure functions over what
//! the store already holds, so the allocation is deterministic and an address is free again as
//! soon as no task holds it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The first VXLAN network identifier handed out, as libnetwork.
pub const FIRST_VNI: u32 = 4096;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// An IPv4 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len)
        }
    }

    /// Parses `A.B.C.D/N`; the address must be the network address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid subnet: {s} (expected A.B.C.D/N)");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        if !(8..=29).contains(&len) {
            return Err(format!(
                "invalid subnet: {s} (prefix length must be between 8 and 29)"
            ));
        }
        if u32::from(addr) & !Self::mask(len) != 0 {
            return Err(format!(
                "invalid subnet: {s} (host bits set; did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(addr) & Self::mask(len))
            ));
        }
        Ok(Cidr { addr, len })
    }

    pub fn first(&self) -> u32 {
        u32::from(self.addr)
    }

    pub fn last(&self) -> u32 {
        self.first() | !Self::mask(self.len)
    }

    pub fn overlaps(&self, o: &Cidr) -> bool {
        self.first() <= o.last() && o.first() <= self.last()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        self.first() <= v && v <= self.last()
    }

    /// The bridge address: the first usable one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.first() + 1)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The next /24 of 10.0.0.0/8 that overlaps none of `taken`.
pub fn next_subnet(taken: &[Cidr]) -> Result<Cidr, String> {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    for i in 0..(1u32 << 16) {
        let c = Cidr {
            addr: Ipv4Addr::from(base + (i << 8)),
            len: 24,
        };
        if !taken.iter().any(|t| t.overlaps(&c)) {
            return Ok(c);
        }
    }
    Err("the default address pool 10.0.0.0/8 is exhausted".into())
}

/// The lowest VNI from [`FIRST_VNI`] not in `used`.
pub fn next_vni(used: &BTreeSet<u32>) -> Result<u32, String> {
    (FIRST_VNI..=MAX_VNI)
        .find(|v| !used.contains(v))
        .ok_or_else(|| "no VXLAN network identifier left".to_string())
}

/// The lowest address of `subnet` after the gateway that is not in `used` (network and
/// broadcast addresses excluded).
pub fn next_addr(subnet: &Cidr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    (subnet.first() + 2..subnet.last())
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

/// The first address of `subnet` after `after` (wrapping around to the lowest one after the
/// gateway) that is not in `used`; the lowest one when `after` is `None` or outside.
pub fn next_addr_after(
    subnet: &Cidr,
    used: &BTreeSet<Ipv4Addr>,
    after: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let (lo, hi) = (subnet.first() + 2, subnet.last());
    let start = after
        .map(u32::from)
        .filter(|a| (lo..hi).contains(a))
        .map_or(lo, |a| a + 1);
    (start..hi)
        .chain(lo..start)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_given_serially_and_wrap_around() {
        let n = Cidr::parse("10.0.1.0/29").unwrap(); // .2 to .6 usable
        let ip = |d| Ipv4Addr::new(10, 0, 1, d);
        let used: BTreeSet<Ipv4Addr> = [ip(3)].into();
        assert_eq!(next_addr_after(&n, &used, None), Some(ip(2)));
        // .2 was given last and released: .4 (.3 is held), not .2 again.
        assert_eq!(next_addr_after(&n, &used, Some(ip(2))), Some(ip(4)));
        // After the last usable one, around to the lowest free.
        assert_eq!(next_addr_after(&n, &used, Some(ip(6))), Some(ip(2)));
        let full: BTreeSet<Ipv4Addr> = (2..=6).map(ip).collect();
        assert_eq!(next_addr_after(&n, &full, Some(ip(4))), None);
        // A cursor outside the subnet counts as none.
        assert_eq!(next_addr_after(&n, &used, Some(ip(200))), Some(ip(2)));
    }

    #[test]
    fn parse_and_overlap() {
        let a = Cidr::parse("10.0.1.0/24").unwrap();
        assert_eq!(a.gateway(), Ipv4Addr::new(10, 0, 1, 1));
        assert!(a.overlaps(&Cidr::parse("10.0.0.0/16").unwrap()));
        assert!(!a.overlaps(&Cidr::parse("10.0.2.0/24").unwrap()));
        assert!(Cidr::parse("10.0.1.5/24")
            .unwrap_err()
            .contains("did you mean 10.0.1.0/24"));
        assert!(Cidr::parse("10.0.1.0").is_err());
        assert!(Cidr::parse("10.0.1.0/33").is_err());
        assert!(Cidr::parse("10.0.1.0/30").is_err());
        assert!(Cidr::parse("nonsense/24").is_err());
        assert_eq!(a.to_string(), "10.0.1.0/24");
    }

    #[test]
    fn subnets_never_overlap() {
        let mut taken = vec![
            Cidr::parse("10.0.0.0/24").unwrap(),
            Cidr::parse("10.0.2.0/23").unwrap(),
        ];
        let n = next_subnet(&taken).unwrap();
        assert_eq!(n.to_string(), "10.0.1.0/24");
        taken.push(n);
        assert_eq!(next_subnet(&taken).unwrap().to_string(), "10.0.4.0/24");
        assert!(next_subnet(&[Cidr::parse("10.0.0.0/8").unwrap()]).is_err());
    }

    #[test]
    fn vnis_and_addresses() {
        let used: BTreeSet<u32> = [4096, 4097, 4099].into();
        assert_eq!(next_vni(&used).unwrap(), 4098);
        let s = Cidr::parse("10.0.9.0/29").unwrap();
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Some(ip) = next_addr(&s, &used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        // .0 network, .1 gateway, .7 broadcast are never handed out.
        assert_eq!(
            got,
            vec!["10.0.9.2", "10.0.9.3", "10.0.9.4", "10.0.9.5", "10.0.9.6"]
        );
        used.remove(&Ipv4Addr::new(10, 0, 9, 4));
        assert_eq!(next_addr(&s, &used), Some(Ipv4Addr::new(10, 0, 9, 4)));
    }
}
