//! The crate's error type.

use std::net::SocketAddr;

use crate::table::TableError;

/// Errors of the gossip layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("invalid gossip config: {0}")]
    Config(String),
    #[error("binding gossip port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("entry too large for one gossip packet: {network}/{table}/{key} ({size} bytes, at most {max})")]
    TooLarge {
        network: String,
        table: String,
        key: String,
        size: usize,
        max: usize,
    },
    #[error("could not sync with any join peer: {0}")]
    JoinFailed(String),
    #[error("gossip is stopped")]
    Stopped,
}
