//! Services and tasks, as the replicated store keeps them and `service inspect` / `service ps`
//! show them. A service is a desired state; tasks are its units of work, one per slot
//! (replicated) or per node (global), whose state only moves forward.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How many tasks a service wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    Replicated { replicas: u64 },
    Global,
}

impl Default for ServiceMode {
    /// Docker's default: one replica.
    fn default() -> Self {
        ServiceMode::Replicated { replicas: 1 }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    #[default]
    Any,
    OnFailure,
    None,
}

impl FromStr for RestartCondition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Self::Any),
            "on-failure" => Ok(Self::OnFailure),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "invalid restart condition: {s} (expected any, on-failure or none)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    pub delay_ms: u64,
    /// 0: unlimited.
    pub max_attempts: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: 5000,
            max_attempts: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

impl FromStr for FailureAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(Self::Pause),
            "continue" => Ok(Self::Continue),
            "rollback" => Ok(Self::Rollback),
            _ => Err(format!(
                "invalid failure action: {s} (expected pause, continue or rollback)"
            )),
        }
    }
}

/// In what order a rolling update (or its rollback) replaces a task, as Docker's
/// `--update-order` / `--rollback-order`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old task, then start its replacement (Docker's default).
    #[default]
    StopFirst,
    /// Start the replacement beside the old task; stop the old one once the new one runs.
    StartFirst,
}

impl FromStr for UpdateOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop-first" => Ok(Self::StopFirst),
            "start-first" => Ok(Self::StartFirst),
            _ => Err(format!(
                "unrecognized update order {s} (expected start-first or stop-first)"
            )),
        }
    }
}

impl fmt::Display for UpdateOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpdateOrder::StopFirst => "stop-first",
            UpdateOrder::StartFirst => "start-first",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    pub parallelism: u64,
    pub delay_ms: u64,
    pub failure_action: FailureAction,
    /// How long a new task must keep running to count as a success.
    pub monitor_ms: u64,
    /// Absent from specs stored before it existed: stop-first.
    #[serde(default)]
    pub order: UpdateOrder,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            monitor_ms: 2000,
            order: UpdateOrder::StopFirst,
        }
    }
}

/// How a rollback replaces tasks (Docker's `RollbackConfig`). Parallelism, delay, monitor
/// period and failure action of a rollback are the restored spec's `update` settings; only the
/// order has its own setting so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackConfig {
    #[serde(default)]
    pub order: UpdateOrder,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU limit in 1e-9 CPUs (0: none).
    pub nano_cpus: u64,
    /// Memory limit in bytes (0: none).
    pub memory_bytes: u64,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    #[default]
    Ingress,
    Host,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: Protocol,
    pub target: u16,
    /// 0 until allocated when omitted.
    pub published: u16,
    pub mode: PublishMode,
}

/// The range published ports are assigned from when a spec leaves them out.
pub const AUTO_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl fmt::Display for PortConfig {
    /// `*:30000->80/tcp` (ingress, as `docker service ls` shows it) or `30000->80/udp (host)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            PublishMode::Ingress => {
                write!(f, "*:{}->{}/{}", self.published, self.target, self.protocol)
            }
            PublishMode::Host => write!(
                f,
                "{}->{}/{} (host)",
                self.published, self.target, self.protocol
            ),
        }
    }
}

