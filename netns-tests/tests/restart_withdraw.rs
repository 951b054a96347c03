//! A restarted manager's daemon first announces the tasks its own store runs on it
//! (`Agent::seed_plane`), until the leader answers. A task the leader stopped meanwhile is
//! then withdrawn, and its endpoint must leave every node's DNS and VIPs, also when the
//! withdrawal comes before the daemon's gossip has synced the task's network (the network is
//! then kept joined only because the previous run had announced on it).
//!
//! The churn soak (`cargo xtask soak --seed 20261205 --lb-backend nftables`) found that
//! window: the withdrawal was skipped for a network the plane no longer listed, the record
//! stayed live under the daemon's new generation, another task joined the network a second
//! later, and every node kept calling a stopped task's address for a minute (until the
//! daemon restarted again). Here the window is held open on purpose: the restarted node's
//! control port is blocked (the leader cannot answer, so the store's seed is applied), and
//! its gossip port too (the network cannot sync); the control port is opened (the task is
//! withdrawn), another task joins the network, and gossip is opened last.
//!
//! A task a restarted daemon finds running but no longer assigned is drained before it is
//! stopped: withdrawn from every node's views, it still answers the calls in flight. The
//! soak found its network taken from under it at once (the daemon's first pass removed the
//! network's namespace, which had no task it counted), so calls in flight to it timed out.
//! Its network now stays until it exits.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::swarm::{
    dns_tasks, field, network_tasks, overlay_pid, service_ps, sleep_pids, swarm_cluster, vni_of,
    wait_tasks_running,
};
use mesh_netns::{wait_for, Host};

/// The test's own nftables table in the restarted node's namespace.
const BLOCK_TABLE: &str = "mesh_test_block";

/// Drops the host's control (2377/tcp, if `control`) and gossip (7946, UDP and TCP) traffic both
/// ways, in a table of the test's own (replaced on each call).
fn block(h: &Host, control: bool) -> Result<()> {
    let _ = h.exec(&["nft", "delete", "table", "inet", BLOCK_TABLE])?;
    let mut script = format!(
        "add table inet {BLOCK_TABLE}\n\
         add chain inet {BLOCK_TABLE} in {{ type filter hook input priority -10; }}\n\
         add chain inet {BLOCK_TABLE} out {{ type filter hook output priority -10; }}\n\
         add rule inet {BLOCK_TABLE} in meta l4proto {{ tcp, udp }} th dport 7946 drop\n\
         add rule inet {BLOCK_TABLE} out meta l4proto {{ tcp, udp }} th dport 7946 drop\n"
    );
    if control {
        script.push_str(&format!(
            "add rule inet {BLOCK_TABLE} in tcp dport 2377 drop\n\
             add rule inet {BLOCK_TABLE} out tcp dport 2377 drop\n"
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "mesh-test-block-{}-{}.nft",
        std::process::id(),
        h.name()
    ));
    std::fs::write(&path, script)?;
    let out = h.exec(&["nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    let out = out?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn unblock(h: &Host) -> Result<()> {
    let out = h.exec(&["nft", "delete", "table", "inet", BLOCK_TABLE])?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until `h`'s embedded DNS lists (or, if not `listed`, no longer lists) `ip` for
/// `tasks.SVC` on appnet.
fn wait_answer(h: &Host, svc: &str, ip: &str, listed: bool, within: Duration) -> Result<()> {
    let what = if listed { "lists" } else { "no longer lists" };
    wait_for(
        &format!("{}'s DNS {what} {ip} for tasks.{svc}", h.name()),
        within,
        Duration::from_millis(100),
        || Ok((dns_tasks(h, "appnet", svc)?.contains(ip) == listed).then_some(())),
    )
}

/// The address on appnet of `svc`'s first task.
fn task_ip(h: &Host, svc: &str) -> Result<String> {
    network_tasks(h, "appnet", Some(svc))?
        .first()
        .map(|t| t.ip.clone())
        .ok_or_else(|| anyhow::anyhow!("no address for {svc}'s task"))
}

#[test]
fn a_task_withdrawn_before_its_network_synced_leaves_every_node() -> Result<()> {
    let Some(c) = swarm_cluster(3, 3, "rswithdraw")? else {
        return Ok(());
    };
    let (h1, h3) = (c.host(1), c.host(3));
    h1.mesh_ok(&["network", "create", "-d", "overlay", "appnet"])?;
    let on_h3 = "node.hostname==h3";
    // The other nodes' view is asked of their embedded DNS, which serves their own tasks.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "probe",
        "--mode",
        "global",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname!=h3",
        "--",
        "sleep",
        "7300",
    ])?;
    wait_tasks_running(h1, "probe", 2, Duration::from_secs(30))?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "gone",
        "--network",
        "appnet",
        "--constraint",
        on_h3,
        "--",
        "sleep",
        "7301",
    ])?;
    wait_tasks_running(h1, "gone", 1, Duration::from_secs(30))?;
    let ip = task_ip(h1, "gone")?;
    wait_answer(h1, "gone", &ip, true, Duration::from_secs(20))?;

    // h3 goes away; the service is scaled to 0 while it is gone: h3's store still runs it.
    h3.kill_daemon()?;
    h1.mesh_ok(&["service", "scale", "gone=0"])?;
    block(h3, true)?;
    h3.start_daemon()?;
    // No leader's answer: the plane announces what h3's own store runs there.
    wait_answer(h3, "gone", &ip, true, Duration::from_secs(20))?;
    // The leader answers; its task is withdrawn and stopped. Gossip is still blocked: the
    // network is not synced, and is kept joined only for the previous run's records.
    block(h3, false)?;
    wait_for(
        "h3 withdrawing the task the leader stopped",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let ps = service_ps(h1, "gone")?;
            Ok(ps
                .iter()
                .all(|t| !field(t, "CurrentState").starts_with("Running"))
                .then_some(()))
        },
    )?;
    // Another task joins the network on h3, before gossip comes back.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "late",
        "--network",
        "appnet",
        "--constraint",
        on_h3,
        "--",
        "sleep",
        "7302",
    ])?;
    wait_tasks_running(h1, "late", 1, Duration::from_secs(30))?;
    unblock(h3)?;
    let late_ip = task_ip(h1, "late")?;
    wait_answer(h1, "late", &late_ip, true, Duration::from_secs(30))?;
    // The stopped task is in no node's answers (past the grace for a restarted node's
    // previous records, `RESTART_GRACE`, 5 s).
    for h in [h1, c.host(2), h3] {
        wait_answer(h, "gone", &ip, false, Duration::from_secs(10))?;
        let vips = h.mesh_json(&["vip", "ls"])?;
        let gone_backends: Vec<String> = vips
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|r| r["Service"] == "gone")
            .flat_map(|r| r["Backends"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect();
        ensure!(
            !gone_backends.contains(&ip),
            "{} still balances gone's VIP to the stopped task {ip}: {vips}",
            h.name()
        );
    }
    Ok(())
}

