//! The lifecycle of image tasks on a real cluster, with a real registry (Debian's
//! `docker-registry` in host 1's namespace, `meshd --insecure-registry`) and the test image of
//! `netns-tests/src/testimage.py`:
//!
//! - restart safety: a SIGKILLed meshd leaves its image tasks running and their published
//!   port answering; the next meshd adopts them (same task IDs, same processes, no
//!   duplicate); `service rm` then leaves no task directory and no mount of the exec root in
//!   any mount namespace;
//! - a named volume survives a task restart on the same node (the restart policy replaces a
//!   killed task, the new one sees what the old one wrote);
//! - `mesh image load` of a `docker save` tarball: listed, runnable by a service with no
//!   registry at all, kept by `image prune -f` while a task uses it (an unused pulled image
//!   is removed);
//! - `--read-only` with `--user`: the task runs as the image's user, its root is read-only
//!   and a tmpfs mount is writable.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::procs::alive;
use mesh_netns::registry::{registry_cluster, save_test_image};
use mesh_netns::swarm::{
    field, http_get, running_tasks, service_ps, task_exec, wait_tasks_running,
};
use mesh_netns::{wait_for, Host};
use serde_json::Value;

/// Lines of every mount namespace's mountinfo (each namespace once, this process's
/// included) that mention `needle`.
fn mount_lines_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut pids = vec!["self".to_string()];
    pids.extend(
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit())),
    );
    for pid in pids {
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        out.extend(
            info.lines()
                .filter(|l| l.contains(&needle))
                .map(|l| format!("[{pid}] {l}")),
        );
    }
    out
}

