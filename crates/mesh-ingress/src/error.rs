//! The crate's error type: one enum whose messages name the namespace and the object, e.g.
//! `nft in namespace ingress_sbox: nft -f - failed (exit status: 1): ...`.

use mesh_netlink::NetlinkError;

use crate::Proto;

/// Everything that can go wrong while programming the routing mesh.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A netlink call (veth, addresses, routes, links) failed.
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    /// An `nft` transaction or listing failed (nothing of that transaction was applied).
    #[error("nft in namespace {ns}: {source}")]
    Nft {
        /// The namespace the script ran in.
        ns: String,
        /// What went wrong (`nft`'s own message when it ran).
        source: mesh_netlink::nft::NftError,
    },
    /// The ruleset read back from the kernel could not be understood.
    #[error("cannot read back table ip {table} in namespace {ns}: {msg}")]
    Readback {
        /// The namespace.
        ns: String,
        /// The table.
        table: &'static str,
        /// What was wrong.
        msg: String,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {path} in namespace {ns}: {msg}")]
    Sysctl {
        /// The namespace.
        ns: String,
        /// The `/proc/sys/...` file.
        path: String,
        /// The cause.
        msg: String,
    },
    /// The configuration or an argument is unusable (bad interface name, overlapping
    /// addresses, duplicate ports in a desired state, ...).
    #[error("invalid ingress configuration: {0}")]
    Invalid(String),
    /// A port is already used by the other kind of publication (ingress vs host mode).
    #[error("{proto}/{port} is already published in {existing} mode")]
    Conflict {
        /// The protocol.
        proto: Proto,
        /// The published port.
        port: u16,
        /// `ingress` or `host`: what holds the port now.
        existing: &'static str,
    },
    /// A blocking helper task died (a panic in a namespace thread).
    #[error("ingress helper task failed: {0}")]
    Task(String),
}
