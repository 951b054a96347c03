//! Services on a real cluster: tasks are real processes in their own namespaces and cgroups,
//! counted on the machine itself (each service sleeps a unique number of seconds, so its
//! processes can be told apart). Covers spread, scale, restart on SIGKILL, exec, logs, daemon
//! restart adoption, drain, node death, partitions, global services, rolling updates with
//! pause and rollback, and removal leaving no process behind.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{expect_err, field, form_swarm, node_ls, service_ps, sleep_pids};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};
use serde_json::Value;

fn cluster(hosts: usize, hint: &'static str) -> Result<Option<Cluster>> {
    if !require_root()? {
        return Ok(None);
    }
    Ok(Some(Cluster::new(ClusterOpts {
        hosts,
        start_daemons: true,
        name_hint: hint,
    })?))
}

fn count_procs(secs: u32) -> usize {
    sleep_pids(secs).len()
}

fn pids_of(secs: u32) -> Vec<u32> {
    sleep_pids(secs)
}

/// Running tasks of a service per node name.
fn running_per_node(h: &Host, svc: &str) -> Result<BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for t in service_ps(h, svc)? {
        if field(&t, "DesiredState") == "Running"
            && field(&t, "CurrentState").starts_with("Running")
        {
            *m.entry(field(&t, "Node").to_string()).or_default() += 1;
        }
    }
    Ok(m)
}

fn wait_procs(secs: u32, n: usize, within: Duration) -> Result<()> {
    wait_for(
        &format!("{n} processes 'sleep {secs}'"),
        within,
        Duration::from_millis(200),
        || Ok((count_procs(secs) == n).then_some(())),
    )
}

fn wait_running(h: &Host, svc: &str, per_node: &[(&str, usize)], within: Duration) -> Result<()> {
    let want: BTreeMap<String, usize> = per_node
        .iter()
        .map(|(n, c)| (n.to_string(), *c))
        .filter(|(_, c)| *c > 0)
        .collect();
    wait_for(
        &format!("{svc} running as {want:?}"),
        within,
        Duration::from_millis(250),
        || Ok((running_per_node(h, svc)? == want).then_some(())),
    )
}

fn create(h: &Host, args: &[&str]) -> Result<String> {
    let mut a = vec!["service", "create"];
    a.extend_from_slice(args);
    let out = h.mesh_ok(&a)?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    Ok(out)
}

