//! Image tasks: the root filesystem and the process settings of a task with
//! a [`RootfsSpec`], done by the executor itself (no OCI runtime).
//!
//! **Before the fork** (the executor's `start`, then the shim):
//! [`prepare_dir`] makes the task's writable layer, `<rw_root>/<id>/upper`
//! and `work` (on disk under meshd's `--data-dir`, not in the exec root: see
//! [`crate::ExecutorConfig::rw_root`]), the link `<task_dir>/rw` to it and,
//! only for many or long layer paths, `l/<i>`, one short symlink per layer
//! (`l/0` is the base; see [`lowerdir`]); the shim calls [`prepare`], which resolves the
//! user against the image's `/etc/passwd` and `/etc/group` (read through the
//! layers, whiteouts and opaque directories honoured), clones every bind
//! source as a detached mount tree (`open_tree(OPEN_TREE_CLONE)`: fds that
//! stay valid after the host's root is gone), writes the task's `hosts`,
//! `hostname` and `resolv.conf` and its secrets and configs as files of one
//! detached tmpfs (`fsopen`/`fsmount`: in no mount namespace) and clones each,
//! and builds every path and option string the child needs. The image's
//! init layer (`mesh_image`, topmost lower layer) already holds the mount
//! points these need, so a start creates none of them in the upper directory.
//!
//! **In the child** (async-signal-safe syscalls only, no allocation), inside
//! its own mount namespace whose mounts are private, [`RootfsSetup::enter`]:
//! `chdir(<task_dir>)`, mounts the overlay over the task directory itself
//! (lower directories topmost first, the layers' paths or `l/2:l/1:l/0`,
//! then `upperdir=rw/upper,workdir=rw/work`, resolved through the link
//! before the mount covers it), enters it by its path again, then
//! `pivot_root(".", ".")` and a lazy unmount of the old root (runc's way:
//! no directory is needed for it), so nothing of the host stays reachable
//! and nothing appears in meshd's mount namespace; everything goes when the
//! task's namespaces die. Then, all paths resolved inside the new root: a
//! fresh `/proc` (the task's pid namespace), `/sys` (read-only sysfs),
//! `/dev` (tmpfs with `null`, `zero`, `full`, `random`, `urandom`, `tty`
//! made with `mknod`, a new `devpts` instance with `ptmx`, `shm`, `mqueue`,
//! `fd` and `std{in,out,err}` links), `/etc/hosts`, `/etc/hostname`,
//! `/etc/resolv.conf` and the binds moved in from their cloned trees
//! (`move_mount`), tmpfs mounts, the working directory created, Docker's
//! masked and read-only `/proc` and `/sys` paths, and the root remounted
//! read-only for `--read-only`. Mount targets missing from the image are
//! created in the upper directory (which is why a read-only root still has
//! one: Docker does the same).
//!
//! After the network gate, [`RootfsSetup::finish`]: Docker's default
//! capability bounding set ([`DEFAULT_CAPS`]; permitted and effective too,
//! inheritable and ambient empty), `PR_SET_NO_NEW_PRIVS`, the groups, gid
//! and uid, the working directory; with `--init` the child forks: it stays
//! as pid 1, a reaper that forwards signals to the command and exits with
//! its status (128 + signal if killed), and the command runs as its child.
//! `argv[0]` is then looked up by `execvp` in the task's `PATH`, inside the
//! new root.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::child::{errno, step_error, step_error_with, ChildError, Step};
use crate::spec::{FileSpec, MountSource, RootfsSpec};
use crate::user::{self, ExecUser};

/// The link in the task's state directory to its writable layer
/// (`<rw_root>/<id>`, see [`crate::ExecutorConfig::rw_root`]).
pub const RW_LINK: &str = "rw";
/// The overlay's upper directory in the writable layer.
pub const UPPER_DIR: &str = "upper";
/// The overlay's work directory in the writable layer.
pub const WORK_DIR: &str = "work";
/// The short links to the layers (`l/0` is the base layer).
pub const LAYER_LINKS_DIR: &str = "l";

/// Docker's default capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP (`CapBnd: 00000000a80425fb`).
pub const DEFAULT_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `/dev` nodes: name, major, minor.
const DEVICES: [(&std::ffi::CStr, u32, u32); 6] = [
    (c"/dev/null", 1, 3),
    (c"/dev/zero", 1, 5),
    (c"/dev/full", 1, 7),
    (c"/dev/random", 1, 8),
    (c"/dev/urandom", 1, 9),
    (c"/dev/tty", 5, 0),
];

/// `/dev` links: target, link.
const DEV_LINKS: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
    (c"pts/ptmx", c"/dev/ptmx"),
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

