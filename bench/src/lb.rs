//! `lb`: the control plane of service-VIP load balancing at scale, both backends in one run:
//! the eBPF socket balancer's maps (`mesh_lb::SockLb`, loaded, not attached) and the
//! nftables table (`mesh_lb::NftLb`, in a network namespace made for the run and deleted
//! after it).
//!
//! For each: the initial load of 10,000 services x 10 backends, single changes (one backend
//! of one service replaced; median and p99), and a full resync of all services, once with
//! nothing changed and once with one backend of every service replaced. For nftables also:
//! the same single change made by spawning `nft -f -` (what the `nft -i` session avoids),
//! reading the whole table back (`dump`) and adopting it (`NftLb::new` on a loaded table).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_lb::{LoadOptions, NftLb, Proto, SockLb};
use mesh_netlink::Netns;
use mesh_netns::require_root;

use crate::report;
use crate::stats::{median, percentile};

pub const ABOUT: &str =
    "VIP balancer control plane: 10,000 services x 10 backends, eBPF maps vs nftables";

const NETNS_DIR: &str = "/run/netns";
const CHANGE_GOAL: Duration = Duration::from_micros(100);
const RESYNC_GOAL: Duration = Duration::from_secs(1);
/// Single changes made by spawning `nft -f -` (each costs milliseconds).
const SPAWN_CHANGES: usize = 20;

struct Opts {
    services: usize,
    backends: usize,
    changes: usize,
    write_docs: bool,
}

fn parse(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        services: 10_000,
        backends: 10,
        changes: 200,
        write_docs: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{what} needs a value"))?
                .parse()
                .with_context(|| format!("{what}: not a number"))
        };
        match a.as_str() {
            "-h" | "--help" => {
                println!(
                    "usage: mesh-bench lb [--services N] [--backends M] [--changes K] [--no-write-docs]\n\n{ABOUT}"
                );
                return Ok(None);
            }
            "--services" => o.services = num("--services")?,
            "--backends" => o.backends = num("--backends")?,
            "--changes" => o.changes = num("--changes")?,
            "--no-write-docs" => o.write_docs = false,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.services == 0 || o.services > 1 << 20 || o.backends == 0 || o.changes == 0 {
        bail!("--services must be 1..=1048576, --backends and --changes at least 1");
    }
    Ok(Some(o))
}

/// The workload: VIPs from 10.200.0.0, backends from 10.64.0.0 (all distinct), and the
/// changes, each replacing one backend of one service with a fresh address from 11.0.0.0.
struct Workload {
    want: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    /// (VIP, its full new backend list) per change, applied in order.
    changes: Vec<(Ipv4Addr, Vec<Ipv4Addr>)>,
    /// `want` with one backend of every service replaced.
    all_changed: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0ac8_0000 + i as u32)
}

fn workload(o: &Opts) -> Workload {
    let want: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> = (0..o.services)
        .map(|i| {
            let b = (0..o.backends)
                .map(|j| Ipv4Addr::from(0x0a40_0000 + (i * o.backends + j) as u32))
                .collect();
            (vip(i), b)
        })
        .collect();
    let mut cur = want.clone();
    let mut fresh = 0x0b00_0000u32;
    let mut changes = Vec::with_capacity(o.changes);
    for k in 0..o.changes {
        let v = vip((k * 7919) % o.services);
        let list = cur.get_mut(&v).expect("a service");
        list[k % o.backends] = Ipv4Addr::from(fresh);
        fresh += 1;
        changes.push((v, list.clone()));
    }
    let all_changed = cur
        .iter()
        .map(|(v, b)| {
            let mut b = b.clone();
            b[0] = Ipv4Addr::from(fresh);
            fresh += 1;
            (*v, b)
        })
        .collect();
    Workload {
        want,
        changes,
        all_changed,
    }
}

