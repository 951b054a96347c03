//! A real cluster on the real kernel: `meshd` per simulated host, driven through `mesh`.
//! Raft leadership, failover, quorum loss, Down detection, restart catch-up, tokens, and
//! node management.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use mesh_netns::swarm::{expect_err, form_swarm, info, leader_name, node_ls};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

const NO_LEADER: &str = "The swarm does not have a leader";

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

fn host_named<'a>(c: &'a Cluster, name: &str) -> &'a Host {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .expect("known host")
}

fn status_of(h: &Host, name: &str) -> Result<Option<(String, String)>> {
    Ok(node_ls(h)?
        .into_iter()
        .find(|r| r.hostname == name)
        .map(|r| (r.status, r.manager_status)))
}

/// 3 managers + 1 worker: formation, leader kill and failover, Down detection, restart and
/// catch-up from the persisted log, quorum loss and recovery.
#[test]
fn three_managers_survive_leader_loss_and_report_quorum_loss() -> Result<()> {
    let Some(c) = cluster(4, "raft")? else {
        return Ok(());
    };
    form_swarm(&c, 3)?;

    // node ls: all Ready, one Leader, two Reachable, the worker has no manager status, and
    // the answering node is marked Self, from any manager.
    for h in &c.hosts()[..3] {
        let rows = node_ls(h)?;
        ensure!(rows.len() == 4, "{rows:?}");
        ensure!(
            rows.iter()
                .all(|r| r.status == "Ready" && r.availability == "Active"),
            "{rows:?}"
        );
        ensure!(
            rows.iter().filter(|r| r.manager_status == "Leader").count() == 1,
            "{rows:?}"
        );
        ensure!(
            rows.iter()
                .filter(|r| r.manager_status == "Reachable")
                .count()
                == 2,
            "{rows:?}"
        );
        let me: Vec<_> = rows.iter().filter(|r| r.is_self).collect();
        ensure!(me.len() == 1 && me[0].hostname == h.name(), "{rows:?}");
        ensure!(rows
            .iter()
            .find(|r| r.hostname == "h4")
            .unwrap()
            .manager_status
            .is_empty());
    }
    // The table marks the local node with '*'.
    let table = c.host(2).mesh_ok(&["node", "ls"])?;
    ensure!(
        table.lines().next().unwrap().contains("MANAGER STATUS"),
        "{table}"
    );
    ensure!(
        table.lines().any(|l| l.contains(" * ") && l.contains("h2")),
        "{table}"
    );
    // A worker refuses management commands.
    expect_err(c.host(4), &["node", "ls"], "not a swarm manager")?;

    // Kill the leader: a new leader and working management commands within seconds.
    let old = leader_name(c.host(1))?.expect("a leader");
    let survivor = c.hosts()[..3].iter().find(|h| h.name() != old).unwrap();
    host_named(&c, &old).kill_daemon()?;
    let t0 = Instant::now();
    let new = wait_for(
        "a new leader",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok(leader_name(survivor).ok().flatten().filter(|l| *l != old)),
    )?;
    let failover = t0.elapsed();
    eprintln!("failover: new leader {new} after {failover:?}");
    ensure!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    // A write works through the new leader.
    survivor.mesh_ok(&["node", "update", "--label-add", "written=while-down", "h4"])?;

    // The killed node shows Down on the survivors, detected in about 2 s.
    let t0 = Instant::now();
    wait_for(
        "killed leader shown Down",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok(status_of(survivor, &old)?.filter(|(s, m)| s == "Down" && m == "Unreachable")),
    )?;
    eprintln!("down detection: {:?} after failover", t0.elapsed());

    // Restarted, it comes back Ready and catches up from its persisted log.
    host_named(&c, &old).start_daemon()?;
    wait_for(
        "restarted node Ready and Reachable",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || Ok(status_of(survivor, &old)?.filter(|(s, m)| s == "Ready" && m == "Reachable")),
    )?;
    let restarted = host_named(&c, &old);
    wait_for(
        "restarted manager caught up",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let leader = info(survivor)?["raft"]["last_applied"].as_u64();
            let mine = info(restarted)?["raft"]["last_applied"].as_u64();
            Ok((mine.is_some() && mine >= leader).then_some(()))
        },
    )?;
    let h4 = restarted.mesh_ok(&["node", "inspect", "h4"])?;
    ensure!(h4.contains("while-down"), "{h4}");

    // Quorum loss: with two of three managers gone, management fails with a clear error,
    // quickly, and the daemons stay up.
    let keep = c.host(1);
    for h in &c.hosts()[1..3] {
        h.kill_daemon()?;
    }
    let t0 = Instant::now();
    let err = expect_err(keep, &["node", "ls"], NO_LEADER)?;
    ensure!(
        t0.elapsed() < Duration::from_secs(15),
        "no-leader error took {:?}",
        t0.elapsed()
    );
    expect_err(keep, &["swarm", "join-token", "worker"], NO_LEADER)?;
    expect_err(
        keep,
        &["node", "update", "--availability", "drain", "h4"],
        NO_LEADER,
    )?;
    ensure!(keep.daemon_running() && c.host(4).daemon_running());
    keep.mesh_ok(&["version"])?;
    eprintln!("no quorum: {}", err.trim());

    // Quorum back: the cluster answers again.
    for h in &c.hosts()[1..3] {
        h.start_daemon()?;
    }
    wait_for(
        "quorum restored",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let rows = node_ls(keep)?;
            Ok((rows.iter().filter(|r| r.status == "Ready").count() == 4).then_some(()))
        },
    )?;

    // A worker cut off the underlay goes Down; healed, it is Ready again.
    c.host(4).cut_link()?;
    wait_for(
        "partitioned worker Down",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(status_of(keep, "h4")?.filter(|(s, _)| s == "Down")),
    )?;
    c.host(4).heal_link()?;
    wait_for(
        "healed worker Ready",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || Ok(status_of(keep, "h4")?.filter(|(s, _)| s == "Ready")),
    )?;
    Ok(())
}

