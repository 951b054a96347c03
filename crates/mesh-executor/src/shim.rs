//! The per-task shim, and how meshd launches it.
//!
//! meshd re-executes itself as `<exe> __mesh_task_shim <task_dir>` with
//! stdin and stdout pipes. The shim forks at once and the first process
//! exits (meshd reaps it right away); the second calls `setsid()`, so it
//! belongs to no process of meshd's: it is reparented to init and survives a
//! SIGKILL of meshd. The task is created with PR_SET_PDEATHSIG(SIGKILL):
//! killing the shim kills the task.
//!
//! The conversation, one line each:
//!
//! | shim → meshd (stdout) | meshd → shim (stdin) | meaning |
//! |---|---|---|
//! | `shim <pid>` | | the detached shim's pid |
//! | `ready <pid>` | | the task exists in its namespaces and waits at the gate |
//! | | `go` / `abort` | open the gate / kill the task (EOF = abort) |
//! | `ok` / `err <reason>` | | the command was exec'd / why not |
//!
//! The gate: the task child, at the end of its setup (namespaces, hostname,
//! mounts, `lo` up), writes its pid on a *ready* pipe and blocks reading one
//! byte from a *gate* pipe. A thread of the shim reads the pid, reports
//! `ready`, waits for meshd's word, then writes the byte (`go`) or SIGKILLs
//! the task (anything else; also when meshd says nothing for
//! [`GATE_TIMEOUT`]). Meanwhile the shim's main thread is in
//! `Command::spawn`, which returns once the command was exec'd (or failed to
//! be: `command not found` etc. are reported as before). The task is spawned
//! from the main thread because PR_SET_PDEATHSIG fires when the *thread*
//! that forked the task exits.
//!
//! An image task is forked into a new pid namespace (the main thread's
//! namespace for children is switched for that one fork and switched back),
//! so the command (or its `--init` reaper) is pid 1 there; the pid it
//! reports at the gate, and the shim records, is its pid in the shim's
//! namespace. Its root filesystem is prepared here, before the fork (see
//! the `rootfs` module).
//!
//! The task's stdout and stderr are pipes the shim reads, a thread each,
//! into the task's log (see the `logs` module).
//!
//! After `ok` the shim points stdin and stdout at `/dev/null`, waits for the
//! task, kills what is left in the task's cgroups, removes them (retrying for
//! at most [`CGROUP_REMOVE_TIMEOUT`] while they are busy), waits for its
//! output pipes to close (the last lines logged) and writes `exit.json`: a
//! task recorded as exited has no cgroup left (unless the removal timed out;
//! the executor retries then).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::{self, ChildError, Gate};
use crate::logs::{self, LogOptions, Stream as LogStream};
use crate::spec::{SpecError, TaskSpec, NETNS_HOLDER_ARG, SHIM_ARG};
use crate::state::{
    self, ExitRecord, Launch, StateError, TaskState, LAUNCH_FILE, RESOLV_FILE, SHIM_LOG, SPEC_FILE,
    STATE_FILE,
};
use crate::user::ExecUser;
use crate::{cgroup, netns, procfs, rootfs};

