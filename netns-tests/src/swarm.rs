//! Swarm helpers on top of the harness: form a swarm of `meshd`s with the CLI, read `node ls`,
//! find the leader. They drive only the public CLI, as an operator would.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{wait_for, Cluster, Host};

/// One row of `mesh node ls --format json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub availability: String,
    pub manager_status: String,
    pub is_self: bool,
}

/// Runs `mesh node ls --format json` on `h`.
pub fn node_ls(h: &Host) -> Result<Vec<NodeRow>> {
    let v = h.mesh_json(&["node", "ls"])?;
    let arr = v
        .as_array()
        .context("node ls --format json is not an array")?;
    let s = |n: &Value, k: &str| n[k].as_str().unwrap_or_default().to_string();
    Ok(arr
        .iter()
        .map(|n| NodeRow {
            id: s(n, "ID"),
            hostname: s(n, "Hostname"),
            status: s(n, "Status"),
            availability: s(n, "Availability"),
            manager_status: s(n, "ManagerStatus"),
            is_self: n["Self"].as_bool().unwrap_or(false),
        })
        .collect())
}

/// The hostname `h` reports as Leader.
pub fn leader_name(h: &Host) -> Result<Option<String>> {
    Ok(node_ls(h)?
        .into_iter()
        .find(|n| n.manager_status == "Leader")
        .map(|n| n.hostname))
}

/// `swarm init` on host 1, then `managers - 1` more managers and the remaining hosts as
/// workers; waits until every node is Ready and every manager is a Raft voter.
pub fn form_swarm(c: &Cluster, managers: usize) -> Result<()> {
    let first = c.host(1);
    first.mesh_ok(&[
        "swarm",
        "init",
        "--advertise-addr",
        &first.addr().to_string(),
    ])?;
    join_swarm(c, managers)
}

/// Joins hosts 2.. to the swarm host 1 initialized: hosts up to `managers` as managers, the
/// rest as workers; waits until every node is Ready and every manager reachable.
pub fn join_swarm(c: &Cluster, managers: usize) -> Result<()> {
    let first = c.host(1);
    let worker = first.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let manager = first.mesh_ok(&["swarm", "join-token", "-q", "manager"])?;
    let remote = format!("{}:2377", first.addr());
    for h in &c.hosts()[1..] {
        let token = if h.index() <= managers {
            &manager
        } else {
            &worker
        };
        h.mesh_ok(&[
            "swarm",
            "join",
            "--advertise-addr",
            &h.addr().to_string(),
            "--token",
            token.trim(),
            &remote,
        ])?;
    }
    let n = c.hosts().len();
    wait_for(
        "all nodes ready and managers reachable",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let rows = node_ls(first)?;
            let ready = rows.iter().filter(|r| r.status == "Ready").count();
            let mgrs = rows
                .iter()
                .filter(|r| matches!(r.manager_status.as_str(), "Leader" | "Reachable"))
                .count();
            Ok((rows.len() == n && ready == n && mgrs == managers).then_some(()))
        },
    )?;
    Ok(())
}

/// The local daemon's `mesh info --format json`.
pub fn info(h: &Host) -> Result<Value> {
    h.mesh_json(&["info"])
}

/// Asserts a CLI call fails and its stderr contains `needle`.
pub fn expect_err(h: &Host, args: &[&str], needle: &str) -> Result<String> {
    let out = h.mesh(args)?;
    if out.success() {
        bail!(
            "mesh {args:?} succeeded, expected an error containing {needle:?}: {}",
            out.stdout
        );
    }
    if !out.stderr.contains(needle) {
        bail!(
            "mesh {args:?} failed with {:?}, expected {needle:?}",
            out.stderr
        );
    }
    if out.stderr.trim().lines().count() != 1 {
        bail!("mesh {args:?}: error is not one line: {:?}", out.stderr);
    }
    Ok(out.stderr)
}

