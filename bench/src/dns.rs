//! `dns`: mesh's embedded DNS engine (`mesh-dns`) against dnsmasq, side by side in one run.
//!
//! The servers answer the same record set (by default 100 services x 10 tasks on one
//! network: `SERVICE` -> its VIP, `tasks.SERVICE` -> the 10 task IPs, each task's full name
//! and hostname -> its IP) at `127.0.0.11:53`, each inside a network namespace of its own
//! that this benchmark creates (named after its process id, under [`NS_DIR`]; only `lo` is
//! brought up in them, nothing is added to the root namespace):
//!
//! - **mesh**: a [`mesh_dns::Dns`] engine in this process serving a socket pair bound with
//!   [`mesh_dns::bind_in_netns`] and registered with [`mesh_dns::Dns::register`] from a
//!   multi-thread tokio runtime with 2 workers, exactly as meshd builds its runtime and
//!   serves a task (the serving tasks run on the runtime `register` is called from);
//! - **mesh (own thread)**: the same engine registered in a second namespace from a
//!   current-thread runtime on a thread of its own, the configuration this benchmark
//!   suggests for meshd;
//! - **dnsmasq**: `dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts=FILE`
//!   with a hosts file holding the same names (several lines for `tasks.SERVICE` give the
//!   10 addresses), started through `nsenter` in the third namespace.
//!
//! Before measuring, every name is asked of every server by a small UDP client in this
//! process and the answers are compared with the expected sets. Then `dnsperf` (run inside
//! each namespace with `nsenter`) replays the same query file (a third each of `SERVICE`,
//! `tasks.SERVICE` and task names, all type A) in two modes, rounds interleaved (mesh, mesh
//! own thread, dnsmasq, mesh, ...) so that machine drift shows in every column:
//!
//! 1. **saturation**: a closed loop (`-c` clients, `-q` outstanding) measures the most
//!    queries per second each server answers;
//! 2. **fixed rate** (`-Q`): latency at a load all sustain, where queueing inside dnsperf
//!    does not dominate the numbers.
//!
//! dnsperf 2.10 prints only the average, minimum and maximum latency, so it runs with `-v`
//! (one line per answered query with its latency, to the microsecond) and the percentiles
//! are computed here from those lines. The CPU time the server used during each run (the
//! sum over its threads of `/proc/PID/task/*/schedstat`) gives its busy share and CPU time
//! per answer, which, unlike q/s, does not depend on what else runs on the machine; the
//! busy time of the servers' CPU in `/proc/stat` minus the server's own shows how much
//! other processes took.
//!
//! On 2 cores the server and dnsperf compete, so by default every server is pinned to CPU
//! 0 (dnsmasq with `taskset`; this whole process, tokio workers included, with `taskset
//! -a`) and dnsperf to CPU 1 (`--no-pin` turns that off).
//!
//! Cleanup: the namespaces, the work directory and dnsmasq go on every exit path: normal
//! return, error (a drop guard), Ctrl-C and SIGTERM (a signal task); dnsmasq and dnsperf
//! are started with `setpriv --pdeathsig KILL` (and dnsmasq stays root, so the setting
//! holds) so that they die with this process even on SIGKILL, and the namespaces and work
//! directory of a killed earlier run (a process id that no longer exists) are removed at
//! start.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use mesh_dns::{Dns, Records, ServiceRecord, TaskRecord};
use mesh_netlink::{Handle, Netns};

use crate::report;
use crate::stats::{median, percentile};

pub const ABOUT: &str =
    "embedded DNS vs dnsmasq: q/s and latency under dnsperf, same records, own namespaces";

/// Where the benchmark's namespaces are bind-mounted.
const NS_DIR: &str = "/run/mesh-bench-dns";
/// Namespace and work-directory names start with this, then the process id.
const PREFIX: &str = "mesh-bench-dns-";
/// The one network of the record set.
const NET_ID: &str = "benchnet0000000000000000a";
const NET_NAME: &str = "benchnet";
/// Where both servers listen, inside their namespaces.
const SERVER: SocketAddr = mesh_dns::DNS_ADDR;
/// CPUs for the servers and for dnsperf when pinning.
const SERVER_CPU: &str = "0";
const CLIENT_CPU: &str = "1";

/// Command-line settings.
#[derive(Debug, Clone)]
struct Opts {
    services: usize,
    tasks: usize,
    seconds: u64,
    rounds: usize,
    clients: u32,
    outstanding: u32,
    rate: u32,
    pin: bool,
    write: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            services: 100,
            tasks: 10,
            seconds: 10,
            rounds: 5,
            clients: 4,
            outstanding: 100,
            rate: 20_000,
            pin: true,
            write: true,
        }
    }
}

