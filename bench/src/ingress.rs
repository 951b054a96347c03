//! `ingress`: the routing mesh against a straight path, side by side in one run.
//!
//! A 3-host netns cluster (h1 manager, h2 and h3 workers). On h1 run two iperf3 servers and
//! two `mesh-bench serve-http` servers as tasks: one of each published in ingress mode
//! (`--publish 5201:5201`, `8080:8080`: every node answers), one in host mode
//! (`--publish mode=host,5202:5201`, `8081:8080`: only h1 answers, DNAT straight to the task).
//! From the underlay client (10.99.0.1), three paths:
//!
//! - **direct**: h1's host-mode port (host DNAT -> task);
//! - **ingress, same node**: h1's ingress port: the tc fast path on h1's underlay interface
//!   DNATs the packet (no SNAT) and hands it into the task through its gateway veth; the reply
//!   goes to h1's sandbox leg on the ingress overlay, where the same programs rewrite it and
//!   send it out (the nftables path, host DNAT -> sandbox DNAT, only while the task is not yet
//!   in the fast path's `np_local`);
//! - **ingress via other node, eBPF**: h3's ingress port (h3 has no task): the tc fast path
//!   (`ebpf/nodeport.c`) DNATs the packet on h3's underlay interface and VXLAN-encapsulates it
//!   straight to h1 (a GSO packet through the ingress overlay's VXLAN device, skipping the
//!   sandbox's stack); the same program decapsulates the replies, rewrites them and sends them
//!   back out (those merged by GRO through h3's sandbox leg): no conntrack or NAT rule on h3;
//! - **ingress via other node, nftables**: h2's ingress port, h2's daemon started with
//!   `--ingress-datapath nftables` (h2 has no task: the nftables path, then the VXLAN ingress
//!   overlay to h1).
//!
//! Measured in interleaved rounds (the order rotates each round): iperf3 throughput (one TCP
//! stream, with the machine's congestion control and with CUBIC) and new connections per second (one HTTP/1.0 request per connection, several
//! client threads, `mesh-bench http-load`). Reports medians, per-round ratios to the direct
//! path, the machine's CPU shares meanwhile, and a PNG chart (`docs/ingress-bench.png`, made
//! with gnuplot).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::netload::{
    cluster, list, med, ratios, self_exe, service_on, start, verdict, with_cpu, CpuShare, LoadRuns,
    Place, LOAD_ALIGN, LOAD_HEADER,
};
use crate::report;
use crate::stats::millis;

pub const ABOUT: &str =
    "routing mesh vs host-mode publishing from an underlay client: iperf3 and connections/s";

const ROUNDS: usize = 5;
const IPERF_SECS: u32 = 3;
/// The second congestion control iperf3 runs with (`-C`), beside the machine's default.
const CUBIC: &str = "cubic";
const LOAD_SECS: f64 = 2.0;
const LOAD_THREADS: usize = 4;
/// Goals for ingress via a node without a task, relative to the direct path (issue 16).
const THROUGHPUT_GOAL: f64 = 0.85;
const RATE_GOAL: f64 = 0.8;
/// The chart, next to `docs/benchmarks.md`.
const CHART_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ingress-bench.png");
const CHART_NAME: &str = "ingress-bench.png";

/// One way from the client to the servers on h1.
struct Route {
    label: &'static str,
    /// The label under its bars in the chart (gnuplot string, `\n` breaks the line).
    tic: &'static str,
    /// Index of the host whose address the client connects to.
    host: usize,
    iperf_port: u16,
    http_port: u16,
}

const ROUTES: [Route; 4] = [
    Route {
        label: "direct (host mode, h1)",
        tic: "direct\\n(host mode, h1)",
        host: 1,
        iperf_port: 5202,
        http_port: 8081,
    },
    Route {
        label: "ingress, same node (h1)",
        tic: "ingress,\\nsame node (h1)",
        host: 1,
        iperf_port: 5201,
        http_port: 8080,
    },
    Route {
        label: "ingress via other node, eBPF (h3)",
        tic: "via other node,\\neBPF (h3)",
        host: 3,
        iperf_port: 5201,
        http_port: 8080,
    },
    Route {
        label: "ingress via other node, nftables (h2)",
        tic: "via other node,\\nnftables (h2)",
        host: 2,
        iperf_port: 5201,
        http_port: 8080,
    },
];

/// Everything measured on one route.
#[derive(Default)]
struct Samples {
    /// With the machine's congestion control.
    gbits: Vec<f64>,
    /// With CUBIC.
    gbits_cubic: Vec<f64>,
    iperf_cpu: Vec<CpuShare>,
    conns: LoadRuns,
}