/// Docker's masked paths: `/dev/null` over files, an empty read-only tmpfs
/// over directories; missing ones are skipped.
const MASKED: [&std::ffi::CStr; 12] = [
    c"/proc/asound",
    c"/proc/acpi",
    c"/proc/interrupts",
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/latency_stats",
    c"/proc/timer_list",
    c"/proc/timer_stats",
    c"/proc/sched_debug",
    c"/proc/scsi",
    c"/sys/firmware",
    c"/sys/devices/virtual/powercap",
];

/// Docker's read-only `/proc` paths.
const READONLY_PATHS: [&std::ffi::CStr; 5] = [
    c"/proc/bus",
    c"/proc/fs",
    c"/proc/irq",
    c"/proc/sys",
    c"/proc/sysrq-trigger",
];

/// Creates the task's writable layer `rw` (its overlay's upper and work
/// directories), its `rw` link to it and the layer links in its state
/// directory `dir` (the executor, at `start`). None is left from an earlier
/// start of the id: a layer goes with its state directory (the executor's
/// `cleanup`), or, without one, when the next executor is created.
pub(crate) fn prepare_dir(dir: &Path, rw: &Path, spec: &RootfsSpec) -> Result<(), String> {
    let (_, links) = lowerdir(&spec.layers);
    let create =
        |p: &Path| fs::create_dir(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
    create(rw)?;
    for d in [UPPER_DIR, WORK_DIR] {
        create(&rw.join(d))?;
    }
    let link = dir.join(RW_LINK);
    symlink(rw, &link).map_err(|e| format!("cannot create {}: {e}", link.display()))?;
    if links {
        create(&dir.join(LAYER_LINKS_DIR))?;
    }
    for (i, layer) in spec.layers.iter().enumerate() {
        if !layer.is_dir() {
            return Err(format!("layer {} is not a directory", layer.display()));
        }
        if links {
            let link = dir.join(LAYER_LINKS_DIR).join(i.to_string());
            symlink(layer, &link).map_err(|e| format!("cannot create {}: {e}", link.display()))?;
        }
    }
    Ok(())
}

/// The longest `lowerdir` of absolute layer paths used as they are: the whole option string
/// must fit in a page, and the upper and work directories and `index=off` follow it.
const MAX_DIRECT_LOWERDIR: usize = 3072;

/// The overlay's `lowerdir` value (topmost layer first) and whether it names the task's
/// `l/<i>` links: the layers' own paths when they are short enough and hold none of the
/// characters the option syntax gives a meaning (`:`, `,`, `\`), else one short relative
/// link per layer (`l/0` is the base), which keeps the string far below a page for the
/// 500 layers overlayfs stacks at most. Links cost a directory and an inode per layer in
/// every task's directory, so a task of a few layers does without them.
fn lowerdir(layers: &[PathBuf]) -> (String, bool) {
    let direct: Option<Vec<&str>> = layers
        .iter()
        .rev()
        .map(|l| {
            l.to_str()
                .filter(|s| s.starts_with('/') && !s.contains([':', ',', '\\']))
        })
        .collect();
    if let Some(paths) = direct {
        let joined = paths.join(":");
        if joined.len() <= MAX_DIRECT_LOWERDIR {
            return (joined, false);
        }
    }
    let links: Vec<String> = (0..layers.len())
        .rev()
        .map(|i| format!("{LAYER_LINKS_DIR}/{i}"))
        .collect();
    (links.join(":"), true)
}

/// True if `p` is an overlay whiteout (a character device 0/0).
fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// True if the directory `p` of a layer is opaque (`trusted.overlay.opaque=y`).
fn is_opaque(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: NUL-terminated strings and a buffer of the given length, all
    // valid for the call.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// The regular file at `rel` (relative) as the overlay of `layers` (base
/// first) shows it: the topmost layer that has it, unless a whiteout, a
/// non-directory or an opaque directory above hides it. Symbolic links are
/// not followed (they point into the image, not the host): `None`.
pub(crate) fn find_in_layers(layers: &[PathBuf], rel: &Path) -> Option<PathBuf> {
    let comps: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    'layers: for layer in layers.iter().rev() {
        let mut p = layer.clone();
        let mut opaque = false;
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            let md = match fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(_) if opaque => return None,
                Err(_) => continue 'layers,
            };
            if is_whiteout(&md) {
                return None;
            }
            if i + 1 == comps.len() {
                return md.file_type().is_file().then_some(p);
            }
            if !md.is_dir() {
                return None;
            }
            opaque |= is_opaque(&p);
        }
    }
    None
}

