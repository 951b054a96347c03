//! The unmodified `docker` CLI (28.x, on the PATH) drives mesh through the Engine API each
//! `meshd` serves on `EXEC_ROOT/docker.sock`: a swarm formed with `docker swarm init/join`,
//! nodes listed, drained and promoted, an overlay network and an image service created,
//! scaled, updated, rolled back and removed with Docker's own output, a worker answering
//! with Docker's not-a-manager error, and malformed requests refused with nothing changed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::registry::Registry;
use mesh_netns::swarm::{http_get, wait_tasks_running};
use mesh_netns::{wait_for, Cluster, ClusterOpts, Host};
use serde_json::Value;

/// A cluster whose daemons run (no swarm yet) with a registry holding the test image as
/// `web:v1` and `web:v2`; `None` when the test must be skipped.
fn cluster(hosts: usize, hint: &'static str) -> Result<Option<(Cluster, Registry, String)>> {
    if !mesh_netns::require_root()? {
        return Ok(None);
    }
    if std::process::Command::new("docker")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            bail!("the docker CLI is not on the PATH");
        }
        eprintln!("skipping: no docker CLI");
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
    reg.push_test_image("web", "v1", "v1", false)?;
    reg.push_test_image("web", "v2", "v2", false)?;
    let repo = format!("{insecure}/web");
    Ok(Some((c, reg, repo)))
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// `docker swarm init` on host 1, `docker swarm join` with the worker token on the others.
fn form_with_docker(c: &Cluster) -> Result<()> {
    let h1 = c.host(1);
    let out = h1.docker_ok(&["swarm", "init", "--advertise-addr", &h1.addr().to_string()])?;
    ensure!(
        out.contains("Swarm initialized: current node (") && out.contains(") is now a manager."),
        "swarm init printed: {out}"
    );
    ensure!(
        out.contains("docker swarm join --token SWMTKN-"),
        "swarm init printed no join command: {out}"
    );
    let token = h1.docker_ok(&["swarm", "join-token", "-q", "worker"])?;
    let token = token.trim();
    ensure!(token.starts_with("SWMTKN-1-"), "join-token -q: {token}");
    let remote = format!("{}:2377", h1.addr());
    for h in &c.hosts()[1..] {
        let out = h.docker_ok(&["swarm", "join", "--token", token, &remote])?;
        ensure!(
            out.contains("This node joined a swarm as a worker."),
            "{}: join printed {out}",
            h.name()
        );
    }
    Ok(())
}

fn inspect(h: &Host, what: &str, name: &str) -> Result<Value> {
    let out = h.docker_ok(&[what, "inspect", name])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("{what} inspect: {out}"))?;
    Ok(v[0].clone())
}

