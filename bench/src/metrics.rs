//! `metrics`: what a scrape of the leader's `/metrics` costs with 1,000 services, in process
//! (no cluster, no root needed).
//!
//! The store holds 100 nodes and 1,000 replicated services of 3 running tasks each, plus 2
//! ended tasks per service (task history): 5,000 tasks. Timed with [`Instant`], `--repeat`
//! times (default 200), after a few warm-up runs:
//!
//! 1. the summary: `ClusterSummary::of` (what the leader computes under its store's read
//!    lock: nodes by state and role, tasks by state, each service's desired and running
//!    replicas, in one pass over the tasks);
//! 2. the whole scrape body: the summary plus the Raft figures encoded with the control
//!    plane's instruments, the DNS, gossip, data-plane and image metrics (an empty meshd
//!    registry's worth, registered as meshd registers them) into OpenMetrics text.
//!
//! For scale, the same per-service counts made the way `service ls` makes them
//! (`services::replica_counts`, a pass over every task per service) are timed once per run
//! too: the reason the summary makes one pass.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use mesh_api::{
    Availability, Node, NodeRole, NodeState, Service, ServiceMode, ServiceSpec, Task, TaskState,
    TaskStatus,
};
use mesh_manager::metrics::{ClusterSummary, Metrics, RaftFigures, Snapshot};
use mesh_manager::state::StoreState;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::registry::Registry;

use crate::{report, stats};

/// One line for `mesh-bench --help`.
pub const ABOUT: &str = "the cost of a leader's /metrics scrape with 1,000 services, in process";

const USAGE: &str = "usage: mesh-bench metrics [--repeat N]

  --repeat N    timed runs; median and p99 are reported (default 200)";

const COMMAND: &str = "cargo xtask bench metrics";
const NODES: usize = 100;
const SERVICES: usize = 1_000;
const REPLICAS: usize = 3;
const HISTORY: usize = 2;

fn node(i: usize) -> Node {
    Node {
        id: format!("node{i:04}"),
        hostname: format!("host{i}"),
        role: if i < 3 {
            NodeRole::Manager
        } else {
            NodeRole::Worker
        },
        availability: Availability::Active,
        state: if i % 50 == 49 {
            NodeState::Down
        } else {
            NodeState::Ready
        },
        addr: String::new(),
        raft_id: i as u64,
        labels: Default::default(),
        resources: Default::default(),
        ingress_addr: None,
        created_at: 0,
        updated_at: 0,
    }
}

fn task(id: String, svc: &Service, slot: u64, node: usize, running: bool) -> Task {
    Task {
        id,
        service_id: svc.id.clone(),
        service_name: svc.spec.name.clone(),
        slot,
        node_id: format!("node{node:04}"),
        version: 1,
        spec: ServiceSpec::default(),
        desired_state: if running {
            TaskState::Running
        } else {
            TaskState::Shutdown
        },
        status: TaskStatus {
            state: if running {
                TaskState::Running
            } else {
                TaskState::Shutdown
            },
            timestamp_ms: 0,
            message: String::new(),
            err: String::new(),
            exit_code: None,
        },
        created_at: 0,
        networks: Vec::new(),
    }
}

/// The store of the module docs.
fn store() -> StoreState {
    let mut s = StoreState::default();
    for i in 0..NODES {
        let n = node(i);
        s.nodes.insert(n.id.clone(), n);
    }
    for i in 0..SERVICES {
        let svc = Service {
            id: format!("svc{i:05}"),
            spec: ServiceSpec {
                name: format!("service-{i}"),
                mode: ServiceMode::Replicated {
                    replicas: REPLICAS as u64,
                },
                ..Default::default()
            },
            previous_spec: None,
            version: 1,
            created_at: 0,
            updated_at: 0,
            update_status: None,
            vips: Vec::new(),
            registry_auth: Vec::new(),
        };
        for k in 0..REPLICAS + HISTORY {
            let running = k < REPLICAS;
            let t = task(
                format!("task{i:05}x{k}"),
                &svc,
                (k % REPLICAS) as u64 + 1,
                (i + k) % NODES,
                running,
            );
            s.tasks.insert(t.id.clone(), t);
        }
        s.services.insert(svc.id.clone(), svc);
    }
    s
}