/// Reads a file of the image (`""` if it has none or it cannot be read).
fn read_image_file(layers: &[PathBuf], rel: &str) -> String {
    find_in_layers(layers, Path::new(rel))
        .and_then(|p| fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The task's user, resolved against the image's `/etc/passwd` and
/// `/etc/group`.
pub(crate) fn exec_user(spec: &RootfsSpec) -> Result<ExecUser, ChildError> {
    user::resolve(
        &spec.user,
        &read_image_file(&spec.layers, "etc/passwd"),
        &read_image_file(&spec.layers, "etc/group"),
    )
    .map_err(ChildError::User)
}

fn cstring(bytes: &[u8], what: &Path) -> Result<CString, ChildError> {
    CString::new(bytes).map_err(|_| ChildError::NulInPath {
        path: what.to_path_buf(),
    })
}

fn cpath(p: &Path) -> Result<CString, ChildError> {
    cstring(p.as_os_str().as_bytes(), p)
}

/// `/a`, `/a/b`, `/a/b/c` for `/a/b/c` (`.` and `..` were rejected by the
/// spec's validation).
fn prefixes(p: &Path) -> Result<Vec<CString>, ChildError> {
    let mut cur = PathBuf::from("/");
    let mut out = Vec::new();
    for c in p.components() {
        if let Component::Normal(n) = c {
            cur.push(n);
            out.push(cpath(&cur)?);
        }
    }
    Ok(out)
}

/// A detached copy of the mount tree at `path` (an fd for `move_mount`),
/// recursive for directories.
fn clone_tree(path: &Path, recursive: bool) -> Result<OwnedFd, ChildError> {
    let c = cpath(path)?;
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a NUL-terminated path valid for the call; the result is a new
    // fd we own or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(ChildError::Open {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| ChildError::Open {
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EBADF),
    })?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setup_error(step: &'static str) -> ChildError {
    ChildError::Setup {
        step,
        source: io::Error::last_os_error(),
    }
}

/// The new fd a file-descriptor-returning syscall gave, or `step`'s error.
fn owned_fd(rc: libc::c_long, step: &'static str) -> Result<OwnedFd, ChildError> {
    if rc < 0 {
        return Err(setup_error(step));
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| ChildError::Setup {
        step,
        source: io::Error::from_raw_os_error(libc::EBADF),
    })?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Secrets and configs (see [`RootfsSpec::files`]) in the task's tmpfs `mnt` (see
/// [`detached_tmpfs`]: in no mount namespace, so nothing of it is reachable from the
/// host), each file with its owner and mode; each file is then cloned as a
/// detached bind (`open_tree`) that the child moves onto its target, read-only. The data
/// lives in memory only and goes with the task's mount namespace.
fn file_mounts(mnt: &OwnedFd, files: &[FileSpec]) -> Result<Vec<PreparedMount>, ChildError> {
    let mut out = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let name = CString::new(format!("f{i}")).map_err(|_| ChildError::NulInPath {
            path: f.target.clone(),
        })?;
        out.push(PreparedMount {
            prefixes: prefixes(&f.target)?,
            file: true,
            what: Prepared::Bind(tmpfs_file(mnt, &name, &f.data, f.uid, f.gid, f.mode)?),
            readonly: true,
        });
    }
    Ok(out)
}

/// A new tmpfs in no mount namespace (`fsopen`/`fsmount`, nosuid, nodev, noexec): nothing on
/// the host can reach it, and it goes when the last mount cloned from it does.
fn detached_tmpfs() -> Result<OwnedFd, ChildError> {
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
    const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
    const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;
    // SAFETY: a static NUL-terminated name; the result is a new fd or -1.
    let fs = owned_fd(
        unsafe {
            libc::syscall(
                libc::SYS_fsopen,
                c"tmpfs".as_ptr(),
                1, /* FSOPEN_CLOEXEC */
            )
        },
        "fsopen(tmpfs)",
    )?;
    // SAFETY: fs is a valid fs-context fd; key and value are NUL-terminated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"mode".as_ptr(),
            c"0755".as_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(setup_error("fsconfig(mode)"));
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"source".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(setup_error("fsconfig(source)"));
    }
    // SAFETY: as above; CMD_CREATE takes no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(setup_error("fsconfig(create)"));
    }
    // SAFETY: fs is a created fs context; the result is a new fd or -1.
    owned_fd(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                1, /* FSMOUNT_CLOEXEC */
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            )
        },
        "fsmount(tmpfs)",
    )
}

