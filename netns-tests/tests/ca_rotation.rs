//! Root CA rotation (`swarm ca --rotate`) on a real cluster: h1 and h2 managers, h3 a worker,
//! h4 joining afterwards.
//!
//! - `swarm ca` prints the root every node trusts.
//! - A rotation started with h3's daemon down (`--detach`) moves h1's and h2's certificates
//!   to the new root and then waits, as Docker's does, for every registered node: `node ls`
//!   shows h3 `Needs Rotation` and nobody trusts the new root yet. Restarted, h3 renews from
//!   its old certificate, and the rotation ends: every node trusts the new root.
//! - A second rotation, waited for with its progress, while management calls go through a
//!   follower (forwarded over mutual TLS) at every poll, and task processes and daemons stay
//!   as they were.
//! - Afterwards the join tokens carry the new root's digest: the old token is refused, the
//!   new one joins h4; a copy of h3's identity from before the rotations is refused on the
//!   control port, its identity now is accepted.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_netns::control::{control_call, node_json, save_identity};
use mesh_netns::swarm::{field, node_ls, sleep_pids, wait_tasks_running};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

const SLEEP: u32 = 100_523;

fn trusted_root(h: &Host) -> Result<String> {
    Ok(node_json(h)?["ca_cert_pem"]
        .as_str()
        .context("no ca_cert_pem in node.json")?
        .to_string())
}

/// The certificates in `h`'s `cert_pem`: its own, then the ones it presents with it.
fn chain_len(h: &Host) -> Result<usize> {
    Ok(node_json(h)?["cert_pem"]
        .as_str()
        .context("no cert_pem in node.json")?
        .matches("-----BEGIN CERTIFICATE-----")
        .count())
}

/// `HOST TLSSTATUS` per node, from `node ls --format`.
fn tls_status(h: &Host) -> Result<Vec<String>> {
    let out = h.mesh_ok(&["node", "ls", "--format", "{{.Hostname}} {{.TLSStatus}}"])?;
    Ok(out.lines().map(str::to_string).collect())
}

