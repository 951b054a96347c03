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
//! - `service rm` leaves no task state, upper directory or mount behind.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::registry::Registry;
use mesh_netns::swarm::form_swarm;
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};
use serde_json::Value;

fn ps(h: &Host, svc: &str) -> Result<Vec<Value>> {
    h.mesh_json(&["service", "ps", svc])?
        .as_array()
        .cloned()
        .context("ps is an array")
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

fn running(h: &Host, svc: &str) -> Result<usize> {
    Ok(ps(h, svc)?
        .iter()
        .filter(|t| {
            s(t, "DesiredState") == "Running" && s(t, "CurrentState").starts_with("Running")
        })
        .count())
}

fn wait_running(h: &Host, svc: &str, n: usize, within: Duration) -> Result<()> {
    wait_for(
        &format!("{svc}: {n} tasks running"),
        within,
        Duration::from_millis(250),
        || Ok((running(h, svc)? == n).then_some(())),
    )
    .with_context(|| format!("service ps {svc}: {:?}", ps(h, svc).unwrap_or_default()))
}

/// `mesh exec` into the first running task of `svc` on `h`; stdout.
fn exec_in(h: &Host, task: &str, argv: &[&str]) -> Result<String> {
    let mut a = vec!["exec", task, "--"];
    a.extend_from_slice(argv);
    h.mesh_ok(&a)
}

/// A running task of `svc` on host `h`'s node, by name (`svc.N`).
fn local_task(c: &Cluster, svc: &str) -> Result<(usize, String)> {
    for t in ps(c.host(1), svc)? {
        if s(&t, "CurrentState").starts_with("Running") && s(&t, "DesiredState") == "Running" {
            let node = s(&t, "Node");
            let i = c
                .hosts()
                .iter()
                .position(|h| h.name() == node)
                .context("task on an unknown node")?;
            return Ok((i + 1, s(&t, "Name").to_string()));
        }
    }
    anyhow::bail!("no running task of {svc}")
}

/// A cluster of `hosts` with a registry on host 1 and every meshd trusting it over HTTP;
/// host 1 initialises the swarm, the others join as managers up to 3.
fn setup(hosts: usize, hint: &'static str) -> Result<Option<(Cluster, Registry)>> {
    if !require_root()? {
        return Ok(None);
    }
    let c = Cluster::new(ClusterOpts {
        hosts,
        start_daemons: false,
        name_hint: hint,
    })?;
    let reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    let insecure = reg.host_port();
    for h in c.hosts() {
        h.start_daemon_with(&["--insecure-registry", &insecure])?;
    }
    form_swarm(&c, hosts.min(3))?;
    Ok(Some((c, reg)))
}

/// An HTTP GET of `/` through the routing mesh, from the underlay client; the body.
fn http_via(c: &Cluster, addr: &str, port: u16) -> Result<String> {
    let out = c.client_exec_timeout(
        &["curl", "-s", "-m", "3", &format!("http://{addr}:{port}/")],
        Duration::from_secs(10),
    )?;
    ensure!(out.status.success(), "curl {addr}:{port}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn an_image_service_runs_everywhere_with_the_image_s_files() -> Result<()> {
    let Some((c, reg)) = setup(3, "img")? else {
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
    wait_running(h1, "web", 3, Duration::from_secs(60))?;

    // Pinned to the digest the registry gave; ps and ls show the tag.
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "web"])?)?;
    let pinned = insp[0]["Spec"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        pinned == format!("{image}@{digest}"),
        "pinned {pinned:?}, pushed {digest}"
    );
    ensure!(
        ps(h1, "web")?.iter().all(|t| s(t, "Image") == image),
        "{:?}",
        ps(h1, "web")?
    );
    let ls = h1.mesh_ok(&["service", "ls"])?;
    ensure!(ls.contains("IMAGE") && ls.contains(&image), "{ls}");

    // The routing mesh answers on every node with the image's file.
    for h in c.hosts() {
        let body = http_via(&c, &h.addr().to_string(), 8080)?;
        ensure!(body == "hello from v1\n", "via {}: {body:?}", h.name());
    }

    // Inside a task: the image's root, not the host's.
    let (i, task) = local_task(&c, "web")?;
    let h = c.host(i);
    ensure!(exec_in(h, &task, &["cat", "/etc/release"])? == "v1\n");
    let ls_root = exec_in(h, &task, &["ls", "/"])?;
    ensure!(
        !ls_root.contains("doomed"),
        "the whiteout did not hide /doomed: {ls_root}"
    );
    ensure!(
        exec_in(h, &task, &["ls", "/keep"])?
            .split_whitespace()
            .collect::<Vec<_>>()
            == ["c"]
    );
    let host_only = exec_in(h, &task, &["test", "-e", "/etc/debian_version"]);
    ensure!(
        host_only.is_err(),
        "the host's /etc/debian_version is visible: {host_only:?}"
    );
    let init = exec_in(h, &task, &["cat", "/proc/1/cmdline"])?;
    ensure!(init.starts_with("httpd"), "pid 1 is {init:?}");
    let env = exec_in(h, &task, &["env"])?;
    ensure!(env.contains("IMAGE_VAR=from-image"), "{env}");
    ensure!(env.contains("MESH_SERVICE_NAME=web"), "{env}");

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
    wait_running(h1, "client", 1, Duration::from_secs(60))?;
    let (ci, ctask) = local_task(&c, "client")?;
    let ch = c.host(ci);
    let got = exec_in(
        ch,
        &ctask,
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web 80",
        ],
    )?;
    ensure!(got.contains("hello from v1"), "through the VIP: {got:?}");
    let got = exec_in(
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
    wait_running(h1, "web", 5, Duration::from_secs(60))?;
    for _ in 0..10 {
        let body = http_via(&c, &c.host(2).addr().to_string(), 8080)?;
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
                .map(|h| http_via(&c, &h.addr().to_string(), 8080))
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
    Ok(())
}

#[test]
fn unknown_images_and_a_stopped_registry_are_rejected_clearly_then_recover() -> Result<()> {
    let Some((c, mut reg)) = setup(2, "imgerr")? else {
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
            Ok(ps(h1, "ghost")?
                .iter()
                .find(|t| s(t, "CurrentState").starts_with("Rejected"))
                .map(|t| s(t, "Error").to_string()))
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
    wait_for(
        "later rejected",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            Ok(ps(h1, "later")?
                .iter()
                .any(|t| s(t, "CurrentState").starts_with("Rejected"))
                .then_some(()))
        },
    )?;
    reg.restart()?;
    wait_running(h1, "later", 2, Duration::from_secs(60))?;
    Ok(())
}
