//! Setup of a forked child before `exec`: a task (new network, UTS and
//! mount namespaces, hostname, private `/etc/resolv.conf`, `lo` up, cgroups;
//! an image task also gets an IPC namespace, is pid 1 of a new pid
//! namespace and runs in its image's root filesystem, see [`crate::rootfs`])
//! or an `exec` process (joining a running task's namespaces and cgroups).
//!
//! Everything (paths, strings, file descriptors) is prepared before the
//! fork; the `pre_exec` hooks make only async-signal-safe syscalls and never
//! allocate. A failing step is reported through std's CLOEXEC error pipe as
//! the error code `(step << 16) | errno`; [`decode_spawn_error`] turns that
//! (or a plain `exec` errno) into a readable error.
//!
//! A task child ends its setup at a *gate* (see [`Gate`]): it writes its pid
//! to the shim and blocks until the shim lets it through (one byte), so that
//! meshd can configure the task's network namespace before the command runs.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::rootfs::{self, Creds, RootfsSetup};
use crate::user::ExecUser;

/// Where the task's resolv.conf is bind-mounted.
const RESOLV_TARGET: &std::ffi::CStr = c"/etc/resolv.conf";
/// The loopback interface name.
const LOOPBACK: &[u8] = b"lo";
/// Error codes at or above `1 << STEP_SHIFT` encode a setup step.
const STEP_SHIFT: i32 = 16;

/// Errors of preparing a child and of its spawn.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// `execvp` found no such program.
    #[error("command not found: {0}")]
    NotFound(String),
    /// The program exists but may not be executed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// `exec` failed otherwise.
    #[error("cannot execute {program}: {source}")]
    Exec { program: String, source: io::Error },
    /// A setup step in the child failed.
    #[error("{step} failed: {source}")]
    Setup {
        step: &'static str,
        source: io::Error,
    },
    /// A file needed by the child could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// A path contains a NUL byte.
    #[error("path {} contains a NUL byte", path.display())]
    NulInPath { path: PathBuf },
    /// The task's user cannot be resolved in its image (Docker's words).
    #[error("{0}")]
    User(String),
    /// A bind mount's source is missing.
    #[error("invalid mount config for type \"bind\": bind source path does not exist: {}: {source}", path.display())]
    BindSource { path: PathBuf, source: io::Error },
}

/// The setup steps, numbered for the error pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    ParentDeathSignal = 1,
    JoinCgroup = 2,
    Unshare = 3,
    SetHostname = 4,
    MakePrivate = 5,
    BindResolvConf = 6,
    LoopbackSocket = 7,
    LoopbackUp = 8,
    JoinNetNs = 9,
    JoinUtsNs = 10,
    JoinMountNs = 11,
    GateReady = 12,
    GateWait = 13,
    MountSysfs = 14,
    HostPid = 15,
    ChdirTaskDir = 16,
    MountRootfs = 17,
    PivotRoot = 18,
    DetachOldRoot = 19,
    MountProc = 20,
    MountDev = 21,
    MakeDevice = 22,
    MountDevpts = 23,
    MountShm = 24,
    MountEtcFile = 25,
    MakeMountTarget = 26,
    MountBind = 27,
    MountTmpfs = 28,
    RemountReadonly = 29,
    MakeWorkdir = 30,
    Capabilities = 31,
    NoNewPrivs = 32,
    SetGroups = 33,
    SetGid = 34,
    SetUid = 35,
    ChdirWorkdir = 36,
    ForkInit = 37,
    ForkExec = 38,
    JoinPidNs = 39,
    JoinIpcNs = 40,
}

impl Step {
    const ALL: [Step; 40] = [
        Step::ParentDeathSignal,
        Step::JoinCgroup,
        Step::Unshare,
        Step::SetHostname,
        Step::MakePrivate,
        Step::BindResolvConf,
        Step::LoopbackSocket,
        Step::LoopbackUp,
        Step::JoinNetNs,
        Step::JoinUtsNs,
        Step::JoinMountNs,
        Step::GateReady,
        Step::GateWait,
        Step::MountSysfs,
        Step::HostPid,
        Step::ChdirTaskDir,
        Step::MountRootfs,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::MountProc,
        Step::MountDev,
        Step::MakeDevice,
        Step::MountDevpts,
        Step::MountShm,
        Step::MountEtcFile,
        Step::MakeMountTarget,
        Step::MountBind,
        Step::MountTmpfs,
        Step::RemountReadonly,
        Step::MakeWorkdir,
        Step::Capabilities,
        Step::NoNewPrivs,
        Step::SetGroups,
        Step::SetGid,
        Step::SetUid,
        Step::ChdirWorkdir,
        Step::ForkInit,
        Step::ForkExec,
        Step::JoinPidNs,
        Step::JoinIpcNs,
    ];