fn usage() -> String {
    let d = Opts::default();
    format!(
        "usage: mesh-bench dns [--services N] [--tasks N] [--seconds N] [--rounds N] \
         [--clients N] [--outstanding N] [--rate QPS] [--no-pin] [--no-write-docs]\n\n{ABOUT}\n\n\
         defaults: {} services x {} tasks, {} s per dnsperf run, {} rounds, dnsperf -c {} -q {}, \
         fixed rate {} q/s; servers pinned to CPU {SERVER_CPU}, dnsperf to CPU {CLIENT_CPU}",
        d.services, d.tasks, d.seconds, d.rounds, d.clients, d.outstanding, d.rate
    )
}

fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{what} needs a value"))?;
            v.parse::<u64>()
                .with_context(|| format!("{what}: not a number: {v:?}"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--no-write-docs" => o.write = false,
            "--no-pin" => o.pin = false,
            "--services" => o.services = num(a)? as usize,
            "--tasks" => o.tasks = num(a)? as usize,
            "--seconds" => o.seconds = num(a)?,
            "--rounds" => o.rounds = num(a)? as usize,
            "--clients" => o.clients = num(a)? as u32,
            "--outstanding" => o.outstanding = num(a)? as u32,
            "--rate" => o.rate = num(a)? as u32,
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if !(1..=250).contains(&o.services) || !(1..=250).contains(&o.tasks) {
        bail!("--services and --tasks must be within 1..=250");
    }
    if o.seconds == 0 || o.rounds == 0 || o.clients == 0 || o.outstanding == 0 || o.rate == 0 {
        bail!("--seconds, --rounds, --clients, --outstanding and --rate must be positive");
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------
// The record set, as mesh records, a dnsmasq hosts file and a dnsperf query file.

/// One service of the record set.
struct Svc {
    name: String,
    vip: Ipv4Addr,
    tasks: Vec<TaskRecord>,
}

/// A Swarm-like 25-character task id (lowercase base 36), deterministic per (service, slot).
fn task_id(i: usize, j: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ ((i as u64) << 32 | j as u64);
    (0..25)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 36) as u32, 36).unwrap_or('0')
        })
        .collect()
}

fn record_set(services: usize, tasks: usize) -> Vec<Svc> {
    (0..services)
        .map(|i| {
            let name = format!("svc{i:03}");
            let tasks = (0..tasks)
                .map(|j| {
                    let id = task_id(i, j);
                    TaskRecord::new(
                        format!("{name}.{}.{id}", j + 1),
                        &id[..12],
                        Ipv4Addr::new(10, 200, i as u8, (j + 1) as u8),
                    )
                })
                .collect();
            Svc {
                vip: Ipv4Addr::new(10, 201, 0, (i + 1) as u8),
                name,
                tasks,
            }
        })
        .collect()
}

fn mesh_records(set: &[Svc]) -> Records {
    let mut r = Records::new();
    for s in set {
        let mut svc = ServiceRecord::new(&s.name, Some(s.vip), false);
        svc.tasks = s.tasks.clone();
        r.put_service(NET_ID, svc);
    }
    r
}

/// The same names for dnsmasq: one hosts line per (address, names); repeated lines for
/// `tasks.SERVICE` make dnsmasq answer all the addresses.
fn write_hosts(path: &Path, set: &[Svc]) -> Result<()> {
    let mut f = BufWriter::new(File::create(path)?);
    for s in set {
        writeln!(f, "{} {}", s.vip, s.name)?;
        for t in &s.tasks {
            writeln!(f, "{} tasks.{}", t.ip, s.name)?;
            writeln!(f, "{} {} {}", t.ip, t.name, t.hostname)?;
        }
    }
    f.flush()?;
    Ok(())
}

/// The query mix: per task slot, `SERVICE`, `tasks.SERVICE` and the task's name (type A).
fn write_queries(path: &Path, set: &[Svc]) -> Result<usize> {
    let mut f = BufWriter::new(File::create(path)?);
    let mut n = 0;
    for s in set {
        for t in &s.tasks {
            writeln!(f, "{} A\ntasks.{} A\n{} A", s.name, s.name, t.name)?;
            n += 3;
        }
    }
    f.flush()?;
    Ok(n)
}

