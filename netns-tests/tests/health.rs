//! Health checks on the real kernel (2 hosts, host-process tasks): a task whose check has not
//! passed yet is Starting in `service ps`, is no backend of its VIP and is not in its DNS
//! names, then Running and served once its check passes; a healthy task whose check starts
//! failing is withdrawn within about one interval (a client counting which task answered sees
//! none from it afterwards), stopped, reported Failed with Docker's error and replaced.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{field, network_tasks, service_ps, swarm_cluster, vip_of};
use mesh_netns::{wait_for, Cluster, Host};

/// Answers each connection on 8080 with its hostname and closes it.
const SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(128)\nh=socket.gethostname().encode()\nwhile True:\n c,_=s.accept()\n c.sendall(h)\n c.close()";
/// Connects to argv[1]:8080 (a name, resolved each time, or an address) every 10 ms for
/// argv[2] seconds; prints one line `UNIXTIME HOSTNAME` per answer, then `failures N`.
const LOOP: &str = "import socket,sys,time\nend=time.time()+float(sys.argv[2]);fail=0\nwhile time.time()<end:\n try:\n  c=socket.create_connection((sys.argv[1],8080),timeout=1);d=c.recv(100).decode();c.close()\n  if not d: raise OSError('empty')\n  print('%.3f %s'%(time.time(),d))\n except OSError:\n  fail+=1\n time.sleep(0.01)\nprint('failures',fail)";
/// From the underlay client: connects to argv[1]:argv[2] and prints the answer (exit 3 if
/// the connection fails or nothing answers).
const CONNECT: &str = "import socket,sys\ntry:\n c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1);d=c.recv(100).decode();c.close()\n if not d: sys.exit(3)\n print(d)\nexcept OSError:\n sys.exit(3)";

/// What a connection from the underlay client to `host`'s published `port` answers.
fn through_ingress(c: &Cluster, host: &Host, port: u16) -> Result<Option<String>> {
    let out = c.client_exec_timeout(
        &[
            "python3",
            "-c",
            CONNECT,
            &host.addr().to_string(),
            &port.to_string(),
        ],
        Duration::from_secs(10),
    )?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// Resolves NAME with the system resolver (so through 127.0.0.11); exit 3 if it fails.
const RESOLVE: &str = "import socket,sys\ntry:\n print(' '.join(sorted(socket.gethostbyname_ex(sys.argv[1])[2])))\nexcept OSError:\n sys.exit(3)";

fn host<'a>(c: &'a Cluster, name: &str) -> &'a Host {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .expect("known host")
}

/// Runs python `code` with `args` in `task` (on `node`); its stdout if it succeeded.
fn py(c: &Cluster, node: &str, task: &str, code: &str, args: &[&str]) -> Result<Option<String>> {
    let mut argv = vec!["exec", task, "--", "python3", "-c", code];
    argv.extend_from_slice(args);
    let out = host(c, node).mesh(&argv)?;
    Ok(out.success().then_some(out.stdout))
}

