//! The routing mesh on the real kernel, from a client on the underlay: a published port
//! answers on every node's address, also on a node that runs no task of the service, and
//! spreads connections over every replica; UDP; host mode; an assigned port; a refused
//! conflict; scale to 0 and back; a SIGKILLed daemon's node keeps answering and a restarted
//! one duplicates nothing; `service rm` closes the port everywhere.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{expect_err, swarm_cluster};
use mesh_netns::{wait_for, Cluster};

/// A TCP server answering each connection with its hostname and the client's address.
const TCP_SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(128)\nwhile True:\n c,a=s.accept()\n c.sendall((socket.gethostname()+' '+a[0]).encode())\n c.close()";
/// The same over UDP: one datagram back per datagram, with the hostname and the client's
/// address.
const UDP_SERVER: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5353))\nwhile True:\n d,a=s.recvfrom(100)\n s.sendto((socket.gethostname()+' '+a[0]).encode(),a)";
/// `N` connections (or datagrams) to ADDR:PORT; prints the distinct hostnames that answered,
/// the number of failures, and the distinct client addresses the servers saw.
const CLIENT: &str = "import socket,sys\naddr,port,n,proto=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),sys.argv[4]\nseen=set();peers=set();fail=0\nfor i in range(n):\n try:\n  if proto=='tcp':\n   c=socket.create_connection((addr,port),timeout=2);r=c.recv(200).decode();c.close()\n  else:\n   c=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);c.settimeout(2);c.sendto(b'x',(addr,port));r=c.recv(200).decode();c.close()\n  w=r.split();seen.add(w[0]);peers.update(w[1:2])\n except OSError:\n  fail+=1\nprint(' '.join(sorted(seen)));print(fail);print(' '.join(sorted(peers)))";

/// `N` rounds of a connection from source port 40123 to A:PORT, then one to B:PORT, each
/// read to its end (the server closes first, so the client keeps no TIME_WAIT and can reuse
/// the port at once); prints the slowest connection in seconds and the failures.
const SAME_PORT: &str = "import socket,sys,time\na,b,port,n=sys.argv[1],sys.argv[2],int(sys.argv[3]),int(sys.argv[4])\nworst=0.0;fail=0\nfor i in range(n):\n for addr in (a,b):\n  s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('',40123));s.settimeout(5)\n  t=time.time()\n  try:\n   s.connect((addr,port))\n   while s.recv(200):\n    pass\n  except OSError:\n   fail+=1\n  worst=max(worst,time.time()-t);s.close()\nprint(worst);print(fail)";

