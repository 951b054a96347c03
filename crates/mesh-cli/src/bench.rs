//! `mesh bench ingress`: an operator's benchmark of a cluster's routing mesh, from the machine
//! the command runs on.
//!
//! It deploys a service of mesh's own (one replica of `mesh bench serve`, the hidden server
//! below, as a host process: the `mesh` binary must be at the same path on the task's node),
//! published twice: in ingress mode (`--port-base`) and in host mode on the task's node
//! (`--port-base` + 1, the *direct* path). Then, in interleaved rounds (each round measures
//! every path once, so drift on a shared machine hits every path alike), it measures the
//! direct path and every node's routing mesh: throughput on one stream and on `--streams`
//! streams, new connections per second with `--concurrency` clients, the latency of a
//! connection (connect to first byte, p50 and p99 over every connection of the run), and
//! errors. The figures of each path are the medians of its rounds; the ratios compare each
//! path with the direct one. A table (or `--format json`) goes to stdout, progress to stderr,
//! and `--chart FILE` writes an SVG bar chart of the ratios. The service is removed at the
//! end, also on an error or Ctrl-C.
//!
//! With `--port P`, nothing is deployed: P is a published port of the user's, whose server
//! speaks no protocol of ours, so only connections (connect, then close) are measured, through
//! every node, without a direct path.
//!
//! The server's protocol, one connection per measurement: the client's first byte says what
//! it wants. `S` (sink): the server reads to the end of the stream and answers the count of
//! bytes it read (8 bytes, big-endian); `C` (connection): the server answers one byte and
//! closes.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mesh_api::Request;
use serde_json::{json, Value};

use crate::client::Client;
use crate::{Failure, Format, Result};

/// The server's port inside its task.
const SERVER_PORT: u16 = 8080;
/// Bounds every connect, read and write of a measurement.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the service may take to run and answer on every node.
const READY_WITHIN: Duration = Duration::from_secs(90);

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Measure every node's routing mesh against the direct path to a task.
    Ingress(IngressArgs),
    /// Serve the benchmark's protocol (the task of the service `bench ingress` deploys).
    #[command(hide = true)]
    Serve {
        /// Port to listen on.
        #[arg(long, default_value_t = SERVER_PORT)]
        port: u16,
    },
}

#[derive(Args, Debug)]
pub struct IngressArgs {
    /// Measure this published port instead of deploying a server (connections only).
    #[arg(long)]
    port: Option<u16>,
    /// Published ports of the server deployed: BASE in ingress mode, BASE+1 in host mode.
    #[arg(long, default_value_t = 30900)]
    port_base: u16,
    /// Length of each measurement (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Rounds: each measures every path once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Parallel streams of the multi-stream throughput.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    streams: u32,
    /// Parallel clients of the connection rate.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrency: u32,
    /// Output format: 'table' or 'json'.
    #[arg(long, default_value = "table")]
    format: Format,
    /// Write an SVG chart of the ratios to the direct path to FILE.
    #[arg(long, value_name = "FILE")]
    chart: Option<std::path::PathBuf>,
}

/// A Go-style duration as the other flags take (`3s`, `500ms`, `1m`), 50 ms to 1 h.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let ms = crate::service::parse_duration_ms(s).map_err(|Failure(e)| e)?;
    if !(50..=3_600_000).contains(&ms) {
        return Err(format!("duration {s:?} out of range (50ms to 1h)"));
    }
    Ok(Duration::from_millis(ms))
}

pub fn run(c: &Client, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Serve { port } => serve(port),
        BenchCmd::Ingress(a) => ingress(c, a),
    }
}

// ---------------------------------------------------------------------------------------
// The server.

fn serve(port: u16) -> Result<()> {
    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| Failure(format!("cannot listen on port {port}: {e}")))?;
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = serve_one(s);
        });
    }
    Ok(())
}

fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            s.write_all(&n.to_be_bytes())
        }
        b'C' => s.write_all(b"k"),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// The client side.

/// Set by Ctrl-C: measurements stop, the service is removed.
static STOP: AtomicBool = AtomicBool::new(false);

fn stopped() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        return Err(Failure("interrupted".into()));
    }
    Ok(())
}