/// How long meshd waits for the intermediate shim process to exit.
const INTERMEDIATE_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of `shim.log` goes into an error message.
const SHIM_LOG_TAIL: usize = 2000;
/// How long the shim waits for meshd's `go`/`abort` before it kills the
/// task (meshd aborts after its own, shorter, setup timeout).
pub(crate) const GATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the shim retries removing the cgroups of its ended task before
/// it records the exit anyway (shorter than the executor's wait after
/// SIGKILL, so a `stop` never waits on it in vain).
pub(crate) const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the shim and of launching it.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// `spec.json` or `launch.json` is missing.
    #[error("{file} is missing in {}", dir.display())]
    Missing { file: &'static str, dir: PathBuf },
    /// The recorded spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The secret and config files did not arrive from meshd.
    #[error("cannot read the task's secret and config files from meshd: {0}")]
    Files(io::Error),
    /// The task process could not be created.
    #[error(transparent)]
    Child(#[from] ChildError),
    /// The shim binary could not be started.
    #[error("cannot run the shim {}: {source}", exe.display())]
    Spawn { exe: PathBuf, source: io::Error },
    /// The shim's report could not be read.
    #[error("cannot read the shim's report: {0}")]
    Pipe(io::Error),
    /// The shim exited (or closed its pipe) without a result.
    #[error("the shim exited without reporting a result{log}")]
    NoReport { log: String },
    /// The shim did not report in time (it was killed).
    #[error("the shim did not report within {timeout:?}{log}")]
    Timeout { timeout: Duration, log: String },
    /// The shim reported an error.
    #[error("{0}")]
    Reported(String),
    /// The gate pipes could not be created.
    #[error("cannot create the gate pipes: {0}")]
    GatePipe(io::Error),
    /// The pipes of the task's output could not be created.
    #[error("cannot create the task's output pipes: {0}")]
    OutputPipe(io::Error),
    /// The task's log could not be opened.
    #[error("cannot open the task's log: {0}")]
    Log(io::Error),
    /// meshd did not open the gate: the task was killed.
    #[error("the task was killed before it ran: {0}")]
    Aborted(String),
    /// The network setup before the command failed (the task was killed).
    #[error("network setup failed: {0}")]
    Setup(String),
    /// The network setup did not finish in time (the task was killed).
    #[error("network setup failed: it did not finish within {0:?} (the task was killed)")]
    SetupTimeout(Duration),
    /// The pid namespace of an image task could not be created.
    #[error("cannot create the task's pid namespace: {0}")]
    PidNs(io::Error),
}

/// A new pid namespace for the children the calling thread creates next;
/// dropping it puts the thread's own back (threads can be created again).
struct PidNsForChildren {
    own: OwnedFd,
}

impl PidNsForChildren {
    fn new() -> io::Result<PidNsForChildren> {
        let own = OwnedFd::from(File::open("/proc/thread-self/ns/pid")?);
        // SAFETY: unshare with a constant flag; it changes only where this
        // thread's next children go.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PidNsForChildren { own })
    }
}

impl Drop for PidNsForChildren {
    fn drop(&mut self) {
        // SAFETY: an open pid namespace fd: our own active namespace, which
        // a thread may always go back to.
        if unsafe { libc::setns(self.own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            eprintln!(
                "mesh task shim: cannot restore the pid namespace for children: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Adds `HOME` (the user's home in the image) to an image task's
/// environment if it has none, as Docker does.
pub(crate) fn add_home(env: &mut Vec<(String, String)>, user: &ExecUser) {
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".to_string(), user.home.clone()));
    }
}

/// If this process was started as a task shim (`argv[1]` is
/// `__mesh_task_shim`) or a network-namespace holder (`argv[1]` is
/// `__mesh_netns_holder`), runs it and exits; otherwise returns at once.
///
/// meshd's `main` (and any binary used as `shim_exe`) must call this first
/// thing, before starting threads.
pub fn shim_main_if_requested() {
    let mut args = std::env::args_os().skip(1);
    let holder = match args.next() {
        Some(a) if a == OsStr::new(SHIM_ARG) => false,
        Some(a) if a == OsStr::new(NETNS_HOLDER_ARG) => true,
        _ => return,
    };
    let code = match (args.next(), holder) {
        (Some(dir), false) => run(Path::new(&dir)),
        (Some(base), true) => netns::holder_main(Path::new(&base)),
        (None, false) => {
            eprintln!("mesh task shim: missing task directory argument");
            2
        }
        (None, true) => {
            eprintln!("mesh netns holder: missing path argument");
            2
        }
    };
    std::process::exit(code);
}

/// Writes one report line to stdout (the pipe to meshd).
pub(crate) fn report(line: &str) {
    let one_line = line.replace('\n', " ");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{one_line}");
    let _ = out.flush();
}

/// Points stdin and stdout at /dev/null, closing the pipes to meshd.
fn close_pipes() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        // SAFETY: dup2 of an open fd onto fds 0 and 1; `null` is closed
        // afterwards.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO);
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// Leaves meshd behind: forks (the parent `_exit`s at once, so meshd reaps it and never waits
/// on us), starts a new session and moves to `/`, so that a SIGKILL of meshd or of its process
/// group does not reach us. Called first thing in main, before any thread exists. On failure
/// the reason has been reported on the status pipe.
pub(crate) fn detach(what: &str) -> Result<(), ()> {
    // SAFETY: no other thread exists, so the child may run arbitrary code; the parent only
    // calls _exit.
    match unsafe { libc::fork() } {
        -1 => {
            report(&format!(
                "err cannot fork the {what}: {}",
                io::Error::last_os_error()
            ));
            return Err(());
        }
        0 => {}
        // SAFETY: _exit is always safe; nothing needs flushing.
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: setsid has no preconditions; we are not a group leader.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    Ok(())
}

/// The shim process. Returns its exit code.
fn run(dir: &Path) -> i32 {
    if detach("shim").is_err() {
        return 1;
    }
    report(&format!("shim {}", std::process::id()));
    let (mut task, launch, copiers) = match start_task(dir) {
        Ok(t) => t,
        Err(e) => {
            report(&format!("err {e}"));
            return 1;
        }
    };
    report("ok");
    close_pipes();
    let status = loop {
        match task.wait() {
            Ok(s) => break Some(s),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("mesh task shim: waiting for the task failed: {e}");
                break None;
            }
        }
    };
    let finished_at_ms = state::now_ms();
    // Like a container whose init exits: nothing of the task survives it,
    // not even its cgroups (only its state directory, for its logs).
    cgroup::kill_dirs(&launch.cgroups);
    if let Err(e) = cgroup::remove_trees(&launch.cgroups, CGROUP_REMOVE_TIMEOUT) {
        eprintln!("mesh task shim: {e}");
    }
    // Its last lines are in the log before it is recorded exited. Nothing of the task holds
    // the pipes any more; something that escaped its cgroups might: not waited for long.
    let deadline = Instant::now() + COPIERS_TIMEOUT;
    for _ in 0..copiers.count {
        let left = deadline.saturating_duration_since(Instant::now());
        if copiers.done.recv_timeout(left).is_err() {
            eprintln!("mesh task shim: the task's output still open after {COPIERS_TIMEOUT:?}");
            break;
        }
    }
    let rec = ExitRecord {
        code: status.and_then(|s| s.code()),
        signal: status.map_or(Some(libc::SIGKILL), |s| s.signal()),
        finished_at_ms,
    };
    if let Err(e) = state::write_json(&dir.join(state::EXIT_FILE), &rec) {
        eprintln!("mesh task shim: {e}");
        return 1;
    }
    0
}

/// What became of the gate.
#[derive(Debug, PartialEq, Eq)]
enum GateOutcome {
    /// meshd said `go`; the byte was written.
    Opened,
    /// The task was killed at the gate (why).
    Aborted(String),
    /// The task never reached the gate (its setup failed before).
    NoTask,
}

/// Reads meshd's word on stdin: `Ok` for `go`, else why not.
fn read_verdict(timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            return match &line[..] {
                b"go" => Ok(()),
                b"abort" => Err("meshd aborted the start".into()),
                other => Err(format!(
                    "unexpected word from meshd: {:?}",
                    String::from_utf8_lossy(other)
                )),
            };
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("no word from meshd within {timeout:?}"));
        }
        let ms = (deadline - now).as_millis().clamp(1, 1000);
        let mut pfd = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, i32::try_from(ms).unwrap_or(1000)) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("cannot wait for meshd: {e}"));
        }
        if rc == 0 {
            continue;
        }
        let mut chunk = [0u8; 64];
        // SAFETY: reads into a stack buffer of the given size from fd 0.
        let n = unsafe { libc::read(libc::STDIN_FILENO, chunk.as_mut_ptr().cast(), chunk.len()) };
        match n {
            0 => return Err("meshd closed the control pipe".into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("cannot read meshd's word: {e}"));
                }
            }
            n => line.extend_from_slice(&chunk[..usize::try_from(n).unwrap_or(0)]),
        }
    }
}

