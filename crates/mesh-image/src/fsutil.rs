//! Crash-safe file system steps: atomic writes (temp file, fsync, rename, fsync of the
//! directory), durable renames, and unique temporary names.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ImageError, IoContext};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique in this process and among processes: `PREFIX-PID-N`.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsyncs a directory, so that a rename or creation in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx("fsync", dir)
}

/// Writes `data` to `path` atomically: a temp file beside it, fsync, rename, fsync the dir.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(".{}", unique("tmp")));
    let result = (|| {
        let mut f = fs::File::create(&tmp).ctx("creating", &tmp)?;
        f.write_all(data).ctx("writing", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, path).ctx("renaming into", path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes the whole file system holding `path` (one `syncfs` instead of an fsync per file
/// of an unpacked layer).
pub(crate) fn sync_fs(path: &Path) -> Result<(), ImageError> {
    let f = fs::File::open(path).ctx("opening", path)?;
    rustix::fs::syncfs(&f)
        .map_err(std::io::Error::from)
        .ctx("syncfs", path)
}
