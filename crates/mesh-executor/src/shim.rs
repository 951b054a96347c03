//! The per-task shim, and how meshd launches it.
//!
//! meshd re-executes itself as `<exe> __mesh_task_shim <task_dir>` with
//! stdout a pipe. The shim forks at once and the first process exits (meshd
//! reaps it right away); the second calls `setsid()`, so it belongs to no
//! process of meshd's: it is reparented to init and survives a SIGKILL of
//! meshd. It reports on the pipe (`shim <pid>`, then `ok` once the task was
//! exec'd or `err <reason>`), points its stdout at `/dev/null`, waits for the
//! task, kills what is left in the task's cgroups and writes `exit.json`.
//! The task is created with PR_SET_PDEATHSIG(SIGKILL): killing the shim
//! kills the task.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::{self, ChildError};
use crate::spec::{SpecError, TaskSpec, SHIM_ARG};
use crate::state::{
    self, ExitRecord, Launch, StateError, TaskState, LAUNCH_FILE, RESOLV_FILE, SHIM_LOG, SPEC_FILE,
    STATE_FILE, STDERR_LOG, STDOUT_LOG,
};
use crate::{cgroup, procfs};

/// How long meshd waits for the intermediate shim process to exit.
const INTERMEDIATE_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of `shim.log` goes into an error message.
const SHIM_LOG_TAIL: usize = 2000;

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
}

/// If this process was started as a task shim (`argv[1]` is
/// `__mesh_task_shim`), runs the shim and exits; otherwise returns at once.
///
/// meshd's `main` (and any binary used as `shim_exe`) must call this first
/// thing, before starting threads.
pub fn shim_main_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SHIM_ARG)) {
        return;
    }
    let code = match args.next() {
        Some(dir) => run(Path::new(&dir)),
        None => {
            eprintln!("mesh task shim: missing task directory argument");
            2
        }
    };
    std::process::exit(code);
}

/// Writes one report line to stdout (the pipe to meshd).
fn report(line: &str) {
    let one_line = line.replace('\n', " ");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{one_line}");
    let _ = out.flush();
}

/// Points stdout at /dev/null, closing the report pipe.
fn close_report() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        // SAFETY: dup2 of an open fd onto fd 1; `null` is closed afterwards.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// The shim process. Returns its exit code.
fn run(dir: &Path) -> i32 {
    // SAFETY: called first thing in main, before any thread exists, so the
    // child may run arbitrary code; the parent only calls _exit.
    match unsafe { libc::fork() } {
        -1 => {
            report(&format!(
                "err cannot fork the shim: {}",
                io::Error::last_os_error()
            ));
            return 1;
        }
        0 => {}
        // SAFETY: _exit is always safe; nothing needs flushing.
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: setsid has no preconditions; we are not a group leader.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    report(&format!("shim {}", std::process::id()));
    let (mut task, launch) = match start_task(dir) {
        Ok(t) => t,
        Err(e) => {
            report(&format!("err {e}"));
            return 1;
        }
    };
    report("ok");
    close_report();
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
    // Like a container whose init exits: nothing of the task survives it.
    cgroup::kill_dirs(&launch.cgroups);
    let rec = ExitRecord {
        code: status.and_then(|s| s.code()),
        signal: status.map_or(Some(libc::SIGKILL), |s| s.signal()),
        finished_at_ms: state::now_ms(),
    };
    if let Err(e) = state::write_json(&dir.join(state::EXIT_FILE), &rec) {
        eprintln!("mesh task shim: {e}");
        return 1;
    }
    0
}

/// Spawns the task and records `state.json`.
fn start_task(dir: &Path) -> Result<(Child, Launch), ShimError> {
    let spec: TaskSpec = state::read_json(&dir.join(SPEC_FILE))?.ok_or(ShimError::Missing {
        file: SPEC_FILE,
        dir: dir.to_path_buf(),
    })?;
    let launch: Launch = state::read_json(&dir.join(LAUNCH_FILE))?.ok_or(ShimError::Missing {
        file: LAUNCH_FILE,
        dir: dir.to_path_buf(),
    })?;
    spec.validate()?;
    let mut cmd = child::task_command(
        &spec.argv,
        &spec.effective_env(),
        &spec.hostname,
        &dir.join(RESOLV_FILE),
        &launch.cgroups,
        child::open_log(&dir.join(STDOUT_LOG))?,
        child::open_log(&dir.join(STDERR_LOG))?,
    )?;
    let spawned = cmd.spawn();
    // Drop the pre-opened fds and log files now.
    drop(cmd);
    let mut task = spawned.map_err(|e| child::decode_spawn_error(e, &spec.argv[0]))?;
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
        let _ = task.kill();
        let _ = task.wait();
        return Err(e.into());
    }
    Ok((task, launch))
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

/// Reads the shim's report until it has a result, EOF or `deadline`.
/// Returns the report and whether the deadline passed.
fn read_report(
    pipe: &mut std::process::ChildStdout,
    deadline: Instant,
) -> Result<(Report, bool), ShimError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let report = parse_report(&buf);
        if report.result.is_some() {
            return Ok((report, false));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((report, true));
        }
        let ms = (deadline - now).as_millis().clamp(1, 100);
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
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
        match pipe.read(&mut chunk) {
            Ok(0) => return Ok((parse_report(&buf), false)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ShimError::Pipe(e)),
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

/// Starts the shim for the task in `dir` and waits (at most `timeout`)
/// until it reports that the command was exec'd. On failure the shim is
/// gone (it exits after reporting an error; it is killed on timeout).
pub(crate) fn launch(exe: &Path, dir: &Path, timeout: Duration) -> Result<(), ShimError> {
    let log = child::open_log(&dir.join(SHIM_LOG))?;
    let mut cmd = Command::new(exe);
    cmd.arg(SHIM_ARG)
        .arg(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .current_dir("/");
    let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    let read = match child.stdout.take() {
        Some(mut pipe) => read_report(&mut pipe, Instant::now() + timeout),
        None => Ok((Report::default(), false)),
    };
    reap(&mut child);
    let (report, timed_out) = read?;
    match report.result {
        Some(Ok(())) => Ok(()),
        Some(Err(reason)) => Err(ShimError::Reported(reason)),
        None => {
            if let Some(pid) = report.shim_pid {
                procfs::signal(pid, libc::SIGKILL);
            }
            let log = log_suffix(dir);
            if timed_out {
                Err(ShimError::Timeout { timeout, log })
            } else {
                Err(ShimError::NoReport { log })
            }
        }
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
                result: None
            }
        );
        assert_eq!(
            parse_report(b"shim 42\nok\n"),
            Report {
                shim_pid: Some(42),
                result: Some(Ok(()))
            }
        );
        assert_eq!(
            parse_report(b"shim 7\nerr command not found: foo\n"),
            Report {
                shim_pid: Some(7),
                result: Some(Err("command not found: foo".into()))
            }
        );
    }

    #[test]
    fn launch_of_a_binary_that_is_no_shim_fails_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SHIM_LOG), b"").expect("log");
        // `true` ignores its arguments and exits without reporting.
        let err = launch(Path::new("/bin/true"), dir.path(), Duration::from_secs(5))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the shim exited without reporting a result")
        );
        let err = launch(
            Path::new("/nonexistent/shim"),
            dir.path(),
            Duration::from_secs(5),
        )
        .err()
        .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.starts_with("cannot run the shim /nonexistent/shim: ")));
    }
}