/// The shim's gate keeper (a thread): waits for the task's pid on `ready`,
/// reports it, and opens the gate or kills the task as meshd says.
fn keep_gate(ready: OwnedFd, gate: OwnedFd, timeout: Duration) -> GateOutcome {
    let mut ready = File::from(ready);
    let mut buf = [0u8; 4];
    if ready.read_exact(&mut buf).is_err() {
        // EOF: the task failed (or was killed) before the gate.
        return GateOutcome::NoTask;
    }
    let pid = u32::try_from(i32::from_ne_bytes(buf)).unwrap_or(0);
    report(&format!("ready {pid}"));
    let verdict = read_verdict(timeout).and_then(|()| {
        let mut gate = File::from(gate);
        gate.write_all(b"g")
            .map_err(|e| format!("cannot open the gate: {e}"))
    });
    match verdict {
        Ok(()) => GateOutcome::Opened,
        Err(reason) => {
            // The task is our unreaped child (the main thread is still in
            // `spawn`, which does not reap a killed child): the pid is safe.
            procfs::signal(pid, libc::SIGKILL);
            GateOutcome::Aborted(reason)
        }
    }
}

/// How long the shim waits, once the task exited, for its output pipes to close.
const COPIERS_TIMEOUT: Duration = Duration::from_secs(2);

