//! On-disk task state: the layout of `<exec_root>/tasks/<id>/`, the records
//! the shim and the executor exchange through it, and atomic file writes
//! (temp file + `fsync` + `rename`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The task spec, written by `start`.
pub const SPEC_FILE: &str = "spec.json";
/// What the shim needs besides the spec (cgroup directories), written by
/// `start`.
pub const LAUNCH_FILE: &str = "launch.json";
/// Pids and start times, written by the shim once the command was exec'd.
pub const STATE_FILE: &str = "state.json";
/// The exit record, written by the shim when the command exited (or by the
/// executor when it finds the task dead and its shim gone).
pub const EXIT_FILE: &str = "exit.json";
/// A host-process task's `/etc/resolv.conf` (an image task's is made in memory).
pub const RESOLV_FILE: &str = "resolv.conf";
/// A host-process task's hostname.
pub const HOSTNAME_FILE: &str = "hostname";
/// The shim's own standard error (diagnostics).
pub const SHIM_LOG: &str = "shim.log";

/// Errors reading or writing task state files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A JSON file is corrupt or could not be encoded.
    #[error("invalid json in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StateError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> StateError {
        StateError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `state.json`: who runs the task. Start times are field 22 of
/// `/proc/<pid>/stat`, to tell a live process from a reused pid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    pub shim_pid: u32,
    pub shim_start_time: u64,
    pub pid: u32,
    pub pid_start_time: u64,
    pub started_at_ms: u64,
}

/// `exit.json`: how the task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub finished_at_ms: u64,
}

/// `launch.json`: the cgroup directories the task joins (v2 first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub cgroups: Vec<PathBuf>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory,
/// synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::io("write", path, e));
    }
    Ok(())
}

/// Writes a file of a task directory that nothing reads yet (a start in progress): a plain
/// write, as a directory left by a start that did not finish is removed whole.
pub fn write_fresh(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    fs::write(path, bytes).map_err(|e| StateError::io("write", path, e))
}

/// [`write_atomic`] of `value` as JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// Reads a JSON file; `Ok(None)` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::io("read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// The last `max` bytes of a file; empty if it does not exist.
pub fn read_tail(path: &Path, max: usize) -> Result<Vec<u8>, StateError> {
    let read = || -> io::Result<Vec<u8>> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let max64 = u64::try_from(max).unwrap_or(u64::MAX);
        f.seek(SeekFrom::Start(len.saturating_sub(max64)))?;
        let mut buf = Vec::new();
        f.take(max64).read_to_end(&mut buf)?;
        Ok(buf)
    };
    read().map_err(|e| StateError::io("read", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_json_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(EXIT_FILE);
        assert_eq!(read_json::<ExitRecord>(&p).expect("read"), None);
        let rec = ExitRecord {
            code: Some(3),
            signal: None,
            finished_at_ms: 42,
        };
        write_json(&p, &rec).expect("write");
        assert_eq!(read_json::<ExitRecord>(&p).expect("read"), Some(rec));
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(EXIT_FILE)]);
        fs::write(&p, b"{").expect("write");
        let err = read_json::<ExitRecord>(&p).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.starts_with("invalid json in ")));
    }

    #[test]
    fn tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        assert!(read_tail(&p, 10).expect("missing").is_empty());
        fs::write(&p, b"0123456789").expect("write");
        assert_eq!(read_tail(&p, 4).expect("tail"), b"6789");
        assert_eq!(read_tail(&p, 100).expect("tail"), b"0123456789");
        assert!(read_tail(&p, 0).expect("tail").is_empty());
    }
}
