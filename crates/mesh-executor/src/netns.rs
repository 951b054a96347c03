//! Network-namespace holders: named network namespaces that outlive meshd.
//!
//! meshd often runs under `ip netns exec`, which gives it a private mount
//! namespace: an nsfs bind mount it makes there (`ip netns add`-style) would
//! be invisible to the next meshd. So a persistent namespace (for instance
//! the per-network overlay namespace with `br0` and the VXLAN device) is held
//! by a tiny detached process instead, and found again through a record in
//! `<exec_root>/netns/`:
//!
//! | file | written by | content |
//! |---|---|---|
//! | `<name>.json` | the holder | its pid and `/proc` start time |
//! | `<name>.log` | the holder | its stderr (diagnostics) |
//! | `.lock` | | `flock`ed during changes |
//!
//! The holder is meshd re-executed as `__mesh_netns_holder
//! <exec_root>/netns/<name>` (see [`crate::shim_main_if_requested`]). It
//! joins the cgroup `<cgroup_parent>/netns` of every hierarchy before `exec`
//! (so a sweep of the cgroup parent kills it), forks (the first process
//! exits), calls `setsid()`, reports `holder <pid>`, `unshare(CLONE_NEWNET)`s,
//! brings `lo` up, records itself atomically, reports `ok`, and `pause()`s
//! until it is killed. It is nobody's child but init's: it survives meshd.
//! The namespace is `/proc/<pid>/ns/net`.

use crate::shim::report;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::spec::{self, NETNS_HOLDER_ARG};
use crate::{child, procfs, state};

/// How long meshd waits for a new holder's report.
const HOLDER_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `remove` waits for a killed holder to be gone.
const HOLDER_KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long meshd waits for the intermediate holder process to exit.
const INTERMEDIATE_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(5);
/// The lock file in the netns directory.
const LOCK_FILE: &str = ".lock";
/// How much of the holder's log goes into an error message.
const LOG_TAIL: usize = 2000;

/// `<name>.json`: who holds the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HolderRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, against pid reuse.
    pub start_time: u64,
    pub created_at_ms: u64,
}

/// `<base>.<ext>` (the name may contain dots: no `with_extension`).
fn with_suffix(base: &Path, ext: &str) -> PathBuf {
    let mut s: OsString = base.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// The holder process (`base` = `<exec_root>/netns/<name>`). Returns its
/// exit code on error; on success it never returns.
pub(crate) fn holder_main(base: &Path) -> i32 {
    if crate::shim::detach("holder").is_err() {
        return 1;
    }
    // Die of SIGTERM/SIGINT/SIGHUP even if meshd ignored or blocked them.
    // SAFETY: plain syscalls on valid arguments; no handler is installed.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    let me = std::process::id();
    report(&format!("holder {me}"));
    if let Err(e) = hold(base, me) {
        report(&format!("err {e}"));
        return 1;
    }
    report("ok");
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        // SAFETY: dup2 of an open fd onto fds 0 and 1; `null` is closed
        // afterwards.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO);
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

/// Creates the namespace and records the holder.
fn hold(base: &Path, me: u32) -> Result<(), String> {
    // SAFETY: unshare with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot create a network namespace: {}",
            io::Error::last_os_error()
        ));
    }
    child::bring_loopback_up().map_err(|e| format!("cannot bring lo up: {e}"))?;
    let rec = HolderRecord {
        pid: me,
        start_time: procfs::stat(me)
            .map(|s| s.start_time)
            .ok_or("cannot read the holder's own /proc/<pid>/stat")?,
        created_at_ms: state::now_ms(),
    };
    state::write_json(&with_suffix(base, "json"), &rec).map_err(|e| e.to_string())
}

/// The network-namespace holders of one exec root.
#[derive(Debug)]
pub(crate) struct Holders {
    pub dir: PathBuf,
}

