//! Private registries (a real `docker-registry` asking for HTTP basic auth): `mesh login`
//! checks the credentials with the registry and keeps them for the node's pulls, wrong ones
//! are refused in Docker's words, a node without a login is refused the image, and `service
//! create --with-registry-auth` sends the manager's login to the workers that pull it, kept
//! sealed in the store and never shown. On a terminal, `mesh login` asks for what its flags
//! leave out, the password without echo. A registry serving HTTPS with a certificate of its
//! own CA is reached once the nodes trust that CA through Docker's `certs.d` layout
//! (`meshd --registry-certs-dir`), and refused (not downgraded) by a node that does not. A
//! registry taking only tokens from a token service (distribution's `auth: token`, as Docker
//! Hub) is logged in to and pulled from the same way: the daemons follow its Bearer challenge.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::registry::{registry_cluster, Registry};
use mesh_netns::swarm::{field, service_ps, wait_tasks_running};
use mesh_netns::{wait_for, Host};

#[test]
fn a_private_registry_over_https_with_its_own_ca() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = mesh_netns::Cluster::new(mesh_netns::ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "regtls",
    })?;
    let mut reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    reg.push_test_image("private", "v1", "v1", false)?;
    let password = "s3cret-over-tls";
    reg.require_login("alice", password)?;
    let certs_d = reg.serve_tls()?;
    let certs_d = certs_d.to_string_lossy().to_string();
    // h1 and h2 trust the registry's CA; h3 knows only the system roots.
    for h in &c.hosts()[..2] {
        h.start_daemon_with(&["--registry-certs-dir", &certs_d])?;
    }
    c.host(3).start_daemon()?;
    mesh_netns::swarm::form_swarm(&c, 1)?;
    let (h1, server) = (c.host(1), reg.host_port());
    let image = format!("{server}/private:v1");

    // `login` checks over HTTPS, trusting the CA for this registry.
    let ok = h1.mesh(&["login", "-u", "alice", "-p", password, &server])?;
    ensure!(
        ok.success() && ok.stdout.trim() == "Login Succeeded",
        "{ok:?}"
    );

    // h2 pulls over HTTPS with the login the service carries.
    let on = |i: usize| format!("node.hostname=={}", c.host(i).name());
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "app",
        "--with-registry-auth",
        "--constraint",
        &on(2),
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    wait_tasks_running(h1, "app", 1, Duration::from_secs(60))?;

    // h3 does not trust the CA: refused, with the certificate's reason, never over HTTP.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "untrusted",
        "--with-registry-auth",
        "--constraint",
        &on(3),
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    let err = wait_for(
        "h3 refusing the registry's certificate",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            Ok(service_ps(h1, "untrusted")?
                .iter()
                .map(|t| field(t, "Error").to_string())
                .find(|e| !e.is_empty()))
        },
    )?;
    ensure!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "h3's error: {err}"
    );
    Ok(())
}

