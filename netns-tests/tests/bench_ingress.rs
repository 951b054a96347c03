//! `mesh bench ingress` run by an operator on the test cluster, from the underlay client (the
//! machine outside the cluster): it deploys its server, measures the direct path and every
//! node's routing mesh without a failed connection, prints its table, JSON and chart, and
//! removes its service, also when interrupted with Ctrl-C.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::swarm_cluster;
use mesh_netns::{wait_for, Cluster};

/// `mesh -H <h1's socket> bench ingress ARGS` from the underlay client.
fn bench(c: &Cluster, args: &[&str]) -> Result<std::process::Output> {
    let mesh = mesh_netns::binaries()?.mesh.to_string_lossy().to_string();
    let host = format!("unix://{}", c.host(1).socket().display());
    let mut argv = vec![mesh.as_str(), "-H", host.as_str(), "bench", "ingress"];
    argv.extend_from_slice(args);
    c.client_exec_timeout(&argv, Duration::from_secs(240))
}

/// The services whose name starts with `mesh-bench-`.
fn bench_services(c: &Cluster) -> Result<Vec<String>> {
    Ok(c.host(1)
        .mesh_ok(&["service", "ls", "--format", "{{.Name}}"])?
        .lines()
        .filter(|l| l.starts_with("mesh-bench-"))
        .map(str::to_string)
        .collect())
}

#[test]
fn bench_ingress_measures_every_node_and_cleans_up() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "bench-ingr")? else {
        return Ok(());
    };
    let dir = c.base_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let chart = dir.join("chart.svg");
    let chart_s = chart.to_string_lossy().to_string();

    // JSON and a chart.
    let out = bench(
        &c,
        &[
            "--duration",
            "300ms",
            "--rounds",
            "2",
            "--streams",
            "2",
            "--format",
            "json",
            "--chart",
            &chart_s,
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench failed: {stderr}");
    ensure!(stderr.contains("round 2/2"), "no progress shown: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench's JSON")?;
    let results = report["results"].as_array().context("results")?;
    ensure!(results.len() == 4, "a direct path and 3 nodes: {report:#}");
    ensure!(
        results[0]["path"] == "direct",
        "the direct path first: {report:#}"
    );
    let nodes: Vec<&str> = results[1..]
        .iter()
        .map(|r| r["node"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        nodes == ["h1", "h2", "h3"],
        "every node measured: {nodes:?}"
    );
    for r in results {
        ensure!(r["errors"] == 0, "errors on a path: {r:#}");
        for k in [
            "throughput_bits_per_second",
            "throughput_streams_bits_per_second",
            "connections_per_second",
            "latency_p50_ms",
            "latency_p99_ms",
        ] {
            ensure!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k} missing: {r:#}");
        }
        if r["path"] == "ingress" {
            for k in ["throughput_ratio", "connections_ratio"] {
                ensure!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k} missing: {r:#}");
            }
        }
    }
    let svg = std::fs::read_to_string(&chart).context("the chart")?;
    ensure!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    ensure!(svg.contains("via h3"), "a bar group per node: {svg}");
    ensure!(
        bench_services(&c)?.is_empty(),
        "the bench's service is left"
    );

    // The table.
    let out = bench(&c, &["--duration", "200ms", "--rounds", "1"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    ensure!(lines.len() == 5, "a header and 4 rows: {stdout}");
    ensure!(
        lines[0].starts_with("PATH") && lines[0].contains("CONN/S"),
        "{stdout}"
    );
    ensure!(lines[1].starts_with("direct (host mode)"), "{stdout}");
    ensure!(
        lines[2..].iter().all(|l| l.starts_with("routing mesh")),
        "{stdout}"
    );
    ensure!(
        bench_services(&c)?.is_empty(),
        "the bench's service is left"
    );

    // Interrupted: the service still goes.
    let mesh = mesh_netns::binaries()?.mesh.to_string_lossy().to_string();
    let host = format!("unix://{}", c.host(1).socket().display());
    let mut child = Command::new("ip")
        .args(["netns", "exec", c.underlay_ns(), &mesh, "-H", &host])
        .args(["bench", "ingress", "--duration", "5s", "--rounds", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let waited = wait_for(
        "the bench deploys its service",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok((!bench_services(&c)?.is_empty()).then_some(())),
    );
    // SAFETY: plain syscall on our own child, not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the bench did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    waited?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        e.read_to_string(&mut err)?;
    }
    ensure!(!status.success(), "an interrupted bench exits non-zero");
    ensure!(err.contains("interrupted"), "{err}");
    ensure!(
        bench_services(&c)?.is_empty(),
        "the interrupted bench left its service: {err}"
    );
    Ok(())
}
