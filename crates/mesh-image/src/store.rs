//! The node's content-addressed image store and its pulls.
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: manifests, indexes and configs, each checked against its digest;
//! - `layers/<hex of diff_id>/diff`: an unpacked layer, an overlayfs lower dir, shared by the
//!   images that have it; `layers/<hex>/size` beside it. A layer is unpacked in `tmp/`, the
//!   file system is synced, and the directory is renamed into place: a `layers/<hex>` that
//!   exists is complete. Deletion renames it back into `tmp/` first;
//! - `images/<hex of digest>.json`: an image record (the pinned digest: the index's if the
//!   tag named an index; its config digest, config and layers), written atomically;
//! - `inits/<hex of image id>`: the image's init layer (see [`crate::init`]), made on first
//!   use in `tmp/` and renamed into place, removed with the image;
//! - `refs.json`: names to digests (`registry/repo:tag` and `registry/repo@digest`);
//! - `tmp/`: emptied at open.
//!
//! A pull writes its layers and blobs, then the image record, then the names: a crash before
//! the record leaves only unreferenced layers and blobs, which `open` removes. Layers and
//! blobs a pull in progress needs are *pinned*, so a concurrent `prune` or `remove` keeps
//! them. Concurrent pulls of one reference on one `Store` share one download.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::digest::{sha256_hex, verify};
use crate::error::{ImageError, IoContext};
use crate::fsutil::{sync_dir, sync_fs, unique, write_atomic};
use crate::manifest::{self, ImageConfig, Parsed};
use crate::reference::Reference;
use crate::registry::{Registries, Remote};
use crate::unpack::unpack_layer;

/// Where the store lives and which registries it may reach how.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// The store's directory, e.g. `DATA_DIR/images`.
    pub root: PathBuf,
    /// `HOST:PORT` of registries reached over plain HTTP; every other one over HTTPS.
    pub insecure_registries: Vec<String>,
    /// `--registry-mirror` URLs, tried in order before Docker Hub (for `docker.io` only).
    pub mirrors: Vec<String>,
    /// Docker's `certs.d` layout: the `*.crt` files of `DIR/HOST:PORT/` are CA certificates
    /// trusted for that registry, beside the system roots.
    pub certs_dir: Option<PathBuf>,
}

/// Registry credentials (HTTP basic, or exchanged for a token on a Bearer challenge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The reference pinned with its digest (`docker.io/library/busybox:latest@sha256:...`).
    pub reference: Reference,
    /// The pinned digest: the index's or manifest list's if the tag named one.
    pub digest: String,
    /// The image ID: its config's digest.
    pub id: String,
    /// What a task needs from the config.
    pub config: ImageConfig,
    /// The unpacked layer directories, base first.
    pub layers: Vec<PathBuf>,
    /// The image's init layer (the mount points a task needs), to stack above `layers`;
    /// `None` if it could not be made (a task then creates them in its own upper directory).
    pub init: Option<PathBuf>,
}

/// One line of `mesh image ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// As Docker shows it (`busybox`, `127.0.0.1:5000/app`), `<none>` if untagged.
    pub repository: String,
    /// The tag, `<none>` if the name is a digest only.
    pub tag: String,
    /// The registry digest, `None` for an image loaded from a `docker save` archive.
    pub digest: Option<String>,
    /// The config digest.
    pub id: String,
    /// The config's `created` (RFC 3339), if it has one.
    pub created: Option<String>,
    /// The unpacked size of its layers, in bytes.
    pub size: u64,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// The names untagged (familiar form), and the digests of images deleted.
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
    /// Layers deleted, and their unpacked size.
    pub layers_deleted: usize,
    pub space_reclaimed: u64,
}

/// What [`Store::remove`] did, as `docker image rm` reports it: the names removed (familiar
/// form), then the IDs of the image and of the layers deleted with it (`sha256:...`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
}

/// The store; cheap to clone (shared state), `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

type PullCell = Arc<OnceCell<Result<Image, ImageError>>>;

