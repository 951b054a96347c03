//! `services`: how fast the control plane turns a service into running processes on the
//! 3-host netns cluster (one manager, two workers): `service create` of 30 replicas until all
//! 30 report RUNNING (and 30 processes exist), then `scale` to 0 until no process is left.
//! Every step goes through the real path: API socket, Raft commit, orchestrator, scheduler,
//! dispatcher long poll, agent, executor shim, and the status reports back.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use mesh_api::{Request, ServiceMode, ServiceSpec};
use mesh_netns::swarm::{form_swarm, sleep_pids};
use mesh_netns::{require_root, Cluster, ClusterOpts};
use serde_json::Value;

use crate::api::Client;
use crate::report;
use crate::stats::{median, min_max, secs};

pub const ABOUT: &str =
    "service create of 30 replicas until all RUNNING, and scale to 0, on 3 hosts";
const REPLICAS: u64 = 30;
const ROUNDS: usize = 5;
const BOUND: Duration = Duration::from_secs(120);

fn count_procs(secs: u32) -> usize {
    sleep_pids(secs).len()
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
        ensure!(t0.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t0.elapsed())
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: mesh-bench services [--no-write-docs]\n\n{ABOUT}");
        return Ok(());
    }
    if !require_root()? {
        anyhow::bail!("the services benchmark needs root (network namespaces)");
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: true,
        name_hint: "bench-services",
    })?;
    form_swarm(&c, 1)?;
    let mut api = Client::connect(&c.host(1).socket(), Duration::from_secs(30))?;
    let (mut up, mut procs_up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let name = format!("bench{round}");
        let secs_marker = 86_600 + round as u32;
        let spec = ServiceSpec {
            name: name.clone(),
            mode: ServiceMode::Replicated { replicas: REPLICAS },
            command: vec!["sleep".into(), secs_marker.to_string()],
            env: vec![],
            networks: vec![],
            ports: vec![],
            endpoint_mode: Default::default(),
            constraints: vec![],
            restart: Default::default(),
            update: Default::default(),
            rollback: Default::default(),
            resources: Default::default(),
            labels: Default::default(),
            ..Default::default()
        };
        let t0 = Instant::now();
        call(
            &mut api,
            &Request::ServiceCreate {
                spec,
                registry_auth: None,
            },
        )?;
        let mut all_procs = None;
        wait("30 running", || {
            if all_procs.is_none() && count_procs(secs_marker) == REPLICAS as usize {
                all_procs = Some(t0.elapsed());
            }
            Ok(running(&mut api, &name)? == REPLICAS)
        })?;
        up.push(t0.elapsed());
        wait("30 processes", || {
            Ok(count_procs(secs_marker) == REPLICAS as usize)
        })?;
        procs_up.push(all_procs.unwrap_or_else(|| t0.elapsed()));
        let t0 = Instant::now();
        call(
            &mut api,
            &Request::ServiceScale {
                service: name.clone(),
                replicas: 0,
            },
        )?;
        wait("0 processes", || {
            Ok(count_procs(secs_marker) == 0 && running(&mut api, &name)? == 0)
        })?;
        down.push(t0.elapsed());
        call(
            &mut api,
            &Request::ServiceRm {
                service: name.clone(),
            },
        )?;
        eprintln!(
            "round {round}: up {:?} (processes {:?}), down {:?}",
            up[round], procs_up[round], down[round]
        );
    }
    let row = |label: &str, v: &[Duration]| {
        let (lo, hi) = min_max(v);
        format!(
            "| {label} | {} | {} | {} |\n",
            secs(median(v)),
            secs(lo),
            secs(hi)
        )
    };
    let mut text = String::from("## Services: from `service create` to running processes\n\n");
    text.push_str(&format!(
        "Measured {} on {}. Reproduce with `cargo xtask bench services`. A 3-host netns cluster (1 manager, 2 workers); each round creates a service of {REPLICAS} replicas (`sleep`) through the API socket, waits until `service ls` shows {REPLICAS}/{REPLICAS} running and {REPLICAS} real processes exist, then scales it to 0 and waits until no process is left. {ROUNDS} rounds.\n\n",
        report::utc_now(),
        report::machine()
    ));
    text.push_str("| step | median | min | max |\n|---|---:|---:|---:|\n");
    text.push_str(&row(
        &format!("create -> {REPLICAS} processes exist"),
        &procs_up,
    ));
    text.push_str(&row(
        &format!("create -> {REPLICAS}/{REPLICAS} RUNNING in the store"),
        &up,
    ));
    text.push_str(&row(
        &format!("scale {REPLICAS} -> 0 until no process is left"),
        &down,
    ));
    text.push_str("\nThe path: Raft commit of the service, orchestrator and scheduler pass (one batch), the agents' long polls wake, each agent starts its tasks through a shim, and the RUNNING reports are committed back through Raft. Docker publishes no comparable number.\n");
    println!("{text}");
    if !args.iter().any(|a| a == "--no-write-docs") {
        report::write_section("services", &text)?;
    }
    Ok(())
}
