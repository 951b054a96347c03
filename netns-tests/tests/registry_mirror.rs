//! `meshd --registry-mirror URL` on a real cluster: a Docker Hub image (`app:v1`, that is
//! `docker.io/library/app:v1`) is resolved and pulled through the mirror (Debian's
//! `docker-registry` in host 1's namespace, plain HTTP) on every node, with no access to Docker
//! Hub at all; the service is pinned to the mirror's digest under its Docker Hub name, and
//! `mesh image pull` goes through the mirror too. A name the mirror does not have is refused
//! with one clear line (Docker Hub cannot be reached from the test's namespaces).

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::registry::Registry;
use mesh_netns::swarm::{field, form_swarm, host_of, service_ps, task_exec, wait_tasks_running};
use serde_json::Value;

#[test]
fn docker_hub_images_come_through_the_mirror() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = mesh_netns::Cluster::new(mesh_netns::ClusterOpts {
        hosts: 2,
        start_daemons: false,
        name_hint: "mirror",
    })?;
    let reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    let mirror = format!("http://{}", reg.host_port());
    for h in c.hosts() {
        h.start_daemon_with(&["--registry-mirror", &mirror])?;
    }
    form_swarm(&c, 1)?;
    let h1 = c.host(1);
    // A mirror holds Docker Hub's official images under `library/`.
    let digest = reg.push_test_image("library/app", "v1", "mirrored-v1", false)?;

    h1.mesh_ok(&[
        "service", "create", "--name", "app", "--mode", "global", "-d", "app:v1", "sleep", "100000",
    ])?;
    wait_tasks_running(h1, "app", 2, Duration::from_secs(60))?;
    let insp: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "app"])?)?;
    let pinned = insp[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        pinned == format!("docker.io/library/app:v1@{digest}"),
        "pinned as {pinned:?}, the mirror's digest is {digest}"
    );
    let mut nodes = Vec::new();
    for t in service_ps(h1, "app")? {
        if field(&t, "DesiredState") != "Running" {
            continue;
        }
        let node = field(&t, "Node").to_string();
        let h = host_of(&c, &node)?;
        let release = task_exec(h, field(&t, "Name"), &["cat", "/etc/release"])?;
        ensure!(release.trim() == "mirrored-v1", "{release:?} on {node}");
        nodes.push(node);
    }
    nodes.sort();
    nodes.dedup();
    ensure!(
        nodes.len() == 2,
        "the tasks ran on {nodes:?}, expected both nodes"
    );

    // `image pull` takes the same way; a name the mirror lacks fails with one line.
    let h2 = c.host(2);
    h2.mesh_ok(&["image", "pull", "app:v1"])?;
    let ls = h2.mesh_ok(&["image", "ls"])?;
    ensure!(ls.contains("app"), "image ls on h2: {ls}");
    let out = h2.mesh(&["image", "pull", "nothere:v1"])?;
    ensure!(
        !out.success(),
        "a pull of an image nobody has succeeded: {out:?}"
    );
    ensure!(
        out.stderr.trim().lines().count() == 1 && out.stderr.contains("nothere"),
        "the error names the image in one line: {:?}",
        out.stderr
    );
    Ok(())
}
