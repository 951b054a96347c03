//! The node agent: what runs on every host, manager or worker, beside its swarm membership
//! (`mesh-manager`'s `member`).
//!
//! - [`daemon`]: the daemon core: init/join/leave/unlock, and the local API's requests, each
//!   answered here or forwarded to the leader;
//! - [`agent`]: the agent loop: the leader's assignments long poll, the reconciler that runs
//!   and stops tasks, health checks, status reports; it implements `mesh-manager`'s
//!   `NodeAgent` and reaches the leader only through a `LeaderLink`;
//! - [`health`]: the pure part of health checks (the probe to run, its state machine);
//! - [`runtime`]: the seams the agent drives: [`runtime::Runtime`] (tasks),
//!   [`runtime::NetworkPlane`] and [`runtime::Images`], with typed errors; tests plug in fakes;
//! - [`exec`], [`plane`], [`images`]: the real ones: tasks on `mesh-executor`, the network
//!   plane (overlay, gossip, DNS, balancer, routing mesh), the image store of `mesh-image`;
//! - [`host`]: the host's addresses and resources;
//! - [`metrics`]: the plane's and the image pulls' live instruments.
//!
//! **Architecture Invariant**: the control plane (`mesh-manager`) never depends on this crate;
//! `meshd` only parses flags and wires this crate to the front doors.

pub mod agent;
pub mod daemon;
pub mod exec;
pub mod health;
pub mod host;
pub mod images;
mod latest;
pub mod metrics;
pub mod plane;
pub mod runtime;

pub use daemon::{Daemon, DaemonConfig};