/// Lines of `/proc/<pid>/mountinfo` mentioning `needle`.
fn mountinfo_mentioning(pid: &str, needle: &Path) -> Result<usize> {
    let needle = needle.to_string_lossy().into_owned();
    let info = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    Ok(info.lines().filter(|l| l.contains(&needle)).count())
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The task directories under the host's `<exec_root>/tasks`.
fn task_dirs(h: &Host) -> Vec<String> {
    entries(&h.exec_root().join("tasks"))
}

/// The image tasks' writable layers under the host's `<data_dir>/rw`.
fn rw_layers(h: &Host) -> Vec<String> {
    entries(&h.data_dir().join("rw"))
}

fn ids(rows: &[Value]) -> BTreeSet<String> {
    rows.iter().map(|t| field(t, "ID").to_string()).collect()
}

#[test]
fn image_tasks_survive_a_meshd_sigkill_are_adopted_and_leave_nothing_behind() -> Result<()> {
    let Some((c, reg)) = registry_cluster(2, 1, "imgadopt")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{}/app:v1", reg.host_port());
    let svc = "lc-adopt-web";
    let tasks_root = h2.exec_root().join("tasks");
    // A task's mounts name its task directory or the layers of h2's image store (the
    // overlay's lower directories).
    let images_root = h2.data_dir().join("images");
    let task_mounts = || {
        let mut lines = mount_lines_mentioning(&tasks_root);
        lines.extend(mount_lines_mentioning(&images_root));
        lines
    };
    // Nothing mentions them before the service.
    let before = task_mounts();
    ensure!(before.is_empty(), "mounts before the service: {before:#?}");
    let self_before = mountinfo_mentioning("self", h2.exec_root())?;

    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        svc,
        "--replicas",
        "2",
        "--constraint",
        "node.hostname==h2",
        "--publish",
        "8081:80",
        "-d",
        &image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/srv",
    ])?;
    let rows = wait_tasks_running(h1, svc, 2, Duration::from_secs(60))?;
    ensure!(rows.iter().all(|t| field(t, "Node") == "h2"), "{rows:?}");
    let adopted = ids(&rows);
    let procs = adopted
        .iter()
        .map(|id| h2.task_process(id))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        procs.iter().all(|&(p, st)| alive(p, st)),
        "task processes: {procs:?}"
    );
    let via_h2 = h2.addr().to_string();
    ensure!(http_get(&c, &via_h2, 8081)? == "hello from v1\n");
    // The probe sees the tasks' own mounts (in their mount namespaces) while they run.
    let during = task_mounts();
    ensure!(
        !during.is_empty(),
        "no mount mentions {} or {} while tasks run",
        tasks_root.display(),
        images_root.display()
    );

    // meshd SIGKILLed: the tasks run on and the routing mesh still answers through h2.
    h2.kill_daemon()?;
    for &(p, st) in &procs {
        ensure!(alive(p, st), "task process {p} died with meshd: {procs:?}");
    }
    for _ in 0..5 {
        let body = http_get(&c, &via_h2, 8081)?;
        ensure!(body == "hello from v1\n", "while meshd is down: {body:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The next meshd adopts them: same IDs, same processes, no duplicate.
    h2.restart_daemon()?;
    wait_for(
        "h2's tasks adopted (same IDs running, nothing else)",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let all = service_ps(h1, svc)?;
            let r = running_tasks(h1, svc)?;
            let desired = all
                .iter()
                .filter(|t| field(t, "DesiredState") == "Running")
                .count();
            Ok((ids(&r) == adopted && desired == 2).then_some(()))
        },
    )
    .with_context(|| format!("service ps: {:?}", service_ps(h1, svc).unwrap_or_default()))?;
    for (id, &(p, st)) in adopted.iter().zip(&procs) {
        ensure!(
            h2.task_process(id)? == (p, st) && alive(p, st),
            "task {id} was restarted, not adopted"
        );
    }
    // Their writable layers (on disk, in the data directory) survived the restart.
    ensure!(
        rw_layers(h2) == task_dirs(h2) && rw_layers(h2).len() == 2,
        "writable layers {:?}, task directories {:?}",
        rw_layers(h2),
        task_dirs(h2)
    );
    // A few seconds later still the same: no replacement was scheduled.
    std::thread::sleep(Duration::from_secs(3));
    let all = service_ps(h1, svc)?;
    ensure!(
        all.len() == 2 && ids(&running_tasks(h1, svc)?) == adopted,
        "after adoption: {all:?}"
    );
    for _ in 0..3 {
        ensure!(http_get(&c, &via_h2, 8081)? == "hello from v1\n");
    }
    let meshd = h2.daemon_pid().context("meshd is running")?.to_string();
    let meshd_before = mountinfo_mentioning(&meshd, h2.exec_root())?;

    // rm: no task directory, no mount of the exec root left anywhere.
    h1.mesh_ok(&["service", "rm", svc])?;
    wait_for(
        "no task directory left on h2",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || Ok(task_dirs(h2).is_empty().then_some(())),
    )
    .with_context(|| format!("left: {:?}", task_dirs(h2)))?;
    ensure!(
        rw_layers(h2).is_empty(),
        "writable layers left: {:?}",
        rw_layers(h2)
    );
    wait_for(
        "no mount of h2's task directories or layers left",
        Duration::from_secs(15),
        Duration::from_millis(250),
        || {
            let left = task_mounts();
            ensure!(left.is_empty(), "left: {left:#?}");
            Ok(Some(()))
        },
    )?;
    for &(p, st) in &procs {
        ensure!(!alive(p, st), "task process {p} outlived service rm");
    }
    ensure!(
        mountinfo_mentioning("self", h2.exec_root())? == self_before,
        "the test's mount namespace gained mounts of {}",
        h2.exec_root().display()
    );
    ensure!(
        mountinfo_mentioning(&meshd, h2.exec_root())? == meshd_before,
        "meshd's mount namespace: {meshd_before} lines before rm, now {}",
        mountinfo_mentioning(&meshd, h2.exec_root())?
    );
    Ok(())
}

