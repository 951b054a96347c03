//! `Store::load`: images from `docker save` archives (`manifest.json`, `repositories`, the
//! layers as tar files) and OCI image-layout archives (`oci-layout`, `index.json`,
//! `blobs/sha256/...`), as `docker load` takes them. The archive is extracted into the
//! store's `tmp/`, every blob is checked against its digest and every layer against its
//! config's `diff_ids`, then each image is recorded like a pulled one.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::digest::{sha256, sha256_hex, verify};
use crate::error::{ImageError, IoContext};
use crate::fsutil::unique;
use crate::manifest::{self, Parsed};
use crate::reference::Reference;
use crate::store::Inner;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct OciIndex {
    manifests: Vec<IndexEntry>,
}

#[derive(Debug, Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Removes a directory on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn load(inner: &Arc<Inner>, archive: &Path) -> Result<Vec<Reference>, ImageError> {
    let dir = TempDir(inner.root().join("tmp").join(unique("load")));
    fs::create_dir(&dir.0).ctx("creating", &dir.0)?;
    let file = fs::File::open(archive).ctx("opening", archive)?;
    let mut buffered = BufReader::new(file);
    let head = buffered.fill_buf().ctx("reading", archive)?;
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered).ctx("reading", archive)?)
    } else {
        Box::new(buffered)
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(false);
    tar.unpack(&dir.0).map_err(|e| {
        ImageError::Invalid(format!("invalid image archive {}: {e}", archive.display()))
    })?;

    let manifest_json = dir.0.join("manifest.json");
    if manifest_json.is_file() {
        load_docker(inner, &dir.0, &manifest_json)
    } else if dir.0.join("index.json").is_file() {
        load_oci(inner, &dir.0)
    } else {
        Err(ImageError::Invalid(format!(
            "invalid image archive {}: neither manifest.json nor index.json",
            archive.display()
        )))
    }
}

/// A path named inside the archive, refused if it leaves it.
fn inside(dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let rel = crate::unpack::safe_relative(Path::new(name))?;
    Ok(dir.join(rel))
}

fn load_docker(
    inner: &Arc<Inner>,
    dir: &Path,
    manifest_json: &Path,
) -> Result<Vec<Reference>, ImageError> {
    let bytes = fs::read(manifest_json).ctx("reading", manifest_json)?;
    let entries: Vec<SaveEntry> = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("invalid manifest.json: {e}")))?;
    let mut loaded = Vec::new();
    for entry in entries {
        let config_path = inside(dir, &entry.config)?;
        let config = fs::read(&config_path).ctx("reading", &config_path)?;
        let config_digest = sha256(&config);
        // Newer archives name the config by digest: it must match.
        if let Some(hex) = entry.config.strip_prefix("blobs/sha256/") {
            verify(&config, &format!("sha256:{hex}"), "image config")?;
        }
        let parsed = manifest::parse_config(&config)?;
        if parsed.diff_ids.len() != entry.layers.len() {
            return Err(ImageError::Invalid(format!(
                "invalid manifest.json: {} layers but {} diff_ids in {}",
                entry.layers.len(),
                parsed.diff_ids.len(),
                entry.config
            )));
        }
        let _pins = inner.pin_layers(&parsed.diff_ids);
        for (layer, diff_id) in entry.layers.iter().zip(&parsed.diff_ids) {
            let path = inside(dir, layer)?;
            let blob_digest = layer
                .strip_prefix("blobs/sha256/")
                .map(|h| format!("sha256:{h}"));
            inner.install_layer_file(&path, blob_digest.as_deref(), diff_id)?;
        }
        let names: Vec<Reference> = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| Reference::parse(t))
            .collect::<Result<_, _>>()?;
        inner.record_loaded(
            config_digest.clone(),
            false,
            vec![(config_digest.clone(), config)],
            &config_digest,
            &names,
        )?;
        loaded.extend(names);
    }
    Ok(loaded)
}

fn read_blob(dir: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
    let path = dir.join("blobs/sha256").join(sha256_hex(digest)?);
    let b = fs::read(&path).ctx("reading", &path)?;
    verify(&b, digest, "blob")?;
    Ok(b)
}

fn load_oci(inner: &Arc<Inner>, dir: &Path) -> Result<Vec<Reference>, ImageError> {
    let index_path = dir.join("index.json");
    let bytes = fs::read(&index_path).ctx("reading", &index_path)?;
    let index: OciIndex = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("invalid index.json: {e}")))?;
    let mut loaded = Vec::new();
    for entry in index.manifests {
        let body = read_blob(dir, &entry.digest)?;
        let mut blobs = vec![(entry.digest.clone(), body.clone())];
        let (config, layers) = match manifest::parse(&body, None)? {
            Parsed::Image { config, layers } => (config, layers),
            Parsed::Index { manifests } => {
                let Some(m) = manifest::pick_platform(&manifests) else {
                    return Err(ImageError::NotFound(format!(
                        "no matching manifest for linux/amd64 in {}",
                        entry.digest
                    )));
                };
                let mbody = read_blob(dir, &m.digest)?;
                blobs.push((m.digest.clone(), mbody.clone()));
                match manifest::parse(&mbody, None)? {
                    Parsed::Image { config, layers } => (config, layers),
                    Parsed::Index { .. } => {
                        return Err(ImageError::Invalid("nested image index".to_string()))
                    }
                }
            }
        };
        let config_bytes = read_blob(dir, &config.digest)?;
        let parsed = manifest::parse_config(&config_bytes)?;
        if parsed.diff_ids.len() != layers.len() {
            return Err(ImageError::Invalid(format!(
                "invalid image {}: {} layers but {} diff_ids",
                entry.digest,
                layers.len(),
                parsed.diff_ids.len()
            )));
        }
        blobs.push((config.digest.clone(), config_bytes));
        let _pins = inner.pin_layers(&parsed.diff_ids);
        for (layer, diff_id) in layers.iter().zip(&parsed.diff_ids) {
            let path = dir.join("blobs/sha256").join(sha256_hex(&layer.digest)?);
            inner.install_layer_file(&path, Some(&layer.digest), diff_id)?;
        }
        // containerd's full name, else the OCI ref name when it is a full reference.
        let name = entry
            .annotations
            .get("io.containerd.image.name")
            .or_else(|| entry.annotations.get("org.opencontainers.image.ref.name"))
            .and_then(|n| Reference::parse(n).ok());
        let names: Vec<Reference> = name.into_iter().collect();
        inner.record_loaded(entry.digest.clone(), true, blobs, &config.digest, &names)?;
        loaded.extend(names);
    }
    Ok(loaded)
}
