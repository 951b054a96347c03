//! The crate's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors of the embedded DNS engine.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `register` (or another call that spawns work) was made outside a tokio runtime.
    #[error("the DNS engine must be used from inside a tokio runtime")]
    NoRuntime,
    /// Opening a network namespace handle failed.
    #[error("opening network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `setns(2)` into a network namespace failed.
    #[error("entering network namespace {path}: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Binding a listening socket failed (e.g. something in the task already listens on
    /// 127.0.0.11:53).
    #[error("binding DNS {proto} socket on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Preparing a socket for the async runtime failed.
    #[error("preparing DNS socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The helper thread that binds inside a namespace died or could not be spawned.
    #[error("namespace helper thread: {0}")]
    Thread(String),
    /// A name given to [`crate::Dns::query`] is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// A query type given to [`crate::Dns::query`] is unknown.
    #[error("unknown DNS query type {0:?}")]
    InvalidType(String),
    /// Encoding or decoding a DNS message failed.
    #[error("DNS message: {0}")]
    Message(String),
}