pub(crate) struct Inner {
    root: PathBuf,
    pub(crate) registries: Registries,
    state: Mutex<State>,
    inflight: Mutex<HashMap<String, PullCell>>,
}

#[derive(Default)]
struct State {
    refs: BTreeMap<String, String>,
    images: HashMap<String, ImageRecord>,
    /// Layers (`layer:<hex>`) and blobs (digests) a pull in progress needs.
    pins: HashMap<String, usize>,
}

/// An image record on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ImageRecord {
    /// The key: the pinned registry digest, or the config digest of a loaded image.
    pub digest: String,
    /// Whether `digest` is a registry digest (false for `docker save` loads).
    pub registry_digest: bool,
    pub id: String,
    pub config: ImageConfig,
    pub created: Option<String>,
    pub diff_ids: Vec<String>,
    pub size: u64,
    /// Blobs kept for it: index, manifest, config.
    pub blobs: Vec<String>,
}

impl Store {
    /// Opens (creating) the store at `config.root`, empties its `tmp/`, and drops what an
    /// interrupted pull or deletion left: records whose layers are missing, names without
    /// records, layers and blobs no record uses.
    pub fn open(config: StoreConfig) -> Result<Store, ImageError> {
        let root = config.root.clone();
        for d in ["blobs/sha256", "layers", "images", "inits", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx("creating", &p)?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).ctx("reading", &tmp)?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        let mut state = State::default();
        let images_dir = root.join("images");
        for e in fs::read_dir(&images_dir)
            .ctx("reading", &images_dir)?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                let _ = fs::remove_file(&p);
                continue;
            }
            let rec: Option<ImageRecord> = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(rec)
                    if rec
                        .diff_ids
                        .iter()
                        .all(|d| layer_dir(&root, d).is_ok_and(|l| l.is_dir())) =>
                {
                    state.images.insert(rec.digest.clone(), rec);
                }
                _ => {
                    tracing::warn!(path = %p.display(), "dropping an incomplete image record");
                    let _ = fs::remove_file(&p);
                }
            }
        }
        let refs_path = root.join("refs.json");
        if let Ok(b) = fs::read(&refs_path) {
            let refs: BTreeMap<String, String> = serde_json::from_slice(&b)
                .map_err(|e| ImageError::Io(format!("reading {}: {e}", refs_path.display())))?;
            state.refs = refs
                .into_iter()
                .filter(|(_, d)| state.images.contains_key(d))
                .collect();
        }
        let inner = Arc::new(Inner {
            root,
            registries: Registries::new(
                config.insecure_registries,
                config.mirrors,
                config.certs_dir,
            )?,
            state: Mutex::new(state),
            inflight: Mutex::new(HashMap::new()),
        });
        let store = Store { inner };
        {
            let mut st = store.inner.lock();
            store.inner.gc(&mut st)?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether `host` is one of the registries reached over plain HTTP.
    pub(crate) fn is_insecure(&self, host: &str) -> bool {
        self.inner.registries.is_insecure(host)
    }

    /// The CA certificates trusted for `host` beyond the system roots (PEM).
    pub(crate) fn registry_roots(&self, host: &str) -> Result<Vec<Vec<u8>>, ImageError> {
        self.inner.registries.roots(host)
    }

    /// How many blobs (configs and layers) this store has downloaded.
    pub fn blob_fetches(&self) -> u64 {
        self.inner.registries.blob_fetches.load(Ordering::Relaxed)
    }

    /// The digest `r` names in its registry now (for a tag naming an index, the index's
    /// digest), without pulling. A pinned reference answers its own digest.
    pub async fn resolve(
        &self,
        r: &Reference,
        auth: Option<&Credentials>,
    ) -> Result<String, ImageError> {
        if let Some(d) = r.digest() {
            return Ok(d.to_string());
        }
        let remotes = self.inner.registries.remotes(r, auth)?;
        let what = r.tag().unwrap_or("latest").to_string();
        let mut last = None;
        for remote in &remotes {
            match remote.digest(r, &what).await {
                Ok(d) => {
                    sha256_hex(&d)?;
                    return Ok(d);
                }
                Err(e) => {
                    tracing::warn!(registry = %remote.host, error = %e, "resolving {} failed", r.familiar());
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ImageError::no_such_image(r.familiar())))
    }

    /// Pulls `r` (linux/amd64) unless a pinned `r` is already here, and returns it.
    /// Concurrent pulls of one reference share one download.
    pub async fn pull(
        &self,
        r: &Reference,
        auth: Option<&Credentials>,
    ) -> Result<Image, ImageError> {
        if r.digest().is_some() {
            if let Some(img) = self.get(r) {
                return Ok(img);
            }
        }
        let key = format!("{r}\n{}", auth.map(|c| c.username.as_str()).unwrap_or(""));
        let cell = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            inflight.entry(key.clone()).or_default().clone()
        };
        let result = cell
            .get_or_init(|| async { Arc::clone(&self.inner).pull_now(r, auth).await })
            .await
            .clone();
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&key);
        }
        result
    }

    /// `r` from the local store only (a tag as last pulled or loaded, or a digest).
    pub fn get(&self, r: &Reference) -> Option<Image> {
        let st = self.inner.lock();
        let digest = lookup(&st, r)?;
        let rec = st.images.get(&digest)?;
        Some(self.inner.image(r, rec))
    }

    /// Every name in the store, and untagged images, sorted by repository and tag.
    pub fn list(&self) -> Vec<ImageSummary> {
        let st = self.inner.lock();
        let mut rows = Vec::new();
        let mut named: BTreeSet<&str> = BTreeSet::new();
        let tagged: BTreeSet<(String, &str)> = st
            .refs
            .iter()
            .filter_map(|(name, d)| {
                let r = Reference::parse(name).ok()?;
                r.digest().is_none().then(|| (r.name(), d.as_str()))
            })
            .collect();
        for (name, digest) in &st.refs {
            let (Ok(r), Some(rec)) = (Reference::parse(name), st.images.get(digest)) else {
                continue;
            };
            named.insert(digest);
            if r.digest().is_some() && tagged.contains(&(r.name(), digest.as_str())) {
                continue; // shown on its tag's line
            }
            rows.push(summary(
                rec,
                r.familiar_name(),
                r.tag().unwrap_or("<none>").to_string(),
            ));
        }
        for rec in st.images.values() {
            if !named.contains(rec.digest.as_str()) {
                rows.push(summary(rec, "<none>".to_string(), "<none>".to_string()));
            }
        }
        rows.sort_by(|a, b| (&a.repository, &a.tag, &a.id).cmp(&(&b.repository, &b.tag, &b.id)));
        rows
    }

    /// Removes the name `r` (a tag, with its `repo@digest` name if no other tag of the
    /// repository has the image; or a digest, with every name of the repository for it),
    /// then the image and its layers if nothing else uses them.
    pub fn remove(&self, r: &Reference) -> Result<RemoveReport, ImageError> {
        let mut st = self.inner.lock();
        let Some(digest) = lookup(&st, r) else {
            return Err(ImageError::no_such_image(r.familiar()));
        };
        let name = r.name();
        let pinned = format!("{name}@{digest}");
        let before: Vec<String> = st.refs.keys().cloned().collect();
        if r.digest().is_some() {
            st.refs
                .retain(|k, d| !(d == &digest && ref_name(k).as_deref() == Some(name.as_str())));
        } else {
            st.refs.remove(&r.to_string());
            let other_tag = st.refs.iter().any(|(k, d)| {
                d == &digest && !k.contains('@') && ref_name(k).as_deref() == Some(name.as_str())
            });
            if !other_tag {
                st.refs.remove(&pinned);
            }
        }
        let mut report = RemoveReport::default();
        for k in before.into_iter().filter(|k| !st.refs.contains_key(k)) {
            report
                .untagged
                .push(Reference::parse(&k).map(|r| r.familiar()).unwrap_or(k));
        }
        // Tags before `repo@digest` names, as Docker lists them.
        report.untagged.sort_by_key(|n| n.contains('@'));
        self.inner.save_refs(&st)?;
        report.deleted = self.inner.drop_unnamed(&mut st)?;
        let (layers, _) = self.inner.gc(&mut st)?;
        report.deleted.extend(layers);
        Ok(report)
    }

    /// Removes every image no name in `keep` resolves to (with all their names), then the
    /// layers and blobs no image uses. Layers and blobs of pulls in progress are kept.
    pub fn prune(&self, keep: &[Reference]) -> Result<PruneReport, ImageError> {
        let mut st = self.inner.lock();
        let kept: BTreeSet<String> = keep.iter().filter_map(|r| lookup(&st, r)).collect();
        let mut report = PruneReport::default();
        let untag: Vec<String> = st
            .refs
            .iter()
            .filter(|(_, d)| !kept.contains(*d))
            .map(|(k, _)| k.clone())
            .collect();
        for k in untag {
            st.refs.remove(&k);
            report
                .untagged
                .push(Reference::parse(&k).map(|r| r.familiar()).unwrap_or(k));
        }
        self.inner.save_refs(&st)?;
        let doomed: Vec<String> = st
            .images
            .keys()
            .filter(|d| !kept.contains(*d))
            .cloned()
            .collect();
        for d in doomed {
            self.inner.delete_record(&mut st, &d)?;
            report.deleted.push(d);
        }
        let (layers, bytes) = self.inner.gc(&mut st)?;
        report.layers_deleted = layers.len();
        report.space_reclaimed = bytes;
        Ok(report)
    }

    /// Loads a `docker save` archive (`manifest.json`, with `repositories`) or an OCI
    /// image-layout archive (`index.json`), plain or gzip/zstd-compressed, and returns the
    /// names it had.
    pub fn load(&self, archive: &Path) -> Result<Vec<Reference>, ImageError> {
        crate::archive::load(&self.inner, archive)
    }
}

