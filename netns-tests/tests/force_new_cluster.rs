//! Disaster recovery, as Docker's `swarm init --force-new-cluster`, on a real cluster (3
//! managers, 1 worker) that loses two managers for good:
//!
//! - a worker refuses it with Docker's not-a-manager error;
//! - with two managers SIGKILLed (never restarted) management fails with the no-leader error;
//!   `--force-new-cluster` on the survivor makes it the only manager (one voter) of a swarm
//!   that keeps its cluster ID, its node ID, the join tokens, the service, the overlay
//!   network and the secret (same IDs);
//! - the worker reports to it again and its tasks are neither restarted nor replaced; the
//!   service scales and its new task runs;
//! - the lost managers show Down with no manager status (swarmkit keeps them as nodes outside
//!   Raft) and can be removed;
//! - the survivor SIGKILLed and restarted comes back as a working single manager;
//! - the Engine API passes `ForceNewCluster` through (`docker swarm init --force-new-cluster`);
//! - outside a swarm it is a plain init; a wiped host joins again as a manager with the
//!   manager token: two voters;
//! - a locked manager is refused with Docker's locked error until unlocked.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{
    expect_err, field, info, node_ls, service_ps, swarm_cluster, wait_tasks_running,
};
use mesh_netns::{wait_for, Host};
use serde_json::Value;

const NO_LEADER: &str = "The swarm does not have a leader";
const NOT_MANAGER: &str = "This node is not a swarm manager.";

/// The `ID` of the row named `name` in `mesh KIND ls --format json` (secrets are listed
/// in Docker's shape, the name under `Spec`).
fn id_of(h: &Host, kind: &str, name: &str) -> Result<String> {
    let v = h.mesh_json(&[kind, "ls"])?;
    v.as_array()
        .context("ls is an array")?
        .iter()
        .find(|r| {
            field(r, "Name") == name
                || r.pointer("/Spec/Name").and_then(Value::as_str) == Some(name)
        })
        .map(|r| field(r, "ID").to_string())
        .with_context(|| format!("no {kind} {name} in {v}"))
}

/// The IDs of `svc`'s tasks that run.
fn running_ids(h: &Host, svc: &str, n: usize) -> Result<BTreeSet<String>> {
    Ok(wait_tasks_running(h, svc, n, Duration::from_secs(60))?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect())
}

fn voters(h: &Host) -> Result<usize> {
    Ok(info(h)?["raft"]["voters"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0))
}