/// The threads that copy the task's stdout and stderr into its log: each says when its
/// pipe closed.
struct Copiers {
    count: usize,
    done: mpsc::Receiver<()>,
}

impl Copiers {
    /// Starts a thread per pipe (not while the pid namespace for children is switched).
    fn start(
        dir: &Path,
        opts: LogOptions,
        out: OwnedFd,
        err: OwnedFd,
    ) -> Result<Copiers, ShimError> {
        let writer = Arc::new(Mutex::new(
            logs::Writer::open(dir, opts).map_err(ShimError::Log)?,
        ));
        let (tx, done) = mpsc::channel();
        for (fd, stream) in [(out, LogStream::Stdout), (err, LogStream::Stderr)] {
            let (w, tx) = (writer.clone(), tx.clone());
            thread::spawn(move || {
                logs::copy(File::from(fd), stream, &w);
                let _ = tx.send(());
            });
        }
        Ok(Copiers { count: 2, done })
    }
}

/// Spawns the task (through the gate) and records `state.json`.
fn start_task(dir: &Path) -> Result<(Child, Launch, Copiers), ShimError> {
    let spec: TaskSpec = state::read_json(&dir.join(SPEC_FILE))?.ok_or(ShimError::Missing {
        file: SPEC_FILE,
        dir: dir.to_path_buf(),
    })?;
    let launch: Launch = state::read_json(&dir.join(LAUNCH_FILE))?.ok_or(ShimError::Missing {
        file: LAUNCH_FILE,
        dir: dir.to_path_buf(),
    })?;
    spec.validate()?;
    let mut env = spec.effective_env();
    let mut spec = spec;
    if let Some(r) = spec.rootfs.as_mut() {
        // The files' data follows on stdin (see `file_payload`).
        for f in &mut r.files {
            let mut len = [0u8; 8];
            read_stdin_exact(&mut len).map_err(ShimError::Files)?;
            let len = usize::try_from(u64::from_le_bytes(len))
                .ok()
                .filter(|n| *n <= MAX_FILE_BYTES)
                .ok_or_else(|| ShimError::Files(io::Error::other("file too large")))?;
            f.data = vec![0; len];
            read_stdin_exact(&mut f.data).map_err(ShimError::Files)?;
        }
    }
    let rootfs = match &spec.rootfs {
        Some(r) => {
            let (setup, user) = rootfs::prepare(dir, r, &spec.hostname, &spec.resolv_conf)?;
            add_home(&mut env, &user);
            Some(setup)
        }
        None => None,
    };
    let (ready_r, ready_w) = child::pipe().map_err(ShimError::GatePipe)?;
    let (gate_r, gate_w) = child::pipe().map_err(ShimError::GatePipe)?;
    let gate = Gate {
        ready: ready_w,
        wait: gate_r,
        close_in_child: gate_w.as_raw_fd(),
    };
    let image = rootfs.is_some();
    let (out_r, out_w) = child::pipe().map_err(ShimError::OutputPipe)?;
    let (err_r, err_w) = child::pipe().map_err(ShimError::OutputPipe)?;
    let mut cmd = child::task_command(
        &spec.argv,
        &env,
        &spec.hostname,
        &dir.join(RESOLV_FILE),
        &launch.cgroups,
        File::from(out_w),
        File::from(err_w),
        gate,
        rootfs,
    )?;
    let keeper = thread::spawn(move || keep_gate(ready_r, gate_w, GATE_TIMEOUT));
    // An image task is pid 1 of a new pid namespace: this thread's next
    // child goes there (set after the keeper exists: a thread cannot be
    // created while the namespace for children differs).
    let pid_ns = if image {
        Some(PidNsForChildren::new().map_err(ShimError::PidNs)?)
    } else {
        None
    };
    // On this (the main) thread: the task dies with the thread that forked
    // it. Blocks until the command was exec'd or failed.
    let spawned = cmd.spawn();
    drop(pid_ns);
    // Drop the pre-opened fds, the pipes' write ends and our ends of the
    // gate's pipes (the keeper sees EOF if the task never reached the gate).
    drop(cmd);
    // Read at once: the task blocks on a full pipe.
    let copiers = Copiers::start(dir, spec.log, out_r, err_r);
    let outcome = keeper
        .join()
        .unwrap_or_else(|_| GateOutcome::Aborted("the gate keeper panicked".into()));
    let kill_and_reap = |t: &mut Child| {
        let _ = t.kill();
        let _ = t.wait();
    };
    match outcome {
        GateOutcome::Opened => {}
        GateOutcome::Aborted(reason) => {
            if let Ok(mut t) = spawned {
                kill_and_reap(&mut t);
            }
            return Err(ShimError::Aborted(reason));
        }
        GateOutcome::NoTask => {
            if let Ok(mut t) = spawned {
                kill_and_reap(&mut t);
                return Err(ShimError::Aborted(
                    "the task died before reaching the gate".into(),
                ));
            }
        }
    }
    let mut task = spawned.map_err(|e| child::decode_spawn_error(e, &spec.argv[0]))?;
    let copiers = match copiers {
        Ok(c) => c,
        Err(e) => {
            kill_and_reap(&mut task);
            return Err(e);
        }
    };
    let started_at_ms = state::now_ms();
    let me = std::process::id();
    // The task is our unreaped child: its /proc entry exists even if it
    // already exited.
    let st = TaskState {
        shim_pid: me,
        shim_start_time: procfs::stat(me).map_or(0, |s| s.start_time),
        pid: task.id(),
        pid_start_time: procfs::stat(task.id()).map_or(0, |s| s.start_time),
        started_at_ms,
    };
    if let Err(e) = state::write_json(&dir.join(STATE_FILE), &st) {
        kill_and_reap(&mut task);
        return Err(e.into());
    }
    Ok((task, launch, copiers))
}

