//! What ended tasks leave on their node: only their state directory (logs, for `service
//! logs` and `service ps`), never their cgroups, also on a node whose `meshd` was SIGKILLed
//! and restarted while they ran (the churn soak found the cgroups of 10 ended tasks, in every
//! hierarchy, on such a node at the end of a run).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{sleep_pids, swarm_cluster};
use mesh_netns::{cgroup_hierarchies, wait_for, Host};
use serde_json::Value;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroups of the given tasks still on the host.
fn cgroups_of(h: &Host, ids: &[String]) -> Vec<String> {
    h.task_cgroups()
        .into_iter()
        .filter(|c| ids.iter().any(|id| c.ends_with(&format!("/{id}"))))
        .collect()
}

fn wait_no_cgroups(h: &Host, ids: &[String], what: &str) -> Result<()> {
    wait_for(
        &format!("{}: no cgroup left of {what} {ids:?}", h.name()),
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let left = cgroups_of(h, ids);
            ensure!(left.is_empty(), "left: {left:?}");
            Ok(Some(()))
        },
    )
}

/// `(ID, Node)` of the tasks of `svc` that should run and do.
fn running(h: &Host, svc: &str) -> Result<Vec<(String, String)>> {
    let v = h.mesh_json(&["service", "ps", svc])?;
    let s = |t: &Value, k: &str| t[k].as_str().unwrap_or_default().to_string();
    Ok(v.as_array()
        .context("service ps is an array")?
        .iter()
        .filter(|t| {
            s(t, "DesiredState") == "Running" && s(t, "CurrentState").starts_with("Running")
        })
        .map(|t| (s(t, "ID"), s(t, "Node")))
        .collect())
}

/// The sorted IDs of the tasks on `node`.
fn ids_on(tasks: &[(String, String)], node: &str) -> Vec<String> {
    let mut ids: Vec<String> = tasks
        .iter()
        .filter(|(_, n)| n == node)
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    ids
}

/// A service with tasks on both hosts; h2's meshd SIGKILLed and restarted (its tasks adopted);
/// then an adopted task that dies by itself, a rolling update that stops every task and a
/// `service rm`: each ended task loses its cgroups within seconds, on the restarted node as on
/// the other, while its state directory (its logs) stays.
#[test]
fn ended_tasks_leave_no_cgroup_even_after_a_daemon_restart() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "leaks")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    let secs = (70_000 + std::process::id() % 10_000).to_string();
    let svc = "leaky";
    let out = h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        svc,
        "--replicas",
        "4",
        "--",
        "sleep",
        &secs,
    ])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    let first = wait_for(
        "2 tasks running on each host",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let r = running(h1, svc)?;
            Ok((ids_on(&r, "h1").len() == 2 && ids_on(&r, "h2").len() == 2).then_some(r))
        },
    )?;
    let on_h2 = ids_on(&first, "h2");
    // The hierarchies meshd uses (v2, and cpu, cpuacct, memory, pids in hybrid mode).
    let used = cgroup_hierarchies(Path::new(CGROUP_ROOT))
        .iter()
        .filter(|h| h.join(h2.cgroup_parent()).is_dir())
        .count();
    for id in &on_h2 {
        ensure!(
            used > 0 && cgroups_of(h2, std::slice::from_ref(id)).len() == used,
            "cgroups of the running task {id}: {:?}",
            h2.task_cgroups()
        );
    }

    // meshd SIGKILLed and restarted on h2: its tasks run on and are adopted.
    h2.kill_daemon()?;
    h2.start_daemon()?;
    wait_for(
        "h2's tasks adopted (running, same IDs)",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || Ok((ids_on(&running(h1, svc)?, "h2") == on_h2).then_some(())),
    )?;

    // An adopted task whose process dies (SIGKILL): its cgroups go, its logs stay.
    let victim = on_h2[0].clone();
    let pids = h2.task_pids(&victim);
    ensure!(pids.len() == 1, "pids of {victim}: {pids:?}");
    // SAFETY: plain syscall on a pid just read from the task's cgroup.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_no_cgroups(
        h2,
        std::slice::from_ref(&victim),
        "an adopted task that died",
    )?;
    // The shim records the exit once the cgroups are gone: wait for the record.
    let exit_json = h2.exec_root().join("tasks").join(&victim).join("exit.json");
    wait_for(
        &format!("the exit record of {victim} (its state directory stays)"),
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok(exit_json.exists().then_some(())),
    )?;

    // A rolling update stops every task: adopted ones on h2, the others on h1.
    let all = wait_for(
        "4 tasks running again",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let r = running(h1, svc)?;
            Ok((r.len() == 4).then_some(r))
        },
    )?;
    let out = h1.mesh_ok(&["service", "update", "--env-add", "X=1", svc])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    for h in [h1, h2] {
        let ids = ids_on(&all, h.name());
        wait_no_cgroups(h, &ids, "tasks replaced by an update")?;
    }

    // rm: nothing but the state directories is left anywhere.
    h1.mesh_ok(&["service", "rm", svc])?;
    for h in [h1, h2] {
        wait_for(
            &format!("{}: no task cgroup left after rm", h.name()),
            Duration::from_secs(15),
            Duration::from_millis(200),
            || {
                let left = h.task_cgroups();
                ensure!(left.is_empty(), "left: {left:?}");
                Ok(Some(()))
            },
        )?;
    }
    let secs: u32 = secs.parse()?;
    ensure!(
        sleep_pids(secs).is_empty(),
        "processes left: {:?}",
        sleep_pids(secs)
    );
    Ok(())
}

