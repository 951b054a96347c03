//! `cargo xtask soak [--minutes N] [--seed S] [--lb-backend ebpf|nftables]`: the seeded churn
//! soak of `mesh_netns::soak`. Prints the seed first (the same seed replays the same schedule),
//! every operation as it runs, then the report; exits 1 if an invariant broke.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use mesh_netns::soak::{self, SoakOpts};

pub fn run(args: &[String]) -> Result<()> {
    let mut minutes: f64 = 10.0;
    let mut seed: Option<u64> = None;
    let mut lb_backend = "ebpf".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--minutes" => {
                let v = value("--minutes")?;
                minutes = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0)
                    .with_context(|| format!("invalid --minutes {v:?} (a positive number)"))?;
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = Some(
                    v.parse()
                        .with_context(|| format!("invalid --seed {v:?} (an unsigned integer)"))?,
                );
            }
            "--lb-backend" => {
                lb_backend = value("--lb-backend")?;
                if !matches!(lb_backend.as_str(), "ebpf" | "nftables") {
                    bail!("invalid --lb-backend {lb_backend:?} (ebpf or nftables)");
                }
            }
            other => bail!(
                "unknown argument {other:?}: cargo xtask soak [--minutes N] [--seed S] [--lb-backend ebpf|nftables]"
            ),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("soak: seed {seed}, {minutes} minutes, --lb-backend {lb_backend} (replay with --seed {seed})");
    let report = soak::run(&SoakOpts {
        duration: Duration::from_secs_f64(minutes * 60.0),
        seed,
        lb_backend,
        name_hint: "soak",
    })?;
    print!("{}", report.render());
    let v = report.violations();
    if !v.is_empty() {
        bail!("{} invariant violations (seed {seed})", v.len());
    }
    println!("soak: no invariant broken");
    Ok(())
}
