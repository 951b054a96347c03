//! Secrets and configs on a real cluster (3 hosts: one manager, two workers; images from a
//! real registry):
//!
//! - a secret appears read-only at `/run/secrets/NAME` (and at a chosen target, with its
//!   uid, gid and mode) in the tasks that use it, a config at its path; `inspect` shows a
//!   config's data and never a secret's;
//! - the secret's bytes are found nowhere on the disks: not in the manager's data
//!   directory (the Raft log holds it sealed) nor in any node's data directory or exec root;
//!   a service's environment is in no data directory either (the Raft store is sealed);
//! - a secret in use cannot be removed (Docker's words); `service update --secret-rm`
//!   takes it away from the tasks, after which it can be;
//! - unknown names and duplicates are refused clearly.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::registry::registry_cluster;
use mesh_netns::swarm::{field, host_of, running_task, service_ps, task_exec, wait_tasks_running};
use mesh_netns::wait_for;
use serde_json::Value;

/// Every regular file under `dir` whose content contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > 200_000 {
                return found;
            }
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle) {
                        found.push(p.display().to_string());
                    }
                }
            }
        }
    }
    found
}

#[test]
fn secrets_reach_only_their_tasks_and_never_a_disk() -> Result<()> {
    let Some((c, reg)) = registry_cluster(3, 1, "sec")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let repo = format!("{}/app", reg.host_port());
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{repo}:v1");

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let secret = format!("pw-{}-{nanos}-x7Qz", std::process::id());
    let file = c.base_dir().join("db_pw.txt");
    std::fs::write(&file, &secret)?;
    let conf = c.base_dir().join("app.conf");
    std::fs::write(&conf, "listen 8080\n")?;

    let id = h1.mesh_ok(&["secret", "create", "db_pw", &file.display().to_string()])?;
    ensure!(id.trim().len() >= 12, "secret create printed {id:?}");
    h1.mesh_ok(&[
        "config",
        "create",
        "--label",
        "app=demo",
        "app_conf",
        &conf.display().to_string(),
    ])?;
    // Duplicates and bad names are refused.
    let dup = h1.mesh(&["secret", "create", "db_pw", &file.display().to_string()])?;
    ensure!(
        !dup.success() && dup.stderr.contains("secret db_pw already exists"),
        "{dup:?}"
    );
    let bad = h1.mesh(&["secret", "create", "bad/name", &file.display().to_string()])?;
    ensure!(
        !bad.success() && bad.stderr.contains("invalid name"),
        "{bad:?}"
    );

    // inspect: no secret data; a config's data.
    let si: Value = serde_json::from_str(&h1.mesh_ok(&["secret", "inspect", "db_pw"])?)?;
    ensure!(si[0]["Spec"]["Name"] == "db_pw", "{si}");
    ensure!(
        si[0]["Spec"].get("Data").is_none(),
        "secret data shown: {si}"
    );
    ensure!(!si.to_string().contains(&secret));
    let ci: Value = serde_json::from_str(&h1.mesh_ok(&["config", "inspect", "app_conf"])?)?;
    ensure!(ci[0]["Spec"]["Data"] == "bGlzdGVuIDgwODAK", "{ci}");
    ensure!(ci[0]["Spec"]["Labels"]["app"] == "demo", "{ci}");
    let ls = h1.mesh_ok(&["secret", "ls"])?;
    ensure!(ls.starts_with("ID") && ls.contains("db_pw"), "{ls}");

    // An unknown secret is refused at create.
    let unknown = h1.mesh(&[
        "service", "create", "--name", "nope", "--secret", "nope", "-d", &image, "sleep", "1000",
    ])?;
    ensure!(
        !unknown.success() && unknown.stderr.contains("secret not found: nope"),
        "{unknown:?}"
    );

    // One task, on host 2 only.
    let h2_name = c.host(2).name().to_string();
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "app",
        "--constraint",
        &format!("node.hostname=={h2_name}"),
        "--env",
        &format!("APP_MARK=env-{nanos}-q9"),
        "--secret",
        "db_pw",
        "--secret",
        "source=db_pw,target=/etc/app/pw,uid=33,gid=33,mode=0400",
        "--config",
        "source=app_conf,target=/etc/app.conf",
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    wait_tasks_running(h1, "app", 1, Duration::from_secs(60))?;
    let (i, task) = running_task(&c, "app")?;
    ensure!(i == 2, "the task runs on host {i}, not 2");
    let h2 = c.host(2);
    ensure!(task_exec(h2, &task, &["cat", "/run/secrets/db_pw"])? == secret);
    ensure!(task_exec(h2, &task, &["cat", "/etc/app/pw"])? == secret);
    ensure!(task_exec(h2, &task, &["cat", "/etc/app.conf"])? == "listen 8080\n");
    let stat = task_exec(h2, &task, &["stat", "-c", "%u %g %a", "/etc/app/pw"])?;
    ensure!(stat.trim() == "33 33 400", "{stat}");
    let stat = task_exec(h2, &task, &["stat", "-c", "%u %g %a", "/run/secrets/db_pw"])?;
    ensure!(stat.trim() == "0 0 444", "{stat}");
    // Read-only, on a tmpfs.
    ensure!(task_exec(h2, &task, &["sh", "-c", "echo x > /run/secrets/db_pw"]).is_err());
    let mounts = task_exec(h2, &task, &["cat", "/proc/self/mounts"])?;
    ensure!(
        mounts
            .lines()
            .any(|l| l.starts_with("tmpfs /run/secrets/db_pw tmpfs ro,")),
        "{mounts}"
    );

    // Never on a disk: not the manager's (sealed in Raft), not the workers'. The Raft store
    // is sealed as a whole: not even the service's environment is in a data directory.
    for h in c.hosts() {
        for dir in [h.data_dir(), h.exec_root()] {
            let found = files_containing(dir, secret.as_bytes());
            ensure!(
                found.is_empty(),
                "the secret is on {}'s disk: {found:?}",
                h.name()
            );
        }
        let env = format!("APP_MARK=env-{nanos}-q9");
        let found = files_containing(h.data_dir(), env.as_bytes());
        ensure!(
            found.is_empty(),
            "the environment is in {}'s data: {found:?}",
            h.name()
        );
    }

    // In use: not removable, in Docker's words.
    let rm = h1.mesh(&["secret", "rm", "db_pw"])?;
    ensure!(
        !rm.success()
            && rm
                .stderr
                .contains("secret 'db_pw' is in use by the following service: app"),
        "{rm:?}"
    );

    // Taken away from the service, then removable.
    h1.mesh_ok(&[
        "service",
        "update",
        "--secret-rm",
        "db_pw",
        "--config-rm",
        "app_conf",
        "-d",
        "app",
    ])?;
    wait_for(
        "the task without the secret",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let Ok((i, task)) = running_task(&c, "app") else {
                return Ok(None);
            };
            let gone = task_exec(c.host(i), &task, &["test", "-e", "/run/secrets/db_pw"]).is_err();
            Ok(gone.then_some(()))
        },
    )?;
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "app"])?)?;
    ensure!(!insp[0]["Spec"].to_string().contains("db_pw"), "{insp}");
    h1.mesh_ok(&["secret", "rm", "db_pw"])?;
    h1.mesh_ok(&["config", "rm", "app_conf"])?;
    ensure!(h1.mesh_ok(&["secret", "ls", "-q"])?.trim().is_empty());
    let gone = h1.mesh(&["secret", "inspect", "db_pw"])?;
    ensure!(
        !gone.success() && gone.stderr.contains("secret db_pw not found"),
        "{gone:?}"
    );
    Ok(())
}