/// The largest secret or config file the shim takes (Docker's limit is 500 KiB).
const MAX_FILE_BYTES: usize = 1 << 20;

/// What meshd writes on the shim's stdin before anything else when the task has secret or
/// config files: each file's length (8 bytes, little endian) and data, in the spec's order.
/// Through the pipe, their data never touches the disk.
pub(crate) fn file_payload(spec: &crate::spec::TaskSpec) -> Vec<u8> {
    let mut out = Vec::new();
    for f in spec.rootfs.iter().flat_map(|r| &r.files) {
        out.extend_from_slice(&(f.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&f.data);
    }
    out
}

/// Reads exactly `buf.len()` bytes from fd 0, unbuffered (the control words that follow
/// are read raw too).
fn read_stdin_exact(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: reads into the valid, writable rest of `buf`.
        let n = unsafe { libc::read(libc::STDIN_FILENO, rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += usize::try_from(n).unwrap_or(0),
        }
    }
    Ok(())
}

/// The tail of the shim's log as an error-message suffix ("" if empty).
fn log_suffix(dir: &Path) -> String {
    let tail = state::read_tail(&dir.join(SHIM_LOG), SHIM_LOG_TAIL).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(" (shim log: {text})")
    }
}

/// The shim's report so far.
#[derive(Debug, Default, PartialEq, Eq)]
struct Report {
    shim_pid: Option<u32>,
    ready: Option<u32>,
    result: Option<Result<(), String>>,
}

