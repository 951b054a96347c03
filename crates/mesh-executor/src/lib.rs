//! The node's task executor.
//!
//! A *task* is a command run in its own network, UTS and mount namespaces
//! and cgroups, with CPU and memory limits, its own hostname and
//! environment, and a private `/etc/resolv.conf` (the embedded DNS at
//! 127.0.0.11). Its stdout and stderr go to files for `service logs`; its
//! exit is recorded.
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
//! | `state.json` | shim | shim pid, task pid, their `/proc` start times, start time in ms |
//! | `exit.json` | shim (or `status` if the shim was killed) | code, signal, finish time |
//! | `stdout.log`, `stderr.log` | the task | its output |
//! | `shim.log` | shim | the shim's own diagnostics |
//!
//! Every file is written atomically (temp file + rename). cgroups: see
//! [`cgroup`] (pure v2 and hybrid layouts, hierarchies mounted under
//! `<exec_root>/cgroup/` when meshd runs under `ip netns exec`).
//!
//! meshd's `main` starts with the shim entry point:
//!
//! ```no_run
//! mesh_executor::shim_main_if_requested();
//! // ... parse arguments, start the runtime, `Executor::new(...)`.
//! ```

pub mod cgroup;
mod child;
mod exec;
mod executor;
mod procfs;
mod shim;
mod spec;
mod state;

pub use cgroup::{CgroupError, CgroupLayout, CgroupMode, V1Hierarchy};
pub use child::ChildError;
pub use exec::{RunError, MAX_OUTPUT};
pub use executor::{ExecError, Executor};
pub use shim::{shim_main_if_requested, ShimError};
pub use spec::{
    validate_cgroup_parent, validate_id, ExecOutput, ExecutorConfig, SpecError, TaskRuntime,
    TaskSpec, DEFAULT_PATH, MAX_HOSTNAME_LEN, MAX_ID_LEN, SHIM_ARG,
};
pub use state::StateError;
