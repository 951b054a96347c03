//! The data plane outlives the control plane. With every other manager gone (no quorum, no
//! leader, none to come), a manager whose `meshd` is SIGKILLed and restarted must still
//! re-announce its tasks, which kept running, to the nodes that remain: the keys that seal
//! gossip and the tasks that run on it are in its own store. Until mesh did so, it waited
//! for both from a leader, so a restarted leader stayed out of gossip for an election (the
//! churn soak saw the other nodes drop its tasks from their VIPs meanwhile, issue 10), and
//! without quorum for good.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_netns::swarm::{running_task, swarm_cluster, task_exec, vip_of, wait_tasks_running};
use mesh_netns::{wait_for, HOSTNAME_SERVER as SERVER};

/// `python3 -c CALL ADDR`: one connection to ADDR:8080; prints what it answered.
const CALL: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],8080),timeout=2)\nc.settimeout(2)\nprint(c.recv(200).decode())";

/// Whether `vip` has a backend in `h`'s balancer.
fn has_backend(h: &mesh_netns::Host, vip: &str) -> Result<bool> {
    let ls = h.mesh_json(&["vip", "ls"])?;
    Ok(ls.as_array().is_some_and(|rows| {
        rows.iter()
            .any(|r| r["VIP"] == vip && r["Backends"].as_array().is_some_and(|b| !b.is_empty()))
    }))
}

#[test]
fn a_manager_restarted_without_quorum_keeps_its_tasks_reachable() -> Result<()> {
    let Some(c) = swarm_cluster(4, 3, "mgr-loss")? else {
        return Ok(());
    };
    let (h1, h4) = (c.host(1), c.host(4));
    h1.mesh_ok(&["network", "create", "appnet"])?;
    // The server on the first manager, the client on the worker.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h1",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "cli",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h4",
        "--",
        "sleep",
        "3600",
    ])?;
    wait_tasks_running(h1, "web", 1, Duration::from_secs(30))?;
    wait_tasks_running(h1, "cli", 1, Duration::from_secs(30))?;
    let vip = vip_of(h1, "web")?;
    let (i, cli) = running_task(&c, "cli")?;
    let cli_host = c.host(i);
    assert_eq!(cli_host.name(), h4.name());
    let call = || task_exec(h4, &cli, &["python3", "-c", CALL, &vip]);
    // web's one task answers with its hostname.
    let web = wait_for(
        "the worker's task reaches web through its VIP",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            Ok(call()
                .ok()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty()))
        },
    )
    .with_context(|| format!("h4 vip ls: {:?}", h4.mesh_ok(&["vip", "ls"]).ok()))?;

    // Quorum gone for good: the two other managers' daemons killed, then h1's.
    c.host(2).kill_daemon()?;
    c.host(3).kill_daemon()?;
    h1.kill_daemon()?;
    // The worker's gossip declares h1 down and drops web from its balancer.
    wait_for(
        "h4 drops the tasks of h1 it can no longer hear",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || Ok((!has_backend(h4, &vip)?).then_some(())),
    )?;
    // h1 restarted: no leader will ever answer it, and its store has what it needs.
    h1.restart_daemon()?;
    wait_for(
        "h4 reaches web again once h1 is back",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || Ok(call().ok().filter(|o| o.trim() == web).map(|_| ())),
    )
    .with_context(|| {
        format!(
            "h4 vip ls: {:?}\nh1 log:\n{}",
            h4.mesh_ok(&["vip", "ls"]).ok(),
            h1.log_tail()
        )
    })?;
    // Still no leader: the call above was made with the control plane down.
    let ls = h1.mesh(&["node", "ls"])?;
    assert!(
        !ls.success(),
        "h1 has a leader without quorum: {}",
        ls.stdout
    );
    Ok(())
}
