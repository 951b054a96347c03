//! The seams between the node agent and the kernel: what the agent needs from a task runtime
//! ([`Runtime`]), the network data plane ([`NetworkPlane`]) and the image store ([`Images`]).
//! `meshd` plugs in the real ones (`exec`: `mesh-executor`'s namespaces, cgroups and shims;
//! `plane`; `images`: `mesh-image`); tests plug in fakes. Each seam has a typed error whose kind the callers act
//! on ([`RuntimeError`], [`PlaneError`], the API's [`ApiError`] for images).

use std::time::Duration;

use mesh_api::{ApiError, ErrorKind};
pub use mesh_manager::node_agent::{GossipKey, PlaneIdentity};
use serde::{Deserialize, Serialize};

/// What to run for a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    pub resolv_conf: String,
    /// An image task's root filesystem and settings; `None`: a host process.
    #[serde(default)]
    pub rootfs: Option<RunRootfs>,
}

/// What an image task runs in (see [`Images`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRootfs {
    /// The image's unpacked layers, base first.
    pub layers: Vec<std::path::PathBuf>,
    pub readonly: bool,
    /// As the service gives them; the runtime resolves volumes on its node.
    pub mounts: Vec<mesh_api::Mount>,
    /// `--user`, else the image's; empty: root.
    pub user: String,
    /// `--workdir`, else the image's; empty: `/`.
    pub workdir: String,
    pub init: bool,
    /// The content of the task's `/etc/hosts`.
    pub hosts: String,
    /// The task's secrets and configs, with their data (kept in memory only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<RunFile>,
}

/// A secret or config file of a task: where, whose, which mode, what.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFile {
    /// Absolute path in the task.
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RunFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No data in logs.
        write!(f, "RunFile({}, {} bytes)", self.target, self.data.len())
    }
}