fn summary(rec: &ImageRecord, repository: String, tag: String) -> ImageSummary {
    ImageSummary {
        repository,
        tag,
        digest: rec.registry_digest.then(|| rec.digest.clone()),
        id: rec.id.clone(),
        created: rec.created.clone(),
        size: rec.size,
    }
}

/// `registry/repo` of a stored name.
fn ref_name(k: &str) -> Option<String> {
    Reference::parse(k).ok().map(|r| r.name())
}

/// The digest the name `r` has here.
fn lookup(st: &State, r: &Reference) -> Option<String> {
    match r.digest() {
        Some(d) => {
            let exact = format!("{}@{d}", r.name());
            if st.refs.contains_key(&exact)
                || st
                    .refs
                    .iter()
                    .any(|(k, v)| v == d && ref_name(k) == Some(r.name()))
            {
                Some(d.to_string())
            } else {
                None
            }
        }
        None => st.refs.get(&r.to_string()).cloned(),
    }
}

/// `layers/<hex>` of a diff_id.
fn layer_dir(root: &Path, diff_id: &str) -> Result<PathBuf, ImageError> {
    Ok(root.join("layers").join(sha256_hex(diff_id)?))
}

/// Unpins on drop.
struct Pins {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        for k in &self.keys {
            if let Some(n) = st.pins.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(k);
                }
            }
        }
    }
}

