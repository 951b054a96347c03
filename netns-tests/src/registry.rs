//! A real OCI registry for image tests: Debian's `docker-registry` (the CNCF distribution
//! registry) serving plain HTTP on `<host address>:5000` inside one simulated host's
//! namespace, with its storage under the cluster's directory, and a pusher of small test
//! images built from the host's static busybox (`testimage.py`: two layers, a whiteout and an
//! opaque directory, Docker schema 2 or OCI manifests). It can ask for a login (HTTP basic),
//! serve HTTPS with a CA of its own, and take tokens from a token service as Docker Hub's
//! does (`tokenserver.py`, on `<host address>:5001` in the same namespace).
//!
//! The registry and its token service are stopped (SIGKILL) when the [`Registry`] is dropped;
//! their files go with the cluster's directory.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::kill_and_reap;
use crate::Host;

/// The test image builder and pusher.
const TESTIMAGE_PY: &str = include_str!("testimage.py");

/// The token service (distribution's `auth: token`), for [`Registry::require_token_auth`]
/// and mesh-image's registry tests: `python3 tokenserver.py DIR USER PASSWORD ADDR PORT
/// ISSUER` (see the script's header).
pub const TOKEN_SERVER_PY: &str = include_str!("tokenserver.py");

/// The registry's port.
pub const REGISTRY_PORT: u16 = 5000;

/// The token service's port (HTTPS, on the registry's address).
pub const TOKEN_PORT: u16 = 5001;

/// The `service` and `issuer` the registry names in its challenge and expects in tokens.
const TOKEN_SERVICE: &str = "mesh-test-registry";
const TOKEN_ISSUER: &str = "mesh-test-issuer";

/// A running registry.
pub struct Registry {
    ns: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    child: Option<Child>,
    /// Serving HTTPS (see [`Registry::serve_tls`]).
    tls: bool,
    /// The token service (see [`Registry::require_token_auth`]).
    token_server: Option<Child>,
}