/// One path measured: the direct one, or the routing mesh through a node.
#[derive(Clone, Debug)]
struct Path {
    direct: bool,
    node: String,
    addr: SocketAddrV4,
}

impl Path {
    fn label(&self) -> &'static str {
        if self.direct {
            "direct (host mode)"
        } else {
            "routing mesh"
        }
    }
}

/// One round's figures of a path.
#[derive(Clone, Debug, Default)]
struct Round {
    /// bits/s.
    throughput: Option<f64>,
    throughput_streams: Option<f64>,
    conns_per_s: f64,
    latencies: Vec<Duration>,
    errors: u64,
}

/// Removes the deployed service when dropped: at the end, on an error, on Ctrl-C.
struct Deployed<'a> {
    c: &'a Client,
    name: String,
}

impl Drop for Deployed<'_> {
    fn drop(&mut self) {
        eprintln!("removing service {}", self.name);
        if let Err(Failure(e)) = self.c.call(Request::ServiceRm {
            service: self.name.clone(),
        }) {
            eprintln!("Error: cannot remove service {}: {e}", self.name);
        }
    }
}

fn ingress(c: &Client, a: IngressArgs) -> Result<()> {
    let json_out = match &a.format {
        Format::Table => false,
        Format::Json => true,
        _ => return Err(Failure("--format takes table or json".into())),
    };
    if a.port.is_none() && a.port_base == u16::MAX {
        return Err(Failure("--port-base must leave room for BASE+1".into()));
    }
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed));
    let nodes = node_addrs(c)?;
    if nodes.is_empty() {
        return Err(Failure("no node to measure".into()));
    }
    let mut deployed = None;
    let mut paths = Vec::new();
    let connections_only = a.port.is_some();
    match a.port {
        Some(port) => {
            for (name, ip) in &nodes {
                paths.push(Path {
                    direct: false,
                    node: name.clone(),
                    addr: SocketAddrV4::new(*ip, port),
                });
            }
        }
        None => {
            let name = format!("mesh-bench-{}", std::process::id());
            let exe = std::env::current_exe()
                .map_err(|e| Failure(format!("cannot find the mesh binary: {e}")))?;
            let spec = crate::service::spec_of(&[
                "--name".into(),
                name.clone(),
                "--publish".into(),
                format!("published={},target={SERVER_PORT}", a.port_base),
                "--publish".into(),
                format!(
                    "mode=host,published={},target={SERVER_PORT}",
                    a.port_base + 1
                ),
                "--host-command".into(),
                exe.to_string_lossy().into_owned(),
                "bench".into(),
                "serve".into(),
                "--port".into(),
                SERVER_PORT.to_string(),
            ])?;
            eprintln!("creating service {name}");
            c.call(Request::ServiceCreate {
                spec,
                registry_auth: None,
            })?;
            deployed = Some(Deployed {
                c,
                name: name.clone(),
            });
            let task_node = wait_running(c, &name)?;
            let ip = nodes
                .iter()
                .find(|(n, _)| *n == task_node)
                .map(|(_, ip)| *ip)
                .ok_or_else(|| Failure(format!("no address for node {task_node}")))?;
            paths.push(Path {
                direct: true,
                node: task_node,
                addr: SocketAddrV4::new(ip, a.port_base + 1),
            });
            for (n, ip) in &nodes {
                paths.push(Path {
                    direct: false,
                    node: n.clone(),
                    addr: SocketAddrV4::new(*ip, a.port_base),
                });
            }
        }
    }
    wait_answering(&paths)?;
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); paths.len()];
    for r in 1..=a.rounds {
        for (i, p) in paths.iter().enumerate() {
            stopped()?;
            eprintln!(
                "round {r}/{}: {} via {} ({})",
                a.rounds,
                p.label(),
                p.node,
                p.addr
            );
            let mut round = Round::default();
            if !connections_only {
                let (bps, e) = throughput(p.addr, 1, a.duration);
                round.throughput = bps;
                round.errors += e;
                stopped()?;
                let (bps, e) = throughput(p.addr, a.streams, a.duration);
                round.throughput_streams = bps;
                round.errors += e;
                stopped()?;
            }
            let (rate, lat, e) = connections(p.addr, a.concurrency, a.duration, !connections_only);
            round.conns_per_s = rate;
            round.latencies = lat;
            round.errors += e;
            rounds[i].push(round);
        }
    }
    stopped()?;
    let report = summarize(
        &paths,
        &rounds,
        &a,
        deployed.as_ref().map(|d| d.name.as_str()),
    );
    if let Some(file) = &a.chart {
        std::fs::write(file, chart(&report))
            .map_err(|e| Failure(format!("cannot write {}: {e}", file.display())))?;
        eprintln!("chart written to {}", file.display());
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, a.streams);
    }
    drop(deployed);
    Ok(())
}