/// What the loop client saw: (unix time, hostname) per answer, and the failures.
fn run_loop(
    c: &Cluster,
    node: &str,
    task: &str,
    to: &str,
    secs: u32,
) -> Result<(Vec<(f64, String)>, u64)> {
    let out = py(c, node, task, LOOP, &[to, &secs.to_string()])?.context("loop client")?;
    let mut answers = Vec::new();
    let mut failures = None;
    for line in out.lines() {
        let (a, b) = line.split_once(' ').context("loop client line")?;
        if a == "failures" {
            failures = Some(b.trim().parse()?);
        } else {
            answers.push((a.parse()?, b.trim().to_string()));
        }
    }
    Ok((answers, failures.context("loop client output")?))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn touch(p: &Path) -> Result<()> {
    std::fs::write(p, b"").with_context(|| format!("writing {}", p.display()))
}

#[test]
fn health_gates_backends_and_replaces_unhealthy_tasks() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "health")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    // The daemon restart near the end must not pass for a node failure: with mesh's 0.5 s
    // heartbeat a node is Down after 2 s of silence, which a debug daemon's restart on a
    // loaded CI machine can exceed (its task was then orphaned and replaced, not adopted).
    // 2 s periods (Down after 8 s) keep that out of what this test checks.
    h1.mesh_ok(&["swarm", "update", "--dispatcher-heartbeat", "2s"])?;
    let dir = c.base_dir().join("health");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
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
    let cli = wait_for(
        "the client task",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok(network_tasks(h1, "appnet", Some("cli"))?.into_iter().next()),
    )?;

    // (a), (c): a task whose check has not passed stays Starting and is no backend.
    let ok = format!("{d}/sick-ok");
    h1.mesh_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "sick",
        "--network",
        "appnet",
        "--publish",
        "18080:8080",
        "--health-cmd",
        &format!("test -f {ok}"),
        "--health-interval",
        "300ms",
        "--health-start-period",
        "60s",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let row = wait_for(
        "sick.1 starting",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(service_ps(h1, "sick")?
                .into_iter()
                .find(|t| field(t, "CurrentState").starts_with("Starting")))
        },
    )?;
    ensure!(field(&row, "DesiredState") == "Running", "{row}");
    let vip = vip_of(h1, "sick")?;
    // Its process runs and listens (its check runs in it), for several probes.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        let (answers, failures) = run_loop(&c, &cli.node, &cli.name, &vip, 1)?;
        // (No backend ever: the VIP is not even programmed, so a connect times out.)
        ensure!(
            answers.is_empty() && failures > 0,
            "a starting task answered through its VIP: {answers:?} ({failures} failures)"
        );
        for name in ["tasks.sick", "sick"] {
            let got = py(&c, &cli.node, &cli.name, RESOLVE, &[name])?;
            ensure!(got.is_none(), "{name} resolved to {got:?} while starting");
        }
        for h in c.hosts() {
            let got = through_ingress(&c, h, 18080)?;
            ensure!(
                got.is_none(),
                "the routing mesh on {} answered {got:?}",
                h.name()
            );
        }
        let rows = service_ps(h1, "sick")?;
        ensure!(
            rows.len() == 1 && field(&rows[0], "CurrentState").starts_with("Starting"),
            "service ps sick: {rows:?}"
        );
    }
    // Its check passes: Running, in DNS and behind its VIP.
    touch(Path::new(&ok))?;
    wait_for(
        "sick.1 running",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let rows = service_ps(h1, "sick")?;
            Ok(
                (rows.len() == 1 && field(&rows[0], "CurrentState").starts_with("Running"))
                    .then_some(()),
            )
        },
    )?;
    let ip = wait_for(
        "tasks.sick resolves",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || py(&c, &cli.node, &cli.name, RESOLVE, &["tasks.sick"]),
    )?;
    ensure!(ip.split_whitespace().count() == 1, "tasks.sick: {ip}");
    let (answers, _) = run_loop(&c, &cli.node, &cli.name, "sick", 1)?;
    ensure!(!answers.is_empty(), "a healthy task did not answer");
    for h in c.hosts() {
        wait_for(
            &format!("the routing mesh on {}", h.name()),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || through_ingress(&c, h, 18080),
        )?;
    }

    // (b): one of two healthy tasks turns unhealthy.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--network",
        "appnet",
        "--health-cmd",
        &format!("test ! -f {d}/down-$(cat /proc/sys/kernel/hostname)"),
        "--health-interval",
        "500ms",
        "--health-retries",
        "1",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let hostnames = wait_for(
        "both web tasks answering",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let (answers, _) = run_loop(&c, &cli.node, &cli.name, "web", 1)?;
            let seen: BTreeSet<String> = answers.into_iter().map(|(_, h)| h).collect();
            Ok((seen.len() == 2).then_some(seen))
        },
    )?;
    let victim = hostnames.iter().next().cloned().context("a web task")?;
    let (answers, marked) = std::thread::scope(|s| -> Result<_> {
        let client = s.spawn(|| run_loop(&c, &cli.node, &cli.name, "web", 6));
        std::thread::sleep(Duration::from_millis(1500));
        let marked = now_secs();
        touch(&dir.join(format!("down-{victim}")))?;
        let (answers, _) = client.join().expect("client thread")?;
        Ok((answers, marked))
    })?;
    let last_victim = answers
        .iter()
        .filter(|(_, h)| *h == victim)
        .map(|(t, _)| *t)
        .fold(0.0, f64::max);
    ensure!(
        last_victim > 0.0 && last_victim < marked + 1.5,
        "the unhealthy task answered {:.3} s after its check started failing (interval 0.5 s)",
        last_victim - marked
    );
    let after: BTreeSet<&String> = answers
        .iter()
        .filter(|(t, _)| *t > marked + 1.5)
        .map(|(_, h)| h)
        .collect();
    ensure!(
        !after.is_empty() && !after.contains(&victim),
        "answers after the withdrawal: {after:?}"
    );
    // Stopped, Failed with Docker's error, and replaced.
    let rows = wait_for(
        "the unhealthy task replaced",
        Duration::from_secs(40),
        Duration::from_millis(300),
        || {
            let rows = service_ps(h1, "web")?;
            let failed = rows.iter().any(|t| {
                field(t, "CurrentState").starts_with("Failed")
                    && field(t, "Error")
                        == "task: non-zero exit (137): dockerexec: unhealthy container"
                    && t["ID"]
                        .as_str()
                        .is_some_and(|id| victim.starts_with(id) || id.starts_with(victim.as_str()))
            });
            let running = rows
                .iter()
                .filter(|t| {
                    field(t, "DesiredState") == "Running"
                        && field(t, "CurrentState").starts_with("Running")
                })
                .count();
            Ok((failed && running == 2).then_some(rows))
        },
    )
    .with_context(|| format!("service ps web: {:?}", service_ps(h1, "web")))?;
    let tasks = py(&c, &cli.node, &cli.name, RESOLVE, &["tasks.web"])?.unwrap_or_default();
    ensure!(
        tasks.split_whitespace().count() == 2,
        "tasks.web: {tasks} ({rows:?})"
    );
    let (answers, _) = run_loop(&c, &cli.node, &cli.name, "web", 1)?;
    ensure!(
        answers.iter().all(|(_, h)| *h != victim) && !answers.is_empty(),
        "after the replacement: {answers:?}"
    );

    // A daemon SIGKILLed and restarted adopts its task: still served, and probed again (a
    // failing check still withdraws and replaces it).
    let h2 = c.host(2);
    let id = service_ps(h1, "web")?
        .into_iter()
        .find(|t| {
            field(t, "Node") == h2.name()
                && field(t, "DesiredState") == "Running"
                && field(t, "CurrentState").starts_with("Running")
        })
        .map(|t| field(&t, "ID").to_string())
        .context("a running web task on host 2")?;
    h2.kill_daemon()?;
    h2.start_daemon()?;
    let adopted = wait_for(
        "the adopted task answering",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let (answers, _) = run_loop(&c, &cli.node, &cli.name, "web", 1)?;
            Ok(answers
                .into_iter()
                .map(|(_, h)| h)
                .find(|h| h.starts_with(&id) || id.starts_with(h.as_str())))
        },
    )?;
    touch(&dir.join(format!("down-{adopted}")))?;
    wait_for(
        "the adopted task failed unhealthy",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            Ok(service_ps(h1, "web")?
                .iter()
                .any(|t| {
                    field(t, "ID") == id
                        && field(t, "CurrentState").starts_with("Failed")
                        && field(t, "Error").ends_with("dockerexec: unhealthy container")
                })
                .then_some(()))
        },
    )
    .inspect_err(|_| {
        // Seen twice in CI (1 run in about 20): the task Orphaned ("node is down") rather
        // than Failed, and host 2's restarted daemon said nothing of the task, of its
        // heartbeats or its plane. Everything it said but the DNS answers tells why.
        c.print_daemon_logs(|l| {
            ![
                "DNS local answer",
                "DEBUG aya",
                "DEBUG foca",
                "DEBUG mesh_gossip",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
    })
    .with_context(|| format!("service ps web: {:?}", service_ps(h1, "web")))?;
    Ok(())
}

/// The current state of `svc`'s tasks meant to run, from `service ps`.
fn states(h: &Host, svc: &str) -> Result<Vec<String>> {
    Ok(service_ps(h, svc)?
        .iter()
        .filter(|t| field(t, "DesiredState") == "Running")
        .map(|t| field(t, "CurrentState").to_string())
        .collect())
}

fn wait_state(h: &Host, svc: &str, prefix: &str, within: Duration) -> Result<()> {
    wait_for(
        &format!("{svc}: a task {prefix}"),
        within,
        Duration::from_millis(200),
        || {
            Ok(states(h, svc)?
                .iter()
                .any(|s| s.starts_with(prefix))
                .then_some(()))
        },
    )
    .with_context(|| format!("service ps {svc}: {:?}", service_ps(h, svc)))
}

#[test]
fn the_image_s_healthcheck_merges_with_the_service_s_and_the_docker_cli_sets_one() -> Result<()> {
    let Some((c, reg)) = mesh_netns::registry::registry_cluster(1, 1, "health-img")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    // As `HEALTHCHECK --interval=300ms --start-period=60s CMD test -f /tmp/ready` writes it.
    reg.push_test_image_with_healthcheck(
        "hc",
        "v1",
        "v1",
        r#"{"Test":["CMD-SHELL","test -f /tmp/ready"],"Interval":300000000,"StartPeriod":60000000000}"#,
    )?;
    let image = format!("{}/hc:v1", reg.host_port());

    // The image's check alone: Starting (its start period), then Running once it passes.
    h1.mesh_ok(&[
        "service", "create", "-d", "--name", "img", &image, "sleep", "1000",
    ])?;
    wait_state(h1, "img", "Starting", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));
    let s = states(h1, "img")?;
    ensure!(
        s.len() == 1 && s[0].starts_with("Starting"),
        "img after 2 s: {s:?}"
    );
    h1.mesh_ok(&["exec", "img.1", "--", "touch", "/tmp/ready"])?;
    wait_state(h1, "img", "Running", Duration::from_secs(10))?;
    // `service update` changes one field and keeps the image's test.
    h1.mesh_ok(&["service", "update", "-d", "--health-interval", "1s", "img"])?;
    let v: serde_json::Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "img"])?)?;
    ensure!(
        v[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]
            == serde_json::json!({"Interval": 1_000_000_000u64}),
        "mesh service inspect img: {}",
        v[0]["Spec"]
    );
    let e = h1.mesh(&[
        "service",
        "update",
        "--no-healthcheck",
        "--health-retries",
        "2",
        "img",
    ])?;
    ensure!(
        !e.success()
            && e.stderr
                .contains("--no-healthcheck conflicts with --health-* options"),
        "{e:?}"
    );

    // --no-healthcheck turns the image's off: Running at once.
    h1.mesh_ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "off",
        "--no-healthcheck",
        &image,
        "sleep",
        "1000",
    ])?;
    wait_state(h1, "off", "Running", Duration::from_secs(20))?;

    // The service's start period and retries over the image's test and interval: the test
    // fails (no /tmp/ready in a new task), so the task turns unhealthy at its first probe.
    h1.mesh_ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "fast",
        "--health-start-period",
        "1ms",
        "--health-retries",
        "1",
        &image,
        "sleep",
        "1000",
    ])?;
    wait_for(
        "fast: a task failed unhealthy",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(service_ps(h1, "fast")?
                .iter()
                .any(|t| {
                    field(t, "CurrentState").starts_with("Failed")
                        && field(t, "Error")
                            == "task: non-zero exit (137): dockerexec: unhealthy container"
                })
                .then_some(()))
        },
    )?;

    // The docker CLI: its --health-* flags, shown back as dockerd shows them, kept through
    // its read-modify-write update.
    h1.docker_ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "dk",
        "--health-cmd",
        "test -f /tmp/ready",
        "--health-interval",
        "300ms",
        "--health-start-period",
        "60s",
        "--health-retries",
        "2",
        &image,
        "sleep",
        "1000",
    ])?;
    let shown = |h: &Host| -> Result<serde_json::Value> {
        let out = h.docker_ok(&[
            "service",
            "inspect",
            "dk",
            "--format",
            "{{json .Spec.TaskTemplate.ContainerSpec.Healthcheck}}",
        ])?;
        Ok(serde_json::from_str(out.trim())?)
    };
    let hc = shown(h1)?;
    ensure!(
        hc == serde_json::json!({"Test": ["CMD-SHELL", "test -f /tmp/ready"],
            "Interval": 300_000_000u64, "StartPeriod": 60_000_000_000u64, "Retries": 2}),
        "docker service inspect: {hc}"
    );
    wait_state(h1, "dk", "Starting", Duration::from_secs(30))?;
    h1.docker_ok(&["service", "update", "-d", "--health-timeout", "2s", "dk"])?;
    let hc = shown(h1)?;
    ensure!(
        hc["Timeout"] == 2_000_000_000u64
            && hc["Retries"] == 2
            && hc["Test"][1] == "test -f /tmp/ready",
        "after update: {hc}"
    );
    let v: serde_json::Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "dk"])?)?;
    // The same document as the docker CLI's: one model behind both front doors.
    let spec = &v[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"];
    ensure!(
        *spec == hc && spec["Interval"] == 300_000_000u64,
        "mesh service inspect: {spec}, docker service inspect: {hc}"
    );
    Ok(())
}
