//! Network namespaces: handles (open fds of nsfs files), named persistent
//! namespaces bind-mounted under a directory of ours (like `ip netns add`,
//! but under the daemon's exec root), and running code inside one.
//!
//! Namespace membership is per thread. Everything here that has to be
//! *inside* a namespace (creating it, running a closure, opening a netlink
//! socket) happens on a fresh OS thread that calls `setns`/`unshare` and then
//! exits, so no thread of the caller (tokio workers, the blocking pool) ever
//! changes namespace.
//!
//! The directory needs no special mount propagation: the bind mount of an
//! nsfs file onto a plain file works anywhere, and `delete` detaches it and
//! removes the file (since Linux 3.18, unlinking the file also detaches
//! copies of the mount that other mount namespaces hold). Unlike `ip netns`
//! we do not make the directory a shared mount: nothing of ours needs the
//! mounts to propagate into other mount namespaces.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;

use crate::NetlinkError;

/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The namespace file of the calling thread (not of the thread-group leader,
/// which `/proc/self` would name).
const THREAD_SELF_NET: &str = "/proc/thread-self/ns/net";

/// A handle to a network namespace: an open fd of its nsfs file. The
/// namespace lives at least as long as this handle.
pub struct Netns {
    fd: OwnedFd,
    name: String,
    path: Option<PathBuf>,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .field("fd", &self.fd.as_raw_fd())
            .field("path", &self.path)
            .finish()
    }
}

