//! One simulated host: a network namespace with its own `meshd`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::binaries::binaries;
use crate::cluster::ip;
use crate::process::{describe, kill_and_reap, output_with_timeout, status_code, wait_timeout};

/// How long `start_daemon` waits for the daemon's socket to accept connections.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop_daemon` waits after SIGTERM before sending SIGKILL.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one `mesh` CLI call.
pub const MESH_CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of [`Host::exec`] and [`crate::Cluster::client_exec`]; use
/// [`Host::exec_timeout`] for longer commands.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// The marker line written to the log file before each daemon start.
pub const START_MARKER: &str = "==== meshd start ====";

/// Output of one `mesh` CLI call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshOutput {
    /// Exit code; 128 + signal number if the CLI was killed by a signal.
    pub status: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl MeshOutput {
    /// True if the exit status is 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// The daemon process of a host, guarded by a mutex.
#[derive(Debug, Default)]
struct DaemonState {
    /// The current (or last) daemon process; `ip netns exec` execs meshd,
    /// so this is meshd itself.
    child: Option<Child>,
    /// Binary and extra arguments of the last start, reused by
    /// `restart_daemon`.
    last_start: Option<(PathBuf, Vec<String>)>,
}

/// A simulated host: network namespace `<prefix>-h<i>` with `eth0` on the
/// underlay bridge, its own directories, and (optionally) a running `meshd`.
///
/// Created by [`crate::Cluster::new`]; all methods take `&self`, so hosts can
/// be driven from several threads.
#[derive(Debug)]
pub struct Host {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) ns: String,
    pub(crate) underlay_ns: String,
    pub(crate) addr: Ipv4Addr,
    pub(crate) data_dir: PathBuf,
    pub(crate) exec_root: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) cgroup_parent: String,
    daemon: Mutex<DaemonState>,
}

