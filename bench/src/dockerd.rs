//! Real Docker Engines (Debian's `docker.io`, dockerd 20.10) on the netns hosts of a
//! [`Cluster`], for `mesh-bench swarm`: one `dockerd` per simulated host, entered with
//! `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the cgroup mounts dockerd
//! needs) and `unshare --uts` (so each node has its host's name), each with its own
//! `--data-root`, `--exec-root`, `--pidfile`, socket, containerd namespaces and cgroup parent,
//! with `--bridge=none --iptables=false` (nothing is added outside the host's namespace).
//!
//! Cleanup ([`Engines`]'s `Drop`, and [`Engines::remove_stale`] for what a killed earlier run
//! left): every process whose command line names the engines' directory (dockerd, its
//! containerd, the shims) and every process in their cgroup parents (the containers) is
//! SIGKILLed, the mounts dockerd made under the directory are unmounted, the cgroups removed and
//! the directory deleted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_netns::{output_with_timeout, Cluster};

/// The docker binaries `docker.io` installs (the `docker` first on PATH may be a newer CLI).
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";
/// Where the engines' directories live; one per run, named after the process id.
const BASE: &str = "/tmp";
const PREFIX: &str = "mesh-bench-dockerd-";
/// The cgroup v1 hierarchies (and the v2 root) the containers' cgroup parents appear in.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a docker CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a dockerd may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Installs `docker.io` with apt (`apt-get update` first) if `dockerd` is missing. Returns dockerd's version line.
pub fn ensure_installed() -> Result<String> {
    if !Path::new(DOCKERD).exists() {
        eprintln!("swarm: installing docker.io (apt-get) for the Docker side of the benchmark");
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .status()
            .context("running apt-get update")?
            .success();
        if !updated {
            bail!("apt-get update failed: docker.io cannot be installed");
        }
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "docker.io",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("running apt-get")?
            .success();
        if !ok || !Path::new(DOCKERD).exists() {
            bail!("docker.io could not be installed with apt-get");
        }
    }
    let out = Command::new(DOCKERD).arg("--version").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One dockerd per host of a cluster.
pub struct Engines {
    dir: PathBuf,
    /// The namespaces and host names, host 1 first.
    hosts: Vec<(String, String)>,
    /// The cgroup parent of all containers (`/mesh-bench-dockerd-PID`), per-host parents below.
    cgroup: String,
}

impl Engines {
    /// Starts a dockerd on every host of `c` (whose own daemons must not run) and waits until
    /// each answers.
    pub fn start(c: &Cluster) -> Result<Engines> {
        Self::remove_stale();
        let name = format!("{PREFIX}{}", std::process::id());
        let dir = Path::new(BASE).join(&name);
        fs::create_dir_all(&dir)?;
        let engines = Engines {
            dir,
            hosts: c
                .hosts()
                .iter()
                .map(|h| (h.ns().to_string(), h.name().to_string()))
                .collect(),
            cgroup: format!("/{name}"),
        };
        for i in 1..=engines.hosts.len() {
            engines.start_daemon(i)?;
        }
        for i in 1..=engines.hosts.len() {
            engines.wait_up(i)?;
        }
        Ok(engines)
    }

    fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.hosts[i - 1].1)
    }

    /// The unix socket host `i`'s dockerd listens on.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("docker.sock")
    }

    /// Starts host `i`'s dockerd (again, after [`Engines::kill_daemon`]); does not wait.
    pub fn start_daemon(&self, i: usize) -> Result<()> {
        let (ns, name) = &self.hosts[i - 1];
        let d = self.host_dir(i);
        fs::create_dir_all(&d)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))?;
        let script = format!(
            "hostname {name} && exec {DOCKERD} --data-root {dr} --exec-root {er} --pidfile {pid} \
             -H unix://{sock} --containerd-namespace {name}-{tag} \
             --containerd-plugins-namespace {name}-{tag}-p --bridge=none --iptables=false \
             --ip-masq=false --cgroup-parent={cg}/{name} --log-level=warn",
            dr = d.join("data").display(),
            er = d.join("exec").display(),
            pid = d.join("dockerd.pid").display(),
            sock = self.socket(i).display(),
            tag = std::process::id(),
            cg = self.cgroup,
        );
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "--uts", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting dockerd on {name}"))?;
        Ok(())
    }

    /// Waits until host `i`'s dockerd answers `docker version`.
    pub fn wait_up(&self, i: usize) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if self
                .docker(i, &["version", "--format", "{{.Server.Version}}"])?
                .status
                .success()
            {
                return Ok(());
            }
            if t0.elapsed() > START_TIMEOUT {
                bail!(
                    "dockerd on {} did not answer within {START_TIMEOUT:?}; its log:\n{}",
                    self.hosts[i - 1].1,
                    fs::read_to_string(self.host_dir(i).join("dockerd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of host `i`'s dockerd, from its pidfile.
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        fs::read_to_string(self.host_dir(i).join("dockerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
    }

    /// SIGKILLs host `i`'s dockerd (its containerd and containers go on, as with a crashed
    /// daemon) and waits until it is gone.
    pub fn kill_daemon(&self, i: usize) -> Result<()> {
        let Some(pid) = self.daemon_pid(i) else {
            bail!("dockerd on {} is not running", self.hosts[i - 1].1);
        };
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}/cmdline")).exists()
            && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("dockerd {pid} survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = fs::remove_file(self.host_dir(i).join("dockerd.pid"));
        Ok(())
    }

    /// `docker -H unix://SOCK ARGS` against host `i`'s engine.
    pub fn docker(&self, i: usize, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket(i).display()))
            .args(args);
        output_with_timeout(&mut cmd, CLI_TIMEOUT)
    }

    /// The pids of host `i`'s dockerd and containerd (its daemons, without the shims).
    pub fn daemon_pids(&self, i: usize) -> Vec<u32> {
        let d = self.host_dir(i);
        let dockerd = format!("--data-root\0{}", d.join("data").display());
        let containerd = format!("{}", d.join("exec").display());
        pids_where(|cmd| {
            (cmd.starts_with(DOCKERD) && cmd.contains(&dockerd))
                || (cmd.starts_with("containerd\0") && cmd.contains(&containerd))
        })
    }

    /// The pids of host `i`'s containerd shims (one per container).
    pub fn shim_pids(&self, i: usize) -> Vec<u32> {
        let sock = format!("{}", self.host_dir(i).join("exec").display());
        pids_where(|cmd| cmd.starts_with("/usr/bin/containerd-shim") && cmd.contains(&sock))
    }

    /// Kills what runs from `dir` and under `cgroup`, unmounts and removes both.
    fn clean(dir: &Path, cgroup: &str) {
        let needle = dir.display().to_string();
        for _ in 0..20 {
            let mut pids = pids_where(|cmd| cmd.contains(&needle));
            pids.extend(cgroup_pids(cgroup));
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill only sends a signal.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Deepest mounts first.
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&needle))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        remove_cgroups(cgroup);
        let _ = fs::remove_dir_all(dir);
    }

    /// Removes what an earlier run that was killed left behind (its process is gone).
    pub fn remove_stale() {
        let Ok(entries) = fs::read_dir(BASE) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!(
                "swarm: removing what an earlier run left in {}",
                e.path().display()
            );
            Self::clean(&e.path(), &format!("/{name}"));
        }
    }
}