/// Every name of the set with the sorted addresses it must answer.
fn expected(set: &[Svc]) -> Vec<(String, Vec<Ipv4Addr>)> {
    let mut out = Vec::new();
    for s in set {
        out.push((s.name.clone(), vec![s.vip]));
        let mut all: Vec<Ipv4Addr> = s.tasks.iter().map(|t| t.ip).collect();
        all.sort();
        out.push((format!("tasks.{}", s.name), all));
        for t in &s.tasks {
            out.push((t.name.clone(), vec![t.ip]));
            out.push((t.hostname.clone(), vec![t.ip]));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Sandbox: namespaces, work directory and child processes, removed on every exit path.

#[derive(Default)]
struct Sandbox {
    work: Option<PathBuf>,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Sandbox {
    fn clean(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.namespaces.drain(..) {
            if let Err(e) = Netns::delete(Path::new(NS_DIR), &n) {
                eprintln!("dns bench: deleting namespace {n}: {e}");
            }
        }
        if let Some(w) = self.work.take() {
            let _ = fs::remove_dir_all(w);
        }
        // Only if no other run uses it.
        let _ = fs::remove_dir(NS_DIR);
    }
}

fn lock(s: &Mutex<Sandbox>) -> MutexGuard<'_, Sandbox> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Cleans the sandbox when dropped (normal return and errors).
struct CleanupGuard(Arc<Mutex<Sandbox>>);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        lock(&self.0).clean();
    }
}

/// The process id in a `mesh-bench-dns-<pid>[-...]` name.
fn pid_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes namespaces and work directories left by runs that were killed (SIGKILL).
fn remove_leftovers() {
    let dead =
        |name: &str| pid_of(name).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    if let Ok(names) = Netns::list(Path::new(NS_DIR)) {
        for n in names.iter().filter(|n| dead(n)) {
            eprintln!("dns bench: removing namespace {n} of an earlier, killed run");
            let _ = Netns::delete(Path::new(NS_DIR), n);
        }
    }
    // A dnsmasq of a killed run is known by its hosts file, in that run's work directory.
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let leftover = args.first().is_some_and(|a| a.ends_with("dnsmasq"))
                && args.iter().any(|a| {
                    a.strip_prefix("--addn-hosts=")
                        .and_then(|h| Path::new(h).parent()?.file_name()?.to_str())
                        .is_some_and(&dead)
                });
            if leftover {
                eprintln!("dns bench: stopping dnsmasq {pid} of an earlier, killed run");
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Ctrl-C and SIGTERM: clean up, then exit.
fn spawn_signal_cleanup(rt: &tokio::runtime::Runtime, sandbox: Arc<Mutex<Sandbox>>) {
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("dns bench: interrupted, cleaning up");
        lock(&sandbox).clean();
        std::process::exit(130);
    });
}

// ---------------------------------------------------------------------------------------
// Processes in a namespace, pinned.

/// `[taskset -c CPU] setpriv --pdeathsig KILL nsenter --net=NS -- ARGV...`.
fn command_in(ns: &Path, cpu: Option<&str>, argv: &[&str]) -> Command {
    let mut c = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    c.args(["--pdeathsig", "KILL", "nsenter"])
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .args(argv);
    c
}

/// CPU time used so far by all threads of `pid`.
/// Busy time of one CPU so far (all processes, from `/proc/stat`: everything but idle and
/// iowait, steal included; USER_HZ = 100).
fn cpu_busy(cpu: &str) -> Duration {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{cpu} ");
    let Some(line) = stat.lines().find(|l| l.starts_with(&prefix)) else {
        return Duration::ZERO;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Duration::from_millis(total.saturating_sub(idle) * 10)
}

fn cpu_time(pid: u32) -> Duration {
    let mut ns: u64 = 0;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

fn version_line(argv: &[&str], find: &str) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find_map(|l| l.split_once(find).map(|(_, v)| v.trim().to_string()))
        })
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------
// A small UDP client, for the answer check.

fn client_in(ns: &Netns) -> Result<UdpSocket> {
    let sock = ns
        .run(|| UdpSocket::bind("127.0.0.1:0"))
        .context("entering the namespace")?
        .context("binding the check client")?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(sock)
}

/// The sorted A records `name` answers, or an error for anything but NOERROR.
fn lookup_a(sock: &UdpSocket, name: &str, id: u16) -> Result<Vec<Ipv4Addr>> {
    lookup_a_at(sock, SERVER, name, id)
}

/// The sorted A records the DNS server at `server` answers for `name`, or an error for anything
/// but NOERROR.
pub(crate) fn lookup_a_at(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    id: u16,
) -> Result<Vec<Ipv4Addr>> {
    let mut qname = Name::from_ascii(name)?;
    qname.set_fqdn(true);
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, RecordType::A));
    sock.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no answer for {name}"))?;
        let resp = Message::from_vec(&buf[..n])?;
        if resp.metadata.id != id {
            continue;
        }
        if resp.metadata.response_code != ResponseCode::NoError {
            bail!("{name}: {:?}", resp.metadata.response_code);
        }
        let mut ips: Vec<Ipv4Addr> = resp
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        ips.sort();
        return Ok(ips);
    }
}