impl Registry {
    /// Starts a registry in `host`'s namespace, storing under `dir`, and waits (10 s at most)
    /// until `/v2/` answers.
    pub fn start(host: &Host, dir: PathBuf) -> Result<Registry> {
        if Command::new("docker-registry")
            .arg("--version")
            .output()
            .is_err()
        {
            bail!("docker-registry is not installed (apt-get install docker-registry)");
        }
        fs::create_dir_all(dir.join("data"))?;
        let mut reg = Registry {
            ns: host.ns().to_string(),
            addr: host.addr(),
            dir,
            child: None,
            tls: false,
            token_server: None,
        };
        fs::write(
            reg.dir.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}:{REGISTRY_PORT}\n",
                reg.dir.join("data").display(),
                reg.addr
            ),
        )?;
        fs::write(reg.dir.join("testimage.py"), TESTIMAGE_PY)?;
        reg.spawn()?;
        Ok(reg)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("registry.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "docker-registry", "serve"])
            .arg(self.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // 200, or 401 once it asks for a login.
            let scheme = if self.tls { "https" } else { "http" };
            let out = crate::host::ns_exec(
                &self.ns,
                &[
                    "curl",
                    "-s",
                    "-k",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("{scheme}://{}/v2/", self.host_port()),
                ],
                Duration::from_secs(2),
            )?;
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && (code == "200" || code == "401") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "registry not answering on {} after 10 s: {}",
                    self.host_port(),
                    fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts the registry asking for HTTP basic authentication with one user (an
    /// htpasswd file of a bcrypt hash, the only kind `docker-registry` takes). Push the test
    /// images first: the pusher does not log in.
    pub fn require_login(&mut self, user: &str, password: &str) -> Result<()> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                password,
            ])
            .output()
            .context("python3 for a bcrypt hash")?;
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || !hash.starts_with("$2") {
            bail!(
                "no bcrypt hash from python3's crypt: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::write(self.dir.join("htpasswd"), format!("{user}:{hash}\n"))?;
        let config = fs::read_to_string(self.dir.join("config.yml"))?;
        fs::write(
            self.dir.join("config.yml"),
            format!(
                "{config}auth:\n  htpasswd:\n    realm: mesh-test\n    path: {}\n",
                self.dir.join("htpasswd").display()
            ),
        )?;
        self.restart()
    }

    /// Restarts the registry serving HTTPS only, with a certificate (for its address) of a
    /// CA made here ([`crate::tls`]); returns a directory in Docker's `certs.d` layout trusting
    /// that CA for this registry (`DIR/ADDR:PORT/ca.crt`), for `meshd --registry-certs-dir`.
    /// Push the test images first: the pusher speaks plain HTTP.
    pub fn serve_tls(&mut self) -> Result<PathBuf> {
        let certs = self.dir.join("tls");
        fs::create_dir_all(&certs)?;
        crate::tls::write_ca_and_server_cert(&certs, "mesh test registry CA", self.addr.into())?;
        let config = fs::read_to_string(self.dir.join("config.yml"))?;
        let addr_line = format!("  addr: {}:{REGISTRY_PORT}\n", self.addr);
        let tls = format!(
            "{addr_line}  tls:\n    certificate: {c}/server.crt\n    key: {c}/server.key\n",
            c = certs.display()
        );
        fs::write(
            self.dir.join("config.yml"),
            config.replacen(&addr_line, &tls, 1),
        )?;
        self.tls = true;
        let trusted = self.dir.join("certs.d");
        fs::create_dir_all(trusted.join(self.host_port()))?;
        fs::copy(
            certs.join("ca.crt"),
            trusted.join(self.host_port()).join("ca.crt"),
        )?;
        self.restart()?;
        Ok(trusted)
    }

    /// Starts a token service (`tokenserver.py`, over HTTPS with the registry's certificate
    /// on `ADDR:5001`, signing with an RSA key made here) that grants `user` with `password`
    /// what it asks for, anonymous callers nothing, and refuses other credentials; then
    /// restarts the registry taking only its tokens (distribution's `auth: token`), as Docker
    /// Hub does. Call after [`Registry::serve_tls`] (a client reaches the token service with
    /// the registry's CA) and not with [`Registry::require_login`]. Push the test images first:
    /// the pusher does not log in.
    pub fn require_token_auth(&mut self, user: &str, password: &str) -> Result<()> {
        if !self.tls {
            bail!("require_token_auth needs serve_tls first: the token service uses its CA");
        }
        let config = fs::read_to_string(self.dir.join("config.yml"))?;
        if config.contains("\nauth:") {
            bail!("the registry already has an auth section (require_login?)");
        }
        let certs = self.dir.join("tls");
        crate::tls::write_token_signer(&certs)?;
        let script = self.dir.join("tokenserver.py");
        fs::write(&script, TOKEN_SERVER_PY)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tokenserver.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3"])
            .arg(&script)
            .arg(&certs)
            .args([
                user,
                password,
                &self.addr.to_string(),
                &TOKEN_PORT.to_string(),
            ])
            .arg(TOKEN_ISSUER)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the token service")?;
        self.token_server = Some(child);
        let realm = format!("https://{}:{TOKEN_PORT}/token", self.addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = crate::host::ns_exec(
                &self.ns,
                &[
                    "curl",
                    "-s",
                    "-k",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("{realm}?service={TOKEN_SERVICE}"),
                ],
                Duration::from_secs(5),
            )?;
            if out.status.success() && out.stdout == b"200" {
                break;
            }
            let exited = match self.token_server.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => true,
            };
            if exited || Instant::now() > deadline {
                bail!(
                    "token service not answering on {realm}: {}",
                    fs::read_to_string(self.dir.join("tokenserver.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        fs::write(
            self.dir.join("config.yml"),
            format!(
                "{config}auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                certs.join("token.crt").display()
            ),
        )?;
        self.restart()
    }

    /// `ADDR:PORT`, as image references and `--insecure-registry` name it.
    pub fn host_port(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.addr)
    }

    /// Stops the registry (SIGKILL): pulls fail as with a registry that went away.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c)?;
        }
        Ok(())
    }

    /// Starts it again, with the same storage.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Builds the test image (see the module docs) with `version` in `/etc/release` and
    /// `/srv/index.html`, pushes it as `repo:tag` (`oci`: an OCI manifest, else Docker's
    /// schema 2) and returns its manifest digest.
    pub fn push_test_image(
        &self,
        repo: &str,
        tag: &str,
        version: &str,
        oci: bool,
    ) -> Result<String> {
        let flags: &[&str] = if oci { &["--oci"] } else { &[] };
        self.run_pusher(repo, tag, version, flags, Duration::from_secs(60))
    }

    /// Like [`Registry::push_test_image`] (Docker's schema 2), with `healthcheck` (Docker's
    /// `HealthConfig` as JSON) as the image's HEALTHCHECK.
    pub fn push_test_image_with_healthcheck(
        &self,
        repo: &str,
        tag: &str,
        version: &str,
        healthcheck: &str,
    ) -> Result<String> {
        self.run_pusher(
            repo,
            tag,
            version,
            &["--healthcheck", healthcheck],
            Duration::from_secs(60),
        )
    }

    /// Like [`Registry::push_test_image`] (Docker's schema 2), with the image config's
    /// `Entrypoint`, `Cmd` and `User` set as `config` says (what it leaves `None` is as in
    /// the plain test image: no entrypoint, `Cmd ["sh"]`, no user).
    pub fn push_test_image_with(
        &self,
        repo: &str,
        tag: &str,
        version: &str,
        config: &TestImageConfig,
    ) -> Result<String> {
        let json = |v: &Option<Vec<String>>| v.as_ref().map(serde_json::to_string).transpose();
        let (entrypoint, cmd) = (json(&config.entrypoint)?, json(&config.cmd)?);
        let mut flags: Vec<&str> = Vec::new();
        for (flag, value) in [
            ("--entrypoint", entrypoint.as_deref()),
            ("--cmd", cmd.as_deref()),
            ("--user", config.user.as_deref()),
        ] {
            if let Some(v) = value {
                flags.extend([flag, v]);
            }
        }
        self.run_pusher(repo, tag, version, &flags, Duration::from_secs(60))
    }

    /// Builds and pushes the benchmarks' bigger image as `repo:tag` (`testimage.py --big`:
    /// five layers, about 40 MB of random data); returns the pusher's JSON line
    /// (`digest`, `layers`, `compressed`, `unpacked`).
    pub fn push_big_image(&self, repo: &str, tag: &str) -> Result<serde_json::Value> {
        let out = self.run_pusher(repo, tag, "big", &["--big"], Duration::from_secs(300))?;
        serde_json::from_str(&out).with_context(|| format!("pusher output {out:?}"))
    }

    fn run_pusher(
        &self,
        repo: &str,
        tag: &str,
        version: &str,
        flags: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let script = self.dir.join("testimage.py");
        let script = script.to_string_lossy();
        let host_port = self.host_port();
        let mut argv = vec!["python3", &script, &host_port, repo, tag, version];
        argv.extend_from_slice(flags);
        let out = crate::host::ns_exec(&self.ns, &argv, timeout)?;
        if !out.status.success() {
            bail!(
                "pushing {repo}:{tag}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// What [`Registry::push_test_image_with`] changes in the test image's config, as a
/// Dockerfile's `ENTRYPOINT`, `CMD` and `USER` would.
#[derive(Clone, Debug, Default)]
pub struct TestImageConfig {
    /// The image's `Entrypoint` (none by default).
    pub entrypoint: Option<Vec<String>>,
    /// The image's `Cmd` (`["sh"]` by default).
    pub cmd: Option<Vec<String>>,
    /// The image's `User` (none, i.e. root, by default).
    pub user: Option<String>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(mut c) = self.token_server.take() {
            let _ = kill_and_reap(&mut c);
        }
    }
}

/// Builds the test image (as [`Registry::push_test_image`] does, with `version`) and writes it
/// to `out` as a `docker save` archive (`manifest.json` naming `name:tag`, the config, each
/// layer as an uncompressed `layer.tar`), for `mesh image load`; no registry is involved.
/// `dir` receives the builder script. Returns the image ID (the config's digest).
pub fn save_test_image(
    dir: &std::path::Path,
    name: &str,
    tag: &str,
    version: &str,
    out: &std::path::Path,
) -> Result<String> {
    fs::create_dir_all(dir)?;
    let script = dir.join("testimage.py");
    fs::write(&script, TESTIMAGE_PY)?;
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["-", name, tag, version, "--save"])
        .arg(out);
    let res = crate::process::output_with_timeout(&mut cmd, Duration::from_secs(60))?;
    if !res.status.success() {
        bail!(
            "saving {name}:{tag}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&res.stdout).trim().to_string())
}

/// The start of an image test: `None` when it must be skipped (not root, outside CI), else a
/// cluster of `hosts` with a registry on host 1, every meshd trusting it over plain HTTP
/// (`--insecure-registry`), and a swarm of `managers` managers (the rest workers).
pub fn registry_cluster(
    hosts: usize,
    managers: usize,
    hint: &'static str,
) -> Result<Option<(crate::Cluster, Registry)>> {
    if !crate::require_root()? {
        return Ok(None);
    }
    let c = crate::Cluster::new(crate::ClusterOpts {
        hosts,
        start_daemons: false,
        name_hint: hint,
    })?;
    let reg = Registry::start(c.host(1), c.base_dir().join("registry"))?;
    let insecure = reg.host_port();
    for h in c.hosts() {
        h.start_daemon_with(&["--insecure-registry", &insecure])?;
    }
    crate::swarm::form_swarm(&c, managers)?;
    Ok(Some((c, reg)))
}