fn parse_report(buf: &[u8]) -> Report {
    let mut r = Report::default();
    let text = String::from_utf8_lossy(buf);
    // Only complete lines count.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    for line in complete.lines() {
        if let Some(pid) = line.strip_prefix("shim ") {
            r.shim_pid = pid.trim().parse().ok();
        } else if let Some(pid) = line.strip_prefix("ready ") {
            r.ready = pid.trim().parse().ok().filter(|p| *p > 1);
        } else if line == "ok" {
            r.result = Some(Ok(()));
        } else if let Some(reason) = line.strip_prefix("err ") {
            r.result = Some(Err(reason.to_string()));
        }
        if r.result.is_some() {
            break;
        }
    }
    r
}

/// How a wait for the shim's report ended.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// What was waited for arrived.
    Done,
    /// The pipe was closed.
    Eof,
    /// The deadline passed.
    Timeout,
}

/// The shim's report pipe and what was read from it.
struct ReportReader {
    pipe: ChildStdout,
    buf: Vec<u8>,
    eof: bool,
}

impl ReportReader {
    /// Reads until `done(report)`, EOF or `deadline`.
    fn wait_for(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Report) -> bool,
    ) -> Result<(Report, Wait), ShimError> {
        let mut chunk = [0u8; 1024];
        loop {
            let report = parse_report(&self.buf);
            if done(&report) {
                return Ok((report, Wait::Done));
            }
            if self.eof {
                return Ok((report, Wait::Eof));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok((report, Wait::Timeout));
            }
            let ms = (deadline - now).as_millis().clamp(1, 100);
            let mut pfd = libc::pollfd {
                fd: self.pipe.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, i32::try_from(ms).unwrap_or(100)) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ShimError::Pipe(e));
            }
            if rc == 0 {
                continue;
            }
            match self.pipe.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ShimError::Pipe(e)),
            }
        }
    }
}

/// Reaps the intermediate shim process (it exits right after its fork).
fn reap(child: &mut Child) {
    let deadline = Instant::now() + INTERMEDIATE_EXIT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Writes one line to the shim's stdin; errors (the shim is gone) are
/// ignored: the report says what happened.
fn tell(stdin: Option<&ChildStdin>, word: &str) {
    if let Some(mut s) = stdin {
        let _ = s.write_all(format!("{word}\n").as_bytes());
    }
}

/// Runs `setup(pid)` on this thread; a watchdog tells the shim to `abort`
/// (kill the task) if it takes longer than `limit`. Returns the setup's
/// verdict and whether the watchdog fired.
fn run_setup(
    pid: u32,
    setup: &mut dyn FnMut(u32) -> Result<(), String>,
    limit: Duration,
    stdin: Option<&ChildStdin>,
) -> (Result<(), String>, bool) {
    let fired = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<()>();
    let fired_ref = &fired;
    let verdict = thread::scope(|s| {
        s.spawn(move || {
            if rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                fired_ref.store(true, Ordering::SeqCst);
                tracing::warn!(pid, ?limit, "network setup too slow: killing the task");
                tell(stdin, "abort");
            }
        });
        let v = setup(pid);
        drop(tx);
        v
    });
    (verdict, fired.load(Ordering::SeqCst))
}

/// The error for a shim that gave no result: it is killed (its task dies
/// with it).
fn no_result(report: &Report, how: &Wait, timeout: Duration, dir: &Path) -> ShimError {
    if let Some(pid) = report.shim_pid {
        procfs::signal(pid, libc::SIGKILL);
    }
    let log = log_suffix(dir);
    if *how == Wait::Timeout {
        ShimError::Timeout { timeout, log }
    } else {
        ShimError::NoReport { log }
    }
}

