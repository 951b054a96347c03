//! `mesh stack` on a real 3-host cluster (one manager, two workers) with images from a real
//! registry, from a compose file written exactly as for Docker (the registry's address comes
//! from the `.env` file next to it):
//!
//! - `front`, an HTTP server published in ingress mode with a secret and a config, whose CGI
//!   calls `back` by name on an internal network; `back`, two replicas with a health check,
//!   writes to a named volume; `agent`, a global service placed on workers only;
//! - a back end made unhealthy gets no request from one interval on, and is replaced;
//! - the front answers from the underlay through the routing mesh on every node, with the back
//!   end's words;
//! - a redeploy of the same file changes nothing; one with `back` changed rolls `back` only
//!   (the other services' task IDs stay); `--prune` removes a service gone from the file;
//! - bad files (unknown key, wrong type, missing `${VAR?}`) give one line naming the file, the
//!   line and the key, and create nothing;
//! - `stack rm` leaves no service, network, secret or config behind (external ones stay: the
//!   second test).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::registry::registry_cluster;
use mesh_netns::swarm::{field, host_of, http_get, running_tasks, wait_tasks_running};
use mesh_netns::{wait_for, Cluster, Host};

const COMPOSE: &str = r#"version: "3.8"

x-image: &image
  image: ${REGISTRY?REGISTRY must name the registry}/web:v1

services:
  front:
    <<: *image
    command:
      - sh
      - -c
      - |
        mkdir -p /srv/cgi-bin
        printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\nprintf "GET / HTTP/1.0\\r\\n\\r\\n" | nc back 80\n' > /srv/cgi-bin/call
        busybox chmod +x /srv/cgi-bin/call
        exec httpd -f -p 80 -h /srv
    ports:
      - "8090:80"
    networks:
      - frontnet
      - backnet
    secrets:
      - api_key
    configs:
      - source: site
        target: /etc/site.conf
    deploy:
      replicas: 2
      update_config:
        parallelism: 1
        delay: 1s
      restart_policy:
        condition: on-failure

  back:
    <<: *image
    command: ["sh", "-c", "echo \"back says ${GREETING:-hi} from $$(hostname)\" > /srv/index.html; echo kept > /data/marker; exec httpd -f -p 80 -h /srv"]
    environment:
      - MODE=one
    healthcheck:
      test: ["CMD-SHELL", "test ! -e /tmp/sick"]
      interval: 1s
      timeout: 1s
      retries: 1
    deploy:
      replicas: 2
    volumes:
      - backdata:/data
    networks:
      backnet:
        aliases: [backend]

  agent:
    <<: *image
    command: ["sleep", "100000"]
    networks: [backnet]
    deploy:
      mode: global
      placement:
        constraints: [node.role == worker]

networks:
  frontnet:
    driver: overlay
  backnet:
    driver: overlay
    attachable: true

volumes:
  backdata:

secrets:
  api_key:
    file: ./api_key.txt

configs:
  site:
    file: ./site.txt
"#;

/// The running tasks' IDs of `svc`.
fn task_ids(h: &Host, svc: &str) -> Result<BTreeSet<String>> {
    Ok(running_tasks(h, svc)?
        .iter()
        .map(|t| field(t, "ID").to_string())
        .collect())
}

/// Writes `text` as `name` (with the `.env` naming the registry) in the cluster's dir.
fn write(c: &Cluster, name: &str, text: &str) -> Result<String> {
    let p = c.base_dir().join(name);
    std::fs::write(&p, text)?;
    Ok(p.to_string_lossy().into_owned())
}

/// `mesh stack deploy` of a bad file: it fails with one line containing `want`, and
/// creates no stack, service or network.
fn refused(h: &Host, file: &str, want: &str) -> Result<()> {
    let out = h.mesh(&["stack", "deploy", "-c", file, "bad"])?;
    ensure!(!out.success(), "a bad file was deployed: {}", out.stdout);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        lines.len() == 1 && lines[0].contains(want),
        "stderr for {file}: {:?} (wanted one line with {want:?})",
        out.stderr
    );
    ensure!(out.stdout.trim().is_empty(), "stdout: {}", out.stdout);
    let ls = h.mesh_ok(&["stack", "ls"])?;
    ensure!(!ls.contains("bad"), "stack ls after a refused deploy: {ls}");
    let nets = h.mesh_ok(&["network", "ls"])?;
    ensure!(
        !nets.contains("bad_"),
        "networks after a refused deploy: {nets}"
    );
    Ok(())
}

