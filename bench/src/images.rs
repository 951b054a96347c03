//! `images`: what container images cost, side by side in one run on the 3-host netns
//! cluster (one manager, two workers, every `meshd --insecure-registry`), with Debian's
//! `docker-registry` serving plain HTTP in h1's namespace:
//!
//! 1. **Pull**: a multi-layer image (`testimage.py --big`: busybox, three layers of 10 x 1 MiB of
//!    random data, one of 2000 files of 4 KiB; ~40 MB) pulled by `mesh_image::Store::pull`
//!    into an empty store vs `skopeo copy docker://... dir:...` of the same image, both from
//!    the underlay namespace, interleaved rounds. mesh also verifies and unpacks every layer;
//!    skopeo's `dir:` only stores the blobs.
//! 2. **Create -> 30/30 running**: `service create --replicas 30` of the (cached) test image
//!    vs the same service as a host process (`-- sleep`), through the API socket until
//!    `service ls` shows 30/30, interleaved rounds; the per-task start overhead is the
//!    difference over 30.
//!
//! Skopeo is installed with apt-get when missing; if that fails, the pull side reports mesh
//! alone and says why. Everything (daemons, namespaces, registry, temp dirs) lives in the
//! `Cluster` and the `Registry`, which remove it on drop, also on error; every wait is
//! bounded.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_api::{Request, ServiceMode, ServiceSpec};
use mesh_image::{Reference, Store, StoreConfig};
use mesh_netns::registry::Registry;
use mesh_netns::swarm::{form_swarm, sleep_pids};
use mesh_netns::{require_root, Cluster, ClusterOpts};
use serde_json::Value;

use crate::api::Client;
use crate::report;
use crate::stats::{median, millis, min_max, secs};

pub const ABOUT: &str =
    "image pull vs skopeo copy, and create -> 30/30 running of an image vs a host process";

/// The pusher of the multi-layer image.
const REPLICAS: u64 = 30;
const PULL_ROUNDS: usize = 5;
const CREATE_ROUNDS: usize = 5;
/// Bound of every wait for a service (create, remove) and of one pull or copy.
const BOUND: Duration = Duration::from_secs(180);
/// Bound of one apt-get run.
const APT_BOUND: Duration = Duration::from_secs(600);
/// Where iproute2 keeps named network namespaces.
const NETNS_RUN_DIR: &str = "/var/run/netns";

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: mesh-bench images [--no-write-docs]\n\n{ABOUT}");
        return Ok(());
    }
    if !require_root()? {
        bail!("the images benchmark needs root (network namespaces, apt-get)");
    }
    ensure_tool("docker-registry", "docker-registry")
        .map_err(|e| anyhow!("the registry is required: {e}"))?;
    let skopeo = ensure_tool("skopeo", "skopeo");
    if let Err(e) = &skopeo {
        eprintln!("images: skopeo is not available, the pull runs without it: {e}");
    }
    let load_before = loadavg();

    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "bench-images",
    })?;
    // Declared after the cluster, so dropped (killed) before its directory goes.
    let reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    let insecure = reg.host_port();
    for h in c.hosts() {
        h.start_daemon_with(&["--insecure-registry", &insecure])?;
    }
    form_swarm(&c, 1)?;

    let pull = pull_bench(&c, &reg, skopeo.is_ok())?;
    let create = create_bench(&c, &reg)?;
    let load_after = loadavg();

    let text = render(&pull, &create, skopeo.err(), &load_before, &load_after);
    println!("{text}");
    if !args.iter().any(|a| a == "--no-write-docs") {
        report::write_section("images", &text)?;
    }
    drop(reg);
    drop(c);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pull

/// What the multi-layer image is, as its pusher says.
#[derive(Clone)]
struct BigImage {
    reference: String,
    layers: usize,
    compressed: u64,
    unpacked: u64,
}

struct PullResults {
    image: BigImage,
    mesh: Vec<Duration>,
    skopeo: Vec<Duration>,
    /// Unpacked size of the image in mesh's store (`image ls` SIZE).
    mesh_size: u64,
    /// Bytes skopeo's `dir:` holds.
    skopeo_bytes: u64,
    skopeo_version: String,
    /// Median of `skopeo --version`: the process start-up inside skopeo's times.
    skopeo_startup: Duration,
    /// How long the `syncfs` before each timed pull or copy took (dirty data of others).
    presync: Vec<Duration>,
}

