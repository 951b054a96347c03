//! `engine`: what the Docker Engine API costs next to the local API, side by side on the same
//! daemon. One netns host runs a one-manager swarm with N services (0 replicas) plus one of
//! 20 running replicas; in interleaved rounds the same questions are asked through the local
//! socket (what the `mesh` CLI sends) and through `docker.sock` (what the `docker` CLI sends,
//! over one kept-alive HTTP connection): list the services with their counts, inspect one,
//! list one service's tasks. Both read the leader's store; the Engine API reads a snapshot of
//! every object and shapes it, so its cost grows with the cluster, which the two sizes show.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_api::{Request, ServiceMode, ServiceSpec};
use mesh_netns::swarm::form_swarm;
use mesh_netns::{require_root, Cluster, ClusterOpts};

use crate::api::Client;
use crate::report;
use crate::stats::median;

pub const ABOUT: &str =
    "Engine API (docker.sock) against the local API: service ls, inspect, ps, with 100 and 1000 services";
const SIZES: [usize; 2] = [100, 1000];
const ROUNDS: usize = 5;
const CALLS: usize = 20;
const REPLICAS: u64 = 20;

/// One kept-alive HTTP/1.1 connection to an Engine API socket.
struct Http {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Http {
    fn connect(path: &Path) -> Result<Http> {
        let writer = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        writer.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Http {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    /// `GET path`: the body of a 200 answer.
    fn get(&mut self, path: &str) -> Result<Vec<u8>> {
        write!(
            self.writer,
            "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: mesh-bench\r\n\r\n"
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut len = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let len = len.context("no content-length")?;
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        if status != 200 {
            bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn spec(name: &str, replicas: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated { replicas },
        command: vec!["sleep".into(), "86900".into()],
        ..Default::default()
    }
}

/// Median time of one call over [`CALLS`] calls, per round.
fn time(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t0 = Instant::now();
    for _ in 0..CALLS {
        f()?;
    }
    Ok(t0.elapsed() / CALLS as u32)
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: mesh-bench engine [--no-write-docs]\n\n{ABOUT}");
        return Ok(());
    }
    let write = !args.iter().any(|a| a == "--no-write-docs");
    if !require_root()? {
        bail!("the engine benchmark needs root (network namespaces)");
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 1,
        start_daemons: true,
        name_hint: "bench-engine",
    })?;
    form_swarm(&c, 1)?;
    let h = c.host(1);
    let mut api = Client::connect(&h.socket(), Duration::from_secs(60))?;
    let mut call = |req: &Request| api.call_ok(&serde_json::to_value(req)?);
    call(&Request::ServiceCreate {
        spec: spec("busy", REPLICAS),
        registry_auth: None,
    })?;
    let t0 = Instant::now();
    loop {
        let v = call(&Request::ServiceLs {
            filters: Default::default(),
        })?;
        let running = v
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "busy"))
            .and_then(|s| s["running"].as_u64());
        if running == Some(REPLICAS) {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(60), "busy never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut rows = String::new();
    let mut made = 0;
    for size in SIZES {
        while made < size {
            call(&Request::ServiceCreate {
                spec: spec(&format!("idle{made}"), 0),
                registry_auth: None,
            })?;
            made += 1;
        }
        let mut http = Http::connect(&h.docker_socket())?;
        let filter = "/v1.41/tasks?filters=%7B%22service%22%3A%7B%22busy%22%3Atrue%7D%7D";
        let mut samples: [[Vec<Duration>; 2]; 3] = Default::default();
        for round in 0..ROUNDS {
            // Interleaved: local, then Engine, per question, per round.
            samples[0][0].push(time(|| {
                call(&Request::ServiceLs {
                    filters: Default::default(),
                })
                .map(drop)
            })?);
            samples[0][1].push(time(|| http.get("/v1.41/services?status=true").map(drop))?);
            samples[1][0].push(time(|| {
                call(&Request::ServiceInspect {
                    service: "busy".into(),
                })
                .map(drop)
            })?);
            samples[1][1].push(time(|| http.get("/v1.41/services/busy").map(drop))?);
            samples[2][0].push(time(|| {
                call(&Request::ServicePs {
                    service: "busy".into(),
                    filters: Default::default(),
                })
                .map(drop)
            })?);
            samples[2][1].push(time(|| http.get(filter).map(drop))?);
            eprintln!(
                "{size} services, round {round}: ls {:?}/{:?}",
                samples[0][0][round], samples[0][1][round]
            );
        }
        for (i, what) in [
            "service ls (`ServiceLs` / `GET /services?status=true`)",
            "service inspect (`ServiceInspect` / `GET /services/{id}`)",
            "service ps (`ServicePs` / `GET /tasks?filters=service`)",
        ]
        .iter()
        .enumerate()
        {
            let local = median(&samples[i][0]);
            let engine = median(&samples[i][1]);
            rows.push_str(&format!(
                "| {size} | {what} | {} | {} | {:.2} |\n",
                ms(local),
                ms(engine),
                engine.as_secs_f64() / local.as_secs_f64()
            ));
        }
    }
    let mut text = String::from("## Engine API: `docker.sock` next to the local API\n\n");
    text.push_str(&format!(
        "Measured {} on {}. Reproduce with `cargo xtask bench engine`. One netns host, a one-manager swarm with one service of {REPLICAS} running replicas and N idle services; per question the median of {ROUNDS} interleaved rounds of the mean of {CALLS} calls, each over one kept-open connection: the local API (what `mesh` sends) and the Engine API (what `docker` sends, HTTP/1.1 kept alive). The Engine API answers from a snapshot of every object, shaped per call, so its cost grows with the cluster.\n\n",
        report::utc_now(),
        report::machine()
    ));
    text.push_str("| services | question | local API | Engine API | Engine / local |\n|---:|---|---:|---:|---:|\n");
    text.push_str(&rows);
    println!("{text}");
    if write {
        report::write_section("engine", &text)?;
    }
    Ok(())
}
