//! Types shared by the `mesh` CLI, `meshd` and the manager.
//!
//! [`objects`] holds the cluster objects as the replicated store keeps them, [`api`] the
//! requests and responses of the daemon's local API socket (one JSON document per line).
//! This crate knows nothing of Raft, TLS or the kernel: it is the vocabulary, not the machinery.
#![forbid(unsafe_code)]

pub mod answers;
pub mod api;
pub mod blob;
pub mod events;
pub mod filter;
pub mod health;
pub mod human;
pub mod logs;
pub mod network;
pub mod objects;
pub mod service;

pub use answers::{
    CaAnswer, ExecAnswer, IdAnswer, JoinAnswer, MessageAnswer, SwarmInitAnswer, TokenAnswer,
    UnlockKeyAnswer,
};
pub use api::{
    ApiError, ErrorKind, ImageSummary, RegistryAuth, RegistryCredentials, Request, Response,
    ServiceUpdate,
};
pub use blob::{Blob, BlobKind, BlobReference, BlobSpec, BlobSummary};
pub use filter::Filters;
pub use health::HealthFlags;
pub use human::human_duration;
pub use logs::{LogLine, LogStream, ServiceLogLine, ServiceLogs};
pub use network::*;
pub use objects::*;
pub use service::*;