impl Engines {
    /// Removes everything (as dropping does) and says what could not be removed.
    pub fn remove(self) -> Result<()> {
        let (dir, cgroup) = (self.dir.clone(), self.cgroup.clone());
        drop(self);
        let needle = dir.display().to_string();
        let mut left = Vec::new();
        let pids = pids_where(|cmd| cmd.contains(&needle));
        if !pids.is_empty() {
            left.push(format!("processes {pids:?}"));
        }
        let pids = cgroup_pids(&cgroup);
        if !pids.is_empty() {
            left.push(format!("container processes {pids:?}"));
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&needle)))
            .count();
        if mounts > 0 {
            left.push(format!("{mounts} mounts"));
        }
        let cgroups = cgroup_dirs(&cgroup);
        if !cgroups.is_empty() {
            left.push(format!("cgroups {cgroups:?}"));
        }
        if dir.exists() {
            left.push(format!("the directory {}", dir.display()));
        }
        if !left.is_empty() {
            bail!("the Docker engines left behind: {}", left.join(", "));
        }
        Ok(())
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        Self::clean(&self.dir, &self.cgroup);
    }
}

/// The pids whose NUL-separated command line satisfies `f`.
pub fn pids_where(f: impl Fn(&str) -> bool) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|p| *p != me)
                .filter(|p| {
                    fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| !c.is_empty() && f(&String::from_utf8_lossy(&c)))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every cgroup directory named `cgroup` (in each mounted hierarchy, or the v2 root).
fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let rel = cgroup.trim_start_matches('/');
    let root = Path::new(CGROUP_ROOT);
    let mut dirs = vec![root.join(rel)];
    if let Ok(d) = fs::read_dir(root) {
        dirs.extend(d.flatten().map(|e| e.path().join(rel)));
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

/// The pids in `cgroup` or below it, in any hierarchy.
fn cgroup_pids(cgroup: &str) -> Vec<u32> {
    fn walk(d: &Path, out: &mut Vec<u32>) {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    for d in cgroup_dirs(cgroup) {
        walk(&d, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Removes `cgroup` and everything below it, deepest first, in every hierarchy.
fn remove_cgroups(cgroup: &str) {
    fn walk(d: &Path) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(d);
    }
    for d in cgroup_dirs(cgroup) {
        walk(&d);
    }
}

/// The resident set size of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