/// Layers of one pull downloaded at once (dockerd's `max-concurrent-downloads` default).
const MAX_CONCURRENT_DOWNLOADS: usize = 3;

/// A file under `tmp/` removed when dropped (a finished, failed or aborted layer download).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What a pull fetched before it is recorded.
struct Fetched {
    digest: String,
    blobs: Vec<(String, Vec<u8>)>,
    layers: Vec<manifest::Descriptor>,
    config_digest: String,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn image(&self, r: &Reference, rec: &ImageRecord) -> Image {
        let reference = if rec.registry_digest {
            r.with_digest(&rec.digest)
        } else {
            r.clone()
        };
        let layers: Vec<PathBuf> = rec
            .diff_ids
            .iter()
            .map(|d| {
                self.root
                    .join("layers")
                    .join(&d["sha256:".len()..])
                    .join("diff")
            })
            .collect();
        let init = self.init_layer(&rec.id, &layers);
        Image {
            reference,
            digest: rec.digest.clone(),
            id: rec.id.clone(),
            config: rec.config.clone(),
            layers,
            init,
        }
    }

    /// `inits/<hex>` of the image `id`, made now if it is not there yet (callers hold the
    /// state lock, as `gc` does when it removes one).
    fn init_layer(&self, id: &str, layers: &[PathBuf]) -> Option<PathBuf> {
        let hex = sha256_hex(id).ok()?;
        let dir = self.root.join("inits").join(hex);
        if dir.is_dir() {
            return Some(dir);
        }
        let tmp = self.root.join("tmp").join(unique("init"));
        let made = crate::init::build(&tmp, layers)
            .and_then(|()| fs::rename(&tmp, &dir).map_err(|e| ImageError::io("renaming", &tmp, e)));
        match made {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(image = id, error = %e, "cannot make the image's init layer");
                let _ = fs::remove_dir_all(&tmp);
                None
            }
        }
    }

    fn pin(self: &Arc<Self>, keys: Vec<String>) -> Pins {
        let mut st = self.lock();
        for k in &keys {
            *st.pins.entry(k.clone()).or_default() += 1;
        }
        Pins {
            inner: Arc::clone(self),
            keys,
        }
    }

    async fn pull_now(
        self: Arc<Self>,
        r: &Reference,
        auth: Option<&Credentials>,
    ) -> Result<Image, ImageError> {
        let remotes = self.registries.remotes(r, auth)?;
        let n = remotes.len();
        let mut last = None;
        for (i, remote) in remotes.into_iter().enumerate() {
            match Arc::clone(&self).pull_from(remote, r).await {
                Ok(img) => return Ok(img),
                Err(e) if i + 1 < n => {
                    tracing::warn!(error = %e, "pull of {} from a mirror failed, trying the next source", r.familiar());
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ImageError::no_such_image(r.familiar())))
    }

    async fn pull_from(
        self: Arc<Self>,
        remote: Remote,
        r: &Reference,
    ) -> Result<Image, ImageError> {
        let what = r.digest().or(r.tag()).unwrap_or("latest").to_string();
        let (body, digest) = remote.manifest(r, &what).await?;
        verify(&body, &digest, "manifest")?;
        if let Some(want) = r.digest() {
            if want != digest {
                return Err(crate::digest::mismatch("manifest", want, &digest));
            }
        }
        let mut blobs = vec![(digest.clone(), body.clone())];
        let (manifest_body, manifest_digest) = match manifest::parse(&body, None)? {
            Parsed::Index { manifests } => {
                let entry = manifest::pick_platform(&manifests).ok_or_else(|| {
                    ImageError::NotFound(format!(
                        "no matching manifest for linux/amd64 in the manifest list entries: {}",
                        r.familiar()
                    ))
                })?;
                let (mbody, mdigest) = remote.manifest(r, &entry.digest).await?;
                verify(&mbody, &entry.digest, "manifest")?;
                blobs.push((mdigest.clone(), mbody.clone()));
                (mbody, mdigest)
            }
            Parsed::Image { .. } => (body, digest.clone()),
        };
        let Parsed::Image { config, layers } = manifest::parse(&manifest_body, None)? else {
            return Err(ImageError::Invalid(format!(
                "manifest {manifest_digest} of {} is an index inside an index",
                r.familiar()
            )));
        };

        // Already here under another name (a tag moved back, or the same image elsewhere)?
        let known = {
            let st = self.lock();
            st.images.get(&digest).cloned()
        };
        if let Some(rec) = known {
            let _pins = self.pin(rec.diff_ids.iter().map(|d| format!("layer:{d}")).collect());
            if rec
                .diff_ids
                .iter()
                .all(|d| layer_dir(&self.root, d).is_ok_and(|p| p.is_dir()))
            {
                return self.record(r, rec);
            }
        }

        let config_bytes = match self.read_blob(&config.digest) {
            Some(b) => b,
            None => remote.blob(r, &config.digest, &self).await?,
        };
        verify(&config_bytes, &config.digest, "image config")?;
        blobs.push((config.digest.clone(), config_bytes));
        let fetched = Fetched {
            digest,
            blobs,
            layers,
            config_digest: config.digest,
        };
        self.install(fetched, r, &remote).await
    }

    /// Unpacks the missing layers (downloading them from `remote`), stores the blobs and
    /// records the image under `r`.
    async fn install(
        self: Arc<Self>,
        f: Fetched,
        r: &Reference,
        remote: &Remote,
    ) -> Result<Image, ImageError> {
        let config_bytes = &f
            .blobs
            .iter()
            .find(|(d, _)| d == &f.config_digest)
            .expect("config blob")
            .1;
        let parsed = manifest::parse_config(config_bytes)?;
        if parsed.diff_ids.len() != f.layers.len() {
            return Err(ImageError::Invalid(format!(
                "invalid image {}: {} layers but {} diff_ids in its config",
                r.familiar(),
                f.layers.len(),
                parsed.diff_ids.len()
            )));
        }
        let mut keys: Vec<String> = parsed
            .diff_ids
            .iter()
            .map(|d| format!("layer:{d}"))
            .collect();
        keys.extend(f.blobs.iter().map(|(d, _)| d.clone()));
        let _pins = self.pin(keys);

        // Layers download side by side, at most MAX_CONCURRENT_DOWNLOADS at once (Docker's
        // default), each unpacked as soon as it is in; the first error ends the pull (the
        // others are aborted with the set, their temp files removed by their guards).
        let downloads = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_DOWNLOADS));
        let remote = Arc::new(remote.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for (desc, diff_id) in f.layers.iter().zip(&parsed.diff_ids) {
            let dir = layer_dir(&self.root, diff_id)?;
            if dir.is_dir() {
                continue;
            }
            let blob = TempFile(self.root.join("tmp").join(unique("blob")));
            let inner = Arc::clone(&self);
            let (remote, downloads) = (Arc::clone(&remote), Arc::clone(&downloads));
            let (desc, diff_id, r) = (desc.clone(), diff_id.clone(), r.clone());
            tasks.spawn(async move {
                {
                    let _permit = downloads.acquire().await.expect("never closed");
                    remote
                        .blob_to_file(&r, &desc.digest, &blob.0, &inner)
                        .await?;
                }
                tokio::task::spawn_blocking(move || {
                    inner
                        .install_layer_file(&blob.0, Some(&desc.digest), &diff_id)
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, "layer {} of {}", desc.digest, r.familiar())
                        })
                })
                .await
                .map_err(|e| ImageError::Io(format!("unpacking a layer: {e}")))?
            });
        }
        while let Some(res) = tasks.join_next().await {
            res.map_err(|e| ImageError::Io(format!("pulling a layer: {e}")))??;
        }
        let size = parsed
            .diff_ids
            .iter()
            .map(|d| {
                layer_dir(&self.root, d)
                    .ok()
                    .and_then(|p| fs::read_to_string(p.join("size")).ok())
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        for (d, bytes) in &f.blobs {
            self.write_blob(d, bytes)?;
        }
        let rec = ImageRecord {
            digest: f.digest.clone(),
            registry_digest: true,
            id: f.config_digest.clone(),
            config: parsed.config,
            created: parsed.created,
            diff_ids: parsed.diff_ids,
            size,
            blobs: f.blobs.iter().map(|(d, _)| d.clone()).collect(),
        };
        let path = self
            .root
            .join("images")
            .join(format!("{}.json", sha256_hex(&rec.digest)?));
        let json = serde_json::to_vec_pretty(&rec).expect("record serialises");
        write_atomic(&path, &json)?;
        self.record(r, rec)
    }

    /// Adds the image record and the names `r` gives it.
    fn record(&self, r: &Reference, rec: ImageRecord) -> Result<Image, ImageError> {
        let mut st = self.lock();
        if r.tag().is_some() {
            st.refs.insert(
                r.with_tag(r.tag().unwrap_or("latest")).to_string(),
                rec.digest.clone(),
            );
        }
        if rec.registry_digest {
            st.refs
                .insert(format!("{}@{}", r.name(), rec.digest), rec.digest.clone());
        }
        let img = self.image(r, &rec);
        st.images.insert(rec.digest.clone(), rec);
        self.save_refs(&st)?;
        Ok(img)
    }

    /// Unpacks a layer file into `layers/<hex>` unless it is there: in `tmp/`, checked
    /// against its digests, synced, renamed into place.
    pub(crate) fn install_layer_file(
        &self,
        blob: &Path,
        blob_digest: Option<&str>,
        diff_id: &str,
    ) -> Result<u64, ImageError> {
        let dir = layer_dir(&self.root, diff_id)?;
        if dir.is_dir() {
            return Ok(0);
        }
        let tmp = self.root.join("tmp").join(unique("layer"));
        let result = (|| {
            fs::create_dir(&tmp).ctx("creating", &tmp)?;
            let diff = tmp.join("diff");
            fs::create_dir(&diff).ctx("creating", &diff)?;
            let file = fs::File::open(blob).ctx("opening", blob)?;
            let unpacked = unpack_layer(file, blob_digest, diff_id, &diff)?;
            fs::write(tmp.join("size"), unpacked.size.to_string()).ctx("writing", &tmp)?;
            sync_fs(&tmp)?;
            match fs::rename(&tmp, &dir) {
                Ok(()) => {}
                // Another pull unpacked it meanwhile.
                Err(_) if dir.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                }
                Err(e) => return Err(ImageError::io("renaming into", &dir, e)),
            }
            sync_dir(&self.root.join("layers"))?;
            Ok(unpacked.size)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Option<Vec<u8>> {
        let hex = sha256_hex(digest).ok()?;
        let b = fs::read(self.root.join("blobs/sha256").join(hex)).ok()?;
        verify(&b, digest, "blob").ok()?;
        Some(b)
    }

    fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        verify(bytes, digest, "blob")?;
        let path = self.root.join("blobs/sha256").join(sha256_hex(digest)?);
        if path.exists() {
            return Ok(());
        }
        write_atomic(&path, bytes)
    }

    fn save_refs(&self, st: &State) -> Result<(), ImageError> {
        let json = serde_json::to_vec_pretty(&st.refs).expect("refs serialise");
        write_atomic(&self.root.join("refs.json"), &json)
    }

    /// Deletes the records of images no name points at; returns their image IDs.
    fn drop_unnamed(&self, st: &mut State) -> Result<Vec<String>, ImageError> {
        let named: BTreeSet<String> = st.refs.values().cloned().collect();
        let doomed: Vec<(String, String)> = st
            .images
            .iter()
            .filter(|(d, _)| !named.contains(*d))
            .map(|(d, rec)| (d.clone(), rec.id.clone()))
            .collect();
        let mut ids = Vec::new();
        for (d, id) in doomed {
            self.delete_record(st, &d)?;
            ids.push(id);
        }
        Ok(ids)
    }

    fn delete_record(&self, st: &mut State, digest: &str) -> Result<(), ImageError> {
        st.images.remove(digest);
        let path = self
            .root
            .join("images")
            .join(format!("{}.json", sha256_hex(digest)?));
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root.join("images")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("removing", &path, e)),
        }
    }

    /// Removes layers and blobs that no record uses and no pull has pinned; returns the
    /// layers removed (their diff IDs) and their size.
    /// Deletes the directory `dir` of the store: out of its place into `tmp/` first, so a
    /// deletion cut short never looks like a complete layer (`open` empties `tmp/`).
    fn discard_dir(&self, dir: &Path) -> Result<(), ImageError> {
        let doomed = self.root.join("tmp").join(unique("gc"));
        fs::rename(dir, &doomed).ctx("renaming", dir)?;
        fs::remove_dir_all(&doomed).ctx("removing", &doomed)
    }

    fn gc(&self, st: &mut State) -> Result<(Vec<String>, u64), ImageError> {
        let mut used: BTreeSet<String> = st.pins.keys().cloned().collect();
        for rec in st.images.values() {
            used.extend(rec.diff_ids.iter().map(|d| format!("layer:{d}")));
            used.extend(rec.blobs.iter().cloned());
        }
        let (mut removed, mut bytes) = (Vec::new(), 0);
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).ctx("reading", &layers)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if used.contains(&format!("layer:sha256:{name}")) {
                continue;
            }
            let size = fs::read_to_string(e.path().join("size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            self.discard_dir(&e.path())?;
            removed.push(format!("sha256:{name}"));
            bytes += size;
        }
        if !removed.is_empty() {
            sync_dir(&layers)?;
        }
        let ids: BTreeSet<&str> = st
            .images
            .values()
            .filter_map(|rec| sha256_hex(&rec.id).ok())
            .collect();
        let inits = self.root.join("inits");
        for e in fs::read_dir(&inits).ctx("reading", &inits)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !ids.contains(name.as_str()) {
                self.discard_dir(&e.path())?;
            }
        }
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).ctx("reading", &blobs)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !used.contains(&format!("sha256:{name}")) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok((removed, bytes))
    }

    /// Records a loaded image (its layers already installed) under `names`.
    pub(crate) fn record_loaded(
        self: &Arc<Self>,
        digest: String,
        registry_digest: bool,
        blobs: Vec<(String, Vec<u8>)>,
        config_digest: &str,
        names: &[Reference],
    ) -> Result<(), ImageError> {
        let config_bytes = &blobs
            .iter()
            .find(|(d, _)| d == config_digest)
            .expect("config")
            .1;
        let parsed = manifest::parse_config(config_bytes)?;
        for d in &parsed.diff_ids {
            if !layer_dir(&self.root, d)?.is_dir() {
                return Err(ImageError::Invalid(format!(
                    "layer {d} missing from the archive"
                )));
            }
        }
        let _pins = self.pin(blobs.iter().map(|(d, _)| d.clone()).collect());
        for (d, b) in &blobs {
            self.write_blob(d, b)?;
        }
        let size = parsed
            .diff_ids
            .iter()
            .filter_map(|d| fs::read_to_string(layer_dir(&self.root, d).ok()?.join("size")).ok())
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .sum();
        let rec = ImageRecord {
            digest: digest.clone(),
            registry_digest,
            id: config_digest.to_string(),
            config: parsed.config,
            created: parsed.created,
            diff_ids: parsed.diff_ids,
            size,
            blobs: blobs.iter().map(|(d, _)| d.clone()).collect(),
        };
        let path = self
            .root
            .join("images")
            .join(format!("{}.json", sha256_hex(&digest)?));
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&rec).expect("record serialises"),
        )?;
        let mut st = self.lock();
        for r in names {
            st.refs.insert(r.to_string(), digest.clone());
            if registry_digest {
                st.refs
                    .insert(format!("{}@{digest}", r.name()), digest.clone());
            }
        }
        st.images.insert(digest, rec);
        self.save_refs(&st)
    }

    /// Pins layers while a load installs them (so a concurrent prune keeps them).
    pub(crate) fn pin_layers(self: &Arc<Self>, diff_ids: &[String]) -> impl Drop {
        self.pin(diff_ids.iter().map(|d| format!("layer:{d}")).collect())
    }
}
