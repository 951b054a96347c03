//! `swarm`: mesh and a real Docker Swarm side by side on the same machine, driven through the
//! same steps.
//!
//! The same netns hosts (3 managers + 2 workers, made by [`Cluster`]) run once with `meshd` and
//! once with `dockerd` 20.10 in swarm mode (Debian's `docker.io`, installed with apt if missing;
//! see [`crate::dockerd`]). Both run the same image: the test image of the netns tests (static
//! busybox, two layers), written as a `docker save` archive and loaded on every node with
//! `image load` / `docker load`. Every step uses each system's own CLI (`mesh`, `docker` 20.10)
//! on a host's socket, and everything that is measured outside the CLI (processes, DNS answers,
//! iperf3 inside a task's namespace, RSS) is measured the same way for both:
//!
//! 1. **leader failover**: SIGKILL the leader's daemon; time until a management call
//!    (`node ls`) succeeds on a surviving manager (each survivor polled by its own thread);
//! 2. **service create** of 30 replicas of `sleep N` until 30 such processes run, and
//!    **scale 30 -> 0** until none is left;
//! 3. **daemon memory** at rest with those 30 tasks: the RSS of each node's daemons (`meshd`;
//!    `dockerd` + `containerd`) and of the per-task helpers (mesh's task shims; the
//!    `containerd-shim-runc-v2` processes);
//! 4. **overlay throughput**: iperf3 (one TCP stream, 5 s) from a task on h5 to a task on h4
//!    over an overlay network, the host's iperf3 binary run inside each task's network
//!    namespace (`nsenter --net`), so both systems run the same binary;
//! 5. **stale DNS**: a global probe service on the network (one task per node) asks its node's
//!    embedded DNS (127.0.0.11) for `tasks.target` (10 replicas); after `scale target=5`, time
//!    until every node answers exactly the 5 survivors, then every node is asked every 200 ms
//!    for 60 s and each answer naming a removed task, or failing, counts as stale;
//! 6. **rolling update of a dnsrr service**: 4 replicas of busybox `httpd` (stopping at once on
//!    SIGTERM); a client in a probe task resolves the name and sends HTTP requests round robin
//!    over the answers while `service update --force` replaces every task (each system's
//!    default: one at a time, stop-first); failed requests are counted;
//! 7. **VIP and routing mesh**: a request to a VIP service's name from a task, and to a
//!    published port on a node without a task from the underlay client;
//! 8. **node failure detection**: a worker's underlay link is cut; time until the leader's
//!    `node ls` shows it Down (each system with its default heartbeat: mesh 0.5 s, Docker 5 s).
//!
//! Cleanup: the mesh cluster and the Docker engines (processes, mounts, cgroups, directories;
//! see [`crate::dockerd`]) are removed on every exit path the process survives, and a killed
//! run's leftovers are removed by the next run.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_netns::registry::save_test_image;
use mesh_netns::swarm::{form_swarm, sleep_pids};
use mesh_netns::{output_with_timeout, require_root, Cluster, ClusterOpts};
use serde_json::Value;

use crate::dockerd::{self, pids_where, rss_kib, Engines};
use crate::report;
use crate::stats::{median, secs};

pub const ABOUT: &str =
    "mesh and a real Docker Swarm (dockerd 20.10) side by side on the same 5 netns hosts";

const HOSTS: usize = 5;
const MANAGERS: usize = 3;
const IMAGE: &str = "meshbench:1";
/// Bound of every wait.
const BOUND: Duration = Duration::from_secs(180);
/// How long each answer is watched for stale records after a scale-down.
const STALE_WATCH: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mesh,
    Docker,
}

/// One of the two systems on its cluster.
struct Side<'a> {
    kind: Kind,
    c: &'a Cluster,
    engines: Option<&'a Engines>,
}

/// A finished CLI call.
struct Reply {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl From<Output> for Reply {
    fn from(o: Output) -> Reply {
        Reply {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }
}

impl Side<'_> {
    fn label(&self) -> &'static str {
        match self.kind {
            Kind::Mesh => "mesh",
            Kind::Docker => "Docker Swarm",
        }
    }

    /// The number of the `sleep` a task of this side runs for `base`: the two sides run at the
    /// same time and their tasks are told apart by it.
    fn mark(&self, base: u32) -> u32 {
        match self.kind {
            Kind::Mesh => base,
            Kind::Docker => base + 1000,
        }
    }

    /// The system's CLI against host `i`'s daemon, bounded by `timeout`.
    fn cli_timeout(&self, i: usize, args: &[&str], timeout: Duration) -> Result<Reply> {
        let mut cmd = match self.kind {
            Kind::Mesh => {
                let mut cmd = Command::new(&mesh_netns::binaries()?.mesh);
                cmd.arg("-H")
                    .arg(format!("unix://{}", self.c.host(i).socket().display()));
                cmd
            }
            Kind::Docker => {
                let e = self.engines.expect("docker side has engines");
                let mut cmd = Command::new(dockerd::DOCKER);
                cmd.arg("-H")
                    .arg(format!("unix://{}", e.socket(i).display()));
                cmd
            }
        };
        cmd.args(args);
        Ok(output_with_timeout(&mut cmd, timeout)?.into())
    }

    fn cli(&self, i: usize, args: &[&str]) -> Result<Reply> {
        self.cli_timeout(i, args, Duration::from_secs(60))
    }

