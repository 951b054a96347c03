//! Layer unpacking into a directory usable as an overlayfs lower dir.
//!
//! The tar stream is read with the `tar` crate, but the file system work is done here, entry
//! by entry, because a lower dir needs what a plain extraction does not give: an AUFS-style
//! whiteout `.wh.NAME` becomes a character device 0/0 named `NAME`, an opaque marker
//! `.wh..wh..opq` becomes the xattr `trusted.overlay.opaque=y` on its directory (as Docker's
//! overlay2 driver does), and device nodes, fifos, owners, modes, mtimes (directories' too)
//! and `SCHILY.xattr.*` attributes are kept.
//!
//! Safety: an entry whose path is absolute or has a `..` component, or whose parent path goes
//! through a symbolic link, is refused, as is a hard link to such a path; the whole layer
//! then fails. The caller unpacks into a fresh temporary directory and renames it into place
//! only when the stream's digests matched.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};

use crate::digest::{mismatch, HashingReader};
use crate::error::{ImageError, IoContext};

/// The AUFS whiteout prefix used in image layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The opaque-directory marker.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// The overlayfs xattr that marks a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What unpacking a layer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Sum of the regular files' sizes.
    pub size: u64,
}

/// Unpacks the (possibly gzip- or zstd-compressed, detected from its first bytes) layer
/// `blob` into the existing empty directory `dest`, checking the compressed stream against
/// `blob_digest` (when given) and the uncompressed one against `diff_id`.
pub fn unpack_layer(
    blob: impl Read,
    blob_digest: Option<&str>,
    diff_id: &str,
    dest: &Path,
) -> Result<Unpacked, ImageError> {
    let mut compressed = HashingReader::new(blob);
    let (size, actual_diff) = {
        let mut buffered = BufReader::with_capacity(256 * 1024, &mut compressed);
        let head = buffered.fill_buf().ctx("reading layer", dest)?;
        let plain: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .ctx("reading zstd layer", dest)?,
            )
        } else {
            Box::new(buffered)
        };
        let mut plain = HashingReader::new(plain);
        let size = unpack_tar(&mut plain, dest)?;
        let (diff, _) = plain.finish().ctx("reading layer", dest)?;
        (size, diff)
    };
    let (actual_blob, _) = compressed.finish().ctx("reading layer", dest)?;
    if let Some(expected) = blob_digest {
        if actual_blob != expected {
            return Err(mismatch("layer", expected, &actual_blob));
        }
    }
    if actual_diff != diff_id {
        return Err(mismatch(
            &format!("layer {}", blob_digest.unwrap_or(diff_id)),
            diff_id,
            &actual_diff,
        ));
    }
    Ok(Unpacked { size })
}