#[test]
fn a_compose_stack_deploys_answers_updates_one_service_and_goes() -> Result<()> {
    let Some((c, reg)) = registry_cluster(3, 1, "stack")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("web", "v1", "v1", false)?;
    std::fs::write(
        c.base_dir().join(".env"),
        format!("REGISTRY={}\n", reg.host_port()),
    )?;
    let file = write(&c, "shop.yml", COMPOSE)?;
    write(&c, "api_key.txt", "key-of-the-shop")?;
    write(&c, "site.txt", "site=shop\n")?;

    let out = h1.mesh_ok(&["stack", "deploy", "-c", &file, "shop"])?;
    for want in [
        "Creating secret shop_api_key",
        "Creating config shop_site",
        "Creating network shop_backnet",
        "Creating network shop_frontnet",
        "Creating service shop_agent",
        "Creating service shop_back",
        "Creating service shop_front",
    ] {
        ensure!(out.contains(want), "deploy printed no {want:?}:\n{out}");
    }
    let within = Duration::from_secs(90);
    wait_tasks_running(h1, "shop_front", 2, within)?;
    wait_tasks_running(h1, "shop_back", 2, within)?;
    let agents = wait_tasks_running(h1, "shop_agent", 2, within)?;
    let workers: BTreeSet<&str> = [c.host(2).name(), c.host(3).name()].into();
    let agent_nodes: BTreeSet<&str> = agents.iter().map(|t| field(t, "Node")).collect();
    ensure!(
        agent_nodes == workers,
        "the global agent runs on {agent_nodes:?}, not on the workers {workers:?}"
    );

    // The front, through the routing mesh of every node, calls the back end by name.
    for h in c.hosts() {
        let addr = h.addr().to_string();
        let body = wait_for(
            &format!("the front through {}'s routing mesh", h.name()),
            Duration::from_secs(30),
            Duration::from_millis(300),
            || {
                let out = c.client_exec_timeout(
                    &[
                        "curl",
                        "-s",
                        "-m",
                        "3",
                        &format!("http://{addr}:8090/cgi-bin/call"),
                    ],
                    Duration::from_secs(10),
                )?;
                let body = String::from_utf8_lossy(&out.stdout).into_owned();
                Ok(body.contains("back says hi").then_some(body))
            },
        )?;
        ensure!(body.contains("200 OK"), "{body}");
        let index = http_get(&c, &addr, 8090)?;
        ensure!(index.contains("hello from v1"), "{index}");
    }

    // The front's secret and config.
    let front_task = running_tasks(h1, "shop_front")?;
    let fh = host_of(&c, field(&front_task[0], "Node"))?;
    let ft = field(&front_task[0], "Name").to_string();
    let key = fh.mesh_ok(&["exec", &ft, "--", "cat", "/run/secrets/api_key"])?;
    ensure!(key == "key-of-the-shop", "{key:?}");
    let site = fh.mesh_ok(&["exec", &ft, "--", "cat", "/etc/site.conf"])?;
    ensure!(site == "site=shop\n", "{site:?}");

    // One back end turns unhealthy: within one interval no request reaches it, then it is
    // replaced.
    let backs = running_tasks(h1, "shop_back")?;
    let sick = &backs[0];
    let sick_id = field(sick, "ID").to_string();
    let sick_host = sick_id.chars().take(12).collect::<String>();
    let sh = host_of(&c, field(sick, "Node"))?;
    let answered_by = |body: &str| body.contains(&format!("from {sick_host}"));
    let call = || -> Result<String> {
        let out = c.client_exec_timeout(
            &[
                "curl",
                "-s",
                "-m",
                "3",
                &format!("http://{}:8090/cgi-bin/call", c.host(1).addr()),
            ],
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    wait_for(
        "both back ends answer",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(answered_by(&call()?).then_some(())),
    )?;
    sh.mesh_ok(&["exec", field(sick, "Name"), "--", "touch", "/tmp/sick"])?;
    // interval 1 s, retries 1: unhealthy after at most about 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    let mut served = 0;
    for _ in 0..30 {
        let body = call()?;
        ensure!(
            !answered_by(&body),
            "the unhealthy back end answered: {body}"
        );
        served += usize::from(body.contains("back says"));
    }
    ensure!(served >= 25, "only {served} of 30 calls reached a back end");
    wait_for(
        "the unhealthy back end replaced",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let now = task_ids(h1, "shop_back")?;
            Ok((now.len() == 2 && !now.contains(&sick_id)).then_some(()))
        },
    )?;
    let ps = h1.mesh_ok(&["service", "ps", "--no-trunc", "shop_back"])?;
    ensure!(ps.contains("unhealthy container"), "service ps:\n{ps}");

    // The named volume is the node's `shop_backdata`.
    let back = running_tasks(h1, "shop_back")?;
    let bh = host_of(&c, field(&back[0], "Node"))?;
    let marker = bh.data_dir().join("volumes/shop_backdata/_data/marker");
    ensure!(
        std::fs::read_to_string(&marker).is_ok_and(|s| s == "kept\n"),
        "{} holds no marker",
        marker.display()
    );

    // The listings.
    let ls = h1.mesh_ok(&["stack", "ls"])?;
    ensure!(
        ls.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["shop", "3"]),
        "stack ls:\n{ls}"
    );
    let svcs = h1.mesh_json(&["stack", "services", "shop"])?;
    let names: BTreeSet<&str> = svcs
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| field(s, "Name"))
        .collect();
    ensure!(
        names == ["shop_agent", "shop_back", "shop_front"].into(),
        "stack services: {svcs}"
    );
    let ps = h1.mesh_ok(&["stack", "ps", "shop"])?;
    ensure!(
        ps.lines().filter(|l| l.contains("Running")).count() >= 5,
        "stack ps:\n{ps}"
    );
    let nothing = h1.mesh(&["stack", "services", "nope"])?;
    ensure!(
        nothing.success() && nothing.stderr.contains("Nothing found in stack: nope"),
        "{nothing:?}"
    );
    let nothing = h1.mesh(&["stack", "ps", "nope"])?;
    ensure!(
        !nothing.success() && nothing.stderr.contains("nothing found in stack: nope"),
        "{nothing:?}"
    );

    // The same file again: nothing to do, no task replaced.
    let ids = |svc: &str| task_ids(h1, svc);
    let (front, back, agent) = (ids("shop_front")?, ids("shop_back")?, ids("shop_agent")?);
    let out = h1.mesh_ok(&["stack", "deploy", "-c", &file, "shop"])?;
    ensure!(
        !out.contains("Creating") && !out.contains("Updating"),
        "a redeploy of the same file: {out}"
    );

    // `back` changed: only it rolls.
    let changed = write(&c, "shop2.yml", &COMPOSE.replace("MODE=one", "MODE=two"))?;
    let out = h1.mesh_ok(&["stack", "deploy", "-c", &changed, "shop"])?;
    ensure!(
        out.contains("Updating service shop_back (id: ")
            && !out.contains("shop_front")
            && !out.contains("shop_agent"),
        "redeploy with back changed: {out}"
    );
    wait_for(
        "shop_back replaced",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let now = ids("shop_back")?;
            Ok((now.len() == 2 && now.is_disjoint(&back)).then_some(()))
        },
    )?;
    let spec = h1.mesh_ok(&["service", "inspect", "shop_back"])?;
    ensure!(spec.contains("MODE=two"), "{spec}");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(ids("shop_front")? == front, "the front was replaced");
    ensure!(ids("shop_agent")? == agent, "the agent was replaced");

    // Bad files: one line each, naming file, line and key; nothing created.
    let bad = write(
        &c,
        "bad-key.yml",
        "services:\n  web:\n    image: busybox\n    colour: blue\n",
    )?;
    refused(h1, &bad, "bad-key.yml:4: services.web.colour: unknown key")?;
    let bad = write(
        &c,
        "bad-type.yml",
        "services:\n  web:\n    image: busybox\n    deploy:\n      replicas: three\n",
    )?;
    refused(
        h1,
        &bad,
        "bad-type.yml:5: services.web.deploy.replicas: invalid type: string \"three\", expected an integer",
    )?;
    let bad = write(
        &c,
        "bad-var.yml",
        "services:\n  web:\n    image: \"busybox:${MESH_TEST_UNSET_TAG?the tag is required}\"\n",
    )?;
    refused(
        h1,
        &bad,
        "bad-var.yml:3: services.web.image: required variable MESH_TEST_UNSET_TAG is missing a value: the tag is required",
    )?;

    // A file without the agent, with --prune: the agent goes, the rest stays.
    let pruned = COMPOSE.replace(
        "  agent:\n    <<: *image\n    command: [\"sleep\", \"100000\"]\n    networks: [backnet]\n    deploy:\n      mode: global\n      placement:\n        constraints: [node.role == worker]\n",
        "",
    );
    ensure!(pruned != COMPOSE, "the agent was not cut from the file");
    let pruned = write(&c, "shop3.yml", &pruned.replace("MODE=one", "MODE=two"))?;
    let out = h1.mesh_ok(&["stack", "deploy", "--prune", "-c", &pruned, "shop"])?;
    ensure!(
        out.trim() == "Removing service shop_agent",
        "deploy --prune: {out}"
    );
    ensure!(
        ids("shop_front")? == front,
        "the front was replaced by --prune"
    );

    // `stack rm`: Docker's lines, then no service and no network of the stack.
    let out = h1.mesh_ok(&["stack", "rm", "shop"])?;
    for want in [
        "Removing service shop_back",
        "Removing service shop_front",
        "Removing secret shop_api_key",
        "Removing config shop_site",
        "Removing network shop_backnet",
        "Removing network shop_frontnet",
    ] {
        ensure!(out.contains(want), "stack rm printed no {want:?}:\n{out}");
    }
    let svcs = h1.mesh_json(&["service", "ls"])?;
    ensure!(
        svcs.as_array().is_some_and(|a| a.is_empty()),
        "services after stack rm: {svcs}"
    );
    let nets = h1.mesh_ok(&["network", "ls"])?;
    ensure!(!nets.contains("shop_"), "networks after stack rm:\n{nets}");
    ensure!(
        !h1.mesh_ok(&["stack", "ls"])?.contains("shop"),
        "stack ls after rm"
    );
    let again = h1.mesh(&["stack", "rm", "shop"])?;
    ensure!(
        again.success() && again.stderr.contains("Nothing found in stack: shop"),
        "{again:?}"
    );
    Ok(())
}

