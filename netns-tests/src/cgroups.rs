//! Cleanup of the cgroups meshd creates for its tasks.
//!
//! Each host's meshd runs with `--cgroup-parent mesh-<prefix>-h<i>`, so its
//! task cgroups live in that subtree of every hierarchy. Tasks run in their
//! own network namespaces (`ip netns pids` does not list them); killing
//! their shims kills them (PR_SET_PDEATHSIG), and this sweep is the safety
//! net: it kills whatever is left in the subtree and removes it, in every
//! hierarchy under `/sys/fs/cgroup` (the v2 root in pure v2 mode; `unified`
//! and each v1 controller directory in hybrid mode).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Where the cgroup hierarchies are mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a sweep keeps killing and retrying busy cgroups.
pub(crate) const SWEEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The hierarchies mounted under `root`: `root` itself if it is a cgroup2
/// root (pure v2), else each subdirectory that is a cgroup (symlinks such as
/// `cpu -> cpu,cpuacct` are skipped).
pub fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

/// `dir` and every directory below it, deepest first.
fn bottom_up(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        out.push(d);
    }
    out.reverse();
    out
}

/// SIGKILLs every process listed in `<dir>/cgroup.procs`.
fn kill_procs(dir: &Path) {
    let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    let own = std::process::id();
    for pid in text
        .split_ascii_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != own && p > 1)
    {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: plain syscall; the pid was just listed in a cgroup of
            // this cluster's subtree.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills every process in `<h>/<parent>` (sub-cgroups included) and removes
/// those cgroups bottom-up, in every hierarchy under `root`; retries while
/// cgroups are busy, at most `timeout`. A missing subtree is fine.
pub(crate) fn sweep_cgroup_subtree(root: &Path, parent: &str, timeout: Duration) -> Result<()> {
    if parent.is_empty()
        || parent.starts_with('/')
        || parent
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        bail!("refusing to sweep cgroup parent {parent:?}");
    }
    let tops: Vec<PathBuf> = hierarchies(root)
        .into_iter()
        .map(|h| h.join(parent))
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let mut last: Option<(PathBuf, io::Error)> = None;
        for top in tops.iter().filter(|t| t.exists()) {
            for dir in bottom_up(top) {
                kill_procs(&dir);
                match fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => last = Some((dir, e)),
                }
            }
        }
        let Some((dir, err)) = last else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            bail!(
                "cannot remove cgroup {} within {timeout:?}: {err}",
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    use crate::process::wait_timeout;
    use crate::require_root;

    #[test]
    fn refuses_dangerous_parents() {
        for bad in ["", "/", "/x", "a/../..", "a//b", ".."] {
            assert!(
                sweep_cgroup_subtree(Path::new("/nonexistent"), bad, Duration::ZERO).is_err(),
                "{bad:?}"
            );
        }
        sweep_cgroup_subtree(Path::new("/nonexistent"), "mesh-x-h1", Duration::ZERO).unwrap();
    }

    #[test]
    fn sweep_kills_and_removes_a_cgroup_tree() {
        if !require_root().unwrap() {
            return;
        }
        let root = Path::new(CGROUP_ROOT);
        let hs = hierarchies(root);
        assert!(!hs.is_empty(), "no cgroup hierarchy under {CGROUP_ROOT}");
        let parent = format!("mesh-sweep-test-{}", std::process::id());
        let mut child = Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        for h in &hs {
            fs::create_dir_all(h.join(&parent).join("task/sub")).unwrap();
        }
        // The sleeping process sits in a leaf of every hierarchy that takes
        // it (a fresh v1 cpuset cgroup has no cpus and refuses it).
        let joined = hs
            .iter()
            .filter(|h| {
                let procs = h.join(&parent).join("task/sub/cgroup.procs");
                fs::write(procs, child.id().to_string()).is_ok()
            })
            .count();
        assert!(joined > 0, "the process joined no cgroup");
        let res = sweep_cgroup_subtree(root, &parent, SWEEP_TIMEOUT);
        let status = wait_timeout(&mut child, Duration::from_secs(5)).unwrap();
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        res.unwrap();
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
        for h in &hs {
            assert!(!h.join(&parent).exists(), "{} left", h.display());
        }
        // Sweeping again is a no-op.
        sweep_cgroup_subtree(root, &parent, SWEEP_TIMEOUT).unwrap();
    }
}
