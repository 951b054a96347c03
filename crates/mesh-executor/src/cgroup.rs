//! cgroups: layout detection, mounting, and task cgroups.
//!
//! Two layouts are supported. *Unified* (pure v2): one hierarchy whose root
//! has `cpu` and `memory` in `cgroup.controllers`; a task gets
//! `<root>/<parent>/<task>` with `cpu.max` and `memory.max`, controllers
//! enabled through `cgroup.subtree_control` on the way down. *Hybrid*: a v2
//! hierarchy without those controllers (the task still gets a v2 cgroup, for
//! cgroup BPF programs), plus the v1 hierarchies of `cpu`, `cpuacct`,
//! `memory` and `pids` (`cpu.cfs_period_us`/`cpu.cfs_quota_us`,
//! `memory.limit_in_bytes`), each with `<parent>/<task>`.
//!
//! Hierarchies are found in `/proc/self/mountinfo`; which v1 controllers are
//! mounted together comes from `/proc/cgroups` (same hierarchy id). A
//! hierarchy that is not mounted in our mount namespace (meshd started by
//! `ip netns exec`, which mounts a fresh `/sys`) is mounted under a base
//! directory (`<exec_root>/cgroup/unified` for v2, `<exec_root>/cgroup/<c1,c2>`
//! for v1); since mountinfo is consulted first, this is idempotent.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::procfs;

/// `cpu.max` / `cpu.cfs_period_us` period in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel accepts, in microseconds.
pub const MIN_CPU_QUOTA_US: u64 = 1_000;
/// Controllers a task uses (each v1 hierarchy holding one is joined).
const WANTED: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];
/// Controllers enabled for task cgroups in a v2 hierarchy (when present).
const V2_ENABLE: [&str; 3] = ["cpu", "memory", "pids"];
/// Pause between attempts when removing busy cgroups.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Errors of cgroup detection and management.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup or proc file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A cgroup file could not be written.
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    /// A hierarchy could not be mounted.
    #[error("cannot mount {fstype} ({options}) on {}: {source}", path.display())]
    Mount {
        fstype: &'static str,
        options: String,
        path: PathBuf,
        source: io::Error,
    },
    /// A limit was asked for but no hierarchy has the controller.
    #[error("no cgroup hierarchy has the {controller} controller")]
    MissingController { controller: &'static str },
    /// A cgroup directory could not be removed in time.
    #[error("cannot remove cgroup {}: {reason}", path.display())]
    Remove { path: PathBuf, reason: String },
}

/// The detected layout kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Pure cgroup v2: one hierarchy with all controllers.
    Unified,
    /// A v2 hierarchy (for BPF) plus v1 hierarchies for the controllers.
    Hybrid,
}

/// A v1 hierarchy a task joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// The controllers mounted together in it (as in `/proc/cgroups`).
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub path: PathBuf,
}

/// What [`CgroupLayout::detect`] found (or mounted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLayout {
    mode: CgroupMode,
    v2_root: PathBuf,
    v2_controllers: Vec<String>,
    v1: Vec<V1Hierarchy>,
    mounted: Vec<PathBuf>,
}

/// Where a controller lives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Loc {
    V2,
    V1(PathBuf),
}

/// One line of `/proc/self/mountinfo` (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_opts: Vec<String>,
}

/// One line of `/proc/cgroups`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcCgroup {
    pub name: String,
    pub hierarchy: u32,
    pub enabled: bool,
}

/// A hierarchy the layout needs and where it is (or will be) mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Needed {
    /// `None` for the v2 hierarchy, the controller set for v1.
    pub controllers: Option<Vec<String>>,
    /// An existing mount, if any.
    pub existing: Option<PathBuf>,
    /// Where to mount it if there is none.
    pub target: PathBuf,
}

/// Decodes the octal escapes (`\040` etc.) of mountinfo fields.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Parses `/proc/self/mountinfo`; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 4 {
            continue;
        }
        out.push(MountEntry {
            root: unescape(fields[3]).to_string_lossy().into_owned(),
            mount_point: unescape(fields[4]),
            fstype: fields[sep + 1].to_string(),
            super_opts: fields[sep + 3].split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// Parses `/proc/cgroups`.
pub(crate) fn parse_proc_cgroups(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let name = f.next()?.to_string();
            let hierarchy = f.next()?.parse().ok()?;
            let _num = f.next()?;
            let enabled = f.next()? == "1";
            Some(ProcCgroup {
                name,
                hierarchy,
                enabled,
            })
        })
        .collect()
}