/// One manager and two workers: spread, exec, logs, restart after SIGKILL, scale, daemon
/// restart adoption, bad specs, rm.
#[test]
fn service_lifecycle_on_three_nodes() -> Result<()> {
    let Some(c) = cluster(3, "svc")? else {
        return Ok(());
    };
    form_swarm(&c, 1)?;
    let (h1, h2) = (c.host(1), c.host(2));

    // Bad specs are refused before anything is stored.
    expect_err(
        h1,
        &["service", "create", "--name", "bad"],
        "requires at least 1 argument",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--replicas",
            "-1",
            "--",
            "true",
        ],
        "invalid replicas: -1",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--constraint",
            "node.colour==red",
            "--",
            "true",
        ],
        "unknown key",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--constraint",
            "node.role=manager",
            "--",
            "true",
        ],
        "operator",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--network",
            "nope",
            "--",
            "true",
        ],
        "no such network: nope",
    )?;
    expect_err(
        h1,
        &["service", "create", "--name", "bad name", "--", "true"],
        "invalid service name",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--restart-condition",
            "sometimes",
            "--",
            "true",
        ],
        "invalid restart condition",
    )?;
    expect_err(h1, &["service", "ps", "nope"], "no such service: nope")?;
    ensure!(h1
        .mesh_json(&["service", "ls"])?
        .as_array()
        .is_some_and(|a| a.is_empty()));

    // Three replicas, one per node.
    create(
        h1,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "--restart-delay",
            "1s",
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING from $MESH_TASK_NAME; exec sleep 86401",
        ],
    )?;
    wait_running(
        h1,
        "web",
        &[("h1", 1), ("h2", 1), ("h3", 1)],
        Duration::from_secs(10),
    )?;
    ensure!(count_procs(86401) == 3, "{} processes", count_procs(86401));
    expect_err(
        h1,
        &["service", "create", "--name", "web", "--", "true"],
        "already exists",
    )?;
    let ls = h1.mesh_json(&["service", "ls"])?;
    ensure!(
        ls[0]["Name"] == "web" && ls[0]["Replicas"] == "3/3" && ls[0]["Mode"] == "replicated",
        "{ls}"
    );

    // exec on the node that runs web's task: its own namespaces, hostname, resolv.conf, env.
    let on_h2 = service_ps(h1, "web")?
        .into_iter()
        .find(|t| field(t, "Node") == "h2")
        .context("task on h2")?;
    let (id, name) = (
        field(&on_h2, "ID").to_string(),
        field(&on_h2, "Name").to_string(),
    );
    let out = h2.mesh_ok(&["exec", &name, "--", "sh", "-c", "hostname; cat /etc/resolv.conf; echo $MESH_SERVICE_NAME $MESH_TASK_SLOT $MESH_NODE_NAME; readlink /proc/self/ns/net"])?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines[0] == &id[..12], "hostname {out}");
    ensure!(out.contains("nameserver 127.0.0.11"), "{out}");
    ensure!(out.contains(&format!("web {} h2", &name[4..])), "{out}");
    let host_ns = h2.exec(&["readlink", "/proc/self/ns/net"])?;
    ensure!(
        lines.last() != Some(&String::from_utf8_lossy(&host_ns.stdout).trim()),
        "task shares the host netns"
    );
    // Its own /sys: only its own interfaces.
    let sys = h2.mesh_ok(&["exec", &id, "--", "ls", "/sys/class/net"])?;
    ensure!(
        sys.split_whitespace().collect::<Vec<_>>() == ["lo"],
        "/sys/class/net in the task: {sys}"
    );
    let st = h2.mesh(&["exec", &id, "--", "sh", "-c", "echo oops >&2; exit 7"])?;
    ensure!(st.status == 7 && st.stderr.contains("oops"), "{st:?}");
    expect_err(h1, &["exec", &name, "--", "true"], "no such task")?;

    // Logs from every node.
    let logs = h1.mesh_ok(&["service", "logs", "web"])?;
    for slot in 1..=3 {
        ensure!(logs.contains(&format!("hi from web.{slot}.")), "{logs}");
    }

    // A task killed with SIGKILL is replaced (restart delay 1 s), with history.
    let victim = pids_of(86401)[0];
    // SAFETY: kill(2) on a pid we just read; a race with its exit only makes kill fail.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_for(
        "a failed task in the history",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            Ok(service_ps(h1, "web")?
                .iter()
                .any(|t| {
                    field(t, "CurrentState").starts_with("Failed")
                        && field(t, "Error").contains("signal 9")
                })
                .then_some(()))
        },
    )?;
    wait_procs(86401, 3, Duration::from_secs(15))?;
    wait_running(
        h1,
        "web",
        &[("h1", 1), ("h2", 1), ("h3", 1)],
        Duration::from_secs(10),
    )?;

    // Scale up and down.
    let out = h1.mesh_ok(&["service", "scale", "web=6"])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    wait_running(
        h1,
        "web",
        &[("h1", 2), ("h2", 2), ("h3", 2)],
        Duration::from_secs(10),
    )?;
    wait_procs(86401, 6, Duration::from_secs(10))?;
    h1.mesh_ok(&["service", "scale", "web=2"])?;
    wait_procs(86401, 2, Duration::from_secs(15))?;
    expect_err(h1, &["service", "scale", "web=-3"], "invalid replicas")?;

    // meshd SIGKILLed and restarted on a worker: its tasks survive and are adopted, no copies.
    // The scale-down left one task on each of two nodes (processes of the others may still
    // be stopping), so the third goes to the node without one: wait for one running task
    // per node, not for a process count, before looking at h2's.
    h1.mesh_ok(&["service", "scale", "web=3"])?;
    wait_running(
        h1,
        "web",
        &[("h1", 1), ("h2", 1), ("h3", 1)],
        Duration::from_secs(15),
    )?;
    wait_procs(86401, 3, Duration::from_secs(15))?;
    let before: Vec<String> = service_ps(h1, "web")?
        .iter()
        .filter(|t| field(t, "Node") == "h2" && field(t, "DesiredState") == "Running")
        .map(|t| field(t, "ID").to_string())
        .collect();
    ensure!(before.len() == 1, "h2's running tasks: {before:?}");
    let pids_before = pids_of(86401);
    h2.kill_daemon()?;
    h2.start_daemon()?;
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<String> = service_ps(h1, "web")?
        .iter()
        .filter(|t| field(t, "Node") == "h2" && field(t, "DesiredState") == "Running")
        .map(|t| field(t, "ID").to_string())
        .collect();
    ensure!(
        before == after,
        "tasks on h2 changed across a daemon restart: {before:?} -> {after:?}"
    );
    let mut p1 = pids_before.clone();
    let mut p2 = pids_of(86401);
    p1.sort();
    p2.sort();
    ensure!(
        p1 == p2,
        "processes changed across a daemon restart: {p1:?} -> {p2:?}"
    );
    h2.mesh_ok(&["exec", &after[0], "--", "true"])?;

    // rm: every process goes, everywhere.
    h1.mesh_ok(&["service", "rm", "web"])?;
    wait_procs(86401, 0, Duration::from_secs(15))?;
    expect_err(h1, &["service", "ps", "web"], "no such service: web")?;
    wait_for(
        "tasks gone from the store",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            Ok(h1
                .mesh_json(&["service", "ls"])?
                .as_array()
                .is_some_and(|a| a.is_empty())
                .then_some(()))
        },
    )?;
    Ok(())
}

