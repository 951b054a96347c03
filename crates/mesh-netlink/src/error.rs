//! The crate's error type: one enum, lowercase messages that name the object
//! and the namespace, e.g. `cannot create vxlan vx-4096 in namespace ov-4096:
//! File exists (os error 17)`.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink request was refused by the kernel or could not be sent.
    #[error("cannot {op} {object} in namespace {ns}: {source}")]
    Request {
        /// What was attempted ("create", "delete", "set mtu of", ...).
        op: &'static str,
        /// The object, e.g. `vxlan vx-4096` or `neighbour 10.0.9.3 on vx-4096`.
        object: String,
        /// The namespace the handle lives in.
        ns: String,
        /// The kernel's answer (an errno) or the transport failure.
        source: io::Error,
    },
    /// A netlink request got no complete answer in time.
    #[error("timed out after {timeout:?} trying to {op} {object} in namespace {ns}")]
    Timeout {
        /// What was attempted.
        op: &'static str,
        /// The object.
        object: String,
        /// The namespace the handle lives in.
        ns: String,
        /// The bound that expired.
        timeout: Duration,
    },
    /// A link the request needs does not exist.
    #[error("link {name} not found in namespace {ns}")]
    LinkNotFound {
        /// The link name.
        name: String,
        /// The namespace that was searched.
        ns: String,
    },
    /// A link of that name exists but is not what the caller asked for.
    #[error("cannot create {kind} {name} in namespace {ns}: a {found} link of that name exists")]
    LinkMismatch {
        /// The kind the caller wanted ("bridge", "vxlan", "veth").
        kind: &'static str,
        /// The link name.
        name: String,
        /// The namespace.
        ns: String,
        /// What is there instead (its kind, or "vxlan vni N").
        found: String,
    },
    /// A namespace operation (create, open, setns, mount, delete) failed.
    #[error("cannot {op} network namespace {path}: {source}")]
    Namespace {
        /// What was attempted.
        op: &'static str,
        /// The namespace file (or its name).
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A namespace name that cannot be a single file name.
    #[error("invalid network namespace name {0:?}")]
    InvalidName(String),
    /// A MAC address that is not six `:`-separated hex bytes.
    #[error("invalid mac address {0:?}")]
    InvalidMac(String),
    /// The netlink socket could not be opened inside the namespace.
    #[error("cannot open a netlink socket in namespace {ns}: {source}")]
    Socket {
        /// The namespace.
        ns: String,
        /// The cause.
        source: io::Error,
    },
    /// No tokio runtime (with I/O and time enabled) to drive the connection.
    #[error("cannot open a netlink socket in namespace {ns}: no tokio runtime")]
    NoRuntime {
        /// The namespace.
        ns: String,
    },
}

impl NetlinkError {
    /// The errno behind this error, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. }
            | NetlinkError::Namespace { source, .. }
            | NetlinkError::Socket { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True if the error says "this does not exist" (a missing link, or
    /// `ENOENT`/`ENODEV`/`ESRCH` from the kernel).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetlinkError::LinkNotFound { .. })
            || matches!(
                self.errno(),
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH)
            )
    }

    /// True if the error says "this already exists" (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::LinkMismatch { .. }) || self.errno() == Some(libc::EEXIST)
    }
}

/// Turns rtnetlink's error into an `io::Error`: the kernel's errno when there
/// is one, a descriptive "other" error otherwise.
pub(crate) fn to_io(err: rtnetlink::Error) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => msg.to_io(),
        rtnetlink::Error::RequestFailed => {
            io::Error::other("netlink connection closed (the driving task is gone)")
        }
        other => io::Error::other(other.to_string().to_lowercase()),
    }
}
