//! The store against a real registry: Debian's `docker-registry` (the CNCF distribution
//! registry) serving plain HTTP on 127.0.0.1:5000 inside a network namespace created for the
//! test (`ip netns add mesh-img-<pid>-<n>`); the test's client runs on a thread that entered
//! it, so the root namespace is never touched. Images are built here (a base layer, a layer
//! with a whiteout and an opaque directory, a zstd layer) and pushed with oci-client.
//!
//! A second registry serves HTTPS with a certificate of a test CA (trusted through Docker's
//! `certs.d` layout) and token auth from a small token service (`TOKEN_SERVER`).
//!
//! Needs root, `ip` (iproute2), `docker-registry` and `openssl` (the token service's RSA key
//! and signatures); fails with a clear message without them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_image::digest::sha256;
use mesh_image::unpack::{read_xattr, OPAQUE_XATTR};
use mesh_image::{ImageError, Reference, Store, StoreConfig};
use oci_client::client::{ClientConfig, ClientProtocol};

const REGISTRY: &str = "127.0.0.1:5000";
static SEQ: AtomicU32 = AtomicU32::new(0);

fn require(ok: bool, what: &str) {
    assert!(ok, "{what}");
}

fn preflight() {
    require(
        rustix::process::geteuid().is_root(),
        "this test needs root (network namespaces, mknod of whiteouts, trusted.* xattrs)",
    );
    require(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` is missing: apt-get install -y iproute2",
    );
    require(
        Path::new("/usr/bin/docker-registry").exists(),
        "/usr/bin/docker-registry is missing: apt-get install -y docker-registry",
    );
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "mesh-image-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
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

/// A named network namespace with `lo` up, deleted on drop.
struct NetNs(String);
impl NetNs {
    fn new() -> NetNs {
        let name = format!(
            "mesh-img-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs(name);
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        ns
    }

    /// Moves the calling thread into the namespace (for good: use a dedicated thread).
    fn enter(&self) {
        let f = fs::File::open(format!("/run/netns/{}", self.0)).expect("open netns");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
    }
}
impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker-registry serve` in the namespace; killed on drop, its log printed on failure.
struct Registry {
    ns: String,
    dir: PathBuf,
    addr: String,
    child: Option<Child>,
}
impl Registry {
    fn start(ns: &NetNs, dir: &Path) -> Registry {
        Registry::start_with(ns, dir, REGISTRY, "")
    }

    /// One on `addr`, its config ending with `more` (YAML: `auth:`, `  tls:` under `http:`).
    fn start_with(ns: &NetNs, dir: &Path, addr: &str, more: &str) -> Registry {
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{more}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            ns: ns.0.clone(),
            dir: dir.to_path_buf(),
            addr: addr.to_string(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("registry.log"))
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "/usr/bin/docker-registry",
                "serve",
            ])
            .arg(self.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning docker-registry");
        self.child = Some(child);
    }

    /// Waits (10 s at most) until the registry accepts connections; call from inside the ns.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect_timeout(
                &self.addr.parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("docker-registry exited: {st}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not ready in 10 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}
impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- registry log ---\n{}", self.log());
        }
    }
}

/// Runs `f` on a thread inside `ns`, on a current-thread runtime, bounded by `limit`.
fn in_netns<F>(ns: &NetNs, limit: Duration, f: F)
where
    F: FnOnce() + Send + 'static,
{
    let name = ns.0.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        NetNs(name.clone()).enter_and_forget();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(());
        if let Err(p) = res {
            std::panic::resume_unwind(p);
        }
    });
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(_) => panic!("scenario did not finish in {limit:?}"),
    }
}

impl NetNs {
    /// Enters without owning (the guard outside deletes it).
    fn enter_and_forget(self) {
        self.enter();
        std::mem::forget(self);
    }
}

// ---- test images ----