/// Writes `data` as the file `name` of the detached tmpfs `mnt` with its owner and mode, and
/// returns a detached bind of it (`open_tree`) to move onto its target in the child.
fn tmpfs_file(
    mnt: &OwnedFd,
    name: &std::ffi::CStr,
    data: &[u8],
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<OwnedFd, ChildError> {
    // SAFETY: mnt is a valid directory fd, name NUL-terminated; a new fd or -1.
    let file = owned_fd(
        unsafe {
            libc::openat(
                mnt.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o600,
            )
        }
        .into(),
        "create a file in the task's tmpfs",
    )?;
    let mut w = fs::File::from(file);
    io::Write::write_all(&mut w, data).map_err(|source| ChildError::Setup {
        step: "write a file in the task's tmpfs",
        source,
    })?;
    // SAFETY: a valid fd we own.
    if unsafe { libc::fchown(w.as_raw_fd(), uid, gid) } != 0 {
        return Err(setup_error("chown a file in the task's tmpfs"));
    }
    // SAFETY: a valid fd we own.
    if unsafe { libc::fchmod(w.as_raw_fd(), mode & 0o7777) } != 0 {
        return Err(setup_error("chmod a file in the task's tmpfs"));
    }
    drop(w);
    // SAFETY: mnt is a valid directory fd, name NUL-terminated; a new fd or -1.
    owned_fd(
        unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                mnt.as_raw_fd(),
                name.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        },
        "clone a file of the task's tmpfs",
    )
}

/// What a mount of the spec becomes in the child.
#[derive(Debug)]
enum Prepared {
    /// A cloned tree to move in.
    Bind(OwnedFd),
    /// tmpfs options.
    Tmpfs(CString),
}

/// One mount, prepared.
#[derive(Debug)]
struct PreparedMount {
    /// The target's ancestors, then the target.
    prefixes: Vec<CString>,
    /// The target is a file (a bind of a file): created as one.
    file: bool,
    what: Prepared,
    readonly: bool,
}

/// The task's credentials, ready for the syscalls.
#[derive(Debug)]
pub(crate) struct Creds {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl From<&ExecUser> for Creds {
    fn from(u: &ExecUser) -> Creds {
        Creds {
            uid: u.uid,
            gid: u.gid,
            groups: u.groups.clone(),
        }
    }
}

/// Everything the child needs for the root filesystem, prepared before the
/// fork (see the module docs).
#[derive(Debug)]
pub(crate) struct RootfsSetup {
    task_dir: CString,
    overlay_options: CString,
    /// `hosts`, `hostname`, `resolv.conf` cloned, with their targets.
    etc_files: [(OwnedFd, &'static std::ffi::CStr); 3],
    mounts: Vec<PreparedMount>,
    workdir_prefixes: Vec<CString>,
    workdir: CString,
    readonly: bool,
    creds: Creds,
    init: bool,
}

/// Builds the [`RootfsSetup`] of the task in `dir` (the shim, before the
/// fork); also returns the resolved user (for `HOME`).
pub(crate) fn prepare(
    dir: &Path,
    spec: &RootfsSpec,
    hostname: &str,
    resolv_conf: &str,
) -> Result<(RootfsSetup, ExecUser), ChildError> {
    let user = exec_user(spec)?;
    let (lower, _) = lowerdir(&spec.layers);
    let options = format!(
        "lowerdir={lower},upperdir={RW_LINK}/{UPPER_DIR},workdir={RW_LINK}/{WORK_DIR},index=off"
    );
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let (what, file) = match &m.source {
            MountSource::Bind(src) => {
                let md = fs::metadata(src).map_err(|source| ChildError::BindSource {
                    path: src.clone(),
                    source,
                })?;
                (Prepared::Bind(clone_tree(src, md.is_dir())?), !md.is_dir())
            }
            MountSource::Tmpfs { size_bytes } => {
                let opts = if *size_bytes > 0 {
                    format!("mode=1777,size={size_bytes}")
                } else {
                    "mode=1777".to_string()
                };
                (Prepared::Tmpfs(cstring(opts.as_bytes(), &m.target)?), false)
            }
        };
        mounts.push(PreparedMount {
            prefixes: prefixes(&m.target)?,
            file,
            what,
            readonly: m.readonly,
        });
    }
    // One detached tmpfs per task holds its secrets and configs and its `/etc/hosts`,
    // `/etc/hostname` and `/etc/resolv.conf`: a task start writes no file for them (the
    // `/etc` files writable in the task, as Docker's binds are).
    let tmpfs = detached_tmpfs()?;
    mounts.extend(file_mounts(&tmpfs, &spec.files)?);
    let workdir = if spec.workdir.is_empty() {
        PathBuf::from("/")
    } else {
        PathBuf::from(&spec.workdir)
    };
    let setup = RootfsSetup {
        task_dir: cpath(dir)?,
        overlay_options: cstring(options.as_bytes(), dir)?,
        etc_files: [
            (
                tmpfs_file(&tmpfs, c"hosts", spec.hosts.as_bytes(), 0, 0, 0o644)?,
                c"/etc/hosts",
            ),
            (
                tmpfs_file(
                    &tmpfs,
                    c"hostname",
                    format!("{hostname}\n").as_bytes(),
                    0,
                    0,
                    0o644,
                )?,
                c"/etc/hostname",
            ),
            (
                tmpfs_file(&tmpfs, c"resolv.conf", resolv_conf.as_bytes(), 0, 0, 0o644)?,
                c"/etc/resolv.conf",
            ),
        ],
        mounts,
        workdir_prefixes: prefixes(&workdir)?,
        workdir: cpath(&workdir)?,
        readonly: spec.readonly,
        creds: Creds::from(&user),
        init: spec.init,
    };
    Ok((setup, user))
}

// ---------------------------------------------------------------------------
// In the child: async-signal-safe syscalls only, no allocation.

fn check(rc: libc::c_int, step: Step) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(step_error(step))
    }
}

