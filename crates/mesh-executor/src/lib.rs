//! The node's task executor.
//!
//! A *task* is a command run in its own network, UTS and mount namespaces
//! and cgroups, with CPU and memory limits, its own hostname and
//! environment, and a private `/etc/resolv.conf` (the embedded DNS at
//! 127.0.0.11). Its stdout and stderr are kept as Docker's `json-file`
//! driver keeps them, bounded and rotated (see [`logs`]), for `service
//! logs`; its exit is recorded.
//!
//! Tasks survive a SIGKILL of meshd and are adopted by the next meshd:
//! meshd is never their parent. Per task it starts a *shim* (itself,
//! re-executed with `argv[1] == "__mesh_task_shim"`, see
//! [`shim_main_if_requested`]) that detaches (double fork + `setsid`),
//! creates the task, records its pids in the state directory, waits for it
//! and records its exit. All state lives in `<exec_root>/tasks/<id>/`:
//!
//! | file | written by | content |
//! |---|---|---|
//! | `spec.json` | `start` | the [`TaskSpec`] |
//! | `launch.json` | `start` | cgroup directories the task joins |
//! | `resolv.conf`, `hostname` | `start` | the task's files |
//! | `upper/`, `work/`, `l/<i>` | `start` | an image task's overlay directories and, for many or long layer paths only, links to its layers |
//! | `state.json` | shim | shim pid, task pid, their `/proc` start times, start time in ms |
//! | `exit.json` | shim (or `status` if the shim was killed) | code, signal, finish time |
//! | `log.json`, `log.json.1`, ... | shim | the task's output, a JSON record per line ([`logs`]) |
//! | `shim.log` | shim | the shim's own diagnostics |
//!
//! **Ended tasks** keep their state directory (logs, exit record, for
//! `service logs` and `service ps`) until [`Executor::remove`], not their
//! cgroups: the shim kills what is left in them and removes them before it
//! writes `exit.json`; if it could not (it was killed, or they stayed busy),
//! `status`, `list` and `stop` remove them as soon as they see the task
//! ended, adopted tasks included. `list` also removes the remains of a start
//! that a dead meshd left unfinished (a directory without `state.json`).
//!
//! **Image tasks** ([`TaskSpec::rootfs`]): the task's command is pid 1 of
//! its own pid namespace (or the child of a small reaper with `--init`),
//! with an IPC namespace too, in an overlayfs root of its image's layers
//! (mounted and pivoted into inside its own mount namespace, so meshd's
//! sees none of its mounts; the task directory itself is the mount point),
//! with fresh `/proc`, `/dev` and `/sys`, its `/etc/hosts`, `/etc/hostname`
//! and `/etc/resolv.conf` (files of an in-memory tmpfs), its mounts, user,
//! working directory, Docker's default capabilities and no_new_privs; see
//! the `rootfs` module. [`Executor::remove`] deletes its upper directory
//! with the rest of its state directory.
//!
//! Every file is written atomically (temp file + rename). cgroups: see
//! [`cgroup`] (pure v2 and hybrid layouts, hierarchies mounted under
//! `<exec_root>/cgroup/` when meshd runs under `ip netns exec`).
//!
//! **Network gate.** [`Executor::start_with`] lets meshd configure a task's
//! network namespace (a veth moved in, addresses, routes) before the command
//! runs: the task child, after its namespaces, hostname, mounts and `lo` are
//! in place, writes its pid to the shim and blocks reading one byte from a
//! gate pipe; the shim reports `ready <pid>` to meshd, which runs the setup
//! on `/proc/<pid>/ns/net` and answers `go` (the shim writes the byte and
//! the command is exec'd; exec errors are reported as before) or `abort`
//! (the shim kills the task; the start fails with `network setup failed:
//! ...` and nothing is left). A setup that takes longer than
//! [`NETWORK_SETUP_TIMEOUT`] gets its task killed. [`Executor::start`] is
//! `start_with` and a setup that does nothing. The protocol is described in
//! the `shim` module.
//!
//! **Network-namespace holders.** Namespaces that must outlive meshd (the
//! per-network overlay namespace) are held by a tiny detached process,
//! meshd re-executed as `__mesh_netns_holder <exec_root>/netns/<name>`, in
//! the cgroup `<cgroup_parent>/netns`; it is recorded (pid and start time)
//! in `<exec_root>/netns/<name>.json`, a plain file that a meshd in another
//! mount namespace (`ip netns exec`) still sees, unlike an nsfs bind mount.
//! See [`Executor::netns_ensure`], [`Executor::netns_pid`],
//! [`Executor::netns_list`], [`Executor::netns_remove`]. The task id `netns`
//! is reserved for that cgroup.
//!
//! meshd's `main` starts with the shim (and holder) entry point:
//!
//! ```no_run
//! mesh_executor::shim_main_if_requested();
//! // ... parse arguments, start the runtime, `Executor::new(...)`.
//! ```

pub mod cgroup;
mod child;
mod exec;
mod executor;
mod lock;
pub mod logs;
mod netns;
mod procfs;
mod rootfs;
mod shim;
mod spec;
mod state;
mod user;

pub use cgroup::{CgroupError, CgroupLayout, CgroupMode, V1Hierarchy};
pub use child::ChildError;
pub use exec::{RunError, MAX_OUTPUT};
pub use executor::{ExecError, Executor, NETWORK_SETUP_TIMEOUT};
pub use lock::ExecRootLock;
pub use logs::{LogOptions, Record as LogRecord, Stream as LogStream};
pub use rootfs::DEFAULT_CAPS;
pub use shim::{shim_main_if_requested, ShimError};
pub use spec::{
    validate_cgroup_parent, validate_id, validate_netns_name, ExecOutput, ExecutorConfig, FileSpec,
    MountSource, MountSpec, RootfsSpec, SpecError, TaskRuntime, TaskSpec, DEFAULT_PATH,
    MAX_HOSTNAME_LEN, MAX_ID_LEN, MAX_LAYERS, MAX_NETNS_NAME_LEN, NETNS_CGROUP, NETNS_HOLDER_ARG,
    SHIM_ARG,
};
pub use state::StateError;