/// A task attached to a network, as `mesh network inspect` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetTask {
    /// Full task name, `web.1.<id>`.
    pub name: String,
    pub node: String,
    /// Address without the prefix length.
    pub ip: String,
}

/// The tasks `mesh network inspect NET` lists; with `service`, only that service's.
pub fn network_tasks(h: &Host, net: &str, service: Option<&str>) -> Result<Vec<NetTask>> {
    let v: Value = serde_json::from_str(&h.mesh_ok(&["network", "inspect", net])?)?;
    let prefix = service.map(|s| format!("{s}."));
    Ok(v[0]["Tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| NetTask {
            name: t["Name"].as_str().unwrap_or_default().to_string(),
            node: t["Node"].as_str().unwrap_or_default().to_string(),
            ip: t["IPv4Address"]
                .as_str()
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        })
        .filter(|t| prefix.as_ref().is_none_or(|p| t.name.starts_with(p)))
        .collect())
}

/// A network's VXLAN identifier, from `mesh network inspect`.
pub fn vni_of(h: &Host, net: &str) -> Result<u32> {
    let v: Value = serde_json::from_str(&h.mesh_ok(&["network", "inspect", net])?)?;
    Ok(
        v[0]["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
            .as_str()
            .unwrap_or("0")
            .parse()?,
    )
}

/// The pid of the process holding a host's overlay namespace for `vni`, if it is alive.
pub fn overlay_pid(h: &Host, vni: u32) -> Option<u32> {
    let rec =
        std::fs::read_to_string(h.exec_root().join("netns").join(format!("ov-{vni}.json"))).ok()?;
    let v: Value = serde_json::from_str(&rec).ok()?;
    let pid = v["pid"].as_u64()? as u32;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// The IPv4 addresses with an ARP entry on the VXLAN device of a host's overlay namespace.
pub fn overlay_arp(h: &Host, vni: u32) -> Result<Vec<String>> {
    let Some(pid) = overlay_pid(h, vni) else {
        return Ok(vec![]);
    };
    let out = std::process::Command::new("nsenter")
        .args([
            &format!("--net=/proc/{pid}/ns/net"),
            "ip",
            "neigh",
            "show",
            "dev",
            &format!("vx-{vni}"),
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Pids of the processes on this machine whose command line is exactly `sleep <secs>` (tests
/// give each service its own number, so its task processes can be counted).
pub fn sleep_pids(secs: u32) -> Vec<u32> {
    let want = format!("sleep\0{secs}\0");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .parse::<u32>()
                        .ok()
                        .map(|p| (p, e.path()))
                })
                .filter(|(_, p)| {
                    std::fs::read(p.join("cmdline")).is_ok_and(|c| c == want.as_bytes())
                })
                .map(|(p, _)| p)
                .collect()
        })
        .unwrap_or_default()
}

/// A node's embedded-DNS answers for `tasks.SVC` on `net` (empty for NXDOMAIN).
pub fn dns_tasks(h: &Host, net: &str, svc: &str) -> Result<std::collections::BTreeSet<String>> {
    let out = h.mesh_ok(&["dns", "query", "--network", net, &format!("tasks.{svc}")])?;
    let mut lines = out.lines();
    let head = lines.next().unwrap_or_default();
    if head.contains("NXDomain") || head.contains("NXDOMAIN") {
        return Ok(Default::default());
    }
    Ok(lines
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// A service's first virtual IP (without the prefix length), from `mesh service inspect`.
pub fn vip_of(h: &Host, service: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&h.mesh_ok(&["service", "inspect", service])?)?;
    let addr = v[0]["Endpoint"]["VirtualIPs"][0]["Addr"]
        .as_str()
        .unwrap_or_default();
    match addr.split('/').next() {
        Some(ip) if !ip.is_empty() => Ok(ip.to_string()),
        _ => bail!("service {service} has no VIP: {v}"),
    }
}

/// The usual start of a multi-host test: `None` when the test must be skipped (not root, outside
/// CI), else `hosts` simulated hosts with a swarm of `managers` managers, the rest workers.
pub fn swarm_cluster(
    hosts: usize,
    managers: usize,
    name_hint: &'static str,
) -> Result<Option<Cluster>> {
    if !crate::require_root()? {
        return Ok(None);
    }
    let c = Cluster::new(crate::ClusterOpts {
        hosts,
        start_daemons: true,
        name_hint,
    })?;
    form_swarm(&c, managers)?;
    Ok(Some(c))
}

/// [`swarm_cluster`] with `daemon_args` added to every `meshd` (e.g. `--lb-backend nftables`).
pub fn swarm_cluster_with(
    hosts: usize,
    managers: usize,
    name_hint: &'static str,
    daemon_args: &[&str],
) -> Result<Option<Cluster>> {
    if !crate::require_root()? {
        return Ok(None);
    }
    let c = Cluster::new(crate::ClusterOpts {
        hosts,
        start_daemons: false,
        name_hint,
    })?;
    for h in c.hosts() {
        h.start_daemon_with(daemon_args)?;
    }
    form_swarm(&c, managers)?;
    Ok(Some(c))
}

/// The rows of `mesh service ps SVC --format json`.
pub fn service_ps(h: &Host, svc: &str) -> Result<Vec<Value>> {
    h.mesh_json(&["service", "ps", svc])?
        .as_array()
        .cloned()
        .context("service ps is an array")
}

/// A string field of a JSON row (`""` if absent).
pub fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

/// A running task of `svc` (the first `service ps` lists): its host's index (1-based) and
/// its name.
pub fn running_task(c: &Cluster, svc: &str) -> Result<(usize, String)> {
    for t in service_ps(c.host(1), svc)? {
        if field(&t, "CurrentState").starts_with("Running")
            && field(&t, "DesiredState") == "Running"
        {
            let h = host_of(c, field(&t, "Node"))?;
            return Ok((h.index(), field(&t, "Name").to_string()));
        }
    }
    anyhow::bail!("no running task of {svc}")
}

/// The host a node name names.
pub fn host_of<'a>(c: &'a Cluster, node: &str) -> Result<&'a Host> {
    c.hosts()
        .iter()
        .find(|h| h.name() == node)
        .with_context(|| format!("no host {node}"))
}

/// The rows of `svc`'s tasks that should run and do.
pub fn running_tasks(h: &Host, svc: &str) -> Result<Vec<Value>> {
    Ok(service_ps(h, svc)?
        .into_iter()
        .filter(|t| {
            field(t, "DesiredState") == "Running" && field(t, "CurrentState").starts_with("Running")
        })
        .collect())
}

/// Waits until exactly `n` tasks of `svc` run; their rows. The error shows `service ps`.
pub fn wait_tasks_running(h: &Host, svc: &str, n: usize, within: Duration) -> Result<Vec<Value>> {
    wait_for(
        &format!("{svc}: {n} tasks running"),
        within,
        Duration::from_millis(250),
        || {
            let r = running_tasks(h, svc)?;
            Ok((r.len() == n).then_some(r))
        },
    )
    .with_context(|| {
        format!(
            "service ps {svc}: {:?}",
            service_ps(h, svc).unwrap_or_default()
        )
    })
}

/// `mesh exec TASK -- argv` on `h`: its stdout (an error on a non-zero exit).
pub fn task_exec(h: &Host, task: &str, argv: &[&str]) -> Result<String> {
    let mut a = vec!["exec", task, "--"];
    a.extend_from_slice(argv);
    h.mesh_ok(&a)
}

/// An HTTP GET of `http://ADDR:PORT/` from the underlay client (3 s at most): the body.
pub fn http_get(c: &Cluster, addr: &str, port: u16) -> Result<String> {
    let out = c.client_exec_timeout(
        &["curl", "-s", "-m", "3", &format!("http://{addr}:{port}/")],
        Duration::from_secs(10),
    )?;
    anyhow::ensure!(out.status.success(), "curl {addr}:{port}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