/// Starts the shim for the task in `dir`; once the task waits at the gate,
/// runs `setup(task pid)` (bounded by `setup_timeout`: the task is killed
/// when it passes), opens the gate and waits until the shim reports that the
/// command was exec'd. Each wait for the shim is bounded by `timeout`. On
/// failure the shim and the task are gone or going (the shim exits after
/// reporting an error; it is killed on timeout).
pub(crate) fn launch(
    exe: &Path,
    dir: &Path,
    payload: &[u8],
    timeout: Duration,
    setup: &mut dyn FnMut(u32) -> Result<(), String>,
    setup_timeout: Duration,
) -> Result<(), ShimError> {
    let log = child::open_log(&dir.join(SHIM_LOG))?;
    let mut cmd = Command::new(exe);
    cmd.arg(SHIM_ARG)
        .arg(dir)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .current_dir("/");
    let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    let mut stdin = child.stdin.take();
    if !payload.is_empty() {
        // Read by the shim before it prepares the task (a failed write: the shim is gone,
        // and says why below).
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(payload);
        }
    }
    let res = match child.stdout.take() {
        Some(pipe) => {
            let mut reader = ReportReader {
                pipe,
                buf: Vec::new(),
                eof: false,
            };
            converse(
                &mut reader,
                stdin,
                &mut child,
                dir,
                timeout,
                setup,
                setup_timeout,
            )
        }
        None => Err(ShimError::NoReport { log: String::new() }),
    };
    reap(&mut child);
    res
}

fn converse(
    reader: &mut ReportReader,
    stdin: Option<ChildStdin>,
    child: &mut Child,
    dir: &Path,
    timeout: Duration,
    setup: &mut dyn FnMut(u32) -> Result<(), String>,
    setup_timeout: Duration,
) -> Result<(), ShimError> {
    let (report, how) = reader.wait_for(Instant::now() + timeout, |r| {
        r.ready.is_some() || r.result.is_some()
    })?;
    let pid = match (report.ready, report.result.clone()) {
        (_, Some(Err(reason))) => return Err(ShimError::Reported(reason)),
        // A shim without a gate (not ours): nothing to set up.
        (None, Some(Ok(()))) => return Ok(()),
        (Some(pid), _) => pid,
        (None, None) => return Err(no_result(&report, &how, timeout, dir)),
    };
    // The intermediate process exited long ago; do not leave it a zombie
    // during the setup.
    reap(child);
    let (verdict, timed_out) = run_setup(pid, setup, setup_timeout, stdin.as_ref());
    let go = verdict.is_ok() && !timed_out;
    tell(stdin.as_ref(), if go { "go" } else { "abort" });
    drop(stdin);
    let (report, how) = reader.wait_for(Instant::now() + timeout, |r| r.result.is_some())?;
    if !go {
        if report.result.is_none() {
            // Make sure the task is gone: it dies with its shim.
            let _ = no_result(&report, &how, timeout, dir);
        }
        return Err(match verdict {
            Err(reason) if !timed_out => ShimError::Setup(reason),
            _ => ShimError::SetupTimeout(setup_timeout),
        });
    }
    match report.result {
        Some(Ok(())) => Ok(()),
        Some(Err(reason)) => Err(ShimError::Reported(reason)),
        None => Err(no_result(&report, &how, timeout, dir)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reports() {
        assert_eq!(parse_report(b""), Report::default());
        assert_eq!(
            parse_report(b"shim 42\nok"),
            Report {
                shim_pid: Some(42),
                ..Report::default()
            }
        );
        assert_eq!(
            parse_report(b"shim 42\nready 43\nok\n"),
            Report {
                shim_pid: Some(42),
                ready: Some(43),
                result: Some(Ok(()))
            }
        );
        assert_eq!(
            parse_report(b"shim 7\nerr command not found: foo\n"),
            Report {
                shim_pid: Some(7),
                ready: None,
                result: Some(Err("command not found: foo".into()))
            }
        );
        // Nonsense pids are no readiness.
        assert_eq!(parse_report(b"ready 1\nready x\n").ready, None);
    }

    fn no_setup(_: u32) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn launch_of_a_binary_that_is_no_shim_fails_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SHIM_LOG), b"").expect("log");
        // `true` ignores its arguments and exits without reporting.
        let err = launch(
            Path::new("/bin/true"),
            dir.path(),
            &[],
            Duration::from_secs(5),
            &mut no_setup,
            Duration::from_secs(5),
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the shim exited without reporting a result")
        );
        let err = launch(
            Path::new("/nonexistent/shim"),
            dir.path(),
            &[],
            Duration::from_secs(5),
            &mut no_setup,
            Duration::from_secs(5),
        )
        .err()
        .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.starts_with("cannot run the shim /nonexistent/shim: ")));
    }

    /// A fake shim speaking the protocol: like the real one, the process
    /// meshd started exits at once and a background one carries on; it
    /// reports itself as the task, records meshd's word in `<dir>/verdict`
    /// and reports the result.
    const FAKE_SHIM: &str = r#"#!/bin/sh