/// An image as the agent needs it to start a task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRun {
    /// The reference pulled (pinned to its digest).
    pub reference: String,
    /// Unpacked layers, base first.
    pub layers: Vec<std::path::PathBuf>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V`.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// The image's HEALTHCHECK (Docker's `Healthcheck` in its config), if any.
    #[serde(default)]
    pub healthcheck: Option<mesh_api::HealthConfig>,
}

/// The node's image store, behind a seam like [`Runtime`]. Blocking calls: from blocking
/// threads only.
pub trait Images: Send + Sync + 'static {
    /// The reference in Docker's normalised form (`docker.io/library/busybox:latest`), or
    /// Docker's "invalid reference format" error.
    fn normalise(&self, reference: &str) -> Result<String, ApiError>;
    /// The normalised reference pinned to the digest its tag names on the registry now
    /// (`...:tag@sha256:...`); an error when the registry cannot tell (the caller keeps the
    /// tag and warns, as Docker does).
    /// `auth`: credentials for its registry; `None`: the node's own login, if any.
    fn pin(
        &self,
        reference: &str,
        auth: Option<&mesh_api::RegistryCredentials>,
    ) -> Result<String, ApiError>;
    /// The image of a digest-pinned `reference` if the store has it, without asking a
    /// registry; `None` for a tag (a tag is pulled every time) or an image not here.
    fn local(&self, reference: &str) -> Option<ImageRun>;
    /// The image, pulled into the store first unless it is there; the error is the
    /// registry's reason (`No such image: ...`, `unauthorized: ...`). `auth` as for `pin`.
    fn pull(
        &self,
        reference: &str,
        auth: Option<&mesh_api::RegistryCredentials>,
    ) -> Result<ImageRun, ApiError>;
    /// `mesh login`: the credentials checked with the registry, then saved for this node's
    /// pulls; answers the registry as saved (`docker.io`, `HOST:PORT`).
    fn login(
        &self,
        server: &str,
        credentials: &mesh_api::RegistryCredentials,
    ) -> Result<String, ApiError>;
    /// `mesh logout`: whether there was a login to forget.
    fn logout(&self, server: &str) -> Result<bool, ApiError>;
    /// This node's login for the registry of `reference`.
    fn node_login(&self, reference: &str) -> Option<mesh_api::RegistryCredentials>;
    /// `mesh image ls`.
    fn ls(&self) -> Result<Vec<mesh_api::ImageSummary>, ApiError>;
    /// `mesh image rm`: what went, as the Engine API's image delete answers it (an array of
    /// `{"Untagged": NAME}` then `{"Deleted": ID}`: the image, then its layers).
    fn rm(&self, reference: &str) -> Result<serde_json::Value, ApiError>;
    /// `mesh image prune`: removes the images not in `keep` and their unused layers; the
    /// answer lists what went and the space reclaimed.
    fn prune(&self, keep: &[String]) -> Result<serde_json::Value, ApiError>;
    /// `mesh image load`: the references loaded.
    fn load(&self, path: &str) -> Result<Vec<String>, ApiError>;
}

/// How Docker composes a container's command line from the service and its image: the
/// service's entrypoint (else the image's), then the service's command, else the image's
/// Cmd unless the service replaced the entrypoint (which clears the image's Cmd).
pub fn image_argv(
    service_entrypoint: &[String],
    service_cmd: &[String],
    image: &ImageRun,
) -> Vec<String> {
    let entrypoint = if service_entrypoint.is_empty() {
        &image.entrypoint
    } else {
        service_entrypoint
    };
    let cmd: &[String] = if !service_cmd.is_empty() {
        service_cmd
    } else if service_entrypoint.is_empty() {
        &image.cmd
    } else {
        &[]
    };
    entrypoint.iter().chain(cmd).cloned().collect()
}

/// The image's environment with the service's on top (same key: the service's wins), in
/// the image's order then the service's new keys.
pub fn image_env(image: &[String], service: &[(String, String)]) -> Vec<(String, String)> {
    let split = |kv: &String| match kv.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (kv.clone(), String::new()),
    };
    let mut out: Vec<(String, String)> = image.iter().map(split).collect();
    for (k, v) in service {
        match out.iter_mut().find(|(ok, _)| ok == k) {
            Some(e) => e.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// A task process as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running {
        pid: u32,
        started_at_ms: u64,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        started_at_ms: u64,
        finished_at_ms: u64,
    },
}

/// The output of a command run inside a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// An error from under a seam, its chain kept.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of a [`Runtime`]: the kinds its callers act on, and the runtime's own failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No task with this id here.
    #[error("task {0} not found")]
    NotFound(String),
    /// The task exists but does not run (an exec, a health check).
    #[error("task {0} is not running")]
    NotRunning(String),
    /// The task's spec cannot run on this node (a mount source, a volume).
    #[error("{0}")]
    Invalid(String),
    /// The runtime failed (its message names the task and why).
    #[error(transparent)]
    Failed(BoxError),
}

impl RuntimeError {
    /// The API's kind for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::NotFound(_) => ErrorKind::NotFound,
            RuntimeError::NotRunning(_) => ErrorKind::Unavailable,
            RuntimeError::Invalid(_) => ErrorKind::InvalidArgument,
            RuntimeError::Failed(_) => ErrorKind::Internal,
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> ApiError {
        ApiError::new(e.kind(), e)
    }
}

/// Runs task processes. Blocking calls: the agent calls them from blocking threads.
pub trait Runtime: Send + Sync + 'static {
    fn start(&self, spec: &RunSpec) -> Result<RunState, RuntimeError>;
    /// Like `start`, but calls `setup(task_pid)` once the task's namespaces exist and before
    /// its command runs (to plumb its network in); a failed setup fails the start.
    fn start_with(
        &self,
        spec: &RunSpec,
        setup: &mut dyn FnMut(u32) -> Result<(), PlaneError>,
    ) -> Result<RunState, RuntimeError> {
        let _ = setup;
        self.start(spec)
    }
    fn status(&self, id: &str) -> Option<RunState>;
    fn list(&self) -> Vec<(String, RunState)>;
    /// Sends `signal` to the task, then SIGKILL if it still runs after `grace`.
    fn stop(&self, id: &str, signal: i32, grace: Duration) -> Result<(), RuntimeError>;
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// The task's output lines (oldest first): after `after_ns` (exclusive) if given, then
    /// the last `tail` if given.
    fn logs(
        &self,
        id: &str,
        after_ns: Option<u64>,
        tail: Option<usize>,
    ) -> Result<Vec<mesh_api::LogLine>, RuntimeError>;
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecResult, RuntimeError>;
}

/// An error of a [`NetworkPlane`].
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// The plane has not started yet (or not finished starting).
    #[error("the network plane is not ready")]
    NotReady,
    /// The plane stopped: this node left the swarm.
    #[error("the network plane stopped")]
    Stopped,
    /// This node has no such plane (no VIP balancer, no embedded DNS).
    #[error("{0}")]
    Unsupported(&'static str),
    /// What was asked names nothing here (a network without a local task).
    #[error("{0}")]
    NotFound(String),
    /// What was asked cannot be done as given (a query type, a missing advertise address).
    #[error("{0}")]
    Invalid(String),
    /// One part of the plumbing failed (`network appnet: netlink: ...`).
    #[error("{context}: {source}")]
    Context {
        /// What was being done: the network, the gateway, the embedded DNS.
        context: String,
        /// What went wrong.
        source: BoxError,
    },
    /// The kernel plumbing or the plane's services failed.
    #[error(transparent)]
    Failed(BoxError),
}

impl PlaneError {
    /// Wraps a failure from under the plane.
    pub fn failed(e: impl Into<BoxError>) -> PlaneError {
        PlaneError::Failed(e.into())
    }

    /// Wraps a failure of one part of the plumbing, naming it.
    pub fn context(context: impl Into<String>, e: impl Into<BoxError>) -> PlaneError {
        PlaneError::Context {
            context: context.into(),
            source: e.into(),
        }
    }

    /// The API's kind for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PlaneError::NotReady | PlaneError::Stopped | PlaneError::Unsupported(_) => {
                ErrorKind::Unavailable
            }
            PlaneError::NotFound(_) => ErrorKind::NotFound,
            PlaneError::Invalid(_) => ErrorKind::InvalidArgument,
            PlaneError::Context { .. } | PlaneError::Failed(_) => ErrorKind::Internal,
        }
    }
}

impl From<PlaneError> for ApiError {
    fn from(e: PlaneError) -> ApiError {
        ApiError::new(e.kind(), e)
    }
}

/// The data plane the agent drives: overlay plumbing and endpoint gossip. `meshd` plugs in the
/// real one; without it, tasks run with `lo` only.
pub trait NetworkPlane: Send + Sync + 'static {
    /// Joins the swarm's gossip as this node (called when the node enters a swarm or restarts).
    fn start(&self, me: PlaneIdentity) -> Result<(), PlaneError>;
    /// Leaves the gossip and forgets the swarm.
    fn stop(&self);
    /// Plumbs a task's network attachments into `/proc/<pid>/ns/net` (blocking; called before
    /// its command runs).
    fn attach(&self, task: &mesh_api::Task, pid: u32) -> Result<(), PlaneError>;
    /// The tasks that run here now, with their pids: their endpoints are published, others
    /// withdrawn, and networks without a local task lose their namespace.
    fn set_local(&self, running: Vec<(mesh_api::Task, u32)>);
    /// Whether a task process runs here that the running set leaves out (withdrawn, and
    /// draining before its stop): its networks' namespaces stay while it is plugged into
    /// them, though the plane may not know which they are (a restarted daemon's adopted
    /// task). Told before the [`NetworkPlane::set_local`] it applies to.
    fn set_draining(&self, _draining: bool) {}
    /// Whether the endpoints of local task `task_id` are announced: a pass published its
    /// records in gossip. The agent reports a task on a network Running only then, as the
    /// leader acts on that report by stopping what the task replaces (a rolling update, a
    /// drain) and the old endpoint's withdrawal must not reach the nodes before the new one.
    /// A plane that announces nothing says yes.
    fn announced(&self, _task_id: &str) -> bool {
        true
    }
    /// Given once, by the agent: notified after each pass that announced a task not
    /// announced before.
    fn on_announced(&self, _wake: std::sync::Arc<tokio::sync::Notify>) {}
    /// This node's address on the ingress network (its ingress sandbox), once the leader gave
    /// one: the routing mesh answers on every node from then on.
    fn set_ingress(&self, ingress: Option<mesh_api::NetworkAttachment>) {
        let _ = ingress;
    }
    /// The gossip keys from the leader (oldest first; the newest seals): gossip starts
    /// once the first arrive.
    fn set_gossip_keys(&self, keys: Vec<GossipKey>) {
        let _ = keys;
    }
    /// The underlay addresses of the swarm's members, from the leader: only they may reach
    /// this node's VXLAN and gossip ports.
    fn set_members(&self, addrs: Vec<std::net::Ipv4Addr>) {
        let _ = addrs;
    }
    /// Returns once the underlay filter lets through the members last given (blocking).
    fn sync_members(&self) {}
    /// Removes what a swarm left in the kernel when the daemon starts outside any (a swarm
    /// left while the daemon was down). Blocking.
    fn clean_leftovers(&self) {}
    /// Gossip's keys and counters and the member filter, for `mesh info`.
    fn gossip_info(&self) -> Option<mesh_api::GossipInfo> {
        None
    }
    /// The VIPs this node's balancer holds, with their backends (`mesh vip ls`). Blocking.
    fn vip_ls(&self) -> Result<Vec<mesh_api::VipEntry>, PlaneError> {
        Err(PlaneError::Unsupported("this node has no VIP data plane"))
    }
    /// What the embedded DNS answers for `name` on this node's networks, or only on `network`
    /// (`mesh dns query`). Blocking.
    fn dns_query(
        &self,
        network: Option<&str>,
        name: &str,
        qtype: &str,
    ) -> Result<mesh_api::DnsAnswer, PlaneError> {
        let _ = (network, name, qtype);
        Err(PlaneError::Unsupported("this node has no embedded DNS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn command_lines_compose_as_docker_s() {
        let image = ImageRun {
            entrypoint: v(&["/entry"]),
            cmd: v(&["serve", "--port", "80"]),
            ..Default::default()
        };
        // Nothing given: the image's entrypoint and Cmd.
        assert_eq!(
            image_argv(&[], &[], &image),
            v(&["/entry", "serve", "--port", "80"])
        );
        // A command replaces the Cmd only.
        assert_eq!(
            image_argv(&[], &v(&["debug"]), &image),
            v(&["/entry", "debug"])
        );
        // An entrypoint replaces the entrypoint and clears the image's Cmd.
        assert_eq!(image_argv(&v(&["/bin/sh"]), &[], &image), v(&["/bin/sh"]));
        assert_eq!(
            image_argv(&v(&["/bin/sh", "-c"]), &v(&["echo hi"]), &image),
            v(&["/bin/sh", "-c", "echo hi"])
        );
        let bare = ImageRun::default();
        assert!(image_argv(&[], &[], &bare).is_empty());
    }

    #[test]
    fn the_service_environment_wins_over_the_image_s() {
        let env = image_env(
            &v(&["PATH=/usr/bin:/bin", "LANG=C", "EMPTY"]),
            &[
                ("LANG".into(), "C.UTF-8".into()),
                ("MESH_TASK_SLOT".into(), "1".into()),
            ],
        );
        let got: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            got,
            v(&[
                "PATH=/usr/bin:/bin",
                "LANG=C.UTF-8",
                "EMPTY=",
                "MESH_TASK_SLOT=1"
            ])
        );
    }
}