#[derive(Clone, Copy)]
enum Kind {
    Dir,
    File(&'static str),
}

fn tar_layer(entries: &[(&str, Kind)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            Kind::File(body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o755);
                h.set_size(body.len() as u64);
                b.append_data(&mut h, path, body.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A built image: its blobs and its manifest.
struct TestImage {
    layers: Vec<(Vec<u8>, &'static str)>, // (blob, media type)
    diff_ids: Vec<String>,
    config: Vec<u8>,
    manifest: Vec<u8>,
    manifest_type: &'static str,
}

impl TestImage {
    fn new(layers: Vec<(Vec<u8>, Vec<u8>, &'static str)>, cmd: &str, oci: bool) -> TestImage {
        let diff_ids: Vec<String> = layers.iter().map(|(plain, _, _)| sha256(plain)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2024-05-01T00:00:00Z",
            "config": {"Cmd": [cmd], "Env": ["PATH=/bin"], "WorkingDir": "/data", "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let (manifest_type, config_type) = if oci {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
            )
        } else {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
            )
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|(_, blob, mt)| serde_json::json!({
                "mediaType": mt, "digest": sha256(blob), "size": blob.len()})).collect::<Vec<_>>(),
        }))
        .unwrap();
        TestImage {
            layers: layers.into_iter().map(|(_, blob, mt)| (blob, mt)).collect(),
            diff_ids,
            config,
            manifest,
            manifest_type,
        }
    }

    fn digest(&self) -> String {
        sha256(&self.manifest)
    }
}

fn push_client() -> oci_client::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    oci_client::Client::try_from(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    })
    .unwrap()
}

async fn push(client: &oci_client::Client, repo: &str, tag: &str, img: &TestImage) {
    push_to(client, REGISTRY, repo, tag, img).await
}

async fn push_to(client: &oci_client::Client, host: &str, repo: &str, tag: &str, img: &TestImage) {
    let r = oci_client::Reference::with_tag(host.into(), repo.into(), tag.into());
    for (blob, _) in &img.layers {
        client
            .push_blob(&r, blob.clone(), &sha256(blob))
            .await
            .expect("push layer");
    }
    client
        .push_blob(&r, img.config.clone(), &sha256(&img.config))
        .await
        .expect("push config");
    client
        .push_manifest_raw(
            &r,
            img.manifest.clone(),
            http::HeaderValue::from_str(img.manifest_type).unwrap(),
        )
        .await
        .expect("push manifest");
}

async fn push_manifest(
    client: &oci_client::Client,
    repo: &str,
    tag: &str,
    body: &[u8],
    media_type: &str,
) {
    let r = oci_client::Reference::with_tag(REGISTRY.into(), repo.into(), tag.into());
    client
        .push_manifest_raw(
            &r,
            body.to_vec(),
            http::HeaderValue::from_str(media_type).unwrap(),
        )
        .await
        .expect("push manifest");
}

fn base_layer() -> Vec<u8> {
    tar_layer(&[
        ("etc", Kind::Dir),
        ("etc/motd", Kind::File("hello\n")),
        ("etc/keep", Kind::File("kept\n")),
        ("data", Kind::Dir),
        ("data/a", Kind::File("a")),
        ("data/b", Kind::File("b")),
        ("bin", Kind::Dir),
        ("bin/tool", Kind::File("#!/bin/sh\necho tool\n")),
    ])
}

/// Deletes etc/motd, makes data/ opaque with one new file.
fn delete_layer() -> Vec<u8> {
    tar_layer(&[
        ("etc", Kind::Dir),
        ("etc/.wh.motd", Kind::File("")),
        ("data", Kind::Dir),
        ("data/.wh..wh..opq", Kind::File("")),
        ("data/c", Kind::File("c")),
    ])
}

