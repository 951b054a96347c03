//! Autolock on a real cluster (3 managers, 1 worker), as Docker's `swarm update --autolock`,
//! `swarm unlock-key [--rotate]` and `swarm unlock`:
//!
//! - with autolock on, every manager's data key is wrapped with the unlock key, which is in
//!   none of their files, and a manager's TLS key is sealed in `node.json`;
//! - a restarted manager is locked: `mesh info` says so, management calls get Docker's locked
//!   error (also through the `docker` CLI), a wrong key is refused, the right key unlocks it
//!   and it catches up with the changes it missed;
//! - a key rotated while a manager is down: that manager still opens with the old key (and
//!   not the new one), catches up, and from then on opens with the new one only;
//! - a restarted worker is never locked; with autolock off again, managers restart unlocked
//!   and `unlock-key` says no key is set;
//! - `swarm update` settings round-trip through the Engine API and bad values are refused.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{expect_err, info, node_ls, swarm_cluster};
use mesh_netns::{wait_for, Host};

/// The `SWMKEY-1-...` line of an output.
fn key_in(out: &str) -> Result<String> {
    out.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SWMKEY-1-"))
        .map(str::to_string)
        .with_context(|| format!("no unlock key in {out:?}"))
}

fn swarm_state(h: &Host) -> Result<String> {
    Ok(info(h)?["swarm"].as_str().unwrap_or("").to_string())
}

/// Waits until `h`'s key file is wrapped with the unlock key (`locked`) or with a key
/// beside it.
fn wait_key_file(h: &Host, locked: bool) -> Result<()> {
    let path = h.data_dir().join("data.key");
    wait_for(
        "the data key wrapped as the cluster says",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let Ok(s) = std::fs::read_to_string(&path) else {
                return Ok(None);
            };
            Ok((s.contains("\"kek\"") != locked).then_some(()))
        },
    )
}

fn restart_locked(h: &Host) -> Result<()> {
    h.kill_daemon()?;
    h.start_daemon()?;
    let state = swarm_state(h)?;
    ensure!(state == "locked", "{} restarted as {state:?}", h.name());
    Ok(())
}

fn unlock(h: &Host, key: &str) -> Result<()> {
    let out = h.mesh_input(&["swarm", "unlock"], &format!("{key}\n"))?;
    ensure!(out.success(), "unlock of {}: {out:?}", h.name());
    ensure!(
        swarm_state(h)? == "active",
        "{} not active after unlock",
        h.name()
    );
    Ok(())
}

/// Waits until `h` (a manager) answers `node ls` with every node Ready and 3 managers up.
fn wait_caught_up(h: &Host) -> Result<()> {
    wait_for(
        "the unlocked manager answers with the cluster",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let Ok(rows) = node_ls(h) else {
                return Ok(None);
            };
            let up = rows
                .iter()
                .filter(|r| matches!(r.manager_status.as_str(), "Leader" | "Reachable"))
                .count();
            Ok((up == 3).then_some(()))
        },
    )
}

