//! MAC address helpers: Docker's IP-derived MACs, parsing and formatting.

use std::net::Ipv4Addr;

use crate::NetlinkError;

/// Locally administered MAC for an IPv4 address, as Docker does:
/// `02:42:<the four bytes of the IP>`. Deterministic, so every host derives
/// the same MAC for a remote endpoint from its IP alone.
pub fn mac_for_ip(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive; `-` is accepted as the
/// separator too).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetlinkError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in mac.iter_mut() {
        let part = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| NetlinkError::InvalidMac(s.to_string()))?;
        *byte =
            u8::from_str_radix(part, 16).map_err(|_| NetlinkError::InvalidMac(s.to_string()))?;
    }
    if parts.next().is_some() {
        return Err(NetlinkError::InvalidMac(s.to_string()));
    }
    Ok(mac)
}

/// Formats as lowercase `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_for_ip_is_docker_style() {
        let mac = mac_for_ip(Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(mac, [0x02, 0x42, 10, 0, 9, 2]);
        assert_eq!(format_mac(&mac), "02:42:0a:00:09:02");
    }

    #[test]
    fn parse_and_format_round_trip() {
        let mac = parse_mac("02:42:0A:00:09:ff").unwrap();
        assert_eq!(mac, [0x02, 0x42, 0x0a, 0x00, 0x09, 0xff]);
        assert_eq!(format_mac(&mac), "02:42:0a:00:09:ff");
        assert_eq!(parse_mac("02-42-0a-00-09-ff").unwrap(), mac);
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "02:42:0a:00:09",
            "02:42:0a:00:09:ff:00",
            "02:42:0a:00:09:f",
            "02:42:0a:00:09:fff",
            "02:42:0a:00:09:gg",
            "0242.0a00.09ff",
        ] {
            let err = parse_mac(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("invalid mac address {bad:?}"));
        }
    }
}