impl Host {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        ns: String,
        underlay_ns: String,
        addr: Ipv4Addr,
        data_dir: PathBuf,
        exec_root: PathBuf,
        log_path: PathBuf,
    ) -> Host {
        let cgroup_parent = format!("mesh-{ns}");
        Host {
            index,
            name: format!("h{index}"),
            ns,
            underlay_ns,
            addr,
            data_dir,
            exec_root,
            log_path,
            cgroup_parent,
            daemon: Mutex::new(DaemonState::default()),
        }
    }

    /// The node name, `h<i>` (passed to meshd as `--node-name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 1-based index of the host in its cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The network namespace name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The underlay address of `eth0`, `10.99.0.<10+i>`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The daemon's `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The daemon's `--exec-root`.
    pub fn exec_root(&self) -> &Path {
        &self.exec_root
    }

    /// The daemon's API socket, `<exec_root>/meshd.sock`.
    pub fn socket(&self) -> PathBuf {
        self.exec_root.join("meshd.sock")
    }

    /// The daemon log file (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The daemon's `--cgroup-parent`, `mesh-<prefix>-h<i>` (unique per
    /// host; removed in every hierarchy when the cluster is dropped).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The processes of task `id` on this host: those in its cgroup, in any hierarchy.
    pub fn task_pids(&self, id: &str) -> Vec<i32> {
        let pids: std::collections::BTreeSet<i32> =
            crate::cgroup_hierarchies(Path::new("/sys/fs/cgroup"))
                .into_iter()
                .filter_map(|hier| {
                    std::fs::read_to_string(
                        hier.join(&self.cgroup_parent).join(id).join("cgroup.procs"),
                    )
                    .ok()
                })
                .flat_map(|t| {
                    t.split_ascii_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect();
        pids.into_iter().collect()
    }

    /// The task cgroups under this host's cgroup parent, as `<hierarchy>/<task id>` (the
    /// namespace holders' `netns` is not a task's).
    pub fn task_cgroups(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for hier in crate::cgroup_hierarchies(Path::new("/sys/fs/cgroup")) {
            let Ok(rd) = std::fs::read_dir(hier.join(&self.cgroup_parent)) else {
                continue;
            };
            let name = hier
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for e in rd.flatten() {
                let task = e.file_name().to_string_lossy().into_owned();
                if e.file_type().is_ok_and(|t| t.is_dir()) && task != "netns" {
                    out.insert(format!("{name}/{task}"));
                }
            }
        }
        out
    }

    /// The network namespaces this host's daemon holds, by name (`ingress_sbox`, `ov-<vni>`),
    /// with their holders' pids, from the records in `EXEC_ROOT/netns/`.
    pub fn held_namespaces(&self) -> std::collections::BTreeMap<String, u32> {
        let Ok(rd) = std::fs::read_dir(self.exec_root.join("netns")) else {
            return Default::default();
        };
        rd.flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_stem()?.to_string_lossy().into_owned();
                (path.extension()? == "json").then_some(())?;
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                Some((name, u32::try_from(v["pid"].as_u64()?).ok()?))
            })
            .collect()
    }

    /// The name of this host's cable end (`v<i>`) in the underlay namespace.
    pub fn underlay_port(&self) -> String {
        format!("v{}", self.index)
    }

    fn state(&self) -> MutexGuard<'_, DaemonState> {
        self.daemon.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts meshd in the namespace: `ip netns exec <ns> <meshd> --node-name
    /// h<i> --data-dir D --exec-root E --cgroup-parent mesh-<ns> --log-level
    /// debug`, output appended to [`Host::log_path`], and waits (max
    /// [`DAEMON_READY_TIMEOUT`]) until the API socket accepts connections.
    pub fn start_daemon(&self) -> Result<()> {
        self.start_daemon_with(&[])
    }

    /// Like [`Host::start_daemon`], with `extra_args` appended to meshd's
    /// command line. The extra args are remembered for
    /// [`Host::restart_daemon`]. Fails if the daemon is already running, if
    /// it exits before it is ready, or if it is not ready in time (it is
    /// killed then); errors include the tail of the log.
    pub fn start_daemon_with(&self, extra_args: &[&str]) -> Result<()> {
        let bins = binaries()?;
        let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        self.start_daemon_bin(&bins.meshd, extra)
    }

    /// Starts `meshd` (any binary with meshd's command line) and waits until
    /// it is ready.
    pub(crate) fn start_daemon_bin(&self, meshd: &Path, extra_args: Vec<String>) -> Result<()> {
        let pid = self.spawn_daemon(meshd, extra_args)?;
        let socket = self.socket();
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            {
                let mut st = self.state();
                let child = match st.child.as_mut() {
                    Some(c) if c.id() == pid => c,
                    _ => bail!(
                        "{}: meshd (pid {pid}) was stopped while starting{}",
                        self.name,
                        self.log_tail_msg()
                    ),
                };
                if let Some(status) = child.try_wait()? {
                    // Reported here, not again at cleanup.
                    st.child = None;
                    bail!(
                        "{}: meshd exited before becoming ready ({status}){}",
                        self.name,
                        self.log_tail_msg()
                    );
                }
            }
            if socket.exists() && answers(&socket) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut st = self.state();
                if let Some(mut child) = st.child.take() {
                    let _ = kill_and_reap(&mut child);
                }
                drop(st);
                self.log_marker("meshd killed: not ready in time");
                bail!(
                    "{}: meshd not ready within {DAEMON_READY_TIMEOUT:?} (socket {}); killed it{}",
                    self.name,
                    socket.display(),
                    self.log_tail_msg()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns the daemon process (no readiness wait); returns its pid.
    fn spawn_daemon(&self, meshd: &Path, extra_args: Vec<String>) -> Result<u32> {
        let mut st = self.state();
        if let Some(child) = st.child.as_mut() {
            if child.try_wait()?.is_none() {
                bail!(
                    "{}: meshd is already running (pid {})",
                    self.name,
                    child.id()
                );
            }
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(meshd)
            .args(["--node-name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .arg("--exec-root")
            .arg(&self.exec_root)
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(["--log-level", "debug"])
            .args(&extra_args);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        let mut log = self.open_log()?;
        writeln!(log, "{START_MARKER}\n# {}", describe(&cmd))?;
        let log_err = log.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd
            .spawn()
            .with_context(|| format!("{}: spawning `{}`", self.name, describe(&cmd)))?;
        let pid = child.id();
        st.child = Some(child);
        st.last_start = Some((meshd.to_path_buf(), extra_args));
        Ok(pid)
    }

    fn open_log(&self) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))
    }

    /// Appends `==== <what> ====` to the log (best effort).
    fn log_marker(&self, what: &str) {
        if let Ok(mut log) = self.open_log() {
            let _ = writeln!(log, "==== {what} ====");
        }
    }

    fn log_reaped(&self, how: &str, status: ExitStatus) {
        self.log_marker(&format!("meshd {how}: {status}"));
    }

    /// SIGKILLs the daemon and waits for it. No-op if it is not running.
    pub fn kill_daemon(&self) -> Result<()> {
        let mut st = self.state();
        let Some(child) = st.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            st.child = None;
            return Ok(());
        }
        let status = kill_and_reap(child)?;
        st.child = None;
        drop(st);
        self.log_reaped("killed (SIGKILL)", status);
        Ok(())
    }

    /// Stops the daemon gracefully: SIGTERM, wait up to
    /// [`DAEMON_STOP_TIMEOUT`], then SIGKILL. No-op if it is not running.
    pub fn stop_daemon(&self) -> Result<()> {
        let mut st = self.state();
        let Some(child) = st.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            st.child = None;
            return Ok(());
        }
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: plain syscall. The child is not reaped yet (try_wait returned
        // None above and we hold the lock), so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (how, status) = match wait_timeout(child, DAEMON_STOP_TIMEOUT)? {
            Some(status) => ("stopped (SIGTERM)", status),
            None => ("did not stop on SIGTERM, killed", kill_and_reap(child)?),
        };
        st.child = None;
        drop(st);
        self.log_reaped(how, status);
        Ok(())
    }

    /// [`Host::stop_daemon`] followed by a start with the same binary and
    /// extra args as the previous start (a plain start if there was none).
    pub fn restart_daemon(&self) -> Result<()> {
        self.stop_daemon()?;
        let last = self.state().last_start.clone();
        match last {
            Some((meshd, extra)) => self.start_daemon_bin(&meshd, extra),
            None => self.start_daemon(),
        }
    }

    /// True if the daemon process is alive.
    pub fn daemon_running(&self) -> bool {
        self.daemon_pid().is_some()
    }

    /// The pid of the running daemon, `None` if it is not running.
    pub fn daemon_pid(&self) -> Option<u32> {
        let mut st = self.state();
        let child = st.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Kills the daemon for cleanup; never fails or panics.
    /// A daemon found dead is reported: nothing but the test stops it, so it crashed.
    pub(crate) fn kill_for_drop(&self) {
        if let Some(mut child) = self.state().child.take() {
            match child.try_wait() {
                Ok(None) => {
                    if let Ok(status) = kill_and_reap(&mut child) {
                        self.log_reaped("killed at cleanup", status);
                    }
                }
                Ok(Some(status)) => {
                    self.log_reaped("found dead at cleanup", status);
                    eprintln!(
                        "mesh-netns: {}: meshd died during the test ({status}){}",
                        self.name,
                        self.log_tail_msg()
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Runs the CLI against this host's daemon: `mesh -H unix://<socket>
    /// args...` (from the root namespace; `MESH_HOST` is removed from the
    /// environment). The CLI is killed after [`MESH_CLI_TIMEOUT`].
    pub fn mesh(&self, args: &[&str]) -> Result<MeshOutput> {
        self.run_cli(self.mesh_command(args)?, "mesh", args)
    }

    fn mesh_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(&binaries()?.mesh);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .env_remove("MESH_HOST");
        Ok(cmd)
    }

    /// [`Host::mesh`] with `input` on the CLI's stdin.
    pub fn mesh_input(&self, args: &[&str], input: &str) -> Result<MeshOutput> {
        self.run_cli_input(
            self.mesh_command(args)?,
            "mesh",
            args,
            Some(input.as_bytes()),
        )
    }

    /// Like [`Host::mesh`] but fails (with stdout and stderr in the message)
    /// unless the exit status is 0; returns stdout.
    pub fn mesh_ok(&self, args: &[&str]) -> Result<String> {
        self.ok(self.mesh(args)?, "mesh", args)
    }

    /// This host's Docker Engine API socket (`EXEC_ROOT/docker.sock`).
    pub fn docker_socket(&self) -> PathBuf {
        self.exec_root().join("docker.sock")
    }

    /// Runs the real `docker` CLI against this host's Engine API socket (from the root
    /// namespace, with a config directory of its own and no `DOCKER_*` from the caller),
    /// killed after [`MESH_CLI_TIMEOUT`].
    pub fn docker(&self, args: &[&str]) -> Result<MeshOutput> {
        let config = self.data_dir().with_extension("docker-config");
        std::fs::create_dir_all(&config)?;
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.docker_socket().display()))
            .args(args)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_API_VERSION")
            .env("DOCKER_CONFIG", &config)
            .env("DOCKER_CLI_HINTS", "false");
        self.run_cli(cmd, "docker", args)
    }

    /// Like [`Host::docker`], but fails unless the exit status is 0; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        self.ok(self.docker(args)?, "docker", args)
    }

    fn run_cli(&self, cmd: Command, cli: &str, args: &[&str]) -> Result<MeshOutput> {
        self.run_cli_input(cmd, cli, args, None)
    }

    fn run_cli_input(
        &self,
        mut cmd: Command,
        cli: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<MeshOutput> {
        let out = crate::process::output_with_input(&mut cmd, MESH_CLI_TIMEOUT, input)
            .with_context(|| format!("{}: {cli} {}", self.name, args.join(" ")))?;
        Ok(MeshOutput {
            status: status_code(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `out`'s stdout if it succeeded, else an error with both streams.
    fn ok(&self, out: MeshOutput, cli: &str, args: &[&str]) -> Result<String> {
        if !out.success() {
            bail!(
                "{}: `{cli} {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.name,
                args.join(" "),
                out.status,
                out.stdout,
                out.stderr
            );
        }
        Ok(out.stdout)
    }

    /// [`Host::mesh_ok`] with `--format json` appended, parsed as JSON.
    pub fn mesh_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let stdout = self.mesh_ok(&all)?;
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "{}: `mesh {}` printed invalid JSON:\n{stdout}",
                self.name,
                all.join(" ")
            )
        })
    }

    /// Runs `argv` inside the host namespace (`ip netns exec`), killed after
    /// [`EXEC_TIMEOUT`]. A non-zero exit is not an error; check the status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(argv, EXEC_TIMEOUT)
    }

    /// Like [`Host::exec`] with an explicit timeout.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        ns_exec(&self.ns, argv, timeout)
    }

    /// Sends one ping (1 s timeout) from this host to `to`; true if answered.
    pub fn ping(&self, to: Ipv4Addr) -> Result<bool> {
        let to = to.to_string();
        Ok(self
            .exec(&["ping", "-n", "-q", "-c1", "-W1", &to])?
            .status
            .success())
    }

    /// Cuts the host's underlay cable: sets `v<i>` down in the underlay
    /// namespace (the host sees loss of carrier on `eth0`).
    pub fn cut_link(&self) -> Result<()> {
        ip(&[
            "-n",
            &self.underlay_ns,
            "link",
            "set",
            &self.underlay_port(),
            "down",
        ])
    }

    /// Reconnects the cable cut by [`Host::cut_link`].
    pub fn heal_link(&self) -> Result<()> {
        ip(&[
            "-n",
            &self.underlay_ns,
            "link",
            "set",
            &self.underlay_port(),
            "up",
        ])
    }

    /// The last lines of the log since the last start marker ("" if empty).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 60)
    }

    fn log_tail_msg(&self) -> String {
        format!(
            "\n--- log tail ({}) ---\n{}",
            self.log_path.display(),
            self.log_tail()
        )
    }
}

/// Whether a daemon answers a request on `socket`. A connection alone proves nothing: the
/// listening socket of a daemon just killed lives on in its children until they exec or
/// die, and takes connections that nobody will serve.
fn answers(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if s.set_read_timeout(timeout).is_err()
        || s.set_write_timeout(timeout).is_err()
        || s.write_all(b"\"Version\"\n").is_err()
    {
        return false;
    }
    let mut line = String::new();
    matches!(std::io::BufReader::new(s).read_line(&mut line), Ok(n) if n > 0)
}

/// Runs `argv` in namespace `ns` with a timeout.
pub(crate) fn ns_exec(ns: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
    if argv.is_empty() {
        bail!("empty command line");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    output_with_timeout(&mut cmd, timeout)
}

/// Reads at most the last `max` bytes of a file (lossy UTF-8; "" on error).
pub(crate) fn read_tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        Ok(buf)
    };
    read()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of a log, starting no earlier than the last
/// [`START_MARKER`].
fn log_tail(path: &Path, lines: usize) -> String {
    let text = read_tail(path, 64 * 1024);
    let text = match text.rfind(START_MARKER) {
        Some(i) => &text[i..],
        None => &text[..],
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