/// Join tokens: malformed, foreign and rotated tokens are refused with clear errors; a
/// rotated token works. Then node management: promote, demote, drain, labels, leave, rm.
#[test]
fn tokens_are_checked_and_nodes_are_managed() -> Result<()> {
    let Some(c) = cluster(4, "tokens")? else {
        return Ok(());
    };
    let (h1, h2, h3, h4) = (c.host(1), c.host(2), c.host(3), c.host(4));
    let remote = format!("{}:2377", h1.addr());
    let join = |h: &Host, token: &str| {
        h.mesh(&[
            "swarm",
            "join",
            "--advertise-addr",
            &h.addr().to_string(),
            "--token",
            token,
            &remote,
        ])
    };
    // Commands outside a swarm.
    expect_err(h1, &["node", "ls"], "mesh swarm init")?;
    expect_err(h1, &["swarm", "leave"], "not part of a swarm")?;
    h1.mesh_ok(&["swarm", "init", "--advertise-addr", &h1.addr().to_string()])?;
    expect_err(
        h1,
        &["swarm", "init", "--advertise-addr", &h1.addr().to_string()],
        "already part of a swarm",
    )?;

    let t1 = h1
        .mesh_ok(&["swarm", "join-token", "-q", "worker"])?
        .trim()
        .to_string();
    ensure!(
        t1.starts_with("SWMTKN-1-") && t1.len() == 9 + 50 + 1 + 25,
        "{t1}"
    );
    // Malformed.
    for bad in ["", "bogus", "SWMTKN-2-abc-def", "SWMTKN-1-short-secret"] {
        let out = join(h2, bad)?;
        ensure!(
            !out.success() && out.stderr.contains("invalid join token"),
            "{bad:?}: {}",
            out.stderr
        );
    }
    // Well-formed, but another swarm's CA: the pinned TLS handshake fails.
    let foreign = format!("SWMTKN-1-{}-{}", "1".repeat(50), &t1[9 + 51..]);
    let out = join(h2, &foreign)?;
    ensure!(
        !out.success() && out.stderr.contains("does not match the CA"),
        "{}",
        out.stderr
    );
    // Right CA, wrong secret.
    let wrong = format!("{}{}", &t1[..9 + 51], "0".repeat(25));
    let out = join(h2, &wrong)?;
    ensure!(
        !out.success() && out.stderr.contains("invalid join token"),
        "{}",
        out.stderr
    );

    // Rotation: the old token is refused, the new one works.
    let rotated = h1.mesh_ok(&["swarm", "join-token", "--rotate", "worker"])?;
    ensure!(
        rotated.contains("Successfully rotated worker join token"),
        "{rotated}"
    );
    let t2 = h1
        .mesh_ok(&["swarm", "join-token", "-q", "worker"])?
        .trim()
        .to_string();
    ensure!(
        t2 != t1 && t2[..59] == t1[..59],
        "rotation must keep the CA digest"
    );
    let out = join(h2, &t1)?;
    ensure!(
        !out.success() && out.stderr.contains("invalid join token"),
        "{}",
        out.stderr
    );
    ensure!(join(h2, &t2)?.stdout.contains("joined a swarm as a worker"));
    ensure!(join(h3, &t2)?.success());
    let tm = h1
        .mesh_ok(&["swarm", "join-token", "-q", "manager"])?
        .trim()
        .to_string();
    ensure!(join(h4, &tm)?.stdout.contains("as a manager"));
    expect_err(
        h2,
        &["swarm", "join", "--token", &t2, &remote],
        "already part of a swarm",
    )?;

    // Promote h2: it becomes a Raft voter and answers management commands.
    ensure!(h1
        .mesh_ok(&["node", "promote", "h2"])?
        .contains("promoted to a manager"));
    wait_for(
        "h2 reachable manager",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || Ok(status_of(h1, "h2")?.filter(|(_, m)| m == "Reachable")),
    )?;
    wait_for(
        "h2 answers node ls",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(h2.mesh(&["node", "ls"])?.success().then_some(())),
    )?;
    ensure!(h1
        .mesh_ok(&["node", "promote", "h2"])?
        .contains("already a manager"));
    // Demote it again: back to a worker that refuses management commands.
    ensure!(h1.mesh_ok(&["node", "demote", "h2"])?.contains("demoted"));
    wait_for(
        "h2 refuses as a worker",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let out = h2.mesh(&["node", "ls"])?;
            Ok((!out.success() && out.stderr.contains("not a swarm manager")).then_some(()))
        },
    )?;
    let voters = info(h1)?["raft"]["voters"].as_array().map(|v| v.len());
    ensure!(voters == Some(2), "voters after demote: {voters:?}");

    // Availability and labels.
    h1.mesh_ok(&[
        "node",
        "update",
        "--availability",
        "drain",
        "--label-add",
        "zone=a",
        "--label-add",
        "ssd=",
        "h3",
    ])?;
    let rows = node_ls(h1)?;
    ensure!(
        rows.iter()
            .any(|r| r.hostname == "h3" && r.availability == "Drain"),
        "{rows:?}"
    );
    let h3_inspect = h1.mesh_ok(&["node", "inspect", "h3"])?;
    ensure!(h3_inspect.contains("\"zone\": \"a\""), "{h3_inspect}");
    h1.mesh_ok(&[
        "node",
        "update",
        "--label-rm",
        "zone",
        "--availability",
        "active",
        "h3",
    ])?;
    ensure!(!h1.mesh_ok(&["node", "inspect", "h3"])?.contains("zone"));
    expect_err(
        h1,
        &["node", "update", "--availability", "sideways", "h3"],
        "invalid availability",
    )?;
    expect_err(
        h1,
        &["node", "inspect", "nosuchnode"],
        "no such node: nosuchnode",
    )?;
    expect_err(h1, &["node", "rm", "h4"], "must be demoted")?;
    expect_err(h1, &["node", "rm", "h3"], "is not down")?;

    // A worker leaves: shown Down, then removable.
    // Before leaving it has its routing mesh (ingress sandbox, nftables, veth to the sandbox).
    let ingress_parts = |h: &mesh_netns::Host| -> Result<(bool, bool, bool)> {
        let tables = h.exec(&["nft", "list", "tables"])?;
        let links = h.exec(&["ip", "-o", "link"])?;
        Ok((
            String::from_utf8_lossy(&tables.stdout).contains("mesh_ingress"),
            String::from_utf8_lossy(&links.stdout).contains("mesh_ingr0"),
            h.exec_root().join("netns/ingress_sbox.json").exists(),
        ))
    };
    wait_for(
        "h3's routing mesh set up",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || Ok((ingress_parts(h3)? == (true, true, true)).then_some(())),
    )?;
    h3.mesh_ok(&["swarm", "leave"])?;
    ensure!(info(h3)?["swarm"] == "inactive");
    // Leaving takes it all down: no table, no veth, no sandbox namespace.
    wait_for(
        "h3's routing mesh gone after leaving",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok((ingress_parts(h3)? == (false, false, false)).then_some(())),
    )?;
    wait_for(
        "h3 Down after leaving",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(status_of(h1, "h3")?.filter(|(s, _)| s == "Down")),
    )?;
    h1.mesh_ok(&["node", "rm", "h3"])?;
    ensure!(status_of(h1, "h3")?.is_none());
    // A manager needs --force to leave, with Swarm's quorum warning.
    expect_err(h4, &["swarm", "leave"], "--force")?;
    h4.mesh_ok(&["swarm", "leave", "--force"])?;
    wait_for(
        "h4 out of raft",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let v = info(h1)?["raft"]["voters"].as_array().map(|v| v.len());
            Ok((v == Some(1)).then_some(()))
        },
    )?;
    // A forced-out node removed with --force; the swarm still works with one manager.
    h1.mesh_ok(&["node", "rm", "--force", "h4"])?;
    ensure!(node_ls(h1)?.len() == 2);
    // h2's daemon restarted: still a worker of the swarm, Ready again.
    h2.restart_daemon()?;
    wait_for(
        "h2 back",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(status_of(h1, "h2")?.filter(|(s, _)| s == "Ready")),
    )?;
    ensure!(info(h2)?["role"] == "worker");
    Ok(())
}