    fn describe(self) -> &'static str {
        match self {
            Step::ParentDeathSignal => "setting the parent-death signal",
            Step::JoinCgroup => "joining the task's cgroups",
            Step::Unshare => "creating network, uts and mount namespaces",
            Step::SetHostname => "setting the hostname",
            Step::MakePrivate => "making mounts private",
            Step::BindResolvConf => "bind-mounting /etc/resolv.conf",
            Step::LoopbackSocket => "opening a socket to configure lo",
            Step::LoopbackUp => "bringing lo up",
            Step::JoinNetNs => "joining the task's network namespace",
            Step::JoinUtsNs => "joining the task's uts namespace",
            Step::JoinMountNs => "joining the task's mount namespace",
            Step::GateReady => "reporting the task's pid to the shim",
            Step::GateWait => "waiting for the network setup",
            Step::MountSysfs => "mounting the task's own /sys",
            Step::HostPid => "reading the task's pid in /proc",
            Step::ChdirTaskDir => "entering the task's state directory",
            Step::MountRootfs => "mounting the root filesystem",
            Step::PivotRoot => "pivoting into the root filesystem",
            Step::DetachOldRoot => "detaching the host's root filesystem",
            Step::MountProc => "mounting /proc",
            Step::MountDev => "mounting /dev",
            Step::MakeDevice => "creating the /dev nodes and links",
            Step::MountDevpts => "mounting /dev/pts",
            Step::MountShm => "mounting /dev/shm or /dev/mqueue",
            Step::MountEtcFile => "mounting /etc/hosts, /etc/hostname or /etc/resolv.conf",
            Step::MakeMountTarget => "creating a mount target",
            Step::MountBind => "bind-mounting a mount's source",
            Step::MountTmpfs => "mounting a tmpfs",
            Step::RemountReadonly => "making a mount read-only",
            Step::MakeWorkdir => "creating the working directory",
            Step::Capabilities => "dropping capabilities",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::SetGroups => "setting the supplementary groups",
            Step::SetGid => "setting the group id",
            Step::SetUid => "setting the user id",
            Step::ChdirWorkdir => "changing to the working directory",
            Step::ForkInit => "starting the init process",
            Step::ForkExec => "forking into the task's pid namespace",
            Step::JoinPidNs => "joining the task's pid namespace",
            Step::JoinIpcNs => "joining the task's ipc namespace",
        }
    }
}

/// The current thread's errno (async-signal-safe).
pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to the
    // calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// The error for a failed step, with the current errno. No allocation.
pub(crate) fn step_error(step: Step) -> io::Error {
    step_error_with(step, errno())
}

pub(crate) fn step_error_with(step: Step, errno: i32) -> io::Error {
    io::Error::from_raw_os_error(((step as i32) << STEP_SHIFT) | (errno & 0xffff))
}

/// Turns the error of `Command::spawn` (for `program`) into a [`ChildError`].
pub fn decode_spawn_error(err: io::Error, program: &str) -> ChildError {
    match err.raw_os_error() {
        Some(code) if code >> STEP_SHIFT != 0 => {
            let step = Step::ALL
                .iter()
                .copied()
                .find(|s| *s as i32 == code >> STEP_SHIFT);
            ChildError::Setup {
                step: step.map_or("child setup", Step::describe),
                source: io::Error::from_raw_os_error(code & 0xffff),
            }
        }
        Some(libc::ENOENT) => ChildError::NotFound(program.to_string()),
        Some(libc::EACCES) => ChildError::PermissionDenied(program.to_string()),
        _ => ChildError::Exec {
            program: program.to_string(),
            source: err,
        },
    }
}

fn cstring(path: &Path) -> Result<CString, ChildError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ChildError::NulInPath {
        path: path.to_path_buf(),
    })
}

/// Opens `<dir>/cgroup.procs` of each cgroup for writing (close-on-exec).
pub fn open_cgroup_procs(dirs: &[PathBuf]) -> Result<Vec<OwnedFd>, ChildError> {
    dirs.iter()
        .map(|d| {
            let path = d.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .map(OwnedFd::from)
                .map_err(|source| ChildError::Open { path, source })
        })
        .collect()
}

