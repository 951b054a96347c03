//! What the gossip layer reports to its user: table changes and membership changes, and the
//! shapes of its snapshot queries.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// A change seen by this node. Local writes are reported too (`owner` tells whose entry it
/// is), so a consumer can mirror the tables from events alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entry was created or replaced by a newer version.
    Upsert {
        network: String,
        table: String,
        key: String,
        value: Vec<u8>,
        owner: String,
    },
    /// An entry was deleted: by its owner, because its owner went down or left the network,
    /// or because this node left the network.
    Delete {
        network: String,
        table: String,
        key: String,
        owner: String,
    },
    /// A node joined, came back or restarted (new generation).
    NodeUp { id: String, addr: SocketAddr },
    /// A node was declared down by failure detection or left.
    NodeDown { id: String },
    /// This node's tables of `network` are synced: a member's whole copy was merged (its
    /// changes were reported before this), or the network has nobody else to sync with.
    /// Once per join of the network; see the `core` module docs.
    Synced { network: String },
}

/// A live entry of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The node that wrote it.
    pub owner: String,
}

/// A node as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    /// The networks it declared.
    pub networks: BTreeSet<String>,
    /// Alive (or suspect) per failure detection; this node itself is always alive.
    pub alive: bool,
}
