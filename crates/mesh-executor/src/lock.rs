//! [`ExecRootLock`]: one daemon per exec root, and a lock that dies with its daemon.
//!
//! It is a POSIX record lock (`fcntl(F_SETLK)`) on `<exec-root>/meshd.lock`, not an `flock`.
//! An `flock` belongs to the open file, and every process meshd forks shares that open file
//! until it execs (the descriptor is close-on-exec) or dies: a health check, `nft`, `ip`. A
//! daemon SIGKILLed while one of those was between its fork and its exec left the lock to
//! the child for a moment, and the daemon started right after refused to run ("another
//! meshd is running"): its node went silent and Down, its tasks orphaned (seen in CI, and
//! one restart in about ten of a daemon whose tasks are probed every 300 ms). A record lock
//! belongs to the process that took it: a fork does not inherit it, and the kernel releases
//! it while the process exits, before anyone can reap it.
//!
//! The lock holds while the process keeps the file open: closing *any* descriptor of the
//! file in this process would release it (POSIX semantics), so nothing else opens it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The exec root's lock, held until dropped or until the process ends.
#[derive(Debug)]
pub struct ExecRootLock {
    _file: File,
}

impl ExecRootLock {
    /// Takes the lock on `path` (created if missing); `Ok(None)` if another live process
    /// holds it.
    pub fn acquire(path: &Path) -> io::Result<Option<ExecRootLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: `flock` is plain old data; all-zero is a valid value, completed below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // From offset 0, length 0: the whole file.
        fl.l_start = 0;
        fl.l_len = 0;
        // SAFETY: a valid descriptor and a pointer to an initialized `flock` for the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) } == 0 {
            return Ok(Some(ExecRootLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    /// Where the helper process takes the lock (see [`lock_holder_main`]).
    const HELPER_ENV: &str = "MESH_EXECUTOR_LOCK_HELPER";

    /// Not a test: the body of a daemon-like helper process. It takes the lock, forks a
    /// child that lives on without exec'ing (as a health check between its fork and its
    /// exec), says so with the child's pid, and waits to be killed.
    #[test]
    #[ignore = "helper: run by a_killed_holder_s_forked_child_does_not_keep_the_lock"]
    fn lock_holder_main() {
        let Some(path) = std::env::var_os(HELPER_ENV) else {
            return;
        };
        let lock = ExecRootLock::acquire(Path::new(&path)).unwrap();
        assert!(lock.is_some(), "the helper could not take the lock");
        // SAFETY: the child only calls the async-signal-safe `sleep` and `_exit`.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: async-signal-safe calls in the forked child.
            unsafe {
                libc::sleep(5);
                libc::_exit(0);
            }
        }
        assert!(child > 0, "fork failed");
        println!("locked {child}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    /// The daemon killed while a child of its was between fork and exec: with an `flock`
    /// the child kept the lock and the next daemon refused to start.
    #[test]
    fn a_killed_holder_s_forked_child_does_not_keep_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.lock");
        let mut helper = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "lock::tests::lock_holder_main",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = helper.stdout.take().unwrap();
        let mut grandchild = None;
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            // (After libtest's "test ... " on the same line.)
            if let Some((_, pid)) = line.split_once("locked ") {
                grandchild = Some(pid.trim().parse::<u32>().unwrap());
                break;
            }
        }
        let grandchild = grandchild.expect("the helper never took the lock");
        // Held by a live process: refused.
        assert!(ExecRootLock::acquire(&path).unwrap().is_none());
        helper.kill().unwrap();
        helper.wait().unwrap();
        // The helper is gone, its child (which shares the helper's open lock file) is not.
        assert!(
            Path::new(&format!("/proc/{grandchild}")).exists(),
            "the forked child ended too early for this test"
        );
        assert!(
            ExecRootLock::acquire(&path).unwrap().is_some(),
            "the lock of a killed holder is kept by its forked child"
        );
    }
}