/// Opens a file for appending (created if missing), for a child's output.
pub fn open_log(path: &Path) -> Result<File, ChildError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ChildError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// A `Command` for `argv` with exactly `env`, stdin from `/dev/null`, cwd
/// `/`.
fn base_command(argv: &[String], env: &[(String, String)]) -> Command {
    // Callers reject an empty argv; an empty program would fail with ENOENT.
    let (program, args) = argv
        .split_first()
        .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .current_dir("/");
    cmd
}

/// Writes "0" (the calling process) to each pre-opened `cgroup.procs`.
fn join_cgroups(fds: &[OwnedFd]) -> io::Result<()> {
    for fd in fds {
        // SAFETY: writes one byte from a static buffer to an open fd.
        let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(step_error(Step::JoinCgroup));
        }
    }
    Ok(())
}

/// Arms SIGKILL on the death of `parent` (the forking process) and checks
/// it did not die before that. `None`: the child is pid 1 of a new pid
/// namespace, where `getppid()` is 0; a parent that died before is seen at
/// the gate instead (its end of the gate pipe is closed).
fn die_with_parent(parent: Option<libc::pid_t>) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(step_error(Step::ParentDeathSignal));
    }
    let Some(parent) = parent else {
        return Ok(());
    };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(step_error_with(Step::ParentDeathSignal, libc::ESRCH));
    }
    Ok(())
}

/// Sets IFF_UP on `lo` in the current network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(step_error(Step::LoopbackSocket));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(LOOPBACK) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is an open socket and ifr a valid, NUL-terminated ifreq
    // that outlives both calls; SIOC[GS]IFFLAGS read/write ifru_flags.
    let res = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            Err(step_error(Step::LoopbackUp))
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) != 0 {
                Err(step_error(Step::LoopbackUp))
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    res
}

/// The gate at the end of a task child's setup, after its namespaces exist
/// and before `exec`: the child closes its copy of `close_in_child` (the
/// shim's write end of the gate pipe, so that only the shim can open or
/// close the gate), writes its pid (4 bytes, native endian, as the shim's
/// pid namespace numbers it) to `ready`, and
/// blocks until it reads one byte from `wait`. EOF on `wait` (the gate
/// closed without the byte) fails the setup with `ECANCELED`.
#[derive(Debug)]
pub struct Gate {
    /// Write end of the ready pipe (the shim reads the pid).
    pub ready: OwnedFd,
    /// Read end of the gate pipe.
    pub wait: OwnedFd,
    /// The shim's write end of the gate pipe (closed in the child).
    pub close_in_child: libc::c_int,
}

impl Gate {
    /// Runs in the forked child: async-signal-safe calls only.
    fn pass(&self, pid: libc::pid_t) -> io::Result<()> {
        // SAFETY: closes the child's copy of an fd number the shim owns; the
        // shim's own copy is unaffected.
        unsafe { libc::close(self.close_in_child) };
        let pid = pid.to_ne_bytes();
        loop {
            // SAFETY: writes 4 bytes from a stack buffer to an open fd.
            let n = unsafe { libc::write(self.ready.as_raw_fd(), pid.as_ptr().cast(), pid.len()) };
            if n == 4 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return Err(step_error_with(
                Step::GateReady,
                if n < 0 { errno() } else { libc::EIO },
            ));
        }
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: reads at most 1 byte into a stack buffer from an open fd.
            let n = unsafe { libc::read(self.wait.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
            if n == 1 {
                return Ok(());
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return Err(step_error_with(
                Step::GateWait,
                if n < 0 { errno() } else { libc::ECANCELED },
            ));
        }
    }
}

/// Creates a pipe (both ends close-on-exec): `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets IFF_UP on `lo` in the current network namespace (outside of a
/// `pre_exec` hook: the error is a plain errno).
pub fn bring_loopback_up() -> io::Result<()> {
    loopback_up().map_err(|e| io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0) & 0xffff))
}

/// What a task child needs, prepared before the fork.
struct TaskSetup {
    parent: libc::pid_t,
    cgroup_procs: Vec<OwnedFd>,
    hostname: Vec<u8>,
    resolv_src: CString,
    gate: Gate,
    /// An image task (forked into a new pid namespace by the shim).
    rootfs: Option<RootfsSetup>,
}