/// Garbage on the local API socket gets an error answer; the connection and the daemon live on.
#[test]
fn malformed_api_requests_get_clear_errors() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let Some(c) = cluster(1, "api")? else {
        return Ok(());
    };
    let h = c.host(1);
    let mut s = std::os::unix::net::UnixStream::connect(h.socket())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    for bad in [
        "not json",
        "{\"method\":\"no_such_method\"}",
        "{\"method\":\"node_rm\",\"params\":{}}",
        "\u{0}\u{1}",
    ] {
        writeln!(s, "{bad}")?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        ensure!(
            line.contains("\"Err\"") && line.contains("malformed request"),
            "{bad:?} -> {line}"
        );
    }
    writeln!(s, "{{\"method\":\"version\"}}")?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(line.contains("\"Ok\""), "{line}");
    // Invalid flags and values are refused by the CLI with one line.
    let out = h.mesh(&["swarm", "init", "--advertise-addr", "not-an-ip"])?;
    ensure!(
        !out.success() && out.stderr.contains("invalid address"),
        "{}",
        out.stderr
    );
    let out = h.mesh(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
    ensure!(
        !out.success() && out.stderr.contains("non-loopback"),
        "{}",
        out.stderr
    );
    ensure!(h.daemon_running());
    h.mesh_ok(&["version"])?;
    Ok(())
}