#[test]
fn autolock_locks_restarted_managers_until_unlocked() -> Result<()> {
    let Some(c) = swarm_cluster(4, 3, "alock")? else {
        return Ok(());
    };
    let (h1, h2, h3, h4) = (c.host(1), c.host(2), c.host(3), c.host(4));
    expect_err(h1, &["swarm", "unlock-key"], "no unlock key is set")?;
    expect_err(h1, &["swarm", "unlock"], "swarm is not locked")?;
    expect_err(
        h1,
        &["swarm", "unlock-key", "--rotate"],
        "cannot rotate because autolock is not turned on",
    )?;

    let out = h1.mesh_ok(&["swarm", "update", "--autolock=true"])?;
    ensure!(out.starts_with("Swarm updated.\n"), "{out}");
    ensure!(out.contains("run the `mesh swarm unlock`"), "{out}");
    let k1 = key_in(&out)?;
    ensure!(
        h2.mesh_ok(&["swarm", "unlock-key", "-q"])?.trim() == k1,
        "unlock-key on another manager"
    );
    ensure!(
        h1.docker_ok(&["swarm", "unlock-key", "-q"])?.trim() == k1,
        "docker swarm unlock-key"
    );
    for h in [h1, h2, h3] {
        wait_key_file(h, true)?;
    }
    // The unlock key is in no file, the TLS key of a manager in none in the clear.
    let body = k1.trim_start_matches("SWMKEY-1-");
    for h in [h1, h2, h3] {
        for f in ["data.key", "node.json"] {
            let s = std::fs::read_to_string(h.data_dir().join(f))?;
            ensure!(!s.contains(body), "the unlock key is in {}/{f}", h.name());
        }
        wait_for(
            "the TLS key sealed in node.json",
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                let s = std::fs::read_to_string(h.data_dir().join("node.json"))?;
                Ok((!s.contains("PRIVATE KEY") && s.contains("key_sealed")).then_some(()))
            },
        )?;
    }

    // A restarted manager is locked and says so, with Docker's words.
    restart_locked(h2)?;
    expect_err(
        h2,
        &["node", "ls"],
        "Swarm is encrypted and needs to be unlocked before it can be used. Please use \"mesh swarm unlock\" to unlock it.",
    )?;
    let d = h2.docker(&["node", "ls"])?;
    ensure!(
        !d.success()
            && d.stderr
                .contains("Please use \"docker swarm unlock\" to unlock it."),
        "docker node ls on a locked manager: {d:?}"
    );
    ensure!(
        h2.docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?
            .trim()
            == "locked",
        "docker info on a locked manager"
    );
    for wrong in [
        "wrong-secret-key",
        "SWMKEY-1-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let out = h2.mesh_input(&["swarm", "unlock"], wrong)?;
        ensure!(
            !out.success()
                && out
                    .stderr
                    .contains("swarm could not be unlocked: invalid key provided"),
            "a wrong key: {out:?}"
        );
        ensure!(
            swarm_state(h2)? == "locked",
            "still locked after a wrong key"
        );
    }
    // Changes made while it is locked reach it once unlocked.
    h1.mesh_ok(&["node", "update", "--label-add", "while=locked", h4.name()])?;
    unlock(h2, &k1)?;
    wait_caught_up(h2)?;
    let v = h2.mesh_ok(&["node", "inspect", h4.name()])?;
    ensure!(
        v.contains("\"while\": \"locked\""),
        "the label set while h2 was locked: {v}"
    );

    // Rotation with a manager down: it keeps the old key until it has caught up.
    h3.kill_daemon()?;
    let out = h1.mesh_ok(&["swarm", "unlock-key", "--rotate"])?;
    ensure!(
        out.starts_with("Successfully rotated manager unlock key.\n"),
        "{out}"
    );
    let k2 = key_in(&out)?;
    ensure!(k2 != k1, "the key did not change");
    let wrapped_k1 = std::fs::read(h3.data_dir().join("data.key"))?;
    h3.start_daemon()?;
    ensure!(swarm_state(h3)? == "locked", "h3 restarted unlocked");
    let out = h3.mesh_input(&["swarm", "unlock"], &k2)?;
    ensure!(
        !out.success() && out.stderr.contains("invalid key"),
        "h3 was down during the rotation, the new key cannot open it: {out:?}"
    );
    unlock(h3, &k1)?;
    wait_caught_up(h3)?;
    // Once caught up it is wrapped with the new key: the old one stops working there.
    wait_for(
        "h3 wrapped with the new key",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let now = std::fs::read(h3.data_dir().join("data.key"))?;
            Ok((now != wrapped_k1).then_some(()))
        },
    )?;
    restart_locked(h3)?;
    let out = h3.mesh_input(&["swarm", "unlock"], &k1)?;
    ensure!(
        !out.success(),
        "the old key still opens h3 after it caught up"
    );
    unlock(h3, &k2)?;
    wait_caught_up(h3)?;
    // h2 was up during the rotation: the new key opens it.
    restart_locked(h2)?;
    unlock(h2, &k2)?;
    wait_caught_up(h2)?;

    // Workers are never locked.
    h4.kill_daemon()?;
    h4.start_daemon()?;
    ensure!(
        swarm_state(h4)? == "active",
        "a restarted worker is not active"
    );

    // Autolock off: managers restart unlocked.
    let out = h1.mesh_ok(&["swarm", "update", "--autolock=false"])?;
    ensure!(out.trim() == "Swarm updated.", "{out}");
    expect_err(h1, &["swarm", "unlock-key"], "no unlock key is set")?;
    wait_key_file(h2, false)?;
    h2.kill_daemon()?;
    h2.start_daemon()?;
    ensure!(swarm_state(h2)? == "active", "h2 locked with autolock off");
    wait_caught_up(h2)?;
    Ok(())
}

