//! The manager's scheduler, as swarmkit's: for the tasks that need a node, keep the nodes that
//! pass every filter, then spread the tasks over them.
//!
//! * [`constraint`]: placement constraints (`--constraint node.labels.zone==a`), parsed and
//!   matched against a [`mesh_api::Node`].
//! * [`scheduler`]: the [`Scheduler`], built from the current nodes and the tasks already
//!   placed on them, which filters nodes (ready and active, constraints, resources) and picks
//!   for each new task the eligible node with the fewest tasks of the same service, then the
//!   fewest tasks in total, then the lowest node ID.
//!
//! Everything here is pure: no I/O, no clock, no randomness, no async. The same inputs always
//! give the same placements, so every manager would schedule alike.
#![forbid(unsafe_code)]

pub mod constraint;
pub mod scheduler;

pub use constraint::{
    parse_constraint, parse_constraints, Constraint, ConstraintError, ConstraintKey, Operator,
};
pub use scheduler::Scheduler;