impl TaskSetup {
    /// Runs in the forked child: async-signal-safe calls only.
    fn run(&self) -> io::Result<()> {
        let Some(rootfs) = &self.rootfs else {
            return self.run_host();
        };
        die_with_parent(None)?;
        let pid = rootfs::host_pid()?;
        join_cgroups(&self.cgroup_procs)?;
        let flags =
            libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
        // SAFETY: unshare with constant flags.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(step_error(Step::Unshare));
        }
        self.hostname_and_private_mounts()?;
        rootfs.enter()?;
        loopback_up()?;
        self.gate.pass(pid)?;
        rootfs.finish()
    }

    fn hostname_and_private_mounts(&self) -> io::Result<()> {
        // SAFETY: pointer and length describe the owned hostname buffer.
        if unsafe { libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()) } != 0 {
            return Err(step_error(Step::SetHostname));
        }
        // SAFETY: "/" is a static NUL-terminated string; null source, type
        // and data are allowed for a propagation change.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(step_error(Step::MakePrivate));
        }
        Ok(())
    }

    /// A host-process task.
    fn run_host(&self) -> io::Result<()> {
        die_with_parent(Some(self.parent))?;
        join_cgroups(&self.cgroup_procs)?;
        // SAFETY: unshare with constant flags.
        if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWNS) }
            != 0
        {
            return Err(step_error(Step::Unshare));
        }
        self.hostname_and_private_mounts()?;
        // SAFETY: both paths are NUL-terminated strings that outlive the
        // call; type and data may be null for MS_BIND.
        let rc = unsafe {
            libc::mount(
                self.resolv_src.as_ptr(),
                RESOLV_TARGET.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(step_error(Step::BindResolvConf));
        }
        // A sysfs of its own, read-only, so that /sys/class/net shows the task's interfaces
        // and not its host's (as `ip netns exec` and container runtimes do).
        // SAFETY: static NUL-terminated strings; null data is allowed for sysfs.
        let rc = unsafe {
            libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(step_error(Step::MountSysfs));
        }
        loopback_up()?;
        // SAFETY: getpid has no preconditions.
        self.gate.pass(unsafe { libc::getpid() })
    }
}

/// The task's command: `argv` with exactly `env`, stdin from /dev/null,
/// stdout/stderr appended to the given files; in the child it joins the
/// cgroups, gets new network/UTS/mount namespaces, `hostname`,
/// `resolv_conf` bind-mounted on `/etc/resolv.conf` and `lo` up, dies
/// with the calling thread (PR_SET_PDEATHSIG: spawn it from a thread that
/// lives as long as the task), then waits at `gate` before `exec`.
///
/// With `rootfs` (an image task; the caller forks it into a new pid
/// namespace) it also gets a new IPC namespace and, instead of the
/// resolv.conf bind and `/sys`, the image's root filesystem and process
/// settings (see the `rootfs` module).
#[allow(clippy::too_many_arguments)]
pub fn task_command(
    argv: &[String],
    env: &[(String, String)],
    hostname: &str,
    resolv_conf: &Path,
    cgroups: &[PathBuf],
    stdout: File,
    stderr: File,
    gate: Gate,
    rootfs: Option<RootfsSetup>,
) -> Result<Command, ChildError> {
    let setup = TaskSetup {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        cgroup_procs: open_cgroup_procs(cgroups)?,
        hostname: hostname.as_bytes().to_vec(),
        resolv_src: cstring(resolv_conf)?,
        gate,
        rootfs,
    };
    let mut cmd = base_command(argv, env);
    cmd.stdout(stdout).stderr(stderr);
    // SAFETY: the hook only makes async-signal-safe syscalls on data
    // prepared before the fork, and does not allocate.
    unsafe { cmd.pre_exec(move || setup.run()) };
    Ok(cmd)
}

/// Makes the child of `cmd` join the given cgroups (their `cgroup.procs`
/// are opened now) before `exec`; what it forks inherits them.
pub fn join_cgroups_before_exec(cmd: &mut Command, cgroups: &[PathBuf]) -> Result<(), ChildError> {
    let fds = open_cgroup_procs(cgroups)?;
    // SAFETY: the hook only writes to fds opened before the fork and does
    // not allocate.
    unsafe { cmd.pre_exec(move || join_cgroups(&fds)) };
    Ok(())
}

/// What an exec child needs, prepared before the fork.
struct JoinSetup {
    parent: libc::pid_t,
    cgroup_procs: Vec<OwnedFd>,
    net: OwnedFd,
    uts: OwnedFd,
    mnt: OwnedFd,
    image: Option<ImageJoin>,
}

/// What an exec child of an image task needs besides.
struct ImageJoin {
    ipc: OwnedFd,
    pid: OwnedFd,
    creds: Creds,
    workdir: CString,
}