/// `mount(2)` with C strings (null for `None`).
fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> libc::c_int {
    let ptr = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), std::ffi::CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    }
}

/// `mkdir`, an existing entry being fine.
fn mkdir(path: &std::ffi::CStr, mode: libc::mode_t, step: Step) -> io::Result<()> {
    // SAFETY: NUL-terminated path valid for the call.
    if unsafe { libc::mkdir(path.as_ptr(), mode) } != 0 && errno() != libc::EEXIST {
        return Err(step_error(step));
    }
    Ok(())
}

/// Creates `path` as an empty file unless something is there.
fn touch(path: &std::ffi::CStr, step: Step) -> io::Result<()> {
    // SAFETY: NUL-terminated path valid for the call; the fd is closed.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
            0o644,
        );
        if fd < 0 {
            if errno() == libc::EISDIR {
                return Ok(());
            }
            return Err(step_error(step));
        }
        libc::close(fd);
    }
    Ok(())
}

/// Moves the detached tree `fd` onto `target` (symlinks followed, in the
/// new root).
fn move_tree(fd: &OwnedFd, target: &std::ffi::CStr, step: Step) -> io::Result<()> {
    // SAFETY: an open mount-tree fd and NUL-terminated strings valid for
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
        )
    };
    if rc != 0 {
        return Err(step_error(step));
    }
    Ok(())
}

/// Makes the mount at `target` read-only (a bind remount keeps the rest).
fn remount_readonly(target: &std::ffi::CStr, extra: libc::c_ulong) -> io::Result<()> {
    check(
        mount(
            None,
            target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | extra,
            None,
        ),
        Step::RemountReadonly,
    )
}