fn pull_bench(c: &Cluster, reg: &Registry, with_skopeo: bool) -> Result<PullResults> {
    let v = reg.push_big_image("big", "v1")?;
    let image = BigImage {
        reference: format!("{}/big:v1", reg.host_port()),
        layers: v["layers"].as_u64().unwrap_or(0) as usize,
        compressed: v["compressed"].as_u64().unwrap_or(0),
        unpacked: v["unpacked"].as_u64().unwrap_or(0),
    };
    eprintln!(
        "images: pushed {} ({} layers, {} compressed)",
        image.reference,
        image.layers,
        mb(image.compressed)
    );
    let work = c.base_dir().join("pulls");
    fs::create_dir_all(&work)?;
    let underlay = c
        .namespaces()
        .first()
        .context("the cluster has no underlay namespace")?
        .clone();
    let insecure = reg.host_port();
    in_netns(&underlay, move || {
        pull_rounds(image, &work, &insecure, with_skopeo)
    })
}

/// The pull rounds, on a thread inside the underlay namespace (the "client" on the bridge):
/// a warm-up of each client, then `PULL_ROUNDS` rounds, the order alternating.
fn pull_rounds(
    image: BigImage,
    work: &Path,
    insecure: &str,
    with_skopeo: bool,
) -> Result<PullResults> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = Reference::parse(&image.reference)?;
    let mut n = 0;
    let mut next_dir = |what: &str| {
        n += 1;
        work.join(format!("{what}-{n}"))
    };
    let mesh_pull = |dir: PathBuf| -> Result<(Duration, u64)> {
        let store = Store::open(StoreConfig {
            root: dir.clone(),
            insecure_registries: vec![insecure.to_string()],
            mirrors: vec![],
            certs_dir: None,
        })?;
        let t0 = Instant::now();
        let img = rt
            .block_on(async { tokio::time::timeout(BOUND, store.pull(&r, None)).await })
            .map_err(|_| anyhow!("mesh pull not done within {BOUND:?}"))??;
        let t = t0.elapsed();
        ensure!(
            img.layers.len() == image.layers,
            "mesh pulled {} layers, want {}",
            img.layers.len(),
            image.layers
        );
        let size = store.list().iter().map(|s| s.size).max().unwrap_or(0);
        drop(store);
        fs::remove_dir_all(&dir)?;
        Ok((t, size))
    };
    let skopeo_copy = |dir: PathBuf| -> Result<(Duration, u64)> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            &format!("docker://{}", image.reference),
            &format!("dir:{}", dir.display()),
        ]);
        let (out, t) = output_timeout(&mut cmd, BOUND)?;
        ensure!(
            out.status.success(),
            "skopeo copy: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let files = fs::read_dir(&dir)?.count();
        // Layers, config, manifest.json and `version`.
        ensure!(
            files == image.layers + 3,
            "skopeo's dir holds {files} files, want {}",
            image.layers + 3
        );
        let bytes = dir_bytes(&dir);
        fs::remove_dir_all(&dir)?;
        Ok((t, bytes))
    };

    let mut res = PullResults {
        mesh: vec![],
        skopeo: vec![],
        mesh_size: 0,
        skopeo_bytes: 0,
        skopeo_version: String::new(),
        skopeo_startup: Duration::ZERO,
        presync: vec![],
        image: image.clone(),
    };
    if with_skopeo {
        let (out, _) = output_timeout(Command::new("skopeo").arg("--version"), BOUND)?;
        res.skopeo_version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut starts = vec![];
        for _ in 0..5 {
            starts.push(output_timeout(Command::new("skopeo").arg("--version"), BOUND)?.1);
        }
        res.skopeo_startup = median(&starts);
    }
    // Warm-up (registry files in the page cache, binaries loaded), not counted.
    let (t, size) = mesh_pull(next_dir("mesh"))?;
    res.mesh_size = size;
    eprintln!("images: warm-up: mesh pull {t:?}");
    if with_skopeo {
        let (t, bytes) = skopeo_copy(next_dir("skopeo"))?;
        res.skopeo_bytes = bytes;
        eprintln!("images: warm-up: skopeo copy {t:?}");
    }
    for round in 0..PULL_ROUNDS {
        let mesh_first = round % 2 == 0;
        for step in 0..2 {
            if (step == 0) == mesh_first {
                res.presync.push(syncfs(work)?);
                let (t, _) = mesh_pull(next_dir("mesh"))?;
                res.mesh.push(t);
            } else if with_skopeo {
                res.presync.push(syncfs(work)?);
                let (t, _) = skopeo_copy(next_dir("skopeo"))?;
                res.skopeo.push(t);
            }
        }
        eprintln!(
            "images: pull round {round}: mesh {:?}, skopeo {:?}",
            res.mesh.last(),
            res.skopeo.last()
        );
    }
    Ok(res)
}

