//! The local API between `mesh` and `meshd`: one JSON [`Request`] per line on the unix socket
//! `EXEC_ROOT/meshd.sock`, answered by one JSON [`Response`] line.
//!
//! **API Boundary**: this is the only interface the CLI uses; everything it shows comes from here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::filter::Filters;
use crate::objects::{Availability, NodeRole};
use crate::service::{FailureAction, RestartCondition, ServiceSpec, UpdateOrder};

/// A request to the local daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Request {
    Version,
    Info,
    SwarmInit {
        advertise_addr: Option<String>,
        listen_addr: Option<String>,
        /// `--autolock`: the managers' keys are wrapped with an unlock key that is never
        /// written to disk; a restarted manager stays locked until `swarm unlock`.
        #[serde(default)]
        autolock: bool,
        /// `--force-new-cluster`: on a manager of a swarm that lost its quorum, start a
        /// one-manager swarm from this node's state (services, networks, secrets, CA, IDs
        /// and tokens kept). On a node outside any swarm, a plain init (as Docker's).
        #[serde(default)]
        force_new_cluster: bool,
    },
    /// `swarm unlock`: the unlock key (`SWMKEY-1-...`) of a locked manager.
    SwarmUnlock {
        key: String,
    },
    /// `swarm unlock-key [--rotate]`.
    UnlockKey {
        rotate: bool,
    },
    /// `swarm ca [--rotate]`: the root the swarm wants and how far the nodes are; with
    /// `rotate`, a new root is made first.
    SwarmCa {
        rotate: bool,
    },
    /// `swarm update`: each `Some` changes that cluster setting.
    SwarmUpdate {
        #[serde(default)]
        autolock: Option<bool>,
        #[serde(default)]
        task_history_limit: Option<u32>,
        #[serde(default)]
        cert_expiry_secs: Option<u64>,
        #[serde(default)]
        dispatcher_heartbeat_ms: Option<u64>,
    },
    SwarmJoin {
        token: String,
        remote: String,
        advertise_addr: Option<String>,
        listen_addr: Option<String>,
    },
    SwarmLeave {
        force: bool,
    },
    JoinToken {
        role: NodeRole,
        rotate: bool,
    },
    NodeLs {
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    NodeInspect {
        node: String,
    },
    NodeUpdate {
        node: String,
        availability: Option<Availability>,
        label_add: BTreeMap<String, String>,
        label_rm: Vec<String>,
    },
    NodePromote {
        node: String,
    },
    NodeDemote {
        node: String,
    },
    NodeRm {
        node: String,
        force: bool,
    },
    ServiceCreate {
        spec: ServiceSpec,
        /// Credentials for the image's registry, kept (sealed) with the service and sent to
        /// the nodes that pull it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registry_auth: Option<RegistryAuth>,
    },
    ServiceLs {
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    ServicePs {
        service: String,
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    /// The tasks of every service matching the filters (the Engine API's `/tasks`, `mesh node
    /// ps`, `mesh stack ps`), as `ServicePs` rows, grouped by service name and slot.
    TaskLs {
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    ServiceInspect {
        service: String,
    },
    ServiceScale {
        service: String,
        replicas: u64,
    },
    ServiceUpdate {
        service: String,
        update: ServiceUpdate,
    },
    ServiceRollback {
        service: String,
    },
    /// Replaces a service's whole spec, as the Engine API's `POST /services/{id}/update`
    /// does: refused with "update out of sequence" unless the service is still at `version`.
    /// `rollback` goes back to the previous spec instead (`spec` is then ignored); a changed
    /// `force_update` counter replaces the tasks even if nothing else changed.
    ServiceReplace {
        service: String,
        version: u64,
        spec: ServiceSpec,
        rollback: bool,
        /// New registry credentials for the service (kept otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registry_auth: Option<RegistryAuth>,
    },
    /// Every object of the cluster as stored, for the Engine API's views and filters. With
    /// `service` (an ID, name or unique ID prefix), only that service and its tasks (none if
    /// there is no such service) beside all nodes and networks.
    Objects {
        #[serde(default)]
        service: Option<String>,
    },
    ServiceRm {
        service: String,
    },
    /// `mesh events`, `GET /events`: the kept changes after `after` (a seq of an earlier
    /// answer), or without it those made at or after `since_ns`; with neither, none, only the
    /// cursor to start from. Answered as [`crate::events::EventBatch`].
    Events {
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        since_ns: Option<u64>,
    },
    /// `service logs`: the lines of a service's tasks, or of one task, answered as
    /// [`crate::ServiceLogs`].
    ServiceLogs {
        /// A service (ID, name or unique ID prefix), or a task (ID or unique ID prefix).
        service: String,
        /// Only lines read after this time (Unix ns, exclusive).
        #[serde(default)]
        since_ns: Option<u64>,
        /// Only the last `tail` lines of each task.
        #[serde(default)]
        tail: Option<usize>,
        /// Per task ID: only lines after this time (a follower's cursor; wins over
        /// `since_ns` and `tail` for the tasks it names).
        #[serde(default)]
        after: BTreeMap<String, u64>,
    },
    NetworkCreate {
        spec: crate::network::NetworkSpec,
    },
    /// `secret create` / `config create`: answers the new object's ID.
    BlobCreate {
        kind: crate::blob::BlobKind,
        spec: crate::blob::BlobSpec,
    },
    /// `secret ls` / `config ls`: [`crate::blob::Blob`]s (no secret data).
    BlobLs {
        kind: crate::blob::BlobKind,
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    /// `secret inspect` / `config inspect` of an ID, name or unique ID prefix.
    BlobInspect {
        kind: crate::blob::BlobKind,
        name: String,
    },
    /// The Engine API's secret and config update: only the labels may change (data, when
    /// given, must be what is stored), as swarmkit allows.
    BlobUpdate {
        kind: crate::blob::BlobKind,
        name: String,
        spec: crate::blob::BlobSpec,
    },
    /// `secret rm` / `config rm`; refused while a service uses it.
    BlobRm {
        kind: crate::blob::BlobKind,
        name: String,
    },
    NetworkLs {
        /// `--filter`s, applied by the leader (see [`crate::filter`]).
        #[serde(default, skip_serializing_if = "Filters::is_empty")]
        filters: Filters,
    },
    NetworkInspect {
        network: String,
    },
    NetworkRm {
        network: String,
    },
    /// The service VIPs this node's data plane holds, with their backends.
    VipLs,
    /// What the embedded DNS on this node answers for `name`.
    DnsQuery {
        network: Option<String>,
        name: String,
        qtype: String,
    },
    /// Runs a command inside a task running on this node.
    Exec {
        task: String,
        argv: Vec<String>,
    },
    /// The tasks assigned to this node, with their processes ([`crate::LocalTask`]).
    LocalTasks,
    /// The images in this node's store.
    ImageLs,
    /// Pulls an image into this node's store.
    ImagePull {
        reference: String,
    },
    /// The digest a reference names on its registry now (`docker`'s
    /// `/distribution/{name}/json`): `{"reference": "name@sha256:...", "digest": ...}`.
    ImageResolve {
        reference: String,
    },
    /// Removes an image from this node's store.
    ImageRm {
        reference: String,
    },
    /// Removes the images no task on this node uses, and their layers.
    ImagePrune,
    /// Loads a `docker save` or OCI archive (a path the daemon can read) into this node's
    /// store.
    ImageLoad {
        path: String,
    },
    /// `mesh login`: checks the credentials with the registry, then saves them for this
    /// node's pulls. Answers `{"status": "Login Succeeded"}`.
    Login {
        /// `HOST[:PORT]`; empty: Docker Hub.
        server: String,
        credentials: RegistryCredentials,
    },
    /// `mesh logout`: forgets this node's login for a registry.
    Logout {
        server: String,
    },
}

/// A registry user and password (or token).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never a password in a log.
        write!(f, "RegistryCredentials({}, ..)", self.username)
    }
}

/// Registry credentials given with a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryAuth {
    /// `--with-registry-auth`: the login the daemon taking the request has for the image's
    /// registry (`mesh login` on that node), as Docker's CLI sends its own.
    NodeLogin,
    /// Given as they are (the Engine API's `X-Registry-Auth`).
    Credentials(RegistryCredentials),
}

/// One row of `mesh image ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// `docker.io/library/busybox` is shown `busybox`, as Docker does.
    pub repository: String,
    /// `<none>` when the image is known by digest only.
    pub tag: String,
    /// The manifest digest.
    pub digest: String,
    /// The config digest (Docker's image id).
    pub id: String,
    /// When the image was built, RFC 3339, as its config says (may be empty).
    pub created: String,
    /// Bytes of its layers, unpacked.
    pub size: u64,
}