    fn ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let r = self.cli(i, args)?;
        if !r.ok {
            bail!(
                "{} on h{i}: `{}` failed: {}",
                self.label(),
                args.join(" "),
                r.stderr.trim()
            );
        }
        Ok(r.stdout)
    }

    /// `service create` with what both need to return at once (and Docker not to look the
    /// local image up in a registry).
    fn service_create(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut a = vec!["service", "create", "-d"];
        if self.kind == Kind::Docker {
            a.push("--no-resolve-image");
        }
        a.extend_from_slice(args);
        self.ok(i, &a)
    }

    fn kill_daemon(&self, i: usize) -> Result<()> {
        match self.kind {
            Kind::Mesh => self.c.host(i).kill_daemon(),
            Kind::Docker => self.engines.expect("engines").kill_daemon(i),
        }
    }

    fn restart_daemon(&self, i: usize) -> Result<()> {
        match self.kind {
            Kind::Mesh => self.c.host(i).start_daemon(),
            Kind::Docker => {
                let e = self.engines.expect("engines");
                e.start_daemon(i)?;
                e.wait_up(i)
            }
        }
    }

    /// `node ls` rows as (hostname, status, manager status).
    fn nodes(&self, i: usize) -> Result<Vec<(String, String, String)>> {
        let out = self.ok(
            i,
            &[
                "node",
                "ls",
                "--format",
                "{{.Hostname}} {{.Status}} {{.ManagerStatus}}",
            ],
        )?;
        Ok(out
            .lines()
            .map(|l| {
                let mut w = l.split_whitespace();
                (
                    w.next().unwrap_or_default().to_string(),
                    w.next().unwrap_or_default().to_string(),
                    w.next().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// Waits until host `i` sees every node Ready and `MANAGERS` managers, one of them Leader.
    fn wait_healthy(&self, i: usize) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(n) = self.nodes(i) {
                let ready = n.iter().filter(|r| r.1 == "Ready").count();
                let managers = n
                    .iter()
                    .filter(|r| r.2 == "Leader" || r.2 == "Reachable")
                    .count();
                if n.len() == HOSTS
                    && ready == HOSTS
                    && managers == MANAGERS
                    && n.iter().any(|r| r.2 == "Leader")
                {
                    return Ok(());
                }
            }
            ensure!(
                t0.elapsed() < BOUND,
                "{}: the cluster did not become healthy",
                self.label()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host index of the current leader, as host `i` sees it.
    fn leader(&self, i: usize) -> Result<usize> {
        let name = self
            .nodes(i)?
            .into_iter()
            .find(|r| r.2 == "Leader")
            .map(|r| r.0)
            .ok_or_else(|| anyhow!("{}: no leader", self.label()))?;
        host_index(self.c, &name)
    }

    /// Forms the swarm: host 1 initializes it, hosts 2..=MANAGERS join as managers, the rest
    /// as workers.
    fn form(&self) -> Result<()> {
        match self.kind {
            Kind::Mesh => form_swarm(self.c, MANAGERS)?,
            Kind::Docker => {
                let a1 = self.c.host(1).addr().to_string();
                self.ok(1, &["swarm", "init", "--advertise-addr", &a1])?;
                let mtok = self.ok(1, &["swarm", "join-token", "-q", "manager"])?;
                let wtok = self.ok(1, &["swarm", "join-token", "-q", "worker"])?;
                for i in 2..=HOSTS {
                    let tok = if i <= MANAGERS { &mtok } else { &wtok };
                    let ai = self.c.host(i).addr().to_string();
                    self.ok(
                        i,
                        &[
                            "swarm",
                            "join",
                            "--token",
                            tok.trim(),
                            "--advertise-addr",
                            &ai,
                            &format!("{a1}:2377"),
                        ],
                    )?;
                }
            }
        }
        self.wait_healthy(1)
    }

    /// Loads the test image archive on every node.
    fn load_image(&self, archive: &str) -> Result<()> {
        for i in 1..=HOSTS {
            match self.kind {
                Kind::Mesh => self.ok(i, &["image", "load", "-i", archive])?,
                Kind::Docker => self.ok(i, &["load", "-i", archive])?,
            };
        }
        Ok(())
    }

    /// RSS (KiB) of host `i`'s daemons (meshd; dockerd and its containerd).
    fn daemons_rss(&self, i: usize) -> u64 {
        let pids: Vec<u32> = match self.kind {
            Kind::Mesh => self.c.host(i).daemon_pid().into_iter().collect(),
            Kind::Docker => self.engines.expect("engines").daemon_pids(i),
        };
        pids.iter().map(|p| rss_kib(*p)).sum()
    }

    /// The count and RSS (KiB) of the per-task helper processes of all nodes (mesh's task
    /// shims, `meshd __mesh_task_shim TASK_DIR`, and namespace holders; Docker's containerd
    /// shims).
    fn helpers(&self) -> (usize, u64) {
        let pids = match self.kind {
            Kind::Mesh => {
                let dir = self.c.base_dir().display().to_string();
                pids_where(|cmd| {
                    (cmd.contains("\0__mesh_task_shim\0") || cmd.contains("\0__mesh_netns_holder"))
                        && cmd.contains(&dir)
                })
            }
            Kind::Docker => {
                let e = self.engines.expect("engines");
                (1..=HOSTS).flat_map(|i| e.shim_pids(i)).collect()
            }
        };
        (pids.len(), pids.iter().map(|p| rss_kib(*p)).sum())
    }

    /// Runs `argv` inside a running task of `service` on host `i`, with the system's own exec.
    fn exec_in(&self, i: usize, service: &str, argv: &[&str]) -> Result<Reply> {
        let node = self.c.host(i).name().to_string();
        let mut a: Vec<&str> = vec!["exec"];
        let id;
        match self.kind {
            Kind::Mesh => {
                id = self.ok(
                    i,
                    &[
                        "service",
                        "ps",
                        service,
                        "-q",
                        "--filter",
                        &format!("node={node}"),
                        "--filter",
                        "desired-state=running",
                    ],
                )?;
                a.push(id.lines().next().unwrap_or_default());
                a.push("--");
            }
            Kind::Docker => {
                id = self.ok(
                    i,
                    &[
                        "ps",
                        "-q",
                        "--filter",
                        &format!("label=com.docker.swarm.service.name={service}"),
                    ],
                )?;
                a.push(id.lines().next().unwrap_or_default());
            }
        }
        a.extend_from_slice(argv);
        self.cli_timeout(i, &a, Duration::from_secs(10))
    }
}

/// A task command whose process `sleep MARK` the benchmark counts, under a shell that exits at
/// once on SIGTERM (a bare `sleep` as a container's pid 1 ignores it, and every stop would
/// measure the stop grace period instead of the system).
fn sleeper(mark: u32) -> String {
    format!("trap 'exit 0' TERM; sleep {mark} & wait")
}

/// The index of the host named `name` (h1 -> 1).
fn host_index(c: &Cluster, name: &str) -> Result<usize> {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .map(|h| h.index())
        .ok_or_else(|| anyhow!("no host named {name}"))
}

/// Everything measured on one system.
#[derive(Default)]
struct Results {
    failover: Vec<Duration>,
    create: Vec<Duration>,
    scale_down: Vec<Duration>,
    /// Per node: the daemons' RSS (KiB).
    daemons_rss: Vec<u64>,
    /// All nodes: per-task helper processes and their RSS (KiB).
    helpers: (usize, u64),
    throughput: Vec<f64>,
    dns_converge: Option<Duration>,
    dns_stale: (usize, usize),
    update: Option<(u64, u64, Duration)>,
    vip: String,
    routing_mesh: String,
    detect: Vec<Duration>,
    notes: Vec<String>,
}

struct Opts {
    rounds: usize,
    mesh: bool,
    docker: bool,
}

fn parse(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        rounds: 3,
        mesh: true,
        docker: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!(
                    "usage: mesh-bench swarm [--rounds N] [--only mesh|docker] [--no-write-docs]\n\n\
                     {ABOUT}\n\
                     --rounds N      failovers and create/scale rounds per system (default 3)\n\
                     --only SYSTEM   run one side alone (the report is then not written)"
                );
                return Ok(None);
            }
            "--rounds" => {
                o.rounds = it
                    .next()
                    .ok_or_else(|| anyhow!("--rounds needs a value"))?
                    .parse()
                    .context("--rounds")?;
                ensure!(o.rounds >= 1, "--rounds must be at least 1");
            }
            "--only" => match it.next().map(String::as_str) {
                Some("mesh") => o.docker = false,
                Some("docker") => o.mesh = false,
                _ => bail!("--only needs `mesh` or `docker`"),
            },
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(Some(o))
}

/// Runs the benchmark; with `write`, the chart is written beside `docs/benchmarks.md` (the
/// caller writes the report's section). Returns the report, empty when there is nothing to
/// keep (`--help`, or one side alone, whose report is printed here).
pub fn run(args: &[String], write: bool) -> Result<String> {
    let Some(opts) = parse(args)? else {
        return Ok(String::new());
    };
    if !require_root()? {
        bail!("the swarm benchmark needs root (network namespaces)");
    }
    let docker_version = if opts.docker {
        Some(dockerd::ensure_installed()?)
    } else {
        None
    };
    let date = report::utc_now();
    let machine = report::machine();

    let mesh_cluster = if opts.mesh {
        Some(Cluster::new(ClusterOpts {
            hosts: HOSTS,
            start_daemons: true,
            name_hint: "bench-swarm-mesh",
        })?)
    } else {
        None
    };
    let docker_cluster = if opts.docker {
        Some(Cluster::new(ClusterOpts {
            hosts: HOSTS,
            start_daemons: false,
            name_hint: "bench-swarm-docker",
        })?)
    } else {
        None
    };
    let engines = match &docker_cluster {
        Some(c) => Some(Engines::start(c)?),
        None => None,
    };
    let mut sides = Vec::new();
    if let Some(c) = &mesh_cluster {
        sides.push(Side {
            kind: Kind::Mesh,
            c,
            engines: None,
        });
    }
    if let (Some(c), Some(e)) = (&docker_cluster, &engines) {
        sides.push(Side {
            kind: Kind::Docker,
            c,
            engines: Some(e),
        });
    }
    let measured = measure(&sides, &opts);
    drop(sides);
    let cleaned = engines.map(Engines::remove).unwrap_or(Ok(()));
    let mut measured = measured?.into_iter();
    cleaned?;
    let mesh = if opts.mesh { measured.next() } else { None };
    let docker = if opts.docker { measured.next() } else { None };
    let text = render(
        &opts,
        &date,
        &machine,
        docker_version.as_deref(),
        mesh.as_ref(),
        docker.as_ref(),
    );
    if let (Some(m), Some(d)) = (&mesh, &docker) {
        let chart = std::path::Path::new(report::DOCS_PATH).with_file_name(CHART);
        if write {
            std::fs::write(&chart, chart_svg(m, d))
                .with_context(|| format!("writing {}", chart.display()))?;
        }
        Ok(text)
    } else {
        // One side alone is not a comparison: print it, keep the document as it is.
        println!("{text}");
        Ok(String::new())
    }
}

fn step<T>(side: &Side, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("swarm: {}: {what}", side.label());
    let t0 = Instant::now();
    let r = f().with_context(|| format!("{}: {what}", side.label()));
    eprintln!(
        "swarm: {}: {what}: {} in {:.1} s",
        side.label(),
        if r.is_ok() { "done" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    r
}

/// Runs every step on every side, step after step, the rounds of a step alternating between
/// the sides (mesh, Docker, mesh, ...) so that what else the machine does weighs on both.
fn measure(sides: &[Side], opts: &Opts) -> Result<Vec<Results>> {
    let mut res: Vec<Results> = sides.iter().map(|_| Results::default()).collect();
    for side in sides {
        step(side, "forming the swarm", || side.form())?;
        let archive = side.c.base_dir().join("meshbench.tar");
        save_test_image(
            &side.c.base_dir().join("image"),
            "meshbench",
            "1",
            "v1",
            &archive,
        )?;
        let archive = archive.display().to_string();
        step(side, "loading the image", || side.load_image(&archive))?;
    }
    for round in 0..opts.rounds {
        for (side, r) in sides.iter().zip(res.iter_mut()) {
            let d = step(side, &format!("leader failover {round}"), || failover(side))?;
            r.failover.push(d);
        }
    }
    for round in 0..opts.rounds {
        let last = round + 1 == opts.rounds;
        for (side, r) in sides.iter().zip(res.iter_mut()) {
            let (up, down) = step(side, &format!("create 30 / scale 0, round {round}"), || {
                create_scale(side, round, last.then_some(&mut *r))
            })?;
            r.create.push(up);
            r.scale_down.push(down);
        }
    }
    for side in sides {
        step(side, "overlay network and probes", || network_setup(side))?;
    }
    for round in 0..opts.rounds {
        for (side, r) in sides.iter().zip(res.iter_mut()) {
            let g = step(side, &format!("overlay throughput {round}"), || {
                throughput(side)
            })?;
            r.throughput.push(g);
        }
    }
    for (side, r) in sides.iter().zip(res.iter_mut()) {
        match step(side, "stale DNS after scale-down", || stale_dns(side)) {
            Ok((d, stale)) => {
                r.dns_converge = Some(d);
                r.dns_stale = stale;
            }
            Err(e) => r.notes.push(format!("stale DNS: {e:#}")),
        }
        match step(side, "rolling update of a dnsrr service", || {
            rolling_update(side)
        }) {
            Ok(u) => r.update = Some(u),
            Err(e) => r.notes.push(format!("rolling update: {e:#}")),
        }
        let (vip, rm) = step(side, "VIP and routing mesh", || vip_and_mesh(side))?;
        r.vip = vip;
        r.routing_mesh = rm;
    }
    for round in 0..opts.rounds.min(2) {
        for (side, r) in sides.iter().zip(res.iter_mut()) {
            let d = step(side, &format!("node failure detection {round}"), || {
                detect_failure(side)
            })?;
            r.detect.push(d);
        }
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// 1. Leader failover

fn failover(side: &Side) -> Result<Duration> {
    side.wait_healthy(1)?;
    // Ask a manager that is not going to be killed where the leader is.
    let leader = side.leader(1).or_else(|_| side.leader(2))?;
    let survivors: Vec<usize> = (1..=MANAGERS).filter(|i| *i != leader).collect();
    let t0 = Instant::now();
    side.kill_daemon(leader)?;
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for &i in &survivors {
            let (done, tx) = (done.clone(), tx.clone());
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) && t0.elapsed() < BOUND {
                    if side
                        .cli_timeout(i, &["node", "ls", "-q"], Duration::from_secs(10))
                        .is_ok_and(|r| r.ok)
                    {
                        let _ = tx.send(t0.elapsed());
                        done.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        drop(tx);
    });
    let served = rx
        .recv()
        .map_err(|_| anyhow!("no management call succeeded within {BOUND:?}"))?;
    side.restart_daemon(leader)?;
    side.wait_healthy(survivors[0])?;
    std::thread::sleep(Duration::from_secs(2));
    Ok(served)
}

// ---------------------------------------------------------------------------------------
// 2, 3. Create 30, memory at rest, scale to 0

fn wait_procs(marker: u32, n: usize) -> Result<Duration> {
    let t0 = Instant::now();
    while sleep_pids(marker).len() != n {
        ensure!(
            t0.elapsed() < BOUND,
            "{} processes `sleep {marker}` instead of {n}",
            sleep_pids(marker).len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t0.elapsed())
}

fn create_scale(
    side: &Side,
    round: usize,
    memory: Option<&mut Results>,
) -> Result<(Duration, Duration)> {
    let name = format!("bench{round}");
    let marker = side.mark(86_600 + round as u32);
    let t0 = Instant::now();
    side.service_create(
        1,
        &[
            "--name",
            &name,
            "--replicas",
            "30",
            IMAGE,
            "sh",
            "-c",
            &sleeper(marker),
        ],
    )?;
    wait_procs(marker, 30)?;
    let up = t0.elapsed();
    if let Some(m) = memory {
        std::thread::sleep(Duration::from_secs(5));
        m.daemons_rss = (1..=HOSTS).map(|i| side.daemons_rss(i)).collect();
        m.helpers = side.helpers();
    }
    let t0 = Instant::now();
    side.ok(1, &["service", "scale", "-d", &format!("{name}=0")])?;
    wait_procs(marker, 0)?;
    let down = t0.elapsed();
    side.ok(1, &["service", "rm", &name])?;
    Ok((up, down))
}

// ---------------------------------------------------------------------------------------
// 4-7. On an overlay network

const NET: &str = "benchnet";
const PROBE_MARK: u32 = 86_701;
const TARGET_MARK: u32 = 86_702;
const IPSRV_MARK: u32 = 86_703;
const IPCLI_MARK: u32 = 86_704;

/// The overlay network, a global probe service on it (one task per node), and the two iperf3
/// tasks (a server task on h4, a client task on h5).
fn network_setup(side: &Side) -> Result<()> {
    side.ok(
        1,
        &["network", "create", "-d", "overlay", "--attachable", NET],
    )?;
    side.service_create(
        1,
        &[
            "--name",
            "probe",
            "--mode",
            "global",
            "--network",
            NET,
            IMAGE,
            "sh",
            "-c",
            &sleeper(side.mark(PROBE_MARK)),
        ],
    )?;
    for (name, host, mark) in [
        ("ipsrv", "h4", side.mark(IPSRV_MARK)),
        ("ipcli", "h5", side.mark(IPCLI_MARK)),
    ] {
        side.service_create(
            1,
            &[
                "--name",
                name,
                "--network",
                NET,
                "--constraint",
                &format!("node.hostname=={host}"),
                IMAGE,
                "sh",
                "-c",
                &sleeper(mark),
            ],
        )?;
    }
    wait_procs(side.mark(PROBE_MARK), HOSTS)?;
    wait_procs(side.mark(IPSRV_MARK), 1)?;
    wait_procs(side.mark(IPCLI_MARK), 1)?;
    // Until every probe resolves the iperf3 server.
    let t0 = Instant::now();
    for p in sleep_pids(side.mark(PROBE_MARK)) {
        while lookup(p, "tasks.ipsrv").map(|a| a.len()) != Ok(1) {
            ensure!(t0.elapsed() < BOUND, "probes do not resolve tasks.ipsrv");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn one_pid(marker: u32) -> Result<u32> {
    let p = sleep_pids(marker);
    ensure!(p.len() == 1, "{} processes `sleep {marker}`", p.len());
    Ok(p[0])
}

fn throughput(side: &Side) -> Result<f64> {
    let (srv, cli) = (
        one_pid(side.mark(IPSRV_MARK))?,
        one_pid(side.mark(IPCLI_MARK))?,
    );
    let ip = lookup(cli, "tasks.ipsrv")
        .map_err(|e| anyhow!(e))?
        .first()
        .copied()
        .ok_or_else(|| anyhow!("tasks.ipsrv has no address"))?;
    let mut server = Command::new("nsenter")
        .arg(format!("--net=/proc/{srv}/ns/net"))
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{cli}/ns/net")).args([
        "iperf3",
        "-c",
        &ip.to_string(),
        "-p",
        "5201",
        "-t",
        "5",
        "-J",
    ]);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(30));
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("iperf3 failed: {}", v["error"]))
}

/// The sorted A records the embedded DNS in `pid`'s network namespace answers for `name`.
fn lookup(pid: u32, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let name = name.to_string();
    in_netns_of(pid, move || {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        crate::dns::lookup_a_at(&sock, SocketAddr::from(([127, 0, 0, 11], 53)), &name, 7)
            .map_err(|e| format!("{e:#}"))
    })
    .map_err(|e| format!("{e:#}"))?
}

/// Runs `f` on a thread that joined `pid`'s network namespace.
fn in_netns_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("the network namespace of {pid}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns only reads the descriptor, which `file` keeps open, and changes the
        // network namespace of this thread alone.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("the thread in {pid}'s namespace panicked"))?
}

/// Scale `target` 10 -> 5: time until every probe answers exactly 5 addresses, then stale or
/// failed answers over [`STALE_WATCH`] (stale, asked).
fn stale_dns(side: &Side) -> Result<(Duration, (usize, usize))> {
    side.service_create(
        1,
        &[
            "--name",
            "target",
            "--replicas",
            "10",
            "--network",
            NET,
            IMAGE,
            "sh",
            "-c",
            &sleeper(side.mark(TARGET_MARK)),
        ],
    )?;
    wait_procs(side.mark(TARGET_MARK), 10)?;
    let probes = sleep_pids(side.mark(PROBE_MARK));
    let t0 = Instant::now();
    let mut all = BTreeSet::new();
    for &p in &probes {
        loop {
            if let Ok(a) = lookup(p, "tasks.target") {
                if a.len() == 10 {
                    all.extend(a);
                    break;
                }
            }
            ensure!(t0.elapsed() < BOUND, "tasks.target never had 10 addresses");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    ensure!(all.len() == 10, "probes disagree on tasks.target: {all:?}");
    let t0 = Instant::now();
    side.ok(1, &["service", "scale", "-d", "target=5"])?;
    // Until every probe answers 5 addresses (all among the 10).
    let mut pending: Vec<u32> = probes.clone();
    let mut last = BTreeSet::new();
    while !pending.is_empty() {
        pending.retain(|&p| match lookup(p, "tasks.target") {
            Ok(a) if a.len() == 5 && a.iter().all(|x| all.contains(x)) => {
                last = a.into_iter().collect();
                false
            }
            _ => true,
        });
        ensure!(
            t0.elapsed() < BOUND,
            "DNS did not converge after scale-down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let converged = t0.elapsed();
    let watch = Instant::now();
    let (mut stale, mut asked) = (0, 0);
    while watch.elapsed() < STALE_WATCH {
        for &p in &probes {
            asked += 1;
            match lookup(p, "tasks.target") {
                Ok(a) if a.iter().copied().collect::<BTreeSet<_>>() == last => {}
                _ => stale += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    side.ok(1, &["service", "rm", "target"])?;
    Ok((converged, (stale, asked)))
}

/// busybox httpd serving the image's `/srv/index.html` on 8080, under a shell that stops it at
/// once on SIGTERM (see [`sleeper`]).
const HTTPD: &str = "trap 'kill $p; exit 0' TERM; httpd -f -p 8080 -h /srv & p=$!; wait";

/// One HTTP/1.0 GET of `/` from `ip:8080`; true when the test page came back.
fn http_ok(ip: Ipv4Addr) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&SocketAddr::from((ip, 8080)), Duration::from_millis(1000))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("hello from")
}

/// `web` (dnsrr, 4 busybox httpd) updated with `--force` while a client resolves it and sends
/// requests round robin; (failed, sent, update duration).
fn rolling_update(side: &Side) -> Result<(u64, u64, Duration)> {
    side.service_create(
        1,
        &[
            "--name",
            "web",
            "--replicas",
            "4",
            "--endpoint-mode",
            "dnsrr",
            "--network",
            NET,
            IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    )?;
    let client = sleep_pids(side.mark(PROBE_MARK))
        .first()
        .copied()
        .ok_or_else(|| anyhow!("no probe"))?;
    // Until the client gets 4 working answers.
    let t0 = Instant::now();
    loop {
        if let Ok(a) = lookup(client, "web") {
            let up = a.clone();
            if a.len() == 4
                && in_netns_of(client, move || up.iter().all(|ip| http_ok(*ip))).unwrap_or(false)
            {
                break;
            }
        }
        ensure!(t0.elapsed() < BOUND, "web never served 4 tasks");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let worker = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        std::thread::spawn(move || {
            in_netns_of(client, move || {
                let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
                sock.set_read_timeout(Some(Duration::from_millis(500)))
                    .ok()?;
                let server = SocketAddr::from(([127, 0, 0, 11], 53));
                let mut n: usize = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let ok = match crate::dns::lookup_a_at(&sock, server, "web", n as u16) {
                        Ok(a) if !a.is_empty() => http_ok(a[n % a.len()]),
                        _ => false,
                    };
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(())
            })
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let res = (|| -> Result<Duration> {
        side.ok(1, &["service", "update", "-d", "--force", "web"])?;
        loop {
            let v: Value = serde_json::from_str(&side.ok(1, &["service", "inspect", "web"])?)?;
            // Docker's `State`; mesh's own inspect says `state`.
            let st = &v[0]["UpdateStatus"];
            let state = st["State"]
                .as_str()
                .or(st["state"].as_str())
                .unwrap_or_default();
            if state == "completed" {
                return Ok(t0.elapsed());
            }
            ensure!(
                !state.contains("paused") && t0.elapsed() < BOUND,
                "update state {state:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let _ = worker.join();
    let took = res?;
    side.ok(1, &["service", "rm", "web"])?;
    Ok((
        failed.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
        took,
    ))
}

/// A VIP service with a published port: (what a task's request to the service's name gets,
/// what a request to the published port of a node without a task gets).
fn vip_and_mesh(side: &Side) -> Result<(String, String)> {
    let created = side.service_create(
        1,
        &[
            "--name",
            "vipweb",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==h4",
            "--network",
            NET,
            "--publish",
            "18080:8080",
            IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    );
    if let Err(e) = created {
        let msg = format!("service create failed: {e:#}");
        return Ok((msg.clone(), msg));
    }
    let client = sleep_pids(side.mark(PROBE_MARK))
        .first()
        .copied()
        .ok_or_else(|| anyhow!("no probe"))?;
    // Up to 30 s for the VIP to answer from a task.
    let t0 = Instant::now();
    let vip = loop {
        // The request goes out of the task's own process (its exec), so that whatever the
        // system hooks on the task (mesh: eBPF on its cgroup) applies.
        let answer = lookup(client, "vipweb");
        let ok = match &answer {
            Ok(a) if a.len() == 1 => {
                let script = format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 8080",
                    a[0]
                );
                side.exec_in(1, "probe", &["sh", "-c", &script])
                    .is_ok_and(|r| r.stdout.contains("hello from"))
            }
            _ => false,
        };
        if ok {
            break format!("works ({:.1} s after create)", t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break format!("fails: `vipweb` resolves to {answer:?}, no HTTP answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The routing mesh: h2 has no vipweb task.
    let url = format!("http://{}:18080/", side.c.host(2).addr());
    let t0 = Instant::now();
    let mesh = loop {
        let out = side
            .c
            .client_exec_timeout(&["curl", "-s", "-m", "2", &url], Duration::from_secs(5));
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("hello from")) {
            break format!("works ({:.1} s after create)", t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break "fails: no HTTP answer on a node's published port within 30 s".to_string();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    side.ok(1, &["service", "rm", "vipweb"])?;
    Ok((vip, mesh))
}

// ---------------------------------------------------------------------------------------
// 8. Node failure detection

fn detect_failure(side: &Side) -> Result<Duration> {
    side.wait_healthy(1)?;
    let leader = side.leader(1)?;
    let victim = side.c.host(HOSTS);
    let t0 = Instant::now();
    victim.cut_link()?;
    let res = (|| -> Result<Duration> {
        loop {
            if side
                .nodes(leader)?
                .iter()
                .any(|r| r.0 == victim.name() && r.1 == "Down")
            {
                return Ok(t0.elapsed());
            }
            ensure!(t0.elapsed() < BOUND, "{} never shown Down", victim.name());
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    victim.heal_link()?;
    let d = res?;
    side.wait_healthy(leader)?;
    Ok(d)
}

// ---------------------------------------------------------------------------------------
// The report

fn fmt_secs(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    format!(
        "{} ({})",
        secs(median(v)),
        v.iter().map(|d| secs(*d)).collect::<Vec<_>>().join(", ")
    )
}

fn ratio(mesh: f64, docker: f64) -> String {
    if mesh > 0.0 && docker > 0.0 {
        format!("{:.2}", mesh / docker)
    } else {
        "-".into()
    }
}

fn med_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn daemons_cell(r: &Results) -> String {
    if r.daemons_rss.is_empty() {
        return "-".into();
    }
    let per: Vec<String> = r
        .daemons_rss
        .iter()
        .map(|k| format!("{}", k / 1024))
        .collect();
    format!(
        "{} MiB ({} per node)",
        r.daemons_rss.iter().sum::<u64>() / 1024,
        per.join(" / ")
    )
}

fn helpers_cell(r: &Results) -> String {
    if r.daemons_rss.is_empty() {
        return "-".into();
    }
    format!("{} processes, {} MiB", r.helpers.0, r.helpers.1 / 1024)
}

/// The chart next to `docs/benchmarks.md`.
const CHART: &str = "swarm-bench.svg";

/// A bar chart of the timed rows: per row, mesh's and Docker's median seconds, each row scaled
/// to its longer bar.
fn chart_svg(m: &Results, d: &Results) -> String {
    let med = |v: &[Duration]| (!v.is_empty()).then(|| median(v).as_secs_f64());
    let rows: Vec<(&str, Option<f64>, Option<f64>)> = vec![
        ("leader failover", med(&m.failover), med(&d.failover)),
        ("create 30 replicas", med(&m.create), med(&d.create)),
        ("scale 30 -> 0", med(&m.scale_down), med(&d.scale_down)),
        (
            "DNS after scale-down",
            m.dns_converge.map(|x| x.as_secs_f64()),
            d.dns_converge.map(|x| x.as_secs_f64()),
        ),
        (
            "dnsrr rolling update",
            m.update.map(|u| u.2.as_secs_f64()),
            d.update.map(|u| u.2.as_secs_f64()),
        ),
        ("node failure detected", med(&m.detect), med(&d.detect)),
    ];
    let (left, width, row_h) = (190.0, 420.0, 46.0);
    let height = 50.0 + row_h * rows.len() as f64 + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"700\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">mesh vs Docker Swarm (dockerd 20.10): \
         seconds, shorter is better</text>\n"
    );
    for (i, (label, a, b)) in rows.iter().enumerate() {
        let y = 45.0 + row_h * i as f64;
        let max = a.unwrap_or(0.0).max(b.unwrap_or(0.0)).max(1e-9);
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{label}</text>\n",
            y + 22.0
        ));
        for (j, (v, color, who)) in [(a, "#2b7bb9", "mesh"), (b, "#d9822b", "Docker")]
            .into_iter()
            .enumerate()
        {
            let yy = y + 4.0 + 18.0 * j as f64;
            match v {
                Some(v) => {
                    let w = (v / max * width).max(1.0);
                    s.push_str(&format!(
                        "<rect x=\"{left}\" y=\"{yy}\" width=\"{w:.1}\" height=\"15\" \
                         fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{who} {v:.2} s</text>\n",
                        left + w + 5.0,
                        yy + 12.0
                    ));
                }
                None => s.push_str(&format!(
                    "<text x=\"{left}\" y=\"{:.1}\">{who}: not measured</text>\n",
                    yy + 12.0
                )),
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Picks one row's timings out of a system's results.
type Timings = fn(&Results) -> &Vec<Duration>;

fn render(
    opts: &Opts,
    date: &str,
    machine: &str,
    docker_version: Option<&str>,
    m: Option<&Results>,
    d: Option<&Results>,
) -> String {
    let empty = Results::default();
    let (m_ran, d_ran) = (m.is_some(), d.is_some());
    let m = m.unwrap_or(&empty);
    let dd = d.unwrap_or(&empty);
    let dsec = |f: Timings| -> (String, String, String) {
        let (a, b) = (f(m), f(dd));
        let r = if a.is_empty() || b.is_empty() {
            "-".into()
        } else {
            ratio(median(a).as_secs_f64(), median(b).as_secs_f64())
        };
        (fmt_secs(a), fmt_secs(b), r)
    };
    let mut s = String::new();
    s.push_str("## Side by side with Docker Swarm\n\n");
    s.push_str(&format!(
        "Measured {date} on {machine}. Reproduce with `cargo xtask bench swarm` (installs \
         Debian's docker.io if dockerd is missing). Docker: {}. Two clusters of 5 netns \
         hosts (3 managers, 2 workers), one of meshd and one of dockerd in swarm mode, run at \
         the same time and go through the same steps, driven by each system's own CLI, with \
         the same image (busybox, loaded with `image load` / `docker load`); the rounds of a \
         step alternate between them. {} rounds where a row has several (median, then each \
         round). Ratio = mesh / Docker (below 1: mesh takes less, or uses less).\n\n",
        docker_version.unwrap_or("not run (--only mesh)"),
        opts.rounds
    ));
    s.push_str("| step | mesh | Docker Swarm | ratio |\n|---|---|---|---:|\n");
    let rows: [(&str, Timings); 4] = [
        (
            "leader failover: SIGKILL of the leader's daemon until `node ls` succeeds on a survivor",
            |r| &r.failover,
        ),
        ("`service create` 30 replicas until 30 processes run", |r| {
            &r.create
        }),
        ("`service scale` 30 -> 0 until no process is left", |r| {
            &r.scale_down
        }),
        (
            "node failure (underlay link cut) until the leader shows it Down",
            |r| &r.detect,
        ),
    ];
    for (what, f) in rows {
        let (a, b, r) = dsec(f);
        s.push_str(&format!("| {what} | {a} | {b} | {r} |\n"));
    }
    let (tm, td) = (med_f(&m.throughput), med_f(&dd.throughput));
    let fmt_g = |v: &[f64]| {
        if v.is_empty() {
            return "-".to_string();
        }
        let each: Vec<String> = v.iter().map(|g| format!("{g:.2}")).collect();
        format!("{:.2} Gbit/s ({})", med_f(v), each.join(", "))
    };
    s.push_str(&format!(
        "| overlay throughput, task on h5 to task on h4 (iperf3, 1 stream, 5 s) | {} | {} | {} |\n",
        fmt_g(&m.throughput),
        fmt_g(&dd.throughput),
        ratio(tm, td)
    ));
    let dns = |r: &Results| match r.dns_converge {
        Some(c) => format!(
            "{}; then {} stale or failed of {} answers in {} s",
            secs(c),
            r.dns_stale.0,
            r.dns_stale.1,
            STALE_WATCH.as_secs()
        ),
        None => "-".into(),
    };
    s.push_str(&format!(
        "| `scale` 10 -> 5 until every node's DNS answers `tasks.target` without the removed tasks | {} | {} | {} |\n",
        dns(m),
        dns(dd),
        match (m.dns_converge, dd.dns_converge) {
            (Some(a), Some(b)) => ratio(a.as_secs_f64(), b.as_secs_f64()),
            _ => "-".into(),
        }
    ));
    let upd = |r: &Results| match r.update {
        Some((f, n, t)) => format!("{f} failed of {n} requests (update took {})", secs(t)),
        None => "-".into(),
    };
    s.push_str(&format!(
        "| failed requests during `service update --force` of a dnsrr service (4 httpd) | {} | {} | |\n",
        upd(m),
        upd(dd)
    ));
    s.push_str(&format!(
        "| a task calls a VIP service by name | {} | {} | |\n",
        if m_ran { m.vip.as_str() } else { "-" },
        if d_ran { dd.vip.as_str() } else { "-" }
    ));
    s.push_str(&format!(
        "| the routing mesh: a published port on a node without a task, from the underlay | {} | {} | |\n",
        if m_ran { m.routing_mesh.as_str() } else { "-" },
        if d_ran { dd.routing_mesh.as_str() } else { "-" }
    ));
    s.push_str(&format!(
        "| daemons' RSS with 30 tasks at rest (meshd; dockerd + containerd) | {} | {} | {} |\n",
        daemons_cell(m),
        daemons_cell(dd),
        ratio(
            m.daemons_rss.iter().sum::<u64>() as f64,
            dd.daemons_rss.iter().sum::<u64>() as f64
        )
    ));
    s.push_str(&format!(
        "| per-task helper processes with 30 tasks (mesh's task shims and namespace holders; containerd-shim-runc-v2) | {} | {} | {} |\n",
        helpers_cell(m),
        helpers_cell(dd),
        ratio(m.helpers.1 as f64, dd.helpers.1 as f64)
    ));
    for (who, r) in [("mesh", m), ("Docker", dd)] {
        for n in &r.notes {
            s.push_str(&format!("\n{who}: {n}\n"));
        }
    }
    s.push_str(&format!("\n![mesh vs Docker Swarm]({CHART})\n"));
    s.push_str(
        "\nSettings: each system's defaults (dispatcher heartbeat mesh 0.5 s, Docker 5 s, which \
         the node failure row mostly reflects; Raft election timeouts as shipped). The client \
         and every daemon share the same 2 CPUs, so ratios matter more than absolute numbers. \
         Both overlays are the kernel's VXLAN, hence the same throughput. The machine's kernel \
         has no IPVS, which Docker's VIPs and routing mesh need: on such kernels they do not \
         work at all, while mesh balances VIPs with eBPF (nftables as the fallback). Processes \
         are counted from `/proc` (`sleep N`, a number per service and system), DNS is asked \
         from inside the tasks' network namespaces, iperf3 is the host's binary run in the \
         tasks' namespaces, and the VIP request goes out of the task itself (`exec`).\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&a(&["--rounds", "0"])).is_err());
        assert!(parse(&a(&["--bogus"])).is_err());
        let o = parse(&a(&["--rounds", "2", "--only", "mesh"]))
            .unwrap()
            .unwrap();
        assert_eq!((o.rounds, o.mesh, o.docker), (2, true, false));
        assert!(parse(&a(&["--only", "kubernetes"])).is_err());
        assert!(parse(&a(&["--help"])).unwrap().is_none());
    }

    #[test]
    fn the_report_has_both_systems_per_row() {
        let r = Results {
            failover: vec![Duration::from_millis(900)],
            create: vec![Duration::from_secs(2)],
            vip: "works".into(),
            routing_mesh: "works".into(),
            ..Default::default()
        };
        let d = Results {
            failover: vec![Duration::from_secs(9)],
            create: vec![Duration::from_secs(4)],
            vip: "fails".into(),
            routing_mesh: "fails".into(),
            ..Default::default()
        };
        let opts = Opts {
            rounds: 1,
            mesh: true,
            docker: true,
        };
        let s = render(
            &opts,
            "today",
            "here",
            Some("Docker 20.10"),
            Some(&r),
            Some(&d),
        );
        assert!(s.contains("| 0.10 |"), "{s}");
        assert!(s.contains("| 0.50 |"), "{s}");
        assert!(s.contains("| works | fails |"), "{s}");
    }
}