/// A stack's secret and config reach the front's tasks; `stack rm` removes them but not an
/// external secret. Needs the daemon side of secrets and configs (issue 14).
#[test]
fn a_stack_s_secrets_and_configs_reach_its_tasks_and_go_with_it() -> Result<()> {
    let Some((c, reg)) = registry_cluster(3, 1, "stacksec")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("web", "v1", "v1", false)?;
    std::fs::write(c.base_dir().join("pw.txt"), "s3cret\n")?;
    std::fs::write(c.base_dir().join("site.conf"), "listen 80\n")?;
    let ext = c.base_dir().join("ext.txt");
    std::fs::write(&ext, "outside\n")?;
    h1.mesh_ok(&["secret", "create", "shared_key", &ext.to_string_lossy()])?;
    let text = format!(
        r#"version: "3.8"
services:
  front:
    image: {}/web:v1
    command: ["sh", "-c", "cat /run/secrets/pw /run/secrets/key.txt /etc/site.conf > /srv/index.html; exec httpd -f -p 80 -h /srv"]
    ports: ["8091:80"]
    secrets:
      - pw
      - source: key
        target: key.txt
        mode: 0400
    configs:
      - source: site
        target: /etc/site.conf
secrets:
  pw:
    file: ./pw.txt
  key:
    external: true
    name: shared_key
configs:
  site:
    file: ./site.conf
"#,
        reg.host_port()
    );
    let file = write(&c, "sec.yml", &text)?;
    let out = h1.mesh_ok(&["stack", "deploy", "-c", &file, "sec"])?;
    for want in [
        "Creating secret sec_pw",
        "Creating config sec_site",
        "Creating network sec_default",
        "Creating service sec_front",
    ] {
        ensure!(out.contains(want), "deploy printed no {want:?}:\n{out}");
    }
    wait_tasks_running(h1, "sec_front", 1, Duration::from_secs(90))?;
    let body = wait_for(
        "the front's secrets and config",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let b = http_get(&c, &c.host(2).addr().to_string(), 8091)?;
            Ok(b.contains("s3cret").then_some(b))
        },
    )?;
    ensure!(
        body.contains("outside") && body.contains("listen 80"),
        "{body}"
    );
    let out = h1.mesh_ok(&["stack", "rm", "sec"])?;
    for want in [
        "Removing service sec_front",
        "Removing secret sec_pw",
        "Removing config sec_site",
        "Removing network sec_default",
    ] {
        ensure!(out.contains(want), "stack rm printed no {want:?}:\n{out}");
    }
    ensure!(
        !out.contains("shared_key"),
        "an external secret was removed"
    );
    let secrets = h1.mesh_ok(&["secret", "ls"])?;
    ensure!(
        secrets.contains("shared_key") && !secrets.contains("sec_pw"),
        "{secrets}"
    );
    Ok(())
}