/// Every node's hostname and underlay address, by hostname.
fn node_addrs(c: &Client) -> Result<Vec<(String, Ipv4Addr)>> {
    let ls = c.call(Request::NodeLs {
        filters: Default::default(),
    })?;
    let mut out = Vec::new();
    for n in ls.as_array().cloned().unwrap_or_default() {
        let id = n["id"].as_str().unwrap_or_default().to_string();
        if n["status"].as_str() != Some("Ready") {
            continue;
        }
        let v = c.call(Request::NodeInspect { node: id })?;
        let addr = v["addr"].as_str().unwrap_or_default();
        let ip = match addr.parse::<SocketAddr>().map(|s| s.ip()) {
            Ok(std::net::IpAddr::V4(ip)) => ip,
            _ => match addr.parse::<Ipv4Addr>() {
                Ok(ip) => ip,
                Err(_) => continue,
            },
        };
        out.push((v["hostname"].as_str().unwrap_or_default().to_string(), ip));
    }
    out.sort();
    Ok(out)
}

/// Waits until the service's task runs; its node's hostname.
fn wait_running(c: &Client, service: &str) -> Result<String> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        stopped()?;
        let ps = c.call(Request::ServicePs {
            service: service.to_string(),
            filters: Default::default(),
        })?;
        for t in ps.as_array().cloned().unwrap_or_default() {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            if s("desired_state") == "Running" && s("current_state") == "Running" {
                return Ok(s("node"));
            }
        }
        if Instant::now() > deadline {
            return Err(Failure(format!(
                "service {service}: no task running after {}s",
                READY_WITHIN.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every path accepts a connection.
fn wait_answering(paths: &[Path]) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    for p in paths {
        loop {
            stopped()?;
            if TcpStream::connect_timeout(&SocketAddr::V4(p.addr), Duration::from_secs(1)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure(format!(
                    "{} via {} ({}) does not answer",
                    p.label(),
                    p.node,
                    p.addr
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn connect(addr: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `streams` connections sinking data for `d`: bits/s over all of them (what the server
/// counted), and errors. `None` when no stream completed.
fn throughput(addr: SocketAddrV4, streams: u32, d: Duration) -> (Option<f64>, u64) {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut s = connect(addr)?;
                s.write_all(b"S")?;
                let buf = vec![0x5au8; 128 * 1024];
                let end = Instant::now() + d;
                while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                }
                s.shutdown(Shutdown::Write)?;
                let mut n = [0u8; 8];
                s.read_exact(&mut n)?;
                Ok(u64::from_be_bytes(n))
            })
        })
        .collect();
    let (mut bytes, mut errors, mut done) = (0u64, 0u64, 0u32);
    for h in handles {
        match h.join() {
            Ok(Ok(n)) => {
                bytes += n;
                done += 1;
            }
            _ => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    ((done > 0).then(|| bytes as f64 * 8.0 / secs), errors)
}

/// `clients` loops opening connections for `d`: connections per second, the latency of each
/// (connect to the server's byte; connect alone when the server is not ours), errors.
fn connections(
    addr: SocketAddrV4,
    clients: u32,
    d: Duration,
    ours: bool,
) -> (f64, Vec<Duration>, u64) {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                let end = Instant::now() + d;
                while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = (|| -> std::io::Result<()> {
                        let mut s = connect(addr)?;
                        if ours {
                            s.write_all(b"C")?;
                            let mut b = [0u8; 1];
                            s.read_exact(&mut b)?;
                        }
                        Ok(())
                    })();
                    match r {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0u64);
    for h in handles {
        match h.join() {
            Ok((l, e)) => {
                all.extend(l);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    (all.len() as f64 / secs, all, errors)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i].as_secs_f64() * 1000.0)
}

/// The report: one result per path, medians of its rounds, ratios to the direct path.
fn summarize(
    paths: &[Path],
    rounds: &[Vec<Round>],
    a: &IngressArgs,
    service: Option<&str>,
) -> Value {
    let mut results = Vec::new();
    let mut direct: Option<(Option<f64>, Option<f64>, Option<f64>)> = None;
    for (p, rs) in paths.iter().zip(rounds) {
        let tput = median(rs.iter().filter_map(|r| r.throughput).collect());
        let tput_n = median(rs.iter().filter_map(|r| r.throughput_streams).collect());
        let conns = median(rs.iter().map(|r| r.conns_per_s).collect());
        let mut lat: Vec<Duration> = rs.iter().flat_map(|r| r.latencies.clone()).collect();
        lat.sort();
        let errors: u64 = rs.iter().map(|r| r.errors).sum();
        if p.direct {
            direct = Some((tput, tput_n, conns));
        }
        let ratio = |x: Option<f64>, d: Option<f64>| match (x, d) {
            (Some(x), Some(d)) if d > 0.0 => Some((x / d * 100.0).round() / 100.0),
            _ => None,
        };
        let (rt, rtn, rc) = match direct {
            Some((dt, dtn, dc)) => (ratio(tput, dt), ratio(tput_n, dtn), ratio(conns, dc)),
            None => (None, None, None),
        };
        results.push(json!({
            "path": if p.direct { "direct" } else { "ingress" },
            "node": p.node,
            "address": p.addr.to_string(),
            "throughput_bits_per_second": tput.map(f64::round),
            "throughput_streams_bits_per_second": tput_n.map(f64::round),
            "connections_per_second": conns.map(|c| c.round()),
            "latency_p50_ms": percentile_ms(&lat, 0.5),
            "latency_p99_ms": percentile_ms(&lat, 0.99),
            "connections": lat.len(),
            "errors": errors,
            "throughput_ratio": rt,
            "throughput_streams_ratio": rtn,
            "connections_ratio": rc,
        }));
    }
    json!({
        "service": service,
        "duration_ms": a.duration.as_millis() as u64,
        "rounds": a.rounds,
        "streams": a.streams,
        "concurrency": a.concurrency,
        "results": results,
    })
}

fn gbits(v: &Value) -> String {
    v.as_f64()
        .map(|b| format!("{:.2} Gbit/s", b / 1e9))
        .unwrap_or_else(|| "-".into())
}

fn num(v: &Value, prec: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(report: &Value, streams: u32) {
    let mut rows = vec![vec![
        "PATH".to_string(),
        "NODE".into(),
        "ADDRESS".into(),
        "THROUGHPUT".into(),
        format!("{streams} STREAMS"),
        "CONN/S".into(),
        "P50 MS".into(),
        "P99 MS".into(),
        "ERRORS".into(),
        "VS DIRECT (TPUT/STREAMS/CONN)".into(),
    ]];
    for r in report["results"].as_array().into_iter().flatten() {
        let ratios = if r["path"] == "direct" {
            "1 / 1 / 1".to_string()
        } else {
            format!(
                "{} / {} / {}",
                num(&r["throughput_ratio"], 2),
                num(&r["throughput_streams_ratio"], 2),
                num(&r["connections_ratio"], 2)
            )
        };
        rows.push(vec![
            if r["path"] == "direct" {
                "direct (host mode)".into()
            } else {
                "routing mesh".into()
            },
            r["node"].as_str().unwrap_or_default().into(),
            r["address"].as_str().unwrap_or_default().into(),
            gbits(&r["throughput_bits_per_second"]),
            gbits(&r["throughput_streams_bits_per_second"]),
            num(&r["connections_per_second"], 0),
            num(&r["latency_p50_ms"], 2),
            num(&r["latency_p99_ms"], 2),
            r["errors"].to_string(),
            ratios,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// An SVG bar chart: per path, its throughput, multi-stream throughput and connection rate
/// as ratios to the direct path (the direct path's bars are 1).
fn chart(report: &Value) -> String {
    let results: Vec<&Value> = report["results"].as_array().into_iter().flatten().collect();
    let series = [
        ("throughput_ratio", "throughput", "#4c78a8"),
        ("throughput_streams_ratio", "throughput, streams", "#72b7b2"),
        ("connections_ratio", "connections/s", "#f58518"),
    ];
    let (w, h, left, bottom, top) = (760.0, 400.0, 60.0, 70.0, 50.0);
    let plot_h = h - bottom - top;
    let max = results
        .iter()
        .flat_map(|r| series.iter().filter_map(|(k, _, _)| r[*k].as_f64()))
        .fold(1.2f64, f64::max);
    let group_w = (w - left - 20.0) / results.len().max(1) as f64;
    let bar_w = group_w / (series.len() as f64 + 1.0);
    let y = |v: f64| top + plot_h - v / max * plot_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">mesh bench ingress: each path against the direct one (1 = as fast)</text>\n"
    );
    for tick in 0..=((max / 0.25).floor() as u32) {
        let v = f64::from(tick) * 0.25;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            w - 20.0,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    for (i, r) in results.iter().enumerate() {
        let x0 = left + group_w * i as f64 + bar_w / 2.0;
        let direct = r["path"] == "direct";
        for (j, (k, _, color)) in series.iter().enumerate() {
            let v = if direct { Some(1.0) } else { r[*k].as_f64() };
            let Some(v) = v else { continue };
            s += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{v:.2}</title></rect>\n",
                x0 + bar_w * j as f64,
                y(v),
                bar_w * 0.9,
                top + plot_h - y(v)
            );
        }
        let label = if direct {
            format!("direct ({})", r["node"].as_str().unwrap_or_default())
        } else {
            format!("via {}", r["node"].as_str().unwrap_or_default())
        };
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            x0 + bar_w * series.len() as f64 / 2.0,
            top + plot_h + 18.0,
            xml_escape(&label)
        );
    }
    for (j, (_, name, color)) in series.iter().enumerate() {
        let x = left + 170.0 * j as f64;
        s += &format!(
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{:.1}\">{name}</text>\n",
            h - 30.0,
            x + 18.0,
            h - 20.0
        );
    }
    s += "</svg>\n";
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_docker_writes_them() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(
            parse_duration("2").is_err(),
            "a unit is needed, as Docker's"
        );
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1ms").is_err(), "too short");
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let lat: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&lat, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&lat, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn the_server_counts_what_it_sinks_and_answers_a_connection() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve_one(s));
            }
        });
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let (bps, errors) = throughput(addr, 2, Duration::from_millis(100));
        assert_eq!(errors, 0);
        assert!(bps.unwrap() > 0.0);
        let (rate, lat, errors) = connections(addr, 2, Duration::from_millis(100), true);
        assert_eq!(errors, 0);
        assert!(rate > 0.0 && !lat.is_empty());
    }

    #[test]
    fn the_report_compares_every_path_with_the_direct_one() {
        let path = |direct, node: &str| Path {
            direct,
            node: node.into(),
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 30900),
        };
        let round = |t: f64, c: f64| Round {
            throughput: Some(t),
            throughput_streams: Some(t * 2.0),
            conns_per_s: c,
            latencies: vec![Duration::from_millis(1)],
            errors: 0,
        };
        let paths = [path(true, "h2"), path(false, "h1")];
        let rounds = vec![
            vec![round(10.0, 100.0), round(12.0, 100.0), round(11.0, 90.0)],
            vec![round(5.0, 80.0), round(6.0, 60.0), round(7.0, 70.0)],
        ];
        let a = IngressArgs {
            port: None,
            port_base: 30900,
            duration: Duration::from_secs(1),
            rounds: 3,
            streams: 2,
            concurrency: 2,
            format: Format::Json,
            chart: None,
        };
        let r = summarize(&paths, &rounds, &a, Some("svc"));
        let via = &r["results"][1];
        assert_eq!(via["throughput_ratio"], 0.55); // 6 / 11
        assert_eq!(via["connections_ratio"], 0.7); // 70 / 100
        assert_eq!(r["results"][0]["throughput_bits_per_second"], 11.0);
        let svg = chart(&r);
        assert!(svg.starts_with("<svg") && svg.contains("via h1") && svg.contains("direct (h2)"));
    }
}