/// An exclusive `flock` on the netns directory, released on drop.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlock of an fd we own; closing it would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Holders {
    fn record_path(&self, name: &str) -> PathBuf {
        with_suffix(&self.dir.join(name), "json")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        with_suffix(&self.dir.join(name), "log")
    }

    /// Serializes changes across threads, executors and processes.
    fn lock(&self) -> Result<Lock, String> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let path = self.dir.join(LOCK_FILE);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        loop {
            // SAFETY: flock on an open fd.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
        }
    }

    fn record(&self, name: &str) -> Option<HolderRecord> {
        state::read_json(&self.record_path(name)).ok().flatten()
    }

    /// The record of a live holder of `name`.
    pub fn live(&self, name: &str) -> Option<HolderRecord> {
        self.record(name)
            .filter(|r| procfs::is_alive(r.pid, r.start_time))
    }

    fn forget(&self, name: &str) -> Result<(), String> {
        for p in [self.record_path(name), self.log_path(name)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", p.display())),
            }
        }
        Ok(())
    }

    /// The live holder of `name`, or a new one started from `exe` in
    /// `cgroups`.
    pub fn ensure(&self, name: &str, exe: &Path, cgroups: &[PathBuf]) -> Result<u32, String> {
        let _lock = self.lock()?;
        if let Some(r) = self.live(name) {
            return Ok(r.pid);
        }
        if self.record(name).is_some() || self.record_path(name).exists() {
            tracing::info!(netns = name, "replacing the record of a dead holder");
        }
        self.forget(name)?;
        let pid = self.spawn(name, exe, cgroups)?;
        tracing::info!(netns = name, pid, "network namespace holder started");
        Ok(pid)
    }

    fn spawn(&self, name: &str, exe: &Path, cgroups: &[PathBuf]) -> Result<u32, String> {
        let log = child::open_log(&self.log_path(name)).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.arg(NETNS_HOLDER_ARG)
            .arg(self.dir.join(name))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .current_dir("/");
        child::join_cgroups_before_exec(&mut cmd, cgroups).map_err(|e| e.to_string())?;
        let spawned = cmd.spawn();
        drop(cmd);
        let mut proc = spawned.map_err(|e| {
            format!(
                "cannot run the holder {}: {}",
                exe.display(),
                child::decode_spawn_error(e, &exe.to_string_lossy())
            )
        })?;
        let lines = match proc.stdout.take() {
            Some(mut pipe) => read_report(&mut pipe, Instant::now() + HOLDER_REPORT_TIMEOUT),
            None => Ok((Vec::new(), true)),
        };
        reap(&mut proc);
        let (lines, timed_out) =
            lines.map_err(|e| format!("cannot read the holder's report: {e}"))?;
        let holder: Option<u32> = lines
            .iter()
            .find_map(|l| l.strip_prefix("holder ")?.trim().parse().ok());
        let fail = |what: String| {
            // Do not leave a half-started holder behind.
            if let Some(pid) = holder {
                procfs::signal(pid, libc::SIGKILL);
            }
            let _ = fs::remove_file(self.record_path(name));
            let tail = state::read_tail(&self.log_path(name), LOG_TAIL).unwrap_or_default();
            let tail = String::from_utf8_lossy(&tail);
            let tail = tail.trim();
            if tail.is_empty() {
                what
            } else {
                format!("{what} (holder log: {tail})")
            }
        };
        if let Some(reason) = lines.iter().find_map(|l| l.strip_prefix("err ")) {
            return Err(fail(reason.to_string()));
        }
        if !lines.iter().any(|l| l == "ok") {
            return Err(fail(if timed_out {
                format!("the holder did not report within {HOLDER_REPORT_TIMEOUT:?}")
            } else {
                "the holder exited without reporting a result".to_string()
            }));
        }
        match self.live(name) {
            Some(r) if Some(r.pid) == holder => Ok(r.pid),
            other => Err(fail(format!(
                "the holder reported success but its record is {other:?}"
            ))),
        }
    }

    /// Names and pids of the live holders; records of dead ones are removed.
    pub fn list(&self) -> Vec<(String, u32)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
            .filter(|n| spec::validate_netns_name(n).is_ok())
            .collect();
        let mut out = Vec::new();
        for name in names {
            if let Some(r) = self.live(&name) {
                out.push((name, r.pid));
                continue;
            }
            // Check again under the lock: `ensure` may be replacing it.
            let Ok(_lock) = self.lock() else { continue };
            match self.live(&name) {
                Some(r) => out.push((name, r.pid)),
                None => {
                    tracing::info!(netns = %name, "removing the record of a dead holder");
                    if let Err(e) = self.forget(&name) {
                        tracing::warn!(netns = %name, error = %e, "cannot remove a holder record");
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Kills the holder of `name` (if alive), waits until it is gone and
    /// removes its record.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        let _lock = self.lock()?;
        if let Some(r) = self.live(name) {
            procfs::signal_checked(r.pid, r.start_time, libc::SIGKILL);
            let deadline = Instant::now() + HOLDER_KILL_TIMEOUT;
            while procfs::is_alive(r.pid, r.start_time) {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "holder {} still alive {HOLDER_KILL_TIMEOUT:?} after SIGKILL",
                        r.pid
                    ));
                }
                thread::sleep(POLL);
            }
            tracing::info!(netns = name, pid = r.pid, "network namespace holder killed");
        }
        self.forget(name)
    }
}

/// Reads the holder's report lines until `ok`/`err`, EOF or `deadline`.
/// Returns the complete lines and whether the deadline passed.
fn read_report(pipe: &mut ChildStdout, deadline: Instant) -> io::Result<(Vec<String>, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let lines = |buf: &[u8]| -> Vec<String> {
        let text = String::from_utf8_lossy(buf);
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().map(str::to_string).collect()
    };
    loop {
        let got = lines(&buf);
        if got.iter().any(|l| l == "ok" || l.starts_with("err ")) {
            return Ok((got, false));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((got, true));
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
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        match pipe.read(&mut chunk) {
            Ok(0) => return Ok((lines(&buf), false)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reaps the intermediate holder process (it exits right after its fork).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_keep_dots() {
        assert_eq!(
            with_suffix(Path::new("/x/netns/ov.1"), "json"),
            PathBuf::from("/x/netns/ov.1.json")
        );
    }

    #[test]
    fn list_skips_other_files_and_forgets_dead_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = Holders {
            dir: dir.path().to_path_buf(),
        };
        let me = std::process::id();
        let alive = HolderRecord {
            pid: me,
            start_time: procfs::stat(me).expect("stat").start_time,
            created_at_ms: 1,
        };
        let dead = HolderRecord {
            start_time: alive.start_time + 1,
            ..alive.clone()
        };
        state::write_json(&h.record_path("a.1"), &alive).expect("write");
        state::write_json(&h.record_path("b"), &dead).expect("write");
        fs::write(h.log_path("b"), b"log").expect("write");
        fs::write(dir.path().join(".x.json.tmp.1"), b"{").expect("write");
        fs::write(dir.path().join("bad name.json"), b"{").expect("write");
        assert_eq!(h.list(), vec![("a.1".to_string(), me)]);
        assert!(!h.record_path("b").exists() && !h.log_path("b").exists());
        assert_eq!(h.live("a.1").map(|r| r.pid), Some(me));
        assert!(h.live("b").is_none());
        // Removing a missing holder is fine.
        h.remove("b").expect("remove missing");
    }
}
