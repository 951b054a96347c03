//! `vip`: what a service VIP costs against the task's own address, for both balancers in one
//! run.
//!
//! For each backend (`meshd --lb-backend ebpf`, then `nftables`; a fresh 2-host netns cluster
//! each): an overlay network, on h2 an iperf3 server and a `mesh-bench serve-http` server (one
//! replica each), on h1 a client task (`sleep`). From inside the client task (`mesh exec`, so
//! the command is in the task's network namespace and cgroup, where the socket-LB hooks and
//! the nftables DNAT act), in interleaved rounds (the order alternates): iperf3 throughput
//! (one TCP stream) and new connections per second (one HTTP/1.0 request per connection),
//! to the service's VIP and straight to the server task's overlay address.
//!
//! The HTTP server listens on two ports: the VIP path uses 8080, the direct path 8081. With
//! one port, the two paths would reuse each other's 4-tuples at the server (each run opens
//! more connections than there are client ports), and with nftables DNAT the client's TCP
//! timestamps for a tuple differ by path (their offset is derived from the destination the
//! socket knows: the VIP or the task), so the server's TIME_WAIT rejects the reused tuple as
//! a PAWS failure and the client waits for a SYN retransmission: a bench artefact, not a cost
//! of the VIP.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_netns::swarm::{network_tasks, vip_of};
use mesh_netns::{wait_for, Host};

use crate::netload::{
    cluster, list, med, ratios, self_exe, service_on, start, verdict, with_cpu, LoadRuns, Place,
    LOAD_ALIGN, LOAD_HEADER,
};
use crate::report;

pub const ABOUT: &str =
    "service VIP vs task IP from inside a task, eBPF socket-LB and nftables: iperf3 and conn/s";

const BACKENDS: [&str; 2] = ["ebpf", "nftables"];
const ROUNDS: usize = 8;
const IPERF_SECS: u32 = 2;
const LOAD_SECS: f64 = 1.5;
const LOAD_THREADS: usize = 4;
const THROUGHPUT_GOAL: f64 = 0.98;
const RATE_GOAL: f64 = 0.95;
const NET: &str = "benchnet";
/// The HTTP server's port reached through the VIP, and the one reached at the task's address.
const VIP_PORT: u16 = 8080;
const TASK_PORT: u16 = 8081;

/// One destination's samples.
#[derive(Default)]
struct Samples {
    gbits: Vec<f64>,
    conns: LoadRuns,
}

/// Samples of one backend: through the VIP, and straight to the task.
struct Backend {
    name: &'static str,
    vip: Samples,
    task: Samples,
}

/// The one task of `svc` on the benchmark network: (full name, overlay address).
fn task_of(h: &Host, svc: &str) -> Result<(String, String)> {
    wait_for(
        &format!("task of {svc} on {NET}"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(network_tasks(h, NET, Some(svc))?
                .into_iter()
                .find(|t| !t.ip.is_empty())
                .map(|t| (t.name, t.ip)))
        },
    )
}

fn measure(backend: &'static str) -> Result<Backend> {
    let flag = format!("--lb-backend={backend}");
    let c = cluster(2, "bench-vip", &[&flag])?;
    let h1 = c.host(1);
    h1.mesh_ok(&["network", "create", NET])?;
    let exe = self_exe()?;
    let net = ["--network", NET];
    service_on(h1, "srv", "h2", &net, &["iperf3", "-s", "-p", "5201"])?;
    // Two ports, one per path (see the module docs).
    let http = [
        exe.as_str(),
        "serve-http",
        &VIP_PORT.to_string(),
        &TASK_PORT.to_string(),
    ];
    service_on(h1, "web", "h2", &net, &http)?;
    service_on(h1, "cli", "h1", &net, &["sleep", "100000"])?;
    let (cli, _) = task_of(h1, "cli")?;
    let (_, srv_ip) = task_of(h1, "srv")?;
    let (_, web_ip) = task_of(h1, "web")?;
    let (srv_vip, web_vip) = (vip_of(h1, "srv")?, vip_of(h1, "web")?);
    let client = Place::Task(h1, &cli);
    client.widen_ports()?;
    client.wait_http(&web_ip, TASK_PORT)?;
    client.wait_http(&web_vip, VIP_PORT)?;
    client.wait_iperf(&srv_ip, 5201)?;
    client.wait_iperf(&srv_vip, 5201)?;
    let (mut vip, mut task) = (Samples::default(), Samples::default());
    for round in 0..ROUNDS {
        // (samples, iperf3 address, http address and port), the first one alternating.
        let mut legs = [
            (&mut vip, &srv_vip, &web_vip, VIP_PORT),
            (&mut task, &srv_ip, &web_ip, TASK_PORT),
        ];
        if round % 2 == 1 {
            legs.reverse();
        }
        for (s, srv, _, _) in legs.iter_mut() {
            s.gbits.push(client.iperf(srv, 5201, IPERF_SECS)?);
        }
        for (s, _, web, port) in legs.iter_mut() {
            s.conns.push(with_cpu(|| {
                client.load(web, *port, LOAD_SECS, LOAD_THREADS)
            })?);
        }
        eprintln!(
            "{backend} round {round}: VIP {:.2} Gbit/s {:.0} conn/s | task IP {:.2} Gbit/s {:.0} conn/s",
            vip.gbits[round],
            vip.conns.loads[round].rate,
            task.gbits[round],
            task.conns.loads[round].rate
        );
    }
    Ok(Backend {
        name: backend,
        vip,
        task,
    })
}