impl PortConfig {
    /// Parses `--publish`: the short form `[mode=ingress|host,]PUBLISHED:TARGET[/tcp|/udp]`
    /// (`PUBLISHED` may be empty: assigned from [`AUTO_PORTS`]) or Docker's long form
    /// `published=P,target=T[,protocol=udp][,mode=host]`.
    pub fn parse(s: &str) -> Result<PortConfig, String> {
        let bad = |why: &str| format!("invalid publish spec {s:?}: {why}");
        let port = |v: &str, what: &str| -> Result<u16, String> {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad(&format!(
                    "{what} port {v:?} is not a number in 1-65535"
                ))),
            }
        };
        let proto = |v: &str| match v {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(bad(&format!("unknown protocol {v:?} (tcp or udp)"))),
        };
        let mut out = PortConfig {
            protocol: Protocol::Tcp,
            target: 0,
            published: 0,
            mode: PublishMode::Ingress,
        };
        let mut short = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("mode", "ingress")) => out.mode = PublishMode::Ingress,
                Some(("mode", "host")) => out.mode = PublishMode::Host,
                Some(("mode", m)) => {
                    return Err(bad(&format!("unknown mode {m:?} (ingress or host)")))
                }
                Some(("published", v)) => out.published = port(v, "published")?,
                Some(("target", v)) => out.target = port(v, "target")?,
                Some(("protocol", v)) => out.protocol = proto(v)?,
                Some((k, _)) => return Err(bad(&format!("unknown field {k:?}"))),
                None if short.is_none() => short = Some(part),
                None => return Err(bad("more than one PUBLISHED:TARGET")),
            }
        }
        if let Some(p) = short {
            let (ports, pr) = match p.split_once('/') {
                Some((ports, pr)) => (ports, Some(pr)),
                None => (p, None),
            };
            if let Some(pr) = pr {
                out.protocol = proto(pr)?;
            }
            let (published, target) = ports
                .split_once(':')
                .ok_or_else(|| bad("expected PUBLISHED:TARGET"))?;
            out.published = if published.is_empty() {
                0
            } else {
                port(published, "published")?
            };
            out.target = port(target, "target")?;
        }
        if out.target == 0 {
            return Err(bad("no target port"));
        }
        Ok(out)
    }
}

/// What a user asks for in `service create` / `service update`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub mode: ServiceMode,
    pub command: Vec<String>,
    /// `K=V` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub update: UpdateConfig,
    /// Used by a rollback (manual or the failure action) instead of `update`'s order.
    #[serde(default)]
    pub rollback: RollbackConfig,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The image the tasks run, normalised (`docker.io/library/busybox:latest`) and pinned to
    /// the digest its tag named at create or update when the registry answered
    /// (`...@sha256:...`). Empty: `command` is a host process (a mesh extension).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// With an image: replaces its Entrypoint (`--entrypoint`); `command` replaces its Cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// With an image: `--user` (`uid[:gid]` or `name[:group]`, from the image's files).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// With an image: `--workdir`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    /// `--hostname` (default: the task's short id).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// With an image: `--read-only` root filesystem.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// With an image: `--init`, a reaper as pid 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// With an image: `--mount`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// `--stop-signal` (a name such as `SIGINT` or a number); empty: SIGTERM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `--stop-grace-period`: how long a task has after its stop signal before SIGKILL;
    /// `None`: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period_ms: Option<u64>,
    /// Docker's `TaskTemplate.ForceUpdate` counter: a change replaces the tasks even when
    /// nothing else changed (`docker service update --force` bumps it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub force_update: u64,
    /// Docker's `ContainerSpec.Labels`: kept and shown, as stacks set them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub container_labels: BTreeMap<String, String>,
    /// Docker's `Placement.Platforms` as `os/arch` (`linux/amd64`), which the `docker` CLI
    /// adds once it resolved the image's digest; mesh nodes are all Linux.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Extra DNS names of the service per network name (Docker's network `Aliases`; stacks
    /// add the service's short name): each answers as the service's own name does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// `--secret`: files under `/run/secrets/` on a tmpfs in every task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::blob::BlobReference>,
    /// `--config`: files (default `/NAME`) in every task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<crate::blob::BlobReference>,
    /// `--health-*` / `--no-healthcheck`; `None`: the image's HEALTHCHECK, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
}

/// Docker's `HealthConfig`: how a task's health is probed. Zero durations and retries take
/// the image's values, then Docker's defaults (30 s interval, 30 s timeout, 0 s start
/// period, 3 retries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// `["CMD", argv...]`, `["CMD-SHELL", "command"]`, `["NONE"]` (no check, also none of
    /// the image's); empty: the image's test.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The number of a signal named as Docker's `--stop-signal` takes it (`SIGTERM`, `TERM`,