/// Waits until the server at 127.0.0.11 in `ns` answers `probe`.
fn wait_ready(sock: &UdpSocket, probe: &str, what: &str) -> Result<()> {
    let t0 = Instant::now();
    let mut id = 1u16;
    loop {
        match lookup_a(sock, probe, id) {
            Ok(v) if !v.is_empty() => return Ok(()),
            r if t0.elapsed() > Duration::from_secs(10) => {
                bail!("{what} did not answer {probe} within 10 s: {r:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
        id = id.wrapping_add(1);
    }
}

/// Asks every name; fails on the first answer that differs from the expected set.
fn check_answers(sock: &UdpSocket, want: &[(String, Vec<Ipv4Addr>)], what: &str) -> Result<()> {
    for (i, (name, ips)) in want.iter().enumerate() {
        let got =
            lookup_a(sock, name, i as u16).with_context(|| format!("{what}: checking {name}"))?;
        if &got != ips {
            bail!("{what} answers {name} with {got:?}, expected {ips:?}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// dnsperf.

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// mesh's engine with its sockets registered from meshd's runtime (multi-thread, 2
    /// workers), as meshd does today.
    Mesh,
    /// The same engine, its sockets registered from a current-thread runtime on a thread of
    /// its own.
    MeshOwnThread,
    Dnsmasq,
}

impl Server {
    const ALL: [Server; 3] = [Server::Mesh, Server::MeshOwnThread, Server::Dnsmasq];

    fn label(self) -> &'static str {
        match self {
            Server::Mesh => "mesh",
            Server::MeshOwnThread => "mesh-1t",
            Server::Dnsmasq => "dnsmasq",
        }
    }

    fn row(self) -> &'static str {
        match self {
            Server::Mesh => "mesh (meshd's runtime: multi-thread, 2 workers)",
            Server::MeshOwnThread => "mesh (own thread: current-thread runtime)",
            Server::Dnsmasq => "dnsmasq",
        }
    }
}

/// One dnsperf run's results.
#[derive(Debug, Clone, Default)]
struct PerfRun {
    qps: f64,
    sent: u64,
    lost: u64,
    /// Answers with an rcode other than NOERROR.
    errors: u64,
    avg: Duration,
    p50: Duration,
    p99: Duration,
    /// Server CPU time during the run.
    cpu: Duration,
    /// Busy time of the servers' CPU during the run (when pinned).
    server_cpu_busy: Option<Duration>,
    wall: Duration,
}

impl PerfRun {
    /// The share of the servers' CPU that other processes (other work on this machine, or
    /// the hypervisor) took during the run, when pinned.
    fn others_share(&self) -> Option<f64> {
        let busy = self.server_cpu_busy?;
        Some(busy.saturating_sub(self.cpu).as_secs_f64() / self.wall.as_secs_f64().max(1e-9))
    }

    fn cpu_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    fn cpu_per_query(&self) -> Duration {
        let answered = self.sent.saturating_sub(self.lost).max(1);
        self.cpu / u32::try_from(answered).unwrap_or(u32::MAX)
    }
}

struct Target<'a> {
    server: Server,
    ns: &'a Path,
    pid: u32,
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
}

/// Runs dnsperf against `t`, at most `rate` q/s if given, for `secs` seconds.
fn dnsperf(
    t: &Target,
    o: &Opts,
    work: &Path,
    queries: &Path,
    rate: Option<u32>,
    secs: u64,
) -> Result<PerfRun> {
    let out_path = work.join(format!("dnsperf-{}.out", t.server.label()));
    let out = File::create(&out_path)?;
    let (secs_s, clients, outstanding) = (
        secs.to_string(),
        o.clients.to_string(),
        o.outstanding.to_string(),
    );
    let rate_s = rate.map(|r| r.to_string());
    let q = queries.to_string_lossy();
    let mut argv = vec![
        "dnsperf",
        "-s",
        "127.0.0.11",
        "-d",
        &q,
        "-l",
        &secs_s,
        "-c",
        &clients,
        "-q",
        &outstanding,
        "-t",
        "1",
        "-v",
    ];
    if let Some(r) = &rate_s {
        argv.extend(["-Q", r.as_str()]);
    }
    let cpu0 = cpu_time(t.pid);
    let busy0 = cpu_busy(SERVER_CPU);
    let t0 = Instant::now();
    let status = command_in(t.ns, o.pin.then_some(CLIENT_CPU), &argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped())
        .output()
        .context("running dnsperf")?;
    let wall = t0.elapsed();
    let cpu = cpu_time(t.pid).saturating_sub(cpu0);
    let busy = cpu_busy(SERVER_CPU).saturating_sub(busy0);
    if !status.status.success() {
        bail!(
            "dnsperf against {} failed ({}): {}",
            t.server.label(),
            status.status,
            String::from_utf8_lossy(&status.stderr)
        );
    }
    // Per-query lines `> RCODE NAME TYPE LATENCY`, then the summary.
    let mut lat: Vec<Duration> = Vec::new();
    let mut errors = 0u64;
    let mut summary = String::new();
    for line in BufReader::new(File::open(&out_path)?).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("> ") {
            let mut parts = rest.split_whitespace();
            let rcode = parts.next().unwrap_or("");
            match rcode {
                "T" | "I" => continue,
                "NOERROR" => {}
                _ => errors += 1,
            }
            if let Some(s) = parts.last().and_then(|v| v.parse::<f64>().ok()) {
                lat.push(Duration::from_secs_f64(s));
            }
        } else {
            summary.push_str(&line);
            summary.push('\n');
        }
    }
    let _ = fs::remove_file(&out_path);
    let num = |k: &str| -> Result<f64> {
        field(&summary, k)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {k:?} in dnsperf's output:\n{summary}"))
    };
    Ok(PerfRun {
        qps: num("Queries per second:")?,
        sent: num("Queries sent:")? as u64,
        lost: num("Queries lost:")? as u64,
        errors,
        avg: Duration::from_secs_f64(num("Average Latency (s):")?),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        cpu,
        server_cpu_busy: o.pin.then_some(busy),
        wall,
    })
}

// ---------------------------------------------------------------------------------------
// The run.

/// The serving side of the mesh engine under test: the meshd-like runtime, and a
/// current-thread runtime on its own thread (stopped when this is dropped).
struct Runtimes {
    meshd: tokio::runtime::Runtime,
    own: Arc<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Runtimes {
    fn new() -> Result<Runtimes> {
        // As crates/meshd/src/main.rs builds it.
        let meshd = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let own = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = own.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-dns".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })?;
        Ok(Runtimes {
            meshd,
            own,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Runtimes {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(o) = parse_args(args)? else {
        println!("{}", usage());
        return Ok(());
    };
    if !mesh_netns::require_root()? {
        bail!("the dns benchmark needs root (network namespaces)");
    }
    for tool in ["dnsmasq", "dnsperf", "nsenter", "setpriv", "taskset"] {
        let in_path = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !in_path && !Path::new("/usr/sbin").join(tool).is_file() {
            bail!("{tool} not found: apt-get install -y dnsmasq-base dnsperf util-linux (or run `cargo xtask bench dns`)");
        }
    }
    remove_leftovers();
    // Before pinning, which would make this process see one CPU.
    let machine = report::machine();

    let rts = Runtimes::new()?;
    let sandbox = Arc::new(Mutex::new(Sandbox::default()));
    let _cleanup = CleanupGuard(sandbox.clone());
    spawn_signal_cleanup(&rts.meshd, sandbox.clone());

    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("{PREFIX}{pid}"));
    fs::create_dir_all(&work)?;
    lock(&sandbox).work = Some(work.clone());

    // The record set, three ways.
    let set = record_set(o.services, o.tasks);
    let hosts = work.join("hosts");
    let queries = work.join("queries");
    write_hosts(&hosts, &set)?;
    let n_queries = write_queries(&queries, &set)?;
    let want = expected(&set);

    // One namespace per server, with lo up.
    let mut nss = Vec::new();
    for server in Server::ALL {
        let name = format!("{PREFIX}{pid}-{}", server.label());
        let ns = Netns::create(Path::new(NS_DIR), &name)
            .with_context(|| format!("creating namespace {name}"))?;
        lock(&sandbox).namespaces.push(name);
        rts.meshd
            .block_on(async {
                Handle::new(&ns).await?.set_up("lo").await?;
                Ok::<_, mesh_netlink::NetlinkError>(())
            })
            .with_context(|| format!("bringing lo up in {}", ns.name()))?;
        nss.push(ns);
    }
    let paths: Vec<PathBuf> = nss
        .iter()
        .map(|ns| Path::new(NS_DIR).join(ns.name()))
        .collect();

    // mesh's engine, in process: one engine, registered in two namespaces, once from each
    // runtime (the serving tasks run on the runtime `register` is called from).
    let dns = Dns::new(Vec::new());
    dns.replace(mesh_records(&set));
    let nets = vec![(NET_ID.to_string(), NET_NAME.to_string())];
    let mut registrations = Vec::new();
    for (i, rt) in [rts.meshd.handle(), rts.own.handle()]
        .into_iter()
        .enumerate()
    {
        let (udp, tcp) = mesh_dns::bind_in_netns(&paths[i])?;
        let _entered = rt.enter();
        registrations.push(dns.register(&format!("bench-task-{i}"), nets.clone(), udp, tcp)?);
    }

    // dnsmasq.
    let hosts_arg = format!("--addn-hosts={}", hosts.display());
    let dnsmasq_log = work.join("dnsmasq.log");
    let child = command_in(
        &paths[2],
        o.pin.then_some(SERVER_CPU),
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            &hosts_arg,
            "--listen-address=127.0.0.11",
            "--bind-interfaces",
            "--port=53",
            // Root stays root: no credential change, so the parent-death signal holds.
            "--user=root",
            "--group=root",
            "--pid-file=",
            "--cache-size=10000",
            "--log-facility=-",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(&dnsmasq_log)?)
    .spawn()
    .context("starting dnsmasq")?;
    let dnsmasq_pid = child.id();
    lock(&sandbox).children.push(child);

    // All answer, and answer the same.
    let probe = &want[0].0;
    for (server, ns) in Server::ALL.into_iter().zip(&nss) {
        let client = client_in(ns)?;
        if let Err(e) = wait_ready(&client, probe, server.label()) {
            let log = fs::read_to_string(&dnsmasq_log).unwrap_or_default();
            bail!("{e}\ndnsmasq log:\n{log}");
        }
        check_answers(&client, &want, server.label())?;
    }
    eprintln!(
        "dns bench: {} names answered identically by all servers",
        want.len()
    );

    // Pin the servers: this whole process (both runtimes' threads included) to SERVER_CPU;
    // dnsmasq was started pinned there, dnsperf runs pinned to CLIENT_CPU.
    if o.pin {
        let st = Command::new("taskset")
            .args(["-a", "-p", "-c", SERVER_CPU, &pid.to_string()])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("taskset -a -p failed: {st}");
        }
    }

    let targets: Vec<Target> = Server::ALL
        .into_iter()
        .zip(&paths)
        .map(|(server, ns)| Target {
            server,
            ns,
            pid: if server == Server::Dnsmasq {
                dnsmasq_pid
            } else {
                pid
            },
        })
        .collect();
    // Warm-up (not counted).
    for t in &targets {
        dnsperf(t, &o, &work, &queries, None, 1)?;
    }
    let mut sat: Vec<Vec<PerfRun>> = vec![Vec::new(); targets.len()];
    let mut fixed: Vec<Vec<PerfRun>> = vec![Vec::new(); targets.len()];
    for round in 0..o.rounds {
        for (i, t) in targets.iter().enumerate() {
            let r = dnsperf(t, &o, &work, &queries, None, o.seconds)?;
            eprintln!(
                "round {round}: {:<7} saturation {:>7.0} q/s, avg {}, p99 {}, lost {}, server CPU {:.0}%, {:.2} µs CPU/answer{}",
                t.server.label(),
                r.qps,
                micros(r.avg),
                micros(r.p99),
                r.lost,
                r.cpu_share() * 100.0,
                r.cpu_per_query().as_secs_f64() * 1e6,
                r.others_share()
                    .map(|x| format!(", others on CPU {SERVER_CPU} {:.0}%", x * 100.0))
                    .unwrap_or_default(),
            );
            sat[i].push(r);
        }
        for (i, t) in targets.iter().enumerate() {
            let r = dnsperf(t, &o, &work, &queries, Some(o.rate), o.seconds)?;
            eprintln!(
                "round {round}: {:<7} at {} q/s: avg {}, p50 {}, p99 {}, lost {}, {:.2} µs CPU/answer",
                t.server.label(),
                o.rate,
                micros(r.avg),
                micros(r.p50),
                micros(r.p99),
                r.lost,
                r.cpu_per_query().as_secs_f64() * 1e6,
            );
            fixed[i].push(r);
        }
    }
    let stats = dns.stats();
    drop(registrations);
    let text = render(&o, &machine, n_queries, want.len(), &sat, &fixed, &stats);
    println!("{text}");
    if o.write {
        report::write_section("dns", &text)?;
    }
    Ok(())
}

fn micros(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn med_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn med_u64(v: impl Iterator<Item = u64>) -> u64 {
    let v: Vec<f64> = v.map(|x| x as f64).collect();
    med_f64(&v).round() as u64
}

fn list(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ")
}

/// Median of per-round ratios `f(a) / f(b)`.
fn ratios(a: &[PerfRun], b: &[PerfRun], f: impl Fn(&PerfRun) -> f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| f(x) / f(y).max(1e-12))
        .collect()
}

fn render(
    o: &Opts,
    machine: &str,
    n_queries: usize,
    n_names: usize,
    sat: &[Vec<PerfRun>],
    fixed: &[Vec<PerfRun>],
    stats: &mesh_dns::Stats,
) -> String {
    let dnsmasq_v = version_line(&["dnsmasq", "--version"], "Dnsmasq version");
    let dnsperf_v = version_line(&["dnsperf", "-h"], "Version");
    let mut t = String::from("## DNS: embedded engine vs dnsmasq\n\n");
    t.push_str(&format!(
        "Measured {} on {machine}. Reproduce with `cargo xtask bench dns` (root; needs dnsmasq and dnsperf, which xtask installs).\n\n",
        report::utc_now(),
    ));
    t.push_str(&format!(
        "Records: {} services x {} tasks on one network ({} VIPs, {} task IPs, task names and hostnames), served at `127.0.0.11:53`, each server in a network namespace of its own:\n\n\
         - **mesh**: one `mesh_dns::Dns` engine in the bench process, sockets bound with `bind_in_netns` and registered as a task's, from a multi-thread tokio runtime with 2 workers as `meshd` builds it (the serving tasks run on the runtime `register` is called from);\n\
         - **mesh (own thread)**: the same engine registered in a second namespace from a current-thread runtime on a thread of its own;\n\
         - **dnsmasq** {dnsmasq_v}: `--no-resolv --no-hosts --addn-hosts=FILE` with the same names.\n\n\
         All {n_names} names were checked to answer the same address sets on all three before measuring. Query mix: {n_queries} type-A queries replayed in a loop, a third each `SERVICE` (-> VIP), `tasks.SERVICE` (-> {} IPs), task names (-> 1 IP). Load: dnsperf {dnsperf_v}, `-c {} -q {} -t 1`, {} s per run, {} rounds with the servers interleaved (mesh, mesh own thread, dnsmasq, mesh, ...); medians. {} Latency percentiles come from dnsperf's per-query latencies (`-v`, 1 µs resolution; dnsperf itself prints only avg/min/max). Server CPU is the server's own CPU time over the run (`/proc/PID/task/*/schedstat`; 100% = one core busy); CPU per answer = that time / answered queries.\n\n",
        o.services,
        o.tasks,
        o.services,
        o.services * o.tasks,
        o.tasks,
        o.clients,
        o.outstanding,
        o.seconds,
        o.rounds,
        if o.pin {
            format!("Pinning (2 cores, shared with the load generator): every server on CPU {SERVER_CPU} (dnsmasq with `taskset`, the whole bench process, both runtimes' threads included, with `taskset -a`), dnsperf on CPU {CLIENT_CPU}: each side has one core.")
        } else {
            "No CPU pinning (`--no-pin`): servers and dnsperf share both cores.".to_string()
        }
    ));
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.0}%", x * 100.0));
    let med_opt = |v: Vec<Option<f64>>| -> Option<f64> {
        let v: Option<Vec<f64>> = v.into_iter().collect();
        v.map(|v| med_f64(&v))
    };
    t.push_str(&format!(
        "**Saturation** (closed loop: as many queries per second as the server answers). *Others* is the share of CPU {SERVER_CPU} that other processes took during the run; *answers per CPU-second* = 1 / CPU per answer, the server's capacity on one core.\n\n| server | q/s | avg latency | p99 latency | lost | server CPU | others | CPU per answer | answers per CPU-second | q/s per round |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    ));
    for (i, server) in Server::ALL.iter().enumerate() {
        let runs = &sat[i];
        let qps: Vec<f64> = runs.iter().map(|r| r.qps).collect();
        let pick = |f: fn(&PerfRun) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
        let share: Vec<f64> = runs.iter().map(|r| r.cpu_share() * 100.0).collect();
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        let per_answer = pick(|r| r.cpu_per_query()).as_secs_f64();
        t.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {:.0}% | {} | {:.2} µs | {:.0} | {}{} |\n",
            server.row(),
            med_f64(&qps),
            micros(pick(|r| r.avg)),
            micros(pick(|r| r.p99)),
            med_u64(runs.iter().map(|r| r.lost)),
            med_f64(&share),
            pct(med_opt(runs.iter().map(|r| r.others_share()).collect())),
            per_answer * 1e6,
            1.0 / per_answer.max(1e-12),
            list(&qps, |x| format!("{x:.0}")),
            if errors > 0 {
                format!(" ({errors} answers not NOERROR!)")
            } else {
                String::new()
            }
        ));
    }
    t.push_str(&format!(
        "\n**Fixed rate** (`-Q {}`: a load all sustain, so latency is the server's rather than dnsperf's queue)\n\n| server | q/s | avg latency | p50 latency | p99 latency | lost | server CPU | others | CPU per answer |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        o.rate
    ));
    for (i, server) in Server::ALL.iter().enumerate() {
        let runs = &fixed[i];
        let qps: Vec<f64> = runs.iter().map(|r| r.qps).collect();
        let pick = |f: fn(&PerfRun) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
        let share: Vec<f64> = runs.iter().map(|r| r.cpu_share() * 100.0).collect();
        t.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.0}% | {} | {:.2} µs |\n",
            server.row(),
            med_f64(&qps),
            micros(pick(|r| r.avg)),
            micros(pick(|r| r.p50)),
            micros(pick(|r| r.p99)),
            med_u64(runs.iter().map(|r| r.lost)),
            med_f64(&share),
            pct(med_opt(runs.iter().map(|r| r.others_share()).collect())),
            pick(|r| r.cpu_per_query()).as_secs_f64() * 1e6,
        ));
    }
    let d = Server::ALL.len() - 1;
    t.push_str("\nRatios to dnsmasq, median of per-round ratios (per round in parentheses). Goal: ahead of dnsmasq, i.e. less CPU per answer (more answers per core) and as many q/s:\n\n| | CPU per answer (saturation) | saturation q/s | p99 at fixed rate | goal |\n|---|---:|---:|---:|---|\n");
    for (i, server) in Server::ALL.iter().enumerate().take(d) {
        let c = ratios(&sat[i], &sat[d], |r| r.cpu_per_query().as_secs_f64());
        let q = ratios(&sat[i], &sat[d], |r| r.qps);
        let p = ratios(&fixed[i], &fixed[d], |r| r.p99.as_secs_f64());
        let met = med_f64(&c) < 1.0 && med_f64(&q) >= 1.0;
        t.push_str(&format!(
            "| {} | **{:.2}** ({}) | **{:.2}** ({}) | {:.2} ({}) | {} |\n",
            server.row(),
            med_f64(&c),
            list(&c, |x| format!("{x:.2}")),
            med_f64(&q),
            list(&q, |x| format!("{x:.2}")),
            med_f64(&p),
            list(&p, |x| format!("{x:.2}")),
            if met { "met" } else { "not met" }
        ));
    }
    let worst_others = sat
        .iter()
        .chain(fixed)
        .flatten()
        .filter_map(PerfRun::others_share)
        .fold(0.0f64, f64::max);
    if worst_others > 0.10 {
        t.push_str(&format!(
            "\nThis machine was shared while measuring: other processes took up to {:.0}% of CPU {SERVER_CPU} during a run. A server then gets only part of its core (server CPU well under 100% at saturation with dnsperf not the limit), and one with more runnable threads (mesh on 2 workers) gets a larger part, so saturation q/s and latency tails measure that contention as much as the server. CPU per answer only counts the server's own CPU time and is the robust comparison.\n",
            worst_others * 100.0
        ));
    }
    t.push_str(&format!(
        "\nmesh's own counters over the run (both registrations): {} UDP queries, {} local answers, {} dropped, {} malformed, {} truncated.\n",
        stats.udp_queries, stats.local_answers, stats.dropped, stats.malformed, stats.truncated
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_set_is_consistent() {
        let set = record_set(3, 4);
        assert_eq!(set.len(), 3);
        assert_eq!(set[2].tasks[3].ip, Ipv4Addr::new(10, 200, 2, 4));
        assert_eq!(set[0].tasks[0].hostname.len(), 12);
        assert!(set[0].tasks[0].name.starts_with("svc000.1."));
        assert_ne!(task_id(0, 1), task_id(1, 0));
        let want = expected(&set);
        // service, tasks.service, and per task its name and hostname.
        assert_eq!(want.len(), 3 * (2 + 2 * 4));
        assert_eq!(want[1].1.len(), 4);
        let r = mesh_records(&set);
        assert_eq!(r.service(NET_ID, "svc001").unwrap().tasks.len(), 4);
    }

    #[test]
    fn dnsperf_summary_fields() {
        let out = "  Queries sent:         498638\n  Queries lost:         0 (0.00%)\n  Queries per second:   99721.277671\n  Average Latency (s):  0.000952 (min 0.000017, max 0.020690)\n";
        assert_eq!(field(out, "Queries sent:"), Some("498638"));
        assert_eq!(field(out, "Queries lost:"), Some("0"));
        assert_eq!(field(out, "Average Latency (s):"), Some("0.000952"));
        assert_eq!(pid_of("mesh-bench-dns-123-mesh"), Some(123));
        assert_eq!(pid_of("mesh-bench-dns-77"), Some(77));
        assert_eq!(pid_of("other-1"), None);
    }
}