/// Waits until TCP `port` answers on every address of `addrs` (bounded).
fn wait_answering(c: &Cluster, addrs: &[String], port: u16) -> Result<()> {
    for addr in addrs {
        wait_for(
            &format!("{addr}:{port} answers"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || Ok((probe(c, addr, port, 1, "tcp")?.1 == 0).then_some(())),
        )?;
    }
    Ok(())
}

/// Conntrack entries in `h`'s namespace of connections from `client` to port `port`.
fn tracked(h: &mesh_netns::Host, client: &str, port: u16) -> Result<usize> {
    let out = h.exec(&["cat", "/proc/net/nf_conntrack"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (src, dport) = (format!(" src={client} "), format!(" dport={port} "));
    Ok(text
        .lines()
        .filter(|l| l.contains(&src) && l.contains(&dport))
        .count())
}

/// A running task of `svc`: its ID and its node.
fn running_task<'a>(c: &'a Cluster, svc: &str) -> Result<(String, &'a mesh_netns::Host)> {
    let rows = c.host(1).mesh_json(&["service", "ps", svc])?;
    let (id, node) = rows
        .as_array()
        .and_then(|rows| {
            rows.iter().find_map(|r| {
                r["CurrentState"]
                    .as_str()?
                    .starts_with("Running")
                    .then_some(())?;
                Some((
                    r["ID"].as_str()?.to_string(),
                    r["Node"].as_str()?.to_string(),
                ))
            })
        })
        .with_context(|| format!("a running {svc} task in {rows}"))?;
    let host = c
        .hosts()
        .iter()
        .find(|h| h.name() == node)
        .with_context(|| format!("node {node}"))?;
    Ok((id, host))
}

/// Counter `name` of the `TcpExt:` lines of a `/proc/net/netstat` text.
fn tcp_ext(netstat: &str, name: &str) -> Result<u64> {
    let rows: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("TcpExt:"))
        .collect();
    let [names, values] = rows[..] else {
        anyhow::bail!("no TcpExt lines in {netstat:?}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no TcpExt {name} in {netstat:?}"))
}

/// Hostnames that answered and failures, for `n` tries from the underlay client.
fn probe(
    c: &Cluster,
    addr: &str,
    port: u16,
    n: u32,
    proto: &str,
) -> Result<(BTreeSet<String>, u32)> {
    let (seen, fail, _) = probe_peers(c, addr, port, n, proto)?;
    Ok((seen, fail))
}

/// Parses [`CLIENT`]'s output: hostnames, failures, client addresses seen by the servers.
fn parse_client(stdout: &[u8], stderr: &[u8]) -> Result<(BTreeSet<String>, u32, BTreeSet<String>)> {
    let text = String::from_utf8_lossy(stdout).to_string();
    let mut lines = text.lines();
    let words = |l: Option<&str>| -> BTreeSet<String> {
        l.unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let seen = words(lines.next());
    let fail = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| {
            format!(
                "client output: {text:?} {}",
                String::from_utf8_lossy(stderr)
            )
        })?;
    Ok((seen, fail, words(lines.next())))
}

/// [`probe`], with the client addresses the servers saw.
fn probe_peers(
    c: &Cluster,
    addr: &str,
    port: u16,
    n: u32,
    proto: &str,
) -> Result<(BTreeSet<String>, u32, BTreeSet<String>)> {
    let out = c.client_exec_timeout(
        &[
            "python3",
            "-c",
            CLIENT,
            addr,
            &port.to_string(),
            &n.to_string(),
            proto,
        ],
        Duration::from_secs(60),
    )?;
    parse_client(&out.stdout, &out.stderr)
}

/// The hostnames (short task IDs) of a service's running tasks.
fn task_hostnames(c: &Cluster, svc: &str) -> Result<BTreeSet<String>> {
    let rows = c.host(1).mesh_json(&["service", "ps", svc])?;
    Ok(rows
        .as_array()
        .context("ps rows")?
        .iter()
        .filter(|r| {
            r["CurrentState"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Running")
        })
        .filter_map(|r| r["ID"].as_str().map(|id| id.chars().take(12).collect()))
        .collect())
}

fn published_port(c: &Cluster, svc: &str) -> Result<u16> {
    let v: serde_json::Value =
        serde_json::from_str(&c.host(1).mesh_ok(&["service", "inspect", svc])?)?;
    let v = if v.is_array() { v[0].clone() } else { v };
    v["Endpoint"]["Ports"][0]["PublishedPort"]
        .as_u64()
        .map(|p| p as u16)
        .with_context(|| format!("no published port in {v}"))
}

#[test]
fn published_ports_answer_on_every_node() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "ingress")? else {
        return Ok(());
    };
    let (h1, h3) = (c.host(1), c.host(3));
    let addrs: Vec<String> = c.hosts().iter().map(|h| h.addr().to_string()).collect();
    // Two replicas, never on h3: h3 answers through the mesh only.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--publish",
        "8080:8080",
        "--constraint",
        "node.hostname!=h3",
        "--",
        "python3",
        "-c",
        TCP_SERVER,
    ])?;
    let replicas = wait_for(
        "2 web replicas running",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let t = task_hostnames(&c, "web")?;
            Ok((t.len() == 2).then_some(t))
        },
    )?;
    wait_answering(&c, &addrs, 8080)?;
    // Through the node without a task, connections reach both replicas, none fails, and
    // the tasks see the client's own address (the routing mesh keeps it); through the
    // replicas' own nodes too.
    let client = BTreeSet::from([c.client_addr().to_string()]);
    let (seen, fail, peers) = probe_peers(&c, &addrs[2], 8080, 40, "tcp")?;
    ensure!(
        fail == 0 && seen == replicas && peers == client,
        "via h3: {seen:?} (want {replicas:?}), {fail} failed, the tasks saw {peers:?} (want {client:?})"
    );
    // They took the eBPF fast path: h3 tracked none of them (the nftables path DNATs in h3's
    // namespace, and again in its sandbox).
    ensure!(
        tracked(h3, &c.client_addr().to_string(), 8080)? == 0,
        "h3 tracked connections of the client: the eBPF fast path did not take them"
    );
    for addr in &addrs[..2] {
        let (_, fail, peers) = probe_peers(&c, addr, 8080, 10, "tcp")?;
        ensure!(
            fail == 0 && peers == client,
            "via {addr}: {fail} failed, the tasks saw {peers:?}"
        );
    }
    // The node itself, to its own address: the tasks see that address.
    let out = h3.exec(&["python3", "-c", CLIENT, &addrs[2], "8080", "5", "tcp"])?;
    let (_, fail, peers) = parse_client(&out.stdout, &out.stderr)?;
    ensure!(
        fail == 0 && peers == BTreeSet::from([addrs[2].clone()]),
        "h3 to itself: {fail} failed, the tasks saw {peers:?}"
    );

    // Port taken: refused with a clear error, nothing created.
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "web2",
            "--publish",
            "8080:80",
            "--",
            "sleep",
            "100",
        ],
        "port 8080/tcp is already in use by service web",
    )?;
    // UDP, and an assigned port.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "dns",
        "--replicas",
        "2",
        "--publish",
        ":5353/udp",
        "--constraint",
        "node.hostname!=h3",
        "--",
        "python3",
        "-c",
        UDP_SERVER,
    ])?;
    let udp_port = published_port(&c, "dns")?;
    ensure!(
        (30000..=32767).contains(&udp_port),
        "assigned port {udp_port}"
    );
    let ls = h1.mesh_ok(&["service", "ls"])?;
    ensure!(
        ls.contains(&format!("*:{udp_port}->5353/udp")),
        "service ls: {ls}"
    );
    let udp_replicas = wait_for(
        "dns answers over UDP through h3 from both replicas",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let want = task_hostnames(&c, "dns")?;
            let (seen, _) = probe(&c, &addrs[2], udp_port, 20, "udp")?;
            Ok((want.len() == 2 && seen == want).then_some(seen))
        },
    )?;
    eprintln!("udp {udp_port}: {udp_replicas:?}");
    let (_, fail, peers) = probe_peers(&c, &addrs[2], udp_port, 20, "udp")?;
    ensure!(
        fail == 0 && peers == client,
        "udp via h3: {fail} failed, the tasks saw {peers:?}"
    );
    ensure!(
        tracked(h3, &c.client_addr().to_string(), udp_port)? == 0,
        "h3 tracked UDP flows of the client: the eBPF fast path did not take them"
    );
    // One client port reused at once through two nodes, to the same task, after the task
    // closed each connection first: the two routes carry different TCP timestamp offsets
    // (one per client and node address), so a TIME_WAIT left in the task would make PAWS
    // drop about every other SYN, each costing the client a second (the return path keeps
    // no TIME_WAIT in the task).
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "one",
        "--publish",
        "8090:8080",
        "--",
        "python3",
        "-c",
        TCP_SERVER,
    ])?;
    wait_answering(&c, &addrs, 8090)?;
    let out = c.client_exec_timeout(
        &[
            "python3", "-c", SAME_PORT, &addrs[0], &addrs[2], "8090", "10",
        ],
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let worst: f64 = lines.next().and_then(|l| l.parse().ok()).with_context(|| {
        format!(
            "same-port client: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let fail: u32 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(u32::MAX);
    // What the task's kernel counted: SYNs dropped by PAWS in TIME_WAIT (each costs the
    // client a reset and a new SYN).
    let (one_id, one_node) = running_task(&c, "one")?;
    let netstat = one_node.mesh(&["exec", &one_id, "--", "cat", "/proc/net/netstat"])?;
    ensure!(netstat.success(), "exec in {one_id}: {}", netstat.stderr);
    let paws = tcp_ext(&netstat.stdout, "PAWSTimewait")?;
    eprintln!(
        "same client port through two nodes: slowest {worst:.3} s, {fail} failed, {paws} SYNs dropped by PAWS"
    );
    ensure!(
        fail == 0 && worst < 0.5 && paws == 0,
        "20 connections from one client port alternating {} and {}: {fail} failed, slowest {worst:.3} s, \
         {paws} SYNs dropped by PAWS in the task",
        addrs[0],
        addrs[2]
    );
    h1.mesh_ok(&["service", "rm", "one"])?;
    // A task calling another service's published port on a node's address: answered (its
    // node masquerades it out of its gateway bridge, so the task sees that node's address).
    let (dns_id, node) = running_task(&c, "dns")?;
    let out = node.mesh(&[
        "exec", &dns_id, "--", "python3", "-c", CLIENT, &addrs[2], "8080", "10", "tcp",
    ])?;
    ensure!(out.success(), "exec in {dns_id}: {}", out.stderr);
    let (seen, fail, peers) = parse_client(out.stdout.as_bytes(), out.stderr.as_bytes())?;
    ensure!(
        fail == 0 && !seen.is_empty() && peers == BTreeSet::from([node.addr().to_string()]),
        "task {dns_id} -> {}:8080: {seen:?}, {fail} failed, the web tasks saw {peers:?}",
        addrs[2]
    );

    // Host mode: only the task's node listens, straight to the task.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "direct",
        "--publish",
        "mode=host,9090:8080",
        "--constraint",
        "node.hostname==h2",
        "--",
        "python3",
        "-c",
        TCP_SERVER,
    ])?;
    wait_for(
        "h2:9090 answers (host mode)",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok((probe(&c, &addrs[1], 9090, 1, "tcp")?.1 == 0).then_some(())),
    )?;
    let out = c.client_exec(&["python3", "-c", "import socket,sys\nc=socket.create_connection((sys.argv[1],9090),timeout=2)\nprint(c.recv(200).decode())", &addrs[1]])?;
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    // Host mode keeps the client's address: the task sees 10.99.0.1.
    ensure!(
        answer.contains(&c.client_addr().to_string()),
        "host mode peer: {answer}"
    );
    ensure!(
        probe(&c, &addrs[0], 9090, 1, "tcp")?.1 == 1,
        "h1 must not answer on 9090"
    );
    // A second replica of a host-mode port cannot share h2: it waits, saying why.
    h1.mesh_ok(&["service", "scale", "--detach", "direct=2"])?;
    wait_for(
        "the second host-mode replica pending on the port",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let rows = h1.mesh_json(&["service", "ps", "direct"])?;
            Ok(rows
                .as_array()
                .is_some_and(|r| {
                    r.iter().any(|t| {
                        t["Error"]
                            .as_str()
                            .is_some_and(|e| e.contains("host-mode port in use"))
                    })
                })
                .then_some(()))
        },
    )?;

    // Scale to 0: the port stops answering (fast, refused); back to 2: it answers again.
    h1.mesh_ok(&["service", "scale", "web=0"])?;
    wait_for(
        "web scaled to 0 stops answering",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok((probe(&c, &addrs[2], 8080, 1, "tcp")?.1 == 1).then_some(())),
    )?;
    h1.mesh_ok(&["service", "scale", "web=2"])?;
    wait_for(
        "web back at 2 answers through h3 from both",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let want = task_hostnames(&c, "web")?;
            let (seen, fail) = probe(&c, &addrs[2], 8080, 20, "tcp")?;
            Ok((want.len() == 2 && fail == 0 && seen == want).then_some(()))
        },
    )?;

    // A SIGKILLed daemon's node keeps answering (the kernel holds the rules); restarted, it
    // adopts its sandbox and tables without duplicating them.
    h3.kill_daemon()?;
    let (_, fail) = probe(&c, &addrs[2], 8080, 10, "tcp")?;
    ensure!(fail == 0, "h3 with meshd dead: {fail} failed");
    h3.start_daemon()?;
    wait_for(
        "h3 answers after its daemon restarted",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let (seen, fail) = probe(&c, &addrs[2], 8080, 20, "tcp")?;
            Ok((fail == 0 && seen.len() == 2).then_some(()))
        },
    )
    .unwrap();
    let tables = h3.exec(&["nft", "list", "tables"])?;
    let tables = String::from_utf8_lossy(&tables.stdout).to_string();
    ensure!(
        tables.matches("mesh_ingress").count() == 1,
        "host tables after restart: {tables}"
    );
    let links = String::from_utf8_lossy(&h3.exec(&["ip", "-o", "link"])?.stdout).to_string();
    ensure!(links.matches("mesh_ingr0").count() == 1, "{links}");

    // rm closes the port on every node.
    for svc in ["web", "dns", "direct"] {
        h1.mesh_ok(&["service", "rm", svc])?;
    }
    for addr in &addrs {
        wait_for(
            &format!("{addr}:8080 closed after rm"),
            Duration::from_secs(20),
            Duration::from_millis(300),
            || Ok((probe(&c, addr, 8080, 1, "tcp")?.1 == 1).then_some(())),
        )?;
    }
    for h in c.hosts() {
        wait_for(
            &format!("{}: no published port left in nftables", h.name()),
            Duration::from_secs(20),
            Duration::from_millis(300),
            || {
                let out = h.exec(&["nft", "list", "table", "ip", "mesh_ingress"])?;
                let t = String::from_utf8_lossy(&out.stdout).to_string();
                Ok((!t.contains("8080")
                    && !t.contains("9090")
                    && !t.contains(&udp_port.to_string()))
                .then_some(()))
            },
        )?;
    }
    Ok(())
}