impl JoinSetup {
    /// Runs in the forked child: async-signal-safe calls only.
    fn run(&self) -> io::Result<()> {
        die_with_parent(Some(self.parent))?;
        join_cgroups(&self.cgroup_procs)?;
        let setns = |fd: &OwnedFd, flag, step| {
            // SAFETY: fd is an open namespace file of the given type.
            if unsafe { libc::setns(fd.as_raw_fd(), flag) } != 0 {
                return Err(step_error(step));
            }
            Ok(())
        };
        setns(&self.net, libc::CLONE_NEWNET, Step::JoinNetNs)?;
        setns(&self.uts, libc::CLONE_NEWUTS, Step::JoinUtsNs)?;
        let Some(image) = &self.image else {
            return setns(&self.mnt, libc::CLONE_NEWNS, Step::JoinMountNs);
        };
        setns(&image.ipc, libc::CLONE_NEWIPC, Step::JoinIpcNs)?;
        setns(&image.pid, libc::CLONE_NEWPID, Step::JoinPidNs)?;
        // Root and working directory become the task's root.
        setns(&self.mnt, libc::CLONE_NEWNS, Step::JoinMountNs)?;
        rootfs::relay_fork()?;
        rootfs::apply_creds(&image.creds)?;
        // SAFETY: NUL-terminated path valid for the call.
        if unsafe { libc::chdir(image.workdir.as_ptr()) } != 0 {
            return Err(step_error(Step::ChdirWorkdir));
        }
        Ok(())
    }
}

/// Opens `/proc/<pid>/ns/<kind>`.
fn open_ns(pid: u32, kind: &str) -> Result<OwnedFd, ChildError> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/{kind}"));
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| ChildError::Open { path, source })
}

/// A command that runs `argv` with exactly `env` inside the network, UTS
/// and mount namespaces of process `pid` and in the given cgroups; stdin
/// from /dev/null, stdout/stderr piped; it dies with the calling process.
///
/// With `image` (an image task: its user and working directory), also in
/// its IPC and pid namespaces (through a relaying intermediate process, see
/// `rootfs::relay_fork`), as that user, with the task's capabilities and
/// no_new_privs, in that directory.
pub fn join_command(
    pid: u32,
    argv: &[String],
    env: &[(String, String)],
    cgroups: &[PathBuf],
    image: Option<(&ExecUser, &Path)>,
) -> Result<Command, ChildError> {
    let image = match image {
        None => None,
        Some((user, workdir)) => Some(ImageJoin {
            ipc: open_ns(pid, "ipc")?,
            pid: open_ns(pid, "pid")?,
            creds: Creds::from(user),
            workdir: cstring(workdir)?,
        }),
    };
    let setup = JoinSetup {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        cgroup_procs: open_cgroup_procs(cgroups)?,
        net: open_ns(pid, "net")?,
        uts: open_ns(pid, "uts")?,
        mnt: open_ns(pid, "mnt")?,
        image,
    };
    let mut cmd = base_command(argv, env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the hook only makes async-signal-safe syscalls on data
    // prepared before the fork, and does not allocate.
    unsafe { cmd.pre_exec(move || setup.run()) };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_errors() {
        let e = decode_spawn_error(io::Error::from_raw_os_error(libc::ENOENT), "foo");
        assert_eq!(e.to_string(), "command not found: foo");
        let e = decode_spawn_error(io::Error::from_raw_os_error(libc::EACCES), "/x");
        assert_eq!(e.to_string(), "permission denied: /x");
        let e = decode_spawn_error(step_error_with(Step::BindResolvConf, libc::ENOENT), "foo");
        assert!(e
            .to_string()
            .starts_with("bind-mounting /etc/resolv.conf failed: No such file"));
        let e = decode_spawn_error(io::Error::from_raw_os_error(libc::ENOEXEC), "foo");
        assert!(e.to_string().starts_with("cannot execute foo: "));
    }

    #[test]
    fn every_step_decodes_to_its_description() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(*step as usize, i + 1, "{step:?} out of order");
            let e = decode_spawn_error(step_error_with(*step, libc::EPERM), "x").to_string();
            assert!(
                e.starts_with(&format!(
                    "{} failed: Operation not permitted",
                    step.describe()
                )),
                "{e}"
            );
        }
        let e = decode_spawn_error(step_error_with(Step::MountRootfs, libc::EINVAL), "x");
        assert!(e
            .to_string()
            .starts_with("mounting the root filesystem failed: Invalid argument"));
    }

    #[test]
    fn plain_spawn_errors_are_decoded() {
        let argv = vec!["/nonexistent/definitely-not-here".to_string()];
        let err = base_command(&argv, &[])
            .spawn()
            .err()
            .map(|e| decode_spawn_error(e, &argv[0]).to_string());
        assert_eq!(
            err.as_deref(),
            Some("command not found: /nonexistent/definitely-not-here")
        );
    }
}