/// A node that leaves the swarm keeps nothing of it: h2 with `swarm leave` (as Docker removes
/// a leaving node's task containers), h3 while its daemon is down (its membership removed
/// from the data directory, as `swarm leave` does): the daemon started out of a swarm removes
/// the tasks the killed one left, with the namespaces the swarm held and the routing mesh's
/// rules. Each loses its task cgroups and state directories; h1 keeps its own.
#[test]
fn a_node_leaving_the_swarm_keeps_none_of_its_tasks() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "leave-tasks")? else {
        return Ok(());
    };
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let secs = (60_000 + std::process::id() % 10_000).to_string();
    let out = h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "stay",
        "--replicas",
        "6",
        "--publish",
        "8080:80",
        "--",
        "sleep",
        &secs,
    ])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    wait_for(
        "2 tasks running on each host",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let r = running(h1, "stay")?;
            Ok(["h1", "h2", "h3"]
                .iter()
                .all(|h| ids_on(&r, h).len() == 2)
                .then_some(()))
        },
    )?;
    for h in [h2, h3] {
        ensure!(
            !h.task_cgroups().is_empty() && !task_dirs(h).is_empty(),
            "{}: no task before leaving",
            h.name()
        );
    }
    let gone = |h: &Host| -> Result<()> {
        let held = h.held_namespaces();
        let table = h.exec(&["nft", "list", "table", "ip", "mesh_ingress"])?;
        ensure!(
            h.task_cgroups().is_empty()
                && task_dirs(h).is_empty()
                && held.is_empty()
                && !table.status.success(),
            "{} kept: cgroups {:?}, task directories {:?}, namespaces {held:?}, ingress rules: {}",
            h.name(),
            h.task_cgroups(),
            task_dirs(h),
            table.status.success()
        );
        Ok(())
    };

    h2.mesh_ok(&["swarm", "leave"])?;
    // The tasks go before the answer, the namespaces right after it.
    let waited = wait_for(
        "h2 keeps nothing of the swarm",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(gone(h2).is_ok().then_some(())),
    );
    if waited.is_err() {
        gone(h2)?;
    }

    h3.kill_daemon()?;
    fs::remove_file(h3.data_dir().join("node.json"))?;
    h3.start_daemon()?;
    // The daemon removes them before it answers: no wait.
    gone(h3)?;

    let left = h1.task_cgroups();
    ensure!(left.len() >= 2, "h1 lost its tasks: {left:?}");
    Ok(())
}