impl RootfsSetup {
    /// Mounts the overlay, pivots into it and sets up the task's mounts
    /// (see the module docs). Runs in the forked child, in its new mount
    /// namespace with `/` already private.
    pub(crate) fn enter(&self) -> io::Result<()> {
        // SAFETY: NUL-terminated path valid for the call.
        check(
            unsafe { libc::chdir(self.task_dir.as_ptr()) },
            Step::ChdirTaskDir,
        )?;
        // Over the task directory itself (only in this mount namespace): no mount point
        // directory to make per task. `rw/upper` and `rw/work` resolve before the mount covers
        // them; the overlay keeps its own references.
        check(
            mount(
                Some(c"overlay"),
                c".",
                Some(c"overlay"),
                0,
                Some(&self.overlay_options),
            ),
            Step::MountRootfs,
        )?;
        // The working directory is still the covered one: walk the path again to enter
        // the overlay's root.
        // SAFETY: NUL-terminated path valid for the call.
        check(
            unsafe { libc::chdir(self.task_dir.as_ptr()) },
            Step::PivotRoot,
        )?;
        // SAFETY: static NUL-terminated paths; pivot_root has no libc wrapper.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
        if rc != 0 {
            return Err(step_error(Step::PivotRoot));
        }
        // The old root is now stacked on "."; detach it (and everything of
        // the host under it).
        // SAFETY: static NUL-terminated path.
        check(
            unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) },
            Step::DetachOldRoot,
        )?;
        // SAFETY: static NUL-terminated path.
        check(unsafe { libc::chdir(c"/".as_ptr()) }, Step::DetachOldRoot)?;
        self.mount_specials()?;
        for (fd, target) in &self.etc_files {
            mkdir(c"/etc", 0o755, Step::MountEtcFile)?;
            touch(target, Step::MountEtcFile)?;
            move_tree(fd, target, Step::MountEtcFile)?;
        }
        for m in &self.mounts {
            self.mount_one(m)?;
        }
        for p in &self.workdir_prefixes {
            mkdir(p, 0o755, Step::MakeWorkdir)?;
        }
        mask_paths();
        if self.readonly {
            remount_readonly(c"/", 0)?;
        }
        Ok(())
    }

    /// `/proc`, `/sys`, `/dev` and what is under it.
    fn mount_specials(&self) -> io::Result<()> {
        let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mkdir(c"/proc", 0o555, Step::MountProc)?;
        check(
            mount(
                Some(c"proc"),
                c"/proc",
                Some(c"proc"),
                nosuid_nodev_noexec,
                None,
            ),
            Step::MountProc,
        )?;
        mkdir(c"/sys", 0o555, Step::MountSysfs)?;
        check(
            mount(
                Some(c"sysfs"),
                c"/sys",
                Some(c"sysfs"),
                nosuid_nodev_noexec | libc::MS_RDONLY,
                None,
            ),
            Step::MountSysfs,
        )?;
        mkdir(c"/dev", 0o755, Step::MountDev)?;
        check(
            mount(
                Some(c"tmpfs"),
                c"/dev",
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_STRICTATIME,
                Some(c"mode=755,size=65536k"),
            ),
            Step::MountDev,
        )?;
        for (path, major, minor) in DEVICES {
            // SAFETY: static NUL-terminated paths; plain syscalls.
            unsafe {
                if libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                ) != 0
                    || libc::chmod(path.as_ptr(), 0o666) != 0
                {
                    return Err(step_error(Step::MakeDevice));
                }
            }
        }
        mkdir(c"/dev/pts", 0o755, Step::MountDevpts)?;
        check(
            mount(
                Some(c"devpts"),
                c"/dev/pts",
                Some(c"devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
            ),
            Step::MountDevpts,
        )?;
        mkdir(c"/dev/shm", 0o1777, Step::MountShm)?;
        check(
            mount(
                Some(c"shm"),
                c"/dev/shm",
                Some(c"tmpfs"),
                nosuid_nodev_noexec,
                Some(c"mode=1777,size=65536k"),
            ),
            Step::MountShm,
        )?;
        mkdir(c"/dev/mqueue", 0o755, Step::MountShm)?;
        check(
            mount(
                Some(c"mqueue"),
                c"/dev/mqueue",
                Some(c"mqueue"),
                nosuid_nodev_noexec,
                None,
            ),
            Step::MountShm,
        )?;
        for (target, link) in DEV_LINKS {
            // SAFETY: static NUL-terminated strings.
            if unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } != 0 {
                return Err(step_error(Step::MakeDevice));
            }
        }
        Ok(())
    }

    fn mount_one(&self, m: &PreparedMount) -> io::Result<()> {
        let Some((target, parents)) = m.prefixes.split_last() else {
            return Err(step_error_with(Step::MakeMountTarget, libc::EINVAL));
        };
        for p in parents {
            mkdir(p, 0o755, Step::MakeMountTarget)?;
        }
        if m.file {
            touch(target, Step::MakeMountTarget)?;
        } else {
            mkdir(target, 0o755, Step::MakeMountTarget)?;
        }
        match &m.what {
            Prepared::Bind(fd) => {
                move_tree(fd, target, Step::MountBind)?;
                if m.readonly {
                    remount_readonly(target, 0)?;
                }
            }
            Prepared::Tmpfs(options) => {
                let ro = if m.readonly { libc::MS_RDONLY } else { 0 };
                check(
                    mount(
                        Some(c"tmpfs"),
                        target,
                        Some(c"tmpfs"),
                        libc::MS_NOSUID | libc::MS_NODEV | ro,
                        Some(options),
                    ),
                    Step::MountTmpfs,
                )?;
            }
        }
        Ok(())
    }

    /// Capabilities, no_new_privs, user, working directory and, with
    /// `--init`, the reaper (see the module docs). Runs in the forked child
    /// after the gate; returns in the process that goes on to `exec`.
    pub(crate) fn finish(&self) -> io::Result<()> {
        apply_creds(&self.creds)?;
        // SAFETY: NUL-terminated path valid for the call.
        check(
            unsafe { libc::chdir(self.workdir.as_ptr()) },
            Step::ChdirWorkdir,
        )?;
        if self.init {
            init_fork()?;
        }
        Ok(())
    }
}