/// The changes of `service update`; `None`/empty fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUpdate {
    pub replicas: Option<u64>,
    pub command: Option<Vec<String>>,
    /// `--image REF` (pinned by the daemon that takes the request, as at create).
    #[serde(default)]
    pub image: Option<String>,
    pub env_add: Vec<String>,
    pub env_rm: Vec<String>,
    pub constraint_add: Vec<String>,
    pub constraint_rm: Vec<String>,
    pub restart_condition: Option<RestartCondition>,
    pub restart_delay_ms: Option<u64>,
    pub restart_max_attempts: Option<u64>,
    pub update_parallelism: Option<u64>,
    pub update_delay_ms: Option<u64>,
    pub update_failure_action: Option<FailureAction>,
    pub update_monitor_ms: Option<u64>,
    #[serde(default)]
    pub update_order: Option<UpdateOrder>,
    #[serde(default)]
    pub rollback_order: Option<UpdateOrder>,
    pub nano_cpus: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Replace the tasks even if the spec did not change.
    pub force: bool,
    /// `--with-registry-auth`: new registry credentials for the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// `--secret-add` (replacing one at the same target) / `--secret-rm NAME`.
    #[serde(default)]
    pub secret_add: Vec<crate::blob::BlobReference>,
    #[serde(default)]
    pub secret_rm: Vec<String>,
    /// `--config-add` / `--config-rm NAME`.
    #[serde(default)]
    pub config_add: Vec<crate::blob::BlobReference>,
    #[serde(default)]
    pub config_rm: Vec<String>,
    /// `--health-*` / `--no-healthcheck`.
    #[serde(default, skip_serializing_if = "crate::HealthFlags::is_empty")]
    pub health: crate::HealthFlags,
}