/// Drain, a dead worker daemon, a partition and a late joiner: tasks move, and returning nodes
/// never leave extra copies running.
#[test]
fn failures_move_tasks_without_extra_copies() -> Result<()> {
    let Some(c) = cluster(4, "failover")? else {
        return Ok(());
    };
    let (h1, h2, h3, h4) = (c.host(1), c.host(2), c.host(3), c.host(4));
    h1.mesh_ok(&["swarm", "init", "--advertise-addr", &h1.addr().to_string()])?;
    let token = h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let remote = format!("{}:2377", h1.addr());
    for h in [h2, h3] {
        h.mesh_ok(&[
            "swarm",
            "join",
            "--advertise-addr",
            &h.addr().to_string(),
            "--token",
            token.trim(),
            &remote,
        ])?;
    }
    create(
        h1,
        &["--name", "g", "--mode", "global", "--", "sleep", "86402"],
    )?;
    create(
        h1,
        &[
            "--name",
            "r",
            "--replicas",
            "3",
            "--restart-delay",
            "1s",
            "--",
            "sleep",
            "86403",
        ],
    )?;
    wait_procs(86402, 3, Duration::from_secs(10))?;
    wait_procs(86403, 3, Duration::from_secs(10))?;

    // A node that joins later gets the global task.
    h4.mesh_ok(&[
        "swarm",
        "join",
        "--advertise-addr",
        &h4.addr().to_string(),
        "--token",
        token.trim(),
        &remote,
    ])?;
    wait_running(
        h1,
        "g",
        &[("h1", 1), ("h2", 1), ("h3", 1), ("h4", 1)],
        Duration::from_secs(15),
    )?;
    wait_procs(86402, 4, Duration::from_secs(10))?;

    // Drain moves everything off h2.
    h1.mesh_ok(&["node", "update", "--availability", "drain", "h2"])?;
    wait_for(
        "nothing on h2",
        Duration::from_secs(15),
        Duration::from_millis(250),
        || {
            let r = running_per_node(h1, "r")?;
            let g = running_per_node(h1, "g")?;
            Ok(
                (!r.contains_key("h2") && r.values().sum::<usize>() == 3 && !g.contains_key("h2"))
                    .then_some(()),
            )
        },
    )?;
    wait_procs(86403, 3, Duration::from_secs(10))?;
    wait_procs(86402, 3, Duration::from_secs(10))?;
    h1.mesh_ok(&["node", "update", "--availability", "active", "h2"])?;
    wait_procs(86402, 4, Duration::from_secs(10))?;

    // A worker's daemon dies: once it is Down its tasks run elsewhere; its orphaned processes
    // keep running until its daemon is back, which then stops them.
    let on_h3 = running_per_node(h1, "r")?.get("h3").copied().unwrap_or(0);
    h3.kill_daemon()?;
    wait_for(
        "h3 Down",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            Ok(node_ls(h1)?
                .iter()
                .any(|n| n.hostname == "h3" && n.status == "Down")
                .then_some(()))
        },
    )?;
    wait_for(
        "r replaced off h3",
        Duration::from_secs(15),
        Duration::from_millis(250),
        || {
            let r = running_per_node(h1, "r")?;
            Ok((!r.contains_key("h3") && r.values().sum::<usize>() == 3).then_some(()))
        },
    )?;
    wait_procs(86403, 3 + on_h3, Duration::from_secs(10))?;
    h3.start_daemon()?;
    wait_procs(86403, 3, Duration::from_secs(20))?;
    wait_procs(86402, 4, Duration::from_secs(20))?;

    // A partitioned worker: replaced while away, its copies stopped when it is back.
    let on_h4 = running_per_node(h1, "r")?.get("h4").copied().unwrap_or(0);
    h4.cut_link()?;
    wait_for(
        "r replaced off h4",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let r = running_per_node(h1, "r")?;
            Ok((!r.contains_key("h4") && r.values().sum::<usize>() == 3).then_some(()))
        },
    )?;
    ensure!(
        count_procs(86403) == 3 + on_h4,
        "while partitioned: {}",
        count_procs(86403)
    );
    h4.heal_link()?;
    wait_procs(86403, 3, Duration::from_secs(20))?;
    wait_running(
        h1,
        "g",
        &[("h1", 1), ("h2", 1), ("h3", 1), ("h4", 1)],
        Duration::from_secs(20),
    )?;
    wait_procs(86402, 4, Duration::from_secs(10))?;
    Ok(())
}