/// Masks Docker's masked paths and makes its read-only paths read-only;
/// what the kernel does not have is skipped.
fn mask_paths() {
    for p in MASKED {
        if mount(Some(c"/dev/null"), p, None, libc::MS_BIND, None) != 0 && errno() == libc::ENOTDIR
        {
            mount(
                Some(c"tmpfs"),
                p,
                Some(c"tmpfs"),
                libc::MS_RDONLY,
                Some(c"size=0"),
            );
        }
    }
    for p in READONLY_PATHS {
        if mount(Some(p), p, None, libc::MS_BIND | libc::MS_REC, None) == 0 {
            let _ = remount_readonly(p, libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
        }
    }
}

/// Docker's default capabilities (bounding, permitted, effective; nothing
/// inheritable or ambient), no_new_privs, then groups, gid and uid (a
/// non-root uid loses its permitted and effective capabilities, as with
/// Docker).
pub(crate) fn apply_creds(creds: &Creds) -> io::Result<()> {
    for cap in 0..64u64 {
        if DEFAULT_CAPS & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if errno() == libc::EINVAL {
                // Past the kernel's last capability.
                break;
            }
            return Err(step_error(Step::Capabilities));
        }
    }
    // SAFETY: prctl with integer arguments only; fails harmlessly on
    // kernels without ambient capabilities.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = (DEFAULT_CAPS & 0xffff_ffff) as u32;
    let high = (DEFAULT_CAPS >> 32) as u32;
    let data = [
        Data {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        Data {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: a v3 header and the two data structs it requires, valid for
    // the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(step_error(Step::Capabilities));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step_error(Step::NoNewPrivs));
    }
    // Raw syscalls: they change this (only) thread's credentials, without
    // glibc's cross-thread broadcast.
    // SAFETY: pointer and length describe the prepared group list.
    if unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            creds.groups.len(),
            creds.groups.as_ptr(),
        )
    } != 0
    {
        return Err(step_error(Step::SetGroups));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresgid, creds.gid, creds.gid, creds.gid) } != 0 {
        return Err(step_error(Step::SetGid));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresuid, creds.uid, creds.uid, creds.uid) } != 0 {
        return Err(step_error(Step::SetUid));
    }
    Ok(())
}

/// Exits like a process that ended with wait status `status` would be seen
/// by a shell: its code, or 128 + the signal.
fn exit_as(status: libc::c_int) -> ! {
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    };
    // SAFETY: _exit is always safe.
    unsafe { libc::_exit(code) }
}

/// Closes every fd from 3 up (the caller keeps only stdio): in particular
/// std's exec-error pipe, so that `spawn` returns as soon as the process
/// that execs has done so.
fn close_from_3() {
    // SAFETY: close_range with integer arguments; fds of this process only.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        // Kernels before 5.9.
        for fd in 3..4096 {
            // SAFETY: closing fds of this (single-threaded) process.
            unsafe { libc::close(fd) };
        }
    }
}

/// `--init`: forks. The child (returning `Ok`) goes on to exec the command;
/// this process stays as the reaper: it forwards every signal to the
/// command, reaps every process that ends, and exits with the command's
/// status once it ended.
fn init_fork() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; the calls only fill it and set this
    // thread's mask.
    let (all, old) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        (all, old)
    };
    // SAFETY: this process is single-threaded (a forked child).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(step_error(Step::ForkInit));
    }
    if child == 0 {
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        return Ok(());
    }
    close_from_3();
    loop {
        // SAFETY: siginfo_t is plain data filled by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid set and out-pointer for the call.
        let sig = unsafe { libc::sigwaitinfo(&all, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: waits for any child of ours, without blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                exit_as(status);
            }
        }
    }
}

/// For `exec` in an image task, after joining its pid namespace (which
/// only the children of the caller enter): forks; the child (returning
/// `Ok`, in the task's pid namespace, dying with this process) goes on to
/// exec; this process waits for it and exits with its status.
pub(crate) fn relay_fork() -> io::Result<()> {
    // SAFETY: this process is single-threaded (a forked child).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(step_error(Step::ForkExec));
    }
    if child == 0 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(step_error(Step::ParentDeathSignal));
        }
        return Ok(());
    }
    close_from_3();
    loop {
        let mut status = 0;
        // SAFETY: waits for our child.
        let pid = unsafe { libc::waitpid(child, &mut status, 0) };
        if pid == child {
            exit_as(status);
        }
        if pid < 0 && errno() != libc::EINTR {
            // SAFETY: _exit is always safe.
            unsafe { libc::_exit(255) };
        }
    }
}