/// meshd's registry with nothing observed yet (its instruments, as meshd registers them).
fn static_registry() -> Registry {
    let mut r = Registry::with_prefix("mesh");
    Metrics::default().register(&mut r);
    mesh_dns::Dns::new(Vec::new()).register_metrics(&mut r);
    r
}

fn scrape(registry: &Registry, state: &StoreState) -> Result<String> {
    let snap = Snapshot {
        raft: Some(RaftFigures {
            term: 7,
            is_leader: true,
            last_log_index: 123_456,
            applied_index: 123_456,
            snapshot_index: 120_000,
            log_entries: 3_456,
            voters: 3,
        }),
        cluster: Some(ClusterSummary::of(state)),
    };
    let mut now = Registry::with_prefix("mesh");
    now.register_collector(Box::new(snap));
    let mut out = String::with_capacity(32 << 10);
    encode_registry(&mut out, registry)?;
    encode_registry(&mut out, &now)?;
    encode_eof(&mut out)?;
    Ok(out)
}

fn parse(args: &[String]) -> Result<Option<usize>> {
    let mut repeat = 200;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--repeat" => {
                repeat = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--repeat takes a positive number"))?;
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(Some(repeat))
}

/// Runs the benchmark; returns its markdown report (empty after `--help`).
pub fn run(args: &[String]) -> Result<String> {
    let Some(repeat) = parse(args)? else {
        println!("{USAGE}");
        return Ok(String::new());
    };
    let date = report::utc_now();
    let state = store();
    let registry = static_registry();
    let body = scrape(&registry, &state)?;
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    ensure!(
        body.contains("mesh_service_replicas_running{service=\"service-999\"} 3"),
        "the scrape lacks a service's replicas"
    );
    for _ in 0..10 {
        std::hint::black_box(scrape(&registry, &state)?);
    }
    let mut summary = Vec::with_capacity(repeat);
    let mut whole = Vec::with_capacity(repeat);
    let mut naive = Vec::with_capacity(repeat.min(20));
    for i in 0..repeat {
        let t = Instant::now();
        std::hint::black_box(ClusterSummary::of(&state));
        summary.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(scrape(&registry, &state)?);
        whole.push(t.elapsed());
        if i < 20 {
            let t = Instant::now();
            for svc in state.services.values() {
                std::hint::black_box(mesh_manager::services::replica_counts(&state, svc));
            }
            naive.push(t.elapsed());
        }
    }
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let row = |what: &str, s: &[Duration]| {
        let (min, max) = stats::min_max(s);
        format!(
            "| {what} | {} | {} | {} – {} |\n",
            us(stats::median(s)),
            us(stats::percentile(s, 99.0)),
            us(min),
            us(max)
        )
    };
    let mut out = String::new();
    out.push_str("## Metrics: a leader's scrape with 1,000 services\n\n");
    out.push_str(&format!(
        "{date}, {}, `{COMMAND}`. In process: a store of {NODES} nodes and {SERVICES} replicated services of {REPLICAS} running tasks each plus {HISTORY} ended ones ({} tasks); {repeat} timed runs after 10 warm-up ones. The scrape body is {} bytes, {series} samples (2 per service for the replica gauges).\n\n",
        report::machine(),
        state.tasks.len(),
        body.len(),
    ));
    out.push_str("| step | median | p99 | min – max |\n|---|---:|---:|---:|\n");
    out.push_str(&row(
        "summary of the store (`ClusterSummary::of`, under the store's read lock)",
        &summary,
    ));
    out.push_str(&row(
        "whole scrape body (summary + encoding of every metric)",
        &whole,
    ));
    out.push_str(&row(
        "for scale: `replica_counts` per service, as `service ls` counts (20 runs)",
        &naive,
    ));
    out.push_str("\nThe summary makes one pass over the tasks; counting per service as `service ls` does passes over every task once per service. The HTTP exchange and the Raft figures (read from openraft's metrics channel) add little to this; the store's read lock is held only for the summary.\n");
    Ok(out)
}