impl Request {
    /// Whether the request reads or changes cluster state, so that only a manager with a
    /// reachable leader may answer it.
    pub fn is_management(&self) -> bool {
        !matches!(
            self,
            Request::Version
                | Request::Info
                | Request::SwarmInit { .. }
                | Request::SwarmJoin { .. }
                | Request::SwarmLeave { .. }
                | Request::SwarmUnlock { .. }
                | Request::Exec { .. }
                | Request::VipLs
                | Request::DnsQuery { .. }
                | Request::ImageLs
                | Request::LocalTasks
                | Request::ImagePull { .. }
                | Request::ImageResolve { .. }
                | Request::ImageRm { .. }
                | Request::ImagePrune
                | Request::ImageLoad { .. }
                | Request::Login { .. }
                | Request::Logout { .. }
        )
    }
}

/// The answer: the payload of the request's kind, or an error.
pub type Response = Result<serde_json::Value, ApiError>;

/// What kind of failure an [`ApiError`] is; the CLI maps it to an exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    NotInSwarm,
    AlreadyInSwarm,
    NotManager,
    NoLeader,
    PermissionDenied,
    Unavailable,
    /// A manager restarted with autolock on, before `swarm unlock`.
    Locked,
    Internal,
}

/// An error as the daemon reports it: a kind and one clear line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Docker Swarm's words for a management call without Raft quorum.
pub const NO_LEADER_MESSAGE: &str = "The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online.";

/// Docker Swarm's words for a management call on a worker.
pub const NOT_MANAGER_MESSAGE: &str = "This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager.";

/// Docker Swarm's words for a call that needs a swarm on a node outside one.
pub const NOT_IN_SWARM_MESSAGE: &str = "This node is not a swarm manager. Use \"mesh swarm init\" or \"mesh swarm join\" to connect this node to swarm and try again.";

/// Docker Swarm's words for a management call on a locked manager.
pub const LOCKED_MESSAGE: &str = "Swarm is encrypted and needs to be unlocked before it can be used. Please use \"mesh swarm unlock\" to unlock it.";

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        ApiError {
            kind,
            message: message.to_string(),
        }
    }
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn no_leader() -> Self {
        Self::new(ErrorKind::NoLeader, NO_LEADER_MESSAGE)
    }
    pub fn not_manager() -> Self {
        Self::new(ErrorKind::NotManager, NOT_MANAGER_MESSAGE)
    }
    pub fn not_in_swarm() -> Self {
        Self::new(ErrorKind::NotInSwarm, NOT_IN_SWARM_MESSAGE)
    }
    pub fn locked() -> Self {
        Self::new(ErrorKind::Locked, LOCKED_MESSAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged() {
        let r = Request::NodeRm {
            node: "h1".into(),
            force: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"method":"node_rm","params":{"node":"h1","force":true}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let v: Request = serde_json::from_str(r#"{"method":"version"}"#).unwrap();
        assert_eq!(v, Request::Version);
    }

    #[test]
    fn response_round_trips_errors() {
        let r: Response = Err(ApiError::no_leader());
        let s = serde_json::to_string(&r).unwrap();
        let back: Response = serde_json::from_str(&s).unwrap();
        assert_eq!(back.unwrap_err().kind, ErrorKind::NoLeader);
    }
}
