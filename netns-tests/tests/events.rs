//! `mesh events` on a 3-node swarm, as `docker events`: a service created, scaled twice and
//! removed back to back, and a worker's daemon killed and restarted, show, every change and in
//! that order, as Docker's lines (`TIME service create ID (name=web)`, `node update ID
//! (name=h3, state.new=down, state.old=ready)`), filtered by type; `--since` prints the same
//! lines again from the managers' history, and `--until` ends the stream.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{node_ls, swarm_cluster};
use mesh_netns::{binaries, wait_for};

#[test]
fn events_follow_services_and_nodes_in_order() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "events")? else {
        return Ok(());
    };
    let (h1, h3) = (c.host(1), c.host(3));
    let bad = h1.mesh(&["events", "--since", "someday"])?;
    ensure!(!bad.success() && bad.stderr.contains("someday"), "{bad:?}");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;

    let out_path = c.base_dir().join("events.out");
    let err_path = c.base_dir().join("events.err");
    let mut watcher = Command::new(&binaries()?.mesh)
        .arg("-H")
        .arg(format!("unix://{}", h1.socket().display()))
        .args([
            "events",
            "--filter",
            "type=service",
            "--filter",
            "type=node",
        ])
        .env_remove("MESH_HOST")
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let printed = |what: &str| {
        wait_for(
            &format!("mesh events printed {what}"),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                Ok(std::fs::read_to_string(&out_path)?
                    .contains(what)
                    .then_some(()))
            },
        )
    };
    let steps = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(1));
        // Back to back: every change is an event of its own, however close in time.
        h1.mesh_ok(&[
            "service", "create", "-d", "--name", "web", "--", "sleep", "86417",
        ])?;
        // Filtered out: not a service or a node.
        h1.mesh_ok(&["network", "create", "evnet"])?;
        h1.mesh_ok(&["service", "update", "--replicas", "2", "-d", "web"])?;
        h1.mesh_ok(&["service", "update", "--replicas", "3", "-d", "web"])?;
        h1.mesh_ok(&["service", "rm", "web"])?;
        printed("service remove")?;
        h3.kill_daemon()?;
        let status = |want: &str| {
            wait_for(
                &format!("h3 {want}"),
                Duration::from_secs(30),
                Duration::from_millis(200),
                || {
                    let rows = node_ls(h1)?;
                    Ok(rows
                        .iter()
                        .any(|r| r.hostname == "h3" && r.status == want)
                        .then_some(()))
                },
            )
        };
        status("Down")?;
        printed("state.new=down")?;
        h3.restart_daemon()?;
        status("Ready")?;
        printed("state.new=ready")?;
        Ok(())
    })();
    let _ = watcher.kill();
    let _ = watcher.wait();
    steps?;
    let text = std::fs::read_to_string(&out_path)?;
    let err = std::fs::read_to_string(&err_path)?;
    ensure!(err.is_empty(), "mesh events said: {err}");
    let lines: Vec<&str> = text.lines().collect();
    ensure!(
        !text.contains(" network "),
        "a network event passed the filter:\n{text}"
    );
    for l in &lines {
        let ts = l.split(' ').next().unwrap_or_default();
        ensure!(ts.len() == 30 && ts.ends_with('Z'), "timestamp of {l:?}");
    }
    // The expected events, in this order (others, such as the update's own, may come between).
    let expected = [
        ("service create ", "(name=web)"),
        (
            "service update ",
            "(name=web, replicas.new=2, replicas.old=1)",
        ),
        (
            "service update ",
            "(name=web, replicas.new=3, replicas.old=2)",
        ),
        ("service remove ", "(name=web)"),
        ("node update ", "(name=h3, state.new=down, state.old=ready)"),
        ("node update ", "(name=h3, state.new=ready, state.old=down)"),
    ];
    let mut from = 0;
    for (what, attrs) in expected {
        let at = lines[from..]
            .iter()
            .position(|l| l.contains(what) && l.ends_with(attrs))
            .with_context(|| format!("no `{what}... {attrs}` after line {from} in:\n{text}"))?;
        from += at + 1;
    }

    // The managers kept them: `--since` prints the same lines again, up to the stream's last
    // (`--until` its time ends the stream at once).
    let last = lines
        .last()
        .and_then(|l| l.split(' ').next())
        .unwrap_or("0");
    let kept = h1.mesh_ok(&[
        "events",
        "--filter",
        "type=service",
        "--filter",
        "type=node",
        "--since",
        &format!("{}.{:09}", started.as_secs(), started.subsec_nanos()),
        "--until",
        last,
    ])?;
    let kept: Vec<&str> = kept.lines().collect();
    ensure!(
        kept == lines,
        "--since printed\n{}\nthe stream printed\n{text}",
        kept.join("\n")
    );

    // --until ends the stream by itself.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 2;
    let t0 = Instant::now();
    h1.mesh_ok(&["events", "--until", &until.to_string()])?;
    ensure!(
        t0.elapsed() < Duration::from_secs(6),
        "--until took {:?}",
        t0.elapsed()
    );
    Ok(())
}