fn render(results: &[Backend], load: f64) -> String {
    let mut t = String::from("## Service VIP vs task IP (eBPF socket-LB and nftables)\n\n");
    t.push_str(&format!(
        "Measured {} on {} (load average {load:.1} before the run: other work shares these CPUs, \
hence the interleaved rounds and per-round ratios). Reproduce with `cargo xtask bench vip` (needs iperf3). For each \
backend a fresh 2-host netns cluster (`meshd --lb-backend B` on both), an overlay network, an \
iperf3 server and a `mesh-bench serve-http` server (HTTP/1.0, the server closes each connection) \
on h2, a client task on h1. From inside the client task (`mesh exec`: its network namespace and \
cgroup), {ROUNDS} interleaved rounds: iperf3 (1 TCP stream, {IPERF_SECS} s) and new connections \
({LOAD_THREADS} client threads, {LOAD_SECS} s, one request per connection) to the service VIP and \
straight to the server task's overlay address. Medians; ratios are medians of per-round ratios. \
Machine CPU = share of all CPUs busy during the measurement; CPU per conn = that CPU time divided \
by the connections made.\n\n",
        report::utc_now(),
        report::machine()
    ));
    t.push_str(&format!(
        "| backend | to | Gbit/s | {LOAD_HEADER} |\n|---|---|---:|{LOAD_ALIGN}|\n"
    ));
    for b in results {
        for (to, s) in [("VIP", &b.vip), ("task IP", &b.task)] {
            t.push_str(&format!(
                "| {} | {to} | {:.2} | {} |\n",
                b.name,
                med(&s.gbits),
                s.conns.cells()
            ));
        }
    }
    t.push_str(&format!(
        "\n| backend | VIP / task IP throughput (goal >= {THROUGHPUT_GOAL}) | rounds | VIP / task IP conn/s (goal >= {RATE_GOAL}) | rounds |\n|---|---:|---|---:|---|\n"
    ));
    for b in results {
        let g = ratios(&b.vip.gbits, &b.task.gbits);
        let r = ratios(&b.vip.conns.rates(), &b.task.conns.rates());
        t.push_str(&format!(
            "| {} | **{:.3}** {} | {} | **{:.3}** {} | {} |\n",
            b.name,
            med(&g),
            verdict(med(&g), THROUGHPUT_GOAL),
            list(&g, 3),
            med(&r),
            verdict(med(&r), RATE_GOAL),
            list(&r, 3),
        ));
    }
    t.push_str(
        "\nWith the eBPF socket-LB the VIP is rewritten once, in `connect()`: the packets of both \
paths are the same, so their difference is noise. With nftables (table `ip mesh_lb` in the client \
task's namespace) both paths go through conntrack there, since its NAT hooks are registered (so \
the task-IP path costs more CPU per connection than with eBPF too), and a VIP connection also gets \
a DNAT binding on its first packet, after which every packet of it is rewritten: that is the \
nftables VIP / task IP gap. The HTTP server listens on a \
second port for the task-IP path: on one port, the two paths would reuse each other's 4-tuples at \
the server within TIME_WAIT, and with nftables the client's TCP timestamp offset differs by path \
(it is derived from the destination the socket knows, VIP or task), so the server drops the reused \
SYNs as PAWS failures and each such connection waits for a SYN retransmission; the socket-LB, which hands the \
socket the real backend, does not have that problem.\n",
    );
    t
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(start) = start("vip", ABOUT, args)? else {
        return Ok(());
    };
    let results = BACKENDS
        .iter()
        .map(|b| measure(b).with_context(|| format!("backend {b}")))
        .collect::<Result<Vec<_>>>()?;
    let t = render(&results, start.load);
    println!("{t}");
    if start.write_docs {
        report::write_section("vip", &t)?;
    }
    Ok(())
}
