//! `cargo xtask demo`: a cluster of simulated hosts on this machine (network namespaces on an
//! underlay bridge, one `meshd` each), formed and exercised through the `mesh` CLI exactly as an
//! operator would, then torn down (`--keep` waits for Enter first).

use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_netns::swarm::{join_swarm, leader_name};
use mesh_netns::{wait_for, Cluster, ClusterOpts, Host};

fn show(h: &Host, args: &[&str]) -> Result<()> {
    // Inline scripts are shown as '<script>' to keep the transcript readable.
    let shown: Vec<&str> = args
        .iter()
        .map(|a| if a.contains('\n') { "'<script>'" } else { a })
        .collect();
    println!("\n$ mesh {}    # on {}", shown.join(" "), h.name());
    let out = h.mesh(args)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(())
}

/// The same cluster through the unmodified `docker` CLI, on the node's Engine API socket.
fn show_docker(h: &Host, args: &[&str]) -> Result<()> {
    println!(
        "\n$ docker -H unix://{} {}    # on {}",
        h.docker_socket().display(),
        args.join(" "),
        h.name()
    );
    let out = h.docker(args)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(())
}

pub fn run(keep: bool) -> Result<()> {
    if !mesh_netns::require_root()? {
        anyhow::bail!("the demo creates network namespaces: run it as root");
    }
    println!(
        "== building meshd and mesh, creating 4 simulated hosts (h1..h4) on an underlay bridge"
    );
    let c = Cluster::new(ClusterOpts {
        hosts: 4,
        start_daemons: true,
        name_hint: "demo",
    })?;
    let (h1, h2) = (c.host(1), c.host(2));
    println!("== h1 initializes the swarm; h2, h3 join as managers, h4 as a worker");
    show(
        h1,
        &["swarm", "init", "--advertise-addr", &h1.addr().to_string()],
    )?;
    join_swarm(&c, 3)?;
    show(h1, &["node", "ls"])?;
    show(c.host(4), &["info"])?;

    println!("\n== an overlay network and a replicated service on it: each task is a process in its own namespaces and cgroup");
    show(h1, &["network", "create", "-d", "overlay", "appnet"])?;
    show(h1, &["network", "ls"])?;
    let cmd = "echo hello from $MESH_TASK_NAME on $MESH_NODE_NAME; exec sleep 100000";
    show(
        h1,
        &[
            "service",
            "create",
            "--name",
            "hello",
            "--replicas",
            "4",
            "--network",
            "appnet",
            "--",
            "sh",
            "-c",
            cmd,
        ],
    )?;
    show(h1, &["service", "ls"])?;
    show(h1, &["service", "ps", "hello"])?;
    show(h1, &["service", "logs", "hello"])?;
    let ps = h1.mesh_json(&["service", "ps", "hello"])?;
    let on_h4 = ps
        .as_array()
        .and_then(|a| a.iter().find(|t| t["Node"] == "h4"))
        .and_then(|t| t["Name"].as_str())
        .unwrap_or("hello.1")
        .to_string();
    let look = "hostname; cat /etc/resolv.conf; ip -4 -o addr show; ip route";
    show(c.host(4), &["exec", &on_h4, "--", "sh", "-c", look])?;
    // Task to task across hosts over VXLAN: ping every other task of the service from h4's.
    let net: serde_json::Value =
        serde_json::from_str(&h1.mesh_ok(&["network", "inspect", "appnet"])?)?;
    let tasks = net[0]["Tasks"].as_array().cloned().unwrap_or_default();
    for t in tasks.iter().filter(|t| t["Node"] != "h4") {
        let node = t["Node"].as_str().unwrap_or("");
        let ip = t["IPv4Address"]
            .as_str()
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("");
        println!("\n# from {on_h4} (on h4) to the task on {node} ({ip}), over the overlay:");
        show(
            c.host(4),
            &["exec", &on_h4, "--", "ping", "-c", "2", "-W", "1", ip],
        )?;
    }

    println!("\n== service discovery and the routing mesh: a web service with 2 replicas, published on port 8080");
    let web = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',80))\ns.listen(64)\nwhile True:\n c,a=s.accept()\n c.recv(1000)\n c.sendall(('HTTP/1.0 200 OK\\r\\n\\r\\nhello from '+socket.gethostname()+'\\n').encode())\n c.close()";
    show(
        h1,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--network",
            "appnet",
            "--publish",
            "8080:80",
            "--constraint",
            "node.hostname!=h4",
            "--",
            "python3",
            "-c",
            web,
        ],
    )?;
    show(h1, &["service", "ls"])?;
    if std::process::Command::new("docker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!(
            "\n# the same cluster through the unmodified docker CLI (meshd serves the Engine API):"
        );
        show_docker(h1, &["node", "ls"])?;
        show_docker(h1, &["service", "ls"])?;
    }
    show(c.host(4), &["vip", "ls"])?;
    show(c.host(4), &["dns", "query", "--network", "appnet", "web"])?;
    show(
        c.host(4),
        &["dns", "query", "--network", "appnet", "tasks.web"],
    )?;
    let get = "import socket,sys\nfor i in range(int(sys.argv[3])):\n c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n c.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n print(c.recv(1000).decode().split('\\r\\n\\r\\n')[1].strip())\n c.close()";
    println!("\n# from {on_h4} (on h4) to http://web/ (DNS -> VIP -> a replica, eBPF socket-LB):");
    show(
        c.host(4),
        &["exec", &on_h4, "--", "python3", "-c", get, "web", "80", "4"],
    )?;
    let published_everywhere = |title: &str| -> Result<()> {
        println!("\n# {title}");
        for h in c.hosts() {
            let addr = h.addr().to_string();
            wait_for(
                &format!("{addr}:8080 answers"),
                Duration::from_secs(15),
                Duration::from_millis(200),
                || {
                    let out = c.client_exec(&["python3", "-c", get, &addr, "8080", "1"])?;
                    Ok(out.status.success().then_some(()))
                },
            )?;
            let out = c.client_exec(&["python3", "-c", get, &addr, "8080", "3"])?;
            let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            println!(
                "client {} -> {} ({}):8080: {}",
                c.client_addr(),
                addr,
                h.name(),
                answers.join(" | ")
            );
        }
        Ok(())
    };
    published_everywhere(
        "from a client on the underlay, port 8080 of every node answers (h4 runs no web task)",
    )?;

    let leader = leader_name(h1)?.unwrap_or_default();
    let lh = c
        .hosts()
        .iter()
        .find(|h| h.name() == leader)
        .expect("leader host");
    let survivor = c.hosts()[..3]
        .iter()
        .find(|h| h.name() != leader)
        .expect("survivor");
    println!("\n== SIGKILL the leader's meshd ({leader})");
    lh.kill_daemon()?;
    let t0 = Instant::now();
    let new = wait_for(
        "new leader",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            Ok(leader_name(survivor)
                .ok()
                .flatten()
                .filter(|l| *l != leader))
        },
    )?;
    println!(
        "new leader {new} answering after {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    wait_for(
        "old leader Down",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let out = survivor.mesh_ok(&["node", "ls"])?;
            Ok(out
                .lines()
                .any(|l| l.contains(&leader) && l.contains("Down"))
                .then_some(()))
        },
    )?;
    show(survivor, &["node", "ls"])?;

    println!("\n== restart {leader}: it rejoins from its data dir and catches up");
    lh.start_daemon()?;
    wait_for(
        "all Ready",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let out = survivor.mesh_ok(&["node", "ls"])?;
            Ok((out.lines().filter(|l| l.contains("Ready")).count() == 4).then_some(()))
        },
    )?;
    show(lh, &["node", "ls"])?;
    published_everywhere("the published port after the leader was killed and restarted")?;
    show(h2, &["service", "rm", "web"])?;
    println!("\n== the task on the killed node was replaced (Orphaned), the others kept running; rolling update, then rm");
    show(
        h2,
        &[
            "service",
            "update",
            "--update-parallelism",
            "2",
            "--env-add",
            "V=2",
            "hello",
        ],
    )?;
    show(h2, &["service", "ps", "hello"])?;
    show(h2, &["service", "rm", "hello"])?;
    wait_for(
        "appnet free",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            Ok(h2
                .mesh(&["network", "rm", "appnet"])?
                .success()
                .then_some(()))
        },
    )?;
    println!("\n$ mesh network rm appnet    # on h2\nappnet");
    show(h2, &["node", "update", "--label-add", "zone=west", "h4"])?;
    show(h2, &["swarm", "join-token", "worker"])?;
    if keep {
        println!("\n== the cluster is up. Drive it with e.g.:");
        for h in c.hosts() {
            println!("   mesh -H unix://{} node ls", h.socket().display());
        }
        println!("== press Enter to tear it down");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    println!("\n== tearing down (daemons, namespaces, directories)");
    drop(c);
    println!("== done");
    Ok(())
}
