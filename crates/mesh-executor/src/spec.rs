//! The executor's public data types: configuration, task specification,
//! task runtime and `exec` output, with the validation of names and specs.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `argv[1]` of a shim invocation (see [`crate::shim_main_if_requested`]).
pub const SHIM_ARG: &str = "__mesh_task_shim";

/// `argv[1]` of a network-namespace holder (see [`crate::Executor::netns_ensure`]).
pub const NETNS_HOLDER_ARG: &str = "__mesh_netns_holder";

/// The cgroup (under the cgroup parent) holding the network-namespace
/// holders; reserved, so no task id may be this.
pub const NETNS_CGROUP: &str = "netns";

/// The longest network-namespace name accepted.
pub const MAX_NETNS_NAME_LEN: usize = 64;

/// `PATH` given to a task whose environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The longest task id accepted (it is a directory and a cgroup name).
pub const MAX_ID_LEN: usize = 128;

/// The longest hostname Linux accepts (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// Configuration of an [`crate::Executor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// meshd's `--exec-root`; task state lives in `<exec_root>/tasks/<id>/`,
    /// cgroup hierarchies are mounted under `<exec_root>/cgroup/` when none
    /// is visible.
    pub exec_root: PathBuf,
    /// The cgroup (relative to each hierarchy's root, `/`-separated) under
    /// which task cgroups are created; meshd's `--cgroup-parent`.
    pub cgroup_parent: String,
    /// The binary re-executed as the shim (it must call
    /// [`crate::shim_main_if_requested`] first thing in `main`). `None`: the
    /// current executable, resolved with `std::env::current_exe()` when the
    /// executor is created.
    pub shim_exe: Option<PathBuf>,
    /// Where image tasks' writable layers live (`<rw_root>/<id>/upper` and
    /// `work`): meshd's `<data_dir>/rw`, on disk as Docker's `overlay2`
    /// directories are. Not in the exec root: on a host that is a tmpfs
    /// (`/run`), whose pages a task's writes would pin in memory and charge
    /// to its memory limit. `None`: `<exec_root>/rw`.
    pub rw_root: Option<PathBuf>,
}

impl ExecutorConfig {
    /// A configuration with `shim_exe: None` (the running binary is the shim)
    /// and `rw_root: None`.
    pub fn new(exec_root: impl Into<PathBuf>, cgroup_parent: impl Into<String>) -> ExecutorConfig {
        ExecutorConfig {
            exec_root: exec_root.into(),
            cgroup_parent: cgroup_parent.into(),
            shim_exe: None,
            rw_root: None,
        }
    }
}

/// What to run: one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Unique task id: `[A-Za-z0-9_.-]`, at most [`MAX_ID_LEN`] bytes, not
    /// starting with `.`.
    pub id: String,
    /// Human-readable name used in messages, e.g. `web.1.<id>`.
    pub name: String,
    /// The task's hostname (its own UTS namespace).
    pub hostname: String,
    /// Command line; `argv[0]` is looked up in the task's `PATH` (inside
    /// the image for an image task).
    pub argv: Vec<String>,
    /// The task's complete environment (`PATH` is added if missing).
    pub env: Vec<(String, String)>,
    /// CPU limit in billionths of a CPU; 0 = no limit.
    pub nano_cpus: u64,
    /// Memory limit in bytes; 0 = no limit.
    pub memory_bytes: u64,
    /// Full content of the task's `/etc/resolv.conf`.
    pub resolv_conf: String,
    /// The image root filesystem the task runs in; `None`: a host process
    /// (the host's filesystem, as before). Absent in specs persisted before
    /// image tasks existed.
    #[serde(default)]
    pub rootfs: Option<RootfsSpec>,
    /// How its output is kept (size and number of log files).
    #[serde(default)]
    pub log: crate::logs::LogOptions,
}

/// An image task's root filesystem and process settings (see the
/// `rootfs` module for how they are applied).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// The image's unpacked layers, BASE LAYER FIRST (overlayfs lower
    /// directories; whiteouts are character devices 0/0, opaque directories
    /// carry `trusted.overlay.opaque=y`). Absolute paths; at most
    /// [`MAX_LAYERS`].
    pub layers: Vec<PathBuf>,
    /// `--read-only`: the root mount is read-only (mounts on it stay as
    /// asked).
    #[serde(default)]
    pub readonly: bool,
    /// Bind and tmpfs mounts, in order (named volumes arrive resolved to
    /// bind sources).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// `""` (root), `uid`, `uid:gid`, `name` or `name:group`, resolved
    /// against the image's `/etc/passwd` and `/etc/group` as Docker does
    /// (supplementary groups from `/etc/group`).
    #[serde(default)]
    pub user: String,
    /// The working directory (absolute); `""` is `/`. Created if missing.
    #[serde(default)]
    pub workdir: String,
    /// `--init`: a small reaper is pid 1 and the command its child.
    #[serde(default)]
    pub init: bool,
    /// The full content of the task's `/etc/hosts`.
    #[serde(default)]
    pub hosts: String,
    /// Secrets and configs: files of an in-memory tmpfs, bind-mounted read-only at their
    /// targets. Their data is never written to disk: the state directory's copy of the
    /// spec has none; it reaches the shim on its stdin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
}

