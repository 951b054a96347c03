//! Service discovery and VIP balancing from inside tasks, on the real kernel: the nftables
//! balancer (daemons started with `--lb-backend nftables`), ping to a VIP, dnsrr, forwarding
//! to an upstream resolver the test runs, malformed DNS packets, and a scale-down during
//! which no request fails (eBPF balancer).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{form_swarm, network_tasks, swarm_cluster, vip_of};
use mesh_netns::{wait_for, Cluster, ClusterOpts, Host};

const SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(128)\nwhile True:\n c,_=s.accept()\n c.sendall(socket.gethostname().encode())\n c.close()";
/// N connections to NAME:8080 (resolved each time); prints the hostnames seen, then failures.
const CLIENT: &str = "import socket,sys\nseen=set();fail=0\nfor i in range(int(sys.argv[2])):\n try:\n  c=socket.create_connection((sys.argv[1],8080),timeout=2);seen.add(c.recv(100).decode());c.close()\n except OSError:\n  fail+=1\nprint(' '.join(sorted(seen)));print(fail)";
/// Resolves NAME with the system resolver (so through 127.0.0.11); exit 3 if it fails.
const RESOLVE: &str = "import socket,sys\ntry:\n print(' '.join(sorted(socket.gethostbyname_ex(sys.argv[1])[2])))\nexcept OSError:\n sys.exit(3)";
/// A one-name DNS server: `outside.example.` A -> 192.0.2.7, NXDOMAIN for the rest.
const UPSTREAM: &str = "import socket,struct\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.99.0.1',53))\nwhile True:\n d,a=s.recvfrom(512)\n if len(d)<12: continue\n i=12\n while i<len(d) and d[i]: i+=1+d[i]\n q=d[12:i+5]\n name=d[12:i]\n ok=name==b'\\x07outside\\x07example'\n h=d[:2]+struct.pack('>HHHHH',0x8180 if ok else 0x8183,1,1 if ok else 0,0,0)\n ans=b'\\xc0\\x0c'+struct.pack('>HHIH',1,1,30,4)+bytes([192,0,2,7]) if ok else b''\n s.sendto(h+q+ans,a)";
/// Sends garbage to 127.0.0.11:53 and prints the rcode of the answer to a header-only
/// query (FORMERR = 1), or `none`.
const MALFORMED: &str = "import socket,os\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(1)\nfor p in [b'',b'\\x00',os.urandom(7),os.urandom(300),b'\\xff'*12+b'\\x00'*40]:\n s.sendto(p,('127.0.0.11',53))\ns.sendto(b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00',('127.0.0.11',53))\nr='none'\ntry:\n while True:\n  d=s.recv(600)\n  if d[:2]==b'\\x12\\x34': r=str(d[3]&15);break\nexcept OSError: pass\nprint(r)";

fn host<'a>(c: &'a Cluster, name: &str) -> &'a Host {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .expect("known host")
}

/// Runs python `code` with `args` inside `task` (on its node); stdout if it succeeded.
fn py(c: &Cluster, node: &str, task: &str, code: &str, args: &[&str]) -> Result<Option<String>> {
    let mut argv = vec!["exec", task, "--", "python3", "-c", code];
    argv.extend_from_slice(args);
    let out = host(c, node).mesh(&argv)?;
    Ok(out.success().then_some(out.stdout))
}

fn resolve(c: &Cluster, node: &str, task: &str, name: &str) -> Result<Option<Vec<String>>> {
    Ok(py(c, node, task, RESOLVE, &[name])?
        .map(|s| s.split_whitespace().map(str::to_string).collect()))
}

/// (hostnames seen, failures) for `n` connections to `name`:8080 from a task.
fn connect(
    c: &Cluster,
    node: &str,
    task: &str,
    name: &str,
    n: u32,
) -> Result<(BTreeSet<String>, u32)> {
    let out = py(c, node, task, CLIENT, &[name, &n.to_string()])?.context("client failed")?;
    let mut lines = out.lines();
    let seen = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let fail = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("client output")?;
    Ok((seen, fail))
}

/// The first running task of `svc` on `net`: (task name, node, ip).
fn first_task(c: &Cluster, svc: &str, net: &str) -> Result<(String, String, String)> {
    wait_for(
        &format!("a running {svc} task"),
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(network_tasks(c.host(1), net, Some(svc))?
                .into_iter()
                .next()
                .map(|t| (t.name, t.node, t.ip)))
        },
    )
}

