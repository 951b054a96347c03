//! Reading the host's resolver configuration: the upstreams and search domains the engine
//! forwards to and strips.
//!
//! The engine forwards from meshd's network namespace, which on a test rig is not the
//! host's (`ip netns exec hN meshd ...`), so loopback resolvers (127.0.0.53 of
//! systemd-resolved, a local dnsmasq) are not usable as upstreams and are skipped, as
//! libnetwork does. When that leaves nothing and systemd-resolved's real upstream list
//! (`/run/systemd/resolve/resolv.conf`) exists, [`ResolvConf::read_host`] uses that.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// The host resolv.conf.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of real upstreams.
pub const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// What the engine takes from a resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines (port 53), loopback addresses excluded, in file order.
    pub nameservers: Vec<SocketAddr>,
    /// The search domains (lowercased, no trailing dot); `domain` when there is no `search`.
    pub search: Vec<String>,
    /// Loopback nameservers that were skipped (for a log line).
    pub skipped: Vec<IpAddr>,
}

impl ResolvConf {
    /// Parses resolv.conf text. Unknown lines and unparsable addresses are ignored.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let mut domain: Option<String> = None;
        let mut search: Option<Vec<String>> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // An IPv6 address may carry a zone (`fe80::1%eth0`): not usable from
                    // another namespace, so it fails to parse and is ignored.
                    if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
                        if ip.is_loopback() {
                            out.skipped.push(ip);
                        } else {
                            out.nameservers.push(SocketAddr::new(ip, 53));
                        }
                    }
                }
                Some("search") => {
                    search = Some(words.filter_map(normalize_domain).collect());
                }
                Some("domain") => {
                    domain = words.next().and_then(normalize_domain);
                }
                _ => {}
            }
        }
        out.search = search.or(domain.map(|d| vec![d])).unwrap_or_default();
        out
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// The host's configuration: [`HOST_RESOLV_CONF`], or systemd-resolved's upstream list
    /// when the former names only loopback resolvers.
    pub fn read_host() -> std::io::Result<Self> {
        let conf = Self::read(Path::new(HOST_RESOLV_CONF))?;
        if conf.nameservers.is_empty() && !conf.skipped.is_empty() {
            if let Ok(mut real) = Self::read(Path::new(SYSTEMD_RESOLV_CONF)) {
                if !real.nameservers.is_empty() {
                    if real.search.is_empty() {
                        real.search = conf.search;
                    }
                    return Ok(real);
                }
            }
        }
        Ok(conf)
    }
}

fn normalize_domain(d: &str) -> Option<String> {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    (!d.is_empty()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_and_search() {
        let c = ResolvConf::parse(
            "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n; x\n\
             nameserver 2001:db8::1\nnameserver fe80::1%eth0\nnameserver ::1\n\
             domain ignored.example\nsearch Corp.Example. lab.example\noptions edns0\n",
        );
        assert_eq!(
            c.nameservers,
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.search, vec!["corp.example", "lab.example"]);
        assert_eq!(c.skipped.len(), 2);
    }

    #[test]
    fn domain_is_the_fallback_search() {
        let c = ResolvConf::parse("domain Example.ORG\n");
        assert_eq!(c.search, vec!["example.org"]);
        assert!(c.nameservers.is_empty());
    }
}