/// Picks a mount among candidates, preferring one of the hierarchy's root.
fn pick<'a>(mut candidates: impl Iterator<Item = &'a MountEntry> + Clone) -> Option<PathBuf> {
    candidates
        .clone()
        .find(|m| m.root == "/")
        .or_else(|| candidates.next())
        .map(|m| m.mount_point.clone())
}

/// Decides which hierarchies are needed and which are already mounted.
/// The v2 hierarchy comes first.
pub(crate) fn plan(mounts: &[MountEntry], cgroups: &[ProcCgroup], base: &Path) -> Vec<Needed> {
    let mut out = vec![Needed {
        controllers: None,
        existing: pick(mounts.iter().filter(|m| m.fstype == "cgroup2")),
        target: base.join("unified"),
    }];
    let mut seen = BTreeSet::new();
    for want in WANTED {
        let Some(c) = cgroups
            .iter()
            .find(|c| c.name == want && c.enabled && c.hierarchy != 0)
        else {
            continue;
        };
        if !seen.insert(c.hierarchy) {
            continue;
        }
        let set: Vec<String> = cgroups
            .iter()
            .filter(|o| o.hierarchy == c.hierarchy && o.enabled)
            .map(|o| o.name.clone())
            .collect();
        let existing = pick(mounts.iter().filter(|m| {
            m.fstype == "cgroup" && set.iter().all(|s| m.super_opts.iter().any(|o| o == s))
        }));
        out.push(Needed {
            target: base.join(set.join(",")),
            controllers: Some(set),
            existing,
        });
    }
    out
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` to an existing cgroup file (no create, no truncate).
pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let res = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    res.map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn mount_hierarchy(needed: &Needed) -> Result<PathBuf, CgroupError> {
    let path = needed.target.clone();
    let (fstype, options) = match &needed.controllers {
        None => ("cgroup2", String::new()),
        Some(set) => ("cgroup", set.join(",")),
    };
    let err = |source| CgroupError::Mount {
        fstype,
        options: options.clone(),
        path: path.clone(),
        source,
    };
    fs::create_dir_all(&path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| err(io::Error::other(e)))?;
    let fs_c = CString::new(fstype).map_err(|e| err(io::Error::other(e)))?;
    let opts_c = CString::new(options.as_str()).map_err(|e| err(io::Error::other(e)))?;
    let data = if options.is_empty() {
        std::ptr::null()
    } else {
        opts_c.as_ptr().cast::<libc::c_void>()
    };
    // SAFETY: all pointers are NUL-terminated strings (or null data) that
    // outlive the call.
    let rc = unsafe {
        libc::mount(
            fs_c.as_ptr(),
            target.as_ptr(),
            fs_c.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    tracing::info!(path = %path.display(), fstype, options, "mounted cgroup hierarchy");
    Ok(path)
}

impl CgroupLayout {
    /// Detects the layout from `/proc/self/mountinfo` and `/proc/cgroups`,
    /// mounting missing hierarchies under `mount_base`.
    pub fn detect(mount_base: &Path) -> Result<CgroupLayout, CgroupError> {
        let mountinfo = read_file(Path::new("/proc/self/mountinfo"))?;
        // Kernels built without cgroup v1 have no /proc/cgroups: no v1
        // hierarchies then.
        let proc_cgroups = match fs::read_to_string("/proc/cgroups") {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(CgroupError::Read {
                    path: PathBuf::from("/proc/cgroups"),
                    source,
                })
            }
        };
        let needed = plan(
            &parse_mountinfo(&mountinfo),
            &parse_proc_cgroups(&proc_cgroups),
            mount_base,
        );
        let mut mounted = Vec::new();
        let mut v2_root = None;
        let mut v1 = Vec::new();
        for n in &needed {
            let path = match &n.existing {
                Some(p) => p.clone(),
                None => {
                    let p = mount_hierarchy(n)?;
                    mounted.push(p.clone());
                    p
                }
            };
            match &n.controllers {
                None => v2_root = Some(path),
                Some(set) => v1.push(V1Hierarchy {
                    controllers: set.clone(),
                    path,
                }),
            }
        }
        let v2_root = v2_root.unwrap_or_else(|| mount_base.join("unified"));
        let v2_controllers: Vec<String> = read_file(&v2_root.join("cgroup.controllers"))?
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        let mode = if v1.is_empty() {
            CgroupMode::Unified
        } else {
            CgroupMode::Hybrid
        };
        Ok(CgroupLayout {
            mode,
            v2_root,
            v2_controllers,
            v1,
            mounted,
        })
    }

    /// Unified (pure v2) or hybrid.
    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// Mount point of the v2 hierarchy.
    pub fn v2_root(&self) -> &Path {
        &self.v2_root
    }

    /// Controllers available in the v2 hierarchy (`cgroup.controllers`).
    pub fn v2_controllers(&self) -> &[String] {
        &self.v2_controllers
    }

    /// The v1 hierarchies tasks join (empty in unified mode).
    pub fn v1_hierarchies(&self) -> &[V1Hierarchy] {
        &self.v1
    }

    /// Hierarchies this detection mounted (empty when all were visible).
    pub fn mounted(&self) -> &[PathBuf] {
        &self.mounted
    }

    /// The task's v2 cgroup, `<v2 root>/<parent>/<task>` (for cgroup BPF).
    pub fn v2_task_path(&self, parent: &str, task: &str) -> PathBuf {
        self.v2_root.join(parent).join(task)
    }

    /// Hierarchy roots: v2 first, then v1.
    fn roots(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.v2_root.as_path()).chain(self.v1.iter().map(|h| h.path.as_path()))
    }

    /// `<root>/<parent>` in every hierarchy, v2 first.
    pub fn parent_paths(&self, parent: &str) -> Vec<PathBuf> {
        self.roots().map(|r| r.join(parent)).collect()
    }

    /// The task's cgroup in every hierarchy, v2 first.
    pub fn task_paths(&self, parent: &str, task: &str) -> Vec<PathBuf> {
        self.roots().map(|r| r.join(parent).join(task)).collect()
    }

    /// The directory of `controller` for a task, if any hierarchy has it.
    fn controller(&self, controller: &str) -> Option<Loc> {
        if let Some(h) = self
            .v1
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
        {
            return Some(Loc::V1(h.path.clone()));
        }
        self.v2_controllers
            .iter()
            .any(|c| c == controller)
            .then_some(Loc::V2)
    }

    /// Creates `<parent>` in every hierarchy; in v2, enables the task
    /// controllers in `cgroup.subtree_control` from the root down to it.
    pub fn create_parent(&self, parent: &str) -> Result<(), CgroupError> {
        let enable: Vec<&str> = V2_ENABLE
            .iter()
            .copied()
            .filter(|c| self.v2_controllers.iter().any(|v| v == c))
            .collect();
        let mut cur = self.v2_root.clone();
        for seg in parent.split('/') {
            enable_controllers(&cur, &enable)?;
            cur.push(seg);
            mkdir(&cur)?;
        }
        enable_controllers(&cur, &enable)?;
        for h in &self.v1 {
            let p = h.path.join(parent);
            fs::create_dir_all(&p).map_err(|source| CgroupError::Create { path: p, source })?;
        }
        Ok(())
    }

    /// Creates the task's cgroups and writes its limits; returns what the
    /// task joins. On error nothing is left behind.
    pub(crate) fn create_task(
        &self,
        parent: &str,
        task: &str,
        nano_cpus: u64,
        memory_bytes: u64,
    ) -> Result<crate::state::Launch, CgroupError> {
        self.create_parent(parent)?;
        let dirs = self.task_paths(parent, task);
        let res = (|| {
            for d in &dirs {
                mkdir(d)?;
            }
            self.write_limits(parent, task, nano_cpus, memory_bytes)
        })();
        if let Err(e) = res {
            let _ = remove_trees(&dirs, Duration::from_secs(2));
            return Err(e);
        }
        Ok(crate::state::Launch { cgroups: dirs })
    }

    /// Creates `<parent>/<name>` in every hierarchy (no limits) and returns
    /// the directories, v2 first. Idempotent; unlike task cgroups, nothing is
    /// rolled back on error (the cgroup may already hold processes).
    pub(crate) fn create_leaf(
        &self,
        parent: &str,
        name: &str,
    ) -> Result<Vec<PathBuf>, CgroupError> {
        self.create_parent(parent)?;
        let dirs = self.task_paths(parent, name);
        for d in &dirs {
            mkdir(d)?;
        }
        Ok(dirs)
    }

    fn write_limits(
        &self,
        parent: &str,
        task: &str,
        nano_cpus: u64,
        memory_bytes: u64,
    ) -> Result<(), CgroupError> {
        if nano_cpus > 0 {
            let quota = cpu_quota_us(nano_cpus);
            match self.controller("cpu") {
                Some(Loc::V2) => write_file(
                    &self.v2_task_path(parent, task).join("cpu.max"),
                    &format!("{quota} {CPU_PERIOD_US}"),
                )?,
                Some(Loc::V1(root)) => {
                    let dir = root.join(parent).join(task);
                    write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                None => return Err(CgroupError::MissingController { controller: "cpu" }),
            }
        }
        if memory_bytes > 0 {
            let value = memory_bytes.to_string();
            match self.controller("memory") {
                Some(Loc::V2) => {
                    write_file(&self.v2_task_path(parent, task).join("memory.max"), &value)?
                }
                Some(Loc::V1(root)) => write_file(
                    &root.join(parent).join(task).join("memory.limit_in_bytes"),
                    &value,
                )?,
                None => {
                    return Err(CgroupError::MissingController {
                        controller: "memory",
                    })
                }
            }
        }
        Ok(())
    }

    /// Every process in the task's cgroups (all hierarchies, sub-cgroups
    /// included), sorted.
    pub fn task_pids(&self, parent: &str, task: &str) -> Vec<u32> {
        pids_in(&self.task_paths(parent, task))
    }

    /// Sends `sig` to every process in the task's cgroups; for SIGKILL the
    /// v2 `cgroup.kill` is used as well when the kernel has it.
    pub fn signal_task(&self, parent: &str, task: &str, sig: libc::c_int) {
        let dirs = self.task_paths(parent, task);
        if sig == libc::SIGKILL {
            kill_dirs(&dirs);
        } else {
            for pid in pids_in(&dirs) {
                procfs::signal(pid, sig);
            }
        }
    }

    /// Kills whatever is left in the task's cgroups and removes them,
    /// retrying while they are busy (at most `timeout`).
    pub fn remove_task(
        &self,
        parent: &str,
        task: &str,
        timeout: Duration,
    ) -> Result<(), CgroupError> {
        remove_trees(&self.task_paths(parent, task), timeout)
    }

    /// Kills every process under `<parent>` and removes the whole subtree
    /// in every hierarchy (then empty ancestors of `<parent>`, best effort).
    pub fn remove_parent(&self, parent: &str, timeout: Duration) -> Result<(), CgroupError> {
        let res = remove_trees(&self.parent_paths(parent), timeout);
        for root in self.roots() {
            let mut p = Path::new(parent).parent();
            while let Some(anc) = p.filter(|a| !a.as_os_str().is_empty()) {
                if fs::remove_dir(root.join(anc)).is_err() {
                    break;
                }
                p = anc.parent();
            }
        }
        res
    }
}

/// The CFS quota for `nano_cpus`, in microseconds per [`CPU_PERIOD_US`].
pub fn cpu_quota_us(nano_cpus: u64) -> u64 {
    let q = u128::from(nano_cpus) * u128::from(CPU_PERIOD_US) / 1_000_000_000;
    u64::try_from(q).unwrap_or(u64::MAX).max(MIN_CPU_QUOTA_US)
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Enables `controllers` in `<dir>/cgroup.subtree_control` (those not yet
/// enabled). Best effort: a controller that cannot be enabled (e.g. the
/// cgroup has processes of its own) is logged; a task asking for its limit
/// then fails to start with the missing file named.
fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<(), CgroupError> {
    if controllers.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    let current = read_file(&file)?;
    for c in controllers {
        if current.split_ascii_whitespace().any(|x| x == *c) {
            continue;
        }
        if let Err(e) = write_file(&file, &format!("+{c}")) {
            tracing::warn!(error = %e, "cannot enable a cgroup controller for tasks");
        }
    }
    Ok(())
}

/// `dir` and every cgroup below it, deepest first.
fn subtree_bottom_up(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    // Parents were pushed before their children: reverse for bottom-up.
    out.reverse();
    out
}

/// Every pid in `cgroup.procs` of the given cgroups and their
/// sub-cgroups, sorted and deduplicated.
pub(crate) fn pids_in(dirs: &[PathBuf]) -> Vec<u32> {
    let mut pids = BTreeSet::new();
    for dir in dirs {
        for d in subtree_bottom_up(dir) {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(
                    text.split_ascii_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    pids.into_iter().collect()
}

/// SIGKILLs everything in the given cgroups: `cgroup.kill` where the
/// kernel has it, and every listed pid.
pub(crate) fn kill_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            let _ = write_file(&kill, "1");
        }
    }
    for pid in pids_in(dirs) {
        procfs::signal(pid, libc::SIGKILL);
    }
}

/// Kills everything in, and removes, each cgroup subtree; retries until
/// `timeout` while cgroups are busy. Missing directories are fine.
pub(crate) fn remove_trees(dirs: &[PathBuf], timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut last: Option<(PathBuf, io::Error)> = None;
        for dir in dirs {
            if !dir.exists() {
                continue;
            }
            for d in subtree_bottom_up(dir) {
                kill_dirs(std::slice::from_ref(&d));
                match fs::remove_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => last = Some((d, e)),
                }
            }
        }
        let Some((path, err)) = last else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(CgroupError::Remove {
                path,
                reason: format!("{err} (still busy after {timeout:?})"),
            });
        }
        thread::sleep(RETRY_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const HYBRID_CGROUPS: &str = "\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
cpuacct\t2\t1\t1
memory\t4\t25\t1
pids\t8\t1\t1
hugetlb\t0\t1\t1
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(
            "41 31 0:38 / /a\\040b rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate\nbad line\n",
        );
        assert_eq!(
            m,
            vec![MountEntry {
                root: "/".into(),
                mount_point: PathBuf::from("/a b"),
                fstype: "cgroup2".into(),
                super_opts: vec!["rw".into(), "nsdelegate".into()],
            }]
        );
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("/x\\134y\\011"), PathBuf::from("/x\\y\t"));
        assert_eq!(unescape("/trailing\\"), PathBuf::from("/trailing\\"));
        assert_eq!(unescape("\\9zz"), PathBuf::from("\\9zz"));
    }

    #[test]
    fn plans_hybrid() {
        let base = Path::new("/x/cgroup");
        let p = plan(
            &parse_mountinfo(HYBRID_MOUNTINFO),
            &parse_proc_cgroups(HYBRID_CGROUPS),
            base,
        );
        let got: Vec<_> = p
            .iter()
            .map(|n| (n.controllers.clone(), n.existing.clone()))
            .collect();
        let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let e = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            got,
            vec![
                (None, e("/sys/fs/cgroup/unified")),
                (v(&["cpu"]), e("/sys/fs/cgroup/cpu")),
                (v(&["cpuacct"]), e("/sys/fs/cgroup/cpuacct")),
                (v(&["memory"]), e("/sys/fs/cgroup/memory")),
                (v(&["pids"]), e("/sys/fs/cgroup/pids")),
            ]
        );
    }

    #[test]
    fn plans_mounts_when_nothing_is_visible() {
        let cg =
            "cpu\t2\t1\t1\ncpuacct\t2\t1\t1\nmemory\t4\t1\t1\npids\t0\t1\t1\nnet_cls\t2\t1\t1\n";
        let p = plan(&[], &parse_proc_cgroups(cg), Path::new("/e/cgroup"));
        let got: Vec<_> = p
            .iter()
            .map(|n| (n.controllers.clone(), n.existing.clone(), n.target.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, None, PathBuf::from("/e/cgroup/unified")),
                (
                    Some(vec!["cpu".into(), "cpuacct".into(), "net_cls".into()]),
                    None,
                    PathBuf::from("/e/cgroup/cpu,cpuacct,net_cls")
                ),
                (
                    Some(vec!["memory".into()]),
                    None,
                    PathBuf::from("/e/cgroup/memory")
                ),
            ]
        );
    }

    #[test]
    fn plans_unified() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = "cpu\t0\t1\t1\nmemory\t0\t1\t1\npids\t0\t1\t1\n";
        let p = plan(
            &parse_mountinfo(mi),
            &parse_proc_cgroups(cg),
            Path::new("/e"),
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].existing, Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn prefers_root_mounts() {
        let mi = "\
1 0 0:1 /sub /bind rw - cgroup cgroup rw,memory
2 0 0:1 / /real rw - cgroup cgroup rw,memory
";
        let cg = "memory\t4\t1\t1\n";
        let p = plan(
            &parse_mountinfo(mi),
            &parse_proc_cgroups(cg),
            Path::new("/e"),
        );
        assert_eq!(p[1].existing, Some(PathBuf::from("/real")));
    }

    #[test]
    fn quota() {
        assert_eq!(cpu_quota_us(500_000_000), 50_000);
        assert_eq!(cpu_quota_us(2_000_000_000), 200_000);
        assert_eq!(cpu_quota_us(1), MIN_CPU_QUOTA_US);
        assert_eq!(cpu_quota_us(u64::MAX), 1_844_674_407_370_955);
    }

    #[test]
    fn subtree_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("p");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::create_dir_all(root.join("c")).expect("mkdir");
        let order = subtree_bottom_up(&root);
        let pos = |p: &Path| order.iter().position(|x| x == p).expect("present");
        assert!(pos(&root.join("a/b")) < pos(&root.join("a")));
        assert!(pos(&root.join("a")) < pos(&root));
        assert!(pos(&root.join("c")) < pos(&root));
        assert_eq!(order.len(), 4);
        // Plain directories (no cgroup files) are removed as well.
        remove_trees(std::slice::from_ref(&root), Duration::from_secs(1)).expect("remove");
        assert!(!root.exists());
    }
}