/// Runs `f` on a new thread that has joined the network namespace `ns` (processes it spawns
/// and threads it starts are in that namespace too).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = Path::new(NETNS_RUN_DIR).join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::Builder::new()
        .name("bench-netns".into())
        .spawn(move || {
            // SAFETY: setns only reads the descriptor, which `file` keeps open, and changes
            // the network namespace of this thread alone.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
}

/// `syncfs(2)` of the file system holding `dir`: writes back what others left dirty, so that
/// mesh's own `syncfs` after each layer does not pay for it. Returns how long it took.
fn syncfs(dir: &Path) -> Result<Duration> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let t0 = Instant::now();
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        bail!(
            "syncfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(t0.elapsed())
}

/// Total size of the regular files in `dir` (not recursive: skopeo's `dir:` is flat).
fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Create -> 30/30 running

struct CreateResults {
    image: String,
    image_times: Vec<Duration>,
    host_times: Vec<Duration>,
    /// How long the create call itself took (for an image: pinning the tag included).
    image_answers: Vec<Duration>,
    host_answers: Vec<Duration>,
}

fn call(c: &mut Client, req: &Request) -> Result<Value> {
    c.call_ok(&serde_json::to_value(req)?)
}

fn running(c: &mut Client, name: &str) -> Result<u64> {
    let v = call(
        c,
        &Request::ServiceLs {
            filters: Default::default(),
        },
    )?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .and_then(|s| s["running"].as_u64())
        .unwrap_or(0))
}

