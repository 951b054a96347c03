//! `meshd --metrics-addr`: every node of a 3-host swarm (2 managers, 1 worker) serves
//! `/metrics` on its underlay address inside its namespace; the test scrapes them with curl
//! from inside the namespaces and parses the text with a real OpenMetrics parser (the
//! `prometheus_client` Python package, Debian's `python3-prometheus-client`), then checks
//! names, types and labels, and that the figures move with what the cluster does: a service
//! created (tasks and replica gauges, Raft proposals, VIPs, reconcile passes), DNS queries
//! from a task (local answers, forwarded ones to an upstream the test runs, NXDOMAIN).
//! Unknown paths are 404s.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::swarm::{form_swarm, network_tasks};
use mesh_netns::{wait_for, Cluster, ClusterOpts, Host};
use serde_json::Value;

/// The port every node serves its metrics on (Docker's customary 9323).
const PORT: u16 = 9323;

/// Parses OpenMetrics text from stdin; prints `{family: {type, unit, samples: [[name,
/// labels, value]]}}` as JSON. Fails (exit 1) on any text the parser refuses.
const PARSE: &str = "import sys,json,math
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out={}
for f in text_string_to_metric_families(sys.stdin.read()):
    if f.name in out: sys.exit('family %s twice' % f.name)
    out[f.name]={'type':f.type,'unit':f.unit,'samples':[[s.name,s.labels,None if math.isinf(s.value) else s.value] for s in f.samples]}
print(json.dumps(out))";

/// Resolves NAME with the system resolver (so through 127.0.0.11); exit 3 if it fails.
const RESOLVE: &str = "import socket,sys\ntry:\n print(' '.join(sorted(socket.gethostbyname_ex(sys.argv[1])[2])))\nexcept OSError:\n sys.exit(3)";

/// A one-name DNS server: `outside.example.` A -> 192.0.2.7, NXDOMAIN for the rest.
const UPSTREAM: &str = "import socket,struct\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.99.0.1',53))\nwhile True:\n d,a=s.recvfrom(512)\n if len(d)<12: continue\n i=12\n while i<len(d) and d[i]: i+=1+d[i]\n q=d[12:i+5]\n name=d[12:i]\n ok=name==b'\\x07outside\\x07example'\n h=d[:2]+struct.pack('>HHHHH',0x8180 if ok else 0x8183,1,1 if ok else 0,0,0)\n ans=b'\\xc0\\x0c'+struct.pack('>HHIH',1,1,30,4)+bytes([192,0,2,7]) if ok else b''\n s.sendto(h+q+ans,a)";

/// One scrape, as the parser read it.
struct Scrape(BTreeMap<String, Value>);

