//! [`Executor`]: starts tasks through shims, reports, stops, removes and
//! execs into them, and adopts the tasks of a previous meshd from the state
//! in `<exec_root>/tasks/`.
//!
//! An ended task keeps its state directory (logs, exit record) until
//! [`Executor::remove`], never its cgroups: its shim removes them before it
//! records the exit; when the shim could not (it was killed, or the cgroups
//! stayed busy), [`Executor::status`] (and so `list`) and
//! [`Executor::stop`] do as soon as they see the task ended, for adopted
//! tasks too. [`Executor::list`] also removes the remains of a start that a
//! dead meshd left unfinished (no `state.json`), which nothing else would
//! ever ask for again.
//!
//! An image task's writable layer lives in `<rw_root>/<id>` (on disk, see
//! [`ExecutorConfig::rw_root`](crate::ExecutorConfig::rw_root)) and goes with its state
//! directory; one whose state directory is gone (a meshd killed in `remove`,
//! or a reboot that emptied the exec root) goes when the next executor is
//! created.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupError, CgroupLayout};
use crate::exec::{self, RunError};
use crate::netns::Holders;
use crate::spec::{self, ExecOutput, ExecutorConfig, TaskRuntime, TaskSpec, NETNS_CGROUP};
use crate::state::{
    self, ExitRecord, TaskState, EXIT_FILE, HOSTNAME_FILE, LAUNCH_FILE, RESOLV_FILE, SPEC_FILE,
    STATE_FILE,
};
use crate::{child, procfs, rootfs, shim};

/// How long `start` waits for each of the shim's reports.
const SHIM_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the network setup of `start_with` may take before the task is
/// killed.
pub const NETWORK_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `start`/`remove` wait for a concurrent operation on the same id.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `status` waits for a live shim to record a dead task's exit.
const EXIT_RECORD_WAIT: Duration = Duration::from_millis(500);
/// How long `remove` waits for cgroups to become removable.
const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(10);

/// Errors of the executor. Messages name the task (its spec name when
/// known, else its id).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The executor could not be set up.
    #[error("cannot initialise the executor in {}: {reason}", exec_root.display())]
    Init { exec_root: PathBuf, reason: String },
    /// The task could not be started, e.g. `command not found: foo`.
    #[error("cannot start task {task}: {reason}")]
    Start { task: String, reason: String },
    /// No task with this id.
    #[error("task {task} not found")]
    NotFound { task: String },
    /// The task exists but does not run.
    #[error("task {task} is not running")]
    NotRunning { task: String },
    /// The task did not stop.
    #[error("cannot stop task {task}: {reason}")]
    Stop { task: String, reason: String },
    /// The task's cgroups or files could not be removed.
    #[error("cannot remove task {task}: {reason}")]
    Remove { task: String, reason: String },
    /// The task's logs could not be read.
    #[error("cannot read the logs of task {task}: {reason}")]
    Logs { task: String, reason: String },
    /// A command could not be run in the task.
    #[error("cannot exec in task {task}: {reason}")]
    Exec { task: String, reason: String },
    /// A network namespace (holder) could not be created.
    #[error("cannot create network namespace {name}: {reason}")]
    NetnsCreate { name: String, reason: String },
    /// A network namespace (holder) could not be removed.
    #[error("cannot remove network namespace {name}: {reason}")]
    NetnsRemove { name: String, reason: String },
}

/// The node's task executor (see the crate docs). `Send + Sync`; every
/// method is blocking.
#[derive(Debug)]
pub struct Executor {
    tasks_dir: PathBuf,
    /// The image tasks' writable layers (`<rw_root>/<id>`).
    rw_dir: PathBuf,
    parent: String,
    shim_exe: PathBuf,
    layout: CgroupLayout,
    /// The network-namespace holders (`<exec_root>/netns`).
    holders: Holders,
    /// Ids with a `start` or `remove` in progress.
    busy: Mutex<HashSet<String>>,
    busy_cv: Condvar,
}

/// Exclusive use of one task id; released on drop.
struct Claim<'a> {
    ex: &'a Executor,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.ex.busy_set().remove(&self.id);
        self.ex.busy_cv.notify_all();
    }
}