/// A task to run clients from: service `cli` on appnet; (task name, node).
fn client_task(c: &Cluster) -> Result<(String, String)> {
    c.host(1).mesh_ok(&[
        "service",
        "create",
        "--name",
        "cli",
        "--network",
        "appnet",
        "--",
        "sleep",
        "1000",
    ])?;
    let (cli, node, _) = first_task(c, "cli", "appnet")?;
    Ok((cli, node))
}

fn running_ips(c: &Cluster, svc: &str, net: &str, n: usize) -> Result<Vec<String>> {
    wait_for(
        &format!("{n} running {svc} tasks"),
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let mut ips: Vec<String> = network_tasks(c.host(1), net, Some(svc))?
                .into_iter()
                .map(|t| t.ip)
                .collect();
            ips.sort();
            Ok((ips.len() == n).then_some(ips))
        },
    )
}

/// Removes `/etc/netns/<ns>` (the resolv.conf `ip netns exec` shows the host's daemon).
struct EtcNetns(Vec<PathBuf>);

impl Drop for EtcNetns {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn nftables_balancer_dnsrr_forwarding_and_bad_packets() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "disc-nft",
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
    let underlay = c.underlay_ns().to_string();
    let mut upstream = std::process::Command::new("ip")
        .args(["netns", "exec", &underlay, "python3", "-c", UPSTREAM])
        .spawn()?;
    let res = (|| -> Result<()> {
        for h in c.hosts() {
            h.start_daemon_with(&["--lb-backend", "nftables"])?;
        }
        form_swarm(&c, 1)?;
        let h1 = c.host(1);
        h1.mesh_ok(&["network", "create", "appnet"])?;
        h1.mesh_ok(&[
            "service",
            "create",
            "--name",
            "echo",
            "--replicas",
            "3",
            "--network",
            "appnet",
            "--",
            "python3",
            "-c",
            SERVER,
        ])?;
        h1.mesh_ok(&[
            "service",
            "create",
            "--name",
            "rr",
            "--replicas",
            "2",
            "--endpoint-mode",
            "dnsrr",
            "--network",
            "appnet",
            "--",
            "sleep",
            "1000",
        ])?;
        let (cli, node) = client_task(&c)?;
        let vip = vip_of(h1, "echo")?;
        running_ips(&c, "echo", "appnet", 3)?;
        // VIP balancing through nftables in the client's namespace: every replica answers.
        let seen = wait_for(
            "connections to echo's VIP reach all 3 replicas (nftables)",
            Duration::from_secs(20),
            Duration::from_millis(300),
            || {
                let (seen, fail) = connect(&c, &node, &cli, "echo", 30)?;
                Ok((fail == 0 && seen.len() == 3).then_some(seen))
            },
        )?;
        eprintln!("nftables VIP {vip}: {seen:?}");
        let table = host(&c, &node)
            .mesh_ok(&["exec", &cli, "--", "nft", "list", "table", "ip", "mesh_lb"])?;
        ensure!(
            table.contains(&vip) && table.contains("numgen"),
            "task's table: {table}"
        );
        let ls = host(&c, &node).mesh_json(&["vip", "ls"])?;
        ensure!(
            ls.as_array()
                .is_some_and(|rows| rows.iter().any(|r| r["VIP"] == vip.as_str()
                    && r["Balancer"] == "nftables"
                    && r["Backends"].as_array().map(|b| b.len()) == Some(3))),
            "vip ls: {ls}"
        );
        // ICMP echo to a VIP (users ping service names).
        let ping =
            host(&c, &node).mesh(&["exec", &cli, "--", "ping", "-c", "1", "-W", "2", "echo"])?;
        ensure!(ping.success(), "ping echo: {} {}", ping.stdout, ping.stderr);

        // dnsrr: the name answers the task IPs, no VIP.
        let rr_ips = running_ips(&c, "rr", "appnet", 2)?;
        wait_for(
            "rr (dnsrr) resolves to its 2 task IPs",
            Duration::from_secs(15),
            Duration::from_millis(200),
            || Ok((resolve(&c, &node, &cli, "rr")? == Some(rr_ips.clone())).then_some(())),
        )?;
        let inspect = h1.mesh_ok(&["service", "inspect", "rr"])?;
        // As Docker's: a dnsrr service has no VirtualIPs.
        let v: serde_json::Value = serde_json::from_str(&inspect)?;
        ensure!(
            v[0]["Endpoint"]["Spec"]["Mode"] == "dnsrr"
                && v[0]["Endpoint"].get("VirtualIPs").is_none(),
            "{inspect}"
        );

        // A name outside the cluster goes to the host's upstream.
        let out = resolve(&c, &node, &cli, "outside.example")?;
        ensure!(
            out == Some(vec!["192.0.2.7".to_string()]),
            "forwarded: {out:?}"
        );
        ensure!(
            resolve(&c, &node, &cli, "nothing.example")?.is_none(),
            "NXDOMAIN forwarded"
        );

        // Malformed packets: dropped or FORMERR; the server keeps answering.
        let rcode = py(&c, &node, &cli, MALFORMED, &[])?.context("malformed client")?;
        ensure!(
            matches!(rcode.trim(), "1" | "none"),
            "header-only query: rcode {rcode}"
        );
        ensure!(
            resolve(&c, &node, &cli, "echo")? == Some(vec![vip.clone()]),
            "DNS alive after garbage"
        );
        Ok(())
    })();
    let _ = upstream.kill();
    let _ = upstream.wait();
    res
}

