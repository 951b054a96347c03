//! Services of images on a real cluster, pulled from a real registry (Debian's
//! `docker-registry` in host 1's namespace, plain HTTP, `meshd --insecure-registry`), with
//! test images built from the host's static busybox (two layers: a whiteout, an opaque
//! directory; see `netns-tests/src/testimage.py`):
//!
//! - a service of an image on three hosts answers through the routing mesh, its VIP and
//!   `tasks.` records; its tasks see the image's files and not the host's, run as pid 1 in
//!   their own pid namespace, get the image's environment and working directory;
//! - the tag is pinned to its digest at create: a tag moved afterwards changes no task;
//! - an unknown image and a stopped registry reject tasks with the registry's reason, and a
//!   registry back up lets the service converge;
//! - `service rm` leaves no task state, upper directory or mount behind; `image rm` then
//!   untags the image no task uses, and `image ls` no longer lists it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::registry::registry_cluster;
use mesh_netns::swarm::{field, http_get, running_task, service_ps, task_exec, wait_tasks_running};
use mesh_netns::wait_for;
use serde_json::Value;

#[test]
fn an_image_service_runs_everywhere_with_the_image_s_files() -> Result<()> {
    let Some((c, reg)) = registry_cluster(3, 3, "img")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let repo = format!("{}/app", reg.host_port());
    let digest = reg.push_test_image("app", "v1", "v1", false)?;
    h1.mesh_ok(&["network", "create", "-d", "overlay", "appnet"])?;

    // Docker's command line: IMAGE, then a command replacing the image's Cmd.
    let image = format!("{repo}:v1");
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "appnet",
        "--publish",
        "8080:80",
        "-d",
        &image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/srv",
    ])?;
    wait_tasks_running(h1, "web", 3, Duration::from_secs(60))?;

    // Pinned to the digest the registry gave; ps and ls show the tag.
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "web"])?)?;
    let pinned = insp[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        pinned == format!("{image}@{digest}"),
        "pinned {pinned:?}, pushed {digest}"
    );
    ensure!(
        service_ps(h1, "web")?
            .iter()
            .all(|t| field(t, "Image") == image),
        "{:?}",
        service_ps(h1, "web")?
    );
    let ls = h1.mesh_ok(&["service", "ls"])?;
    ensure!(ls.contains("IMAGE") && ls.contains(&image), "{ls}");

    // The routing mesh answers on every node with the image's file.
    for h in c.hosts() {
        let body = http_get(&c, &h.addr().to_string(), 8080)?;
        ensure!(body == "hello from v1\n", "via {}: {body:?}", h.name());
    }

    // Inside a task: the image's root, not the host's.
    let (i, task) = running_task(&c, "web")?;
    let h = c.host(i);
    ensure!(task_exec(h, &task, &["cat", "/etc/release"])? == "v1\n");
    let ls_root = task_exec(h, &task, &["ls", "/"])?;
    ensure!(
        !ls_root.contains("doomed"),
        "the whiteout did not hide /doomed: {ls_root}"
    );
    ensure!(
        task_exec(h, &task, &["ls", "/keep"])?
            .split_whitespace()
            .collect::<Vec<_>>()
            == ["c"]
    );
    let host_only = task_exec(h, &task, &["test", "-e", "/etc/debian_version"]);
    ensure!(
        host_only.is_err(),
        "the host's /etc/debian_version is visible: {host_only:?}"
    );
    let init = task_exec(h, &task, &["cat", "/proc/1/cmdline"])?;
    ensure!(init.starts_with("httpd"), "pid 1 is {init:?}");
    let env = task_exec(h, &task, &["env"])?;
    ensure!(env.contains("IMAGE_VAR=from-image"), "{env}");
    ensure!(env.contains("MESH_SERVICE_NAME=web"), "{env}");
    // The image's WorkingDir (/srv): the task's process runs there, and so does an exec.
    let cwd = task_exec(h, &task, &["readlink", "/proc/1/cwd"])?;
    ensure!(cwd == "/srv\n", "the task's process runs in {cwd:?}");
    let pwd = task_exec(h, &task, &["sh", "-c", "pwd"])?;
    ensure!(pwd == "/srv\n", "an exec runs in {pwd:?}");

    // From another image task: the service's name (VIP) and tasks.web through the DNS.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "client",
        "--network",
        "appnet",
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    wait_tasks_running(h1, "client", 1, Duration::from_secs(60))?;
    let (ci, ctask) = running_task(&c, "client")?;
    let ch = c.host(ci);
    let got = task_exec(
        ch,
        &ctask,
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web 80",
        ],
    )?;
    ensure!(got.contains("hello from v1"), "through the VIP: {got:?}");
    let got = task_exec(
        ch,
        &ctask,
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc tasks.web 80",
        ],
    )?;
    ensure!(got.contains("hello from v1"), "through tasks.web: {got:?}");

    // The tag moves; the service's tasks keep the pinned digest, old and new.
    reg.push_test_image("app", "v1", "v2", false)?;
    h1.mesh_ok(&["service", "scale", "-d", "web=5"])?;
    wait_tasks_running(h1, "web", 5, Duration::from_secs(60))?;
    for _ in 0..10 {
        let body = http_get(&c, &c.host(2).addr().to_string(), 8080)?;
        ensure!(
            body == "hello from v1\n",
            "a task runs the moved tag: {body:?}"
        );
    }
    // An update to the moved tag pins the new digest.
    h1.mesh_ok(&["service", "update", "--image", &image, "web"])?;
    wait_for(
        "every node serves v2",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            let all = c
                .hosts()
                .iter()
                .map(|h| http_get(&c, &h.addr().to_string(), 8080))
                .collect::<Result<Vec<_>>>()?;
            Ok(all.iter().all(|b| b == "hello from v2\n").then_some(()))
        },
    )?;

    // An image a task of the node uses is not removed from its store.
    let out = h1.mesh(&["image", "rm", &image])?;
    ensure!(
        !out.success()
            && out
                .stderr
                .contains("conflict: unable to remove repository reference"),
        "{out:?}"
    );
    let listed = h1.mesh_json(&["image", "ls"])?;
    ensure!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["Repository"] == repo.as_str())),
        "{listed}"
    );

    // service rm leaves no task directory (with its upper directory) on any node.
    h1.mesh_ok(&["service", "rm", "web", "client"])?;
    wait_for(
        "no task state left",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let left: usize = c
                .hosts()
                .iter()
                .map(|h| {
                    std::fs::read_dir(h.exec_root().join("tasks"))
                        .map(|d| d.count())
                        .unwrap_or(0)
                })
                .sum();
            Ok((left == 0).then_some(()))
        },
    )?;

    // Unused now: `image rm` untags it and deletes the image and its layers, as Docker
    // reports it, and `image ls` no longer lists it (its ID column is the short form).
    let before = h1.mesh_json(&["image", "ls"])?;
    let id = before
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| field(i, "Repository") == repo && field(i, "Tag") == "v1")
        .map(|i| field(i, "ID").to_string())
        .with_context(|| format!("image ls before rm: {before}"))?;
    let out = h1.mesh(&["image", "rm", &image])?;
    ensure!(out.success(), "image rm of an unused image: {out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let untagged = lines
        .iter()
        .take_while(|l| l.starts_with("Untagged: "))
        .count();
    ensure!(
        lines.first() == Some(&format!("Untagged: {image}").as_str())
            && lines[1..untagged]
                .iter()
                .all(|l| l.starts_with(&format!("Untagged: {repo}@sha256:")))
            && lines
                .get(untagged)
                .is_some_and(|l| l.starts_with(&format!("Deleted: sha256:{id}")))
            && lines[untagged..]
                .iter()
                .all(|l| l.starts_with("Deleted: sha256:")),
        "image rm printed {out:?} (image ID {id})"
    );
    let listed = h1.mesh_json(&["image", "ls"])?;
    let rows = listed.as_array().context("image ls is an array")?;
    ensure!(
        !rows
            .iter()
            .any(|i| field(i, "Repository") == repo && field(i, "Tag") == "v1"),
        "image ls still lists {image}: {listed}"
    );
    let out = h1.mesh(&["image", "rm", &image])?;
    ensure!(
        !out.success()
            && out.stderr.trim() == format!("Error response from daemon: No such image: {image}"),
        "a second image rm: {out:?}"
    );
    Ok(())
}