/// Every manager gets the data key: after the leader that sealed a secret is gone, the
/// new leader still opens it for new tasks.
#[test]
fn a_new_leader_opens_the_secrets_of_the_old_one() -> Result<()> {
    let Some((c, reg)) = registry_cluster(3, 3, "seckey")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{}/app:v1", reg.host_port());
    let file = c.base_dir().join("token");
    std::fs::write(&file, "sealed-by-the-first-leader")?;
    h1.mesh_ok(&["secret", "create", "token", &file.display().to_string()])?;
    // The other managers fetch the key within a few seconds of the first secret's key
    // existing (it is made at `swarm init`).
    for h in &c.hosts()[1..] {
        let key = h.data_dir().join("data.key");
        wait_for(
            "the data key on every manager",
            Duration::from_secs(20),
            Duration::from_millis(200),
            || Ok(key.exists().then_some(())),
        )?;
    }
    h1.kill_daemon()?;
    let h2 = c.host(2);
    wait_for(
        "a new leader takes the service",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let out = h2.mesh(&[
                "service",
                "create",
                "--name",
                "app",
                "--secret",
                "token",
                "--replicas",
                "2",
                "-d",
                &image,
                "sleep",
                "100000",
            ])?;
            Ok(out.success().then_some(()))
        },
    )?;
    wait_tasks_running(h2, "app", 2, Duration::from_secs(60))?;
    for t in service_ps(h2, "app")? {
        if field(&t, "DesiredState") != "Running" {
            continue;
        }
        let node = field(&t, "Node");
        let h = host_of(&c, node)?;
        let got = task_exec(h, field(&t, "Name"), &["cat", "/run/secrets/token"])?;
        ensure!(got == "sealed-by-the-first-leader", "{got:?} on {node}");
    }
    Ok(())
}