impl Scrape {
    fn family(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    fn kind(&self, family: &str) -> Option<&str> {
        self.family(family).and_then(|f| f["type"].as_str())
    }

    /// The value of sample `sample` of `family` whose labels include `labels`.
    fn value(&self, family: &str, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.family(family)?["samples"]
            .as_array()?
            .iter()
            .find(|s| s[0] == sample && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v)))
            .and_then(|s| s[2].as_f64())
    }

    /// A gauge's (or info's) value with `labels`.
    fn gauge(&self, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.value(family, family, labels)
    }

    /// A counter's value with `labels` (its `_total` sample).
    fn counter(&self, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.value(family, &format!("{family}_total"), labels)
    }

    /// The sum of a counter's samples over every label set.
    fn counter_sum(&self, family: &str) -> f64 {
        let total = format!("{family}_total");
        self.family(family)
            .and_then(|f| f["samples"].as_array())
            .map(|s| {
                s.iter()
                    .filter(|s| s[0] == total.as_str())
                    .filter_map(|s| s[2].as_f64())
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// A histogram's observation count.
    fn histogram_count(&self, family: &str) -> Option<f64> {
        self.value(family, &format!("{family}_count"), &[])
    }
}

/// The Python that has Debian's `prometheus_client` (the system one: another python3 may
/// come first on `PATH`).
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Parses exposition text with the Python OpenMetrics parser.
fn parse(text: &str) -> Result<Scrape> {
    let mut child = Command::new(python())
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3 (with python3-prometheus-client)")?;
    child
        .stdin
        .take()
        .context("parser stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Scrape(serde_json::from_slice(&out.stdout)?))
}

/// `curl` inside the host's namespace: (HTTP status, content type, body).
fn curl(h: &Host, path: &str) -> Result<(u16, String, String)> {
    let url = format!("http://{}:{PORT}{path}", h.addr());
    let out = h.exec(&[
        "curl",
        "-sS",
        "-m",
        "5",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{content_type}",
        &url,
    ])?;
    ensure!(out.status.success(), "curl {url}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').context("curl output")?;
    let (code, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
    Ok((code.parse()?, ctype.to_string(), body.to_string()))
}

/// Scrapes `h` and parses the answer.
fn scrape(h: &Host) -> Result<Scrape> {
    let (code, ctype, body) = curl(h, "/metrics")?;
    ensure!(
        code == 200,
        "{}: /metrics answered {code}: {body}",
        h.name()
    );
    ensure!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "{}: content type {ctype:?}",
        h.name()
    );
    parse(&body).with_context(|| format!("scrape of {}", h.name()))
}

/// Scrapes `h` until `f` holds (what it returns), 30 s at most.
fn scrape_until<T>(h: &Host, what: &str, mut f: impl FnMut(&Scrape) -> Option<T>) -> Result<T> {
    wait_for(
        &format!("{}: {what}", h.name()),
        Duration::from_secs(30),
        Duration::from_millis(300),
        || Ok(f(&scrape(h)?)),
    )
}

/// Removes the per-namespace resolv.conf directories on drop.
struct EtcNetns(Vec<PathBuf>);

impl Drop for EtcNetns {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Kills a child process on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host<'a>(c: &'a Cluster, name: &str) -> Result<&'a Host> {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .with_context(|| format!("no host {name}"))
}

#[test]
fn metrics_are_served_parsed_and_move_with_the_cluster() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "metrics",
    })?;
    // Each host's upstream resolver is a DNS server this test runs on the underlay client.
    let mut etc = EtcNetns(Vec::new());
    for h in c.hosts() {
        let dir = PathBuf::from("/etc/netns").join(h.ns());
        std::fs::create_dir_all(&dir)?;
        etc.0.push(dir.clone());
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {}\n", c.client_addr()),
        )?;
    }
    let _upstream = Killed(
        Command::new("ip")
            .args(["netns", "exec", c.underlay_ns(), "python3", "-c", UPSTREAM])
            .spawn()?,
    );
    for h in c.hosts() {
        let addr = format!("{}:{PORT}", h.addr());
        h.start_daemon_with(&["--metrics-addr", &addr])?;
    }
    // Served before the node is in a swarm: no Raft, no cluster figures.
    let alone = scrape(c.host(3))?;
    ensure!(alone.kind("mesh_build") == Some("info"));
    ensure!(
        alone.value(
            "mesh_build",
            "mesh_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ) == Some(1.0)
    );
    ensure!(alone.family("mesh_raft_term").is_none());
    ensure!(alone.family("mesh_nodes").is_none());

    form_swarm(&c, 2)?;
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));

    // Unknown paths and methods.
    for path in ["/", "/metric", "/metrics/x", "/nope"] {
        let (code, _, _) = curl(h1, path)?;
        ensure!(code == 404, "{path}: {code}");
    }
    let out = h1.exec(&[
        "curl",
        "-s",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        &format!("http://{}:{PORT}/metrics", h1.addr()),
    ])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "405",
        "POST: {out:?}"
    );

    // The leader: Raft and the cluster's figures, with their types.
    let s = scrape_until(h1, "3 gossip members", |s| {
        (s.gauge("mesh_gossip_members", &[]) == Some(3.0)).then_some(())
    })
    .and_then(|()| scrape(h1))?;
    for (family, kind) in [
        ("mesh_raft_term", "gauge"),
        ("mesh_raft_is_leader", "gauge"),
        ("mesh_raft_last_log_index", "gauge"),
        ("mesh_raft_applied_index", "gauge"),
        ("mesh_raft_log_entries", "gauge"),
        ("mesh_raft_voters", "gauge"),
        ("mesh_raft_leader_changes", "counter"),
        ("mesh_raft_propose_seconds", "histogram"),
        ("mesh_nodes", "gauge"),
        ("mesh_tasks", "gauge"),
        ("mesh_services", "gauge"),
        ("mesh_dns_query_duration_seconds", "histogram"),
        ("mesh_dns_forwarded", "counter"),
        ("mesh_dns_malformed", "counter"),
        ("mesh_gossip_members", "gauge"),
        ("mesh_gossip_packets_received", "counter"),
        ("mesh_gossip_sent_bytes", "counter"),
        ("mesh_gossip_dropped", "counter"),
        ("mesh_gossip_convergence_lag_seconds", "histogram"),
        ("mesh_plane_reconcile", "counter"),
        ("mesh_plane_reconcile_errors", "counter"),
        ("mesh_plane_reconcile_duration_seconds", "histogram"),
        ("mesh_lb_updates", "counter"),
        ("mesh_lb_update_duration_seconds", "histogram"),
        ("mesh_vips", "gauge"),
        ("mesh_vip_backends", "gauge"),
        ("mesh_image_pull_duration_seconds", "histogram"),
        ("mesh_build", "info"),
    ] {
        ensure!(
            s.kind(family) == Some(kind),
            "h1: {family} is {:?}, not {kind}",
            s.kind(family)
        );
    }
    ensure!(s
        .family("mesh_raft_propose_seconds")
        .is_some_and(|f| f["unit"] == "seconds"));
    ensure!(s.gauge("mesh_raft_is_leader", &[]) == Some(1.0));
    ensure!(s.gauge("mesh_raft_voters", &[]) == Some(2.0));
    ensure!(s.gauge("mesh_raft_term", &[]).is_some_and(|t| t >= 1.0));
    ensure!(s
        .counter("mesh_raft_leader_changes", &[])
        .is_some_and(|n| n >= 1.0));
    let proposals = s
        .histogram_count("mesh_raft_propose_seconds")
        .context("propose count")?;
    ensure!(proposals >= 1.0, "proposals: {proposals}");
    ensure!(s.gauge("mesh_nodes", &[("state", "ready"), ("role", "manager")]) == Some(2.0));
    ensure!(s.gauge("mesh_nodes", &[("state", "ready"), ("role", "worker")]) == Some(1.0));
    ensure!(s.gauge("mesh_nodes", &[("state", "down"), ("role", "worker")]) == Some(0.0));
    ensure!(s.gauge("mesh_tasks", &[("state", "running")]) == Some(0.0));
    ensure!(s.gauge("mesh_services", &[]) == Some(0.0));

    // A follower has Raft figures but no cluster figures; a worker neither.
    let f = scrape(h2)?;
    ensure!(f.gauge("mesh_raft_is_leader", &[]) == Some(0.0));
    ensure!(f.gauge("mesh_raft_term", &[]) == s.gauge("mesh_raft_term", &[]));
    ensure!(f.family("mesh_nodes").is_none() && f.family("mesh_tasks").is_none());
    let w = scrape(h3)?;
    ensure!(w.family("mesh_raft_term").is_none() && w.family("mesh_nodes").is_none());
    ensure!(w
        .family("mesh_raft_propose_seconds")
        .is_none_or(|_| { w.histogram_count("mesh_raft_propose_seconds") == Some(0.0) }));

    // A service: tasks, replicas, proposals, VIPs and reconcile passes move.
    let passes_before = s.counter("mesh_plane_reconcile", &[]).unwrap_or(0.0);
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "appnet",
        "--",
        "sleep",
        "100000",
    ])?;
    let s = scrape_until(h1, "web's 3 replicas running", |s| {
        (s.gauge("mesh_service_replicas_running", &[("service", "web")]) == Some(3.0)).then_some(())
    })
    .and_then(|()| scrape(h1))?;
    ensure!(s.gauge("mesh_service_replicas_desired", &[("service", "web")]) == Some(3.0));
    ensure!(s.gauge("mesh_services", &[]) == Some(1.0));
    eprintln!(
        "h1: proposals {proposals} -> {:?}, reconcile passes {passes_before} -> {:?}",
        s.histogram_count("mesh_raft_propose_seconds"),
        s.counter("mesh_plane_reconcile", &[])
    );
    ensure!(s.gauge("mesh_tasks", &[("state", "running")]) == Some(3.0));
    ensure!(
        s.histogram_count("mesh_raft_propose_seconds")
            .is_some_and(|n| n > proposals),
        "no proposal counted for the service"
    );
    ensure!(s
        .counter("mesh_plane_reconcile", &[])
        .is_some_and(|n| n > passes_before));
    ensure!(s
        .histogram_count("mesh_plane_reconcile_duration_seconds")
        .is_some_and(|n| n >= 1.0));
    // The tasks' endpoint records crossed by gossip: their convergence lag is counted (at
    // least the last writer's record reached the others by broadcast), in seconds.
    let (count, sum) = wait_for(
        "convergence lag counted",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let (mut count, mut sum) = (0.0, 0.0);
            for h in [h1, h2, h3] {
                let s = scrape(h)?;
                let f = "mesh_gossip_convergence_lag_seconds";
                count += s.histogram_count(f).unwrap_or(0.0);
                sum += s.value(f, &format!("{f}_sum"), &[]).unwrap_or(0.0);
            }
            Ok((count > 0.0).then_some((count, sum)))
        },
    )?;
    eprintln!(
        "gossip: {count} records by broadcast, mean lag {:.4} s",
        sum / count
    );
    ensure!(
        sum / count < 5.0,
        "mean convergence lag {} s on one machine",
        sum / count
    );
    h1.mesh_ok(&["service", "scale", "web=1"])?;
    scrape_until(h1, "web scaled to 1", |s| {
        (s.gauge("mesh_service_replicas_desired", &[("service", "web")]) == Some(1.0)
            && s.gauge("mesh_service_replicas_running", &[("service", "web")]) == Some(1.0))
        .then_some(())
    })?;

    // DNS queries from the remaining task, on its node.
    let task = wait_for(
        "web's task on appnet",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok(network_tasks(h1, "appnet", Some("web"))?.into_iter().next()),
    )?;
    let node = host(&c, &task.node)?;
    scrape_until(node, "web's VIP with a backend", |s| {
        (s.gauge("mesh_vips", &[]).is_some_and(|n| n >= 1.0)
            && s.gauge("mesh_vip_backends", &[]).is_some_and(|n| n >= 1.0)
            && s.counter("mesh_lb_updates", &[]).is_some_and(|n| n >= 1.0))
        .then_some(())
    })?;
    let before = scrape(node)?;
    let resolve = |name: &str| -> Result<Option<String>> {
        let out = node.mesh(&["exec", &task.name, "--", "python3", "-c", RESOLVE, name])?;
        Ok(out.success().then(|| out.stdout.trim().to_string()))
    };
    let a_noerror = |s: &Scrape| {
        s.counter("mesh_dns_queries", &[("type", "A"), ("rcode", "NOERROR")])
            .unwrap_or(0.0)
    };
    let nx = |s: &Scrape| {
        s.counter("mesh_dns_queries", &[("type", "A"), ("rcode", "NXDOMAIN")])
            .unwrap_or(0.0)
    };
    ensure!(resolve("web")?.is_some(), "web does not resolve");
    // Two names forwarded to the upstream on the underlay, which answers one and not the
    // other. Each is counted whatever the upstream does: answered (forwarded, with its
    // rcode), or, on a machine too busy for it to answer in time, failed (SERVFAIL).
    let outside = resolve("outside.example")?;
    let nothing = resolve("nothing.example")?;
    ensure!(nothing.is_none(), "nothing.example resolved: {nothing:?}");
    let after = scrape(node)?;
    let fwd = |s: &Scrape| s.counter("mesh_dns_forwarded", &[]).unwrap_or(0.0);
    let fwd_failed = |s: &Scrape| s.counter("mesh_dns_forward_failures", &[]).unwrap_or(0.0);
    ensure!(
        fwd(&after) + fwd_failed(&after) >= fwd(&before) + fwd_failed(&before) + 2.0,
        "two forwarded queries not counted: forwarded {} -> {}, failed {} -> {}",
        fwd(&before),
        fwd(&after),
        fwd_failed(&before),
        fwd_failed(&after)
    );
    ensure!(
        after.counter_sum("mesh_dns_queries") >= before.counter_sum("mesh_dns_queries") + 3.0,
        "three queries not counted"
    );
    let answered = fwd(&after) - fwd(&before);
    let noerror = if outside.as_deref() == Some("192.0.2.7") {
        2.0
    } else {
        1.0
    };
    ensure!(
        a_noerror(&after) >= a_noerror(&before) + noerror,
        "A/NOERROR: {} -> {}",
        a_noerror(&before),
        a_noerror(&after)
    );
    if answered >= 2.0 {
        // Both answered by the upstream: its NXDOMAIN is counted as such.
        ensure!(nx(&after) > nx(&before), "A/NXDOMAIN did not move");
    }
    let seen = |s: &Scrape| {
        s.histogram_count("mesh_dns_query_duration_seconds")
            .unwrap_or(0.0)
    };
    ensure!(
        seen(&after) - seen(&before)
            >= after.counter_sum("mesh_dns_queries") - before.counter_sum("mesh_dns_queries"),
        "every query is timed"
    );
    ensure!(after.kind("mesh_dns_queries") == Some("counter"));
    ensure!(after.gauge("mesh_dns_tasks", &[]).is_some_and(|n| n >= 1.0));
    // Gossip carried the records: packets both ways.
    ensure!(after
        .counter("mesh_gossip_packets_sent", &[])
        .is_some_and(|n| n > 0.0));
    ensure!(after
        .counter("mesh_gossip_received_bytes", &[])
        .is_some_and(|n| n > 0.0));
    ensure!(after
        .counter("mesh_gossip_dropped", &[("reason", "bad_tag")])
        .is_some());

    eprintln!(
        "{}: A/NOERROR {} -> {}, A/NXDOMAIN {} -> {}, forwarded {} -> {}",
        node.name(),
        a_noerror(&before),
        a_noerror(&after),
        nx(&before),
        nx(&after),
        fwd(&before),
        fwd(&after)
    );
    // An image pull that fails (nothing listens there) is counted as one.
    ensure!(!h3
        .mesh(&["image", "pull", "127.0.0.1:1/nothing:1"])?
        .success());
    let p = scrape(h3)?;
    ensure!(p.kind("mesh_image_pulls") == Some("counter"));
    ensure!(p.counter("mesh_image_pulls", &[("result", "failure")]) == Some(1.0));
    ensure!(p.histogram_count("mesh_image_pull_duration_seconds") == Some(1.0));

    drop(etc);
    if c.hosts().iter().any(|h| !h.daemon_running()) {
        bail!("a daemon died during the test");
    }
    Ok(())
}