/// `node demote` right after `node promote`, while the promoted node is still asking the
/// leader to make it a Raft voter, at a few delays across that window. The leader used to
/// add the voter after the demotion had written the node's role: the node then stopped Raft
/// as a worker, and two voters with one gone left the swarm without a leader (seen as
/// `docker node demote` failing with "The swarm does not have a leader"). Each round the
/// demotion must succeed, the leader must keep committing, and the voters must be h1 alone.
#[test]
fn demote_right_after_promote_keeps_the_leader() -> Result<()> {
    let Some(c) = cluster(2, "promote-demote")? else {
        return Ok(());
    };
    form_swarm(&c, 1)?;
    let (h1, h2) = (c.host(1), c.host(2));
    for (round, delay_ms) in [0u64, 150, 300, 600, 1200].into_iter().enumerate() {
        ensure!(h1
            .mesh_ok(&["node", "promote", "h2"])?
            .contains("promoted to a manager"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        let out = h1.mesh(&["node", "demote", "h2"])?;
        ensure!(
            out.success() && out.stdout.contains("demoted"),
            "round {round}: demote {delay_ms} ms after promote: {}",
            out.stderr
        );
        let label = format!("round={round}");
        wait_for(
            &format!("round {round}: h1 the only voter, h2 a worker, the leader committing"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let voters = info(h1)?["raft"]["voters"].as_array().map(|v| v.len());
                let worker = {
                    let out = h2.mesh(&["node", "ls"])?;
                    !out.success() && out.stderr.contains("not a swarm manager")
                };
                let wrote = h1
                    .mesh(&["node", "update", "--label-add", &label, "h2"])?
                    .success();
                Ok((voters == Some(1) && worker && wrote).then_some(()))
            },
        )?;
    }
    Ok(())
}
