//! Binding the embedded server's sockets inside a task's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread later uses it. So a
//! short-lived helper thread `setns()`es into the task's namespace, binds UDP and TCP
//! `127.0.0.11:53`, and hands the sockets back; meshd's other threads never change
//! namespace. The task's `lo` must be up for queries to reach the sockets (binding 127.0.0.11
//! succeeds either way on current kernels).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::DnsError;

/// Where the embedded DNS server listens inside every task: `127.0.0.11:53`.
pub const DNS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53));

/// Binds UDP and TCP [`DNS_ADDR`] inside the network namespace at `netns_path`
/// (`/proc/<pid>/ns/net`, or a bind mount such as `/var/run/netns/NAME`).
pub fn bind_in_netns(netns_path: &Path) -> Result<(UdpSocket, TcpListener), DnsError> {
    bind_in_netns_at(netns_path, DNS_ADDR)
}

/// As [`bind_in_netns`], on another address.
pub fn bind_in_netns_at(
    netns_path: &Path,
    addr: SocketAddr,
) -> Result<(UdpSocket, TcpListener), DnsError> {
    let path = netns_path.to_path_buf();
    let ns = File::open(&path).map_err(|source| DnsError::OpenNetns {
        path: path.clone(),
        source,
    })?;
    let helper = std::thread::Builder::new()
        .name("mesh-dns-netns".into())
        .spawn(move || -> Result<(UdpSocket, TcpListener), DnsError> {
            // SAFETY: `ns` is an open file we own for the duration of the call; setns only
            // changes the network namespace of this helper thread, which exits right after
            // binding and shares nothing namespace-dependent with other threads.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(DnsError::Setns {
                    path,
                    source: std::io::Error::last_os_error(),
                });
            }
            let udp = UdpSocket::bind(addr).map_err(|source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            })?;
            let tcp = TcpListener::bind(addr).map_err(|source| DnsError::Bind {
                proto: "tcp",
                addr,
                source,
            })?;
            Ok((udp, tcp))
        })
        .map_err(|e| DnsError::Thread(e.to_string()))?;
    helper
        .join()
        .map_err(|_| DnsError::Thread("namespace helper thread panicked".into()))?
}