fn ns_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetlinkError + 'a {
    move |source| NetlinkError::Namespace {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Moves the calling thread into the network namespace `fd`.
pub(crate) fn setns_net(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads the fd number and flags; an invalid fd is
    // reported as EBADF/EINVAL, never undefined behaviour.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), NetlinkError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(NetlinkError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Runs `f` on a fresh OS thread and waits for it. The thread may change its
/// namespaces freely: it exits when `f` returns. A panic in `f` is resumed
/// in the caller.
fn on_fresh_thread<T: Send>(what: &str, f: impl FnOnce() -> T + Send) -> Result<T, io::Error> {
    thread::scope(|s| {
        let handle = thread::Builder::new()
            .name(format!("netns-{what}"))
            .spawn_scoped(s, f)?;
        match handle.join() {
            Ok(value) => Ok(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

impl Netns {
    /// Creates a named, persistent namespace: a new network namespace
    /// bind-mounted at `<dir>/<name>` (like `ip netns add`, under our own
    /// directory, which is created if missing). Fails if the name exists.
    pub fn create(dir: &Path, name: &str) -> Result<Netns, NetlinkError> {
        validate_name(name)?;
        fs::create_dir_all(dir).map_err(ns_err("create the directory of", dir))?;
        let path = dir.join(name);
        // The mount point. O_EXCL: two creators of one name cannot both win.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(ns_err("create", &path))?;

        let mounted = on_fresh_thread("create", || -> io::Result<()> {
            // SAFETY: unshare only affects the calling thread here (a
            // throwaway thread); it takes no pointers.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            bind_mount(Path::new(THREAD_SELF_NET), &path)
        })
        .and_then(|r| r);
        if let Err(source) = mounted {
            let _ = fs::remove_file(&path);
            return Err(NetlinkError::Namespace {
                op: "create",
                path,
                source,
            });
        }
        tracing::debug!(path = %path.display(), "created network namespace");
        match Netns::open(&path) {
            Ok(ns) => Ok(Netns {
                name: name.to_string(),
                ..ns
            }),
            Err(e) => {
                let _ = Netns::delete(dir, name);
                Err(e)
            }
        }
    }

    /// Opens an existing namespace file: a bind mount made by
    /// [`Netns::create`] (or `ip netns add`), or `/proc/<pid>/ns/net`.
    /// Fails if the file is not a network namespace (e.g. a leftover mount
    /// point whose bind mount is gone).
    pub fn open(path: &Path) -> Result<Netns, NetlinkError> {
        let file = File::open(path).map_err(ns_err("open", path))?;
        let fd = OwnedFd::from(file);
        check_net_ns(fd.as_fd()).map_err(ns_err("open", path))?;
        Ok(Netns {
            fd,
            name: display_name(path),
            path: Some(path.to_path_buf()),
        })
    }

    /// The network namespace of the calling thread (the "host" namespace of
    /// this daemon). Named `host` in error messages.
    pub fn current() -> Result<Netns, NetlinkError> {
        let path = Path::new(THREAD_SELF_NET);
        let file = File::open(path).map_err(ns_err("open", path))?;
        Ok(Netns {
            fd: OwnedFd::from(file),
            name: "host".to_string(),
            path: None,
        })
    }

    /// Unmounts and deletes a named namespace made by [`Netns::create`].
    /// Idempotent: a missing name is fine, and so is a plain file whose bind
    /// mount is already gone. The namespace itself disappears once the last
    /// fd, process and device holding it are gone.
    pub fn delete(dir: &Path, name: &str) -> Result<(), NetlinkError> {
        validate_name(name)?;
        let path = dir.join(name);
        let cpath = cstring(&path).map_err(ns_err("delete", &path))?;
        // A name mounted twice (stacked mounts) needs several detaches.
        for _ in 0..16 {
            // SAFETY: `cpath` is a valid NUL-terminated string that outlives
            // the call.
            let rc = unsafe { libc::umount2(cpath.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Not (or no longer) a mount point / no such file.
                Some(libc::EINVAL) | Some(libc::ENOENT) => break,
                _ => {
                    return Err(NetlinkError::Namespace {
                        op: "unmount",
                        path,
                        source: err,
                    })
                }
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "deleted network namespace");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetlinkError::Namespace {
                op: "delete",
                path,
                source,
            }),
        }
    }

    /// Names of the namespace files under `dir`, sorted (for garbage
    /// collection after a restart). A missing directory lists nothing.
    /// Entries are not checked: [`Netns::open`] tells a live namespace from
    /// a stale mount point.
    pub fn list(dir: &Path) -> Result<Vec<String>, NetlinkError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(NetlinkError::Namespace {
                    op: "list",
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ns_err("list", dir))?;
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The raw fd of the namespace (valid while `self` lives).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The name used in messages: the file name for a named namespace,
    /// the path for `/proc/...` files, `host` for [`Netns::current`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file this handle was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The namespace's inode number: two handles name the same namespace
    /// when their inodes are equal (`ls -i /proc/*/ns/net`, `lsns`).
    pub fn inode(&self) -> Result<u64, NetlinkError> {
        let file = File::from(
            self.fd
                .try_clone()
                .map_err(|source| NetlinkError::Namespace {
                    op: "stat",
                    path: PathBuf::from(&self.name),
                    source,
                })?,
        );
        let meta = file.metadata().map_err(|source| NetlinkError::Namespace {
            op: "stat",
            path: PathBuf::from(&self.name),
            source,
        })?;
        Ok(meta.ino())
    }

    /// A second handle to the same namespace (a duplicated fd).
    pub fn try_clone(&self) -> Result<Netns, NetlinkError> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|source| NetlinkError::Namespace {
                op: "duplicate",
                path: PathBuf::from(&self.name),
                source,
            })?;
        Ok(Netns {
            fd,
            name: self.name.clone(),
            path: self.path.clone(),
        })
    }

    /// Runs a blocking closure on a fresh OS thread inside this namespace
    /// and returns its result (for sockets that must live there, or
    /// commands: a process spawned from `f` starts in this namespace). A
    /// panic in `f` is resumed in the caller. From async code, call it
    /// through `tokio::task::spawn_blocking`.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetlinkError> {
        let fd = self.fd.as_raw_fd();
        let res = on_fresh_thread("run", move || -> io::Result<T> {
            setns_net(fd)?;
            Ok(f())
        })
        .and_then(|r| r);
        res.map_err(|source| NetlinkError::Namespace {
            op: "enter",
            path: PathBuf::from(&self.name),
            source,
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Netns {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `Netns` name for a file: the file name, except under `/proc` where the
/// whole path says more (`/proc/42/ns/net`).
fn display_name(path: &Path) -> String {
    if path.starts_with("/proc") {
        return path.display().to_string();
    }
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn cstring(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a nul byte"))
}

fn bind_mount(src: &Path, dst: &Path) -> io::Result<()> {
    let csrc = cstring(src)?;
    let cdst = cstring(dst)?;
    // SAFETY: both strings are valid and NUL-terminated for the duration of
    // the call; fstype and data may be NULL for a bind mount.
    let rc = unsafe {
        libc::mount(
            csrc.as_ptr(),
            cdst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ok if `fd` is an nsfs file of a network namespace.
fn check_net_ns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only inspects the fd; a
    // non-nsfs fd yields ENOTTY.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOTTY) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a namespace file (is the bind mount gone?)",
            ));
        }
        return Err(err);
    }
    if rc != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_file_names() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(matches!(
                validate_name(bad),
                Err(NetlinkError::InvalidName(_))
            ));
        }
        validate_name("ov-4096").unwrap();
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name(Path::new("/run/mesh/netns/ov-1")), "ov-1");
        assert_eq!(
            display_name(Path::new("/proc/42/ns/net")),
            "/proc/42/ns/net"
        );
    }

    #[test]
    fn list_of_missing_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Netns::list(&dir.path().join("nope")).unwrap().is_empty());
        fs::write(dir.path().join("b"), "").unwrap();
        fs::write(dir.path().join("a"), "").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(Netns::list(dir.path()).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn open_rejects_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale");
        fs::write(&path, "").unwrap();
        let err = Netns::open(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot open network namespace "),
            "{err}"
        );
        // Deleting a stale entry (no mount) is fine, twice.
        Netns::delete(dir.path(), "stale").unwrap();
        Netns::delete(dir.path(), "stale").unwrap();
        assert!(!path.exists());
    }
}
