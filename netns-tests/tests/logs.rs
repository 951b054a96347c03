//! `mesh service logs` on the real kernel, as Docker's: lines from tasks on several nodes,
//! stamped where they were read (`--timestamps`), `--tail` per task, `--since`, one task by
//! its ID, `--no-task-ids`, `--raw`, stderr lines on stderr; `--follow` sees the lines that
//! come next, from a task started after it began included, each line once; and a task's log
//! on its node is bounded by `meshd --log-opt max-size=... --log-opt max-file=...`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{field, form_swarm, running_tasks, wait_tasks_running};
use mesh_netns::{binaries, require_root, wait_for, Cluster, ClusterOpts, Host};

/// Prints where it runs, one line on stderr, then a numbered tick every 100 ms.
const TICKER: &str = "echo \"start on $(cat /etc/hostname)\"; echo oops >&2; i=0; \
                      while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.1; done";

/// The parts of a default `service logs` line: task name (`web.1.<id12>`), node, text.
fn parts(line: &str) -> Option<(&str, &str, &str)> {
    let (prefix, text) = line.split_once("    | ")?;
    let (task, node) = prefix.rsplit_once('@')?;
    Some((task, node, text))
}

/// `mesh service logs ARGS...` on `h`: stdout and stderr.
fn logs(h: &Host, args: &[&str]) -> Result<(String, String)> {
    let mut a = vec!["service", "logs"];
    a.extend_from_slice(args);
    let out = h.mesh(&a)?;
    ensure!(out.success(), "service logs {args:?}: {out:?}");
    Ok((out.stdout, out.stderr))
}

