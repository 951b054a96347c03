//! `cargo xtask`: the one task runner.
//!
//! - `cargo xtask test [ARGS]`: installs what the tests need (as root), builds, runs the
//!   whole test suite (`cargo test --workspace`), extra args passed to cargo test;
//! - `cargo xtask demo [--keep]`: a cluster of simulated hosts on this machine, end to end;
//! - `cargo xtask bench NAME`: runs a benchmark of `bench/` in release mode (it rewrites its
//!   section of `docs/benchmarks.md`);
//! - `cargo xtask soak [--minutes N] [--seed S] [--lb-backend ebpf|nftables]`: the seeded churn
//!   soak (`mesh_netns::soak`) on a 5-host cluster; exits 1 if an invariant broke;
//! - `cargo xtask deb`: the Debian package (release binaries and the systemd unit) in
//!   `target/deb/`;
//! - `cargo xtask tidy`: the structural checks of `tidy.rs` (layering, `forbid(unsafe_code)`,
//!   module docs), then fmt and clippy as CI runs them.

#![forbid(unsafe_code)]

mod deb;
mod demo;
mod soak;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Debian packages the tests, the demo and the benchmarks use.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("iperf3", "iperf3"),
    ("gnuplot", "gnuplot-nox"),
    ("dnsmasq", "dnsmasq-base"),
    ("dnsperf", "dnsperf"),
    ("clang", "clang"),
    ("llvm-strip", "llvm"),
    ("bpftool", "bpftool"),
    ("systemd-analyze", "systemd"),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let verb = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match verb.as_str() {
        "test" => test(&rest),
        "demo" => {
            ensure_packages()?;
            demo::run(rest.iter().any(|a| a == "--keep"))
        }
        "bench" => bench(&rest),
        "soak" => {
            ensure_packages()?;
            soak::run(&rest)
        }
        "tidy" => tidy(),
        "deb" => deb::run(&root()),
        _ => {
            eprintln!(
                "usage: cargo xtask test [CARGO TEST ARGS] | demo [--keep] | bench NAME | soak [--minutes N] [--seed S] [--lb-backend ebpf|nftables] | deb | tidy"
            );
            bail!("unknown verb: {verb:?}")
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Debian packages whose commands are missing (root only).
fn ensure_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, p)| *p)
        .collect();
    // The eBPF programs include libbpf's helper headers.
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        missing.push("libbpf-dev");
    }
    // The metrics test parses scrapes with the system python's OpenMetrics parser.
    if !Path::new("/usr/lib/python3/dist-packages/prometheus_client").exists() {
        missing.push("python3-prometheus-client");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {missing:?}: install them or run as root");
    }
    eprintln!("xtask: installing {missing:?}");
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test(args: &[String]) -> anyhow::Result<()> {
    ensure_packages()?;
    if !is_root() {
        eprintln!(
            "xtask: not root: the multi-host tests in netns-tests will be skipped (they need root)"
        );
    }
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    // Tee cargo test's output and add up every runner's closing line, so that the run ends on
    // one summary for the whole workspace.
    let mut child = cargo()
        .args(["test", "--workspace"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            let count = |word: &str| -> u64 {
                let words: Vec<&str> = line
                    .split([' ', ';', ','])
                    .filter(|w| !w.is_empty())
                    .collect();
                words
                    .windows(2)
                    .find(|w| w[1] == word)
                    .and_then(|w| w[0].parse().ok())
                    .unwrap_or(0)
            };
            // libtest's "test result: ok. N passed; M failed; K ignored; ..." and the plain
            // "N passed, M failed" of harness-less test binaries.
            if line.starts_with("test result:")
                || line.trim_end().ends_with(" failed") && line.contains(" passed, ")
            {
                passed += count("passed");
                failed += count("failed");
                ignored += count("ignored") + count("skipped");
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    ensure_packages()?;
    sh(cargo().args(["build", "--release", "-p", "meshd", "-p", "mesh-cli"]))?;
    sh(cargo()
        .args(["run", "--release", "-p", "mesh-bench", "--"])
        .args(args))
}

fn tidy() -> anyhow::Result<()> {
    tidy::run()?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}