/// `15`, `SIGRTMIN+3`), on Linux.
pub fn signal_number(name: &str) -> Option<i32> {
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(i) = NAMES.iter().position(|n| *n == bare) {
        return Some(i as i32 + 1);
    }
    let rt = |base: i32, rest: &str, sign: i32| -> Option<i32> {
        let off = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().ok()?
        };
        let n = base + sign * off;
        (34..=64).contains(&n).then_some(n)
    };
    if let Some(rest) = bare.strip_prefix("RTMIN") {
        return rt(34, rest.trim_start_matches('+'), 1);
    }
    if let Some(rest) = bare.strip_prefix("RTMAX") {
        return rt(64, rest.trim_start_matches('-'), -1);
    }
    None
}

/// An image reference as `docker service ls` and `service ps` show it: without its digest,
/// and without Docker Hub's `docker.io/` and `library/` prefixes (`nginx:latest`).
pub fn familiar_image(reference: &str) -> String {
    let r = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    let r = r.strip_prefix("docker.io/").unwrap_or(r);
    let r = r
        .strip_prefix("library/")
        .filter(|rest| !rest.contains('/'))
        .unwrap_or(r);
    r.to_string()
}

/// Checks a name the embedded DNS will answer (a network alias): dot-separated labels of
/// 1-63 letters, digits, '-' or '_', 255 characters at most.
pub fn validate_dns_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err("a DNS name is dot-separated labels of 1-63 letters, digits, '-' or '_'".into())
    }
}

/// What `--mount` attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A host path.
    Bind,
    /// A named volume, local to the node (created on first use, kept after the task).
    Volume,
    /// A fresh tmpfs.
    Tmpfs,
}

/// One `--mount type=bind|volume|tmpfs,source=S,target=T[,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: MountType,
    /// Host path (bind), volume name (volume; empty: an anonymous volume), nothing (tmpfs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