PATH=/usr/bin:/bin
exec 3<&0
{
echo "shim $$"
echo "ready $$"
read -r verdict <&3
echo "$verdict" > "$2/verdict.tmp" && mv "$2/verdict.tmp" "$2/verdict"
if [ "$verdict" = go ]; then echo ok; else echo "err aborted"; fi
} &
"#;

    fn fake_shim() -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("fake-shim");
        std::fs::write(&exe, FAKE_SHIM).expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, exe)
    }

    /// `launch`, retried while the script is busy (ETXTBSY: another test
    /// thread forked while it was open for writing).
    fn launch_fake(
        exe: &Path,
        dir: &Path,
        setup: &mut dyn FnMut(u32) -> Result<(), String>,
        setup_timeout: Duration,
    ) -> Result<(), ShimError> {
        for _ in 0..50 {
            match launch(exe, dir, &[], Duration::from_secs(5), setup, setup_timeout) {
                Err(ShimError::Spawn { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) =>
                {
                    thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
        panic!("the fake shim stayed busy");
    }

    fn verdict(dir: &Path) -> Option<String> {
        std::fs::read_to_string(dir.join("verdict"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    #[test]
    fn the_gate_opens_after_a_successful_setup() {
        let (dir, exe) = fake_shim();
        let mut seen = None;
        let res = launch_fake(
            &exe,
            dir.path(),
            &mut |pid| {
                seen = Some(pid);
                // The shim waits for our word.
                if verdict(dir.path()).is_some() {
                    return Err("the shim did not wait".into());
                }
                Ok(())
            },
            Duration::from_secs(5),
        );
        assert!(res.is_ok(), "{res:?}");
        assert!(seen.is_some_and(|p| p > 1));
        assert_eq!(verdict(dir.path()).as_deref(), Some("go"));
    }

    #[test]
    fn a_failed_setup_aborts() {
        let (dir, exe) = fake_shim();
        let res = launch_fake(
            &exe,
            dir.path(),
            &mut |_| Err("no veth".into()),
            Duration::from_secs(5),
        );
        assert_eq!(
            res.err().map(|e| e.to_string()).as_deref(),
            Some("network setup failed: no veth")
        );
        assert_eq!(verdict(dir.path()).as_deref(), Some("abort"));
    }

    #[test]
    fn a_slow_setup_is_aborted_while_it_runs() {
        let (dir, exe) = fake_shim();
        let mut aborted_during_setup = false;
        let t = Instant::now();
        let res = launch_fake(
            &exe,
            dir.path(),
            &mut |_| {
                // Hang until the watchdog has told the shim to abort.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if verdict(dir.path()).is_some() {
                        aborted_during_setup = true;
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            },
            Duration::from_millis(300),
        );
        assert!(aborted_during_setup, "no abort while the setup ran");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(verdict(dir.path()).as_deref(), Some("abort"));
        let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            msg,
            "network setup failed: it did not finish within 300ms (the task was killed)"
        );
    }
}
