//! `scheduler`: the manager's scheduler (`mesh-scheduler`) on 1,000 simulated nodes, in
//! process (no cluster, no root needed).
//!
//! The nodes are all `Ready` and `Active`, with 8 CPUs and 16 GiB each and varied labels
//! (`zone` a/b/c, so `zone==a` matches a third of them; `rack`, `disk`); a few are managers.
//! Every task has limits (0.05 CPU, 64 MiB), so the resource filter and the reservation sums
//! are exercised on every placement. Three workloads, each timed `--repeat` times (default 5)
//! with [`Instant`], from building the [`Scheduler`] out of the nodes to the last placement:
//!
//! 1. 10,000 tasks of one service;
//! 2. 100,000 tasks: 100 services of 1,000 tasks each, one `place` call per service, on the
//!    same scheduler (later services see the earlier ones' tasks);
//! 3. 10,000 tasks of one service constrained to `node.labels.zone==a`.
//!
//! Each run is checked outside the timed part: every task placed, on an eligible node, and
//! each service spread evenly (per-node counts differing by at most 1). The medians are
//! compared with swarmkit's scheduler benchmark (docker/swarmkit PR #193): 1.8 s for 10,000
//! tasks and 22.6 s for 100,000 tasks on 1,000 nodes. That benchmark went through swarmkit's
//! in-memory store and event loop, so the comparison is of the scheduling work as each project
//! runs it, not of identical code paths.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_api::{Availability, Node, NodeRole, NodeState, Resources};
use mesh_scheduler::{parse_constraint, Constraint, Scheduler};

use crate::report;

/// One line for `mesh-bench --help`.
pub const ABOUT: &str = "10k and 100k tasks on 1,000 simulated nodes, in process (vs swarmkit)";

const USAGE: &str = "usage: mesh-bench scheduler [--repeat N]

  --repeat N    timed runs per workload; the median is reported (default 5)";

/// The reproducing command, as documented.
const COMMAND: &str = "cargo xtask bench scheduler";
/// Simulated nodes.
const NODES: usize = 1_000;
/// Managers among them (the first ones).
const MANAGERS: usize = 5;
/// Node capacity: 8 CPUs, 16 GiB.
const NODE_CAPACITY: Resources = Resources {
    nano_cpus: 8_000_000_000,
    memory_bytes: 16 << 30,
};
/// Every task's limits: 0.05 CPU, 64 MiB (100 per node fit: 5 CPUs, 6.25 GiB).
const TASK_LIMITS: Resources = Resources {
    nano_cpus: 50_000_000,
    memory_bytes: 64 << 20,
};
/// swarmkit PR #193: 10,000 tasks on 1,000 nodes.
const SWARMKIT_10K: Duration = Duration::from_millis(1_800);
/// swarmkit PR #193: 100,000 tasks on 1,000 nodes.
const SWARMKIT_100K: Duration = Duration::from_millis(22_600);

/// Command-line options.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Opts {
    repeat: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { repeat: 5 }
    }
}

