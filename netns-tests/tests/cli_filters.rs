//! The listings as an operator drives them with the real `mesh` binary on a two-node swarm
//! (a manager and a worker): `--filter` with Docker's semantics (same key OR'ed, different
//! keys AND'ed, prefixes, labels, unknown keys refused), `--format` templates and `table`
//! templates, `-q`, `node ps`, and `inspect --pretty`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{expect_err, node_ls, swarm_cluster, wait_tasks_running};
use mesh_netns::Host;

/// The non-empty lines of a command's output, as a set.
fn lines(h: &Host, args: &[&str]) -> Result<BTreeSet<String>> {
    Ok(h.mesh_ok(args)?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `args` with `--format TEMPLATE` printing one field per object: the set printed.
fn names(h: &Host, args: &[&str], field: &str) -> Result<BTreeSet<String>> {
    let tmpl = format!("{{{{.{field}}}}}");
    let mut all = args.to_vec();
    all.extend(["--format", tmpl.as_str()]);
    lines(h, &all)
}

#[test]
fn listings_filter_and_format_as_docker_s() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "clif")? else {
        return Ok(());
    };
    let (h1, h2) = (c.host(1), c.host(2));
    let (n1, n2) = (h1.name().to_string(), h2.name().to_string());
    let nodes = node_ls(h1)?;
    let id_of = |name: &str| -> Result<String> {
        nodes
            .iter()
            .find(|n| n.hostname == name)
            .map(|n| n.id.clone())
            .with_context(|| format!("no node {name}"))
    };
    let (id1, id2) = (id_of(&n1)?, id_of(&n2)?);
    h1.mesh_ok(&["node", "update", "--label-add", "zone=a", &n1])?;
    h1.mesh_ok(&[
        "node",
        "update",
        "--label-add",
        "zone=b",
        "--label-add",
        "ssd",
        &n2,
    ])?;

    // node ls.
    let hosts = |f: &[&str]| {
        let mut a = vec!["node", "ls"];
        for x in f {
            a.extend(["--filter", x]);
        }
        names(h1, &a, "Hostname")
    };
    ensure!(hosts(&["role=manager"])? == set(&[&n1]), "role=manager");
    ensure!(hosts(&["role=worker"])? == set(&[&n2]), "role=worker");
    ensure!(
        hosts(&["role=manager", "role=worker"])? == set(&[&n1, &n2]),
        "one key's values are OR'ed"
    );
    ensure!(
        hosts(&["role=manager", "label=zone=b"])?.is_empty(),
        "different keys are AND'ed"
    );
    ensure!(hosts(&["membership=accepted"])?.len() == 2, "membership");
    ensure!(hosts(&["membership=pending"])?.is_empty(), "membership");
    ensure!(hosts(&["label=zone=b"])? == set(&[&n2]), "label=K=V");
    ensure!(hosts(&["label=ssd"])? == set(&[&n2]), "label=K");
    ensure!(hosts(&["node.label=zone"])?.len() == 2, "node.label=K");
    ensure!(hosts(&[&format!("name={n2}")])? == set(&[&n2]), "name");
    ensure!(
        hosts(&[&format!("id={}", &id1[..6])])? == set(&[&n1]),
        "id prefix"
    );
    ensure!(
        lines(h1, &["node", "ls", "-q", "-f", "role=worker"])? == set(&[&id2]),
        "node ls -q"
    );
    let err = expect_err(
        h1,
        &["node", "ls", "--filter", "foo=bar"],
        "invalid filter 'foo'",
    )?;
    ensure!(err.starts_with("Error"), "{err}");
    expect_err(
        h1,
        &["node", "ls", "--filter", "role"],
        "bad format of filter (expected name=value)",
    )?;
    expect_err(
        h1,
        &["node", "ls", "--format", "{{.Foo}}"],
        "can't evaluate field Foo",
    )?;
    let table = h1.mesh_ok(&["node", "ls", "--format", "table {{.Hostname}}\t{{.Self}}"])?;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(rows[0] == ["HOSTNAME", "SELF"], "table header:\n{table}");
    ensure!(
        rows.contains(&vec![n1.as_str(), "true"]) && rows.contains(&vec![n2.as_str(), "false"]),
        "table rows:\n{table}"
    );

    // service ls.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "clif-web",
        "--replicas",
        "2",
        "--label",
        "tier=front",
        "--",
        "sleep",
        "4111",
    ])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "clif-cache",
        "--mode",
        "global",
        "--label",
        "tier=back",
        "--",
        "sleep",
        "4112",
    ])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "clif-web-admin",
        "--replicas",
        "1",
        "--constraint",
        &format!("node.hostname=={n2}"),
        "--",
        "sleep",
        "4113",
    ])?;
    wait_tasks_running(h1, "clif-web", 2, Duration::from_secs(60))?;
    wait_tasks_running(h1, "clif-cache", 2, Duration::from_secs(60))?;
    wait_tasks_running(h1, "clif-web-admin", 1, Duration::from_secs(60))?;
    let svcs = |f: &[&str]| {
        let mut a = vec!["service", "ls"];
        for x in f {
            a.extend(["-f", x]);
        }
        names(h1, &a, "Name")
    };
    ensure!(
        svcs(&["name=clif-web"])? == set(&["clif-web", "clif-web-admin"]),
        "name is a prefix"
    );
    ensure!(svcs(&["mode=global"])? == set(&["clif-cache"]), "mode");
    ensure!(
        svcs(&["label=tier"])? == set(&["clif-web", "clif-cache"]),
        "label=K"
    );
    ensure!(
        svcs(&["label=tier=back"])? == set(&["clif-cache"]),
        "label=K=V"
    );
    ensure!(
        svcs(&["mode=replicated", "label=tier"])? == set(&["clif-web"]),
        "AND"
    );
    let web_id = h1.mesh_ok(&["service", "ls", "-q", "-f", "name=clif-cache"])?;
    ensure!(web_id.trim().len() == 12, "service ls -q: {web_id}");
    ensure!(
        svcs(&[&format!("id={}", &web_id.trim()[..8])])? == set(&["clif-cache"]),
        "id prefix"
    );
    let line = h1.mesh_ok(&[
        "service",
        "ls",
        "-f",
        "name=clif-web-admin",
        "--format",
        "{{.Name}}: {{.Replicas}} {{.Mode}}",
    ])?;
    ensure!(line.trim() == "clif-web-admin: 1/1 replicated", "{line}");
    let json = h1.mesh_ok(&[
        "service",
        "ls",
        "-f",
        "name=clif-cache",
        "--format",
        "{{json .}}",
    ])?;
    let v: serde_json::Value = serde_json::from_str(json.trim())?;
    ensure!(v["Mode"] == "global" && v["Replicas"] == "2/2", "{v}");
    let table = h1.mesh_ok(&["service", "ls", "--format", "table {{.ID}}\t{{.Name}}"])?;
    ensure!(
        table
            .lines()
            .next()
            .is_some_and(|l| l.split_whitespace().collect::<Vec<_>>() == ["ID", "NAME"]),
        "{table}"
    );
    ensure!(
        table.lines().count() == 4,
        "a header and 3 services:\n{table}"
    );
    expect_err(
        h1,
        &["service", "ls", "-f", "desired-state=running"],
        "invalid filter 'desired-state'",
    )?;

    // service ps: desired-state and node, and the full IDs of -q.
    h1.mesh_ok(&["service", "scale", "clif-web=1"])?;
    wait_tasks_running(h1, "clif-web", 1, Duration::from_secs(60))?;
    let ps = |f: &[&str]| {
        let mut a = vec!["service", "ps", "clif-web"];
        for x in f {
            a.extend(["-f", x]);
        }
        names(h1, &a, "DesiredState")
    };
    ensure!(
        ps(&["desired-state=running"])? == set(&["Running"]),
        "running"
    );
    ensure!(
        ps(&["desired-state=shutdown"])? == set(&["Shutdown"]),
        "shutdown"
    );
    let running = h1.mesh_ok(&[
        "service",
        "ps",
        "-q",
        "--no-trunc",
        "-f",
        "desired-state=running",
        "clif-web",
    ])?;
    ensure!(running.lines().count() == 1, "{running}");
    ensure!(
        running.trim().len() > 12,
        "-q --no-trunc prints full IDs: {running}"
    );
    let short = h1.mesh_ok(&[
        "service",
        "ps",
        "-q",
        "-f",
        "desired-state=running",
        "clif-web",
    ])?;
    ensure!(
        short.trim() == &running.trim()[..12],
        "-q truncates: {short}"
    );
    let short = names(
        h1,
        &["service", "ps", "-f", "desired-state=running", "clif-web"],
        "ID",
    )?;
    ensure!(
        short.iter().all(|id| id.len() == 12),
        "IDs truncated: {short:?}"
    );
    let full = names(
        h1,
        &[
            "service",
            "ps",
            "--no-trunc",
            "-f",
            "desired-state=running",
            "clif-web",
        ],
        "ID",
    )?;
    ensure!(full == set(&[running.trim()]), "--no-trunc: {full:?}");
    let on_n2 = names(
        h1,
        &["service", "ps", "-f", &format!("node={n2}"), "clif-cache"],
        "Node",
    )?;
    ensure!(on_n2 == set(&[&n2]), "node filter: {on_n2:?}");
    let by_name = names(
        h1,
        &["service", "ps", "-f", "name=clif-web.1", "clif-web"],
        "Name",
    )?;
    ensure!(by_name == set(&["clif-web.1"]), "{by_name:?}");
    let two = names(
        h1,
        &[
            "service",
            "ps",
            "-f",
            "desired-state=running",
            "clif-web",
            "clif-web-admin",
        ],
        "Name",
    )?;
    ensure!(
        two == set(&["clif-web.1", "clif-web-admin.1"]),
        "several services: {two:?}"
    );

    // node ps: this node by default, others by name, with the task filters.
    let mine = names(h1, &["node", "ps", "-f", "desired-state=running"], "Node")?;
    ensure!(mine == set(&[&n1]), "node ps: {mine:?}");
    let theirs = names(
        h1,
        &["node", "ps", "-f", "desired-state=running", &n2],
        "Name",
    )?;
    ensure!(
        theirs.contains("clif-web-admin.1") && theirs.iter().any(|n| n.starts_with("clif-cache.")),
        "node ps {n2}: {theirs:?}"
    );
    let table = h1.mesh_ok(&["node", "ps", &n2])?;
    ensure!(
        table.lines().next().is_some_and(|l| l.starts_with("ID")
            && l.contains("DESIRED STATE")
            && l.ends_with("PORTS")),
        "{table}"
    );
    expect_err(h1, &["node", "ps", "nope"], "nope")?;

    // network ls.
    h1.mesh_ok(&[
        "network", "create", "-d", "overlay", "--label", "team=a", "clif-net",
    ])?;
    let nets = |f: &[&str]| {
        let mut a = vec!["network", "ls"];
        for x in f {
            a.extend(["-f", x]);
        }
        names(h1, &a, "Name")
    };
    ensure!(nets(&["driver=overlay"])?.contains("clif-net"), "driver");
    ensure!(nets(&["driver=bridge"])?.is_empty(), "driver=bridge");
    ensure!(nets(&["label=team=a"])? == set(&["clif-net"]), "label");
    ensure!(
        nets(&["name=if-n"])? == set(&["clif-net"]),
        "name is any part"
    );
    let table = h1.mesh_ok(&["network", "ls", "--format", "table {{.ID}}\t{{.Name}}"])?;
    ensure!(table.starts_with("NETWORK ID"), "{table}");

    // inspect --pretty.
    let pretty = h1.mesh_ok(&["service", "inspect", "--pretty", "clif-web"])?;
    for want in [
        "ID:",
        "Name:           clif-web",
        "Service Mode:   Replicated",
        " Replicas:      1",
        "UpdateConfig:",
        "ContainerSpec:",
        "Endpoint Mode:  vip",
        " - tier=front",
    ] {
        ensure!(
            pretty.lines().any(|l| l.starts_with(want)),
            "{want:?} in\n{pretty}"
        );
    }
    let pretty = h1.mesh_ok(&["service", "inspect", "--pretty", "clif-cache"])?;
    ensure!(pretty.contains("Service Mode:   Global"), "{pretty}");
    let pretty = h1.mesh_ok(&["node", "inspect", "--pretty", "self"])?;
    for want in [
        format!("ID:                     {id1}"),
        format!("Hostname:               {n1}"),
        "Joined at:".into(),
        "Status:".into(),
        " State:                 Ready".into(),
        " Availability:          Active".into(),
        " Address:".into(),
        "Manager Status:".into(),
        " Leader:                Yes".into(),
    ] {
        ensure!(
            pretty.lines().any(|l| l.starts_with(&want)),
            "{want:?} in\n{pretty}"
        );
    }
    let pretty = h1.mesh_ok(&["node", "inspect", "--pretty", &n2])?;
    ensure!(
        !pretty.contains("Manager Status:") && pretty.contains(" - zone=b"),
        "{pretty}"
    );

    // stack ps takes the task filters too (nothing deployed: Docker's message).
    expect_err(
        h1,
        &["stack", "ps", "-f", "desired-state=running", "nope"],
        "nothing found in stack: nope",
    )?;
    Ok(())
}
