//! Node certificates on a real cluster (1 manager, 2 workers), daemons started with the
//! test-only `--min-cert-expiry 10`:
//!
//! - `swarm update --cert-expiry 40s`: every node replaces its certificate at once (the
//!   90-day one outlives the new setting) and then again in each certificate's renewal
//!   window, three times in all, while a service's task processes keep running, `node ls`
//!   and `service ps` succeed at every poll with every node Ready, and no daemon restarts;
//! - a promoted worker gets a certificate with the manager OU, a demoted one the worker OU
//!   again;
//! - a worker's certificate cannot make management calls on the control port; once the
//!   worker is removed (`node rm --force`, its daemon killed) its certificate, still valid,
//!   is refused, and its daemon, restarted, does not rejoin and leaves the swarm.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::control::{control_call, node_json, save_identity};
use mesh_netns::swarm::{
    expect_err, field, form_swarm, info, node_ls, running_tasks, sleep_pids, wait_tasks_running,
};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

const SLEEP: u32 = 100_517;

/// The certificate (PEM) in `h`'s `node.json`.
fn cert_of(h: &Host) -> Result<String> {
    Ok(node_json(h)?["cert_pem"]
        .as_str()
        .context("no cert_pem in node.json")?
        .to_string())
}

/// `openssl x509 -noout OPTION` of a PEM.
fn x509(pem: &str, option: &str) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", option])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("openssl")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(pem.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "openssl x509 {option}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Seconds from now until the certificate expires (negative once expired), as openssl reads
/// its notAfter.
fn secs_left(pem: &str) -> Result<i64> {
    let ok = |secs: u64| -> Result<bool> {
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &secs.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().map(|mut i| i.write_all(pem.as_bytes()));
                c.wait()
            })?;
        Ok(out.success())
    };
    // Binary search on -checkend (valid for at least N more seconds), up to a year.
    if !ok(0)? {
        return Ok(-1);
    }
    let (mut lo, mut hi) = (0u64, 366 * 86400u64);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if ok(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo as i64)
}

/// The OU of a certificate: `mesh-manager` or `mesh-worker`.
fn ou(pem: &str) -> Result<String> {
    let subject = x509(pem, "-subject")?;
    for part in subject.split([',', '/']) {
        let part = part.trim();
        if let Some(v) = part
            .strip_prefix("OU")
            .map(|v| v.trim_start_matches([' ', '=']))
        {
            return Ok(v.trim().to_string());
        }
    }
    bail!("no OU in {subject}")
}