fn wait(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t0 = Instant::now();
    while !f()? {
        ensure!(
            t0.elapsed() < BOUND,
            "timed out after {BOUND:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t0.elapsed())
}

/// The pid namespace of `pid` (`/proc/PID/ns/pid`), if it still exists.
fn pid_ns(pid: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// One service of `REPLICAS` `sleep MARKER` tasks, of `image` (empty: a host process):
/// create, time until `service ls` shows all running, check the processes, remove it and
/// wait until they are gone.
fn create_round(
    api: &mut Client,
    name: &str,
    image: &str,
    marker: u32,
) -> Result<(Duration, Duration)> {
    let spec = ServiceSpec {
        name: name.to_string(),
        mode: ServiceMode::Replicated { replicas: REPLICAS },
        image: image.to_string(),
        command: vec!["sleep".into(), marker.to_string()],
        ..Default::default()
    };
    let t0 = Instant::now();
    call(
        api,
        &Request::ServiceCreate {
            spec,
            registry_auth: None,
        },
    )?;
    let answered = t0.elapsed();
    wait(&format!("{name}: {REPLICAS}/{REPLICAS} running"), || {
        Ok(running(api, name)? == REPLICAS)
    })?;
    let took = t0.elapsed();
    wait(&format!("{name}: {REPLICAS} processes"), || {
        Ok(sleep_pids(marker).len() == REPLICAS as usize)
    })?;
    let own = pid_ns("self");
    let pids = sleep_pids(marker);
    let isolated = pids
        .iter()
        .filter(|p| pid_ns(&p.to_string()).is_some_and(|ns| Some(ns) != own))
        .count();
    if image.is_empty() {
        ensure!(
            isolated == 0,
            "{name}: host processes in another pid namespace"
        );
    } else {
        ensure!(
            isolated == pids.len(),
            "{name}: only {isolated} of {} image tasks in a pid namespace of their own",
            pids.len()
        );
    }
    call(
        api,
        &Request::ServiceRm {
            service: name.to_string(),
        },
    )?;
    wait(&format!("{name}: no process left"), || {
        Ok(sleep_pids(marker).is_empty())
    })?;
    // Let the nodes finish tearing down (mounts, cgroups) before the next clock starts.
    std::thread::sleep(Duration::from_secs(1));
    Ok((took, answered))
}

fn create_bench(c: &Cluster, reg: &Registry) -> Result<CreateResults> {
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{}/app:v1", reg.host_port());
    // Cached: every node pulls it before the clock starts.
    for h in c.hosts() {
        let mut cl = Client::connect(&h.socket(), BOUND)?;
        call(
            &mut cl,
            &Request::ImagePull {
                reference: image.clone(),
            },
        )
        .with_context(|| format!("warm-up pull on {}", h.name()))?;
    }
    let mut api = Client::connect(&c.host(1).socket(), Duration::from_secs(60))?;
    let mut marker = 87_000u32;
    let mut next = || {
        marker += 1;
        marker
    };
    // Warm-up round of each (also proves every node starts the image), not counted.
    let (t, _) = create_round(&mut api, "warm-image", &image, next())?;
    eprintln!("images: warm-up: image service {t:?}");
    let (t, _) = create_round(&mut api, "warm-host", "", next())?;
    eprintln!("images: warm-up: host service {t:?}");
    let mut res = CreateResults {
        image: image.clone(),
        image_times: vec![],
        host_times: vec![],
        image_answers: vec![],
        host_answers: vec![],
    };
    for round in 0..CREATE_ROUNDS {
        let image_first = round % 2 == 0;
        for step in 0..2 {
            if (step == 0) == image_first {
                let (t, a) = create_round(&mut api, &format!("img{round}"), &image, next())?;
                res.image_times.push(t);
                res.image_answers.push(a);
            } else {
                let (t, a) = create_round(&mut api, &format!("host{round}"), "", next())?;
                res.host_times.push(t);
                res.host_answers.push(a);
            }
        }
        eprintln!(
            "images: create round {round}: image {:?} (answered {:?}), host {:?} (answered {:?})",
            res.image_times.last(),
            res.image_answers.last(),
            res.host_times.last(),
            res.host_answers.last()
        );
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// Tools and processes

/// Checks that `bin` runs; if not, installs Debian's `pkg` (apt-get install, then apt-get
/// update and install again). The error says why it could not be installed.
fn ensure_tool(bin: &str, pkg: &str) -> Result<(), String> {
    let present = || {
        Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if present() {
        return Ok(());
    }
    eprintln!("images: {bin} is missing; apt-get install {pkg}");
    let apt = |args: &[&str]| -> Result<Output, String> {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        output_timeout(&mut cmd, APT_BOUND)
            .map(|(o, _)| o)
            .map_err(|e| format!("apt-get {}: {e:#}", args.join(" ")))
    };
    let mut out = apt(&["install", "-y", "-q", pkg])?;
    if !out.status.success() {
        let upd = apt(&["update", "-q"])?;
        if !upd.status.success() {
            return Err(format!(
                "apt-get update failed ({}): {}",
                upd.status,
                tail(&upd.stderr)
            ));
        }
        out = apt(&["install", "-y", "-q", pkg])?;
    }
    if !out.status.success() {
        return Err(format!(
            "apt-get install {pkg} failed ({}): {}",
            out.status,
            tail(&out.stderr)
        ));
    }
    if !present() {
        return Err(format!("{bin} does not run after apt-get install {pkg}"));
    }
    Ok(())
}

/// The last line of some output, for errors.
fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// Runs `cmd` to completion (stdin null, output captured), killing it after `timeout`;
/// returns its output and the time from spawn until its exit was seen (polled every ms).
fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<(Output, Duration)> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = t0.elapsed();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok((
        Output {
            status,
            stdout,
            stderr,
        },
        took,
    ))
}

/// `/proc/loadavg`'s three load averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------
// Report

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn list(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(label: &str, v: &[Duration]) -> String {
    let (lo, hi) = min_max(v);
    format!(
        "| {label} | {} | {} | {} | {} |\n",
        secs(median(v)),
        secs(lo),
        secs(hi),
        list(v)
    )
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn render(
    p: &PullResults,
    c: &CreateResults,
    skopeo_err: Option<String>,
    load_before: &str,
    load_after: &str,
) -> String {
    let mut t = String::from("## Images (`cargo xtask bench images`)\n\n");
    t.push_str(&format!(
        "Measured {} on {}; load average {load_before} before the run and {load_after} after it (a shared machine: other builds and tests ran at the same time, so compare the ratios, which come from interleaved rounds, rather than absolute times). Reproduce with `cargo xtask bench images` (root; installs Debian's `skopeo` and `docker-registry` with apt-get if missing). A 3-host netns cluster (1 manager, 2 workers), every `meshd --insecure-registry`; Debian's `docker-registry` serves plain HTTP in h1's namespace.\n\n",
        report::utc_now(),
        report::machine()
    ));

    t.push_str(&format!(
        "**Pull** of `big:v1`, {} layers (busybox; three of 10 x 1 MiB of random data; one of 2000 files of 4 KiB), {} compressed, {} unpacked (gzip level 1 of random data: the two are about equal), from the underlay namespace across the bridge to the registry. mesh: `mesh_image::Store::pull` in the bench process (a 2-worker tokio runtime as meshd's) into an empty store, opened before the clock starts. skopeo{}: `skopeo copy --insecure-policy --src-tls-verify=false docker://REGISTRY/big:v1 dir:DIR` into a new directory, timed from spawn to exit. One warm-up of each, then {PULL_ROUNDS} rounds, the order alternating; before each timed pull or copy the file system is synced (`syncfs`, not timed; median {}, max {}), so neither pays for data others (builds, the previous client) left dirty.\n\n",
        p.image.layers,
        mb(p.image.compressed),
        mb(p.image.unpacked),
        if p.skopeo_version.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.skopeo_version)
        },
        millis(median(&p.presync)),
        millis(min_max(&p.presync).1),
    ));
    t.push_str("| client | median | min | max | rounds (s) |\n|---|---:|---:|---:|---|\n");
    t.push_str(&row(
        "mesh `Store::pull` (download, verify, unpack)",
        &p.mesh,
    ));
    match &skopeo_err {
        Some(e) => {
            t.push_str(&format!(
                "| skopeo copy to `dir:` | – | – | – | not run: skopeo could not be installed ({e}) |\n"
            ));
        }
        None => {
            t.push_str(&row("skopeo copy to `dir:` (download, verify)", &p.skopeo));
            let r = ratio(median(&p.mesh), median(&p.skopeo));
            let per_round: Vec<String> = p
                .mesh
                .iter()
                .zip(&p.skopeo)
                .map(|(m, s)| format!("{:.2}", ratio(*m, *s)))
                .collect();
            t.push_str(&format!(
                "\nmesh / skopeo: **{r:.2}** (per round: {}). The two do not do the same work: mesh also unpacks every layer into its store (decompress, untar, {} of files, then a `syncfs` and a rename per layer, so a pull that returned survives a crash), while skopeo's `dir:` only writes the compressed blobs ({} here) after checking their digests. skopeo's times include its process start-up, {} (median of `skopeo --version`); mesh's in-process pull does not have one.\n",
                per_round.join(", "),
                mb(p.mesh_size),
                mb(p.skopeo_bytes),
                millis(p.skopeo_startup)
            ));
        }
    }

    let (mi, mh) = (median(&c.image_times), median(&c.host_times));
    let per_round: Vec<String> = c
        .image_times
        .iter()
        .zip(&c.host_times)
        .map(|(i, h)| format!("{:.2}", ratio(*i, *h)))
        .collect();
    let r = ratio(mi, mh);
    let overhead = (mi.as_secs_f64() - mh.as_secs_f64()) / REPLICAS as f64;
    t.push_str(&format!(
        "\n**Create -> {REPLICAS}/{REPLICAS} running.** Each round creates a service of {REPLICAS} replicas through the manager's API socket and polls `service_ls` (what `mesh service ls --format json` shows) every 10 ms until {REPLICAS}/{REPLICAS} run; then checks the {REPLICAS} `sleep` processes (image tasks each in a pid namespace of their own), removes the service and waits until no process is left and 1 s more. Image: `{}` (the two-layer busybox test image, `sleep N` replacing its Cmd), pulled on every node before (`mesh image pull`), so the clock covers the manager pinning the tag to its digest (one registry request), the scheduling and, on each node, the overlayfs root (each task's own upper and work directories over the image's layers and its init layer, made once per image), the namespaces and the in-memory `/etc` files of every task. The task directories are on the file system of `/tmp` (an exec root on disk; `/run/mesh`, the default, is a tmpfs on most hosts). Host process: `-- sleep N`. One warm-up of each, then {CREATE_ROUNDS} rounds, the order alternating.\n\n",
        c.image
    ));
    t.push_str("| service | median | min | max | rounds (s) |\n|---|---:|---:|---:|---|\n");
    t.push_str(&row(&format!("image, {REPLICAS} replicas"), &c.image_times));
    t.push_str(&row(
        &format!("host process, {REPLICAS} replicas"),
        &c.host_times,
    ));
    for (what, v) in [
        ("image: the create call (tag pinned)", &c.image_answers),
        ("host process: the create call", &c.host_answers),
    ] {
        let (lo, hi) = min_max(v);
        let each: Vec<String> = v.iter().map(|d| millis(*d)).collect();
        t.push_str(&format!(
            "| {what} | {} | {} | {} | {} |\n",
            millis(median(v)),
            millis(lo),
            millis(hi),
            each.join(", ")
        ));
    }
    t.push_str(&format!(
        "\nImage / host process: **{r:.2}** (per round: {}); goal <= 1.5: {}. Start overhead of an image task: ({} - {}) / {REPLICAS} = **{:.1} ms** per task, as wall time of a create spread over 3 nodes that start their tasks concurrently on 2 shared cores (not the latency of one task start).\n",
        per_round.join(", "),
        if r <= 1.5 { "met" } else { "missed" },
        secs(mi),
        secs(mh),
        overhead * 1000.0
    ));
    t
}
