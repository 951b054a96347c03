//! What `mesh swarm update` changes, seen in what the cluster does (2 hosts: a manager and a
//! worker that joins after the update):
//!
//! - `--task-history-limit`: a failing task's slot keeps no more ended tasks than the limit,
//!   and a larger limit lets the history grow again;
//! - `--cert-expiry`: a node that joins afterwards gets a certificate of that validity;
//! - `--dispatcher-heartbeat`: a silent node is Down only after four of the new periods.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use mesh_netns::swarm::{field, join_swarm, node_ls, service_ps};
use mesh_netns::{wait_for, Cluster, ClusterOpts};

/// The most rows `service ps flap` showed, and the task IDs seen, over `secs` seconds.
fn watch_history(c: &Cluster, secs: u64) -> Result<(usize, BTreeSet<String>)> {
    let h1 = c.host(1);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut most, mut ids) = (0, BTreeSet::new());
    while Instant::now() < end {
        let rows = service_ps(h1, "flap")?;
        most = most.max(rows.len());
        ids.extend(rows.iter().map(|r| field(r, "ID").to_string()));
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok((most, ids))
}

#[test]
fn swarm_update_settings_change_what_the_cluster_does() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 2,
        start_daemons: true,
        name_hint: "swset",
    })?;
    let (h1, h2) = (c.host(1), c.host(2));
    h1.mesh_ok(&["swarm", "init", "--advertise-addr", &h1.addr().to_string()])?;

    // A certificate issued after `--cert-expiry 2h` lasts 2 h, not 90 days.
    h1.mesh_ok(&["swarm", "update", "--cert-expiry", "2h"])?;
    join_swarm(&c, 1)?;
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h2.data_dir().join("node.json"))?)?;
    let pem = c.base_dir().join("h2-cert.pem");
    std::fs::write(&pem, local["cert_pem"].as_str().unwrap_or_default())?;
    let checkend = |secs: u64| -> Result<bool> {
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
            .arg(&pem)
            .output()?;
        Ok(out.status.success())
    };
    ensure!(
        checkend(3600)?,
        "the joined node's certificate expires within 1 h"
    );
    ensure!(
        !checkend(3 * 3600)?,
        "the joined node's certificate outlives 3 h: --cert-expiry 2h was not used"
    );

    // A task that keeps failing: its slot's history stays within the limit.
    h1.mesh_ok(&["swarm", "update", "--task-history-limit", "2"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "flap",
        "--restart-delay",
        "100ms",
        "--constraint",
        "node.role==manager",
        "-d",
        "--",
        "false",
    ])?;
    let (most, ids) = watch_history(&c, 8)?;
    ensure!(ids.len() > 4, "the task was not restarted enough: {ids:?}");
    ensure!(
        most <= 2,
        "{most} rows in the slot with --task-history-limit 2"
    );
    h1.mesh_ok(&["swarm", "update", "--task-history-limit", "4"])?;
    let (most, _) = watch_history(&c, 8)?;
    ensure!(
        most > 2,
        "the history did not grow with --task-history-limit 4 ({most})"
    );
    h1.mesh_ok(&["service", "rm", "flap"])?;

    // A slower heartbeat: a silent worker stays Ready for longer than the default 2 s.
    h1.mesh_ok(&["swarm", "update", "--dispatcher-heartbeat", "3s"])?;
    // Every node learns the period from its next heartbeat answer (500 ms before).
    std::thread::sleep(Duration::from_secs(2));
    h2.kill_daemon()?;
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let status = |rows: &[mesh_netns::swarm::NodeRow]| {
        rows.iter()
            .find(|r| r.hostname == h2.name())
            .map(|r| r.status.clone())
            .unwrap_or_default()
    };
    let now = status(&node_ls(h1)?);
    ensure!(
        now == "Ready",
        "h2 is {now} 5 s after its daemon died, with 3 s heartbeats (Down takes 12 s)"
    );
    wait_for(
        "the silent worker Down",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || Ok((status(&node_ls(h1)?) == "Down").then_some(())),
    )?;
    let took = killed.elapsed();
    ensure!(
        took >= Duration::from_secs(10),
        "Down after {took:?}, before four 3 s periods"
    );
    Ok(())
}
