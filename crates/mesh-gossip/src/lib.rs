//! NetworkDB for mesh: cluster membership and failure detection (SWIM, via foca) over UDP,
//! plus per-network tables of small records replicated only among the nodes that have the
//! network.
//!
//! See [`core`] for the protocol, [`table`] for the merge rules, [`wire`] for the packet
//! format, [`Gossip`] for the tokio runtime and [`sim`] for the in-process simulator.

#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod error;
pub mod event;
pub mod id;
pub mod membership;
mod runtime;
pub mod sim;
pub mod stats;
pub mod table;
pub mod wire;

pub use config::{Config, DEFAULT_PORT};
pub use error::GossipError;
pub use event::{Entry, Event, Member};
pub use id::NodeId;
pub use runtime::Gossip;
pub use stats::Stats;