/// One secret or config file of an image task (see [`RootfsSpec::files`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Where it appears (absolute; created if missing).
    pub target: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// The content: never serialized.
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for FileSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No data in logs and error messages.
        f.debug_struct("FileSpec")
            .field("target", &self.target)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// One mount of an image task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Where it appears in the task (absolute; created if missing).
    pub target: PathBuf,
    /// What is mounted.
    pub source: MountSource,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// What a [`MountSpec`] mounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountSource {
    /// A host file or directory (absolute path; it must exist), mounted
    /// recursively.
    Bind(PathBuf),
    /// A fresh tmpfs (mode 1777); `size_bytes` 0 = the kernel's default
    /// (half of the RAM).
    Tmpfs { size_bytes: u64 },
}

/// The most layers a root filesystem may have (overlayfs' own limit).
pub const MAX_LAYERS: usize = 500;

/// Errors of spec and name validation.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The task id cannot be used as a directory and cgroup name.
    #[error("invalid task id {id:?}: {reason}")]
    Id { id: String, reason: &'static str },
    /// The cgroup parent is not a relative path of valid names.
    #[error("invalid cgroup parent {parent:?}: {reason}")]
    CgroupParent {
        parent: String,
        reason: &'static str,
    },
    /// The hostname cannot be set.
    #[error("invalid hostname {hostname:?}: {reason}")]
    Hostname {
        hostname: String,
        reason: &'static str,
    },
    /// `argv` is empty.
    #[error("empty command line")]
    EmptyCommand,
    /// An argument contains a NUL byte.
    #[error("argument {index} of the command line contains a NUL byte")]
    NulInArgument { index: usize },
    /// An environment variable cannot be passed to `execve`.
    #[error("invalid environment variable {name:?}: {reason}")]
    Env { name: String, reason: &'static str },
    /// The resolv.conf content contains a NUL byte.
    #[error("resolv.conf content contains a NUL byte")]
    NulInResolvConf,
    /// The name cannot be used for a network namespace.
    #[error("invalid network namespace name {name:?}: {reason}")]
    NetnsName { name: String, reason: &'static str },
    /// The root filesystem spec is unusable.
    #[error("invalid root filesystem: {0}")]
    Rootfs(String),
}

fn name_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Checks that `id` is usable as a task id.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let err = |reason| {
        Err(SpecError::Id {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return err("empty");
    }
    if id.len() > MAX_ID_LEN {
        return err("longer than 128 bytes");
    }
    if id.starts_with('.') {
        return err("starts with '.'");
    }
    if !id.chars().all(name_char_ok) {
        return err("only letters, digits, '_', '.' and '-' are allowed");
    }
    if id == NETNS_CGROUP {
        return err("reserved for the cgroup of the network namespace holders");
    }
    Ok(())
}

/// Checks that `name` is usable as a network-namespace name: `[A-Za-z0-9_.-]`,
/// at most [`MAX_NETNS_NAME_LEN`] bytes, not starting with `.`.
pub fn validate_netns_name(name: &str) -> Result<(), SpecError> {
    let err = |reason| {
        Err(SpecError::NetnsName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return err("empty");
    }
    if name.len() > MAX_NETNS_NAME_LEN {
        return err("longer than 64 bytes");
    }
    if name.starts_with('.') {
        return err("starts with '.'");
    }
    if !name.chars().all(name_char_ok) {
        return err("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Checks that `parent` is a relative cgroup path of valid names.
pub fn validate_cgroup_parent(parent: &str) -> Result<(), SpecError> {
    let err = |reason| {
        Err(SpecError::CgroupParent {
            parent: parent.to_string(),
            reason,
        })
    };
    if parent.is_empty() {
        return err("empty");
    }
    if parent.len() > 200 {
        return err("longer than 200 bytes");
    }
    for seg in parent.split('/') {
        if seg.is_empty() {
            return err("empty path component (leading, trailing or double '/')");
        }
        if seg.starts_with('.') {
            return err("a path component starts with '.'");
        }
        if !seg.chars().all(name_char_ok) {
            return err("only letters, digits, '_', '.', '-' and '/' are allowed");
        }
    }
    Ok(())
}

impl TaskSpec {
    /// Checks everything that would make the start fail before exec.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        let herr = |reason| {
            Err(SpecError::Hostname {
                hostname: self.hostname.clone(),
                reason,
            })
        };
        if self.hostname.is_empty() {
            return herr("empty");
        }
        if self.hostname.len() > MAX_HOSTNAME_LEN {
            return herr("longer than 64 bytes");
        }
        if self
            .hostname
            .bytes()
            .any(|b| b == 0 || b.is_ascii_whitespace() || b == b'/')
        {
            return herr("contains NUL, '/' or whitespace");
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(SpecError::EmptyCommand);
        }
        if let Some(index) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::NulInArgument { index });
        }
        for (name, value) in &self.env {
            let eerr = |reason| {
                Err(SpecError::Env {
                    name: name.clone(),
                    reason,
                })
            };
            if name.is_empty() {
                return eerr("empty name");
            }
            if name.contains('=') || name.contains('\0') {
                return eerr("name contains '=' or NUL");
            }
            if value.contains('\0') {
                return eerr("value contains NUL");
            }
        }
        if self.resolv_conf.contains('\0') {
            return Err(SpecError::NulInResolvConf);
        }
        if let Some(r) = &self.rootfs {
            r.validate().map_err(SpecError::Rootfs)?;
        }
        Ok(())
    }

    /// The environment the task gets: `env` (later duplicates win), plus
    /// `PATH=`[`DEFAULT_PATH`] if `env` has no `PATH`.
    pub fn effective_env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(self.env.len() + 1);
        for (k, v) in &self.env {
            match out.iter_mut().find(|(ok, _)| ok == k) {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
        if !out.iter().any(|(k, _)| k == "PATH") {
            out.push(("PATH".to_string(), DEFAULT_PATH.to_string()));
        }
        out
    }
}

/// True if `p` is absolute, without NUL, `.` or `..` components.
fn clean_absolute(p: &Path) -> bool {
    p.is_absolute()
        && !p.as_os_str().as_encoded_bytes().contains(&0)
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

impl RootfsSpec {
    /// Checks what would make the start fail before the child runs.
    pub fn validate(&self) -> Result<(), String> {
        if self.layers.is_empty() {
            return Err("no layers".into());
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(format!(
                "{} layers (at most {MAX_LAYERS})",
                self.layers.len()
            ));
        }
        for l in &self.layers {
            if !clean_absolute(l) {
                return Err(format!(
                    "layer {} is not a clean absolute path",
                    l.display()
                ));
            }
        }
        for m in &self.mounts {
            if !clean_absolute(&m.target) || m.target == Path::new("/") {
                return Err(format!(
                    "mount target {} is not a clean absolute path below /",
                    m.target.display()
                ));
            }
            if let MountSource::Bind(src) = &m.source {
                if !clean_absolute(src) {
                    return Err(format!(
                        "bind source {} is not a clean absolute path",
                        src.display()
                    ));
                }
            }
        }
        for f in &self.files {
            if !clean_absolute(&f.target) || f.target == Path::new("/") {
                return Err(format!(
                    "file target {} is not a clean absolute path below /",
                    f.target.display()
                ));
            }
            if f.mode > 0o7777 {
                return Err(format!("file mode {:o} is not a permission mode", f.mode));
            }
        }
        if !self.workdir.is_empty() && !clean_absolute(Path::new(&self.workdir)) {
            return Err(format!(
                "the working directory {:?} is not a clean absolute path",
                self.workdir
            ));
        }
        if self.user.contains('\0') || self.user.matches(':').count() > 1 {
            return Err(format!("invalid user {:?}", self.user));
        }
        if self.hosts.contains('\0') {
            return Err("the hosts content contains a NUL byte".into());
        }
        Ok(())
    }
}

/// The state of a task as seen by the executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRuntime {
    /// The command runs as process `pid` (in the executor's pid namespace).
    Running { pid: u32, started_at_ms: u64 },
    /// The command exited with `code`, or was killed by `signal`. A task
    /// whose shim was killed is reported with `signal: Some(9)`.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        started_at_ms: u64,
        finished_at_ms: u64,
    },
}

impl TaskRuntime {
    /// True for [`TaskRuntime::Running`].
    pub fn is_running(&self) -> bool {
        matches!(self, TaskRuntime::Running { .. })
    }
}

/// Result of [`crate::Executor::exec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    /// Standard output (at most 16 MiB; the rest is dropped).
    pub stdout: Vec<u8>,
    /// Standard error (at most 16 MiB; the rest is dropped).
    pub stderr: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TaskSpec {
        TaskSpec {
            id: "abc123".into(),
            name: "web.1.abc123".into(),
            hostname: "web-1".into(),
            argv: vec!["sleep".into(), "1".into()],
            env: vec![("A".into(), "1".into())],
            nano_cpus: 0,
            memory_bytes: 0,
            resolv_conf: "nameserver 127.0.0.11\n".into(),
            rootfs: None,
            log: Default::default(),
        }
    }

    #[test]
    fn ids() {
        assert!(validate_id("abc-1_2.3").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(129), "netns"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        let msg = validate_id("a/b").err().map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some("invalid task id \"a/b\": only letters, digits, '_', '.' and '-' are allowed")
        );
    }

    #[test]
    fn netns_names() {
        for good in ["ov-1", "a.b_c", &"x".repeat(64), "netns"] {
            assert!(validate_netns_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(validate_netns_name(bad).is_err(), "{bad:?}");
        }
        let msg = validate_netns_name("a/b").err().map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some("invalid network namespace name \"a/b\": only letters, digits, '_', '.' and '-' are allowed")
        );
    }

    #[test]
    fn parents() {
        assert!(validate_cgroup_parent("mesh").is_ok());
        assert!(validate_cgroup_parent("a/b-c").is_ok());
        for bad in ["", "/mesh", "mesh/", "a//b", "..", "a/../b", "a b"] {
            assert!(validate_cgroup_parent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spec_validation() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.argv.clear();
        assert!(matches!(s.validate(), Err(SpecError::EmptyCommand)));
        let mut s = spec();
        s.hostname = "x".repeat(65);
        assert!(s.validate().is_err());
        let mut s = spec();
        s.env.push(("A=B".into(), "x".into()));
        assert!(s.validate().is_err());
        let mut s = spec();
        s.argv.push("a\0b".into());
        assert!(matches!(
            s.validate(),
            Err(SpecError::NulInArgument { index: 2 })
        ));
    }

    #[test]
    fn env_gets_default_path() {
        let env = spec().effective_env();
        assert_eq!(
            env,
            vec![
                ("A".to_string(), "1".to_string()),
                ("PATH".to_string(), DEFAULT_PATH.to_string())
            ]
        );
        let mut s = spec();
        s.env = vec![
            ("PATH".into(), "/x".into()),
            ("A".into(), "1".into()),
            ("A".into(), "2".into()),
        ];
        assert_eq!(
            s.effective_env(),
            vec![
                ("PATH".to_string(), "/x".to_string()),
                ("A".to_string(), "2".to_string())
            ]
        );
    }

    #[test]
    fn older_specs_have_no_rootfs() {
        let old = r#"{"id":"a","name":"n","hostname":"h","argv":["true"],"env":[],
            "nano_cpus":0,"memory_bytes":0,"resolv_conf":""}"#;
        let s: TaskSpec = serde_json::from_str(old).expect("old spec");
        assert_eq!(s.rootfs, None);
        let mut s = spec();
        s.rootfs = Some(RootfsSpec {
            layers: vec!["/l/0".into(), "/l/1".into()],
            mounts: vec![
                MountSpec {
                    target: "/data".into(),
                    source: MountSource::Bind("/srv/data".into()),
                    readonly: true,
                },
                MountSpec {
                    target: "/tmp".into(),
                    source: MountSource::Tmpfs {
                        size_bytes: 1 << 20,
                    },
                    readonly: false,
                },
            ],
            ..RootfsSpec::default()
        });
        let text = serde_json::to_string(&s).expect("encode");
        assert_eq!(serde_json::from_str::<TaskSpec>(&text).expect("decode"), s);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn rootfs_validation() {
        let ok = RootfsSpec {
            layers: vec!["/l/0".into()],
            workdir: "/app".into(),
            user: "app:staff".into(),
            ..RootfsSpec::default()
        };
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut RootfsSpec)| {
            let mut r = ok.clone();
            f(&mut r);
            r.validate().err()
        };
        assert_eq!(bad(|r| r.layers.clear()).as_deref(), Some("no layers"));
        assert!(bad(|r| r.layers.push("rel".into())).is_some());
        assert!(bad(|r| r.layers.push("/a/../b".into())).is_some());
        assert!(bad(|r| r.workdir = "app".into()).is_some());
        assert!(bad(|r| r.user = "a:b:c".into()).is_some());
        assert!(bad(|r| r.mounts.push(MountSpec {
            target: "/".into(),
            source: MountSource::Tmpfs { size_bytes: 0 },
            readonly: false,
        }))
        .is_some());
        assert!(bad(|r| r.mounts.push(MountSpec {
            target: "/x".into(),
            source: MountSource::Bind("x".into()),
            readonly: false,
        }))
        .is_some());
    }
}
