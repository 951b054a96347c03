//! The control plane: the manager, and every node's swarm membership.
//!
//! - [`state`]: the replicated state machine (cluster record, nodes) and its commands;
//! - [`allocator`]: network addresses, proposed by the leader and settled at apply;
//! - [`storage`]: openraft log and state-machine storage on redb;
//! - [`history`]: the cluster's recent changes as events, derived as the log is applied;
//! - [`network`], [`peer`]: the control-port protocol, Raft RPCs included, over mutual TLS;
//! - [`member`]: a node inside a swarm: Raft while it manages, heartbeats, leader handlers;
//! - [`node_agent`]: what a member asks of its node's agent (`mesh-agent` implements it), and
//!   how the agent reaches the leader;
//! - [`dispatcher`]: the leader's side of the agents: assignments answers, and heartbeat
//!   bookkeeping that decides Ready/Down;
//! - [`gossipkeys`]: the gossip keys: made, rotated and handed to nodes by the leader;
//! - [`metrics`]: the control plane's Prometheus metrics (Raft, and the leader's store);
//! - [`local`]: what a node persists about itself;
//! - [`services`], [`networks`], [`orchestrator`], [`ipam`], [`blobs`]: the leader's
//!   management calls, reconciliation and address pools.
//!
//! **Architecture Invariant**: nothing here touches the kernel's network configuration
//! (no netlink, no nftables, no BPF, no system calls of its own); the control plane only
//! decides and records. The node agent (`mesh-agent`) depends on it, never the reverse.

#![forbid(unsafe_code)]

pub mod allocator;
pub mod blobs;
pub mod datakey;
pub mod dispatcher;
pub mod gossipkeys;
pub mod history;
pub mod ipam;
pub mod local;
pub mod member;
pub mod metrics;
pub mod network;
pub mod networks;
pub mod node_agent;
pub mod orchestrator;
pub mod peer;
pub mod raft_types;
pub mod services;
pub mod state;
pub mod storage;