fn images() -> (TestImage, TestImage) {
    const GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    const OCI_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const OCI_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    let base = base_layer();
    let base_gz = gzip(&base);
    let del = delete_layer();
    let del_gz = gzip(&del);
    let b_only = tar_layer(&[("b-only", Kind::File("from b"))]);
    let b_zst = zstd::encode_all(&b_only[..], 3).unwrap();
    // A: Docker schema 2; B: OCI, sharing A's base layer, with a zstd layer.
    let a = TestImage::new(
        vec![(base.clone(), base_gz.clone(), GZ), (del, del_gz, GZ)],
        "/bin/tool",
        false,
    );
    let b = TestImage::new(
        vec![(base, base_gz, OCI_GZ), (b_only, b_zst, OCI_ZST)],
        "/b",
        true,
    );
    (a, b)
}

fn open_store(dir: &Path) -> Store {
    Store::open(StoreConfig {
        root: dir.to_path_buf(),
        insecure_registries: vec![REGISTRY.to_string()],
        mirrors: vec![],
        certs_dir: None,
    })
    .unwrap()
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn layer_count(store_dir: &Path) -> usize {
    fs::read_dir(store_dir.join("layers")).unwrap().count()
}

#[test]
fn pulls_from_a_real_registry() {
    preflight();
    let scratch = Scratch::new("registry");
    let ns = NetNs::new();
    let registry = Arc::new(Mutex::new(Registry::start(
        &ns,
        &scratch.0.join("registry"),
    )));
    let dir = scratch.0.clone();
    let started = Instant::now();
    let reg = registry.clone();
    in_netns(&ns, Duration::from_secs(120), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(&dir, &reg));
    });
    drop(registry);
    eprintln!("scenario took {:?}", started.elapsed());
}