fn wait_ou(h: &Host, want: &str) -> Result<()> {
    wait_for(
        &format!("{}: a certificate with OU {want}", h.name()),
        Duration::from_secs(20),
        Duration::from_millis(250),
        || Ok((ou(&cert_of(h)?)? == want).then_some(())),
    )
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn certificates_renew_and_follow_roles_without_restarts() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "certs",
    })?;
    for h in c.hosts() {
        h.start_daemon_with(&["--min-cert-expiry", "10"])?;
    }
    form_swarm(&c, 1)?;
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let tmp = TempDir(std::env::temp_dir().join(format!("mesh-certs-{}", std::process::id())));

    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "certsvc",
        "--replicas",
        "3",
        "--",
        "sleep",
        &SLEEP.to_string(),
    ])?;
    let tasks: BTreeSet<String> = wait_tasks_running(h1, "certsvc", 3, Duration::from_secs(30))?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect();
    let procs: BTreeSet<u32> = sleep_pids(SLEEP).into_iter().collect();
    ensure!(procs.len() == 3, "task processes: {procs:?}");
    let pids: Vec<Option<u32>> = c.hosts().iter().map(|h| h.daemon_pid()).collect();

    // The first certificates are Docker's 90 days.
    for h in c.hosts() {
        let left = secs_left(&cert_of(h)?)?;
        ensure!(left > 89 * 86400, "{}: {left} s left", h.name());
    }
    expect_err(
        h1,
        &["swarm", "update", "--cert-expiry", "5s"],
        "minimum certificate expiry time is: 10s",
    )?;
    h1.mesh_ok(&["swarm", "update", "--cert-expiry", "40s"])?;

    // Every node's certificate replaced three times (at once, then in each window), while
    // management calls, heartbeats and tasks carry on.
    let mut seen: BTreeMap<String, Vec<String>> = c
        .hosts()
        .iter()
        .map(|h| Ok((h.name().to_string(), vec![cert_of(h)?])))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        let rows = node_ls(h1).context("node ls during renewals")?;
        ensure!(
            rows.len() == 3 && rows.iter().all(|r| r.status == "Ready"),
            "node ls during renewals: {rows:?}"
        );
        let running = running_tasks(h1, "certsvc").context("service ps during renewals")?;
        let ids: BTreeSet<String> = running.iter().map(|t| field(t, "ID").to_string()).collect();
        ensure!(
            ids == tasks,
            "running tasks changed: {ids:?}, were {tasks:?}"
        );
        for h in c.hosts() {
            let pem = cert_of(h)?;
            let list = seen.get_mut(h.name()).context("host")?;
            if list.last() != Some(&pem) {
                let left = secs_left(&pem)?;
                ensure!(
                    left <= 40,
                    "{}: a new certificate valid {left} s more",
                    h.name()
                );
                list.push(pem);
            }
        }
        if seen.values().all(|l| l.len() >= 4) {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(150),
            "not every certificate replaced three times in 150 s: {:?}",
            seen.iter()
                .map(|(h, l)| (h, l.len() - 1))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "certificates replaced 3+ times on every node in {:?} ({polls} polls)",
        start.elapsed()
    );
    let now_pids: Vec<Option<u32>> = c.hosts().iter().map(|h| h.daemon_pid()).collect();
    ensure!(
        now_pids == pids,
        "a daemon restarted: {pids:?} -> {now_pids:?}"
    );
    ensure!(
        sleep_pids(SLEEP).into_iter().collect::<BTreeSet<_>>() == procs,
        "the task processes changed"
    );
    // A manager's key stays sealed through its renewals.
    let n1 = node_json(h1)?;
    ensure!(
        n1["key_pem"] == "" && n1["key_sealed"].is_string(),
        "h1's renewed key is not sealed"
    );

    // Roles: the certificate follows promote and demote.
    ensure!(ou(&cert_of(h2)?)? == "mesh-worker");
    h1.mesh_ok(&["node", "promote", "h2"])?;
    wait_ou(h2, "mesh-manager")?;
    wait_for(
        "h2 a reachable manager",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let rows = node_ls(h1)?;
            Ok(rows
                .iter()
                .any(|r| r.hostname == "h2" && r.manager_status == "Reachable")
                .then_some(()))
        },
    )?;
    h1.mesh_ok(&["node", "demote", "h2"])?;
    wait_ou(h2, "mesh-worker")?;
    ensure!(info(h2)?["role"] == "worker", "h2 not a worker again");

    // Removal: first certificates long enough to outlast the test, so that a refusal
    // below is the removal's and not an expiry's.
    h1.mesh_ok(&["swarm", "update", "--cert-expiry", "1h"])?;
    wait_for(
        "h3 renewed with the 1h expiry",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || Ok((secs_left(&cert_of(h3)?)? > 1800).then_some(())),
    )?;
    let id3 = save_identity(h3, &tmp.0)?;
    let heartbeat = serde_json::json!({ "Heartbeat": { "node_id": id3 } });
    let api = serde_json::json!({ "Api": { "method": "node_ls", "params": {} } });
    // Its certificate works for itself, but a worker's makes no management call.
    let out = control_call(h3, h1, &tmp.0, &heartbeat)?;
    ensure!(out.contains("\"Heartbeat\""), "h3's heartbeat: {out:?}");
    let out = control_call(h3, h1, &tmp.0, &api)?;
    ensure!(
        out.contains("only managers forward management calls"),
        "a worker's management call: {out:?}"
    );
    h3.kill_daemon()?;
    h1.mesh_ok(&["node", "rm", "--force", "h3"])?;
    ensure!(node_ls(h1)?.len() == 2);
    ensure!(secs_left(&cert_of(h3)?)? > 1200, "h3's certificate expired");
    for req in [&heartbeat, &api] {
        let out = control_call(h3, h1, &tmp.0, req)?;
        ensure!(
            out.contains("removed from the swarm"),
            "the removed node's {req} was not refused: {out:?}"
        );
    }
    // Restarted, it does not come back: told it was removed, it leaves.
    h3.start_daemon_with(&["--min-cert-expiry", "10"])?;
    wait_for(
        "h3 out of the swarm",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || Ok((info(h3)?["swarm"] == "inactive").then_some(())),
    )?;
    ensure!(node_ls(h1)?.len() == 2, "h3 came back");
    ensure!(
        !h3.data_dir().join("node.json").exists(),
        "h3 kept its node.json"
    );
    h1.mesh_ok(&["service", "rm", "certsvc"])?;
    Ok(())
}