/// Reads this process's pid as `/proc` (the host's, before the child
/// mounts its own) sees it: in a new pid namespace, `getpid()` is 1.
pub(crate) fn host_pid() -> io::Result<libc::pid_t> {
    let mut buf = [0u8; 24];
    // SAFETY: static path, a stack buffer of the given length.
    let n = unsafe { libc::readlink(c"/proc/self".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let Ok(n) = usize::try_from(n) else {
        return Err(step_error(Step::HostPid));
    };
    let mut pid: libc::pid_t = 0;
    for b in &buf[..n.min(buf.len())] {
        if !b.is_ascii_digit() {
            return Err(step_error_with(Step::HostPid, libc::EINVAL));
        }
        pid = pid
            .saturating_mul(10)
            .saturating_add(libc::pid_t::from(b - b'0'));
    }
    if pid <= 1 {
        return Err(step_error_with(Step::HostPid, libc::EINVAL));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_caps_are_dockers() {
        assert_eq!(DEFAULT_CAPS, 0xa804_25fb);
    }

    #[test]
    fn few_plain_layers_are_named_directly_others_through_links() {
        let two = vec![
            PathBuf::from("/d/layers/a/diff"),
            PathBuf::from("/d/inits/b"),
        ];
        assert_eq!(
            lowerdir(&two),
            ("/d/inits/b:/d/layers/a/diff".into(), false)
        );
        let odd = vec![PathBuf::from("/d/a:b"), PathBuf::from("/d/c")];
        assert_eq!(lowerdir(&odd), ("l/1:l/0".into(), true));
        let relative = vec![PathBuf::from("layers/a")];
        assert_eq!(lowerdir(&relative), ("l/0".into(), true));
        let many: Vec<PathBuf> = (0..100)
            .map(|i| PathBuf::from(format!("/var/lib/mesh/images/layers/{i:064}/diff")))
            .collect();
        let (lower, links) = lowerdir(&many);
        assert!(links);
        assert!(lower.starts_with("l/99:l/98:") && lower.ends_with(":l/0"));
    }

    #[test]
    fn prefixes_of_a_path() {
        let p = prefixes(Path::new("/a/b/c")).expect("prefixes");
        let p: Vec<&str> = p.iter().map(|c| c.to_str().unwrap_or("")).collect();
        assert_eq!(p, ["/a", "/a/b", "/a/b/c"]);
        assert!(prefixes(Path::new("/")).expect("root").is_empty());
    }

    #[test]
    fn files_through_layers() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("0");
        let top = t.path().join("1");
        fs::create_dir_all(base.join("etc")).expect("mkdir");
        fs::create_dir_all(top.join("etc")).expect("mkdir");
        fs::write(base.join("etc/passwd"), "base").expect("write");
        fs::write(base.join("etc/group"), "base").expect("write");
        fs::write(top.join("etc/group"), "top").expect("write");
        fs::write(base.join("file"), "x").expect("write");
        fs::create_dir(top.join("file")).expect("mkdir");
        let layers = vec![base.clone(), top.clone()];
        let find = |p: &str| find_in_layers(&layers, Path::new(p));
        assert_eq!(find("etc/passwd"), Some(base.join("etc/passwd")));
        assert_eq!(find("etc/group"), Some(top.join("etc/group")));
        assert_eq!(find("etc/shadow"), None);
        // A directory above hides the file below.
        assert_eq!(find("file"), None);
        // A file above hides what is below it as a directory.
        fs::create_dir_all(base.join("a")).expect("mkdir");
        fs::write(base.join("a/b"), "x").expect("write");
        fs::write(top.join("a"), "file").expect("write");
        assert_eq!(find("a/b"), None);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_files() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: whiteouts and trusted xattrs need root");
            return;
        }
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("0");
        let top = t.path().join("1");
        for d in ["etc", "opt/app"] {
            fs::create_dir_all(base.join(d)).expect("mkdir");
            fs::create_dir_all(top.join(d)).expect("mkdir");
        }
        fs::write(base.join("etc/passwd"), "base").expect("write");
        fs::write(base.join("opt/app/conf"), "base").expect("write");
        let wh = CString::new(top.join("etc/passwd").as_os_str().as_bytes()).expect("cstring");
        let opaque = CString::new(top.join("opt").as_os_str().as_bytes()).expect("cstring");
        // SAFETY: NUL-terminated paths and a 1-byte value valid for the calls.
        unsafe {
            assert_eq!(
                libc::mknod(wh.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)),
                0
            );
            assert_eq!(
                libc::setxattr(
                    opaque.as_ptr(),
                    c"trusted.overlay.opaque".as_ptr(),
                    b"y".as_ptr().cast(),
                    1,
                    0
                ),
                0
            );
        }
        let layers = vec![base.clone(), top.clone()];
        assert_eq!(find_in_layers(&layers, Path::new("etc/passwd")), None);
        assert_eq!(find_in_layers(&layers, Path::new("opt/app/conf")), None);
        // Below the whiteout's layer only, the file is there.
        assert_eq!(
            find_in_layers(&layers[..1], Path::new("opt/app/conf")),
            Some(base.join("opt/app/conf"))
        );
        // A user resolved against a whited-out passwd falls back to root.
        let spec = RootfsSpec {
            layers,
            ..RootfsSpec::default()
        };
        assert_eq!(exec_user(&spec).map(|u| u.uid).ok(), Some(0));
    }
}