/// `mesh bench ingress` on the same cluster, from the same client: the operator's view
/// (its table). Its server runs on whichever node the scheduler picks.
const OPERATOR_ARGS: [&str; 6] = ["--duration", "2s", "--rounds", "3", "--port-base", "30900"];

fn operator_view(c: &mesh_netns::Cluster) -> Result<String> {
    let mesh = mesh_netns::binaries()?.mesh.to_string_lossy().to_string();
    let host = format!("unix://{}", c.host(1).socket().display());
    let mut argv = vec![mesh.as_str(), "-H", host.as_str(), "bench", "ingress"];
    argv.extend_from_slice(&OPERATOR_ARGS);
    let out = c.client_exec_timeout(&argv, std::time::Duration::from_secs(600))?;
    if !out.status.success() {
        bail!(
            "mesh bench ingress: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn measure() -> Result<(Vec<Samples>, String)> {
    let c = cluster(3, "bench-ingress", &[])?;
    let h1 = c.host(1);
    let exe = self_exe()?;
    let iperf = ["iperf3", "-s", "-p", "5201"];
    let http = [exe.as_str(), "serve-http", "8080"];
    service_on(h1, "iperf-mesh", "h1", &["--publish", "5201:5201"], &iperf)?;
    service_on(
        h1,
        "iperf-host",
        "h1",
        &["--publish", "mode=host,5202:5201"],
        &iperf,
    )?;
    service_on(h1, "http-mesh", "h1", &["--publish", "8080:8080"], &http)?;
    service_on(
        h1,
        "http-host",
        "h1",
        &["--publish", "mode=host,8081:8080"],
        &http,
    )?;
    // h2 takes the nftables path only.
    let h2 = c.host(2);
    h2.stop_daemon()?;
    h2.start_daemon_with(&["--ingress-datapath", "nftables"])?;
    let client = Place::Underlay(&c);
    client.widen_ports()?;
    let addrs: Vec<String> = ROUTES
        .iter()
        .map(|r| c.host(r.host).addr().to_string())
        .collect();
    for (r, addr) in ROUTES.iter().zip(&addrs) {
        client.wait_http(addr, r.http_port)?;
        client.wait_iperf(addr, r.iperf_port)?;
    }
    let mut out: Vec<Samples> = ROUTES.iter().map(|_| Samples::default()).collect();
    for round in 0..ROUNDS {
        let order: Vec<usize> = (0..ROUTES.len())
            .map(|i| (i + round) % ROUTES.len())
            .collect();
        for &i in &order {
            let (g, cpu) = with_cpu(|| client.iperf(&addrs[i], ROUTES[i].iperf_port, IPERF_SECS))?;
            out[i].gbits.push(g);
            out[i].iperf_cpu.push(cpu);
        }
        for &i in &order {
            let cc = Some(CUBIC);
            out[i].gbits_cubic.push(client.iperf_cc(
                &addrs[i],
                ROUTES[i].iperf_port,
                IPERF_SECS,
                cc,
            )?);
        }
        for &i in &order {
            out[i].conns.push(with_cpu(|| {
                client.load(&addrs[i], ROUTES[i].http_port, LOAD_SECS, LOAD_THREADS)
            })?);
        }
        for (r, s) in ROUTES.iter().zip(&out) {
            let l = s.conns.loads[round];
            eprintln!(
                "round {round}: {:<28} {:6.2} Gbit/s ({:6.2} cubic)  {:7.0} conn/s  p99 {}  errors {}",
                r.label,
                s.gbits[round],
                s.gbits_cubic[round],
                l.rate,
                millis(l.p99),
                l.errors
            );
        }
    }
    eprintln!("mesh bench ingress {}", OPERATOR_ARGS.join(" "));
    let operator = operator_view(&c)?;
    eprint!("{operator}");
    Ok((out, operator))
}

/// Draws the bar chart with gnuplot into `path`: per route, its tic label, Gbit/s, conn/s.
fn chart(path: &Path, rows: &[(&str, f64, f64)]) -> Result<()> {
    let mut data = String::new();
    let mut tics = Vec::new();
    for (i, (label, g, r)) in rows.iter().enumerate() {
        data.push_str(&format!("{g:.3} {r:.0}\n"));
        tics.push(format!("\"{label}\" {i}"));
    }
    let script = format!(
        r##"set terminal pngcairo size 1000,440 font "sans,10"
set output '{out}'
$d << EOD
{data}EOD
set multiplot layout 1,2 title "Routing mesh vs direct (host mode): 3 netns hosts, client on the underlay ({when})"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.8
set yrange [0:*]
set offsets 0,0,graph 0.12,0
set grid ytics
set xtics noenhanced font ",9" ({tics})
set bmargin 4
set xrange [-0.6:3.6]
unset key
set title "TCP throughput (iperf3, 1 stream)"
set ylabel "Gbit/s"
plot $d using 1 lc rgb "#4477aa", '' using 0:1:(sprintf("%.2f", $1)) with labels offset 0,0.8
set title "New connections per second (1 HTTP request each)"
set ylabel "connections/s"
plot $d using 2 lc rgb "#ee6677", '' using 0:2:(sprintf("%.0f", $2)) with labels offset 0,0.8
unset multiplot
"##,
        out = path.display(),
        when = report::utc_now(),
        tics = tics.join(", "),
    );
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running gnuplot (Debian package gnuplot-nox)")?;
    child
        .stdin
        .take()
        .context("gnuplot stdin")?
        .write_all(script.as_bytes())?;
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("gnuplot failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(start) = start("ingress", ABOUT, args)? else {
        return Ok(());
    };
    let (write, load) = (start.write_docs, start.load);
    let (s, operator) = measure()?;
    let (direct, same, other, nft) = (&s[0], &s[1], &s[2], &s[3]);
    let g_other = ratios(&other.gbits, &direct.gbits);
    let g_same = ratios(&same.gbits, &direct.gbits);
    let g_nft = ratios(&nft.gbits, &direct.gbits);
    let gc_other = ratios(&other.gbits_cubic, &direct.gbits_cubic);
    let gc_same = ratios(&same.gbits_cubic, &direct.gbits_cubic);
    let gc_nft = ratios(&nft.gbits_cubic, &direct.gbits_cubic);
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "default".into());
    let r_other = ratios(&other.conns.rates(), &direct.conns.rates());
    let r_same = ratios(&same.conns.rates(), &direct.conns.rates());
    let r_nft = ratios(&nft.conns.rates(), &direct.conns.rates());
    let cpu = |x: &Samples| x.conns.cpu_per_conn();
    let (c_other, c_nft, c_direct) = (cpu(other), cpu(nft), cpu(direct));

    let mut t = String::from("## Ingress: routing mesh vs direct\n\n");
    t.push_str(&format!(
        "Measured {} on {} (load average {load:.1} before the run: other work shares these CPUs, \
hence the interleaved rounds and per-round ratios). Reproduce with `cargo xtask bench ingress` (needs iperf3 and gnuplot). \
A 3-host netns cluster; on h1 an iperf3 server and a `mesh-bench serve-http` server (HTTP/1.0, \
the server closes each connection) published twice: in ingress mode (every node answers) and \
in host mode (only h1, DNAT straight to the task). From the underlay client: **direct** = h1's \
host-mode port; **ingress, same node** = h1's ingress port (the tc fast path on h1's underlay interface \
DNATs the packet, no SNAT: the task sees the client, and hands it into the task through its gateway veth; \
the task's reply is policy-routed to h1's sandbox leg on the ingress overlay, where the same programs \
rewrite it and send it out: no conntrack entry or NAT rule on h1's host or sandbox); \
**ingress via other node, eBPF** = h3's ingress port (h3 has no task; the tc fast path on h3's underlay \
interface DNATs the packet; one segment it VXLAN-encapsulates to h1 itself, a GSO packet it hands to the ingress \
overlay's VXLAN device through the sandbox's veth, skipping the sandbox's stack; the same program decapsulates \
the replies, rewrites them and sends them back out: no conntrack entry or NAT rule on h3; on h1 the same \
program takes the VXLAN past the VXLAN device and the overlay's bridge, into the task through its gateway veth); \
**ingress via other node, nftables** = h2's ingress port, h2 started with `--ingress-datapath nftables` (the \
nftables path, plus the VXLAN ingress overlay to h1, where h1's fast path takes it into the task as above). {ROUNDS} interleaved rounds of iperf3 (1 TCP stream, {IPERF_SECS} s; once with \
the machine's congestion control, {cc}, once with `-C {CUBIC}`) and of new connections ({LOAD_THREADS} client \
threads, {LOAD_SECS} s, one request per connection); medians. Machine CPU = share of all CPUs busy \
during the measurement (client, servers and packet processing all share them); CPU per conn = \
that CPU time divided by the connections made.\n\n",
        report::utc_now(),
        report::machine()
    ));
    t.push_str(&format!(
        "| path | Gbit/s ({cc}) | Gbit/s ({CUBIC}) | machine CPU during iperf3 ({cc}) | {LOAD_HEADER} |\n\
|---|---:|---:|---|{LOAD_ALIGN}|\n"
    ));
    for (r, x) in ROUTES.iter().zip(&s) {
        t.push_str(&format!(
            "| {} | {:.2} | {:.2} | {} | {} |\n",
            r.label,
            med(&x.gbits),
            med(&x.gbits_cubic),
            CpuShare::mean(&x.iperf_cpu).describe(),
            x.conns.cells(),
        ));
    }
    let (go, gco, ro) = (med(&g_other), med(&gc_other), med(&r_other));
    t.push_str(&format!(
        "\nIngress via other node, eBPF / direct: throughput **{go:.2}** with {cc} (rounds {}; goal >= \
{THROUGHPUT_GOAL}: {}) and **{gco:.2}** with {CUBIC} (rounds {}; {}), connections/s **{ro:.2}** (rounds {}; \
goal >= {RATE_GOAL}: {}), CPU per connection **{:.2}x** direct (goal <= 1.3).\n\
Ingress via other node, nftables / direct: throughput {:.2} with {cc} (rounds {}) and {:.2} with {CUBIC} \
(rounds {}), connections/s {:.2} (rounds {}), CPU per connection {:.2}x direct.\n\
Ingress same node / direct: throughput {:.2} with {cc} (rounds {}) and {:.2} with {CUBIC} (rounds {}), \
connections/s {:.2} (rounds {}).\n\n\
All paths share the same 2 CPUs: the client, the kernels of the three simulated hosts and the \
servers. The connection test keeps them busy, so connections/s is about the inverse of the \
machine CPU one connection costs (last column); via h2 (nftables), that cost adds a DNAT and a conntrack \
entry in h2's namespace, a second DNAT with its own conntrack entry in the ingress \
sandbox, VXLAN encapsulation and the UDP send through h2's stack, and more bridges and veth \
crossings; via h3 (eBPF), one tc program on h3 each way, and one on h1 on the way in. All of it is charged \
to the CPUs the direct path spends on client and server alone (on separate machines h3's part would \
run on h3). One iperf3 stream with {cc} leaves a third of the CPUs idle (the CPU column): {cc} \
paces the sender by the rate and round trip it measures, and at these microsecond round trips \
each hop a path adds lowers the rate it settles on; with {CUBIC}, which does not pace, every path \
runs faster, and direct most (twice the others on some machines: its merged packets reach the task no \
larger than theirs, 34-44 KB on average, but it keeps both CPUs busy where the eBPF path via h3 leaves \
about a quarter of them idle, as `perf` showed on 2026-12-08). The ingress paths also carry a smaller MSS (1398 instead of 1448: the ingress \
overlay's MTU is 1450).\n",
        list(&g_other, 2),
        verdict(go, THROUGHPUT_GOAL),
        list(&gc_other, 2),
        verdict(gco, THROUGHPUT_GOAL),
        list(&r_other, 2),
        verdict(ro, RATE_GOAL),
        c_other / c_direct,
        med(&g_nft),
        list(&g_nft, 2),
        med(&gc_nft),
        list(&gc_nft, 2),
        med(&r_nft),
        list(&r_nft, 2),
        c_nft / c_direct,
        med(&g_same),
        list(&g_same, 2),
        med(&gc_same),
        list(&gc_same, 2),
        med(&r_same),
        list(&r_same, 2),
    ));
    t.push_str(&format!(
        "\nThe operator's view of the same cluster from the same client, `mesh bench ingress {}` \
(its own server, on the node the scheduler chose; direct = that node's host-mode port; \
its own load generator: throughput on 1 and 4 streams, connections/s with 4 clients; \
medians of the rounds; latency = connect to the server's first byte):\n\n```\n{}```\n",
        OPERATOR_ARGS.join(" "),
        operator
    ));
    let rows: Vec<(&str, f64, f64)> = ROUTES
        .iter()
        .zip(&s)
        .map(|(r, x)| (r.tic, med(&x.gbits), med(&x.conns.rates())))
        .collect();
    let png = if write {
        PathBuf::from(CHART_PATH)
    } else {
        std::env::temp_dir().join(CHART_NAME)
    };
    match chart(&png, &rows) {
        Ok(()) => {
            eprintln!("chart: {}", png.display());
            t.push_str(&format!("\n![ingress benchmark chart]({CHART_NAME})\n"));
        }
        Err(e) => eprintln!("no chart: {e:#}"),
    }
    println!("{t}");
    if write {
        report::write_section("ingress", &t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_a_png() -> Result<()> {
        if Command::new("gnuplot").arg("--version").output().is_err() {
            eprintln!("no gnuplot: skipped");
            return Ok(());
        }
        let path = std::env::temp_dir().join(format!("ingress-chart-{}.png", std::process::id()));
        let rows: Vec<(&str, f64, f64)> = ROUTES
            .iter()
            .zip([(10.0, 23000.0), (9.9, 17000.0), (9.0, 13000.0)])
            .map(|(r, (g, c))| (r.tic, g, c))
            .collect();
        chart(&path, &rows)?;
        let bytes = std::fs::read(&path)?;
        if std::env::var_os("KEEP_CHART").is_none() {
            std::fs::remove_file(&path)?;
        }
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        Ok(())
    }
}