#[test]
fn a_named_volume_survives_a_task_restart_on_the_same_node() -> Result<()> {
    let Some((c, reg)) = registry_cluster(2, 1, "imgvol")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{}/app:v1", reg.host_port());
    let svc = "lc-vol-app";
    let volume = "lc-vol-data";
    let mount = format!("type=volume,source={volume},target=/data");
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        svc,
        "--constraint",
        "node.hostname==h2",
        "--mount",
        &mount,
        "--restart-delay",
        "1s",
        "-d",
        &image,
        "sh",
        "-c",
        "echo start >> /data/log; exec sleep 100000",
    ])?;
    let first = wait_tasks_running(h1, svc, 1, Duration::from_secs(60))?;
    let first_id = field(&first[0], "ID").to_string();
    ensure!(field(&first[0], "Node") == "h2", "{first:?}");
    let host_log = h2
        .data_dir()
        .join("volumes")
        .join(volume)
        .join("_data")
        .join("log");
    wait_for(
        "the first start's line",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((task_exec(h2, &first_id, &["cat", "/data/log"])? == "start\n").then_some(())),
    )?;

    // The task's process dies; the restart policy starts a new task on h2.
    let (pid, start) = h2.task_process(&first_id)?;
    ensure!(alive(pid, start));
    // SAFETY: plain syscall on the task's pid, just checked against its start time.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let second = wait_for(
        "a replacement task running",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let r = running_tasks(h1, svc)?;
            Ok((r.len() == 1 && field(&r[0], "ID") != first_id).then_some(r))
        },
    )
    .with_context(|| format!("service ps: {:?}", service_ps(h1, svc).unwrap_or_default()))?;
    let second_id = field(&second[0], "ID").to_string();
    ensure!(field(&second[0], "Node") == "h2", "{second:?}");

    let log = wait_for(
        "the second start's line",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let log = task_exec(h2, &second_id, &["cat", "/data/log"])?;
            Ok((log.lines().count() >= 2).then_some(log))
        },
    )?;
    ensure!(
        log == "start\nstart\n",
        "/data/log in the new task: {log:?}"
    );
    let on_host =
        fs::read_to_string(&host_log).with_context(|| format!("reading {}", host_log.display()))?;
    ensure!(
        on_host == "start\nstart\n",
        "{}: {on_host:?}",
        host_log.display()
    );

    // The named volume outlives the service (Docker's local driver keeps it).
    h1.mesh_ok(&["service", "rm", svc])?;
    wait_for(
        "no task directory left on h2",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || Ok(task_dirs(h2).is_empty().then_some(())),
    )?;
    ensure!(
        fs::read_to_string(&host_log)? == "start\nstart\n",
        "the volume went with the service"
    );
    Ok(())
}

