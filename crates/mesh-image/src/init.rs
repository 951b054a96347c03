//! An image's init layer: the mount points every task of the image needs, made once per
//! image and stacked as the topmost lower layer of every task's overlay (Docker's `-init`
//! layer, which Docker makes per container).
//!
//! A task's root filesystem gets `/proc`, `/sys` and `/dev` mounted on it and
//! `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` bound over files. When the image
//! lacks them, the executor must create them in the task's upper directory: seven more
//! inodes per task, a copy-up of `/etc`, and as many to delete when the task goes. With
//! them already in a lower layer, a task start only looks them up.
//!
//! Only what fits the image goes in: a name the image has as something else than a
//! directory (a `/etc` symlink, say) is left out, so the image's own entry stays visible
//! and the executor handles it as it would without this layer. `/etc` keeps the mode and
//! owner the image gives it (the topmost layer's directory decides them in the overlay).
//! The three files are empty: they are only mount points, always covered by a bind mount.

use std::fs;
use std::os::unix::fs::{chown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

/// Directories at the root: name and mode when the image does not have them.
const DIRS: [(&str, u32); 4] = [
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("etc", 0o755),
];

/// Empty files under `etc`.
const ETC_FILES: [&str; 3] = ["hosts", "hostname", "resolv.conf"];

/// What the image shows at a name of its root, looked up from the topmost layer down.
enum Entry {
    Absent,
    Dir(fs::Metadata),
    Other,
}

/// An overlay whiteout: a character device 0/0.
fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn entry(layers: &[PathBuf], name: &str) -> Entry {
    for layer in layers.iter().rev() {
        match fs::symlink_metadata(layer.join(name)) {
            Ok(md) if is_whiteout(&md) => return Entry::Absent,
            Ok(md) if md.is_dir() => return Entry::Dir(md),
            Ok(_) => return Entry::Other,
            Err(_) => continue,
        }
    }
    Entry::Absent
}

/// Builds the init layer of an image of `layers` (base first) in `dir`, which must not
/// exist (the caller renames it into place).
pub(crate) fn build(dir: &Path, layers: &[PathBuf]) -> Result<(), ImageError> {
    fs::create_dir(dir).ctx("creating", dir)?;
    for (name, mode) in DIRS {
        let md = match entry(layers, name) {
            Entry::Other => continue,
            Entry::Absent => None,
            Entry::Dir(md) => Some(md),
        };
        let p = dir.join(name);
        fs::create_dir(&p).ctx("creating", &p)?;
        let mode = md.as_ref().map_or(mode, |m| m.mode() & 0o7777);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).ctx("setting the mode of", &p)?;
        if let Some(m) = &md {
            chown(&p, Some(m.uid()), Some(m.gid())).ctx("setting the owner of", &p)?;
        }
        if name == "etc" {
            for f in ETC_FILES {
                let p = p.join(f);
                fs::write(&p, b"").ctx("creating", &p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                    .ctx("setting the mode of", &p)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn mount_points_the_image_lacks_are_made() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        fs::create_dir_all(base.join("bin")).unwrap();
        let init = t.path().join("init");
        build(&init, &[base]).unwrap();
        for d in ["proc", "sys", "dev", "etc"] {
            assert!(init.join(d).is_dir(), "{d}");
        }
        assert_eq!(mode(&init.join("proc")), 0o555);
        assert_eq!(mode(&init.join("etc")), 0o755);
        for f in ETC_FILES {
            let md = fs::symlink_metadata(init.join("etc").join(f)).unwrap();
            assert!(md.is_file() && md.len() == 0, "{f}");
        }
    }

    #[test]
    fn the_images_etc_keeps_its_mode_and_a_non_directory_is_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        let top = t.path().join("top");
        fs::create_dir_all(base.join("etc")).unwrap();
        fs::set_permissions(base.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::create_dir_all(&top).unwrap();
        // The top layer makes /dev a symlink: the init layer must not hide it.
        symlink("/somewhere", top.join("dev")).unwrap();
        let init = t.path().join("init");
        build(&init, &[base, top]).unwrap();
        assert_eq!(mode(&init.join("etc")), 0o750);
        assert!(init.join("etc/hosts").is_file());
        assert!(fs::symlink_metadata(init.join("dev")).is_err());
        assert!(init.join("proc").is_dir());
    }

    #[test]
    fn an_etc_symlink_gets_no_files() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        fs::create_dir_all(&base).unwrap();
        symlink("usr/etc", base.join("etc")).unwrap();
        let init = t.path().join("init");
        build(&init, &[base]).unwrap();
        assert!(fs::symlink_metadata(init.join("etc")).is_err());
        assert!(init.join("sys").is_dir());
    }
}