#[test]
fn swarm_update_settings_and_autolock_at_init() -> Result<()> {
    let Some(c) = mesh_netns::swarm::swarm_cluster(1, 1, "swupd")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    expect_err(
        h1,
        &["swarm", "update", "--cert-expiry", "30m"],
        "minimum certificate expiry time is: 1h0m0s",
    )?;
    expect_err(
        h1,
        &["swarm", "update", "--task-history-limit", "-1"],
        "invalid task history limit",
    )?;
    h1.mesh_ok(&[
        "swarm",
        "update",
        "--task-history-limit",
        "2",
        "--cert-expiry",
        "48h",
        "--dispatcher-heartbeat",
        "1s",
    ])?;
    let spec = h1.docker_ok(&["info", "--format", "{{json .Swarm.Cluster.Spec}}"])?;
    let v: serde_json::Value = serde_json::from_str(spec.trim())?;
    ensure!(v["Orchestration"]["TaskHistoryRetentionLimit"] == 2, "{v}");
    ensure!(
        v["CAConfig"]["NodeCertExpiry"] == 48u64 * 3600 * 1_000_000_000,
        "{v}"
    );
    ensure!(
        v["Dispatcher"]["HeartbeatPeriod"] == 1_000_000_000u64,
        "{v}"
    );
    ensure!(v["EncryptionConfig"]["AutoLockManagers"] == false, "{v}");
    // The docker CLI changes them too, through the spec it sends back.
    h1.docker_ok(&[
        "swarm",
        "update",
        "--task-history-limit",
        "3",
        "--autolock=true",
    ])?;
    let key = h1.docker_ok(&["swarm", "unlock-key", "-q"])?;
    ensure!(key.trim().starts_with("SWMKEY-1-"), "{key}");
    let spec = h1.docker_ok(&["info", "--format", "{{json .Swarm.Cluster.Spec}}"])?;
    let v: serde_json::Value = serde_json::from_str(spec.trim())?;
    ensure!(v["Orchestration"]["TaskHistoryRetentionLimit"] == 3, "{v}");
    ensure!(v["EncryptionConfig"]["AutoLockManagers"] == true, "{v}");

    // A swarm made with --autolock prints its key and is locked after a restart.
    h1.mesh_ok(&["swarm", "leave", "--force"])?;
    let out = h1.mesh_ok(&[
        "swarm",
        "init",
        "--autolock",
        "--advertise-addr",
        &h1.addr().to_string(),
    ])?;
    let key = key_in(&out)?;
    ensure!(
        out.contains("Remember to store this key in a password manager"),
        "{out}"
    );
    h1.kill_daemon()?;
    h1.start_daemon()?;
    ensure!(swarm_state(h1)? == "locked", "not locked after restart");
    expect_err(h1, &["swarm", "leave"], "The swarm is locked on this node")?;
    unlock(h1, &key)?;
    wait_for(
        "the single manager leads again",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok(node_ls(h1).ok().filter(|r| r.len() == 1).map(|_| ())),
    )?;
    Ok(())
}