/// The task IDs with a state directory under the host's `EXEC_ROOT/tasks/`.
fn task_dirs(h: &Host) -> BTreeSet<String> {
    fs::read_dir(h.exec_root().join("tasks"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An ended task keeps its state directory while the store keeps it in its service's task
/// history (`service logs` and `service ps` may still want it), and loses it as soon as the
/// store deletes it: after a rolling update the replaced tasks' directories stay on both hosts,
/// after `service rm` no task directory is left on any host within seconds (the churn soak
/// found them all still there, kept 10 minutes by the agent).
#[test]
fn service_rm_leaves_no_task_directory() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "taskdirs")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    let secs = (80_000 + std::process::id() % 10_000).to_string();
    let svc = format!("dirs{}", std::process::id() % 10_000);
    let out = h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        &svc,
        "--replicas",
        "4",
        "--",
        "sh",
        "-c",
        &format!("echo started $MESH_TASK_NAME; exec sleep {secs}"),
    ])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    let first = wait_for(
        "2 tasks running on each host",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let r = running(h1, &svc)?;
            Ok((ids_on(&r, "h1").len() == 2 && ids_on(&r, "h2").len() == 2).then_some(r))
        },
    )?;

    // An update replaces every task: the old ones end but stay in the history, with their logs.
    let out = h1.mesh_ok(&["service", "update", "--env-add", "X=1", &svc])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    let second = wait_for(
        "4 new tasks running",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let r = running(h1, &svc)?;
            Ok((r.len() == 4 && r.iter().all(|t| !first.contains(t))).then_some(r))
        },
    )?;
    // Give the agents time to act on the ended tasks (their poll answers at once on a change).
    std::thread::sleep(Duration::from_secs(2));
    for h in [h1, h2] {
        let dirs = task_dirs(h);
        for id in ids_on(&first, h.name())
            .iter()
            .chain(&ids_on(&second, h.name()))
        {
            ensure!(
                dirs.contains(id),
                "{}: the state directory of {id} (in the task history) is gone; left: {dirs:?}",
                h.name()
            );
        }
    }
    let logs = h1.mesh_ok(&["service", "logs", &svc])?;
    for (id, _) in first.iter().chain(&second) {
        ensure!(
            logs.lines()
                .any(|l| l.contains("| started ") && l.ends_with(id.as_str())),
            "service logs lack the task {id}:\n{logs}"
        );
    }

    // rm: the store deletes every task, and every node its directories.
    h1.mesh_ok(&["service", "rm", &svc])?;
    for h in [h1, h2] {
        wait_for(
            &format!("{}: no task directory left after rm", h.name()),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                let left = task_dirs(h);
                ensure!(left.is_empty(), "left: {left:?}");
                Ok(Some(()))
            },
        )?;
    }
    let secs: u32 = secs.parse()?;
    ensure!(
        sleep_pids(secs).is_empty(),
        "processes left: {:?}",
        sleep_pids(secs)
    );
    Ok(())
}

/// A task whose start fails after its network was plumbed (its command does not exist: the
/// exec fails behind the start gate) holds nothing: once the service is removed, its node
/// releases the network's namespace at once. The churn soak saw such a namespace (and its
/// holder) outlive everything for a minute: the start gate's record of the task was kept
/// until it aged out, whether its process lived or not.
#[test]
fn a_failed_start_holds_no_network_namespace() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "failstart")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    h1.mesh_ok(&["network", "create", "-d", "overlay", "failnet"])?;
    let vni = mesh_netns::swarm::vni_of(h1, "failnet")?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "nocmd",
        "--network",
        "failnet",
        "--constraint",
        "node.hostname==h2",
        "--restart-delay",
        "1s",
        "-d",
        "--",
        "/no/such/command",
    ])?;
    let h2 = c.host(2);
    wait_for(
        "h2's start of nocmd failed",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let ps = h1.mesh_json(&["service", "ps", "nocmd"])?;
            let failed = ps.as_array().into_iter().flatten().any(|t| {
                t["CurrentState"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("Rejected"))
            });
            Ok(failed.then_some(()))
        },
    )?;
    // The start plumbed the network before its exec failed (else nothing is tested). The
    // namespace itself may be gone by now: a pass after the failure releases it.
    let made = std::fs::read_to_string(h2.log_path())?.lines().any(|l| {
        l.contains("overlay network namespace ready") && l.ends_with(&format!("vni={vni}"))
    });
    ensure!(
        made,
        "the start did not plumb the network (nothing to test)"
    );
    h1.mesh_ok(&["service", "rm", "nocmd"])?;
    wait_for(
        "h2 released the network's namespace",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            Ok(mesh_netns::swarm::overlay_pid(h2, vni)
                .is_none()
                .then_some(()))
        },
    )?;
    Ok(())
}