/// The IPv4 addresses on `eth0` in the network namespace of process `pid`.
fn eth0_addrs(pid: u32) -> Result<String> {
    let out = std::process::Command::new("nsenter")
        .args([
            &format!("--net=/proc/{pid}/ns/net"),
            "ip",
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn an_adopted_task_keeps_its_network_while_it_drains() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "rsdrain")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    h1.mesh_ok(&["network", "create", "-d", "overlay", "appnet"])?;
    // It ignores SIGTERM (as its `sleep`, which inherits that): it lives through the stop's
    // grace period, until SIGKILL.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "drainer",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h2",
        "--",
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 7403; done",
    ])?;
    wait_tasks_running(h1, "drainer", 1, Duration::from_secs(30))?;
    let ip = task_ip(h1, "drainer")?;
    let vni = vni_of(h1, "appnet")?;
    let pid = wait_for(
        "the task's process",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok(sleep_pids(7403).first().copied()),
    )?;
    ensure!(
        eth0_addrs(pid)?.contains(&format!("{ip}/")),
        "no {ip} on eth0"
    );

    // Scaled to 0 while h2's daemon is away: the restarted daemon finds the task running,
    // no longer assigned, and drains it before stopping it.
    h2.kill_daemon()?;
    h1.mesh_ok(&["service", "scale", "drainer=0"])?;
    h2.start_daemon()?;
    // Another task starts on h2 meanwhile: a pass of h2's plane that counts only it.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "other",
        "--constraint",
        "node.hostname==h2",
        "--",
        "sleep",
        "7404",
    ])?;
    let until = std::time::Instant::now() + Duration::from_millis(3000);
    let mut checks = 0;
    while std::time::Instant::now() < until
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        let addrs = eth0_addrs(pid)?;
        ensure!(
            addrs.contains(&format!("{ip}/")),
            "the draining task lost its network after {checks} checks (eth0: {addrs:?}; \
             overlay namespace {:?})",
            overlay_pid(h2, vni)
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(checks > 10, "the task exited at once ({checks} checks)");
    // Once it has exited, the network's namespace goes (h2 has no other task on it).
    wait_for(
        "the task stopped",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())),
    )?;
    wait_for(
        "h2's overlay namespace released",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok(overlay_pid(h2, vni).is_none().then_some(())),
    )?;
    Ok(())
}
