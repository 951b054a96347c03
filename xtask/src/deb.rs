//! `cargo xtask deb`: the Debian package `mesh` (release `meshd` and `mesh`, the systemd unit
//! `packaging/meshd.service`, the README), built with `dpkg-deb` into `target/deb/`.
//!
//! Installed, `meshd` runs as the service `meshd` (`systemctl enable --now meshd`), reading
//! `/etc/mesh/daemon.json` if it exists; nothing is started by the installation itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The unit file, relative to the workspace.
pub const UNIT: &str = "packaging/meshd.service";

/// How the package is compressed (`dpkg-deb -Z`).
#[derive(Clone, Copy)]
pub enum Compression {
    /// xz, for a release.
    Best,
    /// gzip -1, for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Fast,
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    crate::sh(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--bin",
        "meshd",
        "--bin",
        "mesh",
    ]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target.join("release");
    let deb = build(
        root,
        &release.join("meshd"),
        &release.join("mesh"),
        &target.join("deb"),
        Compression::Best,
    )?;
    println!("{}", deb.display());
    Ok(())
}

/// Stages the package's tree under `out` and builds `out/mesh_<version>_<arch>.deb` from
/// `meshd` and `mesh` (copied without their debug sections); returns its path.
pub fn build(
    root: &Path,
    meshd: &Path,
    mesh: &Path,
    out: &Path,
    compression: Compression,
) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no Debian architecture for {other}"),
    };
    let name = format!("mesh_{version}_{arch}");
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let bin = stage.join("usr/bin");
    let unit_dir = stage.join("lib/systemd/system");
    let doc = stage.join("usr/share/doc/mesh");
    let control = stage.join("DEBIAN");
    for d in [&bin, &unit_dir, &doc, &control] {
        std::fs::create_dir_all(d)?;
    }
    for (from, to) in [(meshd, "meshd"), (mesh, "mesh")] {
        let dest = bin.join(to);
        std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        // Debug sections are most of a debug build: dropped (a release build has none).
        if crate::have("strip") {
            crate::sh(Command::new("strip").arg("--strip-debug").arg(&dest))?;
        }
    }
    std::fs::copy(root.join(UNIT), unit_dir.join("meshd.service"))?;
    std::fs::copy(root.join("README.md"), doc.join("README.md"))?;
    let size_kb: u64 = walk_size(&stage)? / 1024;
    std::fs::write(
        control.join("control"),
        format!(
            "Package: mesh\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: mesh developers <mesh@localhost>\n\
             Installed-Size: {size_kb}\n\
             Depends: iproute2, nftables\n\
             Recommends: curl\n\
             Section: admin\n\
             Priority: optional\n\
             Description: Swarm-mode networking and orchestration daemon\n \
             meshd forms a cluster of hosts as Docker Swarm mode does: overlay networks,\n \
             service VIPs, a routing mesh and an embedded DNS, driven by the mesh CLI or\n \
             the docker CLI. Enable it with: systemctl enable --now meshd\n"
        ),
    )?;
    let deb = out.join(format!("{name}.deb"));
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--build").arg("--root-owner-group");
    match compression {
        Compression::Best => cmd.arg("-Zxz"),
        Compression::Fast => cmd.args(["-Zgzip", "-z1"]),
    };
    crate::sh(cmd.arg(&stage).arg(&deb))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(deb)
}

fn walk_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            walk_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The package built from the test binaries: its metadata; installed by `dpkg -i` into a
    /// scratch root with a dpkg database of its own (`--root`, so this machine's `/usr` is not
    /// touched), its binaries run and its unit is accepted by systemd without a warning;
    /// `dpkg -r` then takes every file away again.
    #[test]
    fn the_package_holds_a_working_daemon_and_its_unit() -> anyhow::Result<()> {
        if !crate::have("dpkg-deb") || !crate::have("systemd-analyze") {
            if std::env::var_os("CI").is_some() {
                bail!("dpkg-deb and systemd-analyze are needed (the dpkg and systemd packages)");
            }
            eprintln!("skipping: no dpkg-deb or systemd-analyze");
            return Ok(());
        }
        let bins = mesh_netns::binaries()?;
        let tmp = std::env::temp_dir().join(format!("mesh-deb-test-{}", std::process::id()));
        let _clean = Remove(tmp.clone());
        let deb = build(
            &crate::root(),
            &bins.meshd,
            &bins.mesh,
            &tmp,
            Compression::Fast,
        )?;
        let info = Command::new("dpkg-deb").arg("--info").arg(&deb).output()?;
        let info = String::from_utf8_lossy(&info.stdout);
        anyhow::ensure!(
            info.contains("Package: mesh")
                && info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION")))
                && info.contains("Depends: iproute2, nftables"),
            "dpkg-deb --info: {info}"
        );
        let root = tmp.join("root");
        let admin = root.join("var/lib/dpkg");
        for d in ["info", "updates", "triggers"] {
            std::fs::create_dir_all(admin.join(d))?;
        }
        std::fs::write(admin.join("status"), "")?;
        std::fs::write(admin.join("available"), "")?;
        let dpkg = |args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new("dpkg")
                .arg(format!("--root={}", root.display()))
                .args(args)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "dpkg {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        // The scratch root's database has neither iproute2 nor nftables.
        dpkg(&["--force-depends", "-i", &deb.to_string_lossy()])?;
        let status = dpkg(&["-s", "mesh"])?;
        anyhow::ensure!(
            status.contains("Status: install ok installed"),
            "dpkg -s mesh: {status}"
        );
        let files = dpkg(&["-L", "mesh"])?;
        for f in [
            "/usr/bin/meshd",
            "/usr/bin/mesh",
            "/lib/systemd/system/meshd.service",
        ] {
            anyhow::ensure!(files.lines().any(|l| l == f), "dpkg -L lacks {f}: {files}");
        }
        for (bin, want) in [("meshd", "meshd "), ("mesh", "mesh ")] {
            let out = Command::new(root.join("usr/bin").join(bin))
                .arg("--version")
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                out.status.success() && text.starts_with(want),
                "{bin} --version: {text}"
            );
        }
        // The unit as installed, pointed at the extracted daemon: no error, no warning.
        let unit = std::fs::read_to_string(root.join("lib/systemd/system/meshd.service"))?;
        for want in ["KillMode=process", "Delegate=yes", "Restart=always"] {
            anyhow::ensure!(unit.contains(want), "the unit lacks {want}");
        }
        let meshd = root.join("usr/bin/meshd");
        let unit_path = tmp.join("meshd.service");
        std::fs::write(
            &unit_path,
            unit.replace("/usr/bin/meshd", &meshd.to_string_lossy()),
        )?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify: {err}"
        );
        dpkg(&["-r", "mesh"])?;
        for f in [
            "usr/bin/meshd",
            "usr/bin/mesh",
            "lib/systemd/system/meshd.service",
        ] {
            anyhow::ensure!(!root.join(f).exists(), "{f} left after dpkg -r");
        }
        Ok(())
    }

    /// Removes a directory on drop.
    struct Remove(PathBuf);

    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