/// Rolling updates: a good one completes; a failing one pauses or rolls back as configured;
/// `service rollback` goes back.
#[test]
fn rolling_updates_pause_and_roll_back() -> Result<()> {
    let Some(c) = cluster(2, "update")? else {
        return Ok(());
    };
    form_swarm(&c, 1)?;
    let h1 = c.host(1);
    create(
        h1,
        &[
            "--name",
            "up",
            "--replicas",
            "2",
            "--update-monitor",
            "1s",
            "--",
            "sleep",
            "86404",
        ],
    )?;
    wait_procs(86404, 2, Duration::from_secs(10))?;

    // A good update replaces every task.
    let before: Vec<String> = service_ps(h1, "up")?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect();
    let out = h1.mesh_ok(&["service", "update", "--env-add", "V=2", "up"])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    let running: Vec<Value> = service_ps(h1, "up")?
        .into_iter()
        .filter(|t| field(t, "DesiredState") == "Running")
        .collect();
    ensure!(
        running.len() == 2
            && running
                .iter()
                .all(|t| !before.contains(&field(t, "ID").to_string())),
        "{running:?}"
    );
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "up"])?)?;
    ensure!(
        insp[0]["UpdateStatus"]["State"] == "completed"
            && insp[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"][0] == "V=2",
        "{insp}"
    );
    wait_procs(86404, 2, Duration::from_secs(10))?;

    // A failing update with failure action pause: paused, one slot still runs the old spec.
    let out = h1.mesh(&[
        "service",
        "update",
        "--update-failure-action",
        "pause",
        "up",
        "--",
        "false",
    ])?;
    ensure!(
        !out.success() && out.stderr.contains("update paused"),
        "{out:?}"
    );
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "up"])?)?;
    ensure!(insp[0]["UpdateStatus"]["State"] == "paused", "{insp}");
    ensure!(count_procs(86404) >= 1, "the pause kept no old task");
    // Manual rollback brings back the previous spec.
    let out = h1.mesh_ok(&["service", "rollback", "up"])?;
    ensure!(out.contains("verify: Service converged"), "{out}");
    wait_procs(86404, 2, Duration::from_secs(15))?;

    // Failure action rollback: back to the old spec by itself.
    create(
        h1,
        &[
            "--name",
            "rb",
            "--replicas",
            "2",
            "--update-monitor",
            "1s",
            "--update-failure-action",
            "rollback",
            "--",
            "sleep",
            "86405",
        ],
    )?;
    let out = h1.mesh(&["service", "update", "rb", "--", "false"])?;
    ensure!(
        !out.success() && out.stderr.contains("rolled back"),
        "{out:?}"
    );
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "rb"])?)?;
    ensure!(
        insp[0]["UpdateStatus"]["State"] == "rollback_completed",
        "{insp}"
    );
    ensure!(
        insp[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"][0] == "sleep",
        "{insp}"
    );
    wait_procs(86405, 2, Duration::from_secs(15))?;
    for svc in ["up", "rb"] {
        h1.mesh_ok(&["service", "rm", svc])?;
    }
    wait_procs(86404, 0, Duration::from_secs(15))?;
    wait_procs(86405, 0, Duration::from_secs(15))?;
    Ok(())
}

/// `--stop-signal` and `--stop-grace-period`: a task that ignores SIGTERM stops at once on
/// the signal it is given, or after the grace period it is given (without them, it would
/// take the agent's default grace, 5 s, before SIGKILL).
#[test]
fn stop_signal_and_grace_period() -> Result<()> {
    let Some(c) = cluster(1, "stopsig")? else {
        return Ok(());
    };
    form_swarm(&c, 1)?;
    let h1 = c.host(1);
    let base = 86_420 + std::process::id() % 1000 * 3;
    let (usr1, grace) = (base, base + 1);
    let ignore_term = |secs: u32| format!("trap '' TERM; exec sleep {secs}");
    create(
        h1,
        &[
            "--name",
            "usr1",
            "--stop-signal",
            "SIGUSR1",
            "--",
            "sh",
            "-c",
            &ignore_term(usr1),
        ],
    )?;
    create(
        h1,
        &[
            "--name",
            "grace",
            "--stop-grace-period",
            "1s",
            "--",
            "sh",
            "-c",
            &ignore_term(grace),
        ],
    )?;
    wait_procs(usr1, 1, Duration::from_secs(10))?;
    wait_procs(grace, 1, Duration::from_secs(10))?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--stop-signal",
            "SIGNOPE",
            "--",
            "true",
        ],
        "invalid signal: SIGNOPE",
    )?;
    let t = std::time::Instant::now();
    h1.mesh_ok(&["service", "rm", "usr1", "grace"])?;
    wait_procs(usr1, 0, Duration::from_secs(3))?;
    wait_procs(grace, 0, Duration::from_secs(4))?;
    println!("both stopped in {:?}", t.elapsed());
    Ok(())
}