fn join(h: &Host, token: &str, remote: &str) -> Result<mesh_netns::MeshOutput> {
    h.mesh(&[
        "swarm",
        "join",
        "--advertise-addr",
        &h.addr().to_string(),
        "--token",
        token,
        remote,
    ])
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn root_ca_rotates_across_the_swarm_without_downtime() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 4,
        start_daemons: true,
        name_hint: "carot",
    })?;
    let (h1, h2, h3, h4) = (c.host(1), c.host(2), c.host(3), c.host(4));
    let tmp = TempDir(std::env::temp_dir().join(format!("mesh-carot-{}", std::process::id())));
    let remote = format!("{}:2377", h1.addr());
    h1.mesh_ok(&["swarm", "init", "--advertise-addr", &h1.addr().to_string()])?;
    let manager_token = h1.mesh_ok(&["swarm", "join-token", "-q", "manager"])?;
    let old_worker_token = h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let old_worker_token = old_worker_token.trim();
    ensure!(join(h2, manager_token.trim(), &remote)?.status == 0);
    ensure!(join(h3, old_worker_token, &remote)?.status == 0);
    wait_for(
        "3 nodes ready",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let rows = node_ls(h1)?;
            Ok((rows.len() == 3 && rows.iter().all(|r| r.status == "Ready")).then_some(()))
        },
    )?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "rot",
        "--replicas",
        "3",
        "--",
        "sleep",
        &SLEEP.to_string(),
    ])?;
    wait_tasks_running(h1, "rot", 3, Duration::from_secs(30))?;

    // `swarm ca` prints the root every node trusts.
    let root0 = trusted_root(h1)?;
    let shown = h2.mesh_ok(&["swarm", "ca"])?;
    ensure!(shown.trim() == root0.trim(), "swarm ca: {shown}");
    for h in [h2, h3] {
        ensure!(
            trusted_root(h)? == root0,
            "{} trusts another root",
            h.name()
        );
    }
    let old_identity = tmp.0.join("old");
    let h3_id = save_identity(h3, &old_identity)?;

    // A rotation waits for a node that is down.
    h3.kill_daemon()?;
    let out = h1.mesh_ok(&["swarm", "ca", "--rotate", "--detach"])?;
    ensure!(out.trim().is_empty(), "--detach printed {out:?}");
    wait_for(
        "h1 and h2 with certificates from the new root",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || Ok((chain_len(h1)? == 2 && chain_len(h2)? == 2).then_some(())),
    )?;
    wait_for(
        "h3 down, needing rotation",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let s = tls_status(h1)?;
            Ok((s.contains(&"h1 Needs Rotation".to_string())
                && s.contains(&"h3 Needs Rotation".to_string())
                && node_ls(h1)?
                    .iter()
                    .any(|r| r.hostname == "h3" && r.status == "Down"))
            .then_some(s))
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    for h in [h1, h2] {
        ensure!(
            trusted_root(h)? == root0,
            "{} moved to the new root while h3 was down",
            h.name()
        );
    }
    // As Docker's, `swarm ca` shows the root the swarm wants.
    let desired = h2.mesh_ok(&["swarm", "ca"])?;
    ensure!(
        desired.trim() != root0.trim(),
        "swarm ca during the rotation: {desired}"
    );
    // Back, h3 renews from its old certificate (still trusted) and the rotation ends.
    h3.start_daemon()?;
    wait_for(
        "every node trusting the new root",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let roots: Vec<String> = [h1, h2, h3]
                .iter()
                .map(|h| trusted_root(h))
                .collect::<Result<_>>()?;
            Ok((roots[0] != root0 && roots.iter().all(|r| *r == roots[0]))
                .then(|| roots[0].clone()))
        },
    )?;
    let root1 = trusted_root(h1)?;
    ensure!(
        root1.trim() == desired.trim(),
        "the swarm moved to another root"
    );
    ensure!(
        chain_len(h3)? == 2,
        "h3's certificate is not from the new root"
    );
    ensure!(h2.mesh_ok(&["swarm", "ca"])?.trim() == root1.trim());
    wait_for(
        "every node Ready for TLS",
        Duration::from_secs(10),
        Duration::from_millis(250),
        || {
            let s = tls_status(h1)?;
            Ok(s.iter().all(|l| l.ends_with(" Ready")).then_some(s))
        },
    )?;

    // A second rotation, waited for, while a follower forwards management calls. The tasks
    // as they are now (h3's was replaced while it was down).
    let tasks: BTreeSet<String> = wait_tasks_running(h1, "rot", 3, Duration::from_secs(30))?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect();
    let procs: BTreeSet<u32> = wait_for(
        "3 task processes",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let p: BTreeSet<u32> = sleep_pids(SLEEP).into_iter().collect();
            Ok((p.len() == 3).then_some(p))
        },
    )?;
    let pids: Vec<Option<u32>> = c.hosts().iter().map(|h| h.daemon_pid()).collect();
    let stop = AtomicBool::new(false);
    let (rotated, polls) = std::thread::scope(|s| {
        let poller = s.spawn(|| -> Result<u32> {
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) {
                let rows = node_ls(h2).context("node ls through h2 during the rotation")?;
                ensure!(
                    rows.len() == 3 && rows.iter().all(|r| r.status == "Ready"),
                    "node ls during the rotation: {rows:?}"
                );
                polls += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(polls)
        });
        let started = Instant::now();
        let rotated = h1.mesh_ok(&["swarm", "ca", "--rotate"]);
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        (rotated.map(|o| (o, took)), poller.join())
    });
    let (out, took) = rotated?;
    let polls = polls.map_err(|_| anyhow::anyhow!("the poller panicked"))??;
    eprintln!("second rotation in {took:?}, {polls} management calls through h2 meanwhile");
    ensure!(polls > 0, "no management call during the rotation");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("desired root digest: sha256:")),
        "swarm ca --rotate: {out}"
    );
    let last_tls = lines
        .iter()
        .rev()
        .find(|l| l.contains("rotated TLS certificates:"))
        .context("no TLS progress line")?;
    ensure!(last_tls.ends_with("3/3 nodes"), "{out}");
    let root2 = trusted_root(h1)?;
    ensure!(root2 != root1 && root2 != root0);
    ensure!(
        out.trim_end().ends_with(root2.trim()),
        "swarm ca --rotate did not print the new root: {out}"
    );
    for h in [h2, h3] {
        ensure!(
            trusted_root(h)? == root2,
            "{} trusts another root",
            h.name()
        );
    }
    let now_pids: Vec<Option<u32>> = c.hosts().iter().map(|h| h.daemon_pid()).collect();
    ensure!(
        now_pids[..2] == pids[..2],
        "a manager restarted: {pids:?} -> {now_pids:?}"
    );
    ensure!(
        sleep_pids(SLEEP).into_iter().collect::<BTreeSet<_>>() == procs,
        "the task processes changed"
    );
    let running: BTreeSet<String> = wait_tasks_running(h1, "rot", 3, Duration::from_secs(5))?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect();
    ensure!(
        running == tasks,
        "the tasks changed: {running:?}, were {tasks:?}"
    );

    // The docker CLI unchanged: `docker swarm ca --rotate` follows the rotation through the
    // Engine API (`CAConfig.ForceRotate`, the nodes' `TLSInfo`) and prints the new root.
    let out = h2.docker_ok(&["swarm", "ca", "--rotate"])?;
    let root3 = wait_for(
        "every node trusting the root docker rotated to",
        Duration::from_secs(10),
        Duration::from_millis(250),
        || {
            let roots: Vec<String> = [h1, h2, h3]
                .iter()
                .map(|h| trusted_root(h))
                .collect::<Result<_>>()?;
            Ok((roots[0] != root2 && roots.iter().all(|r| *r == roots[0]))
                .then(|| roots[0].clone()))
        },
    )?;
    ensure!(
        out.contains("rotated TLS certificates") && out.trim_end().ends_with(root3.trim()),
        "docker swarm ca --rotate: {out}"
    );
    ensure!(h1.docker_ok(&["swarm", "ca"])?.trim() == root3.trim());
    let statuses = h1.docker_ok(&["node", "ls", "--format", "{{.Hostname}} {{.TLSStatus}}"])?;
    ensure!(
        statuses.lines().count() == 3 && statuses.lines().all(|l| l.ends_with(" Ready")),
        "docker node ls TLSStatus: {statuses}"
    );
    let root2 = root3;

    // Tokens carry the new root: the old one is refused, the new one joins.
    let new_worker_token = h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let new_worker_token = new_worker_token.trim();
    ensure!(new_worker_token != old_worker_token);
    ensure!(
        new_worker_token.rsplit('-').next() == old_worker_token.rsplit('-').next(),
        "the token's secret changed: {old_worker_token} -> {new_worker_token}"
    );
    let refused = join(h4, old_worker_token, &remote)?;
    ensure!(refused.status != 0, "joined with the old root's token");
    ensure!(
        refused.stderr.contains("CA digest mismatch") || refused.stderr.contains("does not match"),
        "old token: {}",
        refused.stderr
    );
    let joined = join(h4, new_worker_token, &remote)?;
    ensure!(joined.status == 0, "new token: {}", joined.stderr);
    ensure!(trusted_root(h4)? == root2, "h4 trusts another root");
    wait_for(
        "h4 ready",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let rows = node_ls(h1)?;
            Ok((rows.len() == 4 && rows.iter().all(|r| r.status == "Ready")).then_some(()))
        },
    )?;

    // The old root's certificates are refused; the node's current one is accepted.
    let heartbeat = serde_json::json!({ "Heartbeat": { "node_id": h3_id } });
    let out = control_call(h3, h1, &old_identity, &heartbeat)?;
    ensure!(
        !out.contains("\"Heartbeat\""),
        "a certificate of the old root was accepted: {out:?}"
    );
    let current = tmp.0.join("current");
    save_identity(h3, &current)?;
    let out = control_call(h3, h1, &current, &heartbeat)?;
    ensure!(
        out.contains("\"Heartbeat\""),
        "h3's certificate now: {out:?}"
    );
    h1.mesh_ok(&["service", "rm", "rot"])?;
    Ok(())
}