/// Unpacks an uncompressed tar stream into `root`, returning the regular files' total size.
pub fn unpack_tar(reader: impl Read, root: &Path) -> Result<u64, ImageError> {
    let bad = |e: io::Error| ImageError::Invalid(format!("invalid layer tar stream: {e}"));
    let mut archive = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, i64)> = Vec::new();
    let mut size = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.into_owned();
        let rel = safe_relative(&raw)?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            continue; // "./": the layer root itself
        };
        let parent = root.join(rel.parent().unwrap_or(Path::new("")));
        ensure_parent(root, &parent, &raw)?;
        let header = entry.header().clone();
        let mtime = header.mtime().map_err(bad)? as i64;
        let name_bytes = name.as_bytes();

        if name_bytes == WHITEOUT_OPAQUE.as_bytes() {
            rustix::fs::lsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(io::Error::from)
                .ctx("setting opaque xattr on", &parent)?;
            continue;
        }
        if name_bytes.starts_with(b".wh..wh.") {
            continue; // AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): no meaning for overlayfs
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let target = parent.join(OsStr::from_bytes(hidden));
            remove_existing(&target)?;
            rustix::fs::mknodat(
                CWD,
                &target,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(io::Error::from)
            .ctx("creating whiteout", &target)?;
            set_owner(&target, &header)?;
            continue;
        }

        let dst = root.join(&rel);
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dst) {
                    Ok(m) if m.is_dir() => {}
                    _ => {
                        remove_existing(&dst)?;
                        fs::create_dir(&dst).ctx("creating directory", &dst)?;
                    }
                }
                set_meta(&dst, &header, &mut entry, false)?;
                dirs.push((dst, mtime));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_existing(&dst)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dst)
                    .ctx("creating", &dst)?;
                size += io::copy(&mut entry, &mut f).ctx("writing", &dst)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| refused(&raw, "symlink without a target"))?
                    .into_owned();
                remove_existing(&dst)?;
                std::os::unix::fs::symlink(&target, &dst).ctx("creating symlink", &dst)?;
                set_meta(&dst, &header, &mut entry, true)?;
                set_mtime(&dst, mtime)?;
                continue;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| refused(&raw, "hard link without a target"))?
                    .into_owned();
                let target_rel = safe_relative(&target_raw)?;
                let target = root.join(&target_rel);
                if let Some(p) = target.parent() {
                    check_no_symlink(root, p, &target_raw)?;
                }
                if fs::symlink_metadata(&target).is_err() {
                    return Err(refused(
                        &raw,
                        &format!("hard link to {} not in the layer", target_raw.display()),
                    ));
                }
                if target != dst {
                    remove_existing(&dst)?;
                    fs::hard_link(&target, &dst).ctx("creating hard link", &dst)?;
                }
                continue; // a hard link shares its target's metadata
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                // Some writers leave a fifo's device fields blank.
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                remove_existing(&dst)?;
                rustix::fs::mknodat(
                    CWD,
                    &dst,
                    ft,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(io::Error::from)
                .ctx("creating device node", &dst)?;
            }
            tar::EntryType::XGlobalHeader => continue,
            other => {
                return Err(ImageError::Invalid(format!(
                    "unsupported tar entry type {other:?} for {}",
                    raw.display()
                )))
            }
        }
        set_meta(&dst, &header, &mut entry, false)?;
        set_mtime(&dst, mtime)?;
    }
    // Directory mtimes last, deepest first: creating their entries changed them.
    for (dir, mtime) in dirs.iter().rev() {
        set_mtime(dir, *mtime)?;
    }
    Ok(size)
}

/// The value of xattr `name` of `path` (not following a symlink), if it has one.
pub fn read_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).ok()?;
    Some(buf[..n].to_vec())
}

fn refused(path: &Path, why: &str) -> ImageError {
    ImageError::Invalid(format!("refusing layer entry {}: {why}", path.display()))
}

/// The entry's path relative to the layer root; absolute paths and `..` are refused.
pub(crate) fn safe_relative(path: &Path) -> Result<PathBuf, ImageError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, "absolute path escapes the layer root"))
            }
            Component::ParentDir => return Err(refused(path, "'..' escapes the layer root")),
        }
    }
    Ok(out)
}

/// Creates the missing directories of `parent` (0755, as Docker does) after checking that
/// no existing component is a symbolic link or a non-directory.
fn ensure_parent(root: &Path, parent: &Path, raw: &Path) -> Result<(), ImageError> {
    let rel = parent.strip_prefix(root).unwrap_or(Path::new(""));
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(raw, "path goes through a symbolic link"))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused(raw, "parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).ctx("creating directory", &cur)?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).ctx("chmod", &cur)?;
            }
            Err(e) => return Err(ImageError::io("stat", &cur, e)),
        }
    }
    Ok(())
}

/// Like [`ensure_parent`] but creates nothing: `dir` must exist without symlinks.
fn check_no_symlink(root: &Path, dir: &Path, raw: &Path) -> Result<(), ImageError> {
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused(raw, "hard link goes through a symbolic link")),
            Err(_) => return Err(refused(raw, "hard link target not in the layer")),
        }
    }
    Ok(())
}

/// Removes whatever is at `p` (a later entry replaces an earlier one).
fn remove_existing(p: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).ctx("removing", p),
        Ok(_) => fs::remove_file(p).ctx("removing", p),
        Err(_) => Ok(()),
    }
}

