//! NetworkDB for mesh: cluster membership and failure detection (SWIM, via foca) over UDP,
//! plus per-network tables of small records replicated only among the nodes that have the
//! network.
//!
//! A node has a name (the swarm node ID), a gossip address (UDP and TCP, port 7946 by
//! default) and declares the networks it has ([`Gossip::set_networks`]). Entries are
//! `(network, table, key) → bytes`, written only by their owner ([`Gossip::put`],
//! [`Gossip::delete`]), versioned with a Lamport clock and the owner's name, deleted with
//! tombstones. They reach every member of the network by eager push, table gossip rounds
//! and periodic push-pull over TCP, and nothing of a network is sent to, or kept by, a node
//! without it. When failure detection declares a node down its entries are removed
//! everywhere; when it comes back it re-announces them. Changes come out as [`Event`]s.
//!
//! A network's tables are complete only once they are **synced** ([`Gossip::synced`],
//! [`Event::Synced`]): after joining a network (a restarted node rejoins all of its own), a
//! node holds little more than its own records until its first push-pull with a member of
//! the network has been merged. A consumer that removes what the tables do not list (a data
//! plane) waits for that before removing anything. A node given nobody to join counts as
//! alone; one that declares networks before it joins its peers names them in
//! [`Config::seeds`], or its networks would count as having no other member.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_gossip::GossipError> {
//! use mesh_gossip::{Config, Gossip};
//! let cfg = Config::new("node-1", "10.0.0.1:7946".parse().unwrap(), "cluster-id");
//! let g = Gossip::start(cfg).await?;
//! g.join(&["10.0.0.2:7946".parse().unwrap()]).await?;
//! g.set_networks(["appnet".to_string()].into()).await;
//! let mut events = g.subscribe();
//! g.put("appnet", "endpoints", "ep-1", b"10.0.1.5".to_vec()).await?;
//! let _first = events.recv().await;
//! # Ok(()) }
//! ```
//!
//! With [`Config::encrypt`], every packet and push-pull frame is sealed (AES-256-GCM) with
//! cluster keys given by [`Gossip::set_keys`] (see [`seal`]); nothing is sent or accepted
//! before the first keys arrive, and what does not open is dropped and counted.
//!
//! Modules: [`table`] has the merge rules, [`core`] the protocol (one state machine, no
//! I/O), [`wire`] the packet format, [`seal`] the sealed envelope, [`sim`] the in-process
//! simulator, [`metrics`] the Prometheus encoding of [`Stats`]; [`Gossip`] runs a node on
//! tokio.

#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod error;
pub mod event;
pub mod id;
pub mod membership;
pub mod metrics;
mod runtime;
pub mod seal;
pub mod sim;
pub mod stats;
pub mod table;
pub mod wire;

pub use config::{Config, DEFAULT_PORT};
pub use error::GossipError;
pub use event::{Entry, Event, Member};
pub use id::NodeId;
pub use runtime::Gossip;
pub use seal::{Key, Keyring};
pub use stats::{Stats, LAG_BOUNDS};