#[test]
fn force_new_cluster_recovers_a_swarm_that_lost_its_quorum() -> Result<()> {
    let start = Instant::now();
    let Some(c) = swarm_cluster(4, 3, "fnc")? else {
        return Ok(());
    };
    let (h1, h2, h3, h4) = (c.host(1), c.host(2), c.host(3), c.host(4));

    h1.mesh_ok(&["network", "create", "-d", "overlay", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--network",
        "appnet",
        "--constraint",
        "node.role==worker",
        "--",
        "sleep",
        "100000",
    ])?;
    let secret_file = h1.data_dir().with_file_name("fnc-secret");
    std::fs::write(&secret_file, "s3cr3t")?;
    h1.mesh_ok(&[
        "secret",
        "create",
        "db_pw",
        &secret_file.display().to_string(),
    ])?;
    let tasks = running_ids(h1, "web", 2)?;
    let web = id_of(h1, "service", "web")?;
    let appnet = id_of(h1, "network", "appnet")?;
    let secret = id_of(h1, "secret", "db_pw")?;
    let worker_token = h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let manager_token = h1.mesh_ok(&["swarm", "join-token", "-q", "manager"])?;
    let before = info(h1)?;
    let (cluster_id, h1_id) = (
        before["cluster_id"].as_str().unwrap_or("").to_string(),
        before["node_id"].as_str().unwrap_or("").to_string(),
    );
    ensure!(!cluster_id.is_empty() && !h1_id.is_empty(), "{before}");

    // A worker cannot force a new cluster (Docker's words).
    expect_err(h4, &["swarm", "init", "--force-new-cluster"], NOT_MANAGER)?;

    // Two managers lost for good: no quorum.
    h2.kill_daemon()?;
    h3.kill_daemon()?;
    expect_err(h1, &["node", "ls"], NO_LEADER)?;
    expect_err(h1, &["service", "scale", "web=3"], NO_LEADER)?;

    eprintln!("no quorum ({:?} since start)", start.elapsed());
    expect_err(
        h1,
        &["swarm", "init", "--force-new-cluster", "--autolock"],
        "--autolock cannot be changed by --force-new-cluster",
    )?;
    expect_err(
        h1,
        &[
            "swarm",
            "init",
            "--force-new-cluster",
            "--advertise-addr",
            "10.99.0.99",
        ],
        "keeps this node's advertise address",
    )?;
    let t0 = Instant::now();
    let out = h1.mesh_ok(&["swarm", "init", "--force-new-cluster"])?;
    eprintln!("--force-new-cluster answered in {:?}", t0.elapsed());
    ensure!(
        out.starts_with(&format!(
            "Swarm initialized: current node ({h1_id}) is now a manager."
        )),
        "{out}"
    );
    ensure!(
        out.contains(worker_token.trim()),
        "same worker token: {out}"
    );

    // One manager, the leader; the lost ones Down outside Raft; the worker Ready.
    let rows = wait_for(
        "h1 Leader, h2 and h3 Down, h4 Ready",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let Ok(rows) = node_ls(h1) else {
                return Ok(None);
            };
            let st = |n: &str| {
                rows.iter()
                    .find(|r| r.hostname == n)
                    .map(|r| (r.status.clone(), r.manager_status.clone()))
            };
            let ok = st("h1") == Some(("Ready".into(), "Leader".into()))
                && st("h2") == Some(("Down".into(), String::new()))
                && st("h3") == Some(("Down".into(), String::new()))
                && st("h4") == Some(("Ready".into(), String::new()));
            Ok(ok.then_some(rows))
        },
    )?;
    ensure!(rows.iter().any(|r| r.is_self && r.id == h1_id), "{rows:?}");
    ensure!(voters(h1)? == 1, "one voter: {}", info(h1)?);
    // The docker CLI shows the same: the lost managers without a manager status.
    let out = h1.docker_ok(&[
        "node",
        "ls",
        "--format",
        "{{.Hostname}}:{{.Status}}:{{.ManagerStatus}}",
    ])?;
    let mut lines: Vec<&str> = out.lines().map(str::trim).collect();
    lines.sort();
    ensure!(
        lines == ["h1:Ready:Leader", "h2:Down:", "h3:Down:", "h4:Ready:"],
        "docker node ls: {out}"
    );
    let after = info(h1)?;
    ensure!(after["cluster_id"] == before["cluster_id"], "{after}");
    ensure!(after["node_id"] == before["node_id"], "{after}");

    // The objects and tokens are the ones of before.
    ensure!(id_of(h1, "service", "web")? == web, "service ID");
    ensure!(id_of(h1, "network", "appnet")? == appnet, "network ID");
    ensure!(id_of(h1, "secret", "db_pw")? == secret, "secret ID");
    ensure!(
        h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])? == worker_token,
        "worker token"
    );
    ensure!(
        h1.mesh_ok(&["swarm", "join-token", "-q", "manager"])? == manager_token,
        "manager token"
    );

    // The worker's tasks kept running, reported to the new leader, none replaced.
    ensure!(running_ids(h1, "web", 2)? == tasks, "the same tasks run");
    let ps = service_ps(h1, "web")?;
    ensure!(ps.len() == 2, "no task was replaced: {ps:?}");
    ensure!(
        ps.iter().all(|t| field(t, "Node") == "h4"),
        "tasks on h4: {ps:?}"
    );

    eprintln!(
        "new cluster formed, objects and tasks kept ({:?})",
        start.elapsed()
    );
    // It manages: the service scales and its new task runs.
    h1.mesh_ok(&["service", "scale", "web=3"])?;
    let now = running_ids(h1, "web", 3)?;
    ensure!(now.is_superset(&tasks), "{now:?} keeps {tasks:?}");

    // The lost managers are removable: with --force, and without (they are Down).
    h1.mesh_ok(&["node", "rm", "--force", "h2"])?;
    h1.mesh_ok(&["node", "rm", "h3"])?;
    let names: Vec<String> = node_ls(h1)?.into_iter().map(|r| r.hostname).collect();
    ensure!(names == ["h1", "h4"], "{names:?}");

    eprintln!("scaled, lost managers removed ({:?})", start.elapsed());
    // SIGKILLed and restarted, it is a working single manager.
    h1.kill_daemon()?;
    h1.start_daemon()?;
    wait_for(
        "h1 leads again after restart",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let Ok(rows) = node_ls(h1) else {
                return Ok(None);
            };
            Ok(rows
                .iter()
                .any(|r| r.hostname == "h1" && r.manager_status == "Leader")
                .then_some(()))
        },
    )?;
    ensure!(voters(h1)? == 1, "one voter after restart");
    ensure!(
        running_ids(h1, "web", 3)? == now,
        "the same tasks after restart"
    );
    h1.mesh_ok(&["service", "scale", "web=2"])?;
    wait_tasks_running(h1, "web", 2, Duration::from_secs(60))?;

    // The Engine API passes it through; on a swarm of one manager it changes nothing.
    let out = h1.docker_ok(&["swarm", "init", "--force-new-cluster"])?;
    ensure!(
        out.contains(&format!(
            "Swarm initialized: current node ({h1_id}) is now a manager."
        )),
        "{out}"
    );
    ensure!(voters(h1)? == 1, "one voter after docker's");
    ensure!(
        id_of(h1, "service", "web")? == web,
        "service ID after docker's"
    );

    eprintln!("restarted as a single manager ({:?})", start.elapsed());
    // A host whose data is wiped joins again as a manager: two voters. (Its exec root
    // stays: a daemon that starts outside any swarm clears what the kernel kept of one.)
    std::fs::remove_dir_all(h3.data_dir())?;
    std::fs::create_dir_all(h3.data_dir())?;
    h3.start_daemon()?;
    // Outside a swarm, `--force-new-cluster` is a plain init (as Docker's).
    let out = h3.mesh_ok(&[
        "swarm",
        "init",
        "--force-new-cluster",
        "--advertise-addr",
        &h3.addr().to_string(),
    ])?;
    ensure!(
        out.starts_with("Swarm initialized: current node ("),
        "{out}"
    );
    ensure!(
        info(h3)?["cluster_id"] != before["cluster_id"],
        "a new swarm"
    );
    h3.mesh_ok(&["swarm", "leave", "--force"])?;
    h3.mesh_ok(&[
        "swarm",
        "join",
        "--advertise-addr",
        &h3.addr().to_string(),
        "--token",
        manager_token.trim(),
        &format!("{}:2377", h1.addr()),
    ])?;
    wait_for(
        "h3 a voter and Reachable",
        Duration::from_secs(40),
        Duration::from_millis(300),
        || {
            let Ok(rows) = node_ls(h1) else {
                return Ok(None);
            };
            let reachable = rows
                .iter()
                .any(|r| r.hostname == "h3" && r.manager_status == "Reachable");
            Ok((reachable && voters(h1)? == 2).then_some(()))
        },
    )?;
    // Management calls work on the new manager too (forwarded to the leader).
    let rows: Vec<Value> = h3
        .mesh_json(&["service", "ls"])?
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(rows.iter().any(|r| field(r, "ID") == web), "{rows:?}");
    eprintln!("a new manager joined: two voters ({:?})", start.elapsed());

    // A locked manager is told to unlock first (its store is sealed with a key the unlock
    // key opens).
    let out = h1.mesh_ok(&["swarm", "update", "--autolock=true"])?;
    let key = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SWMKEY-1-"))
        .with_context(|| format!("no unlock key in {out:?}"))?
        .to_string();
    h1.kill_daemon()?;
    h1.start_daemon()?;
    ensure!(info(h1)?["swarm"] == "locked", "{}", info(h1)?);
    expect_err(
        h1,
        &["swarm", "init", "--force-new-cluster"],
        "Swarm is encrypted and needs to be unlocked",
    )?;
    let out = h1.mesh_input(&["swarm", "unlock"], &format!("{key}\n"))?;
    ensure!(out.success(), "unlock: {out:?}");
    wait_for(
        "the unlocked manager answers",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || Ok(node_ls(h1).ok().map(|_| ())),
    )?;
    Ok(())
}