async fn scenario(dir: &Path, reg: &Mutex<Registry>) {
    reg.lock().unwrap().wait_ready();
    let (a, b) = images();
    let client = push_client();
    push(&client, "app", "1", &a).await;
    push(&client, "app", "2", &b).await;
    // An index for "multi": B for linux/amd64, A for linux/arm64.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": a.manifest_type, "digest": a.digest(), "size": a.manifest.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": b.manifest_type, "digest": b.digest(), "size": b.manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    push_manifest(
        &client,
        "app",
        "multi",
        &index,
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    let index_digest = sha256(&index);

    let store_dir = dir.join("store");
    let store = open_store(&store_dir);
    let app1 = r("127.0.0.1:5000/app:1");

    // Two concurrent pulls of one reference: one download (config + 2 layers).
    let (x, y) = tokio::join!(store.pull(&app1, None), store.pull(&app1, None));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x, y);
    assert_eq!(
        store.blob_fetches(),
        3,
        "concurrent pulls were not coalesced"
    );
    assert_eq!(x.digest, a.digest());
    assert_eq!(
        x.reference.to_string(),
        format!("127.0.0.1:5000/app:1@{}", a.digest())
    );
    assert_eq!(x.id, sha256(&a.config));
    assert_eq!(x.config.cmd, ["/bin/tool"]);
    assert_eq!(x.config.working_dir, "/data");
    assert_eq!(x.config.exposed_ports, ["80/tcp"]);
    assert_eq!(x.layers.len(), 2);
    for (dir, diff_id) in x.layers.iter().zip(&a.diff_ids) {
        // layers/<hex of diff_id>/diff
        let hex = dir.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert_eq!(format!("sha256:{hex}"), *diff_id);
    }
    let (base, top) = (&x.layers[0], &x.layers[1]);
    assert_eq!(
        fs::read_to_string(base.join("etc/motd")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        fs::metadata(base.join("bin/tool")).unwrap().mode() & 0o777,
        0o755
    );
    let wh = fs::symlink_metadata(top.join("etc/motd")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout: {wh:?}"
    );
    assert_eq!(
        read_xattr(&top.join("data"), OPAQUE_XATTR).as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read_to_string(top.join("data/c")).unwrap(), "c");
    assert!(!top.join("data/.wh..wh..opq").exists());
    assert_eq!(store.get(&app1).unwrap(), x);
    // The init layer: the mount points a task needs, /etc as the image has it.
    let init = x.init.clone().expect("init layer");
    assert_eq!(init, store_dir.join("inits").join(&x.id["sha256:".len()..]));
    for d in ["proc", "sys", "dev"] {
        assert!(init.join(d).is_dir(), "{d}");
    }
    for f in ["hosts", "hostname", "resolv.conf"] {
        assert_eq!(
            fs::metadata(init.join("etc").join(f)).unwrap().len(),
            0,
            "{f}"
        );
    }
    assert_eq!(
        fs::metadata(init.join("etc")).unwrap().mode() & 0o7777,
        fs::metadata(base.join("etc")).unwrap().mode() & 0o7777
    );

    // A second pull of the tag re-checks the manifest but downloads no blob.
    store.pull(&app1, None).await.unwrap();
    assert_eq!(store.blob_fetches(), 3);

    // resolve: a tag's manifest digest, and the index's digest for a tag naming an index.
    assert_eq!(store.resolve(&app1, None).await.unwrap(), a.digest());
    let multi = r("127.0.0.1:5000/app:multi");
    assert_eq!(store.resolve(&multi, None).await.unwrap(), index_digest);

    // An index pulls its linux/amd64 image, pinned to the index digest; the base layer is
    // shared with A (one directory, not downloaded again: config + zstd layer only).
    let m = store.pull(&multi, None).await.unwrap();
    assert_eq!(m.digest, index_digest);
    assert_eq!(m.id, sha256(&b.config));
    assert_eq!(m.layers[0], x.layers[0]);
    assert_eq!(
        fs::read_to_string(m.layers[1].join("b-only")).unwrap(),
        "from b"
    );
    assert_eq!(store.blob_fetches(), 5);

    // Move the tag: a pull by the old digest still gives the old image, from the registry
    // (fresh store) and from the local store without asking the registry.
    push_manifest(&client, "app", "1", &b.manifest, b.manifest_type).await;
    assert_eq!(store.resolve(&app1, None).await.unwrap(), b.digest());
    let pinned_a = app1.with_digest(&a.digest());
    let fresh = Scratch::new("fresh");
    let store2 = open_store(&fresh.0);
    let old = store2.pull(&pinned_a, None).await.unwrap();
    assert_eq!(old.digest, a.digest());
    assert!(fs::symlink_metadata(old.layers[1].join("etc/motd"))
        .unwrap()
        .file_type()
        .is_char_device());
    let moved = store2.pull(&app1, None).await.unwrap();
    assert_eq!(moved.digest, b.digest());
    drop(store2);

    // A registry not listed insecure is spoken to over HTTPS only (this one answers plain
    // HTTP, so the TLS handshake fails): never silently downgraded.
    let tls_dir = Scratch::new("tls");
    let strict = Store::open(StoreConfig {
        root: tls_dir.0.clone(),
        insecure_registries: vec![],
        mirrors: vec![],
        certs_dir: None,
    })
    .unwrap();
    let e = strict.pull(&app1, None).await.unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
    assert!(e.to_string().contains("https://127.0.0.1:5000/"), "{e}");
    drop(strict);

    // Unknown repository and tag: NotFound in Docker's words.
    for missing in ["127.0.0.1:5000/nope:latest", "127.0.0.1:5000/app:nope"] {
        let e = store.pull(&r(missing), None).await.unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{missing}: {e:?}");
        assert!(e.to_string().contains("manifest unknown"), "{e}");
        eprintln!("not found: {e}");
        let e = store.resolve(&r(missing), None).await.unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{missing}: {e:?}");
    }
    let e = store.remove(&r("127.0.0.1:5000/nope:latest")).unwrap_err();
    assert_eq!(e.to_string(), "No such image: 127.0.0.1:5000/nope:latest");
    assert!(store.get(&r("127.0.0.1:5000/nope")).is_none());

    // Registry stopped: Unreachable, naming it; a pinned image here needs no registry.
    reg.lock().unwrap().stop();
    let app2 = r("127.0.0.1:5000/app:2");
    let e = store.pull(&app2, None).await.unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
    assert!(e.to_string().contains(REGISTRY), "{e}");
    eprintln!("unreachable: {e}");
    let e = store.resolve(&app2, None).await.unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
    assert_eq!(
        store.pull(&pinned_a, None).await.unwrap().digest,
        a.digest()
    );
    {
        let mut g = reg.lock().unwrap();
        g.spawn();
        g.wait_ready();
    }
    let two = store.pull(&app2, None).await.unwrap();
    assert_eq!(two.digest, b.digest());

    // list: one line per tag.
    let ls = store.list();
    let line = |tag: &str| {
        ls.iter()
            .find(|l| l.repository == "127.0.0.1:5000/app" && l.tag == tag)
            .cloned()
    };
    assert_eq!(
        line("1").unwrap().digest.as_deref(),
        Some(a.digest().as_str())
    );
    assert_eq!(line("2").unwrap().id, sha256(&b.config));
    assert_eq!(
        line("multi").unwrap().digest.as_deref(),
        Some(index_digest.as_str())
    );
    assert!(line("1").unwrap().size > 0);

    // prune keeping B: A's own layer goes, the shared base stays.
    assert_eq!(layer_count(&store_dir), 3);
    let report = store.prune(std::slice::from_ref(&app2)).unwrap();
    assert_eq!(report.layers_deleted, 1, "{report:?}");
    assert!(
        report.deleted.contains(&a.digest()) && report.deleted.contains(&index_digest),
        "{report:?}"
    );
    assert!(x.layers[0].is_dir(), "shared base layer removed");
    assert!(!x.layers[1].exists(), "A's own layer kept");
    assert!(store.get(&app1).is_none() && store.get(&multi).is_none());
    assert_eq!(store.get(&app2).unwrap().layers, two.layers);

    // The store survives a reopen; remove takes the last image and its layers.
    drop(store);
    let store = open_store(&store_dir);
    assert_eq!(store.get(&app2).unwrap(), two);
    let report = store.remove(&app2).unwrap();
    assert_eq!(report.untagged[0], "127.0.0.1:5000/app:2", "{report:?}");
    assert!(
        report.untagged[1..]
            .iter()
            .all(|n| n == &format!("127.0.0.1:5000/app@{}", b.digest())),
        "{report:?}"
    );
    // The image ID, then both of its layers.
    assert_eq!(report.deleted.len(), 3, "{report:?}");
    assert_eq!(report.deleted[0], sha256(&b.config), "{report:?}");
    assert!(
        report.deleted.iter().all(|d| d.starts_with("sha256:")),
        "{report:?}"
    );
    assert!(store.get(&app2).is_none());
    assert!(store.list().is_empty());
    assert_eq!(layer_count(&store_dir), 0);
    // Init layers go with their images.
    assert!(!init.exists(), "A's init layer kept");
    assert_eq!(fs::read_dir(store_dir.join("inits")).unwrap().count(), 0);
}