#[test]
fn a_loaded_image_runs_without_a_registry_and_prune_keeps_it_while_used() -> Result<()> {
    let Some((c, mut reg)) = registry_cluster(1, 1, "imgload")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let tar = c.base_dir().join("loaded.tar");
    let id = save_test_image(
        &c.base_dir().join("save"),
        "loaded/app",
        "v1",
        "loaded",
        &tar,
    )?;
    let short = id.trim_start_matches("sha256:")[..12].to_string();

    let out = h1.mesh_ok(&["image", "load", "-i", &tar.to_string_lossy()])?;
    ensure!(
        out.lines().any(|l| l == "Loaded image: loaded/app:v1"),
        "image load printed {out:?}"
    );
    let listed = |h: &Host| -> Result<Vec<(String, String, String)>> {
        Ok(h.mesh_json(&["image", "ls"])?
            .as_array()
            .context("image ls is an array")?
            .iter()
            .map(|i| {
                (
                    field(i, "Repository").to_string(),
                    field(i, "Tag").to_string(),
                    field(i, "ID").to_string(),
                )
            })
            .collect())
    };
    let ls = listed(h1)?;
    ensure!(
        ls.contains(&("loaded/app".into(), "v1".into(), short.clone())),
        "image ls: {ls:?}"
    );

    // A second image, pulled from the registry: unused, for prune.
    reg.push_test_image("app", "v2", "v2", false)?;
    let other_repo = format!("{}/app", reg.host_port());
    let other = format!("{other_repo}:v2");
    h1.mesh_ok(&["image", "pull", &other])?;
    ensure!(
        listed(h1)?
            .iter()
            .any(|(r, t, _)| *r == other_repo && t == "v2"),
        "image ls after pull: {:?}",
        listed(h1)?
    );

    // No registry at all from here on: the service runs the loaded image.
    reg.stop()?;
    let svc = "lc-loaded-web";
    let out = h1.mesh(&[
        "service",
        "create",
        "--name",
        svc,
        "--constraint",
        "node.hostname==h1",
        "--publish",
        "8082:80",
        "-d",
        "loaded/app:v1",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/srv",
    ])?;
    ensure!(out.success(), "{out:?}");
    ensure!(
        out.stderr.contains("could not be accessed on a registry"),
        "no warning that the tag is not pinned: {out:?}"
    );
    wait_tasks_running(h1, svc, 1, Duration::from_secs(60))?;
    let body = http_get(&c, &h1.addr().to_string(), 8082)?;
    ensure!(body == "hello from loaded\n", "{body:?}");

    // prune keeps what the running task uses, removes the unused pulled image.
    let out = h1.mesh_ok(&["image", "prune", "-f"])?;
    let ls = listed(h1)?;
    ensure!(
        ls.iter().any(|(r, t, _)| r == "loaded/app" && t == "v1"),
        "prune removed the image in use: {out}\nimage ls: {ls:?}"
    );
    ensure!(
        !ls.iter().any(|(r, _, _)| *r == other_repo),
        "prune kept the unused image: {out}\nimage ls: {ls:?}"
    );
    ensure!(out.contains("Total reclaimed space"), "{out}");
    // The task is unaffected.
    ensure!(http_get(&c, &h1.addr().to_string(), 8082)? == "hello from loaded\n");
    h1.mesh_ok(&["service", "rm", svc])?;
    Ok(())
}

#[test]
fn a_read_only_root_with_a_user_and_a_writable_tmpfs() -> Result<()> {
    let Some((c, reg)) = registry_cluster(1, 1, "imgro")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("app", "v1", "v1", true)?;
    let image = format!("{}/app:v1", reg.host_port());
    let svc = "lc-ro-app";
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        svc,
        "--read-only",
        "--user",
        "app",
        "--mount",
        "type=tmpfs,target=/tmp",
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    let rows = wait_tasks_running(h1, svc, 1, Duration::from_secs(60))?;
    let task = field(&rows[0], "Name").to_string();

    let uid = task_exec(h1, &task, &["id", "-u"])?;
    ensure!(uid.trim() == "1000", "id -u: {uid:?}");
    let ids = task_exec(h1, &task, &["id"])?;
    ensure!(ids.contains("gid=1000"), "id: {ids:?}");
    // The command itself runs as the user too.
    let status = task_exec(h1, &task, &["cat", "/proc/1/status"])?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("1000")),
        "pid 1: {status}"
    );

    // The root is read-only (also where the user could write otherwise: its home /srv).
    for path in ["/x", "/srv/x"] {
        let out = h1.mesh(&["exec", &task, "--", "touch", path])?;
        ensure!(!out.success(), "touch {path} succeeded on a read-only root");
        ensure!(
            out.stderr.contains("Read-only file system"),
            "touch {path}: {out:?}"
        );
    }
    let mounts = task_exec(h1, &task, &["cat", "/proc/mounts"])?;
    let tmp = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/tmp"))
        .with_context(|| format!("no /tmp mount: {mounts}"))?;
    ensure!(tmp.starts_with("tmpfs "), "/tmp: {tmp}");

    // The tmpfs is writable, by the user.
    let out = task_exec(
        h1,
        &task,
        &[
            "sh",
            "-c",
            "echo hi > /tmp/x && cat /tmp/x && stat -c %u /tmp/x",
        ],
    )?;
    ensure!(out == "hi\n1000\n", "writing /tmp: {out:?}");

    h1.mesh_ok(&["service", "rm", svc])?;
    wait_for(
        "no task directory left",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || Ok(task_dirs(h1).is_empty().then_some(())),
    )?;
    Ok(())
}
