//! Shared plumbing of the data-plane benchmarks (`ingress`, `vip`): load generators, the
//! places they run from, and a cluster started with chosen daemon flags.
//!
//! Two hidden subcommands of `mesh-bench` live here, so that a benchmark needs nothing but
//! its own binary inside a task or a namespace:
//!
//! - `mesh-bench serve-http PORT...`: a tiny HTTP/1.0 server. A few threads per port block in
//!   `accept` on its listener; each connection gets a fixed `200 OK` and is closed by the
//!   server (as `wrk -H 'Connection: close'` expects), so each request is a new connection.
//! - `mesh-bench http-load ADDR PORT SECONDS THREADS`: that many threads each open a
//!   connection, send one request, read the answer to EOF, and start over, until the time
//!   is up. Prints one JSON line: connections, connections/s, p50 and p99 latency (connect to
//!   EOF, microseconds) and failures.
//!
//! Throughput is iperf3's (one TCP stream, `-J`, the receiver's bits per second).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_netns::swarm::swarm_cluster_with;
use mesh_netns::{wait_for, Cluster, Host};
use serde_json::{json, Value};

/// The answer of `serve-http` to every request.
const RESPONSE: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
/// What `http-load` sends on each connection.
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n";
/// Server threads blocked in `accept`, per port.
const SERVER_THREADS: usize = 4;
/// Bound of a connect and of each read or write of the load generator.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// `mesh-bench serve-http PORT...`: serves on every port given until killed.
pub fn serve_http(args: &[String]) -> Result<()> {
    if args.is_empty() {
        bail!("usage: mesh-bench serve-http PORT...");
    }
    let mut workers = Vec::new();
    for port in args {
        let port: u16 = port.parse().with_context(|| format!("port {port:?}"))?;
        let listener =
            TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
        for _ in 0..SERVER_THREADS {
            let l = listener.try_clone()?;
            workers.push(std::thread::spawn(move || {
                for conn in l.incoming() {
                    // A failed connection concerns that client only.
                    let _ = conn.and_then(answer);
                }
            }));
        }
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Reads one request head (or what the client sends before closing), answers, closes.
fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    s.write_all(RESPONSE)
}

/// One short connection: connect, request, read to EOF. Its duration, or the error.
fn one_request(to: &SocketAddr, buf: &mut Vec<u8>) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(to, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(REQUEST)?;
    buf.clear();
    s.read_to_end(buf)?;
    if !buf.starts_with(b"HTTP/1.0 200") {
        return Err(std::io::Error::other("not a 200 answer"));
    }
    Ok(t0.elapsed())
}

/// `mesh-bench http-load ADDR PORT SECONDS THREADS`: prints one JSON line (see the module
/// docs).
pub fn http_load(args: &[String]) -> Result<()> {
    let [addr, port, secs, threads] = args else {
        bail!("usage: mesh-bench http-load ADDR PORT SECONDS THREADS");
    };
    let to: SocketAddr = format!("{addr}:{port}").parse().context("ADDR PORT")?;
    let dur = Duration::from_secs_f64(secs.parse().context("SECONDS")?);
    let threads: usize = threads.parse().context("THREADS")?;
    let t0 = Instant::now();
    let deadline = t0 + dur;
    let per_thread: Vec<(Vec<u32>, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                sc.spawn(move || {
                    let (mut lat, mut errors, mut buf) = (Vec::new(), 0u64, Vec::new());
                    while Instant::now() < deadline {
                        match one_request(&to, &mut buf) {
                            Ok(d) => lat.push(d.as_micros().min(u32::MAX.into()) as u32),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let errors: u64 = per_thread.iter().map(|(_, e)| e).sum();
    let mut lat: Vec<u32> = per_thread.into_iter().flat_map(|(l, _)| l).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    println!(
        "{}",
        json!({
            "conns": lat.len(),
            "rate": lat.len() as f64 / elapsed,
            "p50_us": pct(50.0),
            "p99_us": pct(99.0),
            "errors": errors,
        })
    );
    Ok(())
}

/// Result of one `http-load` run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// Completed connections per second.
    pub rate: f64,
    pub p99: Duration,
    pub errors: u64,
}

/// The `http-load` runs against one destination, with the machine's CPU shares during each.
#[derive(Default)]
pub struct LoadRuns {
    pub loads: Vec<Load>,
    pub cpu: Vec<CpuShare>,
}

impl LoadRuns {
    /// Records one run.
    pub fn push(&mut self, (load, cpu): (Load, CpuShare)) {
        self.loads.push(load);
        self.cpu.push(cpu);
    }

    /// Connections/s of each run.
    pub fn rates(&self) -> Vec<f64> {
        self.loads.iter().map(|l| l.rate).collect()
    }

    /// Median over runs of the p99 latency.
    pub fn p99(&self) -> Duration {
        crate::stats::median(&self.loads.iter().map(|l| l.p99).collect::<Vec<_>>())
    }

    /// Failed connections over all runs.
    pub fn errors(&self) -> u64 {
        self.loads.iter().map(|l| l.errors).sum()
    }

    /// Median over runs of the machine's CPU time per connection, in microseconds.
    pub fn cpu_per_conn(&self) -> f64 {
        let v: Vec<f64> = (self.cpu.iter().zip(&self.loads))
            .map(|(c, l)| c.micros_per(l.rate))
            .collect();
        med(&v)
    }

    /// `1234 | 0.5 ms | 0 | 97% (usr .., sys .., softirq ..) | 82 µs`: the cells of a markdown
    /// row, medians over runs.
    pub fn cells(&self) -> String {
        format!(
            "{:.0} | {} | {} | {} | {:.0} µs",
            med(&self.rates()),
            crate::stats::millis(self.p99()),
            self.errors(),
            CpuShare::mean(&self.cpu).describe(),
            self.cpu_per_conn()
        )
    }
}

/// The markdown header of [`LoadRuns::cells`].
pub const LOAD_HEADER: &str =
    "conn/s | p99 connect-to-close | failed | machine CPU during conn/s | CPU per conn";
/// Its alignment row.
pub const LOAD_ALIGN: &str = "---:|---:|---:|---|---:";

/// Where a client command runs.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// The underlay namespace of the cluster (the client at 10.99.0.1).
    Underlay(&'a Cluster),
    /// Inside a running task, through `mesh exec` on the daemon of the task's host (so the
    /// command is in the task's network namespace and cgroup, where the VIP balancer acts).
    Task(&'a Host, &'a str),
}

impl Place<'_> {
    /// Runs `argv` there; its stdout if it exited 0.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        let (ok, out, err) = match self {
            Place::Underlay(c) => {
                let o = c.client_exec_timeout(argv, Duration::from_secs(90))?;
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            }
            Place::Task(h, task) => {
                let mut a = vec!["exec", task, "--"];
                a.extend_from_slice(argv);
                let o = h.mesh(&a)?;
                (o.success(), o.stdout, o.stderr)
            }
        };
        if !ok {
            bail!("`{}` failed: {}{}", argv.join(" "), err.trim(), out.trim());
        }
        Ok(out)
    }

    /// Widens the ephemeral port range there: a load run may open more short connections
    /// than the default range (32768-60999) holds.
    pub fn widen_ports(&self) -> Result<()> {
        self.run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
            .map(|_| ())
    }

    /// iperf3, one TCP stream for `secs` seconds to `addr:port`: the receiver's Gbit/s.
    pub fn iperf(&self, addr: &str, port: u16, secs: u32) -> Result<f64> {
        self.iperf_cc(addr, port, secs, None)
    }

    /// [`Place::iperf`] with the sender's congestion control `cc` (`iperf3 -C`), or the
    /// namespace's default.
    pub fn iperf_cc(&self, addr: &str, port: u16, secs: u32, cc: Option<&str>) -> Result<f64> {
        let (port, secs) = (port.to_string(), secs.to_string());
        let mut argv = vec!["iperf3", "-c", addr, "-p", &port, "-t", &secs, "-J"];
        if let Some(cc) = cc {
            argv.extend(["-C", cc]);
        }
        let out = self.run(&argv)?;
        let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("no throughput in iperf3 output: {out}"))
    }

    /// `http-load` against `addr:port` for `secs` seconds with `threads` client threads.
    pub fn load(&self, addr: &str, port: u16, secs: f64, threads: usize) -> Result<Load> {
        let exe = self_exe()?;
        let (port, secs, threads) = (port.to_string(), secs.to_string(), threads.to_string());
        let out = self.run(&[&exe, "http-load", addr, &port, &secs, &threads])?;
        let v: Value = serde_json::from_str(out.trim()).context("http-load output")?;
        Ok(Load {
            rate: v["rate"].as_f64().context("rate")?,
            p99: Duration::from_micros(v["p99_us"].as_u64().unwrap_or(0)),
            errors: v["errors"].as_u64().unwrap_or(0),
        })
    }

    /// Waits until `addr:port` answers HTTP requests with no failure from here.
    pub fn wait_http(&self, addr: &str, port: u16) -> Result<()> {
        wait_for(
            &format!("http on {addr}:{port}"),
            Duration::from_secs(30),
            Duration::from_millis(300),
            || {
                let l = self.load(addr, port, 0.2, 1)?;
                Ok((l.errors == 0 && l.rate > 0.0).then_some(()))
            },
        )
    }

    /// Waits until a 1-second iperf3 run to `addr:port` from here succeeds.
    pub fn wait_iperf(&self, addr: &str, port: u16) -> Result<()> {
        wait_for(
            &format!("iperf3 on {addr}:{port}"),
            Duration::from_secs(30),
            Duration::from_millis(500),
            || Ok(self.iperf(addr, port, 1).ok().map(|_| ())),
        )
    }
}

/// A private copy of this program, which tasks run as their command (`serve-http`) and
/// clients as theirs (`http-load`); tasks share the host's file system. A copy, because a
/// `cargo build` during the run may replace the binary under `target/`. Made by the first
/// call; [`SelfCopy`] removes it.
pub fn self_exe() -> Result<String> {
    static COPY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let p = COPY
        .get_or_init(|| copy_self().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(p.to_string_lossy().into_owned())
}

fn self_copy_dir() -> PathBuf {
    std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()))
}

