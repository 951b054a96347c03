//! What the node agent learns of its host: the addresses of its network namespace (to choose
//! the address a node advertises, as Docker does) and the CPUs and memory the scheduler counts.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};

/// The IPv4 addresses of the up, non-loopback interfaces of this network namespace.
pub fn local_ipv4_addrs() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we own and free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
        let lo = ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0;
        if up && !lo && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr of the family it names.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    out
}

/// Chooses the address to advertise when none is given: the only IPv4 address of this
/// namespace, or an error naming the candidates, as Docker does.
pub fn default_advertise_ip() -> Result<IpAddr, String> {
    let addrs = local_ipv4_addrs();
    match addrs.as_slice() {
        [one] => Ok(IpAddr::V4(*one)),
        [] => Err("could not choose an IP address to advertise since this system has no non-loopback IPv4 address: use --advertise-addr".into()),
        many => Err(format!(
            "could not choose an IP address to advertise since this system has multiple addresses ({}): use --advertise-addr",
            many.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// This machine's CPUs and memory, as the scheduler counts them.
pub fn machine_resources() -> mesh_api::Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    mesh_api::Resources {
        nano_cpus: cpus * 1_000_000_000,
        memory_bytes: mem_kb * 1024,
    }
}