fn set_owner(p: &Path, h: &tar::Header) -> Result<(), ImageError> {
    let uid = h.uid().unwrap_or(0) as u32;
    let gid = h.gid().unwrap_or(0) as u32;
    rustix::fs::chownat(
        CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
    .ctx("chown", p)
}

/// Owner first (a chown clears set-uid bits), then mode, then xattrs.
fn set_meta<R: Read>(
    p: &Path,
    h: &tar::Header,
    entry: &mut tar::Entry<'_, R>,
    symlink: bool,
) -> Result<(), ImageError> {
    set_owner(p, h)?;
    if !symlink {
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).ctx("chmod", p)?;
    }
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                rustix::fs::lsetxattr(
                    p,
                    OsStr::from_bytes(key),
                    ext.value_bytes(),
                    XattrFlags::empty(),
                )
                .map_err(io::Error::from)
                .ctx(
                    &format!("setting xattr {}", String::from_utf8_lossy(key)),
                    p,
                )?;
            }
        }
    }
    Ok(())
}

fn set_mtime(p: &Path, mtime: i64) -> Result<(), ImageError> {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        p,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
    .ctx("setting mtime of", p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A scratch directory removed on drop.
    pub(crate) struct Scratch(pub PathBuf);
    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "mesh-image-unit-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn require_root() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (mknod of whiteouts, trusted.* xattrs); run the tests as root"
        );
    }

    /// Builds a tar stream from (path, kind, body/link) entries.
    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(1000);
            h.set_gid(1001);
            h.set_mtime(1_600_000_000);
            if *kind == tar::EntryType::Char {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            }
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, body).unwrap();
                }
                _ => {
                    h.set_size(body.len() as u64);
                    // append_data refuses `..`, so write the name bytes directly.
                    let name = h.as_old_mut();
                    name.name[..path.len()].copy_from_slice(path.as_bytes());
                    h.set_cksum();
                    b.append(&h, body.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_devices_and_opaque_markers_xattrs() {
        require_root();
        let s = Scratch::new("wh");
        let layer = tar_of(&[
            ("etc/", tar::EntryType::Directory, ""),
            ("etc/.wh.motd", tar::EntryType::Regular, ""),
            ("var/", tar::EntryType::Directory, ""),
            ("var/cache/", tar::EntryType::Directory, ""),
            ("var/cache/.wh..wh..opq", tar::EntryType::Regular, ""),
            ("var/cache/new", tar::EntryType::Regular, "fresh"),
            ("bin/", tar::EntryType::Directory, ""),
            ("bin/sh", tar::EntryType::Regular, "#!"),
            ("bin/ash", tar::EntryType::Link, "bin/sh"),
            ("bin/busybox", tar::EntryType::Symlink, "/bin/sh"),
            ("dev-null", tar::EntryType::Char, ""),
            ("pipe", tar::EntryType::Fifo, ""),
            (".wh..wh.plnk", tar::EntryType::Regular, ""),
        ]);
        let root = s.0.join("diff");
        fs::create_dir(&root).unwrap();
        let diff = sha256(&layer);
        let got = unpack_layer(&layer[..], None, &diff, &root).unwrap();
        assert_eq!(got.size, "fresh".len() as u64 + 2);

        let wh = fs::symlink_metadata(root.join("etc/motd")).unwrap();
        assert!(wh.file_type().is_char_device(), "{wh:?}");
        assert_eq!(wh.rdev(), 0);
        assert!(!root.join("etc/.wh.motd").exists());

        assert_eq!(
            read_xattr(&root.join("var/cache"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(!root.join("var/cache/.wh..wh..opq").exists());
        assert_eq!(
            fs::read_to_string(root.join("var/cache/new")).unwrap(),
            "fresh"
        );

        let sh = fs::metadata(root.join("bin/sh")).unwrap();
        let ash = fs::metadata(root.join("bin/ash")).unwrap();
        assert_eq!(sh.ino(), ash.ino(), "hard link shares the inode");
        assert_eq!(
            (sh.uid(), sh.gid(), sh.mode() & 0o7777),
            (1000, 1001, 0o644)
        );
        assert_eq!(sh.mtime(), 1_600_000_000);
        assert_eq!(
            fs::read_link(root.join("bin/busybox")).unwrap(),
            Path::new("/bin/sh")
        );
        assert_eq!(
            fs::symlink_metadata(root.join("bin/busybox"))
                .unwrap()
                .uid(),
            1000
        );
        assert_eq!(
            fs::metadata(root.join("bin")).unwrap().mtime(),
            1_600_000_000
        );
        let null = fs::symlink_metadata(root.join("dev-null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert!(fs::symlink_metadata(root.join("pipe"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(!root.join(".wh..wh.plnk").exists());
    }

    #[test]
    fn entries_escaping_the_root_are_refused() {
        let s = Scratch::new("esc");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                tar_of(&[("../escaped", tar::EntryType::Regular, "x")]),
            ),
            (
                "inner dotdot",
                tar_of(&[("a/../../escaped", tar::EntryType::Regular, "x")]),
            ),
            (
                "absolute",
                tar_of(&[("/escaped", tar::EntryType::Regular, "x")]),
            ),
            (
                "through symlink",
                tar_of(&[
                    ("link", tar::EntryType::Symlink, ".."),
                    ("link/escaped", tar::EntryType::Regular, "x"),
                ]),
            ),
            (
                "through absolute symlink",
                tar_of(&[
                    ("etc", tar::EntryType::Symlink, "/etc"),
                    ("etc/escaped", tar::EntryType::Regular, "x"),
                ]),
            ),
            (
                "hard link out",
                tar_of(&[("h", tar::EntryType::Link, "../outside")]),
            ),
            (
                "hard link through symlink",
                tar_of(&[
                    ("up", tar::EntryType::Symlink, ".."),
                    ("h", tar::EntryType::Link, "up/outside"),
                ]),
            ),
            (
                "whiteout out",
                tar_of(&[("../.wh.outside", tar::EntryType::Regular, "")]),
            ),
        ];
        fs::write(s.0.join("outside"), "keep").unwrap();
        for (i, (what, layer)) in cases.iter().enumerate() {
            let root = s.0.join(format!("root{i}"));
            fs::create_dir(&root).unwrap();
            let e = unpack_tar(&layer[..], &root).expect_err(what);
            assert!(matches!(e, ImageError::Invalid(_)), "{what}: {e:?}");
            assert!(
                e.to_string().starts_with("refusing layer entry"),
                "{what}: {e}"
            );
            assert!(!s.0.join("escaped").exists(), "{what}");
            assert_eq!(
                fs::read_to_string(s.0.join("outside")).unwrap(),
                "keep",
                "{what}"
            );
        }
        assert!(!Path::new("/escaped").exists());
        assert!(!Path::new("/etc/escaped").exists());
    }

    #[test]
    fn gzip_and_zstd_layers_are_checked_against_both_digests() {
        let s = Scratch::new("comp");
        let layer = tar_of(&[("hello", tar::EntryType::Regular, "world")]);
        let diff = sha256(&layer);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&layer[..], 1).unwrap();
        for (i, blob) in [&layer, &gz, &zst].into_iter().enumerate() {
            let root = s.0.join(format!("ok{i}"));
            fs::create_dir(&root).unwrap();
            unpack_layer(&blob[..], Some(&sha256(blob)), &diff, &root).unwrap();
            assert_eq!(fs::read_to_string(root.join("hello")).unwrap(), "world");
        }

        // A blob that is not what the manifest named.
        let root = s.0.join("bad-blob");
        fs::create_dir(&root).unwrap();
        let e = unpack_layer(&gz[..], Some(&sha256(b"other")), &diff, &root).unwrap_err();
        assert!(matches!(e, ImageError::Verification(_)), "{e:?}");

        // A layer whose content is not its config's diff_id.
        let root = s.0.join("bad-diff");
        fs::create_dir(&root).unwrap();
        let e = unpack_layer(&gz[..], Some(&sha256(&gz)), &sha256(b"x"), &root).unwrap_err();
        assert!(matches!(e, ImageError::Verification(_)), "{e:?}");
        assert!(e.to_string().contains("verification failed"), "{e}");
    }
}