impl Opts {
    /// Parses the arguments after `scheduler`; `None` means `--help`.
    fn parse(args: &[String]) -> Result<Option<Opts>> {
        let mut o = Opts::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            match flag {
                "--repeat" => {
                    let v = match inline {
                        Some(v) => v,
                        None => it
                            .next()
                            .with_context(|| format!("--repeat needs a value\n{USAGE}"))?
                            .clone(),
                    };
                    let n: usize = v
                        .parse()
                        .with_context(|| format!("--repeat: not a number: {v:?}\n{USAGE}"))?;
                    ensure!(n > 0, "--repeat must be at least 1\n{USAGE}");
                    o.repeat = n;
                }
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown argument {arg:?}\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }

    fn command(&self) -> String {
        if self.repeat == Opts::default().repeat {
            COMMAND.to_string()
        } else {
            format!("{COMMAND} --repeat {}", self.repeat)
        }
    }
}

/// One workload: `services` services of `per_service` tasks each, with these constraints.
struct Workload {
    name: &'static str,
    services: usize,
    per_service: usize,
    constraints: Vec<Constraint>,
    /// swarmkit's time for the same number of tasks, if it published one.
    swarmkit: Option<Duration>,
}

impl Workload {
    fn tasks(&self) -> usize {
        self.services * self.per_service
    }
}

/// What the timed runs of one workload gave.
struct Measured {
    samples: Vec<Duration>,
    /// Nodes the tasks could go to.
    eligible: usize,
}

/// Runs the benchmark with the arguments after `scheduler` and returns its markdown section
/// (the usage text for `--help`).
pub fn run(args: &[String]) -> Result<String> {
    let Some(opts) = Opts::parse(args)? else {
        return Ok(USAGE.to_string());
    };
    let date = report::utc_now();
    let nodes = simulated_nodes();
    let zone_a = vec![parse_constraint("node.labels.zone==a")?];
    let workloads = [
        Workload {
            name: "10,000 tasks, 1 service",
            services: 1,
            per_service: 10_000,
            constraints: vec![],
            swarmkit: Some(SWARMKIT_10K),
        },
        Workload {
            name: "100,000 tasks, 100 services × 1,000",
            services: 100,
            per_service: 1_000,
            constraints: vec![],
            swarmkit: Some(SWARMKIT_100K),
        },
        Workload {
            name: "10,000 tasks, 1 service, `node.labels.zone==a`",
            services: 1,
            per_service: 10_000,
            constraints: zone_a,
            swarmkit: None,
        },
    ];
    let mut results = Vec::new();
    for w in &workloads {
        let m = measure(&nodes, w, opts.repeat).with_context(|| format!("workload {}", w.name))?;
        eprintln!(
            "scheduler: {}: median {} over {} runs ({} eligible nodes)",
            w.name,
            ms(median(&m.samples)),
            m.samples.len(),
            m.eligible
        );
        results.push(m);
    }
    Ok(render(
        &opts,
        &date,
        &report::machine(),
        &workloads,
        &results,
    ))
}

/// 1,000 nodes with 25-character base36 IDs (as Swarm's), `Ready`, `Active`, 8 CPUs / 16 GiB,
/// labels `zone` (a, b, c in turn), `rack` (r00..r19) and `disk` (ssd on every other node).
fn simulated_nodes() -> Vec<Node> {
    (0..NODES)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), ["a", "b", "c"][i % 3].to_string());
            labels.insert("rack".to_string(), format!("r{:02}", i % 20));
            labels.insert(
                "disk".to_string(),
                if i % 2 == 0 { "ssd" } else { "hdd" }.to_string(),
            );
            Node {
                id: node_id(i as u64),
                hostname: format!("node-{i:04}"),
                role: if i < MANAGERS {
                    NodeRole::Manager
                } else {
                    NodeRole::Worker
                },
                availability: Availability::Active,
                state: NodeState::Ready,
                addr: format!("10.{}.{}.{}:2377", i / 65_536, (i / 256) % 256, i % 256),
                raft_id: if i < MANAGERS { i as u64 + 1 } else { 0 },
                labels,
                resources: NODE_CAPACITY,
                ingress_addr: None,
                created_at: 1,
                updated_at: 1,
            }
        })
        .collect()
}

/// A 25-character base36 ID derived from `n` (splitmix64), so that ID order is not index order.
fn node_id(n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut x = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut out = String::with_capacity(25);
    while out.len() < 25 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        for _ in 0..12 {
            if out.len() == 25 {
                break;
            }
            out.push(DIGITS[(z % 36) as usize] as char);
            z /= 36;
        }
    }
    out
}

/// Times `repeat` runs of a workload, each on a fresh scheduler, and checks every run.
fn measure(nodes: &[Node], w: &Workload, repeat: usize) -> Result<Measured> {
    let service_ids: Vec<String> = (0..w.services).map(|i| format!("service-{i:03}")).collect();
    let eligible: Vec<&Node> = nodes
        .iter()
        .filter(|n| w.constraints.iter().all(|c| c.matches(n)))
        .collect();
    ensure!(!eligible.is_empty(), "no node matches the constraints");
    let mut samples = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        let mut s = Scheduler::new(nodes, []);
        let placed: Vec<Vec<Result<String, String>>> = service_ids
            .iter()
            .map(|id| s.place(id, &w.constraints, &TASK_LIMITS, w.per_service))
            .collect();
        samples.push(start.elapsed());
        check(&eligible, w, &placed)?;
    }
    Ok(Measured {
        samples,
        eligible: eligible.len(),
    })
}