#[test]
fn service_logs_as_docker_s() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "logs",
    })?;
    for h in c.hosts() {
        h.start_daemon_with(&["--log-opt", "max-size=4k", "--log-opt", "max-file=2"])?;
    }
    form_swarm(&c, 1)?;
    let h1 = c.host(1);
    // Two tickers on the two workers.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "ticker",
        "--replicas",
        "2",
        "--constraint",
        "node.role==worker",
        "--",
        "sh",
        "-c",
        TICKER,
    ])?;
    let tasks = wait_tasks_running(h1, "ticker", 2, Duration::from_secs(30))?;
    let first_ids: BTreeSet<String> = tasks.iter().map(|t| field(t, "ID").to_string()).collect();
    wait_for(
        "ticks from both tasks",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let (out, _) = logs(h1, &["ticker"])?;
            let nodes: BTreeSet<&str> = out
                .lines()
                .filter(|l| l.contains("| tick 3"))
                .filter_map(|l| Some(parts(l)?.1))
                .collect();
            Ok((nodes.len() == 2).then_some(()))
        },
    )?;

    // Default form, from both workers; the stderr line on stderr only.
    let (out, err) = logs(h1, &["ticker"])?;
    let nodes: BTreeSet<&str> = out.lines().filter_map(|l| Some(parts(l)?.1)).collect();
    ensure!(nodes == BTreeSet::from(["h2", "h3"]), "nodes in {out}");
    for l in out.lines() {
        let (task, _, _) = parts(l).with_context(|| format!("line {l:?}"))?;
        let id = task.rsplit('.').next().unwrap_or_default();
        ensure!(
            task.starts_with("ticker.") && id.len() == 12,
            "task name {task:?} in {l:?}"
        );
    }
    ensure!(!out.contains("oops"), "stderr line on stdout: {out}");
    ensure!(
        err.lines().filter(|l| l.ends_with("    | oops")).count() == 2,
        "stderr: {err}"
    );

    // --timestamps: RFC 3339 with 9 digits, in order within a task.
    let (out, _) = logs(h1, &["-t", "ticker"])?;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for l in out.lines() {
        let (ts, rest) = l.split_once(' ').context("timestamp")?;
        ensure!(
            ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "timestamp {ts:?}"
        );
        let task = parts(rest).context("parts")?.0.to_string();
        if let Some(prev) = last.insert(task, ts.to_string()) {
            ensure!(prev.as_str() < ts, "{prev} then {ts}");
        }
    }

    // --tail per task; --no-task-ids; --raw.
    let (out, _) = logs(h1, &["--tail", "2", "ticker"])?;
    let mut per_task: BTreeMap<&str, usize> = BTreeMap::new();
    for l in out.lines() {
        *per_task.entry(parts(l).context("parts")?.0).or_default() += 1;
    }
    ensure!(
        per_task.len() == 2 && per_task.values().all(|n| *n <= 2),
        "--tail 2: {out}"
    );
    let (out, _) = logs(h1, &["--no-task-ids", "--tail", "1", "ticker"])?;
    ensure!(
        out.lines()
            .all(|l| l.starts_with("ticker.1@") || l.starts_with("ticker.2@")),
        "--no-task-ids: {out}"
    );
    let (out, _) = logs(h1, &["--raw", "--tail", "1", "ticker"])?;
    ensure!(
        out.lines().count() == 2 && out.lines().all(|l| l.starts_with("tick ")),
        "--raw: {out}"
    );

    // --since: a time in the future shows nothing; 1 hour back shows everything.
    let (out, _) = logs(h1, &["--since", "2099-01-01T00:00:00Z", "ticker"])?;
    ensure!(out.is_empty(), "--since the future: {out}");
    let (out, _) = logs(h1, &["--since", "1h", "ticker"])?;
    ensure!(out.contains("start on "), "--since 1h: {out}");
    let bad = h1.mesh(&["service", "logs", "--since", "someday", "ticker"])?;
    ensure!(
        !bad.success()
            && bad
                .stderr
                .contains("failed to parse value as time or duration"),
        "{bad:?}"
    );

    // One task by its ID.
    let one = first_ids.iter().next().context("a task")?;
    let (out, _) = logs(h1, &["--no-trunc", one])?;
    ensure!(
        !out.is_empty()
            && out
                .lines()
                .all(|l| parts(l).is_some_and(|p| p.0.ends_with(one.as_str()))),
        "logs of task {one}: {out}"
    );
    let none = h1.mesh(&["service", "logs", "nope"])?;
    ensure!(
        !none.success() && none.stderr.contains("no such task or service: nope"),
        "{none:?}"
    );

    // --follow from now: the ticks that come next, each once, and the lines of a task
    // started after it began.
    let follow_out = c.base_dir().join("follow.out");
    let mut follower = Command::new(&binaries()?.mesh)
        .arg("-H")
        .arg(format!("unix://{}", h1.socket().display()))
        .args(["service", "logs", "-f", "--tail", "0", "ticker"])
        .env_remove("MESH_HOST")
        .stdout(std::fs::File::create(&follow_out)?)
        .stderr(Stdio::null())
        .spawn()?;
    let followed = (|| -> Result<String> {
        std::thread::sleep(Duration::from_secs(1));
        h1.mesh_ok(&["service", "update", "--replicas", "3", "-d", "ticker"])?;
        wait_tasks_running(h1, "ticker", 3, Duration::from_secs(30))?;
        wait_for(
            "the new task's ticks followed",
            Duration::from_secs(20),
            Duration::from_millis(300),
            || {
                let text = std::fs::read_to_string(&follow_out)?;
                let new_task = text.lines().filter_map(parts).any(|(task, _, text)| {
                    let id = task.rsplit('.').next().unwrap_or_default();
                    text == "tick 5" && !first_ids.iter().any(|f| f.starts_with(id))
                });
                Ok(new_task.then_some(text))
            },
        )
    })();
    let _ = follower.kill();
    let _ = follower.wait();
    let text = followed?;
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for (task, _, line) in text.lines().filter_map(parts) {
        ensure!(
            seen.insert((task.to_string(), line.to_string())),
            "{task} {line:?} twice in:\n{text}"
        );
    }
    ensure!(
        !text.contains("tick 1\n") || text.contains("start on "),
        "--tail 0 showed old lines:\n{text}"
    );
    let running = running_tasks(h1, "ticker")?;
    ensure!(running.len() == 3, "{running:?}");

    // Bounded on disk: at most 2 files of about 4 kB per task, the newest lines kept.
    let t = &tasks[0];
    let node = field(t, "Node");
    let h = c
        .hosts()
        .iter()
        .find(|h| h.name() == node)
        .context("task node")?;
    let dir = h.exec_root().join("tasks").join(field(t, "ID"));
    // Rotated twice: the first lines are gone, the newest kept.
    let id = field(t, "ID").to_string();
    let out = wait_for(
        "the ticker's first lines rotated away",
        Duration::from_secs(40),
        Duration::from_millis(500),
        || {
            let (out, _) = logs(h1, &["--no-trunc", &id])?;
            Ok((!out.contains("start on ")).then_some(out))
        },
    )?;
    let files: Vec<(String, u64)> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("log.json"))
        .map(|e| {
            Ok((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata()?.len(),
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        files.len() == 2 && files.iter().all(|(_, n)| *n <= 4000),
        "log files of {id}: {files:?}"
    );
    let ticks: Vec<u64> = out
        .lines()
        .filter_map(|l| parts(l)?.2.strip_prefix("tick ")?.parse().ok())
        .collect();
    ensure!(
        ticks.len() > 10 && ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "the kept ticks are not the newest in order: {ticks:?}"
    );
    Ok(())
}