#[test]
fn unknown_images_and_a_stopped_registry_are_rejected_clearly_then_recover() -> Result<()> {
    let Some((c, mut reg)) = registry_cluster(2, 2, "imgerr")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let repo = format!("{}/app", reg.host_port());
    reg.push_test_image("app", "v1", "v1", true)?;

    // An image the registry does not have: created with Docker's warning, tasks rejected
    // with the registry's reason.
    let out = h1.mesh(&[
        "service",
        "create",
        "--name",
        "ghost",
        "-d",
        &format!("{repo}/nope:1"),
        "sleep",
        "1000",
    ])?;
    ensure!(out.success(), "{out:?}");
    ensure!(
        out.stderr.contains("could not be accessed on a registry"),
        "{out:?}"
    );
    wait_for(
        "ghost rejected",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            Ok(service_ps(h1, "ghost")?
                .iter()
                .find(|t| field(t, "CurrentState").starts_with("Rejected"))
                .map(|t| field(t, "Error").to_string()))
        },
    )
    .and_then(|err| {
        ensure!(
            err.contains("manifest unknown") || err.contains("No such image"),
            "rejected for {err:?}"
        );
        Ok(())
    })?;
    h1.mesh_ok(&["service", "rm", "ghost"])?;

    // The registry stops: the tag cannot be pinned, tasks are rejected for the connection;
    // once it is back, the restart policy brings the service up.
    reg.stop()?;
    let out = h1.mesh(&[
        "service",
        "create",
        "--name",
        "later",
        "--replicas",
        "2",
        "--restart-delay",
        "1s",
        "-d",
        &format!("{repo}:v1"),
        "sleep",
        "1000",
    ])?;
    ensure!(
        out.success() && out.stderr.contains("could not be accessed"),
        "{out:?}"
    );
    let err = wait_for(
        "later rejected",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            Ok(service_ps(h1, "later")?
                .iter()
                .find(|t| field(t, "CurrentState").starts_with("Rejected"))
                .map(|t| field(t, "Error").to_string()))
        },
    )?;
    // The reason names the registry and the failure, as Docker's `Get "URL": dial tcp ...:
    // connect: connection refused` does.
    ensure!(
        err.contains(&format!("Get \"http://{}/v2/", reg.host_port()))
            && err.to_ascii_lowercase().contains("connection refused"),
        "rejected for {err:?}"
    );
    reg.restart()?;
    wait_tasks_running(h1, "later", 2, Duration::from_secs(60))?;
    Ok(())
}