/// Every task placed on an eligible node, each service spread within one task per node.
fn check(eligible: &[&Node], w: &Workload, placed: &[Vec<Result<String, String>>]) -> Result<()> {
    ensure!(
        placed.len() == w.services,
        "{} services placed",
        placed.len()
    );
    for (i, tasks) in placed.iter().enumerate() {
        ensure!(
            tasks.len() == w.per_service,
            "service {i}: {} results",
            tasks.len()
        );
        let mut counts: HashMap<&str, usize> =
            eligible.iter().map(|n| (n.id.as_str(), 0)).collect();
        for t in tasks {
            let id = match t {
                Ok(id) => id,
                Err(e) => bail!("service {i}: a task was not placed: {e}"),
            };
            match counts.get_mut(id.as_str()) {
                Some(c) => *c += 1,
                None => bail!("service {i}: a task went to ineligible node {id}"),
            }
        }
        let min = counts.values().min().copied().unwrap_or(0);
        let max = counts.values().max().copied().unwrap_or(0);
        ensure!(
            max - min <= 1,
            "service {i}: uneven spread ({min} to {max} tasks per node)"
        );
    }
    Ok(())
}

/// The median (mean of the two middle values for an even count); zero if empty.
fn median(samples: &[Duration]) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// `12.3 ms`.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The markdown section.
fn render(
    opts: &Opts,
    date: &str,
    machine: &str,
    workloads: &[Workload],
    results: &[Measured],
) -> String {
    let mut s = String::new();
    s.push_str("## Scheduler\n\n");
    s.push_str(&format!(
        "{date}, {machine}, `{}`. In process: 1,000 simulated nodes (Ready, Active, 8 CPUs / \
         16 GiB, labels `zone` a/b/c, `rack`, `disk`), every task limited to 0.05 CPU / 64 MiB. \
         Each time covers building the `Scheduler` from the nodes and placing every task \
         (filters, then spread by service count, total count and node ID); median of {} runs. \
         Every run was checked: all tasks placed on eligible nodes, each service spread within \
         one task per node.\n\n",
        opts.command(),
        opts.repeat
    ));
    s.push_str("| Workload | Eligible nodes | Median | Min – max | Per task | swarmkit (PR #193) | Faster by |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (w, m) in workloads.iter().zip(results) {
        let med = median(&m.samples);
        let min = m.samples.iter().min().copied().unwrap_or_default();
        let max = m.samples.iter().max().copied().unwrap_or_default();
        let per_task = med.as_secs_f64() * 1e9 / w.tasks() as f64;
        let (theirs, ratio) = match w.swarmkit {
            Some(t) => (
                format!("{:.1} s", t.as_secs_f64()),
                format!("{:.0}×", t.as_secs_f64() / med.as_secs_f64().max(1e-9)),
            ),
            None => ("–".to_string(), "–".to_string()),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} – {} | {:.0} ns | {theirs} | {ratio} |\n",
            w.name,
            m.eligible,
            ms(med),
            ms(min),
            ms(max),
            per_task
        ));
    }
    s.push_str(
        "\nswarmkit's numbers are its scheduler benchmark's (docker/swarmkit PR #193, 1,000 \
         nodes), which also went through its in-memory store and event loop; the goal was ten \
         times faster. Ours exclude the Raft write that would record the placements.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Opts::parse(&a(&[])).unwrap(), Some(Opts::default()));
        assert_eq!(
            Opts::parse(&a(&["--repeat", "3"])).unwrap(),
            Some(Opts { repeat: 3 })
        );
        assert_eq!(
            Opts::parse(&a(&["--repeat=2"])).unwrap(),
            Some(Opts { repeat: 2 })
        );
        assert_eq!(Opts::parse(&a(&["--help"])).unwrap(), None);
        assert!(Opts::parse(&a(&["--repeat", "0"])).is_err());
        assert!(Opts::parse(&a(&["--nope"])).is_err());
        assert_eq!(
            Opts { repeat: 3 }.command(),
            "cargo xtask bench scheduler --repeat 3"
        );
    }

    #[test]
    fn simulated_nodes_are_distinct_and_a_third_in_zone_a() {
        let nodes = simulated_nodes();
        let ids: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.len(), NODES);
        assert!(ids.iter().all(|id| id.len() == 25));
        let c = parse_constraint("node.labels.zone==a").unwrap();
        assert_eq!(
            nodes.iter().filter(|n| c.matches(n)).count(),
            NODES.div_ceil(3)
        );
    }

    #[test]
    fn a_small_run_checks_out() {
        let nodes = simulated_nodes();
        let w = Workload {
            name: "small",
            services: 3,
            per_service: 2_500,
            constraints: vec![parse_constraint("node.labels.zone==b").unwrap()],
            swarmkit: None,
        };
        let m = measure(&nodes, &w, 1).unwrap();
        assert_eq!(m.samples.len(), 1);
        assert_eq!(m.eligible, 333);
    }
}