fn copy_self() -> Result<PathBuf> {
    let dir = self_copy_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let to = dir.join("mesh-bench");
    // /proc/self/exe still reads if the file was replaced since we started.
    std::fs::copy("/proc/self/exe", &to).with_context(|| format!("copying to {}", to.display()))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    Ok(to)
}

/// Removes the copy [`self_exe`] made (if any) when dropped: hold one for a benchmark's run.
pub struct SelfCopy;

impl Drop for SelfCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self_copy_dir());
    }
}

/// What a data-plane benchmark's run starts with.
pub struct Start {
    /// Rewrite the benchmark's section of `docs/benchmarks.md` (no `--no-write-docs`).
    pub write_docs: bool,
    /// The machine's load average before the run.
    pub load: f64,
    /// Holds the program copy tasks run.
    _copy: SelfCopy,
}

/// Parses `[--no-write-docs]` (or prints the usage for `--help`: then `None`), checks root.
pub fn start(name: &str, about: &str, args: &[String]) -> Result<Option<Start>> {
    let mut write_docs = true;
    for a in args {
        match a.as_str() {
            "-h" | "--help" => {
                println!("usage: mesh-bench {name} [--no-write-docs]\n\n{about}");
                return Ok(None);
            }
            "--no-write-docs" => write_docs = false,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !mesh_netns::require_root()? {
        bail!("the {name} benchmark needs root (network namespaces)");
    }
    Ok(Some(Start {
        write_docs,
        load: load_average(),
        _copy: SelfCopy,
    }))
}

/// A cluster of `hosts` netns hosts whose daemons run with `daemon_args`, in a swarm of one
/// manager (h1) and workers.
pub fn cluster(hosts: usize, name_hint: &'static str, daemon_args: &[&str]) -> Result<Cluster> {
    swarm_cluster_with(hosts, 1, name_hint, daemon_args)?.context("the benchmarks need root")
}

/// `mesh service create --name NAME --constraint node.hostname==NODE OPTS... -- COMMAND...`
/// on `h`.
pub fn service_on(h: &Host, name: &str, node: &str, opts: &[&str], cmd: &[&str]) -> Result<()> {
    let constraint = format!("node.hostname=={node}");
    let mut a = vec![
        "service",
        "create",
        "--name",
        name,
        "--constraint",
        &constraint,
    ];
    a.extend_from_slice(opts);
    a.push("--");
    a.extend_from_slice(cmd);
    h.mesh_ok(&a)?;
    Ok(())
}

/// Median of floats (mean of the two middle ones for an even count); zero if empty.
pub fn med(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Per-round ratios of `a` to `b`.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// `1.00, 0.98, 1.01`.
pub fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ok` if `value >= goal`, else `MISSED`.
pub fn verdict(value: f64, goal: f64) -> &'static str {
    if value >= goal {
        "ok"
    } else {
        "MISSED"
    }
}

/// The machine's 1-minute load average (`/proc/loadavg`): other work on the shared CPUs.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// Whole-machine CPU time counters from `/proc/stat` (all namespaces share one kernel, so
/// this is the CPU of client, server, daemons and packet processing together).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    user: u64,
    system: u64,
    softirq: u64,
    total: u64,
}

impl Cpu {
    /// The counters now (zeros if `/proc/stat` cannot be read).
    pub fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        Cpu {
            user: g(0) + g(1),
            system: g(2) + g(5),
            softirq: g(6),
            total: f.iter().take(8).sum(),
        }
    }

    /// Shares of all CPUs' time since `before`: (busy, softirq), each in 0..=1.
    pub fn since(&self, before: &Cpu) -> CpuShare {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / total;
        CpuShare {
            user: d(self.user, before.user),
            system: d(self.system, before.system),
            softirq: d(self.softirq, before.softirq),
        }
    }
}

/// Where the machine's CPU time went during a measurement, as shares of all CPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuShare {
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
}

impl CpuShare {
    /// The busy share (user + system + softirq).
    pub fn busy(&self) -> f64 {
        self.user + self.system + self.softirq
    }

    /// `97% (usr 20, sys 30, softirq 47)`.
    pub fn describe(&self) -> String {
        format!(
            "{:.0}% (usr {:.0}, sys {:.0}, softirq {:.0})",
            self.busy() * 100.0,
            self.user * 100.0,
            self.system * 100.0,
            self.softirq * 100.0
        )
    }

    /// Machine CPU time per unit of work, in microseconds, at `rate` units per second.
    pub fn micros_per(&self, rate: f64) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.busy() * cpus * 1e6 / rate.max(f64::MIN_POSITIVE)
    }

    /// The mean of several samples.
    pub fn mean(v: &[CpuShare]) -> CpuShare {
        let n = v.len().max(1) as f64;
        CpuShare {
            user: v.iter().map(|c| c.user).sum::<f64>() / n,
            system: v.iter().map(|c| c.system).sum::<f64>() / n,
            softirq: v.iter().map(|c| c.softirq).sum::<f64>() / n,
        }
    }
}

/// Runs `f`, returning its result and the machine's CPU shares meanwhile.
pub fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, CpuShare)> {
    let before = Cpu::now();
    let v = f()?;
    Ok((v, Cpu::now().since(&before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_verdicts() {
        assert_eq!(med(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(med(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(med(&[]), 0.0);
        assert_eq!(list(&[1.0, 0.987], 2), "1.00, 0.99");
        assert_eq!(verdict(0.8, 0.8), "ok");
        assert_eq!(verdict(0.79, 0.8), "MISSED");
    }

    #[test]
    fn server_and_client_talk() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(3) {
                let _ = c.and_then(answer);
            }
        });
        let mut buf = Vec::new();
        for _ in 0..3 {
            one_request(&to, &mut buf).unwrap();
            assert!(buf.ends_with(b"ok\n"));
        }
    }
}
