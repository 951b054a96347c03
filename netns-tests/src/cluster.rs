//! A cluster of simulated hosts on one underlay bridge.
//!
//! Layout (all inside namespaces the harness creates; the root namespace is
//! never modified):
//!
//! ```text
//!  <p>-ul:  br0 10.99.0.1/24 ("client")  ── v1 ── v2 ── ... (bridge ports)
//!  <p>-h1:  eth0 10.99.0.11/24  (veth peer of v1)
//!  <p>-h2:  eth0 10.99.0.12/24  (veth peer of v2)
//! ```

use std::fs;
use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroups::{sweep_cgroup_subtree, CGROUP_ROOT, SWEEP_TIMEOUT};
use crate::host::{ns_exec, read_tail, Host, EXEC_TIMEOUT};
use crate::process::{describe, output_with_timeout};

/// Address of the underlay bridge in the underlay namespace (the "client").
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Prefix length of the underlay subnet 10.99.0.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Maximum number of hosts in one cluster (addresses 10.99.0.11..=.210).
pub const MAX_HOSTS: usize = 200;

/// Timeout of one `ip` command run by the harness.
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where iproute2 keeps named network namespaces.
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Maximum size of a daemon log printed on test failure.
const MAX_LOG_PRINT: u64 = 256 * 1024;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Options for [`Cluster::new`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Number of hosts (`h1`..=`h<hosts>`), at most [`MAX_HOSTS`].
    pub hosts: usize,
    /// Start meshd on every host (and wait until all are ready).
    pub start_daemons: bool,
    /// A label for diagnostics (printed with the cluster's prefix); it is not
    /// part of any name.
    pub name_hint: &'static str,
}

/// A set of simulated hosts sharing an underlay bridge. Everything it
/// created is removed on drop (daemons, namespaces, temp dirs), also when
/// the test panics.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    name_hint: &'static str,
    underlay: String,
    base_dir: PathBuf,
    hosts: Vec<Host>,
    /// Namespaces created so far, in creation order.
    namespaces: Vec<String>,
}