#[test]
fn docker_cli_drives_a_swarm() -> Result<()> {
    let Some((c, _reg, repo)) = cluster(3, "dockercli")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let out = h1.docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
    ensure!(out.trim() == "inactive", "info before init: {out}");
    let v = h1.docker_ok(&["version", "--format", "{{.Server.APIVersion}}"])?;
    ensure!(v.trim() == "1.41", "negotiated API version: {v}");

    form_with_docker(&c)?;
    let formed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;

    // node ls: every host, the local one starred, the leader named.
    let out = wait_for(
        "three ready nodes in docker node ls",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = h1.docker_ok(&["node", "ls"])?;
            Ok((lines(&out).iter().filter(|l| l.contains(" Ready ")).count() == 3).then_some(out))
        },
    )?;
    let rows = lines(&out);
    ensure!(
        rows[0].starts_with("ID")
            && rows[0].contains("HOSTNAME")
            && rows[0].contains("MANAGER STATUS"),
        "{out}"
    );
    ensure!(
        rows.iter()
            .any(|l| l.contains(" * ") && l.contains(h1.name()) && l.contains("Leader")),
        "the local leader is not starred: {out}"
    );
    let h3 = c.host(3).name().to_string();
    h1.docker_ok(&["node", "update", "--availability", "drain", &h3])?;
    let n = inspect(h1, "node", &h3)?;
    ensure!(n["Spec"]["Availability"] == "drain", "{n}");
    h1.docker_ok(&[
        "node",
        "update",
        "--availability",
        "active",
        "--label-add",
        "zone=edge",
        &h3,
    ])?;
    let n = inspect(h1, "node", &h3)?;
    ensure!(
        n["Spec"]["Availability"] == "active" && n["Spec"]["Labels"]["zone"] == "edge",
        "{n}"
    );
    let self_id = h1.docker_ok(&["node", "inspect", "self", "--format", "{{.ID}}"])?;
    ensure!(self_id.trim().len() == 25, "node inspect self: {self_id}");

    // A worker refuses management calls with Docker's words.
    let w = c.host(2).docker(&["service", "ls"])?;
    ensure!(
        !w.success() && w.stderr.contains("This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state."),
        "a worker's service ls: {w:?}"
    );

    // Networks.
    let id = h1.docker_ok(&[
        "network", "create", "-d", "overlay", "--label", "team=a", "appnet",
    ])?;
    ensure!(id.trim().len() == 25, "network create printed {id}");
    let out = h1.docker_ok(&["network", "ls", "--filter", "label=team=a"])?;
    ensure!(
        out.contains("appnet") && out.contains("overlay") && out.contains("swarm"),
        "{out}"
    );
    let n = inspect(h1, "network", "appnet")?;
    ensure!(n["Id"] == id.trim() && n["Driver"] == "overlay", "{n}");
    let bad = h1.docker(&["network", "create", "brnet"])?;
    ensure!(
        !bad.success() && bad.stderr.contains("overlay"),
        "bridge network: {bad:?}"
    );

    // A service from an image, attached (progress bars until converged).
    let v1 = format!("{repo}:v1");
    let created = h1.docker(&[
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
        &v1,
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/srv",
    ])?;
    ensure!(created.success(), "service create: {created:?}");
    // The CLI resolved the tag's digest through mesh (no "could not be accessed" warning).
    ensure!(
        !created.stderr.contains("could not be accessed"),
        "{created:?}"
    );
    let out = created.stdout;
    ensure!(
        out.contains("verify: Service") && out.contains("converged"),
        "service create: {out}"
    );
    wait_tasks_running(h1, "web", 2, Duration::from_secs(60))?;
    let body = http_get(&c, &c.host(3).addr().to_string(), 8080)?;
    ensure!(
        body.contains("hello from v1"),
        "through the routing mesh: {body}"
    );
    let out = h1.docker_ok(&["service", "ls"])?;
    ensure!(
        out.contains("web")
            && out.contains("replicated")
            && out.contains("2/2")
            && out.contains("*:8080->80/tcp"),
        "service ls: {out}"
    );
    let out = h1.docker_ok(&["service", "ps", "web"])?;
    let running = lines(&out).iter().filter(|l| l.contains("Running")).count();
    ensure!(
        running == 2 && out.contains("web.1") && out.contains("web.2"),
        "service ps: {out}"
    );
    let s = inspect(h1, "service", "web")?;
    ensure!(
        s["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"][0] == "busybox"
            && s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
                .as_str()
                .is_some_and(|i| i.contains("web:v1@sha256:"))
            && s["Endpoint"]["VirtualIPs"][0]["Addr"]
                .as_str()
                .is_some_and(|a| a.contains('/')),
        "service inspect: {s}"
    );
    let pretty = h1.docker_ok(&["service", "inspect", "--pretty", "web"])?;
    ensure!(
        pretty.contains("Replicated") && pretty.contains("appnet"),
        "{pretty}"
    );
    let fmt = h1.docker_ok(&[
        "service",
        "inspect",
        "--format",
        "{{.Spec.Mode.Replicated.Replicas}}",
        "web",
    ])?;
    ensure!(fmt.trim() == "2", "{fmt}");

    let out = h1.docker_ok(&["node", "inspect", "--pretty", "self"])?;
    ensure!(
        out.lines()
            .any(|l| l.starts_with("Hostname:") && l.ends_with(h1.name()))
            && out.contains("Manager Status:"),
        "node inspect --pretty: {out}"
    );
    // One node per call: the CLI's filter for several accumulates their IDs (dockerd lists
    // tasks again for each, too).
    let mut placed = 0;
    for (i, node) in [h1.name(), c.host(2).name(), &h3].into_iter().enumerate() {
        let out = if i == 0 {
            h1.docker_ok(&["node", "ps"])?
        } else {
            h1.docker_ok(&["node", "ps", node])?
        };
        ensure!(
            lines(&out)[0].starts_with("ID") && lines(&out)[0].contains("DESIRED STATE"),
            "{out}"
        );
        placed += lines(&out)
            .iter()
            .filter(|l| l.contains(" web.") && l.contains("Running") && l.contains(node))
            .count();
    }
    ensure!(placed == 2, "node ps found {placed} running web tasks");

    // Each node shows its own tasks as containers, with Swarm's labels.
    let mut containers = 0;
    for h in c.hosts() {
        let out = h.docker_ok(&[
            "ps",
            "--filter",
            "label=com.docker.swarm.service.name=web",
            "--format",
            "{{.Names}} {{.Label \"com.docker.swarm.task.id\"}} {{.State}}",
        ])?;
        for l in lines(&out) {
            let f: Vec<&str> = l.split_whitespace().collect();
            ensure!(
                f.len() == 3
                    && f[0].starts_with("web.")
                    && f[0].ends_with(f[1])
                    && f[2] == "running",
                "{}: docker ps: {out}",
                h.name()
            );
            let c = inspect(h, "container", f[0])?;
            ensure!(
                c["State"]["Running"] == true && c["State"]["Pid"].as_u64() > Some(0),
                "{c}"
            );
            containers += 1;
        }
    }
    ensure!(containers == 2, "{containers} containers across the nodes");

    // Scale, update, rollback: the CLI's read-modify-write round trips.
    let out = h1.docker_ok(&["service", "scale", "web=3"])?;
    ensure!(out.contains("web scaled to 3"), "{out}");
    wait_tasks_running(h1, "web", 3, Duration::from_secs(60))?;
    let v2 = format!("{repo}:v2");
    h1.docker_ok(&[
        "service",
        "update",
        "--image",
        &v2,
        "--env-add",
        "A=b",
        "web",
    ])?;
    let s = inspect(h1, "service", "web")?;
    ensure!(
        s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
            .as_str()
            .is_some_and(|i| i.contains("web:v2"))
            && s["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"][0] == "A=b"
            && s["Spec"]["Mode"]["Replicated"]["Replicas"] == 3,
        "after update: {s}"
    );
    // The CLI returns once the tasks ran for the monitor period; the orchestrator marks the
    // update completed on its own clock, about then.
    wait_for(
        "the update completed",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(
                (inspect(h1, "service", "web")?["UpdateStatus"]["State"] == "completed")
                    .then_some(()),
            )
        },
    )?;
    let body = http_get(&c, &c.host(2).addr().to_string(), 8080)?;
    ensure!(body.contains("hello from v2"), "after the update: {body}");
    h1.docker_ok(&["service", "rollback", "web"])?;
    let s = inspect(h1, "service", "web")?;
    ensure!(
        s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
            .as_str()
            .is_some_and(|i| i.contains("web:v1")),
        "after rollback: {s}"
    );
    let body = http_get(&c, &c.host(2).addr().to_string(), 8080)?;
    ensure!(body.contains("hello from v1"), "after the rollback: {body}");

    // Unsupported settings are refused, naming them; nothing changes.
    let bad = h1.docker(&[
        "service",
        "update",
        "--placement-pref-add",
        "spread=node.labels.zone",
        "-d",
        "web",
    ])?;
    ensure!(
        !bad.success()
            && bad.stderr.contains("Preferences")
            && bad.stderr.contains("not supported"),
        "placement preference: {bad:?}"
    );
    let dup = h1.docker(&["service", "create", "-d", "--name", "web", &v1])?;
    ensure!(
        !dup.success() && dup.stderr.contains("already exists"),
        "duplicate: {dup:?}"
    );
    // 28.x prints the daemon's message; 20.10 words any 404 itself ("No such service").
    let missing = h1.docker(&["service", "rm", "nope"])?;
    ensure!(
        !missing.success()
            && (missing.stderr.contains("service nope not found")
                || missing.stderr.contains("No such service: nope")),
        "rm of an unknown service: {missing:?}"
    );

    // docker events streams the cluster's changes from now on.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 6;
    let events = std::thread::scope(|s| -> Result<(String, String)> {
        let watcher = s.spawn(|| {
            h1.docker_ok(&[
                "events",
                "--filter",
                "type=service",
                "--until",
                &until.to_string(),
                "--format",
                "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
            ])
        });
        std::thread::sleep(Duration::from_secs(2));
        let out = h1.docker_ok(&["service", "rm", "web"])?;
        let seen = watcher.join().expect("events thread")?;
        Ok((out, seen))
    })?;
    ensure!(
        events.1.contains("service remove web"),
        "docker events: {}",
        events.1
    );
    let out = events.0;
    ensure!(out.trim() == "web", "service rm: {out}");
    // And the kept ones, since a time: web's life from its creation on, in order.
    let past = h1.docker_ok(&[
        "events",
        "--filter",
        "type=service",
        "--filter",
        "service=web",
        "--since",
        &formed.as_secs().to_string(),
        "--until",
        &(until + 1).to_string(),
        "--format",
        "{{.Action}} {{.Actor.Attributes.name}}",
    ])?;
    let past: Vec<&str> = lines(&past);
    ensure!(
        past.first() == Some(&"create web") && past.last() == Some(&"remove web"),
        "docker events --since: {past:?}"
    );
    wait_for(
        "web gone",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            Ok(h1
                .docker_ok(&["service", "ls", "-q"])?
                .trim()
                .is_empty()
                .then_some(()))
        },
    )?;
    wait_for(
        "appnet removable",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            Ok(h1
                .docker(&["network", "rm", "appnet"])?
                .success()
                .then_some(()))
        },
    )?;
    // Promote, demote, and a node leaving.
    let h2 = c.host(2).name().to_string();
    let out = h1.docker_ok(&["node", "promote", &h2])?;
    ensure!(
        out.contains(&format!("Node {h2} promoted to a manager in the swarm.")),
        "{out}"
    );
    let out = h1.docker_ok(&["node", "demote", &h2])?;
    ensure!(
        out.contains(&format!("Manager {h2} demoted in the swarm.")),
        "{out}"
    );
    let out = c.host(3).docker_ok(&["swarm", "leave"])?;
    ensure!(out.contains("Node left the swarm."), "{out}");
    let out = wait_for(
        "the node that left removable",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let r = h1.docker(&["node", "rm", &h3])?;
            Ok(r.success().then_some(r.stdout))
        },
    )?;
    ensure!(out.trim() == h3, "node rm printed {out}");
    let out = h1.docker_ok(&["node", "ls", "--format", "{{.Hostname}}"])?;
    ensure!(!out.contains(&h3), "node ls after rm: {out}");
    Ok(())
}