/// One backend's numbers.
#[derive(Default)]
struct Numbers {
    load: Option<Duration>,
    change_median: Option<Duration>,
    change_p99: Option<Duration>,
    resync_same: Option<Duration>,
    resync_changed: Option<Duration>,
    dump: Option<Duration>,
    note: Option<String>,
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

fn ebpf(o: &Opts, w: &Workload) -> Result<Numbers> {
    let total = (o.services * o.backends) as u32;
    let lb = SockLb::load_with(&LoadOptions {
        max_services: Some(o.services as u32 + 64),
        max_backends: Some(total + 1024),
        ..Default::default()
    });
    let mut lb = match lb {
        Ok(lb) => lb,
        Err(e) => {
            return Ok(Numbers {
                note: Some(format!("not measured: {e}")),
                ..Default::default()
            })
        }
    };
    let ports = |b: &[Ipv4Addr]| -> Vec<(Ipv4Addr, u16)> { b.iter().map(|a| (*a, 80)).collect() };
    let set_all = |lb: &mut SockLb, m: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>| -> Result<()> {
        for (v, b) in m {
            lb.set_service(*v, 80, Proto::Tcp, &ports(b))?;
        }
        Ok(())
    };
    let mut n = Numbers::default();
    let ((), t) = timed(|| set_all(&mut lb, &w.want))?;
    n.load = Some(t);
    let mut times = Vec::with_capacity(w.changes.len());
    for (v, b) in &w.changes {
        let ((), t) = timed(|| Ok(lb.set_service(*v, 80, Proto::Tcp, &ports(b))?))?;
        times.push(t);
    }
    n.change_median = Some(median(&times));
    n.change_p99 = Some(percentile(&times, 99.0));
    // The state after the changes, re-set as is: reads only.
    let mut current = w.want.clone();
    for (v, b) in &w.changes {
        current.insert(*v, b.clone());
    }
    let ((), t) = timed(|| set_all(&mut lb, &current))?;
    n.resync_same = Some(t);
    let ((), t) = timed(|| set_all(&mut lb, &w.all_changed))?;
    n.resync_changed = Some(t);
    let (dump, t) = timed(|| Ok(lb.dump()?))?;
    if dump.len() != o.services {
        bail!("eBPF dump has {} services, not {}", dump.len(), o.services);
    }
    n.dump = Some(t);
    Ok(n)
}

/// A network namespace of the benchmark's own, deleted on drop.
struct BenchNs {
    name: String,
    ns: Netns,
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        if let Err(e) = Netns::delete(Path::new(NETNS_DIR), &self.name) {
            eprintln!("warning: deleting namespace {}: {e}", self.name);
        }
    }
}

struct NftExtra {
    spawn_median: Duration,
    adopt: Duration,
}

fn nftables(o: &Opts, w: &Workload) -> Result<(Numbers, NftExtra)> {
    let name = format!("nftlb-bench-{}", std::process::id());
    let ns = Netns::create(Path::new(NETNS_DIR), &name)
        .with_context(|| format!("creating namespace {name}"))?;
    let bns = BenchNs { name, ns };
    let mut lb = NftLb::new(Some(bns.ns.try_clone()?))?;
    let mut n = Numbers::default();

    let ((), t) = timed(|| Ok(lb.sync(&w.want)?))?;
    n.load = Some(t);
    eprintln!("nft: initial load {t:?}");
    let mut times = Vec::with_capacity(w.changes.len());
    for (v, b) in &w.changes {
        let ((), t) = timed(|| Ok(lb.set_service(*v, b)?))?;
        times.push(t);
    }
    n.change_median = Some(median(&times));
    n.change_p99 = Some(percentile(&times, 99.0));
    let mut current = w.want.clone();
    for (v, b) in &w.changes {
        current.insert(*v, b.clone());
    }
    let ((), t) = timed(|| Ok(lb.sync(&current)?))?;
    n.resync_same = Some(t);
    let ((), t) = timed(|| Ok(lb.sync(&w.all_changed)?))?;
    n.resync_changed = Some(t);
    eprintln!("nft: resync of all changed {t:?}");
    let (dump, t) = timed(|| Ok(lb.dump()?))?;
    if dump.len() != 2 * o.services || !same_sets(lb.services(), &w.all_changed) {
        bail!(
            "nftables: dump has {} entries (want {}), or the state is not the last resync",
            dump.len(),
            2 * o.services
        );
    }
    n.dump = Some(t);
    let held = lb.services().clone();
    drop(lb);

    // The same kind of change, one `nft -f -` process each (as `mesh_netlink::nft::apply_in`):
    // slot 0 of the first service swapped back and forth.
    let (v0, b0) = held.iter().next().context("no service")?;
    let mut spawn_times = Vec::with_capacity(SPAWN_CHANGES);
    for k in 0..SPAWN_CHANGES {
        let to = if k % 2 == 0 {
            Ipv4Addr::new(11, 255, 255, 1)
        } else {
            b0[0]
        };
        let script = format!(
            "delete element ip mesh_lb backends {{ {v0} . 0 }}\nadd element ip mesh_lb backends {{ {v0} . 0 : {to} }}\n"
        );
        let ((), t) =
            timed(|| mesh_netlink::nft::apply_in(&bns.ns, &script).map_err(|e| anyhow!(e)))?;
        spawn_times.push(t);
    }

    // A restarted daemon: a new NftLb adopts the loaded table (reads it, writes nothing).
    let (lb, adopt) = timed(|| Ok(NftLb::new(Some(bns.ns.try_clone()?))?))?;
    if *lb.services() != held {
        bail!("the adopted table differs from what was loaded");
    }
    lb.remove_table()?;
    Ok((
        n,
        NftExtra {
            spawn_median: median(&spawn_times),
            adopt,
        },
    ))
}