#[test]
fn a_token_registry_through_the_daemons() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let c = mesh_netns::Cluster::new(mesh_netns::ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "regtoken",
    })?;
    let mut reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    reg.push_test_image("private", "v1", "v1", false)?;
    let certs_d = reg.serve_tls()?;
    let password = "s3cret-for-the-token-service";
    reg.require_token_auth("alice", password)?;
    let certs_d = certs_d.to_string_lossy().to_string();
    for h in c.hosts() {
        h.start_daemon_with(&["--registry-certs-dir", &certs_d])?;
    }
    mesh_netns::swarm::form_swarm(&c, 1)?;
    let (h1, server) = (c.host(1), reg.host_port());
    let image = format!("{server}/private:v1");
    let create = |name: &str, more: &[&str]| {
        let mut args = vec!["service", "create", "--name", name];
        args.extend_from_slice(more);
        args.extend(["--constraint", "node.role==worker", "-d", image.as_str()]);
        args.extend(["sleep", "100000"]);
        h1.mesh_ok(&args)
    };

    // No login: the anonymous token grants nothing, and the registry says so.
    create("anon", &[])?;
    let err = wait_for(
        "the anonymous pull refused",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            Ok(service_ps(h1, "anon")?
                .iter()
                .map(|t| field(t, "Error").to_string())
                .find(|e| !e.is_empty()))
        },
    )?;
    eprintln!("anonymous pull: {err}");
    ensure!(err.contains("unauthorized"), "anonymous pull: {err}");
    h1.mesh_ok(&["service", "rm", "anon"])?;

    // `login` follows the Bearer challenge to the token service, which judges the password.
    let wrong = h1.mesh(&["login", "-u", "alice", "-p", "nope", &server])?;
    ensure!(
        !wrong.success()
            && wrong
                .stderr
                .contains("unauthorized: incorrect username or password"),
        "{wrong:?}"
    );
    let ok = h1.mesh(&["login", "-u", "alice", "-p", password, &server])?;
    ensure!(
        ok.success() && ok.stdout.trim() == "Login Succeeded",
        "{ok:?}"
    );

    // The workers get tokens with the manager's login the service carries.
    create("app", &["--with-registry-auth", "--replicas", "2"])?;
    wait_tasks_running(h1, "app", 2, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn a_login_reaches_the_nodes_that_pull() -> Result<()> {
    let Some((c, mut reg)) = registry_cluster(3, 1, "regauth")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("private", "v1", "v1", false)?;
    let password = "s3cret-for-the-registry";
    reg.require_login("alice", password)?;
    let server = reg.host_port();
    let image = format!("{server}/private:v1");

    // No login: the workers are refused the image, with the registry's reason.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "anon",
        "--constraint",
        "node.role==worker",
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    wait_for(
        "the anonymous pull refused",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            Ok(service_ps(h1, "anon")?
                .iter()
                .any(|t| field(t, "Error").contains("unauthorized"))
                .then_some(()))
        },
    )?;
    h1.mesh_ok(&["service", "rm", "anon"])?;

    // A wrong password is refused by the registry; a right one is kept, privately.
    let wrong = h1.mesh(&["login", "-u", "alice", "-p", "nope", &server])?;
    ensure!(
        !wrong.success()
            && wrong
                .stderr
                .contains("unauthorized: incorrect username or password"),
        "{wrong:?}"
    );
    let ok = h1.mesh(&["login", "-u", "alice", "-p", password, &server])?;
    ensure!(
        ok.success() && ok.stdout.trim() == "Login Succeeded",
        "{ok:?}"
    );
    ensure!(ok.stderr.contains("Use --password-stdin"), "{ok:?}");
    let saved = h1.data_dir().join("registry-auth.json");
    ensure!(std::fs::metadata(&saved)?.permissions().mode() & 0o777 == 0o600);

    // The workers have no login: the manager's goes with the service.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "app",
        "--with-registry-auth",
        "--replicas",
        "2",
        "--constraint",
        "node.role==worker",
        "-d",
        &image,
        "sleep",
        "100000",
    ])?;
    wait_tasks_running(h1, "app", 2, Duration::from_secs(60))?;
    let nodes: std::collections::BTreeSet<String> = service_ps(h1, "app")?
        .iter()
        .filter(|t| field(t, "DesiredState") == "Running")
        .map(|t| field(t, "Node").to_string())
        .collect();
    ensure!(nodes.len() == 2, "tasks on {nodes:?}");
    let inspect = h1.mesh_ok(&["service", "inspect", "app"])?;
    ensure!(!inspect.contains(password), "{inspect}");
    // Sealed in the store; on no worker's disk.
    let raft = std::fs::read(h1.data_dir().join("raft.redb"))?;
    ensure!(
        !raft
            .windows(password.len())
            .any(|w| w == password.as_bytes()),
        "the password is in the Raft store in the clear"
    );
    for h in &c.hosts()[1..] {
        ensure!(!h.data_dir().join("registry-auth.json").exists());
    }

    let out = h1.mesh_ok(&["logout", &server])?;
    ensure!(
        out.trim() == format!("Removing login credentials for {server}"),
        "{out}"
    );
    let out = h1.mesh_ok(&["logout", &server])?;
    ensure!(out.trim() == format!("Not logged in to {server}"), "{out}");

    // Without a password and no terminal to ask on: Docker's refusal, nothing sent.
    let out = h1.mesh(&["login", "-u", "alice", &server])?;
    ensure!(
        !out.success()
            && out
                .stderr
                .contains("Cannot perform an interactive login from a non TTY device"),
        "{out:?}"
    );
    // On a terminal, what the flags leave out is asked for, the password without echo.
    let transcript = interactive_login(h1, &server, "alice", password)?;
    ensure!(
        transcript.contains("Username: ")
            && transcript.contains("Password: ")
            && transcript.contains("Login Succeeded"),
        "{transcript}"
    );
    ensure!(
        !transcript.contains(password),
        "the password was echoed: {transcript}"
    );
    ensure!(h1.data_dir().join("registry-auth.json").exists());
    h1.mesh_ok(&["logout", &server])?;
    Ok(())
}

/// Runs `mesh login SERVER` on a pseudo-terminal (python's `pty`), answers its username
/// prompt and, once the terminal's echo is off, its password prompt; returns what the
/// terminal showed.
fn interactive_login(h: &Host, server: &str, user: &str, password: &str) -> Result<String> {
    const DRIVER: &str = r#"
import os, select, subprocess, sys, termios, time
mesh, sock, server, user, password = sys.argv[1:6]
master, slave = os.openpty()
p = subprocess.Popen([mesh, "-H", "unix://" + sock, "login", server],
                     stdin=slave, stdout=slave, stderr=slave, close_fds=True)
os.close(slave)
seen = b""
def until(pred, what):
    global seen
    deadline = time.monotonic() + 20
    while not pred():
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + what + ": " + repr(seen))
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try:
                seen += os.read(master, 4096)
            except OSError:
                sys.exit("terminal closed waiting for " + what + ": " + repr(seen))
until(lambda: b"Username: " in seen, "the username prompt")
os.write(master, (user + "\n").encode())
until(lambda: b"Password: " in seen, "the password prompt")
until(lambda: not termios.tcgetattr(master)[3] & termios.ECHO, "echo off")
os.write(master, (password + "\n").encode())
# Everything the login writes, up to the terminal's close (EIO once the CLI has exited).
while True:
    try:
        b = os.read(master, 4096)
    except OSError:
        break
    if not b:
        break
    seen += b
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(p.wait(timeout=20))
"#;
    let mesh = mesh_netns::binaries()?.mesh.display().to_string();
    let sock = h.socket().display().to_string();
    let out = h.exec_timeout(
        &[
            "python3", "-c", DRIVER, &mesh, &sock, server, user, password,
        ],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "interactive login failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