impl Mount {
    /// Parses Docker's `--mount` syntax: comma-separated `key=value` (`type`, `source`|`src`,
    /// `target`|`destination`|`dst`, `readonly`|`ro` with an optional `=true|false|1|0`).
    pub fn parse(s: &str) -> Result<Mount, String> {
        let bad = |why: String| format!("invalid argument \"{s}\" for \"--mount\" flag: {why}");
        let (mut kind, mut source, mut target, mut readonly) =
            (MountType::Volume, None, None, false);
        for field in s.split(',') {
            let (k, v) = match field.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (field.trim(), None),
            };
            match (k.to_ascii_lowercase().as_str(), v) {
                ("type", Some(v)) => {
                    kind = match v {
                        "bind" => MountType::Bind,
                        "volume" => MountType::Volume,
                        "tmpfs" => MountType::Tmpfs,
                        _ => return Err(bad(format!("invalid mount type {v:?}"))),
                    }
                }
                ("source" | "src", Some(v)) => source = Some(v.to_string()),
                ("target" | "destination" | "dst", Some(v)) => target = Some(v.to_string()),
                ("readonly" | "ro", None) => readonly = true,
                ("readonly" | "ro", Some(v)) => {
                    readonly = match v {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(bad(format!("invalid value for {k}: {v}"))),
                    }
                }
                ("", None) => {}
                _ => return Err(bad(format!("unexpected key '{k}' in '{field}'"))),
            }
        }
        let target = target.ok_or_else(|| bad("target is required".into()))?;
        let source = source.unwrap_or_default();
        let m = Mount {
            kind,
            source,
            target,
            readonly,
        };
        m.validate().map_err(bad)?;
        Ok(m)
    }

    /// The checks of Docker's daemon: an absolute target, a bind's absolute source, a
    /// volume name of `[A-Za-z0-9][A-Za-z0-9_.-]*`, no source for a tmpfs.
    pub fn validate(&self) -> Result<(), String> {
        if !self.target.starts_with('/') {
            return Err(format!(
                "invalid mount target, must be an absolute path: {}",
                self.target
            ));
        }
        match self.kind {
            MountType::Bind => {
                if self.source.is_empty() {
                    return Err(
                        "invalid mount config for type \"bind\": field Source must not be empty"
                            .into(),
                    );
                }
                if !self.source.starts_with('/') {
                    return Err(format!("invalid mount config for type \"bind\": invalid mount path: '{}' mount path must be absolute", self.source));
                }
            }
            MountType::Volume => {
                let ok = self.source.is_empty()
                    || (self
                        .source
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphanumeric())
                        && self
                            .source
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
                if !ok {
                    return Err(format!("invalid mount config for type \"volume\": \"{}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed", self.source));
                }
            }
            MountType::Tmpfs => {
                if !self.source.is_empty() {
                    return Err(
                        "invalid mount config for type \"tmpfs\": field Source must be empty"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Where a rolling update stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_at: u64,
    pub message: String,
}

/// A service as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub spec: ServiceSpec,
    /// The spec before the last update, for `service rollback`.
    pub previous_spec: Option<ServiceSpec>,
    /// Bumped by every spec change; tasks carry the version they run.
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    pub update_status: Option<UpdateStatus>,
    /// One virtual IP per attached network (none in dnsrr mode).
    #[serde(default)]
    pub vips: Vec<VirtualIp>,
    /// Registry credentials for its image, sealed with the managers' data key (only the
    /// leader opens them, for the nodes that pull the image); empty: none.
    #[serde(
        default,
        with = "crate::blob::b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub registry_auth: Vec<u8>,
}

/// A service's virtual IP on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualIp {
    pub network_id: String,
    pub addr: crate::IfAddr,
}

/// Task states, in the only order they may move in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Ready,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
}

impl TaskState {
    /// Whether the task has finished (no process runs for it any more).
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut c = s.chars();
        match c.next() {
            Some(first) => write!(f, "{}{}", first.to_ascii_uppercase(), c.as_str()),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// Unix time in milliseconds of the last state change.
    pub timestamp_ms: u64,
    pub message: String,
    pub err: String,
    pub exit_code: Option<i32>,
}

/// A unit of work: one copy of a service's command on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub service_name: String,
    /// 1-based slot of a replicated service; 0 for global tasks.
    pub slot: u64,
    /// Empty until scheduled.
    pub node_id: String,
    /// The service version whose spec this task runs.
    pub version: u64,
    pub spec: ServiceSpec,
    pub desired_state: TaskState,
    pub status: TaskStatus,
    pub created_at: u64,
    /// Addresses on the service's networks, given by the allocator before scheduling.
    #[serde(default)]
    pub networks: Vec<crate::network::NetworkAttachment>,
}

impl Task {
    /// `web.1.<id>` for replicated tasks, `web.<node>.<id>` for global ones, as Docker names them.
    pub fn name(&self) -> String {
        if self.slot > 0 {
            format!("{}.{}.{}", self.service_name, self.slot, self.id)
        } else {
            format!("{}.{}.{}", self.service_name, self.node_id, self.id)
        }
    }

    /// `web.1`, or `web.<node>` for global tasks: the name `service ps` shows.
    pub fn short_name(&self) -> String {
        if self.slot > 0 {
            format!("{}.{}", self.service_name, self.slot)
        } else {
            format!("{}.{}", self.service_name, self.node_id)
        }
    }
}

/// A task assigned to this node, with its process as the node's runtime knows it (the
/// Engine API's `/containers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTask {
    pub task: Task,
    /// The node's hostname.
    pub node_name: String,
    /// Whether its process runs.
    pub running: bool,
    pub pid: Option<u32>,
    /// Unix milliseconds; 0 when it never started.
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub exit_code: Option<i32>,
}

/// One row of `mesh service ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub id: String,
    pub name: String,
    pub node: String,
    pub desired_state: String,
    pub current_state: String,
    pub error: String,
    /// Whether an older task of the same slot (shown as `\_ name` in the table).
    pub is_history: bool,
    /// The image the task runs, as `docker service ps` shows it (no digest).
    #[serde(default)]
    pub image: String,
}

