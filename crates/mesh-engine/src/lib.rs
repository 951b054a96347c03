//! The Docker Engine API's Swarm subset, so that the unmodified `docker` CLI and the tools
//! built on the Engine API (stack deploy, traefik's swarm provider, client libraries) drive
//! mesh.
//!
//! `meshd` serves it over HTTP/1.1 on a unix socket (`EXEC_ROOT/docker.sock`, or
//! `--docker-socket`). There is no second model behind it: every call becomes one or more
//! [`mesh_api::Request`]s to the same daemon the `mesh` CLI talks to ([`Backend`]), and every
//! answer is drawn from the objects that daemon returns, in the Engine API's JSON shapes
//! (the `bollard-stubs` models, generated from the Engine API's own schema).
//!
//! - [`server`]: the HTTP side: connections, `/vX.Y` prefixes, `/_ping`, errors as Docker
//!   writes them (`{"message": ...}`, `Content-Type: application/json`).
//! - [`routes`]: one handler per endpoint.
//! - [`convert`]: mesh objects to Engine API objects; [`containers`]: this node's tasks as
//!   containers.
//! - [`spec`]: Engine API service specs to mesh's, refusing (400, naming the field) whatever
//!   mesh would not keep.
//! - [`events`]: the cluster's changes as Docker's event stream.
//! - [`query`]: query strings and Docker's filters.

#![forbid(unsafe_code)]
#![recursion_limit = "256"]

use std::future::Future;
use std::pin::Pin;

pub mod blobs;
pub mod containers;
pub mod convert;
pub mod events;
pub mod query;
pub mod routes;
pub mod server;
pub mod spec;

pub use server::{serve, Server};

/// The newest Engine API version served (the `API-Version` header of `/_ping`): clients
/// negotiate down to it. Both `docker` 20.10 and 28.x speak it.
pub const API_VERSION: &str = "1.41";
/// The oldest version accepted.
pub const MIN_API_VERSION: &str = "1.24";

/// A boxed future, as [`Backend::call`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the Engine API asks of the daemon: the local API's requests, answered as the `mesh`
/// CLI's are.
pub trait Backend: Send + Sync + 'static {
    fn call(&self, req: mesh_api::Request) -> BoxFuture<'_, mesh_api::Response>;
}