#[test]
fn scale_down_fails_no_request() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "disc-drain")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "echo",
        "--replicas",
        "6",
        "--network",
        "appnet",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let (cli, node) = client_task(&c)?;
    running_ips(&c, "echo", "appnet", 6)?;
    let dump = || {
        for h in c.hosts() {
            let vni = mesh_netns::swarm::vni_of(h1, "appnet").unwrap_or(0);
            eprintln!(
                "{}: arp {:?}",
                h.name(),
                mesh_netns::swarm::overlay_arp(h, vni).ok()
            );
            eprintln!("{}: vip ls {:?}", h.name(), h.mesh_ok(&["vip", "ls"]).ok());
        }
        eprintln!("tasks {:?}", network_tasks(h1, "appnet", None).ok());
        for t in network_tasks(h1, "appnet", Some("echo")).unwrap_or_default() {
            let r = connect(&c, &node, &cli, &t.ip, 3).ok();
            let p = host(&c, &node)
                .mesh(&["exec", &cli, "--", "ping", "-c", "1", "-W", "1", &t.ip])
                .map(|o| o.success())
                .ok();
            eprintln!("direct {} on {}: connect {r:?} ping {p:?}", t.ip, t.node);
        }
    };
    wait_for(
        "the VIP reaches all 6 replicas",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let (seen, fail) = connect(&c, &node, &cli, "echo", 40)?;
            eprintln!(
                "via the VIP: {} replicas answered, {fail} failed",
                seen.len()
            );
            Ok((seen.len() == 6).then_some(()))
        },
    )
    .inspect_err(|_| dump())?;
    // A client connecting in a loop for ~8 s while the service goes from 6 to 1 replica.
    let loop_client = "import socket,time\nt0=time.time();end=t0+8;n=0;fail=0;errs=[]\nwhile time.time()<end:\n n+=1\n try:\n  c=socket.create_connection(('echo',8080),timeout=2);c.recv(100);c.close()\n except OSError as e:\n  fail+=1;errs.append('%.2f %r'%(time.time()-t0,e))\n time.sleep(0.01)\nprint(n,fail);print(errs)";
    let out = std::thread::scope(|s| -> Result<String> {
        let t = s.spawn(|| py(&c, &node, &cli, loop_client, &[]));
        std::thread::sleep(Duration::from_secs(2));
        h1.mesh_ok(&["service", "scale", "echo=1"])?;
        t.join()
            .expect("client thread")?
            .context("loop client failed")
    })?;
    let nums: Vec<u64> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(nums.len() == 2 && nums[0] > 100, "loop client: {out}");
    ensure!(
        nums[1] == 0,
        "{} of {} requests failed during scale-down: {out}",
        nums[1],
        nums[0]
    );
    eprintln!("scale 6 -> 1: {} requests, {} failed", nums[0], nums[1]);
    // Every node's DNS and balancer hold exactly the one task left.
    let left = running_ips(&c, "echo", "appnet", 1)?;
    let vip = vip_of(h1, "echo")?;
    for h in c.hosts() {
        wait_for(
            &format!("{}: the VIP has one backend", h.name()),
            Duration::from_secs(5),
            Duration::from_millis(100),
            || {
                let ls = h.mesh_json(&["vip", "ls"])?;
                Ok(ls
                    .as_array()
                    .is_some_and(|rows| {
                        rows.iter().any(|r| {
                            r["VIP"] == vip.as_str()
                                && r["Backends"]
                                    .as_array()
                                    .is_some_and(|b| b.len() == 1 && b[0] == left[0].as_str())
                        })
                    })
                    .then_some(()))
            },
        )
        .or_else(|e| {
            // A node with no task on appnet holds no VIP for it: that is right too.
            let ls = h.mesh_json(&["vip", "ls"])?;
            if ls
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["VIP"] != vip.as_str()))
            {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    let q = host(&c, &node).mesh_ok(&["dns", "query", "--network", "appnet", "tasks.echo"])?;
    ensure!(
        q.contains(&left[0]) && q.lines().count() == 2,
        "tasks.echo: {q}"
    );
    Ok(())
}

/// A task being stopped keeps resolving and reaching services until it exits, also when it is
/// its node's last task on the network (found by the churn soak: the node left the network's
/// gossip as soon as the task was withdrawn, so its last second of drain saw no names and no
/// VIPs). The client on h2 calls `srv` (on h1) by name every 20 ms and logs each outcome;
/// `service rm cli` withdraws it, drains it for a second, then stops it.
#[test]
fn a_draining_task_keeps_names_and_vips_until_it_stops() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "disc-lastdrain")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "srv",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h1",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let log = c.base_dir().join("lastdrain.log");
    let client = "import socket,sys,time\nout=open(sys.argv[1],'a',buffering=1)\nwhile True:\n t=time.time()\n try:\n  s=socket.create_connection(('srv',8080),timeout=2);s.recv(100);s.close();out.write('ok %.3f\\n'%t)\n except Exception as e:\n  out.write('fail %.3f %r\\n'%(t,e))\n time.sleep(0.02)";
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "cli",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h2",
        "--",
        "python3",
        "-c",
        client,
        &log.to_string_lossy(),
    ])?;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the client calling srv",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok((read().lines().filter(|l| l.starts_with("ok")).count() > 20).then_some(())),
    )?;
    let removed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    h1.mesh_ok(&["service", "rm", "cli"])?;
    // The client is gone once its log stops growing.
    let mut last_len = 0;
    wait_for(
        "the client stopped",
        Duration::from_secs(20),
        Duration::from_millis(700),
        || {
            let len = read().len();
            let done = len == last_len;
            last_len = len;
            Ok(done.then_some(()))
        },
    )?;
    let text = read();
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("fail")).collect();
    let after: usize = text
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .filter_map(|t| t.parse::<f64>().ok())
        .filter(|t| *t > removed)
        .count();
    eprintln!(
        "{after} calls succeeded after service rm, {} failed",
        fails.len()
    );
    ensure!(fails.is_empty(), "calls failed while draining: {fails:?}");
    ensure!(
        after >= 10,
        "the client should keep calling during its drain (only {after} calls after rm)"
    );
    Ok(())
}