impl Executor {
    /// Detects (or mounts) the cgroup hierarchies, creates the
    /// `cgroup_parent` subtree, `<exec_root>/tasks` and `<exec_root>/netns`.
    pub fn new(cfg: ExecutorConfig) -> Result<Executor, ExecError> {
        let init_err = |reason: String| ExecError::Init {
            exec_root: cfg.exec_root.clone(),
            reason,
        };
        spec::validate_cgroup_parent(&cfg.cgroup_parent).map_err(|e| init_err(e.to_string()))?;
        let exec_root = std::path::absolute(&cfg.exec_root)
            .map_err(|e| init_err(format!("cannot resolve the path: {e}")))?;
        let shim_exe = match &cfg.shim_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| init_err(format!("cannot find the current executable: {e}")))?,
        };
        let tasks_dir = exec_root.join("tasks");
        let netns_dir = exec_root.join("netns");
        let rw_dir =
            std::path::absolute(cfg.rw_root.as_deref().unwrap_or(&exec_root.join("rw")))
                .map_err(|e| init_err(format!("cannot resolve the writable layers' path: {e}")))?;
        for d in [&tasks_dir, &netns_dir, &rw_dir] {
            fs::create_dir_all(d)
                .map_err(|e| init_err(format!("cannot create {}: {e}", d.display())))?;
        }
        remove_orphan_layers(&rw_dir, &tasks_dir);
        let layout =
            CgroupLayout::detect(&exec_root.join("cgroup")).map_err(|e| init_err(e.to_string()))?;
        layout
            .create_parent(&cfg.cgroup_parent)
            .map_err(|e| init_err(e.to_string()))?;
        tracing::info!(
            mode = ?layout.mode(),
            v2 = %layout.v2_root().display(),
            mounted = layout.mounted().len(),
            parent = %cfg.cgroup_parent,
            "task executor ready"
        );
        Ok(Executor {
            tasks_dir,
            rw_dir,
            parent: cfg.cgroup_parent,
            shim_exe,
            layout,
            holders: Holders { dir: netns_dir },
            busy: Mutex::new(HashSet::new()),
            busy_cv: Condvar::new(),
        })
    }

    /// The detected cgroup layout.
    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// The cgroup parent tasks are created under.
    pub fn cgroup_parent(&self) -> &str {
        &self.parent
    }

    /// The task's state directory (`<exec_root>/tasks/<id>`).
    pub fn task_dir(&self, id: &str) -> PathBuf {
        self.tasks_dir.join(id)
    }

    /// The task's writable layer, if it is an image task (`<rw_root>/<id>`,
    /// linked from its state directory as `rw`).
    pub fn rw_dir(&self, id: &str) -> PathBuf {
        self.rw_dir.join(id)
    }

    fn busy_set(&self) -> MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `id` for exclusive use if no start/remove of it is running, at once.
    fn try_claim(&self, id: &str) -> Option<Claim<'_>> {
        if !self.busy_set().insert(id.to_string()) {
            return None;
        }
        Some(Claim {
            ex: self,
            id: id.to_string(),
        })
    }

    /// Waits (bounded) until no other start/remove of `id` is running.
    fn claim(&self, id: &str) -> Option<Claim<'_>> {
        let deadline = Instant::now() + CLAIM_TIMEOUT;
        let mut set = self.busy_set();
        while set.contains(id) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            set = match self.busy_cv.wait_timeout(set, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        set.insert(id.to_string());
        Some(Claim {
            ex: self,
            id: id.to_string(),
        })
    }

    /// The task's name from its spec, else its id.
    fn name_of(&self, id: &str) -> String {
        match state::read_json::<TaskSpec>(&self.task_dir(id).join(SPEC_FILE)) {
            Ok(Some(s)) if !s.name.is_empty() => s.name,
            _ => id.to_string(),
        }
    }

    /// Starts the task; returns once the command has been exec'd
    /// (`Running`) or fails with a clear error (`cannot start task web.1.x:
    /// command not found: foo`). Idempotent: for an id that was already
    /// started, returns its current runtime (`Running`, or `Exited` if it
    /// has ended since) without starting anything.
    ///
    /// Same as [`Executor::start_with`] with a setup that does nothing.
    pub fn start(&self, spec: &TaskSpec) -> Result<TaskRuntime, ExecError> {
        self.start_with(spec, &mut |_| Ok(()))
    }

    /// Like [`Executor::start`], but after the task process exists in its
    /// new namespaces (hostname, mounts and `lo` done) and BEFORE it execs
    /// the command, calls `setup(task_pid)` on the caller's thread; the
    /// task's network namespace is `/proc/<task_pid>/ns/net` (for the
    /// overlay: move a veth in, addresses, routes). If `setup` returns
    /// `Err(reason)`, the task is killed and the start fails with
    /// `ExecError::Start { reason: "network setup failed: <reason>" }`,
    /// leaving nothing (state directory, cgroups). If `setup` takes longer
    /// than [`NETWORK_SETUP_TIMEOUT`] the task is killed at that moment and
    /// the start fails once `setup` returns. If `setup` panics, the same
    /// cleanup happens and the panic is resumed.
    ///
    /// For an id that was already started, `setup` is not called (see
    /// `start`).
    pub fn start_with(
        &self,
        spec: &TaskSpec,
        setup: &mut dyn FnMut(u32) -> Result<(), String>,
    ) -> Result<TaskRuntime, ExecError> {
        let name = if spec.name.is_empty() {
            spec.id.clone()
        } else {
            spec.name.clone()
        };
        let fail = |reason: String| ExecError::Start {
            task: name.clone(),
            reason,
        };
        spec.validate().map_err(|e| fail(e.to_string()))?;
        let _claim = self
            .claim(&spec.id)
            .ok_or_else(|| fail("another operation on this task is still running".into()))?;
        let dir = self.task_dir(&spec.id);
        if dir.exists() {
            if dir.join(STATE_FILE).exists() {
                if let Some(rt) = self.status(&spec.id) {
                    return Ok(rt);
                }
            }
            // Left over by a meshd that died while starting it.
            tracing::warn!(task = %name, "removing the remains of an unfinished start");
            self.cleanup(&spec.id).map_err(fail)?;
        }
        // A panicking setup must not leave the task behind: it becomes an
        // error here and is resumed after the cleanup.
        let mut panicked = None;
        let mut guarded = |pid: u32| match panic::catch_unwind(AssertUnwindSafe(|| setup(pid))) {
            Ok(r) => r,
            Err(payload) => {
                panicked = Some(payload);
                Err("the setup panicked".to_string())
            }
        };
        let res = self.start_new(spec, &dir, &mut guarded);
        if let Err(reason) = res {
            if let Err(e) = self.cleanup(&spec.id) {
                tracing::warn!(task = %name, error = %e, "cleanup after a failed start");
            }
            if let Some(payload) = panicked {
                panic::resume_unwind(payload);
            }
            return Err(fail(reason));
        }
        match state::read_json::<TaskState>(&dir.join(STATE_FILE)) {
            Ok(Some(st)) => {
                tracing::info!(task = %name, pid = st.pid, "task started");
                Ok(TaskRuntime::Running {
                    pid: st.pid,
                    started_at_ms: st.started_at_ms,
                })
            }
            Ok(None) => Err(fail("the shim reported success but wrote no state".into())),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    fn start_new(
        &self,
        spec: &TaskSpec,
        dir: &Path,
        setup: &mut dyn FnMut(u32) -> Result<(), String>,
    ) -> Result<(), String> {
        fs::create_dir_all(&self.tasks_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.tasks_dir.display()))?;
        fs::create_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let s = |e: state::StateError| e.to_string();
        state::write_json(&dir.join(SPEC_FILE), spec).map_err(s)?;
        // The task's own files: plain writes into its new directory (no rename, no fsync).
        // Nothing reads them before the shim starts, and a meshd killed before then leaves
        // a directory without a state file, which the next start of the task removes.
        // An image task gets its `/etc` files from memory (the shim makes them from the spec).
        match &spec.rootfs {
            None => {
                state::write_fresh(&dir.join(RESOLV_FILE), spec.resolv_conf.as_bytes())
                    .map_err(s)?;
                state::write_fresh(&dir.join(HOSTNAME_FILE), spec.hostname.as_bytes())
                    .map_err(s)?;
            }
            Some(r) => rootfs::prepare_dir(dir, &self.rw_dir(&spec.id), r)?,
        }
        let launch = self
            .layout
            .create_task(&self.parent, &spec.id, spec.nano_cpus, spec.memory_bytes)
            .map_err(|e| e.to_string())?;
        state::write_json(&dir.join(LAUNCH_FILE), &launch).map_err(s)?;
        shim::launch(
            &self.shim_exe,
            dir,
            &shim::file_payload(spec),
            SHIM_REPORT_TIMEOUT,
            setup,
            NETWORK_SETUP_TIMEOUT,
        )
        .map_err(|e| e.to_string())
    }

    /// Kills everything in the task's cgroups, removes them, the writable
    /// layer and the state directory (last: a layer whose removal failed is
    /// still found through it, and one a killed meshd left behind goes with
    /// the next executor's start, see [`remove_orphan_layers`]).
    fn cleanup(&self, id: &str) -> Result<(), String> {
        self.layout
            .remove_task(&self.parent, id, CGROUP_REMOVE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        for dir in [self.rw_dir(id), self.task_dir(id)] {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
            }
        }
        Ok(())
    }

    /// Current runtime of a task (`None` if unknown or not started). A task
    /// that died without its shim recording it (the shim was SIGKILLed) is
    /// reported as `Exited { code: None, signal: Some(9) }`, and that is
    /// recorded. The cgroups of an ended task that are still there (its shim
    /// was killed, or could not remove them) are removed: whatever is left
    /// in them is killed, in one pass that does not wait for busy cgroups (a
    /// later call retries).
    pub fn status(&self, id: &str) -> Option<TaskRuntime> {
        let rt = self.observe(id)?;
        if !rt.is_running() {
            if let Err(e) = self.release_cgroups(id, Duration::ZERO) {
                tracing::debug!(task = id, error = %e, "cgroups of an ended task still busy");
            }
        }
        Some(rt)
    }

    /// Kills whatever is left in the cgroups of an ended task and removes
    /// them, retrying while they are busy for at most `timeout`. Nothing to
    /// do (and no syscall but a `stat` per hierarchy) when they are gone.
    fn release_cgroups(&self, id: &str, timeout: Duration) -> Result<(), CgroupError> {
        let dirs = self.layout.task_paths(&self.parent, id);
        if !dirs.iter().any(|d| d.exists()) {
            return Ok(());
        }
        self.layout.remove_task(&self.parent, id, timeout)?;
        tracing::info!(task = id, "removed the cgroups of an ended task");
        Ok(())
    }

    /// The task's runtime from its state files and `/proc` (see `status`).
    fn observe(&self, id: &str) -> Option<TaskRuntime> {
        spec::validate_id(id).ok()?;
        let dir = self.task_dir(id);
        let st: TaskState = state::read_json(&dir.join(STATE_FILE)).ok()??;
        let exited = |rec: ExitRecord| TaskRuntime::Exited {
            code: rec.code,
            signal: rec.signal,
            started_at_ms: st.started_at_ms,
            finished_at_ms: rec.finished_at_ms,
        };
        let exit_path = dir.join(EXIT_FILE);
        let read_exit = || state::read_json::<ExitRecord>(&exit_path).ok().flatten();
        if let Some(rec) = read_exit() {
            return Some(exited(rec));
        }
        let running = TaskRuntime::Running {
            pid: st.pid,
            started_at_ms: st.started_at_ms,
        };
        if procfs::is_alive(st.pid, st.pid_start_time) {
            return Some(running);
        }
        if procfs::is_alive(st.shim_pid, st.shim_start_time) {
            // The shim is about to record the exit.
            let deadline = Instant::now() + EXIT_RECORD_WAIT;
            while Instant::now() < deadline {
                thread::sleep(POLL);
                if let Some(rec) = read_exit() {
                    return Some(exited(rec));
                }
                if !procfs::is_alive(st.shim_pid, st.shim_start_time) {
                    break;
                }
            }
            if procfs::is_alive(st.shim_pid, st.shim_start_time) {
                return Some(running);
            }
        }
        if let Some(rec) = read_exit() {
            return Some(exited(rec));
        }
        // Task and shim are gone without a record: the shim was killed and
        // took the task with it (PR_SET_PDEATHSIG).
        let rec = ExitRecord {
            code: None,
            signal: Some(libc::SIGKILL),
            finished_at_ms: state::now_ms(),
        };
        if let Err(e) = state::write_json(&exit_path, &rec) {
            tracing::warn!(task = id, error = %e, "cannot record the exit of a task");
        }
        Some(exited(rec))
    }

    /// All started tasks with a state directory, sorted by id (to adopt
    /// them after a meshd restart), each as `status` reports it (so the
    /// cgroups of ended ones are removed). The remains of starts that no
    /// longer run (a meshd died while starting them: no `state.json`, nothing
    /// left in their cgroups) are removed.
    pub fn list(&self) -> Vec<(String, TaskRuntime)> {
        let Ok(rd) = fs::read_dir(&self.tasks_dir) else {
            return Vec::new();
        };
        let mut out: Vec<(String, TaskRuntime)> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|id| match self.status(&id) {
                Some(rt) => Some((id, rt)),
                None => {
                    self.remove_unfinished(&id);
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Removes the state directory and cgroups of a start that never
    /// finished: no `state.json` (the shim never recorded a running task:
    /// its meshd died during the start and the shim aborted), no start or
    /// remove of this id in progress here, and no process left in its
    /// cgroups (a shim of the dead meshd may still be recording a task that
    /// did get exec'd; it is seen on a later call). Without this, a task
    /// that is not started again (the leader moved on while meshd was down)
    /// would keep its cgroups and files for ever: `status` and `list` do not
    /// see it.
    fn remove_unfinished(&self, id: &str) {
        if spec::validate_id(id).is_err() {
            return;
        }
        let dir = self.task_dir(id);
        if !dir.is_dir() || dir.join(STATE_FILE).exists() {
            return;
        }
        let Some(_claim) = self.try_claim(id) else {
            return;
        };
        if dir.join(STATE_FILE).exists() || !self.layout.task_pids(&self.parent, id).is_empty() {
            return;
        }
        tracing::warn!(task = %self.name_of(id), "removing the remains of an unfinished start");
        if let Err(e) = self.cleanup(id) {
            tracing::warn!(task = id, error = %e, "removing the remains of an unfinished start");
        }
    }

    /// Polls until the task is not running (true) or `timeout` passes.
    fn wait_stopped(&self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.status(id).is_some_and(|rt| rt.is_running()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM to the task (an image task's pid 1 alone, as `docker stop`; every
    /// process of a host-process task's cgroups), SIGKILL to all of it after
    /// `grace`; returns once the task has exited (at most `grace` + 5 s)
    /// and its cgroups are gone (what is left in them, e.g. processes
    /// started by `exec`, is killed). Its state directory and logs stay
    /// until `remove`. Stopping an ended task removes the cgroups it may still
    /// have.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<(), ExecError> {
        self.stop_with(id, libc::SIGTERM, grace)
    }

    /// Like [`Executor::stop`], with `signal` (a service's `--stop-signal`) in place of
    /// SIGTERM.
    pub fn stop_with(&self, id: &str, signal: i32, grace: Duration) -> Result<(), ExecError> {
        let Some(rt) = self.status(id) else {
            return Err(ExecError::NotFound {
                task: id.to_string(),
            });
        };
        if rt.is_running() {
            let st = state::read_json::<TaskState>(&self.task_dir(id).join(STATE_FILE))
                .ok()
                .flatten();
            if !grace.is_zero() {
                match &st {
                    // An image task's process is pid 1 of its own pid namespace: the stop
                    // signal is for it alone, as `docker stop` sends it (its children are
                    // its business; `--init` forwards the signal to its child).
                    Some(st) if procfs::in_other_pid_namespace(st.pid) => {
                        procfs::signal_checked(st.pid, st.pid_start_time, signal);
                    }
                    // A host-process task shares the host's pid namespace, where nothing
                    // reaps its children when it goes: every process of its cgroups gets
                    // the signal once (systemd's `KillMode=control-group`), itself included.
                    _ => self.layout.signal_task(&self.parent, id, signal),
                }
            }
            if grace.is_zero() || !self.wait_stopped(id, grace) {
                self.layout.signal_task(&self.parent, id, libc::SIGKILL);
                if let Some(st) = &st {
                    procfs::signal_checked(st.pid, st.pid_start_time, libc::SIGKILL);
                }
                if !self.wait_stopped(id, KILL_TIMEOUT) {
                    return Err(ExecError::Stop {
                        task: self.name_of(id),
                        reason: format!("still running {KILL_TIMEOUT:?} after SIGKILL"),
                    });
                }
            }
        }
        // Processes started by `exec` may outlive the task; the shim has
        // removed the cgroups already unless it was killed.
        self.release_cgroups(id, CGROUP_REMOVE_TIMEOUT)
            .map_err(|e| ExecError::Stop {
                task: self.name_of(id),
                reason: format!("the task ended but {e}"),
            })
    }

    /// Stops the task if needed (SIGKILL), waits for its shim, removes its
    /// state directory (logs too) and an image task's writable layer (its
    /// mounts went with its mount namespace) and
    /// its cgroups if still there. Removing an unknown id is not an error.
    pub fn remove(&self, id: &str) -> Result<(), ExecError> {
        spec::validate_id(id).map_err(|e| ExecError::Remove {
            task: id.to_string(),
            reason: e.to_string(),
        })?;
        let name = self.name_of(id);
        let fail = |reason: String| ExecError::Remove {
            task: name.clone(),
            reason,
        };
        let _claim = self
            .claim(id)
            .ok_or_else(|| fail("another operation on this task is still running".into()))?;
        if self.status(id).is_some_and(|rt| rt.is_running()) {
            self.stop(id, Duration::ZERO)
                .map_err(|e| fail(e.to_string()))?;
        }
        if let Ok(Some(st)) = state::read_json::<TaskState>(&self.task_dir(id).join(STATE_FILE)) {
            // Let the shim finish writing before its directory goes away.
            let deadline = Instant::now() + KILL_TIMEOUT;
            while procfs::is_alive(st.shim_pid, st.shim_start_time) {
                if Instant::now() >= deadline {
                    procfs::signal_checked(st.shim_pid, st.shim_start_time, libc::SIGKILL);
                    break;
                }
                thread::sleep(POLL);
            }
        }
        self.cleanup(id).map_err(fail)?;
        tracing::info!(task = %name, "task removed");
        Ok(())
    }

    /// The task's output lines (oldest first): those after `after_ns` (exclusive), if given,
    /// then the last `tail`, if given.
    pub fn logs(
        &self,
        id: &str,
        after_ns: Option<u64>,
        tail: Option<usize>,
    ) -> Result<Vec<crate::logs::Record>, ExecError> {
        let dir = self.task_dir(id);
        if spec::validate_id(id).is_err() || !dir.is_dir() {
            return Err(ExecError::NotFound {
                task: id.to_string(),
            });
        }
        crate::logs::read(&dir, after_ns, tail).map_err(|e| ExecError::Logs {
            task: self.name_of(id),
            reason: e.to_string(),
        })
    }

    /// Runs `argv` inside the task's network, UTS and mount namespaces and
    /// its cgroups, with the task's environment (an image task's: also in
    /// its IPC and pid namespaces, as its user, with its capabilities, in
    /// its working directory, `argv[0]` found in its image); captures stdout and stderr
    /// (at most 16 MiB each) and the exit status (128 + signal if killed).
    /// Killed after `timeout`, which is an error.
    pub fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ExecError> {
        let not_found = || ExecError::NotFound {
            task: id.to_string(),
        };
        spec::validate_id(id).map_err(|_| not_found())?;
        let dir = self.task_dir(id);
        let spec: TaskSpec = state::read_json(&dir.join(SPEC_FILE))
            .ok()
            .flatten()
            .ok_or_else(not_found)?;
        let fail = |reason: String| ExecError::Exec {
            task: spec.name.clone(),
            reason,
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(fail("empty command line".into()));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(fail("the command line contains a NUL byte".into()));
        }
        let st: Option<TaskState> = state::read_json(&dir.join(STATE_FILE)).ok().flatten();
        let Some(st) = st.filter(|_| self.status(id).is_some_and(|rt| rt.is_running())) else {
            return Err(ExecError::NotRunning { task: spec.name });
        };
        let mut env = spec.effective_env();
        let user = match &spec.rootfs {
            Some(r) => {
                let user = rootfs::exec_user(r).map_err(|e| fail(e.to_string()))?;
                shim::add_home(&mut env, &user);
                Some((
                    user,
                    PathBuf::from(if r.workdir.is_empty() {
                        "/"
                    } else {
                        &r.workdir
                    }),
                ))
            }
            None => None,
        };
        let cmd = child::join_command(
            st.pid,
            argv,
            &env,
            &self.layout.task_paths(&self.parent, id),
            user.as_ref().map(|(u, w)| (u, w.as_path())),
        )
        .map_err(|e| fail(e.to_string()))?;
        // The namespace files are open now; make sure they were the task's.
        if !procfs::is_alive(st.pid, st.pid_start_time) {
            return Err(ExecError::NotRunning { task: spec.name });
        }
        exec::run_captured(cmd, &argv[0], timeout).map_err(|e| match e {
            RunError::Spawn(c) => fail(c.to_string()),
            other => fail(other.to_string()),
        })
    }

    /// The task's network namespace (`/proc/<pid>/ns/net`) while it runs.
    pub fn netns_path(&self, id: &str) -> Option<PathBuf> {
        match self.status(id)? {
            TaskRuntime::Running { pid, .. } => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
            TaskRuntime::Exited { .. } => None,
        }
    }

    /// Creates (or finds, if its holder is alive) the network namespace
    /// `name` (`[A-Za-z0-9_.-]`, at most 64 bytes), held by a detached
    /// holder process that survives meshd (see the crate docs); returns the
    /// holder's pid: the namespace is `/proc/<pid>/ns/net`, with `lo` up.
    /// The holder runs in the cgroup `<cgroup_parent>/netns` of every
    /// hierarchy. Idempotent; a record whose pid was reused by another
    /// process is not mistaken for the holder (start times are compared).
    pub fn netns_ensure(&self, name: &str) -> Result<u32, ExecError> {
        let fail = |reason: String| ExecError::NetnsCreate {
            name: name.to_string(),
            reason,
        };
        spec::validate_netns_name(name).map_err(|e| fail(e.to_string()))?;
        if let Some(r) = self.holders.live(name) {
            return Ok(r.pid);
        }
        let cgroups = self
            .layout
            .create_leaf(&self.parent, NETNS_CGROUP)
            .map_err(|e| fail(e.to_string()))?;
        self.holders
            .ensure(name, &self.shim_exe, &cgroups)
            .map_err(fail)
    }

    /// The pid of the live holder of `name`, if any.
    pub fn netns_pid(&self, name: &str) -> Option<u32> {
        spec::validate_netns_name(name).ok()?;
        self.holders.live(name).map(|r| r.pid)
    }

    /// Names and holder pids of all network namespaces with a live holder,
    /// sorted by name (to collect garbage after a restart). Records of dead
    /// holders are removed.
    pub fn netns_list(&self) -> Vec<(String, u32)> {
        self.holders.list()
    }

    /// Kills the holder of `name` (SIGKILL; waits until it is gone, at most
    /// 5 s) and removes its record. A missing namespace is not an error.
    pub fn netns_remove(&self, name: &str) -> Result<(), ExecError> {
        let fail = |reason: String| ExecError::NetnsRemove {
            name: name.to_string(),
            reason,
        };
        spec::validate_netns_name(name).map_err(|e| fail(e.to_string()))?;
        self.holders.remove(name).map_err(fail)
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Executor>();
};

/// Removes the writable layers in `rw_dir` of tasks without a state directory in
/// `tasks_dir`: those of a meshd killed while removing a task, and all of them after a
/// reboot emptied the exec root (a tmpfs) while the data directory kept them. Runs once,
/// before the executor starts anything.
fn remove_orphan_layers(rw_dir: &Path, tasks_dir: &Path) {
    let Ok(rd) = fs::read_dir(rw_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if tasks_dir.join(&name).exists() {
            continue;
        }
        match fs::remove_dir_all(e.path()) {
            Ok(()) => tracing::info!(
                task = %name.to_string_lossy(),
                "removed the writable layer of a task that is gone"
            ),
            Err(err) => tracing::warn!(
                path = %e.path().display(),
                error = %err,
                "cannot remove the writable layer of a task that is gone"
            ),
        }
    }
}