/// Runs `ip args...` (with a timeout); fails with ip's stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = output_with_timeout(&mut cmd, IP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new name prefix `m<pid>x<n>`, unique within the process (atomic
/// counter) and across live processes (pid).
pub(crate) fn next_prefix() -> String {
    format!(
        "m{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Picks a prefix whose temp dir we could create (an atomic claim across
/// processes) and for which no namespace exists (leftovers of a killed
/// process whose pid was reused are skipped, not touched).
fn allocate_prefix(tmp: &Path) -> Result<(String, PathBuf)> {
    reclaim_dead_leftovers(tmp);
    let existing = netns_names();
    for _ in 0..1000 {
        let prefix = next_prefix();
        let dash = format!("{prefix}-");
        if existing.iter().any(|n| n.starts_with(&dash)) {
            continue;
        }
        let dir = tmp.join(format!("mesh-test-{prefix}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((prefix, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not find a free cluster name prefix")
}

fn netns_names() -> Vec<String> {
    fs::read_dir(NETNS_RUN_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid in a cluster namespace's name (`m<pid>x<n>-<host>`).
pub(crate) fn owner_pid(ns: &str) -> Option<libc::pid_t> {
    let (prefix, _) = ns.split_once('-')?;
    let (pid, n) = prefix.strip_prefix('m')?.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes what test processes that ended without their cleanup left (a test binary killed
/// by a signal runs no `Drop`): the namespaces of clusters whose owner pid no longer exists,
/// the processes in them, their hosts' cgroup subtrees and temp dirs (kept with
/// `MESH_KEEP_LOGS`). A live pid's namespaces are never touched: its clusters may be in use
/// (or the pid was reused; they go once that process ends).
pub(crate) fn reclaim_dead_leftovers(tmp: &Path) {
    let _one_at_a_time = RECLAIM.lock().unwrap_or_else(|e| e.into_inner());
    let mut dirs = std::collections::BTreeSet::new();
    for ns in netns_names() {
        let Some(pid) = owner_pid(&ns) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if alive {
            continue;
        }
        eprintln!("mesh-netns: removing namespace {ns}, left by test process {pid} (gone)");
        best_effort(|| {
            kill_ns_processes(&ns);
            let _ = ip(&["netns", "del", &ns]);
            let _ =
                sweep_cgroup_subtree(Path::new(CGROUP_ROOT), &format!("mesh-{ns}"), SWEEP_TIMEOUT);
        });
        if let Some((prefix, _)) = ns.split_once('-') {
            dirs.insert(tmp.join(format!("mesh-test-{prefix}")));
        }
    }
    if std::env::var_os("MESH_KEEP_LOGS").is_none() {
        for d in dirs {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// Held while leftovers are reclaimed, so a test that plants a leftover (`ip netns add` is a
/// create-then-bind-mount, not atomic) is not raced by another thread's sweep.
pub(crate) static RECLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f`, swallowing any panic (for cleanup code).
fn best_effort(f: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(f));
}

impl Cluster {
    /// Creates the underlay namespace `<p>-ul` with bridge `br0`
    /// (10.99.0.1/24, up) and, per host i (1-based), namespace `<p>-h<i>`
    /// whose `eth0` (10.99.0.<10+i>/24) is a veth pair with `v<i>` on `br0`.
    /// Creates `<tmp>/mesh-test-<p>/h<i>/{data,exec}` and `h<i>/meshd.log`;
    /// starts all daemons (in parallel) if `opts.start_daemons`.
    ///
    /// On error, everything created so far is removed again.
    pub fn new(opts: ClusterOpts) -> Result<Cluster> {
        Cluster::new_in(opts, &std::env::temp_dir())
    }

    /// [`Cluster::new`] with the cluster's temp dir created under `tmp`.
    pub(crate) fn new_in(opts: ClusterOpts, tmp: &Path) -> Result<Cluster> {
        if opts.hosts > MAX_HOSTS {
            bail!("at most {MAX_HOSTS} hosts supported, got {}", opts.hosts);
        }
        let (prefix, base_dir) = allocate_prefix(tmp)?;
        let mut cluster = Cluster {
            underlay: format!("{prefix}-ul"),
            prefix,
            name_hint: opts.name_hint,
            base_dir,
            hosts: Vec::new(),
            namespaces: Vec::new(),
        };
        cluster.build(opts.hosts).with_context(|| {
            format!(
                "creating cluster {} ({})",
                cluster.prefix, cluster.name_hint
            )
        })?;
        if opts.start_daemons {
            cluster.start_all_daemons()?;
        }
        Ok(cluster)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn build(&mut self, hosts: usize) -> Result<()> {
        let ul = self.underlay.clone();
        self.add_ns(&ul)?;
        let client = format!("{CLIENT_ADDR}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "addr", "add", &client, "dev", "br0"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;

        for i in 1..=hosts {
            let ns = format!("{}-h{i}", self.prefix);
            let port = format!("v{i}");
            let addr = Ipv4Addr::new(10, 99, 0, 10 + i as u8);
            self.add_ns(&ns)?;
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &ul,
            ])?;
            ip(&["-n", &ul, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &ul, "link", "set", &port, "up"])?;
            let cidr = format!("{addr}/{UNDERLAY_PREFIX_LEN}");
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;

            let dir = self.base_dir.join(format!("h{i}"));
            let data_dir = dir.join("data");
            let exec_root = dir.join("exec");
            let log_path = dir.join("meshd.log");
            for d in [&data_dir, &exec_root] {
                fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let host = Host::new(i, ns, ul.clone(), addr, data_dir, exec_root, log_path);
            let sock = host.socket();
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                bail!(
                    "socket path {} is too long for a unix socket; use a shorter TMPDIR",
                    sock.display()
                );
            }
            self.hosts.push(host);
        }
        Ok(())
    }

    /// Starts meshd on all hosts in parallel and waits until all are ready.
    pub fn start_all_daemons(&self) -> Result<()> {
        // Build/locate once before spawning threads, for a clear error.
        crate::binaries()?;
        let errors: Vec<String> = thread::scope(|s| {
            let handles: Vec<_> = self
                .hosts
                .iter()
                .map(|h| s.spawn(move || h.start_daemon()))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("start_daemon panicked".to_string()),
                })
                .collect()
        });
        if !errors.is_empty() {
            bail!("starting daemons failed:\n{}", errors.join("\n\n"));
        }
        Ok(())
    }

    /// Host `i` (1-based, like the names). Panics if out of range.
    pub fn host(&self, i: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&i),
            "host index {i} out of range 1..={}",
            self.hosts.len()
        );
        &self.hosts[i - 1]
    }

    /// All hosts, `h1` first.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Prints, per host, the lines of its daemon's logs (every run's) that `keep` selects,
    /// the last 400 of each: for a test to show on failure what the daemons did (CI keeps
    /// only the test's output).
    pub fn print_daemon_logs(&self, keep: impl Fn(&str) -> bool) {
        for h in &self.hosts {
            let text = std::fs::read_to_string(h.log_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
            let from = lines.len().saturating_sub(400);
            let state = match h.daemon_pid() {
                Some(pid) => format!("meshd running, pid {pid}"),
                None => "meshd NOT running".to_string(),
            };
            eprintln!(
                "--- {} meshd log ({} lines selected; {state}) ---",
                h.name(),
                lines.len()
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }

    /// The underlay namespace `<p>-ul` (holds `br0` and the `v<i>` ports).
    pub fn underlay_ns(&self) -> &str {
        &self.underlay
    }

    /// The unique name prefix `<p>` of this cluster's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The `name_hint` given at creation.
    pub fn name_hint(&self) -> &'static str {
        self.name_hint
    }

    /// The temp dir holding all host dirs and logs (removed on drop unless
    /// `MESH_KEEP_LOGS` is set).
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// All namespaces of this cluster (underlay first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The client address on the underlay bridge, 10.99.0.1.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// Runs `argv` in the underlay namespace (the "client" at 10.99.0.1),
    /// killed after [`EXEC_TIMEOUT`]. A non-zero exit is not an error.
    pub fn client_exec(&self, argv: &[&str]) -> Result<Output> {
        self.client_exec_timeout(argv, EXEC_TIMEOUT)
    }

    /// Like [`Cluster::client_exec`] with an explicit timeout.
    pub fn client_exec_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        ns_exec(&self.underlay, argv, timeout)
    }

    fn print_logs(&self) {
        eprintln!(
            "mesh-netns: cluster {} ({}) dropped during panic; daemon logs follow",
            self.prefix, self.name_hint
        );
        for h in &self.hosts {
            let len = fs::metadata(h.log_path()).map(|m| m.len()).unwrap_or(0);
            if len == 0 {
                continue;
            }
            let omitted = if len > MAX_LOG_PRINT {
                format!(" (first {} bytes omitted)", len - MAX_LOG_PRINT)
            } else {
                String::new()
            };
            eprintln!(
                "===== meshd log of {} ({}){omitted} =====\n{}\n===== end of {} log =====",
                h.name(),
                h.log_path().display(),
                read_tail(h.log_path(), MAX_LOG_PRINT),
                h.name()
            );
        }
    }
}

/// SIGKILLs every process still inside namespace `ns` (e.g. servers a test
/// started with `exec`), so the namespace really goes away.
fn kill_ns_processes(ns: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", ns]);
    let Ok(out) = output_with_timeout(&mut cmd, IP_TIMEOUT) else {
        return;
    };
    let own = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != own && p > 1)
    {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: plain syscall; the pid was just listed as a member of
            // a namespace this cluster created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        // 1. Daemons.
        for h in &self.hosts {
            best_effort(|| h.kill_for_drop());
        }
        if panicking {
            best_effort(|| self.print_logs());
        }
        // 2. Namespaces, hosts before the underlay.
        for ns in self.namespaces.iter().rev() {
            best_effort(|| {
                kill_ns_processes(ns);
                if let Err(e) = ip(&["netns", "del", ns]) {
                    eprintln!("mesh-netns: cleanup: {e:#}");
                }
            });
        }
        // 3. Task cgroups (tasks died with their shims, killed above; this
        //    kills anything left and removes each host's cgroup subtree).
        for h in &self.hosts {
            best_effort(|| {
                let root = Path::new(CGROUP_ROOT);
                if let Err(e) = sweep_cgroup_subtree(root, h.cgroup_parent(), SWEEP_TIMEOUT) {
                    eprintln!("mesh-netns: cleanup: {e:#}");
                }
            });
        }
        // 4. Directories.
        best_effort(|| {
            if std::env::var_os("MESH_KEEP_LOGS").is_some() {
                eprintln!(
                    "mesh-netns: MESH_KEEP_LOGS set; logs of cluster {} ({}) kept in {}",
                    self.prefix,
                    self.name_hint,
                    self.base_dir.display()
                );
            } else if let Err(e) = fs::remove_dir_all(&self.base_dir) {
                eprintln!(
                    "mesh-netns: cleanup: removing {}: {e}",
                    self.base_dir.display()
                );
            }
        });
    }
}