/// Same VIPs, and for each the same set of backends (slot order aside).
fn same_sets(a: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>, b: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> bool {
    let sorted = |v: &Vec<Ipv4Addr>| {
        let mut v = v.clone();
        v.sort();
        v
    };
    a.len() == b.len()
        && a.iter()
            .all(|(vip, x)| b.get(vip).is_some_and(|y| sorted(x) == sorted(y)))
}

fn dur(d: Option<Duration>) -> String {
    match d {
        None => "–".to_string(),
        Some(d) if d < Duration::from_millis(1) => format!("{:.0} µs", d.as_secs_f64() * 1e6),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

fn goal(d: Option<Duration>, goal: Duration) -> &'static str {
    match d {
        Some(d) if d < goal => "met",
        Some(_) => "missed",
        None => "",
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(o) = parse(args)? else {
        return Ok(());
    };
    if !require_root()? {
        bail!("the lb benchmark needs root (BPF maps, network namespaces)");
    }
    let w = workload(&o);
    eprintln!(
        "lb: {} services x {} backends, {} changes",
        o.services, o.backends, o.changes
    );
    let e = ebpf(&o, &w)?;
    eprintln!("lb: eBPF done");
    let (n, extra) = nftables(&o, &w)?;

    let (s, b, k) = (o.services, o.backends, o.changes);
    let mut text =
        String::from("## Load balancing: control plane at scale, eBPF maps vs nftables\n\n");
    text.push_str(&format!(
        "Measured {} on {}, nft {}. Reproduce with `cargo run --release -p mesh-bench -- lb`. \
         {s} services (VIPs) x {b} backends, all addresses distinct. eBPF: `SockLb` maps \
         (sized for the load, programs loaded, not attached), one service = VIP:80/tcp. \
         nftables: `NftLb` in a fresh network namespace, one table with two maps (see \
         `crates/mesh-lb/src/nft.rs`). A change replaces one backend of one service ({k} \
         changes over spread services); a resync sets every service.\n\n",
        report::utc_now(),
        report::machine(),
        nft_version(),
    ));
    text.push_str("| | eBPF maps (`SockLb`) | nftables (`NftLb`) | goal |\n|---|---:|---:|---|\n");
    let row = |label: &str, a: Option<Duration>, b: Option<Duration>, g: Option<Duration>| {
        let goal_text = match g {
            Some(g) => format!(
                "< {}: eBPF {}, nft {}",
                dur(Some(g)),
                goal(a, g),
                goal(b, g)
            ),
            None => String::new(),
        };
        format!("| {label} | {} | {} | {goal_text} |\n", dur(a), dur(b))
    };
    text.push_str(&row(
        &format!("initial load, {s} x {b}"),
        e.load,
        n.load,
        None,
    ));
    text.push_str(&row(
        "one backend change, median",
        e.change_median,
        n.change_median,
        Some(CHANGE_GOAL),
    ));
    text.push_str(&row(
        "one backend change, p99",
        e.change_p99,
        n.change_p99,
        Some(CHANGE_GOAL),
    ));
    text.push_str(&row(
        "full resync, nothing changed",
        e.resync_same,
        n.resync_same,
        Some(RESYNC_GOAL),
    ));
    text.push_str(&row(
        "full resync, every service changed",
        e.resync_changed,
        n.resync_changed,
        Some(RESYNC_GOAL),
    ));
    text.push_str(&row("read everything back (`dump`)", e.dump, n.dump, None));
    if let Some(note) = &e.note {
        text.push_str(&format!("\neBPF {note}\n"));
    }
    text.push_str(&format!(
        "\nnftables details: a single change goes through the balancer's long-lived `nft -i` \
         process; the same change made by spawning `nft -f -` takes {} (median of \
         {SPAWN_CHANGES}). Resyncs and the initial load are one transaction each (`nft -f -`); \
         \"nothing changed\" is decided in memory and writes nothing. Adopting the loaded table \
         (`NftLb::new` after a restart: `nft -j list table`, parse, no write) took {}. eBPF: \
         a change is the slot diff of `set_service` (map reads of the service, then the \
         writes); a resync calls `set_service` for every service, so \"nothing changed\" \
         still reads every slot.\n",
        dur(Some(extra.spawn_median)),
        dur(Some(extra.adopt)),
    ));
    println!("{text}");
    if o.write_docs {
        report::write_section("lb", &text)?;
    }
    Ok(())
}

fn nft_version() -> String {
    std::process::Command::new("nft")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(|v| v.trim_start_matches('v').to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