/// A `docker save` tarball (and an OCI layout archive) loaded without any registry; what
/// an interrupted pull leaves is dropped at open.
#[test]
fn loads_archives_and_drops_leftovers() {
    preflight();
    let scratch = Scratch::new("load");
    let (a, b) = images();

    // docker save: <id>/layer.tar (uncompressed), <config hex>.json, manifest.json, repositories.
    let config_hex = &sha256(&a.config)["sha256:".len()..];
    let mut t = tar::Builder::new(Vec::new());
    let add = |t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        t.append_data(&mut h, path, data).unwrap();
    };
    let plain = [base_layer(), delete_layer()];
    let mut layer_paths = Vec::new();
    for (i, l) in plain.iter().enumerate() {
        let p = format!("layer{i}/layer.tar");
        add(&mut t, &p, l);
        layer_paths.push(p);
    }
    add(&mut t, &format!("{config_hex}.json"), &a.config);
    let manifest = serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": ["busybox:local", "127.0.0.1:5000/loaded:1"],
        "Layers": layer_paths,
    }]);
    add(
        &mut t,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    add(&mut t, "repositories", br#"{"busybox":{"local":"x"}}"#);
    let archive = scratch.0.join("save.tar");
    fs::write(&archive, t.into_inner().unwrap()).unwrap();

    let store_dir = scratch.0.join("store");
    let store = open_store(&store_dir);
    let names = store.load(&archive).unwrap();
    assert_eq!(names, [r("busybox:local"), r("127.0.0.1:5000/loaded:1")]);
    let img = store.get(&r("busybox:local")).unwrap();
    assert_eq!(img.id, sha256(&a.config));
    assert_eq!(img.config.cmd, ["/bin/tool"]);
    assert!(fs::symlink_metadata(img.layers[1].join("etc/motd"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(
        read_xattr(&img.layers[1].join("data"), OPAQUE_XATTR).as_deref(),
        Some(&b"y"[..])
    );
    let ls = store.list();
    let line = ls.iter().find(|l| l.repository == "busybox").unwrap();
    assert_eq!((line.tag.as_str(), line.digest.as_ref()), ("local", None));

    // A corrupted layer (not its diff_id) is refused and leaves nothing.
    let mut bad = tar::Builder::new(Vec::new());
    let cfg_b = &sha256(&b.config)["sha256:".len()..];
    add(&mut bad, "l/layer.tar", &base_layer());
    add(
        &mut bad,
        "l2/layer.tar",
        &tar_layer(&[("evil", Kind::File("x"))]),
    );
    add(&mut bad, &format!("{cfg_b}.json"), &b.config);
    let m = serde_json::json!([{"Config": format!("{cfg_b}.json"), "RepoTags": ["bad:1"], "Layers": ["l/layer.tar", "l2/layer.tar"]}]);
    add(&mut bad, "manifest.json", &serde_json::to_vec(&m).unwrap());
    let bad_path = scratch.0.join("bad.tar");
    fs::write(&bad_path, bad.into_inner().unwrap()).unwrap();
    let e = store.load(&bad_path).unwrap_err();
    assert!(matches!(e, ImageError::Verification(_)), "{e:?}");
    assert!(store.get(&r("bad:1")).is_none());
    assert_eq!(
        fs::read_dir(store_dir.join("tmp")).unwrap().count(),
        0,
        "load left temp files"
    );

    // OCI image layout, gzip-compressed archive, named by containerd's annotation.
    let mut o = tar::Builder::new(Vec::new());
    add(&mut o, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    for (blob, _) in &b.layers {
        add(
            &mut o,
            &format!("blobs/sha256/{}", &sha256(blob)[7..]),
            blob,
        );
    }
    add(
        &mut o,
        &format!("blobs/sha256/{}", &sha256(&b.config)[7..]),
        &b.config,
    );
    add(
        &mut o,
        &format!("blobs/sha256/{}", &b.digest()[7..]),
        &b.manifest,
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": b.manifest_type, "digest": b.digest(), "size": b.manifest.len(),
        "annotations": {"io.containerd.image.name": "docker.io/library/oci:1", "org.opencontainers.image.ref.name": "1"}}]});
    add(&mut o, "index.json", &serde_json::to_vec(&index).unwrap());
    let oci_path = scratch.0.join("oci.tar.gz");
    fs::write(&oci_path, gzip(&o.into_inner().unwrap())).unwrap();
    assert_eq!(store.load(&oci_path).unwrap(), [r("oci:1")]);
    let oci = store.get(&r("oci:1")).unwrap();
    assert_eq!(oci.digest, b.digest());
    assert_eq!(
        oci.layers[0], img.layers[0],
        "base layer shared between loaded images"
    );
    assert!(store.get(&r(&format!("oci@{}", b.digest()))).is_some());

    // Leftovers of a crash: an unpacked layer without a record, a temp dir, a record whose
    // layer is missing. All gone at open; complete images stay.
    drop(store);
    let orphan = store_dir.join("layers").join("0".repeat(64));
    fs::create_dir_all(orphan.join("diff")).unwrap();
    fs::create_dir_all(store_dir.join("tmp/layer-1-1/diff")).unwrap();
    let ghost = store_dir
        .join("images")
        .join(format!("{}.json", "1".repeat(64)));
    fs::write(
        &ghost,
        serde_json::to_vec(&serde_json::json!({
            "digest": format!("sha256:{}", "1".repeat(64)), "registry_digest": true,
            "id": format!("sha256:{}", "2".repeat(64)), "config": {"entrypoint": [], "cmd": [], "env": [],
            "working_dir": "", "user": "", "stop_signal": null, "exposed_ports": []},
            "created": null, "diff_ids": [format!("sha256:{}", "3".repeat(64))], "size": 0, "blobs": []}))
        .unwrap(),
    )
    .unwrap();
    let store = open_store(&store_dir);
    assert!(!orphan.exists() && !ghost.exists());
    assert_eq!(fs::read_dir(store_dir.join("tmp")).unwrap().count(), 0);
    assert_eq!(store.get(&r("busybox:local")).unwrap(), img);
    assert!(store.get(&r("oci:1")).is_some());
}

// ---- HTTPS with the registry's own CA, and token auth ----

/// Where the TLS registry listens, and its token service.
const TLS_REGISTRY: &str = "127.0.0.1:5443";
const TOKEN_ADDR: &str = "127.0.0.1:5001";

/// The token service as Docker's registries use (distribution's `auth: token`), shared with
/// the multi-host tests: `GET /token` with the client's basic credentials answers a JWT
/// granting the scopes asked for, none for anonymous callers; wrong credentials get 401.
/// Served over HTTPS with the registry's certificate.
const TOKEN_SERVER: &str = mesh_netns::registry::TOKEN_SERVER_PY;

/// A CA and the registry's certificate from it, for 127.0.0.1 (`ca.crt`, `server.crt`,
/// `server.key`: the harness's [`mesh_netns::tls`], as the multi-host registry tests make
/// theirs), and the token signer's self-signed certificate and key (`token.crt`,
/// `token.key`: [`mesh_netns::tls::write_token_signer`], RSA made with openssl), in `dir`.
fn make_certs(dir: &Path) {
    mesh_netns::tls::write_ca_and_server_cert(dir, "mesh test CA", [127, 0, 0, 1].into())
        .expect("the test CA and the registry's certificate");
    mesh_netns::tls::write_token_signer(dir).expect("the token signer's key and certificate");
}

/// The token service, killed on drop.
struct TokenServer(Child);
impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pulls_over_https_from_a_token_auth_registry() {
    preflight();
    require(
        Command::new("openssl").arg("version").output().is_ok(),
        "`openssl` is missing: apt-get install -y openssl",
    );
    let scratch = Scratch::new("tls-registry");
    let certs = scratch.0.join("certs");
    fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let ns = NetNs::new();
    let more = format!(
        "  tls:\n    certificate: {c}/server.crt\n    key: {c}/server.key\nauth:\n  token:\n    realm: https://{TOKEN_ADDR}/token\n    service: mesh-test\n    issuer: mesh-test-issuer\n    rootcertbundle: {c}/token.crt\n",
        c = certs.display()
    );
    let registry = Arc::new(Mutex::new(Registry::start_with(
        &ns,
        &scratch.0.join("registry"),
        TLS_REGISTRY,
        &more,
    )));
    let _tokens = TokenServer(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c", TOKEN_SERVER])
            .arg(&certs)
            .args(["alice", "s3cret", "127.0.0.1", "5001", "mesh-test-issuer"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning the token service"),
    );
    // Docker's certs.d layout: the CA is trusted for this registry only.
    let certs_d = scratch.0.join("certs.d");
    fs::create_dir_all(certs_d.join(TLS_REGISTRY)).unwrap();
    fs::copy(
        certs.join("ca.crt"),
        certs_d.join(TLS_REGISTRY).join("ca.crt"),
    )
    .unwrap();
    let dir = scratch.0.clone();
    let reg = registry.clone();
    in_netns(&ns, Duration::from_secs(120), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(tls_scenario(&dir, &certs, &certs_d, &reg));
    });
    drop(registry);
}

async fn tls_scenario(dir: &Path, certs: &Path, certs_d: &Path, reg: &Mutex<Registry>) {
    reg.lock().unwrap().wait_ready();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(TOKEN_ADDR).is_err() {
        assert!(Instant::now() < deadline, "token service not ready in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (a, _) = images();
    // Push as alice, over HTTPS trusting the test CA.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::try_from(ClientConfig {
        protocol: ClientProtocol::Https,
        extra_root_certificates: vec![oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data: fs::read(certs.join("ca.crt")).unwrap(),
        }],
        ..ClientConfig::default()
    })
    .unwrap();
    let target = oci_client::Reference::with_tag(TLS_REGISTRY.into(), "app".into(), "1".into());
    client
        .auth(
            &target,
            &oci_client::secrets::RegistryAuth::Basic("alice".into(), "s3cret".into()),
            oci_client::RegistryOperation::Push,
        )
        .await
        .expect("token for push");
    push_to(&client, TLS_REGISTRY, "app", "1", &a).await;

    let app = r(&format!("{TLS_REGISTRY}/app:1"));
    let alice = mesh_image::Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let wrong = mesh_image::Credentials {
        username: "alice".into(),
        password: "guess".into(),
    };
    let store_dir = Scratch::new("tls-store");
    let store = Store::open(StoreConfig {
        root: store_dir.0.clone(),
        insecure_registries: vec![],
        mirrors: vec![],
        certs_dir: Some(certs_d.to_path_buf()),
    })
    .unwrap();
    // Anonymous: the token grants nothing, the registry says so.
    let e = store.pull(&app, None).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized(_)), "anonymous: {e:?}");
    eprintln!("anonymous: {e}");
    // Wrong password: the token service refuses it.
    let e = store.pull(&app, Some(&wrong)).await.unwrap_err();
    assert!(
        matches!(e, ImageError::Unauthorized(_) | ImageError::Registry(_)),
        "wrong password: {e:?}"
    );
    eprintln!("wrong password: {e}");
    // alice: resolved, pulled and verified, over HTTPS with the registry's CA.
    assert_eq!(store.resolve(&app, Some(&alice)).await.unwrap(), a.digest());
    let img = store.pull(&app, Some(&alice)).await.unwrap();
    assert_eq!(img.digest, a.digest());
    assert_eq!(
        fs::read_to_string(img.layers[0].join("etc/motd")).unwrap(),
        "hello\n"
    );
    // `login`'s check goes through the same challenge.
    store.check_login(TLS_REGISTRY, &alice).await.unwrap();
    let e = store.check_login(TLS_REGISTRY, &wrong).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized(_)), "login: {e:?}");

    // Without the CA, the registry's certificate is not trusted: refused, not downgraded.
    let plain_dir = dir.join("no-ca");
    let strict = Store::open(StoreConfig {
        root: plain_dir,
        insecure_registries: vec![],
        mirrors: vec![],
        certs_dir: None,
    })
    .unwrap();
    let e = strict.pull(&app, Some(&alice)).await.unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "no CA: {e:?}");
    eprintln!("no CA: {e}");
    assert!(strict.check_login(TLS_REGISTRY, &alice).await.is_err());
}