/// A task started on a node that has no other task on its network (the first after a drain
/// or a scale-up) must resolve and call the network's services from its first instruction:
/// its node joins the network's tables in the task's start gate and waits for them, rather
/// than after the task runs (the soak saw such a task's first lookups fail for ~100 ms).
#[test]
fn a_task_new_to_its_node_s_network_resolves_names_at_once() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "disc-firstlookup")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let h2 = c.host(2);
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h1",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let vip = vip_of(h1, "web")?;
    running_ips(&c, "web", "appnet", 1)?;
    // The first lookup and call the task makes, written to OUT; then it idles.
    let first = "import socket,sys\ntry:\n a=socket.gethostbyname('web');c=socket.create_connection((a,8080),timeout=2);b=c.recv(100);c.close();r='ok %s %s'%(a,b.decode())\nexcept Exception as e:\n r='fail %r'%(e,)\nopen(sys.argv[1]+'.tmp','w').write(r)\nimport os;os.rename(sys.argv[1]+'.tmp',sys.argv[1])\nimport time;time.sleep(1000)";
    for round in 0..3 {
        // h2 has no task on appnet now: it is not in the network's tables.
        wait_for(
            "h2 to hold no VIP of appnet",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || Ok((!h2.mesh_ok(&["vip", "ls"])?.contains(&vip)).then_some(())),
        )?;
        let out = c.base_dir().join(format!("first-{round}.txt"));
        let out_s = out.to_string_lossy().to_string();
        h1.mesh_ok(&[
            "service",
            "create",
            "--name",
            "first",
            "--network",
            "appnet",
            "--constraint",
            "node.hostname==h2",
            "--",
            "python3",
            "-c",
            first,
            &out_s,
        ])?;
        let got = wait_for(
            "the new task on h2 to report its first call",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || Ok(std::fs::read_to_string(&out).ok()),
        )?;
        eprintln!("round {round}: {got}");
        ensure!(
            got.starts_with(&format!("ok {vip} ")),
            "round {round}: the first lookup and call of a task new to h2's appnet: {got}"
        );
        h1.mesh_ok(&["service", "rm", "first"])?;
    }
    Ok(())
}