/// One row of `mesh service ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub id: String,
    pub name: String,
    pub mode: String,
    pub running: u64,
    pub desired: u64,
    pub ports: String,
    /// The image, as `docker service ls` shows it (no digest); empty for a host process.
    #[serde(default)]
    pub image: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("int"), Some(2));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGUSR1"), Some(10));
        assert_eq!(signal_number("SIGRTMIN+3"), Some(37));
        assert_eq!(signal_number("SIGRTMAX"), Some(64));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("65"), None);
    }

    #[test]
    fn images_are_shown_familiar() {
        for (full, shown) in [
            (
                "docker.io/library/busybox:latest@sha256:abc",
                "busybox:latest",
            ),
            ("docker.io/traefik/whoami:v1.10", "traefik/whoami:v1.10"),
            ("127.0.0.1:5000/app:1@sha256:def", "127.0.0.1:5000/app:1"),
            ("", ""),
        ] {
            assert_eq!(familiar_image(full), shown);
        }
    }

    #[test]
    fn mount_specs_parse_as_docker_s() {
        let m = Mount::parse("type=bind,source=/srv/data,target=/data,readonly").unwrap();
        assert_eq!(
            m,
            Mount {
                kind: MountType::Bind,
                source: "/srv/data".into(),
                target: "/data".into(),
                readonly: true
            }
        );
        let m = Mount::parse("src=cache,dst=/cache").unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.readonly),
            (MountType::Volume, "cache", false)
        );
        let m = Mount::parse("type=tmpfs,target=/tmp,ro=false").unwrap();
        assert_eq!((m.kind, m.readonly), (MountType::Tmpfs, false));
        for (bad, why) in [
            ("type=bind,target=/x", "field Source must not be empty"),
            (
                "type=bind,source=rel,target=/x",
                "mount path must be absolute",
            ),
            ("type=volume,source=a/b,target=/x", "invalid characters"),
            ("type=tmpfs,source=x,target=/x", "Source must be empty"),
            ("type=nfs,target=/x", "invalid mount type"),
            ("source=/a", "target is required"),
            ("type=bind,source=/a,target=x", "must be an absolute path"),
            (
                "type=bind,source=/a,target=/x,color=red",
                "unexpected key 'color'",
            ),
        ] {
            let e = Mount::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn publish_specs_parse() {
        let p = PortConfig::parse("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (8080, 80, Protocol::Tcp, PublishMode::Ingress)
        );
        let p = PortConfig::parse("mode=host,53:5353/udp").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (53, 5353, Protocol::Udp, PublishMode::Host)
        );
        let p = PortConfig::parse(":80").unwrap();
        assert_eq!((p.published, p.target), (0, 80));
        let p = PortConfig::parse("published=9000,target=90,protocol=udp,mode=host").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (9000, 90, Protocol::Udp, PublishMode::Host)
        );
        assert_eq!(
            PortConfig::parse("8080:80").unwrap().to_string(),
            "*:8080->80/tcp"
        );
        for bad in [
            "80",
            "x:80",
            "8080:0",
            "8080:70000",
            "8080:80/sctp",
            "mode=dsr,80:80",
            "a=b,80:80",
            "80:80,81:81",
            "",
        ] {
            assert!(PortConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn update_orders_parse_show_and_default_in_old_specs() {
        assert_eq!(
            "start-first".parse::<UpdateOrder>(),
            Ok(UpdateOrder::StartFirst)
        );
        assert_eq!(
            "stop-first".parse::<UpdateOrder>(),
            Ok(UpdateOrder::StopFirst)
        );
        let e = "sideways".parse::<UpdateOrder>().unwrap_err();
        assert!(e.contains("unrecognized update order sideways"), "{e}");
        assert_eq!(UpdateOrder::StartFirst.to_string(), "start-first");
        assert_eq!(
            serde_json::to_value(UpdateOrder::StartFirst).unwrap(),
            "start-first"
        );
        // A spec stored before the orders existed reads as stop-first for both.
        let old = r#"{"name":"web","mode":{"replicated":{"replicas":1}},"command":["true"],
            "update":{"parallelism":1,"delay_ms":0,"failure_action":"pause","monitor_ms":2000}}"#;
        let spec: ServiceSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.update.order, UpdateOrder::StopFirst);
        assert_eq!(spec.rollback.order, UpdateOrder::StopFirst);
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["update"]["order"], "stop-first");
        assert_eq!(v["rollback"]["order"], "stop-first");
    }

    #[test]
    fn states_only_move_forward_in_declared_order() {
        assert!(TaskState::New < TaskState::Pending);
        assert!(TaskState::Running < TaskState::Complete);
        assert!(!TaskState::Running.is_terminal() && TaskState::Failed.is_terminal());
        assert_eq!(TaskState::Running.to_string(), "Running");
        assert_eq!(TaskState::New.to_string(), "New");
    }
}
