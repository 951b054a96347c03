//! `mesh-bench`: benchmark programs for mesh.
//!
//! Usage: `mesh-bench NAME [ARGS...]`, normally through `cargo xtask bench NAME`, which
//! builds `meshd` and `mesh` in release mode first. Each benchmark runs a real cluster on
//! the multi-host harness (`mesh-netns`), prints a markdown report to stdout and, unless
//! `--no-write-docs` is given, rewrites its own section of `docs/benchmarks.md` (between
//! `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->`).
//!
//! Adding a benchmark: write `src/<name>.rs` with a `pub fn run(args: &[String]) ->
//! anyhow::Result<()>` and a `pub const ABOUT: &str`, declare the module below and add a
//! line to [`BENCHES`].
//!
//! Two hidden subcommands, `serve-http` and `http-load`, are the HTTP server and load
//! generator the data-plane benchmarks (`ingress`, `vip`) run inside tasks and namespaces
//! (see `netload`).

mod api;
mod dns;
mod dockerd;
mod engine;
mod gossip;
mod images;
mod ingress;
mod lb;
mod metrics;
mod netload;
mod overlay;
mod raft;
mod report;
mod scheduler;
mod services;
mod stats;
mod swarm;
mod vip;

use anyhow::{bail, Result};

/// One benchmark: its name on the command line, a one-line description and its entry point
/// (which gets the arguments after the name).
struct Bench {
    name: &'static str,
    about: &'static str,
    run: fn(&[String]) -> Result<()>,
}

/// All benchmarks, in the order `--help` lists them.
const BENCHES: &[Bench] = &[
    Bench {
        name: "raft",
        about: raft::ABOUT,
        run: raft::run,
    },
    Bench {
        name: "gossip",
        about: gossip::ABOUT,
        run: run_gossip,
    },
    Bench {
        name: "overlay",
        about: overlay::ABOUT,
        run: overlay::run,
    },
    Bench {
        name: "services",
        about: services::ABOUT,
        run: services::run,
    },
    Bench {
        name: "images",
        about: images::ABOUT,
        run: images::run,
    },
    Bench {
        name: "engine",
        about: engine::ABOUT,
        run: engine::run,
    },
    Bench {
        name: "dns",
        about: dns::ABOUT,
        run: dns::run,
    },
    Bench {
        name: "lb",
        about: lb::ABOUT,
        run: lb::run,
    },
    Bench {
        name: "ingress",
        about: ingress::ABOUT,
        run: ingress::run,
    },
    Bench {
        name: "vip",
        about: vip::ABOUT,
        run: vip::run,
    },
    Bench {
        name: "scheduler",
        about: scheduler::ABOUT,
        run: run_scheduler,
    },
    Bench {
        name: "swarm",
        about: swarm::ABOUT,
        run: run_swarm,
    },
    Bench {
        name: "metrics",
        about: metrics::ABOUT,
        run: run_metrics,
    },
];

/// The gossip simulation returns its report; print it and keep it in docs/benchmarks.md.
fn run_gossip(args: &[String]) -> Result<()> {
    let write = !args.iter().any(|a| a == "--no-write-docs");
    let text = gossip::run(args)?;
    println!("{text}");
    if write && !args.iter().any(|a| a == "--help" || a == "-h") {
        report::write_section("gossip", &text)?;
    }
    Ok(())
}

/// A benchmark that returns its report: prints it and keeps it in docs/benchmarks.md under
/// `section` (unless `--no-write-docs`, `--help`, or an empty report). `run` gets the
/// arguments without `--no-write-docs` and whether the docs are written.
fn run_reported(
    section: &str,
    args: &[String],
    run: impl FnOnce(&[String], bool) -> Result<String>,
) -> Result<()> {
    let write = !args.iter().any(|a| a == "--no-write-docs");
    let args: Vec<String> = args
        .iter()
        .filter(|a| *a != "--no-write-docs")
        .cloned()
        .collect();
    let text = run(&args, write)?;
    if !text.is_empty() {
        println!("{text}");
    }
    if write && !text.is_empty() && !args.iter().any(|a| a == "--help" || a == "-h") {
        report::write_section(section, &text)?;
    }
    Ok(())
}

fn run_scheduler(args: &[String]) -> Result<()> {
    run_reported("scheduler", args, |a, _| scheduler::run(a))
}

fn run_swarm(args: &[String]) -> Result<()> {
    run_reported("swarm", args, swarm::run)
}

fn run_metrics(args: &[String]) -> Result<()> {
    run_reported("metrics", args, |a, _| metrics::run(a))
}

fn usage() -> String {
    let mut s = String::from("usage: mesh-bench NAME [ARGS...]   (or: cargo xtask bench NAME)\n\n");
    for b in BENCHES {
        s.push_str(&format!("  {:<8} {}\n", b.name, b.about));
    }
    s.push_str("\nRun `mesh-bench NAME --help` for a benchmark's options.");
    s
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        bail!("no benchmark given\n{}", usage());
    };
    if matches!(name.as_str(), "-h" | "--help" | "help") {
        println!("{}", usage());
        return Ok(());
    }
    // Hidden helpers the data-plane benchmarks run inside tasks and namespaces.
    match name.as_str() {
        "serve-http" => return netload::serve_http(&args[1..]),
        "http-load" => return netload::http_load(&args[1..]),
        _ => {}
    }
    match BENCHES.iter().find(|b| b.name == name) {
        Some(b) => (b.run)(&args[1..]),
        None => bail!("unknown benchmark {name:?}\n{}", usage()),
    }
}