/// Sends raw bytes to the Engine API socket and returns the status code of the answer (0 if
/// the connection was closed without one) and the answer.
fn raw(h: &Host, request: &[u8]) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(h.docker_socket())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    // A server may refuse before reading everything: a failed write is an answer too.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn malformed_requests_change_nothing() -> Result<()> {
    let Some((c, _reg, repo)) = cluster(1, "dockerbad")? else {
        return Ok(());
    };
    let h = c.host(1);
    form_with_docker(&c)?;
    h.docker_ok(&["network", "create", "-d", "overlay", "appnet"])?;
    h.docker_ok(&[
        "service",
        "create",
        "-d",
        "--name",
        "web",
        "--network",
        "appnet",
        &format!("{repo}:v1"),
    ])?;
    let before = h.docker_ok(&["service", "inspect", "web"])?;
    let nets = h.docker_ok(&["network", "ls", "-q"])?;
    let version = inspect(h, "service", "web")?["Version"]["Index"]
        .as_u64()
        .unwrap_or(0);
    let update = format!("/v1.41/services/web/update?version={version}");

    let mut bad: Vec<(Vec<u8>, &[u16])> = vec![
        (post("/v1.41/services/create", b"{"), &[400]),
        (post("/v1.41/services/create", b"[]"), &[400]),
        (post("/v1.41/services/create", b"\"web\""), &[400]),
        (post("/v1.41/services/create", br#"{"Name":"x","Mode":{"Replicated":{"Replicas":"two"}}}"#), &[400]),
        (post("/v1.41/services/create", br#"{"Name":"x","Mode":{"Replicated":{"Replicas":-1}}}"#), &[400]),
        (post("/v1.41/services/create", br#"{"Name":"x","TaskTemplate":{"ContainerSpec":{"Image":"a b"}}}"#), &[400]),
        (post("/v1.41/services/create", br#"{"Name":"web","TaskTemplate":{"ContainerSpec":{"Image":"busybox"}}}"#), &[409]),
        (post("/v1.41/services/create", br#"{"Name":"y","TaskTemplate":{"ContainerSpec":{"Image":"busybox"},"Networks":[{"Target":"nope"}]}}"#), &[404]),
        (post("/v1.41/services/create", br#"{"Name":"y","TaskTemplate":{"ContainerSpec":{"Image":"busybox","Healthcheck":{"Test":["CMD","true"],"Interval":500}}}}"#), &[400]),
        (post("/v1.41/services/create", br#"{"Name":"y","TaskTemplate":{"ContainerSpec":{"Image":"busybox"}},"EndpointSpec":{"Ports":[{"TargetPort":70000}]}}"#), &[400]),
        (post(&update, b"{}"), &[400]),
        (post("/v1.41/services/web/update?version=1x", b"{}"), &[400]),
        (post("/v1.41/services/web/update", b"{}"), &[400]),
        (post(&format!("/v1.41/services/web/update?version={}", version + 7), before.as_bytes()), &[400]),
        (post("/v1.41/networks/create", b"{}"), &[400]),
        (post("/v1.41/networks/create", br#"{"Name":"n2","Driver":"overlay","Options":{"mtu":"1400"}}"#), &[400]),
        (post("/v1.41/networks/create", br#"{"Name":"n2","Driver":"overlay","Labels":[1]}"#), &[400]),
        (post("/v1.41/networks/create", br#"{"Name":"appnet","Driver":"overlay"}"#), &[409, 400]),
        (post("/v1.41/nodes/nope/update?version=1", b"{}"), &[404]),
        (post("/v1.41/swarm/join", b"{}"), &[400, 503]),
        (post("/v1.41/swarm/init", b"{}"), &[503]),
        (post("/v1.41/swarm/update?version=1", br#"{"Raft":{"SnapshotInterval":5}}"#), &[400]),
        (post("/v1.41/swarm/unlock", br#"{"UnlockKey":"SWMKEY-1-x"}"#), &[400]),
        (b"GET /v1.41/services?filters=%7Bnot HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        (b"GET /v1.41/services?filters=%7B%22colour%22%3A%7B%22x%22%3Atrue%7D%7D HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        (b"GET /v1.41/nowhere HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[404]),
        (b"DELETE /v1.41/services/nope HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[404]),
        (b"GET /v1.41/services/nope/logs HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[404]),
        (b"GET /v1.12/info HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        (b"NONSENSE\r\n\r\n".to_vec(), &[0, 400]),
        (format!("POST /v1.41/services/create HTTP/1.1\r\nHost: d\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 64 << 20).into_bytes(), &[413]),
    ];
    // A huge body, really sent.
    let mut huge = br#"{"Name":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend_from_slice(br#""}"#);
    bad.push((post("/v1.41/services/create", &huge), &[413, 0]));
    // Random garbage bodies fill the hundred.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    while bad.len() < 100 {
        let n = (seed % 300) as usize + 1;
        let body: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed & 0xff) as u8
            })
            .collect();
        let path = if bad.len().is_multiple_of(2) {
            "/v1.41/services/create"
        } else {
            "/v1.41/networks/create"
        };
        bad.push((post(path, &body), &[400]));
    }
    for (i, (req, want)) in bad.iter().enumerate() {
        let (code, text) = raw(h, req)?;
        ensure!(
            want.contains(&code),
            "request {i} ({:?}...) answered {code}, expected {want:?}: {text}",
            String::from_utf8_lossy(&req[..req.len().min(120)])
        );
        // Bytes that are not HTTP get hyper's bare 400; everything else Docker's error JSON.
        if code >= 400 && !req.starts_with(b"NONSENSE") {
            ensure!(
                text.contains("Content-Type: application/json")
                    || text
                        .to_ascii_lowercase()
                        .contains("content-type: application/json"),
                "request {i}: error without a JSON content type: {text}"
            );
            ensure!(
                text.contains("\"message\""),
                "request {i}: error without a message: {text}"
            );
        }
    }
    // The daemon still answers, and nothing changed.
    ensure!(
        h.docker_ok(&["service", "inspect", "web"])? == before,
        "the service changed"
    );
    ensure!(
        h.docker_ok(&["network", "ls", "-q"])? == nets,
        "the networks changed"
    );
    let out = h.docker_ok(&["service", "ls", "--format", "{{.Name}}"])?;
    ensure!(
        out.trim() == "web",
        "services after the bad requests: {out}"
    );
    Ok(())
}

/// A compose file as written for Docker: a published web service with two replicas and a
/// rolling-update policy, a client, one overlay network.
const COMPOSE: &str = r#"version: "3.8"
services:
  web:
    image: IMAGE
    command: ["busybox", "httpd", "-f", "-p", "80", "-h", "/srv"]
    ports:
      - "8081:80"
    networks: [front]
    environment:
      - GREETING=hi
    deploy:
      replicas: 2
      update_config:
        parallelism: 1
        order: start-first
      restart_policy:
        condition: on-failure
      labels:
        tier: web
  probe:
    image: IMAGE
    command: ["sh", "-c", "echo probe-started; i=0; while true; do i=$$((i+1)); echo tick $$i; sleep 0.3; done"]
    networks:
      front:
        aliases: [client]
    secrets:
      - token
    configs:
      - source: probe_conf
        target: /etc/probe.conf
networks:
  front:
    driver: overlay
secrets:
  token:
    file: ./token.txt
configs:
  probe_conf:
    file: ./probe.conf
"#;

#[test]
fn docker_stack_deploy_runs_a_compose_file() -> Result<()> {
    let Some((c, _reg, repo)) = cluster(2, "dockerstack")? else {
        return Ok(());
    };
    form_with_docker(&c)?;
    let h1 = c.host(1);
    let file = c.base_dir().join("stack.yml");
    std::fs::write(&file, COMPOSE.replace("IMAGE", &format!("{repo}:v1")))?;
    std::fs::write(c.base_dir().join("token.txt"), "t0ken-of-the-stack")?;
    std::fs::write(c.base_dir().join("probe.conf"), "interval 1\n")?;
    let file = file.to_string_lossy().to_string();
    let out = h1.docker_ok(&["stack", "deploy", "-c", &file, "demo"])?;
    for want in [
        "Creating network demo_front",
        "Creating secret demo_token",
        "Creating config demo_probe_conf",
        "Creating service demo_web",
        "Creating service demo_probe",
    ] {
        ensure!(
            out.contains(want),
            "stack deploy printed no {want:?}: {out}"
        );
    }
    wait_tasks_running(h1, "demo_web", 2, Duration::from_secs(60))?;
    wait_tasks_running(h1, "demo_probe", 1, Duration::from_secs(60))?;
    let out = h1.docker_ok(&["stack", "ls"])?;
    ensure!(
        lines(&out)
            .iter()
            .any(|l| l.starts_with("demo") && l.split_whitespace().nth(1) == Some("2")),
        "stack ls: {out}"
    );
    let out = h1.docker_ok(&["stack", "services", "demo"])?;
    ensure!(
        out.contains("demo_web") && out.contains("2/2") && out.contains("demo_probe"),
        "stack services: {out}"
    );
    let out = h1.docker_ok(&["stack", "ps", "demo"])?;
    ensure!(
        lines(&out).iter().filter(|l| l.contains("Running")).count() == 3,
        "stack ps: {out}"
    );
    let s = inspect(h1, "service", "demo_web")?;
    ensure!(
        s["Spec"]["Labels"]["com.docker.stack.namespace"] == "demo"
            && s["Spec"]["Labels"]["tier"] == "web"
            && s["Spec"]["UpdateConfig"]["Order"] == "start-first"
            && s["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "on-failure"
            && s["Spec"]["TaskTemplate"]["Networks"][0]["Aliases"][0] == "web",
        "demo_web: {s}"
    );
    // The routing mesh publishes the stack's port; the short name (an alias) answers inside.
    let body = http_get(&c, &c.host(2).addr().to_string(), 8081)?;
    ensure!(body.contains("hello from v1"), "{body}");
    let probe = mesh_netns::swarm::running_tasks(h1, "demo_probe")?;
    let probe_task = mesh_netns::swarm::field(&probe[0], "ID").to_string();
    let probe_node = mesh_netns::swarm::field(&probe[0], "Node").to_string();
    let ph = c
        .hosts()
        .iter()
        .find(|h| h.name() == probe_node)
        .context("the probe's host")?;
    let got = wait_for(
        "web answers by its short name inside the stack",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let out = ph.mesh(&[
                "exec",
                &probe_task,
                "--",
                "sh",
                "-c",
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web 80",
            ])?;
            Ok(out.stdout.contains("hello from v1").then_some(out.stdout))
        },
    )?;
    ensure!(got.contains("200 OK"), "{got}");
    // The stack's secret and config, in the task.
    let secret = ph.mesh_ok(&["exec", &probe_task, "--", "cat", "/run/secrets/token"])?;
    ensure!(secret == "t0ken-of-the-stack", "{secret:?}");
    let conf = ph.mesh_ok(&["exec", &probe_task, "--", "cat", "/etc/probe.conf"])?;
    ensure!(conf == "interval 1\n", "{conf:?}");
    let ls = h1.docker_ok(&["secret", "ls", "--format", "{{.Name}}"])?;
    ensure!(ls.trim() == "demo_token", "secret ls: {ls}");
    let si = inspect(h1, "secret", "demo_token")?;
    ensure!(
        si["Spec"]["Labels"]["com.docker.stack.namespace"] == "demo"
            && si["Spec"].get("Data").is_none(),
        "{si}"
    );

    // Logs through the multiplexed stream, named by the CLI from the details labels.
    let logs = wait_for(
        "the probe's log line",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let out = h1.docker_ok(&["service", "logs", "demo_probe"])?;
            Ok(out.contains("probe-started").then_some(out))
        },
    )?;
    ensure!(
        logs.lines().any(|l| l.starts_with("demo_probe.1.")
            && l.contains(&format!("@{probe_node}"))
            && l.ends_with("| probe-started")),
        "service logs: {logs}"
    );

    // --timestamps and --since: the CLI's own rendering of the stamps the node put.
    let out = h1.docker_ok(&["service", "logs", "-t", "--since", "10m", "demo_probe"])?;
    ensure!(
        out.lines()
            .any(|l| l.split_once(' ').is_some_and(|(ts, rest)| {
                ts.len() == 30
                    && ts.ends_with('Z')
                    && rest.starts_with("demo_probe.1.")
                    && rest.ends_with("| probe-started")
            })),
        "service logs -t: {out}"
    );
    let out = h1.docker_ok(&[
        "service",
        "logs",
        "--since",
        "2099-01-01T00:00:00Z",
        "demo_probe",
    ])?;
    ensure!(
        out.trim().is_empty(),
        "service logs --since the future: {out}"
    );

    // --follow keeps streaming what the task prints next.
    let ticks = |out: &str| -> Vec<u64> {
        out.lines()
            .filter_map(|l| l.rsplit("| tick ").next()?.trim().parse().ok())
            .collect()
    };
    let seen = ticks(&h1.docker_ok(&["service", "logs", "demo_probe"])?);
    let last = seen.iter().copied().max().context("no tick logged yet")?;
    let followed = std::process::Command::new("timeout")
        .args(["4", "docker", "-H"])
        .arg(format!("unix://{}", h1.docker_socket().display()))
        .args(["service", "logs", "--follow", "--tail", "1", "demo_probe"])
        .env_remove("DOCKER_HOST")
        .output()?;
    let got = ticks(&String::from_utf8_lossy(&followed.stdout));
    ensure!(
        got.iter().filter(|t| **t > last + 2).count() >= 3,
        "following the logs after tick {last} got ticks {got:?}: {}",
        String::from_utf8_lossy(&followed.stderr)
    );

    // A redeploy of the same file changes nothing: no task is replaced.
    let before = h1.docker_ok(&["stack", "ps", "-q", "demo"])?;
    let out = h1.docker_ok(&["stack", "deploy", "-c", &file, "demo"])?;
    ensure!(out.contains("Updating service demo_web"), "redeploy: {out}");
    std::thread::sleep(Duration::from_secs(2));
    let after = h1.docker_ok(&["stack", "ps", "-q", "demo"])?;
    ensure!(
        before == after,
        "a redeploy replaced tasks:\n{before}\n{after}"
    );

    let out = h1.docker_ok(&["stack", "rm", "demo"])?;
    for want in [
        "Removing service demo_web",
        "Removing service demo_probe",
        "Removing secret demo_token",
        "Removing config demo_probe_conf",
        "Removing network demo_front",
    ] {
        ensure!(out.contains(want), "stack rm printed no {want:?}: {out}");
    }
    let out = h1.docker_ok(&["stack", "ls"])?;
    ensure!(lines(&out).len() == 1, "stack ls after rm: {out}");
    let out = h1.docker_ok(&["network", "ls", "--format", "{{.Name}}"])?;
    ensure!(
        !out.contains("demo_front"),
        "networks after stack rm: {out}"
    );
    Ok(())
}
