//! Locating (and building) the `meshd` and `mesh` binaries under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{describe, kill_and_reap, wait_timeout};

/// The workspace root, fixed at compile time.
const WORKSPACE_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Upper bound for the on-demand `cargo build` (a cold build on a small CI
/// machine is slow, but it must not hang forever).
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The daemon, `meshd`.
    pub meshd: PathBuf,
    /// The CLI, `mesh`.
    pub mesh: PathBuf,
}

/// Locates `meshd` and `mesh` for the current test/bench/xtask process.
///
/// Once per process, this runs `$CARGO build -p meshd -p mesh-cli` (plain
/// `cargo` when `CARGO` is unset) in the workspace root, with the profile and
/// target directory of the running executable, so the binaries are never
/// stale; it then returns `<target>/<profile>/{meshd,mesh}`.
///
/// If `MESH_BIN_DIR` is set, nothing is built and the binaries are taken from
/// that directory.
///
/// The result (also a failure) is cached for the life of the process;
/// concurrent callers wait for the single build.
pub fn binaries() -> Result<&'static Binaries> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn locate() -> Result<Binaries> {
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        let dir = PathBuf::from(dir);
        let dir = dir
            .canonicalize()
            .with_context(|| format!("MESH_BIN_DIR={}", dir.display()))?;
        return existing(&dir);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = profile_dir(&exe)?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("no target dir above {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad profile dir {}", profile_dir.display()))?;

    let workspace = Path::new(WORKSPACE_ROOT)
        .canonicalize()
        .with_context(|| format!("workspace root {WORKSPACE_ROOT}"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "-p", "meshd", "-p", "mesh-cli", "--target-dir"])
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let desc = describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
    let status = match wait_timeout(&mut child, BUILD_TIMEOUT)? {
        Some(status) => status,
        None => {
            let _ = kill_and_reap(&mut child);
            bail!("`{desc}` did not finish within {BUILD_TIMEOUT:?}");
        }
    };
    if !status.success() {
        bail!("`{desc}` failed with {status}");
    }
    existing(&profile_dir)
}

/// The cargo profile output dir (`target/<profile>`) containing `exe`:
/// tests and benches live in `<profile>/deps`, examples in
/// `<profile>/examples`, binaries directly in `<profile>`.
fn profile_dir(exe: &Path) -> Result<PathBuf> {
    let parent = exe
        .parent()
        .ok_or_else(|| anyhow!("no parent dir for {}", exe.display()))?;
    let dir = match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => parent.parent().unwrap_or(parent),
        _ => parent,
    };
    Ok(dir.to_path_buf())
}

fn existing(dir: &Path) -> Result<Binaries> {
    let bins = Binaries {
        meshd: dir.join("meshd"),
        mesh: dir.join("mesh"),
    };
    for p in [&bins.meshd, &bins.mesh] {
        if !p.is_file() {
            bail!("binary {} does not exist", p.display());
        }
    }
    Ok(bins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_of_test_bench_and_bin() {
        assert_eq!(
            profile_dir(Path::new("/w/target/debug/deps/foo-123")).unwrap(),
            Path::new("/w/target/debug")
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/release/examples/ex")).unwrap(),
            Path::new("/w/target/release")
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/release/xtask")).unwrap(),
            Path::new("/w/target/release")
        );
    }
}
