//! The Raft type configuration: what the log carries ([`Command`]) and what applying it
//! returns ([`CommandResult`]).

use std::io::Cursor;

use crate::state::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Type configuration of the manager's Raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftId = u64;
pub type LogId = openraft::LogId<RaftId>;
pub type StorageError = openraft::StorageError<RaftId>;
pub type StoredMembership = openraft::StoredMembership<RaftId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<RaftId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Vote = openraft::Vote<RaftId>;
pub type RaftMetrics = openraft::RaftMetrics<RaftId, openraft::BasicNode>;
